"""The screening main job (scripts.cli.screen): output geometry equals input geometry for non-RAS, anisotropic NIfTI
and DICOM series; DICOM series get a DICOM-SEG equal to the NIfTI mask and a Secondary Capture, which Orthanc
takes; reports are consistent; a bad file or series is reported and skipped, and the exit status says so."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pydicom_seg
import pytest
import SimpleITK as sitk
import torch
from dicomweb_client.api import DICOMwebClient
from monai.bundle import ConfigParser
from monai.inferers import sliding_window_inference
from scipy import ndimage

import scripts.cli.screen as screen_module
from dicom_utils import axial_affine, write_series
from monailabel_utils import orthanc
from scripts.cli.screen import find_cases, screen
from scripts.dicom_output import LPS_FROM_RAS
from scripts.phantom import make_phantom

BUNDLE_ROOT = Path(__file__).resolve().parents[1] / "bundle"
REAL_DICOM = Path(__file__).resolve().parents[2] / "shared" / "data" / "realct" / "dicom" / "totalseg_example_ct_dicom"
NO_ORTHANC = "Orthanc not installed: apt-get install orthanc orthanc-dicomweb"
REPORT_KEYS = {
    "case",
    "verdict",
    "score",
    "lesion_voxels",
    "fp_voxel_threshold",
    "lesions",
    "windows",
    "timings_s",
    "input_geometry",
    "files",
}
TIMING_KEYS = {"load", "glance", "focus", "postprocess", "save", "report", "total"}
LESION_KEYS = {"volume_ml", "centroid_mm", "bbox_voxel", "max_probability", "voxels"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def weights_bundle(tmp_path_factory) -> Path:
    """A copy of bundle/ whose models/model.pt holds freshly initialised weights of inference.json's network.

    These tests check geometry, reports and error handling, which do not depend on what the weights learned;
    the shipped weights are checked against the config in test_networks.py."""
    dest = tmp_path_factory.mktemp("screen") / "bundle"
    shutil.copytree(BUNDLE_ROOT, dest, ignore=shutil.ignore_patterns("models", "data", "runs", "eval", "__pycache__"))
    (dest / "models").mkdir()
    parser = ConfigParser()
    parser.read_config(str(dest / "configs" / "inference.json"))
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), dest / "models" / "model.pt")
    return dest


@pytest.fixture
def use_bundle(weights_bundle, monkeypatch):
    monkeypatch.setattr(screen_module, "BUNDLE_ROOT", weights_bundle)
    return weights_bundle


def _run(input_path, out, **kwargs) -> int:
    bundle = screen_module.BUNDLE_ROOT
    try:
        screen(
            input=str(input_path),
            output_dir=str(out),
            device="cpu",
            config_file=str(bundle / "configs" / "inference.json"),
            **kwargs,
        )
    except SystemExit as e:
        return int(e.code)
    return 0


def _model_windows(image_path) -> int:
    """Windows on the model's grid: the inference preprocessing and MONAI's sliding-window grid, counted."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "inference.json"))
    image = parser.get_parsed_content("preprocessing")({"image": str(image_path)})["image"]
    count = []

    def predictor(win):
        count.append(win.shape[0])
        return torch.zeros(win.shape[0], 2, *win.shape[2:])

    sliding_window_inference(image[None].as_tensor(), parser["roi_size"], 4, predictor, overlap=parser["overlap"])
    return sum(count)


def _check_report(out: Path, case: str, shape, spacing, threshold=None) -> dict:
    rep = json.loads((out / f"{case}_report.json").read_text())
    assert REPORT_KEYS <= set(rep), set(rep) ^ REPORT_KEYS
    assert rep["case"] == case
    assert rep["input_geometry"]["shape"] == list(shape)
    np.testing.assert_allclose(rep["input_geometry"]["spacing"], spacing, rtol=1e-5)
    assert set(rep["timings_s"]) == TIMING_KEYS and all(v >= 0 for v in rep["timings_s"].values())
    win = rep["windows"]
    assert 0 <= win["kept"] <= win["total"] and win["total"] > 0
    assert win["kept_fraction"] == pytest.approx(win["kept"] / win["total"])
    if threshold is not None:
        assert win["glance_threshold"] == threshold
    mask = np.asarray(nib.load(rep["files"]["mask"]).dataobj)
    assert rep["lesion_voxels"] == int((mask > 0).sum())
    assert sum(lesion["voxels"] for lesion in rep["lesions"]) == rep["lesion_voxels"]
    for lesion in rep["lesions"]:
        assert set(lesion) == LESION_KEYS and 0 <= lesion["max_probability"] <= 1
    assert rep["verdict"] == ("suspicious" if rep["lesion_voxels"] > rep["fp_voxel_threshold"] else "no lesion found")
    png = Path(rep["files"]["overview"])
    assert png == out / f"{case}_overview.png" and png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000
    return rep


@pytest.fixture(scope="module")
def phantom():
    """A small, anisotropic (0.8 x 0.7 x 2.5 mm) abdominal phantom with lesions, in RAS voxel order."""
    return make_phantom(3, shape=(96, 80, 40), spacing=(0.8, 0.7, 2.5))


def _lps_permuted(image: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same scan stored as P-L-S (x and y flipped, then swapped), with the affine that keeps every voxel at
    its world position."""
    data = np.ascontiguousarray(np.flip(image, (0, 1)).transpose(1, 0, 2))
    nx, ny, _ = image.shape
    # new voxel (i, j, k) holds old voxel (nx-1-j, ny-1-i, k)
    old_from_new = np.array([[0, -1, 0, nx - 1], [-1, 0, 0, ny - 1], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    return data, affine @ old_from_new


def test_non_ras_anisotropic_nifti_keeps_input_geometry(tmp_path, phantom, use_bundle):
    affine = phantom.affine.copy()
    affine[:3, 3] = [-30.0, 12.5, -80.0]  # a scanner origin
    ras = tmp_path / "ras.nii.gz"
    nib.save(nib.Nifti1Image(phantom.image, affine), str(ras))
    data, lps_affine = _lps_permuted(phantom.image, affine)
    pls = tmp_path / "pls.nii.gz"
    nib.save(nib.Nifti1Image(data, lps_affine), str(pls))
    assert nib.aff2axcodes(lps_affine) == ("P", "L", "S")
    np.testing.assert_allclose(  # same world position of the same voxel
        lps_affine @ [10, 20, 5, 1], affine @ [phantom.image.shape[0] - 1 - 20, phantom.image.shape[1] - 1 - 10, 5, 1]
    )

    out = tmp_path / "out"
    # threshold 0 and no peak gate: every window is focused and every component kept, so the mapping is visible
    assert _run(pls, out, threshold=0.0, min_lesion_peak=0.5) == 0
    mask_img = nib.load(out / "pls_lesion.nii.gz")
    assert mask_img.shape == data.shape
    np.testing.assert_allclose(mask_img.affine, lps_affine, atol=1e-4)
    assert nib.aff2axcodes(mask_img.affine) == ("P", "L", "S")
    mask = np.asarray(mask_img.dataobj)
    assert set(np.unique(mask)) <= {0, 1}

    rep = _check_report(out, "pls", data.shape, (0.7, 0.8, 2.5), threshold=0.0)
    assert rep["windows"]["total"] == _model_windows(pls) and rep["windows"]["kept"] == rep["windows"]["total"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["screened"] == 1 and summary["failed"] == []

    # voxel-exact: the same scan stored in RAS order gives the same mask, voxel for voxel in world space
    assert _run(ras, out, threshold=0.0, min_lesion_peak=0.5) == 0
    mask_ras = np.asarray(nib.load(out / "ras_lesion.nii.gz").dataobj)
    assert mask_ras.shape == phantom.image.shape and mask_ras.sum() > 0
    back = np.flip(mask.transpose(1, 0, 2), (0, 1))
    np.testing.assert_array_equal(back, mask_ras)
    # lesion centroids are in world mm: the same for both storage orders
    rep_ras = json.loads((out / "ras_report.json").read_text())
    c1 = sorted(tuple(np.round(lesion["centroid_mm"], 2)) for lesion in rep["lesions"])
    c2 = sorted(tuple(np.round(lesion["centroid_mm"], 2)) for lesion in rep_ras["lesions"])
    np.testing.assert_allclose(c1, c2, atol=0.05)


def test_default_threshold_report(tmp_path, phantom, use_bundle):
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(phantom.image, phantom.affine), str(path))
    assert _run(path, tmp_path / "out") == 0
    rep = _check_report(tmp_path / "out", "scan", phantom.image.shape, (0.8, 0.7, 2.5))
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "inference.json"))
    assert rep["windows"]["glance_threshold"] == parser["glance_threshold"]


SPACING = (1.5, 1.2, 4.0)


def _sagittal_reversed(image: np.ndarray, spacing, origin=(-50.0, -40.0, 120.0)) -> tuple[np.ndarray, np.ndarray]:
    """The RAS-ordered ``image`` as a sagittal series (columns run to the back, rows down) whose slices are stacked
    to the patient's left, against their normal: voxels (column, row, slice) and their LPS affine."""
    volume = np.ascontiguousarray(image[::-1, ::-1, ::-1].transpose(1, 2, 0))
    sx, sy, sz = spacing
    return volume, np.array([[0, 0, sx, origin[0]], [sy, 0, 0, origin[1]], [0, -sz, 0, origin[2]], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def screened_series(weights_bundle, tmp_path_factory) -> dict[str, tuple[Path, list[Path], Path]]:
    """One phantom as an axial series and as a sagittal series in reversed slice order, each screened with
    ``output_format="both"`` at threshold 0 (every window focused, so that the weights mark voxels): per series,
    its folder, its files in slice order and the output folder."""
    ph = make_phantom(5, shape=(64, 56, 24), spacing=SPACING)
    tmp = tmp_path_factory.mktemp("dicom")
    series = {"axial": (ph.image, axial_affine(SPACING)), "sagittal_reversed": _sagittal_reversed(ph.image, SPACING)}
    screened = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(screen_module, "BUNDLE_ROOT", weights_bundle)
        for name, (volume, affine) in series.items():
            files = write_series(tmp / name, volume, affine)
            out = tmp / f"out_{name}"
            assert _run(tmp / name, out, threshold=0.0, min_lesion_peak=0.5, output_format="both") == 0
            screened[name] = (tmp / name, files, out)
    return screened


def _seg_equals_mask(seg: pydicom.Dataset, mask_img: nib.Nifti1Image, files: list[Path]) -> None:
    """The DICOM-SEG read back (pydicom-seg) equals the NIfTI mask voxel for voxel on the same grid, each of its
    frames lies on the source slice it references, and it references the source series and frame of reference."""
    image = pydicom_seg.SegmentReader().read(seg).segment_image(1)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image).transpose(2, 1, 0), np.asarray(mask_img.dataobj))
    lps = LPS_FROM_RAS @ mask_img.affine
    np.testing.assert_allclose(image.GetOrigin(), lps[:3, 3], atol=1e-3)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)) * image.GetSpacing(), lps[:3, :3], atol=1e-4)
    sources = {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(f, stop_before_pixels=True) for f in files)}
    first = next(iter(sources.values()))
    assert seg.NumberOfFrames == len(files)
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source = sources[frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose(position, source.ImagePositionPatient, atol=1e-3)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    assert (seg.FrameOfReferenceUID, seg.StudyInstanceUID) == (first.FrameOfReferenceUID, first.StudyInstanceUID)


@pytest.mark.parametrize("name", ["axial", "sagittal_reversed"])
def test_dicom_series_gets_nifti_and_a_seg_equal_to_it(screened_series, name):
    folder, files, out = screened_series[name]
    case = folder.name
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    mask_img = nib.load(out / f"{case}_lesion.nii.gz")
    assert mask_img.shape == (first.Columns, first.Rows, len(files)) and np.asarray(mask_img.dataobj).sum() > 0
    # NIfTI voxel (0, 0, k) lies on the k-th slice along the slice normal (RAS = LPS with x and y negated)
    orientation = np.asarray(first.ImageOrientationPatient, float)
    normal = np.cross(orientation[:3], orientation[3:])
    positions = [list(map(float, pydicom.dcmread(f).ImagePositionPatient)) for f in files]
    positions.sort(key=lambda p: np.dot(p, normal))
    voxels = [(LPS_FROM_RAS @ mask_img.affine @ [0, 0, k, 1])[:3] for k in range(len(files))]
    np.testing.assert_allclose(voxels, positions, atol=1e-3)
    spacing = (SPACING[0], SPACING[1], SPACING[2]) if name == "axial" else (SPACING[1], SPACING[2], SPACING[0])
    rep = _check_report(out, case, mask_img.shape, spacing, threshold=0.0)
    assert rep["files"]["dicom_seg"] == str(out / f"{case}_lesion_seg.dcm")
    assert rep["files"]["dicom_sc"] == str(out / f"{case}_overview_sc.dcm")

    seg, sc = pydicom.dcmread(rep["files"]["dicom_seg"]), pydicom.dcmread(rep["files"]["dicom_sc"])
    _seg_equals_mask(seg, mask_img, files)
    assert seg.SegmentSequence[0].SegmentLabel == "lesion"
    assert sc.StudyInstanceUID == first.StudyInstanceUID and sc.pixel_array.shape[1:] == (1200, 3)
    sources = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
    assert len({seg.SeriesInstanceUID, sc.SeriesInstanceUID, first.SeriesInstanceUID}) == 3
    assert not {seg.SOPInstanceUID, sc.SOPInstanceUID} & sources and seg.SOPInstanceUID != sc.SOPInstanceUID
    for ds in (seg, sc):
        for keyword in ("PatientName", "PatientID", "AccessionNumber"):
            assert ds[keyword].value == first[keyword].value, keyword
        assert "InstitutionName" not in ds and "StationName" not in ds


@pytest.mark.orthanc
@pytest.mark.skipif(shutil.which("Orthanc") is None, reason=NO_ORTHANC)
def test_orthanc_takes_the_dicom_outputs(screened_series, tmp_path):
    """STOW-RS the source series, the DICOM-SEG and the Secondary Capture to Orthanc; WADO-RS gives them back."""
    folder, files, out = screened_series["axial"]
    seg = pydicom.dcmread(out / f"{folder.name}_lesion_seg.dcm")
    sc = pydicom.dcmread(out / f"{folder.name}_overview_sc.dcm")
    source = [pydicom.dcmread(f) for f in files]
    study = source[0].StudyInstanceUID
    with orthanc(tmp_path) as url:
        client = DICOMwebClient(f"{url}/dicom-web")
        stored = client.store_instances(source + [seg, sc])
        assert not stored.get("FailedSOPSequence") and len(stored.ReferencedSOPSequence) == len(files) + 2
        series = {s["0020000E"]["Value"][0]: s["00080060"]["Value"][0] for s in client.search_for_series(study)}
        assert series == {source[0].SeriesInstanceUID: "CT", seg.SeriesInstanceUID: "SEG", sc.SeriesInstanceUID: "OT"}
        seg_meta = client.retrieve_series_metadata(study, seg.SeriesInstanceUID)[0]
        assert seg_meta["00081115"]["Value"][0]["0020000E"]["Value"][0] == source[0].SeriesInstanceUID
        seg_back = client.retrieve_instance(study, seg.SeriesInstanceUID, seg.SOPInstanceUID)
        sc_back = client.retrieve_instance(study, sc.SeriesInstanceUID, sc.SOPInstanceUID)
    _seg_equals_mask(seg_back, nib.load(out / f"{folder.name}_lesion.nii.gz"), files)
    np.testing.assert_array_equal(sc_back.pixel_array, sc.pixel_array)
    assert sc_back.SOPInstanceUID == sc.SOPInstanceUID and sc_back.PatientID == source[0].PatientID


def test_dicom_batch_with_a_broken_series(tmp_path, weights_bundle):
    """CLI run on a folder of series (one nested deeper): the series with a missing slice is reported and skipped,
    the others get DICOM output (the default for DICOM input) and no NIfTI; no staging folder is left behind."""
    batch = tmp_path / "batch"
    for seed, name in enumerate(("a_series", "b_missing", "nested/c_series")):
        ph = make_phantom(seed, shape=(32, 32, 16), spacing=(2.0, 2.0, 3.0))
        write_series(batch / name, ph.image, axial_affine((2.0, 2.0, 3.0)))
    (batch / "b_missing" / "IM0006").unlink()
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.cli.screen", "--input", str(batch), "--output_dir", str(out), "--device", "cpu",
         "--threshold", "0", "--min_lesion_peak", "0.5"],
        cwd=weights_bundle, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "2", "TMPDIR": str(tmp)},
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["case"] for r in summary["reports"]] == ["a_series", "nested_c_series"] and summary["screened"] == 2
    assert [f["image"] for f in summary["failed"]] == [str(batch / "b_missing")]
    assert summary["failed"][0]["error"].startswith(
        f"DicomSeriesError: DICOM series {batch / 'b_missing'}: 1 missing slice(s): gaps of a multiple of the 3 mm"
    )
    assert f"FAILED {batch / 'b_missing'}: DicomSeriesError" in proc.stderr and "2 screened, 1 failed" in proc.stdout
    for rep in summary["reports"]:
        case = rep["case"]
        assert rep["lesion_voxels"] > 0 and rep["files"]["mask"] is None
        assert rep["files"]["dicom_seg"] == str(out / f"{case}_lesion_seg.dcm")
        assert pydicom.dcmread(rep["files"]["dicom_seg"]).Modality == "SEG"
        assert pydicom.dcmread(rep["files"]["dicom_sc"]).Modality == "OT"
        assert json.loads((out / f"{case}_report.json").read_text())["files"] == rep["files"]
        assert not (out / f"{case}_lesion.nii.gz").exists()
    assert not list(out.glob("b_missing*")) and list(tmp.iterdir()) == []


def test_dicom_output_needs_uids_and_a_dicom_input(tmp_path, use_bundle):
    """DICOM output of a series without UIDs, or of a NIfTI file, fails before screening, with the reason."""
    ph = make_phantom(2, shape=(32, 32, 16), spacing=(2.0, 2.0, 3.0))
    anonymous = tmp_path / "anonymous"
    uids = {"StudyInstanceUID": "", "SeriesInstanceUID": "", "SOPInstanceUID": "", "FrameOfReferenceUID": None}
    write_series(anonymous, ph.image, axial_affine((2.0, 2.0, 3.0)), **uids)
    nifti = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(ph.image, ph.affine), str(nifti))
    for path, output_format, error in (
        (anonymous, None, f"DicomSeriesError: {anonymous}: cannot write DICOM output: the slices lack "
                          "SOPInstanceUID, StudyInstanceUID, SeriesInstanceUID, FrameOfReferenceUID, which"),
        (nifti, "both", f"ValueError: {nifti}: DICOM output needs a DICOM series as input; use --output_format nifti."),
    ):  # fmt: skip
        out = tmp_path / f"out_{path.name}"
        assert _run(path, out, output_format=output_format) == 1
        summary = json.loads((out / "summary.json").read_text())
        assert summary["screened"] == 0 and summary["failed"][0]["error"].startswith(error)
        assert sorted(p.name for p in out.iterdir()) == ["summary.json"]
    with pytest.raises(ValueError, match="output_format must be one of nifti, dicom, both, got 'dcm'"):
        _run(nifti, tmp_path / "out", output_format="dcm")


def test_find_cases_in_a_folder_of_series(tmp_path):
    root, out = tmp_path / "in", tmp_path / "in" / "out"
    small = np.zeros((4, 4, 3))
    first = write_series(root / "p1" / "ct", small, axial_affine((1, 1, 1)))
    write_series(root / "p2" / "ct", small, axial_affine((1, 1, 1)))
    for folder in (root / "labels", root / ".cache", out):
        folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(small, np.eye(4)), str(root / "scan.nii.gz"))
    nib.save(nib.Nifti1Image(small, np.eye(4)), str(root / "labels" / "scan.nii.gz"))  # a folder of volumes
    (root / ".cache" / "x").write_text("hidden")
    (out / "summary.json").write_text("{}")  # earlier results inside the input folder
    assert find_cases(str(root), out) == [
        {"image": str(root / "scan.nii.gz")},
        {"image": str(root / "p1" / "ct"), "dicom_case": "p1_ct"},
        {"image": str(root / "p2" / "ct"), "dicom_case": "p2_ct"},
    ]
    assert find_cases(str(root / "p1" / "ct"), out) == [{"image": str(root / "p1" / "ct"), "dicom_case": "ct"}]
    assert find_cases(str(first[2]), out) == [{"image": str(first[2]), "dicom_case": "ct"}]
    (root / "list.json").write_text(json.dumps({"testing": [{"image": "p2/ct"}, "scan.nii.gz"]}))
    assert find_cases(str(root / "list.json"), out) == [
        {"image": str(root / "p2" / "ct"), "dicom_case": "ct"},
        {"image": str(root / "scan.nii.gz")},
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert find_cases(str(empty), out) == [{"image": str(empty), "dicom_case": "empty"}]
    nib.save(nib.Nifti1Image(small, np.eye(4)), str(root / "p1_ct.nii.gz"))
    with pytest.raises(ValueError, match=r"and .*p1/ct would both write the outputs 'p1_ct_\*'; rename one"):
        find_cases(str(root), out)


def test_bad_file_is_reported_and_batch_continues(tmp_path, weights_bundle):
    """CLI run on a folder: a corrupt file between two good ones. Both good scans are screened, summary.json
    names the bad one, the exit status is 1."""
    folder = tmp_path / "scans"
    folder.mkdir()
    for name, seed in (("a_good.nii.gz", 1), ("c_good.nii.gz", 2)):
        ph = make_phantom(seed, shape=(48, 48, 24), spacing=(2.0, 2.0, 3.0))
        nib.save(nib.Nifti1Image(ph.image, ph.affine), str(folder / name))
    (folder / "b_corrupt.nii.gz").write_bytes(b"\x1f\x8b not really gzip" * 50)
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.cli.screen",
            "--input",
            str(folder),
            "--output_dir",
            str(out),
            "--device",
            "cpu",
        ],
        cwd=weights_bundle,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["screened"] == 2
    assert [r["case"] for r in summary["reports"]] == ["a_good", "c_good"]
    assert len(summary["failed"]) == 1
    failure = summary["failed"][0]
    assert failure["image"] == str(folder / "b_corrupt.nii.gz") and failure["error"]
    assert f"FAILED {folder / 'b_corrupt.nii.gz'}" in proc.stderr
    assert "2 screened, 1 failed" in proc.stdout
    for case in ("a_good", "c_good"):
        assert (out / f"{case}_lesion.nii.gz").is_file() and (out / f"{case}_report.json").is_file()
    assert not (out / "b_corrupt_report.json").exists()


def test_batch_reads_the_next_scan_while_screening_the_current_one(tmp_path, use_bundle, monkeypatch):
    """A folder of four scans, the second corrupt: each scan is read in a worker process, the next one while the
    current one is screened (its reading starts before the current report is written), the corrupt one is in
    summary.json's failures with the reader's root cause, the others are screened, in order."""
    folder = tmp_path / "scans"
    folder.mkdir()
    for name, seed in (("a", 1), ("c", 2), ("d", 3)):
        ph = make_phantom(seed, shape=(48, 48, 24), spacing=(2.0, 2.0, 3.0))
        nib.save(nib.Nifti1Image(ph.image, ph.affine), str(folder / f"{name}.nii.gz"))
    (folder / "b_corrupt.nii.gz").write_bytes(b"\x1f\x8b not really gzip" * 50)
    stamps = tmp_path / "stamps"
    stamps.mkdir()
    read = screen_module.CaseReader.__call__

    def stamped(self, case):
        (stamps / Path(case["image"]).name).write_text(json.dumps({"pid": os.getpid(), "start": time.time()}))
        return read(self, case)

    monkeypatch.setattr(screen_module.CaseReader, "__call__", stamped)
    out = tmp_path / "out"
    assert _run(folder, out) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert [r["case"] for r in summary["reports"]] == ["a", "c", "d"] and summary["screened"] == 3
    assert summary["failed"] == [
        {"image": str(folder / "b_corrupt.nii.gz"), "error": "BadGzipFile: Unknown compression method"}
    ]
    reads = {p.name.split(".")[0]: json.loads(p.read_text()) for p in stamps.iterdir()}
    assert sorted(reads) == ["a", "b_corrupt", "c", "d"] and all(r["pid"] != os.getpid() for r in reads.values())
    written = {case: (out / f"{case}_report.json").stat().st_mtime for case in ("a", "c")}
    assert reads["b_corrupt"]["start"] < written["a"] and reads["d"]["start"] < written["c"]


def test_missing_input_and_datalist(tmp_path, use_bundle):
    with pytest.raises(FileNotFoundError, match="input not found"):
        _run(tmp_path / "none.nii.gz", tmp_path / "out")
    ph = make_phantom(4, shape=(48, 48, 24), spacing=(2.0, 2.0, 3.0))
    nib.save(nib.Nifti1Image(ph.image, ph.affine), str(tmp_path / "one.nii.gz"))
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"testing": [{"image": "one.nii.gz"}, {"image": "gone.nii.gz"}]}))
    assert _run(datalist, tmp_path / "out") == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["screened"] == 1 and summary["reports"][0]["case"] == "one"
    assert [f["image"] for f in summary["failed"]] == [str(tmp_path / "gone.nii.gz")]


@pytest.mark.realdata
@pytest.mark.skipif(not REAL_DICOM.is_dir(), reason=f"real DICOM series not found at {REAL_DICOM}")
def test_real_dicom_series(tmp_path, use_bundle):
    """A compressed series without UIDs: screened to NIfTI; DICOM output (its default) is refused, with why."""
    files = sorted(p for p in REAL_DICOM.iterdir() if p.is_file())
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert _run(REAL_DICOM, tmp_path / "default") == 1
    error = json.loads((tmp_path / "default" / "summary.json").read_text())["failed"][0]["error"]
    assert error.startswith(f"DicomSeriesError: {REAL_DICOM}: cannot write DICOM output: the slices lack SOPClassUID")
    out = tmp_path / "out"
    assert _run(REAL_DICOM, out, output_format="nifti") == 0
    case = REAL_DICOM.name
    mask_img = nib.load(out / f"{case}_lesion.nii.gz")
    assert mask_img.shape == (first.Columns, first.Rows, len(files))
    spacing = (float(first.PixelSpacing[1]), float(first.PixelSpacing[0]))
    np.testing.assert_allclose(np.abs(np.diag(mask_img.affine)[:2]), spacing, rtol=1e-4)
    _check_report(out, case, mask_img.shape, np.linalg.norm(mask_img.affine[:3, :3], axis=0))


def test_lesions_below_min_volume_are_dropped_in_mm3_of_the_input(tmp_path, phantom):
    """inference.json drops mask components smaller than ``min_lesion_mm3``, measured on the input's own grid
    (0.8 x 0.7 x 2.5 mm here), after the mask is inverted to it; train.json's validation uses the same volume."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "inference.json"))
    parser["output_dir"] = str(tmp_path)
    train = ConfigParser()
    train.read_config(str(BUNDLE_ROOT / "configs" / "train.json"))
    train["bundle_root"] = str(BUNDLE_ROOT)
    min_mm3 = parser["min_lesion_mm3"]
    assert min_mm3 == train.get_parsed_content("min_lesion_mm3") > 0
    path = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(phantom.image, phantom.affine), str(path))
    data = parser.get_parsed_content("preprocessing")({"image": str(path)})
    scores = torch.zeros(2, *data["image"].shape[1:])
    scores[0] = 1.0
    scores[:, 4:6, 4:6, 4:5] = torch.tensor([0.0, 1.0])[:, None, None, None]  # 4 voxels of 1.5x1.5x3 mm: 27 mm3
    scores[:, 20:24, 20:24, 8:11] = torch.tensor([0.0, 1.0])[:, None, None, None]  # 48 voxels: 324 mm3
    data["pred"] = data["image"].clone().set_array(scores)
    mask = np.asarray(parser.get_parsed_content("postprocessing")(data)["pred"][0]) > 0
    assert mask.shape == phantom.image.shape
    labels, n = ndimage.label(mask)
    volumes = ndimage.sum(mask, labels, range(1, n + 1)) * abs(np.linalg.det(phantom.affine[:3, :3]))
    assert n == 1 and volumes[0] > min_mm3, volumes  # the 27 mm3 component is gone, the 324 mm3 one stays
    np.testing.assert_allclose(volumes[0], 324, rtol=0.35)
