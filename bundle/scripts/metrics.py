"""Screening metrics as the field scores them (FLARE Task 1), plus the Glance's window-level confusion.

Pure functions take numpy arrays (non-zero = lesion) and return floats or dicts; :class:`FlareMetric` and
:class:`GlanceWindowMetric` plug them into MONAI / Ignite engines for bundle configs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine
from ignite.metrics import EpochWise, Metric
from ignite.metrics.metric import MetricUsage, reinit__is_reduced, sync_all_reduce
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.metrics import CumulativeIterationMetric, compute_surface_dice
from monai.utils import convert_to_numpy
from scipy import ndimage

OUTCOMES = ("TP", "FP", "TN", "FN")
FLARE_SCORES = ("dsc", "nsd")
NSD_DSC_FLOOR = 0.2  # FLARE sets NSD to 0 below this DSC: a few boundary voxels near the lesion earn nothing


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Label ``mask`` with full connectivity (26 in 3D), the lesion definition of detection and reports."""
    mask = np.asarray(mask) > 0
    labels, count = ndimage.label(mask, structure=ndimage.generate_binary_structure(mask.ndim, mask.ndim))
    return labels, int(count)


def _binary_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boolean copies of a prediction and a ground truth of the same shape."""
    pred, gt = np.asarray(pred) > 0, np.asarray(gt) > 0
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt must have the same shape, got {pred.shape} and {gt.shape}.")
    return pred, gt


def _spacing(spacing: Sequence[float], ndim: int) -> list[float]:
    """Voxel spacing as a float list (MONAI rejects mixed int/float sequences), one value per axis."""
    spacing = [float(s) for s in spacing]
    if len(spacing) != ndim:
        raise ValueError(f"spacing needs one value per axis ({ndim}), got {spacing}.")
    return spacing


def flare_dsc(pred: np.ndarray, gt: np.ndarray) -> float:
    """Binary lesion Dice of one case under FLARE rules: both empty -> 1.0, exactly one empty -> 0.0."""
    pred, gt = _binary_pair(pred, gt)
    total = int(pred.sum()) + int(gt.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, gt).sum()) / total


def flare_nsd(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], tolerance_mm: float = 2.0, use_subvoxels: bool = True
) -> float:
    """Normalised surface Dice of one case at ``tolerance_mm`` under FLARE rules.

    Both empty -> 1.0, exactly one empty -> 0.0 (MONAI would give NaN and 0 with warnings), and 0.0 when the
    case's DSC < 0.2. ``spacing`` is in mm per array axis, so the tolerance is physical on anisotropic grids.
    ``use_subvoxels=True`` measures surfaces by surfel area as DeepMind's ``surface-distance`` does, which the
    FLARE evaluation script uses (MONAI's result matches it); ``False`` counts boundary voxels instead.
    """
    pred, gt = _binary_pair(pred, gt)
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if not (has_pred or has_gt):
        return 1.0
    if not (has_pred and has_gt) or flare_dsc(pred, gt) < NSD_DSC_FLOOR:
        return 0.0
    nsd = compute_surface_dice(
        torch.from_numpy(pred)[None, None],
        torch.from_numpy(gt)[None, None],
        class_thresholds=[float(tolerance_mm)],
        include_background=True,
        spacing=_spacing(spacing, pred.ndim),
        use_subvoxels=use_subvoxels,
    )
    return float(nsd.item())


def window_slices(w: Mapping[str, Any]) -> tuple[slice, ...]:
    """The voxel slices a window record (``start``, ``size``) covers (clipped at 0; slicing clips the far end)."""
    return tuple(slice(max(s, 0), s + n) for s, n in zip(w["start"], w["size"]))


def lesion_reach(gt: np.ndarray, windows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per ground-truth lesion (26-connected component, in :func:`lesion_detection`'s order): ``reached``, whether
    any of its voxels lies in a window the Glance kept (whether the Focus saw it at all), and ``window_prob``, the
    highest p(keep) of the windows holding any of its voxels (it is reached at every threshold up to that).
    With overlapping windows a lesion cut off at the edge of a discarded window may still be reached through a
    kept neighbour, so this is the screening-relevant counterpart of window sensitivity and an upper bound on
    lesion recall."""
    labels, n = connected_components(np.asarray(gt) > 0)
    reached = np.zeros(n + 1, bool)
    prob = np.zeros(n + 1)
    for w in windows:
        ids = np.unique(labels[window_slices(w)])
        reached[ids] |= bool(w["kept"])
        prob[ids] = np.maximum(prob[ids], float(w["prob"]))
    return [{"reached": bool(r), "window_prob": float(p)} for r, p in zip(reached[1:], prob[1:])]


def lesion_detection(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> dict[str, Any]:
    """Lesion-level detection: a ground-truth component (26-connected) is detected if the prediction touches it.

    Returns ``lesions`` (per GT lesion ``{"volume_ml", "detected", "pred_volume_ml"}``, the last the volume of the
    predicted components touching it: what a reader measures as that lesion), ``tp_lesions``, ``fn_lesions`` and
    ``fp_components`` (predicted components touching no GT lesion).
    """
    pred, gt = _binary_pair(pred, gt)
    voxel_ml = float(np.prod(_spacing(spacing, gt.ndim))) / 1000.0
    gt_labels, n_gt = connected_components(gt)
    pred_labels, n_pred = connected_components(pred)
    voxels = np.bincount(gt_labels.ravel(), minlength=n_gt + 1)[1:]
    pred_voxels = np.bincount(pred_labels.ravel(), minlength=n_pred + 1)
    detected = np.zeros(n_gt + 1, bool)
    detected[gt_labels[pred]] = True
    touching = np.zeros(n_pred + 1, bool)
    touching[pred_labels[gt]] = True
    pairs = np.unique(np.stack([gt_labels[pred & gt], pred_labels[pred & gt]]), axis=1)  # (gt id, pred id) overlaps
    measured = np.zeros(n_gt + 1)
    np.add.at(measured, pairs[0], pred_voxels[pairs[1]])
    lesions = [
        {"volume_ml": float(v) * voxel_ml, "detected": bool(d), "pred_volume_ml": float(m) * voxel_ml}
        for v, d, m in zip(voxels, detected[1:], measured[1:])
    ]
    tp, fp = int(detected[1:].sum()), n_pred - int(touching[1:].sum())
    return {"lesions": lesions, "tp_lesions": tp, "fn_lesions": n_gt - tp, "fp_components": fp}


def recall_by_size(
    per_lesion_records: Iterable[Mapping[str, Any]], bins_ml: Sequence[float] = (0.0, 1.0, 5.0, math.inf)
) -> dict[str, dict[str, Any]]:
    """Lesion recall per volume bin ``[lo, hi)`` in mL, keyed ``"lo-hi"`` (e.g. ``"1-5"``, ``"5-inf"``).

    Each value is ``{"recall", "detected", "total"}``; an empty bin has recall NaN (undefined, not 0 or 1).
    Records outside every bin are left out.
    """
    edges = [float(b) for b in bins_ml]
    if len(edges) < 2 or any(lo >= hi for lo, hi in zip(edges[:-1], edges[1:])):
        raise ValueError(f"bins_ml must be at least two increasing edges, got {bins_ml}.")
    records = list(per_lesion_records)
    result = {}
    for lo, hi in zip(edges[:-1], edges[1:]):
        found = [bool(r["detected"]) for r in records if lo <= r["volume_ml"] < hi]
        recall = sum(found) / len(found) if found else math.nan
        result[f"{lo:g}-{hi:g}"] = {"recall": recall, "detected": sum(found), "total": len(found)}
    return result


def volume_ratio_median(per_lesion_records: Iterable[Mapping[str, Any]]) -> float:
    """Median of predicted / true volume over the detected lesions (1 is exact; NaN when none was detected)."""
    ratios = [r["pred_volume_ml"] / r["volume_ml"] for r in per_lesion_records if r["detected"] and r["volume_ml"] > 0]
    return float(np.median(ratios)) if ratios else math.nan


def scan_detection(pred: np.ndarray, gt: np.ndarray, fp_voxel_threshold: int = 125) -> dict[str, Any]:
    """Scan-level outcome (TP/FP/TN/FN): a scan is called positive when the prediction has more than
    ``fp_voxel_threshold`` voxels, as in the authors' code; it has a lesion when ``gt`` is non-empty."""
    pred, gt = _binary_pair(pred, gt)
    has_lesion, pred_voxels = bool(gt.any()), int(pred.sum())
    positive = pred_voxels > fp_voxel_threshold
    outcome = ("TP" if positive else "FN") if has_lesion else ("FP" if positive else "TN")
    return {"has_lesion": has_lesion, "predicted_positive": positive, "pred_voxels": pred_voxels, "outcome": outcome}


def _ratio(numerator: float, denominator: float, undefined: float) -> float:
    """``numerator / denominator``, or ``undefined`` when the denominator is 0."""
    return numerator / denominator if denominator else undefined


def scan_f1(outcomes: Iterable[str], zero_division: float = 0.0) -> dict[str, Any]:
    """Scan-level precision, recall, F1 and false-positive rate on lesion-free scans (FP / (FP + TN)).

    A ratio with a zero denominator (no positive calls, no lesion scans, no lesion-free scans, or only TNs for
    F1) is ``zero_division`` (default 0.0, as scikit-learn does) rather than NaN, so it never poisons a mean;
    the counts ``tp``, ``fp``, ``tn``, ``fn`` come back too, to tell such a 0 from a measured one.
    F1 is 2TP / (2TP + FP + FN), the harmonic mean of precision and recall wherever that is defined.
    """
    counts = dict.fromkeys(OUTCOMES, 0)
    for outcome in outcomes:
        key = str(outcome).upper()
        if key not in counts:
            raise ValueError(f"outcomes must be one of {OUTCOMES}, got {outcome!r}.")
        counts[key] += 1
    tp, fp, tn, fn = (counts[k] for k in OUTCOMES)
    return {
        "precision": _ratio(tp, tp + fp, zero_division),
        "recall": _ratio(tp, tp + fn, zero_division),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn, zero_division),
        "fpr": _ratio(fp, fp + tn, zero_division),
        **{k.lower(): v for k, v in counts.items()},
    }


def _window_rates(kept_lesion: int, discarded_free: int, lesion: int, free: int, kept: int) -> dict[str, float]:
    """Glance sensitivity, specificity and kept fraction from window counts; an empty class gives NaN."""
    return {
        "sensitivity": _ratio(kept_lesion, lesion, math.nan),
        "specificity": _ratio(discarded_free, free, math.nan),
        "kept_fraction": _ratio(kept, lesion + free, math.nan),
    }


def window_confusion(kept: Sequence[bool], has_lesion: Sequence[bool]) -> dict[str, float]:
    """Glance window confusion: sensitivity = kept lesion windows / lesion windows, specificity = discarded
    lesion-free windows / lesion-free windows, kept_fraction = kept / all windows.

    A ratio over an empty class (no lesion windows, no lesion-free windows, no windows) is NaN: undefined,
    so it cannot pass for a perfect or a failed Glance. Window counts are returned alongside.
    """
    kept_arr, lesion_arr = np.asarray(kept, bool).ravel(), np.asarray(has_lesion, bool).ravel()
    if kept_arr.shape != lesion_arr.shape:
        raise ValueError(f"kept and has_lesion need one entry per window, got {kept_arr.size} and {lesion_arr.size}.")
    counts = {
        "kept_lesion": int((kept_arr & lesion_arr).sum()),
        "discarded_free": int((~kept_arr & ~lesion_arr).sum()),
        "lesion": int(lesion_arr.sum()),
        "free": int((~lesion_arr).sum()),
        "kept": int(kept_arr.sum()),
    }
    return {
        **_window_rates(**counts),
        "lesion_windows": counts["lesion"],
        "lesion_free_windows": counts["free"],
        "kept_windows": counts["kept"],
    }


def _case_spacings(y_pred: torch.Tensor, default: Sequence[float]) -> list[list[float]]:
    """Per-case spacing of a batch: from a MetaTensor's affine (batched or not), else ``default`` for all."""
    batch, spatial = y_pred.shape[0], y_pred.ndim - 2
    if not isinstance(y_pred, MetaTensor):
        return [_spacing(default, spatial)] * batch
    affine = y_pred.affine
    affines = list(affine) if affine.ndim == 3 else [affine] * batch
    return [_spacing(affine_to_spacing(a, r=spatial).tolist(), spatial) for a in affines]


def _foreground(y: torch.Tensor) -> np.ndarray:
    """Lesion masks (B, *spatial) from binary (B,1,...) or one-hot (B,C,...) with channel 0 = background."""
    arr = convert_to_numpy(y.detach())
    if arr.ndim < 3:
        raise ValueError(f"expected a batch-first, channel-first tensor (B,C,...), got shape {tuple(arr.shape)}.")
    return arr[:, 0] > 0.5 if arr.shape[1] == 1 else (arr[:, 1:] > 0.5).any(axis=1)


class FlareMetric(CumulativeIterationMetric):
    """Per-case FLARE Task 1 lesion DSC and NSD, accumulated over iterations.

    Inputs are (B,1,...) binary or (B,C,...) one-hot masks (any non-background channel is lesion). The spacing
    comes from ``y_pred``'s MetaTensor affine when it is a MetaTensor, else from ``spacing``. The buffer holds
    one ``[dsc, nsd]`` row per case; :meth:`aggregate` gives mean DSC so that
    ``monai.handlers.IgniteMetricHandler`` can log it (e.g. as key metric ``val_lesion_dice``), and
    ``aggregate("nsd")`` (or the handler's ``save_details`` buffer) gives NSD.
    """

    def __init__(
        self, spacing: Sequence[float] = (1.0, 1.0, 1.0), tolerance_mm: float = 2.0, use_subvoxels: bool = True
    ) -> None:
        super().__init__()
        self.spacing, self.tolerance_mm, self.use_subvoxels = tuple(spacing), tolerance_mm, use_subvoxels

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of one batch as a (B, 2) tensor of ``[dsc, nsd]`` rows."""
        if y is None:
            raise ValueError("FlareMetric needs the ground truth y.")
        preds, gts = _foreground(y_pred), _foreground(y)
        if preds.shape != gts.shape:
            raise ValueError(f"y_pred and y must have the same spatial shape, got {preds.shape} and {gts.shape}.")
        rows = [
            [flare_dsc(p, g), flare_nsd(p, g, s, self.tolerance_mm, self.use_subvoxels)]
            for p, g, s in zip(preds, gts, _case_spacings(y_pred, self.spacing))
        ]
        return torch.tensor(rows, dtype=torch.float32)

    def aggregate(self, score: str = "dsc") -> torch.Tensor:
        """Mean of ``score`` ("dsc" or "nsd") over all cases seen since the last reset."""
        if score not in FLARE_SCORES:
            raise ValueError(f"score must be one of {FLARE_SCORES}, got {score!r}.")
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor) or data.numel() == 0:
            raise ValueError("FlareMetric has no cases to aggregate.")
        return data[:, FLARE_SCORES.index(score)].mean()


def _sample_windows(sample: Mapping[str, Any]) -> Iterator[tuple[bool, bool]]:
    """``(kept, has_lesion)`` per window record in one output item's ``"windows"`` list."""
    if "windows" not in sample:
        raise KeyError(f"output item has no 'windows' list of window records; keys: {list(sample)}.")
    return ((bool(w["kept"]), bool(w["has_lesion"])) for w in sample["windows"])


class GlanceWindowMetric(Metric):
    """Epoch-level Glance window sensitivity, specificity and kept fraction (see :func:`window_confusion`).

    Reads ``engine.state.output``: one dict or a list of per-scan dicts (MONAI's decollated output), each with
    ``"windows"``, a list of ``{"kept": bool, "has_lesion": bool, ...}``. On completion it writes three entries
    to ``engine.state.metrics``: ``{prefix}glance_sensitivity``, ``{prefix}glance_specificity`` and
    ``{prefix}kept_fraction`` (NaN for an empty class). Attach it as a handler (``attach(engine)``), or through
    ``additional_metrics`` of a MONAI evaluator; the name given there is not stored itself.
    """

    _counts = ("_kept_lesion", "_discarded_free", "_lesion", "_free", "_kept")

    def __init__(
        self,
        prefix: str = "val_",
        output_transform: Callable[[Any], Any] = lambda x: x,
        device: str | torch.device = "cpu",
    ) -> None:
        self.prefix = prefix
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        """Zero the window counts at the start of an epoch."""
        for name in self._counts:
            setattr(self, name, 0)

    @reinit__is_reduced
    def update(self, output: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> None:
        """Count the windows of one iteration's output."""
        for sample in [output] if isinstance(output, Mapping) else output:
            for kept, lesion in _sample_windows(sample):
                self._kept_lesion += kept and lesion
                self._discarded_free += not (kept or lesion)
                self._lesion += lesion
                self._free += not lesion
                self._kept += kept

    @sync_all_reduce("_kept_lesion", "_discarded_free", "_lesion", "_free", "_kept")
    def compute(self) -> dict[str, float]:
        """The three rates, keyed by their metric names."""
        rates = _window_rates(self._kept_lesion, self._discarded_free, self._lesion, self._free, self._kept)
        return {
            f"{self.prefix}glance_sensitivity": rates["sensitivity"],
            f"{self.prefix}glance_specificity": rates["specificity"],
            f"{self.prefix}kept_fraction": rates["kept_fraction"],
        }

    def iteration_completed(self, engine: Engine) -> None:
        """Pass the output through whole: ignite's default would unpack a mapping into ``(y_pred, y)``."""
        self.update(self._output_transform(engine.state.output))

    def completed(self, engine: Engine, name: str) -> None:
        """Store the three rates as separate scalar metrics (no dict entry that loggers would choke on)."""
        engine.state.metrics.update({k: float(v) for k, v in self.compute().items()})

    def attach(self, engine: Engine, name: str | None = None, usage: str | MetricUsage = EpochWise()) -> None:
        """Attach to ``engine``; ``name`` is optional so that MONAI workflows can attach it as a handler."""
        super().attach(engine, name or f"{self.prefix}glance", usage)


def evaluate_case(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float],
    windows: Sequence[Mapping[str, Any]] = (),
    fp_voxel_threshold: int = 125,
) -> dict[str, Any]:
    """Every screening score of one scan: FLARE DSC/NSD, lesion detection, scan outcome and glance windows."""
    detection = lesion_detection(pred, gt, spacing)
    record = {
        "dsc": flare_dsc(pred, gt),
        "nsd": flare_nsd(pred, gt, spacing),
        **detection,
        **scan_detection(pred, gt, fp_voxel_threshold),
    }
    if windows:
        for lesion, reach in zip(record["lesions"], lesion_reach(gt, windows)):
            lesion.update(reach)
        record["windows"] = window_confusion([w["kept"] for w in windows], [w["has_lesion"] for w in windows])
        record["window_scores"] = [[float(w["prob"]), bool(w["has_lesion"])] for w in windows]
    return record


def glance_operating_point(scores: Sequence[Sequence[Any]], specificity: float = 0.6) -> dict[str, float]:
    """The Glance as a window classifier, independent of its threshold: ROC AUC of p(keep) for lesion windows, and
    the lesion-window sensitivity at the lowest threshold that discards at least ``specificity`` of the lesion-free
    windows (the operating point of the project's target). NaN where a class is missing."""
    probs = np.asarray([s[0] for s in scores], float)
    lesion = np.asarray([s[1] for s in scores], bool)
    if lesion.all() or not lesion.any():
        return {"auc": math.nan, "threshold": math.nan, "sensitivity": math.nan}
    # rank-based AUC (Mann-Whitney U), ties counted half
    order = probs.argsort(kind="mergesort")
    ranks = np.empty(len(probs))
    ranks[order] = np.arange(1, len(probs) + 1)
    for value in np.unique(probs):
        tied = probs == value
        ranks[tied] = ranks[tied].mean()
    n_pos, n_neg = lesion.sum(), (~lesion).sum()
    auc = (ranks[lesion].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    threshold = float(np.quantile(probs[~lesion], specificity, method="higher"))
    discards = probs < threshold
    if discards[~lesion].mean() < specificity:  # ties at the quantile: move just above it
        threshold = float(np.nextafter(threshold, np.inf))
    return {"auc": float(auc), "threshold": threshold, "sensitivity": float((probs[lesion] >= threshold).mean())}


def screening_threshold(scores: Sequence[Sequence[Any]], sensitivity: float = 0.95) -> dict[str, float]:
    """The highest glance threshold that keeps at least ``sensitivity`` of the lesion windows, with the fraction of
    lesion-free windows it discards and of all windows it keeps: the sensitivity-first candidate when a threshold
    is chosen on a validation split (a screening tool must not miss lesions). ``scores``: ``[p, has_lesion]``
    pairs. NaN where there is no lesion window."""
    probs = np.asarray([s[0] for s in scores], float)
    lesion = np.asarray([s[1] for s in scores], bool)
    if not lesion.any():
        return {"threshold": math.nan, "sensitivity": math.nan, "specificity": math.nan, "kept_fraction": math.nan}
    need = math.ceil(sensitivity * lesion.sum() - 1e-9)
    threshold = float(np.sort(probs[lesion])[::-1][max(need, 1) - 1])
    kept = probs >= threshold
    return {
        "threshold": threshold,
        "sensitivity": float(kept[lesion].mean()),
        "specificity": float((~kept[~lesion]).mean()) if (~lesion).any() else math.nan,
        "kept_fraction": float(kept.mean()),
    }


def summarise_cases(
    cases: Sequence[Mapping[str, Any]], bins_ml: Sequence[float] = (0.0, 1.0, 5.0, math.inf)
) -> dict[str, Any]:
    """Dataset-level screening scores from :func:`evaluate_case` records: mean DSC/NSD, lesion recall by size,
    scan-level F1 and false-positive rate on lesion-free scans, pooled glance window rates, and the lesions the
    Glance let through to the Focus (by size at the run's threshold; overall at 60 % of lesion-free windows
    discarded, ``glance_roc["lesion_reach"]``)."""
    lesions = [lesion for c in cases for lesion in c["lesions"]]
    windows = [c["windows"] for c in cases if "windows" in c]
    scores = [s for c in cases for s in c.get("window_scores", [])]
    pooled: dict[str, Any] = {}
    if windows:
        roc = glance_operating_point(scores)
        reach_probs = [r["window_prob"] for r in lesions if "window_prob" in r]
        # lesions reached at the operating point of the target: the share that windows discarding 60 % let through
        defined = reach_probs and not math.isnan(roc["threshold"])
        roc["lesion_reach"] = float(np.mean(np.asarray(reach_probs) >= roc["threshold"])) if defined else math.nan
        n_les = sum(w["lesion_windows"] for w in windows)
        n_free = sum(w["lesion_free_windows"] for w in windows)
        kept_les = sum(w["sensitivity"] * w["lesion_windows"] for w in windows if w["lesion_windows"])
        disc_free = sum(w["specificity"] * w["lesion_free_windows"] for w in windows if w["lesion_free_windows"])
        pooled = {
            "glance_sensitivity": kept_les / n_les if n_les else math.nan,
            "glance_specificity": disc_free / n_free if n_free else math.nan,
            "kept_fraction": sum(w["kept_windows"] for w in windows) / max(n_les + n_free, 1),
            "glance_roc": roc,
            "glance_threshold_at_95_sensitivity": screening_threshold(scores, 0.95),
            "glance_lesion_reach_by_size_ml": recall_by_size(
                ({"volume_ml": r["volume_ml"], "detected": r["reached"]} for r in lesions if "reached" in r), bins_ml
            ),
        }
    return {
        "cases": len(cases),
        "dsc": float(np.mean([c["dsc"] for c in cases])) if cases else math.nan,
        "nsd": float(np.mean([c["nsd"] for c in cases])) if cases else math.nan,
        "lesion_recall_by_size_ml": recall_by_size(lesions, bins_ml),
        "fp_components": sum(c["fp_components"] for c in cases),
        "fp_components_per_scan": sum(c["fp_components"] for c in cases) / len(cases) if cases else math.nan,
        "volume_ratio_median": volume_ratio_median(lesions),
        "scan": scan_f1(c["outcome"] for c in cases),
        **pooled,
    }
