"""The benchmark (scripts.cli.benchmark) on a small phantom: what each scheme focuses and what its clocks include, the
wholeBody reference, the screening command and batch as users run them, and the target table's verdicts."""

import json
import sys

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigParser
from monai.data.utils import dense_patch_slices

from scripts.cli import benchmark
from scripts.phantom import make_phantom

KEYS = {
    "scheme",
    "end_to_end_s",
    "load_s",
    "model_s",
    "model_warm_s",
    "glance_s",
    "post_save_s",
    "windows_focused",
    "windows_total",
    "peak_rss_gb",
    "dsc",
}


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
    label = (
        benchmark.ResampleToMatch(mode="nearest")(
            benchmark.LoadImage(ensure_channel_first=True)(case[1]), img_dst=image
        )[0].numpy()
        > 0
    )
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


def test_wholebody_reference_runs_its_bundle_window_on_the_3mm_grid(case, monkeypatch):
    """(w) resamples to 3 mm and slides the wholeBody window (here shrunk, with a slimmer network, so that the test
    is quick) over it: the phantom's 144 x 120 x 120 mm are 48 x 40 x 40 voxels, and 32-voxel windows at overlap
    0.25 (interval 24) start at 0 and 16 (x) and at 0 and 8 (y, z): 8 windows."""
    monkeypatch.setitem(benchmark.WHOLEBODY_WINDOW, "roi_size", (32, 32, 32))
    monkeypatch.setattr(benchmark, "WHOLEBODY_NET", {**benchmark.WHOLEBODY_NET, "init_filters": 8})
    img, lbl, work = case
    out = work / "w.json"
    benchmark.run_one(img, lbl, "w", str(out))
    w = json.loads(out.read_text())
    assert set(w) == KEYS and w["scheme"] == "w" and w["dsc"] is None
    assert w["windows_focused"] == w["windows_total"] == 8 and w["glance_s"] == 0
    assert 0 < w["model_s"] <= w["end_to_end_s"] and w["peak_rss_gb"] > 0
    x = benchmark.wholebody_preprocessing()({"image": img})["image"]
    assert (
        tuple(x.shape) == (1, 48, 40, 40)
        and np.allclose(x.pixdim, 3.0)
        and float(x.min()) == -1
        and float(x.max()) == 1
    )


def test_screen_cli_times_what_the_user_runs_and_batch_counts_scans_per_hour(case, tmp_path):
    img = case[0]
    c = benchmark.screen_cli(img, tmp_path)
    assert c["shape"] == [96, 80, 40] and set(c["stages_s"]) == set(benchmark.STAGES)
    assert 0 < c["in_engine_s"] < c["wall_s"]  # the process also starts up and reads the config and weights
    assert sum(c["stages_s"].values()) <= c["in_engine_s"] + 1e-6 and c["stages_s"]["save"] > 0
    assert 0 < c["decompress_s"] < c["stages_s"]["load"] and 0.1 < c["peak_rss_gb"] < 10
    assert list(tmp_path.iterdir()) == []  # the outputs are removed
    b = benchmark.batch_cli([img, img], tmp_path)
    assert b["scans"] == 2 and b["failed"] == 0 and b["scans_per_hour"] == pytest.approx(7200 / b["wall_s"])


def test_start_up_floor_is_the_best_of_fresh_processes_from_the_bundle(monkeypatch):
    runs = []
    clock = iter(range(100))
    monkeypatch.setattr(benchmark.time, "perf_counter", lambda: float(next(clock)) ** 2 / 10)
    monkeypatch.setattr(benchmark.subprocess, "run", lambda cmd, **kw: runs.append((cmd, kw["cwd"], kw["check"])))
    floor = benchmark.start_up_s(repeats=2)
    assert list(floor) == list(benchmark.START_UP)
    # perf_counter gives 0, 0.1, 0.4, 0.9, 1.6, ...: each run lasts longer than the one before, the first is kept
    assert floor == pytest.approx({"python": 0.1, "import torch": 0.9, "import torch and MONAI": 1.7})
    assert [r[0][1:] for r in runs] == [["-c", code] for code in benchmark.START_UP.values() for _ in range(2)]
    assert all(r[0][0] == sys.executable and r[1] == benchmark.BUNDLE_ROOT and r[2] for r in runs)


def test_scans_per_hour_and_after_model_ratio():
    assert benchmark.scans_per_hour(12, 360.0) == 120.0
    stages = {"load": 1.5, "glance": 0.1, "focus": 0.4, "postprocess": 0.2, "save": 0.3, "report": 0.5}
    assert benchmark.after_model_ratio(stages) == pytest.approx(1.0 / 2.0)


def test_targets_table_says_met_and_missed():
    stages = {"load": 1.0, "glance": 0.1, "focus": 0.4, "postprocess": 0.3, "save": 0.8, "report": 0.5}
    result = {
        "cli": {"c1": {"stages_s": stages, "decompress_s": 0.5, "wall_s": 9.0, "in_engine_s": 4.0, "peak_rss_gb": 3.5}},
        "rows": [
            {"case": "c1", "scheme": "a", "model_s": 4.0, "model_warm_s": 4.0, "glance_s": 0.0, "dsc": 0.5},
            {"case": "c1", "scheme": "c", "model_s": 1.0, "model_warm_s": 1.1, "glance_s": 0.5, "dsc": 0.47},
            {"case": "c1", "scheme": "d", "model_s": 0.8, "model_warm_s": 0.7, "glance_s": 0.1, "dsc": 0.6},
            {"case": "c1", "scheme": "w", "model_s": 2.9, "model_warm_s": 2.9, "glance_s": 0.0, "dsc": None},
        ],
    }
    verdicts = {line.split("|")[1].strip(): line.split("|")[3].strip() for line in benchmark._targets(result, "c1")[4:]}
    assert (
        verdicts["after the model (postprocess + save + report) <= 1.0x load + glance + focus"] == "MISSED"
    )  # 1.6 / 1.5
    assert verdicts["postprocess + save <= 1 s"] == "MISSED"  # 1.1 s
    assert verdicts["report < 1 s"] == "met"
    assert verdicts["load <= 1.5x decompress"] == "MISSED"  # 2x
    assert verdicts["command wall time <= 2x in engine"] == "MISSED"  # 2.25x
    ratios = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in benchmark._targets(result, "c1")[4:]}
    assert ratios["command wall time <= 2x in engine"] == "2.2x"  # no start-up floor measured: nothing to add
    result["start_up_s"] = {"import torch": 4.5}
    ratios = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in benchmark._targets(result, "c1")[4:]}
    assert ratios["command wall time <= 2x in engine"] == (
        "2.2x (importing torch alone: 4.5 s, more than the 4.0 s in engine)"
    )
    result["start_up_s"] = {"import torch": 3.5}  # below the in-engine time: the target is within reach
    ratios = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in benchmark._targets(result, "c1")[4:]}
    assert ratios["command wall time <= 2x in engine"] == "2.2x"
    assert verdicts["command peak RSS <= 3 GB"] == "MISSED"
    assert verdicts["(c) model time <= 1/3 of (w)'s"] == "MISSED"  # 2.9 < 3 x 1.0
    assert verdicts["(c) glance <= 10 % of (a)'s model time"] == "MISSED"  # 0.5 s of 4.0 s
    assert verdicts["(d) oracle >= 5x faster than (a), model time"] == "met"  # 4.0 / 0.8 = 5
    assert verdicts["(c) >= 4x faster than (a), model time"] == "met"
    assert verdicts["(c) lesion DSC within 0.02 of (a)"] == "MISSED"  # 0.47 vs 0.5
    stages.update(postprocess=0.1, save=0.1, load=0.7)
    result["cli"]["c1"].update(wall_s=8.0, peak_rss_gb=2.0)
    result["rows"][-1]["model_s"] = 3.0
    verdicts = {line.split("|")[1].strip(): line.split("|")[3].strip() for line in benchmark._targets(result, "c1")[4:]}
    assert verdicts["after the model (postprocess + save + report) <= 1.0x load + glance + focus"] == "met"  # 0.7 / 1.2
    assert verdicts["load <= 1.5x decompress"] == "met"  # 1.4x
    assert verdicts["command wall time <= 2x in engine"] == "met"
    assert verdicts["(c) model time <= 1/3 of (w)'s"] == "met"


def test_markdown_lists_every_measurement():
    stages = {"load": 1.0, "glance": 0.1, "focus": 0.4, "postprocess": 0.3, "save": 0.2, "report": 0.5}
    result = {
        "machine": "test machine",
        "date": "2026-12-03",
        "load_average": 0.04,
        "command": "python -m scripts.cli.benchmark",
        "data": {"c1": "abdomen, real"},
        "cli": {
            "c1": {
                "stages_s": stages,
                "decompress_s": 0.5,
                "wall_s": 9.0,
                "in_engine_s": 4.0,
                "peak_rss_gb": 1.5,
                "shape": [512, 512, 129],
            }
        },
        "batch": {
            "scans": 12,
            "failed": 0,
            "wall_s": 360.0,
            "peak_rss_gb": 2.0,
            "scans_per_hour": 120.0,
            "stage_sums_s": dict.fromkeys(benchmark.STAGES, 1.0),
        },
        "monailabel": {"case": "c1", "round_trip_s": [12.0, 5.0], "server_start_s": 40.0},
        "start_up_s": {"python": 0.02, "import torch": 1.9, "import torch and MONAI": 2.75},
        "rows": [
            {
                "case": "c1",
                "scheme": "w",
                "model_s": 6.0,
                "model_warm_s": 5.9,
                "end_to_end_s": 8.0,
                "glance_s": 0.0,
                "windows_focused": 8,
                "windows_total": 8,
                "peak_rss_gb": 2.4,
                "dsc": None,
            },
            {
                "case": "c1",
                "scheme": "c",
                "model_s": 1.0,
                "model_warm_s": 0.9,
                "end_to_end_s": 3.0,
                "glance_s": 0.1,
                "windows_focused": 5,
                "windows_total": 50,
                "peak_rss_gb": 1.4,
                "dsc": 0.5,
            },
        ],
    }
    text = benchmark._markdown(result, 1)
    assert "Measured on 2026-12-03 on test machine; load average 0.0 at the start" in text
    assert "Data: c1 (abdomen, real);" in text
    row = "| c1 | 512 x 512 x 129 | 9.0 | 4.0 | 0.5 | 1.00 | 0.50 | 0.10 | 0.40 | 0.30 | 0.20 | 0.50 | 0.67x | 1.50 |"
    assert row in text
    assert (
        "In short: screening c1 (512 x 512 x 129) with the command takes **9.0 s** of wall time from start to exit, "
        "4.0 s of it from reading the scan to the report written, 0.5 s of that in the model (glance + focus); the "
        "wholeBody_ct_segmentation network takes 6.0 s on the same scan; a batch of real scans runs at 120 scans per "
        "hour." in text
    )
    assert "**120 scans per hour**" in text and "12.0 s, then 5.0 s" in text
    assert "(best of 3): python 0.02 s, import torch 1.90 s, import torch and MONAI 2.75 s." in text
    assert "| c1 | (c) GF-Screen default | 1.00 | 0.90 |" in text
