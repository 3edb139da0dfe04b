"""Does GRPO teach the Glance? Train the bundle on synthetic phantoms twice, GRPO + balanced CE (the default)
and balanced CE alone (the paper's ablation), then score both Glances on held-out phantoms.

Run from the bundle folder: ``python -m scripts.cli.ablation --out_dir ../output/ablation --report ../output/ablation/report.md``;
the report is a new Markdown file (an existing one is never overwritten) to paste into ``docs/grpo_ablation.md``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import fire
from monai.bundle import run

from ..phantom import write_phantom_dataset
from .benchmark import machine_description

ARMS = {"GRPO + CE": {}, "CE alone": {"train#trainer#rl_weight": 0.0}}


def _row(name: str, s: dict, minutes: float) -> str:
    roc = s["glance_roc"]
    return (
        f"| {name} | {s['glance_sensitivity']:.3f} | {s['glance_specificity']:.3f} | {s['kept_fraction']:.3f} "
        f"| {roc['sensitivity']:.3f} (p >= {roc['threshold']:.3f}) | {roc['lesion_reach']:.3f} | {roc['auc']:.3f} "
        f"| {s['dsc']:.3f} | {_count(s['lesion_recall_by_size_ml'])} | {s['scan']['fpr']:.2f} | {minutes:.1f} |"
    )


def _count(by_size: dict) -> str:
    """'found/total' over every size bin of a :func:`scripts.metrics.recall_by_size` result."""
    return f"{sum(b['detected'] for b in by_size.values())}/{sum(b['total'] for b in by_size.values())}"


def ablation(
    out_dir: str = "../output/ablation",
    report: str | None = None,
    num_cases: int = 24,
    epochs: int = 20,
    seed: int = 1,
    config_file: str = "configs/train.json",
    overrides: dict | None = None,
    train: bool = True,
) -> dict:
    """Train (unless ``train`` is False: re-score trained arms) and evaluate each arm; write ``summary.json`` in
    ``out_dir`` and, if given, a Markdown ``report``.
    ``overrides`` (config id -> value) apply to both arms, e.g. ``{"glance_ce_weight": 0.1}``.

    Raises:
        FileExistsError: ``report`` exists (checked before any training, so that a long run cannot end by
            overwriting a document).
    """
    if report and Path(report).exists():
        raise FileExistsError(f"report {report} exists: give a new path (nothing was trained or overwritten).")
    out = Path(out_dir).resolve()
    data = out / "phantoms"
    if not (data / "dataset.json").exists():
        write_phantom_dataset(data, num_cases=num_cases, val_fraction=0.3, seed=seed)
    previous = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    results = {}
    for name, arm_overrides in ARMS.items():
        arm = out / name.replace(" ", "").replace("+", "_").lower()
        common = {
            "dataset_dir": str(data),
            "ckpt_dir": str(arm / "models"),
            "output_dir": str(arm / "eval"),
            "num_workers": 0,
        }
        common.update(overrides or {})
        start = time.perf_counter()
        final = {
            "train#trainer#max_epochs": epochs,
            "val_interval": epochs,
            "resume": False,
        }  # validate (and save) at the end
        if train:
            run("training", config_file=config_file, **common, **arm_overrides, **final)
        minutes = (time.perf_counter() - start) / 60 if train else previous.get(name, {}).get("train_minutes", math.nan)
        run("evaluating", config_file=[config_file, "configs/evaluate.json"], **common)
        summary = json.loads((arm / "eval" / "metrics.json").read_text())["summary"]
        results[name] = {"summary": summary, "train_minutes": minutes}
    (out / "summary.json").write_text(json.dumps(results, indent=2))
    if report:
        _write_report(Path(report), results, num_cases, epochs, seed, overrides or {})
    return {
        k: {m: v["summary"][m] for m in ("glance_sensitivity", "glance_specificity", "kept_fraction", "dsc")}
        for k, v in results.items()
    }


def _write_report(path: Path, results: dict, num_cases: int, epochs: int, seed: int, overrides: dict) -> None:
    machine = machine_description()
    lines = [
        "# GRPO ablation on synthetic phantoms",
        "",
        f"Command (from `bundle/`): `python -m scripts.cli.ablation --num_cases {num_cases} --epochs {epochs} --seed {seed} "
        f"--report {path}" + (f" --overrides '{json.dumps(overrides)}'" if overrides else "") + "`.",
        f"Data: {num_cases} phantoms from `scripts/phantom.py` (seed {seed}; 70 % training, 30 % validation, a quarter "
        "lesion-free). Both arms use `configs/train.json` unchanged except `rl_weight` (0 for CE alone), "
        f"{epochs} epochs, the same seed. Scored on the validation phantoms with `configs/evaluate.json` "
        "(glance threshold 0.5, all windows of the inference grid at overlap 0.5). Machine: " + machine + ".",
        "",
        "| Glance training | window sensitivity | lesion-free windows discarded | kept fraction "
        "| sensitivity at 60 % discarded | lesions reached at 60 % discarded | window AUC | lesion DSC | lesions found "
        "| FP rate, lesion-free scans | training min |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(name, r["summary"], r["train_minutes"]) for name, r in results.items()]
    lines += [
        "",
        "Window sensitivity: lesion windows (any lesion voxel inside) the Glance kept at threshold 0.5. "
        "'Sensitivity at 60 % discarded': the same at the lowest threshold that discards at least 60 % of the "
        "lesion-free windows (the threshold is chosen on validation data in practice); window AUC: ROC AUC of "
        "p(keep) for lesion windows. 'Lesions reached at 60 % discarded': the share of lesions with a voxel in a "
        "window kept at that threshold (the Focus sees them). Target for GRPO + CE: >= 0.95 sensitivity with "
        ">= 0.60 of lesion-free windows discarded.",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    fire.Fire(ablation)
