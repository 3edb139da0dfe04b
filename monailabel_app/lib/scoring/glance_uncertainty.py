"""Scoring of unlabelled images by how unsure the Glance is about which windows to skip."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod

from ..infers.gf_screen import GFScreenInfer
from ..params import Param, device_choice

logger = logging.getLogger(__name__)

SCORE_KEY = "glance_uncertainty"


def glance_uncertainty(probs: Sequence[float], threshold: float, top_fraction: float = 0.1) -> float:
    """Mean closeness to the keep threshold of the ``top_fraction`` most uncertain windows, in [0, 1].

    A window's closeness is ``1 - |p - t| / max(t, 1 - t)``: 1 when p(keep) sits on the threshold ``t`` (the
    decision could go either way), 0 at the far end. Averaging only the most uncertain windows keeps a large
    scan's many easy background windows from diluting a few ambiguous ones.
    """
    p = np.asarray(probs, dtype=float)
    if p.size == 0:
        raise ValueError("no Glance windows to score")
    closeness = 1.0 - np.abs(p - threshold) / max(threshold, 1.0 - threshold)
    k = max(1, math.ceil(top_fraction * p.size))
    return float(np.sort(closeness)[-k:].mean())


class GlanceUncertaintyScoring(ScoringMethod):
    """Run the Glance (not the Focus) over each unlabelled image and store its :func:`glance_uncertainty` score,
    the number of windows it would keep and the weights' time stamp in the image's datastore info.

    Images already scored with the current weights are skipped; an image that fails is logged and skipped, so one
    corrupt file cannot stop the job. Requests take only :attr:`params`.
    """

    def __init__(self, task: GFScreenInfer, top_fraction: float = 0.1) -> None:
        super().__init__("Glance uncertainty: how close the Glance's window probabilities sit to its keep threshold")
        self.task, self.top_fraction = task, top_fraction
        self.params: dict[str, Param] = {"device": device_choice()}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        device = request.get("device", "cpu")
        device = device[0] if isinstance(device, list) else device
        weights_ts = int(os.path.getmtime(self.task.get_path()))
        scored, failed = {}, []
        for image_id in datastore.get_unlabeled_images():
            if datastore.get_image_info(image_id).get("glance_weights_ts") == weights_ts:
                continue
            try:
                windows = self.task.glance_windows(datastore.get_image_uri(image_id), device)
                score = glance_uncertainty([w["prob"] for w in windows], self.task.threshold, self.top_fraction)
            except Exception as e:
                logger.warning(f"glance scoring skipped {image_id}: {e}")
                failed.append(image_id)
                continue
            info = {
                SCORE_KEY: score,
                "glance_kept_windows": sum(bool(w["prob"] >= self.task.threshold) for w in windows),
                "glance_windows": len(windows),
                "glance_weights_ts": weights_ts,
                "glance_scored_ts": int(time.time()),
            }
            datastore.update_image_info(image_id, info)
            scored[image_id] = score
        logger.info(f"glance scoring: {len(scored)} scored, {len(failed)} failed")
        return {"scored": scored, "failed": failed}
