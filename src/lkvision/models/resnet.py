"""ResNets (the small-kernel baselines of RepLKNet's ERF comparison, Table 10) behind the lkvision model API.

The network definition is timm's (``timm.models.resnet``, built with ``pretrained=False``); it is imported
only when an entry point is called, so ``lkvision.models`` never imports timm/torchvision at import time.
The wrapper exposes ``stem`` (conv1, bn1, act, maxpool) and ``stages`` (layer1..layer4) for the
lkvision API (``forward_features`` = layer4 output, ``features_only``, ``feature_info``), and
``reparameterize()`` folds every conv+BN pair into a biased conv (exact in eval mode).

Weights: timm/torchvision ResNet state dicts load after prefixing (see :func:`timm_key_to_lkvision`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..layers.conv_bn import fuse_bn
from ._base import LargeKernelNet
from ._registry import register_model

__all__ = ["ResNet", "FoldBNSequential", "fold_conv_bn_pairs", "timm_key_to_lkvision", "TEST_MODELS"]


@torch.no_grad()
def _fused_conv(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> nn.Conv2d:
    w, b = fuse_bn(conv.weight, bn, conv.bias)
    new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    dilation=conv.dilation, groups=conv.groups, bias=True, padding_mode=conv.padding_mode,
                    device=w.device, dtype=w.dtype)
    new.weight.copy_(w)
    new.bias.copy_(b)
    return new


def fold_conv_bn_pairs(module: nn.Module) -> int:
    """Fold every BN that directly follows a conv inside ``module`` (in place); returns the number folded.

    Pairs are recognised structurally: children named ``convN``/``bnN`` (``conv``/``bn``), whose forward
    applies the BN right after the conv (timm/torchvision ResNet blocks), and consecutive ``Conv2d``,
    ``BatchNorm2d`` children of an ``nn.Sequential`` (down-sampling shortcuts, stems).
    """
    n = 0
    for m in list(module.modules()):
        children = dict(m.named_children())
        if isinstance(m, nn.Sequential):
            keys = list(children)
            for a, b in zip(keys[:-1], keys[1:]):
                ca, cb = children[a], children[b]
                if isinstance(ca, nn.Conv2d) and isinstance(cb, nn.modules.batchnorm._BatchNorm):
                    setattr(m, a, _fused_conv(ca, cb))
                    setattr(m, b, nn.Identity())
                    n += 1
            continue
        for name, c in children.items():
            if isinstance(c, nn.Conv2d) and name.startswith("conv"):
                bn = children.get("bn" + name[4:])
                if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                    setattr(m, name, _fused_conv(c, bn))
                    setattr(m, "bn" + name[4:], nn.Identity())
                    n += 1
    return n


class FoldBNSequential(nn.Sequential):
    """``nn.Sequential`` whose ``reparameterize()`` folds all conv+BN pairs below it."""

    def reparameterize(self) -> None:
        fold_conv_bn_pairs(self)


class ResNet(LargeKernelNet):
    """lkvision wrapper of a timm ``ResNet`` (taken apart into ``stem`` / ``stages`` / ``head``).

    Shapes: (B, in_chans, H, W) -> (B, num_classes); ``forward_features`` -> (B, C4, H/32, W/32).
    """

    def __init__(self, net: nn.Module, features_only: bool = False, out_indices: Sequence[int] | None = None):
        super().__init__()
        self.in_chans = net.conv1.in_channels
        self.num_classes = net.num_classes
        self.num_features = net.num_features
        self.stem = FoldBNSequential(net.conv1, net.bn1, net.act1, net.maxpool)
        self.stages = nn.ModuleList(FoldBNSequential(*getattr(net, f"layer{i}")) for i in range(1, 5))
        self.feature_info = [
            dict(num_chs=fi["num_chs"], reduction=fi["reduction"], module=f"stages.{i}")
            for i, fi in enumerate(net.feature_info[1:])
        ]
        self.head = net.fc
        self._init_features_mode(features_only, out_indices)

    def stage_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.stem if i == 0 else nn.Identity(), s) for i, s in enumerate(self.stages)]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, C4, h, w) -> logits (B, num_classes) (pooled (B, C4) with ``pre_logits``)."""
        x = x.mean((2, 3))
        return x if pre_logits else self.head(x)


def timm_key_to_lkvision(key: str) -> str:
    """Map a timm/torchvision ResNet state-dict key to this wrapper's key (``layer2.0.conv1.weight`` ->
    ``stages.1.0.conv1.weight``, ``conv1.weight`` -> ``stem.0.weight``, ``fc.*`` -> ``head.*``)."""
    for i in range(1, 5):
        if key.startswith(f"layer{i}."):
            return f"stages.{i - 1}." + key[len(f"layer{i}."):]
    for old, new in (("conv1.", "stem.0."), ("bn1.", "stem.1."), ("fc.", "head.")):
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _timm_resnet(name: str, **kwargs) -> ResNet:
    features_only = kwargs.pop("features_only", False)
    out_indices = kwargs.pop("out_indices", None)
    try:
        from ..data._compat import ensure_torchvision
    except ImportError:  # pragma: no cover - the compat module is part of lkvision
        ensure_torchvision = None
    if ensure_torchvision is not None:
        ensure_torchvision()
    try:
        from timm.models import resnet as timm_resnet
    except Exception as e:  # noqa: BLE001 - re-raised with the remedy
        raise ImportError(f"{name} needs timm (pip install 'lkvision[train]'): {type(e).__name__}: {e}") from e
    net = getattr(timm_resnet, name)(pretrained=False, **kwargs)
    return ResNet(net, features_only=features_only, out_indices=out_indices)


@register_model
def resnet18(**kwargs) -> ResNet:
    """ResNet-18 (timm definition; 11.7 M params, 1.8 GMACs @224)."""
    return _timm_resnet("resnet18", **kwargs)


@register_model
def resnet50(**kwargs) -> ResNet:
    """ResNet-50 (timm definition; 25.6 M params, 4.1 GMACs @224)."""
    return _timm_resnet("resnet50", **kwargs)


@register_model
def resnet101(**kwargs) -> ResNet:
    """ResNet-101 (timm definition; 44.5 M params, 7.8 GMACs @224), ERF baseline of RepLKNet Table 10."""
    return _timm_resnet("resnet101", **kwargs)


@register_model
def resnet152(**kwargs) -> ResNet:
    """ResNet-152 (timm definition; 60.2 M params, 11.6 GMACs @224), ERF baseline of RepLKNet Table 10."""
    return _timm_resnet("resnet152", **kwargs)


TEST_MODELS: dict[str, dict] = {
    "resnet18": {},
}
