"""Unit checks of the MONAI Label app's validation, request parameters, archives, log masking, active-learning score
and training set-up (no server)."""

from __future__ import annotations

import io
import logging
import shutil
import sys
import tarfile
import uuid
import zipfile

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser

from dicom_utils import axial_affine, write_series
from monailabel_utils import APP_DIR, BUNDLE_DIR, save_nifti

sys.path.insert(0, str(APP_DIR))
from lib.dicom_seg import BundleSegWriter  # noqa: E402
from lib.errors import InvalidRequest, InvalidUpload  # noqa: E402
from lib.logs import keep_out_of_logs  # noqa: E402
from lib.params import Choice, Flag, Number, Text, check_params  # noqa: E402
from lib.scoring.glance_uncertainty import glance_uncertainty  # noqa: E402
from lib.sessions import extract_archive  # noqa: E402
from lib.trainers.gf_screen import GFScreenTrain  # noqa: E402
from lib.validation import (  # noqa: E402
    ImageLimits,
    check_image,
    check_label,
    check_name,
    check_session_id,
    image_id,
    resampled_shape,
)


@pytest.mark.parametrize("name", ["case0", "1.2.840.113619.2.55", "CT_abdomen-01"])
def test_plain_names_pass(name):
    assert check_name(name, "image") == name


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "/etc/passwd", "a\\b", ".hidden", " x", "x\0"])
def test_names_that_could_leave_the_folder_fail(name):
    with pytest.raises(InvalidRequest):
        check_name(name, "image")


def test_glance_uncertainty_is_highest_at_the_threshold():
    assert glance_uncertainty([0.5], 0.5) == pytest.approx(1.0)
    assert glance_uncertainty([0.0, 1.0], 0.5) == pytest.approx(0.0)
    # the 10 % most uncertain windows decide: one ambiguous window among 9 confident ones
    assert glance_uncertainty([0.5] + [0.0] * 9, 0.5) == pytest.approx(1.0)
    assert glance_uncertainty([0.3, 0.9], 0.3, top_fraction=1.0) == pytest.approx((1.0 + (1 - 0.6 / 0.7)) / 2)
    with pytest.raises(ValueError):
        glance_uncertainty([], 0.5)


def test_image_and_label_checks(tmp_path):
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    image = save_nifti(np.zeros((8, 9, 10), np.int16), affine, tmp_path / "image.nii.gz")
    assert check_image(image).shape == (8, 9, 10)
    check_label(save_nifti(np.ones((8, 9, 10), np.uint8), affine, tmp_path / "ok.nii.gz"), image)
    with pytest.raises(InvalidUpload, match="spacing"):
        check_label(save_nifti(np.ones((8, 9, 10), np.uint8), np.eye(4), tmp_path / "sp.nii.gz"), image)
    with pytest.raises(InvalidUpload, match="3D"):
        check_image(save_nifti(np.zeros((8, 9), np.int16), np.eye(4), tmp_path / "2d.nii.gz"))
    noise = np.random.default_rng(0).integers(-1000, 1000, (8, 9, 10), dtype=np.int16)
    full = save_nifti(noise, affine, tmp_path / "noise.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(full[: len(full) // 2])  # header intact, voxel data truncated
    with pytest.raises(InvalidUpload):
        check_image(tmp_path / "cut.nii.gz")


def test_training_loads_gpu_saved_weights_on_a_cpu_only_server(tmp_path, monkeypatch):
    """Weights saved on a GPU (storages tagged 'cuda:0') are fine-tuned on a CPU-only server: the train task's
    CheckpointLoader maps them to the training device (MONAI Label's own loader has no map_location)."""
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE_DIR, bundle, ignore=shutil.ignore_patterns("__pycache__", "eval", "runs", "models"))
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    parser["bundle_root"] = str(bundle)
    state = parser.get_parsed_content("network_def").state_dict()
    weights = bundle / "models" / "model.pt"
    weights.parent.mkdir()
    with monkeypatch.context() as m:  # what torch.save writes for tensors on a GPU
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(state, weights)
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(weights, weights_only=True)

    task = GFScreenTrain(str(bundle), {})
    handlers: list[dict] = []
    task._load_checkpoint(str(weights), True, handlers)
    assert [h["_target_"] for h in handlers] == ["CheckpointLoader"]
    parser["device"] = "$torch.device('cpu')"
    parser["loader"] = handlers[0]
    network = parser.get_parsed_content("network_def")
    for p in network.parameters():
        torch.nn.init.zeros_(p)
    engine = Engine(lambda e, b: None)
    parser.get_parsed_content("loader").attach(engine)
    engine.run([0], max_epochs=1)
    for key, value in network.state_dict().items():
        torch.testing.assert_close(value, state[key])


@pytest.mark.parametrize("name", ["a" * 129, "tab\there", "bell\x07"])
def test_overlong_names_and_control_characters_fail(name):
    with pytest.raises(InvalidRequest):
        check_name(name, "image")


def test_resampled_shape_is_the_world_extent_over_the_target_spacing():
    # 32 x 32 x 16 voxels of 30 x 30 x 60 mm cover 960 mm each way: 640 x 640 x 320 voxels of 1.5 x 1.5 x 3 mm
    assert resampled_shape((32, 32, 16), (30, 30, 60), np.eye(3).ravel(), (1.5, 1.5, 3.0)) == (640, 640, 320)
    # axes 0 and 1 swapped in the world: world x spans 20 voxels x 2 mm = 40 mm, world y 10 x 1 mm = 10 mm
    swapped = [[0, 1, 0], [1, 0, 0], [0, 0, 1]]
    assert resampled_shape((10, 20, 5), (1, 2, 3), np.ravel(swapped), (1, 1, 1)) == (40, 10, 15)
    assert resampled_shape((3, 3, 3), (1, 1, 1), np.eye(3).ravel(), (2, 2, 2)) == (2, 2, 2)  # 1.5 rounds up


def test_image_limits_are_checked_from_the_header(tmp_path):
    coarse = save_nifti(np.zeros((32, 32, 16), np.int16), np.diag([30.0, 30.0, 60.0, 1.0]), tmp_path / "c.nii.gz")
    check_image(
        coarse, read_voxels=False, limits=ImageLimits(pixdim=(1.5, 1.5, 3.0), max_resampled_voxels=640**2 * 320)
    )
    with pytest.raises(InvalidUpload, match=r"\(640, 640, 320\)"):
        check_image(coarse, limits=ImageLimits(pixdim=(1.5, 1.5, 3.0), max_resampled_voxels=640**2 * 320 - 1))
    with pytest.raises(InvalidUpload, match="exceeds the limit"):
        check_image(coarse, limits=ImageLimits(max_voxels=32 * 32 * 16 - 1))


def test_declared_params():
    declared = {
        "n": Number(1, 10, integer=True),
        "f": Number(0.0, 0.9),
        "on": Flag(),
        "dev": Choice(("cpu",), many=True),
        "id": Text(nullable=True),
    }
    ok = {"n": 3, "f": 0.5, "on": False, "dev": ["cpu"], "id": None}
    assert check_params(ok, declared, "task") == ok
    assert check_params(None, declared, "task") == {}
    for bad in (
        {"other": 1},
        {"n": "3"},
        {"n": True},
        {"n": 3.0},
        {"n": 11},
        {"n": None},
        {"f": 2.0},
        {"f": float("nan")},
        {"on": "true"},
        {"dev": "gpu"},
        {"dev": ["cpu", "gpu"]},
        {"id": "a\0b"},
        {"id": "x" * 200},
    ):
        with pytest.raises(InvalidRequest):
            check_params(bad, declared, "task")
    with pytest.raises(InvalidRequest, match="JSON object"):
        check_params([1], declared, "task")


def test_image_ids_keep_the_whole_file_name():
    assert image_id("1.2.840.1001.nii.gz") == "1.2.840.1001"
    assert image_id("/some/where/CT.NRRD") == "CT"
    with pytest.raises(InvalidUpload):
        image_id("notes.txt")


def test_session_ids_are_uuids():
    session = str(uuid.uuid1())
    assert check_session_id(session) == session
    for bad in ("..", "../x", "/tmp", "", "0" * 32 + "/"):
        with pytest.raises(InvalidRequest):
            check_session_id(bad)


def _tar(path, files=None, links=None):
    with tarfile.open(path, "w") as tar:
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
        for name, data in (files or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_archives_unpack_inside_their_folder_or_not_at_all(tmp_path):
    good = _tar(tmp_path / "good.tar", {"series/a.dcm": b"a", "series/b.dcm": b"bb"})
    extract_archive(good, tmp_path / "out", max_bytes=10)
    assert (tmp_path / "out" / "series" / "b.dcm").read_bytes() == b"bb"
    with zipfile.ZipFile(tmp_path / "good.zip", "w") as z:
        z.writestr("x/a.dcm", b"a")
    extract_archive(tmp_path / "good.zip", tmp_path / "zout", max_bytes=10)
    assert (tmp_path / "zout" / "x" / "a.dcm").read_bytes() == b"a"

    with zipfile.ZipFile(tmp_path / "up.zip", "w") as z:
        z.writestr("../up.txt", b"x")
    bad = [
        _tar(tmp_path / "up.tar", {"../up.txt": b"x"}),
        _tar(tmp_path / "abs.tar", {str(tmp_path / "abs.txt"): b"x"}),
        _tar(tmp_path / "link.tar", {"ln/through.txt": b"x"}, links={"ln": str(tmp_path)}),
        _tar(tmp_path / "big.tar", {"a": b"x" * 11}),
        tmp_path / "up.zip",
    ]
    for archive in bad:
        with pytest.raises(InvalidUpload):
            extract_archive(archive, tmp_path / "bad", max_bytes=10)
    assert not (tmp_path / "up.txt").exists() and not (tmp_path / "abs.txt").exists()
    assert not (tmp_path / "through.txt").exists()


def test_secrets_are_masked_in_log_records_and_files(tmp_path):
    (tmp_path / "app.log").write_text("USING:: conf = [['api_key', 's3cret']]\n")
    handler = logging.StreamHandler(io.StringIO())
    logger = logging.getLogger("gf_screen_redact_test")
    logger.addHandler(handler)
    try:
        keep_out_of_logs(["s3cret"], tmp_path)
        logger.warning("conf: %s", {"api_key": "s3cret"})
    finally:
        logger.removeHandler(handler)
    assert handler.stream.getvalue() == "conf: {'api_key': '***'}\n"
    assert (tmp_path / "app.log").read_text() == "USING:: conf = [['api_key', '***']]\n"


def _series_and_label(folder, mask: np.ndarray, **attributes):
    """A CT series of ``mask``'s shape and a label volume on its grid, as the DICOMweb cache converts it (SimpleITK
    reads the series, the label is written as NIfTI with its geometry)."""
    files = write_series(folder / "series", np.full(mask.shape, -100, np.int16), axial_affine((0.8, 0.7, 2.5)),
                         **attributes)  # fmt: skip
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder / "series")))
    image = reader.Execute()
    label = sitk.GetImageFromArray(mask.transpose(2, 1, 0).astype(np.uint8))
    label.CopyInformation(image)
    sitk.WriteImage(label, str(folder / "label.nii.gz"))
    return files, folder / "label.nii.gz"


def test_dicom_seg_of_a_label_is_the_bundles_lesion_on_the_series(tmp_path):
    """The DICOM-SEG names its one segment after the bundle's label 1 ("lesion") whatever the client sent, lies in
    the series' study and frame of reference (pydicom-seg alone gives it a new frame of reference) and references
    the series and each slice; an empty label gives no file."""
    mask = np.zeros((12, 10, 6), bool)
    mask[3:7, 2:5, 1:4] = True
    files, label = _series_and_label(tmp_path, mask)
    writer = BundleSegWriter(str(BUNDLE_DIR))
    seg = pydicom.dcmread(writer(tmp_path / "series", label, tmp_path / "seg.dcm"))
    ct = pydicom.dcmread(files[0])
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["lesion"] == [writer.segment_label]
    assert (seg.StudyInstanceUID, seg.FrameOfReferenceUID) == (ct.StudyInstanceUID, ct.FrameOfReferenceUID)
    [referenced] = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == ct.SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} == {
        pydicom.dcmread(f).SOPInstanceUID for f in files
    }
    _, empty = _series_and_label(tmp_path / "empty", np.zeros_like(mask))
    assert writer(tmp_path / "series", empty, tmp_path / "e.dcm") is None
    assert not (tmp_path / "e.dcm").exists()


def test_dicom_seg_of_a_series_without_uids_is_refused_with_the_reason(tmp_path):
    """Slices without Study, Series and SOP Instance UIDs cannot be referenced: a 422 naming the missing UIDs and
    the series folder's name (the series id), not the server's cache path."""
    mask = np.zeros((12, 10, 6), bool)
    mask[3:7, 2:5, 1:4] = True
    _, label = _series_and_label(tmp_path, mask, StudyInstanceUID=None, SeriesInstanceUID=None, SOPInstanceUID=None)
    with pytest.raises(InvalidUpload, match="StudyInstanceUID, SeriesInstanceUID") as error:
        BundleSegWriter(str(BUNDLE_DIR))(tmp_path / "series", label, tmp_path / "seg.dcm")
    assert str(tmp_path) not in str(error.value) and "series" in str(error.value)
    assert not (tmp_path / "seg.dcm").exists()
