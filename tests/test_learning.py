"""Slow checks that the models learn and detect: a short GRPO training on phantom windows ranks lesion windows
above lesion-free ones better than the untrained Glance, and the shipped weights find the demo phantom's lesions
while flagging nothing on lesion-free phantoms. `make test-all` runs them (`-m slow`)."""

from __future__ import annotations

import itertools
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from monai.utils import set_determinism

from scripts.metrics import glance_operating_point, lesion_detection
from scripts.networks import GlanceFocusNet, GlanceNet
from scripts.phantom import make_phantom
from scripts.screen import demo_phantom, screen
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


def _screen(tmp_path, name: str, image_path) -> tuple[dict, np.ndarray]:
    """Screen one file with the shipped weights (bundle/models/model.pt); return its report and saved mask."""
    out = tmp_path / name
    screen(input=str(image_path), output_dir=str(out), device="cpu")
    report = json.loads(next(out.glob("*_report.json")).read_text())
    return report, np.asarray(nib.load(report["files"]["mask"]).dataobj) > 0


def test_shipped_weights_find_the_demo_phantom_lesions(tmp_path):
    """The demo input (`make demo` without CT: phantom seed 7, abdomen) holds four liver tumours; the shipped
    weights must find each of them (the saved mask touches it)."""
    phantom = make_phantom(7, region="abdomen")
    path = demo_phantom(tmp_path)
    np.testing.assert_array_equal(np.asarray(nib.load(path).dataobj), phantom.image)  # the demo's input
    report, mask = _screen(tmp_path, "demo", path)
    found = lesion_detection(mask, phantom.label, np.diag(phantom.affine)[:3])
    sizes = [f"{les['volume_ml']:.2f} mL {'found' if les['detected'] else 'missed'}" for les in found["lesions"]]
    assert found["fn_lesions"] == 0, f"verdict {report['verdict']!r}; lesions: {sizes}"
    assert report["verdict"] == "suspicious"


@pytest.mark.parametrize("seed, region", [(7, "abdomen"), (8, "chest")])
def test_shipped_weights_flag_nothing_on_lesion_free_phantoms(tmp_path, seed, region):
    """The same patients without lesions (the demo phantom's healthy twin, and a chest) are not flagged."""
    phantom = make_phantom(seed, region=region, lesions=False)
    path = tmp_path / f"healthy_{seed}.nii.gz"
    nib.save(nib.Nifti1Image(phantom.image, phantom.affine), str(path))
    report, _ = _screen(tmp_path, "healthy", path)
    assert report["verdict"] == "no lesion found", report["lesions"]
