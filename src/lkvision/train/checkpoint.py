"""Training checkpoints: weights as safetensors + a separate training-state file, both written atomically.

A checkpoint at optimizer step ``s`` is the pair

* ``ckpt-<s:08d>.safetensors``: model weights (``lkvision.save_weights``: temp file + ``os.replace``), with
  ``{"step": s}`` in the safetensors metadata;
* ``ckpt-<s:08d>.state.pt``: optimizer, grad scaler, EMA, sparse masks, every rank's RNG states, epoch,
  position inside the epoch, step, metrics history and the config (``torch.save`` to a temp file, then
  ``os.replace``). Readable with ``torch.load(..., weights_only=True)``.

The weights are written first; the state file is the commit record, so a run killed at any moment leaves
either a complete pair or an orphan weights file that :func:`find_latest` ignores. ``--resume auto``
(:func:`latest_valid_checkpoint`) takes the newest pair that :func:`check_checkpoint` accepts -- both files
readable and complete, the same step in both, and a run configuration that fits the current one -- and
warns about every newer pair it had to skip (a truncated copy, a disk error, a checkpoint of another model).
"""

# ruff: noqa: NPY002 -- the legacy global numpy RNG is what timm (mixup, RandAugment) draws from,
# so it is seeded, saved and restored on purpose.
from __future__ import annotations

import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..fileio import atomic_path

__all__ = ["save_checkpoint", "load_checkpoint", "find_latest", "rng_state", "set_rng_state",
           "prune_checkpoints", "atomic_torch_save", "weights_path", "check_checkpoint", "latest_valid_checkpoint",
           "ResumePoint", "STRUCTURAL_KEYS"]

_PAT = re.compile(r"^ckpt-(\d+)\.state\.pt$")


def weights_path(state_path: str | os.PathLike) -> Path:
    p = Path(state_path)
    return p.with_name(p.name.replace(".state.pt", ".safetensors"))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path


def rng_state() -> dict[str, Any]:
    """This process's torch (CPU + CUDA), numpy and python RNG states, in weights_only-loadable form."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    out = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output: str | os.PathLike, step: int, model_state: dict[str, torch.Tensor],
                    train_state: dict[str, Any]) -> Path:
    """Write ``ckpt-<step>.safetensors`` then ``ckpt-<step>.state.pt``; returns the state path."""
    from ..models import save_weights

    out = Path(output)
    state_path = out / f"ckpt-{step:08d}.state.pt"
    save_weights(model_state, weights_path(state_path), metadata={"step": str(step), "format": "lkvision"})
    atomic_torch_save({**train_state, "step": step}, state_path)
    return state_path


def _weights_step(path: Path) -> int | None:
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return int(meta["step"])
    except Exception:  # noqa: BLE001 - missing/corrupt/partial file: not a usable checkpoint
        return None


#: config keys that decide the shapes / structure of what a checkpoint holds: resuming with another value
#: cannot work, so such a checkpoint is not a candidate. ``sparse`` compares only ``enabled`` and ``mode``.
STRUCTURAL_KEYS = ("model", "model_kwargs", "num_classes", "in_chans", "opt", "ema", "layer_decay",
                   "layer_decay_block_group", "sparse")
#: keys a resumed run may change without a word (where output goes, how it is shown, when it stops)
_RUN_CONTROL_KEYS = {"output", "resume", "overwrite", "max_steps", "progress", "log_every", "workers", "device",
                     "threads", "plot", "pin_mem", "dist_backend", "keep_last", "save_every_steps",
                     "save_every_epochs"}
#: what every training-state file holds
_STATE_KEYS = ("optimizer", "rng", "step", "epoch", "history", "config")


@dataclass
class ResumePoint:
    """A checkpoint that passed :func:`check_checkpoint`, already loaded."""

    path: Path
    weights: dict[str, torch.Tensor]
    state: dict[str, Any]
    changed: list[str]  # non-structural config keys whose value differs from the checkpoint's ("lr: 0.004 -> 0.001")


def _sparse_struct(v: Any) -> tuple:
    v = v if isinstance(v, dict) else {}
    return bool(v.get("enabled", False)), v.get("mode", "sw_coarse") if v.get("enabled") else None


def _config_differences(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(structural mismatches, other changed keys) between a checkpoint's config and the current one."""
    structural, changed = [], []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if key == "sparse":
            if _sparse_struct(a) != _sparse_struct(b):
                structural.append(f"sparse (enabled, mode): checkpoint {_sparse_struct(a)}, now {_sparse_struct(b)}")
            elif a != b:
                changed.append(f"sparse: {a} -> {b}")
        elif a != b and key in STRUCTURAL_KEYS:
            structural.append(f"{key}: checkpoint {a!r}, now {b!r}")
        elif a != b and key not in _RUN_CONTROL_KEYS:
            changed.append(f"{key}: {a!r} -> {b!r}")
    return structural, changed


def _candidates(output: Path) -> list[tuple[int, Path]]:
    """``(step, state path)`` of every ``ckpt-*.state.pt`` in ``output``, newest first."""
    if not output.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output.iterdir() if (m := _PAT.match(p.name))]
    return sorted(found, reverse=True)


def check_checkpoint(state_path: str | os.PathLike, config: dict[str, Any] | None = None) -> ResumePoint:
    """Load and validate one checkpoint pair; raise :class:`~lkvision.models.CheckpointError` saying why not.

    Checks: both files exist and load completely (``weights_only=True``; a truncated or corrupt file fails
    here), the state holds every training-state key, the step in the file name, in the state and in the
    weights' metadata agree, and -- with ``config`` -- the :data:`STRUCTURAL_KEYS` equal the checkpoint's.
    """
    from ..models import CheckpointError

    state_path = Path(state_path)
    m = _PAT.match(state_path.name)
    weights, state = load_checkpoint(state_path)  # CheckpointError / FileNotFoundError with the reason
    missing = [k for k in _STATE_KEYS if k not in state] if isinstance(state, dict) else list(_STATE_KEYS)
    if missing:
        raise CheckpointError(f"{state_path.name} is incomplete (no {', '.join(missing)})")
    step = int(state["step"])
    if m and int(m.group(1)) != step:
        raise CheckpointError(f"{state_path.name} holds step {step}, not the step in its name")
    w_step = _weights_step(weights_path(state_path))
    if w_step != step:
        raise CheckpointError(f"{weights_path(state_path).name} is from step {w_step}, its state file from {step} "
                              "(a pair from two different saves)")
    changed: list[str] = []
    if config is not None:
        structural, changed = _config_differences(dict(state["config"] or {}), config)
        if structural:
            raise CheckpointError(f"{state_path.name} is from a different run configuration "
                                  f"({'; '.join(structural)})")
    return ResumePoint(state_path, weights, state, changed)


def latest_valid_checkpoint(output: str | os.PathLike, config: dict[str, Any] | None = None,
                            warn: Callable[[str], None] | None = None) -> ResumePoint | None:
    """The newest checkpoint in ``output`` that :func:`check_checkpoint` accepts (``None`` if there is none).

    Every newer checkpoint that fails is reported through ``warn`` with its reason, and the search falls back
    to the previous one. If checkpoints exist but none is usable, raises
    :class:`~lkvision.models.CheckpointError` listing each reason (starting over silently would lose the run).
    """
    from ..models import CheckpointError

    reasons = []
    for _, path in _candidates(Path(output)):
        try:
            point = check_checkpoint(path, config)
        except (CheckpointError, OSError) as e:
            reason = " ".join(str(e).split())
            reasons.append(f"{path.name}: {reason}")
            if warn is not None:
                warn(f"resume: skipping {path.name}: {reason}")
            continue
        return point
    if reasons:
        raise CheckpointError(f"no usable checkpoint in {output} ({' | '.join(reasons)}); fix or move them, or "
                              "start a new run with another --output or --overwrite")
    return None


def find_latest(output: str | os.PathLike) -> Path | None:
    """The newest complete, readable checkpoint pair in ``output`` (its state path), or ``None``."""
    from ..models import CheckpointError

    try:
        point = latest_valid_checkpoint(output)
    except CheckpointError:  # checkpoints exist, none usable
        return None
    return None if point is None else point.path


def load_checkpoint(state_path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model weights, training state) of a checkpoint written by :func:`save_checkpoint`."""
    from ..models import CheckpointError, UnsafeCheckpointError, load_state_dict_file
    from ..models._weights import read_torch_file

    state_path = Path(state_path)
    if state_path.suffix == ".safetensors":
        state_path = state_path.with_name(state_path.name.replace(".safetensors", ".state.pt"))
    if not state_path.is_file():
        raise FileNotFoundError(f"checkpoint state file not found: {state_path}")
    wpath = weights_path(state_path)
    if not wpath.is_file():
        raise CheckpointError(f"{state_path} has no weights file {wpath.name} next to it")
    try:
        state = read_torch_file(state_path)
    except UnsafeCheckpointError:  # keeps its type and the globals it names (what --allow-pickle would run)
        raise
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot read training state {state_path}: {type(e).__name__}: {e}") from e
    weights = load_state_dict_file(wpath)
    return weights, state


def prune_checkpoints(output: str | os.PathLike, keep_last: int, protect: tuple[int, ...] = ()) -> None:
    """Delete all but the newest ``keep_last`` checkpoint pairs (steps in ``protect`` are kept)."""
    pairs = _candidates(Path(output))  # newest first
    for step, p in pairs[max(1, keep_last):]:
        if step in protect:
            continue
        for f in (p, weights_path(p)):
            try:
                f.unlink()
            except FileNotFoundError:
                pass
