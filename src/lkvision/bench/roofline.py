"""What this machine can do at best: achieved GEMM FLOP/s (fp32, bf16) and memory bandwidth, measured.

A model's achieved FLOP/s divided by the GEMM figure of its dtype says how far it is from the machine's compute
limit (the large-kernel families are dominated by the MLP GEMMs); the bandwidth figure bounds the element-wise
parts. Both are measured with the same thread count as the models, the best of a few repeats (the limit, not
the typical).
"""

from __future__ import annotations

import time

import torch

__all__ = ["gemm_flops", "memory_bandwidth", "machine_limits"]


def _best_seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_flops(dtype: torch.dtype = torch.float32, m: int = 4096, k: int = 1024, n: int = 1024,
               repeats: int = 5) -> dict[str, float]:
    """Achieved FLOP/s of an (m x k) @ (k x n) product, by ``torch.mm`` (MKL for fp32 on CPU, oneDNN for bf16)
    and by :func:`lkvision.ops.linear` (oneDNN); returns ``{"mm": ..., "onednn": ..., "best": ...}``."""
    from ..ops.linear import linear

    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    flops = 2.0 * m * k * n
    with torch.no_grad():
        out = {"mm": flops / _best_seconds(lambda: torch.mm(a, w.t()), repeats),
               "onednn": flops / _best_seconds(lambda: linear(a, w), repeats)}
    out["best"] = max(out.values())
    return out


def memory_bandwidth(megabytes: int = 256, repeats: int = 5) -> dict[str, float]:
    """Achieved bytes/s of a large copy (read + write counted) and of ``a + b`` (2 reads + 1 write)."""
    n = megabytes * 2**20 // 4
    a = torch.ones(n)
    b = torch.ones(n)
    c = torch.empty(n)
    copy = 8.0 * n / _best_seconds(lambda: c.copy_(a), repeats)
    add = 12.0 * n / _best_seconds(lambda: torch.add(a, b, out=c), repeats)
    return {"copy": copy, "add": add, "best": max(copy, add)}


def machine_limits(repeats: int = 5) -> dict[str, dict[str, float]]:
    """fp32 / bf16 GEMM FLOP/s and memory bandwidth (see the functions above)."""
    return {"gemm_fp32": gemm_flops(torch.float32, repeats=repeats),
            "gemm_bf16": gemm_flops(torch.bfloat16, repeats=repeats),
            "bandwidth": memory_bandwidth(repeats=repeats)}
