"""Where the CPU time of one model goes: a torch.profiler per-operator table, lkvision's path or the plain one.

Usage::

    python3 benchmarks/profile_cpu.py --model unireplknet_t                       # deploy form, fp32, inference
    python3 benchmarks/profile_cpu.py --model sw_tiny --dtype bf16 --plain        # the plain-PyTorch baseline
    python3 benchmarks/profile_cpu.py --model slak_t --train --dtype autocast     # one training step
    python3 benchmarks/profile_cpu.py --model replknet_31b --by-shape --top 40    # grouped by input shapes

Runs ``--warmup`` untimed passes, then profiles ``--iters`` passes and prints the operators sorted by self CPU
time (``--by-shape`` splits them by input shapes). With ``--json PATH`` the table rows are also saved.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch


def build(name: str, train: bool, dtype: str, channels_last: bool, batch: int, img: int):
    import lkvision

    torch.manual_seed(0)
    model = lkvision.create_model(name)
    if not train:
        model = lkvision.reparameterize(model.eval())
        if dtype == "bf16":
            model = model.to(torch.bfloat16)
    x = torch.randn(batch, 3, img, img, dtype=torch.bfloat16 if (dtype == "bf16" and not train) else torch.float32)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return model, x


def step_fn(model, x, train: bool, dtype: str):
    amp = dtype == "autocast" or (train and dtype == "bf16")
    if not train:
        def run():
            with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=amp):
                return model(x)
        return run
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    target = torch.zeros(x.shape[0], dtype=torch.long)

    def run():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(model(x).float(), target)
        loss.backward()
        opt.step()
    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--train", action="store_true", help="profile a training step (train form, SGD)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "autocast"),
                   help="bf16: the deploy model cast to bf16 (inference) / autocast (training)")
    p.add_argument("--plain", action="store_true", help="the plain-PyTorch path (lkvision.bench.baseline)")
    p.add_argument("--nchw", action="store_true", help="NCHW instead of channels_last")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=1)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--by-shape", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from torch.profiler import ProfilerActivity, profile

    from lkvision.bench.baseline import plain_pytorch

    torch.set_num_threads(args.threads)
    model, x = build(args.model, args.train, args.dtype, not args.nchw, args.batch, args.img)
    run = step_fn(model, x, args.train, args.dtype)
    ctx = plain_pytorch() if args.plain else contextlib.nullcontext()
    with ctx:
        for _ in range(args.warmup):
            run()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=args.by_shape) as prof:
            for _ in range(args.iters):
                run()
    events = prof.key_averages(group_by_input_shape=args.by_shape)
    total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]
    what = "training step" if args.train else "inference"
    print(f"{args.model}, {what}, {args.dtype}, {'plain PyTorch' if args.plain else 'lkvision'} path, "
          f"{'NCHW' if args.nchw else 'channels_last'}, batch {args.batch}, {args.img}^2, {args.threads} threads; "
          f"self CPU total {total / 1e3 / args.iters:.0f} ms per pass")
    print("| op | self ms/pass | % | calls/pass |" + (" input shapes |" if args.by_shape else ""))
    print("|---|---|---|---|" + ("---|" if args.by_shape else ""))
    out = []
    for e in rows:
        ms = e.self_cpu_time_total / 1e3 / args.iters
        row = {"op": e.key, "self_ms": ms, "percent": 100 * e.self_cpu_time_total / total,
               "calls": e.count // args.iters}
        if args.by_shape:
            row["shapes"] = str(e.input_shapes)[:90]
        out.append(row)
        print(f"| {e.key} | {ms:.1f} | {row['percent']:.1f} | {row['calls']} |"
              + (f" {row['shapes']} |" if args.by_shape else ""))
    if args.json:
        from lkvision.fileio import atomic_write_json

        atomic_write_json(args.json, {"args": vars(args), "total_ms": total / 1e3 / args.iters, "rows": out})
    return 0


if __name__ == "__main__":
    sys.exit(main())
