"""Squeeze-and-excitation block used by UniRepLKNet and ShiftWise (1x1 convs with bias, ReLU, sigmoid)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops._fx import fx_traces_as

__all__ = ["SEBlock", "se_scale", "se_scale_reference"]


def se_scale_reference(x: torch.Tensor, down: nn.Conv2d, up: nn.Conv2d) -> torch.Tensor:
    """The official SE: average pool, 1x1 convs on the (B, C, 1, 1) map, sigmoid, scale. x (B, C, H, W)."""
    s = F.adaptive_avg_pool2d(x, 1)
    s = torch.sigmoid(up(F.relu(down(s), inplace=True)))
    return x * s


@fx_traces_as(se_scale_reference)
def se_scale(x: torch.Tensor, down: nn.Conv2d, up: nn.Conv2d) -> torch.Tensor:
    """SE with the squeeze as a (B, C) mean and the two 1x1 convs as linears on it: the same function as
    :func:`se_scale_reference`, without oneDNN's per-call cost of a convolution on a 1x1 map (which measured
    0.1-15 ms per tiny conv, more than the rest of the SE). x (B, C, H, W) -> (B, C, H, W)."""
    # the mean over (H, W) of a channels_last tensor as a reduction of its NHWC view (6x faster in bf16)
    pooled = x.permute(0, 2, 3, 1).mean((1, 2)) if x.is_contiguous(memory_format=torch.channels_last) else \
        x.mean((2, 3))
    s = F.relu(F.linear(pooled, down.weight.flatten(1), down.bias), inplace=True)
    s = torch.sigmoid(F.linear(s, up.weight.flatten(1), up.bias))
    return x * s[:, :, None, None]


class SEBlock(nn.Module):
    """``x * sigmoid(up(relu(down(avgpool(x)))))``.

    Shapes: (B, C, H, W) -> (B, C, H, W). ``down``: C -> C_int, ``up``: C_int -> C (1x1 convs with bias),
    names as in the official UniRepLKNet/ShiftWise checkpoints.
    """

    def __init__(self, channels: int, internal_channels: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(channels, internal_channels, 1, bias=True)
        self.up = nn.Conv2d(internal_channels, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return se_scale(x, self.down, self.up)
