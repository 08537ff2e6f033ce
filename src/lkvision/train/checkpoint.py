"""Training checkpoints: weights as safetensors + a separate training-state file, both written atomically.

A checkpoint at optimizer step ``s`` is the pair

* ``ckpt-<s:08d>.safetensors``: model weights (``lkvision.save_weights``: temp file + ``os.replace``), with
  ``{"step": s}`` in the safetensors metadata;
* ``ckpt-<s:08d>.state.pt``: optimizer, grad scaler, EMA, sparse masks, every rank's RNG states, epoch,
  position inside the epoch, step, metrics history and the config (``torch.save`` to a temp file, then
  ``os.replace``). Readable with ``torch.load(..., weights_only=True)``.

The weights are written first; the state file is the commit record, so a run killed at any moment leaves
either a complete pair or an orphan weights file that :func:`find_latest` ignores. ``--resume auto`` picks
the highest step with a complete, matching pair.
"""

# ruff: noqa: NPY002 -- the legacy global numpy RNG is what timm (mixup, RandAugment) draws from,
# so it is seeded, saved and restored on purpose.
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..fileio import atomic_path

__all__ = ["save_checkpoint", "load_checkpoint", "find_latest", "rng_state", "set_rng_state",
           "prune_checkpoints", "atomic_torch_save", "weights_path"]

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


def find_latest(output: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint pair in ``output`` (state path), or ``None``."""
    out = Path(output)
    if not out.is_dir():
        return None
    cands = []
    for p in out.iterdir():
        m = _PAT.match(p.name)
        if m and weights_path(p).is_file():
            cands.append((int(m.group(1)), p))
    for step, p in sorted(cands, reverse=True):
        if _weights_step(weights_path(p)) == step:
            return p
    return None


def load_checkpoint(state_path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model weights, training state) of a checkpoint written by :func:`save_checkpoint`."""
    from ..models import CheckpointError, load_state_dict_file
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
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot read training state {state_path}: {type(e).__name__}: {e}") from e
    weights = load_state_dict_file(wpath)
    return weights, state


def prune_checkpoints(output: str | os.PathLike, keep_last: int, protect: tuple[int, ...] = ()) -> None:
    """Delete all but the newest ``keep_last`` checkpoint pairs (steps in ``protect`` are kept)."""
    out = Path(output)
    pairs = sorted((int(m.group(1)), p) for p in out.glob("ckpt-*.state.pt") if (m := _PAT.match(p.name)))
    for step, p in pairs[: max(0, len(pairs) - max(1, keep_last))]:
        if step in protect:
            continue
        for f in (p, weights_path(p)):
            try:
                f.unlink()
            except FileNotFoundError:
                pass
