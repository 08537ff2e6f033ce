"""CPU inference throughput of the large-kernel families vs the issue's targets.

Protocol: ``torch.set_num_threads(2)``, fp32, batch 4, 224x224, eval + ``no_grad``, the deploy form
(:func:`lkvision.reparameterize`; SLaK's deploy form keeps its two strips, i.e. it is *not* merged into a
dense M x M kernel), ``--warmup`` forwards then ``--iters`` timed forwards, in NCHW and channels_last; the
better of the two is reported. Timing uses :func:`lkvision.bench.throughput.inference_throughput`.

Targets (official code on this machine class, img/s): UniRepLKNet-T 8.6, RepLKNet-31B 3.2, SLaK-T 4.9;
ours must be >= those, and sw_tiny >= our unireplknet_t. Models not registered yet are skipped with a note.

Usage: ``python benchmarks/cpu_models.py [--models replknet_31b convnext_t] [--iters 3] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

DEFAULT_MODELS = ("unireplknet_t", "replknet_31b", "slak_t", "sw_tiny", "convnext_t")
TARGETS = {"unireplknet_t": 8.6, "replknet_31b": 3.2, "slak_t": 4.9}  # official code, img/s


def measure(name: str, batch: int, img: int, warmup: int, iters: int, baseline: bool = False) -> dict:
    """img/s of the deploy form in NCHW and channels_last; with ``baseline`` also the train form in NCHW
    with every depth-wise conv as plain ``F.conv2d`` (the official code's execution path), measured in the
    same process right after, so that the ratio is less sensitive to machine load than absolute numbers."""
    import lkvision
    from lkvision.bench.throughput import inference_throughput
    from lkvision.export import plain_dwconv

    torch.manual_seed(0)
    model = lkvision.create_model(name).eval()
    rec = {"model": name}
    for cl in (False, True):
        r = inference_throughput(model, batch_size=batch, resolution=img, dtype="fp32", channels_last=cl,
                                 deploy=True, warmup=warmup, iters=iters, device="cpu")
        rec["channels_last" if cl else "nchw"] = r["img_s"]
    rec["best"] = max(rec["nchw"], rec["channels_last"])
    rec["layout"] = "channels_last" if rec["channels_last"] >= rec["nchw"] else "nchw"
    if baseline:
        with plain_dwconv():
            r = inference_throughput(model, batch_size=batch, resolution=img, dtype="fp32", channels_last=False,
                                     deploy=False, warmup=warmup, iters=iters, device="cpu")
        rec["baseline_train_form_plain"] = r["img_s"]
    return rec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--baseline", action="store_true",
                   help="also time the train form with plain F.conv2d (official execution path), NCHW")
    p.add_argument("--json", default=None, help="also write the records to this file")
    args = p.parse_args(argv)

    import lkvision

    torch.set_num_threads(args.threads)
    available = set(lkvision.list_models())
    rows, notes = [], []
    for name in args.models:
        if name not in available:
            notes.append(f"{name}: not registered yet, skipped")
            continue
        t0 = time.perf_counter()
        rec = measure(name, args.batch, args.img, args.warmup, args.iters, args.baseline)
        rec["seconds"] = time.perf_counter() - t0
        rows.append(rec)
        print(f"  measured {name}: {rec['best']:.2f} img/s ({rec['layout']}, {rec['seconds']:.0f} s)",
              file=sys.stderr, flush=True)

    by_name = {r["model"]: r for r in rows}
    print(f"\nCPU inference, {args.threads} threads, fp32, batch {args.batch}, {args.img}^2, deploy form "
          f"({platform.processor() or platform.machine()}, torch {torch.__version__})")
    print("| model | NCHW img/s | channels_last img/s | best | target img/s | best / target |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        target = TARGETS.get(r["model"])
        ref = by_name.get("unireplknet_t") if r["model"] == "sw_tiny" else None
        if target is not None:
            tgt, ratio = f"{target:.1f} (official)", f"{r['best'] / target:.2f}"
        elif ref is not None:
            tgt, ratio = f"{ref['best']:.2f} (our unireplknet_t)", f"{r['best'] / ref['best']:.2f}"
        else:
            tgt, ratio = "-", "-"
        r["target"], r["ratio"] = tgt, ratio
        print(f"| {r['model']} | {r['nchw']:.2f} | {r['channels_last']:.2f} | {r['best']:.2f} | {tgt} | {ratio} |")
    if args.baseline:
        print("\n| model | ours (deploy, best layout) | train form, plain F.conv2d, NCHW | ratio |")
        print("|---|---|---|---|")
        for r in rows:
            b = r["baseline_train_form_plain"]
            print(f"| {r['model']} | {r['best']:.2f} | {b:.2f} | {r['best'] / b:.2f} |")
    for n in notes:
        print(f"note: {n}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "batch": args.batch, "img": args.img, "rows": rows,
                       "notes": notes, "torch": torch.__version__}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
