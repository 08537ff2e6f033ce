"""Official checkpoint support. The only package that knows the official parameter names.

``from_official(family, state_dict, **official_kwargs)`` builds our model from the official constructor's
keyword arguments and loads the official train-form (or, where supported, deploy-form) state dict.
Each family lives in ``lkvision/compat/<family>.py`` and exposes
``from_official(state_dict, **official_kwargs) -> nn.Module`` and ``MODEL_KWARGS`` (official kwargs of
each registered model name).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["from_official", "FAMILIES", "canonical_family"]

FAMILIES = ("shiftwise", "replknet", "unireplknet", "slak")
_ALIASES = {"sw": "shiftwise", "shift-wise": "shiftwise", "shiftwiseconv": "shiftwise", "replk": "replknet",
            "unirep": "unireplknet", "unireplk": "unireplknet"}


def canonical_family(family: str) -> str:
    f = family.lower().replace("_", "")
    f = _ALIASES.get(f, f)
    if f not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES} (aliases: {sorted(_ALIASES)})")
    return f


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
