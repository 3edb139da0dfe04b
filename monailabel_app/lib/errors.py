"""Errors that the server answers with a 4xx or 503 and their message, instead of a bare 500."""

from __future__ import annotations


class InvalidRequest(ValueError):
    """A request value the server refuses (HTTP 400)."""

    status = 400


class InvalidUpload(ValueError):
    """An uploaded or stored file that is not a usable image or label (HTTP 422)."""

    status = 422


class Forbidden(PermissionError):
    """An operation this server does not allow to this caller (HTTP 403)."""

    status = 403


class Conflict(ValueError):
    """A write that would replace or contradict data already stored (HTTP 409)."""

    status = 409


class Unavailable(RuntimeError):
    """The server cannot serve the request now: busy, or its weights are missing (HTTP 503)."""

    status = 503

    def __init__(self, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message, retry_after_s)  # every argument, so pickle and copy rebuild it
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        return str(self.args[0])


CLIENT_ERRORS = (InvalidRequest, InvalidUpload, Forbidden, Conflict, Unavailable)
