"""Normalisation layers shared by every family: channels-first LayerNorm and GRN."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops._fx import fx_leaf

__all__ = ["LayerNorm2d", "GRN", "layer_norm_2d"]


@fx_leaf
def layer_norm_2d(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                  eps: float) -> torch.Tensor:
    """LayerNorm over the channels of (B, C, H, W) ``x``; ``weight``/``bias`` (C,) or None."""
    if x.is_contiguous(memory_format=torch.channels_last):
        # (B, C, H, W) stored as NHWC: normalise the contiguous last dim without copies.
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), weight, bias, eps)
        return y.permute(0, 3, 1, 2)
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    x = (x - u) * torch.rsqrt(s + eps)
    if weight is not None:
        x = weight[:, None, None] * x + bias[:, None, None]
    return x


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of an NCHW tensor.

    Shapes: input (B, C, H, W) -> output (B, C, H, W). Parameters ``weight``/``bias`` have shape (C,),
    like ``nn.LayerNorm(C)``, so official "channels_first" LayerNorm weights load unchanged.
    The default eps is 1e-6, as in ConvNeXt, SLaK, UniRepLKNet and ShiftWise.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True) -> None:
        super().__init__(num_channels, eps=eps, elementwise_affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm_2d(x, self.weight, self.bias, self.eps)


class GRN(nn.Module):
    """Global Response Normalisation (ConvNeXt-V2 / UniRepLKNet / ShiftWise), channels-last input.

    ``y = (gamma * N(x) + 1) * x + beta`` with ``N(x) = ||x||_2 over (H, W) / (mean_C ||x||_2 + eps)``.

    Shapes: input (B, H, W, C) -> output (B, H, W, C). ``gamma``/``beta`` have shape (1, 1, 1, C) (the
    official layout). ``use_bias=False`` is the deploy form, where ``beta`` has been folded into the
    following Linear (see :meth:`fold_beta_into`).
    """

    def __init__(self, dim: int, use_bias: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.use_bias = use_bias
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        if use_bias:
            self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + self.eps)
        y = (self.gamma * nx + 1) * x
        if self.use_bias:
            y = y + self.beta
        return y

    @torch.no_grad()
    def fold_beta_into(self, linear: nn.Linear) -> nn.Linear:
        """Fold ``beta`` into the Linear that follows (``b += W @ beta``); returns a biased Linear.

        After this call the GRN has no bias (its deploy form). Exact: the Linear is affine.
        """
        if not self.use_bias:
            return linear
        w = linear.weight
        extra = w @ self.beta.reshape(-1)
        new = nn.Linear(linear.in_features, linear.out_features, bias=True, device=w.device, dtype=w.dtype)
        new.weight.copy_(w)
        new.bias.copy_(extra if linear.bias is None else linear.bias + extra)
        del self.beta
        self.use_bias = False
        return new
