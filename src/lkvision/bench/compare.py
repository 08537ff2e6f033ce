"""Side-by-side timing: several variants of one workload, interleaved round by round in one process.

On a shared machine the load changes from second to second, so timing A for a minute and then B for a minute
compares two different machines. :func:`interleave` runs one pass of every variant per round (rotating the order
each round), so all variants see the same load; :func:`ratio` then takes the median over rounds of the per-round
ratios, which cancels load that is common to a round.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

__all__ = ["interleave", "ratio", "median", "CLOCKS"]


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def interleave(variants: Mapping[str, Callable[[], object]], rounds: int = 3, iters: int = 1,
               warmup: int = 1, clock: str = "wall") -> dict[str, list[float]]:
    """Seconds per call of each variant, one entry per round.

    Args:
        variants: name -> zero-argument callable (one forward pass, one training step, ...); a variant may
            wrap its call in a context manager (e.g. :func:`lkvision.bench.baseline.plain_pytorch`).
        rounds: timed rounds; each round runs every variant ``iters`` times, in an order rotated by one per
            round (so no variant always runs first or last).
        warmup: untimed calls of each variant before the first round.
        clock: "wall" (``time.perf_counter``: what a user waits; use it on a quiet machine) or "cpu"
            (``time.process_time``: CPU time of this process, which time slices given to other processes do not
            inflate; with one thread it is the compute thread's own time, the robust choice on a shared machine;
            with more threads it also counts OpenMP's spin-waiting).

    Returns:
        name -> list of ``rounds`` per-call times in seconds (the mean of the ``iters`` calls of that round).
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {tuple(CLOCKS)}, got {clock!r}")
    now = CLOCKS[clock]
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            fn = variants[name]
            t0 = now()
            for _ in range(iters):
                fn()
            times[name].append((now() - t0) / iters)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio(times: Mapping[str, list[float]], slow: str, fast: str) -> dict[str, float]:
    """Speed ratio ``time[slow] / time[fast]`` (> 1: ``fast`` is faster): the median of the per-round ratios,
    with their min and max (the round-to-round spread)."""
    per_round = [s / f for s, f in zip(times[slow], times[fast]) if f > 0]
    if not per_round:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"median": statistics.median(per_round), "min": min(per_round), "max": max(per_round)}
