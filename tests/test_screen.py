"""The screening main job (scripts.screen): output geometry equals input geometry for non-RAS, anisotropic NIfTI
and DICOM series; reports are consistent; a bad file is reported and skipped, and the exit status says so."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.bundle import ConfigParser
from monai.inferers import sliding_window_inference
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

import scripts.screen as screen_module
from scripts.phantom import make_phantom
from scripts.screen import screen

BUNDLE_ROOT = Path(__file__).resolve().parents[1] / "bundle"
REAL_DICOM = Path(__file__).resolve().parents[2] / "shared" / "data" / "realct" / "dicom" / "totalseg_example_ct_dicom"
REPORT_KEYS = {"case", "verdict", "score", "lesion_voxels", "fp_voxel_threshold", "lesions", "windows", "timings_s",
               "input_geometry", "files"}
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
        screen(input=str(input_path), output_dir=str(out), device="cpu",
               config_file=str(bundle / "configs" / "inference.json"), **kwargs)
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
    # threshold 0: every window is focused, so the (shipped) Focus marks voxels and the mapping is visible
    assert _run(pls, out, threshold=0.0) == 0
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
    assert _run(ras, out, threshold=0.0) == 0
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


def write_dicom_series(folder: Path, volume: np.ndarray, spacing, origin=(-40.0, -30.0, 100.0)) -> None:
    """Write ``volume`` (x = columns, y = rows, z = slices; int16 HU) as an axial CT series, one file a slice."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    nx, ny, nz = volume.shape
    for k in range(nz):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientID, ds.PatientName = "CT", "PHANTOM", "Phantom^Test"
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * spacing[2]]
        ds.PixelSpacing = [spacing[1], spacing[0]]  # between rows (y), between columns (x)
        ds.SliceThickness = spacing[2]
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = (volume[:, :, k].T.astype(np.int32) + 1024).astype(np.int16).tobytes()
        # reversed file order: the reader must sort slices by position, not by name
        ds.save_as(folder / f"IM{nz - k:04d}", write_like_original=False)


def test_dicom_series_folder(tmp_path, use_bundle):
    ph = make_phantom(5, shape=(64, 56, 24), spacing=(1.5, 1.2, 4.0))
    series = tmp_path / "series1"
    write_dicom_series(series, ph.image, (1.5, 1.2, 4.0))
    first = pydicom.dcmread(series / "IM0001")
    out = tmp_path / "out"
    assert _run(series, out, threshold=0.0) == 0
    mask_img = nib.load(out / "series1_lesion.nii.gz")
    assert mask_img.shape == (first.Columns, first.Rows, 24) == ph.image.shape
    # NIfTI is RAS+: the DICOM (LPS) origin of the first slice maps to (-x, -y, z) at voxel 0
    np.testing.assert_allclose(mask_img.affine[:3, 3], [40.0, 30.0, 100.0], atol=1e-3)
    np.testing.assert_allclose(np.abs(np.diag(mask_img.affine)[:3]), [1.5, 1.2, 4.0], atol=1e-4)
    assert np.asarray(mask_img.dataobj).sum() > 0
    _check_report(out, "series1", ph.image.shape, (1.5, 1.2, 4.0), threshold=0.0)


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
        [sys.executable, "-m", "scripts.screen", "--input", str(folder), "--output_dir", str(out), "--device", "cpu"],
        cwd=weights_bundle, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"},
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
    files = sorted(p for p in REAL_DICOM.iterdir() if p.is_file())
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    out = tmp_path / "out"
    assert _run(REAL_DICOM, out) == 0
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
    min_mm3 = parser["min_lesion_mm3"]
    assert min_mm3 == train["min_lesion_mm3"] > 0
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
