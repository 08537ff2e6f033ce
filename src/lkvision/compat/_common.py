"""Checkpoint layouts shared by the official repositories (used by every ``lkvision.compat.<family>``).

* DDP-wrapped weights: keys prefixed ``module.``.
* Downstream (mmdet / mmseg) checkpoints: the backbone under ``backbone.``, next to ``neck.``, ``decode_head.``,
  ``roi_head.``...; the official downstream backbones (SLaK, UniRepLKNet, ShiftWise) add one channels-first
  LayerNorm per output stage, ``norm0`` .. ``norm3``, and drop the classifier ``norm``/``head``.
* Test-vector extras: keys ``__name__`` (inputs/outputs stored beside the weights).
* Conv + BN pairs already fused by the official tools (RepLKNet's ``deep_fuse_BN``: a biased ``conv``, no
  ``bn``): :func:`fold_fused_conv_bn` folds the same pairs of our model so that the keys match.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..layers.conv_bn import ConvBN

__all__ = ["unwrap_state_dict", "feature_norm_indices", "keep_feature_norms", "fold_fused_conv_bn"]

_FEATURE_NORM = re.compile(r"norm(\d)\.weight")


def unwrap_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official model's own state dict out of any released wrapping.

    Drops ``__*__`` keys, strips a leading ``module.`` (DDP), and -- when any key starts with ``backbone.``
    (a detection/segmentation checkpoint) -- keeps only the backbone keys, without the prefix.
    """
    sd = {k[7:] if k.startswith("module.") else k: v for k, v in state_dict.items()
          if not (k.startswith("__") and k.endswith("__"))}
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[9:]: v for k, v in sd.items() if k.startswith("backbone.")}
    return sd


def feature_norm_indices(state_dict: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    """Stages with a downstream output norm (``norm{i}.weight``) in an official backbone state dict."""
    return tuple(sorted(int(m.group(1)) for k in state_dict if (m := _FEATURE_NORM.fullmatch(k))))


def keep_feature_norms(state_dict: Mapping[str, torch.Tensor], out_indices: Sequence[int]) -> dict:
    """Drop ``norm{i}.*`` of stages not in ``out_indices`` (the official downstream backbones build a norm for
    every stage but use only those of ``out_indices``)."""
    keep = {int(i) for i in out_indices}
    return {k: v for k, v in state_dict.items()
            if not ((m := re.match(r"norm(\d)\.", k)) and int(m.group(1)) not in keep)}


@torch.no_grad()
def fold_fused_conv_bn(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Fold (in place, exactly) every :class:`~lkvision.layers.ConvBN` of ``model`` whose checkpoint entry
    (``state_dict`` in lkvision names) is a biased ``conv`` without ``bn``; returns their names."""
    folded = []
    for name, m in model.named_modules():
        if (isinstance(m, ConvBN) and not isinstance(m.bn, nn.Identity) and f"{name}.conv.bias" in state_dict
                and f"{name}.bn.running_mean" not in state_dict):
            m.reparameterize()
            folded.append(name)
    return folded
