"""Hardening of MONAI Label 0.8.5's FastAPI server, installed by the app when the server starts.

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
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import anyio
import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from monailabel.config import settings
from monailabel.interfaces.exception import (
    ImageNotFoundException,
    LabelNotFoundException,
    MONAILabelError,
    MONAILabelException,
)
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import CLIENT_ERRORS, InvalidRequest
from .validation import check_name, check_session_id

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
HEALTH_PATH = "/health/"
# Served from their own worker threads, so that no load on other endpoints can delay them.
LIGHT_PATHS = ("/health", "/info")
# Compute-bound requests that wait for the model; at most ServerPolicy.infer_queue are admitted at once.
QUEUED_PREFIXES = ("/infer/", "/batch/infer/", "/scoring/")
# Endpoints that replace or delete the served weights: only with the admin key, off without one.
ADMIN_ROUTES = (("PUT", "/model/"), ("DELETE", "/model/"))
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Query parameters that MONAI Label turns into file or folder names in the datastore.
NAME_PARAMS = ("image", "id", "tag", "label")


@dataclass(frozen=True)
class ServerPolicy:
    """Who may do what, and how much the server takes at once (``--conf`` keys, see docs/monailabel.md)."""

    api_key: str | None = None
    admin_key: str | None = None
    max_upload_mb: int = 2048
    infer_queue: int = 4
    allowed_hosts: frozenset[str] = frozenset()
    retry_after_s: int = 10


class AccessMiddleware:
    """Require a key on every request but the health check when an API key is set, and the admin key on the
    endpoints that replace or delete the weights, which are refused (403) when no admin key is set.

    Clients send ``X-API-Key: KEY`` or ``Authorization: Bearer KEY``; the admin key is accepted wherever the API key
    is. It also answers MONAI Label's login endpoints when an API key is set, so that 3D Slicer's MONAI Label module
    works unchanged: ``GET /auth/`` says auth is enabled, ``POST /auth/token`` with a key as password returns it as
    a bearer token, ``GET /auth/token/valid`` checks it. No key: 401; a wrong key: 403.
    """

    def __init__(self, app: ASGIApp, api_key: str | None, admin_key: str | None) -> None:
        self.app, self.api_key, self.admin_key = app, api_key, admin_key
        self.keys = [k for k in (api_key, admin_key) if k]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].rstrip("/") == HEALTH_PATH.rstrip("/"):
            return await self.app(scope, receive, send)
        path, method = scope["path"].rstrip("/"), scope["method"]
        admin = any(method == m and scope["path"].startswith(p) for m, p in ADMIN_ROUTES)
        if self.api_key and path == "/auth" and method == "GET":
            return await JSONResponse({"enabled": True, "client_id": "gf-screen-api-key"})(scope, receive, send)
        if self.api_key and path == "/auth/token" and method == "POST":
            return await self._login(scope, receive, send)
        if admin and not self.admin_key:
            detail = "replacing or deleting the weights is off; start the server with GF_SCREEN_ADMIN_KEY to allow it"
            return await _refuse(403, detail, scope, receive, send)
        if not admin and not self.api_key:
            return await self.app(scope, receive, send)
        given = _given_key(Headers(scope=scope))
        if given is None:
            detail = "admin key required (X-API-Key header)" if admin else "API key required (X-API-Key header)"
            return await JSONResponse({"detail": detail}, 401, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        if not any(_same(given, k) for k in ([self.admin_key] if admin else self.keys)):
            return await _refuse(403, "invalid admin key" if admin else "invalid API key", scope, receive, send)
        if path == "/auth/token/valid":
            return await JSONResponse({"username": "api-key", "roles": []})(scope, receive, send)
        await self.app(scope, receive, send)

    async def _login(self, scope: Scope, receive: Receive, send: Send) -> None:
        form = await Request(scope, receive).form()
        password = str(form.get("password", ""))
        if not any(_same(password, k) for k in self.keys):
            return await JSONResponse({"detail": "invalid API key"}, 401)(scope, receive, send)
        await JSONResponse({"access_token": password, "token_type": "Bearer"})(scope, receive, send)


def _same(given: str, key: str) -> bool:
    return hmac.compare_digest(given.encode(), key.encode())


def _given_key(headers: Headers) -> str | None:
    key = headers.get("x-api-key")
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return key if key is not None else token if scheme.lower() == "bearer" else None


class SameOriginMiddleware:
    """Refuse (403) what a web page on another site can make a browser send to this server.

    Keyless mode (the default) has no credential a browser lacks, so a page the annotator visits could post forms
    here (overwrite a final label, start a training) or, by DNS rebinding, read the API under its own host name.
    So every request must name this server in ``Host`` (a loopback name, an address when listening on all
    interfaces, or a ``--conf allowed_hosts`` name), and every state-changing one must come from this server's own
    origin (or a ``MONAI_LABEL_CORS_ORIGINS`` origin). Non-browser clients (3D Slicer, scripts) send no ``Origin``.
    """

    def __init__(self, app: ASGIApp, hosts: Iterable[str], any_address: bool, origins: Iterable[str]) -> None:
        self.app, self.hosts, self.any_address = app, {h.lower() for h in hosts}, any_address
        self.origins = {o.rstrip("/").lower() for o in origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        host = headers.get("host")
        if host is not None and not self._host_allowed(host):
            detail = f"Host {host[:100]!r} is not this server; add it with --conf allowed_hosts if it is"
            return await _refuse(403, detail, scope, receive, send)
        if scope["method"] not in SAFE_METHODS:
            origin = headers.get("origin")
            cross_site = headers.get("sec-fetch-site") in ("cross-site", "same-site")
            if (origin is not None and not self._origin_allowed(origin, host)) or (origin is None and cross_site):
                detail = f"cross-origin request from {str(origin)[:100]!r} refused: only this server's pages may post"
                return await _refuse(403, detail, scope, receive, send)
        await self.app(scope, receive, send)

    def _host_allowed(self, host: str) -> bool:
        try:
            name = urlsplit(f"//{host}").hostname or ""
        except ValueError:
            return False
        if name in self.hosts:
            return True
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            return False
        return self.any_address or address.is_loopback

    def _origin_allowed(self, origin: str, host: str | None) -> bool:
        if origin.rstrip("/").lower() in self.origins:
            return True
        try:
            parts = urlsplit(origin)
        except ValueError:
            return False
        return parts.scheme in ("http", "https") and host is not None and parts.netloc.lower() == host.lower()


class NameCheckMiddleware:
    """Answer 400 when a query's image, id, tag or label value is not a plain name (``../x``, ``/etc/x``) or its
    ``session_id`` is not a session id: MONAI Label joins them into datastore and session paths. With a
    ``session_id`` the ``image`` value is not used (MONAI Label's client sends the volume's display name there)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            query = Request(scope).query_params
            try:
                for key, value in query.multi_items():
                    if key == "session_id" and value:
                        check_session_id(value)
                    elif key in NAME_PARAMS and value and not (key == "image" and query.get("session_id")):
                        check_name(value, key)
            except InvalidRequest as e:
                return await _refuse(400, str(e), scope, receive, send)
        await self.app(scope, receive, send)


class InferenceQueue:
    """Admit at most ``size`` compute-bound requests (inference, batch inference, scoring) at once; the others get
    503 with ``Retry-After`` at once, their upload read and dropped, without a worker thread. Without a bound, 60
    concurrent inferences held 60 threads and 60 uploads, and other requests waited tens of seconds."""

    def __init__(self, app: ASGIApp, size: int, retry_after_s: int) -> None:
        self.app, self.size, self.retry_after_s = app, size, retry_after_s
        self.admitted = 0  # only changed on the server's event loop

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].startswith(QUEUED_PREFIXES):
            return await self.app(scope, receive, send)
        if self.admitted >= self.size:
            await _discard_body(receive)  # a reply before the upload is read would reset the connection
            detail = f"busy: {self.size} inference requests are running or queued; retry in {self.retry_after_s} s"
            headers = {"Retry-After": str(self.retry_after_s)}
            return await JSONResponse({"detail": detail}, 503, headers)(scope, receive, send)
        self.admitted += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.admitted -= 1


class ThreadedRequests:
    """Serve each HTTP request in a worker thread with its own event loop.

    MONAI Label's endpoints are ``async def`` but run inference, training set-up and file I/O synchronously, so
    one inference froze every other request, ``/info/`` included. ``receive`` and ``send`` are forwarded to the
    server's loop, which stays free to accept and answer other requests. ``/health/`` and ``/info/`` have threads
    of their own. An error that the app has already answered with a 500 is logged here, not re-raised: uvicorn
    closes the connection on it, and requests already sent on that keep-alive connection would fail.
    """

    def __init__(self, app: ASGIApp, light_threads: int = 4) -> None:
        self.app, self.light_threads = app, light_threads
        self._light: anyio.CapacityLimiter | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        started = False

        async def send_on_loop(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        def on_server_loop(fn: Any) -> Any:
            async def call(*args: Any) -> Any:
                return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(fn(*args), loop))

            return call

        if self._light is None:
            self._light = anyio.CapacityLimiter(self.light_threads)
        limiter = self._light if scope["path"].startswith(LIGHT_PATHS) else None
        coroutine = self.app(scope, on_server_loop(receive), on_server_loop(send_on_loop))
        try:
            await anyio.to_thread.run_sync(asyncio.run, coroutine, limiter=limiter)
        except Exception:
            logger.exception(f"{scope['method']} {scope['path']} failed")
            if not started:
                await _refuse(500, "internal error", scope, receive, send)


async def _discard_body(receive: Receive) -> None:
    message: dict = {"more_body": True}
    while message.get("more_body") and message.get("type") != "http.disconnect":
        message = await receive()


async def _refuse(status: int, detail: str, scope: Scope, receive: Receive, send: Send) -> None:
    await JSONResponse({"detail": detail}, status)(scope, receive, send)


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _client_error(_: Request, e: Exception) -> JSONResponse:
    retry = getattr(e, "retry_after_s", None)
    return _error(e.status, str(e), {"Retry-After": str(retry)} if retry else None)


def _monailabel_error(_: Request, e: MONAILabelException) -> JSONResponse:
    if isinstance(e, (ImageNotFoundException, LabelNotFoundException)):
        return _error(404, e.msg)
    bad_request = e.error in (MONAILabelError.INVALID_INPUT, MONAILabelError.APP_INIT_ERROR)
    return _error(400 if bad_request else 500, e.msg)


def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
    # FastAPI's own handler echoes the input and fails to encode a non-finite number in it (a 500)
    problems = "; ".join(f"{'.'.join(map(str, err.get('loc', ())))}: {err.get('msg', '')}" for err in e.errors())
    return _error(422, f"invalid request: {problems}")


def _unexpected_error(_: Request, e: Exception) -> JSONResponse:
    return _error(500, f"internal error: {type(e).__name__}: {e}")


EXCEPTION_HANDLERS = {
    **{cls: _client_error for cls in CLIENT_ERRORS},
    json.JSONDecodeError: lambda _, e: _error(400, f"params is not valid JSON: {e}"),
    RequestValidationError: _validation_error,
    NotImplementedError: lambda _, e: _error(405, str(e) or "not supported by this datastore"),
    MONAILabelException: _monailabel_error,
    Exception: _unexpected_error,
}


def harden(app: FastAPI, policy: ServerPolicy, host: str) -> None:
    """Install access control, same-origin and name checks, the inference queue, error handlers, an upload size
    limit and threaded requests into MONAI Label's running FastAPI app (listening on ``host``), and drop its
    allow-all CORS unless origins were configured."""
    origins = [str(o) for o in settings.MONAI_LABEL_CORS_ORIGINS]
    if not origins:
        app.user_middleware = [m for m in app.user_middleware if m.cls is not CORSMiddleware]
    for exc, handler in EXCEPTION_HANDLERS.items():
        app.add_exception_handler(exc, handler)
    app.max_body_size = policy.max_upload_mb * 1024 * 1024
    app.add_api_route(HEALTH_PATH, lambda: {"status": "ok"}, methods=["GET"], include_in_schema=False)
    stack = ThreadedRequests(app.build_middleware_stack())
    stack = InferenceQueue(stack, policy.infer_queue, policy.retry_after_s)
    stack = NameCheckMiddleware(stack)
    stack = AccessMiddleware(stack, policy.api_key, policy.admin_key)
    any_address = _is_wildcard(host)
    hosts = LOOPBACK_NAMES | policy.allowed_hosts | ({host} if not any_address else set())
    app.middleware_stack = SameOriginMiddleware(stack, hosts, any_address, origins)
    logger.info(
        f"server hardened: API key {'required' if policy.api_key else 'off'}, admin key "
        f"{'set' if policy.admin_key else 'off'}, uploads up to {policy.max_upload_mb} MB, "
        f"{policy.infer_queue} inference requests at once"
    )


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
    0.0.0.0, which exposes weights, uploads and deletions to the network. Runs before uvicorn binds its socket."""
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


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False
