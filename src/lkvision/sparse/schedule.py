"""When dynamic sparse training updates its masks, and by how much (pure functions of the step count)."""

from __future__ import annotations

import math

__all__ = ["cosine_prune_rate", "is_update_step", "update_index", "is_sync_update"]


def cosine_prune_rate(step: int, total_steps: int, start: float, end: float) -> float:
    """Prune rate after ``step`` optimizer steps: cosine decay from ``start`` to ``end`` over ``total_steps``.

    ``rate = end + (start - end) * (1 + cos(pi * step / total_steps)) / 2``; the official code wraps
    ``CosineAnnealingLR`` (``eta_min = end``) and evaluates it after ``step`` decay steps. Beyond
    ``total_steps`` the rate stays at ``end`` (the official scheduler would rise again).
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    t = min(max(step, 0), total_steps)
    return end + (start - end) * (1.0 + math.cos(math.pi * t / total_steps)) / 2.0


def is_update_step(step: int, update_every: int | None) -> bool:
    """True when the prune/grow update runs after optimizer step number ``step`` (1-based)."""
    return bool(update_every) and step > 0 and step % update_every == 0


def update_index(step: int, update_every: int) -> int:
    """``k = step // update_every``: the 1-based index of the prune/grow update at ``step``."""
    return step // update_every


def is_sync_update(step: int, update_every: int, sync_gap: int | None) -> bool:
    """True when the update at ``step`` is a shared-mask (rep-branch) sync: ``k % sync_gap == 0``.

    With ``sync_gap`` None or 0 the branches are never synchronised after init.
    """
    if not sync_gap:
        return False
    return update_index(step, update_every) % sync_gap == 0
