"""GF-Screen MONAI Label app: the repository's bundle as an auto-segmentation, training and active-learning service.

    monailabel start_server --app monailabel_app --studies DIR --conf models gf_screen

Conf keys (``--conf KEY VALUE``): ``models`` (``gf_screen`` or ``all``), ``bundle_path`` (default ``../bundle``
next to this app), ``api_key`` and ``admin_key`` (or the environment variables ``GF_SCREEN_API_KEY`` and
``GF_SCREEN_ADMIN_KEY``, preferred), ``max_upload_mb`` (2048), ``max_voxels`` (2**29), ``max_resampled_voxels``
(2**26), ``infer_queue`` (4), ``allowed_hosts`` (comma-separated host names), ``trash_days`` (30). See
docs/monailabel.md.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from collections.abc import Mapping
from typing import Any

from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.exception import ImageNotFoundException
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

from lib.activelearning.glance_uncertainty import GlanceUncertainty
from lib.datastore import GuardedDICOMWebDatastore, GuardedLocalDatastore, StoredSyntaxClient
from lib.dicom_seg import BundleSegWriter
from lib.endpoints import install
from lib.errors import InvalidRequest
from lib.infers.batch import SafeBatchInfer
from lib.infers.gf_screen import GFScreenInfer
from lib.logs import keep_out_of_logs
from lib.params import CLIENT_PARAMS, Param
from lib.scoring.glance_uncertainty import GlanceUncertaintyScoring
from lib.server import ServerPolicy, bind_loopback, harden, running_server
from lib.sessions import GuardedSessions
from lib.trainers.gf_screen import GFScreenTrain
from lib.uploads import RECEIVED
from lib.validation import ImageLimits, check_name

logger = logging.getLogger(__name__)

MODEL = "gf_screen"
API_KEY_ENV, ADMIN_KEY_ENV = "GF_SCREEN_API_KEY", "GF_SCREEN_ADMIN_KEY"
SECRET_CONF = ("api_key", "admin_key")


class GFScreenApp(MONAILabelApp):
    """Serves the bundle found locally (never the model zoo) behind the hardening of :mod:`lib.server`."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        models = conf.get("models", MODEL)
        if models not in (MODEL, "all"):
            raise ValueError(f"--conf models must be '{MODEL}' or 'all', got {models!r}")
        self.bundle_dir = os.path.realpath(conf.get("bundle_path", os.path.join(app_dir, "..", "bundle")))
        if not os.path.isfile(os.path.join(self.bundle_dir, "configs", "inference.json")):
            raise FileNotFoundError(f"no MONAI bundle at {self.bundle_dir} (set --conf bundle_path)")
        self.policy = ServerPolicy(
            api_key=os.environ.get(API_KEY_ENV) or conf.get("api_key") or None,
            admin_key=os.environ.get(ADMIN_KEY_ENV) or conf.get("admin_key") or None,
            max_upload_mb=int(conf.get("max_upload_mb", 2048)),
            infer_queue=int(conf.get("infer_queue", 4)),
            allowed_hosts=frozenset(h.strip().lower() for h in conf.get("allowed_hosts", "").split(",") if h.strip()),
        )
        self._hide_secrets(app_dir, conf)
        with open(os.path.join(self.bundle_dir, "configs", "inference.json")) as f:
            pixdim = tuple(float(p) for p in json.load(f)["pixdim"])
        self.limits = ImageLimits(
            max_voxels=int(conf.get("max_voxels", ImageLimits.max_voxels)),
            max_resampled_voxels=int(conf.get("max_resampled_voxels", ImageLimits.max_resampled_voxels)),
            pixdim=pixdim,
        )
        self.trash_days = float(conf.get("trash_days", 30))
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="GF-Screen",
            description="Pan-cancer lesion screening in CT (glance-then-focus); research use only",
        )

    def _hide_secrets(self, app_dir: str, conf: dict[str, str]) -> None:
        """Keep keys given with ``--conf`` out of the logs and of the train and scoring subprocesses (which get the
        conf through the environment and log it)."""
        secrets = [conf.pop(k) for k in SECRET_CONF if k in conf]
        keys = [s for s in (*secrets, self.policy.api_key, self.policy.admin_key) if s]
        keep_out_of_logs(keys, os.path.join(app_dir, "logs"))
        if secrets:
            settings.MONAI_LABEL_APP_CONF = conf
            os.environ["MONAI_LABEL_APP_CONF"] = json.dumps(conf)

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            self.studies = self.studies.rstrip("/")
            return self._init_dicomweb_datastore()
        return GuardedLocalDatastore(
            self.studies,
            limits=self.limits,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def _init_dicomweb_datastore(self) -> Datastore:
        """As MONAI Label's, less the dcmqi download (DICOM-SEG is written by the bundle's writer instead)."""
        user, password = settings.MONAI_LABEL_DICOMWEB_USERNAME, settings.MONAI_LABEL_DICOMWEB_PASSWORD
        session = None
        if user and password:
            from dicomweb_client.session_utils import create_session_from_user_pass

            session = create_session_from_user_pass(user, password)
        client = StoredSyntaxClient(
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
            seg_writer=BundleSegWriter(self.bundle_dir),
        )

    def init_infers(self) -> dict[str, InferTask]:
        task = GFScreenInfer(self.bundle_dir, self.conf, limits=self.limits)
        if not task.is_valid():
            raise FileNotFoundError(f"bundle at {self.bundle_dir} has no models/model.pt")
        return {MODEL: task}

    def init_batch_infer(self) -> SafeBatchInfer:
        return SafeBatchInfer()

    def init_trainers(self) -> dict[str, TrainTask]:
        return {MODEL: GFScreenTrain(self.bundle_dir, self.conf, limits=self.limits)}

    def init_strategies(self) -> dict[str, Strategy]:
        return {"glance_uncertainty": GlanceUncertainty(), "random": Random(), "first": First()}

    def init_scoring_methods(self) -> dict[str, ScoringMethod]:
        return {"glance_uncertainty": GlanceUncertaintyScoring(self._infers[MODEL])}

    def _load_sessions(self, load: bool = False) -> GuardedSessions | None:
        if not load:
            return None
        max_bytes = self.policy.max_upload_mb * 1024 * 1024 * 4  # an archive may unpack to 4 x its size
        path, expiry = settings.MONAI_LABEL_SESSION_PATH, settings.MONAI_LABEL_SESSION_EXPIRY
        return GuardedSessions(path, expiry, self.limits, max_bytes)

    def declared_params(self, kind: str, name: str) -> Mapping[str, Param]:
        """The request parameters the ``kind`` task (``infer``, ``train``, ``batch_infer``, ``scoring``) called
        ``name`` takes; :class:`InvalidRequest` if there is no such task."""
        tasks = {
            "infer": self._infers,
            "train": self._trainers,
            "batch_infer": {m: self._batch_infer for m in self._infers},
            "scoring": self._scoring_methods,
        }[kind]
        if name not in tasks:
            raise InvalidRequest(f"no {kind} task {name!r}; there are {sorted(tasks)}")
        return {**CLIENT_PARAMS, **tasks[name].params}

    def replace_weights(self, model: str, checkpoint: str) -> dict[str, Any]:
        if model not in self._infers:
            raise InvalidRequest(f"no model {model!r}; there are {sorted(self._infers)}")
        return self._infers[model].replace_weights(checkpoint)

    def infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """Infer only datastore images and files this server received for the request (never a path a client
        names), and save model output only as ``original`` (never over an annotator's label)."""
        image = request.get("image")
        if isinstance(image, str) and image not in RECEIVED:
            check_name(image, "image")
            if not (datastore or self.datastore()).has_image(image):
                raise ImageNotFoundException(f"image {image!r} not found in the datastore")
        if request.get("label_tag", DefaultLabelTag.ORIGINAL) != DefaultLabelTag.ORIGINAL:
            raise InvalidRequest(f"inference saves labels only as {DefaultLabelTag.ORIGINAL.value!r}")
        return super().infer(request, datastore)

    def on_init_complete(self) -> None:
        """Server start-up (not the train or scoring subprocesses): bind loopback, harden the HTTP layer, replace
        MONAI Label's unsafe endpoints and empty the trash of old entries."""
        app, config = running_server()
        if app is None or config is None:
            raise RuntimeError("GF-Screen app must be started by `monailabel start_server` (uvicorn + FastAPI)")
        bind_loopback(config, sys.argv, self.policy.api_key)
        harden(app, self.policy, config.host)
        install(app, dicomweb=isinstance(self.datastore(), GuardedDICOMWebDatastore))
        _remove_log_config(config.log_config)
        if isinstance(self.datastore(), GuardedLocalDatastore):
            self.datastore().purge_trash(self.trash_days)
        super().on_init_complete()


def _remove_log_config(log_config: Any) -> None:
    """``monailabel start_server`` writes its logging config to a temporary file that uvicorn has read by now."""
    if isinstance(log_config, str) and os.path.dirname(os.path.realpath(log_config)) == os.path.realpath(
        tempfile.gettempdir()
    ):
        os.unlink(log_config)
