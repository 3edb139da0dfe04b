"""Shared fixtures of the MONAI Label app tests: synthetic studies, a real server on a free loopback port, Orthanc."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RLELossless, generate_uid

from scripts.cli.benchmark import copy_app_and_bundle as copy_app  # noqa: F401  (for the app tests)
from scripts.cli.benchmark import free_port, start_monailabel

REPO = Path(__file__).resolve().parents[1]
APP_DIR, BUNDLE_DIR = REPO / "monailabel_app", REPO / "bundle"
SHAPE, SPACING = (64, 64, 32), (1.6, 1.6, 3.0)  # one Glance window after resampling: seconds per inference


def phantom(seed: int, lesions: bool = True, shape: Sequence[int] = SHAPE):
    from scripts.phantom import make_phantom

    return make_phantom(seed, shape=shape, spacing=SPACING, lesions=lesions)


def lesion_crop() -> np.ndarray:
    """64 x 64 x 22 voxels (``SPACING``) of a phantom (seed 9, abdomen) around its largest tumour, which the shipped
    weights (0.6.0) find: an inference that returns a lesion, in seconds. (0.6.0 misses the tumour of seed 7, used
    with 0.5.0: model card, *Limitations*.)"""
    return phantom(9, shape=(160, 160, 72)).image[89:153, 49:113, 50:72]  # the tumour spans the middle slice


def save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def tree(path: Path) -> dict[str, float]:
    """Every file under ``path`` with its modification time: to show that nothing outside a folder changed."""
    return {str(p): p.stat().st_mtime for p in sorted(path.rglob("*")) if p.is_file()}


class Server:
    """``monailabel start_server`` (as its CLI script runs it) on a free 127.0.0.1 port, stopped on exit."""

    def __init__(
        self,
        app: Path,
        studies: str,
        bundle: Path,
        env: dict | None = None,
        host: str | None = None,
        conf: dict[str, str] | None = None,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        extra = ["--host", host] if host else []
        extra += [arg for key, value in (conf or {}).items() for arg in ("--conf", key, value)]
        self.log = app / "server.out"
        self.process = start_monailabel(app, studies, bundle, self.port, self.log, extra, env)
        self.client = httpx.Client(base_url=self.url, timeout=300)
        self._wait()

    def _wait(self, timeout: float = 120) -> None:
        if not wait_until_up(f"{self.url}/health/", self.process, timeout):
            returncode = self.process.poll()
            self.stop()
            state = f"exited with {returncode}" if returncode is not None else f"not up after {timeout} s"
            raise RuntimeError(f"server {state}:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text()[-5000:]

    def alive(self) -> bool:
        return self.process.poll() is None and httpx.get(f"{self.url}/health/", timeout=5).status_code == 200

    def stop(self) -> None:
        self.client.close()
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # the server and its train / scoring subprocesses
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def wait_until_up(url: str, process: subprocess.Popen, timeout: float) -> bool:
    """Poll ``url`` until it answers 200 (True), or the process dies or ``timeout`` seconds pass (False)."""
    end = time.time() + timeout
    while time.time() < end and process.poll() is None:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    return False


# Debian's Orthanc plugins: DICOMweb, and GDCM to transcode JPEG 2000, which Orthanc's own DCMTK codecs cannot.
ORTHANC_PLUGINS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so", "/usr/share/orthanc/plugins/libOrthancGdcm.so")
# GDCM only for JPEG 2000: with GDCM handling every syntax, a request to transcode a series to JPEG-LS crashes
# Debian's Orthanc 1.10 (a segmentation fault in DCMTK's CharLS); DCMTK decodes JPEG, JPEG-LS and RLE itself.
GDCM_SYNTAXES = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91")


def orthanc_missing() -> str | None:
    """Why Orthanc with the plugins cannot run here (``make system-deps`` installs them as root), or None."""
    missing = [p for p in ORTHANC_PLUGINS if not Path(p).is_file()]
    if shutil.which("Orthanc") is None or missing:
        return "Orthanc or its plugins not installed: apt-get install orthanc orthanc-dicomweb orthanc-gdcm"
    return None


@contextmanager
def orthanc(tmp: Path) -> Iterator[str]:
    """Debian's Orthanc with its DICOMweb and GDCM plugins on a free loopback port, own storage; yields its URL."""
    port = free_port()
    config = {
        "Name": "gf-screen-test",
        "StorageDirectory": str(tmp / "orthanc-db"),
        "IndexDirectory": str(tmp / "orthanc-db"),
        "HttpPort": port,
        "DicomServerEnabled": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [p for p in ORTHANC_PLUGINS if Path(p).is_file()],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "Gdcm": {"Enable": True, "RestrictTransferSyntaxes": list(GDCM_SYNTAXES)},
    }
    path = tmp / "orthanc.json"
    path.write_text(json.dumps(config))
    with open(tmp / "orthanc.log", "w") as log:
        process = subprocess.Popen(["Orthanc", str(path)], stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_until_up(f"{url}/dicom-web/studies", process, timeout=30):
            raise RuntimeError(f"Orthanc not up:\n{(tmp / 'orthanc.log').read_text()[-3000:]}")
        yield url
    finally:
        process.terminate()
        process.wait(20)


def dicom_series(image: np.ndarray, spacing: Sequence[float], out_dir: Path) -> tuple[str, list[Path]]:
    """Write a CT volume (axes x, y, z) as one axial DICOM slice per z; returns the SeriesInstanceUID and files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    files = []
    for z in range(image.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(out_dir / f"{z:04d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientID, ds.PatientName, ds.Modality = "PHANTOM-1", "Phantom^One", "CT"
        ds.StudyDate, ds.StudyTime, ds.SeriesNumber, ds.InstanceNumber = "20260101", "120000", 1, z + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, float(z * spacing[2])]
        ds.PixelSpacing, ds.SliceThickness = [float(spacing[1]), float(spacing[0])], float(spacing[2])
        ds.Rows, ds.Columns = image.shape[1], image.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.ascontiguousarray(image[:, :, z].T.astype(np.int16)).tobytes()
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(ds.filename, write_like_original=False)
        files.append(Path(ds.filename))
    return series, files


JPEG2000, JPEG_LOSSLESS, JPEG_LS, RLE = (
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.5"
)  # fmt: skip
GDCM_COMPRESSORS = {JPEG2000: "JPEG2000", JPEG_LOSSLESS: "JPEG"}  # SimpleITK's names of the lossless encoders


def compressed_series(files: Sequence[Path], syntax: str, out_dir: Path) -> tuple[str, str, list[Path]]:
    """A copy of a series in a new study, its pixel data compressed losslessly in transfer syntax ``syntax`` (JPEG
    2000 and JPEG lossless encoded by SimpleITK's GDCM, RLE by pydicom); returns the study and series UIDs and the
    files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    copies = []
    for path in files:
        ds = pydicom.dcmread(path)
        if syntax == RLE:
            ds.compress(RLELossless)
        else:
            encoded = out_dir / "encoded.dcm"
            writer = sitk.ImageFileWriter()
            writer.SetImageIO("GDCMImageIO")
            writer.SetFileName(str(encoded))
            writer.SetUseCompression(True)
            writer.SetCompressor(GDCM_COMPRESSORS[syntax])
            writer.Execute(sitk.GetImageFromArray(ds.pixel_array))
            source = pydicom.dcmread(encoded)
            encoded.unlink()
            assert source.file_meta.TransferSyntaxUID == syntax, source.file_meta.TransferSyntaxUID
            ds.PixelData, ds.file_meta.TransferSyntaxUID = source.PixelData, syntax
            ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        copies.append(out_dir / path.name)
        ds.save_as(copies[-1], write_like_original=False)
    return str(study), str(series), copies


def orthanc_transcoded(url: str, study: str, syntax: str) -> tuple[str, str]:
    """Orthanc's copy of ``study`` (a StudyInstanceUID) in a new study, transcoded to ``syntax`` by Orthanc's DCMTK
    (for JPEG-LS, which no Python package here encodes); returns the new study's and its series' UIDs."""
    [found] = httpx.post(f"{url}/tools/lookup", content=study).json()
    copy = httpx.post(f"{url}/studies/{found['ID']}/modify", json={"Transcode": syntax, "Force": True}, timeout=120)
    copy.raise_for_status()
    new = copy.json()["ID"]
    [series] = httpx.get(f"{url}/studies/{new}/series").json()
    stored = {httpx.get(f"{url}/instances/{i}/metadata/TransferSyntax").text for i in series["Instances"]}
    assert stored == {syntax}, f"Orthanc kept {stored} instead of transcoding to {syntax}"
    uid = httpx.get(f"{url}/studies/{new}").json()["MainDicomTags"]["StudyInstanceUID"]
    return uid, series["MainDicomTags"]["SeriesInstanceUID"]


def upload_to_orthanc(url: str, files: Sequence[Path]) -> None:
    for f in files:
        httpx.post(f"{url}/instances", content=f.read_bytes(), timeout=30).raise_for_status()


def read_dicom(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(str(path))
