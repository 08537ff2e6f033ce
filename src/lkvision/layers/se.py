"""Squeeze-and-excitation block used by UniRepLKNet and ShiftWise (1x1 convs with bias, ReLU, sigmoid)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SEBlock"]


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
        s = F.adaptive_avg_pool2d(x, 1)
        s = torch.sigmoid(self.up(F.relu(self.down(s), inplace=True)))
        return x * s
