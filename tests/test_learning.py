"""Slow checks that the models learn and detect: a short GRPO training on phantom windows ranks lesion windows
above lesion-free ones better than the untrained Glance; the shipped weights find the lesions of fixed phantoms
and the demo CT's sarcoma (where its mask is at hand), and flag neither phantom's lesion-free twin. `make test-all`
runs them (`-m slow`)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from monai.utils import set_determinism
from scipy import ndimage

from scripts.cli.screen import DEMO_INPUT, screen
from scripts.metrics import glance_operating_point, lesion_detection
from scripts.networks import GlanceFocusNet, GlanceNet
from scripts.phantom import REGIONS, make_phantom
from scripts.trainer import GRPOTrainer

pytestmark = pytest.mark.slow

WINDOW = 16
GROUP = 8  # windows per scan and iteration: half with lesion, half without
SHAPE, SPACING = (64, 64, 40), (2.0, 2.0, 3.0)
MIN_LESION_VOXELS = 30  # a lesion window holds at least this much lesion (a few voxels of lesion edge: too hard here)
EPOCHS = 30
# Measured with this test's data and seeds on a 2-core AMD EPYC (27 s when the machine is otherwise idle): window
# AUC 0.536 untrained, 0.614 after 30 epochs; 0.477 with the advantage's sign flipped in the trainer.
MIN_AUC_GAIN = 0.05

# The shipped weights on phantoms of the default size, screened on the 2-core CPU: seed 3 was fixed here when 0.5.0
# found its lesions of at least 5 mL (abdomen 9.5 and 10.1 mL, chest 9.4 mL) and flagged neither lesion-free twin.
# Over seeds 0-5 of both regions 0.6.0 finds 5 of the 8 lesions >= 5 mL and none of the 20 smaller (as on the
# validation set: bundle/docs/README.md) and flags none of the 12 lesion-free twins (0.5.0: 3 of the 6 chest twins,
# one 1.1-1.4 mL false positive each): a guard against regressions, not a measure of specificity.
PHANTOM_SEED = 3
MIN_FOUND_ML = 5.0
DEMO_MASK = Path(__file__).resolve().parents[2] / "shared" / "data" / "realct" / "extremity" / "sts_012_lesion.nii.gz"
# The shipped weights' (0.6.0) lesion there (255 mL, for the sarcoma's 79 mL) holds 64 % of the sarcoma's voxels; the
# rest of it is surrounding muscle (bundle/docs/README.md: lesion DSC 0.310 on this case; 0.5.0: 28 %, 132 mL).
MIN_SARCOMA_COVERED = 0.2


def _phantom_windows(seed: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Windows (16^3, stride 8; soft-tissue window mapped to [0, 1]) of a small abdominal phantom: those holding
    lesion, and as lesion-free ones the windows of its healthy twin (same anatomy and noise) lying in the body,
    so that the Glance cannot tell them apart by air alone. None when no window holds enough lesion."""
    ph, twin = (make_phantom(seed, shape=SHAPE, spacing=SPACING, lesions=les) for les in (True, False))
    images, labels = [], []
    for corner in itertools.product(*(range(0, n - WINDOW + 1, WINDOW // 2) for n in SHAPE)):
        where = tuple(slice(c, c + WINDOW) for c in corner)
        if ph.label[where].sum() >= MIN_LESION_VOXELS:
            images.append(ph.image[where])
            labels.append(ph.label[where])
        if (twin.image[where] > -500).mean() >= 0.9:
            images.append(twin.image[where])
            labels.append(np.zeros_like(ph.label[where]))
    if not any(label.any() for label in labels):
        return None
    hu = torch.from_numpy(np.stack(images).astype(np.float32))[:, None]
    return ((hu + 160.0) / 400.0).clamp(0.0, 1.0), torch.from_numpy(np.stack(labels).astype(np.float32))[:, None]


def _scans(seeds: range) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [w for w in map(_phantom_windows, seeds) if w is not None]


def _has_lesion(labels: torch.Tensor) -> torch.Tensor:
    return labels.flatten(1).amax(1) > 0


class GroupLoader:
    """One group per training phantom and epoch: GROUP // 2 lesion windows and GROUP // 2 lesion-free ones, drawn
    at random (seeded), scan-major as the trainer expects."""

    def __init__(self, scans: list[tuple[torch.Tensor, torch.Tensor]], seed: int = 0) -> None:
        self.scans, self.rng = scans, np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.scans)

    def __iter__(self):
        for images, labels in self.scans:
            lesion = _has_lesion(labels).numpy()
            pick = [
                self.rng.choice(np.flatnonzero(c), GROUP // 2, replace=c.sum() < GROUP // 2) for c in (lesion, ~lesion)
            ]
            index = torch.from_numpy(np.concatenate(pick))
            yield {"image": images[index], "label": labels[index]}


def _window_auc(net: GlanceFocusNet, scans: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """ROC AUC of the Glance's p(keep) for lesion windows against lesion-free ones, every window of ``scans``."""
    net.eval()
    scores = []
    with torch.no_grad():
        for images, labels in scans:
            p_keep = net(images, glance=True).softmax(-1)[:, 1]
            scores += [[float(p), bool(y)] for p, y in zip(p_keep, _has_lesion(labels))]
    return glance_operating_point(scores)["auc"]


def test_short_grpo_training_improves_the_glance_window_ranking():
    """GRPO alone (alpha 0: the policy loss is the Glance's only teacher, no CE label) for 30 epochs on 7 small
    phantoms: the Glance ranks the lesion windows of 4 held-out phantoms above their lesion-free windows better
    than it did untrained. A flipped advantage, or a reward from the actions not taken, teaches the opposite."""
    set_determinism(0)
    train, held_out = _scans(range(8)), _scans(range(100, 106))
    assert len(train) >= 6 and len(held_out) >= 4
    torch.manual_seed(0)
    net = GlanceFocusNet(
        GlanceNet(1, downsample=2, channels=(8, 16, 16), strides=(2, 2, 1), window_pool="max"),
        UNet(3, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=0),
    )
    before = _window_auc(net, held_out)
    trainer = GRPOTrainer(
        device=torch.device("cpu"),
        max_epochs=EPOCHS,
        train_data_loader=GroupLoader(train),
        network=net,
        optimizer=torch.optim.AdamW(net.parameters(), lr=3e-3),
        loss_function=DiceCELoss(to_onehot_y=True, softmax=True),
        decollate=False,
        amp=False,
        group_size=GROUP,
        alpha=0.0,
    )
    trainer.run()
    after = _window_auc(net, held_out)
    assert after >= before + MIN_AUC_GAIN, f"window AUC {before:.3f} untrained, {after:.3f} after {EPOCHS} epochs"


def _mask(report: dict) -> nib.Nifti1Image:
    return nib.load(report["files"]["mask"])


@pytest.fixture(scope="module")
def screened_phantoms(tmp_path_factory) -> dict[str, tuple]:
    """Seed ``PHANTOM_SEED`` of each region, with its lesions and without them (the same patient), screened in one
    run with the shipped weights (bundle/models/model.pt): {"<region>_lesions" | "<region>_lesion_free":
    (phantom, report, saved mask as bool array)}."""
    root = tmp_path_factory.mktemp("shipped")
    (root / "in").mkdir()
    phantoms = {}
    for region, lesions in itertools.product(REGIONS, (True, False)):
        name = f"{region}_{'lesions' if lesions else 'lesion_free'}"
        phantoms[name] = make_phantom(PHANTOM_SEED, region=region, lesions=lesions)
        nib.save(nib.Nifti1Image(phantoms[name].image, phantoms[name].affine), str(root / "in" / f"{name}.nii.gz"))
    screen(input=str(root / "in"), output_dir=str(root / "out"), device="cpu")
    screened = {}
    for name, phantom in phantoms.items():
        report = json.loads((root / "out" / f"{name}_report.json").read_text())
        screened[name] = phantom, report, np.asarray(_mask(report).dataobj) > 0
    return screened


# A known miss of the shipped weights (0.6.0), stated in the model card's Limitations: the Glance drops the chest
# phantom's 9.4 mL lesion window (the Focus finds the lesion with every window focused). Strict: weights that find
# it make this test fail until the mark is removed.
KNOWN_MISSES = {"chest": "0.6.0's Glance drops the 9.4 mL lesion of chest phantom seed 3 (model card, Limitations)"}


@pytest.mark.parametrize(
    "region",
    [
        pytest.param(r, marks=pytest.mark.xfail(strict=True, reason=KNOWN_MISSES[r])) if r in KNOWN_MISSES else r
        for r in REGIONS
    ],
)
def test_shipped_weights_find_the_lesions_of_a_fixed_phantom(screened_phantoms, region):
    """Every lesion of at least ``MIN_FOUND_ML`` of the fixed phantom is found (the saved mask touches it), and the
    scan is suspicious."""
    phantom, report, mask = screened_phantoms[f"{region}_lesions"]
    found = lesion_detection(mask, phantom.label, np.diag(phantom.affine)[:3])
    sizes = [f"{les['volume_ml']:.2f} mL {'found' if les['detected'] else 'missed'}" for les in found["lesions"]]
    large = [les for les in found["lesions"] if les["volume_ml"] >= MIN_FOUND_ML]
    assert large and all(les["detected"] for les in large), f"verdict {report['verdict']!r}; lesions: {sizes}"
    assert report["verdict"] == "suspicious"


@pytest.mark.parametrize("region", REGIONS)
def test_shipped_weights_flag_no_lesion_free_phantom(screened_phantoms, region):
    """The same patients without lesions are not flagged."""
    _, report, _ = screened_phantoms[f"{region}_lesion_free"]
    assert report["verdict"] == "no lesion found", report["lesions"]


@pytest.mark.realdata
@pytest.mark.skipif(not DEMO_MASK.exists(), reason="needs ../shared/data/realct (the demo sarcoma's mask)")
def test_shipped_weights_find_the_demo_sarcoma(tmp_path):
    """The demo input (a thigh CT, never trained on) is suspicious, and one lesion of the saved mask holds at least
    ``MIN_SARCOMA_COVERED`` of the true sarcoma's voxels (its mask, on the source grid, mapped through both affines
    into the saved mask's grid). The sarcoma's mask is not redistributed with the bundle."""
    screen(input=str(DEMO_INPUT), output_dir=str(tmp_path), device="cpu")
    report = json.loads(next(tmp_path.glob("*_report.json")).read_text())
    assert report["verdict"] == "suspicious"
    pred, truth = _mask(report), nib.load(str(DEMO_MASK))
    world = nib.affines.apply_affine(truth.affine, np.argwhere(np.asarray(truth.dataobj) > 0))
    ijk = np.rint(nib.affines.apply_affine(np.linalg.inv(pred.affine), world)).astype(int)
    assert ((ijk >= 0) & (ijk < pred.shape)).all(), "the sarcoma lies outside the saved mask's grid"
    components, _ = ndimage.label(np.asarray(pred.dataobj) > 0, structure=np.ones((3, 3, 3)))
    hit = components[tuple(ijk.T)]
    covered = np.bincount(hit[hit > 0]).max(initial=0) / len(hit)
    assert covered >= MIN_SARCOMA_COVERED, f"{covered:.0%} of the sarcoma in one lesion; {report['lesions']}"
