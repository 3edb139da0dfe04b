"""Unit checks of the MONAI Label app's validation and active-learning score (no server)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from monailabel_utils import APP_DIR, save_nifti

sys.path.insert(0, str(APP_DIR))
from lib.scoring.glance_uncertainty import glance_uncertainty  # noqa: E402
from lib.validation import InvalidRequest, InvalidUpload, check_image, check_label, check_name  # noqa: E402


@pytest.mark.parametrize("name", ["case0", "1.2.840.113619.2.55", "CT_abdomen-01"])
def test_plain_names_pass(name):
    assert check_name(name, "image") == name


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "/etc/passwd", "a\\b", ".hidden", " x", "x\0"])
def test_names_that_could_leave_the_folder_fail(name):
    with pytest.raises(InvalidRequest):
        check_name(name, "image")


def test_glance_uncertainty_is_highest_at_the_threshold():
    assert glance_uncertainty([0.5], 0.5) == pytest.approx(1.0)
    assert glance_uncertainty([0.0, 1.0], 0.5) == pytest.approx(0.0)
    # the 10 % most uncertain windows decide: one ambiguous window among 9 confident ones
    assert glance_uncertainty([0.5] + [0.0] * 9, 0.5) == pytest.approx(1.0)
    assert glance_uncertainty([0.3, 0.9], 0.3, top_fraction=1.0) == pytest.approx((1.0 + (1 - 0.6 / 0.7)) / 2)
    with pytest.raises(ValueError):
        glance_uncertainty([], 0.5)


def test_image_and_label_checks(tmp_path):
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    image = save_nifti(np.zeros((8, 9, 10), np.int16), affine, tmp_path / "image.nii.gz")
    assert check_image(image).shape == (8, 9, 10)
    check_label(save_nifti(np.ones((8, 9, 10), np.uint8), affine, tmp_path / "ok.nii.gz"), image)
    with pytest.raises(InvalidUpload, match="spacing"):
        check_label(save_nifti(np.ones((8, 9, 10), np.uint8), np.eye(4), tmp_path / "sp.nii.gz"), image)
    with pytest.raises(InvalidUpload, match="3D"):
        check_image(save_nifti(np.zeros((8, 9), np.int16), np.eye(4), tmp_path / "2d.nii.gz"))
    noise = np.random.default_rng(0).integers(-1000, 1000, (8, 9, 10), dtype=np.int16)
    full = save_nifti(noise, affine, tmp_path / "noise.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(full[: len(full) // 2])  # header intact, voxel data truncated
    with pytest.raises(InvalidUpload):
        check_image(tmp_path / "cut.nii.gz")
