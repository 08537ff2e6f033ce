"""Shiftwise op on the GPU at SW-tiny stage shapes (batch 128, 224^2; SW.md §2-3).

Per stage (R = 60/122/246/492 rep channels, nk = 17/17/16/5, H = 56/28/14/7, M = 51/49/47/13, k = 3, E = 4):

* ``fused``          our Triton kernel, separate outputs (H, V, S) (training form);
* ``fused_deploy``   our Triton kernel, ``H + V + S + x + bias`` (eval/deploy form);
* ``torch_strips``   three ``F.conv2d`` on the folded kernels, NCHW (the PyTorch fast path);
* ``torch_strips_cl``  the same in channels_last (cuDNN);
* ``reference``      grouped 3x3 conv to R*nk channels + the literal shift-add
                     (``lkvision.ops.shift_add.shiftwise_conv(impl="reference")``), when that module imports.

Forward and forward + backward, fp32 and bf16, CUDA-event medians. Achieved bandwidth counts the fewest
bytes the op must move (x read once, each output written once; weights ignored) and is compared with the
measured device-to-device copy bandwidth. The op is also given its FMA count, because with 2*k*L + k*k
(= 315 at M = 51) multiply-adds per output it is compute-heavy for direct fp32 arithmetic.

Usage: ``python benchmarks/gpu_sw_op.py [--stages 1 2] [--dtypes fp32 bf16] [--modes fwd fwdbwd]``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_dwconv_table1 import DTYPES, RESULTS, append_json, copy_bandwidth_gbs, cuda_time, environment, rel_err  # noqa: E402

# stage -> (R, nk, H, M)
STAGES = {1: (60, 17, 56, 51), 2: (122, 17, 28, 49), 3: (246, 16, 14, 47), 4: (492, 5, 7, 13)}
K = 3
EDGES = 4


def _inputs(stage: int, batch: int, dtype: torch.dtype):
    r, nk, h, m = STAGES[stage]
    gen = torch.Generator(device="cuda").manual_seed(stage)
    x = torch.randn(batch, r, h, h, device="cuda", generator=gen).to(dtype)
    weight = (torch.randn(r * nk, 1, K, K, device="cuda", generator=gen) * 0.1).to(dtype)
    tables = None
    try:
        from lkvision.ops import shift_add

        pad_hv, idx = shift_add.make_shift_tables(r, m, K, EDGES)
        tables = (pad_hv.cuda(), idx.cuda())
        kh, kv, ks = shift_add.fold_shiftwise_weight(weight, *tables, m, K)
    except Exception as exc:  # the ops module is optional here: random folded kernels are as good for timing
        print(f"note: lkvision.ops.shift_add unavailable ({type(exc).__name__}: {exc}); random folded kernels")
        strip_len = K * nk
        kh = (torch.randn(r, 1, K, strip_len, device="cuda", generator=gen) * 0.1).to(dtype)
        kv = (torch.randn(r, 1, strip_len, K, device="cuda", generator=gen) * 0.1).to(dtype)
        ks = (torch.randn(r, 1, K, K, device="cuda", generator=gen) * 0.1).to(dtype)
    bias = torch.randn(r, device="cuda", generator=gen).to(dtype)
    return x, weight, tables, kh.detach(), kv.detach(), ks.detach(), bias


def _path_fn(path: str, stage: int, weight, tables, kh, kv, ks, bias):
    from lkvision.ops.kernels.triton_shiftwise import shiftwise_strips, shiftwise_strips_reference

    m = STAGES[stage][3]
    if path == "fused":
        return lambda x: shiftwise_strips(x, kh, kv, ks, None, m, K, separate=True)
    if path == "fused_deploy":
        return lambda x: shiftwise_strips(x, kh, kv, ks, bias, m, K, separate=False)
    if path in ("torch_strips", "torch_strips_cl"):
        return lambda x: shiftwise_strips_reference(x, kh, kv, ks, None, m, separate=True)
    if path == "reference":
        if tables is None:
            raise RuntimeError("reference path needs lkvision.ops.shift_add")
        from lkvision.ops.shift_add import shiftwise_conv

        return lambda x: shiftwise_conv(x, weight, *tables, m, K, impl="reference")
    raise ValueError(path)


def run_one(path: str, stage: int, mode: str, dtype: str, args, copy_gbs: float) -> dict:
    dt = DTYPES[dtype]
    r, nk, h, m = STAGES[stage]
    x, weight, tables, kh, kv, ks, bias = _inputs(stage, args.batch, dt)
    if path.endswith("_cl"):
        x = x.contiguous(memory_format=torch.channels_last)
    fn = _path_fn(path, stage, weight, tables, kh, kv, ks, bias)
    out = fn(x)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    # correctness vs the fp64 folded-strip definition on two images
    from lkvision.ops.kernels.triton_shiftwise import shiftwise_strips_reference

    sep = path != "fused_deploy"
    ref = shiftwise_strips_reference(x[:2].double(), kh.double(), kv.double(), ks.double(),
                                     None if sep else bias.double(), m, separate=sep)
    refs = list(ref) if sep else [ref]
    err = max(rel_err(o[:2], rr) for o, rr in zip(outs, refs))

    if mode == "fwd":
        def bench():
            with torch.no_grad():
                return fn(x)
    else:
        params = [t.detach().requires_grad_() for t in (kh, kv, ks)]
        xg = x.detach().requires_grad_()
        fn_g = _path_fn(path, stage, weight.detach().requires_grad_(), tables, *params, bias.detach())
        grads = [torch.randn_like(o) for o in outs]

        def bench():
            o = fn_g(xg)
            o = list(o) if isinstance(o, (tuple, list)) else [o]
            torch.autograd.backward(o, grads)
            xg.grad = None
            for p in params:
                p.grad = None

    t = cuda_time(bench, warmup=args.warmup, runs=args.runs, budget_s=args.budget_s)
    elt = x.element_size()
    n = x.numel()
    n_out = 1 if path == "fused_deploy" else 3
    min_bytes = n * elt * (1 + n_out) * (1 if mode == "fwd" else 3)  # fwdbwd: rough (x, outs, grads)
    gbs = min_bytes / (t["median_ms"] * 1e-3) / 1e9
    fmas = n * (2 * K * K * nk + K * K) * (1 if mode == "fwd" else 3)
    return {"path": path, "stage": stage, "mode": mode, "dtype": dtype, "R": r, "nk": nk, "H": h, "M": m,
            "batch": args.batch, "rel_err": err, **t, "min_bytes": min_bytes, "achieved_GBs": gbs,
            "copy_GBs": copy_gbs, "frac_of_copy_bw": gbs / copy_gbs, "fma": fmas,
            "TFMA_per_s": fmas / (t["median_ms"] * 1e-3) / 1e12}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--paths", nargs="+",
                    default=["fused", "fused_deploy", "torch_strips", "torch_strips_cl", "reference"])
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=5.0)
    ap.add_argument("--out", type=Path, default=RESULTS / "gpu_sw_op.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_sw_op: no CUDA device; nothing to do")
        return 0
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    env = environment()
    copy_gbs = copy_bandwidth_gbs()
    env["copy_GBs"] = copy_gbs
    print(json.dumps(env))
    rows = []
    for mode in args.modes:
        for dtype in args.dtypes:
            for stage in args.stages:
                for path in args.paths:
                    try:
                        row = run_one(path, stage, mode, dtype, args, copy_gbs)
                    except Exception as exc:
                        row = {"path": path, "stage": stage, "mode": mode, "dtype": dtype, "median_ms": math.nan,
                               "error": f"{type(exc).__name__}: {exc}"[:500]}
                    torch.cuda.empty_cache()
                    rows.append(row)
                    append_json(args.out, {**row, "env": env})
                    print(json.dumps(row), flush=True)
    print(f"\ncopy bandwidth {copy_gbs:.0f} GB/s")
    print(f"{'mode':7}{'dtype':6}{'st':>3}{'path':>17}{'ms':>10}{'GB/s':>9}{'%copy':>7}{'TFMA/s':>8}{'err':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:7}{r['dtype']:6}{r['stage']:>3}{r['path']:>17}  error: {r['error'][:60]}")
            continue
        print(f"{r['mode']:7}{r['dtype']:6}{r['stage']:>3}{r['path']:>17}{r['median_ms']:>10.3f}"
              f"{r['achieved_GBs']:>9.0f}{100 * r['frac_of_copy_bw']:>7.1f}{r['TFMA_per_s']:>8.2f}"
              f"{r['rel_err']:>10.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
