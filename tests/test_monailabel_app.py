"""The MONAI Label app served for real on 127.0.0.1: inference, labels, active learning, training, bad input."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import unquote

import httpx
import nibabel as nib
import numpy as np
import pydicom
import pytest
from requests_toolbelt.multipart.decoder import MultipartDecoder

from monailabel_utils import JPEG2000, Server, compressed_series, copy_app, dicom_series, phantom, save_nifti, tree

pytestmark = pytest.mark.server

IMAGES = {"case0": True, "case1": True, "case2": False, "case3": True}  # id -> has lesions


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """One server for the module (started without --host) over four phantoms and a corrupt file."""
    root = tmp_path_factory.mktemp("ml")
    app, bundle = copy_app(root)
    studies, labels = root / "studies", root / "labels"
    studies.mkdir()
    labels.mkdir()
    for seed, (name, lesions) in enumerate(IMAGES.items()):
        p = phantom(seed, lesions)
        save_nifti(p.image, p.affine, studies / f"{name}.nii.gz")
        save_nifti(p.label, p.affine, labels / f"{name}.nii.gz")
    (studies / "broken.nii.gz").write_bytes(b"\x1f\x8b this is not a gzip stream, nor an image" * 50)
    server = Server(app, str(studies), bundle)
    yield {
        "root": root,
        "server": server,
        "client": server.client,
        "studies": studies,
        "labels": labels,
        "bundle": bundle,
    }
    server.stop()


def infer(client: httpx.Client, **params) -> tuple[dict, bytes]:
    """POST /infer/gf_screen, returning the result JSON and the label file of MONAI Label's multipart answer."""
    files = params.pop("files", None)
    r = client.post("/infer/gf_screen", params=params, files=files)
    assert r.status_code == 200, r.text
    parts = MultipartDecoder(r.content, r.headers["content-type"]).parts
    named = {p.headers[b"Content-Disposition"].split(b'name="')[1].split(b'"')[0]: p for p in parts}
    return json.loads(named[b"params"].text), named[b"image"].content


def label_geometry_matches(label_bytes: bytes, image_path: Path, tmp: Path) -> nib.Nifti1Image:
    path = tmp / "result.nii.gz"
    path.write_bytes(label_bytes)
    label, image = nib.load(path), nib.load(image_path)
    assert label.shape == image.shape
    np.testing.assert_allclose(label.affine, image.affine, atol=1e-4)
    assert label.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(label.dataobj))) <= {0, 1}
    return label


def put_label(client: httpx.Client, image: str, path: Path, tag: str = "final") -> httpx.Response:
    files = {"label": (path.name, path.read_bytes())}
    return client.put("/datastore/label", params={"image": image, "tag": tag}, files=files)


def test_binds_loopback_only_by_default(site):
    port = site["server"].port
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # the host's outward address; sends nothing
        probe.connect(("10.255.255.255", 1))
        address = probe.getsockname()[0]
    if address.startswith("127."):
        pytest.skip("this host has no non-loopback IPv4 address")
    with pytest.raises(OSError):
        socket.create_connection((address, port), timeout=2).close()


def test_info_and_datastore(site):
    client = site["client"]
    info = client.get("/info/").json()
    model = info["models"]["gf_screen"]
    assert model["labels"] == {"lesion": 1} and model["type"] == "segmentation"
    assert set(info["strategies"]) == {"glance_uncertainty", "random", "first"}
    assert "gf_screen" in info["trainers"] and "glance_uncertainty" in info["scoring"]
    stats = client.get("/datastore/").json()
    assert stats["total"] == len(IMAGES) + 1 and stats["completed"] == 0
    objects = client.get("/datastore/", params={"output": "all"}).json()["objects"]
    assert set(objects) == {*IMAGES, "broken"}


def test_no_allow_all_cors(site):
    preflight = {"Origin": "http://evil.example", "Access-Control-Request-Method": "GET"}
    r = site["client"].options("/info/", headers=preflight)
    assert "access-control-allow-origin" not in r.headers


def test_infer_by_datastore_id(site, tmp_path):
    result, label = infer(site["client"], image="case0")
    label_geometry_matches(label, site["studies"] / "case0.nii.gz", tmp_path)
    assert result["label_names"] == {"lesion": 1}
    report = result["report"]
    assert report["case"] == "case0" and report["verdict"] in ("suspicious", "no lesion found")
    assert report["windows"]["total"] >= 1 and 0 <= report["windows"]["kept_fraction"] <= 1
    assert {"load", "glance", "focus"} <= set(report["timings_s"]) and isinstance(report["lesions"], list)
    assert report["input_geometry"]["shape"] == [64, 64, 32]
    assert result["model"]["weights"] == "model.pt"


def test_infer_by_upload_returns_label_on_the_upload_grid(site, tmp_path):
    p = phantom(7, shape=(56, 48, 24))
    affine = np.diag([-1.2, 1.9, 2.5, 1.0])  # LAS, anisotropic: resampled and reoriented internally
    affine[:3, 3] = [40.0, -12.0, 7.5]
    upload = save_nifti(p.image, affine, tmp_path / "upload.nii.gz")
    result, label = infer(site["client"], files={"file": ("upload.nii.gz", upload.read_bytes())})
    label_geometry_matches(label, upload, tmp_path)
    assert result["report"]["input_geometry"]["shape"] == [56, 48, 24]
    assert set(site["client"].get("/datastore/", params={"output": "all"}).json()["objects"]) == {*IMAGES, "broken"}


def test_label_submit(site, tmp_path):
    client, studies = site["client"], site["studies"]
    r = put_label(client, "case0", site["labels"] / "case0.nii.gz")
    assert r.status_code == 200 and r.json()["label"] == "case0"
    stored = studies / "labels" / "final" / "case0.nii.gz"
    assert stored.read_bytes() == (site["labels"] / "case0.nii.gz").read_bytes()
    assert client.get("/datastore/").json()["completed"] == 1
    assert client.get("/datastore/label", params={"label": "case0", "tag": "final"}).content == stored.read_bytes()

    image = nib.load(studies / "case1.nii.gz")
    wrong_grid = save_nifti(np.zeros((64, 64, 30), np.uint8), image.affine, tmp_path / "grid.nii.gz")
    shifted = image.affine.copy()
    shifted[0, 3] += 5.0
    wrong_origin = save_nifti(np.zeros(image.shape, np.uint8), shifted, tmp_path / "origin.nii.gz")
    multi_class = save_nifti(np.full(image.shape, 3, np.uint8), image.affine, tmp_path / "values.nii.gz")
    for bad, message in ((wrong_grid, "size"), (wrong_origin, "origin"), (multi_class, "values")):
        r = put_label(client, "case1", bad)
        assert r.status_code == 422 and message in r.json()["detail"], r.text
    assert not (studies / "labels" / "final" / "case1.nii.gz").exists()
    assert put_label(client, "nosuchimage", site["labels"] / "case1.nii.gz").status_code == 404


def test_dicom_session_without_uids_infers(site, tmp_path):
    """A JPEG 2000 series whose slices have no Study, Series or SOP Instance UID (as some exports have), sent as a
    session: inference needs no UID and returns the label on the series' grid (it was a 500: MONAI Label copies the
    input's file extension for the result, and a DICOM folder has none)."""
    p = phantom(3, shape=(48, 40, 16))
    _, plain = dicom_series(p.image, (1.6, 1.6, 3.0), tmp_path / "plain")
    _, _, files = compressed_series(plain, JPEG2000, tmp_path / "j2k")
    for path in files:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = ds.SeriesInstanceUID = ds.SOPInstanceUID = ""
        ds.save_as(path)
    r = site["client"].put("/session/", files=[("files", (f.name, f.read_bytes())) for f in files])
    assert r.status_code == 200, r.text
    result, label = infer(site["client"], session_id=r.json()["session_id"])
    assert result["report"]["input_geometry"]["shape"] == [48, 40, 16]
    (tmp_path / "label.nii.gz").write_bytes(label)
    assert nib.load(tmp_path / "label.nii.gz").shape == (48, 40, 16)


def test_ohif_panel_points_at_this_server(site):
    """OHIF's page sets the cookie its MONAI Label panel takes its server from (else port 8000 of the host), at
    the path the panel keeps it at; its scripts set none."""
    r = site["client"].get("/ohif/viewer", params={"StudyInstanceUIDs": "1.2.3"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    cookie = SimpleCookie(r.headers["set-cookie"])["MONAILABEL_SERVER_URL"]
    assert unquote(cookie.value) == f"{site['server'].url}/" and cookie["path"] == "/ohif"
    assert "set-cookie" not in site["client"].get("/ohif/app-config.js").headers


def test_training_check_when_none_runs_is_not_an_error(site):
    """OHIF's panel asks at start whether a training runs: no content (204), not MONAI Label's 404 (a failed
    request); MONAI Label's client and 3D Slicer read only 200 as running."""
    from monailabel.client import MONAILabelClient

    r = site["client"].get("/train/", params={"check_if_running": "true"})
    assert r.status_code == 204 and r.content == b""
    assert MONAILabelClient(site["server"].url).train_status(check_if_running=True) is False


def test_next_sample_per_strategy(site):
    client = site["client"]
    unlabelled = {"broken", "case1", "case2", "case3"}
    assert client.post("/activelearning/first").json()["id"] == "broken"
    assert client.post("/activelearning/random").json()["id"] in unlabelled

    scoring = client.post("/scoring/glance_uncertainty", params={"run_sync": True})
    assert scoring.status_code == 200, scoring.text
    scores = scoring.json()
    assert scoring.json()["failed"] == ["broken"] and set(scores["scored"]) == unlabelled - {"broken"}
    assert all(0.0 <= s <= 1.0 for s in scores["scored"].values())
    best = max(sorted(scores["scored"]), key=scores["scored"].get)
    sample = client.post("/activelearning/glance_uncertainty").json()
    assert sample["id"] == best and sample["glance_uncertainty"] == pytest.approx(scores["scored"][best])
    info = client.get("/datastore/image/info", params={"image": best}).json()
    assert info["glance_uncertainty"] == pytest.approx(scores["scored"][best]) and info["glance_windows"] >= 1
    assert client.post("/activelearning/nosuchstrategy").status_code == 400


def test_path_traversal_is_refused_and_touches_nothing(site):
    client, root, studies = site["client"], site["root"], site["studies"]
    victim = root / "victim.nii.gz"
    victim.write_bytes((site["labels"] / "case0.nii.gz").read_bytes())
    before = {k: v for k, v in tree(root).items() if not k.startswith(str(site["server"].log.parent))}
    image, label = {"file": ("x.nii.gz", victim.read_bytes())}, site["labels"] / "case1.nii.gz"
    attempts = [
        client.put("/datastore/image", params={"image": "../evil"}, files=image),
        client.put("/datastore/image", params={"image": str(root / "evil")}, files=image),
        put_label(client, "case1", label, tag="../../evil"),
        put_label(client, "../case1", label),
        client.delete("/datastore/image", params={"id": "../victim"}),
        client.delete("/datastore/image", params={"id": str(root / "victim")}),
        client.delete("/datastore/label", params={"id": "case0", "tag": "../../.."}),
        client.delete("/datastore/label", params={"id": "../victim", "tag": "final"}),
        client.get("/datastore/image", params={"image": "../victim"}),
        client.get("/datastore/label", params={"label": "../../victim", "tag": "final"}),
        client.put("/datastore/image/info", params={"image": "../victim"}, data={"info": "{}"}),
        client.post("/infer/gf_screen", params={"image": "../victim"}),
        client.post("/infer/gf_screen", params={"image": "case1"}, data={"params": json.dumps({"image": str(victim)})}),
        client.post(
            "/infer/gf_screen",
            params={"image": "case1"},
            data={"params": json.dumps({"save_label": True, "label_tag": "../../evil"})},
        ),
    ]
    for r in attempts:
        assert r.status_code == 400, (r.request.url, r.status_code, r.text)
        assert r.json()["detail"]
    after = {k: v for k, v in tree(root).items() if not k.startswith(str(site["server"].log.parent))}
    outside = lambda files: {k: v for k, v in files.items() if not k.startswith(str(studies) + "/")}  # noqa: E731
    assert outside(after) == outside(before) and victim.exists()
    assert not list(root.rglob("evil*"))


def test_corrupt_image_and_uploads_get_4xx_with_message(site, tmp_path):
    client = site["client"]
    r = client.post("/infer/gf_screen", params={"image": "broken", "output": "json"})
    assert r.status_code == 422 and "broken.nii.gz" in r.json()["detail"]

    junk = b"\x00\x01garbage" * 1000
    r = client.put("/datastore/image", params={"image": "junk"}, files={"file": ("junk.nii.gz", junk)})
    assert r.status_code == 422 and "not a readable image" in r.json()["detail"]
    r = client.post("/infer/gf_screen", params={"output": "json"}, files={"file": ("junk.nii.gz", junk)})
    assert r.status_code == 422 and r.json()["detail"]
    whole = (site["studies"] / "case3.nii.gz").read_bytes()
    cut = {"file": ("cut.nii.gz", whole[: len(whole) // 2])}
    r = client.put("/datastore/image", params={"image": "cut"}, files=cut)
    assert r.status_code == 422 and "cannot be read" in r.json()["detail"]
    flat = save_nifti(np.zeros((64, 64, 1), np.int16), np.eye(4), tmp_path / "flat.nii.gz")
    r = client.put("/datastore/image", params={"image": "flat"}, files={"file": ("flat.nii.gz", flat.read_bytes())})
    assert r.status_code == 422 and "3D" in r.json()["detail"]
    r = client.put("/datastore/label", params={"image": "case3", "tag": "final"}, files={"label": ("l.nii.gz", junk)})
    assert r.status_code == 422
    assert not any((site["studies"] / f"{name}.nii.gz").exists() for name in ("junk", "cut", "flat"))

    bad_requests = [
        client.post("/infer/gf_screen", params={"output": "json"}),  # no image at all
        client.post("/infer/gf_screen", params={"image": "case1"}, data={"params": "{not json"}),
        client.post("/infer/nosuchmodel", params={"image": "case1"}),
    ]
    assert [r.status_code for r in bad_requests] == [400, 400, 400] and all(r.json()["detail"] for r in bad_requests)
    assert client.post("/infer/gf_screen", params={"image": "nosuchimage"}).status_code == 404
    assert site["server"].alive()


def test_batch_inference_skips_a_corrupt_image(site):
    r = site["client"].post("/batch/infer/gf_screen", params={"images": "unlabeled", "run_sync": True}, json={})
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["broken"] == {} and set(result) == {"broken", "case1", "case2", "case3"}
    assert all(result[i]["label"] == i for i in ("case1", "case2", "case3"))
    originals = sorted(p.name for p in (site["studies"] / "labels" / "original").iterdir())
    assert originals == [f"case{i}.nii.gz" for i in (1, 2, 3)]
    assert site["client"].get("/datastore/").json()["completed"] == 1  # "original" labels are not final ones


def test_info_stays_fast_during_concurrent_inferences(site, tmp_path):
    p = phantom(11, shape=(128, 128, 64))
    big = save_nifti(p.image, p.affine, tmp_path / "big.nii.gz").read_bytes()
    client, results, latencies = site["client"], [], []

    def run() -> None:
        url, files = f"{site['server'].url}/infer/gf_screen", {"file": ("big.nii.gz", big)}
        r = httpx.post(url, params={"output": "json"}, files=files, timeout=300)
        results.append((r.status_code, r.json()))

    workers = [threading.Thread(target=run) for _ in range(3)]
    for w in workers:
        w.start()
    while any(w.is_alive() for w in workers):
        start = time.perf_counter()
        assert client.get("/info/").status_code == 200
        latencies.append(time.perf_counter() - start)
        time.sleep(0.1)
    for w in workers:
        w.join()
    assert [status for status, _ in results] == [200, 200, 200], results
    assert all(r["report"]["input_geometry"]["shape"] == [128, 128, 64] for _, r in results)
    assert len(latencies) >= 5 and max(latencies) < 1.0, latencies


def test_train_changes_served_weights(site):
    client, bundle = site["client"], site["bundle"]
    for name in ("case1", "case2"):  # case2 is lesion-free: an all-background label is training data too
        assert put_label(client, name, site["labels"] / f"{name}.nii.gz").status_code == 200
    weights = bundle / "models" / "model.pt"
    before = hashlib.sha256(weights.read_bytes()).hexdigest()
    served_before = client.post("/infer/gf_screen", params={"image": "case3", "output": "json"}).json()["model"]

    too_long = client.post("/train/gf_screen", params={"run_sync": True}, json={"max_epochs": 100000})
    assert too_long.status_code == 400 and "max_epochs" in too_long.json()["detail"]
    started = client.post("/train/gf_screen", json={"max_epochs": 1, "val_split": 0.34})
    assert started.status_code == 200, started.text
    deadline = time.time() + 300
    while (status := client.get("/train/").json())["status"] in ("SUBMITTED", "RUNNING") and time.time() < deadline:
        time.sleep(2)
    assert status["status"] == "DONE", "\n".join(status.get("details", []))
    log = "\n".join(status["details"])
    assert "Epoch[1] Complete" in log and "val_lesion_dice" in log

    assert hashlib.sha256(weights.read_bytes()).hexdigest() != before
    served_after = client.post("/infer/gf_screen", params={"image": "case3", "output": "json"}).json()["model"]
    assert served_after["weights_mtime"] == weights.stat().st_mtime != served_before["weights_mtime"]
    assert sorted(p.name for p in (bundle / "models").iterdir()) == ["model.pt"]
