"""Depth-wise convolution micro-benchmark (RepLKNet Table 1; LK.md §3.1 and §8).

A stack of ``depth`` depth-wise K x K convs (padding K//2) on a (B, C, R, R) input, for a grid of kernel
sizes and resolutions, for every :func:`lkvision.ops.dwconv2d` path and plain ``F.conv2d``; forward only
(under ``no_grad``) or forward + backward. Timing follows the official script: ``runs`` timed runs between
full device syncs; the reported time is the mean of ``sorted(times)[1:-2]`` (drops the fastest and the two
slowest runs, which absorbs warm-up).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .throughput import DTYPES, synchronize

__all__ = ["dwconv_paths", "trimmed_mean", "dwconv_stack_time", "dwconv_benchmark"]


def dwconv_paths(device: torch.device | str = "cpu") -> list[str]:
    """Paths to compare on ``device``: ``"pytorch"`` (plain F.conv2d) and every ``dwconv2d`` impl that can run
    there (``"triton"`` only when the optional kernels are available)."""
    from ..ops.dwconv import DWCONV_IMPLS

    device = torch.device(device)
    paths = ["pytorch"]
    for impl in DWCONV_IMPLS:
        if impl == "triton":  # optional backend: keep it only if it runs here
            try:
                from ..ops.dwconv import dwconv2d

                dwconv2d(torch.zeros(1, 1, 4, 4, device=device), torch.zeros(1, 1, 3, 3, device=device),
                         impl="triton")
            except Exception:  # noqa: BLE001
                continue
        paths.append(impl)
    return paths


def trimmed_mean(times: Sequence[float]) -> float:
    """Mean of ``sorted(times)[1:-2]`` (the official protocol); plain mean when fewer than 4 runs."""
    t = sorted(times)
    t = t[1:-2] if len(t) >= 4 else t
    return sum(t) / len(t)


def _conv(path: str):
    if path == "pytorch":
        return lambda x, w, k: F.conv2d(x, w, padding=k // 2, groups=x.shape[1])
    from ..ops.dwconv import dwconv2d

    return lambda x, w, k: dwconv2d(x, w, None, k // 2, impl=path)


def dwconv_stack_time(
    path: str, batch: int, channels: int, resolution: int, kernel: int, depth: int = 24, dtype: str = "fp32",
    backward: bool = False, channels_last: bool = False, runs: int = 10, device: torch.device | str = "cpu",
    seed: int = 0,
) -> float:
    """Milliseconds of one pass through the stack (trimmed mean over ``runs``)."""
    device = torch.device(device)
    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, resolution, resolution, generator=g).to(device=device, dtype=dt)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ws = [(torch.randn(channels, 1, kernel, kernel, generator=g) / kernel).to(device=device, dtype=dt)
          for _ in range(depth)]
    if backward:
        x.requires_grad_(True)
        for w in ws:
            w.requires_grad_(True)
    conv = _conv(path)

    def once():
        y = x
        for w in ws:
            y = conv(y, w, kernel)
        if backward:
            y.float().sum().backward()
        return y

    times = []
    once() if backward else _no_grad(once)  # one untimed warm-up pass (lazy initialisation)
    for _ in range(runs):
        synchronize(device)
        t0 = time.perf_counter()
        if backward:
            once()
        else:
            with torch.no_grad():
                once()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * trimmed_mean(times)


def _no_grad(fn):
    with torch.no_grad():
        return fn()


def dwconv_benchmark(
    kernels: Sequence[int] = (3, 5, 7, 13, 31), resolutions: Sequence[int] = (16, 32), batch: int = 2,
    channels: int = 64, depth: int = 4, paths: Sequence[str] | None = None, dtype: str = "fp32",
    backward: Sequence[bool] = (False, True), channels_last: bool = False, runs: int = 5,
    device: torch.device | str = "cpu",
) -> list[dict]:
    """Rows ``path, pass, R, K, ms, speedup_vs_pytorch`` for the whole grid (small CPU defaults; Table 1 is
    batch 64, channels 384, depth 24, K in 3..31, R in 16/32/64 on a GPU). Failing paths give ``error``."""
    paths = list(paths) if paths is not None else dwconv_paths(device)
    rows = []
    for bwd in backward:
        for R in resolutions:
            for K in kernels:
                base = None
                for path in paths:
                    row = {"path": path, "pass": "fwd+bwd" if bwd else "fwd", "R": R, "K": K}
                    try:
                        ms = dwconv_stack_time(path, batch, channels, R, K, depth, dtype, bwd, channels_last,
                                               runs, device)
                        row["ms"] = ms
                        if path == "pytorch":
                            base = ms
                        row["speedup_vs_pytorch"] = base / ms if base else float("nan")
                    except Exception as e:  # noqa: BLE001 - reported, not fatal
                        row["ms"] = float("nan")
                        row["error"] = f"{type(e).__name__}: {e}"[:200]
                    rows.append(row)
    return rows
