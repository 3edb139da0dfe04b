"""The screening command starts without MLflow, TensorBoard, pandas, pyplot, torchvision, MONAI Label, SciPy's
signal module or torch.distributed.optim, with start-up's objects out of the garbage collector's passes
(scripts.cli.startup, called by scripts.cli.screen when it runs as the command), and screens a scan all the same."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pytest
import torch

from scripts.cli.startup import UNUSED_BY_SCREENING, skip_unused_imports, stand_in_for_distributed_optim
from scripts.phantom import make_phantom

BUNDLE_ROOT = Path(__file__).resolve().parents[1] / "bundle"


# What start-up skips: the unused packages, and SymPy (imported with the real torch.distributed.optim).
HEAVY = (*UNUSED_BY_SCREENING, "sympy")
# Runs the command (``python -m scripts.cli.screen ...``: runpy as __main__), or only imports the module, then prints
# which of HEAVY are loaded, and whether the garbage collector is on with start-up's objects frozen.
PROBE = """
import gc, json, runpy, sys
if sys.argv[1] == "command":
    sys.argv = ["screen", *sys.argv[2:]]
    runpy.run_module("scripts.cli.screen", run_name="__main__")
else:
    import scripts.cli.screen
loaded = sorted(m for m in {modules!r} if sys.modules.get(m) is not None)
print("LOADED", json.dumps([loaded, gc.isenabled(), gc.get_freeze_count() > 100000]))
"""


def _loaded(*args: str) -> list:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.format(modules=HEAVY), *args],
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
    loaded = _loaded("command", "--input", str(image), "--output_dir", str(out), "--device", "cpu")
    assert loaded == [[], True, True]
    report = json.loads((out / "scan_report.json").read_text())
    assert report["case"] == "scan" and Path(report["files"]["mask"]).is_file()
    assert Path(report["files"]["overview"]).is_file()
    # importing the module (not running the command) skips nothing: MONAI pulls them in, those installed here
    loaded, collecting, frozen = _loaded("import")
    assert {"mlflow", "torch.utils.tensorboard", "matplotlib.pyplot", "scipy.signal", "sympy"} <= set(loaded)
    assert collecting and not frozen


def test_skip_unused_imports_blocks_only_what_is_not_imported_yet(monkeypatch):
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)  # an installed module, not imported here
    try:
        assert skip_unused_imports(("json", "colorsys")) == ["colorsys"] and sys.modules["json"] is not None
        with pytest.raises(ModuleNotFoundError):
            import colorsys  # noqa: F401
    finally:
        sys.modules.pop("colorsys", None)


def test_stand_in_for_distributed_optim_only_where_not_imported(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch.distributed.optim", raising=False)  # restored after the test
    try:
        assert stand_in_for_distributed_optim()
        from torch.distributed.optim import ZeroRedundancyOptimizer

        assert not isinstance(torch.optim.SGD([torch.zeros(1, requires_grad=True)]), ZeroRedundancyOptimizer)
        assert not stand_in_for_distributed_optim()  # already there: left as it is
    finally:
        sys.modules.pop("torch.distributed.optim", None)
