"""Labels stored as DICOM-SEG by the bundle's own writer (``scripts.dicom_output``), as ``scripts.cli.screen`` stores its
results: one segment named after the bundle's label 1 ("lesion"), in the CT's study and frame of reference,
referencing its series and slices.

MONAI Label's ``nifti_to_dicom_seg`` names a segment from the request's ``label_info`` ("unknown" without it) and,
through pydicom-seg 0.4.1, gives the SEG a new Frame of Reference UID, unlike the CT it lies on.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import InvalidUpload
from .infers.gf_screen import bundle_on_path


class BundleSegWriter:
    """Write a binary label on a DICOM series' grid as a DICOM-SEG of that series, with the bundle's writer."""

    def __init__(self, bundle_dir: str) -> None:
        with bundle_on_path(bundle_dir):
            self._module = importlib.import_module("scripts.dicom_output")
        self.info = self._module.ResultInfo.from_metadata(Path(bundle_dir, "configs", "metadata.json"))

    @property
    def segment_label(self) -> str:
        return self.info.segment_label

    def __call__(self, series_dir: str | os.PathLike, label_file: str | os.PathLike, output: Path) -> Path | None:
        """Write ``label_file`` (a volume on the grid of the series in ``series_dir``) to ``output``; None (no
        file) for a label without foreground, which a DICOM-SEG segment cannot hold. A series that a DICOM-SEG
        cannot reference (e.g. slices without Study, Series, SOP Instance or Frame of Reference UIDs) or a label
        off its slices: :class:`InvalidUpload` with the reason."""
        label = nib.load(str(label_file))
        mask = np.asarray(label.dataobj) > 0
        try:
            series = self._module.read_series(series_dir)
            return self._module.write_seg(mask, label.affine, series, output, self.info)
        except self._module.DicomSeriesError as e:  # named by the series folder's name (its UID), not its path
            reason = str(e).replace(str(Path(series_dir).parent) + os.sep, "")
            raise InvalidUpload(f"cannot store the label as DICOM-SEG: {reason}") from None
