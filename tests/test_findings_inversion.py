"""Post-processing on the input grid only where findings can be (scripts.postprocess): the box geometry, and the
result equal to MONAI's whole-volume ``Invertd`` + threshold + size filter + confidence gate."""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import AsDiscreted, Compose, CopyItemsd, Invertd, RemoveSmallObjectsd

import scripts.postprocess as postprocess
from scripts.phantom import make_phantom
from scripts.postprocess import InvertFindingsd, Timestampd, candidate_boxes, index_map, map_box, merge_boxes
from scripts.transforms import LesionConfidenceFilterd, LesionProbabilityd

BUNDLE_ROOT = Path(__file__).resolve().parents[1] / "bundle"
MIN_MM3, MIN_PEAK = 50.0, 0.65


def test_index_map_takes_destination_voxels_to_source_voxels():
    src = np.diag([2.0, 2.0, 4.0, 1.0])
    src[:3, 3] = [10.0, 0.0, -8.0]
    dst = np.diag([1.0, 0.5, 1.0, 1.0])
    # dst voxel (4, 6, 0) is world (4, 3, 0): src voxel ((4 - 10) / 2, 3 / 2, (0 + 8) / 4)
    np.testing.assert_allclose((index_map(src, dst) @ [4, 6, 0, 1])[:3], [-3.0, 1.5, 2.0])


def test_candidate_boxes_grow_each_region_by_one_voxel_within_the_grid():
    prob = np.zeros((10, 10, 10), np.float32)
    prob[2:4, 3:5, 4:6] = 0.6
    prob[9, 9, 9] = 0.5  # exactly the threshold counts
    prob[6, 0, 0] = 0.49
    boxes = sorted(candidate_boxes(prob, 0.5), key=lambda b: b[0].start)
    assert boxes == [(slice(1, 5), slice(2, 6), slice(3, 7)), (slice(8, 10), slice(8, 10), slice(8, 10))]
    assert candidate_boxes(np.zeros((4, 4, 4)), 0.5) == []


def test_map_box_covers_every_voxel_that_can_sample_the_box():
    # destination voxels are 0.5 x 0.5 x 1 source voxels: dst i sits at src i / 2
    src_from_dst = np.diag([0.5, 0.5, 1.0, 1.0])
    box = map_box((slice(2, 4), slice(0, 1), slice(5, 6)), src_from_dst, (40, 40, 40))
    # one voxel of slack on each side: x: src 1..4 -> dst 2..8; y: src -1..1 -> dst 0..2 (clipped); z: 4..6
    assert box == (slice(2, 9), slice(0, 3), slice(4, 7))
    assert map_box((slice(30, 32),) * 3, src_from_dst, (10, 10, 10)) is None  # maps beyond the destination


def test_merge_boxes_joins_overlapping_and_touching_boxes_only():
    a = (slice(0, 3), slice(0, 3), slice(0, 3))
    touching = (slice(3, 5), slice(3, 5), slice(3, 5))  # shares a corner with a: one 26-connected component
    apart = (slice(6, 8), slice(0, 2), slice(0, 2))  # one empty voxel plane between it and the others
    assert sorted(merge_boxes([a, touching, apart]), key=lambda b: b[0].start) == [
        (slice(0, 5), slice(0, 5), slice(0, 5)),
        apart,
    ]
    # the third box touches neither of the first two, only the union of them
    chain = [
        (slice(0, 2), slice(0, 2), slice(0, 1)),
        (slice(0, 1), slice(4, 6), slice(0, 1)),
        (slice(2, 4), slice(2, 4), slice(0, 1)),
    ]
    assert merge_boxes(chain) == [(slice(0, 4), slice(0, 6), slice(0, 1))]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A phantom stored P-L-S with anisotropic voxels, through inference.json's preprocessing, and a model-grid
    probability with blobs: confident and large, small (below the volume), unconfident, two close together
    (their boxes merge), one cut by the grid's edge."""
    ph = make_phantom(3, shape=(96, 80, 40), spacing=(0.8, 0.7, 2.5))
    data = np.ascontiguousarray(np.flip(ph.image, (0, 1)).transpose(1, 0, 2))
    nx, ny, _ = ph.image.shape
    affine = ph.affine @ np.array([[0, -1, 0, nx - 1], [-1, 0, 0, ny - 1], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    path = tmp_path_factory.mktemp("invert") / "pls.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "inference.json"))
    # MONAI's Invertd (the reference) needs the transforms' applied_operations, which the one-pass
    # OrientedSpacingd does not record: use the two transforms it equals (tests/test_loading.py)
    steps = parser["preprocessing"]["transforms"]
    i = next(i for i, t in enumerate(steps) if t["_target_"].endswith("OrientedSpacingd"))
    steps[i : i + 1] = [
        {"_target_": "Orientationd", "keys": steps[i]["keys"], "axcodes": "RAS"},
        {
            "_target_": "Spacingd",
            "keys": steps[i]["keys"],
            "pixdim": "@pixdim",
            "mode": "bilinear",
            "padding_mode": "border",
        },
    ]
    preprocessing = parser.get_parsed_content("preprocessing")
    item = preprocessing({"image": str(path)})
    shape = item["image"].shape[1:]
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), -1).astype(float)
    prob = np.zeros(shape, np.float32)
    for centre, radius, peak in (
        ((0.3, 0.4, 0.5), 3.0, 0.95),
        ((0.7, 0.3, 0.4), 1.0, 0.9),
        ((0.5, 0.7, 0.6), 2.5, 0.6),
        ((0.5, 0.5, 0.2), 2.0, 0.8),
        ((0.58, 0.5, 0.2), 2.0, 0.8),
        ((0.99, 0.6, 0.5), 3.0, 0.9),
    ):
        c = np.array(centre) * (np.array(shape) - 1)
        blob = peak * np.exp(-(((grid - c) / radius) ** 2).sum(-1) / 2)
        prob = np.maximum(prob, blob.astype(np.float32))
    scores = torch.from_numpy(np.stack([1 - prob, prob]))
    item["pred"] = item["image"].clone().set_array(scores)
    return item, preprocessing, ph.image.size


def _mask_transform() -> Compose:
    return Compose(
        [
            RemoveSmallObjectsd("pred", min_size=MIN_MM3, by_measure=True),
            LesionConfidenceFilterd("pred", min_peak=MIN_PEAK),
        ]
    )


def test_equals_monai_invert_of_the_whole_volume(case):
    """The old inference post-processing, voxel for voxel, and its probability wherever a finding is."""
    item, preprocessing, _ = case
    reference = Compose(
        [
            LesionProbabilityd("pred"),
            Invertd("pred", transform=preprocessing, orig_keys="image", nearest_interp=False, to_tensor=True),
            CopyItemsd("pred", names="prob"),
            AsDiscreted("pred", threshold=0.5),
            *_mask_transform().transforms,
        ]
    )(dict(item))
    ours = Compose([LesionProbabilityd("pred"), InvertFindingsd("pred", mask_transform=_mask_transform())])(dict(item))
    expected = np.asarray(reference["pred"][0]) > 0
    found = np.asarray(ours["pred"][0])
    assert found.dtype == np.uint8 and found.shape == expected.shape == (80, 96, 40)
    assert 0 < expected.sum() and np.array_equal(found > 0, expected)
    np.testing.assert_allclose(np.asarray(ours["pred"].affine), np.asarray(reference["pred"].affine), atol=1e-6)
    assert ours["pred"].meta["filename_or_obj"] == item["image"].meta["filename_or_obj"]
    np.testing.assert_allclose(
        np.asarray(ours["prob"][0])[expected], np.asarray(reference["prob"][0])[expected], atol=1e-5
    )


def test_filters_drop_small_and_unconfident_findings(case):
    item = case[0]
    plain = Compose([LesionProbabilityd("pred"), InvertFindingsd("pred")])(dict(item))
    filtered = Compose([LesionProbabilityd("pred"), InvertFindingsd("pred", mask_transform=_mask_transform())])(
        dict(item)
    )
    labels_plain = _count(np.asarray(plain["pred"][0]))
    labels_filtered = _count(np.asarray(filtered["pred"][0]))
    assert labels_filtered < labels_plain  # the 0.6-peak blob and the one-voxel-radius blob are gone
    prob = np.asarray(filtered["prob"][0])
    assert prob[np.asarray(filtered["pred"][0]) > 0].min() >= 0.5


def _count(mask: np.ndarray) -> int:
    from scipy import ndimage

    return ndimage.label(mask > 0, structure=np.ones((3, 3, 3)))[1]


def test_only_boxes_around_findings_are_resampled(monkeypatch, case):
    item, _, volume = case
    sampled = []
    real = postprocess.resample_box
    monkeypatch.setattr(postprocess, "resample_box", lambda src, m, box: sampled.append(box) or real(src, m, box))
    InvertFindingsd("pred")(LesionProbabilityd("pred")(dict(item)))
    assert 0 < len(sampled) < 6  # the two close blobs share a box
    assert sum(np.prod([s.stop - s.start for s in box]) for box in sampled) < 0.25 * volume
    empty = dict(
        item,
        pred=item["pred"]
        .clone()
        .set_array(torch.stack([torch.ones_like(item["pred"][0]), torch.zeros_like(item["pred"][0])])),
    )
    sampled.clear()
    out = InvertFindingsd("pred")(LesionProbabilityd("pred")(empty))
    assert sampled == [] and not np.asarray(out["pred"]).any() and out["pred"].shape == (1, 80, 96, 40)


def test_invert_findings_rejects_a_bad_threshold():
    with pytest.raises(ValueError, match="threshold"):
        InvertFindingsd("pred", threshold=0.0)


def test_timestamp_records_when_the_chain_got_there():
    before = time.perf_counter()
    d = Timestampd(name="save")(Timestampd(name="post")({"x": 1}))
    assert d["x"] == 1 and before <= d["timestamps"]["post"] <= d["timestamps"]["save"] <= time.perf_counter()
