"""GlanceNet / GlanceFocusNet: shapes, MONAI's bundle in/out check against metadata.json, TorchScript export."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, verify_net_in_out
from monai.networks.nets import UNet

from scripts.networks import KEEP, GlanceFocusNet, GlanceNet, load_pretrained, unwrap, window_logits

BUNDLE_ROOT = Path(__file__).resolve().parents[1] / "bundle"
CONFIGS = BUNDLE_ROOT / "configs"
META = str(CONFIGS / "metadata.json")


def _parser(*configs: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / c) for c in configs])
    parser.read_meta(META)
    parser["bundle_root"] = str(BUNDLE_ROOT)
    return parser


def _small_glance(in_channels: int = 1) -> GlanceNet:
    return GlanceNet(in_channels=in_channels, downsample=2, channels=(4, 8, 8), strides=(2, 2, 1))


@pytest.mark.parametrize(
    "kwargs, window",
    [
        ({}, (32, 32, 16)),  # the class defaults on the default window
        ({"downsample": 1, "channels": (4, 8), "strides": (2, 2)}, (16, 16, 8)),
        (
            {"in_channels": 2, "downsample": 2, "channels": (8, 16, 16), "strides": (2, 2, 1)},
            (96, 96, 64),
        ),  # paper window
    ],
)
def test_glance_net_gives_two_logits_per_window(kwargs, window):
    torch.manual_seed(0)
    net = GlanceNet(**kwargs).eval()
    x = torch.rand(3, kwargs.get("in_channels", 1), *window)
    with torch.no_grad():
        out = net(x)
    assert out.shape == (3, 2) and out.dtype == torch.float32 and torch.isfinite(out).all()
    # windows are scored independently (no batch coupling in eval mode)
    with torch.no_grad():
        single = net(x[1:2])
    torch.testing.assert_close(single, out[1:2], rtol=1e-4, atol=1e-5)
    assert KEEP == 1


def test_glance_logit_map_is_coarse_and_gives_the_window_logits():
    """forward(window) is the mean of the coarse logit map; a window's logits can be read off a volume's map."""
    torch.manual_seed(0)
    net = GlanceNet(in_channels=2, downsample=2, channels=(4, 8, 8), strides=(2, 2, 1)).eval()
    assert net.scale == 2 * 2 * 2 * 1
    x = torch.rand(2, 2, 64, 48, 32)
    with torch.no_grad():
        fmap = net.logit_map(x)
        assert fmap.shape == (2, 2, 8, 6, 4)  # one location per `scale` voxels: cost shrinks by ~scale**3
        torch.testing.assert_close(net(x), fmap.mean((2, 3, 4)))
        # a window on the map's grid reads the mean over the locations it covers
        w = window_logits(fmap[1], [[16, 8, 0]], [32, 16, 16], net.scale)
        torch.testing.assert_close(w[0], fmap[1][:, 2:6, 1:3, 0:2].mean((1, 2, 3)))
        # a window larger than the volume (padded by the inferer) reads the whole map
        torch.testing.assert_close(
            window_logits(fmap[0], [[-8, -8, -8]], [80, 64, 48], net.scale)[0], fmap[0].mean((1, 2, 3))
        )


@pytest.mark.parametrize("window_pool", ["mean", "max"])
def test_window_logits_of_many_windows_equal_pooling_each_window_cells(window_pool):
    """The vectorised reader gives, for windows on and off the cell grid and clipped at the volume's end,
    exactly what pooling each window's own cells gives."""
    from scripts.networks import pool_logits

    torch.manual_seed(0)
    fmap = torch.randn(2, 7, 5, 4)
    size, scale = [16, 16, 8], 4
    starts = [[0, 0, 0], [8, 4, 8], [12, 6, 2], [14, 10, 8], [-4, 0, 0], [20, 12, 12]]
    got = window_logits(fmap, starts, size, scale, window_pool)
    for (x, y, z), row in zip(starts, got):
        cells = fmap[
            :, max(x // 4, 0) : -(-(x + 16) // 4), max(y // 4, 0) : -(-(y + 16) // 4), z // 4 : -(-(z + 8) // 4)
        ]
        torch.testing.assert_close(row, pool_logits(cells, window_pool))


@pytest.mark.parametrize(
    "design, receptive_field",
    [
        # 2x pooling, then units of strides 2, 2, 1 with one 3x3x3 conv each: 2 + 2*2 = 6, + 2*4 = 14, + 2*8 = 30
        ({"downsample": 2, "channels": (4, 8, 8), "strides": (2, 2, 1)}, 30),
        # full resolution, strides 2, 2, 2, 1: 1 + 2*1 = 3, + 2*2 = 7, + 2*4 = 15, + 2*8 = 31
        ({"downsample": 1, "channels": (2, 4, 8, 8), "strides": (2, 2, 2, 1)}, 31),
    ],
)
def test_glance_receptive_field_and_the_context_that_makes_crop_scores_equal_map_scores(design, receptive_field):
    """Receptive field by hand (two convs per unit in the pooled design: 70); both designs need 16 voxels of
    context (ceil((rf - 8) / 2 / 8) * 8). With it a crop's window logits equal the same window's logits read from
    the map of a larger volume."""
    assert GlanceNet(1, subunits=2).receptive_field == 70
    net = GlanceNet(1, subunits=1, context=(16, 16, 16), **design).eval()
    assert net.scale == 8 and net.receptive_field == receptive_field and net.required_context() == 16
    torch.manual_seed(0)
    volume = torch.rand(1, 1, 128, 128, 96)
    corner = (40, 32, 40)  # window of 32x32x16 voxels, on the cell grid
    crop = volume[(..., *(slice(c - 16, c + w + 16) for c, w in zip(corner, (32, 32, 16))))]
    with torch.no_grad():
        from_map = window_logits(net.logit_map(volume)[0], [corner], [32, 32, 16], net.scale)[0]
        torch.testing.assert_close(net(crop)[0], from_map, rtol=1e-4, atol=1e-5)


def test_glance_rejects_an_input_no_larger_than_its_context():
    net = GlanceNet(1, channels=(4, 8, 8), subunits=1, context=(16, 16, 16)).eval()
    with pytest.raises(ValueError, match="larger than twice its context"):
        net(torch.rand(1, 1, 32, 32, 32))  # 4 map cells per axis, 2 cut on each side: nothing left
    assert net(torch.rand(1, 1, 64, 64, 48)).shape == (1, 2)


def test_glance_focus_net_routes_forward():
    torch.manual_seed(0)
    glance = _small_glance(in_channels=2)
    focus = UNet(3, 2, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=0)
    net = GlanceFocusNet(glance, focus).eval()
    x = torch.rand(2, 2, 32, 32, 16)
    with torch.no_grad():
        seg, logits = net(x), net(x, glance=True)
        assert seg.shape == (2, 2, 32, 32, 16)
        assert logits.shape == (2, 2)
        torch.testing.assert_close(seg, focus(x))
        torch.testing.assert_close(logits, glance(x))
    # one state dict holds both models, under the prefixes the checkpoints use
    keys = set(net.state_dict())
    assert {k.split(".")[0] for k in keys} == {"glance", "focus"}
    wrapped = torch.nn.DataParallel(net)
    assert unwrap(wrapped) is net and unwrap(net) is net


@pytest.mark.parametrize("config", ["inference.json", "train.json"])
def test_metadata_matches_configs(config):
    """network_data_format (what MONAI tools and MONAI Label read) agrees with the config the network is built from."""
    parser = _parser(config)
    fmt = parser["_meta_"]["network_data_format"]
    image, pred = fmt["inputs"]["image"], fmt["outputs"]["pred"]
    assert image["num_channels"] == len(parser.get_parsed_content("hu_windows")) == len(image["channel_def"])
    assert image["spatial_shape"] == parser.get_parsed_content("roi_size") == pred["spatial_shape"]
    assert pred["channel_def"]["0"] == "background"  # background first, as model-zoo requires
    assert pred["num_channels"] == len(pred["channel_def"]) == 2
    net = parser.get_parsed_content("network_def")
    assert isinstance(net, GlanceFocusNet)


@pytest.mark.parametrize("config", ["inference.json", "train.json"])
def test_verify_net_in_out(config):
    """MONAI's model-zoo CI check (channels and dtype from metadata.json) on the Focus output, and the same check
    on the Glance head (2 logits: discard, keep)."""
    check = dict(
        net_id="network_def",
        meta_file=META,
        config_file=str(CONFIGS / config),
        device="cpu",
        bundle_root=str(BUNDLE_ROOT),
    )
    verify_net_in_out(**check)
    # the Glance as inference runs it: on a bare window (training feeds it crops with context instead)
    verify_net_in_out(
        **check,
        extra_forward_args={"glance": True},
        **({"glance_context": [0, 0, 0]} if config == "train.json" else {}),
    )
    # a wrong channel count in metadata must be caught (the check is not vacuous)
    with pytest.raises(ValueError, match="output channel number"):
        verify_net_in_out(**check, **{"_meta_#network_data_format#outputs#pred#num_channels": 3})


def test_torchscript_in_process():
    torch.manual_seed(0)
    parser = _parser("inference.json")
    net = parser.get_parsed_content("network_def").eval()
    scripted = torch.jit.script(net)
    x = torch.rand(1, len(parser["hu_windows"]), *parser["roi_size"])
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(scripted(x, True), net(x, glance=True), rtol=1e-4, atol=1e-5)


def test_ckpt_export_torchscript(tmp_path):
    """`python -m monai.bundle ckpt_export` (the model-zoo command) writes a .ts equal to the eager network."""
    torch.manual_seed(1)
    parser = _parser("inference.json")
    net = parser.get_parsed_content("network_def")
    # non-trivial BatchNorm statistics, so that a wrong eval/train state or unloaded buffers would show
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    ckpt = tmp_path / "model.pt"
    torch.save(net.state_dict(), ckpt)
    ts = tmp_path / "model.ts"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "ckpt_export",
            "network_def",
            "--filepath",
            str(ts),
            "--ckpt_file",
            str(ckpt),
            "--meta_file",
            "configs/metadata.json",
            "--config_file",
            "configs/inference.json",
        ],
        cwd=BUNDLE_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ts.is_file()

    extra = {"metadata.json": ""}
    loaded = torch.jit.load(str(ts), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["network_data_format"]["outputs"]["pred"]["num_channels"] == 2
    with zipfile.ZipFile(ts) as z:
        assert any(n.endswith("extra/inference.json") for n in z.namelist()), z.namelist()

    net.eval()
    x = torch.rand(2, len(parser["hu_windows"]), *parser["roi_size"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loaded(x, True), net(x, glance=True), rtol=1e-4, atol=1e-5)
        assert loaded(x).shape == (2, 2, *parser["roi_size"])


@pytest.mark.skipif(not (BUNDLE_ROOT / "models" / "model.pt").is_file(), reason="no shipped weights in bundle/models")
def test_shipped_weights_match_network_def():
    """The shipped models/model.pt loads strictly into inference.json's network (what screen/demo and MONAI Label
    load); a network change without retrained weights breaks every screening run."""
    net = _parser("inference.json").get_parsed_content("network_def")
    # stored as CPU tensors, so that any consumer loads it on a machine without a GPU (no map_location needed)
    state = torch.load(BUNDLE_ROOT / "models" / "model.pt", weights_only=True)
    assert {v.device.type for v in state.values()} == {"cpu"}
    missing, unexpected = set(net.state_dict()) - set(state), set(state) - set(net.state_dict())
    assert not missing and not unexpected, (
        f"models/model.pt does not match inference.json's network_def: {len(missing)} missing keys "
        f"(e.g. {sorted(missing)[:3]}), {len(unexpected)} unexpected (e.g. {sorted(unexpected)[:3]})"
    )
    net.load_state_dict(state, strict=True)


def test_pool_logits_mean_and_max_by_hand():
    from scripts.networks import pool_logits

    # (2 logits, 2 x 1 x 1 cells): discard logits [2, 0], keep logits [3, 6]; margins keep - discard 1 and 6
    cells = torch.tensor([[2.0, 0.0], [3.0, 6.0]]).view(2, 2, 1, 1)
    assert pool_logits(cells, "mean").tolist() == [1.0, 4.5]
    assert pool_logits(cells, "max").tolist() == [0.0, 6.0]  # the second cell's (discard, keep) logits
    with pytest.raises(ValueError, match="window_pool"):
        GlanceNet(2, window_pool="median")


def test_load_focus_takes_only_the_focus(tmp_path):
    from scripts.networks import load_focus

    parser = _parser("train.json")
    source = parser.get_parsed_content("network_def", instantiate=True)
    for p in source.parameters():
        torch.nn.init.normal_(p)
    ckpt = tmp_path / "model.pt"
    torch.save(source.state_dict(), ckpt)

    target = _parser("train.json").get_parsed_content("network_def")
    glance_before = {k: v.clone() for k, v in target.glance.state_dict().items()}
    assert load_focus(target, str(ckpt)) is target
    for key, value in target.focus.state_dict().items():
        torch.testing.assert_close(value, source.focus.state_dict()[key])
    for key, value in target.glance.state_dict().items():
        torch.testing.assert_close(value, glance_before[key])

    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="no Focus weights"):
        load_focus(target, str(tmp_path / "other.pt"))


def test_train_json_pretrained_focus_initialises_the_focus_before_training(tmp_path):
    parser = _parser("train.json")
    assert parser["pretrained_focus"] is None and parser.get_parsed_content("run#0") is None
    source = _parser("train.json").get_parsed_content("network_def")
    for p in source.focus.parameters():
        torch.nn.init.constant_(p, 0.25)
    torch.save(source.state_dict(), tmp_path / "model.pt")
    parser = _parser("train.json")
    parser["pretrained_focus"] = str(tmp_path / "model.pt")
    parser.get_parsed_content("run#0")  # the first step of `training`, before the checkpoint and resume steps
    network = parser.get_parsed_content("network")
    assert all(torch.all(p == 0.25) for p in network.focus.parameters())
    assert not all(torch.all(p == 0.25) for p in network.glance.parameters())


def test_train_json_pretrained_initialises_both_networks_before_training(tmp_path):
    parser = _parser("train.json")
    assert parser["pretrained"] is None and parser.get_parsed_content("run#1") is None
    source = _parser("train.json").get_parsed_content("network_def")
    for i, p in enumerate(source.parameters()):
        torch.nn.init.constant_(p, 0.01 * (i + 1))
    torch.save(source.state_dict(), tmp_path / "model.pt")
    parser = _parser("train.json")
    parser["pretrained"] = str(tmp_path / "model.pt")
    parser.get_parsed_content("run#1")  # after the Focus-only option, before the checkpoint and resume steps
    network = parser.get_parsed_content("network")
    for (name, loaded), expected in zip(network.state_dict().items(), source.state_dict().values()):
        torch.testing.assert_close(loaded, expected, msg=name)

    parser = _parser("train.json")
    assert parser["pretrained_widen"] is False
    parser["pretrained"], parser["pretrained_widen"] = str(tmp_path / "model.pt"), True
    parser.get_parsed_content("run#1")  # widening a Focus of the same width copies it
    network = parser.get_parsed_content("network")
    for (name, loaded), expected in zip(network.state_dict().items(), source.state_dict().values()):
        torch.testing.assert_close(loaded, expected, msg=name)

    focus_only = {k: v for k, v in source.state_dict().items() if k.startswith("focus.")}
    torch.save(focus_only, tmp_path / "focus.pt")
    with pytest.raises(ValueError, match="no Glance and Focus weights"):
        load_pretrained(_parser("train.json").get_parsed_content("network_def"), str(tmp_path / "focus.pt"))


def _unet(channels, num_res_units: int = 1) -> UNet:
    return UNet(3, 2, 2, channels=channels, strides=(2, 2), num_res_units=num_res_units, norm="batch")


@pytest.mark.parametrize("num_res_units", [0, 1])
def test_widen_unet_state_keeps_the_narrow_output(num_res_units):
    from scripts.networks import widen_unet_state

    torch.manual_seed(0)
    narrow, wide = _unet((4, 8, 16), num_res_units), _unet((8, 12, 32), num_res_units)  # uneven: skip splits differ
    for module in narrow.modules():
        if isinstance(module, torch.nn.BatchNorm3d):  # trained-looking statistics, not the identity of a fresh norm
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            torch.nn.init.normal_(module.weight)
    fresh = {k: v.clone() for k, v in wide.state_dict().items()}
    wide.load_state_dict(widen_unet_state(narrow.state_dict(), wide))
    x = torch.randn(2, 2, 16, 16, 8)
    for train in (False, True):  # running statistics, then batch statistics
        narrow.train(train)
        wide.train(train)
        torch.testing.assert_close(wide(x), narrow(x), atol=1e-5, rtol=1e-5)
    first = next(k for k, v in fresh.items() if v.dim() > 1)
    assert torch.equal(wide.state_dict()[first][4:], fresh[first][4:])  # new channels keep their random weights
    assert wide.state_dict()[first][4:].abs().sum() > 0


def test_widen_unet_state_refuses_what_does_not_fit():
    from scripts.networks import widen_unet_state

    with pytest.raises(ValueError, match="layout"):
        widen_unet_state(_unet((4, 8, 16), 0).state_dict(), _unet((8, 16, 32), 1))
    with pytest.raises(ValueError, match="does not fit"):
        widen_unet_state(_unet((8, 16, 32)).state_dict(), _unet((4, 8, 16)))


def test_load_pretrained_widens_the_focus_and_keeps_the_glance(tmp_path):
    torch.manual_seed(0)
    source = GlanceFocusNet(_small_glance(2), _unet((4, 8, 16))).eval()
    torch.save(source.state_dict(), tmp_path / "model.pt")
    target = GlanceFocusNet(_small_glance(2), _unet((8, 16, 32)))
    with pytest.raises(RuntimeError, match="size mismatch"):  # without widen a wider Focus is an error
        load_pretrained(target, str(tmp_path / "model.pt"))
    load_pretrained(target, str(tmp_path / "model.pt"), widen=True).eval()
    x = torch.randn(1, 2, 16, 16, 8)
    torch.testing.assert_close(target(x), source(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(target(x, glance=True), source(x, glance=True))
    with pytest.raises(ValueError, match="MONAI UNet"):
        load_pretrained(GlanceFocusNet(_small_glance(2), _small_glance(2)), str(tmp_path / "model.pt"), widen=True)
