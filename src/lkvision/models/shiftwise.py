"""ShiftWise (SW) networks: the ShiftWise_v2 macro architecture (UniRepLKNet-style) with Shiftwise convs.

Paper: "Shift-ConvNets / ShiftwiseConv: Small Convolutional Kernel with Large Kernel Effect" (CVPR 2025).

Macro architecture (``ShiftWiseNet``)::

    stem:        Conv3x3 s2 (C0/2) -> LN -> GELU -> Conv3x3 s2 (C0) -> LN                       (stride 4)
    downsample:  Conv3x3 s2 -> LN                                                            (x3, strides 8..32)
    block:       t = ShiftWiseConv2d(x) -> BN -> SE -> Linear(C, 4C) -> GELU -> GRN -> Linear(4C, C, no bias)
                     -> BN;   x = x + DropPath(gamma * t)
    head:        global average pool -> LayerNorm -> Linear

Deploy form (:func:`lkvision.reparameterize`): every ShiftWiseConv2d becomes two biased strip depth-wise
convs, the post-SW BN is folded into them, the GRN bias, the trailing BN and the layer scale are folded into
the second Linear. The layer names are ours; :mod:`lkvision.compat.shiftwise` maps official checkpoints.

File order (timm's): block -> model -> ``checkpoint_filter_fn`` -> ``_create_shiftwise`` -> ``default_cfgs``
(pretrained cfgs) -> ``model_cfgs`` and the registered variants.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..layers import GRN, DropPath, LayerScale2d, SEBlock, fold_bn_after_linear, make_bn
from ..layers.pointwise import passes_through, pointwise_mlp
from ..layers.shiftwise import ShiftWiseConv2d
from ._base import ConvNeXtMacroNet, drop_path_rates, factory_device
from ._pretrained import build_model_with_cfg, pretrained_cfg
from ._registry import register_model

__all__ = ["ShiftWiseNet", "ShiftWiseBlock", "model_cfgs", "default_cfgs", "checkpoint_filter_fn", "TEST_MODELS"]


class ShiftWiseBlock(nn.Module):
    """One ShiftWise_v2 block. Shapes: (B, C, H, W) -> (B, C, H, W).

    Sub-modules: ``sw_conv`` (ShiftWiseConv2d), ``sw_norm`` (BN), ``se`` (SE, C -> C/4 -> C), ``fc1``
    (Linear C -> 4C), ``act`` (GELU), ``grn`` (GRN over 4C), ``fc2`` (Linear 4C -> C, no bias), ``fc_norm``
    (BN), ``layer_scale`` (per-channel gamma, or Identity when ``layer_scale_init_value <= 0``), ``drop_path``.
    """

    def __init__(
        self,
        dim: int,
        big_kernel: int,
        small_kernel: int = 3,
        num_branches: int = 2,
        edges: int = 4,
        ghost_ratio: float = 0.23,
        drop_path: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        mlp_ratio: int = 4,
        bn: bool = True,
        sync_bn: bool = False,
        table_seed: int = 123,
        impl: str = "auto",
        restore_channel_order: bool = False,
    ) -> None:
        super().__init__()
        self.sw_conv = ShiftWiseConv2d(
            dim, big_kernel, small_kernel, num_branches=num_branches, edges=edges, ghost_ratio=ghost_ratio,
            bn=bn, sync_bn=sync_bn, table_seed=table_seed, impl=impl,
            restore_channel_order=restore_channel_order,
        )
        self.sw_norm = make_bn(dim, sync_bn)
        self.se = SEBlock(dim, dim // 4)
        hidden = mlp_ratio * dim
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.grn = GRN(hidden)
        self.fc2 = nn.Linear(hidden, dim, bias=False)
        self.fc_norm = make_bn(dim, sync_bn)
        self.layer_scale = LayerScale2d(dim, layer_scale_init_value) if layer_scale_init_value > 0 else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.se(self.sw_norm(self.sw_conv(x))).permute(0, 2, 3, 1)  # NHWC for the Linear layers and GRN
        if passes_through(self.fc_norm, self.layer_scale, self.drop_path):  # deploy: residual add fused into fc2
            return pointwise_mlp(y, self.fc1, self.act, self.fc2, self.grn, x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        y = self.layer_scale(self.fc_norm(pointwise_mlp(y, self.fc1, self.act, self.fc2, self.grn).permute(0, 3, 1, 2)))
        return x + self.drop_path(y)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold BNs, GRN bias and layer scale (in place, exact in eval mode, idempotent)."""
        if not isinstance(self.sw_norm, nn.Identity):
            self.sw_conv.fuse_output_bn(self.sw_norm)  # also folds the SW layer itself
            self.sw_norm = nn.Identity()
        self.sw_conv.reparameterize()
        # Let the SW strips run on all channels in input order (no split/concat at inference) and fold the
        # official rep-then-ghost output order into the consumers: SE (channel-wise) and the first Linear.
        inv = torch.argsort(self.sw_conv.expand_to_all_channels())
        if isinstance(self.se, SEBlock):
            self.se.down.weight.copy_(self.se.down.weight[:, inv])
            self.se.up.weight.copy_(self.se.up.weight[inv])
            self.se.up.bias.copy_(self.se.up.bias[inv])
        self.fc1.weight.copy_(self.fc1.weight[:, inv])
        fc2 = self.grn.fold_beta_into(self.fc2)
        if not isinstance(self.fc_norm, nn.Identity):
            scale = self.layer_scale.gamma if isinstance(self.layer_scale, LayerScale2d) else None
            fc2 = fold_bn_after_linear(fc2, self.fc_norm, scale)
            self.fc_norm = nn.Identity()
            self.layer_scale = nn.Identity()
        self.fc2 = fc2


class ShiftWiseNet(ConvNeXtMacroNet):
    """ShiftWise_v2 classification backbone (timm-style API from :class:`LargeKernelNet`).

    Args:
        depths, dims: blocks and channels per stage (4 stages).
        big_kernels: equivalent kernel size M of each stage (e.g. 51, 49, 47, 13).
        small_kernel: N, size of the small filters (3).
        num_branches: re-parameterisable branches per SW conv (2); edges: shift-add clones (4).
        ghost_ratio: fraction of channels that bypass each SW conv (0.23).
        in_chans, num_classes: input channels; classes (0: no classifier, ``forward`` returns pooled features).
        global_pool: ``"avg"`` (official), ``"max"``, ``"avgmax"`` or ``""`` (unpooled maps).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, rising linearly from 0 over all blocks.
        layer_scale_init_value: initial layer scale gamma (1e-6; <= 0 disables it).
        head_init_scale: scale of the initial classifier weights.
        bn: BatchNorms inside the SW convs; sync_bn: SyncBatchNorm everywhere a BN is used.
        table_seed: seed of the shift-add shuffle tables (123 = the official tables).
        impl: op implementation for the SW convs (see :func:`lkvision.ops.shiftwise_conv`).
        restore_channel_order: SW convs keep the input channel order (not checkpoint-compatible).
        features_only / out_indices: return normed stage feature maps (strides 4, 8, 16, 32).
        output_stride: 32 only (accepted for timm's feature API). device / dtype: where and in which dtype the
            parameters are created (``"meta"`` builds without allocating).

    Shapes: (B, in_chans, H, W) -> (B, num_classes) logits (H, W >= 32).
    """

    def __init__(
        self,
        depths: Sequence[int] = (3, 3, 18, 3),
        dims: Sequence[int] = (80, 160, 320, 640),
        big_kernels: Sequence[int] = (51, 49, 47, 13),
        small_kernel: int = 3,
        num_branches: int = 2,
        edges: int = 4,
        ghost_ratio: float = 0.23,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        head_init_scale: float = 1.0,
        mlp_ratio: int = 4,
        bn: bool = True,
        sync_bn: bool = False,
        table_seed: int = 123,
        impl: str = "auto",
        restore_channel_order: bool = False,
        features_only: bool = False,
        out_indices: int | Sequence[int] | None = None,
        output_stride: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_chans=in_chans, num_classes=num_classes, global_pool=global_pool, drop_rate=drop_rate,
                         output_stride=output_stride)
        depths, dims, big_kernels = tuple(depths), tuple(dims), tuple(big_kernels)
        if not (len(depths) == len(dims) == len(big_kernels) == 4):
            raise ValueError(
                f"depths, dims and big_kernels need 4 entries each, got {depths}, {dims}, {big_kernels}"
            )
        if any(int(d) != d or d < 1 for d in dims) or any(int(d) != d or d < 0 for d in depths):
            raise ValueError(f"dims must be positive and depths non-negative integers, got {dims}, {depths}")
        if dims[0] % 2:
            raise ValueError(f"dims[0] must be even (the stem halves it), got {dims[0]}")
        self.config = dict(
            depths=list(depths), dims=list(dims), big_kernels=list(big_kernels), small_kernel=small_kernel,
            num_branches=num_branches, edges=edges, ghost_ratio=ghost_ratio, in_chans=in_chans,
            num_classes=num_classes, drop_path_rate=drop_path_rate,
            layer_scale_init_value=layer_scale_init_value, head_init_scale=head_init_scale, mlp_ratio=mlp_ratio,
            bn=bn, table_seed=table_seed, restore_channel_order=restore_channel_order,
        )
        with factory_device(device):
            self._build_stem(in_chans, dims, "conv")
            self.stages = nn.ModuleList(
                nn.Sequential(*[
                    ShiftWiseBlock(
                        dims[i], big_kernels[i], small_kernel, num_branches=num_branches, edges=edges,
                        ghost_ratio=ghost_ratio, drop_path=rate, layer_scale_init_value=layer_scale_init_value,
                        mlp_ratio=mlp_ratio, bn=bn, sync_bn=sync_bn, table_seed=table_seed, impl=impl,
                        restore_channel_order=restore_channel_order,
                    )
                    for rate in rates
                ])
                for i, rates in enumerate(drop_path_rates(drop_path_rate, depths))
            )
            self._build_head(dims)
            self._finish_init(head_init_scale, features_only, out_indices, device, dtype)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: ShiftWiseNet) -> dict[str, torch.Tensor]:
    """An official ShiftWise_v2 checkpoint -> this model's keys (lkvision checkpoints pass unchanged).
    The official key map lives in :mod:`lkvision.compat.shiftwise`."""
    from ..compat import checkpoint_filter  # compat builds on this module: imported when weights are loaded

    return checkpoint_filter("shiftwise", state_dict, model)


def _create_shiftwise(variant: str, pretrained: bool = False, **kwargs) -> ShiftWiseNet:
    """Build the registered ``variant`` (its ``model_cfgs`` entry, overridden by ``kwargs``)."""
    return build_model_with_cfg(ShiftWiseNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                **{**model_cfgs[variant], **kwargs})


# -------------------------------------------------------------------------------------- pretrained cfgs
_CFG = dict(first_conv="stem.0", classifier="head", paper_ids="arXiv:2401.12736",
            paper_name="ShiftwiseConv: Small Convolutional Kernel with Large Kernel Effect (CVPR 2025)",
            origin_url="https://github.com/lidc54/shift-wiseConv")
_CPU = dict(input_size=(3, 64, 64), pool_size=(2, 2), crop_pct=1.0, notes=("CPU configuration (not from the paper)",))
default_cfgs: dict[str, dict] = {
    "sw_tiny.in1k": pretrained_cfg(**_CFG, notes=(
        "official SW-T weights (83.39% top-1, 300 epochs, 30% coarse sparsity) are on Google Drive: "
        "https://drive.google.com/file/d/1U4DOZv5V9_7wJdqdicjp0tCmNIdRNJOc/view?usp=sharing",)),
    "sw_small": pretrained_cfg(**_CFG, notes=("no released weights",)),
    "sw_base": pretrained_cfg(**_CFG, notes=("registered officially, never trained or reported",)),
    "sw_large": pretrained_cfg(**_CFG, notes=("registered officially, never trained or reported",)),
    "sw_nano": pretrained_cfg(**{**_CFG, **_CPU}),
    "sw_pico": pretrained_cfg(**{**_CFG, **_CPU}),
    "sw_femto": pretrained_cfg(**{**_CFG, **_CPU}),
}


# ----------------------------------------------------------------------------------- registered variants
# Paper variants use N = 3, G = 0.23, 2 branches, 4 edges, M = 51, 49, 47, 13 (official `kernel_size`
# [51, 49, 47, 13, 3]); sw_base/sw_large are registered in the official code but never trained.
# sw_nano/sw_pico/sw_femto are ours: small widths and kernels sized for CPU work at 64..224 px.
_PAPER = dict(big_kernels=(51, 49, 47, 13), small_kernel=3, num_branches=2, edges=4, ghost_ratio=0.23)
model_cfgs: dict[str, dict] = {
    "sw_tiny": dict(depths=(3, 3, 18, 3), dims=(80, 160, 320, 640), **_PAPER),
    "sw_small": dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768), **_PAPER),
    "sw_base": dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024), **_PAPER),
    "sw_large": dict(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536), **_PAPER),
    "sw_nano": dict(depths=(2, 2, 4, 2), dims=(32, 64, 128, 256), big_kernels=(31, 29, 27, 13),
                    small_kernel=3, num_branches=2, edges=4, ghost_ratio=0.23),
    "sw_pico": dict(depths=(1, 1, 3, 1), dims=(24, 48, 96, 192), big_kernels=(19, 17, 13, 7),
                    small_kernel=3, num_branches=2, edges=4, ghost_ratio=0.23),
    "sw_femto": dict(depths=(1, 1, 2, 1), dims=(16, 32, 48, 64), big_kernels=(13, 11, 9, 7),
                     small_kernel=3, num_branches=2, edges=4, ghost_ratio=0.23),
}


@register_model
def sw_tiny(pretrained: bool = False, **kwargs) -> ShiftWiseNet:
    """SW-T (paper: 31 M params with merged branches, 5.0 GMACs at 224^2, 83.39% top-1)."""
    return _create_shiftwise("sw_tiny", pretrained, **kwargs)


@register_model
def sw_small(pretrained: bool = False, **kwargs) -> ShiftWiseNet:
    """SW-S (paper: 56 M params, 9.4 GMACs)."""
    return _create_shiftwise("sw_small", pretrained, **kwargs)


@register_model
def sw_base(pretrained: bool = False, **kwargs) -> ShiftWiseNet:
    """SW-B (registered officially, never trained or reported)."""
    return _create_shiftwise("sw_base", pretrained, **kwargs)


@register_model
def sw_large(pretrained: bool = False, **kwargs) -> ShiftWiseNet:
    """SW-L (registered officially, never trained or reported)."""
    return _create_shiftwise("sw_large", pretrained, **kwargs)


@register_model
def sw_nano(pretrained: bool = False, **kwargs) -> ShiftWiseNet:
    """Small CPU configuration (not from the paper)."""
    return _create_shiftwise("sw_nano", pretrained, **kwargs)


@register_model
def sw_pico(pretrained: bool = False, **kwargs) -> ShiftWiseNet:
    """Tiny CPU configuration (not from the paper)."""
    return _create_shiftwise("sw_pico", pretrained, **kwargs)


@register_model
def sw_femto(pretrained: bool = False, **kwargs) -> ShiftWiseNet:
    """Smallest CPU configuration for unit tests (not from the paper)."""
    return _create_shiftwise("sw_femto", pretrained, **kwargs)


# Configurations small enough for CPU unit tests (< 1 s forward at 64^2); the generic model tests iterate them.
TEST_MODELS: dict[str, dict] = {
    "sw_femto": {},
    "sw_pico": dict(ghost_ratio=0.0, edges=2, layer_scale_init_value=0.0, drop_path_rate=0.1),
}
