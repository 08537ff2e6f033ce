"""Per-layer densities for sparse initialisation: uniform, ERK and SNIP.

Densities are fractions of *mask units* kept (elements for fine-grained masks, filters for coarse ones).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["uniform_densities", "erk_densities", "snip_saliency", "densities_from_scores"]


def uniform_densities(names: Sequence[str], density: float) -> dict[str, float]:
    """Every layer gets ``density``."""
    return {n: float(density) for n in names}


def erk_densities(shapes: Mapping[str, Sequence[int]], density: float, power_scale: float = 1.0) -> dict[str, float]:
    """Erdos-Renyi-Kernel densities (RigL / SLaK ``ERK``).

    Layer density is ``eps * (sum(shape) / prod(shape)) ** power_scale`` with ``eps`` chosen so that the
    total number of kept weights is ``density * sum(numel)``; a layer whose density would exceed 1 is made
    dense and ``eps`` is solved again for the rest.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    numel = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: (sum(s) / math.prod(s)) ** power_scale for n, s in shapes.items()}
    dense: set[str] = set()
    while True:
        budget = sum(density * numel[n] for n in shapes) - sum(numel[n] for n in dense)
        divisor = sum(raw[n] * numel[n] for n in shapes if n not in dense)
        if divisor == 0:
            eps = 0.0
            break
        eps = budget / divisor
        free = [n for n in shapes if n not in dense]
        worst = max(raw[n] for n in free)
        if worst * eps <= 1.0:
            break
        dense.update(n for n in free if raw[n] == worst)
    return {n: 1.0 if n in dense else min(max(eps * raw[n], 0.0), 1.0) for n in shapes}


def snip_saliency(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    batch: tuple[Tensor, Tensor],
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """SNIP saliency ``|w * dL/dw|`` of each parameter in ``params`` from one batch (same shapes as ``params``).

    Runs one forward/backward of ``model`` on ``batch = (inputs, targets)`` with ``loss_fn`` (default:
    cross-entropy on hard labels) in the model's current mode. Side effects are undone: ``.grad`` of
    parameters is not touched (``torch.autograd.grad``), buffers (BN running stats) are restored, and the
    global RNG state is forked. A parameter the loss does not reach scores 0.
    """
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ValueError("SNIP needs sample_batch=(inputs, targets)")
    loss_fn = loss_fn or F.cross_entropy
    names = list(params)
    device = next(iter(params.values())).device
    x, y = (t.to(device) if isinstance(t, Tensor) else t for t in batch)
    saved = {n: b.detach().clone() for n, b in model.named_buffers()}
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            loss = loss_fn(model(x), y)
            grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in saved:
                    b.copy_(saved[n])
    out = {}
    for n, g in zip(names, grads):
        w = params[n].detach().float()
        out[n] = torch.zeros_like(w) if g is None else (w * g.float()).abs()
    return out


def densities_from_scores(scores: Mapping[str, Tensor], density: float) -> dict[str, float]:
    """Layer densities from one global top-k over the concatenated scores of all layers.

    ``k = int(density * N)`` over the N scores of every layer together; the threshold is the k-th largest
    score and a layer's density is the fraction of its scores strictly above it (as the official code:
    k - 1 units kept without ties, fewer when many scores tie at the threshold, e.g. units the loss does
    not reach, which all score 0 and are all pruned). A layer's entry may
    hold the concatenated scores of several tensors (e.g. all rep branches of a ShiftWise layer, which
    makes its density the mean of the branch densities).
    """
    if not scores:
        return {}
    flat = torch.cat([s.reshape(-1).float().cpu() for s in scores.values()])
    k = int(density * flat.numel())
    if k <= 0:
        return {n: 0.0 for n in scores}
    threshold = torch.topk(flat, k, sorted=True).values[-1]
    return {n: float((s.float().cpu() > threshold).float().mean()) for n, s in scores.items()}
