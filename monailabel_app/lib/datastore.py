"""Datastores that keep ids and tags inside the studies folder, refuse unusable uploads, never replace an image
under its labels and keep what is deleted in a trash folder."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.datastore.utils.convert import binary_to_image
from monailabel.datastore.utils.dicom import dicom_web_upload_dcm
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.exception import ImageNotFoundException, LabelNotFoundException

from .errors import Conflict
from .validation import ImageLimits, check_image, check_inside, check_label, check_name, same_image

logger = logging.getLogger(__name__)

TRASH = ".trash"


class GuardedLocalDatastore(LocalDatastore):
    """LocalDatastore whose write and delete operations accept only plain ids and tags, and only valid files.

    MONAI Label joins ids and tags into paths unchecked, so ``../`` in a request writes or deletes outside the
    studies folder; uploads are stored unread; an upload under an existing id replaces the image and keeps its
    labels, now on another volume; deletion is final. Here an image must be a readable 3D volume within
    ``limits`` and a label must lie on its image's grid (see :mod:`lib.validation`); a different volume under an
    existing id is refused (:class:`Conflict`); deleted images and labels are moved to ``STUDIES/.trash/``.
    """

    def __init__(self, datastore_path: str, limits: ImageLimits = ImageLimits(), **kwargs: Any) -> None:
        self.limits = limits
        super().__init__(datastore_path, **kwargs)

    def has_image(self, image_id: str) -> bool:
        return image_id in self.list_images()

    @property
    def trash_path(self) -> str:
        return os.path.join(self._datastore_path, TRASH)

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        if image_id:
            check_name(image_id, "image id")
        check_image(image_filename, limits=self.limits)
        existing = self.get_image_uri(image_id) if image_id else ""
        if existing:
            if not same_image(existing, image_filename):
                raise Conflict(
                    f"image {image_id!r} exists with other voxels or geometry; its labels would no longer match. "
                    "Upload under a new id, or delete it first (it goes to the trash with its labels)"
                )
            return image_id  # the same volume again: keep the stored file and its labels
        return super().add_image(image_id, image_filename, image_info)

    def remove_image(self, image_id: str) -> None:
        obj = self._datastore.objects.get(check_name(image_id, "image id"))
        if not obj:
            raise ImageNotFoundException(f"Image {image_id} not found")
        files = [self.get_label_uri(image_id, tag) for tag in obj.labels] + [self.get_image_uri(image_id)]
        self._to_trash(image_id, files, obj.model_dump())

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        check_name(image_id, "image id")
        check_name(label_tag, "label tag")
        image_uri = self.get_image_uri(image_id)
        if image_uri:  # an unknown image id is refused by the base class with its own message
            check_label(label_filename, image_uri)
        check_inside(self._datastore.label_path(label_tag), self._datastore_path, "label tag")
        return super().save_label(image_id, label_filename, label_tag, label_info)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        uri = self.get_label_uri(check_name(label_id, "label id"), check_name(label_tag, "label tag"))
        if not uri:
            raise LabelNotFoundException(f"Label {label_id} with tag {label_tag} not found")
        self._to_trash(f"{label_id}.{label_tag}", [uri], {"label_id": label_id, "tag": label_tag})

    def purge_trash(self, max_age_days: float) -> None:
        """Delete trash entries older than ``max_age_days``."""
        if not os.path.isdir(self.trash_path):
            return
        cutoff = time.time() - max_age_days * 86400
        for entry in os.scandir(self.trash_path):
            if entry.is_dir(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                shutil.rmtree(entry.path)
                logger.info(f"trash: removed {entry.name} (older than {max_age_days} days)")

    def _to_trash(self, name: str, files: list[str], entry: dict[str, Any]) -> None:
        """Move ``files`` (paths in the studies folder) to a new trash entry, with ``entry`` as ``entry.json``."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        folder = os.path.join(self.trash_path, f"{stamp}_{name}")
        os.makedirs(folder)
        with open(os.path.join(folder, "entry.json"), "w") as f:
            json.dump(entry, f, indent=2, default=str)
        for path in filter(os.path.exists, files):
            relative = os.path.relpath(check_inside(path, self._datastore_path, "file"), self._datastore_path)
            os.makedirs(os.path.dirname(os.path.join(folder, relative)), exist_ok=True)
            shutil.move(path, os.path.join(folder, relative))
        logger.info(f"moved {name} to {folder}")
        self.refresh()


class StoredSyntaxClient(DICOMwebClientX):
    """Retrieves series in the transfer syntax they are stored in (JPEG 2000, JPEG, JPEG-LS, RLE, ...), which
    SimpleITK decodes when the cache converts them to NIfTI."""

    def retrieve_series(self, *args: Any, media_types: tuple | None = None, **kwargs: Any) -> list:
        # MONAI Label asks for Explicit VR Little Endian, so the server must decode compressed series: Debian's
        # Orthanc 1.10 answers 500 for JPEG 2000 without its GDCM plugin and crashes on it with the plugin.
        return super().retrieve_series(*args, media_types=media_types or (("application/dicom", "*"),), **kwargs)


class GuardedDICOMWebDatastore(DICOMWebDatastore):
    """DICOMWebDatastore that checks ids, tags and labels as :class:`GuardedLocalDatastore`, writes DICOM-SEG with
    ``seg_writer`` (:class:`lib.dicom_seg.BundleSegWriter`) and finds series stored since its listing was cached.

    MONAI Label's default DICOM-SEG path shells out to dcmqi's ``itkimage2segimage``, a binary it downloads at
    start-up, which fails offline; and it caches the series list for ``MONAI_LABEL_DICOMWEB_CACHE_EXPIRY`` seconds
    (2 h by default), so that a series stored meanwhile is "not found".
    """

    def __init__(self, *args: Any, seg_writer: Callable[[str, str, pathlib.Path], pathlib.Path | None], **kwargs):
        self.seg_writer = seg_writer
        super().__init__(*args, **kwargs)

    def has_image(self, image_id: str) -> bool:
        """Whether the server holds series ``image_id``; a miss in the cached list asks the server again."""
        if image_id in self.list_images():
            return True
        DICOMWebDatastore.list_images.cache_clear()
        return image_id in self.list_images()

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        raise NotImplementedError("images are added to the DICOMweb server (e.g. Orthanc), not through MONAI Label")

    def remove_image(self, image_id: str) -> None:
        raise NotImplementedError("images are removed on the DICOMweb server (e.g. Orthanc), not through MONAI Label")

    def remove_label(self, label_id: str, label_tag: str) -> None:
        super().remove_label(check_name(label_id, "label id"), check_name(label_tag, "label tag"))

    def save_label(
        self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any], label_id: str = ""
    ) -> str:
        check_name(image_id, "image id")
        check_name(label_tag, "label tag")
        image_uri = self.get_image_uri(image_id)
        converted = ""
        if "".join(pathlib.Path(label_filename).suffixes) == ".bin":  # OHIF sends raw voxels
            label_filename = converted = binary_to_image(image_uri, label_filename)
        try:
            check_label(label_filename, image_uri)
            if label_tag == DefaultLabelTag.FINAL:
                label_info.update(self._upload_seg(image_id, label_filename))
                DICOMWebDatastore.get_labeled_images.cache_clear()  # the image is labelled now
            return LocalDatastore.save_label(self, image_id, label_filename, label_tag, label_info)
        finally:
            if converted:
                os.unlink(converted)

    def _upload_seg(self, image_id: str, label_filename: str) -> dict[str, Any]:
        """Store the label as a DICOM-SEG series referencing the image series; returns the DICOM ids to record
        (none for an empty label, which DICOM-SEG cannot hold)."""
        series_dir = os.path.realpath(os.path.join(self._datastore.image_path(), image_id))
        with tempfile.TemporaryDirectory() as tmp:
            seg_file = self.seg_writer(series_dir, label_filename, pathlib.Path(tmp, "seg.dcm"))
            if seg_file is None:
                logger.warning(
                    f"{image_id}: lesion-free label kept in the local cache only (a DICOM-SEG needs a segment)"
                )
                return {}
            series_uid = dicom_web_upload_dcm(str(seg_file), self._client)
        image_info = self.get_image_info(image_id)
        keys = ("Modality", "PatientID", "StudyInstanceUID")
        return {"SeriesInstanceUID": series_uid, **{k: image_info.get(k) for k in keys}}
