"""Shared plumbing of the GPU benchmark scripts (``gpu_dwconv_table1.py``, ``gpu_sw_op.py``, ``gpu_models.py``).

* command-line options every script has: ``--device {cuda,cpu}``, ``--smoke``, ``--out``, ``--time-limit-s``;
* the timer: CUDA events on CUDA, ``time.perf_counter`` on CPU; a first (warm-up / autotune) call, more warm-up
  calls and timed runs within a per-measurement time budget;
* the ``env`` block stored with every record (identical keys on CPU and CUDA, smoke or not);
* append-only JSON result files, relative errors, the memory-copy bandwidth, Triton availability.

Smoke mode (``--smoke``) runs a script's whole logic on tiny shapes, on CPU unless ``--device cuda`` is given,
and never writes into ``benchmarks/results/``. Under ``TRITON_INTERPRET=1`` the Triton paths run in triton's CPU
interpreter; otherwise they are skipped on CPU (with a printed note and a ``skipped`` record).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lkvision.fileio import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------------ options
def add_common_args(ap: argparse.ArgumentParser, result_name: str) -> None:
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None,
                    help="where to run (default: cuda; cpu with --smoke)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes, one repeat, CPU unless --device cuda: checks the whole script in seconds "
                         "(set TRITON_INTERPRET=1 to run the Triton paths in triton's CPU interpreter)")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"JSON result file, appended to (default: benchmarks/results/{result_name}; with --smoke "
                         f"a new temporary directory)")
    ap.add_argument("--time-limit-s", type=float, default=None,
                    help="start no new measurement after this many seconds (the rest is listed as not run)")


def resolve_common(args: argparse.Namespace, result_name: str) -> str | None:
    """Fill ``args.device`` and ``args.out``; returns an error message, or None when the run can go ahead."""
    if args.device is None:
        args.device = "cpu" if args.smoke else "cuda"
    if args.out is None:
        if args.smoke:
            args.out = Path(tempfile.mkdtemp(prefix="lkv_smoke_")) / result_name
        else:
            args.out = RESULTS / result_name
    if args.smoke and args.out.resolve().is_relative_to(RESULTS.resolve()):
        return f"--smoke never writes into {RESULTS} (got --out {args.out})"
    if args.device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device (run with --smoke, or --device cpu, on a machine without one)"
    return None


def parse_with_defaults(ap: argparse.ArgumentParser, argv: list[str] | None, defaults: dict,
                        presets=None) -> argparse.Namespace:
    """Parse; ``presets(args)`` (if given) may fill options first (e.g. ``--quick``); every option still unset
    then takes its ``(full run, --smoke)`` default from ``defaults``."""
    args = ap.parse_args(argv)
    if presets is not None:
        presets(args)
    for name, (full, smoke) in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, smoke if args.smoke else full)
    return args


def start_run(args: argparse.Namespace, script: str, result_name: str) -> dict | None:
    """Resolve device/out, set the backends and return the ``env`` block; None (after saying why) when the run
    cannot go ahead."""
    problem = resolve_common(args, result_name)
    if problem:
        print(f"{script}: {problem}")
        return None
    setup_backends(args.device)
    return environment(args.device, args.smoke)


def setup_backends(device: str) -> None:
    """fp32 means fp32 for every path (no TF32 in cuDNN or matmuls); cuDNN picks its fastest algorithms."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


class Deadline:
    """``--time-limit-s``: ``expired()`` once the limit has passed; remembers what was not run."""

    def __init__(self, limit_s: float | None):
        self.limit_s = limit_s
        self.t0 = time.perf_counter()
        self.not_run: list[str] = []

    def expired(self) -> bool:
        return self.limit_s is not None and time.perf_counter() - self.t0 > self.limit_s

    def skip(self, what: str) -> None:
        self.not_run.append(what)

    def report(self, script: str) -> None:
        if self.not_run:
            print(f"\n{script}: time limit of {self.limit_s:.0f} s reached; {len(self.not_run)} measurements not run:")
            for w in self.not_run:
                print(f"  not run: {w}")


def finish_run(script: str, rows: list[dict], deadline: Deadline, out) -> int:
    """The end of every GPU script: what the time limit left out, a one-line summary; exit code 1 on errors."""
    deadline.report(script)
    n_err = sum(r["error"] is not None for r in rows)
    n_skip = sum(r["skipped"] is not None for r in rows)
    print(f"{script}: {len(rows)} records ({n_err} errors, {n_skip} skipped) in {out}")
    return 1 if n_err else 0


# ------------------------------------------------------------------------------------------ environment
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str, smoke: bool = False) -> dict:
    """Device and software versions (stored with every record; the same keys on every device)."""
    env = {"torch": torch.__version__, "python": platform.python_version(), "host": platform.node(),
           "time": time.strftime("%Y-%m-%d %H:%M:%S"), "device_type": device, "smoke": bool(smoke),
           "device": None, "sms": None, "memory_gb": None, "cuda": torch.version.cuda, "cudnn": None,
           "cpu_threads": torch.get_num_threads(), "triton": None,
           "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1", "lkvision": None,
           "tf32": bool(torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        pass
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update(device=p.name, sms=p.multi_processor_count, memory_gb=round(p.total_memory / 2**30, 1),
                   cudnn=torch.backends.cudnn.version())
    else:
        env.update(device=_cpu_name())
    try:
        import lkvision

        env["lkvision"] = lkvision.__version__
    except Exception:
        pass
    return env


def triton_skip_reason(device: str, dtype: torch.dtype = torch.float32) -> str | None:
    """None when the Triton kernels run on (device, dtype); otherwise why not (printed, stored as ``skipped``).

    Needed because the kernels' custom ops silently fall back to PyTorch where they cannot run: a ``triton``
    row measured there would be a PyTorch measurement."""
    try:
        from lkvision.ops.kernels import is_available
    except Exception as exc:
        return f"lkvision.ops.kernels does not import ({type(exc).__name__}: {exc})"
    if is_available(torch.empty(1, 1, 1, 1, device=device, dtype=dtype)):
        return None
    if device == "cpu":
        return "Triton kernels not available on cpu (set TRITON_INTERPRET=1 to run them in the interpreter)"
    return f"Triton kernels not available on {device} for {dtype} (is triton installed?)"


# ------------------------------------------------------------------------------------------ timing
def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def empty_cache(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()


def _timed_call(fn, device: str) -> float:
    """Milliseconds of one call: CUDA events on CUDA (after a synchronize), perf_counter on CPU."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_fn(fn, device: str, warmup: int = 3, runs: int = 10, budget_s: float | None = None,
            probe_max_s: float = 15.0) -> dict:
    """Median / min / max milliseconds of ``fn()`` over ``runs`` timed calls after ``warmup`` calls.

    The first warm-up call (compilation, Triton autotuning, cuDNN benchmarking, lkvision's autoselect) is timed
    too and returned as ``first_ms``; the second one estimates the steady-state time. With ``budget_s``, slow
    calls shrink the rest so that one measurement takes about ``budget_s``: further warm-up calls use at most a
    quarter of it and the timed runs the budget (at least one run). A first call longer than ``probe_max_s``
    (slow in steady state too, e.g. ATen's NCHW backward at K = 31) is followed by one timed call only.
    ``warmup=0`` (smoke runs): no untimed call, the first call is timed (the only one with ``runs=1``).
    ``runs`` in the result counts the timed calls."""
    times: list[float] = []
    if warmup <= 0:
        times.append(_timed_call(fn, device))
        first_s = one_s = times[0] * 1e-3
    else:
        first_s = one_s = _wall_s(fn, device)
        if warmup >= 2 and first_s <= probe_max_s:  # (a first call slower than that: one timed call follows)
            one_s = _wall_s(fn, device)
        more_warmup = warmup - 2
        if budget_s is not None:
            more_warmup = min(more_warmup, int(0.25 * budget_s / max(one_s, 1e-6)))
        for _ in range(max(0, more_warmup)):
            fn()
        synchronize(device)
    if budget_s is not None:
        runs = min(runs, int(budget_s / max(one_s, 1e-6)))
    times += [_timed_call(fn, device) for _ in range(max(1, runs) - len(times))]
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "runs": len(times),
            "first_ms": first_s * 1e3}


def _wall_s(fn, device: str) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def copy_bandwidth_gbs(device: str, nbytes: int | None = None) -> float:
    """Copy bandwidth (bytes read + written per second) on the device: the practical memory roofline.

    2 GiB buffers on CUDA; 64 MiB on CPU (smoke runs: a stand-in so that the ratios exist)."""
    if nbytes is None:
        nbytes = 2 * 2**30 if device == "cuda" else 64 * 2**20
    t = _copy_ms(device, nbytes)
    empty_cache(device)  # the buffers are gone: give the memory back to the device
    return 2 * nbytes / (t * 1e-3) / 1e9


def _copy_ms(device: str, nbytes: int) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    return time_fn(lambda: dst.copy_(src), device, warmup=3, runs=20 if device == "cuda" else 5)["median_ms"]


# ------------------------------------------------------------------------------------------ results
def append_json(path: Path, record: dict) -> None:
    """Append one record to a JSON list file (created on first use), atomically."""
    data = json.loads(path.read_text()) if path.exists() else []
    data.append(record)
    atomic_write_json(path, data, indent=1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64 (on ``b``'s device)."""
    a, b = a.to(device=b.device, dtype=torch.float64), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


def fmt(v, spec: str) -> str:
    """Format a number (None / missing -> nan) with ``spec``."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        v = math.nan
    return format(v, spec)
