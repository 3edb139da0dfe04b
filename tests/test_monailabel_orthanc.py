"""The clinical web workflow over DICOMweb, for real: Debian's Orthanc (own config, loopback, free port) holding one
CT series uncompressed and in four lossless compressions (JPEG 2000, JPEG lossless, JPEG-LS, RLE), each in a study
of its own; the MONAI Label server with ``--studies`` pointing at it; headless Chromium showing each study in OHIF
and segmenting from OHIF's MONAI Label panel; inference through the API stored in Orthanc as a DICOM-SEG."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset

from browser import Browser, chromium_missing
from monailabel_utils import (
    JPEG2000,
    JPEG_LOSSLESS,
    JPEG_LS,
    RLE,
    SPACING,
    Server,
    compressed_series,
    copy_app,
    dicom_series,
    lesion_crop,
    orthanc,
    orthanc_missing,
    orthanc_transcoded,
    upload_to_orthanc,
)

pytestmark = [pytest.mark.server, pytest.mark.orthanc]
COMPRESSED = {"JPEG 2000": JPEG2000, "JPEG lossless": JPEG_LOSSLESS, "JPEG-LS": JPEG_LS, "RLE": RLE}
REAL_J2K = Path(__file__).resolve().parents[2] / "shared" / "data" / "realct" / "dicom" / "totalseg_example_ct_dicom"
SCREENSHOT_DIR = "GF_SCREEN_SCREENSHOT_DIR"  # set it to keep the OHIF screenshot with the overlay (docs/images)


@pytest.fixture(scope="module")
def dicomweb(tmp_path_factory):
    """Orthanc with the series; the server, which lists them once at its start; then the JPEG 2000 copy stored
    (after the listing that MONAI Label caches)."""
    reason = orthanc_missing()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("dicomweb")
    app, bundle = copy_app(root)
    series_uid, files = dicom_series(lesion_crop(), SPACING, root / "uncompressed")
    studies = {"uncompressed": (str(pydicom.dcmread(files[0]).StudyInstanceUID), str(series_uid))}
    with orthanc(root) as url:
        upload_to_orthanc(url, files)
        for name in ("JPEG lossless", "RLE"):
            study, series, copies = compressed_series(files, COMPRESSED[name], root / name.replace(" ", "_"))
            upload_to_orthanc(url, copies)
            studies[name] = study, series
        studies["JPEG-LS"] = orthanc_transcoded(url, studies["uncompressed"][0], JPEG_LS)
        cache = root / "cache"
        server = Server(app, f"{url}/dicom-web", bundle, env={"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(cache)})
        try:
            listed = server.client.get("/datastore/").json()
            study, series, copies = compressed_series(files, JPEG2000, root / "JPEG_2000")
            upload_to_orthanc(url, copies)
            studies["JPEG 2000"] = study, series
            yield {"url": url, "server": server, "client": server.client, "studies": studies, "cache": cache,
                   "listed": listed, "root": root}  # fmt: skip
        finally:
            server.stop()


def metadata(url: str, study: str, series: str) -> Dataset:
    """The first instance's attributes (WADO-RS metadata), bulk data left out."""
    first = httpx.get(f"{url}/dicom-web/studies/{study}/series/{series}/metadata").json()[0]
    return Dataset.from_json({tag: value for tag, value in first.items() if "BulkDataURI" not in value})


def test_series_stored_after_start_is_inferred_and_saved_as_dicom_seg(dicomweb, tmp_path):
    """The JPEG 2000 series, stored after the server listed the others, is found at once (not after the 2 h of
    MONAI Label's cache); its inference, submitted as the final label, is stored in Orthanc as a DICOM-SEG whose
    segment is "lesion" (no label info sent), in the CT's study and frame of reference, referencing its series."""
    client, url = dicomweb["client"], dicomweb["url"]
    study, series = dicomweb["studies"]["JPEG 2000"]
    assert dicomweb["listed"]["total"] == 4 and dicomweb["listed"]["completed"] == 0

    r = client.post("/infer/gf_screen", params={"image": series, "output": "image"})
    assert r.status_code == 200, r.text
    (tmp_path / "result.nii.gz").write_bytes(r.content)
    assert np.asarray(nib.load(tmp_path / "result.nii.gz").dataobj).sum() > 100  # the crop's tumour

    r = client.put(
        "/datastore/label",
        params={"image": series, "tag": "final"},
        files={"label": ("result.nii.gz", (tmp_path / "result.nii.gz").read_bytes())},
    )
    assert r.status_code == 200, r.text
    [seg_series] = httpx.get(f"{url}/dicom-web/series", params={"Modality": "SEG"}).json()
    seg_study, seg_uid = (seg_series[tag]["Value"][0] for tag in ("0020000D", "0020000E"))
    seg, ct = metadata(url, seg_study, seg_uid), metadata(url, study, series)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["lesion"]
    assert seg_study == study and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series
    assert seg.FrameOfReferenceUID == ct.FrameOfReferenceUID
    assert client.get("/datastore/").json()["completed"] == 1  # labelled at once, not when the cache expires


def test_compressed_series_are_retrieved_as_stored_and_read_voxel_for_voxel(dicomweb, tmp_path):
    """Each compressed series reaches the server's cache in its own transfer syntax (Orthanc does not decode it:
    Debian's Orthanc cannot decode JPEG 2000 without its GDCM plugin and crashes on it with the plugin) and is read
    into the same voxels as the uncompressed series."""
    client = dicomweb["client"]
    volumes = {}
    for name, (_, series) in dicomweb["studies"].items():
        r = client.get("/datastore/image", params={"image": series})
        assert r.status_code == 200, f"{name}: {r.text}"
        (tmp_path / f"{series}.nii.gz").write_bytes(r.content)
        volumes[name] = np.asarray(nib.load(tmp_path / f"{series}.nii.gz").dataobj)
        cached = {str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID)
                  for p in next(dicomweb["cache"].rglob(series)).glob("*.dcm")}  # fmt: skip
        assert cached == {COMPRESSED.get(name, pydicom.uid.ExplicitVRLittleEndian)}, name
    for name in COMPRESSED:
        np.testing.assert_array_equal(volumes[name], volumes["uncompressed"], err_msg=name)


def test_proxy_passes_the_query_and_accept_header_and_stays_under_dicomweb(dicomweb):
    """OHIF's DICOMweb requests reach Orthanc with their query (a study search finds one study, not all) and their
    Accept header (frames come as stored, for the browser to decode); a path out of the DICOMweb root is refused."""
    client, url = dicomweb["client"], dicomweb["url"]
    study, series = dicomweb["studies"]["JPEG 2000"]
    found = client.get("/proxy/dicom/qido/studies", params={"StudyInstanceUID": study}).json()
    assert [s["0020000D"]["Value"][0] for s in found] == [study]

    [instance] = httpx.get(f"{url}/dicom-web/studies/{study}/series/{series}/instances", params={"limit": 1}).json()
    frame = f"/proxy/dicom/wado/studies/{study}/series/{series}/instances/{instance['00080018']['Value'][0]}/frames/1"
    r = client.get(frame, headers={"Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"})
    assert r.status_code == 200 and f"transfer-syntax={JPEG2000}" in r.headers["content-type"]

    for escape in ("/proxy/dicom/wado/%2e%2e/%2e%2e/system", "/proxy/dicom/%2E%2E/tools/find"):
        assert client.get(escape).status_code == 400, escape
    assert httpx.get(f"{url}/system").status_code == 200  # Orthanc is still up


@pytest.mark.realdata
@pytest.mark.skipif(not REAL_J2K.is_dir(), reason=f"{REAL_J2K} absent (the shared real CT)")
def test_real_jpeg2000_series_is_read_as_its_uncompressed_copy(dicomweb, tmp_path):
    """The real JPEG 2000 series of the shared data (given the Study, Series and SOP Instance UIDs it lacks, which
    Orthanc requires) is read into the voxels of its uncompressed copy, and Orthanc keeps running."""
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    copies = []
    for i, path in enumerate(sorted(REAL_J2K.iterdir())):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        copies.append(tmp_path / f"{i:03d}.dcm")
        ds.save_as(copies[-1])
    upload_to_orthanc(dicomweb["url"], copies)
    r = dicomweb["client"].get("/datastore/image", params={"image": series})
    assert r.status_code == 200, r.text
    (tmp_path / "real.nii.gz").write_bytes(r.content)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(REAL_J2K.parent / f"{REAL_J2K.name}_clean")))
    expected = sitk.GetArrayFromImage(reader.Execute())
    got = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "real.nii.gz")))
    np.testing.assert_array_equal(got, expected)
    assert httpx.get(f"{dicomweb['url']}/system").status_code == 200


VIEWPORT = """[...document.querySelectorAll('canvas.cornerstone-canvas')].map(c => c.getBoundingClientRect())
    .filter(r => r.width > 50).map(r => [r.left, r.top, r.right, r.bottom])"""
DISMISS = """[...document.querySelectorAll('button')].filter(b => b.innerText.trim() === 'Confirm and Hide')
    .forEach(b => b.click())"""  # OHIF's "investigational use" banner, over the viewport
CLICK_RUN = """(() => {
    const title = [...document.querySelectorAll('.monaiLabelPanel *')]
        .find(e => !e.childElementCount && e.textContent.trim() === 'Auto-Segmentation');
    [...document.querySelectorAll('.monaiLabelPanel button')].filter(b => b.textContent.trim() === 'Run')
        .find(b => title.compareDocumentPosition(b) & Node.DOCUMENT_POSITION_FOLLOWING).click();
})()"""


def viewport_pixels(browser: Browser, timeout: float = 300) -> np.ndarray:
    """The first viewport of the page as RGB, once it shows an image: a quarter or more of its pixels brighter
    than the darkest tenth of the grey range, with a spread of grey values (a black or blank viewport never)."""
    end = time.time() + timeout
    while time.time() < end:
        browser.evaluate(DISMISS)
        rects = browser.evaluate(VIEWPORT)
        if rects:
            left, top, right, bottom = (int(round(v)) for v in rects[0])
            pixels = browser.screenshot()[top:bottom, left:right]
            grey = pixels.mean(axis=2)
            if (grey > 25).mean() > 0.25 and grey.std() > 20:
                return pixels
        time.sleep(1)
    raise AssertionError(f"no image in the viewport after {timeout} s: {browser.evaluate('document.body.innerText')}")


def lesion_overlay(pixels: np.ndarray) -> np.ndarray:
    """Where a viewport shows the green of OHIF's overlay for the "lesion" label (the CT itself is grey)."""
    red, green, blue = (pixels[..., i].astype(int) for i in range(3))
    return (green > red + 60) & (green > blue + 60)


@pytest.mark.skipif(chromium_missing() is not None, reason=str(chromium_missing()))
def test_ohif_shows_every_study_and_its_panel_segments_with_this_server(dicomweb, tmp_path):
    """Headless Chromium: OHIF's viewer shows every study, the compressed ones as the uncompressed one; OHIF's MONAI
    Label panel names this server, connects to it without an error, and its Auto-Segmentation draws the lesion."""
    server, studies = dicomweb["server"], dicomweb["studies"]
    with Browser(tmp_path) as browser:
        browser.goto(f"{server.url}/ohif/")
        browser.wait_for("document.body?.innerText.includes('Studies')", timeout=120)
        shown = {}
        for name, (study, _) in studies.items():
            browser.goto(f"{server.url}/ohif/viewer?StudyInstanceUIDs={study}")
            shown[name] = viewport_pixels(browser)
            assert not lesion_overlay(shown[name]).any(), name
        for name in COMPRESSED:
            difference = np.abs(shown[name].astype(int) - shown["uncompressed"].astype(int))
            assert shown[name].shape == shown["uncompressed"].shape and difference.mean() < 1, name

        study, series = studies["JPEG 2000"]
        browser.goto(f"{server.url}/ohif/monai-label?StudyInstanceUIDs={study}")
        browser.wait_for("!!document.getElementById('monailabelServerURL')", timeout=120)
        assert browser.evaluate("document.getElementById('monailabelServerURL').value") == f"{server.url}/"
        viewport_pixels(browser)
        browser.evaluate("document.querySelector('.settingsTable button.actionButton').click()")  # connect
        browser.wait_for("document.querySelector('.monaiLabelPanel')?.innerText.includes('Auto-Segmentation')")
        for _ in range(5):  # OHIF shows a failed request for a few seconds
            assert "went wrong" not in browser.evaluate("document.body.innerText")
            time.sleep(1)
        browser.evaluate(CLICK_RUN)
        browser.wait_for("document.body?.innerText.includes('Running Segmentation - Successful')", timeout=600)
        end = time.time() + 60
        while not lesion_overlay(pixels := viewport_pixels(browser)).sum() > 20 and time.time() < end:
            time.sleep(1)
        assert lesion_overlay(pixels).sum() > 20
        text = browser.evaluate("document.body.innerText")
        assert "went wrong" not in text and "Failed" not in text, text
        if os.environ.get(SCREENSHOT_DIR):
            from PIL import Image

            Image.fromarray(browser.screenshot()).save(Path(os.environ[SCREENSHOT_DIR]) / "ohif_gf_screen.png")
