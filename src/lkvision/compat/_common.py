"""Checkpoint layouts shared by the official repositories (used by every ``lkvision.compat.<family>``).

* DDP-wrapped weights: keys prefixed ``module.``.
* Downstream (mmdet / mmseg) checkpoints: the backbone under ``backbone.``, next to ``neck.``, ``decode_head.``,
  ``roi_head.``...; the official downstream backbones (SLaK, UniRepLKNet, ShiftWise) add one channels-first
  LayerNorm per output stage, ``norm0`` .. ``norm3``, and drop the classifier ``norm``/``head``.
* Test-vector extras: keys ``__name__`` (inputs/outputs stored beside the weights).
* Re-parameterised parts (an official deploy form, RepLKNet's ``deep_fuse_BN``: a biased ``conv`` and no
  ``bn``): :func:`reparameterize_to_match` brings the same parts of our model into that form.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..models._pretrained import drop_pruned  # re-exported: the same filter apply_state_dict uses

__all__ = ["unwrap_state_dict", "feature_norm_indices", "downstream_out_indices", "keep_feature_norms", "drop_pruned",
           "reparameterize_to_match"]

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


def downstream_out_indices(state_dict: Mapping[str, torch.Tensor] | None,
                           out_indices: Sequence[int] | None) -> tuple[int, ...] | None:
    """The outputs of an official downstream backbone: ``out_indices`` when given, else the stages whose output
    norm ``state_dict`` holds (:func:`feature_norm_indices`); ``None`` (a classifier) when neither names any."""
    if out_indices is not None:
        return tuple(out_indices)
    return (feature_norm_indices(state_dict) if state_dict is not None else ()) or None


def keep_feature_norms(state_dict: Mapping[str, torch.Tensor], out_indices: Sequence[int]) -> dict:
    """Drop ``norm{i}.*`` of stages not in ``out_indices`` (the official downstream backbones build a norm for
    every stage but use only those of ``out_indices``)."""
    keep = {int(i) for i in out_indices}
    return {k: v for k, v in state_dict.items()
            if not ((m := re.match(r"norm(\d)\.", k)) and int(m.group(1)) not in keep)}


@torch.no_grad()
def reparameterize_to_match(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Bring sub-modules of ``model`` into the (re-parameterised) form a checkpoint holds; returns their names.

    A sub-module with ``reparameterize()`` whose keys differ from the checkpoint's under its name (some missing,
    some unexpected) is re-parameterised -- on a copy, kept only if its keys then match exactly. Deepest modules
    first, so a merged large kernel is handled before the block around it. This covers an official deploy form
    (``lkb_reparam``), conv + BN pairs fused by RepLKNet's ``deep_fuse_BN`` and converted deploy files.
    ``state_dict`` is in lkvision names. The values are not loaded here.
    """
    changed = []
    candidates = [(n, m) for n, m in model.named_modules() if n and callable(getattr(m, "reparameterize", None))]
    for name, module in sorted(candidates, key=lambda t: -t[0].count(".")):
        prefix = name + "."
        ckpt = {k[len(prefix):] for k in state_dict if k.startswith(prefix)}
        own = set(module.state_dict())
        if not ckpt or not (own - ckpt) or not (ckpt - own):
            continue
        trial = copy.deepcopy(module)
        trial.reparameterize()
        if set(trial.state_dict()) == ckpt:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, trial)
            changed.append(name)
    return changed
