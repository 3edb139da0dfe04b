"""Evaluation engine that also reports what the Glance kept, window by window."""

from __future__ import annotations

from typing import Any

import torch
from monai.engines import SupervisedEvaluator
from monai.utils import CommonKeys as Keys

from .inferer import GlanceFocusInferer
from .metrics import window_slices


class ScreeningEvaluator(SupervisedEvaluator):
    """SupervisedEvaluator with a :class:`GlanceFocusInferer` whose per-scan outputs also carry ``windows``: the
    inferer's window records for reports and, where the batch has a label, ``has_lesion`` per window (a lesion
    voxel inside it) for the glance window metrics (sensitivity, specificity, kept fraction)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.inferer, GlanceFocusInferer):
            raise TypeError(f"ScreeningEvaluator needs a GlanceFocusInferer, got {type(self.inferer).__name__}.")

    def _iteration(self, engine: ScreeningEvaluator, batchdata: dict[str, torch.Tensor]) -> list[dict]:  # type: ignore[override]
        outputs = super()._iteration(engine, batchdata)  # already decollated at MODEL_COMPLETED
        if not isinstance(outputs, list):
            raise ValueError("ScreeningEvaluator attaches window records per scan, so it needs decollate=True.")
        labels = batchdata.get(Keys.LABEL)
        for b, (item, windows) in enumerate(zip(outputs, engine.inferer.last_windows)):
            if labels is not None:
                windows = [
                    {**w, "has_lesion": bool(labels[b][(slice(None), *window_slices(w))].gt(0).any())} for w in windows
                ]
            item["windows"] = windows
        return outputs
