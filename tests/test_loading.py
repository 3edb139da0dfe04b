"""Reading a CT onto the model's grid (scripts.loading): MONAI's voxels and metadata from a faster reader, MONAI's
grid and values from one separable resampling. Its speed (load beside decompress-only, on real CT) is measured
by ``scripts.cli.benchmark`` and recorded in docs/benchmarks.md, not asserted here."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor, NibabelReader
from monai.transforms import LoadImage, Orientation, Spacing
from scipy import ndimage

from scripts.loading import (
    NiftiVolumeReader,
    OrientedSpacingd,
    axis_permutation,
    c_order,
    linear_taps,
    resample_along_axes,
)
from scripts.transforms import LoadCTd


def test_linear_taps_by_hand():
    i0, i1, w = linear_taps(3, 2.0, 0.5, 6)  # positions 0.5, 2.5, 4.5
    assert i0.tolist() == [0, 2, 4] and i1.tolist() == [1, 3, 5] and w.tolist() == [0.5, 0.5, 0.5]
    i0, i1, w = linear_taps(4, -2.5, 5.0, 4)  # 5, 2.5, 0, -2.5: clamped to 3, 2.5, 0, 0 (border padding)
    assert i0.tolist() == [2, 2, 0, 0] and i1.tolist() == [3, 3, 1, 1] and w.tolist() == [1.0, 0.5, 0.0, 0.0]
    i0, i1, w = linear_taps(2, 0.7, 0.0, 1)  # a single sample: every position is that sample
    assert i0.tolist() == i1.tolist() == [0, 0] and w.tolist() == [0.0, 0.0]


def _index_map(perm, scales, offsets) -> np.ndarray:
    """Output voxel j to source voxel: source axis perm[k] = scales[k] * j[k] + offsets[k]."""
    m = np.eye(4)
    m[:3, :3] = 0
    for dst, (src, scale, offset) in enumerate(zip(perm, scales, offsets)):
        m[src, dst], m[src, 3] = scale, offset
    return m


def test_axis_permutation():
    assert axis_permutation(_index_map([2, 0, 1], [2.0, -1.5, 0.5], [0, 10, 3])) == [2, 0, 1]
    rotated = _index_map([0, 1, 2], [1.0, 1.0, 1.0], [0, 0, 0])
    rotated[:2, :2] = [[np.cos(0.1), -np.sin(0.1)], [np.sin(0.1), np.cos(0.1)]]
    assert axis_permutation(rotated) is None


@pytest.mark.parametrize("order", ["C", "F"])
def test_resample_along_axes_is_trilinear_with_border_padding(order):
    """A linear function is its own trilinear interpolation: inside the source, the output is the function at the
    mapped point; outside, at the point clamped to the source (border padding). Random voxels: as scipy's
    trilinear interpolation with edge values repeated."""
    shape = (7, 5, 4)
    x, y, z = np.meshgrid(*map(np.arange, shape), indexing="ij")
    linear = np.asarray(3 * x - 2 * y + 5 * z, np.int16, order=order)
    m = _index_map([1, 2, 0], [-0.5, 0.75, 1.5], [4.0, -1.0, 0.25])  # output axes: source y (flipped), z, x
    out = resample_along_axes(linear, m, (6, 5, 5))
    assert out.dtype == np.float32 and out.flags.c_contiguous and out.shape == (6, 5, 5)
    j = np.stack(np.meshgrid(*map(np.arange, (6, 5, 5)), indexing="ij"), -1).reshape(-1, 3)
    src = (m[:3, :3] @ j.T + m[:3, 3:]).T
    src = np.clip(src, 0, np.array(shape) - 1)
    np.testing.assert_allclose(out.reshape(-1), 3 * src[:, 0] - 2 * src[:, 1] + 5 * src[:, 2], atol=1e-4)

    noise = np.asarray(np.random.default_rng(0).normal(size=shape), np.float32, order=order)
    expected = ndimage.map_coordinates(noise, src.T, order=1, mode="nearest").reshape(6, 5, 5)
    np.testing.assert_allclose(resample_along_axes(noise, m, (6, 5, 5)), expected, atol=1e-5)


def test_resample_along_axes_refuses_a_rotated_grid():
    rotated = np.eye(4)
    rotated[:2, :2] = [[np.cos(0.1), -np.sin(0.1)], [np.sin(0.1), np.cos(0.1)]]
    with pytest.raises(ValueError, match="do not run along the source axes"):
        resample_along_axes(np.zeros((4, 4, 4)), rotated, (4, 4, 4))


def test_c_order_copies_fortran_volumes_by_blocks():
    volume = np.asfortranarray(np.random.default_rng(1).integers(-1000, 1000, (13, 11, 9), dtype=np.int16))
    out = c_order(volume, block=4)
    assert out.flags.c_contiguous and out.dtype == np.int16
    np.testing.assert_array_equal(out, volume)
    already = np.ascontiguousarray(volume)
    assert c_order(already) is already


def _nifti(tmp_path: Path, name: str, voxels: np.ndarray, affine: np.ndarray, image_class=nib.Nifti1Image, **kw):
    img = image_class(voxels, affine)
    if "slope" in kw:
        img.header.set_slope_inter(kw["slope"], kw["inter"])
    path = tmp_path / name
    nib.save(img, str(path))
    return path


@pytest.mark.parametrize(
    "name, image_class, dtype, scaled",
    [
        ("ct.nii.gz", nib.Nifti1Image, np.int16, False),
        ("big_endian.nii.gz", nib.Nifti1Image, np.dtype(">i2"), False),
        ("scaled.nii.gz", nib.Nifti1Image, np.int16, True),
        ("nifti2.nii.gz", nib.Nifti2Image, np.float32, False),
        ("plain.nii", nib.Nifti1Image, np.int16, False),
    ],
)
def test_reader_gives_monai_s_voxels_and_metadata(tmp_path, name, image_class, dtype, scaled):
    rng = np.random.default_rng(2)
    voxels = rng.integers(-1024, 2000, (12, 10, 6)).astype(dtype)
    affine = np.array([[-0.8, 0, 0, 90], [0, 0, 1.2, -40], [0, -0.8, 0, 60], [0, 0, 0, 1]], float)
    extra = {"slope": 2.0, "inter": -7.0} if scaled else {}
    path = _nifti(tmp_path, name, voxels, affine, image_class, **extra)
    ours = LoadImage(reader=NiftiVolumeReader(), image_only=True, dtype=None)(str(path))
    monai = LoadImage(reader=NibabelReader(), image_only=True, dtype=None)(str(path))
    assert ours.shape == monai.shape == (12, 10, 6) and ours.dtype == monai.dtype
    torch.testing.assert_close(ours.as_tensor(), monai.as_tensor(), rtol=0, atol=0)
    for key in ("affine", "original_affine", "spatial_shape", "filename_or_obj", "pixdim"):
        np.testing.assert_array_equal(np.asarray(ours.meta[key]), np.asarray(monai.meta[key]))
    if scaled:
        np.testing.assert_allclose(ours.numpy(), 2.0 * voxels - 7.0)


def test_load_ct_reads_gz_with_the_fast_reader_and_names_a_broken_file(tmp_path, monkeypatch):
    path = _nifti(tmp_path, "ct.nii.gz", np.zeros((4, 4, 3), np.int16), np.eye(4))
    calls = []
    real = NiftiVolumeReader.read
    monkeypatch.setattr(NiftiVolumeReader, "read", lambda self, data, **kw: calls.append(data) or real(self, data))
    assert LoadCTd("image", ensure_channel_first=True)({"image": str(path)})["image"].shape == (1, 4, 4, 3)
    assert calls == [(str(path),)]
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match=f"cannot read image file {broken}: EOFError: Compressed file ended"):
        LoadCTd("image", ensure_channel_first=True)({"image": str(broken)})


@pytest.mark.parametrize("pixdim", [(1.5, 1.5, 3.0), (0.9, 2.2, 1.0)])
def test_oriented_spacing_equals_monai_s_orientation_and_spacing(pixdim):
    """An LPS, slice-permuted, slightly rotated CT of int16: MONAI's grid (shape, affine), MONAI's values to
    float32 rounding, the input's metadata, and the input left as it was."""
    rng = np.random.default_rng(3)
    voxels = torch.as_tensor(rng.integers(-1000, 1500, (1, 40, 23, 31)), dtype=torch.int16)
    c, s = np.cos(0.2), np.sin(0.2)
    affine = np.array([[0, -0.7 * c, -1.6 * s, 50], [0, -0.7 * s, 1.6 * c, 20], [2.5, 0, 0, -300], [0, 0, 0, 1]])
    meta = {"original_affine": affine, "spatial_shape": np.array([40, 23, 31]), "filename_or_obj": "ct.nii.gz"}
    image = MetaTensor(voxels, affine=torch.as_tensor(affine), meta=meta)
    ours = OrientedSpacingd("image", pixdim=pixdim)({"image": image})["image"]
    monai = Spacing(pixdim=pixdim, mode="bilinear")(Orientation(axcodes="RAS")(image.float()))
    assert ours.shape == monai.shape and ours.dtype == torch.float32
    np.testing.assert_allclose(np.asarray(ours.affine), np.asarray(monai.affine), atol=1e-6)
    np.testing.assert_allclose(ours.numpy(), monai.numpy(), atol=2e-3)
    assert ours.meta["filename_or_obj"] == "ct.nii.gz"
    np.testing.assert_array_equal(ours.meta["original_affine"], affine)
    assert image.pending_operations == [] and image.dtype == torch.int16
    np.testing.assert_array_equal(np.asarray(image.affine), affine)
