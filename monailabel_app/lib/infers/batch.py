"""Batch inference over the datastore that runs on CPU-only hosts and survives unreadable images."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.batch_infer import BatchInferTask

logger = logging.getLogger(__name__)


class SafeBatchInfer(BatchInferTask):
    """MONAI Label's BatchInferTask, except that ``multi_gpu`` (on by default) applies only with several GPUs,
    since with none it divides by zero, and that an image whose inference fails is logged and gets an empty
    result instead of ending the job (NOTES.md §6.7)."""

    def __call__(self, request: dict[str, Any], datastore: Datastore, infer: Callable) -> dict:
        multi_gpu = bool(request.get("multi_gpu", True)) and torch.cuda.device_count() > 1

        def infer_or_skip(req: dict[str, Any], store: Datastore) -> dict:
            try:
                return infer(req, store)
            except Exception as e:
                logger.warning(f"batch inference skipped {req.get('image')}: {e}")
                return {}

        return super().__call__({**request, "multi_gpu": multi_gpu}, datastore, infer_or_skip)
