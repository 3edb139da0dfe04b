"""Lesion synthesis on real anatomy: hosts, implanted HU, label = implanted region, determinism; real nodules
pasted into lungs from a bank, and the bank written from LIDC-style crops."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from scripts.cli.prepare_data import write_nodule_bank
from scripts.transforms import HOSTS, LesionHostsd, RandLesionSynthesisd, RandNodulePasted, load_nodule_bank

PIXDIM = (1.5, 1.5, 3.0)


def _body(seed: int = 0) -> dict:
    """A 64 x 64 x 24 CT in HU: air around a body of soft tissue (40 HU), a lung (-850 HU) enclosed by it, and a
    liver block (60 HU, given as a mask) holding a 'true' lesion that no synthetic lesion may touch."""
    rng = np.random.default_rng(seed)
    hu = np.full((64, 64, 24), -1000.0)
    hu[4:60, 4:60, 2:22] = 40.0
    hu[8:30, 8:56, 4:20] = -850.0  # lung, enclosed by tissue
    liver = np.zeros_like(hu, dtype=np.uint8)
    liver[34:58, 8:56, 4:20] = 1
    hu[liver > 0] = 60.0
    hu += rng.normal(0, 5, hu.shape)
    label = np.zeros_like(liver)
    label[50:56, 48:54, 14:18] = 1
    t = lambda a: torch.as_tensor(a[None])  # noqa: E731
    return {"image": t(hu).float(), "label": t(label), "liver": t(liver)}


def _hosts(data: dict) -> dict:
    return LesionHostsd(pixdim=PIXDIM, min_lung_ml=1.0)(data)


def test_hosts_map_lung_liver_and_soft_tissue():
    d = _body()
    hosts = _hosts(d)["hosts"][0].numpy()
    lung = np.zeros(hosts.shape, bool)
    lung[8:30, 8:56, 4:20] = True
    np.testing.assert_array_equal(hosts == HOSTS["lung"], lung)  # the enclosed air, not the air around the body
    liver = (d["liver"][0].numpy() > 0) & (d["label"][0].numpy() == 0)
    np.testing.assert_array_equal(hosts == HOSTS["liver"], liver)  # the true lesion is no host
    assert (hosts[0] == HOSTS["none"]).all()  # outside air
    assert hosts[6, 6, 10] == HOSTS["soft_tissue"] and hosts[52, 50, 15] == HOSTS["none"]


@pytest.mark.parametrize("host", ["liver", "lung", "soft_tissue"])
def test_synthetic_lesion_stays_in_its_host_and_the_label_is_the_implanted_region(host):
    d = _hosts(_body())
    before_hu, before_label = d["image"].clone(), d["label"].clone()
    synth = RandLesionSynthesisd(pixdim=PIXDIM, prob=1.0, max_lesions=3, host_weights={host: 1.0})
    for seed in range(5):
        synth.set_random_state(seed)
        out = synth(d)
        assert synth.implanted and all(r["host"] == host for r in synth.implanted)
        changed = (out["image"] != before_hu)[0].numpy()
        in_host = d["hosts"][0].numpy() == HOSTS[host]
        assert changed.any() and not (changed & ~in_host).any()  # every changed voxel, margin included, in the host
        added = ((out["label"] > 0) & (before_label == 0))[0].numpy()
        assert not (added & ~in_host).any()
        assert int(added.sum()) == sum(r["voxels"] for r in synth.implanted)  # the label is the implanted region
        np.testing.assert_array_equal(out["label"][before_label > 0].numpy(), before_label[before_label > 0].numpy())
        assert torch.equal(d["image"], before_hu)  # the input is not modified in place


def test_implanted_hu_follow_the_host():
    """Without margin blur every label voxel is lesion value + texture: the mean is the recorded value, the
    texture's spread is within its range, and the value sits where the recipe puts it relative to the host."""
    d = _hosts(_body())
    cases = {"liver": 60.0, "lung": -850.0, "soft_tissue": 40.0}
    for host, host_hu in cases.items():
        synth = RandLesionSynthesisd(
            pixdim=PIXDIM, prob=1.0, max_lesions=1, host_weights={host: 1.0}, diameter_mm=(15, 20), margin_mm=0.01
        )
        for seed in range(4):
            synth.set_random_state(seed)
            out = synth(d)
            rec = synth.implanted[0]
            lesion = ((out["label"] > 0) & (d["label"] == 0))[0].numpy()
            values = out["image"][0].numpy()[lesion]
            assert abs(values.mean() - rec["hu"]) < 4.0
            assert 3.0 < values.std() < 25.0
            assert abs(rec["host_hu"] - host_hu) < 5.0
            shift = rec["hu"] - rec["host_hu"]
            if host == "liver":
                assert 20.0 - 1e-6 <= abs(shift) <= 80.0 + 1e-6
            elif host == "lung":
                assert -50.0 <= rec["hu"] <= 80.0
            else:
                assert 15.0 - 1e-6 <= abs(shift) <= 50.0 + 1e-6


def test_liver_lesions_are_mostly_hypodense_and_sizes_favour_small_lesions():
    d = _hosts(_body())
    synth = RandLesionSynthesisd(pixdim=PIXDIM, prob=1.0, max_lesions=1, host_weights={"liver": 1.0})
    synth.set_random_state(0)
    records = []
    for _ in range(60):
        synth(d)
        records += synth.implanted
    hypo = np.mean([r["hu"] < r["host_hu"] for r in records])
    diameters = np.array([r["diameter_mm"] for r in records])
    assert 0.5 < hypo < 0.9  # p_hypo 0.7
    assert diameters.min() >= 3 * 0.75 and diameters.max() <= 30 * 1.25
    assert 6.0 < np.median(diameters) < 14.0  # log-uniform on 3-30 mm: median about 9.5 mm, not 16.5 mm


def test_synthesis_is_deterministic_by_seed_and_respects_prob():
    d = _hosts(_body())
    a = RandLesionSynthesisd(pixdim=PIXDIM, prob=1.0).set_random_state(7)(d)
    b = RandLesionSynthesisd(pixdim=PIXDIM, prob=1.0).set_random_state(7)(d)
    c = RandLesionSynthesisd(pixdim=PIXDIM, prob=1.0).set_random_state(8)(d)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not torch.equal(a["image"], c["image"])
    never = RandLesionSynthesisd(pixdim=PIXDIM, prob=0.0).set_random_state(0)(d)
    assert torch.equal(never["image"], d["image"]) and torch.equal(never["label"], d["label"])
    with pytest.raises(ValueError, match="host_weights"):
        RandLesionSynthesisd(host_weights={"kidney": 1.0})


def _ball(shape: tuple[int, int, int], radius_mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    grid = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum(g**2 for g in grid) <= radius_mm**2


@pytest.fixture
def bank(tmp_path) -> str:
    """Two nodules on the training grid: a 7 x 7 x 5 voxel ball of 30 HU and a one-voxel one of -20 HU, each in
    lung parenchyma (-850 HU) with a two-voxel margin."""
    big = _ball((11, 11, 9), 5.0, PIXDIM)
    small = np.zeros((5, 5, 5), bool)
    small[2, 2, 2] = True
    arrays = {}
    for i, (mask, value) in enumerate(((big, 30.0), (small, -20.0))):
        arrays[f"hu_{i}"] = np.where(mask, value, -850.0).astype(np.int16)
        arrays[f"mask_{i}"] = mask.astype(np.uint8)
    np.savez_compressed(tmp_path / "nodules.npz", **arrays)
    return str(tmp_path / "nodules.npz")


def test_pasted_nodules_stay_in_the_lung_and_the_label_is_each_nodule(bank):
    d = _hosts(_body())
    before_hu, before_label = d["image"].clone(), d["label"].clone()
    lung = d["hosts"][0].numpy() == HOSTS["lung"]
    masks = [m.sum() for _, m in load_nodule_bank(bank)]
    paste = RandNodulePasted(bank, prob=1.0, max_nodules=3)
    for seed in range(6):
        paste.set_random_state(seed)
        out = paste(d)
        assert paste.pasted and all(p["voxels"] == masks[p["nodule"]] for p in paste.pasted)
        changed = (out["image"] != before_hu)[0].numpy()
        assert changed.any() and not (changed & ~lung).any()  # the blended margin too stays in the lung
        added = ((out["label"] > 0) & (before_label == 0))[0].numpy()
        assert int(added.sum()) == sum(p["voxels"] for p in paste.pasted) and not (added & ~lung).any()
        assert set(np.unique(out["image"][0].numpy()[added])) <= {30.0, -20.0}  # nodule HU copied, not faded
        for p in paste.pasted:
            assert added[tuple(p["centre"])]  # each nodule sits on its recorded lung voxel
        assert torch.equal(d["image"], before_hu)  # the input is not modified in place


def test_nodule_paste_is_deterministic_and_leaves_a_scan_without_lung_or_bank_unchanged(bank):
    d = _hosts(_body())
    a = RandNodulePasted(bank, prob=1.0).set_random_state(3)(d)
    b = RandNodulePasted(bank, prob=1.0).set_random_state(3)(d)
    c = RandNodulePasted(bank, prob=1.0).set_random_state(4)(d)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not torch.equal(a["image"], c["image"])
    no_lung = dict(d, hosts=torch.where(d["hosts"] == HOSTS["lung"], 0, d["hosts"]))
    for transform, data in (
        (RandNodulePasted(bank, prob=0.0), d),
        (RandNodulePasted(None, prob=1.0), d),
        (RandNodulePasted(bank, prob=1.0), no_lung),
    ):
        out = transform.set_random_state(0)(data)
        assert torch.equal(out["image"], d["image"]) and torch.equal(out["label"], d["label"])
        assert transform.pasted == []


def test_a_nodule_that_does_not_fit_in_the_lung_is_not_pasted(tmp_path):
    d = _hosts(_body())
    mask = np.ones((30, 30, 20), np.uint8)  # wider than the 22-voxel lung
    np.savez_compressed(tmp_path / "big.npz", hu_0=np.full(mask.shape, 30, np.int16), mask_0=mask)
    paste = RandNodulePasted(str(tmp_path / "big.npz"), prob=1.0, tries=5).set_random_state(0)
    out = paste(d)
    assert paste.pasted == [] and torch.equal(out["image"], d["image"])


def test_nodule_bank_is_resampled_to_the_grid_trimmed_and_skips_empty_masks(tmp_path):
    """A 10 mm ball on a 0.7 x 0.7 x 2.5 mm crop keeps its volume on the 1.5 x 1.5 x 3 mm grid and is trimmed to
    its extent plus two voxels; a crop whose mask is empty is left out; a bank without pairs is refused."""
    spacing = (0.7, 0.7, 2.5)
    (tmp_path / "image").mkdir()
    (tmp_path / "nodule_mask").mkdir()
    ball = _ball((60, 60, 20), 5.0, spacing)
    affine = np.diag([*spacing, 1.0])
    for name, mask in (("a.nii.gz", ball), ("empty.nii.gz", np.zeros_like(ball))):
        hu = np.where(mask, 40, -850).astype(np.int16)
        nib.save(nib.Nifti1Image(hu, affine), str(tmp_path / "image" / name))
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), str(tmp_path / "nodule_mask" / name))
    crops = sorted((tmp_path / "image").glob("*.nii.gz"))
    assert write_nodule_bank(crops, PIXDIM, tmp_path / "bank.npz") == 1
    [(hu, mask)] = load_nodule_bank(str(tmp_path / "bank.npz"))
    volume_ml = mask.sum() * np.prod(PIXDIM) / 1000
    assert abs(volume_ml - 4 / 3 * np.pi * 0.5**3) < 0.1  # 0.52 mL
    extent = [int(i.max() - i.min() + 1) for i in np.nonzero(mask)]
    assert list(mask.shape) == [e + 4 for e in extent]
    assert np.median(hu[mask]) > 0 and hu[0, 0, 0] == -850  # bilinear HU, nearest mask: a partial-volume rim
    np.savez_compressed(tmp_path / "bad.npz", hu_0=hu, mask_0=np.zeros_like(mask))
    with pytest.raises(ValueError, match="non-empty"):
        load_nodule_bank(str(tmp_path / "bad.npz"))


def test_gallery_shows_a_pasted_nodule_large_enough_to_see(bank):
    from scripts.cli.synthesis_gallery import _pasted

    d = _hosts(_body())
    after, rec = _pasted(d, bank, min_voxels=50, seed=0)
    assert rec["voxels"] >= 50 and "30 HU" in rec["text"]  # the 7 x 7 x 5 ball, its copied HU in the caption
    assert int(((after["label"] > 0) & (d["label"] == 0)).sum()) == rec["voxels"]
    with pytest.raises(ValueError, match="no nodule"):
        _pasted(d, bank, min_voxels=10_000, seed=0)
