"""Datalists: Decathlon-style JSON lists of CT cases, checked before any training or evaluation starts."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.data import load_decathlon_datalist

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """A datalist case that cannot be used, with the file named in the message."""


def _header(path: str) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine from the file header (NIfTI: no voxel data read) or from ITK for other formats."""
    if not Path(path).exists():
        raise DataError(f"file not found: {path}")
    try:
        if str(path).endswith((".nii", ".nii.gz")):
            img = nib.load(path)
            return tuple(int(s) for s in img.shape), img.affine
        from monai.transforms import LoadImage

        img = LoadImage(image_only=True)(path)
        return tuple(int(s) for s in img.shape), np.asarray(img.affine)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read {path}: {type(e).__name__}: {e}") from e


def check_case(item: dict) -> None:
    """Raise DataError if the case's image is missing, unreadable or not 3D, or its label's grid differs."""
    if "image" not in item:
        raise DataError(f"datalist entry without an 'image': {item}")
    shape, affine = _header(item["image"])
    if len([s for s in shape[:3] if s > 1]) < 3 or len(shape) > 4:
        raise DataError(f"{item['image']} is not a 3D volume (shape {shape}).")
    if item.get("label"):
        lshape, laffine = _header(item["label"])
        if lshape[:3] != shape[:3] or not np.allclose(laffine, affine, atol=1e-3):
            raise DataError(
                f"label {item['label']} does not match image {item['image']}: shape {lshape} vs {shape}, "
                f"spacing/origin differ by up to {np.abs(laffine - affine).max():.3g} mm."
            )


def load_datalist(path: str, key: str = "training", base_dir: str | None = None, on_error: str = "raise") -> list[dict]:
    """Read ``key`` of a Decathlon datalist and check every case (header level, before any voxel is loaded).

    Entries without ``label`` are lesion-free scans. ``on_error="raise"`` stops at the first bad case with a
    message naming its file; ``"skip"`` drops bad cases with a warning for each and goes on (an empty result
    still raises, since a silent run on no data would be a wrong result).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}.")
    if not Path(path).is_file():
        raise DataError(f"datalist not found: {path}")
    items = load_decathlon_datalist(path, is_segmentation=True, data_list_key=key, base_dir=base_dir)
    good = []
    for item in items:
        try:
            check_case(item)
            good.append(item)
        except DataError as e:
            if on_error == "raise":
                raise
            warnings.warn(f"skipping case: {e}", stacklevel=2)
            logger.warning("skipping case: %s", e)
    if not good:
        raise DataError(f"no usable case under '{key}' in {path}.")
    return good
