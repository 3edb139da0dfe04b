"""The MONAI Label server against a client that misbehaves: access control, request values that could name files,
cross-site requests, resource limits, temporary files, annotators' data. Two real servers on 127.0.0.1: keyless (the
default) and with an API key and an admin key."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import threading
import time
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import psutil
import pytest
import torch

from monailabel_utils import Server, copy_app, phantom, save_nifti, tree

pytestmark = pytest.mark.server

KEY, ADMIN_KEY = "test-key-0123456789", "admin-key-9876543210"
EVIL = "http://evil.example"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """API key given with --conf (as the docs advise against, to show it stays out of the logs), admin key by env."""
    root = tmp_path_factory.mktemp("ml_key")
    app, bundle = copy_app(root)
    studies = root / "studies"
    studies.mkdir()
    p = phantom(3)
    save_nifti(p.image, p.affine, studies / "case0.nii.gz")
    server = Server(
        app, str(studies), bundle, env={"GF_SCREEN_ADMIN_KEY": ADMIN_KEY}, host="127.0.0.1", conf={"api_key": KEY}
    )
    yield server, studies, app, bundle
    server.stop()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The keyless default, with its own temporary and sessions folders, room for 2 inference requests at once,
    and a label tag folder that is a file (a disk state on which saving a label fails with a 500)."""
    root = tmp_path_factory.mktemp("ml_open")
    app, bundle = copy_app(root)
    studies, labels, tmp, sessions = root / "studies", root / "labels", root / "tmp", root / "ml" / "sessions"
    for folder in (studies / "labels", labels, tmp, sessions):
        folder.mkdir(parents=True)
    for seed, name in enumerate(("case0", "case1", "case2")):
        p = phantom(seed)
        save_nifti(p.image, p.affine, studies / f"{name}.nii.gz")
        save_nifti(p.label, p.affine, labels / f"{name}.nii.gz")
    (studies / "labels" / "broken_tag").write_text("a file where a tag folder would go")
    env = {"TMPDIR": str(tmp), "MONAI_LABEL_SESSION_PATH": str(sessions)}
    server = Server(app, str(studies), bundle, env=env, conf={"infer_queue": "2"})
    yield {
        "server": server,
        "client": server.client,
        "root": root,
        "studies": studies,
        "labels": labels,
        "tmp": tmp,
        "sessions": sessions,
        "bundle": bundle,
    }
    server.stop()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def upload(path: Path, name: str | None = None) -> dict:
    return {"file": (name or path.name, path.read_bytes())}


def infer(client: httpx.Client, params: dict | None = None, **query) -> httpx.Response:
    files = query.pop("files", None)
    data = {"params": json.dumps(params)} if params is not None else None
    return client.post("/infer/gf_screen", params={"output": "json", **query}, data=data, files=files)


def put_label(client: httpx.Client, image: str, path: Path, tag: str = "final", **kwargs) -> httpx.Response:
    return client.put(
        "/datastore/label",
        params={"image": image, "tag": tag},
        files={"label": (path.name, path.read_bytes())},
        **kwargs,
    )


def tar_bytes(files: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# --- access control (keyed server) ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, path, params",
    [
        ("GET", "/info/", {}),
        ("GET", "/datastore/", {}),
        ("GET", "/datastore/image", {"image": "case0"}),
        ("DELETE", "/datastore/image", {"id": "case0"}),
        ("POST", "/infer/gf_screen", {"image": "case0"}),
        ("POST", "/train/gf_screen", {}),
        ("POST", "/activelearning/random", {}),
        ("GET", "/model/gf_screen", {}),
        ("GET", "/logs/", {}),
        ("GET", "/ohif/", {}),
        ("GET", "/proxy/dicom/qido/studies", {}),
    ],
)
def test_every_endpoint_needs_the_key(keyed, method, path, params):
    server, studies, _, _ = keyed
    before = tree(studies)
    missing = httpx.request(method, server.url + path, params=params, timeout=30)
    wrong = httpx.request(method, server.url + path, params=params, headers={"X-API-Key": "nope"}, timeout=30)
    assert missing.status_code == 401 and missing.json()["detail"]
    assert wrong.status_code == 403
    assert tree(studies) == before


def test_key_as_header_or_bearer_token(keyed):
    server = keyed[0]
    assert httpx.get(f"{server.url}/info/", headers={"X-API-Key": KEY}).status_code == 200
    assert httpx.get(f"{server.url}/info/", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    r = httpx.post(f"{server.url}/activelearning/first", headers={"X-API-Key": KEY})
    assert r.status_code == 200 and r.json()["id"] == "case0"


def test_health_is_open(keyed):
    assert httpx.get(f"{keyed[0].url}/health/").json() == {"status": "ok"}


def test_slicer_login_flow(keyed):
    """MONAI Label's client (3D Slicer module): GET /auth/, POST /auth/token with the key as password, bearer token."""
    server = keyed[0]
    assert httpx.get(f"{server.url}/auth/").json()["enabled"] is True
    assert httpx.post(f"{server.url}/auth/token", data={"username": "me", "password": "nope"}).status_code == 401
    token = httpx.post(f"{server.url}/auth/token", data={"username": "me", "password": KEY}).json()
    headers = {"Authorization": f"{token['token_type']} {token['access_token']}"}
    assert httpx.get(f"{server.url}/auth/token/valid", headers=headers).status_code == 200
    assert httpx.get(f"{server.url}/info/", headers=headers).status_code == 200


def test_only_the_admin_key_replaces_weights_and_only_with_a_checkpoint(keyed, tmp_path):
    """Item 5: with a key, weights are admin-only, and an upload must load strictly into the network."""
    server, _, _, bundle = keyed
    weights = bundle / "models" / "model.pt"
    user, admin = {"X-API-Key": KEY}, {"X-API-Key": ADMIN_KEY}
    before = sha(weights)
    junk = {"file": ("model.pt", b"not a checkpoint" * 100)}
    assert httpx.put(f"{server.url}/model/gf_screen", files=junk, headers=user).status_code == 403
    assert httpx.delete(f"{server.url}/model/gf_screen", headers=user).status_code == 403
    r = httpx.put(f"{server.url}/model/gf_screen", files=junk, headers=admin)
    assert r.status_code == 422 and "not a GF-Screen checkpoint" in r.json()["detail"]
    state = torch.load(weights, map_location="cpu", weights_only=True)
    name = next(k for k, v in state.items() if v.is_floating_point())
    wrong = {**state, name: torch.zeros(3)}
    torch.save(wrong, tmp_path / "wrong.pt")
    r = httpx.put(f"{server.url}/model/gf_screen", files=upload(tmp_path / "wrong.pt"), headers=admin)
    assert r.status_code == 422 and sha(weights) == before

    state[name] = state[name] + 0.01
    torch.save(state, tmp_path / "tuned.pt")
    r = httpx.put(f"{server.url}/model/gf_screen", files=upload(tmp_path / "tuned.pt"), headers=admin, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["checksum"] == f"SHA256:{sha(weights)}" and sha(weights) == sha(tmp_path / "tuned.pt")
    served = httpx.post(
        f"{server.url}/infer/gf_screen", params={"image": "case0", "output": "json"}, headers=user, timeout=300
    )
    assert served.status_code == 200 and served.json()["model"]["weights_mtime"] == weights.stat().st_mtime
    assert sorted(p.name for p in weights.parent.iterdir()) == ["model.pt"]


def test_the_key_never_reaches_the_logs(keyed):
    """Item 6: `--conf api_key KEY` is logged by MONAI Label with the app conf before the app loads, and passed to
    the training subprocess, which logs it again."""
    server, _, app, _ = keyed
    headers = {"X-API-Key": KEY}
    assert httpx.post(f"{server.url}/train/gf_screen", json={"max_epochs": 1}, headers=headers).status_code == 200
    trainer, deadline = None, time.time() + 60
    while trainer is None and time.time() < deadline:
        children = psutil.Process(server.process.pid).children(recursive=True)
        trainer = next((c for c in children if "monailabel.interfaces.utils.app" in " ".join(c.cmdline())), None)
        time.sleep(0.2)
    assert trainer is not None
    environment = "\n".join(trainer.environ().values()) + " ".join(trainer.cmdline())
    assert "bundle_path" in environment and KEY not in environment
    assert httpx.delete(f"{server.url}/train/", headers=headers).status_code == 200

    written = "".join(p.read_text(errors="replace") for p in (app / "logs").glob("*.log*"))
    assert "'api_key': '***'" in written and KEY not in written
    served = httpx.get(f"{server.url}/logs/", params={"lines": 100000}, headers=headers)
    assert served.status_code == 200 and "'api_key': '***'" in served.text and KEY not in served.text


# --- keyless server ---------------------------------------------------------------------------------------------


def test_session_archives_cannot_write_outside_the_session(site):
    """Item 1: tar members named ../x, or written through a link, are refused with the whole archive."""
    client, root = site["client"], site["root"]
    attacks = [
        tar_bytes({"../escape1.txt": b"x"}),
        tar_bytes({"/tmp/escape2.txt": b"x"}),
        tar_bytes({"ln/escape3.txt": b"x"}, links={"ln": str(root)}),
    ]
    for data in attacks:
        r = client.put("/session/", params={"uncompress": "true"}, files=[("files", ("scan.tar", data))])
        assert r.status_code == 422 and "scan.tar" in r.json()["detail"], r.text
    assert not list(root.rglob("escape*")) and not list(Path("/tmp").glob("escape2.txt"))
    assert not list(site["sessions"].iterdir())


def test_session_ids_stay_in_the_sessions_folder(site):
    """Item 2: MONAI Label deletes the folder a session id names if it holds a meta.info."""
    client, sessions = site["client"], site["sessions"]
    victims = [site["root"] / "victim", sessions.parent]
    for victim in victims:
        victim.mkdir(exist_ok=True)
        (victim / "meta.info").write_text(json.dumps({"name": "x", "image": str(victim / "gone.nii.gz")}))
        (victim / "keep.txt").write_text("an annotator's work")
    for session_id in (os.path.relpath(victims[0], sessions), str(victims[0]), "..", "not-a-uuid"):
        r = infer(client, session_id=session_id)
        assert r.status_code == 400 and "session_id" in r.json()["detail"], r.text
    for method in ("GET", "DELETE"):
        r = client.request(method, "/session/%2E%2E")
        assert r.status_code == 404, r.text
    assert all((victim / "keep.txt").exists() for victim in victims)


def test_request_params_never_name_files(site):
    """Item 3: params may not name the image, weights, output suffix or an MLflow store; undeclared keys are 400,
    what 3D Slicer and OHIF send is accepted."""
    client, root, tmp, bundle = site["client"], site["root"], site["tmp"], site["bundle"]
    p = phantom(5)
    secret = save_nifti(p.image, p.affine, tmp / "secret.nii.gz")
    other = shutil.copy(bundle / "models" / "model.pt", root / "other.pt")
    refused = {
        "image": infer(client, {"image": str(secret)}, image="case0"),
        "model_filename": infer(client, {"model_filename": os.path.relpath(other, bundle / "models")}, image="case0"),
        "result_extension": infer(client, {"result_extension": "/../../escape.nii.gz"}, image="case0"),
        "foo": infer(client, {"foo": 1}, image="case0"),
        "device": infer(client, {"device": "tpu"}, image="case0"),
        "tracking_uri": client.post(
            "/train/gf_screen", json={"tracking": "mlflow", "tracking_uri": f"sqlite:///{root}/mlflow.db"}
        ),
        "run_id": client.post("/batch/infer/gf_screen", json={"run_id": "x"}),
    }
    for key, r in refused.items():
        assert r.status_code == 400 and key in r.json()["detail"], (key, r.text)
    assert not list(root.rglob("mlflow.db")) and not list(root.rglob("escape*"))
    secret.unlink()

    config = client.get("/info/").json()["models"]["gf_screen"]["config"]
    ohif = {
        **config,
        "client_id": "ohif",
        "result_extension": ".nrrd",
        "result_dtype": "uint8",
        "result_compress": False,
        "restore_label_idx": False,
    }
    r = infer(client, ohif, image="case0")
    assert r.status_code == 200 and r.json()["report"]["case"] == "case0", r.text


def test_cross_site_requests_are_refused(site, tmp_path):
    """Item 4: a page on another site can make the annotator's browser post here, or read the API by DNS
    rebinding; requests from this server's own origin and from non-browser clients are served."""
    client, studies, labels, port = site["client"], site["studies"], site["labels"], site["server"].port
    assert put_label(client, "case0", labels / "case0.nii.gz").status_code == 200
    final = studies / "labels" / "final" / "case0.nii.gz"
    before = sha(final)
    p = phantom(0)
    forged = save_nifti(np.zeros_like(p.label), p.affine, tmp_path / "forged.nii.gz")

    r = put_label(client, "case0", forged, headers={"Origin": EVIL})
    assert r.status_code == 403 and "cross-origin" in r.json()["detail"]
    r = client.post("/train/gf_screen", json={"max_epochs": 1}, headers={"Origin": EVIL})
    assert r.status_code == 403
    r = put_label(client, "case0", forged, headers={"Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 403
    assert client.delete("/datastore/image", params={"id": "case0"}, headers={"Origin": "null"}).status_code == 403
    for path in ("/info/", "/datastore/image?image=case0"):
        r = client.get(path, headers={"Host": f"evil.example:{port}"})
        assert r.status_code == 403 and "Host" in r.json()["detail"]
    assert sha(final) == before and (studies / "case0.nii.gz").exists()
    assert client.get("/train/").status_code == 404  # no training was started

    own = {"Origin": f"http://127.0.0.1:{port}"}
    assert client.post("/activelearning/first", headers=own).status_code == 200
    assert client.get("/info/", headers={"Host": f"localhost:{port}"}).status_code == 200


def test_weights_cannot_be_replaced_or_deleted_without_an_admin_key(site):
    """Item 5: keyless, the weights endpoints and reload are off."""
    client, bundle = site["client"], site["bundle"]
    weights = bundle / "models" / "model.pt"
    before = sha(weights)
    r = client.put("/model/gf_screen", files={"file": ("model.pt", b"junk" * 100)})
    assert r.status_code == 403 and "GF_SCREEN_ADMIN_KEY" in r.json()["detail"]
    assert client.delete("/model/gf_screen").status_code == 403
    r = client.post("/reload")
    assert r.status_code == 403 and "restart" in r.json()["detail"]
    assert sha(weights) == before and sorted(p.name for p in weights.parent.iterdir()) == ["model.pt"]
    assert infer(client, image="case1").status_code == 200


def test_voxel_limits_hold_before_reading_and_after_resampling(site, tmp_path):
    """Item 7: a tiny file whose huge voxels resample to 640 x 640 x 320, and a forged header declaring
    2048 x 2048 x 1024 voxels, are refused from the header, without the server's memory growing."""
    client, pid = site["client"], site["server"].process.pid
    coarse = save_nifti(np.zeros((32, 32, 16), np.int16), np.diag([30.0, 30.0, 60.0, 1.0]), tmp_path / "coarse.nii.gz")
    assert coarse.stat().st_size < 400
    header = nib.Nifti1Header()
    header.set_data_shape((2048, 2048, 1024))
    header.set_data_dtype(np.int16)
    forged = tmp_path / "forged.nii.gz"
    forged.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + b"\1" * 1000))

    peak_before = peak_rss_mb(pid)
    r = infer(client, files=upload(coarse))
    assert r.status_code == 422 and "(640, 640, 320)" in r.json()["detail"], r.text
    for r in (
        infer(client, files=upload(forged)),
        client.put("/datastore/image", params={"image": "forged"}, files=upload(forged)),
        client.put("/session/", files=[("files", ("forged.nii.gz", forged.read_bytes()))]),
    ):
        assert r.status_code == 422 and "exceeds the limit" in r.json()["detail"], r.text
    assert peak_rss_mb(pid) - peak_before < 300
    assert not (site["studies"] / "forged.nii.gz").exists()


def peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 1024


def test_no_temporary_file_is_left_behind(site, tmp_path):
    """Item 8: refused uploads, failed inferences, sessions and the dataset download leave nothing in the server's
    temporary folder, and messages name the user's file."""
    client, tmp, labels = site["client"], site["tmp"], site["labels"]
    assert infer(client, image="case2").status_code == 200  # caches that inference creates once
    before = settled(tmp)
    junk = {"file": ("myscan.nii.gz", b"\x00garbage" * 500)}
    refused = [
        client.put("/datastore/image", params={"image": "junk"}, files=junk),
        infer(client, files=junk),
        client.put(
            "/datastore/label",
            params={"image": "case2", "tag": "final"},
            files={"label": ("myscan.nii.gz", junk["file"][1])},
        ),
        client.put("/session/", files=[("files", junk["file"])]),
        client.put("/session/", params={"uncompress": "true"}, files=[("files", ("myscan.nii.gz", b"not a tar"))]),
    ]
    for r in refused:
        assert r.status_code == 422 and "myscan.nii.gz" in r.json()["detail"] and str(tmp) not in r.text, r.text
    p = phantom(4)
    scan = save_nifti(p.image, p.affine, tmp_path / "scan.nii.gz")
    assert infer(client, files=upload(scan)).status_code == 200
    assert client.post("/infer/gf_screen", files=upload(scan)).status_code == 200  # label + JSON (multipart)
    session = client.put("/session/", files=[("files", ("scan.nii.gz", scan.read_bytes()))]).json()["session_id"]
    assert infer(client, session_id=session).status_code == 200
    assert client.delete(f"/session/{session}").status_code == 200
    assert put_label(client, "case1", labels / "case1.nii.gz").status_code == 200
    dataset = client.get("/datastore/dataset")
    assert dataset.status_code == 200 and dataset.content[:2] == b"PK"

    assert settled(tmp) == before


def settled(folder: Path, timeout: float = 10) -> set[str]:
    """The folder's listing once no temporary file is left in it (or after ``timeout`` s): result files and the
    dataset zip go once their response has been sent."""
    deadline = time.time() + timeout
    while any(name.startswith(("tmp", "gf-screen-")) for name in listing(folder)) and time.time() < deadline:
        time.sleep(0.2)
    return listing(folder)


def test_a_full_inference_queue_answers_503_and_info_stays_fast(site, tmp_path):
    """Item 9: with room for 2 inference requests, 8 at once: 2 served, 6 told to retry; /info/ and /health/ stay
    under a second."""
    p = phantom(11, shape=(96, 96, 48))
    scan = save_nifti(p.image, p.affine, tmp_path / "scan.nii.gz").read_bytes()
    url, results, latencies = f"{site['server'].url}/infer/gf_screen", [], []

    def run() -> None:
        r = httpx.post(url, params={"output": "json"}, files={"file": ("scan.nii.gz", scan)}, timeout=300)
        results.append((r.status_code, r.headers.get("retry-after"), r.json()))

    workers = [threading.Thread(target=run) for _ in range(8)]
    for w in workers:
        w.start()
    while any(w.is_alive() for w in workers):
        for path in ("/info/", "/health/"):
            start = time.perf_counter()
            assert site["client"].get(path).status_code == 200
            latencies.append(time.perf_counter() - start)
        time.sleep(0.1)
    for w in workers:
        w.join()
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200, 200] + [503] * 6, results
    assert all(int(retry) > 0 and "busy" in body["detail"] for status, retry, body in results if status == 503)
    assert len(latencies) >= 4 and max(latencies) < 1.0, latencies
    assert infer(site["client"], image="case0").status_code == 200  # the queue has drained


def test_bad_values_get_4xx_with_a_message(site, tmp_path):
    """Item 10: each of these was a 500 or was accepted."""
    client = site["client"]
    p = phantom(6)
    scan = save_nifti(p.image, p.affine, tmp_path / "scan.nii.gz")
    flat = save_nifti(p.image, np.eye(4), tmp_path / "zero.nii")
    raw = bytearray(flat.read_bytes())
    raw[80:84] = np.float32(0.0).tobytes()  # pixdim[1]: what nibabel and ITK silently read as 1 mm
    flat.write_bytes(bytes(raw))
    long_id = "a" * 250
    expected = [
        (client.post("/train/gf_screen", json={"max_epochs": "abc"}), 400),
        (client.post("/train/gf_screen", json={"max_epochs": None}), 400),
        (client.post("/train/gf_screen", json={"val_split": 2.0}), 400),
        (client.put("/datastore/image", params={"image": long_id}, files=upload(scan)), 400),
        (infer(client, image=long_id), 400),
        (infer(client, {"client_id": "a\u0000b"}, image="case0"), 400),
        (infer(client, {"result_extension": ".nii\u0000.gz"}, image="case0"), 400),
        (client.get("/logs/gpu"), 200 if shutil.which("nvidia-smi") else 404),
        (client.get("/proxy/dicom/qido/studies"), 404),
        (client.put("/datastore/image", params={"image": "zero"}, files=upload(flat)), 422),
        (client.put("/datastore/image/info", params={"image": "case0"}, data={"info": "[1]"}), 400),
        (client.get("/logs/", params={"lines": -1}), 400),
    ]
    for r, status in expected:
        assert r.status_code == status, (r.request.url, r.status_code, r.text)
        if status != 200:
            assert r.json()["detail"], r.text
    assert not (site["studies"] / "zero.nii").exists()


def test_the_connection_survives_a_500(site):
    """Item 10: after a 500 the next request on the same keep-alive connection is served, 20 times out of 20."""
    label = site["labels"] / "case0.nii.gz"
    with httpx.Client(base_url=site["server"].url, timeout=60) as client:
        for _ in range(20):
            failed = put_label(client, "case0", label, tag="broken_tag")  # its folder is a file: an unexpected error
            assert failed.status_code == 500 and failed.json()["detail"].startswith("internal error")
            assert client.get("/health/").status_code == 200


def test_inference_never_writes_an_annotators_label(site):
    """Item 11: model output is saved only as `original`, never over a final label."""
    client, studies, labels = site["client"], site["studies"], site["labels"]
    assert put_label(client, "case1", labels / "case1.nii.gz").status_code == 200
    final = studies / "labels" / "final" / "case1.nii.gz"
    before = sha(final)
    r = infer(client, {"save_label": True, "label_tag": "final"}, image="case1")
    assert r.status_code == 400 and "label_tag" in r.json()["detail"]
    r = client.post("/batch/infer/gf_screen", params={"images": "all", "run_sync": True}, json={"label_tag": "final"})
    assert r.status_code == 400
    assert infer(client, {"save_label": True}, image="case1").status_code == 200
    assert (studies / "labels" / "original" / "case1.nii.gz").exists() and sha(final) == before


def test_an_image_with_labels_is_not_replaced_by_another(site, tmp_path):
    """Item 12: a different volume under a labelled image's id is 409; the same volume again is accepted."""
    client, studies, labels = site["client"], site["studies"], site["labels"]
    assert put_label(client, "case2", labels / "case2.nii.gz").status_code == 200
    image, final = studies / "case2.nii.gz", studies / "labels" / "final" / "case2.nii.gz"
    before = (sha(image), sha(final))
    p = phantom(9)
    other = save_nifti(p.image, p.affine, tmp_path / "other.nii.gz")
    r = client.put("/datastore/image", params={"image": "case2"}, files=upload(other))
    assert r.status_code == 409 and "case2" in r.json()["detail"]
    stored = nib.load(image)
    again = save_nifti(np.asarray(stored.dataobj), stored.affine, tmp_path / "again.nii")  # other bytes, same volume
    r = client.put("/datastore/image", params={"image": "case2"}, files=upload(again))
    assert r.status_code == 200 and (sha(image), sha(final)) == before
    info = client.get("/datastore/", params={"output": "all"}).json()["objects"]["case2"]
    assert "final" in info["labels"]


def test_uid_like_file_names_keep_their_whole_id(site, tmp_path):
    """Item 13: 1.2.840.1001.nii.gz and 1.2.840.2002.nii.gz are two images, not both `1`."""
    client, studies = site["client"], site["studies"]
    for seed, uid in enumerate(("1.2.840.1001", "1.2.840.2002")):
        p = phantom(20 + seed)
        path = save_nifti(p.image, p.affine, tmp_path / f"{uid}.nii.gz")
        r = client.put("/datastore/image", files=upload(path))
        assert r.status_code == 200 and r.json() == {"image": uid}, r.text
        assert sha(studies / f"{uid}.nii.gz") == sha(path)
    objects = client.get("/datastore/", params={"output": "all"}).json()["objects"]
    assert {"1.2.840.1001", "1.2.840.2002"} <= set(objects) and "1" not in objects


def test_deleted_images_and_labels_go_to_the_trash(site, tmp_path):
    """Item 14: deleting keeps the files, with their datastore entry, under STUDIES/.trash/."""
    client, studies = site["client"], site["studies"]
    p = phantom(30)
    image = save_nifti(p.image, p.affine, tmp_path / "gone.nii.gz")
    label = save_nifti(p.label, p.affine, tmp_path / "gone_label.nii.gz")
    assert client.put("/datastore/image", files=upload(image)).status_code == 200
    assert put_label(client, "gone", label).status_code == 200
    assert client.delete("/datastore/image", params={"id": "gone"}).status_code == 200
    assert "gone" not in client.get("/datastore/", params={"output": "all"}).json()["objects"]
    [entry] = [e for e in (studies / ".trash").iterdir() if e.name.endswith("_gone")]
    assert sha(entry / "gone.nii.gz") == sha(image)
    assert sha(entry / "labels" / "final" / "gone.nii.gz") == sha(label)
    assert json.loads((entry / "entry.json").read_text())["labels"]["final"]

    assert client.put("/datastore/image", files=upload(image, "kept.nii.gz")).status_code == 200
    assert put_label(client, "kept", label).status_code == 200
    assert client.delete("/datastore/label", params={"id": "kept", "tag": "final"}).status_code == 200
    assert client.get("/datastore/", params={"output": "all"}).json()["objects"]["kept"]["labels"] == {}
    [entry] = [e for e in (studies / ".trash").iterdir() if e.name.endswith("_kept.final")]
    assert sha(entry / "labels" / "final" / "kept.nii.gz") == sha(label)


def test_monailabel_client_session_flow(site, tmp_path):
    """Item 15: MONAI Label's own client (3D Slicer's) creates a session, then infers on it naming the volume."""
    from monailabel.client import MONAILabelClient

    client = MONAILabelClient(site["server"].url, tmpdir=str(tmp_path))
    p = phantom(12, shape=(56, 48, 24))
    scan = save_nifti(p.image, p.affine, tmp_path / "local.nii.gz")
    session_id = client.create_session(str(scan))["session_id"]
    assert client.get_session(session_id)["name"] == session_id
    label, result = client.infer("gf_screen", "3: CT Chest/Abdomen", {}, session_id=session_id)
    assert nib.load(label).shape == (56, 48, 24) and result["report"]["input_geometry"]["shape"] == [56, 48, 24]
    client.remove_session(session_id)
    assert not (site["sessions"] / session_id).exists()

    archive = tar_bytes({"series/local.nii.gz": scan.read_bytes()})
    r = site["client"].put("/session/", params={"uncompress": "true"}, files=[("files", ("scan.tar", archive))])
    assert r.status_code == 200, r.text
    r = infer(site["client"], session_id=r.json()["session_id"], image="ignored name")
    assert r.status_code == 200 and r.json()["report"]["input_geometry"]["shape"] == [56, 48, 24]


def test_api_pages_work_offline(site):
    """The root page and /docs list the API without scripts from a CDN."""
    for path in ("/", "/docs"):
        r = site["client"].get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "/infer/{model}" in r.text and "<script" not in r.text and "cdn" not in r.text.lower()
