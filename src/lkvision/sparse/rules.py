"""Prune and grow rules of dynamic sparse training (SLaK / ITOP / ShiftWise), as pure tensor functions.

A *mask* is a bool tensor broadcastable to its weight: the weight's own shape for fine-grained
(elementwise) sparsity, or ``(O, 1, ..., 1)`` for coarse per-filter sparsity (one unit = one output
filter, e.g. one 3x3 filter of a ShiftWise branch). *Scores* have the mask's shape.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "unit_scores",
    "num_to_remove",
    "magnitude_prune",
    "random_growth",
    "topk_growth",
    "growth_signal",
]


def unit_scores(t: Tensor, coarse: bool) -> Tensor:
    """Magnitude score per mask unit (float32).

    Fine: ``|t|`` (same shape). Coarse: ``sum |t|`` over every dim but the first, shape ``(O, 1, ..., 1)``
    (the official ``*_sum`` rules).
    """
    a = t.detach().abs().float()
    if not coarse:
        return a
    return a.flatten(1).sum(1).view(t.shape[0], *([1] * (t.dim() - 1)))


def num_to_remove(prune_rate: float, nnz: int) -> int:
    """``ceil(prune_rate * nnz)`` active units to prune (never more than ``nnz``)."""
    return min(int(math.ceil(prune_rate * nnz)), nnz)


def _select_top(score: Tensor, k: int, prefer: Tensor | None = None) -> Tensor:
    """Flat bool selection of the ``k`` largest scores; ties at the cut go to ``prefer`` units first, then
    to lower indices. O(n) (``kthvalue``), the same result as a stable descending sort."""
    s = score.reshape(-1)
    n = s.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=s.device)
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=s.device)
    cut = torch.kthvalue(s, n - k + 1).values  # the k-th largest score
    out = s > cut
    need = k - int(out.sum())
    if need > 0:
        tie = s == cut
        if prefer is None:
            idx = tie.nonzero().squeeze(1)
        else:
            p = prefer.reshape(-1)
            idx = torch.cat([(tie & p).nonzero().squeeze(1), (tie & ~p).nonzero().squeeze(1)])
        out[idx[:need]] = True
    return out


def magnitude_prune(mask: Tensor, score: Tensor, num_remove: int) -> Tensor:
    """New mask keeping the ``nnz(mask) - num_remove`` highest-scoring units.

    Equivalent to the official rule "zero the ``#zeros + num_remove`` smallest scores" (the score of a
    pruned unit is its stored weight magnitude, 0 for a masked weight). In a ShiftWise sync step the
    score sums all branches, so a unit masked in branch 0 but alive in another branch can be kept; the
    count of kept units is still exact.
    """
    if score.shape != mask.shape:
        raise ValueError(f"score shape {tuple(score.shape)} != mask shape {tuple(mask.shape)}")
    keep = max(int(mask.sum()) - num_remove, 0)
    return _select_top(score.float(), keep, prefer=mask).view(mask.shape)


def random_growth(mask: Tensor, num_grow: int, generator: torch.Generator) -> Tensor:
    """Turn on each inactive unit with probability ``num_grow / #inactive`` (the official ``random`` and
    ``random_sum`` rules: the expected number of new units is ``num_grow``, the count is not exact).

    The uniform draw covers every unit (active ones too, as in the official code), so the amount of
    randomness consumed does not depend on the mask. ``generator`` is a CPU generator.
    """
    draw = torch.rand(mask.shape, generator=generator).to(mask.device)
    n_zeros = int((~mask).sum())
    if num_grow <= 0 or n_zeros == 0:
        return mask.clone()
    return mask | (draw < num_grow / n_zeros)


def topk_growth(mask: Tensor, score: Tensor, num_grow: int) -> Tensor:
    """Turn on the ``num_grow`` inactive units with the largest ``score`` (ties: lower index first)."""
    if score.shape != mask.shape:
        raise ValueError(f"score shape {tuple(score.shape)} != mask shape {tuple(mask.shape)}")
    n = min(max(num_grow, 0), int((~mask).sum()))
    s = torch.where(mask, torch.full_like(score, -math.inf, dtype=torch.float32), score.float())
    return mask | _select_top(s, n, prefer=~mask).view(mask.shape)


def growth_signal(param: Tensor, kind: str, optimizer: torch.optim.Optimizer | None, name: str = "") -> Tensor:
    """The dense tensor whose magnitude ranks inactive weights for ``gradient`` / ``momentum`` growth.

    ``gradient``: ``param.grad``. ``momentum``: Adam's ``exp_avg / (sqrt(exp_avg_sq) + 1e-8)`` or SGD's
    ``momentum_buffer`` (as the official ``get_momentum_for_weight``).
    """
    if kind == "gradient":
        if param.grad is None:
            raise RuntimeError(
                f"gradient growth needs {name or 'the weight'}.grad: call masking.step() after the optimizer "
                "step and before optimizer.zero_grad()"
            )
        return param.grad.detach()
    if kind == "momentum":
        if optimizer is None:
            raise RuntimeError("momentum growth needs the optimizer: Masking(model, cfg, optimizer=opt)")
        state = optimizer.state.get(param, {})
        if "exp_avg" in state and "exp_avg_sq" in state:
            return state["exp_avg"] / (torch.sqrt(state["exp_avg_sq"]) + 1e-8)
        if state.get("momentum_buffer") is not None:
            return state["momentum_buffer"]
        raise RuntimeError(
            f"momentum growth: optimizer has no exp_avg/exp_avg_sq or momentum_buffer for {name or 'a weight'} "
            "(take at least one optimizer step first; SGD needs momentum > 0)"
        )
    raise ValueError(f"unknown growth signal {kind!r}")
