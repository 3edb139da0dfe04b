"""DICOM in and out of screening. A folder (or one file) of CT slices is checked to be one complete, regular
series before it is screened; the results go back as DICOM that a PACS and a viewer can take: the lesion mask as a
DICOM-SEG on the source slices (written with pydicom-seg) and the overview picture as a Secondary Capture, each a
new series in the source study, with the patient and study attributes of the source and nothing else about them."""

from __future__ import annotations

import copy
import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pydicom
import pydicom_seg
import SimpleITK as sitk
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from .report import _atomic_write

SEG_SERIES_NUMBER, SC_SERIES_NUMBER = 9901, 9902  # high numbers: listed after the scanner's own series
POSITION_TOL = 0.1  # a slice may lie this fraction of the slice step off the uniform grid, or of a pixel sideways
GRID_TOL = 0.25  # voxels: the loaded volume and the DICOM slices must agree this closely
OVERVIEW_TITLE_ROWS = 36  # rows of report.render_overview's PNG above the panel titles: its title, naming the file
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # MONAI / NIfTI world (RAS) to DICOM patient coordinates (LPS)
# Copied from the source: the Patient, Patient Study and General Study modules, and the body part examined.
PATIENT_STUDY = (
    "SpecificCharacterSet", "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "PatientAge", "PatientSize", "PatientWeight", "StudyInstanceUID", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription", "BodyPartExamined",
)  # fmt: skip
TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
         "ReferringPhysicianName", "StudyID", "AccessionNumber")  # fmt: skip
# pydicom-seg copies the scanner's equipment and asks for clinical-trial ids; neither describes this result.
NOT_OURS = ("InstitutionName", "InstitutionAddress", "StationName", "InstitutionalDepartmentName",
            "ClinicalTrialSeriesID", "ClinicalTrialTimePointID", "ClinicalTrialCoordinatingCenterName")  # fmt: skip
UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")


class DicomSeriesError(ValueError):
    """A DICOM series that cannot be screened or referenced, with the reason."""


@dataclass(frozen=True)
class ResultInfo:
    """What the DICOM outputs say about their maker and their segment, from the bundle's ``metadata.json``."""

    name: str
    version: str
    segment_label: str

    @classmethod
    def from_metadata(cls, path: str | os.PathLike) -> ResultInfo:
        meta = json.loads(Path(path).read_text())
        channels = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
        return cls(meta["name"], meta["version"], channels["1"])


def sort_slices(positions: np.ndarray, orientation: Sequence[float], pixel_spacing: Sequence[float]) -> np.ndarray:
    """Order of the slices along their normal; raises ValueError with the reason for slices that do not form a
    regular volume: fewer than two, two at one position, missing slices, non-uniform spacing or gantry tilt.

    ``positions`` (n, 3) are the ImagePositionPatient of the slices, ``orientation`` their (shared)
    ImageOrientationPatient and ``pixel_spacing`` their PixelSpacing, all in mm.
    """
    positions = np.asarray(positions, float).reshape(-1, 3)
    if len(positions) < 2:
        raise ValueError(f"{len(positions)} slice(s) do not make a CT volume.")
    row, column = np.asarray(orientation, float)[:3], np.asarray(orientation, float)[3:]
    normal = np.cross(row, column)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    steps = np.diff(along)
    if steps.min() < 1e-3:
        at = along[np.argmin(steps)]
        raise ValueError(f"{int(np.sum(np.isclose(along, at, atol=1e-3)))} slices at the same position ({at:.2f} mm).")
    step = float(np.median(steps))
    gaps = np.nonzero(steps > (1 + 2 * POSITION_TOL) * step)[0]
    if len(gaps) and np.all(np.abs(steps[gaps] / step - np.round(steps[gaps] / step)) <= POSITION_TOL):
        missing = int(np.sum(np.round(steps[gaps] / step) - 1))
        where = ", ".join(f"{along[g]:.2f}..{along[g + 1]:.2f} mm" for g in gaps)
        raise ValueError(f"{missing} missing slice(s): gaps of a multiple of the {step:.3g} mm slice step at {where}.")
    uniform = along[0] + np.arange(len(along)) * (along[-1] - along[0]) / (len(along) - 1)
    if np.abs(along - uniform).max() > POSITION_TOL * step:
        raise ValueError(f"non-uniform slice spacing: steps from {steps.min():.3g} to {steps.max():.3g} mm.")
    offsets = positions - positions[0]
    sideways = np.linalg.norm(offsets - np.outer(offsets @ normal, normal), axis=1)
    if sideways.max() > POSITION_TOL * min(map(float, pixel_spacing)):
        tilt = np.degrees(np.arctan2(sideways[-1], along[-1] - along[0]))
        raise ValueError(
            f"gantry tilt: the slices move {sideways.max():.2f} mm sideways over {along[-1] - along[0]:.1f} mm "
            f"({tilt:.1f} degrees off their normal); reconstruct without tilt or resample to a regular grid first."
        )
    return order


def _read_header(path: Path) -> Dataset:
    """The header of one DICOM file, without its pixel data; files without the DICOM preamble are accepted as ITK
    does. A file shorter than its pixel data is refused: ITK would leave that slice out without a word."""
    header = None
    try:
        header = pydicom.dcmread(path, defer_size=1024)
    except InvalidDicomError:
        try:
            header = pydicom.dcmread(path, defer_size=1024, force=True)
        except Exception:  # any parser error here means the same: not DICOM
            pass
    if header is None or "Rows" not in header:
        raise ValueError(f"{path.name} is not a DICOM file.")
    pixels = header.get_item("PixelData")  # still raw (position and length in the file) unless read whole
    if isinstance(pixels, RawDataElement) and pixels.length != 0xFFFFFFFF:
        end = pixels.value_tell + pixels.length
        if end > path.stat().st_size:
            raise ValueError(f"{path.name} is truncated: its pixel data end {end} bytes in, the file is shorter.")
    if pixels is not None:
        del header["PixelData"]  # a header is all that is kept
    return header


def _uid(header: Dataset, keyword: str) -> str:
    return str(header.get(keyword, "") or "").strip()


@dataclass(frozen=True)
class DicomSeries:
    """The headers of one checked series, sorted along the slice normal (the order ITK loads them in)."""

    folder: Path
    headers: tuple[Dataset, ...]

    @property
    def files(self) -> list[Path]:
        return [Path(h.filename) for h in self.headers]

    def lps_affine(self) -> np.ndarray:
        """Voxel (column, row, slice) to patient coordinates (LPS, mm) of the sorted slices."""
        first, last = self.headers[0], self.headers[-1]
        orientation = np.asarray(first.ImageOrientationPatient, float)
        row_mm, column_mm = map(float, first.PixelSpacing)
        origin = np.asarray(first.ImagePositionPatient, float)
        affine = np.eye(4)
        affine[:3, 0], affine[:3, 1] = orientation[:3] * column_mm, orientation[3:] * row_mm
        affine[:3, 2] = (np.asarray(last.ImagePositionPatient, float) - origin) / max(len(self.headers) - 1, 1)
        affine[:3, 3] = origin
        return affine

    def check_grid(self, shape: Sequence[int], affine: np.ndarray) -> None:
        """Raise unless a volume of ``shape`` with ``affine`` (voxel to RAS mm, as MONAI loads it) has one voxel
        slice on each DICOM slice, in-plane axes along the DICOM columns and rows: what a DICOM-SEG frame needs."""
        expected = self.lps_affine()
        to_voxel = np.linalg.inv(LPS_FROM_RAS @ np.asarray(affine, float))
        origins = np.array([list(map(float, h.ImagePositionPatient)) + [1.0] for h in self.headers])
        voxels = (to_voxel @ origins.T).T[:, :3]  # of each slice's first pixel: (0, 0, k) on a matching grid
        in_plane = to_voxel[:3, :3] @ expected[:3, :2]  # one column / row step of the DICOM grid, in voxels
        n = len(self.headers)
        if (
            tuple(shape) != (self.headers[0].Columns, self.headers[0].Rows, n)
            or not np.allclose(in_plane, np.eye(3)[:, :2], atol=1e-3)
            or not np.allclose(voxels, np.c_[np.zeros((n, 2)), np.arange(n)], atol=GRID_TOL)
        ):
            raise DicomSeriesError(
                f"{self.folder}: the loaded volume (shape {tuple(shape)}) does not lie on the {n} DICOM slices "
                f"({self.headers[0].Columns} x {self.headers[0].Rows}); their first pixels are at its voxels "
                f"{np.round(voxels[:3], 2).tolist()}..."
            )

    def require_uids(self) -> None:
        """Raise unless every slice has the UIDs a DICOM-SEG must reference, one study and frame of reference."""
        missing = [k for k in UIDS if any(not _uid(h, k) for h in self.headers)]
        if missing:
            raise DicomSeriesError(
                f"{self.folder}: cannot write DICOM output: the slices lack {', '.join(missing)}, which the "
                "DICOM-SEG must reference; screen it with --output_format nifti, or give the series its UIDs."
            )
        for keyword in ("StudyInstanceUID", "FrameOfReferenceUID"):
            if len({_uid(h, keyword) for h in self.headers}) > 1:
                raise DicomSeriesError(f"{self.folder}: the slices of one series have different {keyword}s.")
        if len({_uid(h, "SOPInstanceUID") for h in self.headers}) < len(self.headers):
            raise DicomSeriesError(f"{self.folder}: two slices share a SOPInstanceUID.")

    def stage(self, folder: Path) -> Path:
        """Links to exactly these files in ``folder`` (created), so that the loader reads this series and nothing
        else, and names the case after ``folder``."""
        folder.mkdir(parents=True)
        for i, path in enumerate(self.files):
            (folder / f"{i:05d}.dcm").symlink_to(path.resolve())
        return folder


def read_series(path: str | os.PathLike) -> DicomSeries:
    """Check and sort the DICOM series in folder ``path``, or the series of file ``path`` in its folder.

    Refused, with the folder and the reason: files that are not DICOM or truncated, several series (unless ``path``
    picks one), multi-frame images, slices without a position or with different orientations, sizes or pixel
    spacings, and what :func:`sort_slices` refuses. Hidden files and DICOMDIR are skipped.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != "DICOMDIR" and p.name[0] != ".")
        if not files:
            raise ValueError("no DICOM files.")
        headers = [_read_header(p) for p in files]
        by_series = Counter(_uid(h, "SeriesInstanceUID") for h in headers)
        if path.is_file():
            chosen = _uid(_read_header(path), "SeriesInstanceUID")
            headers = [h for h in headers if _uid(h, "SeriesInstanceUID") == chosen]
        elif len(by_series) > 1:
            listed = ", ".join(f"{uid or '(none)'}: {n} files" for uid, n in by_series.most_common())
            raise ValueError(
                f"mixed series, {len(by_series)} in one folder ({listed}); point --input at one file of the series "
                "to screen, or give each series its own folder."
            )
        return DicomSeries(folder, tuple(_sorted_slices(headers)))
    except ValueError as e:
        raise DicomSeriesError(f"DICOM series {folder}: {e}") from None  # the reason is in the message


def _sorted_slices(headers: list[Dataset]) -> list[Dataset]:
    for h in headers:
        if int(h.get("NumberOfFrames", 1) or 1) > 1:
            raise ValueError(f"{Path(h.filename).name} is a multi-frame image; convert it to one file a slice first.")
        lacking = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing") if k not in h]
        if lacking:
            raise ValueError(f"{Path(h.filename).name} has no {', '.join(lacking)}: not a slice of a CT volume.")
    first = headers[0]
    for keyword, same in (
        ("ImageOrientationPatient", lambda a, b: np.allclose(np.asarray(a, float), np.asarray(b, float), atol=1e-4)),
        ("PixelSpacing", lambda a, b: np.allclose(np.asarray(a, float), np.asarray(b, float), rtol=1e-4)),
        ("Rows", lambda a, b: a == b),
        ("Columns", lambda a, b: a == b),
    ):
        odd = [Path(h.filename).name for h in headers if not same(h.get(keyword), first.get(keyword))]
        if odd:
            raise ValueError(f"the slices differ in {keyword} ({len(odd)} unlike the first, e.g. {odd[0]}).")
    positions = np.array([list(map(float, h.ImagePositionPatient)) for h in headers])
    order = sort_slices(positions, list(map(float, first.ImageOrientationPatient)), first.PixelSpacing)
    return [headers[i] for i in order]


def _new_instance(target: Dataset, source: Dataset, info: ResultInfo, series_number: int, description: str) -> None:
    """Patient and study attributes of ``source`` (empty Type 2 ones where it lacks them), and the series and
    equipment attributes of a new result series made by this bundle."""
    for keyword in PATIENT_STUDY:
        if keyword in target:
            del target[keyword]
        if keyword in source:
            target[keyword] = copy.deepcopy(source[keyword])
    for keyword in TYPE2:
        if keyword not in target:
            setattr(target, keyword, "")
    for keyword in NOT_OURS:
        if keyword in target:
            del target[keyword]
    now = datetime.now()
    target.SeriesNumber, target.InstanceNumber, target.SeriesDescription = series_number, 1, description
    target.SeriesDate = target.ContentDate = target.InstanceCreationDate = now.strftime("%Y%m%d")
    target.SeriesTime = target.ContentTime = target.InstanceCreationTime = now.strftime("%H%M%S")
    target.Manufacturer, target.ManufacturerModelName = "GF-Screen for MONAI", info.name
    target.SoftwareVersions = [info.version, f"pydicom-seg {pydicom_seg.__version__}"]


def write_seg(
    mask: np.ndarray, affine: np.ndarray, series: DicomSeries, path: str | os.PathLike, info: ResultInfo
) -> Path | None:
    """Write the binary ``mask`` (on the grid of ``affine``, voxel to RAS mm, as the screening saves it) as a
    DICOM-SEG of one segment on every slice of ``series``, in its study and frame of reference; None (no file)
    for an empty mask, which a DICOM-SEG cannot hold as a segment."""
    mask = np.asarray(mask) > 0
    if not mask.any():
        return None
    series.require_uids()
    series.check_grid(mask.shape, affine)
    lps = LPS_FROM_RAS @ np.asarray(affine, float)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(mask.transpose(2, 1, 0), dtype=np.uint8))
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    image.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    segment = {
        "labelID": 1,
        "SegmentLabel": info.segment_label,
        "SegmentDescription": f"{info.segment_label} ({info.name} {info.version})",
        "SegmentAlgorithmType": "AUTOMATIC",
        "SegmentAlgorithmName": info.name,
        "SegmentedPropertyCategoryCodeSequence": {
            "CodeValue": "49755003", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Morphologically Altered Structure"
        },
        "SegmentedPropertyTypeCodeSequence": {
            "CodeValue": "52988006", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Lesion"
        },
        "recommendedDisplayRGBValue": [0, 255, 0],  # the lime of the overview's contours
    }  # fmt: skip
    metainfo = {"ContentLabel": "LESIONS", "ContentDescription": f"{info.name} {info.version}"}
    template = pydicom_seg.template.from_dcmqi_metainfo({**metainfo, "segmentAttributes": [[segment]]})
    writer = pydicom_seg.MultiClassWriter(template, inplane_cropping=False, skip_empty_slices=False)
    # pydicom-seg 0.4.1 shares the first source's elements, then gives them new values (a new frame of reference
    # UID among them): it gets a copy of that header, and the frame of reference is set back.
    first = series.headers[0]
    seg = writer.write(image, [copy.deepcopy(first), *series.headers[1:]])
    seg.FrameOfReferenceUID = first.FrameOfReferenceUID
    _new_instance(seg, first, info, SEG_SERIES_NUMBER, f"{info.name}: {info.segment_label} (research use)")
    seg.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
    seg.ContentCreatorName = ""
    return _atomic_write(path, lambda stream: seg.save_as(stream, write_like_original=False))


def result_lines(report: Mapping[str, Any], info: ResultInfo, most: int = 8) -> list[str]:
    """The screening result in three lines of text: verdict and score, lesion volumes, windows focused."""
    volumes = [f"{lesion['volume_ml']:.2f}" for lesion in report["lesions"]]
    more = f" and {len(volumes) - most} more" if len(volumes) > most else ""
    count = f"{len(volumes)} lesion{'s' if len(volumes) != 1 else ''}"
    windows = report["windows"]
    return [
        f"{info.name} {info.version}: {report['verdict']} (score {report['score']:.2f})",
        f"{count}: {', '.join(volumes[:most])} mL{more}" if volumes else "no lesions",
        f"Glance focused {windows['kept']} of {windows['total']} windows. Research use only, not for diagnosis.",
    ]


def overview_picture(png: str | os.PathLike, lines: Sequence[str]) -> np.ndarray:
    """The overview PNG of :func:`scripts.report.render_overview` as RGB uint8 pixels, its title (which names the
    input file) replaced by ``lines``: the text burnt into a DICOM picture identifies nothing."""
    body = matplotlib.image.imread(str(png))[OVERVIEW_TITLE_ROWS:, :, :3]
    line_px, margin = 22, 10
    height, width = body.shape[0] + 2 * margin + line_px * len(lines), body.shape[1]
    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    canvas = FigureCanvasAgg(fig)
    fig.figimage(body, xo=0, yo=0)
    for i, line in enumerate(lines):
        y = 1 - (margin + i * line_px) / height
        fig.text(12 / width, y, line, va="top", fontsize=12 if i == 0 else 11, weight="bold" if i == 0 else "normal")
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[:, :, :3].copy()


def write_secondary_capture(
    picture: np.ndarray, series: DicomSeries, path: str | os.PathLike, info: ResultInfo
) -> Path:
    """Write an RGB ``picture`` (rows, columns, 3; uint8) as a Secondary Capture image, a new series in the study
    of ``series``."""
    picture = np.ascontiguousarray(picture, dtype=np.uint8)
    if picture.ndim != 3 or picture.shape[2] != 3:
        raise ValueError(f"picture must be RGB pixels (rows, columns, 3), got shape {picture.shape}.")
    series.require_uids()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.is_little_endian, ds.is_implicit_VR = meta, True, False
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    _new_instance(ds, series.headers[0], info, SC_SERIES_NUMBER, f"{info.name}: overview (research use)")
    ds.SeriesInstanceUID, ds.Modality, ds.ConversionType = generate_uid(), "OT", "WSD"
    ds.ImageType, ds.PatientOrientation, ds.BurnedInAnnotation = ["DERIVED", "SECONDARY"], "", "NO"
    ds.Rows, ds.Columns = picture.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = picture.tobytes()
    return _atomic_write(path, lambda stream: ds.save_as(stream, write_like_original=False))
