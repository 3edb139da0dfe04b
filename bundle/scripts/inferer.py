"""Glance-then-Focus sliding-window inference."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from monai.inferers import Inferer, sliding_window_inference
from monai.utils import BlendMode, ensure_tuple_rep
from torch import nn

from .networks import KEEP, unwrap, window_logits


class GlanceFocusInferer(Inferer):
    """MONAI's sliding-window grid, where only windows the Glance keeps are segmented by the Focus.

    The Glance scores every window (read from one whole-volume logit map when the glance has ``logit_map``, as
    :class:`scripts.networks.GlanceNet` does; else per batch of ``sw_batch_size`` windows); windows with
    p(keep) >= ``threshold`` go to the Focus; skipped windows contribute zero probability. Because the zeros add equally to every class, the
    argmax equals stitching over the kept windows only, and voxels seen by no kept window are background. With
    ``threshold=0`` the output is exactly MONAI's sliding-window inference of the softmaxed Focus.

    The network is a :class:`scripts.networks.GlanceFocusNet` (``.glance`` and ``.focus``). After each call,
    ``last_windows`` holds per batch item a list of ``{"start", "size", "prob", "kept"}`` records (window corner in
    input voxels) and ``last_timings`` the seconds spent in the glance and the focus models.
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
        self.roi_size = tuple(roi_size)
        self.sw_batch_size, self.overlap, self.threshold = sw_batch_size, overlap, threshold
        self.mode, self.out_channels, self.progress = mode, out_channels, progress
        self.last_windows: list[list[dict]] = []
        self.last_timings: dict[str, float] = {}

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        net = unwrap(network)
        roi = ensure_tuple_rep(self.roi_size, inputs.ndim - 2)
        # sliding_window_inference pads images smaller than the window symmetrically; records use input voxels.
        pad = [max(r - s, 0) // 2 for r, s in zip(roi, inputs.shape[2:])]
        windows: list[list[dict]] = [[] for _ in range(inputs.shape[0])]
        timings = {"glance": 0.0, "focus": 0.0}
        t0 = _now(inputs)
        with torch.no_grad():  # a fully convolutional glance scores the whole volume once (GlanceNet.logit_map)
            logit_map = net.glance.logit_map(inputs) if hasattr(net.glance, "logit_map") else None
        timings["glance"] += _now(inputs) - t0

        def predictor(win: torch.Tensor, location: list) -> torch.Tensor:
            items = [loc[0].start for loc in location]
            starts = [[s.start - o for s, o in zip(loc[2:], pad)] for loc in location]
            t0 = _now(win)
            if logit_map is None:
                logits = net.glance(win)
            else:
                logits = torch.stack([window_logits(logit_map[b], st, roi, net.glance.scale) for b, st in zip(items, starts)])
            p_keep = logits.float().softmax(1)[:, KEEP]
            keep = p_keep >= self.threshold
            t1 = _now(win)
            out = win.new_zeros((win.shape[0], self.out_channels, *win.shape[2:]), dtype=torch.float32)
            if keep.any():
                out[keep] = net.focus(win[keep]).float().softmax(1)
            timings["glance"] += t1 - t0
            timings["focus"] += _now(win) - t1
            for b, start, p, k in zip(items, starts, p_keep.tolist(), keep.tolist()):
                windows[b].append({"start": start, "size": list(roi), "prob": p, "kept": k})
            return out

        with torch.no_grad():
            prob = sliding_window_inference(
                inputs,
                roi,
                self.sw_batch_size,
                predictor,
                overlap=self.overlap,
                mode=self.mode,
                progress=self.progress,
                with_coord=True,
            )
        self.last_windows, self.last_timings = windows, timings
        return prob


def _now(t: torch.Tensor) -> float:
    """Wall time after the device's queued work on ``t`` is done (CUDA runs asynchronously)."""
    if t.is_cuda:
        torch.cuda.synchronize(t.device)
    return time.perf_counter()
