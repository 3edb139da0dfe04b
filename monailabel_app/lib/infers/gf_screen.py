"""The GF-Screen bundle as MONAI Label's auto-segmentation task, with the screening report in the result JSON."""

from __future__ import annotations

import copy
import importlib
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import Inferer
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import CallBackTypes
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.utils.others.generic import file_checksum, file_ext

from ..errors import InvalidUpload, Unavailable
from ..params import Choice, Flag, Param, device_choice
from ..validation import IMAGE_EXTENSIONS, ImageLimits, check_image


@contextmanager
def bundle_on_path(bundle_path: str):
    """Make the bundle's ``scripts`` package importable, as MONAI Label does around each bundle call."""
    sys.path.insert(0, bundle_path)
    try:
        yield
    finally:
        sys.path.remove(bundle_path)


class GFScreenInfer(BundleInferTask):
    """BundleInferTask for the GF-Screen bundle.

    What MONAI Label's BundleInferTask already does right for this bundle: ``LoadCTd`` (a ``LoadImaged``) is
    wrapped by ``LoadImageTensord`` and still runs, ``SaveImaged`` is dropped from the postprocessing (MONAI Label
    writes the label), and the bundle's ``Invertd`` puts the mask back on the input grid before ``Restored``.
    Added here: the screening report (verdict, lesions, kept fraction of Glance windows, timings) in the result
    JSON; a uint8 label; unreadable inputs, or inputs over ``limits`` (checked from the header, before reading),
    reported as :class:`InvalidUpload` (HTTP 422) instead of a bare 500 or gigabytes of memory; the request
    parameters it takes (:attr:`params`); and one inference at a time, because the bundle's parsed inferer (which
    records the Glance windows of its last call) and MONAI Label's ``sys.path`` handling are shared state.
    """

    def __init__(self, path: str, conf: dict[str, str], limits: ImageLimits = ImageLimits(), **kwargs: Any) -> None:
        super().__init__(path, conf, type=InferType.SEGMENTATION, **kwargs)
        self.limits = limits
        self._lock = threading.Lock()
        self._inferer: Inferer | None = None
        with bundle_on_path(path):
            self._build_report: Callable[..., dict] = importlib.import_module("scripts.report").build_report
        self.params: dict[str, Param] = {
            "device": device_choice(),
            "model_filename": Choice(tuple(self._config.get("model_filename", ())), many=True),  # files in models/
            "save_label": Flag(),
            "label_tag": Choice((DefaultLabelTag.ORIGINAL.value,)),  # model output never takes an annotator's tag
            "result_extension": Choice(IMAGE_EXTENSIONS),
            "result_dtype": Choice(("uint8", "uint16")),
            "result_compress": Flag(),
            "restore_label_idx": Flag(),  # sent by OHIF; the label is 0/1 either way
            "logging": Choice(("DEBUG", "INFO", "WARNING", "ERROR")),
        }

    @property
    def threshold(self) -> float:
        """The Glance keep threshold of the bundle's inference config."""
        return float(self.bundle_config.get_parsed_content("glance_threshold"))

    def __call__(self, request: dict, callbacks: dict[CallBackTypes, Any] | None = None) -> tuple[Any, dict]:
        with self._lock:
            # without weights MONAI Label would run the network as initialised, at random
            if self.get_path() is None:
                raise Unavailable("the model weights are missing; an admin can upload them (PUT /model/gf_screen)")
            return super().__call__(request, callbacks)

    def replace_weights(self, checkpoint: str) -> dict[str, Any]:
        """Serve the weights in ``checkpoint`` from the next inference on, if they load strictly into this
        network (:class:`InvalidUpload` otherwise); returns their checksum and time stamp."""
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            state = state.get(self.model_state_dict, state) if isinstance(state, dict) else state
            copy.deepcopy(self.network).load_state_dict(state, strict=True)
        except Exception as e:
            raise InvalidUpload(f"{Path(checkpoint).name}: not a GF-Screen checkpoint ({_root_cause(e)})") from e
        target = self.get_path(validate=False)
        with self._lock:
            shutil.copyfile(checkpoint, f"{target}.upload")
            os.replace(f"{target}.upload", target)
        return {"checksum": file_checksum(target), "modified_time": int(os.stat(target).st_mtime)}

    def inferer(self, data: dict | None = None) -> Inferer:
        self._inferer = super().inferer(data)
        return self._inferer

    def run_pre_transforms(self, data: dict[str, Any], transforms: Sequence[Callable]) -> dict[str, Any]:
        image = data.get("image")
        if isinstance(image, str) and os.path.exists(image):
            check_image(image, read_voxels=False, limits=self.limits)
        start = time.perf_counter()
        try:
            data = super().run_pre_transforms(data, transforms)
        except Exception as e:
            raise InvalidUpload(f"cannot prepare image {Path(str(image)).name} for inference: {_root_cause(e)}") from e
        data["load_s"] = time.perf_counter() - start
        return data

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cuda") -> dict[str, Any]:
        data = super().run_inferer(data, convert_to_batch, device)
        data["glance_windows"] = self._inferer.last_windows[0]
        data["glance_timings"] = dict(self._inferer.last_timings)
        data["weights_mtime"] = self._networks[device][1]  # of the weights this call used (reloaded when changed)
        return data

    def writer(self, data: dict[str, Any], extension: str | None = None, dtype: Any = None) -> tuple[Any, dict]:
        report = self._report(data)
        source = str(data.get("image_path") or "")
        if not (extension or data.get("result_extension")) and (os.path.isdir(source) or not file_ext(source)):
            extension = ".nii.gz"  # MONAI Label copies the input's extension: of a DICOM folder it returns the array
        label, result = super().writer(data, extension, dtype or data.get("result_dtype") or "uint8")
        result["report"] = report
        weights = Path(self.get_path()).name
        result["model"] = {"version": self.version, "weights": weights, "weights_mtime": data["weights_mtime"]}
        return label, result

    def glance_windows(self, image: str, device: str = "cpu") -> list[dict]:
        """The Glance's window records (``prob``, ``kept``, ...) for one image, without running the Focus: what the
        active-learning score needs, at a fraction of an inference's cost."""
        with self._lock:
            request = {"image": image, "image_path": image, "device": device}
            data = self.run_pre_transforms(request, self.pre_transforms(request))
            full = self.inferer(data)
            glance_only = type(full)(full.roi_size, full.sw_batch_size, full.overlap, threshold=1.0, mode=full.mode)
            network = self._get_network(device, None)
            glance_only(torch.as_tensor(data[self.input_key])[None].to(device), network)
            return glance_only.last_windows[0]

    def _report(self, data: dict[str, Any]) -> dict[str, Any]:
        """The bundle's screening report for the label on the input grid (``scripts.report.build_report``)."""
        mask = np.asarray(data[self.key_pred]).squeeze()
        prob = np.asarray(data["prob"]).squeeze()
        affine = np.asarray(data[f"{self.key_pred}_meta_dict"]["affine"])
        timings = {"load": data["load_s"], **data["glance_timings"]}
        return self._build_report(
            _case_id(data.get("image_path")), mask, prob, affine, data["glance_windows"], timings, self.threshold
        )


def _case_id(path: Any) -> str:
    name = Path(str(path)).name
    return next((name[: -len(ext)] for ext in IMAGE_EXTENSIONS if name.endswith(ext)), name)


def _root_cause(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    return f"{type(e).__name__}: {e}"
