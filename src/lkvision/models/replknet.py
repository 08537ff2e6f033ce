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

File order (timm's): blocks -> head -> model -> ``checkpoint_filter_fn`` -> ``_create_replknet`` ->
``default_cfgs`` -> ``model_cfgs`` and the registered variants.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..layers import DropPath, make_bn
from ..layers.conv_bn import ConvBN, fuse_bn
from ..layers.pointwise import passes_through
from ..layers.reparam_conv import ConvBNAct, ReparamLargeKernelConv, fold_bn_into_next_conv1x1
from ._base import LargeKernelNet, channels_last_apply, drop_path_rates, factory_device, global_pool_2d
from ._pretrained import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD, build_model_with_cfg, pretrained_cfg
from ._registry import register_model

__all__ = ["RepLKNet", "RepLKBlock", "ConvFFN", "BNPoolHead", "model_cfgs", "default_cfgs", "checkpoint_filter_fn",
           "TEST_MODELS"]


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
    """Classifier head parts: ``norm`` (BN on the map) and ``fc`` (Linear or Identity); :meth:`RepLKNet.forward_head`
    runs BN -> global pool (``pool_type``) -> dropout -> fc.

    ``reparameterize()`` folds the BN into ``fc`` (exact for average pooling and for ``pool_type=""``: BN is a
    per-channel affine map and commutes with averaging; not for max pooling, where the BN stays).
    """

    def __init__(self, channels: int, num_classes: int, pool_type: str = "avg", sync_bn: bool = False) -> None:
        super().__init__()
        self.norm = make_bn(channels, sync_bn)
        self.fc = nn.Linear(channels, num_classes) if num_classes > 0 else nn.Identity()
        self.pool_type = pool_type
        self.bn_folded = False

    @torch.no_grad()
    def reparameterize(self) -> None:
        if (not isinstance(self.norm, nn.modules.batchnorm._BatchNorm) or not isinstance(self.fc, nn.Linear)
                or self.pool_type not in ("avg", "")):
            return
        one = torch.ones(self.norm.num_features, 1, device=self.fc.weight.device, dtype=self.fc.weight.dtype)
        s, t = fuse_bn(one, self.norm)
        fc = self.fc
        new = nn.Linear(fc.in_features, fc.out_features, device=fc.weight.device, dtype=fc.weight.dtype)
        new.weight.copy_(fc.weight * s.reshape(1, -1))
        new.bias.copy_(fc.bias + fc.weight @ t)
        self.fc = new
        self.norm = nn.Identity()
        self.bn_folded = True


class RepLKNet(LargeKernelNet):
    """RepLKNet classifier / backbone.

    Args:
        large_kernel_sizes: K per stage, e.g. (31, 29, 27, 13).
        layers: number of [RepLK block, ConvFFN] pairs per stage, e.g. (2, 2, 18, 2).
        channels: C per stage.
        small_kernel: size of the parallel re-param kernel (5), or ``None`` (RepLKNet-XL).
        dw_ratio: depth-wise width D = int(C * dw_ratio) (1.5 for XL).
        ffn_ratio: ConvFFN hidden width = int(C * ffn_ratio).
        in_chans, num_classes: input channels, classes (0: no classifier).
        global_pool: ``"avg"`` (official), ``"max"``, ``"avgmax"`` or ``""`` (unpooled maps).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, linear over the B_1 + ... + B_4 block pairs.
        norm_intermediate_features: ``features_only`` outputs go through a BN (XL downstream).
        features_only / out_indices: return the stage outputs (strides 4/8/16/32, C_i channels).
        use_checkpoint: activation checkpointing of every block.
        sync_bn: SyncBatchNorm everywhere (the official default; ours is False).
        output_stride: 32 only. device, dtype: where and in which dtype the parameters are created.

    Shapes: (B, in_chans, H, W) -> (B, num_classes); H and W >= 32.
    """

    downsample_attr = "transitions"

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
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_intermediate_features: bool = False,
        features_only: bool = False,
        out_indices: int | Sequence[int] | None = None,
        use_checkpoint: bool = False,
        sync_bn: bool = False,
        output_stride: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_chans=in_chans, num_classes=num_classes, global_pool=global_pool, drop_rate=drop_rate,
                         output_stride=output_stride)
        if not len(large_kernel_sizes) == len(layers) == len(channels):
            raise ValueError(
                f"large_kernel_sizes {tuple(large_kernel_sizes)}, layers {tuple(layers)} and channels "
                f"{tuple(channels)} must have the same length"
            )
        self.num_features = channels[-1]
        self.norm_intermediate_features = norm_intermediate_features
        self.sync_bn = sync_bn
        c0 = channels[0]
        relu = nn.ReLU
        with factory_device(device):
            self.stem = nn.Sequential(
                ConvBNAct(in_chans, c0, 3, stride=2, act=relu(), sync_bn=sync_bn),
                ConvBNAct(c0, c0, 3, stride=1, groups=c0, act=relu(), sync_bn=sync_bn),
                ConvBNAct(c0, c0, 1, act=relu(), sync_bn=sync_bn),
                ConvBNAct(c0, c0, 3, stride=2, groups=c0, act=relu(), sync_bn=sync_bn),
            )
            self.stages = nn.ModuleList()
            self.transitions = nn.ModuleList()
            rates_per_stage = drop_path_rates(drop_path_rate, layers)
            for i, (c, ks, rates) in enumerate(zip(channels, large_kernel_sizes, rates_per_stage)):
                blocks = []
                for rate in rates:
                    blocks.append(RepLKBlock(c, int(c * dw_ratio), ks, small_kernel, rate, sync_bn))
                    blocks.append(ConvFFN(c, int(c * ffn_ratio), rate, sync_bn))
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
            self.head = BNPoolHead(channels[-1], num_classes, global_pool, sync_bn)
            if use_checkpoint:
                self.set_grad_checkpointing(True)
            self._init_features_mode(features_only, out_indices)
        self._to_device_dtype(device, dtype)

    def stage_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        pres = [self.stem, *self.transitions]
        return list(zip(pres, self.stages))

    def make_feature_norm(self, index: int, channels: int) -> nn.Module:
        return make_bn(channels, self.sync_bn) if self.norm_intermediate_features else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, C4, h, w) -> BN -> global pool -> dropout -> logits (B, num_classes), or the pooled (B, C4)
        features with ``pre_logits``; with ``global_pool=""`` the classifier runs at every position."""
        x = self.head_drop(global_pool_2d(self.head.norm(x), self.global_pool))
        return x if pre_logits else channels_last_apply(self.head.fc, x, not self.global_pool)

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def _set_classifier(self, module: nn.Module) -> None:
        self.head.fc = module

    def _prune_head_norm(self) -> None:
        self.head.norm = nn.Identity()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if self.head.bn_folded and num_classes > 0:
            raise RuntimeError("reset_classifier: the head BN has been folded into the classifier "
                               "(deploy form); reset the classifier before re-parameterising")
        super().reset_classifier(num_classes, global_pool)
        self.head.pool_type = self.global_pool


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: RepLKNet) -> dict[str, torch.Tensor]:
    """An official RepLKNet checkpoint (train or deploy form, classifier or backbone) -> this model's keys;
    lkvision checkpoints pass unchanged. The official key map lives in :mod:`lkvision.compat.replknet`."""
    from ..compat import checkpoint_filter  # compat builds on this module: imported when weights are loaded

    return checkpoint_filter("replknet", state_dict, model)


def _create_replknet(variant: str, pretrained: bool = False, **kwargs) -> RepLKNet:
    """Build the registered ``variant`` (its ``model_cfgs`` entry, overridden by ``kwargs``)."""
    return build_model_with_cfg(RepLKNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                **{**model_cfgs[variant], **kwargs})


# -------------------------------------------------------------------------------------- pretrained cfgs
# Official weights are on Google Drive and Baidu (access code "lknt"), links from the official README.
_CFG = dict(first_conv="stem.0.conv", classifier="head.fc", license="mit", paper_ids="arXiv:2203.06717",
            paper_name="Scaling Up Your Kernels to 31x31: Revisiting Large Kernel Design in CNNs (CVPR 2022)",
            origin_url="https://github.com/DingXiaoH/RepLKNet-pytorch")
_384 = dict(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0, crop_mode="squash")


def _drive(what: str, drive: str, baidu: str, **kwargs) -> dict:
    return pretrained_cfg(**{**_CFG, **kwargs}, notes=(
        f"official weights ({what}): Google Drive https://drive.google.com/file/d/{drive}/view?usp=sharing, "
        f"Baidu https://pan.baidu.com/s/{baidu}?pwd=lknt",))


default_cfgs: dict[str, dict] = {
    "replknet_31b.in1k": _drive("83.5% top-1", "1azQUiCxK9feYVkkrPqwVPBtNsTzDrX7S", "1gspbbfqooMtegt_DO1TUeA"),
    "replknet_31b.in1k_384": _drive("84.8% top-1 at 384", "1vo-P3XB6mRLUeDzmgv90dOu73uCeLfZN",
                                    "1WhLaCKKv4NuKc3qMYECOIQ", **_384),
    "replknet_31b.in22k_ft_in1k": _drive("85.2% top-1", "1DslZ2voXZQR1QoFY9KnbsHAeF84hzS0s",
                                         "169wDunCdop-jQM8K-AX27g"),
    "replknet_31b.in22k_ft_in1k_384": _drive("86.0% top-1 at 384", "1Sc46BWdXXm2fVP-K_hKKU_W8vAB-0duX",
                                             "11-F3JIKEzSOU7KUhebUWEQ", **_384),
    "replknet_31b.in22k": _drive("ImageNet-22K pretraining", "1PYJiMszZYNrkZOeYwjccvxX8UHMALB7z",
                                 "1YiQSn7VJDiNWX1IWg19O6g", num_classes=21841),
    "replknet_31l.in22k_ft_in1k_384": _drive("86.6% top-1 at 384", "1JYXoNHuRvC33QV1pmpzMTKEni1hpWfBl",
                                             "1MWIsPXJJV4mTEtgcKv3F3w", **_384),
    "replknet_31l.in22k": _drive("ImageNet-22K pretraining", "16jcPsPwo5rko7ojWS9k_W-svHX-iFknY",
                                 "1KWazk_cOVYoLuuVJc_9HxA", num_classes=21841),
    "replknet_xl.megdata73m_ft_in1k_320": _drive(
        "87.8% top-1 at 320, MegData-73M pretraining; mean/std 0.5", "1tPC60El34GntXByIRHb-z-Apm4Y5LX1T",
        "1C1bJJLz9O28ChZ4NcxjUsw", input_size=(3, 320, 320), pool_size=(10, 10), crop_pct=1.0,
        crop_mode="squash", mean=IMAGENET_INCEPTION_MEAN, std=IMAGENET_INCEPTION_STD),
    "replknet_3": pretrained_cfg(**_CFG, notes=("Table-5 ablation; no released weights",)),
    "replknet_7": pretrained_cfg(**_CFG, notes=("Table-5 ablation; no released weights",)),
    "replknet_13": pretrained_cfg(**_CFG, notes=("Table-5 ablation; no released weights",)),
    "replknet_25": pretrained_cfg(**_CFG, notes=("Table-5 ablation; no released weights",)),
    "replknet_nano": pretrained_cfg(**_CFG, input_size=(3, 64, 64), pool_size=(2, 2), crop_pct=1.0,
                                    notes=("CPU test configuration (not published)",)),
}


# ----------------------------------------------------------------------------------- registered variants
_BASE = dict(layers=(2, 2, 18, 2), channels=(128, 256, 512, 1024))
model_cfgs: dict[str, dict] = {
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


@register_model
def replknet_31b(pretrained: bool = False, **kwargs) -> RepLKNet:
    """RepLKNet-31B: K = 31-29-27-13, C = 128..1024, B = 2-2-18-2 (79 M params, 15.3 GMACs @224)."""
    return _create_replknet("replknet_31b", pretrained, **kwargs)


@register_model
def replknet_31l(pretrained: bool = False, **kwargs) -> RepLKNet:
    """RepLKNet-31L: C = 192..1536 (172 M params)."""
    return _create_replknet("replknet_31l", pretrained, **kwargs)


@register_model
def replknet_xl(pretrained: bool = False, **kwargs) -> RepLKNet:
    """RepLKNet-XL: K = 27-27-27-13, C = 256..2048, dw_ratio 1.5, no small kernel (335 M params)."""
    return _create_replknet("replknet_xl", pretrained, **kwargs)


@register_model
def replknet_3(pretrained: bool = False, **kwargs) -> RepLKNet:
    """Table-5 ablation RepLKNet-3: all kernels 3x3 (no re-param branch: k=5 would exceed K)."""
    return _create_replknet("replknet_3", pretrained, **kwargs)


@register_model
def replknet_7(pretrained: bool = False, **kwargs) -> RepLKNet:
    """Table-5 ablation RepLKNet-7: all kernels 7x7 with the 5x5 re-param branch."""
    return _create_replknet("replknet_7", pretrained, **kwargs)


@register_model
def replknet_13(pretrained: bool = False, **kwargs) -> RepLKNet:
    """Table-5 ablation RepLKNet-13: all kernels 13x13 with the 5x5 re-param branch."""
    return _create_replknet("replknet_13", pretrained, **kwargs)


@register_model
def replknet_25(pretrained: bool = False, **kwargs) -> RepLKNet:
    """Table-5 ablation RepLKNet-25: K = 25-25-25-13 with the 5x5 re-param branch."""
    return _create_replknet("replknet_25", pretrained, **kwargs)


@register_model
def replknet_nano(pretrained: bool = False, **kwargs) -> RepLKNet:
    """Tiny RepLKNet (K = 13-11-9-5, C = 16..128, B = 1-1-2-1) for tests and CPU demos."""
    return _create_replknet("replknet_nano", pretrained, **kwargs)


# Tiny CPU configurations the generic model tests iterate over (< 1 s forward at 64x64).
TEST_MODELS: dict[str, dict] = {
    "replknet_nano": {},
}
