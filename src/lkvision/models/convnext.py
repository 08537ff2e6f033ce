"""ConvNeXt (Liu et al., 2022) with configurable per-stage kernel sizes and RepLKNet's re-param small kernel.

RepLKNet §5.3 / Table 11 replaces ConvNeXt's 7x7 depth-wise convs by 31-29-27-13 kernels, each with a parallel
5x5 branch for structural re-parameterisation (``convnext_lk_t`` / ``convnext_lk_s``).

Block: ``x + DropPath(gamma * Linear(GELU(Linear(LN(DWConv_K(x))))))`` (LN and Linears channels-last).
Stem: Conv4x4 s4 + LN; downsampling: LN + Conv2x2 s2; head: global mean -> LayerNorm -> Linear.

Deploy form (exact in eval mode): the large+small depth-wise branches merge into one biased conv, and the
layer scale ``gamma`` folds into the second Linear.

File order (timm's): block -> model -> ``_create_convnext`` -> ``default_cfgs`` -> ``model_cfgs`` and the
registered variants (no checkpoint filter: no official checkpoint of these layouts is converted).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..layers import DropPath
from ..layers.pointwise import passes_through, pointwise_mlp
from ..layers.reparam_conv import DepthwiseConv2d, ReparamLargeKernelConv
from ._base import ConvNeXtMacroNet, drop_path_rates, factory_device
from ._pretrained import build_model_with_cfg, pretrained_cfg
from ._registry import register_model

__all__ = ["ConvNeXt", "ConvNeXtBlock", "model_cfgs", "default_cfgs", "TEST_MODELS"]


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
        in_chans, num_classes: input channels, classes (0: no classifier).
        global_pool: ``"avg"``, ``"max"``, ``"avgmax"`` or ``""`` (unpooled maps). drop_rate: dropout before
            the classifier.
        drop_path_rate, layer_scale_init_value, head_init_scale: as in ConvNeXt.
        features_only / out_indices: stage outputs (strides 4/8/16/32) through a LayerNorm each.
        output_stride: 32 only. device, dtype: where and in which dtype the parameters are created.

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
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        head_init_scale: float = 1.0,
        features_only: bool = False,
        out_indices: int | Sequence[int] | None = None,
        sync_bn: bool = False,
        output_stride: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_chans=in_chans, num_classes=num_classes, global_pool=global_pool, drop_rate=drop_rate,
                         output_stride=output_stride)
        if not len(depths) == len(dims) == len(kernel_sizes):
            raise ValueError(f"depths {tuple(depths)}, dims {tuple(dims)} and kernel_sizes {tuple(kernel_sizes)} "
                             "must have the same length")
        with factory_device(device):
            self._build_stem(in_chans, dims, "patchify")
            self.stages = nn.ModuleList()
            for c, ks, rates in zip(dims, kernel_sizes, drop_path_rates(drop_path_rate, depths)):
                sk = small_kernel if small_kernel is not None and ks > small_kernel else None
                self.stages.append(nn.Sequential(*[
                    ConvNeXtBlock(c, ks, sk, drop_path=rate, layer_scale_init_value=layer_scale_init_value,
                                  sync_bn=sync_bn)
                    for rate in rates
                ]))
            self._build_head(dims)
            self._finish_init(head_init_scale, features_only, out_indices, device, dtype)


def _create_convnext(variant: str, pretrained: bool = False, **kwargs) -> ConvNeXt:
    """Build the registered ``variant`` (its ``model_cfgs`` entry, overridden by ``kwargs``)."""
    return build_model_with_cfg(ConvNeXt, variant, pretrained, **{**model_cfgs[variant], **kwargs})


# -------------------------------------------------------------------------------------- pretrained cfgs
_CFG = dict(first_conv="stem.0", classifier="head", license="mit")
_CONVNEXT = dict(_CFG, paper_ids="arXiv:2201.03545", paper_name="A ConvNet for the 2020s (CVPR 2022)",
                 origin_url="https://github.com/facebookresearch/ConvNeXt", notes=(
                     "the official ConvNeXt weights use another key layout; lkvision has no converter for them",))
_LK = dict(_CFG, paper_ids="arXiv:2203.06717", paper_name="RepLKNet, Table 11 (ConvNeXt with 31x31 kernels)",
           origin_url="https://github.com/DingXiaoH/RepLKNet-pytorch", notes=("no released weights",))
default_cfgs: dict[str, dict] = {
    "convnext_t": pretrained_cfg(**_CONVNEXT),
    "convnext_s": pretrained_cfg(**_CONVNEXT),
    "convnext_lk_t": pretrained_cfg(**_LK),
    "convnext_lk_s": pretrained_cfg(**_LK),
    "convnext_nano_lk": pretrained_cfg(**_CFG, input_size=(3, 64, 64), pool_size=(2, 2), crop_pct=1.0,
                                       notes=("CPU test configuration (not published)",)),
}


# ----------------------------------------------------------------------------------- registered variants
model_cfgs: dict[str, dict] = {
    "convnext_t": dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), kernel_sizes=(7, 7, 7, 7)),
    "convnext_s": dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768), kernel_sizes=(7, 7, 7, 7)),
    "convnext_lk_t": dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), kernel_sizes=(31, 29, 27, 13),
                          small_kernel=5),
    "convnext_lk_s": dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768), kernel_sizes=(31, 29, 27, 13),
                          small_kernel=5),
    "convnext_nano_lk": dict(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128), kernel_sizes=(13, 11, 9, 5),
                             small_kernel=5),
}


@register_model
def convnext_t(pretrained: bool = False, **kwargs) -> ConvNeXt:
    """ConvNeXt-T (7x7 kernels; 28.6 M params, 4.5 GMACs @224)."""
    return _create_convnext("convnext_t", pretrained, **kwargs)


@register_model
def convnext_s(pretrained: bool = False, **kwargs) -> ConvNeXt:
    """ConvNeXt-S (7x7 kernels; 50.2 M params, 8.7 GMACs @224)."""
    return _create_convnext("convnext_s", pretrained, **kwargs)


@register_model
def convnext_lk_t(pretrained: bool = False, **kwargs) -> ConvNeXt:
    """ConvNeXt-T with 31-29-27-13 kernels and 5x5 re-param branches (RepLKNet Table 11)."""
    return _create_convnext("convnext_lk_t", pretrained, **kwargs)


@register_model
def convnext_lk_s(pretrained: bool = False, **kwargs) -> ConvNeXt:
    """ConvNeXt-S with 31-29-27-13 kernels and 5x5 re-param branches (RepLKNet Table 11)."""
    return _create_convnext("convnext_lk_s", pretrained, **kwargs)


@register_model
def convnext_nano_lk(pretrained: bool = False, **kwargs) -> ConvNeXt:
    """Tiny ConvNeXt with 13-11-9-5 kernels and 5x5 re-param branches, for tests and CPU demos."""
    return _create_convnext("convnext_nano_lk", pretrained, **kwargs)


TEST_MODELS: dict[str, dict] = {
    "convnext_nano_lk": {},
}
