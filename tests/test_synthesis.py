"""Lesion synthesis on real anatomy: hosts, implanted HU, label = implanted region, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scripts.transforms import HOSTS, LesionHostsd, RandLesionSynthesisd

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
