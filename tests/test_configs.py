"""The bundle's configs agree with each other: shared settings defined once (in inference.json, the shipped
config) and read by every workflow, overrides that extend their base, and every override composing with each base
it names."""

from __future__ import annotations

import importlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"
SHARED = ("pixdim", "roi_size", "hu_windows", "glance_threshold", "overlap", "min_lesion_mm3", "min_lesion_peak")
WORKFLOWS = {  # each workflow's configs and the id of the inferer it validates or screens with
    "train": (("train.json",), "validate#inferer"),
    "evaluate": (("train.json", "evaluate.json"), "validate#inferer"),
    "multi-GPU train": (("train.json", "multi_gpu_train.json"), "validate#inferer"),
    "multi-GPU evaluate": (("train.json", "evaluate.json", "multi_gpu_evaluate.json"), "validate#inferer"),
    "multi-GPU inference": (("inference.json", "multi_gpu_inference.json"), "inferer"),
}


def _parser(*names: str, configs: Path = CONFIGS) -> ConfigParser:
    """The configs as `monai.bundle run` reads them from the bundle folder (``bundle_root``), from any cwd."""
    parser = ConfigParser()
    parser.read_config([str(configs / n) for n in names])
    parser["bundle_root"] = str(configs.parent)
    return parser


def _in_channels(network: torch.nn.Module) -> int:
    return next(m for m in network.modules() if isinstance(m, torch.nn.Conv3d)).in_channels


def _transforms(pipeline) -> list:
    """The transforms of a Compose, those of nested ones (InvertFindingsd's mask_transform) included."""
    out = []
    for t in getattr(pipeline, "transforms", ()):
        out += [t, *_transforms(t), *_transforms(getattr(t, "mask_transform", None))]
    return out


def _pipeline_settings(parser: ConfigParser, prefix: str) -> dict:
    """The shared settings as the pre- and post-processing transforms of a workflow use them."""
    found = {}
    for t in _transforms(parser.get_parsed_content(prefix + "preprocessing")):
        if type(t).__name__ == "Spacingd":
            found["pixdim"] = t.spacing_transform.pixdim.tolist()
        if type(t).__name__ == "OrientedSpacingd":  # inference's one-pass Orientationd + Spacingd
            found["pixdim"] = t.spacing.pixdim.tolist()
        if type(t).__name__ == "HUWindowsd":
            found["hu_windows"] = [list(w) for w in t.windows]
    for t in _transforms(parser.get_parsed_content(prefix + "postprocessing")):
        if type(t).__name__ == "RemoveSmallObjectsd":
            found["min_lesion_mm3"] = t.converter.min_size
        if type(t).__name__ == "LesionConfidenceFilterd":
            found["min_lesion_peak"] = t.min_peak
    return found


def _shapes(network: torch.nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in network.state_dict().items()}


@pytest.mark.parametrize("workflow, inferer_id", WORKFLOWS.values(), ids=WORKFLOWS.keys())
def test_shared_settings_and_networks_agree_with_inference(workflow, inferer_id):
    """What training validates, evaluation scores and inference ships use the same threshold, grid, windows,
    post-processing limits and networks (a validation at another threshold than the shipped one once made the
    model card's numbers wrong)."""
    shipped, other = _parser("inference.json"), _parser(*workflow)
    for key in SHARED:
        value = other.get_parsed_content(key)
        assert value == shipped[key], f"{key}: {value} in {workflow} vs {shipped[key]} in inference.json"
    inferer = other.get_parsed_content(inferer_id)
    assert (inferer.threshold, inferer.overlap, tuple(inferer.roi_size)) == (
        shipped["glance_threshold"],
        shipped["overlap"],
        tuple(shipped["roi_size"]),
    )
    prefix = "validate#" if inferer_id.startswith("validate#") else ""
    assert _pipeline_settings(other, prefix) == _pipeline_settings(shipped, "")
    assert _shapes(other.get_parsed_content("network_def")) == _shapes(shipped.get_parsed_content("network_def"))


def test_shared_settings_are_defined_once_in_inference_json():
    """inference.json (the shipped config, read as it is by MONAI Label and the zoo's checks) holds each shared
    setting and the networks; train.json takes them from it (`shipped`), and no other config restates them
    except paper.json, an override of both bases."""
    train = json.loads((CONFIGS / "train.json").read_text())
    assert "/configs/inference.json" in train["shipped"] and "@bundle_root" in train["shipped"]
    assert {key: train[key] for key in SHARED} == {key: f"$@shipped['{key}']" for key in SHARED}
    assert "@shipped" in train["network_def"] and not {"glance_def", "focus_def"} & train.keys()
    shipped = json.loads((CONFIGS / "inference.json").read_text())
    assert all(not isinstance(shipped[key], str) for key in SHARED)  # values, not references
    for path in CONFIGS.glob("*.json"):
        if path.name not in ("inference.json", "train.json", "paper.json", "metadata.json"):
            restated = {k.split("#")[0] for k in json.loads(path.read_text())} & {*SHARED, "network_def"}
            assert not restated, f"{path.name} restates {restated}"


@pytest.mark.parametrize("workflow, inferer_id", WORKFLOWS.values(), ids=WORKFLOWS.keys())
def test_every_workflow_follows_a_change_of_the_shipped_settings(tmp_path, workflow, inferer_id):
    """Change the settings once, in a copy of inference.json: every workflow validates, scores or screens with the
    new threshold, grid, windows and limits, and builds the network for them (three HU windows: three input
    channels), training keeping its own crop context."""
    configs = Path(shutil.copytree(CONFIGS, tmp_path / "configs"))
    changed = {
        "pixdim": [2.0, 2.0, 4.0],
        "roi_size": [48, 48, 24],
        "hu_windows": [[-160, 240], [-1000, 1000], [0, 100]],
        "glance_threshold": 0.7,
        "overlap": 0.25,
        "min_lesion_mm3": 80,
        "min_lesion_peak": 0.6,
    }
    shipped = json.loads((configs / "inference.json").read_text())
    (configs / "inference.json").write_text(json.dumps({**shipped, **changed}))
    parser = _parser(*workflow, configs=configs)
    assert {key: parser.get_parsed_content(key) for key in SHARED} == changed
    inferer = parser.get_parsed_content(inferer_id)
    assert (inferer.threshold, inferer.overlap, tuple(inferer.roi_size)) == (0.7, 0.25, (48, 48, 24))
    prefix = "validate#" if inferer_id.startswith("validate#") else ""
    assert _pipeline_settings(parser, prefix) == {
        k: changed[k] for k in ("pixdim", "hu_windows", "min_lesion_mm3", "min_lesion_peak")
    }
    net = parser.get_parsed_content("network_def")
    assert _in_channels(net.focus) == _in_channels(net.glance) == 3
    context = [16, 16, 16] if "train.json" in workflow else [0, 0, 0]
    assert net.glance.margin == [c // net.glance.scale for c in context]


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


def test_configs_reference_the_library_and_command_line_tools_stay_apart():
    """What configs reference (``_target_`` and ``$`` expressions) lives in ``scripts`` (and imports);
    ``scripts.cli`` holds only tools people run, each one runnable, and no library module imports them."""
    scripts = CONFIGS.parent / "scripts"
    referenced = {
        m.group(1)
        for config in CONFIGS.glob("*.json")
        for m in re.finditer(r'(?:"_target_": "|"\$[^"]*?)scripts\.([a-z_]+)', config.read_text())
    }
    assert len(referenced) >= 8 and {n for n in referenced if not (scripts / f"{n}.py").is_file()} == set()
    for name in referenced:
        importlib.import_module(f"scripts.{name}")
    library = [p for p in scripts.glob("*.py") if p.name != "__init__.py"]
    assert [p.name for p in library if re.search(r"from \.cli\b|scripts\.cli\b", p.read_text())] == []
    tools = [p for p in (scripts / "cli").glob("*.py") if p.stem not in ("__init__", "startup")]
    assert len(tools) >= 7 and all('if __name__ == "__main__":' in p.read_text() for p in tools)
    assert {p.stem for p in tools}.isdisjoint(p.stem for p in library)
