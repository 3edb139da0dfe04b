"""Choose the Glance threshold and the minimum lesion size on a validation split: score trained weights at each
combination, threshold 0 (no Glance: every window reaches the Focus) included, in one process (the validation
scans are loaded once).

Run from the bundle folder, e.g.::

    python -m scripts.sweep --dataset_dir ../output/realct_train --ckpt_dir models \\
        --thresholds "[0, 0.3, 0.5, 0.7]" --min_sizes_mm3 "[50, 200]" --out ../output/sweep.json

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
from monai.bundle import ConfigParser
from monai.transforms import RemoveSmallObjectsd
from tqdm import tqdm

from .handlers import ScreeningMetricsHandler

HEADER = (
    "| glance threshold | min lesion mm3 | FP comps / scan | recall < 1 mL | recall 1-5 mL | recall >= 5 mL "
    "| pred / true volume (median) | DSC | kept fraction | lesion-free scans with a finding |\n|---|---|---|---|---|---|---|---|---|---|"
)


def _recall(bins: dict, key: str) -> str:
    b = bins[key]
    return f"{b['detected']}/{b['total']}"


def row(threshold: float, min_size: float, s: dict, cases: Sequence[dict]) -> str:
    """One Markdown table row of a :func:`scripts.metrics.summarise_cases` summary and its per-case records."""
    bins = s["lesion_recall_by_size_ml"]
    free = [c for c in cases if not c["has_lesion"]]
    flagged = sum(c["fp_components"] > 0 for c in free)
    ratio = s["volume_ratio_median"]
    return (
        f"| {threshold:g} | {min_size:g} | {s['fp_components_per_scan']:.2f} | {_recall(bins, '0-1')} "
        f"| {_recall(bins, '1-5')} | {_recall(bins, '5-inf')} | {'-' if math.isnan(ratio) else f'{ratio:.2f}'} "
        f"| {s['dsc']:.3f} | {s['kept_fraction']:.3f} | {flagged}/{len(free)} |"
    )


def sweep(
    dataset_dir: str,
    ckpt_dir: str = "models",
    thresholds: Sequence[float] = (0.0, 0.3, 0.5, 0.7),
    min_sizes_mm3: Sequence[float] = (50.0,),
    out: str | None = None,
    config_file: Sequence[str] = ("configs/train.json", "configs/evaluate.json"),
) -> list[dict]:
    """Score ``ckpt_dir/model.pt`` on the validation list of ``dataset_dir/dataset.json`` at every threshold and
    minimum lesion size; returns (and writes to ``out``) ``[{"threshold", "min_lesion_mm3", "summary"}]``."""
    parser = ConfigParser()
    parser.read_config(list(config_file))
    parser.update({"dataset_dir": dataset_dir, "ckpt_dir": ckpt_dir, "output_dir": str(Path(out or ".").parent)})
    evaluator = parser.get_parsed_content("validate#evaluator")
    metrics = next(h for h in parser.get_parsed_content("validate#handlers") if isinstance(h, ScreeningMetricsHandler))
    post = parser.get_parsed_content("validate#postprocessing")
    remove = [t for t in post.transforms if isinstance(t, RemoveSmallObjectsd)]
    if not remove:
        raise ValueError("the validation postprocessing has no RemoveSmallObjectsd to set the minimum lesion size of.")
    results = []
    print(HEADER)
    for threshold in tqdm(thresholds, desc="glance thresholds", unit="threshold"):
        for min_size in min_sizes_mm3:
            evaluator.inferer.threshold = float(threshold)
            remove[0].converter.min_size = float(min_size)
            evaluator.run()
            cases = [{k: v for k, v in c.items() if k != "window_scores"} for c in metrics.cases]
            results.append({"threshold": float(threshold), "min_lesion_mm3": float(min_size), "summary": metrics.summary, "cases": cases})
            print(row(threshold, min_size, metrics.summary, cases), flush=True)
    if out:
        Path(out).write_text(json.dumps(results, indent=2, default=float))
    return results


if __name__ == "__main__":
    fire.Fire(sweep)
