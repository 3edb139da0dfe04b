"""The GRPO ablation's Markdown report, from screening summaries (the training itself is covered elsewhere)."""

import pytest

from scripts.cli.ablation import _write_report, ablation
from scripts.metrics import evaluate_case, summarise_cases
from test_metrics import _window, cube


def test_report_rows_count_lesions_reached_and_found(tmp_path):
    gt = cube(lo=(1, 1, 1), size=(2, 2, 2)) | cube(lo=(5, 5, 5), size=(5, 5, 5))
    windows = [
        {**_window((0, 0, 0), (4, 4, 4), True), "has_lesion": True},  # p(keep) .9
        {**_window((5, 5, 5), (5, 5, 5), False), "has_lesion": True},  # .1
        {**_window((0, 5, 0), (4, 4, 4), False), "prob": 0.05, "has_lesion": False},
    ]
    # the prediction finds lesion A (reached) and nothing of B (not reached)
    summary = summarise_cases([evaluate_case(cube(lo=(1, 1, 1), size=(1, 1, 1)), gt, (5.0, 5.0, 5.0), windows)])
    report = tmp_path / "ablation.md"
    _write_report(
        report, {"GRPO + CE": {"summary": summary, "train_minutes": 1.25}}, num_cases=3, epochs=2, seed=4, overrides={}
    )
    lines = report.read_text().splitlines()
    header = next(line for line in lines if line.startswith("| Glance training"))
    row = next(line for line in lines if line.startswith("| GRPO + CE"))
    cells = dict(zip([c.strip() for c in header.strip("|").split("|")], [c.strip() for c in row.strip("|").split("|")]))
    assert cells["window sensitivity"] == "0.500"
    assert cells["lesion-free windows discarded"] == "1.000"
    # discarding the one lesion-free window (.05) takes a threshold just above it, which keeps both lesion windows
    assert cells["sensitivity at 60 % discarded"] == "1.000 (p >= 0.050)"
    assert cells["lesions reached at 60 % discarded"] == "1.000"
    assert cells["lesions found"] == "1/2"
    assert cells["training min"] == "1.2"  # 1.25 rounds half to even
    assert f"--seed 4 --report {report}`" in report.read_text()


def test_existing_report_is_refused_before_training(tmp_path):
    report = tmp_path / "grpo_ablation.md"
    report.write_text("hand-written findings\n")
    with pytest.raises(FileExistsError, match="nothing was trained"):
        ablation(out_dir=str(tmp_path / "out"), report=str(report))
    assert report.read_text() == "hand-written findings\n"
    assert not (tmp_path / "out").exists()  # no phantoms made, no arm trained
