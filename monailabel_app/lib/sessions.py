"""Sessions (an image a client sends once and infers on several times) whose ids and archives stay in their folder."""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

from monailabel.utils.sessions import SessionInfo, Sessions

from .errors import InvalidUpload
from .validation import ImageLimits, check_image, check_session_id

MAX_ARCHIVE_FILES = 10000  # a DICOM series of 10000 slices


class GuardedSessions(Sessions):
    """MONAI Label's sessions, except that an id which is not a UUID (the form MONAI Label creates) is never
    looked up (MONAI Label joins it to the sessions folder and deletes what it finds there), that archives are
    unpacked by :func:`extract_archive`, and that a session holds only an image within ``limits`` (one file, or a
    folder with a DICOM series)."""

    def __init__(self, store_path: str, expiry: int, limits: ImageLimits, max_bytes: int) -> None:
        super().__init__(store_path, expiry)
        self.limits, self.max_bytes = limits, max_bytes

    def get_session(self, session_id: str, update_ts: bool = True, fetch_cache: bool = True) -> SessionInfo | None:
        if not _is_session_id(session_id):
            return None
        return super().get_session(session_id, update_ts, fetch_cache)

    def remove_session(self, session_id: str) -> None:
        if _is_session_id(session_id):
            super().remove_session(session_id)

    def add_session(self, data_file: str, expiry: int = 0, uncompress: bool = False, session_id: Any = None):
        with tempfile.TemporaryDirectory(prefix="gf-screen-") as tmp:
            if uncompress:  # MONAI Label's shutil.unpack_archive writes tar members named ../x outside the folder
                image = Path(tmp) / "image"
                extract_archive(data_file, image, self.max_bytes)
                files = [p for p in image.rglob("*") if p.is_file()]
                data_file = str(files[0] if len(files) == 1 else image)
            check_image(data_file, read_voxels=False, limits=self.limits)
            return super().add_session(data_file, expiry, False, session_id)


def _is_session_id(value: str) -> bool:
    try:
        check_session_id(value)
        return True
    except ValueError:
        return False


def extract_archive(archive: str | os.PathLike, dest: str | os.PathLike, max_bytes: int) -> None:
    """Unpack a zip or tar archive into ``dest``, refusing the whole archive (:class:`InvalidUpload`) if a member is
    not a plain file or folder (links, devices), names an absolute path or ``..``, or if it unpacks to more than
    ``max_bytes`` or :data:`MAX_ARCHIVE_FILES` files."""
    archive, dest = Path(archive), Path(dest)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            members = [(i.filename, i.is_dir(), i.file_size, _zip_is_link(i)) for i in z.infolist()]
            _check_members(archive.name, members, max_bytes)
            for info in z.infolist():
                if not info.is_dir():
                    _write(dest / _relative(info.filename), z.open(info))
        return
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            _check_members(
                archive.name, [(m.name, m.isdir(), m.size, not (m.isfile() or m.isdir())) for m in members], max_bytes
            )
            for m in members:
                if m.isfile():
                    _write(dest / _relative(m.name), tar.extractfile(m))
    except tarfile.TarError as e:
        raise InvalidUpload(f"{archive.name}: not a zip or tar archive ({e})") from e


def _check_members(name: str, members: list[tuple[str, bool, int, bool]], max_bytes: int) -> None:
    files = [m for m in members if not m[1]]
    if not files:
        raise InvalidUpload(f"{name}: the archive holds no file")
    if len(files) > MAX_ARCHIVE_FILES or sum(m[2] for m in files) > max_bytes:
        raise InvalidUpload(f"{name}: the archive unpacks to more than {MAX_ARCHIVE_FILES} files or {max_bytes} bytes")
    for member, _, _, special in members:
        if special:
            raise InvalidUpload(f"{name}: member {member!r} is a link or special file; only files and folders go")
        _relative(member, name)


def _relative(member: str, archive: str = "archive") -> PurePosixPath:
    path = PurePosixPath(member.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or not path.parts or ":" in path.parts[0]:
        raise InvalidUpload(f"{archive}: member {member!r} would be written outside the session folder")
    return path


def _zip_is_link(info: zipfile.ZipInfo) -> bool:
    mode = info.external_attr >> 16
    return (mode & 0o170000) not in (0, 0o100000, 0o040000)  # anything but unset, a regular file or a folder


def _write(path: Path, source: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with source, open(path, "wb") as out:
        shutil.copyfileobj(source, out)
