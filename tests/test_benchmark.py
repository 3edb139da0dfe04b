"""The benchmark's per-run measurement (scripts.benchmark.run_one) on a small phantom: what each scheme focuses,
what its clocks include, and the target table's verdicts."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data.utils import dense_patch_slices

from scripts import benchmark
from scripts.phantom import make_phantom

KEYS = {"scheme", "end_to_end_s", "load_s", "model_s", "model_warm_s", "glance_s", "post_save_s", "windows_focused",
        "windows_total", "peak_rss_gb", "dsc"}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A 1.5 x 1.5 x 3 mm phantom (already on the model grid, so the oracle's windows can be counted here)."""
    work = tmp_path_factory.mktemp("bench")
    ph = make_phantom(5, shape=(96, 80, 40), spacing=(1.5, 1.5, 3.0))
    img, lbl = work / "ct.nii.gz", work / "lesion.nii.gz"
    nib.save(nib.Nifti1Image(ph.image, ph.affine), str(img))
    nib.save(nib.Nifti1Image(ph.label, ph.affine), str(lbl))
    return str(img), str(lbl), work


def _run(case, scheme) -> dict:
    img, lbl, work = case
    out = work / f"{scheme}.json"
    benchmark.run_one(img, lbl, scheme, str(out))
    result = json.loads(out.read_text())
    assert set(result) == KEYS and result["scheme"] == scheme
    assert 0 <= result["model_s"] <= result["end_to_end_s"] and 0 <= result["load_s"] <= result["end_to_end_s"]
    assert 0 <= result["dsc"] <= 1 and result["peak_rss_gb"] > 0
    return result


def test_sliding_window_focuses_every_window(case):
    a = _run(case, "a")
    assert a["windows_focused"] == a["windows_total"] > 0 and a["glance_s"] == 0


def test_oracle_focuses_the_lesion_windows_and_reads_its_mask_before_the_model_clock(case, monkeypatch):
    parser = ConfigParser()
    parser.read_config(str(benchmark.BUNDLE_ROOT / "configs" / "inference.json"))
    image = parser.get_parsed_content("preprocessing")({"image": case[0]})["image"]
    label = benchmark.ResampleToMatch(mode="nearest")(
        benchmark.LoadImage(ensure_channel_first=True)(case[1]), img_dst=image
    )[0].numpy() > 0
    roi = parser["roi_size"]
    grid = dense_patch_slices(label.shape, roi, [int(r * (1 - parser["overlap"])) for r in roi])
    with_lesion = sum(bool(label[w].any()) for w in grid)
    assert 0 < with_lesion < len(grid)

    calls = []
    real_load = benchmark.LoadImage

    def load_spy(*args, **kwargs):
        calls.append(benchmark.time.perf_counter())
        return real_load(*args, **kwargs)

    monkeypatch.setattr(benchmark, "LoadImage", load_spy)
    clock = []
    real_sync = benchmark._sync
    monkeypatch.setattr(benchmark, "_sync", lambda: clock.append(real_sync()) or clock[-1])
    d = _run(case, "d")
    assert d["windows_total"] == len(grid)
    # every window holding a lesion voxel is focused; the oracle may add neighbours within one map cell
    assert with_lesion <= d["windows_focused"] < d["windows_total"]
    # the ground truth was read before the second clock reading (the end of loading, the start of the model)
    assert len(calls) == 1 and calls[0] < clock[1]


def test_targets_table_says_met_and_missed():
    rows = [
        {"case": "c1", "scheme": "a", "model_s": 4.0, "model_warm_s": 4.0, "end_to_end_s": 9.0, "peak_rss_gb": 2.0, "glance_s": 0.0, "dsc": 0.5},
        {"case": "c1", "scheme": "c", "model_s": 1.0, "model_warm_s": 1.1, "end_to_end_s": 61.0, "peak_rss_gb": 2.0, "glance_s": 0.5, "dsc": 0.47},
        {"case": "c1", "scheme": "d", "model_s": 0.8, "model_warm_s": 0.7, "end_to_end_s": 5.0, "peak_rss_gb": 2.0, "glance_s": 0.1, "dsc": 0.6},
    ]
    verdicts = {line.split("|")[1].strip(): line.split("|")[3].strip() for line in benchmark._targets(rows, "c1")[5:]}
    assert verdicts["(c) end to end <= 60 s on this machine"] == "MISSED"
    assert verdicts["(c) glance <= 10 % of (a)'s model time"] == "MISSED"  # 0.5 s of 4.0 s
    assert verdicts["(d) oracle >= 5x faster than (a), model time"] == "met"  # 4.0 / 0.8 = 5
    assert verdicts["(c) >= 4x faster than (a), model time"] == "met"
    assert verdicts["(c) >= 4x faster than (a), model time, warm"] == "MISSED"  # 4.0 / 1.1
    assert verdicts["(c) lesion DSC within 0.02 of (a)"] == "MISSED"  # 0.47 vs 0.5
