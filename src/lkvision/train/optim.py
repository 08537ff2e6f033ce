"""Optimizer, parameter groups (no decay on 1-D / bias, layer-wise lr decay) and the lr schedule.

The schedule is a pure function of the optimizer step (:func:`lr_at`), applied by :func:`set_lr` before each
step: nothing to checkpoint, and a resumed run gets exactly the same learning rates.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["param_groups", "layer_ids", "build_optimizer", "lr_at", "set_lr", "effective_lr"]


def _no_decay(name: str, p: nn.Parameter) -> bool:
    return p.ndim <= 1 or name.endswith(".bias")


def layer_ids(model: nn.Module, block_group: int = 1) -> tuple[dict[str, int], int]:
    """Map each parameter name to a depth id for layer-wise lr decay; returns (ids, number of ids).

    Models may define ``get_layer_id(name) -> int`` and ``num_layer_ids``; otherwise, for a
    :class:`~lkvision.models.LargeKernelNet`, ids follow ``stage_pairs()``: the stem is 0, blocks are
    numbered 1, 2, ... in forward order (``block_group`` consecutive blocks share an id; a stage that is not an
    ``nn.Sequential`` counts as one block), each downsampling layer shares the id of the block before it
    (RepLKNet's grouping of transitions with the preceding stage), and everything else (head, final norm)
    gets the last id. With RepLKNet-31B (18 blocks in stage 3) and ``block_group=4`` this is close to the
    official 14 groups (LK.md §1.2).
    """
    names = {id(p): n for n, p in model.named_parameters()}
    if callable(getattr(model, "get_layer_id", None)):
        ids = {n: int(model.get_layer_id(n)) for n in names.values()}
        return ids, int(getattr(model, "num_layer_ids", max(ids.values()) + 1))
    ids: dict[str, int] = {}
    pairs = model.stage_pairs() if callable(getattr(model, "stage_pairs", None)) else []
    current = 0
    block_counter = 0
    for si, (pre, stage) in enumerate(pairs):
        for p in pre.parameters():
            ids.setdefault(names[id(p)], 0 if si == 0 else current)
        blocks = list(stage) if isinstance(stage, nn.Sequential) else [stage]
        for b in blocks:
            gid = 1 + block_counter // max(1, block_group)
            block_counter += 1
            for p in b.parameters():
                ids.setdefault(names[id(p)], gid)
            current = gid
    last = current + 1
    for n in names.values():
        ids.setdefault(n, last)
    return ids, last + 1


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None,
                 block_group: int = 1) -> list[dict]:
    """AdamW groups: no weight decay on 1-D parameters and biases; optional ``lr_scale`` per depth id
    (``layer_decay ** (num_ids - 1 - id)``). Each group carries ``lr_scale`` (used by :func:`set_lr`)."""
    ids, n_ids = layer_ids(model, block_group) if layer_decay is not None else ({}, 1)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        nd = _no_decay(name, p)
        lid = ids.get(name, 0)
        key = (lid, nd)
        if key not in groups:
            scale = layer_decay ** (n_ids - 1 - lid) if layer_decay is not None else 1.0
            groups[key] = {"params": [], "param_names": [], "weight_decay": 0.0 if nd else weight_decay,
                           "lr_scale": scale, "layer_id": lid}
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, cfg, lr: float) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay, cfg.layer_decay_block_group)
    if cfg.opt == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.opt_betas), eps=cfg.opt_eps)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=True)


def lr_at(step: int, base_lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0,
          warmup_lr: float = 0.0) -> float:
    """Per-iteration schedule: linear warm-up from ``warmup_lr`` to ``base_lr`` over ``warmup_steps``,
    then cosine from ``base_lr`` to ``min_lr`` at ``total_steps``."""
    if step < warmup_steps:
        return warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * t))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def effective_lr(cfg, world_size: int) -> float:
    """``cfg.lr``, scaled linearly by global batch / ``lr_base_batch`` when that is set."""
    if not cfg.lr_base_batch:
        return cfg.lr
    return cfg.lr * cfg.batch_size * cfg.update_freq * world_size / cfg.lr_base_batch
