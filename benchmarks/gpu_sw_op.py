"""Shiftwise op on the GPU at SW-tiny stage shapes (batch 128, 224^2; SW.md §2-3).

Per stage (R = 60/122/246/492 rep channels, nk = 17/17/16/5, H = 56/28/14/7, M = 51/49/47/13, k = 3, E = 4):

* ``fused``          our Triton kernel, separate outputs (H, V, S) (training form);
* ``fused_deploy``   our Triton kernel, ``H + V + S + x + bias`` (eval form, unfolded kernels);
* ``deploy_sum``     what a deployed ShiftWiseConv2d runs: ``dwconv2d_sum`` (widened horizontal strip holding the
                     small kernel and the identity + vertical strip + bias), one tensor-core launch;
* ``torch_deploy_cl``  the same two strips as two cuDNN channels_last convs and an add (the PyTorch deploy path);
* ``torch_strips``   three ``F.conv2d`` on the folded kernels, NCHW (the PyTorch fast path);
* ``torch_strips_cl``  the same in channels_last (cuDNN);
* ``reference``      grouped 3x3 conv to R*nk channels + the literal shift-add
                     (``lkvision.ops.shift_add.shiftwise_conv(impl="reference")``), when that module imports.

Forward and forward + backward, fp32 and bf16, CUDA-event medians. Achieved bandwidth counts the fewest
bytes the op must move (x read once, each output written once; weights ignored) and is compared with the
measured device-to-device copy bandwidth. The op is also given its FMA count, because with 2*k*L + k*k
(= 315 at M = 51) multiply-adds per output it is compute-heavy for direct fp32 arithmetic.

Usage: ``python benchmarks/gpu_sw_op.py [--stages 1 2] [--dtypes fp32 bf16] [--modes fwd fwdbwd]``;
``--smoke``: CPU, batch 2, stage 4 (M = 13) with 2 rep channels (7x7 maps; other stages: 8x8, same M, nk), one
call per measurement, a 64 MiB CPU copy as the bandwidth reference (``TRITON_INTERPRET=1`` runs the fused paths in
triton's interpreter; without it they are skipped on CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu_common import (  # noqa: E402
    DTYPES,
    Deadline,
    add_common_args,
    append_json,
    copy_bandwidth_gbs,
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

RESULT_NAME = "gpu_sw_op.json"
# stage -> (R, nk, H, M)
STAGES = {1: (60, 17, 56, 51), 2: (122, 17, 28, 49), 3: (246, 16, 14, 47), 4: (492, 5, 7, 13)}
SMOKE_STAGES = {s: (2, nk, min(h, 8), m) for s, (_, nk, h, m) in STAGES.items()}  # same M and nk, 2 channels
K = 3
EDGES = 4
PATHS = ["fused", "fused_deploy", "deploy_sum", "torch_deploy_cl", "torch_strips", "torch_strips_cl", "reference"]
TRITON_PATHS = ("fused", "fused_deploy", "deploy_sum")
DEPLOY_PATHS = ("fused_deploy", "deploy_sum", "torch_deploy_cl")  # one output: H + V + S + x + bias
# (full run, --smoke) defaults
DEFAULTS = {"stages": ([1, 2, 3, 4], [4]), "dtypes": (["fp32", "bf16"], ["fp32", "bf16"]), "batch": (128, 2),
            "warmup": (3, 0), "runs": (20, 1), "budget_s": (5.0, 1.0)}
MEASURED = ("rel_err", "median_ms", "min_ms", "max_ms", "runs", "first_ms", "min_bytes", "achieved_GBs",
            "frac_of_copy_bw", "fma", "TFMA_per_s")


def _stage(stage: int, args) -> tuple[int, int, int, int]:
    return (SMOKE_STAGES if args.smoke else STAGES)[stage]


def _inputs(stage: int, args, dtype: torch.dtype):
    r, nk, h, m = _stage(stage, args)
    dev = args.device
    gen = torch.Generator(device=dev).manual_seed(stage)
    x = torch.randn(args.batch, r, h, h, device=dev, generator=gen).to(dtype)
    weight = (torch.randn(r * nk, 1, K, K, device=dev, generator=gen) * 0.1).to(dtype)
    tables = None
    try:
        # (not ``from lkvision.ops import shift_add``: that name is the function, which shadows the module)
        from lkvision.ops import fold_shiftwise_weight, make_shift_tables

        pad_hv, idx = make_shift_tables(r, m, K, EDGES)
        tables = (pad_hv.to(dev), idx.to(dev))
        kh, kv, ks = fold_shiftwise_weight(weight, *tables, m, K)
    except Exception as exc:  # the ops module is optional here: random folded kernels are as good for timing
        print(f"note: lkvision.ops.shift_add unavailable ({error_text(exc)}); random folded kernels")
        strip_len = K * nk
        kh = (torch.randn(r, 1, K, strip_len, device=dev, generator=gen) * 0.1).to(dtype)
        kv = (torch.randn(r, 1, strip_len, K, device=dev, generator=gen) * 0.1).to(dtype)
        ks = (torch.randn(r, 1, K, K, device=dev, generator=gen) * 0.1).to(dtype)
    bias = torch.randn(r, device=dev, generator=gen).to(dtype)
    return x, weight, tables, kh.detach(), kv.detach(), ks.detach(), bias


def _deploy_kernels(m: int, kh, ks):
    """The deployed layer's horizontal strip (ShiftWiseConv2d.folded_kernels with identity BNs): the folded
    strip widened to hold the centred small kernel, plus the identity tap; and the two paddings."""
    strip_len, mid = kh.shape[-1], m // 2
    left, right = max(mid, K // 2), max(strip_len - 1 - mid, K // 2)
    wh = kh.new_zeros(kh.shape[0], 1, K, left + right + 1)
    wh[..., left - mid:left - mid + strip_len] = kh
    wh[..., left - K // 2:left + K // 2 + 1] += ks
    wh[:, 0, K // 2, left] += 1.0
    return wh, (left, right, K // 2, K // 2), (K // 2, K // 2, mid, strip_len - 1 - mid)


def _path_fn(path: str, m: int, weight, tables, kh, kv, ks, bias):
    from lkvision.ops.kernels.triton_shiftwise import fused_strips, fused_strips_reference

    if path == "fused":
        return lambda x: fused_strips(x, kh, kv, ks, None, m, K, separate=True)
    if path == "fused_deploy":
        return lambda x: fused_strips(x, kh, kv, ks, bias, m, K, separate=False)
    if path in ("deploy_sum", "torch_deploy_cl"):  # what a deployed ShiftWiseConv2d runs
        from lkvision.ops import shiftwise_deploy_conv

        wh, pad_h, pad_v = _deploy_kernels(m, kh.detach(), ks.detach())
        wh.requires_grad_(kh.requires_grad)  # a leaf: the timed backward runs many times
        impl = "triton" if path == "deploy_sum" else "channels_last"
        return lambda x: shiftwise_deploy_conv(x, wh, bias, kv, None, pad_h, pad_v, impl=impl)
    if path in ("torch_strips", "torch_strips_cl"):
        return lambda x: fused_strips_reference(x, kh, kv, ks, None, m, separate=True)
    if path == "reference":
        if tables is None:
            raise RuntimeError("reference path needs lkvision.ops.shift_add")
        from lkvision.ops import shiftwise_conv

        return lambda x: shiftwise_conv(x, weight, *tables, m, K, impl="reference")
    raise ValueError(path)


def _as_list(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def run_one(path: str, stage: int, mode: str, dtype: str, args, copy_gbs: float) -> dict:
    dt = DTYPES[dtype]
    r, nk, h, m = _stage(stage, args)
    x, weight, tables, kh, kv, ks, bias = _inputs(stage, args, dt)
    if path.endswith("_cl"):
        x = x.contiguous(memory_format=torch.channels_last)
    fn = _path_fn(path, m, weight, tables, kh, kv, ks, bias)
    with torch.no_grad():
        outs = _as_list(fn(x[:2]))
    # correctness vs the fp64 folded-strip definition on two images
    from lkvision.ops.kernels.triton_shiftwise import fused_strips_reference

    sep = path not in DEPLOY_PATHS
    ref = fused_strips_reference(x[:2].double(), kh.double(), kv.double(), ks.double(),
                                     None if sep else bias.double(), m, separate=sep)
    refs = _as_list(ref)
    if len(outs) != len(refs):
        raise RuntimeError(f"{path} returned {len(outs)} outputs, expected {len(refs)}")
    err = max(rel_err(o, rr) for o, rr in zip(outs, refs))

    if mode == "fwd":
        def bench():
            with torch.no_grad():
                return fn(x)
    else:
        params = [t.detach().requires_grad_() for t in (kh, kv, ks)]
        wg = weight.detach().requires_grad_()
        xg = x.detach().requires_grad_()
        fn_g = _path_fn(path, m, wg, tables, *params, bias.detach())
        grads = [torch.randn_like(x) for _ in outs]  # every output has the shape and layout of x

        def bench():
            o = _as_list(fn_g(xg))
            torch.autograd.backward(o, grads)
            for p in (xg, wg, *params):
                p.grad = None

    t = time_fn(bench, args.device, warmup=args.warmup, runs=args.runs, budget_s=args.budget_s)
    elt = x.element_size()
    n = x.numel()
    n_out = 1 if path in DEPLOY_PATHS else 3
    min_bytes = n * elt * (1 + n_out) * (1 if mode == "fwd" else 3)  # fwdbwd: rough (x, outs, grads)
    gbs = min_bytes / (t["median_ms"] * 1e-3) / 1e9
    fmas = n * (2 * K * K * nk + K * K) * (1 if mode == "fwd" else 3)
    return {"rel_err": err, **t, "min_bytes": min_bytes, "achieved_GBs": gbs, "frac_of_copy_bw": gbs / copy_gbs,
            "fma": fmas, "TFMA_per_s": fmas / (t["median_ms"] * 1e-3) / 1e12}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", type=int, nargs="+", choices=sorted(STAGES), help="default 1 2 3 4 (smoke: 4)")
    ap.add_argument("--paths", nargs="+", default=PATHS, choices=PATHS)
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="default fp32 bf16")
    ap.add_argument("--batch", type=int, help="default 128 (smoke: 2)")
    ap.add_argument("--warmup", type=int, help="default 3 (smoke: 0, the one timed call is the first)")
    ap.add_argument("--runs", type=int, help="default 20 (smoke: 1)")
    ap.add_argument("--budget-s", type=float, help="time budget per measurement (default 5)")
    add_common_args(ap, RESULT_NAME)
    return parse_with_defaults(ap, argv, DEFAULTS)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = start_run(args, "gpu_sw_op", RESULT_NAME)
    if env is None:
        return 1
    copy_gbs = copy_bandwidth_gbs(args.device)
    env["copy_GBs"] = copy_gbs
    print(json.dumps(env))
    print(f"gpu_sw_op: writing {args.out}")
    deadline = Deadline(args.time_limit_s)
    skip_triton = {dtype: triton_skip_reason(args.device, DTYPES[dtype]) for dtype in args.dtypes}
    for dtype, why in skip_triton.items():
        if why and any(p in TRITON_PATHS for p in args.paths):
            print(f"note: {dtype}: skipping the fused (Triton) paths: {why}")
    rows = []
    for mode in args.modes:
        for dtype in args.dtypes:
            for stage in args.stages:
                for path in args.paths:
                    if deadline.expired():
                        deadline.skip(f"{path} {mode} {dtype} stage {stage}")
                        continue
                    r, nk, h, m = _stage(stage, args)
                    row = {"path": path, "stage": stage, "mode": mode, "dtype": dtype, "R": r, "nk": nk, "H": h,
                           "M": m, "batch": args.batch, **dict.fromkeys(MEASURED, math.nan), "copy_GBs": copy_gbs,
                           "error": None, "skipped": None}
                    if path in TRITON_PATHS and skip_triton[dtype]:
                        row["skipped"] = skip_triton[dtype]
                    else:
                        try:
                            row.update(run_one(path, stage, mode, dtype, args, copy_gbs))
                        except Exception as exc:
                            row["error"] = error_text(exc)
                    empty_cache(args.device)
                    rows.append(row)
                    append_json(args.out, {**row, "env": env})
                    print(json.dumps(row), flush=True)
    print(f"\ncopy bandwidth {copy_gbs:.0f} GB/s ({args.device})")
    print(f"{'mode':7}{'dtype':6}{'st':>3}{'path':>17}{'ms':>10}{'GB/s':>9}{'%copy':>7}{'TFMA/s':>8}{'err':>10}")
    for r in rows:
        head = f"{r['mode']:7}{r['dtype']:6}{r['stage']:>3}{r['path']:>17}"
        if r["error"] or r["skipped"]:
            print(f"{head}  {'error' if r['error'] else 'skipped'}: {(r['error'] or r['skipped'])[:60]}")
            continue
        print(head + fmt(r["median_ms"], ">10.3f") + fmt(r["achieved_GBs"], ">9.0f")
              + fmt(100 * r["frac_of_copy_bw"], ">7.1f") + fmt(r["TFMA_per_s"], ">8.2f") + fmt(r["rel_err"], ">10.1e"))
    return finish_run("gpu_sw_op", rows, deadline, args.out)


if __name__ == "__main__":
    sys.exit(main())
