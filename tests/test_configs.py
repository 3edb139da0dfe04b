"""The bundle's configs agree with each other: shared settings, overrides that extend their base, and every
override composing with each base it names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"
SHARED = ("pixdim", "roi_size", "hu_windows", "glance_threshold", "overlap", "min_lesion_mm3", "min_lesion_peak")


def _parser(*names: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / n) for n in names])
    return parser


def _shapes(network: torch.nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in network.state_dict().items()}


@pytest.mark.parametrize(
    "workflow, inferer_id",
    [
        (("train.json",), "validate#inferer"),
        (("train.json", "evaluate.json"), "validate#inferer"),
        (("train.json", "multi_gpu_train.json"), "validate#inferer"),
        (("train.json", "evaluate.json", "multi_gpu_evaluate.json"), "validate#inferer"),
        (("inference.json", "multi_gpu_inference.json"), "inferer"),
    ],
)
def test_shared_settings_and_networks_agree_with_inference(workflow, inferer_id):
    """What training validates, evaluation scores and inference ships use the same threshold, grid, windows,
    post-processing limits and networks (a validation at another threshold than the shipped one once made the
    model card's numbers wrong)."""
    shipped, other = _parser("inference.json"), _parser(*workflow)
    for key in SHARED:
        assert other[key] == shipped[key], f"{key}: {other[key]} in {workflow} vs {shipped[key]} in inference.json"
    inferer = other.get_parsed_content(inferer_id)
    assert (inferer.threshold, inferer.overlap, tuple(inferer.roi_size)) == (
        shipped["glance_threshold"], shipped["overlap"], tuple(shipped["roi_size"])
    )
    assert _shapes(other.get_parsed_content("network_def")) == _shapes(shipped.get_parsed_content("network_def"))


def test_multi_gpu_training_extends_the_training_run():
    """The multi-GPU override keeps train.json's run list (a copy once dropped --pretrained_focus) and adds the
    process group to the base's initialisation instead of replacing it."""
    base, multi = _parser("train.json"), _parser("train.json", "multi_gpu_train.json")
    assert multi["run"] == base["run"] and any("load_focus" in step for step in multi["run"])
    assert multi["initialize"][: len(base["initialize"])] == base["initialize"]
    assert any("init_process_group" in step for step in multi["initialize"])
    assert multi["save_checkpoints"] != base["save_checkpoints"]  # rank 0 only, decided at run time


@pytest.mark.parametrize("base", ["train.json", "inference.json"])
def test_paper_override_composes_with_each_base(base):
    """configs/paper.json (the authors' settings) builds its networks and inferer over train.json and over
    inference.json; on train.json it also sets the trainer's CE weight."""
    parser = _parser(base, "paper.json")
    net = parser.get_parsed_content("network_def")
    assert type(net.glance).__name__ == "ResNet" and type(net.focus).__name__ == "SwinUNETR"
    inferer = parser.get_parsed_content("validate#inferer" if base == "train.json" else "inferer")
    assert tuple(inferer.roi_size) == (96, 96, 64) and inferer.threshold == 0.9
    if base == "train.json":
        assert parser.get_parsed_content("train#trainer#alpha") == 0.1
