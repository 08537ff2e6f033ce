"""Official RepLKNet checkpoints (DingXiaoH/RepLKNet-pytorch ``replknet.py``) -> lkvision ``RepLKNet``.

Every official form loads:
  * train form: ``large_kernel.lkb_origin`` + ``large_kernel.small_conv`` (``conv``/``bn`` each; no
    ``small_conv`` with ``small_kernel=None``, e.g. RepLKNet-XL);
  * deploy form (``structural_reparam()`` or ``small_kernel_merged=True``): ``large_kernel.lkb_reparam``
    (a biased conv). The returned model then has its large-kernel layers merged (as the official deploy
    model) and its other BNs unfolded; :func:`lkvision.reparameterize` folds the rest;
  * after ``deep_fuse_BN()`` (with or without ``structural_reparam()``): every conv + BN pair is one biased
    ``conv``; the same pairs of our model are folded before loading;
  * the downstream backbone (``num_classes=None, out_indices=...``; ``stages.i.norm`` with
    ``norm_intermediate_features=True``), also inside an mmdet/mmseg checkpoint (``backbone.*``), or
    DDP-wrapped (``module.*``). Any number of stages (``len(layers)``) is accepted, as by the official code.

Key map (official -> lkvision):

=============================================  ==================================
``stages.i.blocks.j.prelkb_bn`` / ``preffn_bn``  ``stages.i.j.norm``
``stages.i.blocks.j.large_kernel.lkb_origin``    ``stages.i.j.large_kernel.large``
``stages.i.blocks.j.large_kernel.small_conv``    ``stages.i.j.large_kernel.small``
``stages.i.blocks.j.large_kernel.lkb_reparam``   ``stages.i.j.large_kernel.conv``
``stages.i.blocks.j.pw1`` / ``pw2``              ``stages.i.j.pw1`` / ``pw2``
``stages.i.norm`` (features only)                ``feature_norms.i``
``norm`` / ``head``                              ``head.norm`` / ``head.fc``
``stem.*``, ``transitions.*``                    unchanged
=============================================  ==================================
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from ..models._weights import CheckpointError, check_state_dict
from ..models.replknet import RepLKNet
from ._common import drop_pruned, reparameterize_to_match, unwrap_state_dict

__all__ = ["from_official", "convert_state_dict", "model_kwargs_from_official", "MODEL_KWARGS"]

# Official constructor kwargs of each registered lkvision model (for `lkvision convert` / from_official).
MODEL_KWARGS: dict[str, dict] = {
    "replknet_31b": dict(large_kernel_sizes=[31, 29, 27, 13], layers=[2, 2, 18, 2],
                         channels=[128, 256, 512, 1024], small_kernel=5, dw_ratio=1),
    "replknet_31l": dict(large_kernel_sizes=[31, 29, 27, 13], layers=[2, 2, 18, 2],
                         channels=[192, 384, 768, 1536], small_kernel=5, dw_ratio=1),
    "replknet_xl": dict(large_kernel_sizes=[27, 27, 27, 13], layers=[2, 2, 18, 2],
                        channels=[256, 512, 1024, 2048], small_kernel=None, dw_ratio=1.5),
    "replknet_3": dict(large_kernel_sizes=[3, 3, 3, 3], layers=[2, 2, 18, 2],
                       channels=[128, 256, 512, 1024], small_kernel=None, dw_ratio=1),
    "replknet_7": dict(large_kernel_sizes=[7, 7, 7, 7], layers=[2, 2, 18, 2],
                       channels=[128, 256, 512, 1024], small_kernel=5, dw_ratio=1),
    "replknet_13": dict(large_kernel_sizes=[13, 13, 13, 13], layers=[2, 2, 18, 2],
                        channels=[128, 256, 512, 1024], small_kernel=5, dw_ratio=1),
    "replknet_25": dict(large_kernel_sizes=[25, 25, 25, 13], layers=[2, 2, 18, 2],
                        channels=[128, 256, 512, 1024], small_kernel=5, dw_ratio=1),
    "replknet_nano": dict(large_kernel_sizes=[13, 11, 9, 5], layers=[1, 1, 2, 1],
                          channels=[16, 32, 64, 128], small_kernel=5, dw_ratio=1),
}

_BLOCK_RENAMES = (
    (".prelkb_bn.", ".norm."),
    (".preffn_bn.", ".norm."),
    (".large_kernel.lkb_origin.", ".large_kernel.large."),
    (".large_kernel.small_conv.", ".large_kernel.small."),
    (".large_kernel.lkb_reparam.", ".large_kernel.conv."),
)


def model_kwargs_from_official(
    large_kernel_sizes: Sequence[int],
    layers: Sequence[int],
    channels: Sequence[int],
    drop_path_rate: float = 0.0,
    small_kernel: int | None = 5,
    dw_ratio: float = 1,
    ffn_ratio: float = 4,
    in_channels: int = 3,
    num_classes: int | None = 1000,
    out_indices: Sequence[int] | None = None,
    use_checkpoint: bool = False,
    small_kernel_merged: bool = False,
    use_sync_bn: bool = True,
    norm_intermediate_features: bool = False,
) -> dict:
    """Map the official ``RepLKNet(...)`` keyword arguments to :class:`RepLKNet` keyword arguments.

    ``small_kernel_merged`` only says which form the checkpoint has (detected from the keys anyway);
    ``use_sync_bn`` is ignored (same parameters; use ``nn.SyncBatchNorm.convert_sync_batchnorm`` for
    distributed training).
    """
    del small_kernel_merged, use_sync_bn
    if num_classes is not None and out_indices is not None:
        raise ValueError("official RepLKNet: set either num_classes (classifier) or out_indices (backbone), "
                         "not both")
    kw = dict(large_kernel_sizes=tuple(large_kernel_sizes), layers=tuple(layers), channels=tuple(channels),
              small_kernel=small_kernel, dw_ratio=dw_ratio, ffn_ratio=ffn_ratio, in_chans=in_channels,
              drop_path_rate=drop_path_rate, norm_intermediate_features=norm_intermediate_features,
              use_checkpoint=use_checkpoint)
    if num_classes is None:
        kw.update(num_classes=0, features_only=True,
                  out_indices=tuple(out_indices) if out_indices is not None else None)
    else:
        kw.update(num_classes=num_classes)
    return kw


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], features_only: bool = False) -> dict:
    """Rename official keys to lkvision keys (see the module docstring). Unused official tensors (the
    stage norms of a classifier) are dropped."""
    out: dict[str, torch.Tensor] = {}
    for key, v in state_dict.items():
        k = key
        m = re.match(r"stages\.(\d+)\.norm\.(.+)$", k)
        if m:
            if features_only:
                out[f"feature_norms.{m.group(1)}.{m.group(2)}"] = v
            continue
        k = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2.", k)
        for a, b in _BLOCK_RENAMES:
            k = k.replace(a, b)
        if k.startswith("norm."):
            k = "head." + k
        elif k.startswith("head."):
            k = "head.fc." + k[5:]
        out[k] = v
    return out


def from_official(state_dict: Mapping[str, torch.Tensor], **official_kwargs) -> RepLKNet:
    """Build our RepLKNet from the official constructor kwargs and load an official state dict.

    Accepts the official train form and the official deploy form (``lkb_reparam``). Raises
    :class:`~lkvision.models.CheckpointError` naming missing/unexpected keys or shape mismatches.
    """
    state_dict = unwrap_state_dict(state_dict)
    kw = model_kwargs_from_official(**official_kwargs)
    model = RepLKNet(**kw)
    #: constructor arguments (JSON-able), recorded by `lkvision convert` to rebuild the model
    model.config = {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}
    sd = drop_pruned(convert_state_dict(state_dict, features_only=model.features_only), model)
    if model.features_only:  # the official backbone keeps its (unused) classifier norm and every stage norm
        keep = {f"feature_norms.{i}." for i in model.out_indices}
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")
              and (not k.startswith("feature_norms.") or any(k.startswith(p) for p in keep))}
    reparameterize_to_match(model, sd)  # official deploy form (lkb_reparam), deep_fuse_BN
    try:
        check_state_dict(model, sd, strict=True)
    except CheckpointError as e:
        raise CheckpointError(f"official RepLKNet checkpoint vs kwargs {official_kwargs}: {e}") from None
    model.load_state_dict(sd, strict=True)
    return model.eval()


def convert_for_model(state_dict: Mapping[str, torch.Tensor], model: RepLKNet) -> dict[str, torch.Tensor]:
    """The pretrained-weights filter (:func:`lkvision.compat.checkpoint_filter`): official keys -> ``model``'s
    keys (the stage norms of an official backbone become ``feature_norms`` of a ``features_only`` model)."""
    return convert_state_dict(state_dict, features_only=model.features_only)
