"""ResNets (the small-kernel baselines of RepLKNet's ERF comparison, Table 10) behind the lkvision model API.

The network definition is timm's (``timm.models.resnet``, built with ``pretrained=False``); it is imported
only when an entry point is called, so ``lkvision.models`` never imports timm/torchvision at import time.
The wrapper exposes ``stem`` (conv1, bn1, act, maxpool) and ``stages`` (layer1..layer4) for the
lkvision API (``forward_features`` = layer4 output, ``features_only``, ``feature_info``), and
``reparameterize()`` folds every conv+BN pair into a biased conv (exact in eval mode).

Weights: timm/torchvision ResNet state dicts load through ``checkpoint_filter_fn`` (:func:`timm_key_to_lkvision`);
``pretrained=True`` takes torchvision's ImageNet weights from timm's Hugging Face Hub copies (``*.tv_in1k``).

File order (timm's): helpers -> model -> ``checkpoint_filter_fn`` -> ``_create_resnet`` -> ``default_cfgs`` ->
registered variants.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..layers.conv_bn import fuse_bn
from ._base import LargeKernelNet, factory_device
from ._pretrained import build_model_with_cfg, pretrained_cfg
from ._registry import register_model

__all__ = ["ResNet", "FoldBNSequential", "fold_conv_bn_pairs", "timm_key_to_lkvision", "default_cfgs",
           "checkpoint_filter_fn", "TEST_MODELS"]


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
    """lkvision wrapper of timm's ``ResNet`` ``variant`` (taken apart into ``stem`` / ``stages`` / ``head``).

    Args:
        arch: timm's ResNet entry point (``"resnet50"``, ...), built without weights.
        in_chans, num_classes, drop_path_rate: passed to timm's constructor.
        global_pool: ``"avg"``, ``"max"``, ``"avgmax"`` or ``""`` (unpooled maps). drop_rate: dropout before
            the classifier.
        features_only / out_indices: stage outputs (strides 4/8/16/32), no extra norm.
        output_stride: 32 only. device, dtype: where and in which dtype the parameters are created.

    Shapes: (B, in_chans, H, W) -> (B, num_classes); ``forward_features`` -> (B, C4, H/32, W/32).
    """

    def __init__(
        self,
        arch: str = "resnet50",
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        features_only: bool = False,
        out_indices: int | Sequence[int] | None = None,
        output_stride: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_chans=in_chans, num_classes=num_classes, global_pool=global_pool, drop_rate=drop_rate,
                         output_stride=output_stride)
        with factory_device(device):
            net = _timm_resnet(arch, in_chans=in_chans, num_classes=num_classes, drop_path_rate=drop_path_rate)
            self.num_features = net.num_features
            self.stem = FoldBNSequential(net.conv1, net.bn1, net.act1, net.maxpool)
            self.stages = nn.ModuleList(FoldBNSequential(*getattr(net, f"layer{i}")) for i in range(1, 5))
            self.feature_info = [
                dict(num_chs=fi["num_chs"], reduction=fi["reduction"], module=f"stages.{i}")
                for i, fi in enumerate(net.feature_info[1:])
            ]
            self.head = net.fc
            self.pass_through = nn.Identity()  # the (no-op) module before stages 1..3
            self._init_features_mode(features_only, out_indices)
        self._to_device_dtype(device, dtype)

    def stage_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.stem if i == 0 else self.pass_through, s) for i, s in enumerate(self.stages)]


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


def _timm_resnet(variant: str, **kwargs) -> nn.Module:
    from ..data._compat import ensure_torchvision  # timm imports torchvision

    ensure_torchvision()
    try:
        from timm.models import resnet as timm_resnet
    except Exception as e:  # noqa: BLE001 - re-raised with the remedy
        raise ImportError(f"{variant} needs timm (pip install 'lkvision[train]'): {type(e).__name__}: {e}") from e
    return getattr(timm_resnet, variant)(pretrained=False, **kwargs)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: ResNet) -> dict[str, torch.Tensor]:
    """A timm/torchvision ResNet state dict -> this wrapper's keys (lkvision checkpoints pass unchanged)."""
    if any(k.startswith(("stem.", "stages.")) for k in state_dict):
        return dict(state_dict)
    return {timm_key_to_lkvision(k): v for k, v in state_dict.items()}


def _create_resnet(variant: str, pretrained: bool = False, **kwargs) -> ResNet:
    """Build the registered ``variant`` (timm's definition of the same name)."""
    return build_model_with_cfg(ResNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                arch=variant, **kwargs)


# -------------------------------------------------------------------------------------- pretrained cfgs
# torchvision's ImageNet weights (RepLKNet's ERF baselines) as hosted by timm on the Hugging Face Hub.
def _tv(name: str) -> dict:
    return pretrained_cfg(hf_hub_id=f"timm/{name}.tv_in1k", hf_hub_filename="model.safetensors",
                          interpolation="bilinear", first_conv="stem.0", classifier="head", license="bsd-3-clause",
                          origin_url="https://github.com/pytorch/vision", paper_ids="arXiv:1512.03385")


default_cfgs: dict[str, dict] = {f"{n}.tv_in1k": _tv(n) for n in ("resnet18", "resnet50", "resnet101", "resnet152")}


# ----------------------------------------------------------------------------------- registered variants
@register_model
def resnet18(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-18 (timm definition; 11.7 M params, 1.8 GMACs @224)."""
    return _create_resnet("resnet18", pretrained, **kwargs)


@register_model
def resnet50(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-50 (timm definition; 25.6 M params, 4.1 GMACs @224)."""
    return _create_resnet("resnet50", pretrained, **kwargs)


@register_model
def resnet101(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-101 (timm definition; 44.5 M params, 7.8 GMACs @224), ERF baseline of RepLKNet Table 10."""
    return _create_resnet("resnet101", pretrained, **kwargs)


@register_model
def resnet152(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-152 (timm definition; 60.2 M params, 11.6 GMACs @224), ERF baseline of RepLKNet Table 10."""
    return _create_resnet("resnet152", pretrained, **kwargs)


TEST_MODELS: dict[str, dict] = {
    "resnet18": {},
}
