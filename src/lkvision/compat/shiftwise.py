"""Official ShiftWise checkpoints (lidc54/shift-wiseConv, ``backbones/SW_v2_unirep.py``, ``ShiftWise_v2``).

``from_official(state_dict, **official_kwargs)`` builds :class:`lkvision.models.shiftwise.ShiftWiseNet` from
the official constructor's keyword arguments and loads the official state dict, either the train form
(``large_kernel.LoRAs.{b}.weight``, one per Rep branch) or the official deploy form
(``large_kernel.LoRA.weight``, branches merged; our model is then built with ``num_branches=1``).
``to_official(model)`` goes the other way (train form, or the merged form with ``merged=True``).
Any ``N_path`` (Rep branches), ``N_rep`` (edges), ``ghost_ratio``, kernel sizes (M per stage, odd N <= M),
``bn`` and layer scale of the official constructor load. The downstream backbones
(``downstream/*/SW_v2_unirep.py``: ``norm0..3`` instead of ``norm``/``head``) load into a ``features_only``
model, also from an mmdet/mmseg checkpoint (``backbone.*``); ``module.`` (DDP) prefixes are stripped. As in the
official constructor (which takes ``**kwargs``), arguments it does not know are ignored -- with a warning.

The shift tables and the ghost split are not in official checkpoints; our model regenerates them bit for bit
(seed 123) and keeps them as buffers.

Key map (official -> lkvision), ``i`` = stage, ``j`` = block::

    downsample_layers.0.{0,1,3,4}.*          -> stem.{0,1,3,4}.*
    downsample_layers.{1,2,3}.{0,1}.*        -> downsamples.{0,1,2}.{0,1}.*
    stages.i.j.large_kernel.LoRAs.{b}.weight -> stages.i.j.sw_conv.branches.{b}.weight
    stages.i.j.large_kernel.LoRA.weight      -> stages.i.j.sw_conv.branches.0.weight
    stages.i.j.large_kernel.bn_lora1.*       -> stages.i.j.sw_conv.bn_h.*     (horizontal output)
    stages.i.j.large_kernel.bn_lora2.*       -> stages.i.j.sw_conv.bn_v.*     (vertical output)
    stages.i.j.large_kernel.bn_small.*       -> stages.i.j.sw_conv.bn_s.*     (identity/small output)
    stages.i.j.norm.*                        -> stages.i.j.sw_norm.*
    stages.i.j.se.{down,up}.*                -> stages.i.j.se.{down,up}.*
    stages.i.j.pwconv1.1.*                   -> stages.i.j.fc1.*
    stages.i.j.act.1.{gamma,beta}            -> stages.i.j.grn.{gamma,beta}
    stages.i.j.pwconv2.0.weight              -> stages.i.j.fc2.weight
    stages.i.j.pwconv2.2.*                   -> stages.i.j.fc_norm.*
    stages.i.j.gamma                         -> stages.i.j.layer_scale.gamma
    norm{i}.*   (downstream backbones)       -> feature_norms.{i}.*
    norm.*                                   -> norm.*
    head.*                                   -> head.*
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping

import torch

from ..models._weights import CheckpointError, classifier_size_hint
from ..models.shiftwise import ShiftWiseNet
from ._common import downstream_out_indices, drop_pruned, keep_feature_norms, unwrap_state_dict

__all__ = ["from_official", "to_official", "official_to_lkvision_kwargs", "convert_state_dict", "MODEL_KWARGS",
           "OFFICIAL_DEFAULTS", "TABLE_BUFFERS"]

# Defaults of the official ShiftWise_v2 constructor (note kernel_size: the paper's models pass [51,49,47,13,3]).
OFFICIAL_DEFAULTS: dict = dict(
    in_chans=3, num_classes=1000, depths=[3, 3, 9, 3], dims=[96, 192, 384, 768], drop_path_rate=0.0,
    layer_scale_init_value=1e-6, head_init_scale=1.0, kernel_size=[51, 49, 45, 13, 5], width_factor=1.0,
    bn=True, ghost_ratio=0.23, N_path=2, N_rep=4, left_first_stage=False,
)
_IGNORED = {"left_first_stage", "pretrained", "in_22k"}  # accepted by the official code, no effect here
# the downstream backbones' arguments: out_indices selects the outputs; init_cfg only names the file to load and
# sparse only re-applies the zeros the checkpoint holds.
_DOWNSTREAM = {"out_indices", "init_cfg", "sparse"}

_PAPER = dict(kernel_size=[51, 49, 47, 13, 3], ghost_ratio=0.23, N_path=2, N_rep=4)
# Official constructor kwargs of each registered lkvision model (sw_tiny = ShiftWise_v2_tiny with the paper's
# kernel sizes and ghost ratio, as in the released checkpoint's training command).
MODEL_KWARGS: dict[str, dict] = {
    "sw_tiny": dict(depths=[3, 3, 18, 3], dims=[80, 160, 320, 640], **_PAPER),
    "sw_small": dict(depths=[3, 3, 27, 3], dims=[96, 192, 384, 768], **_PAPER),
    "sw_base": dict(depths=[3, 3, 27, 3], dims=[128, 256, 512, 1024], **_PAPER),
    "sw_large": dict(depths=[3, 3, 27, 3], dims=[192, 384, 768, 1536], **_PAPER),
    "sw_nano": dict(depths=[2, 2, 4, 2], dims=[32, 64, 128, 256], kernel_size=[31, 29, 27, 13, 3],
                    ghost_ratio=0.23, N_path=2, N_rep=4),
    "sw_pico": dict(depths=[1, 1, 3, 1], dims=[24, 48, 96, 192], kernel_size=[19, 17, 13, 7, 3],
                    ghost_ratio=0.23, N_path=2, N_rep=4),
    "sw_femto": dict(depths=[1, 1, 2, 1], dims=[16, 32, 48, 64], kernel_size=[13, 11, 9, 7, 3],
                     ghost_ratio=0.23, N_path=2, N_rep=4),
}

# Our buffers that official checkpoints do not hold (regenerated deterministically at construction).
TABLE_BUFFERS = ("sw_conv.pad_hv", "sw_conv.idx_identit", "sw_conv.rep_idx", "sw_conv.ghost_idx")

_BLOCK_MAP = [  # (official suffix regex, lkvision suffix template) inside stages.i.j.
    (r"large_kernel\.LoRAs\.(\d+)\.weight", r"sw_conv.branches.\1.weight"),
    (r"large_kernel\.LoRA\.weight", "sw_conv.branches.0.weight"),
    (r"large_kernel\.bn_lora1\.(.+)", r"sw_conv.bn_h.\1"),
    (r"large_kernel\.bn_lora2\.(.+)", r"sw_conv.bn_v.\1"),
    (r"large_kernel\.bn_small\.(.+)", r"sw_conv.bn_s.\1"),
    (r"norm\.(.+)", r"sw_norm.\1"),
    (r"se\.(down|up)\.(weight|bias)", r"se.\1.\2"),
    (r"pwconv1\.1\.(weight|bias)", r"fc1.\1"),
    (r"act\.1\.(gamma|beta)", r"grn.\1"),
    (r"pwconv2\.0\.weight", "fc2.weight"),
    (r"pwconv2\.2\.(.+)", r"fc_norm.\1"),
    (r"gamma", "layer_scale.gamma"),
]
_INVERSE_BLOCK_MAP = [
    (r"sw_conv\.branches\.(\d+)\.weight", r"large_kernel.LoRAs.\1.weight"),
    (r"sw_conv\.bn_h\.(.+)", r"large_kernel.bn_lora1.\1"),
    (r"sw_conv\.bn_v\.(.+)", r"large_kernel.bn_lora2.\1"),
    (r"sw_conv\.bn_s\.(.+)", r"large_kernel.bn_small.\1"),
    (r"sw_norm\.(.+)", r"norm.\1"),
    (r"se\.(down|up)\.(weight|bias)", r"se.\1.\2"),
    (r"fc1\.(weight|bias)", r"pwconv1.1.\1"),
    (r"grn\.(gamma|beta)", r"act.1.\1"),
    (r"fc2\.weight", "pwconv2.0.weight"),
    (r"fc_norm\.(.+)", r"pwconv2.2.\1"),
    (r"layer_scale\.gamma", "gamma"),
]


def _map_key(key: str) -> str | None:
    """Official key -> lkvision key (None if the key is not part of ShiftWise_v2)."""
    m = re.fullmatch(r"downsample_layers\.0\.([0134])\.(weight|bias)", key)
    if m:
        return f"stem.{m[1]}.{m[2]}"
    m = re.fullmatch(r"downsample_layers\.([123])\.([01])\.(weight|bias)", key)
    if m:
        return f"downsamples.{int(m[1]) - 1}.{m[2]}.{m[3]}"
    m = re.fullmatch(r"(stages\.\d+\.\d+)\.(.+)", key)
    if m:
        for pat, rep in _BLOCK_MAP:
            if re.fullmatch(pat, m[2]):
                return f"{m[1]}." + re.sub(f"^{pat}$", rep, m[2])
        return None
    if re.fullmatch(r"(norm|head)\.(weight|bias)", key):
        return key  # the head keeps its official names
    m = re.fullmatch(r"norm([0-3])\.(weight|bias)", key)
    if m:
        return f"feature_norms.{m[1]}.{m[2]}"
    return None


def _inverse_key(key: str, merged: bool) -> str | None:
    m = re.fullmatch(r"stem\.([0134])\.(weight|bias)", key)
    if m:
        return f"downsample_layers.0.{m[1]}.{m[2]}"
    m = re.fullmatch(r"downsamples\.([012])\.([01])\.(weight|bias)", key)
    if m:
        return f"downsample_layers.{int(m[1]) + 1}.{m[2]}.{m[3]}"
    m = re.fullmatch(r"(stages\.\d+\.\d+)\.(.+)", key)
    if m:
        if m[2].startswith("sw_conv.") and m[2].split(".", 1)[1] in {b.split(".", 1)[1] for b in TABLE_BUFFERS}:
            return None
        if merged and m[2] == "sw_conv.branches.0.weight":
            return f"{m[1]}.large_kernel.LoRA.weight"
        for pat, rep in _INVERSE_BLOCK_MAP:
            if re.fullmatch(pat, m[2]):
                return f"{m[1]}." + re.sub(f"^{pat}$", rep, m[2])
        raise KeyError(f"no official name for {key!r}")
    if re.fullmatch(r"(norm|head)\.(weight|bias)", key):
        return key
    m = re.fullmatch(r"feature_norms\.([0-3])\.(weight|bias)", key)
    if m:
        return f"norm{m[1]}.{m[2]}"
    raise KeyError(f"no official name for {key!r}")


def official_to_lkvision_kwargs(sd: Mapping[str, torch.Tensor] | None = None, **official_kwargs) -> dict:
    """Official ``ShiftWise_v2`` constructor kwargs (and, given ``sd``, its downstream layout) ->
    :class:`ShiftWiseNet` kwargs."""
    unknown = set(official_kwargs) - set(OFFICIAL_DEFAULTS) - _IGNORED - _DOWNSTREAM
    if unknown:  # the official constructor takes **kwargs and ignores them; so do we, loudly
        warnings.warn(f"ignoring ShiftWise_v2 arguments it does not use: {sorted(unknown)} (known: "
                      f"{sorted(OFFICIAL_DEFAULTS)})", stacklevel=3)
        official_kwargs = {k: v for k, v in official_kwargs.items() if k not in unknown}
    kw = {**OFFICIAL_DEFAULTS, **official_kwargs}
    ks = list(kw["kernel_size"])
    if len(ks) != 5:
        raise ValueError(f"kernel_size must list the 4 stage kernels M and the small kernel N, got {ks}")
    dims = [int(d * kw["width_factor"]) for d in kw["dims"]]
    idx = downstream_out_indices(sd, kw.get("out_indices"))
    features = {} if idx is None else dict(num_classes=0, features_only=True, out_indices=list(idx))
    return dict(
        depths=list(kw["depths"]), dims=dims, big_kernels=ks[:4], small_kernel=ks[4],
        num_branches=kw["N_path"], edges=kw["N_rep"], ghost_ratio=kw["ghost_ratio"], in_chans=kw["in_chans"],
        num_classes=kw["num_classes"], drop_path_rate=kw["drop_path_rate"],
        layer_scale_init_value=kw["layer_scale_init_value"], head_init_scale=kw["head_init_scale"], bn=kw["bn"],
    ) | features


def _is_deploy_form(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(k.endswith("large_kernel.LoRA.weight") for k in state_dict)


def convert_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename official keys to lkvision keys; raises :class:`CheckpointError` naming unknown keys."""
    out, unknown = {}, []
    for k, v in unwrap_state_dict(state_dict).items():
        new = _map_key(k)
        if new is None:
            unknown.append(k)
        else:
            out[new] = v
    if unknown:
        raise CheckpointError(
            f"keys that are not part of an official ShiftWise_v2 state dict ({len(unknown)}): "
            + ", ".join(sorted(unknown)[:12]) + (" ..." if len(unknown) > 12 else "")
        )
    return out


def from_official(state_dict: Mapping[str, torch.Tensor], **official_kwargs) -> ShiftWiseNet:
    """Build our :class:`ShiftWiseNet` for an official ShiftWise_v2 state dict and load it (strict).

    ``official_kwargs``: the official constructor arguments (``depths``, ``dims``, ``kernel_size``,
    ``ghost_ratio``, ``N_path``, ``N_rep``, ``width_factor``, ``bn``, ``layer_scale_init_value``, ...; the
    official defaults apply, so pass ``kernel_size=[51, 49, 47, 13, 3]`` for the released SW-T, or use
    ``**MODEL_KWARGS['sw_tiny']``). The official deploy form (``LoRA`` instead of ``LoRAs.{b}``) is detected
    and loaded into a model with one branch. Missing, unexpected or mis-shaped keys raise
    :class:`CheckpointError` naming them (in official names).
    """
    state_dict = unwrap_state_dict(state_dict)
    kw = official_to_lkvision_kwargs(state_dict, **official_kwargs)
    if kw.get("features_only"):
        state_dict = keep_feature_norms(state_dict, kw["out_indices"])
    if _is_deploy_form(state_dict):
        kw["num_branches"] = 1
    else:
        n = len({m[1] for k in state_dict if (m := re.search(r"large_kernel\.LoRAs\.(\d+)\.weight$", k))})
        if n and n != kw["num_branches"]:
            raise CheckpointError(f"the checkpoint has {n} Rep branches (LoRAs.*) but N_path={kw['num_branches']}")
    official_name = {_map_key(k): k for k in state_dict}
    model = ShiftWiseNet(**kw)
    sd = drop_pruned(convert_state_dict(state_dict), model)
    own = model.state_dict()
    expected = {k for k in own if not k.endswith(TABLE_BUFFERS)}
    missing = sorted(expected - set(sd))
    unexpected = sorted(set(sd) - expected)
    shapes = [f"{official_name.get(k, k)}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(expected & set(sd)) if tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        inv = {v: k for k, v in _official_names(model, kw["num_branches"] == 1 and _is_deploy_form(state_dict))}
        problems = []
        if missing:
            problems.append(f"missing keys ({len(missing)}): " + ", ".join(inv.get(k, k) for k in missing[:12]))
        if unexpected:
            problems.append(f"unexpected keys ({len(unexpected)}): "
                            + ", ".join(official_name.get(k, k) for k in unexpected[:12]))
        if shapes:
            problems.append("shape mismatch for " + "; ".join(shapes[:12]))
        raise CheckpointError(
            "official ShiftWise checkpoint does not match the model built from the given arguments "
            f"(depths={kw['depths']}, dims={kw['dims']}, kernel_size={kw['big_kernels'] + [kw['small_kernel']]}, "
            f"ghost_ratio={kw['ghost_ratio']}, N_path={kw['num_branches']}, N_rep={kw['edges']}): "
            + " | ".join(problems) + classifier_size_hint(own, sd)
        )
    for k in own:
        if k not in sd:
            sd[k] = own[k]
    model.load_state_dict(sd, strict=True)
    model.official_kwargs = {**OFFICIAL_DEFAULTS, **official_kwargs}
    return model


def _official_names(model: ShiftWiseNet, merged: bool) -> list[tuple[str, str]]:
    out = []
    for k in model.state_dict():
        name = _inverse_key(k, merged)
        if name is not None:
            out.append((name, k))
    return out


def to_official(model: ShiftWiseNet, merged: bool | None = None) -> dict[str, torch.Tensor]:
    """Our (train-form or branch-merged) model -> an official ShiftWise_v2 state dict.

    ``merged``: write ``large_kernel.LoRA.weight`` (the official deploy form); default: only when the model
    has one branch. The fully folded deploy form has no official equivalent (raises ValueError).
    """
    if any(getattr(m, "deployed", False) for m in model.modules()):
        raise ValueError("to_official: the fully re-parameterised form has no official equivalent; "
                         "export the train form (or after merge_branches())")
    from ..layers.shiftwise import ShiftWiseConv2d

    nb = max((m.num_branches for m in model.modules() if isinstance(m, ShiftWiseConv2d)), default=1)
    merged = (nb == 1) if merged is None else merged
    if merged and nb != 1:
        raise ValueError("to_official(merged=True) needs a model with one branch: call merge_branches() first")
    sd = model.state_dict()
    return {name: sd[k] for name, k in _official_names(model, merged)}


def convert_for_model(state_dict: Mapping[str, torch.Tensor], model: ShiftWiseNet) -> dict[str, torch.Tensor]:
    """The pretrained-weights filter (:func:`lkvision.compat.checkpoint_filter`): official keys -> ``model``'s
    keys, with the shift tables and channel split (not in official files) taken from ``model``."""
    sd = convert_state_dict(state_dict)
    for k, v in model.state_dict().items():
        if k.endswith(TABLE_BUFFERS) and k not in sd:
            sd[k] = v
    return sd
