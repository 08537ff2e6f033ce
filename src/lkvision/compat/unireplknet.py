"""Official UniRepLKNet checkpoints (AILab-CVC/UniRepLKNet ``unireplknet.py``) -> lkvision ``UniRepLKNet``.

Accepted: the train form, the official deploy form (``deploy=True`` / after ``reparameterize_unireplknet()``:
``dwconv.lk_origin`` with bias, no block ``norm``, no GRN ``beta``, no ``gamma``, ``pwconv2.0`` with bias),
and the downstream "features" form (``norm0..norm3`` instead of ``norm``/``head``), also inside an mmdet/mmseg
checkpoint (``backbone.*``) or DDP-wrapped (``module.*``). Every variant (A/F/P/N/T/S/B/L/XL, the IN-22k
pretraining checkpoints with their 21841-class head -- pass ``num_classes=21841`` -- and the 384 fine-tuned
ones, whose weights do not depend on the resolution) and every block kernel size the official block accepts
(0 = no depth-wise conv, 3, 5, and the dilated-reparam sizes 7..17) load.

Official -> lkvision names::

    downsample_layers.0.{j}             -> stem.{j}
    downsample_layers.{i}.{j}  (i >= 1) -> downsamples.{i-1}.{j}
    stages.i.j.dwconv.lk_origin         -> stages.i.j.dwconv.main.conv
    stages.i.j.dwconv.origin_bn         -> stages.i.j.dwconv.main.bn
    stages.i.j.dwconv.dil_conv_k{k}_{r} -> stages.i.j.dwconv.branches.{n}.conv   (n = position of (k, r))
    stages.i.j.dwconv.dil_bn_k{k}_{r}   -> stages.i.j.dwconv.branches.{n}.bn
    stages.i.j.norm                     -> stages.i.j.dwconv_bn
    stages.i.j.pwconv1.1                -> stages.i.j.fc1
    stages.i.j.act.1.{gamma,beta}       -> stages.i.j.grn.{gamma,beta}
    stages.i.j.pwconv2.0                -> stages.i.j.fc2
    stages.i.j.pwconv2.2                -> stages.i.j.fc2_bn
    stages.i.j.gamma                    -> stages.i.j.layer_scale.gamma
    norm{i}                             -> feature_norms.{i}
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping

import torch

from ..layers.dilated import dilated_branches_for
from ..models._weights import CheckpointError, check_state_dict
from ..models.unireplknet import UniRepLKNet, model_cfgs
from ._common import drop_pruned, feature_norm_indices, unwrap_state_dict

__all__ = ["from_official", "convert_state_dict", "official_to_model_kwargs", "MODEL_KWARGS", "OFFICIAL_VARIANTS"]

#: official constructor kwargs of each registered lkvision model: the official variants share our config table
#: (depths, dims; kernel sizes are the official per-depth defaults); the tiny test config has no official twin.
MODEL_KWARGS: dict[str, dict] = {
    name: dict(depths=cfg["depths"], dims=cfg["dims"])
    for name, cfg in model_cfgs.items() if "kernel_sizes" not in cfg
}

#: the official variants (``unireplknet_a`` .. ``unireplknet_xl`` in the official ``unireplknet.py``), as official
#: constructor kwargs; every one is a registered lkvision model, so this is :data:`MODEL_KWARGS`. IN-22k
#: pretraining checkpoints add ``num_classes=21841``.
OFFICIAL_VARIANTS: dict[str, dict] = MODEL_KWARGS

_OFFICIAL_KWARGS = {
    "in_chans", "num_classes", "depths", "dims", "drop_path_rate", "layer_scale_init_value",
    "head_init_scale", "kernel_sizes", "deploy", "with_cp", "init_cfg", "attempt_use_lk_impl", "use_sync_bn",
}


def _looks_deployed(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.endswith("pwconv2.0.bias") for k in sd)


def official_to_model_kwargs(sd: Mapping[str, torch.Tensor] | None = None, **official_kwargs) -> dict:
    """Translate official ``UniRepLKNet(...)`` kwargs into lkvision ``UniRepLKNet`` kwargs."""
    unknown = set(official_kwargs) - _OFFICIAL_KWARGS
    if unknown:  # the official constructor takes **kwargs and ignores them; so do we, loudly
        warnings.warn(f"ignoring official UniRepLKNet arguments it does not use: {sorted(unknown)}",
                      stacklevel=3)
    kw = dict(
        depths=tuple(official_kwargs.get("depths", (3, 3, 27, 3))),
        dims=tuple(official_kwargs.get("dims", (96, 192, 384, 768))),
        kernel_sizes=official_kwargs.get("kernel_sizes"),
        in_chans=official_kwargs.get("in_chans", 3),
        num_classes=official_kwargs.get("num_classes", 1000) or 0,  # None in the official downstream mode
        drop_path_rate=official_kwargs.get("drop_path_rate", 0.0),
        layer_scale_init_value=official_kwargs.get("layer_scale_init_value", 1e-6),
        head_init_scale=official_kwargs.get("head_init_scale", 1.0),
        sync_bn=bool(official_kwargs.get("use_sync_bn", False)),
        deploy=bool(official_kwargs.get("deploy", False)) or (sd is not None and _looks_deployed(sd)),
    )
    if sd is not None and (idx := feature_norm_indices(sd)):
        kw.update(features_only=True, out_indices=idx)
    elif official_kwargs.get("init_cfg") is not None:
        kw.update(features_only=True, out_indices=(0, 1, 2, 3))
    return kw


def _map_key(key: str, kernel_sizes: tuple[tuple[int, ...], ...]) -> str:
    m = re.fullmatch(r"downsample_layers\.(\d+)\.(.+)", key)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        return f"stem.{rest}" if i == 0 else f"downsamples.{i - 1}.{rest}"
    m = re.fullmatch(r"norm(\d)\.(.+)", key)
    if m:
        return f"feature_norms.{m.group(1)}.{m.group(2)}"
    m = re.fullmatch(r"stages\.(\d+)\.(\d+)\.(.+)", key)
    if not m:
        return key  # norm.*, head.*
    i, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
    pre = f"stages.{i}.{j}."
    if rest == "gamma":
        return pre + "layer_scale.gamma"
    rules = (
        (r"dwconv\.lk_origin\.(.+)", "dwconv.main.conv.{0}"),
        (r"dwconv\.origin_bn\.(.+)", "dwconv.main.bn.{0}"),
        (r"norm\.(.+)", "dwconv_bn.{0}"),
        (r"pwconv1\.1\.(.+)", "fc1.{0}"),
        (r"act\.1\.(gamma|beta)", "grn.{0}"),
        (r"pwconv2\.0\.(.+)", "fc2.{0}"),
        (r"pwconv2\.2\.(.+)", "fc2_bn.{0}"),
    )
    for pattern, target in rules:
        mm = re.fullmatch(pattern, rest)
        if mm:
            return pre + target.format(*mm.groups())
    mm = re.fullmatch(r"dwconv\.dil_(conv|bn)_k(\d+)_(\d+)\.(.+)", rest)
    if mm:
        kind, k, r, tail = mm.group(1), int(mm.group(2)), int(mm.group(3)), mm.group(4)
        try:
            specs = dilated_branches_for(kernel_sizes[i][j])
            n = specs.index((k, r))
        except (IndexError, ValueError) as e:
            raise CheckpointError(
                f"official key {key!r} does not fit the configuration (block kernel sizes {kernel_sizes})"
            ) from e
        return pre + f"dwconv.branches.{n}.{kind}.{tail}"
    return pre + rest  # dwconv.weight/bias (3x3, 5x5), se.*


def convert_state_dict(sd: Mapping[str, torch.Tensor], kernel_sizes) -> dict[str, torch.Tensor]:
    """Rename an official state dict to lkvision names (keys starting and ending with ``__`` are dropped)."""
    ks = tuple(tuple(int(k) for k in s) for s in kernel_sizes)
    return {_map_key(k, ks): v for k, v in sd.items() if not (k.startswith("__") and k.endswith("__"))}


def from_official(state_dict: Mapping[str, torch.Tensor], **official_kwargs) -> UniRepLKNet:
    """Build an lkvision ``UniRepLKNet`` from official constructor kwargs and load an official state dict.

    The deploy form is recognised from the keys (or ``deploy=True``); the returned model is then the
    lkvision deploy-form model. Raises :class:`~lkvision.models.CheckpointError` naming bad keys.
    """
    sd = unwrap_state_dict(state_dict)
    kw = official_to_model_kwargs(sd, **official_kwargs)
    model = UniRepLKNet(**kw)
    converted = drop_pruned(convert_state_dict(sd, model.kernel_sizes), model)
    check_state_dict(model, converted, strict=True)
    model.load_state_dict(converted, strict=True)
    return model.eval()


def convert_for_model(state_dict: Mapping[str, torch.Tensor], model: UniRepLKNet) -> dict[str, torch.Tensor]:
    """The pretrained-weights filter (:func:`lkvision.compat.checkpoint_filter`): official keys (classification,
    deploy form, or a downstream backbone's ``norm0..3``) -> ``model``'s keys."""
    return convert_state_dict(state_dict, model.kernel_sizes)
