"""Screening metrics against hand-computed values (scripts.metrics)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor, list_data_collate
from monai.handlers import IgniteMetricHandler, from_engine
from monai.metrics import compute_surface_dice

from scripts.metrics import (
    FlareMetric,
    GlanceWindowMetric,
    flare_dsc,
    flare_nsd,
    lesion_detection,
    recall_by_size,
    scan_detection,
    scan_f1,
    volume_ratio_median,
    window_confusion,
)

# DeepMind surface-distance (what the FLARE evaluation script uses) gives 0.8443807 for the shifted cube below.
SUBVOXEL_SHIFTED_NSD = 0.8443807


def cube(shape=(10, 10, 10), lo=(2, 2, 2), size=(4, 4, 4)) -> np.ndarray:
    """A boolean volume holding one box."""
    mask = np.zeros(shape, bool)
    mask[tuple(slice(a, a + n) for a, n in zip(lo, size))] = True
    return mask


GT = cube()
SHIFTED = cube(lo=(2, 2, 3))  # GT moved by one voxel along the last axis
EMPTY = np.zeros_like(GT)


def test_dsc_of_overlapping_cubes():
    assert flare_dsc(SHIFTED, GT) == pytest.approx(2 * 48 / 128)  # 4x4x3 overlap of two 64-voxel cubes
    assert flare_dsc(cube(size=(2, 4, 4)), GT) == pytest.approx(2 * 32 / 96)


def test_flare_empty_rules():
    assert flare_dsc(EMPTY, EMPTY) == 1.0
    assert flare_dsc(GT, EMPTY) == 0.0 and flare_dsc(EMPTY, GT) == 0.0
    assert flare_nsd(EMPTY, EMPTY, (1, 1, 3)) == 1.0
    assert flare_nsd(GT, EMPTY, (1, 1, 3)) == 0.0 and flare_nsd(EMPTY, GT, (1, 1, 3)) == 0.0


@pytest.mark.parametrize("use_subvoxels", [True, False])
def test_nsd_identical_is_one(use_subvoxels):
    assert flare_nsd(GT, GT, (0.7, 0.7, 5.0), use_subvoxels=use_subvoxels) == pytest.approx(1.0)


def test_nsd_shifted_respects_anisotropic_spacing():
    # Boundary voxels (6-neighbour erosion): 56 per cube, in layers of 16, 12, 12, 16 along the last axis.
    # With 3 mm along that axis, only the GT's bottom layer and the prediction's top layer (16 voxels each)
    # are 3 mm from the other surface; every other boundary voxel is 0 or 1 mm away: NSD = 80 / 112 = 5/7.
    assert flare_nsd(SHIFTED, GT, (1, 1, 3), use_subvoxels=False) == pytest.approx(5 / 7, abs=1e-6)
    assert flare_nsd(SHIFTED, GT, (1, 1, 3)) == pytest.approx(SUBVOXEL_SHIFTED_NSD, abs=1e-5)
    # The same voxel shift is within 2 mm when the last axis is 1 mm (or the 3 mm axis is another one).
    assert flare_nsd(SHIFTED, GT, (1, 1, 1)) == pytest.approx(1.0)
    assert flare_nsd(SHIFTED, GT, (3, 1, 1)) == pytest.approx(1.0)
    assert flare_nsd(SHIFTED, GT, (1, 1, 3), tolerance_mm=3.0) == pytest.approx(1.0)


def test_nsd_zero_when_dsc_below_floor():
    speck = cube(size=(1, 1, 1))  # one voxel of a 64-voxel lesion: DSC = 2/65
    assert flare_dsc(speck, GT) < 0.2
    raw = compute_surface_dice(
        torch.from_numpy(speck)[None, None], torch.from_numpy(GT)[None, None], [2.0], include_background=True
    )
    assert raw.item() > 0.0  # MONAI alone would reward it
    assert flare_nsd(speck, GT, (1, 1, 1)) == 0.0


def test_lesion_detection_counts():
    gt, pred = np.zeros((20, 20, 20), bool), np.zeros((20, 20, 20), bool)
    gt[2:5, 2:5, 2:5] = True
    gt[5, 5, 5] = True  # touches the first lesion only at a corner: still the same lesion (26-connectivity)
    gt[10:12, 10:12, 10:12] = True  # missed lesion
    pred[3, 3, 3] = True  # touches lesion 1
    pred[15:17, 15:17, 15:17] = True  # false-positive component
    result = lesion_detection(pred, gt, spacing=(2, 2, 3))  # 12 mm^3 per voxel
    assert (result["tp_lesions"], result["fn_lesions"], result["fp_components"]) == (1, 1, 1)
    volumes = [lesion["volume_ml"] for lesion in result["lesions"]]
    assert volumes == pytest.approx([28 * 0.012, 8 * 0.012])
    assert [lesion["detected"] for lesion in result["lesions"]] == [True, False]


def test_lesion_detection_empty():
    result = lesion_detection(EMPTY, EMPTY, (1, 1, 1))
    assert result == {"lesions": [], "tp_lesions": 0, "fn_lesions": 0, "fp_components": 0}


def test_lesion_detection_measures_each_lesion_by_the_components_touching_it():
    """A lesion's measured volume is the whole of every predicted component touching it (two fragments of one
    lesion add up; a component over two lesions counts for each), and the median ratio covers detected ones only."""
    gt, pred = np.zeros((12, 12, 12), bool), np.zeros((12, 12, 12), bool)
    gt[0:2, 0:2, 0:2] = True  # 8 voxels, found by two fragments of 4 + 6 voxels
    pred[0:1, 0:2, 0:2] = True
    pred[1:2, 0:2, 0:1] = True
    pred[3:4, 0:2, 0:3] = True  # not touching: false positive
    gt[6:8, 6:8, 6:8] = True  # 8 voxels, missed
    gt[10:12, 10:12, 10:11] = True  # 4 voxels, found by a 16-voxel component
    pred[10:12, 10:12, 8:12] = True
    result = lesion_detection(pred, gt, spacing=(2, 2, 3))  # 12 mm^3 = 0.012 mL per voxel
    measured = [round(r["pred_volume_ml"] / 0.012) for r in result["lesions"]]
    assert measured == [6, 0, 16] and result["fp_components"] == 1
    assert volume_ratio_median(result["lesions"]) == pytest.approx((6 / 8 + 16 / 4) / 2)
    assert math.isnan(volume_ratio_median([{"volume_ml": 1.0, "detected": False, "pred_volume_ml": 0.0}]))


def test_recall_by_size():
    records = [
        {"volume_ml": 0.5, "detected": True},
        {"volume_ml": 0.9, "detected": False},
        {"volume_ml": 2.0, "detected": True},
        {"volume_ml": 10.0, "detected": True},
        {"volume_ml": 7.0, "detected": False},
    ]
    result = recall_by_size(records)
    assert list(result) == ["0-1", "1-5", "5-inf"]
    assert result["0-1"] == {"recall": 0.5, "detected": 1, "total": 2}
    assert result["1-5"] == {"recall": 1.0, "detected": 1, "total": 1}
    assert result["5-inf"] == {"recall": 0.5, "detected": 1, "total": 2}
    sparse = recall_by_size(records, bins_ml=(0, 1, 1.5, math.inf))
    assert math.isnan(sparse["1-1.5"]["recall"]) and sparse["1-1.5"]["total"] == 0
    with pytest.raises(ValueError):
        recall_by_size(records, bins_ml=(1, 0))


def test_scan_detection_voxel_threshold():
    big, small = cube(size=(6, 7, 3)), cube(size=(5, 5, 5))  # 126 and 125 voxels
    assert scan_detection(big, EMPTY)["outcome"] == "FP"
    assert scan_detection(small, EMPTY)["outcome"] == "TN"
    assert scan_detection(big, GT)["outcome"] == "TP"
    assert scan_detection(EMPTY, GT)["outcome"] == "FN"
    assert scan_detection(small, EMPTY, fp_voxel_threshold=100)["outcome"] == "FP"
    assert scan_detection(big, EMPTY)["pred_voxels"] == 126


def test_scan_f1():
    result = scan_f1(["TP"] * 3 + ["FN"] + ["FP"] * 2 + ["tn"] * 4)
    assert result["precision"] == pytest.approx(3 / 5)
    assert result["recall"] == pytest.approx(3 / 4)
    assert result["f1"] == pytest.approx(2 * 0.6 * 0.75 / (0.6 + 0.75))
    assert result["fpr"] == pytest.approx(2 / 6)
    assert (result["tp"], result["fp"], result["tn"], result["fn"]) == (3, 2, 4, 1)


def test_scan_f1_zero_denominators():
    only_healthy = scan_f1(["TN", "TN"])
    assert (only_healthy["precision"], only_healthy["recall"], only_healthy["f1"], only_healthy["fpr"]) == (0, 0, 0, 0)
    assert scan_f1(["TP"])["fpr"] == 0.0 and scan_f1(["TP"])["f1"] == 1.0
    assert math.isnan(scan_f1([], zero_division=math.nan)["f1"])
    with pytest.raises(ValueError):
        scan_f1(["TP", "maybe"])


def test_window_confusion():
    kept = [True, True, True, False, False, False, False, False]
    lesion = [True, True, False, False, False, False, False, True]
    result = window_confusion(kept, lesion)
    assert result["sensitivity"] == pytest.approx(2 / 3)
    assert result["specificity"] == pytest.approx(4 / 5)
    assert result["kept_fraction"] == pytest.approx(3 / 8)
    assert (result["lesion_windows"], result["lesion_free_windows"], result["kept_windows"]) == (3, 5, 3)
    no_lesion = window_confusion([True, False], [False, False])
    assert math.isnan(no_lesion["sensitivity"]) and no_lesion["specificity"] == 0.5
    assert all(math.isnan(v) for v in window_confusion([], []).values() if isinstance(v, float))
    with pytest.raises(ValueError):
        window_confusion([True], [True, False])


def batch(*masks: np.ndarray) -> torch.Tensor:
    """(B,1,...) float tensor of binary masks."""
    return torch.from_numpy(np.stack(masks)[:, None].astype(np.float32))


def test_flare_metric_through_ignite_handler():
    one_hot = torch.cat([1 - batch(GT), batch(GT)], dim=1)  # (1,2,...) one-hot prediction
    data = [{"pred": batch(SHIFTED, EMPTY), "label": batch(GT, EMPTY)}, {"pred": one_hot, "label": batch(GT)}]
    engine = Engine(lambda engine, item: item)
    metric = FlareMetric(spacing=(1, 1, 3))
    handler = IgniteMetricHandler(metric_fn=metric, output_transform=from_engine(["pred", "label"]), save_details=True)
    handler.attach(engine, name="val_lesion_dice")
    engine.run(data, max_epochs=1)
    assert engine.state.metrics["val_lesion_dice"] == pytest.approx((0.75 + 1 + 1) / 3)
    assert metric.aggregate("nsd").item() == pytest.approx((SUBVOXEL_SHIFTED_NSD + 1 + 1) / 3, abs=1e-5)
    assert engine.state.metric_details["val_lesion_dice"].shape == (3, 2)


def test_flare_metric_spacing_from_meta_tensor():
    anisotropic = MetaTensor(batch(SHIFTED)[0], affine=torch.diag(torch.tensor([1.0, 1.0, 3.0, 1.0])))
    isotropic = MetaTensor(batch(SHIFTED)[0], affine=torch.eye(4))
    label = batch(GT)[0]
    collated = list_data_collate([{"p": anisotropic, "y": label}, {"p": isotropic, "y": label}])
    for y_pred, y in ((collated["p"], collated["y"]), ([anisotropic, isotropic], [label, label])):
        metric = FlareMetric(spacing=(5, 5, 5))  # the default is overridden by each case's affine
        metric(y_pred=y_pred, y=y)
        nsd = metric.get_buffer()[:, 1]
        assert nsd.tolist() == pytest.approx([SUBVOXEL_SHIFTED_NSD, 1.0], abs=1e-5)
    plain = FlareMetric(spacing=(1, 1, 3))
    plain(y_pred=batch(SHIFTED), y=batch(GT))
    assert plain.aggregate("nsd").item() == pytest.approx(SUBVOXEL_SHIFTED_NSD, abs=1e-5)
    with pytest.raises(ValueError):
        FlareMetric().aggregate()


def windows(*pairs: tuple[bool, bool]) -> list[dict]:
    """Window records from (kept, has_lesion) pairs."""
    return [{"kept": k, "has_lesion": h, "prob": 0.5} for k, h in pairs]


def test_glance_window_metric_on_engine():
    iterations = [
        [  # decollated output: one dict per scan
            {"pred": None, "windows": windows((True, True), (True, False), (False, False))},
            {"pred": None, "windows": windows((False, True), (False, False))},
        ],
        [{"windows": windows((True, True), (True, False), (False, False))}],
    ]
    engine = Engine(lambda engine, item: item)
    GlanceWindowMetric().attach(engine)
    engine.run(iterations, max_epochs=2)  # the second epoch must not double-count
    metrics = engine.state.metrics
    assert metrics["val_glance_sensitivity"] == pytest.approx(2 / 3)  # 3 lesion windows, 2 kept
    assert metrics["val_glance_specificity"] == pytest.approx(3 / 5)  # 5 lesion-free windows, 3 discarded
    assert metrics["val_kept_fraction"] == pytest.approx(4 / 8)
    assert set(metrics) == {"val_glance_sensitivity", "val_glance_specificity", "val_kept_fraction"}


def test_glance_window_metric_single_dict_output_and_name():
    engine = Engine(lambda engine, item: item)
    GlanceWindowMetric(prefix="test_").attach(engine, "glance")  # as MONAI's additional_metrics attaches it
    engine.run([{"windows": windows((True, True), (False, False), (True, False))}], max_epochs=1)
    assert engine.state.metrics["test_glance_sensitivity"] == 1.0
    assert engine.state.metrics["test_glance_specificity"] == 0.5
    assert engine.state.metrics["test_kept_fraction"] == pytest.approx(2 / 3)
    assert "glance" not in engine.state.metrics
    with pytest.raises(KeyError):
        GlanceWindowMetric().update([{"pred": None}])


# (p(keep), window holds a lesion) for three lesion windows and five lesion-free ones
WINDOW_SCORES = [
    [0.9, True],
    [0.8, True],
    [0.3, True],
    [0.1, False],
    [0.2, False],
    [0.4, False],
    [0.5, False],
    [0.7, False],
]


def test_glance_operating_point_by_hand():
    from scripts.metrics import glance_operating_point

    # lesion windows p = .9 .8 .3; lesion-free p = .1 .2 .4 .5 .7. Discarding >= 60 % of the lesion-free windows
    # needs a threshold above .4; at .5 the lesion windows .9 and .8 are kept: sensitivity 2/3.
    # AUC: of the 15 (lesion, free) pairs, the lesion window scores higher in 12 -> 0.8.
    scores = WINDOW_SCORES
    out = glance_operating_point(scores)
    assert out == pytest.approx({"auc": 0.8, "threshold": 0.5, "sensitivity": 2 / 3})
    assert math.isnan(glance_operating_point([[0.5, True]])["auc"])


def test_screening_threshold_by_hand():
    from scripts.metrics import screening_threshold

    scores = WINDOW_SCORES
    # 95 % of 3 lesion windows needs all 3: threshold .3 keeps .3 .4 .5 .7 and discards .1 .2 (2/5); keeps 6/8
    assert screening_threshold(scores, 0.95) == pytest.approx(
        {"threshold": 0.3, "sensitivity": 1.0, "specificity": 0.4, "kept_fraction": 0.75}
    )
    # 60 % needs 2 (ceil 1.8): threshold .8 discards every lesion-free window and keeps 2/8
    assert screening_threshold(scores, 0.6) == pytest.approx(
        {"threshold": 0.8, "sensitivity": 2 / 3, "specificity": 1.0, "kept_fraction": 0.25}
    )
    assert math.isnan(screening_threshold([[0.5, False]])["threshold"])


def _window(start, size, kept):
    return {"start": list(start), "size": list(size), "prob": 0.9 if kept else 0.1, "kept": kept}


def test_lesion_reach_through_kept_windows():
    from scripts.metrics import lesion_reach

    def reached(windows):
        return [r["reached"] for r in lesion_reach(gt, windows)]

    gt = cube(lo=(1, 1, 1), size=(2, 2, 2)) | cube(lo=(5, 5, 5), size=(5, 5, 5))  # lesion A, then lesion B
    over_a, over_b = _window((0, 0, 0), (4, 4, 4), True), _window((5, 5, 5), (5, 5, 5), False)
    assert lesion_reach(gt, [over_a, over_b]) == [
        {"reached": True, "window_prob": 0.9},
        {"reached": False, "window_prob": 0.1},
    ]
    # a kept window that holds one voxel of B (5, 5, 5) at its far corner reaches B; one that stops short does not
    assert reached([over_a, over_b, _window((4, 4, 4), (2, 2, 2), True)]) == [True, True]
    assert reached([over_a, over_b, _window((3, 3, 3), (2, 2, 2), True)]) == [True, False]
    # a window starting before the volume (negative corner) is clipped, not wrapped round
    assert reached([_window((-2, -2, -2), (3, 3, 3), True)]) == [False, False]
    assert reached([_window((-2, -2, -2), (4, 4, 4), True)]) == [True, False]
    # window_prob: the highest p(keep) over the windows touching the lesion, kept or not
    touching_b = [
        over_b,
        {**_window((4, 4, 4), (2, 2, 2), False), "prob": 0.4},
        {**_window((0, 0, 0), (9, 9, 9), False), "prob": 0.3},
    ]
    assert [r["window_prob"] for r in lesion_reach(gt, touching_b)] == [0.3, 0.4]
    assert lesion_reach(EMPTY, [over_a]) == []


def test_lesion_reach_in_case_records_and_summary():
    from scripts.metrics import evaluate_case, summarise_cases

    gt = cube(lo=(1, 1, 1), size=(2, 2, 2)) | cube(lo=(5, 5, 5), size=(5, 5, 5))  # 8 and 125 voxels
    windows = [
        {**_window((0, 0, 0), (4, 4, 4), True), "has_lesion": True},
        {**_window((5, 5, 5), (5, 5, 5), False), "has_lesion": True},
        {**_window((0, 5, 0), (4, 4, 4), False), "prob": 0.05, "has_lesion": False},
        {**_window((5, 0, 0), (4, 4, 4), False), "prob": 0.2, "has_lesion": False},
    ]
    record = evaluate_case(EMPTY, gt, (5.0, 5.0, 5.0), windows)  # 0.125 mL voxels: A 1 mL, B 15.6 mL
    assert [(r["volume_ml"], r["reached"], r["window_prob"], r["detected"]) for r in record["lesions"]] == [
        (1.0, True, 0.9, False),
        (15.625, False, 0.1, False),
    ]
    summary = summarise_cases([record, evaluate_case(EMPTY, EMPTY, (5.0, 5.0, 5.0), [windows[2]])])
    reach = summary["glance_lesion_reach_by_size_ml"]
    assert reach["1-5"] == {"recall": 1.0, "detected": 1, "total": 1}
    assert reach["5-inf"] == {"recall": 0.0, "detected": 0, "total": 1}
    assert reach["0-1"]["total"] == 0 and math.isnan(reach["0-1"]["recall"])
    assert summary["glance_sensitivity"] == 0.5
    # lesion-free window probs .05, .2, .05: discarding 60 % needs p >= .2 (the 0.6 quantile, 'higher'), which lets
    # lesion A (.9) through and not B (.1)
    assert summary["glance_roc"]["threshold"] == 0.2
    assert summary["glance_roc"]["lesion_reach"] == 0.5
    # without window records there is nothing to reach: no key, no made-up number
    assert "reached" not in evaluate_case(EMPTY, gt, (5.0, 5.0, 5.0))["lesions"][0]
    assert "glance_roc" not in summarise_cases([evaluate_case(EMPTY, gt, (5.0, 5.0, 5.0))])


def test_nsd_is_kept_at_a_dsc_of_exactly_the_floor():
    """FLARE zeroes NSD *below* DSC 0.2: one voxel inside a 9-voxel lesion (DSC 2/10) keeps its NSD."""
    gt, pred = cube((7, 7, 7), (2, 2, 3), (3, 3, 1)), cube((7, 7, 7), (3, 3, 3), (1, 1, 1))
    assert flare_dsc(pred, gt) == 0.2
    raw = compute_surface_dice(
        torch.from_numpy(pred)[None, None], torch.from_numpy(gt)[None, None], [2.0], include_background=True
    )
    assert raw.item() == 1.0  # every surface point is within 2 mm of the other surface
    assert flare_nsd(pred, gt, (1, 1, 1)) == 1.0


def test_recall_by_size_bins_include_their_lower_edge_only():
    records = [{"volume_ml": v, "detected": d} for v, d in ((0.0, True), (1.0, False), (5.0, True), (4.999, True))]
    result = recall_by_size(records)
    assert [result[k]["total"] for k in ("0-1", "1-5", "5-inf")] == [1, 2, 1]
    assert result["1-5"] == {"recall": 0.5, "detected": 1, "total": 2}


def test_lesion_reach_follows_the_kept_flag_not_the_probability():
    """At a run threshold of 0.3 a window of p 0.4 is kept; at 0.7 one of p 0.6 is not: reach is what was kept."""
    from scripts.metrics import lesion_reach

    gt = cube(lo=(1, 1, 1), size=(2, 2, 2)) | cube(lo=(5, 5, 5), size=(5, 5, 5))
    kept_low = {"start": [0, 0, 0], "size": [4, 4, 4], "prob": 0.4, "kept": True}
    discarded_high = {"start": [5, 5, 5], "size": [5, 5, 5], "prob": 0.6, "kept": False}
    assert lesion_reach(gt, [kept_low, discarded_high]) == [
        {"reached": True, "window_prob": 0.4},
        {"reached": False, "window_prob": 0.6},
    ]


def test_glance_operating_point_keeps_a_threshold_that_discards_exactly_the_target():
    """Lesion-free p .1 .2 .4 .5 .7: threshold .5 discards exactly 60 %, so it stays .5 (not just above it) and the
    lesion window at exactly .5 counts as kept."""
    from scripts.metrics import glance_operating_point

    lesion, free = [0.9, 0.5, 0.3], [0.1, 0.2, 0.4, 0.5, 0.7]
    out = glance_operating_point([[p, True] for p in lesion] + [[p, False] for p in free])
    assert out["threshold"] == 0.5 and out["sensitivity"] == pytest.approx(2 / 3)


def test_lesions_reached_at_the_operating_point_include_a_lesion_at_exactly_its_threshold():
    from scripts.metrics import evaluate_case, summarise_cases

    gt = cube(lo=(1, 1, 1), size=(2, 2, 2)) | cube(lo=(5, 5, 5), size=(5, 5, 5))
    windows = [
        {**_window((0, 0, 0), (4, 4, 4), False), "prob": 0.4, "has_lesion": True},  # lesion A, p at the threshold
        {**_window((5, 5, 5), (5, 5, 5), False), "prob": 0.3, "has_lesion": True},  # lesion B, below it
        *({**_window((0, 5, 0), (2, 2, 2), False), "prob": p, "has_lesion": False} for p in (0.1, 0.2, 0.4)),
    ]
    summary = summarise_cases([evaluate_case(EMPTY, gt, (1.0, 1.0, 1.0), windows)])
    # lesion-free .1 .2 .4: the 0.6 quantile ('higher') is .4, which discards 2 of 3 (>= 60 %)
    assert summary["glance_roc"]["threshold"] == 0.4
    assert summary["glance_roc"]["lesion_reach"] == 0.5
