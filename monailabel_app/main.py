"""GF-Screen MONAI Label app: the repository's bundle as an auto-segmentation, training and active-learning service.

    monailabel start_server --app monailabel_app --studies DIR --conf models gf_screen

Conf keys (``--conf KEY VALUE``): ``models`` (``gf_screen`` or ``all``), ``bundle_path`` (default ``../bundle``
next to this app), ``api_key`` (or the environment variable ``GF_SCREEN_API_KEY``, preferred: ``--conf`` values
show in logs and process lists), ``max_upload_mb`` (default 2048). See docs/monailabel.md.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from typing import Any

from lib.activelearning.glance_uncertainty import GlanceUncertainty
from lib.datastore import GuardedDICOMWebDatastore, GuardedLocalDatastore
from lib.infers.batch import SafeBatchInfer
from lib.infers.gf_screen import GFScreenInfer
from lib.scoring.glance_uncertainty import GlanceUncertaintyScoring
from lib.server import bind_loopback, harden, running_server
from lib.trainers.gf_screen import GFScreenTrain
from lib.validation import check_name
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import ImageNotFoundException
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

logger = logging.getLogger(__name__)

MODEL = "gf_screen"
API_KEY_ENV = "GF_SCREEN_API_KEY"


class GFScreenApp(MONAILabelApp):
    """Serves the bundle found locally (never the model zoo) behind the hardening of :mod:`lib.server`."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        models = conf.get("models", MODEL)
        if models not in (MODEL, "all"):
            raise ValueError(f"--conf models must be '{MODEL}' or 'all', got {models!r}")
        self.bundle_dir = os.path.realpath(conf.get("bundle_path", os.path.join(app_dir, "..", "bundle")))
        if not os.path.isfile(os.path.join(self.bundle_dir, "configs", "inference.json")):
            raise FileNotFoundError(f"no MONAI bundle at {self.bundle_dir} (set --conf bundle_path)")
        self.api_key = os.environ.get(API_KEY_ENV) or conf.get("api_key") or None
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="GF-Screen",
            description="Pan-cancer lesion screening in CT (glance-then-focus); research use only",
        )

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            self.studies = self.studies.rstrip("/")
            return self._init_dicomweb_datastore()
        return GuardedLocalDatastore(
            self.studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def _init_dicomweb_datastore(self) -> Datastore:
        """As MONAI Label's, less the dcmqi download (DICOM-SEG is written with pydicom-seg instead)."""
        user, password = settings.MONAI_LABEL_DICOMWEB_USERNAME, settings.MONAI_LABEL_DICOMWEB_PASSWORD
        session = None
        if user and password:
            from dicomweb_client.session_utils import create_session_from_user_pass

            session = create_session_from_user_pass(user, password)
        client = DICOMwebClientX(
            url=self.studies,
            session=session,
            qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
            wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
            stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX,
        )
        cache_path = settings.MONAI_LABEL_DICOMWEB_CACHE_PATH.strip()
        return GuardedDICOMWebDatastore(
            client=client,
            search_filter=settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER,
            cache_path=cache_path or None,
            fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME,
            convert_to_nifti=settings.MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI,
        )

    def init_infers(self) -> dict[str, InferTask]:
        task = GFScreenInfer(self.bundle_dir, self.conf)
        if not task.is_valid():
            raise FileNotFoundError(f"bundle at {self.bundle_dir} has no models/model.pt")
        return {MODEL: task}

    def init_batch_infer(self) -> SafeBatchInfer:
        return SafeBatchInfer()

    def init_trainers(self) -> dict[str, TrainTask]:
        return {MODEL: GFScreenTrain(self.bundle_dir, self.conf)}

    def init_strategies(self) -> dict[str, Strategy]:
        return {"glance_uncertainty": GlanceUncertainty(), "random": Random(), "first": First()}

    def init_scoring_methods(self) -> dict[str, ScoringMethod]:
        return {"glance_uncertainty": GlanceUncertaintyScoring(self._infers[MODEL])}

    def infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """Refuse images that are neither a datastore id nor this server's own upload, and label tags that are
        not plain names: MONAI Label infers any existing path and saves under any tag (both may come in ``params``)."""
        image = request.get("image")
        if isinstance(image, str) and not _is_upload(image):
            check_name(image, "image")
            if image not in (datastore or self.datastore()).list_images():
                raise ImageNotFoundException(f"image {image!r} not found in the datastore")
        if request.get("label_tag") is not None:
            check_name(str(request["label_tag"]), "label_tag")
        return super().infer(request, datastore)

    def on_init_complete(self) -> None:
        """Server start-up (not the train or scoring subprocesses): bind loopback and harden the HTTP layer."""
        app, config = running_server()
        if app is None or config is None:
            raise RuntimeError("GF-Screen app must be started by `monailabel start_server` (uvicorn + FastAPI)")
        bind_loopback(config, sys.argv, self.api_key)
        harden(app, self.api_key, int(self.conf.get("max_upload_mb", 2048)))
        super().on_init_complete()


def _is_upload(path: str) -> bool:
    """True for the temporary file MONAI Label's infer endpoint writes an uploaded image to."""
    real = os.path.realpath(path)
    return os.path.isfile(real) and os.path.dirname(real) == os.path.realpath(tempfile.gettempdir())

