"""The model card (bundle/docs/README.md) and metadata.json state the same results, measured at the settings the
bundle ships, and docs/data_license.txt covers the data the weights were trained on."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

BUNDLE_ROOT = Path(__file__).resolve().parents[1] / "bundle"
CARD = (BUNDLE_ROOT / "docs" / "README.md").read_text()
META = json.loads((BUNDLE_ROOT / "configs" / "metadata.json").read_text())
SHIPPED = json.loads((BUNDLE_ROOT / "configs" / "inference.json").read_text())


def _section(title: str) -> str:
    """The text of the card's ``## title`` section."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", CARD, re.S | re.M)
    assert match, f"no '## {title}' section in the model card"
    return match.group(1)


def _shipped_column(row: str) -> str:
    """The 0.5.0 (shipped weights) cell of a row of the Performance table, by the row's first cell."""
    for line in _section("Performance").splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == row:
            return cells[1]
    raise AssertionError(f"no row '{row}' in the Performance table")


def _numbers(cell: str) -> list[float]:
    return [float(n) for n in re.findall(r"\d+(?:\.\d+)?", cell)]


CARD_VALUES = {  # eval_metrics key: its value as the Performance table states it
    "val_lesion_dice": lambda: _numbers(_shipped_column("lesion DSC, mean of 9 cases (NSD)"))[0],
    "val_lesion_nsd": lambda: _numbers(_shipped_column("lesion DSC, mean of 9 cases (NSD)"))[1],
    "val_fp_components_per_scan": lambda: _numbers(_shipped_column("false-positive components (>= 50 mm3) per scan"))[
        0
    ],
    "val_lesion_recall_5ml_and_larger": lambda: (lambda n: n[0] / n[1])(
        _numbers(_shipped_column("per-lesion recall >= 5 mL"))
    ),
    "val_kept_fraction": lambda: _numbers(_shipped_column("kept fraction (windows focused)"))[0],
}


@pytest.mark.parametrize("key", CARD_VALUES)
def test_eval_metrics_equal_the_model_card(key):
    assert META["eval_metrics"][key] == pytest.approx(CARD_VALUES[key](), abs=5e-4)


def test_every_eval_metric_is_in_the_model_card():
    assert set(META["eval_metrics"]) == set(CARD_VALUES)


def test_the_model_cards_numbers_are_at_the_shipped_settings():
    """The Performance section names the glance threshold, minimum size and peak it was scored at: those of
    configs/inference.json (a card once quoted numbers at another threshold than the one shipped)."""
    text = " ".join(_section("Performance").split())
    found = re.search(
        r"glance threshold ([\d.]+), components under (\d+) mm3 or with a peak probability under ([\d.]+)", text
    )
    assert found, "the Performance section must state its glance threshold, minimum size and peak"
    threshold, min_mm3, peak = (float(g) for g in found.groups())
    assert (threshold, min_mm3, peak) == (
        SHIPPED["glance_threshold"],
        SHIPPED["min_lesion_mm3"],
        SHIPPED["min_lesion_peak"],
    )


def test_model_card_has_the_zoo_template_sections():
    for title in ("Intended use", "Model", "Training", "Performance", "System configuration", "Limitations"):
        _section(title)
    for title in ("Citation", "References", "Licence"):
        assert re.search(rf"^## {title}$", CARD, re.M), title
    assert re.search(r"^\*\*Authors\*\*: \S", CARD, re.M) and re.search(r"^\*\*Tags\*\*: \S", CARD, re.M)


def test_data_license_names_the_training_data_and_its_non_commercial_licences():
    """Every training source of the model card's data table is in docs/data_license.txt with its licence; the NC
    licences (which make the weights non-commercial) are stated."""
    text = (BUNDLE_ROOT / "docs" / "data_license.txt").read_text()
    parts = re.split(r"/\*+/", text)  # preamble, then each source's header and body
    sources = list(zip(parts[1::2], parts[2::2]))
    for case, source, licence in [
        ("ircadb1_17", "3D-IRCADb-01", "CC BY-NC-ND 4.0"),
        ("ibsi1_lung", "IBSI-1", "CC BY-NC 3.0"),
        ("sts_001", "Soft-tissue-Sarcoma", "CC BY 3.0"),
        ("crlm_1100", "Colorectal-Liver-Metastases", "CC BY 4.0"),
        ("pyradiomics_lung2", "pyradiomics", "BSD"),
    ]:
        assert case in _section("Training") and case in text, case
        assert any(source in header and licence in body for header, body in sources), (source, licence)
    assert "non-commercial" in text
