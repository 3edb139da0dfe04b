"""The packed bundle runs from an unzipped copy, away from this repository."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np

from scripts.cli.pack import pack
from scripts.phantom import make_phantom


def test_packed_bundle_runs_inference_elsewhere(tmp_path):
    archive = Path(pack(output=str(tmp_path / "dist")))
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
        zf.extractall(tmp_path / "unpacked")
    assert "gf_screen/models/model.pt" in names and "gf_screen/configs/inference.json" in names
    assert not any("__pycache__" in n or "checkpoint" in n for n in names)
    root = tmp_path / "unpacked" / "gf_screen"
    ph = make_phantom(3, shape=(64, 64, 32), spacing=(3.0, 3.0, 5.0))
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(ph.image, ph.affine), str(tmp_path / "in" / "case.nii.gz"))
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "configs/inference.json",
        "--dataset_dir",
        str(tmp_path / "in"),
        "--output_dir",
        str(tmp_path / "out"),
    ]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    mask = nib.load(str(tmp_path / "out" / "case_lesion.nii.gz"))
    assert mask.shape == ph.image.shape and np.allclose(mask.affine, ph.affine)
    report = json.loads((tmp_path / "out" / "case_report.json").read_text())
    assert report["windows"]["total"] > 0 and report["input_geometry"]["shape"] == [64, 64, 32]
