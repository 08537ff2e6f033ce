"""Loading and saving model weights (safetensors first, torch checkpoints accepted) with clear errors."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..fileio import atomic_path

__all__ = ["load_state_dict_file", "load_weights", "save_weights", "check_state_dict", "CheckpointError"]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded into a model (corrupt file, missing/extra keys, shape mismatch)."""


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``{'model': sd}``, ``{'state_dict': sd}``,
    ``{'state_dict_ema'|'model_ema': sd}`` or a bare state dict). Tensors are loaded on CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # official checkpoints pickle an argparse Namespace under 'args'
            obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_ema", "state_dict_ema"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    sd = {k[7:] if k.startswith("module.") else k: v for k, v in obj.items()}
    return sd


def _fmt(keys, limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> None:
    """Raise :class:`CheckpointError` naming missing/unexpected keys and shape mismatches."""
    own = model.state_dict()
    missing = set(own) - set(state_dict)
    unexpected = set(state_dict) - set(own)
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state_dict))
        if tuple(own[k].shape) != tuple(state_dict[k].shape)
    ]
    problems = []
    if shapes:
        problems.append("shape mismatch for " + "; ".join(shapes[:12]))
    if strict and missing:
        problems.append(f"missing keys ({len(missing)}): {_fmt(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_fmt(unexpected)}")
    if problems:
        hint = ""
        if any(k.endswith(("LoRAs.0.weight", "lkb_origin.conv.weight", "LoRA1.conv.weight")) for k in unexpected):
            hint = (" -- this looks like an official checkpoint: convert it with "
                    "`lkvision convert` or lkvision.compat.from_official")
        raise CheckpointError(
            f"checkpoint does not match {type(model).__name__}: " + " | ".join(problems) + hint
        )


def load_weights(model: nn.Module, path_or_sd, strict: bool = True) -> nn.Module:
    """Load weights from a file path or a state dict into ``model``, with key/shape checks."""
    sd = path_or_sd if isinstance(path_or_sd, Mapping) else load_state_dict_file(path_or_sd)
    check_state_dict(model, sd, strict=strict)
    model.load_state_dict(sd, strict=strict)
    return model


def save_weights(model_or_sd, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write weights as safetensors atomically (:func:`lkvision.fileio.atomic_path`)."""
    from safetensors.torch import save_file

    sd = model_or_sd.state_dict() if isinstance(model_or_sd, nn.Module) else dict(model_or_sd)
    sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata=metadata)
    return path
