"""Official SLaK checkpoints (VITA-Group/SLaK ``models/SLaK.py``) -> lkvision ``SLaK``.

Every form of the official constructor loads:

* ``Decom=True`` (the released SLaK-T/S/B): strips ``LoRA1`` (M x N), ``LoRA2`` (N x M) and ``small_conv``
  (N x N, only when N < M), each conv + BN (conv only with ``bn=False``);
* ``Decom=False`` / ``None`` (the constructor default; the README's ConvNeXt setting ``--kernel_size 7 7 7 7
  100``): a dense M x M ``lkb_origin`` plus ``small_conv`` when N < M -- any N >= M (even or odd) disables it;
* the official deploy form of ``Decom=False`` (``merge_kernel()``): one biased ``lkb_reparam`` per block;
* the downstream backbones (``segmentation/slak.py``, ``detection/slak.py``): ``norm0..3`` instead of
  ``norm``/``head`` (our ``features_only`` model), also inside an mmseg/mmdet checkpoint (``backbone.*``).

Official -> lkvision names::

    downsample_layers.0.{j}                -> stem.{j}
    downsample_layers.{i}.{j}   (i >= 1)   -> downsamples.{i-1}.{j}
    stages.i.j.large_kernel.LoRA1.*        -> stages.i.j.large_kernel.strip_v.*     (M x N)
    stages.i.j.large_kernel.LoRA2.*        -> stages.i.j.large_kernel.strip_h.*     (N x M)
    (early releases name LoRA1/LoRA2 ``Decom1``/``Decom2``; both spellings are accepted)
    stages.i.j.large_kernel.lkb_origin.*   -> stages.i.j.large_kernel.large.*       (M x M, Decom=False)
    stages.i.j.large_kernel.lkb_reparam.*  -> stages.i.j.large_kernel.conv.*        (merged, Decom=False)
    stages.i.j.large_kernel.small_conv.*   -> stages.i.j.large_kernel.small.*       (N x N)
    stages.i.j.pwconv1 / pwconv2           -> stages.i.j.fc1 / fc2
    stages.i.j.gamma                       -> stages.i.j.layer_scale.gamma
    norm{i}                                -> feature_norms.{i}
    stages.i.j.norm, norm, head            -> unchanged

The official strips are iGEMM convs whose effective padding is (kh//2, kw//2) from the filter shape (the
module's ``padding`` attribute says 0); ``lkvision.layers.StripConv`` pads exactly that way, and so does the
dense ``ReparamLargeKernelConv`` (M//2 for an odd M). Sparse checkpoints load as they are (the zeros are just
weights).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..models._weights import CheckpointError, check_state_dict
from ..models.slak import SLaK, slak_dims
from ._common import (
    downstream_out_indices,
    drop_pruned,
    keep_feature_norms,
    reparameterize_to_match,
    unwrap_state_dict,
)

__all__ = ["from_official", "convert_state_dict", "official_to_model_kwargs", "MODEL_KWARGS"]

#: official constructor kwargs of each registered lkvision model.
MODEL_KWARGS: dict[str, dict] = {
    "slak_t": dict(depths=[3, 3, 9, 3], dims=[96, 192, 384, 768], kernel_size=[51, 49, 47, 13, 5],
                   width_factor=1.3, Decom=True),
    "slak_s": dict(depths=[3, 3, 27, 3], dims=[96, 192, 384, 768], kernel_size=[51, 49, 47, 13, 5],
                   width_factor=1.3, Decom=True),
    "slak_b": dict(depths=[3, 3, 27, 3], dims=[128, 256, 512, 1024], kernel_size=[51, 49, 47, 13, 5],
                   width_factor=1.3, Decom=True),
}

_OFFICIAL_KWARGS = {
    "in_chans", "num_classes", "depths", "dims", "drop_path_rate", "layer_scale_init_value",
    "head_init_scale", "kernel_size", "width_factor", "Decom", "bn",
}
# the downstream backbones' extra arguments (segmentation/slak.py, detection/slak.py): out_indices selects the
# outputs; pretrained/init_cfg only name the file to load and sparse only re-applies the zeros it holds.
_DOWNSTREAM_KWARGS = {"out_indices", "pretrained", "init_cfg", "sparse"}


def official_to_model_kwargs(sd: Mapping[str, torch.Tensor] | None = None, **official_kwargs) -> dict:
    """Translate official ``SLaK(...)`` kwargs (and, given ``sd``, its downstream layout) into lkvision kwargs."""
    unknown = set(official_kwargs) - _OFFICIAL_KWARGS - _DOWNSTREAM_KWARGS
    if unknown:
        raise TypeError(f"unknown official SLaK arguments: {sorted(unknown)}")
    ks = list(official_kwargs.get("kernel_size", [51, 49, 47, 13, 5]))
    if len(ks) != 5:
        raise ValueError(f"official SLaK kernel_size is [M1, M2, M3, M4, N], got {ks}")
    kw = dict(
        depths=tuple(official_kwargs.get("depths", (3, 3, 9, 3))),
        dims=slak_dims(official_kwargs.get("dims", (96, 192, 384, 768)),
                       official_kwargs.get("width_factor", 1)),
        kernel_sizes=tuple(ks[:4]),
        small_kernel=ks[4],
        in_chans=official_kwargs.get("in_chans", 3),
        num_classes=official_kwargs.get("num_classes", 1000),
        drop_path_rate=official_kwargs.get("drop_path_rate", 0.0),
        layer_scale_init_value=official_kwargs.get("layer_scale_init_value", 1e-6),
        head_init_scale=official_kwargs.get("head_init_scale", 1.0),
        bn=bool(official_kwargs.get("bn", True)),
        decomposed=bool(official_kwargs.get("Decom", None)),  # the official `if self.Decom:` (default None)
    )
    if (idx := downstream_out_indices(sd, official_kwargs.get("out_indices"))) is not None:
        kw.update(num_classes=0, features_only=True, out_indices=idx)
    return kw


_RULES = (
    (r"large_kernel\.(?:LoRA1|Decom1)\.(.+)", "large_kernel.strip_v.{0}"),  # Decom1/2: early releases
    (r"large_kernel\.(?:LoRA2|Decom2)\.(.+)", "large_kernel.strip_h.{0}"),
    (r"large_kernel\.lkb_origin\.(.+)", "large_kernel.large.{0}"),
    (r"large_kernel\.lkb_reparam\.(.+)", "large_kernel.conv.{0}"),
    (r"large_kernel\.small_conv\.(.+)", "large_kernel.small.{0}"),
    (r"pwconv1\.(.+)", "fc1.{0}"),
    (r"pwconv2\.(.+)", "fc2.{0}"),
    (r"gamma", "layer_scale.gamma"),
)


def _map_key(key: str) -> str:
    m = re.fullmatch(r"downsample_layers\.(\d+)\.(.+)", key)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        return f"stem.{rest}" if i == 0 else f"downsamples.{i - 1}.{rest}"
    m = re.fullmatch(r"norm(\d)\.(.+)", key)
    if m:
        return f"feature_norms.{m.group(1)}.{m.group(2)}"
    m = re.fullmatch(r"(stages\.\d+\.\d+\.)(.+)", key)
    if m:
        pre, rest = m.groups()
        for pattern, target in _RULES:
            mm = re.fullmatch(pattern, rest)
            if mm:
                return pre + target.format(*mm.groups())
    return key


def convert_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official SLaK state dict to lkvision names (``__*__`` keys dropped, ``module.`` /
    ``backbone.`` wrappings removed)."""
    return {_map_key(k): v for k, v in unwrap_state_dict(sd).items()}


def _check_form(sd: Mapping[str, torch.Tensor], decomposed: bool) -> None:
    dense = any(".large_kernel.lkb_" in k for k in sd)
    strips = any(re.search(r"\.large_kernel\.(LoRA|Decom)[12]\.", k) for k in sd)
    if decomposed and dense and not strips:
        raise CheckpointError("this SLaK checkpoint holds dense kernels (large_kernel.lkb_origin / lkb_reparam): "
                              "it was built with Decom=False; pass Decom=False")
    if not decomposed and strips and not dense:
        raise CheckpointError("this SLaK checkpoint holds strip kernels (large_kernel.LoRA1 / LoRA2): it was "
                              "built with Decom=True; pass Decom=True")


def from_official(state_dict: Mapping[str, torch.Tensor], **official_kwargs) -> SLaK:
    """Build an lkvision ``SLaK`` from official constructor kwargs; load an official state dict.

    Any form listed in the module docstring is accepted (the merged ``lkb_reparam`` form is recognised from
    its keys and loaded into a model whose dense kernels are merged, like the official deploy model).
    Raises :class:`~lkvision.models.CheckpointError` naming missing/unexpected keys or shape mismatches.
    """
    sd = unwrap_state_dict(state_dict)
    kw = official_to_model_kwargs(sd, **official_kwargs)
    _check_form(sd, kw["decomposed"])
    model = SLaK(**kw)
    if model.features_only:
        sd = keep_feature_norms(sd, model.out_indices)
    converted = drop_pruned(convert_state_dict(sd), model)
    reparameterize_to_match(model, converted)  # the official deploy form (lkb_reparam)
    check_state_dict(model, converted, strict=True)
    model.load_state_dict(converted, strict=True)
    return model.eval()


def convert_for_model(state_dict: Mapping[str, torch.Tensor], model: SLaK) -> dict[str, torch.Tensor]:
    """The pretrained-weights filter (:func:`lkvision.compat.checkpoint_filter`): official keys -> ``model``'s
    keys."""
    del model  # SLaK's key map does not depend on the configuration
    return convert_state_dict(state_dict)
