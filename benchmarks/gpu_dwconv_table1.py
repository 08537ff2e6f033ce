"""RepLKNet Table 1 on the GPU: 24 stacked depth-wise convs on (64, 384, R, R) (LK.md §3.1, §8).

Paths: our Triton kernel (NCHW and channels_last input), PyTorch NCHW (``F.conv2d``; ATen's direct kernel
for K > 5) and PyTorch channels_last (cuDNN). Forward (``no_grad``) and forward + backward (grads for input
and weights), fp32 and bf16. Timing: CUDA events around the whole stack, warm-up runs first (these also run
Triton's autotuner), then the median of ``--runs`` timed runs. Before timing, every path's output of the
first layer is checked against fp64 ``F.conv2d`` (relative error stored in the JSON).

Usage on the GPU machine (after ``pip install --no-deps --no-build-isolation -e .``)::

    python benchmarks/gpu_dwconv_table1.py                       # full grid (long: split it if needed)
    python benchmarks/gpu_dwconv_table1.py --res 32 --kernels 13 31 --modes fwd
    python benchmarks/gpu_dwconv_table1.py --quick               # 2 resolutions x 3 kernels, smoke test

Rows are appended to the JSON file as they finish (a killed run keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
KERNELS = [3, 5, 7, 9, 13, 17, 21, 27, 29, 31]
STRIPS = [(3, 51), (51, 3)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------------ shared helpers
def environment() -> dict:
    """Device name and software versions (stored with every result file)."""
    env = {"torch": torch.__version__, "python": platform.python_version(), "host": platform.node(),
           "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device=p.name, sms=p.multi_processor_count, memory_gb=round(p.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    try:
        import lkvision

        env["lkvision"] = lkvision.__version__
    except Exception:
        pass
    return env


def cuda_time(fn, warmup: int = 3, runs: int = 10, budget_s: float | None = None) -> dict:
    """Median / min / max milliseconds of ``fn()`` with CUDA events (synchronised), after ``warmup`` calls.

    With ``budget_s``, the number of timed runs shrinks (to >= 3) when one call is slow."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    if budget_s is not None:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        one = time.perf_counter() - t0
        runs = max(3, min(runs, int(budget_s / max(one, 1e-6))))
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "runs": runs}


def copy_bandwidth_gbs(nbytes: int = 2 * 2**30) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), the practical memory roofline."""
    a = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").normal_()
    b = torch.empty_like(a)
    t = cuda_time(lambda: b.copy_(a), warmup=3, runs=20)["median_ms"]
    return 2 * nbytes / (t * 1e-3) / 1e9


def append_json(path: Path, record: dict) -> None:
    """Append one record to a JSON list file (created on first use), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.exists() else []
    data.append(record)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------ the benchmark
def _conv_fn(path: str, kh: int, kw: int):
    pad = (kw // 2, kw // 2, kh // 2, kh // 2)
    if path.startswith("triton"):
        from lkvision.ops.kernels.triton_dwconv import dwconv2d

        return lambda x, w: dwconv2d(x, w, None, pad)
    return lambda x, w: F.conv2d(x, w, None, padding=(kh // 2, kw // 2), groups=x.shape[1])


def _is_cl(path: str) -> bool:
    return path.endswith("_cl")


def run_one(path: str, mode: str, dtype: str, res: int, kh: int, kw: int, args) -> dict:
    dt = DTYPES[dtype]
    fmt = torch.channels_last if _is_cl(path) else torch.contiguous_format
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(args.batch, args.channels, res, res, device="cuda", generator=gen).to(dt)
    x = x.contiguous(memory_format=fmt)
    ws = [(torch.randn(args.channels, 1, kh, kw, device="cuda", generator=gen) / math.sqrt(kh * kw)).to(dt)
          for _ in range(args.depth)]
    conv = _conv_fn(path, kh, kw)

    with torch.no_grad():  # correctness of the path on this shape (first layer, fp64 reference)
        ref = F.conv2d(x[:2].double(), ws[0].double(), padding=(kh // 2, kw // 2), groups=args.channels)
        err = rel_err(conv(x[:2].contiguous(memory_format=fmt), ws[0]), ref)

    if mode == "fwd":
        def fn():
            with torch.no_grad():
                y = x
                for w in ws:
                    y = conv(y, w)
            return y
    else:
        xg = x.detach().requires_grad_()
        wg = [w.detach().requires_grad_() for w in ws]
        gy = torch.randn_like(x)

        def fn():
            y = xg
            for w in wg:
                y = conv(y, w)
            y.backward(gy)
            xg.grad = None
            for w in wg:
                w.grad = None

    t = cuda_time(fn, warmup=args.warmup, runs=args.runs, budget_s=args.budget_s)
    return {"path": path, "mode": mode, "dtype": dtype, "R": res, "KH": kh, "KW": kw, "rel_err": err, **t}


def print_table(rows: list[dict]) -> None:
    by_key: dict[tuple, dict] = {}
    for r in rows:
        by_key.setdefault((r["mode"], r["dtype"], r["R"], r["KH"], r["KW"]), {})[r["path"]] = r["median_ms"]
    paths = ["triton", "triton_cl", "torch", "torch_cl"]
    print(f"{'mode':7}{'dtype':6}{'R':>4}{'K':>7}" + "".join(f"{p:>12}" for p in paths)
          + f"{'best_torch/ours':>17}{'nchw/ours':>11}")
    for (mode, dtype, res, kh, kw), d in sorted(by_key.items()):
        ours = min((d[p] for p in ("triton", "triton_cl") if p in d), default=math.nan)
        best_torch = min((d[p] for p in ("torch", "torch_cl") if p in d), default=math.nan)
        k = f"{kh}" if kh == kw else f"{kh}x{kw}"
        print(f"{mode:7}{dtype:6}{res:>4}{k:>7}" + "".join(f"{d.get(p, math.nan):>12.2f}" for p in paths)
              + f"{best_torch / ours:>17.2f}{d.get('torch', math.nan) / ours:>11.2f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--res", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--kernels", type=int, nargs="+", default=KERNELS)
    ap.add_argument("--no-strips", action="store_true", help="skip the 3x51 / 51x3 strips")
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument("--paths", nargs="+", default=["triton", "triton_cl", "torch", "torch_cl"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--channels", type=int, default=384)
    ap.add_argument("--depth", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=6.0, help="time budget per measurement (fewer runs)")
    ap.add_argument("--quick", action="store_true", help="R in {16, 32}, K in {7, 13, 31}, 3 runs")
    ap.add_argument("--out", type=Path, default=RESULTS / "gpu_dwconv_table1.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_dwconv_table1: no CUDA device; nothing to do")
        return 0
    if args.quick:
        args.res, args.kernels, args.runs, args.no_strips = [16, 32], [7, 13, 31], 3, False
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32 for every path
    env = environment()
    print(json.dumps(env))
    shapes = [(k, k) for k in args.kernels] + ([] if args.no_strips else STRIPS)
    rows = []
    for mode in args.modes:
        for dtype in args.dtypes:
            for res in args.res:
                for kh, kw in shapes:
                    for path in args.paths:
                        try:
                            row = run_one(path, mode, dtype, res, kh, kw, args)
                        except Exception as exc:  # keep going; record the failure
                            row = {"path": path, "mode": mode, "dtype": dtype, "R": res, "KH": kh, "KW": kw,
                                   "error": f"{type(exc).__name__}: {exc}"[:500], "median_ms": math.nan}
                        torch.cuda.empty_cache()
                        rows.append(row)
                        append_json(args.out, {**row, "env": env, "batch": args.batch, "channels": args.channels,
                                               "depth": args.depth})
                        print(json.dumps({k: v for k, v in row.items() if k != "env"}), flush=True)
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
