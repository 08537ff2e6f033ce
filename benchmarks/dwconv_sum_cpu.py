"""Deploy-form strip sums on CPU: ``dwconv2d_sum`` (oneDNN adds each later conv into the first one's output,
in place) against its reference (separate ``dwconv2d`` calls and adds), a no-grad ``dwconv2d`` call against
the same call through the ``lkvision::dwconv2d`` custom op, and single large kernels: ``dwconv2d`` (dead taps cut,
the width rule of this CPU) against plain ``F.conv2d`` of the full kernel, inference and forward + backward.

Shapes: SW-tiny and SLaK-T deploy layers at 224^2. Each line is the median of the per-round ratios over
interleaved rounds (:mod:`lkvision.bench.compare`), CPU clock (robust on a shared machine), one thread by
default. The numbers in docs/ops.md ("Sums of strips") come from::

    python3 benchmarks/dwconv_sum_cpu.py [--batch 4] [--threads 1] [--rounds 15]
"""

from __future__ import annotations

import argparse

import torch

from lkvision.bench.compare import interleave, median, ratio
from lkvision.ops.dwconv import dwconv2d, dwconv2d_sum, dwconv2d_sum_reference, normalize_padding

_SW = [((3, 51), (25, 25, 1, 1)), ((51, 3), (1, 1, 25, 25))]
LAYERS = {  # name: (channels, size, [(kernel, padding) of each term])
    "SW-tiny stage 1, 80 ch 56^2, 3x51 + 51x3": (80, 56, _SW),
    "SW-tiny stage 2, 160 ch 28^2": (160, 28, _SW),
    "SW-tiny stage 3, 320 ch 14^2, 3x48 + 48x3": (320, 14, [((3, 48), (23, 24, 1, 1)), ((48, 3), (1, 1, 23, 24))]),
    "SW-tiny stage 4, 640 ch 7^2, 3x15 + 15x3": (640, 7, [((3, 15), (6, 8, 1, 1)), ((15, 3), (1, 1, 6, 8))]),
    "SLaK-T stage 1, 96 ch 56^2, 51x5 + 5x51": (96, 56, [((51, 5), (25, 2)), ((5, 51), (2, 25))]),
    "SLaK-T stage 3, 384 ch 14^2, 47x5 + 5x47": (384, 14, [((47, 5), (23, 2)), ((5, 47), (2, 23))]),
}


SINGLE = {  # name: (channels, size, kernel, padding): one depth-wise conv of a model layer at 224^2
    "SW-tiny stage 3 strip, 320 ch 14^2, 3x48": (320, 14, (3, 48), (23, 24, 1, 1)),
    "SLaK-T stage 3 strip, 384 ch 14^2, 47x5": (384, 14, (47, 5), (2, 2, 23, 23)),
    "UniRepLKNet-T stage 3, 320 ch 14^2, 13x13": (320, 14, (13, 13), (6, 6, 6, 6)),
    "RepLKNet-31B stage 2, 256 ch 28^2, 29x29": (256, 28, (29, 29), (14, 14, 14, 14)),
}


def _single_layers(batch: int, dtype: torch.dtype, rounds: int, g: torch.Generator) -> None:
    import torch.nn.functional as F

    print("\n| single layer, fwd (fwd+bwd) | plain F.conv2d | dwconv2d | speed-up |\n|---|---|---|---|")
    for name, (c, size, kernel, pad4) in SINGLE.items():
        x = torch.randn(batch, c, size, size, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(c, 1, *kernel, generator=g).to(dtype), torch.randn(c, generator=g).to(dtype)
        go = torch.randn(x.shape, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)

        def plain(x=x, w=w, b=b, pad4=pad4):
            return F.conv2d(F.pad(x, pad4) if pad4[0] != pad4[1] else x, w, b,
                            padding=(pad4[2], pad4[0]) if pad4[0] == pad4[1] else 0, groups=x.shape[1])

        def ours(x=x, w=w, b=b, pad4=pad4):
            return dwconv2d(x, w, b, pad4)

        def train(fn, x=x, w=w, b=b, go=go):
            leaves = [t.detach().requires_grad_() for t in (x, w, b)]
            with torch.enable_grad():
                fn(*leaves).backward(go)

        t = interleave({"plain": plain, "ours": ours}, rounds=rounds, iters=3, clock="cpu")
        tt = interleave({"plain": lambda: train(plain), "ours": lambda: train(ours)}, rounds=rounds, iters=1,
                        clock="cpu")
        r = ratio(tt, "plain", "ours")
        print(_line(name, t, "plain", "ours", 1e3, "ms")[:-1]
              + f" fwd+bwd {r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f}) |")


def _line(name: str, times: dict, slow: str, fast: str, unit: float, suffix: str) -> str:
    r = ratio(times, slow, fast)
    return (f"| {name} | {median(times[slow]) * unit:.2f} {suffix} | {median(times[fast]) * unit:.2f} {suffix} | "
            f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f}) |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    print(f"batch {args.batch}, {args.dtype}, {args.threads} thread(s), CPU clock, {args.rounds} interleaved rounds")
    print("| deploy layer | reference | dwconv2d_sum | speed-up |\n|---|---|---|---|")
    with torch.no_grad():
        for name, (c, size, terms) in LAYERS.items():
            x = torch.randn(args.batch, c, size, size, generator=g).to(dtype).contiguous(
                memory_format=torch.channels_last)
            ws = [torch.randn(c, 1, *k, generator=g).to(dtype) for k, _ in terms]
            bs = [torch.randn(c, generator=g).to(dtype) for _ in terms]
            ps = [pad for _, pad in terms]
            problem = (x, ws, bs, ps)
            t = interleave({"ref": lambda a=problem: dwconv2d_sum_reference(*a),
                            "sum": lambda a=problem: dwconv2d_sum(*a)}, rounds=args.rounds, iters=3, clock="cpu")
            print(_line(name, t, "ref", "sum", 1e3, "ms"))
        x = torch.randn(args.batch, 640, 7, 7, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(640, 1, 13, 13, generator=g).to(dtype), torch.randn(640, generator=g).to(dtype)
        pad = list(normalize_padding("same", (13, 13)))
        t = interleave({"op": lambda: torch.ops.lkvision.dwconv2d(x, w, b, pad, "custom"),
                        "direct": lambda: dwconv2d(x, w, b, "same")}, rounds=args.rounds, iters=20, clock="cpu")
        print("\n| no-grad dwconv2d | through the custom op | direct | speed-up |\n|---|---|---|---|")
        print(_line("640 ch 7^2, 13x13", t, "op", "direct", 1e6, "us"))
        _single_layers(args.batch, dtype, args.rounds, g)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
