"""Bad training/evaluation data: clear errors naming the file, or a documented skip with a warning; transforms."""

import gzip
import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import FgBgToIndicesd

from scripts.data import DataError, check_case, load_datalist
from scripts.transforms import (
    CheckGeometryd,
    EnsureLabeld,
    HUWindowsd,
    LoadCTd,
    RandWindowCropd,
    lesion_balanced_weights,
)

BUNDLE_ROOT = Path(__file__).resolve().parents[1] / "bundle"
AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])
SHAPE = (24, 20, 12)


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> str:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return str(path)


@pytest.fixture
def cases(tmp_path):
    """One file per kind of case, good and bad."""
    rng = np.random.default_rng(0)
    image = rng.integers(-1000, 1000, SHAPE).astype(np.int16)
    label = np.zeros(SHAPE, np.uint8)
    label[5:10, 5:10, 3:6] = 1
    p = {
        "image": _nifti(tmp_path / "ct.nii.gz", image),
        "label": _nifti(tmp_path / "ct_lesion.nii.gz", label),
        "healthy": _nifti(tmp_path / "healthy.nii.gz", image),
        "missing": str(tmp_path / "nowhere.nii.gz"),
        "label_shape": _nifti(tmp_path / "lbl_shape.nii.gz", label[:, :, :-1]),
        "label_affine": _nifti(tmp_path / "lbl_affine.nii.gz", label, np.diag([1.5, 1.5, 2.0, 1.0])),
        "image_2d": _nifti(tmp_path / "slice2d.nii.gz", image[:, :, 0]),
        "image_flat": _nifti(tmp_path / "flat.nii.gz", image[:, :, :1]),
    }
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"this is not a nifti file" * 10)
    p["corrupt"] = str(corrupt)
    # a gzip cut in the middle of the voxel data: the header is readable, the volume is not
    whole = gzip.compress(Path(p["image"]).read_bytes())
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(whole[: len(whole) // 2])
    p["truncated"] = str(truncated)
    return p


def test_good_cases_pass(cases):
    check_case({"image": cases["image"], "label": cases["label"]})
    check_case({"image": cases["healthy"]})  # no label: a lesion-free scan is valid data


@pytest.mark.parametrize(
    "item, names, match",
    [
        ({"image": "missing"}, ["missing"], "not found"),
        ({"image": "corrupt"}, ["corrupt"], "cannot read"),
        ({"image": "image", "label": "missing"}, ["missing"], "not found"),
        ({"image": "image", "label": "label_shape"}, ["label_shape", "image"], "does not match"),
        ({"image": "image", "label": "label_affine"}, ["label_affine", "image"], "does not match"),
        ({"image": "image_2d"}, ["image_2d"], "not a 3D volume"),
        ({"image": "image_flat"}, ["image_flat"], "not a 3D volume"),
    ],
)
def test_check_case_names_the_file(cases, item, names, match):
    entry = {k: cases[v] for k, v in item.items()}
    with pytest.raises(DataError, match=match) as err:
        check_case(entry)
    assert isinstance(err.value, ValueError)
    for name in names:
        assert cases[name] in str(err.value)


def test_entry_without_image():
    with pytest.raises(DataError, match="without an 'image'"):
        check_case({"label": "x.nii.gz"})


def _datalist(tmp_path: Path, cases: dict, keys: list[str]) -> str:
    entries = []
    for k in keys:
        if k == "image":
            entries.append({"image": cases["image"], "label": cases["label"]})
        elif k.startswith("label_"):
            entries.append({"image": cases["image"], "label": cases[k]})
        else:
            entries.append({"image": cases[k]})
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": entries, "validation": entries[:1]}))
    return str(path)


def test_load_datalist_raise_and_skip(tmp_path, cases):
    bad = ["missing", "corrupt", "label_shape", "label_affine", "image_2d"]
    path = _datalist(tmp_path, cases, ["image", *bad, "healthy"])
    with pytest.raises(DataError) as err:
        load_datalist(path, "training")
    assert cases["missing"] in str(err.value)  # stops at the first bad case, naming it

    with pytest.warns(UserWarning) as record:
        good = load_datalist(path, "training", on_error="skip")
    assert [g["image"] for g in good] == [cases["image"], cases["healthy"]]
    assert good[0]["label"] == cases["label"] and "label" not in good[1]
    messages = [str(w.message) for w in record if "skipping case" in str(w.message)]
    assert len(messages) == len(bad)
    for name, msg in zip(["missing", "corrupt", "label_shape", "label_affine", "image_2d"], messages):
        assert cases[name] in msg

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean split warns about nothing
        assert len(load_datalist(path, "validation")) == 1


def test_load_datalist_refuses_empty_or_bad_arguments(tmp_path, cases):
    path = _datalist(tmp_path, cases, ["missing", "corrupt"])
    with pytest.warns(UserWarning), pytest.raises(DataError, match="no usable case"):
        load_datalist(path, "training", on_error="skip")
    with pytest.raises(ValueError, match="on_error"):
        load_datalist(path, on_error="ignore")
    with pytest.raises(DataError, match="datalist not found"):
        load_datalist(str(tmp_path / "none.json"))


def test_relative_paths_resolve_against_the_datalist(tmp_path, cases):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "list.json"
    path.write_text(json.dumps({"training": [{"image": "../ct.nii.gz", "label": "../ct_lesion.nii.gz"}]}))
    (item,) = load_datalist(str(path))
    assert Path(item["image"]).resolve() == Path(cases["image"]).resolve()


# --- transforms -------------------------------------------------------------------------------------------


def _load(keys=("image", "label")):
    return LoadCTd(keys=list(keys), ensure_channel_first=True, allow_missing_keys=True)


def test_loadctd_names_truncated_missing_and_2d_files(cases):
    # header-level checks cannot see a truncated volume; loading must still fail with the file named
    with pytest.raises(ValueError, match="cannot read image file") as err:
        _load()({"image": cases["truncated"]})
    assert cases["truncated"] in str(err.value)
    with pytest.raises(ValueError, match="cannot read label file") as err:
        _load()({"image": cases["image"], "label": cases["missing"]})
    assert cases["missing"] in str(err.value)
    with pytest.raises(ValueError, match="not a 3D volume") as err:
        _load()({"image": cases["image_2d"]})
    assert cases["image_2d"] in str(err.value)


def test_loadctd_reads_good_volume(cases):
    d = _load()({"image": cases["image"], "label": cases["label"]})
    assert d["image"].shape == (1, *SHAPE) and d["label"].shape == (1, *SHAPE)
    np.testing.assert_allclose(np.asarray(d["image"].affine), AFFINE)
    np.testing.assert_array_equal(np.asarray(d["image"][0]), nib.load(cases["image"]).get_fdata())


def test_ensure_label_gives_zeros_for_lesion_free_case(cases):
    d = EnsureLabeld("label")(_load()({"image": cases["healthy"]}))
    assert d["label"].shape == d["image"].shape and d["label"].dtype == torch.uint8
    assert int(d["label"].sum()) == 0
    np.testing.assert_allclose(np.asarray(d["label"].affine), np.asarray(d["image"].affine))
    d2 = EnsureLabeld("label")({"image": d["image"], "label": None})
    assert int(d2["label"].sum()) == 0
    # an existing label is left alone
    d3 = EnsureLabeld("label")(_load()({"image": cases["image"], "label": cases["label"]}))
    assert int(d3["label"].sum()) == 5 * 5 * 3


def test_check_geometry(cases):
    good = _load()({"image": cases["image"], "label": cases["label"]})
    assert CheckGeometryd("label")(good)["label"] is good["label"]
    for bad in ("label_shape", "label_affine"):
        d = _load()({"image": cases["image"], "label": cases[bad]})
        with pytest.raises(ValueError, match="does not match image") as err:
            CheckGeometryd("label")(d)
        assert cases[bad] in str(err.value) and cases["image"] in str(err.value)
    CheckGeometryd("label")(_load()({"image": cases["healthy"]}))  # no label: nothing to check


def test_hu_windows_values():
    hu = MetaTensor(torch.tensor([-1000.0, -160.0, 40.0, 240.0, 1000.0, 3000.0]).view(1, 6, 1, 1))
    out = HUWindowsd("image", windows=[(-160, 240), (-1000, 1000)])({"image": hu})["image"]
    assert out.shape == (2, 6, 1, 1) and out.dtype == torch.float32
    np.testing.assert_allclose(out[0].flatten().numpy(), [0, 0, 0.5, 1, 1, 1], atol=1e-6)
    np.testing.assert_allclose(out[1].flatten().numpy(), [0, 0.42, 0.52, 0.62, 1, 1], atol=1e-6)
    with pytest.raises(ValueError, match="one-channel"):
        HUWindowsd("image")({"image": torch.zeros(2, 4, 4, 4)})
    with pytest.raises(ValueError, match="windows"):
        HUWindowsd("image", windows=[(100, -100)])


def _chain(e: BaseException | None) -> str:
    parts = []
    while e is not None:
        parts.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    return "\n".join(parts)


def test_bundle_training_transforms_on_bad_cases(cases):
    """The train.json preprocessing (as configured) refuses misaligned labels and unreadable volumes by name,
    and turns a lesion-free case into an all-background label."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "train.json"))
    parser["bundle_root"] = str(BUNDLE_ROOT)
    pre = parser.get_parsed_content("validate#preprocessing")
    # MONAI's Compose wraps a transform's error in a RuntimeError "applying transform ..." raised from it: the
    # traceback a user sees shows the whole chain, so the file must be named somewhere in it.
    with pytest.raises(Exception) as err:
        pre({"image": cases["image"], "label": cases["label_affine"]})
    assert cases["label_affine"] in _chain(err.value) and "does not match image" in _chain(err.value)
    with pytest.raises(Exception) as err:
        pre({"image": cases["truncated"]})
    assert cases["truncated"] in _chain(err.value)
    out = pre({"image": cases["healthy"]})
    assert out["label"].shape[1:] == out["image"].shape[1:] and int(out["label"].sum()) == 0
    assert out["image"].shape[0] == len(parser.get_parsed_content("hu_windows"))


def _window_crops(label: torch.Tensor, seed: int, **kwargs) -> list[dict]:
    image = torch.arange(label.numel(), dtype=torch.float32).view(label.shape) + 1  # every voxel distinct, none 0
    data = FgBgToIndicesd("label")({"image": image, "label": label})
    crop = RandWindowCropd(["image", "label"], roi_size=(8, 8, 4), context=(4, 4, 4), num_samples=32, **kwargs)
    crop.set_random_state(seed)
    return crop(data)


def test_rand_window_crop_puts_the_lesion_in_the_window_even_at_the_volume_edge():
    """Positive windows hold a lesion voxel wherever the lesion lies: here one voxel at the last slice of a volume
    barely deeper than a crop (MONAI's RandCropByPosNegLabeld shifts such a crop inward, out of its window)."""
    label = torch.zeros(1, 20, 20, 12)
    label[0, 2, 17, 11] = 1
    for sample in _window_crops(label, seed=0, pos=1, neg=0):
        assert sample["image"].shape == sample["label"].shape == (1, 16, 16, 12)
        assert int(sample["label"][:, 4:12, 4:12, 4:8].sum()) == 1  # the lesion voxel, in the centre window
        assert "label_fg_indices" not in sample and "label_bg_indices" not in sample


def test_rand_window_crop_places_windows_like_the_inference_grid_and_zero_pads_the_context():
    """The window lies inside the volume (as sliding-window windows do); the context beyond it is zero; the
    crop's voxels are the volume's own; a lesion-free scan gives background windows; pos:neg sets the ratio."""
    label = torch.zeros(1, 20, 20, 12)
    label[0, 10:12, 10:12, 5:7] = 1
    image = torch.arange(label.numel(), dtype=torch.float32).view(label.shape) + 1
    samples = _window_crops(label, seed=1, pos=1, neg=1)
    positives = 0
    for sample in samples:
        window, crop = sample["image"][:, 4:12, 4:12, 4:8], sample["image"]
        assert bool((window > 0).all())  # no padding inside the window: it lies inside the volume
        first = int(window[0, 0, 0, 0]) - 1
        x, y, z = np.unravel_index(first, (20, 20, 12))
        np.testing.assert_array_equal(window.numpy(), image[:, x : x + 8, y : y + 8, z : z + 4].numpy())
        # the crop is the window's neighbourhood with zeros exactly where it leaves the volume
        expected = torch.nn.functional.pad(image, (4, 4, 4, 4, 4, 4))[:, x : x + 16, y : y + 16, z : z + 12]
        np.testing.assert_array_equal(crop.numpy(), expected.numpy())
        positives += int(sample["label"][:, 4:12, 4:12, 4:8].sum() > 0)
    assert 8 <= positives <= 24  # about half of 32, and certainly not all or none
    healthy = _window_crops(torch.zeros(1, 20, 20, 12), seed=2)
    assert len(healthy) == 32 and all(int(s["label"].sum()) == 0 for s in healthy)
    with pytest.raises(ValueError, match="num_samples"):
        RandWindowCropd(["image"], roi_size=(8, 8, 4), context=(0, 0, 0), num_samples=4, pos=0, neg=0)


def test_lesion_balanced_weights_give_each_lesion_the_same_share():
    """Hand-computed: a 1-voxel and a 7-voxel lesion (diagonal neighbours are one lesion) get 1/2 each, so the
    lone voxel weighs 1/2 and each of the 7 weighs 1/14; no lesion, no weights."""
    label = torch.zeros(1, 10, 10, 6)
    label[0, 1, 1, 1] = 1
    label[0, 5:7, 5:7, 2] = 1
    label[0, 5:7, 6, 3] = 1
    label[0, 7, 7, 4] = 1  # touches (6, 6, 3) only by a corner
    fg = np.flatnonzero(label[0].numpy())
    weights = lesion_balanced_weights(label, fg)
    lone = fg == np.ravel_multi_index((1, 1, 1), (10, 10, 6))
    np.testing.assert_allclose(weights[lone], [0.5])
    np.testing.assert_allclose(weights[~lone], np.full(7, 1 / 14))
    assert lesion_balanced_weights(label, fg[:0]) is None


def test_rand_window_crop_balances_windows_between_a_large_and_a_small_lesion():
    """A 512-voxel and a 1-voxel lesion, far apart: per voxel the small one gets about 1 window in 500; balanced,
    about half of them."""
    label = torch.zeros(1, 40, 40, 20)
    label[0, 2:10, 2:10, 2:10] = 1
    label[0, 35, 35, 15] = 2  # a lesion as any other, marked to be told apart in the windows

    def small_share(**kwargs) -> float:
        samples = [s for seed in range(4) for s in _window_crops(label, seed=seed, pos=1, neg=0, **kwargs)]
        return np.mean([bool((s["label"][0, 4:12, 4:12, 4:8] == 2).any()) for s in samples])

    assert small_share() < 0.05
    assert 0.3 < small_share(balance_lesions=True) < 0.7
