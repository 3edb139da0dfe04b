"""DICOM in and out (scripts.dicom_output): which series are refused and why, the DICOM-SEG read back equals the
mask on the source slices for axial and for sagittal, reversed series, and the Secondary Capture shows the result
without the file name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pydicom_seg
import pytest
import SimpleITK as sitk
from pydicom.uid import SecondaryCaptureImageStorage, SegmentationStorage

from dicom_utils import axial_affine, write_series
from scripts.dicom_output import (
    LPS_FROM_RAS,
    OVERVIEW_TITLE_ROWS,
    DicomSeriesError,
    ResultInfo,
    overview_picture,
    read_series,
    result_lines,
    sort_slices,
    write_secondary_capture,
    write_seg,
)
from scripts.report import render_overview
from scripts.transforms import LoadCTd

BUNDLE_ROOT = Path(__file__).resolve().parents[1] / "bundle"
REAL_DICOM = Path(__file__).resolve().parents[2] / "shared/data/realct/dicom/totalseg_example_ct_dicom_clean"
INFO = ResultInfo("GF-Screen test", "9.9.9", "lesion")
AXIAL = [1, 0, 0, 0, 1, 0]
# sagittal: columns run to the back, rows down, slices stacked to the patient's left, against the normal (right)
SAGITTAL_REVERSED = np.array([[0, 0, 2.0, -5.0], [1.5, 0, 0, 3.0], [0, -1.2, 0, 100.0], [0, 0, 0, 1]])


def _volume(shape=(20, 16, 10), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 100, shape).round()


def test_result_info_reads_the_bundle_metadata():
    info = ResultInfo.from_metadata(BUNDLE_ROOT / "configs" / "metadata.json")
    meta = json.loads((BUNDLE_ROOT / "configs" / "metadata.json").read_text())
    assert (info.name, info.version) == (meta["name"], meta["version"])
    assert info.segment_label == meta["network_data_format"]["outputs"]["pred"]["channel_def"]["1"] == "lesion"


@pytest.mark.parametrize(
    "positions, orientation, order",
    [
        ([[0, 0, 10], [0, 0, 0], [0, 0, 5]], AXIAL, [1, 2, 0]),  # feet to head
        ([[0, 0, 10], [0, 0, 0], [0, 0, 5]], [1, 0, 0, 0, -1, 0], [0, 2, 1]),  # normal (0, 0, -1): head to feet
        ([[-5, 0, 0], [3, 0, 0], [-1, 0, 0]], [0, 1, 0, 0, 0, -1], [1, 2, 0]),  # sagittal, normal (-1, 0, 0)
    ],
)
def test_sort_slices_orders_along_the_normal(positions, orientation, order):
    np.testing.assert_array_equal(sort_slices(np.array(positions, float), orientation, (0.5, 0.5)), order)


@pytest.mark.parametrize(
    "z, message",
    [
        ([0], "1 slice(s) do not make a CT volume"),
        ([0, 5, 5, 10], "2 slices at the same position (5.00 mm)"),
        ([0, 5, 15, 20], "1 missing slice(s): gaps of a multiple of the 5 mm slice step at 5.00..15.00 mm"),
        ([0, 5, 10, 25, 30], "2 missing slice(s)"),
        ([0, 5, 10, 12.5, 15], "non-uniform slice spacing: steps from 2.5 to 5 mm"),
        ([0, 3, 5, 8, 10], "non-uniform slice spacing: steps from 2 to 3 mm"),
    ],
)
def test_sort_slices_refuses_irregular_slices(z, message):
    positions = np.array([[0.0, 0.0, v] for v in z])
    with pytest.raises(ValueError) as error:
        sort_slices(positions[::-1], AXIAL, (0.5, 0.5))
    assert message in str(error.value)


def test_sort_slices_refuses_gantry_tilt_and_accepts_rounding():
    tilted = np.array([[0.0, 1.0 * k, 5.0 * k] for k in range(3)])  # 1 mm sideways a 5 mm step: atan(1/5)
    with pytest.raises(ValueError, match=r"gantry tilt: the slices move 2.00 mm sideways over 10.0 mm \(11.3 degrees"):
        sort_slices(tilted, AXIAL, (0.5, 0.5))
    # positions written with 0.01 mm rounding (a slice step of 0.625 mm): a regular series
    rounded = np.array([[0.004 * (k % 2), 0.0, round(0.625 * k, 2)] for k in range(40)])
    np.testing.assert_array_equal(sort_slices(rounded, AXIAL, (0.7, 0.7)), np.arange(40))


def _break(folder: Path, how: str) -> str:
    """Damage a written series in one way; returns what the error must say."""
    files = sorted(folder.iterdir())
    if how == "mixed":
        write_series(folder, _volume((20, 16, 3)), axial_affine((1, 1, 2)), name_order=[101, 102, 103])
        return "mixed series, 2 in one folder"
    if how == "missing":
        (folder / "IM0005").unlink()
        return "1 missing slice(s)"
    if how == "truncated":
        data = files[4].read_bytes()
        files[4].write_bytes(data[:-100])  # ITK would read the series without this slice, and say nothing
        return f"{files[4].name} is truncated"
    if how == "not dicom":
        (folder / "notes.txt").write_text("not an image")
        return "notes.txt is not a DICOM file"
    if how == "localizer":
        ds = pydicom.dcmread(files[3])
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        ds.save_as(files[3])
        return "the slices differ in ImageOrientationPatient (1 unlike the first"
    if how == "multi-frame":
        ds = pydicom.dcmread(files[0])
        ds.NumberOfFrames = 2
        ds.save_as(files[0])
        return f"{files[0].name} is a multi-frame image"
    if how == "tilt":
        for f in files:
            ds = pydicom.dcmread(f)
            x, _, z = map(float, ds.ImagePositionPatient)
            ds.ImagePositionPatient = [x, 0.3 * int(ds.InstanceNumber), z]
            ds.save_as(f)
        return "gantry tilt"
    if how == "no position":
        ds = pydicom.dcmread(files[2])
        del ds.ImagePositionPatient
        ds.save_as(files[2])
        return f"{files[2].name} has no ImagePositionPatient"
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how", ["mixed", "missing", "truncated", "not dicom", "localizer", "multi-frame", "tilt", "no position"]
)
def test_read_series_refuses_bad_series_naming_the_folder(tmp_path, how):
    folder = tmp_path / "series"
    write_series(folder, _volume(), axial_affine((1.5, 1.2, 2.0)))
    assert len(read_series(folder).headers) == 10
    message = _break(folder, how)
    with pytest.raises(DicomSeriesError) as error:
        read_series(folder)
    assert str(error.value).startswith(f"DICOM series {folder}: ") and message in str(error.value), str(error.value)


def test_read_series_sorts_by_position_and_a_file_picks_its_series(tmp_path):
    folder = tmp_path / "mixed"
    order = [4, 9, 1, 7, 3, 10, 2, 8, 6, 5]
    ct = write_series(folder, _volume(), SAGITTAL_REVERSED, name_order=order)
    other = write_series(folder, _volume((20, 16, 3)), axial_affine((1, 1, 2)), name_order=[101, 102, 103])
    series = read_series(ct[0])
    # slices are stacked against the normal, so position order is the reverse of writing order
    assert series.files == ct[::-1] and series.folder == folder
    assert read_series(other[1]).files == other
    np.testing.assert_allclose(series.lps_affine() @ [0, 0, 0, 1], SAGITTAL_REVERSED @ [0, 0, 9, 1])
    np.testing.assert_allclose(series.lps_affine()[:3, 2], -SAGITTAL_REVERSED[:3, 2])


def _load(series, tmp_path) -> tuple[np.ndarray, np.ndarray]:
    """The series as the screening loads it (staged, through LoadCTd): its shape and affine (voxel to RAS)."""
    staged = series.stage(tmp_path / "staged" / series.folder.name)
    image = LoadCTd(keys="image", ensure_channel_first=True)({"image": str(staged)})["image"]
    return tuple(image.shape[1:]), np.asarray(image.affine)


@pytest.mark.parametrize("affine", [axial_affine((1.5, 1.2, 2.0)), SAGITTAL_REVERSED], ids=["axial", "sagittal"])
def test_seg_reads_back_as_the_mask_on_the_source_slices(tmp_path, affine):
    files = write_series(tmp_path / "ct", _volume(), affine)
    series = read_series(tmp_path / "ct")
    shape, ras = _load(series, tmp_path)
    mask = np.zeros(shape, np.uint8)
    mask[3:9, 2:5, 1:4] = 1
    mask[15, 10, 9] = 1  # the last slice, a corner voxel
    path = write_seg(mask, ras, series, tmp_path / "out" / "seg.dcm", INFO)
    seg = pydicom.dcmread(path)

    read = pydicom_seg.SegmentReader().read(seg)
    image = read.segment_image(1)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image).transpose(2, 1, 0), mask)
    lps = LPS_FROM_RAS @ ras
    np.testing.assert_allclose(image.GetOrigin(), lps[:3, 3], atol=1e-4)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)) * image.GetSpacing(), lps[:3, :3], atol=1e-5)

    sources = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f) for f in files}
    first = next(iter(sources.values()))
    assert seg.SOPClassUID == SegmentationStorage and seg.Modality == "SEG" and seg.NumberOfFrames == len(files)
    for frame in seg.PerFrameFunctionalGroupsSequence:  # each frame on its own source slice
        source = sources[frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose(position, source.ImagePositionPatient, atol=1e-3)
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == first.SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} == set(sources)
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID and seg.StudyInstanceUID == first.StudyInstanceUID
    for keyword in ("PatientName", "PatientID", "PatientSex", "StudyDate", "StudyTime", "AccessionNumber", "StudyID"):
        assert seg[keyword].value == first[keyword].value, keyword
    assert seg.SeriesInstanceUID != first.SeriesInstanceUID and seg.SOPInstanceUID not in sources
    for keyword in ("InstitutionName", "StationName", "ClinicalTrialSeriesID", "ClinicalTrialTimePointID"):
        assert keyword not in seg, keyword  # nothing of the scanner's site, no made-up trial ids
    segment = seg.SegmentSequence[0]
    assert (segment.SegmentNumber, segment.SegmentLabel, segment.SegmentAlgorithmType) == (1, "lesion", "AUTOMATIC")
    assert segment.SegmentAlgorithmName == INFO.name and INFO.version in seg.SoftwareVersions

    # the source headers are left as they were (pydicom-seg shares and rewrites elements of the first)
    assert {(h.FrameOfReferenceUID, h.Manufacturer) for h in series.headers} == {(first.FrameOfReferenceUID, "ACME")}
    assert seg.Manufacturer == "GF-Screen for MONAI"

    assert write_seg(np.zeros(shape), ras, series, tmp_path / "out" / "empty.dcm", INFO) is None
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["seg.dcm"]  # no temporary files either


@pytest.mark.realdata
@pytest.mark.skipif(not REAL_DICOM.is_dir(), reason=f"real DICOM series not found at {REAL_DICOM}")
def test_seg_of_a_real_series(tmp_path):
    """A scanner's series (Siemens, 512 x 512 x 20, with private tags): the DICOM-SEG of a mask on it as loaded
    reads back voxel for voxel, on its frame of reference, and the Secondary Capture carries its patient."""
    series = read_series(REAL_DICOM)
    shape, ras = _load(series, tmp_path)
    mask = np.zeros(shape, np.uint8)
    mask[200:260, 300:340, 5:12] = 1
    seg = pydicom.dcmread(write_seg(mask, ras, series, tmp_path / "seg.dcm", INFO))
    image = pydicom_seg.SegmentReader().read(seg).segment_image(1)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image).transpose(2, 1, 0), mask)
    np.testing.assert_allclose(image.GetOrigin(), (LPS_FROM_RAS @ ras)[:3, 3], atol=1e-3)
    first = pydicom.dcmread(series.files[0], stop_before_pixels=True)
    assert (seg.FrameOfReferenceUID, seg.StudyInstanceUID) == (first.FrameOfReferenceUID, first.StudyInstanceUID)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    sc = pydicom.dcmread(write_secondary_capture(np.zeros((8, 8, 3), np.uint8), series, tmp_path / "sc.dcm", INFO))
    for keyword in ("PatientName", "PatientID", "StudyDescription"):
        assert sc[keyword].value == first[keyword].value, keyword
    assert "InstitutionAddress" not in seg and "InstitutionAddress" not in sc


def test_seg_refuses_a_mask_off_the_slices_and_series_without_uids(tmp_path):
    write_series(tmp_path / "ct", _volume(), axial_affine((1.5, 1.2, 2.0)))
    series = read_series(tmp_path / "ct")
    shape, ras = _load(series, tmp_path)
    mask = np.ones(shape, np.uint8)
    flipped = ras @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, shape[2] - 1], [0, 0, 0, 1]])
    for bad_shape, bad_affine in ((shape, flipped), ((*shape[:2], shape[2] - 1), ras)):
        with pytest.raises(DicomSeriesError, match="does not lie on the 10 DICOM slices"):
            write_seg(np.ones(bad_shape), bad_affine, series, tmp_path / "seg.dcm", INFO)

    uids = {"SeriesInstanceUID": "", "FrameOfReferenceUID": None}
    write_series(tmp_path / "anon", _volume(), axial_affine((1.5, 1.2, 2.0)), **uids)
    anonymous = read_series(tmp_path / "anon")
    with pytest.raises(DicomSeriesError) as error:
        write_seg(mask, ras, anonymous, tmp_path / "seg.dcm", INFO)
    assert str(error.value) == (
        f"{tmp_path / 'anon'}: cannot write DICOM output: the slices lack SeriesInstanceUID, FrameOfReferenceUID, "
        "which the DICOM-SEG must reference; screen it with --output_format nifti, or give the series its UIDs."
    )
    with pytest.raises(DicomSeriesError, match="lack SeriesInstanceUID"):
        write_secondary_capture(np.zeros((4, 4, 3), np.uint8), anonymous, tmp_path / "sc.dcm", INFO)
    assert not (tmp_path / "seg.dcm").exists() and not (tmp_path / "sc.dcm").exists()


def test_result_lines():
    report = {
        "verdict": "suspicious",
        "score": 0.8349,
        "lesions": [{"volume_ml": v} for v in (4.613, 1.2, 0.049)],
        "windows": {"kept": 33, "total": 560},
    }
    assert result_lines(report, INFO) == [
        "GF-Screen test 9.9.9: suspicious (score 0.83)",
        "3 lesions: 4.61, 1.20, 0.05 mL",
        "Glance focused 33 of 560 windows. Research use only, not for diagnosis.",
    ]
    assert result_lines(report, INFO, most=2)[1] == "3 lesions: 4.61, 1.20 mL and 1 more"
    report.update(verdict="no lesion found", score=0.0, lesions=[])
    assert result_lines(report, INFO)[:2] == ["GF-Screen test 9.9.9: no lesion found (score 0.00)", "no lesions"]


@pytest.fixture(scope="module")
def overviews(tmp_path_factory) -> dict[str, Path]:
    """The same overview rendered without a title and with a long one (the title names the input file)."""
    tmp = tmp_path_factory.mktemp("overview")
    image = _volume((40, 30, 12), seed=1).astype(np.float32)
    mask = np.zeros(image.shape, bool)
    mask[10:20, 10:15, 3:7] = True
    paths = {}
    for name, title in (("untitled", ""), ("titled", "Doe^Jane_0123456 gjpqy: suspicious (score 0.99, kept 9/9)" * 2)):
        heat, affine = np.full(image.shape, 0.5), np.diag([1.5, 1.2, 4.0, 1])
        paths[name] = render_overview(image, mask, heat, affine, tmp / f"{name}.png", title)
    return paths


def test_overview_picture_drops_the_title(overviews):
    import matplotlib.image

    untitled, titled = (matplotlib.image.imread(str(overviews[k])) for k in ("untitled", "titled"))
    differ = np.nonzero(np.any(untitled != titled, axis=(1, 2)))[0]
    assert 0 < differ.min() and differ.max() < OVERVIEW_TITLE_ROWS  # the title lies in the rows dropped ...
    assert np.all(untitled[:OVERVIEW_TITLE_ROWS] == 1.0)  # ... and nothing else does
    lines = ["line one: suspicious", "2 lesions: 1.00, 0.50 mL", "third"]
    picture = overview_picture(overviews["titled"], lines)
    np.testing.assert_array_equal(picture, overview_picture(overviews["untitled"], lines))
    assert picture.dtype == np.uint8 and picture.shape == (400 - OVERVIEW_TITLE_ROWS + 20 + 22 * 3, 1200, 3)
    body = np.round(untitled[OVERVIEW_TITLE_ROWS:, :, :3] * 255)
    np.testing.assert_array_equal(picture[-len(body) :], body)
    other = overview_picture(overviews["untitled"], ["line one: no lesion found", *lines[1:]])
    assert np.any(picture[: 20 + 22] != other[: 20 + 22]) and np.all(picture[20 + 22 :] == other[20 + 22 :])


def test_secondary_capture(tmp_path):
    files = write_series(
        tmp_path / "ct",
        _volume(),
        axial_affine((1.5, 1.2, 2.0)),
        PatientName="Müller^Jürgen",
        SpecificCharacterSet="ISO_IR 100",
    )
    source = pydicom.dcmread(files[0])
    picture = np.random.default_rng(2).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    path = write_secondary_capture(picture, read_series(tmp_path / "ct"), tmp_path / "sc.dcm", INFO)
    sc = pydicom.dcmread(path)
    assert sc.SOPClassUID == SecondaryCaptureImageStorage == sc.file_meta.MediaStorageSOPClassUID
    np.testing.assert_array_equal(sc.pixel_array, picture)
    assert (sc.PhotometricInterpretation, sc.BurnedInAnnotation, sc.Modality) == ("RGB", "NO", "OT")
    assert str(sc.PatientName) == "Müller^Jürgen" and sc.SpecificCharacterSet == "ISO_IR 100"
    for keyword in ("PatientID", "StudyInstanceUID", "StudyDate", "AccessionNumber", "BodyPartExamined"):
        assert sc[keyword].value == source[keyword].value, keyword
    assert sc.SeriesInstanceUID != source.SeriesInstanceUID and "InstitutionName" not in sc
    assert "FrameOfReferenceUID" not in sc and sc.SeriesNumber == 9902
    with pytest.raises(ValueError, match="RGB pixels"):
        write_secondary_capture(picture[..., 0], read_series(tmp_path / "ct"), tmp_path / "grey.dcm", INFO)
