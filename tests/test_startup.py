"""The screening command starts without MLflow, TensorBoard, pandas, pyplot, torchvision or MONAI Label
(scripts.startup), and screens a scan all the same."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib

from scripts.phantom import make_phantom
from scripts.startup import UNUSED_BY_SCREENING

BUNDLE_ROOT = Path(__file__).resolve().parents[1] / "bundle"
SCREEN = """
import json, runpy, sys
if sys.argv[1] == "lean":
    from scripts.startup import skip_unused_imports
    skip_unused_imports()
sys.argv = ["screen", "--input", sys.argv[2], "--output_dir", sys.argv[3], "--device", "cpu"]
runpy.run_module("scripts.screen", run_name="__main__")
print("LOADED", json.dumps(sorted(m for m in {modules!r} if sys.modules.get(m) is not None)))
"""


def _screen(mode: str, image: Path, out: Path) -> list[str]:
    code = SCREEN.format(modules=UNUSED_BY_SCREENING)
    proc = subprocess.run(
        [sys.executable, "-c", code, mode, str(image), str(out)],
        cwd=BUNDLE_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("LOADED", 1)[1])


def test_screening_runs_without_the_unused_packages(tmp_path):
    ph = make_phantom(2, shape=(48, 48, 24), spacing=(2.0, 2.0, 3.0))
    image = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(ph.image, ph.affine), str(image))
    assert _screen("lean", image, tmp_path / "lean") == []
    report = json.loads((tmp_path / "lean" / "scan_report.json").read_text())
    assert (
        report["case"] == "scan"
        and Path(report["files"]["mask"]).is_file()
        and Path(report["files"]["overview"]).is_file()
    )
    # without the start-up step, MONAI pulls them in (those installed here): what the step saves
    assert {"mlflow", "torch.utils.tensorboard", "matplotlib.pyplot"} <= set(_screen("full", image, tmp_path / "full"))
