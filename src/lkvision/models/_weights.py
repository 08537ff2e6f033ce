"""Loading and saving model weights (safetensors first, torch checkpoints accepted) with clear errors.

Loading never executes code from a file. ``.safetensors`` holds only tensors. Torch files (pickles) are read
with ``torch.load(weights_only=True)`` plus a short allow-list of the harmless types that the official
RepLKNet / UniRepLKNet / SLaK / ShiftWise training scripts (ConvNeXt/DeiT-style ``utils.save_model``:
``{'model', 'optimizer', 'epoch', 'scaler', 'args', 'model_ema'}``), timm and mmcv put next to the weights:
``argparse.Namespace`` (the ``args`` entry), numpy scalars, dtypes and arrays (metrics). A file that names any
other Python global is refused with :class:`UnsafeCheckpointError`, which names the global. Only for files you
trust: ``allow_pickle=True`` (CLI ``--allow-pickle``) unpickles them fully, which runs whatever code they name.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..fileio import atomic_path

__all__ = ["load_state_dict_file", "load_weights", "save_weights", "check_state_dict", "read_torch_file",
           "checkpoint_safe_globals", "CheckpointError", "UnsafeCheckpointError"]

#: help of every command's ``--allow-pickle`` flag
ALLOW_PICKLE_HELP = ("unpickle torch checkpoint files fully, which runs any code they name: ONLY for files you "
                     "trust (default: only tensors, containers, argparse.Namespace and numpy values are read)")
ALLOW_PICKLE_HINT = ("only if you trust this file (unpickling runs any code it names), load it with "
                     "allow_pickle=True (command line: --allow-pickle)")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded into a model (corrupt file, missing/extra keys, shape mismatch)."""


class UnsafeCheckpointError(CheckpointError):
    """A torch file whose pickle names Python globals outside the allow-list; ``globals`` lists them."""

    def __init__(self, message: str, globals_: list[str]) -> None:
        super().__init__(message)
        self.globals = list(globals_)


@functools.cache
def checkpoint_safe_globals() -> tuple[Any, ...]:
    """The types, besides tensors and plain Python containers, that a torch file may contain.

    Entries are objects or ``(object, "pickled.name")`` pairs as ``torch.serialization.safe_globals`` takes
    them: ``argparse.Namespace``; numpy's scalar and array reconstructors under both the numpy 1.x
    (``numpy.core.multiarray``) and 2.x (``numpy._core.multiarray``) names, ``numpy.ndarray``,
    ``numpy.dtype`` and the ``numpy.dtypes`` classes. None of them runs code when unpickled.
    """
    import argparse

    out: list[Any] = [argparse.Namespace]
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with torch
        return tuple(out)
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out += [(multiarray.scalar, f"{mod}.scalar"), (multiarray._reconstruct, f"{mod}._reconstruct")]
    out += [np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25
    for name in getattr(dtypes, "__all__", ()):
        cls = getattr(dtypes, name, None)
        if isinstance(cls, type):
            out.append((cls, f"numpy.dtypes.{name}"))
    return tuple(out)


# torch.serialization.safe_globals edits process-wide state: one load at a time while it is extended.
_SAFE_LOAD_LOCK = threading.Lock()


@contextlib.contextmanager
def _allow_listed():
    """Extend torch's weights-only allow-list by :func:`checkpoint_safe_globals` (what is not there yet)."""
    current = torch.serialization.get_safe_globals()
    extra = [g for g in checkpoint_safe_globals() if g not in current]
    with _SAFE_LOAD_LOCK, torch.serialization.safe_globals(extra):
        yield


def _unsafe_globals(path: Path, error: Exception) -> list[str]:
    """The globals a refused pickle names (static scan of a zip checkpoint, else torch's message)."""
    try:
        with _allow_listed():
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        if names:
            return sorted(names)
    except Exception:  # noqa: BLE001 - legacy (non-zip) format or unreadable: fall back to the message
        pass
    return sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(error))))


def read_torch_file(path: str | os.PathLike, allow_pickle: bool = False) -> Any:
    """``torch.load`` a file on CPU without running code from it (the one place lkvision unpickles).

    ``allow_pickle=False`` (default): ``weights_only=True`` with :func:`checkpoint_safe_globals`; a file that
    names any other global raises :class:`UnsafeCheckpointError`. ``allow_pickle=True``: a full unpickle, which
    executes whatever the file names -- only for files you trust. Unreadable, truncated or corrupt files raise
    :class:`CheckpointError`; a missing file ``FileNotFoundError``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"cannot read checkpoint {path}: the file is empty")
    if allow_pickle:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise CheckpointError(f"cannot read checkpoint {path} (corrupt or truncated?): "
                                  f"{type(e).__name__}: {_first_line(e)}") from e
    try:
        with _allow_listed():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        names = _unsafe_globals(path, e)
        if names:
            raise UnsafeCheckpointError(
                f"refusing to load {path}: it names the Python global(s) {', '.join(names)}, which lkvision does "
                f"not unpickle (only tensors, containers, argparse.Namespace and numpy values are allowed); "
                + ALLOW_PICKLE_HINT, names) from None
        raise CheckpointError(
            f"cannot read checkpoint {path}: not a torch file lkvision can read without running code "
            f"({_first_line(e)}); it may be corrupt or truncated, or a pickle of arbitrary objects -- "
            + ALLOW_PICKLE_HINT) from None
    except Exception as e:  # noqa: BLE001 - zip/EOF/format errors: re-raised with context
        raise CheckpointError(f"cannot read checkpoint {path} (corrupt or truncated?): "
                              f"{type(e).__name__}: {_first_line(e)}") from e


def _first_line(e: Exception) -> str:
    """torch's load errors are paragraphs of advice; keep the first sentence that says what went wrong."""
    boiler = ("Weights only load failed", "WeightsUnpickler error", "Please file an issue", "Check the documentation",
              "In PyTorch 2.6", "This file can still be loaded", "(1) ", "(2) ")
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if not ln.startswith(boiler):
            return ln.split(". ")[0][:200]
    return type(e).__name__


def load_state_dict_file(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``{'model': sd}``, ``{'state_dict': sd}``,
    ``{'state_dict_ema'|'model_ema': sd}`` or a bare state dict). Tensors are loaded on CPU.

    Torch files go through :func:`read_torch_file`: nothing in them is executed unless ``allow_pickle=True``
    (only for files you trust). Raises ``FileNotFoundError``, :class:`CheckpointError` (corrupt, truncated,
    not a state dict) or :class:`UnsafeCheckpointError`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise CheckpointError(f"cannot read checkpoint {path} (corrupt or truncated?): "
                                  f"{type(e).__name__}: {_first_line(e)}") from e
    obj = read_torch_file(path, allow_pickle=allow_pickle)
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
    if not keys:
        return "none"
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def classifier_size_hint(own: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor]) -> str:
    """`` -- the checkpoint's classifier has N classes: pass num_classes=N`` when only the head's size differs
    (an ImageNet-22k checkpoint has 21841 classes), else ``""``."""
    for k, v in state_dict.items():
        if (k.split(".")[0] == "head" and k.endswith("weight") and k in own and v.ndim == 2
                and v.shape[1] == own[k].shape[1] and v.shape[0] != own[k].shape[0]):
            return f" -- the checkpoint's classifier has {v.shape[0]} classes: pass num_classes={v.shape[0]}"
    return ""


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
        hint = classifier_size_hint(own, state_dict)
        if any(k.endswith(("LoRAs.0.weight", "lkb_origin.conv.weight", "LoRA1.conv.weight")) for k in unexpected):
            hint = (" -- this looks like an official checkpoint: convert it with "
                    "`lkvision convert` or lkvision.compat.from_official")
        raise CheckpointError(
            f"checkpoint does not match {type(model).__name__}: " + " | ".join(problems) + hint
        )


def load_weights(model: nn.Module, path_or_sd, strict: bool = True, allow_pickle: bool = False) -> nn.Module:
    """Load weights from a file path or a state dict into ``model``, with key/shape checks.

    ``allow_pickle``: see :func:`load_state_dict_file` (default False: nothing in the file is executed).
    """
    sd = (path_or_sd if isinstance(path_or_sd, Mapping)
          else load_state_dict_file(path_or_sd, allow_pickle=allow_pickle))
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
