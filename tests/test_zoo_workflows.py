"""The bundle's train, evaluate and infer workflows as the model-zoo's CPU unit tests run them: `ConfigWorkflow`
with `check_properties`, from another working directory, the bundle found through `bundle_root`, on a few tiny
synthetic phantoms (one epoch)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from scripts.phantom import write_phantom_dataset

BUNDLE_ROOT = Path(__file__).resolve().parents[1] / "bundle"
CONFIGS = BUNDLE_ROOT / "configs"
TINY = {"shape": (40, 40, 20), "spacing": (3.0, 3.0, 6.0)}  # 80 x 80 x 40 voxels on the model grid


def _workflow(workflow_type: str, *configs: str, **override) -> ConfigWorkflow:
    workflow = ConfigWorkflow(
        workflow_type=workflow_type,
        config_file=[str(CONFIGS / c) for c in configs],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        bundle_root=str(BUNDLE_ROOT),
        **override,
    )
    workflow.initialize()
    assert not workflow.check_properties(), workflow.check_properties()
    return workflow


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantoms")
    write_phantom_dataset(root, num_cases=4, seed=0, **TINY)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset):
    """train.json, one epoch, from a working directory outside the bundle; outputs outside it too."""
    out = tmp_path_factory.mktemp("train")
    with pytest.MonkeyPatch.context() as m:
        m.chdir(out)
        workflow = _workflow(
            "train",
            "train.json",
            dataset_dir=str(dataset),
            ckpt_dir=str(out / "models"),
            output_dir=str(out / "runs"),
            num_workers=0,
            cache_rate=0.0,
            group_size=4,
            rl_warmup_epochs=0,
            **{"train#trainer#max_epochs": 1},
        )
        workflow.run()
        workflow.finalize()
    return out, workflow


def test_train(trained):
    """One epoch trains, validates and saves a model.pt that loads strictly into inference.json's network."""
    out, workflow = trained
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 1 and trainer.state.iteration == 1  # 2 training scans, 2 per batch
    assert 0.0 <= workflow.parser.get_parsed_content("validate#evaluator").state.metrics["val_lesion_dice"] <= 1.0
    assert (out / "models" / "checkpoint_epoch=1.pt").is_file()
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(out / "models" / "model.pt", map_location="cpu", weights_only=True))
    assert list(out.glob("runs/events.out.tfevents.*")), "no TensorBoard log"


def test_evaluate(trained, dataset, tmp_path, monkeypatch):
    """train.json + evaluate.json scores the trained model on the validation phantoms into metrics.json."""
    out, _ = trained
    monkeypatch.chdir(tmp_path)
    workflow = _workflow(
        "train",  # as the zoo: evaluate.json overrides train.json
        "train.json",
        "evaluate.json",
        dataset_dir=str(dataset),
        ckpt_dir=str(out / "models"),
        output_dir=str(tmp_path / "eval"),
        num_workers=0,
        cache_rate=0.0,
    )
    workflow.run()
    workflow.finalize()
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    validation = json.loads((dataset / "dataset.json").read_text())["validation"]
    assert sorted(c["case"] for c in metrics["cases"]) == sorted(
        Path(v["image"]).name.split(".")[0] for v in validation
    )
    assert 0.0 <= metrics["summary"]["dsc"] <= 1.0


def test_infer(dataset, tmp_path, monkeypatch):
    """inference.json with the shipped weights: a mask in the input's geometry and a report for every scan."""
    scans = tmp_path / "scans"
    scans.mkdir()
    for image in sorted((dataset / "imagesTr").glob("*.nii.gz"))[:2]:
        shutil.copy(image, scans / image.name)
    monkeypatch.chdir(tmp_path)
    workflow = _workflow("infer", "inference.json", dataset_dir=str(scans), output_dir=str(tmp_path / "out"))
    workflow.run()
    workflow.finalize()
    for image in sorted(scans.glob("*.nii.gz")):
        case = image.name.split(".")[0]
        mask = nib.load(tmp_path / "out" / f"{case}_lesion.nii.gz")
        source = nib.load(image)
        assert mask.shape == source.shape and np.allclose(mask.affine, source.affine, atol=1e-4)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
        assert json.loads((tmp_path / "out" / f"{case}_report.json").read_text())["verdict"]
