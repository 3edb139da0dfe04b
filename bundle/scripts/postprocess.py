"""Screening post-processing on the input's own grid, done only where a finding can be.

MONAI's ``Invertd`` resamples the whole lesion-probability map back to the input grid (34 M voxels for a
512 x 512 x 129 scan) and the size and confidence filters then label and measure that whole volume, although a
finding covers a few thousand voxels of it. Here the model-grid probability is resampled only inside boxes
around the voxels that could reach the threshold, the mask's filters run on each box, and the result is pasted
into an all-background volume. With (tri)linear resampling this is exact: an input voxel's probability is a convex
combination of its eight model-grid neighbours, so it reaches the threshold only next to a model-grid voxel that
does, and boxes that touch are merged so that every connected component lies inside one box.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Mapping, Sequence

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, NibabelWriter
from monai.data.utils import to_affine_nd
from monai.transforms import MapTransform, Transform
from monai.utils import get_equivalent_dtype
from scipy import ndimage
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

Box = tuple[slice, ...]


def index_map(src_affine: np.ndarray, dst_affine: np.ndarray) -> np.ndarray:
    """4 x 4 matrix taking a voxel index of the ``dst`` grid to the (fractional) voxel index of the ``src`` grid
    holding the same world point."""
    return np.linalg.inv(np.asarray(src_affine, float)) @ np.asarray(dst_affine, float)


def candidate_boxes(prob: np.ndarray, threshold: float) -> list[Box]:
    """Boxes of ``prob``'s grid around each 26-connected region of voxels ``>= threshold``, grown by one voxel
    on each side (the interpolation neighbourhood) and clipped to the grid."""
    labels, count = ndimage.label(prob >= threshold, structure=np.ones((3,) * prob.ndim, bool))
    if count == 0:
        return []
    return [
        tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(box, prob.shape))
        for box in ndimage.find_objects(labels)
    ]


def map_box(box: Box, src_from_dst: np.ndarray, dst_shape: Sequence[int]) -> Box | None:
    """The box of ``dst`` voxels whose position on the ``src`` grid (through ``src_from_dst``, see
    :func:`index_map`) can fall inside the ``src`` box, or None when none can."""
    lo = np.array([s.start for s in box], float) - 1.0  # an open unit of slack around the box
    hi = np.array([s.stop - 1 for s in box], float) + 1.0
    corners = np.array(np.meshgrid(*zip(lo, hi), indexing="ij")).reshape(len(box), -1)
    dst_from_src = np.linalg.inv(src_from_dst)
    mapped = dst_from_src[:3, :3] @ corners + dst_from_src[:3, 3:]
    start = np.maximum(np.floor(mapped.min(1)).astype(int), 0)
    stop = np.minimum(np.ceil(mapped.max(1)).astype(int) + 1, dst_shape)
    if np.any(stop <= start):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop))


def merge_boxes(boxes: Sequence[Box]) -> list[Box]:
    """Bounding boxes of the groups of ``boxes`` that overlap or touch (face, edge or corner), so that the
    result's boxes are disjoint and separated by at least one voxel. Groups are the connected components of the
    touch graph, recomputed until merged boxes touch no other (a few rounds, each vectorised over all pairs)."""
    if not boxes:
        return []
    lo = np.array([[s.start for s in b] for b in boxes])
    hi = np.array([[s.stop for s in b] for b in boxes])
    while len(lo) > 1:
        touch = np.all((lo[:, None] <= hi[None]) & (lo[None] <= hi[:, None]), axis=-1)  # stop is one past the end
        count, group = connected_components(csr_matrix(touch), directed=False)
        if count == len(lo):
            break
        lo = np.array([lo[group == g].min(0) for g in range(count)])
        hi = np.array([hi[group == g].max(0) for g in range(count)])
    return [tuple(slice(int(a), int(b)) for a, b in zip(start, stop)) for start, stop in zip(lo, hi)]


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box holding every non-zero voxel of ``mask``, or None when there is none."""
    mask, box = np.asarray(mask), []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def mask_on_grid(mask: np.ndarray, mask_affine: np.ndarray, shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """``mask`` (non-zero = in) sampled by nearest neighbour at the voxel centres of the grid (``shape``,
    ``affine``), as bool; only the part of that grid around the mask's voxels is looked at."""
    out = np.zeros(tuple(shape), bool)
    box = bounding_box(mask)
    if box is None:
        return out
    src_from_dst = index_map(mask_affine, affine)
    target = map_box(box, src_from_dst, shape)
    if target is None:
        return out
    matrix = src_from_dst[:3, :3]
    offset = matrix @ [s.start for s in target] + src_from_dst[:3, 3] - [s.start for s in box]
    sub = (np.asarray(mask)[box] != 0).astype(np.uint8)
    shape_out = tuple(s.stop - s.start for s in target)
    # grid-constant: a point within half a voxel of the edge of the box still takes the edge voxel
    out[target] = ndimage.affine_transform(sub, matrix, offset, shape_out, order=0, mode="grid-constant") > 0
    return out


def resample_box(src: np.ndarray, src_from_dst: np.ndarray, box: Box) -> np.ndarray:
    """``src`` sampled with (tri)linear interpolation at the voxels of ``box`` on the destination grid; 0 beyond
    ``src``'s extent, interpolated towards 0 within half a voxel of its edge."""
    matrix = src_from_dst[:3, :3]
    offset = matrix @ [s.start for s in box] + src_from_dst[:3, 3]
    diagonal = np.allclose(matrix, np.diag(np.diag(matrix)))  # scipy's fast path for axis-aligned grids
    return ndimage.affine_transform(
        np.asarray(src, np.float32),
        np.diag(matrix) if diagonal else matrix,
        offset=offset,
        output_shape=tuple(s.stop - s.start for s in box),
        order=1,
        mode="grid-constant",
        cval=0.0,
    )


class InvertFindingsd(MapTransform):
    """Take a model-grid lesion probability (``keys``, one channel) to the input's grid, as a binary mask.

    The input's grid is the one the ``image_key`` image was read on (its ``original_affine`` and
    ``spatial_shape``). Voxels with probability ``>= threshold`` form the mask; ``mask_transform`` (e.g. MONAI's
    ``RemoveSmallObjectsd`` and :class:`scripts.transforms.LesionConfidenceFilterd`) runs on each box as a dict
    with the box's mask under the key and its probability under ``prob_key``, both MetaTensors with the box's
    affine. Outputs: the mask (uint8) under the key, and the probability under ``prob_key`` (float32, on the
    input grid inside the boxes, 0 elsewhere, where it is below ``threshold`` anyway), with the image's metadata
    and the input's affine, so that ``SaveImaged`` writes the mask on the input's geometry.
    """

    def __init__(
        self,
        keys: KeysCollection,
        image_key: str = "image",
        prob_key: str = "prob",
        threshold: float = 0.5,
        mask_transform: Callable[[dict], Mapping] | None = None,
    ) -> None:
        super().__init__(keys)
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold is a probability in (0, 1], got {threshold}.")
        self.image_key, self.prob_key, self.threshold = image_key, prob_key, threshold
        self.mask_transform = mask_transform

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        image = d[self.image_key]
        meta = {k: v for k, v in image.meta.items() if k != "affine"}
        in_affine = np.asarray(meta["original_affine"], float)
        in_shape = tuple(int(n) for n in meta["spatial_shape"])
        src_from_dst = index_map(np.asarray(image.affine, float), in_affine)
        for key in self.key_iterator(d):
            prob = np.asarray(d[key].detach().cpu() if isinstance(d[key], torch.Tensor) else d[key], np.float32)[0]
            mask = np.zeros(in_shape, np.uint8, order="F")  # NIfTI's layout: written without a transposing copy
            full_prob = np.zeros(in_shape, np.float32)
            mapped = (map_box(b, src_from_dst, in_shape) for b in candidate_boxes(prob, self.threshold))
            for box in merge_boxes([b for b in mapped if b is not None]):
                p = resample_box(prob, src_from_dst, box)
                found = self._filter(key, p, in_affine, box)
                mask[box], full_prob[box] = found, p
            d[key] = MetaTensor(torch.from_numpy(mask[None]), affine=torch.as_tensor(in_affine), meta=dict(meta))
            d[self.prob_key] = MetaTensor(
                torch.from_numpy(full_prob[None]), affine=torch.as_tensor(in_affine), meta=dict(meta)
            )
        return d

    def _filter(self, key: Hashable, prob: np.ndarray, affine: np.ndarray, box: Box) -> np.ndarray:
        """The thresholded mask of one box, after ``mask_transform``."""
        mask = prob >= self.threshold
        if self.mask_transform is None or not mask.any():
            return mask.astype(np.uint8)
        box_affine = affine.copy()
        box_affine[:3, 3] = affine[:3, :3] @ [s.start for s in box] + affine[:3, 3]
        wrap = lambda a: MetaTensor(torch.from_numpy(a[None]), affine=torch.as_tensor(box_affine))  # noqa: E731
        out = self.mask_transform({key: wrap(mask.astype(np.float32)), self.prob_key: wrap(prob)})
        return (np.asarray(out[key])[0] > 0).astype(np.uint8)


class Timestampd(Transform):
    """Record in ``data[key][name]`` the wall-clock time (``time.perf_counter``) at which a transform chain
    reached this point, so that its stages can be timed without timing every transform."""

    def __init__(self, key: str = "timestamps", name: str = "stamp") -> None:
        self.key, self.name = key, name

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        d[self.key] = {**d.get(self.key, {}), self.name: time.perf_counter()}
        return d


class MaskNiftiWriter(NibabelWriter):
    """``NibabelWriter`` for a mask already on its output grid (``SaveImaged(resample=False)``).

    MONAI's writer converts a mask it does not resample to float64 and to C order, and nibabel then gathers
    NIfTI's Fortran order from it slice by slice: 0.7 s of a 0.8 s save of a 512 x 512 x 129 mask. This writer
    keeps the array as it is and hands nibabel Fortran order (free when the mask already is, as
    :class:`InvertFindingsd`'s masks are); the rest (channel handling, sform / qform, file name) is MONAI's.
    """

    def set_data_array(  # type: ignore[override]
        self, data_array, channel_dim: int | None = 0, squeeze_end_dims: bool = True, **kwargs
    ) -> None:
        super().set_data_array(as_numpy(data_array), channel_dim, squeeze_end_dims, **kwargs)

    def set_metadata(self, meta_dict: Mapping | None, resample: bool = True, **options: object) -> None:
        if resample:
            super().set_metadata(meta_dict, resample=resample, **options)
            return
        self.affine = self.get_meta_info(meta_dict)[1]
        if self.output_dtype is None:
            self.output_dtype = self.data_obj.dtype

    @classmethod
    def create_backend_obj(  # type: ignore[override]
        cls, data_array, affine=None, dtype=None, **kwargs
    ) -> nib.Nifti1Image:
        data = as_numpy(data_array)
        if dtype is not None:
            data = data.astype(get_equivalent_dtype(dtype, np.ndarray), copy=False)
        affine = to_affine_nd(3, np.eye(4) if affine is None else np.asarray(affine, float))
        return nib.Nifti1Image(
            np.asfortranarray(data), affine, header=kwargs.pop("header", None), extra=kwargs.pop("extra", None)
        )


def as_numpy(array) -> np.ndarray:
    """A CPU numpy array of ``array`` in its own memory layout (MONAI's conversions copy to C order)."""
    return array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
