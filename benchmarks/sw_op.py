"""Shift-wise operator speed on CPU at SW-tiny's four stage shapes.

Compares, on the same (B, R, H, W) rep-channel tensor:
  * reference: grouped k x k conv (padding k-1) + the literal gather-form shift_add;
  * fast:      ``shiftwise_conv(impl="auto")`` (weight folding + depth-wise strip convs, custom backward);
  * dw13:      a plain ``F.conv2d`` 13 x 13 depth-wise conv (what UniRepLKNet-T runs there).
Forward and forward+backward wall times are medians over interleaved repeats; memory is the size of the
tensors autograd saves for backward (CPU; on CUDA the peak allocated memory). Ratios come from one run.

    python3 benchmarks/sw_op.py --quick            # batch 8, few repeats
    python3 benchmarks/sw_op.py --batch 8 64       # full
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lkvision.ops import make_shift_tables, num_blocks, shiftwise_conv

# SW-tiny at 224^2: (R, H, M); k = 3, E = 4
STAGES = [(60, 56, 51), (122, 28, 49), (246, 14, 47), (492, 7, 13)]


def _saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd saves for backward while running ``fn``."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def _make_cases(batch: int, r: int, h: int, m: int, device: str):
    k = 3
    nk = num_blocks(m, k)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, r, h, h, generator=g).to(device).requires_grad_()
    w = (torch.randn(r * nk, 1, k, k, generator=g) * 0.1).to(device).requires_grad_()
    w13 = (torch.randn(r, 1, 13, 13, generator=g) * 0.1).to(device).requires_grad_()
    pad_hv, idx = make_shift_tables(r, m, k, 4)

    def reference():
        return sum(t.sum() for t in shiftwise_conv(x, w, pad_hv, idx, m, k, impl="reference"))

    def fast():
        return sum(t.sum() for t in shiftwise_conv(x, w, pad_hv, idx, m, k, impl="auto"))

    def dw13():
        return F.conv2d(x, w13, padding=6, groups=r).sum()

    return {"reference": reference, "fast": fast, "dw13": dw13}, (x, w, w13)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench_stage(batch: int, r: int, h: int, m: int, repeats: int, device: str, skip_reference: bool) -> dict:
    cases, params = _make_cases(batch, r, h, m, device)
    if skip_reference:
        cases.pop("reference")
    times = {(name, mode): [] for name in cases for mode in ("fwd", "fwdbwd")}

    def run(name, mode):
        for p in params:
            p.grad = None
        _sync(device)
        t0 = time.perf_counter()
        if mode == "fwd":
            with torch.no_grad():
                cases[name]()
        else:
            cases[name]().backward()
        _sync(device)
        return time.perf_counter() - t0

    for name in cases:  # warm-up
        run(name, "fwd")
        run(name, "fwdbwd")
    for _ in range(repeats):  # interleaved
        for name in cases:
            for mode in ("fwd", "fwdbwd"):
                times[(name, mode)].append(run(name, mode))
    res = {f"{n}_{md}_ms": statistics.median(v) * 1e3 for (n, md), v in times.items()}
    for name, fn in cases.items():
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            fn().backward()
            res[f"{name}_mem_MiB"] = torch.cuda.max_memory_allocated() / 2**20
        else:
            res[f"{name}_mem_MiB"] = _saved_bytes(fn) / 2**20
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--quick", action="store_true", help="batch 8 only, 3 repeats")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3], choices=range(4),
                    help="0-based stage indices (0..3)")
    ap.add_argument("--skip-reference", action="store_true", help="the reference needs GBs at batch 64")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.repeats = [8], 3
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"repeats {args.repeats} (median)")
    hdr = (f"{'B':>3} {'R':>4} {'H':>3} {'M':>3} | {'ref fwd':>8} {'fast fwd':>8} {'dw13 fwd':>8} | "
           f"{'ref f+b':>8} {'fast f+b':>8} {'dw13 f+b':>8} | {'fwd x':>6} {'f+b x':>6} {'f+b/dw13':>8} | "
           f"saved MiB ref/fast/dw13")
    print(hdr)
    print("-" * len(hdr))
    for batch in args.batch:
        for si in args.stages:
            r, h, m = STAGES[si]
            res = bench_stage(batch, r, h, m, args.repeats, args.device, args.skip_reference)
            ref_f, ref_fb = res.get("reference_fwd_ms", float("nan")), res.get("reference_fwdbwd_ms", float("nan"))
            print(f"{batch:>3} {r:>4} {h:>3} {m:>3} | {ref_f:8.1f} {res['fast_fwd_ms']:8.1f} "
                  f"{res['dw13_fwd_ms']:8.1f} | "
                  f"{ref_fb:8.1f} {res['fast_fwdbwd_ms']:8.1f} {res['dw13_fwdbwd_ms']:8.1f} | "
                  f"{ref_f / res['fast_fwd_ms']:6.1f} {ref_fb / res['fast_fwdbwd_ms']:6.1f} "
                  f"{res['fast_fwdbwd_ms'] / res['dw13_fwdbwd_ms']:8.2f} | "
                  f"{res.get('reference_mem_MiB', float('nan')):.0f}/{res['fast_mem_MiB']:.0f}/"
                  f"{res['dw13_mem_MiB']:.0f}", flush=True)
    print("fwd x / f+b x: reference time / fast time (targets >= 10 / >= 5); f+b/dw13: target <= 2")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
