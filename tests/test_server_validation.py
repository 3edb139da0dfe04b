"""The MONAI Label server's checks on what clients send (monailabel_app/lib/validation.py), without a server:
names, paths that must stay inside the studies folder, and the headers and voxels of uploaded images and labels."""

from __future__ import annotations

import gzip
import re
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

APP_DIR = Path(__file__).resolve().parents[1] / "monailabel_app"
sys.path.append(str(APP_DIR))  # appended, so that a copy of lib/ put first on sys.path (a mutation run's) is used
from lib.validation import (  # noqa: E402
    ImageLimits,
    InvalidRequest,
    InvalidUpload,
    check_image,
    check_inside,
    check_label,
    check_name,
)

MAX_EDGE, MAX_VOXELS = ImageLimits().max_edge, ImageLimits().max_voxels  # the server's defaults
AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])
SHAPE = (8, 9, 10)


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def _forged_header(path: Path, shape: tuple[int, ...]) -> Path:
    """A NIfTI file that is only a header claiming ``shape`` int16 voxels: what a hostile upload can send."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header["vox_offset"] = 352
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4))
    return path


@pytest.mark.parametrize("name", ["case0", "case 1", "1.2.840.113619.2.55", "CT_abdomen-01", "final"])
def test_plain_names_pass(name):
    assert check_name(name, "image") == name


@pytest.mark.parametrize("name", ["x ", "x\t", "x\n", " x", "\tx", " "])
def test_names_with_surrounding_whitespace_are_refused(name):
    """'case0 ' would name a second folder that looks like 'case0' in every listing."""
    with pytest.raises(InvalidRequest, match="surrounding spaces"):
        check_name(name, "label tag")


@pytest.mark.parametrize("name", ["", ".", "..", ".hidden", None, 3])
def test_empty_dotted_and_non_string_names_are_refused(name):
    with pytest.raises(InvalidRequest, match="non-empty name"):
        check_name(name, "image")


@pytest.mark.parametrize("name", ["a/b", "x/..", "/etc/passwd", "a\\b"])
def test_names_with_separators_are_refused(name):
    with pytest.raises(InvalidRequest, match="path separators"):
        check_name(name, "image")


@pytest.mark.parametrize("name", ["x\0y", "a\nb", "x" * 129])
def test_control_characters_and_overlong_names_are_refused(name):
    with pytest.raises(InvalidRequest, match="printable characters"):
        check_name(name, "image")


@pytest.fixture
def studies(tmp_path) -> Path:
    """tmp/studies with a label folder, and tmp/studies_evil beside it (same prefix, outside)."""
    (tmp_path / "studies" / "labels" / "final").mkdir(parents=True)
    (tmp_path / "studies_evil" / "labels").mkdir(parents=True)
    return tmp_path / "studies"


def test_check_inside_accepts_paths_inside_and_returns_the_real_path(studies):
    final = studies / "labels" / "final"
    assert check_inside(final, studies, "label tag") == str(final.resolve())
    assert check_inside(final / "new.nii.gz", studies, "label tag") == str(final.resolve() / "new.nii.gz")
    assert check_inside(studies, studies, "label tag") == str(studies.resolve())
    (studies / "alias").symlink_to(studies / "labels")  # a link that stays inside is followed
    assert check_inside(studies / "alias" / "final", studies, "label tag") == str(final.resolve())
    link_root = studies.parent / "studies_link"  # the root given through a link: both sides are resolved
    link_root.symlink_to(studies)
    assert check_inside(final, link_root, "label tag") == str(final.resolve())


def test_check_inside_refuses_a_sibling_that_shares_the_prefix(studies):
    evil = studies.parent / "studies_evil"
    for outside in (evil, evil / "labels", studies / ".." / "studies_evil" / "labels", studies.parent):
        message = f"label tag {re.escape(repr(str(outside)))} leaves the studies folder"
        with pytest.raises(InvalidRequest, match=message):
            check_inside(outside, studies, "label tag")


def test_check_inside_refuses_a_symlink_out_of_the_folder(studies):
    (studies / "labels" / "escape").symlink_to(studies.parent / "studies_evil" / "labels")
    for path in (studies / "labels" / "escape", studies / "labels" / "escape" / "new.nii.gz"):
        with pytest.raises(InvalidRequest, match="leaves the studies folder"):
            check_inside(path, studies, "label tag")


@pytest.mark.parametrize(
    "shape",
    [
        (MAX_EDGE, 2, 2),
        (2, MAX_EDGE, 2),
        (2, 2, MAX_EDGE),
        (MAX_EDGE, MAX_EDGE, MAX_VOXELS // MAX_EDGE**2),
    ],  # last: MAX_VOXELS
)
def test_forged_header_at_the_limits_passes_the_header_check(tmp_path, shape):
    assert int(np.prod(shape)) <= MAX_VOXELS
    assert check_image(_forged_header(tmp_path / "edge.nii.gz", shape), read_voxels=False) is None


@pytest.mark.parametrize(
    "shape",
    [
        (MAX_EDGE + 1, 2, 2),
        (2, MAX_EDGE + 1, 2),
        (2, 2, MAX_EDGE + 1),
        (MAX_EDGE, MAX_EDGE, MAX_VOXELS // MAX_EDGE**2 + 1),
    ],
)
def test_forged_oversize_header_is_refused_before_any_voxel_is_read(tmp_path, shape):
    """A 70-byte upload claiming gigabytes of voxels is refused from its header (the voxels are never allocated)."""
    path = _forged_header(tmp_path / "big.nii.gz", shape)
    with pytest.raises(InvalidUpload, match="exceeds the limit"):
        check_image(path)


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((8, 9), np.int16), "3D"),
        (np.zeros((8, 9, 1), np.int16), "3D"),  # one axis of a single voxel is a 2D image
        (np.zeros((8, 9, 10, 3), np.int16), "3D"),  # a time series / vector image
    ],
)
def test_images_that_are_not_single_channel_3d_volumes_are_refused(tmp_path, array, message):
    with pytest.raises(InvalidUpload, match=message):
        check_image(_nifti(tmp_path / "x.nii.gz", array))


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_other_formats_are_read_through_itk(tmp_path, suffix):
    voxels = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE)
    sitk.WriteImage(sitk.GetImageFromArray(voxels), str(tmp_path / f"ct{suffix}"))
    np.testing.assert_array_equal(check_image(tmp_path / f"ct{suffix}"), voxels)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_truncated_voxel_data_is_refused(tmp_path, suffix):
    """The header is intact, half of the voxels are missing: refused, not zero-filled."""
    noise = np.random.default_rng(0).integers(-1000, 1000, SHAPE, dtype=np.int16)
    full = _nifti(tmp_path / f"full{suffix}", noise).read_bytes()
    (tmp_path / f"cut{suffix}").write_bytes(full[: len(full) // 2])
    with pytest.raises(InvalidUpload, match="cannot be read"):
        check_image(tmp_path / f"cut{suffix}")


def test_valid_image_returns_its_voxels_and_garbage_is_refused(tmp_path):
    voxels = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE)
    np.testing.assert_array_equal(check_image(_nifti(tmp_path / "ct.nii.gz", voxels)), voxels)
    (tmp_path / "junk.nii.gz").write_bytes(b"not an image at all")
    with pytest.raises(InvalidUpload, match="not a readable image"):
        check_image(tmp_path / "junk.nii.gz")


@pytest.fixture
def image(tmp_path) -> Path:
    return _nifti(tmp_path / "image.nii.gz", np.zeros(SHAPE, np.int16))


def test_a_label_on_the_image_grid_with_values_0_and_1_passes(tmp_path, image):
    label = np.zeros(SHAPE, np.uint8)
    label[2:4, 2:4, 2:4] = 1
    assert check_label(_nifti(tmp_path / "ok.nii.gz", label), image) is None
    shifted = AFFINE.copy()
    shifted[:3, 3] = 1e-4  # within the 1e-3 mm tolerance
    assert check_label(_nifti(tmp_path / "near.nii.gz", label, shifted), image) is None


def _moved(dx: float) -> np.ndarray:
    affine = AFFINE.copy()
    affine[0, 3] = dx
    return affine


@pytest.mark.parametrize(
    "shape, affine, field",
    [
        ((8, 9, 11), AFFINE, "size"),
        (SHAPE, np.diag([1.5, 1.5, 2.5, 1.0]), "spacing"),
        (SHAPE, _moved(0.5), "origin"),
        (SHAPE, np.diag([-1.5, -1.5, 3.0, 1.0]), "direction"),  # the same grid flipped left-right, front-back
    ],
)
def test_a_label_off_the_image_grid_is_refused(tmp_path, image, shape, affine, field):
    label = _nifti(tmp_path / "label.nii.gz", np.zeros(shape, np.uint8), affine)
    with pytest.raises(InvalidUpload, match=f"label {field} .* does not match"):
        check_label(label, image)


@pytest.mark.parametrize("value", [2, 255])
def test_a_label_with_other_values_than_0_and_1_is_refused(tmp_path, image, value):
    label = np.zeros(SHAPE, np.uint8)
    label[0, 0, 0] = value
    with pytest.raises(InvalidUpload, match=rf"label values must be in \(0, 1\).*\[0, {value}\]"):
        check_label(_nifti(tmp_path / "label.nii.gz", label), image)
