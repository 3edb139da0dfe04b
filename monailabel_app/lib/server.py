"""Hardening of MONAI Label 0.8.5's FastAPI server, installed by the app when the server starts (NOTES.md §6).

MONAI Label builds its FastAPI app before it loads an app, binds 0.0.0.0, allows CORS from anywhere, has no
access control unless Keycloak is set up, answers bad input with a bare 500 and runs its blocking endpoints on
the event loop. :func:`harden` fixes these from inside the running server, without patching MONAI Label.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import sys
from collections.abc import Iterable
from typing import Any

import anyio
import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from monailabel.config import settings
from monailabel.interfaces.exception import (
    ImageNotFoundException,
    LabelNotFoundException,
    MONAILabelError,
    MONAILabelException,
)
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from .validation import InvalidRequest, InvalidUpload, check_name

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
HEALTH_PATH = "/health/"
# Query parameters that MONAI Label turns into file or folder names in the datastore.
NAME_PARAMS = ("image", "id", "tag", "label")
# MONAI Label raises these for requests that lack an input, with status 500.
CLIENT_ERROR_DETAILS = (
    "Neither Image nor File not Session ID input is provided",
    "DICOM SEG format is not supported in a non-DICOM datastore",
)


class ApiKeyMiddleware:
    """Require ``X-API-Key: KEY`` or ``Authorization: Bearer KEY`` on every request but the health check.

    It also answers MONAI Label's login endpoints, so that 3D Slicer's MONAI Label module works unchanged:
    ``GET /auth/`` says auth is enabled, ``POST /auth/token`` with the key as password returns it as a bearer
    token, ``GET /auth/token/valid`` checks it. No key: 401; a wrong key: 403.
    """

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].rstrip("/") == HEALTH_PATH.rstrip("/"):
            return await self.app(scope, receive, send)
        path, method = scope["path"].rstrip("/"), scope["method"]
        if path == "/auth" and method == "GET":
            return await JSONResponse({"enabled": True, "client_id": "gf-screen-api-key"})(scope, receive, send)
        if path == "/auth/token" and method == "POST":
            return await self._login(scope, receive, send)
        given = self._given_key(Request(scope))
        if given is None:
            detail = {"detail": "API key required (X-API-Key header)"}
            return await JSONResponse(detail, 401, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        if not self._valid(given):
            return await JSONResponse({"detail": "invalid API key"}, 403)(scope, receive, send)
        if path == "/auth/token/valid":
            return await JSONResponse({"username": "api-key", "roles": []})(scope, receive, send)
        await self.app(scope, receive, send)

    async def _login(self, scope: Scope, receive: Receive, send: Send) -> None:
        form = await Request(scope, receive).form()
        if not self._valid(str(form.get("password", ""))):
            return await JSONResponse({"detail": "invalid API key"}, 401)(scope, receive, send)
        await JSONResponse({"access_token": self.api_key, "token_type": "Bearer"})(scope, receive, send)

    def _valid(self, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self.api_key.encode())

    @staticmethod
    def _given_key(request: Request) -> str | None:
        key = request.headers.get("x-api-key")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return key if key is not None else token if scheme.lower() == "bearer" else None


class NameCheckMiddleware:
    """Answer 400 when a query's image, id, tag or label value is not a plain name (``../x``, ``/etc/x``): MONAI
    Label joins them into datastore paths (NOTES.md §6.5)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            try:
                for key, value in Request(scope).query_params.multi_items():
                    if key in NAME_PARAMS and value:
                        check_name(value, key)
            except InvalidRequest as e:
                return await JSONResponse({"detail": str(e)}, 400)(scope, receive, send)
        await self.app(scope, receive, send)


class ThreadedRequests:
    """Serve each HTTP request in a worker thread with its own event loop.

    MONAI Label's endpoints are ``async def`` but run inference, training set-up and file I/O synchronously, so
    one inference froze every other request, ``/info/`` included (NOTES.md §6.8). ``receive`` and ``send`` are
    forwarded to the server's loop, which stays free to accept and answer other requests.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()

        def on_server_loop(fn: Any) -> Any:
            async def call(*args: Any) -> Any:
                return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(fn(*args), loop))

            return call

        coroutine = self.app(scope, on_server_loop(receive), on_server_loop(send))
        await anyio.to_thread.run_sync(asyncio.run, coroutine)


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


def _monailabel_error(_: Request, e: MONAILabelException) -> JSONResponse:
    if isinstance(e, (ImageNotFoundException, LabelNotFoundException)):
        return _error(404, e.msg)
    bad_request = e.error in (MONAILabelError.INVALID_INPUT, MONAILabelError.APP_INIT_ERROR)
    return _error(400 if bad_request else 500, e.msg)


def _http_error(_: Request, e: HTTPException) -> JSONResponse:
    status = 400 if e.status_code == 500 and e.detail in CLIENT_ERROR_DETAILS else e.status_code
    return JSONResponse({"detail": e.detail}, status_code=status, headers=e.headers)


def _unexpected_error(_: Request, e: Exception) -> JSONResponse:
    return _error(500, f"internal error: {type(e).__name__}: {e}")


EXCEPTION_HANDLERS = {
    InvalidRequest: lambda _, e: _error(400, str(e)),
    InvalidUpload: lambda _, e: _error(422, str(e)),
    json.JSONDecodeError: lambda _, e: _error(400, f"params is not valid JSON: {e}"),
    NotImplementedError: lambda _, e: _error(405, str(e) or "not supported by this datastore"),
    MONAILabelException: _monailabel_error,
    HTTPException: _http_error,
    Exception: _unexpected_error,
}


def harden(app: FastAPI, api_key: str | None, max_upload_mb: int) -> None:
    """Install the API key (when given), name checks, error handlers, an upload size limit and threaded requests
    into MONAI Label's running FastAPI app, and drop its allow-all CORS unless origins were configured."""
    if not settings.MONAI_LABEL_CORS_ORIGINS:
        app.user_middleware = [m for m in app.user_middleware if m.cls is not CORSMiddleware]
    app.user_middleware.insert(0, Middleware(NameCheckMiddleware))
    if api_key:
        app.user_middleware.insert(0, Middleware(ApiKeyMiddleware, api_key=api_key))
    for exc, handler in EXCEPTION_HANDLERS.items():
        app.add_exception_handler(exc, handler)
    app.max_body_size = max_upload_mb * 1024 * 1024
    app.add_api_route(HEALTH_PATH, lambda: {"status": "ok"}, methods=["GET"], include_in_schema=False)
    app.middleware_stack = ThreadedRequests(app.build_middleware_stack())
    logger.info(f"server hardened: API key {'required' if api_key else 'off'}, uploads up to {max_upload_mb} MB")


def running_server() -> tuple[FastAPI | None, uvicorn.Config | None]:
    """The FastAPI app and uvicorn config of the server whose start-up is calling us (found on the call stack:
    MONAI Label creates both before it loads the app and offers no handle to either)."""
    app, config = None, None
    frame = sys._getframe()
    while frame is not None:
        owner = frame.f_locals.get("self")
        if app is None and isinstance(owner, FastAPI):
            app = owner
        if config is None and isinstance(owner, uvicorn.Server):
            config = owner.config
        frame = frame.f_back
    return app, config


def bind_loopback(config: uvicorn.Config, argv: Iterable[str], api_key: str | None) -> None:
    """Make the server listen on 127.0.0.1 unless ``--host`` was given: ``monailabel start_server`` defaults to
    0.0.0.0, which exposes weights, uploads and deletions to the network (NOTES.md §6.4). Runs before uvicorn
    binds its socket."""
    if not any(a in ("-i", "--host") or a.startswith("--host=") for a in argv):
        config.host = LOOPBACK
        logger.info(f"listening on {LOOPBACK} only; pass --host to listen elsewhere")
    elif not _is_loopback(config.host) and not api_key:
        logger.warning(f"listening on {config.host} WITHOUT an API key: anyone who reaches it can read and change data")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
