"""What this machine can do at best: achieved GEMM FLOP/s (fp32, bf16) and memory bandwidth, measured.

A model's achieved FLOP/s divided by the GEMM figure of its dtype says how far it is from the machine's compute
limit (the large-kernel families are dominated by the MLP GEMMs); the bandwidth figure bounds the element-wise
parts. Both are measured with the same thread count as the models, the best of a few repeats (the limit, not
the typical).
"""

from __future__ import annotations

import functools

import torch

__all__ = ["gemm_flops", "gemm_call", "memory_bandwidth", "machine_limits", "cpu_bf16_gemm_speedup",
           "bf16_speed_note"]


def _best_seconds(fn, repeats: int, clock: str = "wall") -> float:
    from .compare import CLOCKS

    now = CLOCKS[clock]
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = now()
        fn()
        best = min(best, now() - t0)
    return best


def gemm_call(dtype: torch.dtype = torch.float32, m: int = 4096, k: int = 1024, n: int = 1024):
    """``(fn, flops)``: a zero-argument callable running one (m x k) @ (k x n) oneDNN GEMM, and its FLOPs. Timed
    among a benchmark's interleaved variants, it gives the machine's GEMM rate *under the same load* as the
    models (``benchmarks/cpu_models.py`` divides each model's FLOP/s by it round by round)."""
    from ..ops.linear import linear

    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)

    def fn():
        with torch.no_grad():
            return linear(a, w)
    return fn, 2.0 * m * k * n


def gemm_flops(dtype: torch.dtype = torch.float32, m: int = 4096, k: int = 1024, n: int = 1024,
               repeats: int = 5, clock: str = "wall") -> dict[str, float]:
    """Achieved FLOP/s of an (m x k) @ (k x n) product, by ``torch.mm`` (MKL for fp32 on CPU, oneDNN for bf16)
    and by :func:`lkvision.ops.linear` (oneDNN); returns ``{"mm": ..., "onednn": ..., "best": ...}``."""
    from ..ops.linear import linear

    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    flops = 2.0 * m * k * n
    with torch.no_grad():
        out = {"mm": flops / _best_seconds(lambda: torch.mm(a, w.t()), repeats, clock),
               "onednn": flops / _best_seconds(lambda: linear(a, w), repeats, clock)}
    out["best"] = max(out.values())
    return out


def memory_bandwidth(megabytes: int = 256, repeats: int = 5, clock: str = "wall") -> dict[str, float]:
    """Achieved bytes/s of a large copy (read + write counted) and of ``a + b`` (2 reads + 1 write)."""
    n = megabytes * 2**20 // 4
    a = torch.ones(n)
    b = torch.ones(n)
    c = torch.empty(n)
    copy = 8.0 * n / _best_seconds(lambda: c.copy_(a), repeats, clock)
    add = 12.0 * n / _best_seconds(lambda: torch.add(a, b, out=c), repeats, clock)
    return {"copy": copy, "add": add, "best": max(copy, add)}


def machine_limits(repeats: int = 5, clock: str = "wall") -> dict[str, dict[str, float]]:
    """fp32 / bf16 GEMM FLOP/s and memory bandwidth (see the functions above), timed with ``clock``
    (:data:`lkvision.bench.compare.CLOCKS`)."""
    return {"gemm_fp32": gemm_flops(torch.float32, repeats=repeats, clock=clock),
            "gemm_bf16": gemm_flops(torch.bfloat16, repeats=repeats, clock=clock),
            "bandwidth": memory_bandwidth(repeats=repeats, clock=clock)}


@functools.cache
def cpu_bf16_gemm_speedup(size: int = 768) -> float:
    """This CPU's achieved bf16 GEMM FLOP/s over its fp32 GEMM FLOP/s (a size^3 product, the best of
    ``torch.mm`` and oneDNN, best of 3; measured once per process, ~0.1 s). About 2 with AVX-512-bf16 on AMD
    Zen 4/5, more with AMX; below 1 on Intel Xeons whose AMX is not exposed (a VM), where AVX-512-bf16
    dot products run at half rate."""
    fp32 = gemm_flops(torch.float32, size, size, size, repeats=3)["best"]
    bf16 = gemm_flops(torch.bfloat16, size, size, size, repeats=3)["best"]
    return bf16 / fp32


def bf16_speed_note(device: str | torch.device = "cpu") -> str | None:
    """A one-line note when bf16 is requested on a CPU where it is slower than fp32 (None otherwise)."""
    if torch.device(device).type != "cpu":
        return None
    ratio = cpu_bf16_gemm_speedup()
    if ratio >= 1.0:
        return None
    return (f"note: bf16 matrix products run at {ratio:.2f}x the speed of fp32 ones on this CPU (no AMX available; "
            "its AVX-512-bf16 instructions are slower than fp32 FMAs here), so fp32 is likely faster")
