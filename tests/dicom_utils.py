"""Synthetic CT series of the DICOM tests: any orientation and slice order, one file a slice."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def axial_affine(spacing: Sequence[float], origin: Sequence[float] = (-40.0, -30.0, 100.0)) -> np.ndarray:
    """Voxel (column, row, slice) to LPS mm of an axial series: rows run to the patient's left, columns to the
    back, slices up."""
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = origin
    return affine


def write_series(
    folder: Path, volume: np.ndarray, affine: np.ndarray, name_order: Sequence[int] | None = None, **attributes
) -> list[Path]:
    """Write ``volume`` (column, row, slice; HU) as a CT series whose voxel (i, j, k) lies at ``affine`` @ (i, j, k)
    in LPS mm; slice k goes to file ``IM{name_order[k]:04d}`` (default: reversed, so that a reader must sort by
    position); ``attributes`` are set on every slice (None deletes one). Returns the files in slice order."""
    folder.mkdir(parents=True, exist_ok=True)
    nx, ny, nz = volume.shape
    names = list(name_order) if name_order is not None else [nz - k for k in range(nz)]
    columns_mm, rows_mm = np.linalg.norm(affine[:3, :2], axis=0)
    orientation = np.concatenate([affine[:3, 0] / columns_mm, affine[:3, 1] / rows_mm])
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    files = []
    for k in range(nz):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta, ds.is_little_endian, ds.is_implicit_VR = meta, True, False
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientID, ds.PatientName, ds.PatientSex = "CT", "PHANTOM", "Phantom^Test", "O"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20260101", "120000", "ACC1", "S1"
        ds.Manufacturer, ds.InstitutionName, ds.StationName = "ACME", "Test Hospital", "CT1"
        ds.BodyPartExamined = "ABDOMEN"
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.ImageOrientationPatient = [round(float(v), 6) for v in orientation]
        ds.ImagePositionPatient = [round(float(v), 4) for v in affine[:3] @ [0, 0, k, 1]]
        ds.PixelSpacing = [round(float(rows_mm), 6), round(float(columns_mm), 6)]
        ds.SliceThickness = round(float(np.linalg.norm(affine[:3, 2])), 6)
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = np.ascontiguousarray(volume[:, :, k].T.astype(np.int32) + 1024).astype(np.int16).tobytes()
        for keyword, value in attributes.items():
            if value is not None:
                setattr(ds, keyword, value)
            elif keyword in ds:
                delattr(ds, keyword)
        path = folder / f"IM{names[k]:04d}"
        ds.save_as(path, write_like_original=False)
        files.append(path)
    return files
