"""Choose the Glance threshold and the minimum lesion size on a validation split: score trained weights at each
combination, threshold 0 (no Glance: every window reaches the Focus) included, in one process (the validation
scans are loaded once).

Run from the bundle folder, e.g.::

    python -m scripts.cli.sweep --dataset_dir ../output/realct_train --ckpt_dir models \\
        --thresholds "[0, 0.3, 0.5, 0.7]" --min_sizes_mm3 "[50, 200]" --min_peaks "[0.5, 0.8]" --out ../output/sweep.json

Prints one Markdown row per combination (the targets of a screening tool: false-positive components per scan,
recall by lesion size, predicted / true volume, DSC, kept windows, lesion-free scans called suspicious) and
writes every summary to ``out``. Choose on the validation split, never on a test case.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import fire
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.transforms import RemoveSmallObjectsd
from tqdm import tqdm

from ..handlers import score_case
from ..metrics import summarise_cases
from ..transforms import LesionConfidenceFilterd

HEADER = (
    "| glance threshold | min lesion mm3 | min peak p | FP comps / scan | recall < 1 mL | recall 1-5 mL | recall >= 5 mL "
    "| pred / true volume (median) | DSC | kept fraction | lesion-free scans with a finding |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def _recall(bins: dict, key: str) -> str:
    b = bins[key]
    return f"{b['detected']}/{b['total']}"


def row(threshold: float, min_size: float, min_peak: float, s: dict, cases: Sequence[dict]) -> str:
    """One Markdown table row of a :func:`scripts.metrics.summarise_cases` summary and its per-case records."""
    bins = s["lesion_recall_by_size_ml"]
    free = [c for c in cases if not c["has_lesion"]]
    flagged = sum(c["fp_components"] > 0 for c in free)
    ratio = s["volume_ratio_median"]
    return (
        f"| {threshold:g} | {min_size:g} | {min_peak:g} | {s['fp_components_per_scan']:.2f} | {_recall(bins, '0-1')} "
        f"| {_recall(bins, '1-5')} | {_recall(bins, '5-inf')} | {'-' if math.isnan(ratio) else f'{ratio:.2f}'} "
        f"| {s['dsc']:.3f} | {s['kept_fraction']:.3f} | {flagged}/{len(free)} |"
    )


def sweep(
    dataset_dir: str,
    ckpt_dir: str = "models",
    thresholds: Sequence[float] = (0.0, 0.3, 0.5, 0.7),
    min_sizes_mm3: Sequence[float] = (50.0,),
    min_peaks: Sequence[float] = (0.5,),
    out: str | None = None,
    config_file: Sequence[str] = ("configs/train.json", "configs/evaluate.json"),
) -> list[dict]:
    """Score ``ckpt_dir/model.pt`` on the validation list of ``dataset_dir/dataset.json`` at every threshold,
    minimum lesion size and minimum component peak probability (``min_lesion_peak``); returns (and writes to
    ``out``) ``[{"threshold", "min_lesion_mm3", "min_lesion_peak", "summary", "cases"}]``.

    The Focus runs once per threshold; the post-processing variants are applied to its kept outputs with the
    same transforms the configs use, so each combination scores exactly what the bundle would write."""
    parser = ConfigParser()
    parser.read_config(list(config_file))
    parser.update({"dataset_dir": dataset_dir, "ckpt_dir": ckpt_dir, "output_dir": str(Path(out or ".").parent)})
    parser.update({"min_lesion_mm3": 0, "min_lesion_peak": 0.0})  # the raw p > 0.5 mask; variants below
    evaluator = parser.get_parsed_content("validate#evaluator")
    outputs: list[dict] = []
    evaluator.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: outputs.extend(_keep(item) for item in e.state.output)
    )
    results = []
    print(HEADER)
    for threshold in tqdm(thresholds, desc="glance thresholds", unit="threshold"):
        outputs.clear()
        evaluator.inferer.threshold = float(threshold)
        evaluator.run()
        for min_size in min_sizes_mm3:
            for min_peak in min_peaks:
                post = [
                    RemoveSmallObjectsd("pred", min_size=float(min_size), by_measure=True),
                    LesionConfidenceFilterd("pred", min_peak=float(min_peak)),
                ]
                cases = [_score(o, post) for o in outputs]
                summary = summarise_cases(cases)
                setting = {
                    "threshold": float(threshold),
                    "min_lesion_mm3": float(min_size),
                    "min_lesion_peak": float(min_peak),
                }
                results.append(
                    {
                        **setting,
                        "summary": summary,
                        "cases": [{k: v for k, v in c.items() if k != "window_scores"} for c in cases],
                    }
                )
                print(row(threshold, min_size, min_peak, summary, cases), flush=True)
    if out:
        Path(out).write_text(json.dumps(results, indent=2, default=float))
    return results


def _keep(item: dict) -> dict:
    """What scoring needs of one evaluated scan: mask, probability, label (model grid) and the Glance windows."""
    return {k: item[k] for k in ("pred", "prob", "label")} | {"windows": item.get("windows", ())}


def _score(output: dict, post: Sequence) -> dict:
    """The scores of one scan after the post-processing transforms ``post``."""
    for transform in post:
        output = transform(output)
    return score_case(output)


if __name__ == "__main__":
    fire.Fire(sweep)
