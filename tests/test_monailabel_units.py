"""Unit checks of the MONAI Label app's validation, active-learning score and training set-up (no server)."""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser

from monailabel_utils import APP_DIR, BUNDLE_DIR, save_nifti

sys.path.insert(0, str(APP_DIR))
from lib.scoring.glance_uncertainty import glance_uncertainty  # noqa: E402
from lib.trainers.gf_screen import GFScreenTrain  # noqa: E402
from lib.validation import InvalidRequest, InvalidUpload, check_image, check_label, check_name  # noqa: E402


@pytest.mark.parametrize("name", ["case0", "1.2.840.113619.2.55", "CT_abdomen-01"])
def test_plain_names_pass(name):
    assert check_name(name, "image") == name


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "/etc/passwd", "a\\b", ".hidden", " x", "x\0"])
def test_names_that_could_leave_the_folder_fail(name):
    with pytest.raises(InvalidRequest):
        check_name(name, "image")


def test_glance_uncertainty_is_highest_at_the_threshold():
    assert glance_uncertainty([0.5], 0.5) == pytest.approx(1.0)
    assert glance_uncertainty([0.0, 1.0], 0.5) == pytest.approx(0.0)
    # the 10 % most uncertain windows decide: one ambiguous window among 9 confident ones
    assert glance_uncertainty([0.5] + [0.0] * 9, 0.5) == pytest.approx(1.0)
    assert glance_uncertainty([0.3, 0.9], 0.3, top_fraction=1.0) == pytest.approx((1.0 + (1 - 0.6 / 0.7)) / 2)
    with pytest.raises(ValueError):
        glance_uncertainty([], 0.5)


def test_image_and_label_checks(tmp_path):
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    image = save_nifti(np.zeros((8, 9, 10), np.int16), affine, tmp_path / "image.nii.gz")
    assert check_image(image).shape == (8, 9, 10)
    check_label(save_nifti(np.ones((8, 9, 10), np.uint8), affine, tmp_path / "ok.nii.gz"), image)
    with pytest.raises(InvalidUpload, match="spacing"):
        check_label(save_nifti(np.ones((8, 9, 10), np.uint8), np.eye(4), tmp_path / "sp.nii.gz"), image)
    with pytest.raises(InvalidUpload, match="3D"):
        check_image(save_nifti(np.zeros((8, 9), np.int16), np.eye(4), tmp_path / "2d.nii.gz"))
    noise = np.random.default_rng(0).integers(-1000, 1000, (8, 9, 10), dtype=np.int16)
    full = save_nifti(noise, affine, tmp_path / "noise.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(full[: len(full) // 2])  # header intact, voxel data truncated
    with pytest.raises(InvalidUpload):
        check_image(tmp_path / "cut.nii.gz")


def test_training_loads_gpu_saved_weights_on_a_cpu_only_server(tmp_path, monkeypatch):
    """Weights saved on a GPU (storages tagged 'cuda:0') are fine-tuned on a CPU-only server: the train task's
    CheckpointLoader maps them to the training device (MONAI Label's own loader has no map_location)."""
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE_DIR, bundle, ignore=shutil.ignore_patterns("__pycache__", "eval", "runs", "models"))
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    state = parser.get_parsed_content("network_def").state_dict()
    weights = bundle / "models" / "model.pt"
    weights.parent.mkdir()
    with monkeypatch.context() as m:  # what torch.save writes for tensors on a GPU
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(state, weights)
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(weights, weights_only=True)

    task = GFScreenTrain(str(bundle), {})
    handlers: list[dict] = []
    task._load_checkpoint(str(weights), True, handlers)
    assert [h["_target_"] for h in handlers] == ["CheckpointLoader"]
    parser["device"] = "$torch.device('cpu')"
    parser["loader"] = handlers[0]
    network = parser.get_parsed_content("network_def")
    for p in network.parameters():
        torch.nn.init.zeros_(p)
    engine = Engine(lambda e, b: None)
    parser.get_parsed_content("loader").attach(engine)
    engine.run([0], max_epochs=1)
    for key, value in network.state_dict().items():
        torch.testing.assert_close(value, state[key])
