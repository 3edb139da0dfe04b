"""Checks on what clients send: names that must stay inside the studies folder, and uploaded images and labels."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

# A CT of 2048 x 2048 x 4096 int16 voxels is 32 GiB in memory: refuse anything larger before reading voxels.
MAX_VOXELS = 2048 * 2048 * 4096
MAX_EDGE = 4096
LABEL_VALUES = (0, 1)  # bundle metadata: 0 background, 1 lesion


class InvalidRequest(ValueError):
    """A request value the server refuses (HTTP 400)."""


class InvalidUpload(ValueError):
    """An uploaded or stored file that is not a usable image or label (HTTP 422)."""


def check_name(value: str, what: str) -> str:
    """Return ``value`` if it is a single, plain path component (an image id, label id or tag), else raise.

    Ids and tags become file and folder names under the studies folder; a separator, ``..`` or an absolute path
    would let a request write, read or delete files outside it.
    """
    if not isinstance(value, str) or not value or value in (".", "..") or value.startswith("."):
        raise InvalidRequest(f"invalid {what} {value!r}: must be a non-empty name not starting with '.'")
    if any(c in value for c in ("/", "\\", "\0")) or os.path.isabs(value) or value != value.strip():
        raise InvalidRequest(f"invalid {what} {value!r}: path separators and surrounding spaces are not allowed")
    return value


def check_inside(path: str | os.PathLike, root: str | os.PathLike, what: str) -> str:
    """Return the real path of ``path`` if it lies inside ``root`` (symlinks resolved), else raise."""
    real, base = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    if real != base and base not in real.parents:
        raise InvalidRequest(f"{what} {str(path)!r} leaves the studies folder")
    return str(real)


def _header(path: str) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise InvalidUpload(f"{Path(path).name}: not a readable image ({_first_line(e)})") from e
    return reader


def check_image(path: str | os.PathLike, read_voxels: bool = True) -> np.ndarray | None:
    """Raise :class:`InvalidUpload` unless ``path`` is a readable single-channel 3D image of sane size.

    The header is checked before any voxel is read (a forged header cannot make the server allocate 32 GiB);
    with ``read_voxels`` the voxels are read too, which catches truncated or corrupt data, and returned.
    """
    reader = _header(str(path))
    size, name = reader.GetSize(), Path(path).name
    spatial = [s for s in size if s > 1]
    if reader.GetDimension() < 3 or len(spatial) != 3 or reader.GetNumberOfComponents() != 1:
        raise InvalidUpload(f"{name}: expected a single-channel 3D volume, got size {size} with "
                            f"{reader.GetNumberOfComponents()} component(s)")
    if max(size) > MAX_EDGE or int(np.prod(size, dtype=np.int64)) > MAX_VOXELS:
        raise InvalidUpload(f"{name}: size {size} exceeds the limit ({MAX_EDGE} voxels per axis, {MAX_VOXELS} in all)")
    return _voxels(str(path)) if read_voxels else None


def check_label(label_path: str | os.PathLike, image_path: str | os.PathLike, atol: float = 1e-3) -> None:
    """Raise :class:`InvalidUpload` unless the label is a readable volume on its image's grid (size, spacing,
    origin, direction) with values in {0, 1}: a misaligned or multi-class mask would silently train wrong voxels."""
    voxels = check_image(label_path)
    label, image = _header(str(label_path)), _header(str(image_path))
    name = Path(label_path).name
    for field in ("Size", "Spacing", "Origin", "Direction"):
        got, want = getattr(label, f"Get{field}")(), getattr(image, f"Get{field}")()
        if len(got) != len(want) or not np.allclose(got, want, atol=atol):
            raise InvalidUpload(f"{name}: label {field.lower()} {tuple(np.round(got, 4))} does not match the image's "
                                f"{tuple(np.round(want, 4))}")
    values = np.unique(voxels)
    if not np.isin(values, LABEL_VALUES).all():
        found = values[:10].tolist()
        raise InvalidUpload(f"{name}: label values must be in {LABEL_VALUES} (background, lesion), got {found}")


def _voxels(path: str) -> np.ndarray:
    """All voxels of an image. NIfTI goes through nibabel, as in the bundle's loader: ITK zero-fills truncated
    gzip data without an error."""
    try:
        if path.endswith((".nii", ".nii.gz")):
            return np.asanyarray(nib.load(path).dataobj)
        return sitk.GetArrayFromImage(sitk.ReadImage(path))
    except Exception as e:
        raise InvalidUpload(f"{Path(path).name}: image data cannot be read ({_first_line(e)})") from e


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__
