"""Per-scan screening report: what was found, where, how sure, what the Glance kept and how long it took,
as JSON for machines and as a one-glance overview PNG for people."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation
from scipy import ndimage

from .metrics import connected_components

SOFT_TISSUE_WINDOW = (40.0, 400.0)  # level, width in HU
MIP_WINDOW = (400.0, 1800.0)  # a soft-tissue window saturates a projection to a white silhouette
CONTOUR_COLOUR = "lime"
HEAT_CMAP = "autumn"
HEAT_MAX_ALPHA = 0.5  # opacity at p(keep) = 1, fading to clear at 0 so that discarded regions keep their CT


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Spacing in mm of each array axis: the length of the affine's columns."""
    return np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0)


def lesion_components(mask: np.ndarray, prob: np.ndarray, affine: np.ndarray) -> list[dict[str, Any]]:
    """Each 26-connected component of the predicted ``mask``, largest first.

    Per lesion: ``volume_ml``, ``centroid_mm`` (world coordinates of the voxel centroid through ``affine``),
    ``bbox_voxel`` ``[min_x, min_y, min_z, max_x, max_y, max_z]`` (inclusive), ``max_probability`` (of ``prob``
    inside the lesion) and ``voxels``.
    """
    mask = np.asarray(mask) > 0
    prob, affine = np.asarray(prob, float), np.asarray(affine, float)
    if prob.shape != mask.shape:
        raise ValueError(f"mask and prob must have the same shape, got {mask.shape} and {prob.shape}.")
    labels, count = connected_components(mask)
    if count == 0:
        return []
    index = np.arange(1, count + 1)
    voxels = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    centroids = np.asarray(ndimage.center_of_mass(mask, labels, index), float).reshape(count, mask.ndim)
    centroids_mm = centroids @ affine[:3, :3].T + affine[:3, 3]
    max_prob = np.asarray(ndimage.maximum(prob, labels, index), float).reshape(count)
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    lesions = [
        {
            "volume_ml": float(n) * voxel_ml,
            "centroid_mm": [float(c) for c in centre],
            "bbox_voxel": [s.start for s in box] + [s.stop - 1 for s in box],
            "max_probability": float(p),
            "voxels": int(n),
        }
        for n, centre, box, p in zip(voxels, centroids_mm, ndimage.find_objects(labels), max_prob)
    ]
    return sorted(lesions, key=lambda lesion: lesion["voxels"], reverse=True)


def build_report(
    case_id: str,
    mask: np.ndarray,
    prob: np.ndarray,
    affine: np.ndarray,
    windows: Sequence[Mapping[str, Any]],
    timings: Mapping[str, float],
    threshold: float,
    fp_voxel_threshold: int = 125,
) -> dict[str, Any]:
    """JSON-serialisable report of one screened scan.

    ``verdict`` is "suspicious" when the predicted lesion voxels exceed ``fp_voxel_threshold`` (the scan-level
    rule of :func:`scripts.metrics.scan_detection`), else "no lesion found"; ``score`` is the highest lesion
    probability (0 without lesions). ``windows`` are the Glance records (``prob``, ``kept``, ``start``, ``size``)
    summarised with ``threshold``, the Glance keep threshold; ``kept_fraction`` is null without windows.
    """
    mask = np.asarray(mask) > 0
    lesions = lesion_components(mask, prob, affine)
    lesion_voxels, kept = int(mask.sum()), sum(bool(w["kept"]) for w in windows)
    return {
        "case": str(case_id),
        "verdict": "suspicious" if lesion_voxels > fp_voxel_threshold else "no lesion found",
        "score": max((lesion["max_probability"] for lesion in lesions), default=0.0),
        "lesion_voxels": lesion_voxels,
        "fp_voxel_threshold": int(fp_voxel_threshold),
        "lesions": lesions,
        "windows": {
            "total": len(windows),
            "kept": kept,
            "kept_fraction": kept / len(windows) if windows else None,
            "glance_threshold": float(threshold),
        },
        "timings_s": {name: float(seconds) for name, seconds in timings.items()},
        "input_geometry": {"shape": [int(n) for n in mask.shape], "spacing": voxel_spacing(affine).tolist()},
    }


def _atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` through a temporary file in the same folder and ``os.replace``, so that readers never
    see a half-written file; creates the folder if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as stream:
            write(stream)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a report is meant to be read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _json_safe(value: Any) -> Any:
    """Undefined ratios (NaN) become JSON null, so the file stays strict JSON that any reader accepts."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def save_report(report: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``report`` as indented, strict JSON (NaN written as null), atomically."""
    text = json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n"
    return _atomic_write(path, lambda stream: stream.write(text.encode("utf-8")))


def glance_heatmap(shape: Sequence[int], windows: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Per-voxel maximum Glance p(keep) over the windows covering it (0 where none does), float32.

    ``start`` is a window's first voxel (clipped at 0), ``size`` its extent per axis (or one int for all).
    """
    heat = np.zeros(tuple(shape), np.float32)
    for window in windows:
        size = np.broadcast_to(window["size"], (heat.ndim,))
        region = tuple(slice(max(int(s), 0), max(int(s) + int(n), 0)) for s, n in zip(window["start"], size))
        view = heat[region]
        np.maximum(view, float(window["prob"]), out=view)
    return heat


def _to_ras(volume: np.ndarray | None, affine: np.ndarray) -> np.ndarray | None:
    """``volume`` with its axes permuted / flipped to the closest RAS+ order, so views are anatomical."""
    return None if volume is None else apply_orientation(np.asarray(volume), io_orientation(affine))


def _focus_voxel(mask: np.ndarray) -> tuple[int, ...]:
    """Rounded centroid of the largest lesion, or the volume centre when there is none."""
    labels, count = connected_components(mask)
    if count == 0:
        return tuple(n // 2 for n in mask.shape)
    largest = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
    return tuple(int(round(c)) for c in ndimage.center_of_mass(labels == largest))


def _show(
    ax: Any,
    ct: np.ndarray,
    mask: np.ndarray,
    heat: np.ndarray | None,
    mm: tuple[float, float],
    window: tuple[float, float] = SOFT_TISSUE_WINDOW,
    fill: bool = False,
) -> Any:
    """Draw one 2D view (arrays indexed [horizontal, vertical]) at physical aspect: CT at ``window`` (level,
    width), the heat map, lesion contours (also filled when ``fill``); returns the heat image or None."""
    level, width = window
    extent = (0.0, ct.shape[0] * mm[0], 0.0, ct.shape[1] * mm[1])
    style = {"origin": "lower", "extent": extent}
    ax.imshow(ct.T, cmap="gray", vmin=level - width / 2, vmax=level + width / 2, **style)
    heat_image = None
    if heat is not None:
        alpha = HEAT_MAX_ALPHA * np.clip(heat.T, 0.0, 1.0)
        heat_image = ax.imshow(heat.T, cmap=HEAT_CMAP, vmin=0, vmax=1, alpha=alpha, interpolation="nearest", **style)
    if fill:
        lesion_cmap = ListedColormap([CONTOUR_COLOUR])
        ax.imshow(np.ma.masked_equal(mask.T, False), cmap=lesion_cmap, alpha=0.35, interpolation="nearest", **style)
    if mask.any() and not mask.all():
        ax.contour(mask.T.astype(np.float32), levels=[0.5], colors=CONTOUR_COLOUR, linewidths=1.2, **style)
    ax.invert_xaxis()  # radiological convention: patient right (or anterior) on the viewer's left
    ax.set_xticks([])
    ax.set_yticks([])
    return heat_image


def _label_sides(ax: Any, left: str, right: str) -> None:
    """Orientation letters at the left and right edges of a view."""
    for x, letter, align in ((0.02, left, "left"), (0.98, right, "right")):
        ax.text(x, 0.5, letter, transform=ax.transAxes, color="yellow", ha=align, va="center", fontsize=9)


def render_overview(
    image: np.ndarray,
    mask: np.ndarray,
    glance_heat: np.ndarray | None,
    affine: np.ndarray,
    path: str | os.PathLike,
    title: str = "",
) -> Path:
    """Write a 1200x400 px PNG: axial, coronal and sagittal CT slices (HU, W400/L40) through the largest
    lesion's centroid (the volume centre without lesions), with the Glance heat map (may be None) as a
    translucent overlay and colorbar and the predicted lesions as contours, plus an axial MIP of the lesion mask
    over the CT MIP (at L400/W1800). Views are reoriented to RAS and shown in radiological convention (patient
    right, or anterior, on the left) at their physical aspect ratio; panel titles give the slice in world mm.
    """
    image = np.asarray(image, np.float32)
    if image.ndim != 3 or np.shape(mask) != image.shape:
        raise ValueError(f"image and mask must be 3D and of the same shape, got {image.shape} and {np.shape(mask)}.")
    if glance_heat is not None and np.shape(glance_heat) != image.shape:
        raise ValueError(f"glance_heat must have the image shape {image.shape}, got {np.shape(glance_heat)}.")
    affine = np.asarray(affine, float)
    ct, lesion, heat = _to_ras(image, affine), _to_ras(np.asarray(mask) > 0, affine), _to_ras(glance_heat, affine)
    ras_affine = affine @ inv_ornt_aff(io_orientation(affine), image.shape)  # RAS voxel -> world mm
    spacing = voxel_spacing(ras_affine)
    i, j, k = _focus_voxel(lesion)
    x, y, z = (ras_affine @ [i, j, k, 1.0])[:3]
    views = (
        (f"axial, z = {z:.0f} mm", (slice(None), slice(None), k), (0, 1), ("R", "L")),
        (f"coronal, y = {y:.0f} mm", (slice(None), j, slice(None)), (0, 2), ("R", "L")),
        (f"sagittal, x = {x:.0f} mm", (i, slice(None), slice(None)), (1, 2), ("A", "P")),
    )

    fig = Figure(figsize=(12, 4), dpi=100)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(1, 5, width_ratios=[1, 1, 1, 1, 0.05], left=0.01, right=0.95, top=0.84, bottom=0.1)
    heat_image = None
    for column, (name, where, axes, sides) in enumerate(views):
        ax = fig.add_subplot(grid[0, column])
        mm = (float(spacing[axes[0]]), float(spacing[axes[1]]))
        heat_image = _show(ax, ct[where], lesion[where], None if heat is None else heat[where], mm)
        ax.set_title(name, fontsize=10)
        _label_sides(ax, *sides)
    ax = fig.add_subplot(grid[0, 3])
    _show(ax, ct.max(axis=2), lesion.any(axis=2), None, (float(spacing[0]), float(spacing[1])), MIP_WINDOW, True)
    ax.set_title("axial MIP: lesions over CT", fontsize=10)
    _label_sides(ax, "R", "L")

    legend = [Line2D([], [], color=CONTOUR_COLOUR, linewidth=2, label="lesion contour")]
    colorbar_ax = fig.add_subplot(grid[0, 4])
    if heat_image is not None:
        fig.colorbar(heat_image, cax=colorbar_ax, label="glance p(keep)")
        legend.append(Patch(facecolor=heat_image.cmap(0.75), label="glance p(keep)"))
    else:
        colorbar_ax.set_axis_off()
        legend.append(Patch(facecolor="none", edgecolor="gray", label="glance p(keep): not available"))
    fig.legend(handles=legend, loc="lower center", ncol=2, frameon=False, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=12)
    return _atomic_write(path, lambda stream: fig.savefig(stream, format="png", dpi=100))
