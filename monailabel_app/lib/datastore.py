"""Datastores that keep ids and tags inside the studies folder and refuse unusable uploads (NOTES.md §6.5, 6.7)."""

from __future__ import annotations

import logging
import os
import pathlib
from typing import Any

from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.datastore.utils.convert import binary_to_image, nifti_to_dicom_seg
from monailabel.datastore.utils.dicom import dicom_web_upload_dcm
from monailabel.interfaces.datastore import DefaultLabelTag

from .validation import check_image, check_inside, check_label, check_name

logger = logging.getLogger(__name__)


class GuardedLocalDatastore(LocalDatastore):
    """LocalDatastore whose write and delete operations accept only plain ids and tags, and only valid files.

    MONAI Label joins ids and tags into paths unchecked, so ``../`` in a request writes or deletes outside the
    studies folder; uploads are stored unread. Here an image must be a readable 3D volume of sane size and a
    label must lie on its image's grid (see :mod:`lib.validation`); anything else raises before a file is touched.
    """

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        if image_id:
            check_name(image_id, "image id")
        check_image(image_filename)
        return super().add_image(image_id, image_filename, image_info)

    def remove_image(self, image_id: str) -> None:
        super().remove_image(check_name(image_id, "image id"))

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        check_name(image_id, "image id")
        check_name(label_tag, "label tag")
        image_uri = self.get_image_uri(image_id)
        if image_uri:  # an unknown image id is refused by the base class with its own message
            check_label(label_filename, image_uri)
        check_inside(self._datastore.label_path(label_tag), self._datastore_path, "label tag")
        return super().save_label(image_id, label_filename, label_tag, label_info)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        super().remove_label(check_name(label_id, "label id"), check_name(label_tag, "label tag"))


class GuardedDICOMWebDatastore(DICOMWebDatastore):
    """DICOMWebDatastore that checks ids, tags and labels as :class:`GuardedLocalDatastore`, and writes DICOM-SEG
    with pydicom-seg: MONAI Label's default path shells out to dcmqi's ``itkimage2segimage``, a binary it
    downloads at start-up, which fails offline (NOTES.md §6.6)."""

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
                label_info.update(self._upload_seg(image_id, label_filename, label_info))
            return LocalDatastore.save_label(self, image_id, label_filename, label_tag, label_info)
        finally:
            if converted:
                os.unlink(converted)

    def _upload_seg(self, image_id: str, label_filename: str, label_info: dict[str, Any]) -> dict[str, Any]:
        """Store the label as a DICOM-SEG series referencing the image series; returns the DICOM ids to record
        (none for an empty label, which DICOM-SEG cannot hold)."""
        series_dir = os.path.realpath(os.path.join(self._datastore.image_path(), image_id))
        seg_file = nifti_to_dicom_seg(series_dir, label_filename, label_info.get("label_info"), use_itk=False)
        if not seg_file:
            logger.warning(f"{image_id}: lesion-free label kept in the local cache only (a DICOM-SEG needs a segment)")
            return {}
        try:
            series_uid = dicom_web_upload_dcm(seg_file, self._client)
        finally:
            os.unlink(seg_file)
        image_info = self.get_image_info(image_id)
        keys = ("Modality", "PatientID", "StudyInstanceUID")
        return {"SeriesInstanceUID": series_uid, **{k: image_info.get(k) for k in keys}}
