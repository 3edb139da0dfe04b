"""Checks on what clients send: names that must stay inside the studies folder, and uploaded images and labels."""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nibabel.openers import ImageOpener

from .errors import InvalidRequest, InvalidUpload

IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd")  # what the datastore lists and stores
LABEL_VALUES = (0, 1)  # bundle metadata: 0 background, 1 lesion
MAX_NAME_LENGTH = 128  # ids become file names (255 bytes at most) with an extension and a trash prefix


@dataclass(frozen=True)
class ImageLimits:
    """The largest image the server reads (from its header, before any voxel is read) and resamples.

    ``max_voxels`` bounds the stored grid (2**29: a 512 x 512 x 2048 CT, 1 GiB as int16); ``max_resampled_voxels``
    bounds the grid after resampling to the model's ``pixdim`` (2**26, e.g. 400 x 400 x 419 at 1.5 x 1.5 x 3 mm, a
    60 x 60 x 126 cm field of view), which is what inference holds in memory several times over.
    """

    max_voxels: int = 2**29
    max_edge: int = 4096
    max_resampled_voxels: int = 2**26
    pixdim: Sequence[float] | None = None  # the model's voxel spacing in mm; None: no resampled-size check


@dataclass(frozen=True)
class Header:
    """What an image header says about its grid."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    direction: tuple[float, ...]
    components: int


def check_name(value: str, what: str) -> str:
    """Return ``value`` if it is a single, plain path component (an image id, label id or tag), else raise.

    Ids and tags become file and folder names under the studies folder; a separator, ``..``, an absolute path, a
    control character or an over-long name would let a request write, read or delete outside it, or fail the write.
    """
    if not isinstance(value, str) or not value or value in (".", "..") or value.startswith("."):
        raise InvalidRequest(f"invalid {what} {value!r}: must be a non-empty name not starting with '.'")
    if any(c in value for c in ("/", "\\")) or os.path.isabs(value) or value != value.strip():
        raise InvalidRequest(f"invalid {what} {value!r}: path separators and surrounding spaces are not allowed")
    if len(value) > MAX_NAME_LENGTH or not value.isprintable():
        raise InvalidRequest(f"invalid {what}: at most {MAX_NAME_LENGTH} printable characters")
    return value


def check_session_id(value: str) -> str:
    """Return ``value`` if it is a session id as MONAI Label makes them (a UUID), else raise: session ids name
    folders that MONAI Label deletes."""
    try:
        if str(uuid.UUID(value)) == value.lower():
            return value
    except (ValueError, TypeError, AttributeError):
        pass
    raise InvalidRequest(f"invalid session_id {str(value)[:64]!r}: expected a UUID returned by PUT /session/")


def check_inside(path: str | os.PathLike, root: str | os.PathLike, what: str) -> str:
    """Return the real path of ``path`` if it lies inside ``root`` (symlinks resolved), else raise."""
    real, base = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    if real != base and base not in real.parents:
        raise InvalidRequest(f"{what} {str(path)!r} leaves the studies folder")
    return str(real)


def image_id(filename: str) -> str:
    """The datastore id of an uploaded file: its whole name less the image extension (``1.2.840.1.nii.gz`` is
    ``1.2.840.1``; MONAI Label would keep only ``1``), checked as a name."""
    name = Path(filename).name
    ext = next((e for e in IMAGE_EXTENSIONS if name.lower().endswith(e)), None)
    if ext is None:
        raise InvalidUpload(f"{name}: unsupported file type; send one of {', '.join(IMAGE_EXTENSIONS)}")
    return check_name(name[: -len(ext)], "image id")


def resampled_shape(
    size: Sequence[int], spacing: Sequence[float], direction: Sequence[float], pixdim: Sequence[float]
) -> tuple[int, ...]:
    """Grid size after resampling a 3D image to ``pixdim`` along the world axes (as the bundle's Orientation and
    Spacing transforms do): the world extent of the image's box divided by the target spacing."""
    axes = np.abs(np.asarray(direction, dtype=float).reshape(3, 3))
    extent = axes @ (np.asarray(size, dtype=float) * np.asarray(spacing, dtype=float))
    return tuple(max(1, math.ceil(round(e / p, 6))) for e, p in zip(extent, pixdim))


def check_image(
    path: str | os.PathLike, read_voxels: bool = True, limits: ImageLimits = ImageLimits()
) -> np.ndarray | None:
    """Raise :class:`InvalidUpload` unless ``path`` (a file, or a folder holding a DICOM series) is a readable
    single-channel 3D image of positive spacing within ``limits``.

    Everything is checked from the header before any voxel is read, so a forged header cannot make the server
    allocate gigabytes; with ``read_voxels`` the voxels are read too, which catches truncated or corrupt data, and
    returned.
    """
    path, name = str(path), Path(path).name
    header = _header(path)
    spatial = [s for s in header.size if s > 1]
    if len(header.size) < 3 or len(spatial) != 3 or header.components != 1:
        raise InvalidUpload(
            f"{name}: expected a single-channel 3D volume, got size {header.size} with {header.components} component(s)"
        )
    spacing = _declared_spacing(path, header)
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise InvalidUpload(f"{name}: voxel spacing {tuple(spacing)} must be positive")
    voxels = int(np.prod(header.size, dtype=np.int64))
    if max(header.size) > limits.max_edge or voxels > limits.max_voxels:
        raise InvalidUpload(
            f"{name}: size {header.size} exceeds the limit ({limits.max_edge} voxels per axis, "
            f"{limits.max_voxels} in all)"
        )
    if limits.pixdim is not None and len(header.size) == 3:
        shape = resampled_shape(header.size, spacing, header.direction, limits.pixdim)
        if int(np.prod(shape, dtype=np.int64)) > limits.max_resampled_voxels:
            raise InvalidUpload(
                f"{name}: resampled to the model's {tuple(limits.pixdim)} mm voxels it would be {shape}, over the "
                f"limit of {limits.max_resampled_voxels} voxels (size {header.size}, spacing {np.round(spacing, 3)})"
            )
    return _voxels(path) if read_voxels else None


def check_label(label_path: str | os.PathLike, image_path: str | os.PathLike, atol: float = 1e-3) -> None:
    """Raise :class:`InvalidUpload` unless the label is a readable volume on its image's grid (size, spacing,
    origin, direction) with values in {0, 1}: a misaligned or multi-class mask would silently train wrong voxels."""
    voxels = check_image(label_path)
    label, image = _reader(str(label_path)), _reader(str(image_path))
    name = Path(label_path).name
    for field in ("Size", "Spacing", "Origin", "Direction"):
        got, want = getattr(label, f"Get{field}")(), getattr(image, f"Get{field}")()
        if len(got) != len(want) or not np.allclose(got, want, atol=atol):
            raise InvalidUpload(
                f"{name}: label {field.lower()} {tuple(np.round(got, 4))} does not match the image's "
                f"{tuple(np.round(want, 4))}"
            )
    values = np.unique(voxels)
    if not np.isin(values, LABEL_VALUES).all():
        found = values[:10].tolist()
        raise InvalidUpload(f"{name}: label values must be in {LABEL_VALUES} (background, lesion), got {found}")


def same_image(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when two image files hold the same voxels on the same grid (whatever their compression)."""
    ra, rb = _reader(str(a)), _reader(str(b))
    for field in ("Size", "Spacing", "Origin", "Direction"):
        got, want = getattr(ra, f"Get{field}")(), getattr(rb, f"Get{field}")()
        if len(got) != len(want) or not np.allclose(got, want, atol=1e-4):
            return False
    return bool(np.array_equal(_voxels(str(a)), _voxels(str(b))))


def _reader(path: str) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise InvalidUpload(f"{Path(path).name}: not a readable image ({_first_line(e, path)})") from e
    return reader


def _header(path: str) -> Header:
    """The grid of an image file, or of the DICOM series in a folder (its first slice times the slice count)."""
    if not os.path.isdir(path):
        r = _reader(path)
        return Header(r.GetSize(), r.GetSpacing(), r.GetDirection(), r.GetNumberOfComponents())
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(path)
    if not files:
        raise InvalidUpload(f"{Path(path).name}: the folder holds no DICOM series")
    r = _reader(files[0])
    size = (*r.GetSize()[:2], len(files))
    return Header(size, r.GetSpacing(), r.GetDirection(), r.GetNumberOfComponents())


def _declared_spacing(path: str, header: Header) -> tuple[float, ...]:
    """The spacing as stored: ITK and nibabel silently read a NIfTI ``pixdim`` of 0 as 1 mm."""
    if not path.endswith((".nii", ".nii.gz")):
        return tuple(header.spacing)
    with ImageOpener(path) as f:
        raw = f.read(540)
    for klass in (nib.Nifti1Header, nib.Nifti2Header):
        try:
            nifti = klass(raw[: klass.sizeof_hdr], check=False)
        except Exception:
            continue
        if int(nifti["sizeof_hdr"]) == klass.sizeof_hdr:
            return tuple(float(s) for s in nifti["pixdim"][1 : 1 + min(3, len(header.size))])
    return tuple(header.spacing)


def _voxels(path: str) -> np.ndarray:
    """All voxels of an image. NIfTI goes through nibabel, as in the bundle's loader: ITK zero-fills truncated
    gzip data without an error."""
    try:
        if path.endswith((".nii", ".nii.gz")):
            return np.asanyarray(nib.load(path).dataobj)
        if os.path.isdir(path):
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(path))
            return sitk.GetArrayFromImage(reader.Execute())
        return sitk.GetArrayFromImage(sitk.ReadImage(path))
    except Exception as e:
        raise InvalidUpload(f"{Path(path).name}: image data cannot be read ({_first_line(e, path)})") from e


def _first_line(e: BaseException, path: str) -> str:
    """The last line of an error message, the file named by its name only (not the server's temporary path)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[-1] if lines else type(e).__name__).replace(str(Path(path).parent) + os.sep, "")
