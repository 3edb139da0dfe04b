"""Post-processing of predicted lesions: the component confidence gate and the threshold sweep's scoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import RemoveSmallObjectsd

from scripts.cli.sweep import _score, row
from scripts.transforms import LesionConfidenceFilterd


def _case() -> dict:
    """Three components on a 2 mm grid: peak p 0.95 (the true lesion), 0.7 and 0.55 (false positives)."""
    prob = torch.zeros(1, 20, 20, 20)
    prob[0, 2:6, 2:6, 2:6] = 0.6
    prob[0, 3, 3, 3] = 0.95
    prob[0, 10:13, 10:13, 10:13] = 0.7
    prob[0, 16:19, 2:5, 16:19] = 0.55
    affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0]))
    label = torch.zeros_like(prob)
    label[0, 2:6, 2:6, 2:6] = 1
    return {
        "pred": MetaTensor((prob > 0.5).float(), affine=affine),
        "prob": MetaTensor(prob, affine=affine),
        "label": MetaTensor(label, affine=affine),
    }


def test_confidence_gate_keeps_whole_components_with_a_confident_peak():
    d = _case()
    kept = LesionConfidenceFilterd("pred", min_peak=0.65)(d)["pred"]
    assert isinstance(kept, MetaTensor) and kept.shape == d["pred"].shape
    expected = d["pred"].clone()
    expected[0, 16:19, 2:5, 16:19] = 0  # peak 0.55 < 0.65: the whole component goes
    torch.testing.assert_close(kept, expected)  # the 0.6-voxels around the 0.95 peak stay: no shrinking
    only_lesion = LesionConfidenceFilterd("pred", min_peak=0.9)(d)["pred"]
    assert int(only_lesion.sum()) == 64 and bool(only_lesion[0, 2:6, 2:6, 2:6].all())
    unchanged = LesionConfidenceFilterd("pred", min_peak=0.5)(d)["pred"]
    torch.testing.assert_close(unchanged, d["pred"])
    with pytest.raises(ValueError, match="min_peak"):
        LesionConfidenceFilterd("pred", min_peak=1.5)


def test_sweep_scores_each_post_processing_variant():
    """False positives fall as the gate rises, while the lesion stays found; the row shows the counts."""
    scores = []
    for peak in (0.5, 0.65, 0.9):
        post = [
            RemoveSmallObjectsd("pred", min_size=50, by_measure=True),
            LesionConfidenceFilterd("pred", min_peak=peak),
        ]
        scores.append(_score({**_case(), "windows": ()}, post))
    assert [s["fp_components"] for s in scores] == [2, 1, 0]
    assert all(s["tp_lesions"] == 1 for s in scores)
    # 50 mm3 on a 2 mm grid is 6.25 voxels: the 27-voxel components survive, a 4-voxel one would not
    tiny = _case()
    tiny["pred"][0, 10:13, 10:13, 10:13] = 0
    tiny["pred"][0, 10:12, 10:12, 10] = 1
    s = _score({**tiny, "windows": ()}, [RemoveSmallObjectsd("pred", min_size=50, by_measure=True)])
    assert s["fp_components"] == 1
    summary = {
        "fp_components_per_scan": 2.0,
        "lesion_recall_by_size_ml": {
            "0-1": {"detected": 1, "total": 1},
            "1-5": {"detected": 0, "total": 2},
            "5-inf": {"detected": 3, "total": 4},
        },
        "volume_ratio_median": np.nan,
        "dsc": 0.5,
        "kept_fraction": 0.25,
    }
    line = row(
        0.7, 50, 0.8, summary, [{"has_lesion": False, "fp_components": 1}, {"has_lesion": True, "fp_components": 3}]
    )
    assert line == "| 0.7 | 50 | 0.8 | 2.00 | 1/1 | 0/2 | 3/4 | - | 0.500 | 0.250 | 1/1 |"
