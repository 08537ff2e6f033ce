"""Official checkpoint support. The only package that knows the official parameter names.

``from_official(family, state_dict, **official_kwargs)`` builds our model from the official constructor's
keyword arguments and loads the official train-form (or, where supported, deploy-form) state dict.
Each family lives in ``lkvision/compat/<family>.py`` (named like its model module in :mod:`lkvision.models`)
and exposes ``from_official(state_dict, **official_kwargs) -> nn.Module``, ``MODEL_KWARGS`` (official kwargs
of each registered model name) and ``convert_for_model(state_dict, model)`` (official keys -> the keys of a
given model), which :func:`checkpoint_filter` uses to load official files with
``create_model(..., pretrained=...)``. The families are the modules of this package that define
``from_official`` (discovered, not listed).
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["from_official", "families", "canonical_family", "checkpoint_filter", "FAMILIES"]

_ALIASES = {"sw": "shiftwise", "shift-wise": "shiftwise", "shiftwiseconv": "shiftwise", "replk": "replknet",
            "unirep": "unireplknet", "unireplk": "unireplknet"}


@functools.cache
def families() -> tuple[str, ...]:
    """The families with official checkpoint support: modules of this package defining ``from_official``."""
    out = []
    for m in pkgutil.iter_modules(__path__):
        if m.name.startswith("_") or m.name == "cli":
            continue
        if hasattr(importlib.import_module(f"{__name__}.{m.name}"), "from_official"):
            out.append(m.name)
    return tuple(sorted(out))


def __getattr__(name: str):
    if name == "FAMILIES":  # computed on first use: importing every family module is not free
        return families()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def canonical_family(family: str) -> str:
    f = family.lower().replace("_", "")
    f = _ALIASES.get(f, f)
    fams = families()
    if f not in fams:
        raise ValueError(f"unknown family {family!r}; expected one of {fams} (aliases: {sorted(_ALIASES)})")
    return f


def checkpoint_filter(family: str, state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict:
    """The pretrained-weights filter of a family: ``state_dict`` in the official layout (classification,
    deploy form or the backbone of a downstream mmdet/mmseg checkpoint) -> ``model``'s keys; a state dict
    already in lkvision's layout passes unchanged. The layout that matches more of the model's keys wins."""
    from ..models import CheckpointError
    from ._common import unwrap_state_dict

    sd = unwrap_state_dict(state_dict)
    own = set(model.state_dict())
    try:
        converted = importlib.import_module(f"{__name__}.{canonical_family(family)}").convert_for_model(sd, model)
    except CheckpointError:
        return sd
    return converted if len(own & set(converted)) > len(own & set(sd)) else sd


def from_official(family: str, state_dict: Mapping[str, torch.Tensor] | str, *, allow_pickle: bool = False,
                  **official_kwargs) -> nn.Module:
    """Build the lkvision model for an official checkpoint and load it.

    ``state_dict``: the official state dict (or a path to an official checkpoint file).
    ``allow_pickle``: for a path, see :func:`lkvision.models.load_state_dict_file` (default False: nothing in
    the file is executed; True only for files you trust).
    ``official_kwargs``: the official constructor's keyword arguments (e.g. ``depths``, ``dims``,
    ``kernel_size``, ``ghost_ratio``, ``N_path``, ``N_rep`` for ShiftWise).
    """
    fam = canonical_family(family)
    if not isinstance(state_dict, Mapping):
        from ..models._weights import load_state_dict_file

        state_dict = load_state_dict_file(state_dict, allow_pickle=allow_pickle)
    state_dict = {k: v for k, v in state_dict.items() if not (k.startswith("__") and k.endswith("__"))}
    mod = importlib.import_module(f"lkvision.compat.{fam}")
    return mod.from_official(state_dict, **official_kwargs)
