"""Per-scan screening report: what was found, where, how sure, what the Glance kept and how long it took,
as JSON for machines and as a one-glance overview PNG for people."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from matplotlib import patheffects
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation
from scipy import ndimage

from .metrics import connected_components
from .postprocess import bounding_box

SOFT_TISSUE_WINDOW = (40.0, 400.0)  # level, width in HU
MIP_WINDOW = (400.0, 1800.0)  # a soft-tissue window saturates a projection to a white silhouette
CONTOUR_COLOUR = "lime"
LABEL_COLOUR = "yellow"
KEPT_COLOUR = "cyan"
HEAT_CMAP = "turbo"
HEAT_ALPHA = 0.35  # one opacity for every p(keep): a colour is one probability, and the CT keeps 65 % of its contrast
HEAT_FLOOR = 0.05  # regions no window scored this high are left untinted


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Spacing in mm of each array axis: the length of the affine's columns."""
    return np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0)


def lesion_components(mask: np.ndarray, prob: np.ndarray, affine: np.ndarray) -> list[dict[str, Any]]:
    """Each 26-connected component of the predicted ``mask``, largest first.

    Per lesion: ``volume_ml``, ``centroid_mm`` (world coordinates of the voxel centroid through ``affine``),
    ``bbox_voxel`` ``[min_x, min_y, min_z, max_x, max_y, max_z]`` (inclusive), ``max_probability`` (of ``prob``
    inside the lesion) and ``voxels``. Only the box around the mask's voxels is labelled and measured, so a scan
    of 34 M voxels with a few findings costs milliseconds.
    """
    mask, affine = np.asarray(mask), np.asarray(affine, float)
    if np.shape(prob) != mask.shape:
        raise ValueError(f"mask and prob must have the same shape, got {mask.shape} and {np.shape(prob)}.")
    box = bounding_box(mask)
    if box is None:
        return []
    labels, count = connected_components(mask[box])
    prob_box = np.asarray(prob[box], float)
    offset = np.array([s.start for s in box])
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    lesions = []
    for number, sub in enumerate(ndimage.find_objects(labels), start=1):
        inside = labels[sub] == number
        start = offset + [s.start for s in sub]
        centre = (np.argwhere(inside).mean(0) + start) @ affine[:3, :3].T + affine[:3, 3]
        voxels = int(np.count_nonzero(inside))
        lesions.append(
            {
                "volume_ml": voxels * voxel_ml,
                "centroid_mm": [float(c) for c in centre],
                "bbox_voxel": [int(v) for v in start] + [int(v) for v in start + inside.shape - 1],
                "max_probability": float(prob_box[sub][inside].max()),
                "voxels": voxels,
            }
        )
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
    mask = np.asarray(mask)
    lesions = lesion_components(mask, prob, affine)
    lesion_voxels, kept = sum(lesion["voxels"] for lesion in lesions), sum(bool(w["kept"]) for w in windows)
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


@dataclass(frozen=True)
class Finding:
    """A reported lesion in world coordinates (mm): its number in the report (1 = largest), its centroid and the
    box its voxels span."""

    number: int
    centre_mm: np.ndarray
    lo_mm: np.ndarray
    hi_mm: np.ndarray


def findings_in_world(lesions: Sequence[Mapping[str, Any]], affine: np.ndarray) -> list[Finding]:
    """The report's ``lesions`` (``bbox_voxel`` on the grid of ``affine``), numbered in report order."""
    affine = np.asarray(affine, float)
    found = []
    for number, lesion in enumerate(lesions, start=1):
        lo, hi = np.asarray(lesion["bbox_voxel"][:3], float) - 0.5, np.asarray(lesion["bbox_voxel"][3:], float) + 0.5
        corners = affine[:3, :3] @ np.array(np.meshgrid(*zip(lo, hi), indexing="ij")).reshape(3, -1) + affine[:3, 3:]
        found.append(Finding(number, np.asarray(lesion["centroid_mm"], float), corners.min(1), corners.max(1)))
    return found


def _to_ras(volume: np.ndarray | None, affine: np.ndarray) -> np.ndarray | None:
    """``volume`` with its axes permuted / flipped to the closest RAS+ order, so views are anatomical."""
    return None if volume is None else apply_orientation(np.asarray(volume), io_orientation(affine))


@dataclass(frozen=True)
class _Placed:
    """A finding on the RAS voxel grid of the picture: number, centre and the index range it spans per axis."""

    number: int
    centre: np.ndarray
    lo: np.ndarray
    hi: np.ndarray


def _place(findings: Sequence[Finding], ras_affine: np.ndarray) -> list[_Placed]:
    to_voxel = np.linalg.inv(ras_affine)
    placed = []
    for f in findings:
        corners = np.array(np.meshgrid(*zip(f.lo_mm, f.hi_mm), indexing="ij")).reshape(3, -1)
        voxels = to_voxel[:3, :3] @ corners + to_voxel[:3, 3:]
        placed.append(_Placed(f.number, to_voxel[:3, :3] @ f.centre_mm + to_voxel[:3, 3], voxels.min(1), voxels.max(1)))
    return placed


def _views(placed: Sequence[_Placed], heat: np.ndarray | None, shape: Sequence[int]) -> list[tuple[int, int, str]]:
    """Three slices (normal axis, index, why): axial through the largest findings (up to three, one per slice),
    then coronal and sagittal through the largest to fill; without findings, the three orthogonal slices through
    the most suspicious Glance region (the highest p(keep)), or the volume centre without a heat map."""
    clip = lambda value, axis: int(np.clip(round(float(value)), 0, shape[axis] - 1))  # noqa: E731
    views: list[tuple[int, int, str]] = []
    for f in placed:
        k = clip(f.centre[2], 2)
        if len(views) < 3 and all(index != k for _, index, _ in views):
            views.append((2, k, f"finding {f.number}"))
    if placed:
        anchor, why = placed[0].centre, f"finding {placed[0].number}"
    elif heat is not None and heat.max() > 0:
        anchor, why = np.argwhere(heat == heat.max()).mean(0), "highest glance p(keep)"
    else:
        anchor, why = (np.asarray(shape) - 1) / 2.0, "volume centre"
    for axis in (2, 1, 0):
        if len(views) < 3 and not (axis == 2 and placed):
            views.append((axis, clip(anchor[axis], axis), why))
    return views


def _show(
    ax: Any,
    ct: np.ndarray,
    mask: np.ndarray,
    heat: np.ndarray | None,
    mm: tuple[float, float],
    window: tuple[float, float] = SOFT_TISSUE_WINDOW,
    fill: bool = False,
    threshold: float | None = None,
) -> Any:
    """Draw one 2D view (arrays indexed [horizontal, vertical]) at physical aspect: CT at ``window`` (level,
    width), the heat map at one opacity where p(keep) >= HEAT_FLOOR, the outline of the windows the Glance
    kept (p(keep) >= ``threshold``), lesion contours (also filled when ``fill``); returns the heat image or None."""
    level, width = window
    extent = (0.0, ct.shape[0] * mm[0], 0.0, ct.shape[1] * mm[1])
    style = {"origin": "lower", "extent": extent}
    ax.imshow(ct.T, cmap="gray", vmin=level - width / 2, vmax=level + width / 2, **style)
    heat_image = None
    if heat is not None:
        shown = np.ma.masked_less(heat.T, HEAT_FLOOR)
        heat_image = ax.imshow(
            shown, cmap=HEAT_CMAP, vmin=0, vmax=1, alpha=HEAT_ALPHA, interpolation="nearest", **style
        )
        if threshold is not None and heat.min() < threshold <= heat.max():
            ax.contour(heat.T, levels=[threshold], colors=KEPT_COLOUR, linewidths=0.8, linestyles="--", **style)
    if fill:
        lesion_cmap = ListedColormap([CONTOUR_COLOUR])
        ax.imshow(np.ma.masked_equal(mask.T, False), cmap=lesion_cmap, alpha=0.35, interpolation="nearest", **style)
    if mask.any() and not mask.all():
        ax.contour(mask.T.astype(np.float32), levels=[0.5], colors=CONTOUR_COLOUR, linewidths=1.2, **style)
    ax.invert_xaxis()  # radiological convention: patient right (or anterior) on the viewer's left
    ax.set_xticks([])
    ax.set_yticks([])
    return heat_image


def _number(
    ax: Any, placed: Sequence[_Placed], axes: tuple[int, int], mm: tuple[float, float], normal: tuple[int, int] | None
) -> None:
    """Each finding's report number beside its centre, on a slice it crosses (``normal`` = axis, index) or on a
    projection (``normal`` None)."""
    outline = [patheffects.withStroke(linewidth=2.5, foreground="black")]
    for f in placed:
        if normal is not None and not f.lo[normal[0]] - 0.5 <= normal[1] <= f.hi[normal[0]] + 0.5:
            continue
        u, v = ((f.centre[a] + 0.5) * m for a, m in zip(axes, mm))
        right = (f.hi[axes[0]] + 1.0) * mm[0]  # just beside the finding (x is inverted: larger u is left)
        ax.text(
            max(u, right),
            v,
            str(f.number),
            color=LABEL_COLOUR,
            fontsize=10,
            fontweight="bold",
            ha="right",
            va="center",
            path_effects=outline,
            clip_on=True,
        )


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
    findings: Sequence[Finding] = (),
    threshold: float | None = None,
) -> Path:
    """Write a 1200x400 px PNG of the model-grid ``image`` (HU): three CT slices (W400/L40) and a coronal MIP.

    Slices (see :func:`_views`): axial through the largest ``findings`` (up to three), then coronal and sagittal
    through the largest; without findings, through the highest Glance p(keep). On each: the Glance heat map
    (``glance_heat``, may be None) at one opacity, so a colour reads as one probability on the colour bar and the
    CT under it keeps most of its contrast; the outline of the windows the Glance kept (p(keep) >= ``threshold``);
    the lesion ``mask`` as contours; each finding crossing the slice labelled with its number in the report. The
    coronal MIP (L400/W1800) shows every finding, filled and numbered: where in the body they are. Views are
    reoriented to RAS, in radiological convention (patient right, or anterior, on the left), at physical aspect;
    panel titles give the slice in world mm and why it was chosen.
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
    placed = _place(findings, ras_affine)
    names, sides = ("sagittal", "coronal", "axial"), (("A", "P"), ("R", "L"), ("R", "L"))

    fig = Figure(figsize=(12, 4), dpi=100)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(1, 5, width_ratios=[1, 1, 1, 1, 0.05], left=0.01, right=0.95, top=0.84, bottom=0.1)
    heat_image = None
    for column, (normal, index, why) in enumerate(_views(placed, heat, ct.shape)):
        ax = fig.add_subplot(grid[0, column])
        axes = tuple(a for a in range(3) if a != normal)
        where = tuple(index if a == normal else slice(None) for a in range(3))
        mm = (float(spacing[axes[0]]), float(spacing[axes[1]]))
        heat_image = _show(ax, ct[where], lesion[where], None if heat is None else heat[where], mm, threshold=threshold)
        _number(ax, placed, axes, mm, (normal, index))
        world = (ras_affine[:3, :3] @ np.where(np.arange(3) == normal, index, 0) + ras_affine[:3, 3])[normal]
        ax.set_title(f"{names[normal]}, {'xyz'[normal]} = {world:.0f} mm: {why}", fontsize=9)
        _label_sides(ax, *sides[normal])
    ax = fig.add_subplot(grid[0, 3])
    mm = (float(spacing[0]), float(spacing[2]))
    _show(ax, ct.max(axis=1), lesion.any(axis=1), None, mm, MIP_WINDOW, True)
    _number(ax, placed, (0, 2), mm, None)
    ax.set_title(f"coronal MIP: {len(placed)} finding(s)" if placed else "coronal MIP: no findings", fontsize=9)
    _label_sides(ax, "R", "L")

    legend = [Line2D([], [], color=CONTOUR_COLOUR, linewidth=2, label="lesion (number as in the report)")]
    colorbar_ax = fig.add_subplot(grid[0, 4])
    if heat_image is not None:
        bar = fig.colorbar(heat_image, cax=colorbar_ax, label="glance p(keep)")
        if threshold is not None:
            bar.ax.axhline(threshold, color="black", linestyle="--", linewidth=1.2)
            legend.append(
                Line2D([], [], color=KEPT_COLOUR, linestyle="--", label=f"kept by the glance (p >= {threshold:g})")
            )
    else:
        colorbar_ax.set_axis_off()
        legend.append(Patch(facecolor="none", edgecolor="gray", label="glance p(keep): not available"))
    fig.legend(handles=legend, loc="lower center", ncol=2, frameon=False, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=12)
    # zlib level 1: a third of the default's time for a few per cent more bytes
    return _atomic_write(
        path, lambda stream: fig.savefig(stream, format="png", dpi=100, pil_kwargs={"compress_level": 1})
    )
