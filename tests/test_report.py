"""Scan report and overview figure (scripts.report)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image
from scipy import ndimage

import scripts.report
from scripts.handlers import ScreeningReportHandler
from scripts.report import build_report, glance_heatmap, lesion_components, render_overview, save_report

# 2 x 2 x 3 mm voxels (12 mm^3) with a non-zero origin.
AFFINE = np.array([[2.0, 0, 0, -100.0], [0, 2.0, 0, 50.0], [0, 0, 3.0, 10.0], [0, 0, 0, 1]])


def toy_case() -> tuple[np.ndarray, np.ndarray]:
    """A 30^3 mask with a 5x5x5 lesion (125 voxels) and a 2x2x2 one (8 voxels), and its probabilities."""
    mask, prob = np.zeros((30, 30, 30), np.uint8), np.zeros((30, 30, 30), np.float32)
    mask[2:7, 3:8, 4:9] = 1
    prob[2:7, 3:8, 4:9] = 0.7
    prob[4, 5, 6] = 0.95
    mask[20:22, 20:22, 20:22] = 1
    prob[20:22, 20:22, 20:22] = 0.6
    return mask, prob


WINDOWS = [
    {"prob": 0.95, "kept": True, "start": (0, 0, 0), "size": (16, 16, 16)},
    {"prob": 0.10, "kept": False, "start": (14, 0, 0), "size": (16, 16, 16)},
    {"prob": 0.20, "kept": False, "start": (0, 14, 0), "size": (16, 16, 16)},
    {"prob": 0.30, "kept": False, "start": (14, 14, 14), "size": (16, 16, 16)},
]


def test_lesion_components_volume_centroid_bbox():
    mask, prob = toy_case()
    big, small = lesion_components(mask, prob, AFFINE)
    assert big["voxels"] == 125 and big["volume_ml"] == pytest.approx(1.5)
    assert big["centroid_mm"] == pytest.approx([2 * 4 - 100, 2 * 5 + 50, 3 * 6 + 10])  # voxel (4, 5, 6)
    assert big["bbox_voxel"] == [2, 3, 4, 6, 7, 8]
    assert big["max_probability"] == pytest.approx(0.95)
    assert small["voxels"] == 8 and small["volume_ml"] == pytest.approx(0.096)
    assert small["max_probability"] == pytest.approx(0.6)
    assert lesion_components(np.zeros_like(mask), prob, AFFINE) == []


def test_build_report_and_verdict(tmp_path):
    mask, prob = toy_case()
    timings = {"load": 0.5, "glance": 1.0, "focus": 2.0, "save": 0.25, "total": 3.75}
    report = build_report("case_1", mask, prob, AFFINE, WINDOWS, timings, threshold=0.9)
    assert report["verdict"] == "suspicious"  # 133 lesion voxels > 125
    assert report["score"] == pytest.approx(0.95)
    assert [lesion["voxels"] for lesion in report["lesions"]] == [125, 8]
    assert report["windows"] == {"total": 4, "kept": 1, "kept_fraction": 0.25, "glance_threshold": 0.9}
    assert report["timings_s"] == timings
    assert report["input_geometry"] == {"shape": [30, 30, 30], "spacing": [2.0, 2.0, 3.0]}

    path = save_report(report, tmp_path / "out" / "case_1.json")
    assert json.loads(path.read_text()) == json.loads(json.dumps(report))
    assert [p.name for p in path.parent.iterdir()] == ["case_1.json"]  # no temporary file left behind


def test_verdict_threshold_and_empty_scan():
    mask, prob = toy_case()
    mask[20:22, 20:22, 20:22] = 0  # 125 voxels left: not more than the threshold
    assert build_report("c", mask, prob, AFFINE, WINDOWS, {}, 0.9)["verdict"] == "no lesion found"
    assert build_report("c", mask, prob, AFFINE, WINDOWS, {}, 0.9, fp_voxel_threshold=100)["verdict"] == "suspicious"
    empty = build_report("c", np.zeros_like(mask), prob, AFFINE, [], {}, 0.9)
    assert (empty["verdict"], empty["score"], empty["lesions"]) == ("no lesion found", 0.0, [])
    assert empty["windows"]["kept_fraction"] is None


def test_save_report_is_strict_json_and_atomic(tmp_path):
    path = save_report({"a": 1, "b": [math.nan, 2.0], "c": {"d": math.nan}}, tmp_path / "r.json")
    assert json.loads(path.read_text()) == {"a": 1, "b": [None, 2.0], "c": {"d": None}}
    with pytest.raises(TypeError):  # a failed write leaves the previous file whole and no temp file behind
        save_report({"a": {1, 2}}, path)
    assert json.loads(path.read_text())["a"] == 1
    assert len(list(tmp_path.iterdir())) == 1


def test_glance_heatmap_takes_max_and_clips():
    heat = glance_heatmap(
        (8, 8, 8),
        [
            {"prob": 0.3, "start": (0, 0, 0), "size": 4},
            {"prob": 0.8, "start": (2, 2, 2), "size": (4, 4, 4)},
            {"prob": 0.5, "start": (6, 6, 6), "size": (4, 4, 4)},  # runs past the edge
            {"prob": 0.1, "start": (1, 1, 1), "size": (2, 2, 2)},  # lower than what covers it already
        ],
    )
    assert heat.dtype == np.float32 and heat.shape == (8, 8, 8)
    assert heat[0, 0, 0] == pytest.approx(0.3) and heat[1, 1, 1] == pytest.approx(0.3)
    assert heat[3, 3, 3] == pytest.approx(0.8) and heat[7, 7, 7] == pytest.approx(0.5)
    assert heat[0, 7, 0] == 0.0


def ct_phantom(shape=(48, 40, 16)) -> np.ndarray:
    """Soft tissue (40 HU) ellipse in air with a brighter blob, so all windows have something to show."""
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    body = np.where(x**2 + y**2 < 0.8, 40.0, -1000.0)
    ct = np.repeat(body[..., None], shape[2], axis=2)
    ct[20:28, 18:24, 6:10] = 120.0
    return ct


@pytest.mark.parametrize("with_lesion, with_heat", [(True, True), (False, False), (True, False)])
def test_render_overview_png(tmp_path, with_lesion, with_heat):
    ct = ct_phantom()
    mask = np.zeros(ct.shape, np.uint8)
    if with_lesion:
        mask[20:28, 18:24, 6:10] = 1
    heat = glance_heatmap(ct.shape, WINDOWS) if with_heat else None
    affine = np.diag([-0.8, -0.8, 5.0, 1.0])  # LPS-style flips, 5 mm slices
    path = render_overview(ct, mask, heat, affine, tmp_path / "overview.png", title="toy case")
    with Image.open(path) as png:
        assert png.size == (1200, 400) and png.format == "PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["overview.png"]


def test_render_overview_rejects_mismatched_shapes(tmp_path):
    with pytest.raises(ValueError):
        render_overview(np.zeros((4, 4, 4)), np.zeros((4, 4, 3)), None, np.eye(4), tmp_path / "x.png")


def test_overview_draws_the_saved_mask_on_the_model_grid(tmp_path, monkeypatch):
    """The report handler's PNG shows the mask that was saved (input grid, small components already dropped),
    resampled to the model grid of the image and heat map, not a separate model-grid prediction."""
    drawn = {}
    monkeypatch.setattr(scripts.report, "render_overview", lambda hu, mask, *a, **k: drawn.update(hu=hu, mask=mask))
    image = MetaTensor(torch.zeros(2, 20, 20, 10), affine=torch.diag(torch.tensor([1.5, 1.5, 3.0, 1.0])))
    saved = torch.zeros(1, 40, 40, 30)  # the input grid: 0.75 x 0.75 x 1 mm
    saved[0, 8:16, 8:16, 6:15] = 1  # 6-12 mm, 6-12 mm, 6-15 mm
    pred = MetaTensor(saved, affine=torch.diag(torch.tensor([0.75, 0.75, 1.0, 1.0])))
    ScreeningReportHandler(str(tmp_path), threshold=0.5)._render(
        {"image": image, "pred": pred, "windows": []},
        "c",
        {"verdict": "suspicious", "score": 1.0, "windows": {"kept": 0, "total": 0}},
    )
    assert drawn["mask"].shape == drawn["hu"].shape == (20, 20, 10)
    assert set(map(tuple, np.argwhere(drawn["mask"])[:, :2])) == {(x, y) for x in range(4, 8) for y in range(4, 8)}
    assert set(np.argwhere(drawn["mask"])[:, 2]) == {2, 3, 4}


def _two_blob_ct() -> tuple[np.ndarray, np.ndarray]:
    """Tissue ellipse in air with two 8x8x6-voxel blobs at distinct grey levels of the soft-tissue window: the
    lesion (140 HU, grey 191) on the low-x side and a lesion-free landmark (200 HU, grey 229) on the high-x side."""
    shape = (48, 40, 16)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    ct = np.repeat(np.where(x**2 + y**2 < 0.8, 40.0, -1000.0)[..., None], shape[2], axis=2)
    ct[8:16, 14:22, 5:11] = 140.0
    ct[30:38, 14:22, 5:11] = 200.0
    return ct, (ct == 140.0).astype(np.uint8)


def _render_views(tmp_path, monkeypatch, name, ct, mask, heat) -> list[np.ndarray]:
    """Render the overview and return the RGB pixels of its slice panels (up to three; found from the axes the
    figure drew them in)."""
    drawn = []
    show = scripts.report._show
    monkeypatch.setattr(scripts.report, "_show", lambda ax, *a, **k: drawn.append(ax) or show(ax, *a, **k))
    affine = np.diag([-0.8, -0.8, 5.0, 1.0])  # LPS-style flips: the views must reorient CT, mask and heat alike
    lesions = scripts.report.lesion_components(mask, mask.astype(np.float32), affine)  # what the report lists
    findings = scripts.report.findings_in_world(lesions, affine)
    with Image.open(render_overview(ct, mask, heat, affine, tmp_path / f"{name}.png", findings=findings)) as png:
        pixels = np.asarray(png.convert("RGB")).astype(int)
    panels = []
    for ax in [ax for ax in drawn if "MIP" not in ax.get_title()][:3]:  # the slice views, not the MIP
        box = ax.get_window_extent()  # display pixels, y up
        rows = slice(int(np.ceil(pixels.shape[0] - box.y1)), int(pixels.shape[0] - box.y0))
        panels.append(pixels[rows, int(np.ceil(box.x0)) : int(box.x1)])
    return panels


def _grey_blob(panel: np.ndarray, level: int, tol: int = 2) -> np.ndarray:
    """The largest connected region of grey ``level`` (+-``tol``) in a panel, as a boolean mask."""
    grey = (np.ptp(panel, axis=-1) <= 2) & (np.abs(panel[..., 0] - level) <= tol)
    labels, count = ndimage.label(grey)
    assert count, f"no grey {level} in the panel"
    return labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask)
    return rows.min(), rows.max(), cols.min(), cols.max()


def test_overview_draws_the_contour_around_the_lesion(tmp_path, monkeypatch):
    ct, mask = _two_blob_ct()
    for panel in _render_views(tmp_path, monkeypatch, "contour", ct, mask, None):
        lesion = _grey_blob(panel, 191, tol=31)  # the lesion's own CT pixels, closer to 191 than to tissue and landmark
        lime = (panel[..., 1] > 180) & (panel[..., 0] < 100) & (panel[..., 2] < 100)
        assert lime.sum() > 50
        r0, r1, c0, c1 = _box(lesion)
        l0, l1, k0, k1 = _box(lime)
        # the contour hugs the lesion, within 3 px of its edges on every side, and is drawn nowhere else
        assert max(abs(l0 - r0), abs(l1 - r1), abs(k0 - c0), abs(k1 - c1)) <= 3, (_box(lesion), _box(lime))


def test_overview_heat_map_differs_where_p_keep_differs(tmp_path, monkeypatch):
    """Two heat maps that differ only on the lesion's half of the volume change only that half of the axial view."""
    ct, mask = _two_blob_ct()
    low = np.full(ct.shape, 0.2, np.float32)
    high_on_lesion = low.copy()
    high_on_lesion[:24] = 0.9
    plain, a, b = (
        _render_views(tmp_path, monkeypatch, name, ct, mask, heat)[0]
        for name, heat in (("plain", None), ("low", low), ("high", high_on_lesion))
    )
    inside = lambda blob: ndimage.binary_erosion(blob, iterations=4)  # noqa: E731 (away from the contour)
    lesion, landmark = inside(_grey_blob(plain, 191)), inside(_grey_blob(plain, 229))
    assert lesion.sum() > 200 and landmark.sum() > 200
    assert np.abs(b[lesion] - a[lesion]).max(axis=-1).min() > 20  # p .9 against .2: every pixel changes
    assert np.abs(b[landmark] - a[landmark]).max() <= 2  # p .2 in both: unchanged
    assert np.abs(a[landmark] - plain[landmark]).max(axis=-1).min() > 5  # and p .2 is drawn at all
