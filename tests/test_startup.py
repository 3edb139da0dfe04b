"""The screening command starts without MLflow, TensorBoard, pandas, pyplot, torchvision or MONAI Label
(scripts.startup, called by scripts.screen when it runs as the command), and screens a scan all the same."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pytest

from scripts.phantom import make_phantom
from scripts.startup import UNUSED_BY_SCREENING, skip_unused_imports

BUNDLE_ROOT = Path(__file__).resolve().parents[1] / "bundle"


# Runs the command (``python -m scripts.screen ...``: runpy as __main__), or only imports the module, then prints
# which of the unused packages are loaded.
PROBE = """
import json, runpy, sys
if sys.argv[1] == "command":
    sys.argv = ["screen", *sys.argv[2:]]
    runpy.run_module("scripts.screen", run_name="__main__")
else:
    import scripts.screen
print("LOADED", json.dumps(sorted(m for m in {modules!r} if sys.modules.get(m) is not None)))
"""


def _loaded(*args: str) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.format(modules=UNUSED_BY_SCREENING), *args],
        cwd=BUNDLE_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("LOADED", 1)[1])


def test_the_command_screens_without_the_unused_packages(tmp_path):
    ph = make_phantom(2, shape=(48, 48, 24), spacing=(2.0, 2.0, 3.0))
    image = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(ph.image, ph.affine), str(image))
    out = tmp_path / "out"
    assert _loaded("command", "--input", str(image), "--output_dir", str(out), "--device", "cpu") == []
    report = json.loads((out / "scan_report.json").read_text())
    assert report["case"] == "scan" and Path(report["files"]["mask"]).is_file()
    assert Path(report["files"]["overview"]).is_file()
    # importing the module (not running the command) skips nothing: MONAI pulls them in, those installed here
    assert {"mlflow", "torch.utils.tensorboard", "matplotlib.pyplot"} <= set(_loaded("import"))


def test_skip_unused_imports_blocks_only_what_is_not_imported_yet(monkeypatch):
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)  # an installed module, not imported here
    try:
        assert skip_unused_imports(("json", "colorsys")) == ["colorsys"] and sys.modules["json"] is not None
        with pytest.raises(ModuleNotFoundError):
            import colorsys  # noqa: F401
    finally:
        sys.modules.pop("colorsys", None)
