"""Dictionary transforms GF-Screen adds to MONAI's: CT intensity windows, missing labels, input checks, and the
training crops of windows with context."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import LoadImaged, MapTransform, MultiSampleTrait, Randomizable

# Soft-tissue (abdomen) and wide (lung / bone) windows in HU. Feeding both as channels lets one model read chest,
# abdomen and whole-body scans; the authors instead picked one window per dataset by hand (NOTES.md §2).
DEFAULT_WINDOWS = ((-160.0, 240.0), (-1000.0, 1000.0))


class HUWindowsd(MapTransform):
    """Map a one-channel CT in Hounsfield units to one channel per (low, high) window, each clipped to [0, 1]."""

    def __init__(self, keys: KeysCollection, windows: Sequence[Sequence[float]] = DEFAULT_WINDOWS) -> None:
        super().__init__(keys)
        if not windows or any(len(w) != 2 or w[1] <= w[0] for w in windows):
            raise ValueError(f"windows must be a non-empty list of (low, high) with high > low, got {windows}.")
        self.windows = [tuple(map(float, w)) for w in windows]

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.shape[0] != 1:
                raise ValueError(f"{key}: expected a one-channel CT in HU, got {img.shape[0]} channels.")
            d[key] = torch.cat([((img[:1] - lo) / (hi - lo)).clamp(0, 1) for lo, hi in self.windows]).float()
        return d


class EnsureLabeld(MapTransform):
    """Give a lesion-free scan (no ``label`` in its datalist entry) an all-background label like its image.

    Lesion-free scans are where a screening tool makes its false positives, so they must be trainable data.
    """

    def __init__(self, keys: KeysCollection = "label", image_key: str = "image") -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.keys:
            if d.get(key) is None:
                img = d[self.image_key]
                d[key] = MetaTensor(torch.zeros_like(img.as_tensor(), dtype=torch.uint8), meta=dict(img.meta))
        return d


class LoadCTd(LoadImaged):
    """LoadImaged that names the file when it cannot be read, and refuses images that are not 3D volumes."""

    def __call__(self, data, reader=None):  # type: ignore[override]
        d = dict(data)
        for key in self.key_iterator(d):
            try:
                loaded = super().__call__({key: d[key]}, reader)
            except Exception as e:
                raise ValueError(f"cannot read {key} file {d[key]}: {_root_cause(e)}") from e
            img = loaded[key]
            spatial = img.shape[1:] if self._loader.ensure_channel_first else img.shape
            if len([s for s in spatial if s > 1]) < 3:
                raise ValueError(f"{key} file {d[key]} is not a 3D volume (shape {tuple(img.shape)}).")
            d.update(loaded)
        return d


class CheckGeometryd(MapTransform):
    """Raise if a label's grid (shape and affine) differs from its image's: a silently misaligned mask would train
    and score the wrong voxels."""

    def __init__(self, keys: KeysCollection = "label", image_key: str = "image", atol: float = 1e-3) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.image_key, self.atol = image_key, atol

    def __call__(self, data: Mapping[Hashable, MetaTensor]) -> dict[Hashable, MetaTensor]:
        d = dict(data)
        img = d[self.image_key]
        for key in self.key_iterator(d):
            lbl = d[key]
            same_shape = tuple(lbl.shape[1:]) == tuple(img.shape[1:])
            same_affine = same_shape and np.allclose(np.asarray(lbl.affine), np.asarray(img.affine), atol=self.atol)
            if not same_affine:
                raise ValueError(
                    f"{key} {lbl.meta.get('filename_or_obj', '?')} does not match image "
                    f"{img.meta.get('filename_or_obj', '?')}: shapes {tuple(lbl.shape[1:])} vs {tuple(img.shape[1:])}, "
                    f"affines\n{np.asarray(lbl.affine).round(3)}\nvs\n{np.asarray(img.affine).round(3)}"
                )
        return d


def _root_cause(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    return f"{type(e).__name__}: {e}"


class LesionProbabilityd(MapTransform):
    """Turn stitched class scores (background, lesion) into one lesion-probability channel p1 / (p0 + p1).

    The Glance-Focus inferer adds zeros for skipped windows, which dilutes both classes alike where kept and
    skipped windows overlap; renormalising gives the probability from the kept windows only (0 where none
    covered the voxel), so ``p > 0.5`` equals the argmax and only one channel needs inverting to the input grid.
    """

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            scores = d[key]
            total = scores[:2].sum(0, keepdim=True)
            d[key] = torch.where(total > 0, scores[1:2] / total.clamp_min(1e-12), torch.zeros_like(total))
        return d


class RandWindowCropd(Randomizable, MapTransform, MultiSampleTrait):
    """``num_samples`` training crops of one scan: a ``roi_size`` window placed as on the inference grid (inside
    the volume), holding a lesion voxel (probability ``pos / (pos + neg)`` when the scan has one) or a background
    voxel anywhere in it, plus ``context`` voxels on each side, zero beyond the volume as the Glance's whole-volume
    map sees it.

    MONAI's RandCropByPosNegLabeld centres its crop on the chosen voxel and shifts it inside the volume; with the
    Glance's context a crop is nearly as deep as a CT, and the shift moved most lesions out of the centre window
    (measured on phantoms: 12 % of training windows held a lesion, not half). Reads the voxel indices of
    ``FgBgToIndicesd`` (``{label_key}_fg_indices`` / ``_bg_indices``) and drops them from the samples.
    """

    def __init__(
        self,
        keys: KeysCollection,
        roi_size: Sequence[int],
        context: Sequence[int],
        num_samples: int,
        label_key: str = "label",
        pos: float = 1.0,
        neg: float = 1.0,
    ) -> None:
        super().__init__(keys)
        if num_samples < 1 or pos < 0 or neg < 0 or pos + neg <= 0:
            raise ValueError(f"need num_samples >= 1 and pos, neg >= 0 not both 0; got {num_samples}, {pos}, {neg}.")
        self.roi, self.context = [int(r) for r in roi_size], [int(c) for c in context]
        self.num_samples, self.label_key, self.pos_ratio = num_samples, label_key, pos / (pos + neg)
        self.starts: list[list[int]] = []

    def randomize(self, shape: Sequence[int], fg: np.ndarray, bg: np.ndarray) -> None:
        """Draw the window corners: a voxel from ``fg`` or ``bg`` (flat indices into ``shape``), then a corner
        uniformly among those whose window holds that voxel and lies inside the volume."""
        self.starts = []
        for _ in range(self.num_samples):
            use_fg = len(fg) > 0 and (len(bg) == 0 or self.R.rand() < self.pos_ratio)
            pool = fg if use_fg else bg
            voxel = np.unravel_index(int(pool[self.R.randint(len(pool))]), shape)
            start = []
            for c, r, n in zip(voxel, self.roi, shape):
                lo = max(0, min(c - r + 1, n - r))
                start.append(int(self.R.randint(lo, max(lo, min(c, n - r)) + 1)))
            self.starts.append(start)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> list[dict[Hashable, torch.Tensor]]:
        d = dict(data)
        fg = np.asarray(d.pop(f"{self.label_key}_fg_indices"))
        bg = np.asarray(d.pop(f"{self.label_key}_bg_indices"))
        shape = d[self.label_key].shape[1:]
        self.randomize(shape, fg, bg)
        samples = []
        for start in self.starts:
            sample = dict(d)
            lo = [s - c for s, c in zip(start, self.context)]
            hi = [s + r + c for s, r, c in zip(start, self.roi, self.context)]
            box = tuple(slice(max(a, 0), min(b, n)) for a, b, n in zip(lo, hi, shape))
            pad = [p for a, b, n in reversed(list(zip(lo, hi, shape))) for p in (max(-a, 0), max(b - n, 0))]
            for key in self.key_iterator(d):
                sample[key] = F.pad(torch.as_tensor(d[key])[(slice(None), *box)], pad)
            samples.append(sample)
        return samples
