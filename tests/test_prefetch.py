"""Batch screening reads the next scan while the current one is screened (scripts.prefetch), and the report
handler times a prefetched scan's loading where it ran."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import nibabel as nib
import pytest
from monai.bundle import ConfigParser
from monai.data import list_data_collate
from monai.transforms import Compose, Lambdad

from scripts.phantom import make_phantom
from scripts.prefetch import ScanDataset, prefetched_cases

BUNDLE_ROOT = Path(__file__).resolve().parents[1] / "bundle"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> list[dict]:
    """Three small phantoms with a corrupt file in the middle."""
    folder = tmp_path_factory.mktemp("scans")
    cases = []
    for name, seed in (("a", 1), ("b_corrupt", None), ("c", 2), ("d", 3)):
        path = folder / f"{name}.nii.gz"
        if seed is None:
            path.write_bytes(b"\x1f\x8b not really gzip" * 50)
        else:
            ph = make_phantom(seed, shape=(48, 48, 24), spacing=(2.0, 2.0, 3.0))
            nib.save(nib.Nifti1Image(ph.image, ph.affine), str(path))
        cases.append({"image": str(path)})
    return cases


def _parser(out: Path) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "inference.json"))
    parser["bundle_root"] = str(BUNDLE_ROOT)
    parser["output_dir"] = str(out)
    parser["device"] = "$torch.device('cpu')"
    return parser


def test_scan_dataset_reports_an_unreadable_scan_and_times_the_others(folder, tmp_path):
    data = ScanDataset(folder, _parser(tmp_path).get_parsed_content("preprocessing"))
    bad = data[1]
    assert set(bad) == {"image", "error"} and bad["image"] == folder[1]["image"]
    assert bad["error"] == "BadGzipFile: Unknown compression method"  # the root cause, not MONAI's wrappers
    good = data[0]
    assert "error" not in good and good["image"].shape[0] == 2 and 0 < good["load_s"] < 60


def test_workers_read_the_next_scan_while_the_current_one_is_screened(folder, tmp_path):
    """The consumer takes 1.5 s per scan; with one worker, each next scan's reading starts before the consumer is
    done with the current one, in another process, and the scans arrive in order, the bad one as an error."""
    stamp = lambda x: {"pid": os.getpid(), "start": time.time(), "x": x}  # noqa: E731
    preprocessing = Compose(
        [
            Lambdad("image", lambda p: stamp(p), overwrite="probe"),
            *_parser(tmp_path).get_parsed_content("preprocessing").transforms,
        ]
    )
    seen, done = [], []
    for batch in prefetched_cases(folder, preprocessing, num_workers=1):
        seen.append(batch)
        time.sleep(1.5)  # screening this scan
        done.append(time.time())
    assert [b["image"] if "error" in b else b["image"].meta["filename_or_obj"] for b in seen] == [
        c["image"] for c in folder
    ]
    assert "error" in seen[1] and all("error" not in seen[i] for i in (0, 2, 3))
    probes = {i: seen[i]["probe"] for i in (0, 2, 3)}
    assert all(p["pid"] != os.getpid() for p in probes.values())
    assert probes[3]["start"] < done[2]  # scan d was being read while scan c was screened
    assert all(seen[i]["load_s"] > 0 for i in (0, 2, 3))


def test_report_handler_takes_the_load_time_of_a_prefetched_scan(folder, tmp_path):
    """The screening loop hands the evaluator a prefetched batch: its report's load time is the worker's, and the
    post-processing and saving are timed apart (the config's Timestampd)."""
    parser = _parser(tmp_path)
    evaluator = parser.get_parsed_content("evaluator")
    handler = next(h for h in parser.get_parsed_content("handlers") if hasattr(h, "reports"))
    item = next(iter(prefetched_cases(folder[:1], parser.get_parsed_content("preprocessing"), num_workers=0)))
    item["load_s"] = 123.0  # as if the worker took that long
    evaluator.data_loader = [list_data_collate([item])]
    evaluator.state.epoch_length = 1
    evaluator.run()
    rep = json.loads((tmp_path / "a_report.json").read_text())
    timings = rep["timings_s"]
    assert timings["load"] == 123.0 and timings["total"] >= 123.0
    assert timings["postprocess"] >= 0 and timings["save"] > 0 and handler.reports[-1]["case"] == "a"
    # the mask file was written in the save stage, after the postprocessing stage began
    assert Path(rep["files"]["mask"]).is_file()
