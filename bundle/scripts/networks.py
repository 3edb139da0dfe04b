"""GF-Screen networks: a cheap Glance window classifier and the Glance+Focus pair saved as one model."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit
from monai.networks.nets import UNet
from torch import nn

KEEP = 1  # index of the "keep" logit; 0 is "discard"


class GlanceNet(nn.Module):
    """Fully convolutional window classifier (keep / discard): a few strided residual units, optionally after
    average pooling (``downsample``; pooling first is cheaper but blurs lesions of a few voxels away).

    A per-window classifier pays its full cost for every window, and windows overlap: the authors' glance
    (ResNet18 at full resolution, overlap 0.75) costs more than the Focus pass it is meant to save. Here the
    window's logits are pooled (``window_pool``: the mean, or the most suspicious cell) from a coarse logit map
    (one location per ``scale`` voxels), so
    :class:`scripts.inferer.GlanceFocusInferer` computes :meth:`logit_map` once over the whole volume and reads
    every window's score from it, sharing the features of overlapping windows; training calls ``forward`` on
    window crops, which is the same computation on the crop as long as the crop's ``context`` covers the map
    cells' receptive field (``receptive_field`` voxels wide; see :meth:`required_context`). With less context a
    cell of the training crop sees zero padding where the whole-volume map sees anatomy, and a Glance trained on
    crops scores windows differently at inference (measured: window AUC 0.59 on the map vs 0.79 on crops).
    """

    def __init__(
        self,
        in_channels: int = 1,
        downsample: int = 2,
        channels: Sequence[int] = (16, 32, 32),
        strides: Sequence[int] = (2, 2, 1),
        subunits: int = 2,
        norm: str = "batch",
        window_pool: str = "mean",
        context: Sequence[int] = (0, 0, 0),
    ) -> None:
        super().__init__()
        if window_pool not in ("mean", "max"):
            raise ValueError(f"window_pool must be 'mean' or 'max', got {window_pool!r}.")
        self.window_pool = window_pool
        layers: list[nn.Module] = [nn.AvgPool3d(downsample)] if downsample > 1 else []
        for c_in, c_out, stride in zip((in_channels, *channels), channels, strides):
            layers.append(ResidualUnit(3, c_in, c_out, strides=stride, subunits=subunits, act="relu", norm=norm))
        layers.append(Convolution(3, channels[-1], 2, kernel_size=1, conv_only=True))
        self.features = nn.Sequential(*layers)
        self.scale = downsample * int(math.prod(strides))
        if any(c % self.scale for c in context):
            raise ValueError(f"context {list(context)} must be multiples of the map scale {self.scale}.")
        self.margin = [int(c) // self.scale for c in context]
        # receptive field of one map cell, in input voxels: (k - 1) * jump per layer (3x3x3 convs, first strided)
        rf, jump = downsample, downsample
        for stride in strides:
            rf, jump = rf + 2 * jump, jump * stride
            rf += 2 * jump * (subunits - 1)
        self.receptive_field = rf

    def required_context(self) -> int:
        """Voxels of context a training crop needs on each side of its window so that the window's map cells see
        no crop border: half the receptive field beyond a cell, rounded up to the map scale."""
        return math.ceil(max(self.receptive_field - self.scale, 0) / 2 / self.scale) * self.scale

    def logit_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 2, ...) keep/discard logits on a grid ``scale`` times coarser than ``x``."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the window at the centre of ``x``, which extends ``context`` voxels past it on each side.

        Training crops with context, like the whole-volume map the inferer reads windows from, keep a window's
        score from depending on what lies at the crop border (zero padding)."""
        m = self.logit_map(x)
        a, b, c = self.margin
        if m.shape[2] <= 2 * a or m.shape[3] <= 2 * b or m.shape[4] <= 2 * c:
            raise ValueError(
                "GlanceNet input must be larger than twice its context on each axis: pass the window crop with its "
                "context, or build the Glance with context=(0, 0, 0) to score bare windows."
            )
        return pool_logits(m[:, :, a : m.shape[2] - a, b : m.shape[3] - b, c : m.shape[4] - c], self.window_pool)


def pool_logits(logit_map: torch.Tensor, window_pool: str) -> torch.Tensor:
    """Window logits (..., 2) from the map cells (..., 2, X, Y, Z) it covers: their mean, or (``"max"``, multiple
    instance style: one suspicious cell is enough) the cell with the largest keep-minus-discard margin."""
    cells = logit_map.flatten(-3)
    if window_pool == "mean":
        return cells.mean(-1)
    best = (cells[..., 1, :] - cells[..., 0, :]).argmax(-1, keepdim=True)
    return cells.gather(-1, best.unsqueeze(-2).expand_as(cells[..., :1])).squeeze(-1)


def window_logits(
    logit_map: torch.Tensor, starts: Sequence[Sequence[int]], size: Sequence[int], scale: int, window_pool: str = "mean"
) -> torch.Tensor:
    """Glance logits (W, 2) of W windows from a volume's (2, X, Y, Z) logit map, each pooled over the map cells
    it covers. ``starts``: the W window corners in voxels; ``size``: the window size in voxels.

    Windows are grouped by how many cells they cover and each group is read from one stride-1 pooling of the
    map: scoring a thousand windows costs a few pooling passes instead of a thousand slicing calls."""
    n = torch.tensor(logit_map.shape[-3:])
    s = torch.as_tensor(starts, dtype=torch.long).view(-1, 3)
    lo = torch.minimum((s // scale).clamp_min(0), n - 1)
    hi = torch.maximum(torch.minimum(-((-(s + torch.as_tensor(size))) // scale), n), lo + 1)
    out = logit_map.new_empty((len(s), logit_map.shape[0]))
    margin = (logit_map[1] - logit_map[0])[None, None]  # keep-minus-discard, what "max" pooling ranks cells by
    for extent in torch.unique(hi - lo, dim=0):
        rows = (hi - lo == extent).all(1).nonzero().squeeze(1)
        k = tuple(extent.tolist())
        if window_pool == "mean":
            pooled = F.avg_pool3d(logit_map[None], k, stride=1)[0].flatten(1)
        else:  # the cell with the largest margin, both of its logits (as pool_logits)
            best = F.max_pool3d(margin, k, stride=1, return_indices=True)[1].flatten()
            pooled = logit_map.flatten(1)[:, best]
        shape = [d - e + 1 for d, e in zip(logit_map.shape[-3:], k)]
        flat = (lo[rows, 0] * shape[1] + lo[rows, 1]) * shape[2] + lo[rows, 2]
        out[rows] = pooled[:, flat].T
    return out


class GlanceFocusNet(nn.Module):
    """The Glance and Focus models in one module, so that one ``model.pt`` holds both.

    ``forward(x)`` is the Focus segmentation (any MONAI consumer treats this as a plain segmentation network);
    ``forward(x, glance=True)`` gives the glance logits. Both go through ``forward`` so that a
    DistributedDataParallel wrapper sees every call.
    """

    def __init__(self, glance: nn.Module, focus: nn.Module) -> None:
        super().__init__()
        self.glance = glance
        self.focus = focus

    def forward(self, x: torch.Tensor, glance: bool = False) -> torch.Tensor:
        if glance:
            return self.glance(x)
        return self.focus(x)


def load_focus(network: nn.Module, path: str) -> nn.Module:
    """Initialise the Focus of ``network`` (a :class:`GlanceFocusNet`, possibly DDP-wrapped) from the Focus of a
    ``model.pt``, leaving the Glance as it is: GRPO then rewards the Glance with a Focus that already segments,
    instead of one that misses every lesion early in training (where the reward says nothing)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    focus = {k.removeprefix("focus."): v for k, v in state.items() if k.startswith("focus.")}
    if not focus:
        raise ValueError(f"{path} holds no Focus weights (no 'focus.*' keys): not a GF-Screen model.pt.")
    unwrap(network).focus.load_state_dict(focus)
    return network


def load_pretrained(network: nn.Module, path: str, widen: bool = False) -> nn.Module:
    """Initialise the whole ``network`` (Glance and Focus, possibly DDP-wrapped) from a ``model.pt``, to fine-tune
    trained weights with other settings (0.6.0 was 0.5.0 fine-tuned with a larger Focus window: both networks are
    fully convolutional, so their weights fit any window size). With ``widen`` the Focus of ``network`` may be a
    wider MONAI ``UNet`` than the saved one: the saved Focus is embedded by :func:`widen_unet_state`, so a wider
    Focus starts from trained weights instead of from scratch."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not any(k.startswith("focus.") for k in state) or not any(k.startswith("glance.") for k in state):
        raise ValueError(f"{path} holds no Glance and Focus weights ('glance.*', 'focus.*'): not a GF-Screen model.pt.")
    if widen:
        focus = unwrap(network).focus
        if not isinstance(focus, UNet):
            raise ValueError(f"widen needs a MONAI UNet Focus in network_def, not {type(focus).__name__}.")
        narrow = {k.removeprefix("focus."): v for k, v in state.items() if k.startswith("focus.")}
        state = {k: v for k, v in state.items() if not k.startswith("focus.")}
        state.update({f"focus.{k}": v for k, v in widen_unet_state(narrow, focus).items()})
    unwrap(network).load_state_dict(state)
    return network


def widen_unet_state(narrow: dict[str, torch.Tensor], wide: UNet) -> dict[str, torch.Tensor]:
    """The state of ``wide`` (a MONAI ``UNet``) with the weights of a narrower UNet of the same layout embedded,
    such that ``wide`` computes exactly the narrow network's output (function-preserving widening, as in
    Net2WiderNet, Chen et al. 2016, but with zeros instead of copies).

    Every old channel keeps its index (in a skip concatenation: its index within each of the two parts) and its
    weights; weights from a new channel into an old one are zero, so the new channels cannot change the output
    until training makes them useful; a new channel's own weights keep ``wide``'s random initialisation, so its
    gradients are not zero. Normalisation is per channel (batch or instance), so old channels normalise as before.
    """
    target = {k: v.clone() for k, v in wide.state_dict().items()}
    if set(narrow) != set(target):
        raise ValueError("the saved Focus and the Focus of network_def differ in layout (other depth, units or norm)")
    # the first (transposed) convolution of each decoder level (model...2) reads cat(skip, deeper output): its
    # input splits in two after the skip's channels, the output channels of the level's encoder layer (model...0)
    splits = {}
    for level in range(len(wide.channels) - 1):
        prefix = f"model.{'1.submodule.' * level}"
        skip_narrow = next(v.shape[0] for k, v in narrow.items() if k.startswith(f"{prefix}0.") and v.dim() > 1)
        up = next(k for k, v in narrow.items() if k.startswith(f"{prefix}2.") and v.dim() > 1)
        splits[up] = (skip_narrow, wide.channels[level])
    for key, old in narrow.items():
        new = target[key]
        if old.dim() != new.dim() or any(o > n for o, n in zip(old.shape, new.shape)):
            raise ValueError(f"{key}: saved shape {tuple(old.shape)} does not fit {tuple(new.shape)}")
        if old.dim() <= 1:  # per output channel (bias, norm weights and statistics, PReLU slope), batch counter
            new.view(-1)[: old.numel()] = old.view(-1)
            continue
        out_dim = 1 if wide.get_submodule(key.rsplit(".", 1)[0]).transposed else 0
        in_dim = 1 - out_dim
        in_index = torch.arange(old.shape[in_dim])
        if key in splits:
            skip_narrow, skip_wide = splits[key]
            in_index[skip_narrow:] += skip_wide - skip_narrow
        old_out = new.narrow(out_dim, 0, old.shape[out_dim])
        old_out.zero_()
        old_out.index_copy_(in_dim, in_index, old)
    return target


def unwrap(network: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper (or the module itself)."""
    return getattr(network, "module", network)
