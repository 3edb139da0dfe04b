"""Deterministic synthetic CT phantoms with lesions, for unit tests, the training smoke test and the demo input.

A phantom is a CT-like volume in Hounsfield units (HU) built from ellipsoids, cylinders and smooth random
fields: body with subcutaneous fat and muscle, lungs with vessels, heart, liver, spleen, kidneys, pancreas,
aorta, spine and ribs, then 1-4 irregular lesions placed inside their host organs. Arrays are in RAS voxel
order (x: patient right, y: anterior, z: superior) so they are saved with a diagonal affine.

Example::

    cd bundle && python -m scripts.phantom write --out_dir /tmp/phantoms --num_cases 8
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

__all__ = ["LESION_TYPES", "REGIONS", "TISSUES", "Phantom", "make_phantom", "write_phantom_dataset"]

REGIONS = ("abdomen", "chest")
#: Codes of ``Phantom.tissue``.
TISSUES = {
    "air": 0,
    "fat": 1,
    "soft_tissue": 2,
    "bowel": 3,
    "lung": 4,
    "liver": 5,
    "spleen": 6,
    "kidney": 7,
    "pancreas": 8,
    "heart": 9,
    "vessel": 10,
    "bone": 11,
}
#: Lesion type -> (host tissue, HU range of the lesion).
LESION_TYPES = {
    "liver_tumour": ("liver", (20.0, 50.0)),
    "lung_nodule": ("lung", (-50.0, 50.0)),
    "kidney_tumour": ("kidney", (30.0, 60.0)),
    "bone_lytic": ("bone", (50.0, 150.0)),
    "soft_tissue_lesion": ("pancreas", (20.0, 45.0)),
}
# Relative frequency of lesion types per region (types whose host is absent from the field of view are skipped).
_LESION_WEIGHTS = {
    "abdomen": {"liver_tumour": 4, "kidney_tumour": 2, "soft_tissue_lesion": 2, "bone_lytic": 1, "lung_nodule": 1},
    "chest": {"lung_nodule": 6, "bone_lytic": 2, "liver_tumour": 1},
}
_RADIUS_MM = (3.0, 15.0)
_PLACEMENT_TRIES = 30


@dataclass
class Phantom:
    """A synthetic CT volume with its lesion mask.

    Attributes:
        image: int16 HU volume, axes x, y, z (RAS voxel order).
        label: uint8 binary lesion mask (1 = lesion), all zeros for a lesion-free phantom.
        affine: 4x4 float64 voxel-to-world (RAS, mm) matrix, diagonal with the voxel spacing.
        lesions: one dict per lesion: ``type`` (a key of ``LESION_TYPES``), ``centre_mm`` (world coordinates
            of a voxel inside it), ``radius_mm`` (nominal radius before lobulation and clipping to the host
            organ) and ``volume_ml`` (volume of its voxels in ``label``).
        tissue: uint8 tissue map (codes in ``TISSUES``; lesion voxels carry their host's code), for checks.
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    lesions: list[dict]
    tissue: np.ndarray


def _check_int(name: str, value: int, minimum: int) -> None:
    """Raise a ValueError unless ``value`` is an integer (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def _check_geometry(shape: Sequence[int], spacing: Sequence[float]) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Validate and normalise ``shape`` (3 ints >= 16) and ``spacing`` (3 positive finite mm values)."""
    dims = np.asarray(shape)
    if dims.shape != (3,) or not np.issubdtype(dims.dtype, np.integer) or (dims < 16).any():
        raise ValueError(f"shape must be 3 integers (x, y, z), each >= 16, got {shape!r}.")
    try:
        mm = np.asarray(spacing, dtype=float)
    except (TypeError, ValueError):
        mm = np.zeros(0)
    if mm.shape != (3,) or not (np.isfinite(mm) & (mm > 0)).all():
        raise ValueError(f"spacing must be 3 positive finite numbers in mm, got {spacing!r}.")
    return tuple(int(d) for d in dims), tuple(float(s) for s in mm)


def _smooth_noise(
    rng: np.random.Generator, shape: Sequence[int], spacing: Sequence[float], scale_mm: float
) -> np.ndarray:
    """Zero-mean, unit-variance float32 random field whose correlation length is about ``scale_mm``.

    White noise on a coarse grid (one node every ``scale_mm``) is interpolated with separable, row-normalised
    Gaussian weights as three matrix products: much cheaper than filtering a full-size noise volume.
    """
    weights = []
    for n, s in zip(shape, spacing):
        nodes = np.arange(-2 * scale_mm, n * s + 2 * scale_mm, scale_mm)
        w = np.exp(-0.5 * ((np.arange(n)[:, None] * s - nodes[None]) / scale_mm) ** 2)
        w[w < 1e-6] = 0  # no float32 denormals: they make BLAS crawl
        weights.append((w / np.linalg.norm(w, axis=1, keepdims=True)).astype(np.float32))
    wx, wy, wz = weights
    coarse = rng.standard_normal([w.shape[1] for w in weights], dtype=np.float32)
    field = (coarse.reshape(-1, coarse.shape[2]) @ wz.T).reshape(*coarse.shape[:2], -1)  # (bx, by, nz)
    field = np.tensordot(wy, field, axes=(1, 1))  # (ny, bx, nz)
    return np.tensordot(wx, field, axes=(1, 1))  # (nx, ny, nz)


def _ellipsoid(grid: Sequence[np.ndarray], centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    """Axis-aligned ellipsoid mask in normalised coordinates; an infinite radius extends it along that axis."""
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii) if np.isfinite(r)) <= 1.0


def _anatomy(
    rng: np.random.Generator, shape: tuple[int, ...], spacing: tuple[float, ...], region: str
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Paint the healthy anatomy; return (float32 HU, tissue map, lesion host masks by tissue name).

    Geometry is defined in coordinates normalised to [-1, 1] over the field of view, so any shape/spacing
    gives a complete body; thin structures are at least one voxel thick so they survive coarse grids.
    """
    half = np.asarray(shape) * np.asarray(spacing) / 2
    axes = [(((np.arange(n) + 0.5) * s - h) / h).astype(np.float32) for n, s, h in zip(shape, spacing, half)]
    grid = u, v, w = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    z_mm = w * half[2]
    hu = np.full(shape, -1000.0, dtype=np.float32)
    tissue = np.zeros(shape, dtype=np.uint8)

    def paint(mask: np.ndarray, name: str, value: float) -> None:
        np.copyto(hu, value, where=mask, casting="unsafe")
        np.copyto(tissue, TISSUES[name], where=mask, casting="unsafe")

    def thick(mm: float) -> float:  # a thickness in mm, at least one in-plane voxel, in normalised units
        return max(mm, spacing[0], spacing[1]) / min(half[0], half[1])

    def jitter(*centre: float) -> tuple[float, ...]:
        return tuple(c + rng.uniform(-0.03, 0.03) for c in centre)

    chest = region == "chest"
    ax, ay, fat = rng.uniform(0.86, 0.94), rng.uniform(0.64, 0.68), rng.uniform(0.06, 0.09)
    body_r = np.sqrt((u / ax) ** 2 + (v / ay) ** 2)  # 1 at the skin, (nx, ny, 1)
    wall = 1 - fat - 0.07  # inner edge of the muscle wall
    paint(body_r <= 1, "fat", rng.uniform(-110, -90))
    paint(body_r <= 1 - fat, "soft_tissue", rng.uniform(40, 55))
    cavity = body_r <= wall
    paint(cavity, "fat", rng.uniform(-100, -80))
    if not chest:  # bowel loops with gas pockets in mesenteric fat
        bowel = _smooth_noise(rng, shape, spacing, 8.0)
        paint(cavity & (abs(bowel) < 0.5), "bowel", rng.uniform(15, 40))
        paint(cavity & (bowel > 1.8), "bowel", -900)

    # lungs: large in the chest, posterior bases at the top of the abdomen; vessels where two fields cross zero
    (lx, ly, lz), lr = ((0.44, -0.04, 0.15), (0.4, 0.6, 1.3)) if chest else ((0.45, -0.2, 1.45), (0.34, 0.42, 0.7))
    lung = _ellipsoid(grid, jitter(lx, ly, lz), lr) | _ellipsoid(grid, jitter(-lx, ly, lz), lr)
    lung &= cavity & (abs(u) > 0.1)
    paint(lung, "lung", rng.uniform(-880, -840))
    v1, v2 = _smooth_noise(rng, shape, spacing, 9.0), _smooth_noise(rng, shape, spacing, 9.0)
    lung_vessels = lung & (abs(v1) < 0.3) & (abs(v2) < 0.3)
    paint(lung_vessels, "vessel", rng.uniform(40, 120))
    if chest:
        heart_c = jitter(-0.1, 0.2, -0.3)
        paint(_ellipsoid(grid, heart_c, (0.3, 0.3, 0.45)) & cavity, "heart", rng.uniform(90, 110))
        paint(_ellipsoid(grid, heart_c, (0.2, 0.2, 0.32)), "heart", rng.uniform(170, 210))

    # abdominal organs; in the chest they sit below the field of view except the liver dome and spleen tip
    dz = -1.7 if chest else 0.0
    liver = _ellipsoid(grid, jitter(0.33, 0.0, 0.4 + dz), (0.42, 0.5, 0.6))
    liver = (liver | _ellipsoid(grid, jitter(0.0, 0.22, 0.55 + dz), (0.3, 0.2, 0.3))) & cavity
    paint(liver, "liver", rng.uniform(90, 115))
    paint(_ellipsoid(grid, jitter(-0.5, -0.22, 0.45 + dz), (0.16, 0.24, 0.3)) & cavity, "spleen", rng.uniform(105, 125))
    pancreas = _ellipsoid(grid, jitter(-0.1, -0.05, 0.05 + dz), (0.3, 0.075, 0.1)) & cavity
    paint(pancreas, "pancreas", rng.uniform(85, 105))
    kidneys = np.zeros(shape, dtype=bool)
    cortex_hu, medulla_hu = rng.uniform(150, 180), rng.uniform(90, 110)
    for side in (1, -1):  # the right kidney (+x) sits a little lower
        centre = jitter(0.36 * side, -0.32, -0.25 + 0.1 * (side < 0) + dz)
        kidney = _ellipsoid(grid, centre, (0.12, 0.15, 0.42)) & cavity
        paint(kidney, "kidney", cortex_hu)
        paint(_ellipsoid(grid, centre, (0.07, 0.09, 0.3)) & kidney, "kidney", medulla_hu)
        kidneys |= kidney

    # spine relative to the back muscles, vessels in front of it
    back = -ay * (1 - fat)
    canal_y, vb_y, vb_r = back + 0.11, back + 0.28, 0.12
    aorta = ((-0.17, vb_y + 0.06), 0.06) if chest else ((-0.07, vb_y + 0.17), 0.055)
    paint(_ellipsoid(grid, (*aorta[0], 0), (aorta[1], aorta[1], np.inf)), "vessel", rng.uniform(170, 220))
    if not chest:
        paint(_ellipsoid(grid, (0.12, vb_y + 0.18, 0), (0.07, 0.05, np.inf)), "vessel", rng.uniform(110, 140))
    for side in (1, -1):
        paint(_ellipsoid(grid, (0.15 * side, back + 0.09, 0), (0.13, 0.1, np.inf)), "soft_tissue", rng.uniform(40, 55))
    cortical = rng.uniform(700, 900)
    discs = (z_mm / 30.0 + rng.uniform()) % 1 < 7.0 / 30.0  # 7 mm discs every 30 mm
    column = _ellipsoid(grid, (0, vb_y, 0), (vb_r, vb_r, np.inf))
    vertebra = column & ~discs
    trabecular = _ellipsoid(grid, (0, vb_y, 0), (vb_r - thick(2.5),) * 2 + (np.inf,))
    arch = _ellipsoid(grid, (0, canal_y, 0), (0.045 + thick(3.0),) * 2 + (np.inf,))
    spinous = (abs(u) < thick(3.0) / 2) & (v > back + 0.01) & (v < canal_y)
    paint(arch | spinous, "bone", cortical)
    paint(_ellipsoid(grid, (0, canal_y, 0), (0.045, 0.045, np.inf)), "soft_tissue", rng.uniform(10, 25))
    paint(vertebra, "bone", cortical)
    paint(vertebra & trabecular, "bone", rng.uniform(180, 250))
    paint(column & discs, "soft_tissue", rng.uniform(80, 100))

    # ribs: arcs in the muscle wall, sloping down anteriorly, absent anteriorly (cartilage) and low in the abdomen
    angle = np.abs(np.arctan2(u / ax, -v / ay)) / np.pi  # 0 posterior, 1 anterior
    ring = (body_r > wall + 0.01) & (body_r < wall + 0.01 + thick(5.0)) & (angle < 0.8)
    ribs = np.zeros(shape, dtype=bool)
    ix, iy, _ = np.nonzero(ring)
    ribs[ix, iy] = (z_mm.ravel() + 120 * angle[ix, iy]) / 30.0 % 1 < max(10.0, spacing[2]) / 30.0
    paint(ribs if chest else ribs & (w > -0.1), "bone", rng.uniform(450, 650))

    # lesion hosts: what is left of each organ after later painting (lung nodules may cover lung vessels)
    hosts = {
        name: mask & (tissue == TISSUES[name])
        for name, mask in (("liver", liver), ("kidney", kidneys), ("pancreas", pancreas), ("bone", vertebra))
    }
    hosts["lung"] = lung & ((tissue == TISSUES["lung"]) | (lung_vessels & (tissue == TISSUES["vessel"])))
    return hu, tissue, hosts


def _lesion_mask(
    rng: np.random.Generator, allowed: np.ndarray, spacing: tuple[float, ...]
) -> tuple[tuple[slice, ...], np.ndarray, tuple[int, ...], float]:
    """Draw one irregular lesion inside ``allowed``: (crop box, mask within the box, centre voxel, nominal radius).

    The shape is a sphere whose radius is modulated by three random low-frequency cosines of the direction
    (lobulation, up to +-36%). Centres are redrawn and the radius shrunk until at least 80% of the shape lies in
    ``allowed``; the mask is then clipped to ``allowed``, so it always contains its centre voxel.
    """
    candidates = np.flatnonzero(allowed)
    radius = rng.uniform(*_RADIUS_MM)
    directions = rng.normal(size=(3, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    amp, freq, phase = rng.uniform(0, 0.12, 3), rng.uniform(2, 5, 3), rng.uniform(0, 2 * np.pi, 3)
    for attempt in range(_PLACEMENT_TRIES):
        centre = tuple(int(c) for c in np.unravel_index(rng.choice(candidates), allowed.shape))
        reach = [int(np.ceil(1.4 * radius / s)) for s in spacing]
        box = tuple(slice(max(c - r, 0), min(c + r + 1, n)) for c, r, n in zip(centre, reach, allowed.shape))
        ranges = [(np.arange(b.start, b.stop) - c) * s for b, c, s in zip(box, centre, spacing)]
        offsets = np.meshgrid(*ranges, indexing="ij")  # mm from the centre
        dist = np.sqrt(sum(o**2 for o in offsets))
        # cosine between each voxel's direction from the centre and each lobulation direction
        cos = sum(o[..., None] * directions[:, i] for i, o in enumerate(offsets)) / np.maximum(dist, 1e-6)[..., None]
        blob = dist <= radius * (1 + (amp * np.cos(freq * cos + phase)).sum(-1))
        if attempt == _PLACEMENT_TRIES - 1 or allowed[box][blob].mean() >= 0.8:
            break
        radius = max(0.9 * radius, 1.0)
    return box, blob & allowed[box], centre, float(radius)


def _add_lesions(
    rng: np.random.Generator,
    hu: np.ndarray,
    tissue: np.ndarray,
    label: np.ndarray,
    hosts: dict[str, np.ndarray],
    spacing: tuple[float, ...],
    region: str,
) -> list[dict]:
    """Paint 1-4 non-overlapping lesions into ``hu``/``tissue``/``label`` in place and describe them."""
    kinds = [k for k in _LESION_WEIGHTS[region] if hosts[LESION_TYPES[k][0]].any()]
    if not kinds:  # only for a field of view that misses every host organ
        return []
    weights = np.array([_LESION_WEIGHTS[region][k] for k in kinds], dtype=float)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    found = []
    for _ in range(rng.integers(1, 5)):
        kind = kinds[rng.choice(len(kinds), p=weights / weights.sum())]
        host, (lo, hi) = LESION_TYPES[kind]
        allowed = hosts[host] & (label == 0)
        if not allowed.any():
            continue
        box, mask, centre, radius = _lesion_mask(rng, allowed, spacing)
        hu[box][mask], tissue[box][mask], label[box][mask] = rng.uniform(lo, hi), TISSUES[host], 1
        found.append(
            {
                "type": kind,
                "centre_mm": [round(c * s, 2) for c, s in zip(centre, spacing)],
                "radius_mm": round(radius, 2),
                "volume_ml": round(int(mask.sum()) * voxel_ml, 4),
            }
        )
    return found


def make_phantom(
    seed: int,
    shape: Sequence[int] = (160, 160, 72),
    spacing: Sequence[float] = (1.6, 1.6, 3.0),
    lesions: bool = True,
    region: str = "abdomen",
) -> Phantom:
    """Make one synthetic CT phantom, fully determined by its arguments.

    Args:
        seed: non-negative integer seeding ``np.random.default_rng``. Lesions use their own stream, so the
            ``lesions=False`` phantom of a seed is the same patient without the lesions (same anatomy and noise).
        shape: voxels along x, y, z (each >= 16); the anatomy scales to the field of view ``shape * spacing``.
        spacing: voxel size in mm along x, y, z.
        lesions: place 1-4 lesions (``Phantom.lesions``) or none (empty label).
        region: ``"abdomen"`` (liver, kidneys, spleen, pancreas, bowel, lung bases) or ``"chest"``
            (large lungs, heart and mediastinum, liver dome).

    Raises:
        ValueError: on an invalid seed, shape, spacing or region.
    """
    _check_int("seed", seed, 0)
    shape, spacing = _check_geometry(shape, spacing)
    if region not in REGIONS:
        raise ValueError(f"region must be one of {REGIONS}, got {region!r}.")
    rng = np.random.default_rng(seed)
    hu, tissue, hosts = _anatomy(rng, shape, spacing, region)
    label = np.zeros(shape, dtype=np.uint8)
    found = _add_lesions(np.random.default_rng([seed, 1]), hu, tissue, label, hosts, spacing, region) if lesions else []
    # parenchymal texture, partial-volume blur, then quantum noise
    hu += rng.uniform(4, 8) * _smooth_noise(rng, shape, spacing, 5.0) * (tissue > 0)
    hu = ndimage.gaussian_filter(hu, sigma=(0.7, 0.7, 0.5))
    hu += rng.uniform(10, 18) * rng.standard_normal(shape, dtype=np.float32)
    image = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    return Phantom(image=image, label=label, affine=np.diag([*spacing, 1.0]), lesions=found, tissue=tissue)


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write ``array`` with its dtype and ``affine`` as both qform and sform (scanner space, mm)."""
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def write_phantom_dataset(
    out_dir: str | Path,
    num_cases: int = 8,
    healthy_fraction: float = 0.25,
    val_fraction: float = 0.25,
    seed: int = 0,
    shape: Sequence[int] = (160, 160, 72),
    spacing: Sequence[float] = (1.6, 1.6, 3.0),
) -> Path:
    """Write a Decathlon-style phantom dataset and return the path of its ``dataset.json``.

    Cases ``phantom_XXX`` alternate abdomen/chest; images go to ``imagesTr`` (int16), lesion masks to
    ``labelsTr`` (uint8). Lesion-free cases have no label file and no ``"label"`` key: an image without a label
    is lesion-free data in this project. Both splits (``"training"``, ``"validation"``; paths relative to
    ``out_dir``) get at least one lesion case and, when ``healthy_fraction > 0`` and ``num_cases >= 4``, at
    least one lesion-free case.

    Raises:
        ValueError: on invalid counts or fractions (and as in ``make_phantom``).
    """
    shape, spacing = _check_geometry(shape, spacing)
    _check_int("seed", seed, 0)
    _check_int("num_cases", num_cases, 2)  # one lesion case per split
    if not 0 <= healthy_fraction < 1:
        raise ValueError(f"healthy_fraction must be in [0, 1), got {healthy_fraction!r}.")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}.")
    rng = np.random.default_rng(seed)
    need_healthy = int(healthy_fraction > 0 and num_cases >= 4)
    per_split = 1 + need_healthy
    n_val = min(max(per_split, round(num_cases * val_fraction)), num_cases - per_split)
    n_healthy = max(2 * need_healthy, round(num_cases * healthy_fraction))
    h_val = max(need_healthy, round(n_healthy * n_val / num_cases))
    plan = []  # (split, healthy) per case
    for split, n, h in (("training", num_cases - n_val, n_healthy - h_val), ("validation", n_val, h_val)):
        healthy = np.zeros(n, dtype=bool)
        healthy[rng.choice(n, min(max(h, need_healthy), n - 1), replace=False)] = True
        plan += [(split, bool(x)) for x in healthy]
    case_seeds = rng.integers(0, 2**31 - 1, size=num_cases)

    out = Path(out_dir)
    for sub in ("imagesTr", "labelsTr"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    datalist: dict[str, list[dict[str, str]]] = {"training": [], "validation": []}
    for i in tqdm(range(num_cases), desc="phantoms", disable=num_cases <= 4):
        split, healthy = plan[i]
        ph = make_phantom(int(case_seeds[i]), shape, spacing, lesions=not healthy, region=REGIONS[i % 2])
        name = f"phantom_{i:03d}.nii.gz"
        entry = {"image": f"imagesTr/{name}"}
        _save_nifti(ph.image, ph.affine, out / entry["image"])
        if healthy:
            (out / "labelsTr" / name).unlink(missing_ok=True)  # stale label from an earlier run
        else:
            entry["label"] = f"labelsTr/{name}"
            _save_nifti(ph.label, ph.affine, out / entry["label"])
        datalist[split].append(entry)

    meta = {
        "name": "GF-Screen phantoms",
        "description": "Synthetic CT phantoms (scripts.phantom); cases without a label are lesion-free.",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "lesion"},
        "numTraining": len(datalist["training"]),
        "numValidation": len(datalist["validation"]),
    }
    path = out / "dataset.json"
    path.write_text(json.dumps({**meta, **datalist}, indent=2) + "\n")
    return path


if __name__ == "__main__":
    fire.Fire({"write": write_phantom_dataset})
