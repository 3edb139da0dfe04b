"""Files clients upload: saved in a private temporary folder under their own names, removed whatever happens, and
tracked, so that inference reads an uploaded file because the server received it, never because of where it is."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from fastapi import UploadFile

MAX_FILENAME = 120


class ReceivedFiles:
    """The paths of files received by requests now being served (uploads and session images)."""

    def __init__(self) -> None:
        self._paths: dict[str, int] = {}
        self._lock = threading.Lock()

    @contextmanager
    def hold(self, path: str | os.PathLike) -> Iterator[str]:
        """Track ``path`` while the block runs; yields it as a string."""
        real = os.path.realpath(path)
        with self._lock:
            self._paths[real] = self._paths.get(real, 0) + 1
        try:
            yield str(path)
        finally:
            with self._lock:
                self._paths[real] -= 1
                if not self._paths[real]:
                    del self._paths[real]

    def __contains__(self, path: object) -> bool:
        with self._lock:
            return isinstance(path, str) and os.path.realpath(path) in self._paths


RECEIVED = ReceivedFiles()


@contextmanager
def saved(files: Sequence[UploadFile]) -> Iterator[list[Path]]:
    """Save uploads into a new temporary folder (``…/upload/NAME``, NAME the client's base file name, so messages
    name the user's file) and remove it when the block ends, also on error: MONAI Label's endpoints remove their
    temporary files in background tasks, which never run when the request fails."""
    with tempfile.TemporaryDirectory(prefix="gf-screen-") as tmp:
        folder = Path(tmp) / "upload"
        folder.mkdir()
        paths = []
        for i, upload in enumerate(files):
            name = _plain_name(upload.filename, i)
            path = folder / (name if not (folder / name).exists() else f"{i}-{name}")
            with open(path, "wb") as out:
                shutil.copyfileobj(upload.file, out)
            paths.append(path)
        yield paths


def _plain_name(filename: str | None, index: int) -> str:
    """The base name of a client's file name (any path dropped), printable and short, keeping its extensions."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1].strip()
    if not name or name in (".", "..") or not name.isprintable():
        return f"upload{index}"
    return name[-MAX_FILENAME:]
