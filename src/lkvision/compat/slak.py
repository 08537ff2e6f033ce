"""Official SLaK checkpoints (VITA-Group/SLaK ``models/SLaK.py``, ``Decom=True``) -> lkvision ``SLaK``.

Official -> lkvision names::

    downsample_layers.0.{j}                -> stem.{j}
    downsample_layers.{i}.{j}   (i >= 1)   -> downsamples.{i-1}.{j}
    stages.i.j.large_kernel.LoRA1.*        -> stages.i.j.large_kernel.strip_v.*     (M x N)
    stages.i.j.large_kernel.LoRA2.*        -> stages.i.j.large_kernel.strip_h.*     (N x M)
    (early releases name LoRA1/LoRA2 ``Decom1``/``Decom2``; both spellings are accepted)
    stages.i.j.large_kernel.small_conv.*   -> stages.i.j.large_kernel.small.*       (N x N)
    stages.i.j.pwconv1 / pwconv2           -> stages.i.j.fc1 / fc2
    stages.i.j.gamma                       -> stages.i.j.layer_scale.gamma
    stages.i.j.norm, norm, head            -> unchanged

The official strips are iGEMM convs whose effective padding is (kh//2, kw//2) from the filter shape (the
module's ``padding`` attribute says 0); ``lkvision.layers.StripConv`` pads exactly that way.
Sparse checkpoints load as they are (the zeros are just weights).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..models._weights import check_state_dict
from ..models.slak import SLaK, slak_dims

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


def official_to_model_kwargs(**official_kwargs) -> dict:
    """Translate official ``SLaK(...)`` kwargs into lkvision ``SLaK`` kwargs."""
    unknown = set(official_kwargs) - _OFFICIAL_KWARGS
    if unknown:
        raise TypeError(f"unknown official SLaK arguments: {sorted(unknown)}")
    if not official_kwargs.get("Decom", None):
        raise ValueError(
            "only Decom=True SLaK checkpoints (strip kernels LoRA1/LoRA2) are supported; a Decom=False model "
            "is a dense large kernel + small kernel (RepLKNet-style ReparamLargeKernelConv)"
        )
    ks = list(official_kwargs.get("kernel_size", [31, 29, 27, 13, 5]))
    if len(ks) != 5:
        raise ValueError(f"official SLaK kernel_size is [M1, M2, M3, M4, N], got {ks}")
    return dict(
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
    )


_RULES = (
    (r"large_kernel\.(?:LoRA1|Decom1)\.(.+)", "large_kernel.strip_v.{0}"),  # Decom1/2: early releases
    (r"large_kernel\.(?:LoRA2|Decom2)\.(.+)", "large_kernel.strip_h.{0}"),
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
    m = re.fullmatch(r"(stages\.\d+\.\d+\.)(.+)", key)
    if m:
        pre, rest = m.groups()
        for pattern, target in _RULES:
            mm = re.fullmatch(pattern, rest)
            if mm:
                return pre + target.format(*mm.groups())
    return key


def convert_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official SLaK state dict to lkvision names (keys ``__*__`` are dropped)."""
    return {_map_key(k): v for k, v in sd.items() if not (k.startswith("__") and k.endswith("__"))}


def from_official(state_dict: Mapping[str, torch.Tensor], **official_kwargs) -> SLaK:
    """Build an lkvision ``SLaK`` from official constructor kwargs; load an official (train-form) state dict.

    Raises :class:`~lkvision.models.CheckpointError` naming missing/unexpected keys or shape mismatches.
    """
    model = SLaK(**official_to_model_kwargs(**official_kwargs))
    converted = convert_state_dict(state_dict)
    check_state_dict(model, converted, strict=True)
    model.load_state_dict(converted, strict=True)
    return model.eval()


def convert_for_model(state_dict: Mapping[str, torch.Tensor], model: SLaK) -> dict[str, torch.Tensor]:
    """The pretrained-weights filter (:func:`lkvision.compat.checkpoint_filter`): official keys -> ``model``'s
    keys."""
    del model  # SLaK's key map does not depend on the configuration
    return convert_state_dict(state_dict)
