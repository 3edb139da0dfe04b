"""The report, overview and mask file at model speed (scripts.report, scripts.postprocess): measured on the box
around the findings, slices through the largest findings numbered as in the report, a heat map that reads as
probability over the CT, and the mask written in NIfTI's own layout."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from monai.data import MetaTensor
from monai.transforms import SaveImaged
from PIL import Image

import scripts.report as report
from scripts.postprocess import MaskNiftiWriter, mask_on_grid
from scripts.report import build_report, findings_in_world, lesion_components, render_overview

SHAPE = (512, 512, 150)
AFFINE = np.diag([0.7, 0.7, 2.0, 1.0])
AFFINE[:3, 3] = [-180.0, -170.0, -300.0]


def _scan_with_findings() -> tuple[np.ndarray, np.ndarray]:
    """A Fortran-ordered 512 x 512 x 150 mask (as the post-processing writes it) with two findings far apart."""
    mask, prob = np.zeros(SHAPE, np.uint8, order="F"), np.zeros(SHAPE, np.float32)
    mask[100:110, 200:204, 20:22] = 1  # 80 voxels
    prob[100:110, 200:204, 20:22] = 0.6
    prob[105, 201, 21] = 0.9
    mask[400:403, 450:452, 140:141] = 1  # 6 voxels
    prob[400:403, 450:452, 140:141] = 0.55
    return mask, prob


def test_lesion_components_label_only_the_box_around_the_findings(monkeypatch):
    mask, prob = _scan_with_findings()
    labelled = []
    real = report.connected_components
    monkeypatch.setattr(report, "connected_components", lambda m: labelled.append(m.shape) or real(m))
    big, small = lesion_components(mask, prob, AFFINE)
    assert labelled == [(303, 252, 121)]  # x 100..402, y 200..451, z 20..140
    assert big["voxels"] == 80 and big["bbox_voxel"] == [100, 200, 20, 109, 203, 21]
    assert big["volume_ml"] == pytest.approx(80 * 0.7 * 0.7 * 2.0 / 1000)
    assert big["centroid_mm"] == pytest.approx([104.5 * 0.7 - 180, 201.5 * 0.7 - 170, 20.5 * 2 - 300])
    assert big["max_probability"] == pytest.approx(0.9)
    assert small["voxels"] == 6 and small["bbox_voxel"] == [400, 450, 140, 402, 451, 140]
    assert small["max_probability"] == pytest.approx(0.55)


def _placed(number: int, centre) -> report._Placed:
    centre = np.asarray(centre, float)
    return report._Placed(number, centre, centre - 2, centre + 2)


def test_views_go_through_the_largest_findings_then_fill_with_the_largest():
    shape = (100, 100, 50)
    three = [_placed(1, (10, 20, 30)), _placed(2, (50, 60, 10)), _placed(3, (70, 70, 40)), _placed(4, (5, 5, 5))]
    assert report._views(three, None, shape) == [(2, 30, "finding 1"), (2, 10, "finding 2"), (2, 40, "finding 3")]
    same_slice = [_placed(1, (10, 20, 30.2)), _placed(2, (50, 60, 29.8))]  # one axial slice shows both
    assert report._views(same_slice, None, shape) == [(2, 30, "finding 1"), (1, 20, "finding 1"), (0, 10, "finding 1")]
    heat = np.zeros(shape, np.float32)
    heat[60:64, 10:12, 40:42] = 0.8
    assert report._views([], heat, shape) == [
        (2, 40, "highest glance p(keep)"),
        (1, 10, "highest glance p(keep)"),
        (0, 62, "highest glance p(keep)"),
    ]  # centroid 61.5, 10.5, 40.5
    assert report._views([], None, shape) == [
        (2, 24, "volume centre"),
        (1, 50, "volume centre"),
        (0, 50, "volume centre"),
    ]


def _render(tmp_path, ct, mask, heat, affine, **kwargs) -> tuple[np.ndarray, Figure]:
    """Render, keeping the figure (to find the panels' pixels) and the PNG as an RGB array."""
    figures = []
    real = Figure.savefig

    def keep(fig, *args, **kw):
        figures.append(fig)
        return real(fig, *args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Figure, "savefig", keep)
        path = render_overview(ct, mask, heat, affine, tmp_path / "overview.png", "t", **kwargs)
    with Image.open(path) as png:
        return np.asarray(png.convert("RGB")).astype(int), figures[0]


def test_overview_numbers_each_finding_on_the_panels_it_crosses(tmp_path):
    ct = np.full((60, 60, 30), 40.0, np.float32)
    mask = np.zeros(ct.shape, np.uint8)
    mask[10:14, 40:44, 5:8] = 1  # finding 1 (48 voxels)
    mask[40:43, 10:13, 20:22] = 1  # finding 2 (18 voxels)
    affine = np.diag([2.0, 2.0, 4.0, 1.0])
    rep = build_report("c", mask, mask * 0.9, affine, [], {}, 0.5)
    _, fig = _render(tmp_path, ct, mask, None, affine, findings=findings_in_world(rep["lesions"], affine))
    panels = fig.axes[:4]
    numbers = [sorted(t.get_text() for t in ax.texts if t.get_text().isdigit()) for ax in panels]
    # axial through 1 (z = 6) and through 2 (z = 20.5 -> 20), coronal through 1 (y = 41.5 -> 42): 2 spans y 10-12
    assert [ax.get_title().split(": ")[-1] for ax in panels[:3]] == ["finding 1", "finding 2", "finding 1"]
    assert numbers == [["1"], ["2"], ["1"], ["1", "2"]]
    label = next(t for t in panels[0].texts if t.get_text() == "1")
    x_mm, y_mm = label.get_position()
    assert x_mm >= 14 * 2.0 and 40 * 2.0 <= y_mm <= 44 * 2.0  # beside the finding (viewer's left), at its height


def test_heat_map_reads_as_probability_over_the_ct(tmp_path):
    """One opacity for every p(keep): equal p over equal CT gives equal colour wherever it is, the CT contrast
    under the map is kept at 1 - HEAT_ALPHA, and where no window reached HEAT_FLOOR the CT is untinted grey."""
    ct = np.full((64, 64, 8), -60.0, np.float32)  # soft-tissue window L40/W400: grey level 0.25
    ct[:, 32:, :] = 140.0  # grey level 0.75
    heat = np.zeros(ct.shape, np.float32)
    heat[:32] = 0.6
    heat[32:48] = 0.01  # below the floor
    png, fig = _render(tmp_path, ct, np.zeros(ct.shape, np.uint8), heat, np.eye(4))
    ax = fig.axes[0]  # axial: x across (inverted), y up

    def pixel(x: float, y: float) -> np.ndarray:
        u, v = ax.transData.transform((x + 0.5, y + 0.5))
        return png[png.shape[0] - int(round(v)), int(round(u))]

    assert np.array_equal(pixel(5, 5), pixel(25, 20))  # same p, same CT, different place
    tinted = pixel(10, 50) - pixel(10, 10)  # same p (0.6), CT 0.75 vs 0.25 grey
    plain = pixel(40, 50) - pixel(40, 10)  # p 0.01: untinted
    assert pixel(40, 10)[0] == pixel(40, 10)[1] == pixel(40, 10)[2]  # grey
    np.testing.assert_allclose(tinted, (1 - report.HEAT_ALPHA) * plain, atol=3)
    assert np.abs(pixel(10, 10) - pixel(40, 10)).max() > 20  # p 0.6 is tinted


def test_mask_on_grid_is_nearest_neighbour_sampling():
    """Against a brute-force lookup, from a flipped fine grid to a coarse RAS grid."""
    rng = np.random.default_rng(1)
    src = np.zeros((40, 36, 20), np.uint8, order="F")
    src[10:18, 5:15, 4:9] = rng.random((8, 10, 5)) > 0.3
    src_affine = np.diag([-0.75, -0.8, 1.5, 1.0])
    src_affine[:3, 3] = [30.0, 28.0, -2.0]
    dst_shape, dst_affine = (21, 20, 11), np.diag([1.5, 1.6, 3.0, 1.0])
    dst_affine[:3, 3] = [0.4, 0.1, -1.0]
    to_src = np.linalg.inv(src_affine) @ dst_affine
    expected = np.zeros(dst_shape, bool)
    for index in np.ndindex(dst_shape):
        i, j, k = np.rint(to_src[:3, :3] @ index + to_src[:3, 3]).astype(int)
        if 0 <= i < 40 and 0 <= j < 36 and 0 <= k < 20:
            expected[index] = src[i, j, k] > 0
    found = mask_on_grid(src, src_affine, dst_shape, dst_affine)
    assert found.dtype == bool and expected.sum() > 10 and np.array_equal(found, expected)
    assert not mask_on_grid(np.zeros_like(src), src_affine, dst_shape, dst_affine).any()


@pytest.mark.parametrize("order", ["C", "F"])
def test_mask_writer_writes_what_monai_writes_in_nifti_layout(tmp_path, order, monkeypatch):
    mask = np.zeros((30, 20, 10), np.uint8, order=order)
    mask[3:9, 2:5, 1:7] = 1
    mask[20, 15, 9] = 1
    affine = np.diag([-0.8, -0.8, 2.5, 1.0])
    affine[:3, 3] = [12.0, -40.0, 7.0]

    def save(writer, out):
        data = {
            "pred": MetaTensor(
                torch.from_numpy(mask[None]), affine=torch.as_tensor(affine), meta={"filename_or_obj": "case.nii.gz"}
            )
        }
        SaveImaged(
            "pred",
            output_dir=str(tmp_path / out),
            output_postfix="lesion",
            output_dtype=np.uint8,
            resample=False,
            separate_folder=False,
            print_log=False,
            writer=writer,
        )(data)
        return nib.load(tmp_path / out / "case_lesion.nii.gz")

    handed = []
    real = nib.Nifti1Image
    monkeypatch.setattr(
        "scripts.postprocess.nib.Nifti1Image",
        lambda data, *a, **k: handed.append(data.flags["F_CONTIGUOUS"]) or real(data, *a, **k),
    )
    ours, monai = save(MaskNiftiWriter, "ours"), save(None, "monai")
    assert handed == [True]  # nibabel writes Fortran order without a transposing copy
    assert ours.get_data_dtype() == monai.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(ours.dataobj), mask) and np.array_equal(np.asarray(monai.dataobj), mask)
    np.testing.assert_allclose(ours.affine, monai.affine)
    np.testing.assert_allclose(ours.header.get_sform(), monai.header.get_sform())
    assert ours.header.get_qform(coded=True)[1] == monai.header.get_qform(coded=True)[1] == 1
