"""Batch inference over the datastore that runs on CPU-only hosts and survives unreadable images."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.batch_infer import BatchInferTask

from ..params import Choice, Flag, Number, Param, device_choice

logger = logging.getLogger(__name__)


class SafeBatchInfer(BatchInferTask):
    """MONAI Label's BatchInferTask, except that ``multi_gpu`` (on by default) applies only with several GPUs,
    since with none it divides by zero, and that an image whose inference fails is logged and gets an empty
    result instead of ending the job. Requests take only :attr:`params`; labels are saved as ``original``."""

    def __init__(self) -> None:
        self.params: dict[str, Param] = {
            "device": device_choice(),
            "multi_gpu": Flag(),
            "gpus": Choice(("all",)),
            "logging": Choice(("DEBUG", "INFO", "WARNING", "ERROR")),
            "save_label": Flag(),
            "label_tag": Choice((DefaultLabelTag.ORIGINAL.value,)),  # model output never takes an annotator's tag
            "max_workers": Number(1, os.cpu_count() or 1, integer=True),
            "max_batch_size": Number(0, 10**6, integer=True),
        }

    def __call__(self, request: dict[str, Any], datastore: Datastore, infer: Callable) -> dict:
        multi_gpu = bool(request.get("multi_gpu", True)) and torch.cuda.device_count() > 1

        def infer_or_skip(req: dict[str, Any], store: Datastore) -> dict:
            try:
                return infer(req, store)
            except Exception as e:
                logger.warning(f"batch inference skipped {req.get('image')}: {e}")
                return {}

        return super().__call__({**request, "multi_gpu": multi_gpu}, datastore, infer_or_skip)
