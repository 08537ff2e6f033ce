"""Depth-wise conv paths on CPU: forward, grad_input, grad_weight of a strip / square kernel.

Records the measurement behind ``dwconv2d(impl="auto")``'s CPU choice (docs/ops.md). Times are the minimum
over interleaved repeats of wall time (the CPU time is printed too: it is robust to a shared machine).

    python3 benchmarks/dwconv_cpu.py [--batch 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from lkvision.ops.dwconv import dwconv2d_grad_weight

# (C, H, KH, KW, pad4): SW-tiny stage strips and a 13x13 square
SHAPES = [(60, 56, 3, 51, (25, 25, 1, 1)), (122, 28, 3, 51, (24, 26, 1, 1)), (246, 14, 3, 48, (23, 24, 1, 1)),
          (492, 7, 3, 15, (6, 8, 1, 1)), (60, 56, 13, 13, (6, 6, 6, 6))]


def _time(fns: dict, repeats: int) -> dict:
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(repeats):
        for k, f in fns.items():
            c, t = time.process_time(), time.perf_counter()
            f()
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    return {k: (min(wall[k]) * 1e3, min(cpu[k]) * 1e3) for k in fns}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {args.threads}, batch {args.batch}; ms as (wall min, cpu min)")
    for c, h, kh, kw, pad in SHAPES:
        res = _bench_shape(args.batch, c, h, kh, kw, pad, args.repeats)
        print(f"C={c} H={h} K={kh}x{kw}: " + ", ".join(f"{k} {v[0]:.1f}/{v[1]:.1f}" for k, v in res.items()),
              flush=True)
    return 0


def _bench_shape(b: int, c: int, h: int, kh: int, kw: int, pad: tuple[int, int, int, int], repeats: int) -> dict:
    cl = torch.channels_last
    x, g = torch.randn(b, c, h, h), torch.randn(b, c, h, h)
    w = torch.randn(c, 1, kh, kw)
    xp = F.pad(x, pad)
    xcl, gcl, xpcl = (t.contiguous(memory_format=cl) for t in (x, g, xp))
    wf = w.flip(-1, -2)
    tp = (kw - 1 - pad[0], kw - 1 - pad[1], kh - 1 - pad[2], kh - 1 - pad[3])

    def aten_bw(go, inp, mask):
        return torch.ops.aten.convolution_backward(go, inp, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], c,
                                                   mask)

    fns = {
        "fwd_nchw": lambda: F.conv2d(xp, w, groups=c),
        "fwd_cl": lambda: F.conv2d(xpcl, w, groups=c),
        "gi_aten_nchw": lambda: aten_bw(g, xp, [True, False, False]),
        "gi_flip_cl": lambda: F.conv2d(F.pad(gcl, tp), wf, groups=c),
        "gw_aten_nchw": lambda: aten_bw(g, xp, [False, True, False]),
        "gw_aten_cl": lambda: aten_bw(gcl, xpcl, [False, True, False]),
        "gw_batchfold": lambda: dwconv2d_grad_weight(g, x, (kh, kw), pad),
    }
    return _time(fns, repeats)


if __name__ == "__main__":
    raise SystemExit(main())
