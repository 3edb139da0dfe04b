"""Reading a CT onto the model's grid at about the speed of decompressing its file.

For a 512 x 512 x 129 CT (``.nii.gz``) MONAI's path took about 4.7x the time of only decompressing the file: the
NIfTI reader streams it through Python's gzip module and copies the voxels into C order (a transposition of the
whole volume), the float32 volume is flipped to RAS, converted to float64 and resampled through a full sampling
grid. Here the file is decompressed in one call, its voxels are kept as stored (order and dtype) and they go
to the output grid in one pass: trilinear interpolation onto a grid whose axes run along the scan's is three 1D
interpolations, each on an already smaller volume.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, NibabelReader
from monai.data.utils import correct_nifti_header_if_necessary
from monai.transforms import MapTransform, Orientation, Spacing
from monai.utils import ensure_tuple, optional_import

igzip, has_isal = optional_import("isal.igzip")
decompress = igzip.decompress if has_isal else gzip.decompress
AXIS_TOL = 1e-6  # a source-from-output index map entry below this (relative) counts as zero


class NiftiVolumeReader(NibabelReader):
    """``NibabelReader`` that decompresses a ``.nii.gz`` in one call (with ISA-L's igzip where the ``isal``
    package is installed: half of zlib's time) and puts the voxels in C order, the order MONAI's conversions
    require, by blocks (:func:`c_order`), from the decompressed file itself when they are not scaled. ``.nii``
    files are read by MONAI's reader (memory-mapped); the metadata are MONAI's either way."""

    def read(self, data, **kwargs):
        names = ensure_tuple(data)
        if not all(str(name).endswith(".gz") for name in names):
            return super().read(data, **kwargs)
        self.filenames = names
        images = []
        for name in names:
            raw = decompress(Path(name).read_bytes())
            sizes = {int.from_bytes(raw[:4], order) for order in ("little", "big")}  # sizeof_hdr: 348, or 540
            image_class = nib.Nifti2Image if 540 in sizes else nib.Nifti1Image
            images.append(correct_nifti_header_if_necessary(image_class.from_bytes(raw)))
        return images if len(names) > 1 else images[0]

    def _get_array_data(self, img, filename):
        proxy, file = img.dataobj, img.file_map["image"].fileobj
        if isinstance(file, io.BytesIO) and proxy.slope == 1 and proxy.inter == 0:  # unscaled, decompressed by read
            data = np.ndarray(proxy.shape, proxy.dtype, file.getbuffer(), proxy.offset, order=proxy.order)  # a view
        else:
            data = np.asanyarray(proxy)
        return c_order(data if data.dtype.isnative else data.astype(data.dtype.newbyteorder("=")))


def c_order(array: np.ndarray, block: int = 8) -> np.ndarray:
    """``array`` in C order (itself if it already is), copied by ``block`` x ``block`` columns of its last two
    axes: numpy's own copy of a Fortran-ordered volume (NIfTI's order) reads it with a stride of a whole slice,
    five times slower."""
    if array.flags.c_contiguous or array.ndim < 3:
        return np.ascontiguousarray(array)
    out = np.empty(array.shape, array.dtype)
    for j in range(0, array.shape[-2], block):
        for k in range(0, array.shape[-1], block):
            out[..., j : j + block, k : k + block] = array[..., j : j + block, k : k + block]
    return out


def linear_taps(n_out: int, scale: float, offset: float, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation on an axis of ``n_in`` samples at the positions ``scale * j + offset``, ``j < n_out``,
    clamped to ``[0, n_in - 1]`` (border padding): indices ``i0``, ``i1`` and weights ``w`` (float32) such that
    the value at ``j`` is ``(1 - w[j]) * a[i0[j]] + w[j] * a[i1[j]]``."""
    position = np.clip(scale * np.arange(n_out) + offset, 0, n_in - 1)
    i0 = np.minimum(np.floor(position).astype(np.intp), max(n_in - 2, 0))
    return i0, np.minimum(i0 + 1, n_in - 1), (position - i0).astype(np.float32)


def axis_permutation(src_from_dst: np.ndarray) -> list[int] | None:
    """For each output axis the source axis it runs along, when the 4 x 4 index map ``src_from_dst`` (output
    voxel to source voxel) is a scaled, possibly flipped, permutation; None otherwise (a sheared grid)."""
    matrix = np.asarray(src_from_dst, float)[:3, :3]
    perm = [int(i) for i in np.abs(matrix).argmax(0)]
    diagonal = np.zeros_like(matrix)
    diagonal[perm, range(3)] = matrix[perm, range(3)]
    if sorted(perm) != [0, 1, 2] or np.abs(matrix - diagonal).max() > AXIS_TOL * np.abs(matrix).max():
        return None
    return perm


def resample_along_axes(
    array: np.ndarray, src_from_dst: np.ndarray, shape: Sequence[int], chunk: int = 8
) -> np.ndarray:
    """``array`` (3D, any dtype and memory order) sampled by trilinear interpolation with border padding at the
    voxels of a grid of ``shape``, whose voxel ``j`` lies at the source voxel ``src_from_dst @ j``, which must map
    each output axis onto one source axis (:func:`axis_permutation`). Returns float32 in C order.

    Trilinear interpolation is the product of 1D linear ones, so each source axis is interpolated in turn; the axis
    contiguous in memory goes last (gathering along it is the slow one), the others by how much they shrink. The
    first axis is done ``chunk`` output slices at a time, each carried through the other two: small buffers that
    stay in cache, where whole-volume ones cost their page faults in a fresh process (twice the warm time)."""
    perm = axis_permutation(src_from_dst)
    if perm is None:
        raise ValueError(f"the output axes do not run along the source axes:\n{np.round(src_from_dst, 4)}")
    out_axis = {src: dst for dst, src in enumerate(perm)}
    contiguous = int(np.argmin(array.strides))
    first, second = sorted((a for a in range(3) if a != contiguous), key=lambda a: shape[out_axis[a]] / array.shape[a])
    taps = {
        a: linear_taps(shape[out_axis[a]], src_from_dst[a, out_axis[a]], src_from_dst[a, 3], array.shape[a])
        for a in range(3)
    }
    out = np.empty([shape[out_axis[a]] for a in range(3)], np.float32)
    for start in range(0, out.shape[first], chunk):
        x = array
        for axis in (first, second, contiguous):
            i0, i1, w = taps[axis]
            if axis == first:
                i0, i1, w = i0[start : start + chunk], i1[start : start + chunk], w[start : start + chunk]
            w = w.reshape([-1 if a == axis else 1 for a in range(3)])
            low = np.take(x, i0, axis=axis).astype(np.float32, copy=False)
            high = np.take(x, i1, axis=axis) - low
            high *= w
            high += low
            x = high
        out[(slice(None),) * first + (slice(start, start + chunk),)] = x
    return np.ascontiguousarray(out.transpose(perm))


class OrientedSpacingd(MapTransform):
    """``Orientationd(axcodes)`` then ``Spacingd(pixdim, mode="bilinear")`` (border padding) in one pass.

    The output grid is MONAI's own: the two transforms plan it lazily, touching no voxel. Its axes run along the
    scan's (Orientation permutes and flips them, Spacing keeps their directions), so the voxels are resampled
    as loaded (an int16 CT is not converted first) by :func:`resample_along_axes`. Outputs are float32 with
    the input's metadata and the new affine, MONAI's values to float32 rounding, but no ``applied_operations``:
    invert them from the metadata (``original_affine``, ``spatial_shape``), as
    :class:`scripts.postprocess.InvertFindingsd` does, not with ``Invertd``.
    """

    def __init__(self, keys: KeysCollection, pixdim: Sequence[float], axcodes: str = "RAS") -> None:
        super().__init__(keys)
        self.orientation = Orientation(axcodes=axcodes, lazy=True)
        self.spacing = Spacing(pixdim=pixdim, mode="bilinear", padding_mode="border", lazy=True)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            planned = self.spacing(self.orientation(image))
            shape = [int(n) for n in planned.peek_pending_shape()]
            affine = np.asarray(planned.peek_pending_affine(), float)
            src_from_dst = np.linalg.inv(np.asarray(image.affine, float)) @ affine
            voxels = image.detach().cpu().numpy()
            out = np.stack([resample_along_axes(channel, src_from_dst, shape) for channel in voxels])
            meta = {k: v for k, v in image.meta.items() if k != "affine"}
            d[key] = MetaTensor(torch.from_numpy(out), affine=torch.as_tensor(affine), meta=meta)
        return d
