"""MONAI Label 0.8.5 endpoints replaced by safe equivalents; :func:`install` swaps them into the running app.

What MONAI Label's own versions do that these do not:

- uploads (inference, images, labels, sessions, weights) stay in the temporary folder when a request fails, and
  error messages name the temporary file instead of the user's;
- ``/infer`` merges its ``params`` JSON into the request unread, so ``params`` could name any file to infer
  (``image``), weights (``model_filename``) or output suffix (``result_extension``); ``/train``, ``/batch/infer``
  and ``/scoring`` pass theirs to the task the same way (``tracking_uri``, ``max_epochs: "abc"``). Here each task
  declares its parameters (:mod:`lib.params`);
- an uploaded image id is the file name up to its first dot (``1.2.840.1.nii.gz`` becomes ``1``); info updates
  that are not JSON objects end in a 500;
- ``PUT /model`` stores any file as the weights, ``POST /reload`` rebuilds the app and leaks its threads;
- ``/datastore/dataset`` leaves its zip in the temporary folder; ``/logs/gpu`` and ``/proxy/dicom`` answer 500
  without a GPU or a DICOMweb datastore; ``/``, ``/docs`` and ``/logs/`` load their scripts from CDNs (blank offline);
- ``/proxy/dicom`` drops the browser's ``Accept`` header and query (see :func:`proxy_dicom`);
- OHIF's MONAI Label panel talks to port 8000 of the page's host (see :func:`ohif`), and ``GET /train/`` answers
  its start-up question whether a training runs with 404, a failed request (see :func:`train_status`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections import deque
from contextlib import ExitStack
from html import escape
from typing import Any
from urllib.parse import quote

import httpx
from fastapi import BackgroundTasks, FastAPI, File, Form, HTTPException, Request, Response, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse
from fastapi.routing import APIRoute
from monailabel.config import settings
from monailabel.endpoints import batch_infer as batch_endpoints
from monailabel.endpoints import scoring as scoring_endpoints
from monailabel.endpoints import train as train_endpoints
from monailabel.endpoints.infer import ResultType, send_response
from monailabel.endpoints.ohif import get_ohif
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.tasks.batch_infer import BatchInferImageType
from monailabel.interfaces.utils.app import app_instance
from monailabel.utils.async_tasks.task import AsyncTask
from starlette.background import BackgroundTask

from .errors import Forbidden, InvalidRequest
from .params import check_params
from .uploads import RECEIVED, saved
from .validation import check_session_id, image_id

MAX_LOG_LINES = 100000
SERVER_URL_COOKIE = "MONAILABEL_SERVER_URL"  # where OHIF's MONAI Label panel sends its requests
PROXIED_HEADERS = ("accept", "content-type")


def _object(text: str, what: str) -> dict[str, Any]:
    value = json.loads(text) if text else {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"{what} must be a JSON object")
    return value


async def infer(
    background_tasks: BackgroundTasks,
    model: str,
    image: str = "",
    session_id: str = "",
    params: str = Form("{}"),
    file: UploadFile = File(None),
    label: UploadFile = File(None),
    output: ResultType | None = None,
):
    """Run the model on a datastore image (``image``), an upload (``file``) or a session's image (``session_id``;
    ``image`` is then ignored). ``params`` may hold only what the model declares (``GET /info/``)."""
    instance = app_instance()
    declared = instance.declared_params("infer", model)
    if label is not None:
        raise InvalidRequest(f"{model} takes no label input")
    if output == ResultType.dicom_seg:
        raise InvalidRequest("output=dicom_seg is not supported; use image, json or all")
    request = {"model": model, **check_params(_object(params, "params"), declared, f"infer {model}")}
    with ExitStack() as stack:
        if session_id:
            sessions = instance.sessions()
            session = sessions.get_session(check_session_id(session_id)) if sessions else None
            if session is None:
                raise HTTPException(404, f"session {session_id} not found (expired or removed)")
            request["image"] = stack.enter_context(RECEIVED.hold(session.image))
        elif file is not None:
            [path] = stack.enter_context(saved([file]))
            request["image"] = stack.enter_context(RECEIVED.hold(path))
        elif image:
            request["image"] = image
        else:
            raise InvalidRequest("give an image id (?image=), an image upload (file) or a session_id")
        result = instance.infer(request)
    return send_response(instance.datastore(), result, output, background_tasks)


async def add_image(image: str | None = None, params: str = Form("{}"), file: UploadFile = File(...)):
    """Store an image; its id is ``image`` or the whole file name less its extension."""
    info = _object(params, "params")
    with saved([file]) as [path]:
        name = image_id(path.name)
        return {"image": app_instance().datastore().add_image(image or name, str(path), info)}


async def save_label(
    image: str, params: str = Form("{}"), tag: str = DefaultLabelTag.FINAL.value, label: UploadFile = File(...)
):
    """Store a label of an image under ``tag`` (``final``: approved by an annotator)."""
    instance = app_instance()
    info = _object(params, "params")
    with saved([label]) as [path]:
        label_id = instance.datastore().save_label(image, str(path), tag or DefaultLabelTag.FINAL.value, info)
    return {**(instance.on_save_label(image, label_id) or {}), "image": image, "label": label_id}


async def update_image_info(image: str, info: str = Form("{}")):
    """Merge ``info`` (a JSON object) into an image's datastore info."""
    return app_instance().datastore().update_image_info(image, _object(info, "info"))


async def update_label_info(label: str, tag: str, info: str = Form("{}")):
    """Merge ``info`` (a JSON object) into a label's datastore info."""
    return app_instance().datastore().update_label_info(label, tag, _object(info, "info"))


async def update_label_info_v1(label: str, tag: str, params: str = Form("{}")):
    """Merge ``params`` (a JSON object) into a label's datastore info (MONAI Label's older name)."""
    return app_instance().datastore().update_label_info(label, tag, _object(params, "params"))


async def create_session(uncompress: bool = False, expiry: int = 0, files: list[UploadFile] = File(...)):
    """Keep an image (one file, several DICOM files, or with ``uncompress`` a zip or tar of them) for later
    inference with ``session_id``."""
    sessions = app_instance().sessions()
    if sessions is None:
        raise HTTPException(406, "sessions are off (MONAI_LABEL_SESSIONS)")
    with saved(files) as paths:
        data = paths[0] if len(paths) == 1 else paths[0].parent
        session_id, info = sessions.add_session(str(data), expiry, uncompress)
    return {"session_id": session_id, "session_info": info.to_json()}


async def update_model(model: str, file: UploadFile = File(...)):
    """Replace the served weights with an uploaded checkpoint of the same network (admin key only)."""
    with saved([file]) as [path]:
        return app_instance().replace_weights(model, str(path))


def reload():
    """Refused: MONAI Label's reload builds a second app beside the first and leaks its threads."""
    raise Forbidden("reload is off: restart the server to reload the app")


def download_dataset(limit_cases: int | None = None):
    """All images with a final label, their labels and the datastore metadata as one zip, removed once sent."""
    datastore = app_instance().datastore()
    if not datastore.datalist():
        raise HTTPException(404, "no image has a final label yet: nothing to download")
    path = datastore.get_dataset_archive(limit_cases)
    removal = BackgroundTask(os.unlink, path)
    return FileResponse(path, media_type="application/zip", filename="dataset.zip", background=removal)


def logs(lines: int = 300, html: bool = True, text: bool = False, refresh: int = 0):
    """The last ``lines`` lines of the server log, as plain text (``html``, ``text`` and ``refresh`` are accepted
    for MONAI Label's clients; its HTML viewer needs scripts from CDNs)."""
    if not 1 <= lines <= MAX_LOG_LINES:
        raise InvalidRequest(f"lines must be in [1, {MAX_LOG_LINES}], got {lines}")
    log = os.path.join(app_instance().app_dir, "logs", "app.log")
    if not os.path.isfile(log):
        raise HTTPException(404, "no log file yet")
    with open(log, encoding="utf-8", errors="replace") as f:
        return PlainTextResponse("".join(deque(f, lines)))


def gpu_info():
    """``nvidia-smi``'s report; 404 on a host without an NVIDIA GPU."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        raise HTTPException(404, "no GPU on this server (nvidia-smi not found)")
    result = subprocess.run([smi], capture_output=True, text=True, timeout=30)
    return PlainTextResponse(result.stdout or result.stderr)


def no_dicomweb(path: str):
    """The DICOMweb proxy exists only when the studies are a DICOMweb server."""
    raise HTTPException(404, "no DICOMweb datastore: start the server with --studies http://.../dicom-web")


async def proxy_dicom(request: Request, path: str):
    """The DICOMweb server of the studies, for OHIF: ``/proxy/dicom/{wado,qido,stow}/PATH`` with MONAI Label's
    prefixes (``MONAI_LABEL_{WADO,QIDO,STOW}_PREFIX``), or ``/proxy/dicom/PATH`` under the studies URL."""
    op, _, rest = path.partition("/")
    prefixes = {
        "wado": settings.MONAI_LABEL_WADO_PREFIX,
        "qido": settings.MONAI_LABEL_QIDO_PREFIX,
        "stow": settings.MONAI_LABEL_STOW_PREFIX,
    }
    if op not in prefixes:
        op, rest = "", path
    prefix = settings.MONAI_LABEL_WADO_PREFIX if op == "qido" and rest.endswith("metadata") else prefixes.get(op, "")
    parts = rest.split("/")
    if any(part in (".", "..") for part in parts):
        raise InvalidRequest("the DICOMweb path may not leave the DICOMweb root")
    path = "/".join(quote(part, safe=",") for part in parts)  # encoded dots and slashes stay one path segment
    url = "/".join(p.strip("/") for p in (settings.MONAI_LABEL_STUDIES.rstrip("/"), prefix, path) if p)
    user, password = settings.MONAI_LABEL_DICOMWEB_USERNAME, settings.MONAI_LABEL_DICOMWEB_PASSWORD
    # MONAI Label's proxy sends neither the query nor the browser's Accept header, so Orthanc sends every frame as
    # Explicit VR Little Endian, which it cannot make from JPEG 2000 (500; with its GDCM plugin it crashes);
    # with the header it sends the frames as stored and the browser decodes them.
    try:
        answer = httpx.request(
            request.method,
            url,
            params=request.query_params,
            headers={k: request.headers[k] for k in PROXIED_HEADERS if k in request.headers},
            content=await request.body() if request.method == "POST" else None,
            auth=(user, password) if user and password else None,
            timeout=settings.MONAI_LABEL_DICOMWEB_PROXY_TIMEOUT,
        )
    except httpx.HTTPError as e:
        raise HTTPException(502, f"DICOMweb server {settings.MONAI_LABEL_STUDIES} did not answer: {e!r}") from None
    return Response(answer.content, answer.status_code, media_type=answer.headers.get("content-type"))


def ohif(request: Request, path: str = ""):
    """OHIF (its files, else its page), its MONAI Label panel pointed at this server: the panel sends its requests
    to the server in the ``MONAILABEL_SERVER_URL`` cookie, by default port 8000 of the page's host."""
    response = get_ohif(path)
    if response.media_type == "text/html":  # at the path the panel itself keeps the cookie at, so as to replace it
        response.set_cookie(SERVER_URL_COOKIE, quote(str(request.base_url), safe=""), path="/ohif", samesite="strict")
    return response


def train_status(all: bool = False, check_if_running: bool = False):
    """The last training task (``all``: every one); with ``check_if_running``, the running task, or 204 (no
    content) when none runs: MONAI Label's 404 is a failed request in OHIF's panel, and MONAI Label's Python client
    and 3D Slicer take only 200 for a running training."""
    task, detail = AsyncTask.status("train", all, check_if_running)
    if task is None and check_if_running:
        return Response(status_code=204)
    if task is None:
        raise HTTPException(404, detail)
    return task


def _validated(kind: str, name: str, params: dict | None) -> dict[str, Any]:
    return check_params(params or {}, app_instance().declared_params(kind, name), f"{kind} {name}")


def _validated_per_task(kind: str, params: dict | None) -> dict[str, Any]:
    if not isinstance(params, dict):
        return {}
    return {name: _validated(kind, name, p) for name, p in params.items()}


async def train(model: str, params: dict | None = None, run_sync: bool = False, enqueue: bool = False):
    """Fine-tune ``model`` on the final labels; ``params`` as the trainer declares (``GET /info/``)."""
    return train_endpoints.run_model(model, _validated("train", model, params), run_sync, enqueue)


async def train_all(params: dict | None = None, run_sync: bool = False):
    """Run every trainer; ``params`` maps a trainer to its parameters."""
    return train_endpoints.run(_validated_per_task("train", params), run_sync)


async def run_batch_infer(
    model: str,
    images: BatchInferImageType = BatchInferImageType.IMAGES_ALL,
    params: dict | None = None,
    run_sync: bool = False,
):
    """Run ``model`` over the datastore's images, saving its labels as ``original``."""
    return batch_endpoints.run(model, images, _validated("batch_infer", model, params), run_sync)


async def scoring(method: str, params: dict | None = None, run_sync: bool = False):
    """Run a scoring method over the datastore."""
    return scoring_endpoints.run_method(method, _validated("scoring", method, params), run_sync)


async def scoring_all(params: dict | None = None, run_sync: bool = False):
    """Run every scoring method; ``params`` maps a method to its parameters."""
    return scoring_endpoints.run(_validated_per_task("scoring", params), run_sync)


def docs_page(app: FastAPI) -> HTMLResponse:
    """The API as a plain HTML table built from the OpenAPI schema: no scripts, so it works offline."""
    rows = []
    for path, operations in sorted(app.openapi().get("paths", {}).items()):
        for method, op in operations.items():
            cells = (method.upper(), path, op.get("summary", ""))
            rows.append("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in cells) + "</tr>")
    title = escape(app.title)
    body = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title} API</title><style>"
        "body{font-family:sans-serif;margin:2em}td{padding:2px 12px;border-bottom:1px solid #ddd}</style></head>"
        f"<body><h1>{title} API</h1><p>Schema: <a href='/openapi.json'>/openapi.json</a>; health: "
        "<a href='/health/'>/health/</a>; guide: docs/monailabel.md in the repository.</p>"
        f"<table><tr><th>method</th><th>path</th><th>summary</th></tr>{''.join(rows)}</table></body></html>"
    )
    return HTMLResponse(body)


def gone(model: str):
    """Whole-slide-image inference: not a CT task."""
    raise HTTPException(404, "whole-slide image inference is not offered by this app")


# (method, path): the endpoint that replaces MONAI Label's.
REPLACED = {
    ("POST", "/infer/{model}"): infer,
    ("POST", "/infer/wsi/{model}"): gone,
    ("POST", "/infer/wsi_v2/{model}"): gone,
    ("PUT", "/datastore/image"): add_image,
    ("PUT", "/datastore/"): add_image,  # the MONAI Label client's upload_image uses this one
    ("PUT", "/datastore/label"): save_label,
    ("PUT", "/datastore/image/info"): update_image_info,
    ("PUT", "/datastore/label/info"): update_label_info,
    ("PUT", "/datastore/updatelabelinfo"): update_label_info_v1,
    ("GET", "/datastore/dataset"): download_dataset,
    ("PUT", "/session/"): create_session,
    ("PUT", "/model/{model}"): update_model,
    ("POST", "/reload"): reload,
    ("GET", "/train/"): train_status,
    ("POST", "/train/{model}"): train,
    ("POST", "/train/"): train_all,
    ("POST", "/batch/infer/{model}"): run_batch_infer,
    ("POST", "/scoring/{method}"): scoring,
    ("POST", "/scoring/"): scoring_all,
    ("GET", "/logs/"): logs,
    ("GET", "/logs/gpu"): gpu_info,
    ("GET", "/ohif/{path:path}"): ohif,
}
PROXY = "/proxy/dicom/{path:path}"


def install(app: FastAPI, dicomweb: bool) -> None:
    """Serve :data:`REPLACED`, :func:`docs_page` at ``/`` and ``/docs`` and the DICOMweb proxy (a 404 unless the
    datastore is DICOMweb), ahead of MONAI Label's routes (the router takes the first route that matches); MONAI
    Label's shadowed routes leave the OpenAPI schema."""
    before = list(app.router.routes)
    app.router.routes.clear()
    for (method, path), endpoint in REPLACED.items():
        summary = endpoint.__doc__.split("\n")[0]
        app.add_api_route(
            path, endpoint, methods=[method], summary=summary, include_in_schema=endpoint not in (gone, ohif)
        )
    for path in ("/", "/docs"):
        app.add_api_route(path, lambda: docs_page(app), methods=["GET"], include_in_schema=False)
    app.add_api_route(PROXY, proxy_dicom if dicomweb else no_dicomweb, methods=["GET", "POST"], include_in_schema=False)
    ours = {(m, r.path) for r in app.router.routes for m in r.methods}
    app.router.routes.extend(before)
    for route in _monailabel_routes(before):
        if any((m, route.path) in ours for m in route.methods):
            route.include_in_schema = False
    app.openapi_schema = None


def _monailabel_routes(routes: list) -> list[APIRoute]:
    """The API routes of MONAI Label's routers (included into the app as a whole)."""
    found = [r for r in routes if isinstance(r, APIRoute)]
    for r in routes:
        router = getattr(r, "original_router", None)
        if router is not None:
            found += _monailabel_routes(router.routes)
    return found
