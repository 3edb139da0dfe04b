"""GlanceFocusInferer: equals MONAI sliding-window inference at threshold 0, skips the Focus where the Glance
discards, and records every window of MONAI's grid."""

import itertools

import numpy as np
import pytest
import torch
from monai.inferers import SlidingWindowInferer, sliding_window_inference
from monai.networks.nets import UNet
from torch import nn

from scripts.inferer import GlanceFocusInferer
from scripts.networks import GlanceFocusNet, GlanceNet, window_logits

ROI = (16, 16, 16)


class Counting(nn.Module):
    """Wraps a module and counts its calls and the windows it was given."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls, self.windows = inner, 0, 0

    def forward(self, x):
        self.calls += 1
        self.windows += x.shape[0]
        return self.inner(x)


class MeanGlance(nn.Module):
    """A deterministic glance: p(keep) = sigmoid(k * (window mean - c))."""

    def __init__(self, c: float, k: float = 50.0) -> None:
        super().__init__()
        self.c, self.k = c, k

    def forward(self, x):
        z = self.k * (x.float().mean(dim=tuple(range(1, x.ndim))) - self.c)
        return torch.stack([torch.zeros_like(z), z], dim=1)


def _net(glance: nn.Module | None = None) -> GlanceFocusNet:
    torch.manual_seed(0)
    glance = glance or GlanceNet(in_channels=1, downsample=2, channels=(4, 8, 8), strides=(2, 2, 1))
    focus = UNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=0)
    return GlanceFocusNet(glance, Counting(focus)).eval()


def _image(shape=(1, 1, 40, 36, 20), seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "mode, overlap, shape",
    [
        ("gaussian", 0.5, (1, 1, 40, 36, 20)),
        ("constant", 0.25, (1, 1, 40, 36, 20)),
        ("gaussian", 0.5, (2, 1, 33, 40, 11)),  # batch of 2, z smaller than the window (padded)
        ("constant", 0.5, (1, 1, 12, 40, 24)),  # x smaller than the window
    ],
)
def test_threshold_zero_equals_monai_sliding_window(mode, overlap, shape):
    net = _net()
    x = _image(shape)
    inferer = GlanceFocusInferer(ROI, sw_batch_size=3, overlap=overlap, threshold=0.0, mode=mode)
    out = inferer(x, net)
    expected = SlidingWindowInferer(ROI, sw_batch_size=3, overlap=overlap, mode=mode)(
        x, lambda w: net.focus(w).softmax(1)
    )
    assert out.shape == (shape[0], 2, *shape[2:])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.sum(1), torch.ones_like(out[:, 0]), rtol=1e-5, atol=1e-5)  # probabilities
    assert all(w["kept"] for rec in inferer.last_windows for w in rec)


def test_threshold_above_every_probability_focuses_nothing():
    net = _net()
    head = [m for m in net.glance.modules() if getattr(m, "bias", None) is not None and m.bias.shape == (2,)][-1]
    with torch.no_grad():  # bias the glance's output layer to "discard": p(keep) ~ 1e-17 < 1 for every window
        head.bias.copy_(torch.tensor([20.0, -20.0]))
    x = _image()
    inferer = GlanceFocusInferer(ROI, sw_batch_size=4, overlap=0.5, threshold=1.0)
    out = inferer(x, net)
    assert net.focus.calls == 0 and net.focus.windows == 0
    assert torch.count_nonzero(out) == 0
    assert out.argmax(1).sum() == 0  # empty mask
    records = inferer.last_windows[0]
    assert len(records) > 0 and not any(w["kept"] for w in records)
    assert all(0.0 <= w["prob"] < 1.0 for w in records)
    assert set(inferer.last_timings) == {"glance", "focus"}
    assert inferer.last_timings["glance"] > 0 and inferer.last_timings["focus"] >= 0


def test_only_kept_windows_reach_the_focus():
    """A glance that keeps bright windows: the Focus sees exactly the kept ones, voxels outside them are 0."""
    x = _image((1, 1, 48, 32, 16)) * 0.1
    x[..., 32:, :, :] += 0.9  # a bright slab at high x
    net = _net(MeanGlance(c=0.3))
    inferer = GlanceFocusInferer(ROI, sw_batch_size=4, overlap=0.5, threshold=0.5, mode="constant")
    out = inferer(x, net)
    records = inferer.last_windows[0]
    kept = [w for w in records if w["kept"]]
    assert 0 < len(kept) < len(records)
    assert net.focus.windows == len(kept)
    for w in records:
        assert w["kept"] == (w["prob"] >= 0.5)
    covered = torch.zeros(x.shape[2:], dtype=torch.bool)
    for w in kept:
        covered[tuple(slice(max(s, 0), s + n) for s, n in zip(w["start"], w["size"]))] = True
    assert torch.count_nonzero(out[0][:, ~covered]) == 0  # skipped windows are background
    assert (out[0][:, covered].sum(0) > 0).all()  # (< 1 where skipped windows overlap: their zeros are averaged in)
    # kept windows are stitched exactly as MONAI stitches the same windows
    kept_starts = {tuple(w["start"]) for w in kept}

    def masked_focus(win, location):
        keep = torch.tensor([tuple(s.start for s in loc[2:]) in kept_starts for loc in location])
        return net.focus.inner(win).softmax(1) * keep.view(-1, 1, 1, 1, 1)

    with torch.no_grad():
        expected = sliding_window_inference(x, ROI, 4, masked_focus, overlap=0.5, mode="constant", with_coord=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 1, 40, 36, 20), (2, 1, 33, 40, 11)])
def test_window_records_tile_the_image(shape):
    x = _image(shape)
    net = _net()
    inferer = GlanceFocusInferer(ROI, sw_batch_size=3, overlap=0.5, threshold=0.5)
    inferer(x, net)
    grid = []  # MONAI's own window corners (on the padded image)

    def record(win, location):
        grid.extend(tuple(s.start for s in loc[2:]) for loc in location if loc[0].start == 0)
        return torch.zeros(win.shape[0], 2, *win.shape[2:])

    sliding_window_inference(x, ROI, 3, record, overlap=0.5, with_coord=True)
    pad = [max(r - s, 0) // 2 for r, s in zip(ROI, shape[2:])]
    assert len(inferer.last_windows) == shape[0]
    for records in inferer.last_windows:
        assert len(records) == len(grid)
        assert sorted(tuple(w["start"]) for w in records) == sorted(tuple(g - p for g, p in zip(c, pad)) for c in grid)
        hits = np.zeros(shape[2:], dtype=int)
        for w in records:
            assert w["size"] == list(ROI)
            assert isinstance(w["kept"], bool) and 0.0 <= w["prob"] <= 1.0
            hits[tuple(slice(max(s, 0), s + n) for s, n in zip(w["start"], w["size"]))] += 1
            for s, n, dim in zip(w["start"], w["size"], shape[2:]):
                assert s + n > 0 and s < dim  # every window overlaps the image
        assert hits.min() >= 1  # together they cover every voxel
    # on an axis smaller than the window, the window starts before the image (symmetric padding)
    if shape[4] < ROI[2]:
        assert {w["start"][2] for w in inferer.last_windows[0]} == {-pad[2]}


def test_records_and_timings_are_per_call():
    net = _net()
    inferer = GlanceFocusInferer(ROI, sw_batch_size=8, overlap=0.0, threshold=0.5)
    inferer(_image((1, 1, 32, 32, 32)), net)
    assert len(inferer.last_windows[0]) == 8  # 2x2x2 grid without overlap
    inferer(_image((1, 1, 16, 16, 16)), net)
    assert len(inferer.last_windows[0]) == 1  # not accumulated across calls
    assert set(inferer.last_timings) == {"glance", "focus"}
    assert all(isinstance(v, float) and v >= 0 for v in inferer.last_timings.values())


def test_window_glance_probabilities():
    """A per-window glance (no logit_map) is run on each window crop: records hold its p(keep)."""
    net = _net(MeanGlance(c=0.5, k=10.0))
    x = _image((1, 1, 32, 32, 16))
    inferer = GlanceFocusInferer(ROI, sw_batch_size=2, overlap=0.0, threshold=0.5)
    inferer(x, net)
    assert len(inferer.last_windows[0]) == 4
    for w in inferer.last_windows[0]:
        win = x[(slice(None), slice(None), *(slice(s, s + n) for s, n in zip(w["start"], w["size"])))]
        with torch.no_grad():
            p = net(win, glance=True).softmax(1)[0, 1].item()
        assert w["prob"] == pytest.approx(p, abs=1e-6)


def test_fully_convolutional_glance_runs_once_per_volume():
    """GlanceNet scores the whole volume once (logit_map); each window's p(keep) is read from that map."""
    net = _net()
    assert hasattr(net.glance, "logit_map")
    calls = []
    net.glance.features.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    x = _image((2, 1, 48, 32, 16))
    inferer = GlanceFocusInferer(ROI, sw_batch_size=3, overlap=0.5, threshold=0.5)
    inferer(x, net)
    assert calls == [tuple(x.shape)]  # one pass over the whole batch of volumes, none per window
    with torch.no_grad():
        fmap = net.glance.logit_map(x)
    for b in range(2):
        records = inferer.last_windows[b]
        assert len(records) == 5 * 3 * 1
        for w in records:
            expected = window_logits(fmap[b], [w["start"]], w["size"], net.glance.scale)[0].softmax(0)[1].item()
            assert w["prob"] == pytest.approx(expected, abs=1e-6)
            assert w["kept"] == (w["prob"] >= 0.5)


@pytest.mark.parametrize("threshold", [-0.1, 1.01])
def test_threshold_must_be_a_probability(threshold):
    with pytest.raises(ValueError, match="threshold"):
        GlanceFocusInferer(ROI, threshold=threshold)


def test_grid_count_matches_itertools():
    """Sanity of the grid used above: 40x36x20 at overlap 0.5, roi 16 -> interval 8 -> 4x4x2 windows."""
    net = _net()
    inferer = GlanceFocusInferer(ROI, sw_batch_size=16, overlap=0.5, threshold=0.0)
    inferer(_image(), net)
    starts = {tuple(w["start"]) for w in inferer.last_windows[0]}
    expected = set(itertools.product([0, 8, 16, 24], [0, 8, 16, 20], [0, 4]))
    assert starts == expected


def test_a_window_at_exactly_the_threshold_reaches_the_focus():
    """Kept means p(keep) >= threshold: with the threshold set to one window's own p(keep), that window is
    segmented and recorded as kept, and the Focus sees exactly the windows at or above it."""
    net = _net()
    x = _image()
    probe = GlanceFocusInferer(ROI, sw_batch_size=4, overlap=0.5, threshold=0.0)
    probe(x, net)
    probs = sorted(w["prob"] for w in probe.last_windows[0])
    threshold = probs[len(probs) // 2]
    net.focus.windows = 0
    inferer = GlanceFocusInferer(ROI, sw_batch_size=4, overlap=0.5, threshold=threshold)
    inferer(x, net)
    assert net.focus.windows == sum(p >= threshold for p in probs) == len(probs) - len(probs) // 2
    at_threshold = [w for w in inferer.last_windows[0] if w["prob"] == threshold]
    assert at_threshold and all(w["kept"] for w in at_threshold)


def test_each_volume_of_a_batch_focuses_the_windows_its_own_glance_kept():
    """Two different volumes in one batch: each is segmented on its own kept windows, as if screened alone."""
    a = _image((1, 1, 48, 32, 16), seed=1) * 0.1
    a[..., 32:, :, :] += 0.9  # bright at high x
    b = _image((1, 1, 48, 32, 16), seed=2) * 0.1
    b[..., :16, :, :] += 0.9  # bright at low x
    net = _net(MeanGlance(c=0.3))
    inferer = GlanceFocusInferer(ROI, sw_batch_size=4, overlap=0.5, threshold=0.5, mode="constant")
    alone = []
    for volume in (a, b):
        alone.append((inferer(volume, net), [w["kept"] for w in inferer.last_windows[0]]))
    assert alone[0][1] != alone[1][1]  # the two volumes keep different windows
    net.focus.windows = 0
    out = inferer(torch.cat([a, b]), net)
    assert net.focus.windows == sum(alone[0][1]) + sum(alone[1][1])
    for i, (single, kept) in enumerate(alone):
        assert [w["kept"] for w in inferer.last_windows[i]] == kept
        torch.testing.assert_close(out[i : i + 1], single, rtol=1e-5, atol=1e-6)
