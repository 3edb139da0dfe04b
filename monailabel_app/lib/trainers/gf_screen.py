"""Fine-tuning of the GF-Screen bundle (Focus segmentation + Glance by GRPO, ``configs/train.json``) on the
datastore's final labels."""

from __future__ import annotations

import importlib
import logging
import os
import random
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.train.bundle import BundleTrainTask
from monailabel.utils.others.generic import device_list

from ..errors import InvalidRequest
from ..infers.gf_screen import bundle_on_path
from ..params import Flag, Number, Param, device_choice
from ..validation import ImageLimits, check_image

logger = logging.getLogger(__name__)


class GFScreenTrain(BundleTrainTask):
    """BundleTrainTask that runs the bundle's own GRPO training workflow with bounded epochs.

    Each request is a fresh fine-tune from ``models/model.pt`` (``resume`` off: the bundle's resume would continue
    an earlier request's finished run and train nothing). At least one labelled image is held out for validation,
    whose best epoch the bundle saves as ``models/model.pt``; the infer task reloads it on its next call. Every
    image with a final label counts, an all-background label marking a lesion-free scan (valid training data).
    Cases whose files are unreadable, over ``limits`` or whose label does not match the image are logged and left
    out. The request takes only :attr:`params` (MONAI Label's also take file names and an MLflow URI), and
    :meth:`config` offers exactly those.
    """

    def __init__(
        self,
        path: str,
        conf: dict[str, str],
        limits: ImageLimits = ImageLimits(),
        max_epochs_limit: int = 100,
        **kwargs: Any,
    ) -> None:
        super().__init__(path, conf, **kwargs)
        self.limits = limits
        self.params: dict[str, Param] = {
            "device": device_choice(),
            "max_epochs": Number(1, max_epochs_limit, integer=True),
            "val_split": Number(0.0, 0.9),
            "multi_gpu": Flag(),
        }
        with bundle_on_path(path):
            self._check_case = importlib.import_module("scripts.data").check_case

    def config(self) -> dict[str, Any]:
        return {"device": device_list(), "max_epochs": 10, "val_split": 0.2, "multi_gpu": False}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict:
        return super().__call__({**self.config(), **request}, datastore)

    def _fetch_datalist(self, request: dict[str, Any], datastore: Datastore) -> list[dict[str, str]]:
        usable = []
        for case in super()._fetch_datalist(request, datastore):
            try:
                check_image(case["image"], read_voxels=False, limits=self.limits)
                self._check_case(case)
                usable.append(case)
            except ValueError as e:
                logger.warning(f"leaving out of training: {e}")
        return usable

    def _partition_datalist(self, datalist: list, request: dict[str, Any], shuffle: bool = False) -> tuple[list, list]:
        if len(datalist) < 2:
            raise InvalidRequest(
                f"training needs at least 2 images with a usable final label (1 for validation), got {len(datalist)}"
            )
        cases = sorted(datalist, key=lambda d: d["image"])
        random.Random(0).shuffle(cases)
        n_val = min(max(1, round(float(request.get("val_split", 0.2)) * len(cases))), len(cases) - 1)
        logger.info(f"{len(cases) - n_val} training and {n_val} validation cases")
        return cases[n_val:], cases[:n_val]

    def _load_checkpoint(self, model_pytorch: str, pretrained: bool, train_handlers: list[dict]) -> None:
        super()._load_checkpoint(model_pytorch, pretrained, train_handlers)
        # MONAI Label's loader has no map_location: weights saved on a GPU would not load on a CPU-only server
        for handler in train_handlers:
            if handler.get("_target_") == "CheckpointLoader":
                handler.setdefault("map_location", f"@{self.const.key_device()}")

    def _update_overrides(self, overrides: dict[str, Any]) -> dict[str, Any]:
        overrides["resume"] = False
        # periodic checkpoints go beside the TensorBoard logs: models/ keeps only the weights the infer task serves
        overrides["train#checkpoint#save_dir"] = os.path.join(self.bundle_path, "runs", "monailabel")
        return overrides
