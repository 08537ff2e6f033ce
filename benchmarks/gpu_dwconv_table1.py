"""RepLKNet Table 1 on the GPU: 24 stacked depth-wise convs on (64, 384, R, R) (LK.md §3.1, §8).

Paths: our Triton kernel (NCHW and channels_last input), PyTorch NCHW (``F.conv2d``; ATen's direct kernel
for K > 5) and PyTorch channels_last (cuDNN). Forward (``no_grad``) and forward + backward (grads for input
and weights), fp32 and bf16. Timing: CUDA events around the whole stack, warm-up runs first (these also run
Triton's autotuner), then the median of ``--runs`` timed runs within ``--budget-s`` per measurement. Before
timing, every path's output of the first layer is checked against fp64 ``F.conv2d`` (``rel_err`` in the JSON).
A path whose one call takes more than ``--max-call-s`` is not measured at larger kernels of the same (mode,
dtype, R) (a ``skipped`` record says so): PyTorch's NCHW backward at K = 31 can take many seconds per call.

Usage on the GPU machine (after ``pip install --no-deps --no-build-isolation -e .``)::

    python benchmarks/gpu_dwconv_table1.py                       # full grid (long: split it by --res)
    python benchmarks/gpu_dwconv_table1.py --res 32 --kernels 13 31 --modes fwd
    python benchmarks/gpu_dwconv_table1.py --quick               # R 16, 32 x K 7, 13, 31 + strips
    python benchmarks/gpu_dwconv_table1.py --smoke               # CPU: R = 8, K 3, 7 + a 3x9 strip, 2 layers,
                                                                 # batch 2, 2 channels, one call per measurement

``--smoke`` takes seconds; with ``TRITON_INTERPRET=1`` the Triton paths run in triton's interpreter (~20 s),
without it they are skipped on CPU (a note and ``skipped`` records).

Rows are appended to the JSON file as they finish (a killed run keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu_common import (  # noqa: E402
    DTYPES,
    Deadline,
    add_common_args,
    append_json,
    empty_cache,
    error_text,
    finish_run,
    fmt,
    parse_with_defaults,
    rel_err,
    start_run,
    time_fn,
    triton_skip_reason,
)

RESULT_NAME = "gpu_dwconv_table1.json"
KERNELS = [3, 5, 7, 9, 13, 17, 21, 27, 29, 31]
STRIPS = [(3, 51), (51, 3)]
PATHS = ["triton", "triton_cl", "torch", "torch_cl"]
# (full run, --smoke) defaults of the grid options
# (smoke: the Triton interpreter's time grows with the taps, so smoke kernels are small but still take each
# kernel family: direct 3x3, tensor-core Toeplitz for KW >= 7, a strip wider than the image)
DEFAULTS = {"res": ([16, 32, 64], [8]), "kernels": (KERNELS, [3, 7]), "strips": (STRIPS, [(3, 9)]),
            "dtypes": (["fp32", "bf16"], ["fp32", "bf16"]), "batch": (64, 2), "channels": (384, 2),
            "depth": (24, 2), "warmup": (3, 0), "runs": (10, 1), "budget_s": (6.0, 1.0)}
TIMING_KEYS = ("median_ms", "min_ms", "max_ms", "runs", "first_ms")


# ------------------------------------------------------------------------------------------ the benchmark
def _conv_fn(path: str, kh: int, kw: int):
    pad = (kw // 2, kw // 2, kh // 2, kh // 2)
    if path.startswith("triton"):
        from lkvision.ops.kernels.triton_dwconv import triton_dwconv2d as dwconv2d

        return lambda x, w: dwconv2d(x, w, None, pad)
    return lambda x, w: F.conv2d(x, w, None, padding=(kh // 2, kw // 2), groups=x.shape[1])


def _is_cl(path: str) -> bool:
    return path.endswith("_cl")


def run_one(path: str, mode: str, dtype: str, res: int, kh: int, kw: int, args) -> dict:
    dev = args.device
    dt = DTYPES[dtype]
    fmt_ = torch.channels_last if _is_cl(path) else torch.contiguous_format
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(args.batch, args.channels, res, res, device=dev, generator=gen).to(dt)
    x = x.contiguous(memory_format=fmt_)
    ws = [(torch.randn(args.channels, 1, kh, kw, device=dev, generator=gen) / math.sqrt(kh * kw)).to(dt)
          for _ in range(args.depth)]
    conv = _conv_fn(path, kh, kw)

    with torch.no_grad():  # correctness of the path on this shape (first layer, fp64 reference)
        x2 = x[:2].contiguous(memory_format=fmt_)
        ref = F.conv2d(x2.double(), ws[0].double(), padding=(kh // 2, kw // 2), groups=args.channels)
        err = rel_err(conv(x2, ws[0]), ref)

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

    t = time_fn(fn, dev, warmup=args.warmup, runs=args.runs, budget_s=args.budget_s, probe_max_s=args.max_call_s)
    return {"rel_err": err, **t}


def _row(path, mode, dtype, res, kh, kw) -> dict:
    """A record with every key (the measured ones nan, ``error`` / ``skipped`` None)."""
    return {"path": path, "mode": mode, "dtype": dtype, "R": res, "KH": kh, "KW": kw, "rel_err": math.nan,
            **dict.fromkeys(TIMING_KEYS, math.nan), "error": None, "skipped": None}


def print_table(rows: list[dict]) -> None:
    by_key: dict[tuple, dict] = {}
    for r in rows:
        by_key.setdefault((r["mode"], r["dtype"], r["R"], r["KH"], r["KW"]), {})[r["path"]] = r["median_ms"]
    print(f"{'mode':7}{'dtype':6}{'R':>4}{'K':>7}" + "".join(f"{p:>12}" for p in PATHS)
          + f"{'best_torch/ours':>17}{'nchw/ours':>11}")
    for (mode, dtype, res, kh, kw), d in sorted(by_key.items()):
        ours = _nanmin(d.get(p) for p in ("triton", "triton_cl"))
        best_torch = _nanmin(d.get(p) for p in ("torch", "torch_cl"))
        k = f"{kh}" if kh == kw else f"{kh}x{kw}"
        print(f"{mode:7}{dtype:6}{res:>4}{k:>7}" + "".join(fmt(d.get(p), ">12.2f") for p in PATHS)
              + fmt(best_torch / ours, ">17.2f") + fmt(d.get("torch", math.nan) / ours, ">11.2f"))


def _nanmin(values) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return min(vals) if vals else math.nan


def _strip(text: str) -> tuple[int, int]:
    try:
        kh, kw = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected KHxKW (e.g. 3x51), got {text!r}") from None
    return kh, kw


def _quick_preset(args: argparse.Namespace) -> None:
    if args.quick:
        args.res = args.res or [16, 32]
        args.kernels = args.kernels or [7, 13, 31]
        args.runs = args.runs or 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--res", type=int, nargs="+", help="resolutions R (default 16 32 64; smoke: 8)")
    ap.add_argument("--kernels", type=int, nargs="+", help="square kernel sizes (default 3..31; smoke: 3 13)")
    ap.add_argument("--strips", type=_strip, nargs="+", help="strip kernels KHxKW (default 3x51 51x3; smoke: 3x9)")
    ap.add_argument("--no-strips", action="store_true", help="no strip kernels")
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="default fp32 bf16")
    ap.add_argument("--paths", nargs="+", default=PATHS, choices=PATHS)
    ap.add_argument("--batch", type=int, help="default 64 (smoke: 2)")
    ap.add_argument("--channels", type=int, help="default 384 (smoke: 6)")
    ap.add_argument("--depth", type=int, help="stacked layers (default 24; smoke: 2)")
    ap.add_argument("--warmup", type=int, help="default 3 (smoke: 0, the one timed call is the first)")
    ap.add_argument("--runs", type=int, help="timed runs (default 10; smoke: 1)")
    ap.add_argument("--budget-s", type=float, help="time budget per measurement, fewer runs when slow (default 6)")
    ap.add_argument("--max-call-s", type=float, default=15.0,
                    help="a path slower than this per call is not run at larger kernels (same mode/dtype/R)")
    ap.add_argument("--quick", action="store_true", help="R in {16, 32}, K in {7, 13, 31} + strips, 3 runs")
    add_common_args(ap, RESULT_NAME)
    args = parse_with_defaults(ap, argv, DEFAULTS, presets=_quick_preset)
    if args.no_strips:
        args.strips = []
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = start_run(args, "gpu_dwconv_table1", RESULT_NAME)
    if env is None:
        return 1
    print(json.dumps(env))
    print(f"gpu_dwconv_table1: writing {args.out}")
    deadline = Deadline(args.time_limit_s)
    shapes = [(k, k) for k in args.kernels] + [tuple(s) for s in args.strips]
    skip_triton = {dtype: triton_skip_reason(args.device, DTYPES[dtype]) for dtype in args.dtypes}
    for dtype, why in skip_triton.items():
        if why and any(p.startswith("triton") for p in args.paths):
            print(f"note: {dtype}: skipping the triton paths: {why}")
    too_slow: dict[tuple, tuple[int, float]] = {}  # (path, mode, dtype, R) -> (taps, seconds per call)
    rows = []
    for mode in args.modes:
        for dtype in args.dtypes:
            for res in args.res:
                for kh, kw in shapes:
                    for path in args.paths:
                        what = f"{path} {mode} {dtype} R={res} K={kh}x{kw}"
                        if deadline.expired():
                            deadline.skip(what)
                            continue
                        row = _row(path, mode, dtype, res, kh, kw)
                        slow = too_slow.get((path, mode, dtype, res))
                        if path.startswith("triton") and skip_triton[dtype]:
                            row["skipped"] = skip_triton[dtype]
                        elif slow is not None and kh * kw >= slow[0]:
                            row["skipped"] = (f"{slow[1]:.1f} s per call at {slow[0]} taps > --max-call-s "
                                              f"{args.max_call_s:g}")
                        else:
                            try:
                                row.update(run_one(path, mode, dtype, res, kh, kw, args))
                                if row["median_ms"] > 1e3 * args.max_call_s:
                                    too_slow[(path, mode, dtype, res)] = (kh * kw, row["median_ms"] / 1e3)
                            except Exception as exc:  # keep going; record the failure
                                row["error"] = error_text(exc)
                        empty_cache(args.device)
                        rows.append(row)
                        append_json(args.out, {**row, "env": env, "batch": args.batch, "channels": args.channels,
                                               "depth": args.depth})
                        print(json.dumps(row), flush=True)
    print_table(rows)
    return finish_run("gpu_dwconv_table1", rows, deadline, args.out)


if __name__ == "__main__":
    sys.exit(main())
