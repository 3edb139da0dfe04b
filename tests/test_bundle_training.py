"""The bundle's workflows as a user runs them (`python -m monai.bundle run ...` / torchrun), from a copy of
`bundle/` in a temporary folder: training smoke run, resume after a kill, evaluation, and DDP with gloo on CPU."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from scripts.cli.benchmark import free_port
from scripts.phantom import make_phantom, write_phantom_dataset

BUNDLE_ROOT = Path(__file__).resolve().parents[1] / "bundle"
TRAIN = "configs/train.json"
PHANTOMS = "configs/phantoms.json"
LOSS_TAGS = {"loss", "seg_loss", "glance_ce", "rl_loss", "reward", "kept_fraction", "kl"}
VAL_TAGS = {"val_lesion_dice", "val_glance_sensitivity", "val_glance_specificity", "val_kept_fraction"}
# A small but complete run: small phantoms (64x64x40 voxels at 2x2x3 mm, the model grid), small windows.
FAST = ["--roi_size", "[32,32,16]", "--group_size", "4"]
TIME_LIMIT_S = 300  # issue 2: the documented small training run finishes in under 5 minutes on this CPU
RUN_DONE = "- INFO - Engine run (?:complete|finished)"  # what an engine logs at the end: ignite 0.4 / 0.5


def _configs(*names: str) -> str:
    return "[" + ",".join(f"'{n}'" for n in names) + "]"


def _copy_bundle(dest: Path) -> Path:
    """bundle/ without weights, data or outputs: the run writes only into `dest`."""
    shutil.copytree(
        BUNDLE_ROOT,
        dest,
        ignore=shutil.ignore_patterns("models", "data", "runs", "eval", "logs", "mlruns", "__pycache__", "*.pyc"),
    )
    (dest / "models").mkdir()
    return dest


def _env(threads: int = 2) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}


def _bundle_run(
    cwd: Path, run_id: str, configs: str, *args: str, timeout: int = 400
) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", configs, *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_env())
    return proc, time.perf_counter() - start


def _torchrun(cwd: Path, run_id: str, configs: str, *args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        "-m",
        "monai.bundle",
        "run",
        run_id,
        "--config_file",
        configs,
        *args,
    ]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_env(threads=1))


def _fail(proc) -> str:
    return f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}"


def _scalars(run_dir: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Scalar events per event file: {file name: {tag: [(step, value), ...]}}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = {}
    for f in sorted(run_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f))
        acc.Reload()
        files[f.name] = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    return files


def _merged(files: dict) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list] = {}
    for tags in files.values():
        for tag, events in tags.items():
            out.setdefault(tag, []).extend(events)
    return out


def _pairs(text: str) -> dict[str, str]:
    """`name: value name: value ...` of a StatsHandler log line."""
    return dict(re.findall(r"(\w+): (\S+)", text))


def _network_keys(bundle: Path) -> set[str]:
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    return set(parser.get_parsed_content("network_def").state_dict())


def _assert_model_loads(path: Path, bundle: Path) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert set(state) == _network_keys(bundle), "model.pt must load strictly into inference.json's network_def"
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def _trainer_state(ckpt: Path) -> dict:
    """The ignite engine state saved in a training checkpoint (epoch_length, max_epochs, iteration)."""
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert {"model", "optimizer", "trainer", "reference"} <= set(state)
    return state["trainer"]


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    """Generated once, before any (multi-process) run: 4 training and 2 validation phantoms, 1 lesion-free each."""
    root = tmp_path_factory.mktemp("phantoms")
    write_phantom_dataset(root, num_cases=6, seed=0, shape=(64, 64, 40), spacing=(2.0, 2.0, 3.0))
    return root


# --- single-process training smoke run ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The documented quick run: train.json + phantoms.json (which generates the phantoms), 2 epochs."""
    bundle = _copy_bundle(tmp_path_factory.mktemp("smoke") / "bundle")
    proc, seconds = _bundle_run(
        bundle,
        "training",
        _configs(TRAIN, PHANTOMS),
        "--num_phantoms",
        "4",
        "--phantom_shape",
        "[64,64,40]",
        "--phantom_spacing",
        "[2.0,2.0,3.0]",
    )
    return bundle, proc, seconds


def test_training_smoke(trained):
    bundle, proc, seconds = trained
    assert proc.returncode == 0, _fail(proc)
    assert seconds < TIME_LIMIT_S, f"training smoke run took {seconds:.0f} s"
    log = proc.stdout + proc.stderr

    # phantoms were generated by phantoms.json's initialize, into the bundle copy
    datalist = json.loads((bundle / "data" / "phantoms" / "dataset.json").read_text())
    assert len(datalist["training"]) + len(datalist["validation"]) == 4
    n_train = len(datalist["training"])

    _assert_model_loads(bundle / "models" / "model.pt", bundle)
    ckpts = sorted(p.name for p in (bundle / "models").glob("checkpoint_*.pt"))
    assert ckpts == ["checkpoint_epoch=2.pt"]  # n_saved=1: only the last one is kept
    state = _trainer_state(bundle / "models" / "checkpoint_epoch=2.pt")
    iters_per_epoch = -(-n_train // 2)  # scans_per_batch = 2
    assert state["epoch_length"] == iters_per_epoch and state["iteration"] == 2 * iters_per_epoch  # epoch 2

    # TensorBoard: every loss term per iteration and every validation metric per epoch
    scalars = _merged(_scalars(bundle / "runs"))
    assert LOSS_TAGS | VAL_TAGS <= set(scalars), sorted(scalars)
    for tag in LOSS_TAGS:
        assert [s for s, _ in scalars[tag]] == list(range(1, 2 * iters_per_epoch + 1)), tag
    for tag in VAL_TAGS:
        assert [s for s, _ in scalars[tag]] == [1, 2], tag
        assert all(0.0 <= v <= 1.0 for _, v in scalars[tag]), (tag, scalars[tag])
    parser = ConfigParser()
    parser.read_config(str(bundle / TRAIN))
    alpha, rl_weight = parser.get_parsed_content("train#trainer#alpha"), parser["train#trainer"].get("rl_weight", 1.0)
    for step in range(2 * iters_per_epoch):
        terms = {t: scalars[t][step][1] for t in LOSS_TAGS}
        expected = terms["seg_loss"] + alpha * terms["glance_ce"] + rl_weight * terms["rl_loss"]
        assert terms["loss"] == pytest.approx(expected, abs=1e-4)
        assert 0 <= terms["reward"] <= 1 and 0 <= terms["kept_fraction"] <= 1 and terms["kl"] >= 0

    # the console shows the same numbers, with progress
    lines = re.findall(r"Epoch: (\d+)/2, Iter: (\d+)/(\d+) -- (.*)", log)
    assert len(lines) == 2 * iters_per_epoch
    logged = _pairs(lines[-1][3])
    assert float(logged["loss"]) == pytest.approx(scalars["loss"][-1][1], abs=1e-4)
    for epoch in (1, 2):
        metrics = re.search(rf"Epoch\[{epoch}\] Metrics -- (.*)", log)
        assert metrics, f"no validation metrics logged for epoch {epoch}"
        shown = _pairs(metrics.group(1))
        assert set(shown) == VAL_TAGS
        assert float(shown["val_lesion_dice"]) == pytest.approx(scalars["val_lesion_dice"][epoch - 1][1], abs=1e-4)


@pytest.fixture(scope="module")
def evaluated(trained):
    """evaluate.json, single process, on the smoke run's model and validation phantoms."""
    bundle, proc, _ = trained
    assert proc.returncode == 0, _fail(proc)
    out = bundle / "eval_single"
    ev, _ = _bundle_run(
        bundle,
        "evaluating",
        _configs(TRAIN, "configs/evaluate.json"),
        "--dataset_dir",
        str(bundle / "data" / "phantoms"),
        "--output_dir",
        str(out),
    )
    return bundle, ev, out


def _validation_cases(dataset_dir: Path) -> list[str]:
    datalist = json.loads((dataset_dir / "dataset.json").read_text())
    return [Path(e["image"]).name.removesuffix(".nii.gz") for e in datalist["validation"]]


def test_evaluate(evaluated):
    bundle, proc, out = evaluated
    assert proc.returncode == 0, _fail(proc)
    metrics = json.loads((out / "metrics.json").read_text())
    expected = _validation_cases(bundle / "data" / "phantoms")
    assert sorted(c["case"] for c in metrics["cases"]) == sorted(expected)
    assert metrics["summary"]["cases"] == len(expected)
    assert metrics["summary"]["dsc"] == pytest.approx(np.mean([c["dsc"] for c in metrics["cases"]]))
    for case in metrics["cases"]:
        assert 0 <= case["dsc"] <= 1 and 0 <= case["nsd"] <= 1
        assert case["windows"]["lesion_windows"] + case["windows"]["lesion_free_windows"] > 0
        if not case["has_lesion"]:
            assert case["outcome"] in ("TN", "FP") and case["lesions"] == []
    # lesion volumes in mL come from the real 2x2x3 mm model grid (a 1 mm default would shrink them 12-fold)
    vols = [lesion["volume_ml"] for c in metrics["cases"] for lesion in c["lesions"]]
    label = bundle / "data" / "phantoms" / "labelsTr"
    import nibabel as nib

    expected_ml = []
    for name in expected:
        if (label / f"{name}.nii.gz").exists():
            img = nib.load(label / f"{name}.nii.gz")
            expected_ml.append(float(np.asarray(img.dataobj).sum()) * float(np.prod(img.header.get_zooms())) / 1000)
    assert sum(vols) == pytest.approx(sum(expected_ml), rel=0.2)


def test_multi_gpu_evaluate_keeps_every_rank(evaluated):
    """multi_gpu_evaluate.json under torchrun (gloo): one metrics.json with the cases of both ranks, equal to the
    single-process evaluation case by case."""
    bundle, single, single_out = evaluated
    assert single.returncode == 0, _fail(single)
    out = bundle / "eval_ddp"
    proc = _torchrun(
        bundle,
        "evaluating",
        _configs(TRAIN, "configs/evaluate.json", "configs/multi_gpu_evaluate.json"),
        "--dataset_dir",
        str(bundle / "data" / "phantoms"),
        "--output_dir",
        str(out),
    )
    assert proc.returncode == 0, _fail(proc)
    log = proc.stdout + proc.stderr
    assert len(re.findall("ScreeningEvaluator " + RUN_DONE, log)) == 2  # both ranks evaluated
    assert len(re.findall(r"metrics\.json in", log)) == 1  # written once, by rank 0
    ddp = json.loads((out / "metrics.json").read_text())
    ref = json.loads((single_out / "metrics.json").read_text())
    by_case = {c["case"]: c for c in ref["cases"]}
    assert sorted(c["case"] for c in ddp["cases"]) == sorted(by_case)  # every case, none twice
    for case in ddp["cases"]:
        assert case["dsc"] == pytest.approx(by_case[case["case"]]["dsc"], abs=1e-6)
        assert case["windows"] == by_case[case["case"]]["windows"]
    assert ddp["summary"]["cases"] == ref["summary"]["cases"]


# --- resume after a kill ----------------------------------------------------------------------------------------


def test_killed_training_resumes(tmp_path, small_dataset):
    bundle = _copy_bundle(tmp_path / "bundle")
    models = bundle / "models"
    args = ["--dataset_dir", str(small_dataset), *FAST]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", _configs(TRAIN, PHANTOMS), *args]
    log1 = tmp_path / "first.log"
    with open(log1, "w") as f:
        proc = subprocess.Popen(
            cmd + ["--train#trainer#max_epochs", "100"],
            cwd=bundle,
            stdout=f,
            stderr=subprocess.STDOUT,
            env=_env(),
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 240
            # wait for a complete checkpoint (MONAI writes it in place: a zip archive once torch.save is done)
            while not any(zipfile.is_zipfile(p) for p in models.glob("checkpoint_*.pt")):
                assert proc.poll() is None, f"training ended before its first checkpoint:\n{log1.read_text()[-4000:]}"
                assert time.monotonic() < deadline, "no checkpoint within 240 s"
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # mid-training, as a crash or a pre-empted job would
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    first_log = log1.read_text()
    assert not re.search("GRPOTrainer " + RUN_DONE, first_log)
    complete = [p for p in models.glob("checkpoint_*.pt") if zipfile.is_zipfile(p)]
    killed_at = max(int(re.search(r"epoch=(\d+)", p.name).group(1)) for p in complete)
    assert killed_at < 100
    state = _trainer_state(models / f"checkpoint_epoch={killed_at}.pt")
    iters_per_epoch = state["epoch_length"]
    assert state["iteration"] == killed_at * iters_per_epoch

    # a kill while saving leaves a truncated newest checkpoint: resume must skip it, not crash on it
    truncated = models / f"checkpoint_epoch={killed_at + 1}.pt"
    truncated.write_bytes((models / f"checkpoint_epoch={killed_at}.pt").read_bytes()[:4096])
    os.utime(truncated, (time.time() + 5, time.time() + 5))

    final = killed_at + 1
    proc2, _ = _bundle_run(
        bundle, "training", _configs(TRAIN, PHANTOMS), *args, "--train#trainer#max_epochs", str(final)
    )
    assert proc2.returncode == 0, _fail(proc2)
    log = proc2.stdout + proc2.stderr
    assert re.search(rf"skipping incomplete checkpoint \S*checkpoint_epoch={killed_at + 1}\.pt", log), log[-3000:]
    assert re.search(rf"resuming from \S*checkpoint_epoch={killed_at}\.pt", log), log[-3000:]
    assert re.search(rf"Restored all variables from \S*checkpoint_epoch={killed_at}\.pt", log), log[-3000:]
    epochs = sorted({int(e) for e in re.findall(rf"Epoch: (\d+)/{final}, Iter", log)})
    assert epochs == [final], "the resumed run must continue, not restart from epoch 1"
    # the newest checkpoint is the last epoch (the killed run's file stays: a new saver does not know it)
    newest = max(models.glob("checkpoint_*.pt"), key=lambda p: p.stat().st_mtime)
    assert newest.name == f"checkpoint_epoch={final}.pt"
    state = _trainer_state(models / f"checkpoint_epoch={final}.pt")
    assert (
        state["iteration"] == final * iters_per_epoch
    )  # ignite stores the iteration; epoch = iteration / epoch_length
    _assert_model_loads(models / "model.pt", bundle)


def test_training_is_reproducible(tmp_path, small_dataset):
    """The model card's promise that its command reproduces the weights: two runs of the same command (same seed,
    GRPO switched on after one epoch so that sampled actions are part of it) end with identical weights."""
    args = ["--dataset_dir", str(small_dataset), *FAST, "--rl_warmup_epochs", "1", "--train#trainer#max_epochs", "3"]
    weights = []
    for run in ("first", "second"):
        bundle = _copy_bundle(tmp_path / run)
        proc, _ = _bundle_run(bundle, "training", _configs(TRAIN, PHANTOMS), *args)
        assert proc.returncode == 0, _fail(proc)
        ckpt = bundle / "models" / "checkpoint_epoch=3.pt"
        state = _trainer_state(ckpt)
        assert state["iteration"] == 3 * state["epoch_length"] > 0
        weights.append(torch.load(ckpt, map_location="cpu", weights_only=False)["model"])
    assert weights[0].keys() == weights[1].keys()
    differing = [k for k in weights[0] if not torch.equal(weights[0][k], weights[1][k])]
    assert not differing, f"same command, different weights: {differing[:5]}"


# --- DDP on CPU --------------------------------------------------------------------------------------------------

# Printed by every rank at the end (the finalize step of multi_gpu_train.json, plus this probe): what it trained on.
PROBE = {
    "finalize": [
        "$print('PROBE rank=%d epochs=%d iterations=%d indices=%s params=%.10e' % (dist.get_rank(), "
        "@train#trainer.state.epoch, @train#trainer.state.iteration, sorted(@train#sampler), "
        "sum(float(p.detach().double().sum()) for p in @network.parameters())), flush=True)",
        "$dist.is_initialized() and dist.destroy_process_group()",
    ]
}


def test_multi_gpu_train_gloo(tmp_path, small_dataset):
    bundle = _copy_bundle(tmp_path / "bundle")
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps(PROBE))
    mgpu = json.loads((bundle / "configs" / "multi_gpu_train.json").read_text())
    assert mgpu["finalize"] == PROBE["finalize"][1:], "keep PROBE in step with multi_gpu_train.json's finalize"
    proc = _torchrun(
        bundle,
        "training",
        _configs(TRAIN, PHANTOMS, "configs/multi_gpu_train.json", str(probe)),
        "--dataset_dir",
        str(small_dataset),
        *FAST,
    )
    assert proc.returncode == 0, _fail(proc)
    log = proc.stdout + proc.stderr
    probes = {
        int(m.group(1)): m
        for m in re.finditer(r"PROBE rank=(\d) epochs=(\d+) iterations=(\d+) indices=(\[.*?\]) params=(\S+)", log)
    }
    assert set(probes) == {0, 1}, log[-4000:]
    n_train = len(json.loads((small_dataset / "dataset.json").read_text())["training"])
    indices = {r: json.loads(m.group(4)) for r, m in probes.items()}
    assert sorted(indices[0] + indices[1]) == list(range(n_train))  # DistributedSampler split, no case twice
    assert indices[0] and indices[1]
    for m in probes.values():
        assert int(m.group(2)) == 2 and int(m.group(3)) == 2  # both ranks ran both epochs (1 iteration each)
    assert probes[0].group(5) == probes[1].group(5)  # DDP kept the weights identical on both ranks

    # rank 0 alone saves and logs
    assert len(re.findall(r"Saved checkpoint at epoch", log)) == 2
    assert len(re.findall(r"Epoch: \d/2, Iter: 1/1 --", log)) == 2
    _assert_model_loads(bundle / "models" / "model.pt", bundle)  # unwrapped from DDP: no "module." prefix
    assert sorted(p.name for p in (bundle / "models").glob("checkpoint_*.pt")) == ["checkpoint_epoch=2.pt"]
    files = _scalars(bundle / "runs")
    with_scalars = {name.split(".")[-2] for name, tags in files.items() if tags}  # events.out.tfevents.T.host.PID.N
    assert len(with_scalars) == 1, f"scalars written by more than one process: {files.keys()}"
    scalars = _merged(files)
    assert LOSS_TAGS | VAL_TAGS <= set(scalars)
    assert [s for s, _ in scalars["loss"]] == [1, 2]


# --- multi-GPU screening -------------------------------------------------------------------------------------


def test_multi_gpu_inference_one_report_per_scan(trained, tmp_path):
    """multi_gpu_inference.json under torchrun (gloo): the scans are split across ranks and every scan gets its
    mask and report exactly once."""
    bundle, proc, _ = trained
    assert proc.returncode == 0, _fail(proc)
    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(3):
        ph = make_phantom(20 + i, shape=(48, 48, 24), spacing=(3.0, 3.0, 5.0))
        nib.save(nib.Nifti1Image(ph.image, ph.affine), str(scans / f"scan{i}.nii.gz"))
    out = tmp_path / "out"
    ddp = _torchrun(
        bundle,
        "run",
        _configs("configs/inference.json", "configs/multi_gpu_inference.json"),
        "--dataset_dir",
        str(scans),
        "--output_dir",
        str(out),
    )
    assert ddp.returncode == 0, _fail(ddp)
    assert sorted(p.name for p in out.glob("*_report.json")) == [f"scan{i}_report.json" for i in range(3)]
    assert sorted(p.name for p in out.glob("*_lesion.nii.gz")) == [f"scan{i}_lesion.nii.gz" for i in range(3)]
    log = ddp.stdout + ddp.stderr
    assert len(re.findall("ScreeningEvaluator " + RUN_DONE, log)) == 2  # both ranks screened


def test_paper_override_builds_the_authors_networks():
    """configs/paper.json: SwinUNETR-v2 (feature 48) Focus, ResNet18 Glance, 96x96x64 windows at 1x1x3 mm."""
    parser = ConfigParser()
    parser.read_config([str(BUNDLE_ROOT / "configs" / "train.json"), str(BUNDLE_ROOT / "configs" / "paper.json")])
    parser["bundle_root"] = str(BUNDLE_ROOT)
    assert parser["roi_size"] == [96, 96, 64] and parser["pixdim"] == [1.0, 1.0, 3.0]
    net = parser.get_parsed_content("network_def")
    assert type(net.focus).__name__ == "SwinUNETR" and net.focus.swinViT.use_v2
    assert type(net.glance).__name__ == "ResNet"
    n_focus = sum(p.numel() for p in net.focus.parameters())
    assert 50e6 < n_focus < 80e6, n_focus  # SwinUNETR f48: ~62 M
    with torch.no_grad():
        assert net.eval()(torch.zeros(1, 2, 96, 96, 64), glance=True).shape == (1, 2)
    # the authors' training settings; a per-window ResNet glance reads the bare window, as at inference
    assert parser["glance_context"] == [0, 0, 0]
    assert (
        parser.get_parsed_content("train#trainer#alpha") == 0.1
        and parser["glance_learning_rate"] == parser["learning_rate"] == 0.0003
    )
    assert parser["rl_warmup_epochs"] == 0


def test_mlflow_tracking(tmp_path, small_dataset):
    """`--tracking mlflow` (monai.bundle's default MLflow settings) logs the training loss and validation metrics."""
    import mlflow

    bundle = _copy_bundle(tmp_path / "bundle")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # mlflow 3 refuses the plain file store
    proc, _ = _bundle_run(
        bundle,
        "training",
        _configs(TRAIN),
        "--dataset_dir",
        str(small_dataset),
        "--train#trainer#max_epochs",
        "1",
        "--tracking",
        "mlflow",
        "--tracking_uri",
        uri,
    )
    assert proc.returncode == 0, _fail(proc)
    client = mlflow.MlflowClient(uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1
    assert {"train_loss", "val_lesion_dice", "val_glance_sensitivity"} <= set(runs[0].data.metrics)
