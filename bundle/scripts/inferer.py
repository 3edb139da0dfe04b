"""Glance-then-Focus sliding-window inference."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.inferers import Inferer
from monai.utils import BlendMode, convert_to_dst_type, ensure_tuple_rep
from torch import nn
from tqdm import tqdm

from .networks import KEEP, unwrap, window_logits


class GlanceFocusInferer(Inferer):
    """MONAI's sliding-window grid and blending, where only the windows the Glance keeps reach the Focus.

    MONAI's ``sliding_window_inference`` has no way to skip a window: it gathers, predicts and blends every one,
    so a skipped window still costs its share of the stitching. Here the grid (``dense_patch_slices``) and the
    blending weights (``compute_importance_map``) are MONAI's, the blending normaliser counts every window, and
    only kept windows are gathered, segmented and added. Skipped windows contribute zero probability, so the
    argmax equals stitching over the kept windows only, voxels seen by no kept window are background, and with
    ``threshold=0`` the output equals MONAI's sliding-window inference of the softmaxed Focus.

    The Glance scores every window: read from one whole-volume logit map when the glance has ``logit_map``
    (:class:`scripts.networks.GlanceNet`), else per batch of ``sw_batch_size`` windows. The network is a
    :class:`scripts.networks.GlanceFocusNet` (``.glance`` and ``.focus``). After each call, ``last_windows`` holds
    per batch item a list of ``{"start", "size", "prob", "kept"}`` records (window corner in input voxels) and
    ``last_timings`` the seconds spent in the glance and the focus (segmentation and blending).
    """

    def __init__(
        self,
        roi_size: Sequence[int],
        sw_batch_size: int = 4,
        overlap: float = 0.5,
        threshold: float = 0.5,
        mode: BlendMode | str = BlendMode.GAUSSIAN,
        out_channels: int = 2,
        progress: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold is a probability in [0, 1], got {threshold}.")
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}.")
        self.roi_size = tuple(roi_size)
        self.sw_batch_size, self.overlap, self.threshold = sw_batch_size, overlap, threshold
        self.mode, self.out_channels, self.progress = mode, out_channels, progress
        self.last_windows: list[list[dict]] = []
        self.last_timings: dict[str, float] = {}

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        net = unwrap(network)
        spatial = inputs.shape[2:]
        roi = ensure_tuple_rep(self.roi_size, len(spatial))
        # like MONAI: an image smaller than the window is padded symmetrically with zeros
        lo = [max(r - n, 0) // 2 for r, n in zip(roi, spatial)]
        hi = [max(r - n, 0) - p for r, n, p in zip(roi, spatial, lo)]
        # a plain tensor, as MONAI's sliding_window_inference uses: every op on a MetaTensor pays for metadata
        # tracking (measured on ircadb1_1: 1.96 s of a 2.26 s oracle screening went to MetaTensor dispatch)
        x = inputs.as_tensor() if isinstance(inputs, MetaTensor) else torch.as_tensor(inputs)
        if any(lo + hi):
            x = F.pad(x, [v for pair in zip(reversed(lo), reversed(hi)) for v in pair])
        size = x.shape[2:]
        interval = [r if r == n else max(int(r * (1 - self.overlap)), 1) for r, n in zip(roi, size)]
        grid = dense_patch_slices(size, roi, interval)
        weight = compute_importance_map(roi, mode=self.mode, device=x.device, dtype=torch.float32)
        timings = {"glance": 0.0, "focus": 0.0}

        with torch.no_grad():
            t0 = _now(x)
            probs = self._glance(net.glance, x, grid, roi)
            timings["glance"] = _now(x) - t0
            kept = [(b, w) for b in range(x.shape[0]) for w in range(len(grid)) if probs[b, w] >= self.threshold]
            out = torch.zeros((x.shape[0], self.out_channels, *size), device=x.device)
            norm = torch.zeros((1, 1, *size), device=x.device)
            for window in grid:
                norm[(..., *window)] += weight
            batches = range(0, len(kept), self.sw_batch_size)
            for i in tqdm(batches, desc="focus", unit="batch") if self.progress else batches:
                chunk = kept[i : i + self.sw_batch_size]
                seg = net.focus(torch.cat([x[(slice(b, b + 1), slice(None), *grid[w])] for b, w in chunk])).float()
                for (b, w), p in zip(chunk, seg.softmax(1)):
                    out[(b, slice(None), *grid[w])] += p * weight
            out = (out / norm)[(..., *(slice(p, p + n) for p, n in zip(lo, spatial)))]
            timings["focus"] = _now(x) - t0 - timings["glance"]

        starts = [[s.start - p for s, p in zip(window, lo)] for window in grid]
        self.last_windows = [
            [
                {"start": list(st), "size": list(roi), "prob": p, "kept": p >= self.threshold}
                for st, p in zip(starts, item)
            ]
            for item in probs.tolist()
        ]
        self.last_timings = timings
        return convert_to_dst_type(out, inputs)[0] if isinstance(inputs, MetaTensor) else out

    def _glance(self, glance: nn.Module, x: torch.Tensor, grid: list, roi: Sequence[int]) -> torch.Tensor:
        """p(keep) of every window of every volume in ``x``: (B, windows)."""
        if hasattr(glance, "logit_map"):  # shared features: one pass over the volumes
            starts = [[s.start for s in w] for w in grid]
            logits = torch.stack(
                [window_logits(m, starts, roi, glance.scale, glance.window_pool) for m in glance.logit_map(x)]
            )
        else:
            windows = [(b, w) for b in range(x.shape[0]) for w in grid]
            logits = torch.cat(
                [
                    glance(
                        torch.cat(
                            [x[(slice(b, b + 1), slice(None), *w)] for b, w in windows[i : i + self.sw_batch_size]]
                        )
                    )
                    for i in range(0, len(windows), self.sw_batch_size)
                ]
            ).view(x.shape[0], len(grid), -1)
        return logits.float().softmax(-1)[..., KEEP]


def _now(t: torch.Tensor) -> float:
    """Wall time after the device's queued work on ``t`` is done (CUDA runs asynchronously)."""
    if t.is_cuda:
        torch.cuda.synchronize(t.device)
    return time.perf_counter()
