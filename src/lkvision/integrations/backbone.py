"""Framework-neutral pieces of the dense-prediction backbones: building, weight loading, freezing, LR decay ids.

Nothing here imports OpenMMLab; :mod:`lkvision.integrations.mmdet` / ``.mmseg`` wrap these for mmengine and
the lightweight paths (segmentation_models_pytorch, transformers) use :func:`build_backbone` directly.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from ..compat import FAMILIES
from ..models import CheckpointError, create_model, load_state_dict_file

__all__ = [
    "DOWNSTREAM_KWARGS", "build_backbone", "official_family", "load_backbone_weights", "stage_modules",
    "freeze_stages", "layer_id", "feature_channels", "feature_strides", "allow_numpy_checkpoints",
]

# What the official downstream code builds on top of the ImageNet model, when it differs from lkvision's
# ``features_only`` default (one LayerNorm per output for the ConvNeXt-like families, none for RepLKNet):
# RepLKNet-XL batch-normalises its outputs before the heads (RepLKNet README, tip 2).
DOWNSTREAM_KWARGS: dict[str, dict] = {
    "replknet_xl": dict(norm_intermediate_features=True),
}

_NORM_KEY = re.compile(r"^norm(\d+)\.(weight|bias|running_mean|running_var|num_batches_tracked)$")


def build_backbone(model_name: str, out_indices: Sequence[int] = (0, 1, 2, 3), sync_bn: bool = False,
                   with_cp: bool = False, **model_kwargs) -> nn.Module:
    """``lkvision.create_model(model_name, features_only=True, out_indices=...)`` with the official downstream
    output norms (:data:`DOWNSTREAM_KWARGS`), optional SyncBatchNorm and activation checkpointing.

    Returns a module mapping (B, 3, H, W) to a list of (B, C_i, H / s_i, W / s_i) (``feature_info`` gives C_i, s_i).
    """
    kwargs = {**DOWNSTREAM_KWARGS.get(model_name, {}), **model_kwargs}
    model = create_model(model_name, features_only=True, out_indices=tuple(out_indices), **kwargs)
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if with_cp:
        model.set_grad_checkpointing(True)
    return model


def _info_list(model: nn.Module) -> list[dict]:
    info = model.feature_info
    if hasattr(info, "get_dicts"):  # timm FeatureInfo
        return list(info.get_dicts())
    return list(info)


def feature_channels(model: nn.Module) -> list[int]:
    """Channels of each output of a ``features_only`` model."""
    return [int(d["num_chs"]) for d in _info_list(model)]


def feature_strides(model: nn.Module) -> list[int]:
    """Strides (reductions) of each output of a ``features_only`` model."""
    return [int(d["reduction"]) for d in _info_list(model)]


def official_family(model_name: str) -> str | None:
    """The :mod:`lkvision.compat` family whose ``MODEL_KWARGS`` lists ``model_name`` (None if no official format)."""
    for fam in FAMILIES:
        mod = importlib.import_module(f"lkvision.compat.{fam}")
        if model_name in getattr(mod, "MODEL_KWARGS", {}):
            return fam
    return None


def _family_of(model: nn.Module) -> str | None:
    """The compat family of a built model, from the module that defines its class."""
    fam = type(model).__module__.rsplit(".", 1)[-1]
    return fam if fam in FAMILIES else None


def _strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str | None) -> dict[str, torch.Tensor]:
    """Keep the keys under ``prefix`` (e.g. ``backbone.`` of a detector checkpoint), without it."""
    if prefix is None:
        prefix = "backbone." if any(k.startswith("backbone.") for k in sd) else ""
    if not prefix:
        return dict(sd)
    out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not out:
        raise CheckpointError(f"no key starts with {prefix!r} in the checkpoint")
    return out


def load_backbone_weights(model: nn.Module, model_name: str, checkpoint: str | os.PathLike | Mapping,
                          fmt: str = "auto", prefix: str | None = None,
                          official_kwargs: dict | None = None) -> dict[str, list[str]]:
    """Load ImageNet (or backbone) weights into a ``features_only`` model built by :func:`build_backbone`.

    ``checkpoint``: a file (safetensors, or a torch file read with ``weights_only=True`` through
    :func:`lkvision.models.load_state_dict_file`) or a state dict. ``fmt``: ``"lkvision"``, ``"official"``
    (converted by :func:`lkvision.compat.from_official` with the official kwargs of ``model_name``) or
    ``"auto"`` (lkvision if every backbone key is present, else official). ``prefix``: keys to keep (default:
    ``backbone.`` when present, e.g. a detector checkpoint). The classifier head is ignored; the per-output norms
    are loaded when the checkpoint has them (lkvision ``feature_norms.i.*`` or official downstream ``norm{i}.*``),
    ``official_kwargs``: the official constructor's kwargs (default: ``lkvision.compat.<family>.MODEL_KWARGS``
    of ``model_name``; needed for configurations that are not registered names),
    else they keep their identity init. Returns ``{"loaded": [...], "missing": [...]}`` (missing = output norms
    only; any other missing or mismatched key raises :class:`~lkvision.models.CheckpointError`).
    """
    if fmt not in ("auto", "lkvision", "official"):
        raise ValueError(f"format must be 'auto', 'lkvision' or 'official', got {fmt!r}")
    if isinstance(checkpoint, Mapping):
        sd = dict(checkpoint)
    else:
        sd = load_state_dict_file(checkpoint)  # weights-only, with lkvision's allow-list (numpy included)
    sd = _strip_prefix(sd, prefix)
    own = model.state_dict()
    # the output norms: lkvision's names or the official downstream ``norm{i}`` (the official backbones build
    # one for every stage; those of stages this model does not return are dropped, not converted)
    norms: dict[str, torch.Tensor] = {}
    for k in list(sd):
        m = _NORM_KEY.match(k)
        if m:
            v = sd.pop(k)
            if f"feature_norms.{m.group(1)}.{m.group(2)}" in own:
                norms[f"feature_norms.{m.group(1)}.{m.group(2)}"] = v
        elif k.startswith("feature_norms."):
            norms[k] = sd.pop(k)
    body_keys = {k for k in own if not k.startswith("feature_norms.")}
    use_official = fmt == "official" or (fmt == "auto" and not body_keys <= set(sd))
    if use_official:
        family = official_family(model_name)
        if family is None and official_kwargs is not None:
            family = _family_of(model)
        if family is None:
            missing = sorted(body_keys - set(sd))
            raise CheckpointError(
                f"checkpoint does not match lkvision's {model_name} ({len(missing)} backbone keys missing, e.g. "
                f"{missing[:4]}) and {model_name} has no official format to convert from"
            )
        from ..compat import from_official

        if official_kwargs is None:
            official_kwargs = importlib.import_module(f"lkvision.compat.{family}").MODEL_KWARGS[model_name]
        sd = from_official(family, sd, **official_kwargs).state_dict()
    body = {k: v for k, v in sd.items() if k in body_keys}
    missing = sorted(body_keys - set(body))
    if missing:
        raise CheckpointError(f"checkpoint for {model_name} lacks {len(missing)} backbone keys, e.g. {missing[:6]}")
    shapes = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in {**body, **norms}.items()
              if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if shapes:
        raise CheckpointError(f"shape mismatch loading {model_name}: " + "; ".join(shapes[:6]))
    body.update({k: v for k, v in norms.items() if k in own})
    result = model.load_state_dict(body, strict=False)
    return {"loaded": sorted(body), "missing": sorted(result.missing_keys)}


def _numpy_globals() -> list:
    """lkvision's checkpoint allow-list (:func:`lkvision.models._weights.checkpoint_safe_globals`) without
    ``argparse.Namespace``: numpy's scalar/array reconstruction only."""
    import argparse

    from ..models._weights import checkpoint_safe_globals

    return [g for g in checkpoint_safe_globals() if g is not argparse.Namespace]


@contextlib.contextmanager
def allow_numpy_checkpoints() -> Iterator[None]:
    """Within this block ``torch.load(..., weights_only=True)`` also accepts numpy scalars and arrays (official
    checkpoints store e.g. ``epoch`` / ``max_accuracy`` as numpy scalars; mmengine 0.10.7 calls ``torch.load``
    without ``weights_only``, which is weights-only since torch 2.6). Only numpy's array/scalar reconstruction is
    added to the allow-list: a file that pickles any other object still fails to load."""
    with torch.serialization.safe_globals(_numpy_globals()):
        yield


def stage_modules(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """``[(stem or downsample_i, stage_i), ...]`` of an lkvision model, in order."""
    if not hasattr(model, "stage_pairs"):
        raise TypeError(f"{type(model).__name__} does not expose stage_pairs(); not an lkvision model?")
    return list(model.stage_pairs())


def freeze_stages(model: nn.Module, frozen_stages: int) -> None:
    """Freeze (no grad, eval mode) the stem and stages ``0..frozen_stages`` (-1: nothing)."""
    for i, (pre, stage) in enumerate(stage_modules(model)):
        if i > frozen_stages:
            break
        for m in (pre, stage):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)


def layer_id(model: nn.Module, decay_type: str, num_layers: int) -> dict[int, int]:
    """``id(parameter) -> layer id`` for the layer-wise LR decay of the official ConvNeXt/UniRepLKNet code.

    ``layer_wise`` (ConvNeXt, UniRepLKNet, SW): stem 0; stage 0: 1; downsample 1 + stage 1: 2; downsample 2: 3;
    block j of stage 2: ``3 + j // 3``; downsample 3 + stage 3: ``num_layers``; anything else (output norms,
    neck, heads): ``num_layers + 1``. ``stage_wise`` (SLaK): stems/downsamples 0, stage i: ``i + 1``, anything
    else ``num_layers + 1``. The LR scale of layer id ``l`` is ``decay_rate ** (num_layers + 1 - l)``.
    Parameters of ``model`` not listed get the "anything else" id (the caller decides). A ``features_only``
    model without the stages after its last output (``out_indices=(0, 1, 2)``) gets the ids of the stages it has.
    """
    pairs = stage_modules(model)
    num_stages = len(model.feature_info)  # every stage, also those a features_only model removed
    if num_stages != 4:
        raise ValueError(f"layer-wise LR decay needs a 4-stage backbone, got {num_stages} stages")
    ids: dict[int, int] = {}

    def put(module: nn.Module, value: int) -> None:
        for p in module.parameters():
            ids[id(p)] = value

    if decay_type == "layer_wise":
        whole = {0: (0, 1), 1: (2, 2), 3: (num_layers, num_layers)}  # stage -> (id of pre, id of stage)
        for i, (pre, stage) in enumerate(pairs):
            if i in whole:
                put(pre, whole[i][0])
                put(stage, whole[i][1])
                continue
            blocks = list(stage.children()) if isinstance(stage, nn.Sequential) else [stage]
            last = 3 + (len(blocks) - 1) // 3
            if last >= num_layers:
                raise ValueError(
                    f"num_layers={num_layers} is too small for {len(blocks)} blocks in stage 2 (their ids reach "
                    f"{last}); use num_layers >= {last + 1} (the official configs: 9 for 18 blocks, 12 for 27)"
                )
            put(pre, 3)
            for j, block in enumerate(blocks):
                put(block, 3 + j // 3)
    elif decay_type == "stage_wise":
        if num_layers < 4:
            raise ValueError(f"stage_wise decay needs num_layers >= 4 (one id per stage), got {num_layers}")
        for i, (pre, stage) in enumerate(pairs):
            put(pre, 0)
            put(stage, i + 1)
    else:
        raise ValueError(f"decay_type must be 'layer_wise' or 'stage_wise', got {decay_type!r}")
    return ids
