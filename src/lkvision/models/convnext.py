"""ConvNeXt (Liu et al., 2022) with configurable per-stage kernel sizes and RepLKNet's re-param small kernel.

RepLKNet §5.3 / Table 11 replaces ConvNeXt's 7x7 depth-wise convs by 31-29-27-13 kernels, each with a parallel
5x5 branch for structural re-parameterisation (``convnext_lk_t`` / ``convnext_lk_s``).

Block: ``x + DropPath(gamma * Linear(GELU(Linear(LN(DWConv_K(x))))))`` (LN and Linears channels-last).
Stem: Conv4x4 s4 + LN; downsampling: LN + Conv2x2 s2; head: global mean -> LayerNorm -> Linear.

Deploy form (exact in eval mode): the large+small depth-wise branches merge into one biased conv, and the
layer scale ``gamma`` folds into the second Linear.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..layers import DropPath
from ..layers.pointwise import passes_through, pointwise_mlp
from ..layers.reparam_conv import DepthwiseConv2d, ReparamLargeKernelConv
from ._base import ConvNeXtMacroNet
from ._registry import register_model

__all__ = ["ConvNeXt", "ConvNeXtBlock", "TEST_MODELS"]


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block with a K x K depth-wise conv (optionally with a re-param small branch).

    Shapes: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, dim: int, kernel_size: int = 7, small_kernel: int | None = None, mlp_ratio: float = 4.0,
                 drop_path: float = 0.0, layer_scale_init_value: float = 1e-6, sync_bn: bool = False) -> None:
        super().__init__()
        if small_kernel is not None:
            self.dwconv: nn.Module = ReparamLargeKernelConv(dim, kernel_size, small_kernel, sync_bn=sync_bn)
        else:
            self.dwconv = DepthwiseConv2d(dim, kernel_size, bias=True)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(mlp_ratio * dim)
        self.pwconv1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(hidden, dim)
        self.gamma = nn.Parameter(layer_scale_init_value * torch.ones(dim)) if layer_scale_init_value > 0 else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))  # (B, H, W, C)
        if self.gamma is None and passes_through(self.drop_path):  # deploy: residual add fused into pwconv2
            return pointwise_mlp(y, self.pwconv1, self.act, self.pwconv2, residual=x.permute(0, 2, 3, 1)
                                 ).permute(0, 3, 1, 2)
        y = pointwise_mlp(y, self.pwconv1, self.act, self.pwconv2)
        if self.gamma is not None:
            y = y * self.gamma
        return x + self.drop_path(y.permute(0, 3, 1, 2))

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the layer scale into ``pwconv2`` (the depth-wise conv merges itself)."""
        if self.gamma is None:
            return
        g = self.gamma.detach()
        self.pwconv2.weight.mul_(g.reshape(-1, 1))
        self.pwconv2.bias.mul_(g)
        self.gamma = None


class ConvNeXt(ConvNeXtMacroNet):
    """ConvNeXt classifier / backbone.

    Args:
        depths, dims: blocks and channels per stage.
        kernel_sizes: depth-wise kernel size per stage (7-7-7-7 in ConvNeXt, 31-29-27-13 in RepLKNet Table 11).
        small_kernel: parallel re-param kernel size (5 in Table 11) or ``None``; stages whose kernel is not
            larger than ``small_kernel`` get no small branch.
        drop_path_rate, layer_scale_init_value, head_init_scale: as in ConvNeXt.
        features_only / out_indices: stage outputs (strides 4/8/16/32) through a LayerNorm each.

    Shapes: (B, in_chans, H, W) -> (B, num_classes); H and W >= 32.
    """

    def __init__(
        self,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        kernel_sizes: Sequence[int] = (7, 7, 7, 7),
        small_kernel: int | None = None,
        in_chans: int = 3,
        num_classes: int = 1000,
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        head_init_scale: float = 1.0,
        features_only: bool = False,
        out_indices: Sequence[int] | None = None,
        sync_bn: bool = False,
    ) -> None:
        super().__init__()
        if not len(depths) == len(dims) == len(kernel_sizes):
            raise ValueError(f"depths {tuple(depths)}, dims {tuple(dims)} and kernel_sizes {tuple(kernel_sizes)} "
                             "must have the same length")
        self.in_chans, self.num_classes, self.num_features = in_chans, num_classes, dims[-1]
        self._build_stem(in_chans, dims, "patchify")
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.stages = nn.ModuleList()
        k = 0
        for d, c, ks in zip(depths, dims, kernel_sizes):
            sk = small_kernel if small_kernel is not None and ks > small_kernel else None
            self.stages.append(nn.Sequential(*[
                ConvNeXtBlock(c, ks, sk, drop_path=dpr[k + j], layer_scale_init_value=layer_scale_init_value,
                              sync_bn=sync_bn)
                for j in range(d)
            ]))
            k += d
        self._build_head(dims, num_classes)
        self._finish_init(head_init_scale, features_only, out_indices)


# --------------------------------------------------------------------------------------------- configs
CONFIGS: dict[str, dict] = {
    "convnext_t": dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), kernel_sizes=(7, 7, 7, 7)),
    "convnext_s": dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768), kernel_sizes=(7, 7, 7, 7)),
    "convnext_lk_t": dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), kernel_sizes=(31, 29, 27, 13),
                          small_kernel=5),
    "convnext_lk_s": dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768), kernel_sizes=(31, 29, 27, 13),
                          small_kernel=5),
    "convnext_nano_lk": dict(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128), kernel_sizes=(13, 11, 9, 5),
                             small_kernel=5),
}


def _build(name: str, **kwargs) -> ConvNeXt:
    return ConvNeXt(**{**CONFIGS[name], **kwargs})


@register_model
def convnext_t(**kwargs) -> ConvNeXt:
    """ConvNeXt-T (7x7 kernels; 28.6 M params, 4.5 GMACs @224)."""
    return _build("convnext_t", **kwargs)


@register_model
def convnext_s(**kwargs) -> ConvNeXt:
    """ConvNeXt-S (7x7 kernels; 50.2 M params, 8.7 GMACs @224)."""
    return _build("convnext_s", **kwargs)


@register_model
def convnext_lk_t(**kwargs) -> ConvNeXt:
    """ConvNeXt-T with 31-29-27-13 kernels and 5x5 re-param branches (RepLKNet Table 11)."""
    return _build("convnext_lk_t", **kwargs)


@register_model
def convnext_lk_s(**kwargs) -> ConvNeXt:
    """ConvNeXt-S with 31-29-27-13 kernels and 5x5 re-param branches (RepLKNet Table 11)."""
    return _build("convnext_lk_s", **kwargs)


@register_model
def convnext_nano_lk(**kwargs) -> ConvNeXt:
    """Tiny ConvNeXt with 13-11-9-5 kernels and 5x5 re-param branches, for tests and CPU demos."""
    return _build("convnext_nano_lk", **kwargs)


TEST_MODELS: dict[str, dict] = {
    "convnext_nano_lk": {},
}
