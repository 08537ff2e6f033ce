"""Conv + BatchNorm building block and the exact fusion helpers every re-parameterisation uses."""

from __future__ import annotations

import torch
from torch import nn

from .pointwise import pointwise_conv

__all__ = ["ConvBN", "fuse_bn", "fold_bn_after_linear", "make_bn", "pad_kernel_to"]


def make_bn(num_features: int, sync: bool = False, eps: float = 1e-5) -> nn.Module:
    """BatchNorm2d, or SyncBatchNorm when ``sync`` (same parameters, buffers and keys)."""
    return nn.SyncBatchNorm(num_features, eps=eps) if sync else nn.BatchNorm2d(num_features, eps=eps)


@torch.no_grad()
def fuse_bn(
    kernel: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm, conv_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BN that follows a conv into the conv's kernel and bias.

    ``kernel``: (O, I, kh, kw). Returns ``(kernel * gamma/sigma, beta + (conv_bias - mu) * gamma/sigma)``
    with ``sigma = sqrt(running_var + eps)``; exact in eval mode.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("fuse_bn needs a BatchNorm with running statistics (track_running_stats=True)")
    std = (bn.running_var + bn.eps).sqrt()
    gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
    t = gamma / std
    b0 = conv_bias if conv_bias is not None else torch.zeros_like(std)
    return kernel * t.reshape(-1, *([1] * (kernel.ndim - 1))), beta + (b0 - bn.running_mean) * t


@torch.no_grad()
def fold_bn_after_linear(
    linear: nn.Linear, bn: nn.modules.batchnorm._BatchNorm, scale: torch.Tensor | None = None
) -> nn.Linear:
    """Fold ``scale * BN(linear(x))`` (BN over the Linear's output features) into one biased Linear.

    ``scale`` is an optional per-output-feature layer scale (shape (O,)). Exact in eval mode.
    """
    w, b = fuse_bn(linear.weight, bn, linear.bias)
    if scale is not None:
        w = w * scale.reshape(-1, 1)
        b = b * scale
    new = nn.Linear(linear.in_features, linear.out_features, bias=True, device=w.device, dtype=w.dtype)
    new.weight.copy_(w)
    new.bias.copy_(b)
    return new


def pad_kernel_to(kernel: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Zero-pad a (O, I, kh, kw) kernel centrally to ``size`` = (KH, KW); KH-kh and KW-kw must be even."""
    kh, kw = kernel.shape[-2:]
    dh, dw = size[0] - kh, size[1] - kw
    if dh < 0 or dw < 0 or dh % 2 or dw % 2:
        raise ValueError(
            f"cannot centre a {kh}x{kw} kernel in {size[0]}x{size[1]}: the size difference must be even "
            "and non-negative"
        )
    return nn.functional.pad(kernel, (dw // 2, dw // 2, dh // 2, dh // 2))


class ConvBN(nn.Module):
    """``BN(Conv2d(x))`` with submodule names ``conv`` and ``bn`` (the RepLKNet/SLaK layout).

    ``reparameterize()`` folds the BN into a biased conv in place: afterwards the module holds only
    ``conv`` (with bias) and ``bn`` is an ``nn.Identity``.

    Shapes: (B, C_in, H, W) -> (B, C_out, H', W') as for the wrapped conv.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] | None = None,
        groups: int = 1,
        dilation: int = 1,
        sync_bn: bool = False,
    ) -> None:
        super().__init__()
        ks = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        if padding is None:
            padding = (dilation * (ks[0] - 1) // 2, dilation * (ks[1] - 1) // 2)
        self.conv = nn.Conv2d(
            in_channels, out_channels, ks, stride, padding, dilation=dilation, groups=groups, bias=False
        )
        self.bn = make_bn(out_channels, sync_bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_fused(x)

    def forward_fused(self, x: torch.Tensor, act: nn.Module | None = None,
                      residual: torch.Tensor | None = None) -> torch.Tensor:
        """``act(BN(conv(x))) + residual``; a 1x1 conv runs as a fused channels-last GEMM
        (:func:`lkvision.layers.pointwise.pointwise_conv`), with the activation and the residual add fused
        into it once the BN is folded (deploy form)."""
        if isinstance(self.bn, nn.Identity):
            return pointwise_conv(x, self.conv, act, residual)
        y = self.bn(pointwise_conv(x, self.conv))
        y = y if act is None else act(y)
        return y if residual is None else y + residual

    def fused_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(kernel, bias) of the equivalent biased conv (no module change)."""
        if isinstance(self.bn, nn.Identity):
            bias = self.conv.bias if self.conv.bias is not None else self.conv.weight.new_zeros(self.conv.out_channels)
            return self.conv.weight.detach(), bias.detach()
        return fuse_bn(self.conv.weight, self.bn, self.conv.bias)

    @torch.no_grad()
    def reparameterize(self) -> None:
        if isinstance(self.bn, nn.Identity):
            return
        w, b = self.fused_weight_bias()
        c = self.conv
        new = nn.Conv2d(
            c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding,
            dilation=c.dilation, groups=c.groups, bias=True, device=w.device, dtype=w.dtype,
        )
        new.weight.copy_(w)
        new.bias.copy_(b)
        self.conv = new
        self.bn = nn.Identity()
