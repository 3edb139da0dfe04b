"""GF-Screen networks: a cheap Glance window classifier and the Glance+Focus pair saved as one model."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import ResNet
from torch import nn

KEEP = 1  # index of the "keep" logit; 0 is "discard"


class GlanceNet(nn.Module):
    """Window classifier (keep / discard) on a low-resolution copy of the window.

    The authors' glance (ResNet18 at full resolution) costs about a third of the Focus per window, so skipping
    windows barely pays. Average-pooling the window by ``downsample`` first cuts the glance cost by roughly
    ``downsample**3`` while lesions of a few voxels still change the pooled intensities.
    """

    def __init__(
        self,
        in_channels: int = 1,
        downsample: int | Sequence[int] = 4,
        layers: Sequence[int] = (1, 1, 1, 1),
        block_inplanes: Sequence[int] = (16, 32, 64, 128),
        block: str = "basic",
        conv1_size: int = 3,
    ) -> None:
        super().__init__()
        self.pool = nn.AvgPool3d(downsample) if downsample != 1 else nn.Identity()
        self.resnet = ResNet(
            block=block,
            layers=list(layers),
            block_inplanes=list(block_inplanes),
            spatial_dims=3,
            n_input_channels=in_channels,
            conv1_t_size=conv1_size,
            conv1_t_stride=1,
            no_max_pool=True,
            num_classes=2,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnet(self.pool(x))


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


def unwrap(network: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper (or the module itself)."""
    return getattr(network, "module", network)
