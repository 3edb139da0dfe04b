"""Dictionary transforms GF-Screen adds to MONAI's: CT intensity windows, missing labels, input checks, the
training crops of windows with context, lesion synthesis on real anatomy and real nodules pasted into real lungs."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import LoadImaged, MapTransform, MultiSampleTrait, Randomizable, RandomizableTransform
from monai.utils import TransformBackends, convert_to_dst_type
from scipy import ndimage

from .loading import NiftiVolumeReader
from .metrics import connected_components

# Soft-tissue (abdomen) and wide (lung / bone) windows in HU. Feeding both as channels lets one model read chest,
# abdomen and whole-body scans; the authors instead picked one window per dataset by hand.
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
    """LoadImaged that names the file when it cannot be read, and refuses images that are not 3D volumes.
    Without a ``reader``, ``.nii.gz`` files are read by :class:`scripts.loading.NiftiVolumeReader` (in one piece,
    voxels as stored: a third of MONAI's reading time), other files by MONAI's choice."""

    def __init__(self, keys: KeysCollection, reader=None, *args, **kwargs) -> None:
        super().__init__(keys, reader, *args, **kwargs)
        if reader is None:  # registered last, so tried first for the suffixes it reads
            self.register(NiftiVolumeReader())

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


class LesionConfidenceFilterd(MapTransform):
    """Drop predicted lesion components whose highest lesion probability is below ``min_peak``.

    A voxel threshold of 0.5 keeps every blob the Focus is unsure about; a true lesion usually has a confident core
    while many false positives (muscle, bowel, vessels) never rise far above 0.5. Gating whole components keeps
    the full extent of the confident ones, where raising the voxel threshold would shrink them too. ``keys`` are
    binary masks (1 channel), ``prob_key`` the lesion probability on the same grid; ``min_peak`` 0.5 changes
    nothing (every component has a voxel above 0.5).
    """

    def __init__(self, keys: KeysCollection, prob_key: str = "prob", min_peak: float = 0.5) -> None:
        super().__init__(keys)
        if not 0.0 <= min_peak <= 1.0:
            raise ValueError(f"min_peak is a probability in [0, 1], got {min_peak}.")
        self.prob_key, self.min_peak = prob_key, min_peak

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        prob = np.asarray(d[self.prob_key])[0]
        for key in self.key_iterator(d):
            labels, n = connected_components(np.asarray(d[key])[0])
            if n == 0:
                continue
            inside = labels > 0
            peaks = np.zeros(n + 1)  # per component, over its own voxels only (ndimage.maximum sorts the volume)
            np.maximum.at(peaks, labels[inside], prob[inside])
            keep = peaks >= self.min_peak
            keep[0] = False
            out = torch.as_tensor(keep[labels][None])
            d[key] = convert_to_dst_type(out, d[key], dtype=d[key].dtype)[0]
        return d


def lesion_balanced_weights(label: torch.Tensor | np.ndarray, fg: np.ndarray) -> np.ndarray | None:
    """Probabilities over the lesion voxels ``fg`` (flat indices into ``label[0]``) that give each lesion (connected
    component, 26-connectivity) the same total; None where ``fg`` is empty."""
    if len(fg) == 0:
        return None
    components, _ = ndimage.label(np.asarray(label)[0] > 0, structure=np.ones((3, 3, 3), bool))
    of_voxel = components.ravel()[fg]
    sizes = np.bincount(of_voxel)
    weights = 1.0 / sizes[of_voxel]
    return weights / weights.sum()


class RandWindowCropd(Randomizable, MapTransform, MultiSampleTrait):
    """``num_samples`` training crops of one scan: a ``roi_size`` window placed as on the inference grid (inside
    the volume), holding a lesion voxel (probability ``pos / (pos + neg)`` when the scan has one) or a background
    voxel anywhere in it, plus ``context`` voxels on each side, zero beyond the volume as the Glance's whole-volume
    map sees it.

    MONAI's RandCropByPosNegLabeld centres its crop on the chosen voxel and shifts it inside the volume; with the
    Glance's context a crop is nearly as deep as a CT, and the shift moved most lesions out of the centre window
    (measured on phantoms: 12 % of training windows held a lesion, not half). Reads the voxel indices of
    ``FgBgToIndicesd`` (``{label_key}_fg_indices`` / ``_bg_indices``) and drops them from the samples.

    With ``balance_lesions``, a lesion voxel is drawn by first drawing a lesion (a connected component of the
    label) uniformly, then a voxel of it: drawn per voxel, an 80 mL tumour gets 80 times the lesion windows of a
    1 mL nodule in the same scan, and the Focus sees few small lesions, the ones a screen misses. Off in the
    shipped recipe: fine-tuning 0.6.0 with it found no lesion under 5 mL and added false positives (model card).
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
        balance_lesions: bool = False,
    ) -> None:
        super().__init__(keys)
        if num_samples < 1 or pos < 0 or neg < 0 or pos + neg <= 0:
            raise ValueError(f"need num_samples >= 1 and pos, neg >= 0 not both 0; got {num_samples}, {pos}, {neg}.")
        self.roi, self.context = [int(r) for r in roi_size], [int(c) for c in context]
        self.num_samples, self.label_key, self.pos_ratio = num_samples, label_key, pos / (pos + neg)
        self.balance_lesions = balance_lesions
        self.starts: list[list[int]] = []

    def randomize(
        self, shape: Sequence[int], fg: np.ndarray, bg: np.ndarray, fg_weights: np.ndarray | None = None
    ) -> None:
        """Draw the window corners: a voxel from ``fg`` (with probabilities ``fg_weights``, uniform if None) or
        ``bg`` (flat indices into ``shape``), then a corner uniformly among those whose window holds that voxel and
        lies inside the volume."""
        self.starts = []
        for _ in range(self.num_samples):
            use_fg = len(fg) > 0 and (len(bg) == 0 or self.R.rand() < self.pos_ratio)
            if use_fg and fg_weights is not None:
                index = fg[self.R.choice(len(fg), p=fg_weights)]
            else:
                pool = fg if use_fg else bg
                index = pool[self.R.randint(len(pool))]
            voxel = np.unravel_index(int(index), shape)
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
        self.randomize(shape, fg, bg, lesion_balanced_weights(d[self.label_key], fg) if self.balance_lesions else None)
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


#: Codes of the host map written by :class:`LesionHostsd`.
HOSTS = {"none": 0, "liver": 1, "lung": 2, "soft_tissue": 3}


class LesionHostsd(MapTransform):
    """Add a ``hosts`` map (``HOSTS`` codes) to a CT in HU: where each kind of synthetic lesion may be implanted.

    liver: the ``liver_key`` mask where the datalist gives one (vessels and lesions of the organ map excluded);
    lung: air (< ``lung_hu``) inside the body, in connected regions of at least ``min_lung_ml`` (more than
    bowel gas) that do not touch the in-plane border of the field of view (the air around the patient does; the
    lungs may leave the scan at its first or last slice); soft tissue: voxels between ``soft_hu`` outside
    the other hosts (muscle, fat, bowel wall, solid organs). Existing lesions are never a host. Deterministic, so
    it runs once before a cache; :class:`RandLesionSynthesisd` reads the map every epoch.
    """

    def __init__(
        self,
        image_key: str = "image",
        label_key: str = "label",
        liver_key: str = "liver",
        hosts_key: str = "hosts",
        pixdim: Sequence[float] = (1.5, 1.5, 3.0),
        lung_hu: float = -400.0,
        min_lung_ml: float = 200.0,
        soft_hu: Sequence[float] = (-100.0, 150.0),
    ) -> None:
        super().__init__([image_key], allow_missing_keys=False)
        self.image_key, self.label_key, self.liver_key, self.hosts_key = image_key, label_key, liver_key, hosts_key
        self.voxel_ml = float(np.prod(pixdim)) / 1000.0
        self.lung_hu, self.min_lung_ml, self.soft_hu = lung_hu, min_lung_ml, tuple(soft_hu)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        hu = np.asarray(d[self.image_key])[0]
        lesion = np.asarray(d[self.label_key])[0] > 0 if d.get(self.label_key) is not None else np.zeros(hu.shape, bool)
        hosts = np.zeros(hu.shape, np.uint8)
        soft = (hu >= self.soft_hu[0]) & (hu <= self.soft_hu[1])
        hosts[soft] = HOSTS["soft_tissue"]
        air, n = ndimage.label(hu < self.lung_hu)
        if n:
            border = np.unique(np.concatenate([air[i].ravel() for i in _faces(air.ndim, axes=(0, 1))]))
            sizes = np.bincount(air.ravel(), minlength=n + 1) * self.voxel_ml
            keep = sizes >= self.min_lung_ml
            keep[border] = False
            keep[0] = False
            hosts[keep[air]] = HOSTS["lung"]
        if d.get(self.liver_key) is not None:
            hosts[np.asarray(d[self.liver_key])[0] > 0] = HOSTS["liver"]
        hosts[lesion] = HOSTS["none"]
        d[self.hosts_key] = torch.as_tensor(hosts[None])
        return d


def _faces(ndim: int, axes: Sequence[int]) -> list[tuple]:
    """Index tuples of the first and last slice along each of ``axes``."""
    return [tuple(slice(None) if a != axis else i for a in range(ndim)) for axis in axes for i in (0, -1)]


class RandLesionSynthesisd(RandomizableTransform, MapTransform):
    """Implant synthetic lesions into a CT in HU and add them to its label (label-free tumour synthesis).

    The recipe follows Hu et al. (CVPR 2023, "Label-free liver tumor segmentation"): an ellipsoid of random size,
    elastically deformed; a texture of Gaussian-filtered noise; an intensity set relative to the host tissue; a
    blurred margin blended into the CT. It is extended from the liver to what a pan-cancer screen meets, one host
    per lesion kind (the ``hosts`` map of :class:`LesionHostsd`):

    - liver: hypodense (``p_hypo``; metastasis, HCC washout) or hyperdense lesions, ``liver_shift`` HU from the
      median of the surrounding liver;
    - lung: solid nodules of ``nodule_hu`` absolute HU (lung parenchyma gives no useful reference);
    - soft tissue: masses ``soft_shift`` HU from the surrounding tissue, either sign.

    Diameters are drawn log-uniformly from ``diameter_mm`` (weighted toward the small lesions a screen misses).
    With probability ``prob`` a scan receives 1 to ``max_lesions`` lesions, each in a host drawn by
    ``host_weights`` among those present. Every changed voxel is inside its host (the margin blur too) and the
    label gains exactly the voxels where the lesion outweighs the host (blend weight >= 0.5). Works on plain
    arrays of an already resampled grid of ``pixdim`` mm, before intensity windowing.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        image_key: str = "image",
        label_key: str = "label",
        hosts_key: str = "hosts",
        pixdim: Sequence[float] = (1.5, 1.5, 3.0),
        prob: float = 0.5,
        max_lesions: int = 3,
        diameter_mm: Sequence[float] = (3.0, 30.0),
        host_weights: Mapping[str, float] | None = None,
        p_hypo: float = 0.7,
        liver_shift: Sequence[float] = (20.0, 80.0),
        nodule_hu: Sequence[float] = (-50.0, 80.0),
        soft_shift: Sequence[float] = (15.0, 50.0),
        texture_hu: Sequence[float] = (5.0, 20.0),
        deform: float = 0.25,
        margin_mm: float = 1.0,
    ) -> None:
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, [image_key, label_key])
        if max_lesions < 1 or not 0 < diameter_mm[0] <= diameter_mm[1]:
            raise ValueError(f"need max_lesions >= 1 and 0 < diameter_mm[0] <= [1]; got {max_lesions}, {diameter_mm}.")
        weights = dict(host_weights or {"liver": 3.0, "lung": 2.0, "soft_tissue": 1.0})
        if set(weights) - set(HOSTS) - {"none"} or any(w < 0 for w in weights.values()):
            raise ValueError(f"host_weights takes non-negative weights for {sorted(HOSTS)[1:]}, got {weights}.")
        self.image_key, self.label_key, self.hosts_key = image_key, label_key, hosts_key
        self.spacing = np.asarray(pixdim, float)
        self.max_lesions, self.diameter_mm, self.host_weights = max_lesions, tuple(diameter_mm), weights
        self.p_hypo, self.liver_shift, self.nodule_hu = p_hypo, tuple(liver_shift), tuple(nodule_hu)
        self.soft_shift, self.texture_hu, self.deform, self.margin_mm = (
            tuple(soft_shift),
            tuple(texture_hu),
            deform,
            margin_mm,
        )
        self.implanted: list[dict] = []

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.implanted = []
        self.randomize(None)
        if not self._do_transform:
            return d
        image = torch.as_tensor(d[self.image_key]).clone().float()
        label = torch.as_tensor(d[self.label_key]).clone()
        hosts = np.asarray(d[self.hosts_key])[0].copy()
        for _ in range(self.R.randint(1, self.max_lesions + 1)):
            present = [h for h, w in self.host_weights.items() if w > 0 and (hosts == HOSTS[h]).any()]
            if not present:
                break
            w = np.array([self.host_weights[h] for h in present])
            host = present[self.R.choice(len(present), p=w / w.sum())]
            self._implant(image[0], label[0], hosts, host)
        d[self.image_key], d[self.label_key] = image, label
        return d

    def _implant(self, hu: torch.Tensor, label: torch.Tensor, hosts: np.ndarray, host: str) -> None:
        """Implant one lesion in place; its host voxels stop being a host so lesions never overlap."""
        code = HOSTS[host]
        candidates = np.flatnonzero(hosts == code)
        centre = np.unravel_index(int(candidates[self.R.randint(len(candidates))]), hosts.shape)
        lo_d, hi_d = self.diameter_mm
        radii = 0.5 * float(np.exp(self.R.uniform(np.log(lo_d), np.log(hi_d)))) * self.R.uniform(0.75, 1.25, 3)
        reach = np.ceil((radii * (1 + self.deform) + 2 * self.margin_mm) / self.spacing).astype(int) + 1
        box = tuple(slice(max(c - r, 0), min(c + r + 1, n)) for c, r, n in zip(centre, reach, hosts.shape))
        mm = np.meshgrid(
            *[(np.arange(b.start, b.stop) - c) * s for b, c, s in zip(box, centre, self.spacing)], indexing="ij"
        )
        # elastic deformation: displace the ellipsoid's coordinates by a smooth random field (Gaussian-filtered noise)
        shape = mm[0].shape
        sigma = np.maximum(radii.mean() / self.spacing / 2, 0.5)
        for axis in range(3):
            field = ndimage.gaussian_filter(self.R.standard_normal(shape), sigma, mode="nearest")
            mm[axis] = mm[axis] + self.deform * radii[axis] * field / max(float(np.abs(field).max()), 1e-6)
        inside = sum((m / r) ** 2 for m, r in zip(mm, radii)) <= 1.0
        inside[tuple(c - b.start for c, b in zip(centre, box))] = True  # never empty, even below one voxel
        in_host = hosts[box] == code
        alpha = ndimage.gaussian_filter(inside.astype(float), self.margin_mm / self.spacing, mode="constant")
        alpha = np.where(inside, np.maximum(alpha, 0.5), np.minimum(alpha, 0.49)) * in_host
        region = hu[box].numpy()
        host_hu = float(np.median(region[in_host]))
        value = self._lesion_hu(host, host_hu)
        texture = ndimage.gaussian_filter(self.R.standard_normal(shape), 1.0)
        texture -= texture[inside].mean()  # the lesion's mean HU is its drawn value
        texture *= self.R.uniform(*self.texture_hu) / max(float(texture[inside].std()), 1e-6)
        blended = (1 - alpha) * region + alpha * (value + texture)
        hu[box] = torch.as_tensor(blended, dtype=hu.dtype)
        lesion = alpha >= 0.5
        label[box] = torch.where(torch.as_tensor(lesion), torch.ones_like(label[box]), label[box])
        hosts[box][in_host & (alpha > 0)] = HOSTS["none"]
        self.implanted.append(
            {
                "host": host,
                "centre": [int(c) for c in centre],
                "diameter_mm": float(2 * radii.mean()),
                "hu": value,
                "host_hu": host_hu,
                "voxels": int(lesion.sum()),
            }
        )

    def _lesion_hu(self, host: str, host_hu: float) -> float:
        """Mean HU of a lesion in ``host`` whose surrounding tissue has median ``host_hu``."""
        if host == "lung":
            return float(self.R.uniform(*self.nodule_hu))
        if host == "liver":
            sign = -1.0 if self.R.rand() < self.p_hypo else 1.0
            return host_hu + sign * float(self.R.uniform(*self.liver_shift))
        return host_hu + float(self.R.choice([-1.0, 1.0])) * float(self.R.uniform(*self.soft_shift))


def load_nodule_bank(path: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (HU patch, nodule mask) pairs of a bank written by the ``prepare_data`` tool (``nodules.npz``:
    ``hu_<i>`` int16 and ``mask_<i>`` uint8 arrays on the training grid, each trimmed around its nodule)."""
    with np.load(path) as bank:
        count = sum(1 for k in bank.files if k.startswith("hu_"))
        pairs = [(bank[f"hu_{i}"].astype(np.float32), bank[f"mask_{i}"] > 0) for i in range(count)]
    if not pairs or any(m.shape != h.shape or not m.any() for h, m in pairs):
        raise ValueError(f"{path}: a nodule bank needs matching, non-empty hu_<i> / mask_<i> pairs; got {count}.")
    return pairs


class RandNodulePasted(RandomizableTransform, MapTransform):
    """Paste real lung nodules from a bank into the lungs of a CT in HU and add them to its label (copy-paste).

    The real lesions of the training CTs are all large; small ones are otherwise only synthetic
    (:class:`RandLesionSynthesisd`). Real nodules (LIDC-IDRI crops, resampled to the training grid) bring real
    shapes, margins, spicules and texture. With probability ``prob`` a scan receives 1 to ``max_nodules`` nodules,
    each randomly flipped, at a random lung voxel of the ``hosts`` map (:class:`LesionHostsd`) where the nodule and
    ``margin`` voxels around it are all lung; the nodule's voxels are copied and become label, the ring around
    them blended with a ``blend_sigma`` Gaussian. No bank (``bank=None``) or no lung leaves the scan unchanged.
    The bank is read on first use.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        bank: str | None,
        image_key: str = "image",
        label_key: str = "label",
        hosts_key: str = "hosts",
        prob: float = 0.5,
        max_nodules: int = 3,
        margin: int = 1,
        blend_sigma: float = 0.5,
        tries: int = 10,
    ) -> None:
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, [image_key, label_key])
        if max_nodules < 1 or margin < 0 or tries < 1:
            raise ValueError(f"need max_nodules >= 1, margin >= 0, tries >= 1; got {max_nodules}, {margin}, {tries}.")
        self.bank_path, self.bank = bank, None
        self.image_key, self.label_key, self.hosts_key = image_key, label_key, hosts_key
        self.max_nodules, self.margin, self.blend_sigma, self.tries = max_nodules, margin, blend_sigma, tries
        self.pasted: list[dict] = []

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.pasted = []
        self.randomize(None)
        if not self._do_transform or self.bank_path is None:
            return d
        if self.bank is None:
            self.bank = load_nodule_bank(self.bank_path)
        hosts = np.asarray(d[self.hosts_key])[0].copy()
        lung = np.flatnonzero(hosts == HOSTS["lung"])
        if len(lung) == 0:
            return d
        image = torch.as_tensor(d[self.image_key]).clone().float()
        label = torch.as_tensor(d[self.label_key]).clone()
        for _ in range(self.R.randint(1, self.max_nodules + 1)):
            for _ in range(self.tries):
                if self._paste(image[0], label[0], hosts, lung):
                    break
        d[self.image_key], d[self.label_key] = image, label
        return d

    def _paste(self, hu: torch.Tensor, label: torch.Tensor, hosts: np.ndarray, lung: np.ndarray) -> bool:
        """Try one nodule at one lung voxel, in place; False where it does not fit inside the lung."""
        index = self.R.randint(len(self.bank))
        patch, mask = self.bank[index]
        flips = tuple(a for a in range(3) if self.R.rand() < 0.5)
        patch, mask = np.flip(patch, flips), np.flip(mask, flips)
        centre = np.unravel_index(int(lung[self.R.randint(len(lung))]), hosts.shape)
        start = [c - s // 2 for c, s in zip(centre, mask.shape)]
        if any(a < 0 or a + s > n for a, s, n in zip(start, mask.shape, hosts.shape)):
            return False
        box = tuple(slice(a, a + s) for a, s in zip(start, mask.shape))
        reach = ndimage.binary_dilation(mask, iterations=self.margin) if self.margin else mask
        if not (hosts[box][reach] == HOSTS["lung"]).all():
            return False
        # the nodule's own voxels are copied as they are (a blur inside would fade a few-voxel nodule to half its
        # contrast); only the ring around it blends the crop's surroundings into the host lung
        alpha = ndimage.gaussian_filter(mask.astype(float), self.blend_sigma, mode="constant")
        alpha = np.where(mask, 1.0, np.minimum(alpha, 0.49)) * reach
        region = hu[box].numpy()
        hu[box] = torch.as_tensor((1 - alpha) * region + alpha * patch, dtype=hu.dtype)
        label[box] = torch.where(torch.as_tensor(mask.copy()), torch.ones_like(label[box]), label[box])
        hosts[box][reach] = HOSTS["none"]
        self.pasted.append({"nodule": int(index), "centre": [int(c) for c in centre], "voxels": int(mask.sum())})
        return True
