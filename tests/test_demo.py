"""The embedded demo input: small, attributed, and the shipped weights find its sarcoma."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from scripts.cli.screen import DEMO_INPUT, find_cases, screen

SOURCE_MASK = Path(__file__).resolve().parents[2] / "shared" / "data" / "realct" / "extremity" / "sts_012_lesion.nii.gz"


def test_demo_input_is_the_default_small_and_attributed(tmp_path):
    assert find_cases(None, tmp_path) == [{"image": str(DEMO_INPUT)}]
    assert DEMO_INPUT.stat().st_size <= 5 * 2**20  # the data licence's limit for an embedded derivative
    notes = (DEMO_INPUT.parent / "README.md").read_text()
    assert "CC BY 3.0" in notes and "Soft-tissue-Sarcoma" in notes and "never trained on" in notes


@pytest.mark.realdata
@pytest.mark.skipif(not SOURCE_MASK.exists(), reason="needs ../shared/data/realct (the sarcoma's mask) beside the repo")
def test_shipped_weights_find_the_demo_sarcoma(tmp_path):
    """The default screening reports the sarcoma: a reported lesion's centroid lies inside the true mask's
    bounding box (world mm), and the verdict is suspicious."""
    screen(output_dir=str(tmp_path))
    report = json.loads(next(tmp_path.glob("*_report.json")).read_text())
    assert report["verdict"] == "suspicious"
    mask = nib.load(str(SOURCE_MASK))
    voxels = np.argwhere(np.asarray(mask.dataobj) > 0)
    world = nib.affines.apply_affine(mask.affine, voxels)
    lo, hi = world.min(0), world.max(0)
    centroids = np.array([lesion["centroid_mm"] for lesion in report["lesions"]])
    # report centroids are in the input's world frame (RAS, as nibabel's affine); allow one voxel of slack
    inside = ((centroids >= lo - 3.3) & (centroids <= hi + 3.3)).all(1)
    assert (
        inside.any()
    ), f"no reported lesion centroid {centroids.round(1).tolist()} in the sarcoma's box {lo.round(1)}-{hi.round(1)}"
    largest = max(report["lesions"], key=lambda lesion: lesion["volume_ml"])
    true_ml = float(ndimage.sum(np.asarray(mask.dataobj) > 0)) * float(np.prod(mask.header.get_zooms()[:3])) / 1000
    # the sarcoma, roughly sized, not a flood: 0.5.0 reported 1.7x and 0.6.0 3.2x the true volume (the mask spills
    # into the surrounding muscle; model card, *Limitations*); an outside review once saw 11x on a lung tumour
    assert 0.5 * true_ml <= largest["volume_ml"] <= 4 * true_ml
