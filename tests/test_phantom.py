"""Tests of the synthetic CT phantom generator (`scripts.phantom`)."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from scripts.phantom import LESION_TYPES, TISSUES, make_phantom, write_phantom_dataset

BUNDLE_ROOT = Path(__file__).resolve().parents[1] / "bundle"
SMALL = {"shape": (80, 80, 36), "spacing": (3.2, 3.2, 6.0)}  # the default field of view at half resolution
TINY = {"shape": (32, 32, 16), "spacing": (8.0, 8.0, 13.5)}


@pytest.fixture(scope="module")
def default_phantoms():
    """Default-size abdomen and chest phantoms."""
    return {region: make_phantom(3, region=region) for region in ("abdomen", "chest")}


def _tissue_mean(phantom, name):
    return phantom.image[(phantom.tissue == TISSUES[name]) & (phantom.label == 0)].mean()


def test_arrays_and_metadata(default_phantoms):
    for phantom in default_phantoms.values():
        assert phantom.image.shape == phantom.label.shape == phantom.tissue.shape == (160, 160, 72)
        assert phantom.image.dtype == np.int16 and phantom.label.dtype == np.uint8
        np.testing.assert_array_equal(phantom.affine, np.diag([1.6, 1.6, 3.0, 1.0]))
        assert phantom.affine.dtype == np.float64
        assert set(np.unique(phantom.label)) == {0, 1}
        assert 1 <= len(phantom.lesions) <= 4
        for lesion in phantom.lesions:
            assert set(lesion) == {"type", "centre_mm", "radius_mm", "volume_ml"}
            assert lesion["type"] in LESION_TYPES
            assert 1.0 <= lesion["radius_mm"] <= 15.0
            voxel = tuple(int(round(c / s)) for c, s in zip(lesion["centre_mm"], (1.6, 1.6, 3.0)))
            assert phantom.label[voxel] == 1, "centre_mm must lie inside the lesion"


def test_determinism():
    a, b = make_phantom(7, **SMALL), make_phantom(7, **SMALL)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    assert a.lesions == b.lesions
    c = make_phantom(8, **SMALL)
    assert not np.array_equal(a.image, c.image) and not np.array_equal(a.label, c.label)


def test_healthy_twin():
    """lesions=False gives the same patient: identical image away from the (blurred) lesions, empty label."""
    sick, healthy = make_phantom(11, **SMALL), make_phantom(11, lesions=False, **SMALL)
    assert healthy.lesions == [] and not healthy.label.any() and sick.label.any()
    away = ~ndimage.binary_dilation(sick.label, structure=np.ones((3, 3, 3)), iterations=3)  # > blur support
    np.testing.assert_array_equal(sick.image[away], healthy.image[away])
    assert not np.array_equal(sick.image, healthy.image)


def test_tissue_hu(default_phantoms):
    abdomen, chest = default_phantoms["abdomen"], default_phantoms["chest"]
    for phantom in (abdomen, chest):
        assert phantom.image[0, 0, :].mean() < -950  # air at the corners
        assert -130 < _tissue_mean(phantom, "fat") < -60
        assert 0 < _tissue_mean(phantom, "soft_tissue") < 80
        assert _tissue_mean(phantom, "lung") < -700
        assert (phantom.image[phantom.tissue == TISSUES["bone"]] > 300).sum() > 100
        assert 5 < phantom.image[:8, :8].std() < 25  # quantum noise in the air
        liver_core = ndimage.binary_erosion(phantom.tissue == TISSUES["liver"], iterations=3)
        assert 8 < phantom.image[liver_core].std() < 40  # noise and texture, not piecewise constant
    assert 70 < _tissue_mean(abdomen, "liver") < 130
    assert _tissue_mean(abdomen, "kidney") > _tissue_mean(abdomen, "liver")
    assert _tissue_mean(abdomen, "vessel") > 100  # aorta and IVC with contrast
    assert _tissue_mean(chest, "heart") > 80


def test_regions(default_phantoms):
    abdomen, chest = (default_phantoms[r].tissue for r in ("abdomen", "chest"))
    fraction = {name: (np.mean(abdomen == c), np.mean(chest == c)) for name, c in TISSUES.items()}
    assert fraction["lung"][1] > 5 * fraction["lung"][0] > 0
    assert fraction["liver"][0] > 2 * fraction["liver"][1]
    assert fraction["kidney"][0] > 0 and fraction["kidney"][1] == 0
    assert fraction["heart"][0] == 0 and fraction["heart"][1] > 0
    assert {lesion["type"] for lesion in make_phantom(1, region="chest", **SMALL).lesions} <= {
        "lung_nodule",
        "bone_lytic",
        "liver_tumour",
    }


@pytest.mark.parametrize("region", ["abdomen", "chest"])
def test_lesions_contrast_and_volume(region):
    """Each lesion lies in its host organ, with the expected contrast, and its volume matches the label.

    Contrast is checked against the same voxels of the lesion-free twin, and (sign only, for lesions big
    enough not to be dominated by blur and noise) against the mean of the rest of the host organ.
    """
    seen = set()
    for seed in range(6):
        phantom = make_phantom(seed, region=region, **SMALL)
        twin = make_phantom(seed, region=region, lesions=False, **SMALL)
        voxel_ml = np.prod(SMALL["spacing"]) / 1000
        volumes = [lesion["volume_ml"] for lesion in phantom.lesions]
        assert min(volumes) >= voxel_ml - 1e-4
        assert abs(sum(volumes) - phantom.label.sum() * voxel_ml) <= voxel_ml / 2
        components, n = ndimage.label(phantom.label)
        for i in range(1, n + 1):
            lesion = components == i
            host = np.bincount(phantom.tissue[lesion]).argmax()
            name = next(k for k, v in TISSUES.items() if v == host)
            assert name in {host_name for host_name, _ in LESION_TYPES.values()}
            seen.add(name)
            sign = 1 if name == "lung" else -1  # solid nodules in air-filled lung; other lesions hypodense
            assert sign * (phantom.image[lesion].mean() - twin.image[lesion].mean()) > 15, (seed, name)
            if lesion.sum() >= 20:
                assert sign * (phantom.image[lesion].mean() - _tissue_mean(phantom, name)) > 0, (seed, name)
    assert len(seen) >= 2


def test_tiny_shape_and_anisotropic_fov():
    for region in ("abdomen", "chest"):
        phantom = make_phantom(0, shape=(16, 24, 16), spacing=(12.0, 9.0, 14.0), region=region)
        assert phantom.image.shape == (16, 24, 16) and phantom.label.any()


def test_write_dataset(tmp_path):
    path = write_phantom_dataset(tmp_path / "ds", num_cases=6, seed=1, **TINY)
    assert path == tmp_path / "ds" / "dataset.json"
    data = json.loads(path.read_text())
    assert data["labels"] == {"0": "background", "1": "lesion"}
    entries = data["training"] + data["validation"]
    assert len(entries) == 6 and data["numTraining"] == len(data["training"])
    for split in ("training", "validation"):
        assert any("label" in e for e in data[split]), f"{split} needs a lesion case"
        assert any("label" not in e for e in data[split]), f"{split} needs a lesion-free case"
    for i, entry in enumerate(entries):
        assert entry["image"] == f"imagesTr/phantom_{i:03d}.nii.gz"
        image = nib.load(path.parent / entry["image"])
        assert image.get_data_dtype() == np.int16 and image.shape == TINY["shape"]
        np.testing.assert_allclose(image.affine, np.diag([*TINY["spacing"], 1.0]))
        np.testing.assert_allclose(image.header.get_zooms(), TINY["spacing"])
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
        label_file = path.parent / f"labelsTr/phantom_{i:03d}.nii.gz"
        if "label" in entry:
            label = nib.load(label_file)
            assert label.get_data_dtype() == np.uint8 and np.asarray(label.dataobj).max() == 1
            np.testing.assert_allclose(label.affine, image.affine)
        else:
            assert set(entry) == {"image"} and not label_file.exists()


@pytest.mark.parametrize("num_cases,healthy_fraction,n_healthy", [(2, 0.25, 0), (4, 0.25, 2), (5, 0.0, 0), (8, 0.5, 4)])
def test_dataset_splits(tmp_path, num_cases, healthy_fraction, n_healthy):
    path = write_phantom_dataset(tmp_path, num_cases=num_cases, healthy_fraction=healthy_fraction, **TINY)
    data = json.loads(path.read_text())
    assert len(data["training"]) + len(data["validation"]) == num_cases
    assert all(any("label" in e for e in data[split]) for split in ("training", "validation"))
    assert sum("label" not in e for e in data["training"] + data["validation"]) == n_healthy


def test_cli(tmp_path):
    cmd = [sys.executable, "-m", "scripts.phantom", "write", "--out_dir", str(tmp_path), "--num_cases", "2"]
    cmd += ["--shape", "[16,16,16]", "--spacing", "[16,16,13.5]"]
    subprocess.run(cmd, cwd=BUNDLE_ROOT, check=True, capture_output=True, timeout=60)
    assert len(json.loads((tmp_path / "dataset.json").read_text())["training"]) == 1


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"shape": (64, 64)}, "shape must be 3 integers"),
        ({"shape": (64, 64, 8)}, "each >= 16"),
        ({"shape": (64.0, 64, 32)}, "shape must be 3 integers"),
        ({"spacing": (1.0, 0.0, 1.0)}, "spacing must be 3 positive"),
        ({"spacing": (1.0, float("nan"), 1.0)}, "spacing must be 3 positive"),
        ({"spacing": "thin"}, "spacing must be 3 positive"),
        ({"region": "head"}, "region must be one of"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"seed": 1.5}, "seed must be an integer >= 0"),
    ],
)
def test_make_phantom_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_phantom(**{"seed": 0, **kwargs})


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"num_cases": 1}, "num_cases must be an integer >= 2"),
        ({"healthy_fraction": 1.0}, r"healthy_fraction must be in \[0, 1\)"),
        ({"val_fraction": 0.0}, r"val_fraction must be in \(0, 1\)"),
        ({"shape": (8, 8, 8)}, "each >= 16"),
    ],
)
def test_write_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        write_phantom_dataset(tmp_path, **kwargs)
    assert not (tmp_path / "dataset.json").exists()
