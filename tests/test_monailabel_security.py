"""API key of the MONAI Label app: required everywhere but the health check when set, and 3D Slicer's login works."""

from __future__ import annotations

import httpx
import pytest

from monailabel_utils import Server, copy_app, phantom, save_nifti, tree

pytestmark = pytest.mark.server

KEY = "test-key-0123456789"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    root = tmp_path_factory.mktemp("ml_key")
    app, bundle = copy_app(root)
    studies = root / "studies"
    studies.mkdir()
    p = phantom(3)
    save_nifti(p.image, p.affine, studies / "case0.nii.gz")
    server = Server(app, str(studies), bundle, env={"GF_SCREEN_API_KEY": KEY}, host="127.0.0.1")
    yield server, studies
    server.stop()


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
    server, studies = keyed
    before = tree(studies)
    missing = httpx.request(method, server.url + path, params=params, timeout=30)
    wrong = httpx.request(method, server.url + path, params=params, headers={"X-API-Key": "nope"}, timeout=30)
    assert missing.status_code == 401 and missing.json()["detail"]
    assert wrong.status_code == 403
    assert tree(studies) == before


def test_key_as_header_or_bearer_token(keyed):
    server, _ = keyed
    assert httpx.get(f"{server.url}/info/", headers={"X-API-Key": KEY}).status_code == 200
    assert httpx.get(f"{server.url}/info/", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    r = httpx.post(f"{server.url}/activelearning/first", headers={"X-API-Key": KEY})
    assert r.status_code == 200 and r.json()["id"] == "case0"


def test_health_is_open(keyed):
    server, _ = keyed
    assert httpx.get(f"{server.url}/health/").json() == {"status": "ok"}


def test_slicer_login_flow(keyed):
    """MONAI Label's client (3D Slicer module): GET /auth/, POST /auth/token with the key as password, bearer token."""
    server, _ = keyed
    assert httpx.get(f"{server.url}/auth/").json()["enabled"] is True
    assert httpx.post(f"{server.url}/auth/token", data={"username": "me", "password": "nope"}).status_code == 401
    token = httpx.post(f"{server.url}/auth/token", data={"username": "me", "password": KEY}).json()
    headers = {"Authorization": f"{token['token_type']} {token['access_token']}"}
    assert httpx.get(f"{server.url}/auth/token/valid", headers=headers).status_code == 200
    assert httpx.get(f"{server.url}/info/", headers=headers).status_code == 200
