"""DICOMweb round trip: Debian's Orthanc on loopback, a synthetic CT series, inference, label back as DICOM-SEG."""

from __future__ import annotations

import json
import shutil

import httpx
import nibabel as nib
import numpy as np
import pytest

from monailabel_utils import SPACING, Server, copy_app, dicom_series, orthanc, phantom, upload_to_orthanc

pytestmark = [pytest.mark.server, pytest.mark.orthanc]
NO_ORTHANC = "Orthanc not installed: apt-get install orthanc orthanc-dicomweb"


@pytest.mark.skipif(shutil.which("Orthanc") is None, reason=NO_ORTHANC)
def test_dicomweb_list_infer_and_save_dicom_seg(tmp_path):
    app, bundle = copy_app(tmp_path)
    series_uid, files = dicom_series(phantom(5).image, SPACING, tmp_path / "dicom")
    with orthanc(tmp_path) as url:
        upload_to_orthanc(url, files)
        cache = {"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp_path / "cache")}
        server = Server(app, f"{url}/dicom-web", bundle, env=cache)
        try:
            client = server.client
            assert client.get("/datastore/").json()["total"] == 1
            assert client.post("/activelearning/first").json()["id"] == series_uid

            r = client.post("/infer/gf_screen", params={"image": series_uid, "output": "json"})
            assert r.status_code == 200, r.text
            assert r.json()["report"]["input_geometry"]["shape"] == [64, 64, len(files)]

            image = client.get("/datastore/image", params={"image": series_uid})
            assert image.status_code == 200
            (tmp_path / "image.nii.gz").write_bytes(image.content)
            ref = nib.load(tmp_path / "image.nii.gz")
            label = np.zeros(ref.shape, np.uint8)
            label[20:30, 24:34, 10:16] = 1
            nib.save(nib.Nifti1Image(label, ref.affine), tmp_path / "label.nii.gz")
            r = client.put(
                "/datastore/label",
                params={"image": series_uid, "tag": "final"},
                files={"label": ("label.nii.gz", (tmp_path / "label.nii.gz").read_bytes())},
                data={"params": json.dumps({"label_info": [{"name": "lesion"}]})},
            )
            assert r.status_code == 200, r.text

            segs = httpx.get(f"{url}/dicom-web/series", params={"Modality": "SEG"}).json()
            assert len(segs) == 1
            study, series = (segs[0][tag]["Value"][0] for tag in ("0020000D", "0020000E"))
            seg = httpx.get(f"{url}/dicom-web/studies/{study}/series/{series}/metadata").json()[0]
            referenced = seg["00081115"]["Value"][0]["0020000E"]["Value"][0]  # ReferencedSeriesSequence
            assert referenced == series_uid
            assert server.alive()
        finally:
            server.stop()
