"""Parameter and FLOP/MAC counting; :func:`rebind`, the module-attribute swap behind the plain-PyTorch paths
(:func:`lkvision.export.plain_dwconv`, :func:`lkvision.bench.baseline.plain_pytorch`)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence

import torch
from torch import nn

__all__ = ["count_params", "count_flops", "count_macs", "nonzero_params", "rebind"]


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        n += p.numel()
    return n


def nonzero_params(model: nn.Module) -> int:
    """Number of non-zero parameter elements (what sparse-training papers report)."""
    return sum(int((p != 0).sum()) for p in model.parameters())


@torch.no_grad()
def count_flops(
    model: nn.Module, input_size: tuple[int, ...] = (1, 3, 224, 224), by_operator: bool = False
) -> int | tuple[int, dict]:
    """FLOPs of one forward pass measured by ``torch.utils.flop_counter.FlopCounterMode``
    (1 multiply-add = 2 FLOPs). lkvision's custom ops register their own formulas, so they are
    counted. The model is run in eval mode on zeros of ``input_size`` on its own device/dtype."""
    from torch.utils.flop_counter import FlopCounterMode

    p = next(iter(model.parameters()), None)
    x = torch.zeros(input_size, device=p.device if p is not None else "cpu",
                    dtype=p.dtype if p is not None and p.is_floating_point() else torch.float32)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as fc:
            model(x)
    finally:
        model.train(was_training)
    total = fc.get_total_flops()
    if by_operator:
        ops = {str(k): int(v) for k, v in fc.get_flop_counts().get("Global", {}).items()}
        return total, ops
    return total


def count_macs(model: nn.Module, input_size: tuple[int, ...] = (1, 3, 224, 224)) -> int:
    """Multiply-accumulates of one forward (= FLOPs / 2; what the papers call "FLOPs")."""
    return count_flops(model, input_size) // 2


@contextlib.contextmanager
def rebind(pairs: Sequence[tuple[object, object]]) -> Iterator[None]:
    """Within the block, every module attribute of ``lkvision.*`` bound to ``fast`` is bound to ``reference``,
    for each ``(fast, reference)`` pair; restored on exit (also on error). Not thread-safe.

    Rebinding by identity reaches every ``from ... import fast`` copy of a function, not only its home module.
    """
    patched: list[tuple[object, str, object]] = []
    try:
        for name, mod in list(sys.modules.items()):
            if mod is None or not (name == "lkvision" or name.startswith("lkvision.")):
                continue
            for attr, val in list(vars(mod).items()):
                for fast, ref in pairs:
                    if val is fast:
                        patched.append((mod, attr, val))
                        setattr(mod, attr, ref)
                        break
        yield
    finally:
        for mod, attr, val in reversed(patched):
            setattr(mod, attr, val)
