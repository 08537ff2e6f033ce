"""RepLKNet (Ding et al., CVPR 2022): re-parameterised 31x31 depth-wise convs in a Swin-like macro design.

Structure (LK.md §1): stem (stride 4) -> 4 stages of [RepLK block, ConvFFN] x B_i with transitions
(1x1 conv + stride-2 DW 3x3) between stages -> BN on the map -> global average pool -> Linear.

Deploy form (:meth:`LargeKernelNet.reparameterize` / :func:`lkvision.reparameterize`), all exact in eval mode:
  * every large+small depth-wise pair merges into one biased large conv (Guideline 3);
  * every conv+BN pair (stem, transitions, 1x1 convs) folds into a biased conv;
  * every pre-BN folds into the following 1x1 conv (no padding, so exact);
  * the head BN folds into the classifier (BN -> average pool -> Linear is affine in the pooled map).
The deploy form has no BatchNorm left (except the optional per-output norms of ``features_only`` backbones
built with ``norm_intermediate_features=True``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..layers import DropPath, make_bn
from ..layers.conv_bn import ConvBN, fuse_bn
from ..layers.pointwise import passes_through
from ..layers.reparam_conv import ConvBNAct, ReparamLargeKernelConv, fold_bn_into_next_conv1x1
from ._base import LargeKernelNet
from ._registry import register_model

__all__ = ["RepLKNet", "RepLKBlock", "ConvFFN", "BNPoolHead", "TEST_MODELS"]


def _fold_prenorm(norm: nn.Module, pw: ConvBN) -> nn.Module:
    """Fold a pre-BN into the (already BN-fused) 1x1 conv of ``pw``; returns the new pre-norm (Identity)."""
    if isinstance(norm, nn.modules.batchnorm._BatchNorm) and isinstance(pw.bn, nn.Identity):
        pw.conv = fold_bn_into_next_conv1x1(norm, pw.conv)
        return nn.Identity()
    return norm


class RepLKBlock(nn.Module):
    """RepLK block: ``x + DropPath(pw2(ReLU(LK(pw1(BN(x))))))``.

    ``pw1`` = ReLU(BN(Conv1x1 C->D)), ``LK`` = re-parameterisable depth-wise K x K (+ small k x k) conv,
    ``pw2`` = BN(Conv1x1 D->C). Shapes: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, dw_channels: int, kernel_size: int, small_kernel: int | None,
                 drop_path: float = 0.0, sync_bn: bool = False) -> None:
        super().__init__()
        self.norm = make_bn(channels, sync_bn)
        self.pw1 = ConvBNAct(channels, dw_channels, 1, act=nn.ReLU(), sync_bn=sync_bn)
        self.large_kernel = ReparamLargeKernelConv(dw_channels, kernel_size, small_kernel, sync_bn=sync_bn)
        self.act = nn.ReLU()
        self.pw2 = ConvBN(dw_channels, channels, 1, sync_bn=sync_bn)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pw1(self.norm(x))
        y = self.act(self.large_kernel(y))
        if passes_through(self.drop_path):
            return self.pw2.forward_fused(y, residual=x)  # the residual add fused into the 1x1 conv
        return x + self.drop_path(self.pw2(y))

    def reparameterize(self) -> None:
        # children (pw1, large_kernel, pw2) are already fused: fold the pre-BN into pw1's 1x1 conv.
        self.norm = _fold_prenorm(self.norm, self.pw1)


class ConvFFN(nn.Module):
    """ConvFFN block: ``x + DropPath(BN(Conv1x1 4C->C)(GELU(BN(Conv1x1 C->4C)(BN(x)))))``.

    Shapes: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, hidden_channels: int, drop_path: float = 0.0,
                 sync_bn: bool = False) -> None:
        super().__init__()
        self.norm = make_bn(channels, sync_bn)
        self.pw1 = ConvBN(channels, hidden_channels, 1, sync_bn=sync_bn)
        self.act = nn.GELU()
        self.pw2 = ConvBN(hidden_channels, channels, 1, sync_bn=sync_bn)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pw1.forward_fused(self.norm(x), self.act)
        if passes_through(self.drop_path):
            return self.pw2.forward_fused(y, residual=x)  # the residual add fused into the 1x1 conv
        return x + self.drop_path(self.pw2(y))

    def reparameterize(self) -> None:
        self.norm = _fold_prenorm(self.norm, self.pw1)


class BNPoolHead(nn.Module):
    """Classifier head: BN on the map -> global average pool -> ``fc`` (Linear or Identity).

    Shapes: (B, C, H, W) -> (B, num_classes) (or (B, C) with ``pre_logits``). ``reparameterize()`` folds the
    BN into ``fc`` (exact: BN is a per-channel affine map and commutes with averaging).
    """

    def __init__(self, channels: int, num_classes: int, sync_bn: bool = False) -> None:
        super().__init__()
        self.norm = make_bn(channels, sync_bn)
        self.fc = nn.Linear(channels, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.norm(x).mean((2, 3))
        return x if pre_logits else self.fc(x)

    @torch.no_grad()
    def reparameterize(self) -> None:
        if not isinstance(self.norm, nn.modules.batchnorm._BatchNorm) or not isinstance(self.fc, nn.Linear):
            return
        one = torch.ones(self.norm.num_features, 1, device=self.fc.weight.device, dtype=self.fc.weight.dtype)
        s, t = fuse_bn(one, self.norm)
        fc = self.fc
        new = nn.Linear(fc.in_features, fc.out_features, device=fc.weight.device, dtype=fc.weight.dtype)
        new.weight.copy_(fc.weight * s.reshape(1, -1))
        new.bias.copy_(fc.bias + fc.weight @ t)
        self.fc = new
        self.norm = nn.Identity()


class RepLKNet(LargeKernelNet):
    """RepLKNet classifier / backbone.

    Args:
        large_kernel_sizes: K per stage, e.g. (31, 29, 27, 13).
        layers: number of [RepLK block, ConvFFN] pairs per stage, e.g. (2, 2, 18, 2).
        channels: C per stage.
        small_kernel: size of the parallel re-param kernel (5), or ``None`` (RepLKNet-XL).
        dw_ratio: depth-wise width D = int(C * dw_ratio) (1.5 for XL).
        ffn_ratio: ConvFFN hidden width = int(C * ffn_ratio).
        drop_path_rate: stochastic depth, linear over the B_1 + ... + B_4 block pairs.
        norm_intermediate_features: ``features_only`` outputs go through a BN (XL downstream).
        features_only / out_indices: return the stage outputs (strides 4/8/16/32, C_i channels).
        use_checkpoint: activation checkpointing of every block.
        sync_bn: SyncBatchNorm everywhere (the official default; ours is False).

    Shapes: (B, in_chans, H, W) -> (B, num_classes); H and W >= 32.
    """

    def __init__(
        self,
        large_kernel_sizes: Sequence[int] = (31, 29, 27, 13),
        layers: Sequence[int] = (2, 2, 18, 2),
        channels: Sequence[int] = (128, 256, 512, 1024),
        small_kernel: int | None = 5,
        dw_ratio: float = 1.0,
        ffn_ratio: float = 4.0,
        in_chans: int = 3,
        num_classes: int = 1000,
        drop_path_rate: float = 0.0,
        norm_intermediate_features: bool = False,
        features_only: bool = False,
        out_indices: Sequence[int] | None = None,
        use_checkpoint: bool = False,
        sync_bn: bool = False,
    ) -> None:
        super().__init__()
        if not len(large_kernel_sizes) == len(layers) == len(channels):
            raise ValueError(
                f"large_kernel_sizes {tuple(large_kernel_sizes)}, layers {tuple(layers)} and channels "
                f"{tuple(channels)} must have the same length"
            )
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_features = channels[-1]
        self.norm_intermediate_features = norm_intermediate_features
        self.sync_bn = sync_bn
        c0 = channels[0]
        relu = nn.ReLU
        self.stem = nn.Sequential(
            ConvBNAct(in_chans, c0, 3, stride=2, act=relu(), sync_bn=sync_bn),
            ConvBNAct(c0, c0, 3, stride=1, groups=c0, act=relu(), sync_bn=sync_bn),
            ConvBNAct(c0, c0, 1, act=relu(), sync_bn=sync_bn),
            ConvBNAct(c0, c0, 3, stride=2, groups=c0, act=relu(), sync_bn=sync_bn),
        )
        dpr = torch.linspace(0, drop_path_rate, sum(layers), device="cpu").tolist()
        self.stages = nn.ModuleList()
        self.transitions = nn.ModuleList()
        k = 0
        for i, (n, c, ks) in enumerate(zip(layers, channels, large_kernel_sizes)):
            blocks = []
            for _ in range(n):
                blocks.append(RepLKBlock(c, int(c * dw_ratio), ks, small_kernel, dpr[k], sync_bn))
                blocks.append(ConvFFN(c, int(c * ffn_ratio), dpr[k], sync_bn))
                k += 1
            self.stages.append(nn.Sequential(*blocks))
            if i < len(layers) - 1:
                nxt = channels[i + 1]
                self.transitions.append(nn.Sequential(
                    ConvBNAct(c, nxt, 1, act=relu(), sync_bn=sync_bn),
                    ConvBNAct(nxt, nxt, 3, stride=2, groups=nxt, act=relu(), sync_bn=sync_bn),
                ))
        self.feature_info = [
            dict(num_chs=c, reduction=4 * 2 ** i, module=f"stages.{i}") for i, c in enumerate(channels)
        ]
        self.head = BNPoolHead(channels[-1], num_classes, sync_bn)
        if use_checkpoint:
            self.set_grad_checkpointing(True)
        self._init_features_mode(features_only, out_indices)

    def stage_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        pres = [self.stem, *self.transitions]
        return list(zip(pres, self.stages))

    def make_feature_norm(self, index: int, channels: int) -> nn.Module:
        return make_bn(channels, self.sync_bn) if self.norm_intermediate_features else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, C4, h, w) -> logits (B, num_classes), or the pooled (B, C4) features with ``pre_logits``."""
        return self.head(x, pre_logits=pre_logits)

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "avg"):
            raise ValueError(f"only global_pool='avg' is supported, got {global_pool!r}")
        if not isinstance(self.head.norm, nn.modules.batchnorm._BatchNorm) and isinstance(self.head.fc, nn.Linear):
            raise RuntimeError("reset_classifier: the head BN has been folded into the classifier "
                               "(deploy form); reset the classifier before re-parameterising")
        self.num_classes = num_classes
        w = next(self.head.parameters(), None)
        kw = dict(device=w.device, dtype=w.dtype) if w is not None else {}
        self.head.fc = nn.Linear(self.num_features, num_classes, **kw) if num_classes > 0 else nn.Identity()


# --------------------------------------------------------------------------------------------- configs
_BASE = dict(layers=(2, 2, 18, 2), channels=(128, 256, 512, 1024))

CONFIGS: dict[str, dict] = {
    "replknet_31b": dict(large_kernel_sizes=(31, 29, 27, 13), small_kernel=5, **_BASE),
    "replknet_31l": dict(large_kernel_sizes=(31, 29, 27, 13), layers=(2, 2, 18, 2),
                         channels=(192, 384, 768, 1536), small_kernel=5),
    "replknet_xl": dict(large_kernel_sizes=(27, 27, 27, 13), layers=(2, 2, 18, 2),
                        channels=(256, 512, 1024, 2048), small_kernel=None, dw_ratio=1.5),
    # Table 5 ablations (B = [2, 2, 18, 2], C = [128..1024], re-param 5x5 where K > 5).
    "replknet_3": dict(large_kernel_sizes=(3, 3, 3, 3), small_kernel=None, **_BASE),
    "replknet_7": dict(large_kernel_sizes=(7, 7, 7, 7), small_kernel=5, **_BASE),
    "replknet_13": dict(large_kernel_sizes=(13, 13, 13, 13), small_kernel=5, **_BASE),
    "replknet_25": dict(large_kernel_sizes=(25, 25, 25, 13), small_kernel=5, **_BASE),
    # tiny model for tests and CPU demos
    "replknet_nano": dict(large_kernel_sizes=(13, 11, 9, 5), layers=(1, 1, 2, 1), channels=(16, 32, 64, 128),
                          small_kernel=5),
}


def _build(name: str, **kwargs) -> RepLKNet:
    return RepLKNet(**{**CONFIGS[name], **kwargs})


@register_model
def replknet_31b(**kwargs) -> RepLKNet:
    """RepLKNet-31B: K = 31-29-27-13, C = 128..1024, B = 2-2-18-2 (79 M params, 15.3 GMACs @224)."""
    return _build("replknet_31b", **kwargs)


@register_model
def replknet_31l(**kwargs) -> RepLKNet:
    """RepLKNet-31L: C = 192..1536 (172 M params)."""
    return _build("replknet_31l", **kwargs)


@register_model
def replknet_xl(**kwargs) -> RepLKNet:
    """RepLKNet-XL: K = 27-27-27-13, C = 256..2048, dw_ratio 1.5, no small kernel (335 M params)."""
    return _build("replknet_xl", **kwargs)


@register_model
def replknet_3(**kwargs) -> RepLKNet:
    """Table-5 ablation RepLKNet-3: all kernels 3x3 (no re-param branch: k=5 would exceed K)."""
    return _build("replknet_3", **kwargs)


@register_model
def replknet_7(**kwargs) -> RepLKNet:
    """Table-5 ablation RepLKNet-7: all kernels 7x7 with the 5x5 re-param branch."""
    return _build("replknet_7", **kwargs)


@register_model
def replknet_13(**kwargs) -> RepLKNet:
    """Table-5 ablation RepLKNet-13: all kernels 13x13 with the 5x5 re-param branch."""
    return _build("replknet_13", **kwargs)


@register_model
def replknet_25(**kwargs) -> RepLKNet:
    """Table-5 ablation RepLKNet-25: K = 25-25-25-13 with the 5x5 re-param branch."""
    return _build("replknet_25", **kwargs)


@register_model
def replknet_nano(**kwargs) -> RepLKNet:
    """Tiny RepLKNet (K = 13-11-9-5, C = 16..128, B = 1-1-2-1) for tests and CPU demos."""
    return _build("replknet_nano", **kwargs)


# Tiny CPU configurations the generic model tests iterate over (< 1 s forward at 64x64).
TEST_MODELS: dict[str, dict] = {
    "replknet_nano": {},
}
