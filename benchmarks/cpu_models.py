"""CPU speed of the large-kernel families, side by side with the plain-PyTorch path of the same weights.

One command prints every table of issue 13 (and writes them as JSON)::

    python3 benchmarks/cpu_models.py                       # all sections, ~10-15 min on a quiet 2-core machine
    python3 benchmarks/cpu_models.py --sections infer bf16 --rounds 5
    python3 benchmarks/cpu_models.py --quick               # smoke run: tiny models, 64^2, 1 round (~1 min)

Sections (each a set of variants timed in interleaved rounds in this one process, see
:mod:`lkvision.bench.compare`; every ratio is the median over rounds of the per-round ratio, with the
round-to-round min-max):

* ``limits``: the machine's achieved GEMM FLOP/s (fp32, bf16; best of MKL ``torch.mm`` and oneDNN) and memory
  bandwidth (:mod:`lkvision.bench.roofline`).
* ``infer``: fp32 inference of the deploy form (``lkvision.reparameterize``; SLaK keeps its two strips), ours
  vs the plain-PyTorch path of the same model object (:func:`lkvision.bench.baseline.plain_pytorch`: the official
  code's execution path: ``F.conv2d`` depth-wise convs, ``nn.Linear`` + separate GELU / GRN / SE / residual
  add), each side on its best layout of NCHW and channels_last (all four variants interleaved).
* ``bf16``: ours in fp32 vs the whole model cast to bf16 vs fp32 weights under ``torch.autocast("cpu",
  torch.bfloat16)`` (channels_last), with the bf16 outputs' relative L2 error against fp32; ``unireplknet_t``
  and ``sw_tiny`` share one interleaved group, so ``sw_tiny / unireplknet_t`` is side by side too.
* ``train``: one training step (forward, cross-entropy, backward, SGD with momentum) of the train form,
  channels_last, ours vs plain, fp32 and bf16 autocast (one model and optimizer per family, shared by the
  variants); ``unireplknet_t`` and ``sw_tiny`` again share a group.

The FLOP/s columns count the forward with :func:`lkvision.utils.count_flops` (x3 for a training step); the
"of GEMM" columns divide a model's FLOP/s by the FLOP/s of one 4096x1024x1024 oneDNN GEMM of the same dtype that
runs as one more variant in the same interleaved rounds (so both see the same load), median over rounds.

Targets (issue 13): infer >= 1.2x plain in every family, ``sw_tiny >= unireplknet_t``; bf16 >= 2x its own fp32;
train >= 1.5x plain, ``sw_tiny >= 0.8x unireplknet_t``. The script prints the measured values; it asserts
nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
from datetime import datetime, timezone

import torch

FAMILIES = ("unireplknet_t", "replknet_31b", "slak_t", "convnext_lk_t", "sw_tiny")
QUICK_FAMILIES = ("unireplknet_test", "replknet_nano", "slak_test", "convnext_nano_lk", "sw_femto")
PAIR = ("unireplknet_t", "sw_tiny")  # measured in one group: sw_tiny / unireplknet_t side by side
QUICK_PAIR = ("unireplknet_test", "sw_femto")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _load() -> str:
    try:
        return "load average {:.1f} / {:.1f} / {:.1f}".format(*os.getloadavg())
    except OSError:  # pragma: no cover
        return "load average unknown"


def _flops(model: torch.nn.Module, batch: int, img: int) -> int:
    from lkvision.utils import count_flops

    return int(count_flops(model, (batch, 3, img, img)))


def _fmt_ratio(r: dict) -> str:
    return f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})"


def _inference_call(model, x, amp: bool = False, plain: bool = False):
    from lkvision.bench.baseline import plain_pytorch

    def run():
        ctx = plain_pytorch() if plain else contextlib.nullcontext()
        with ctx, torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=amp):
            return model(x)
    return run


def _cl(t):
    return t.to(memory_format=torch.channels_last)


def _gemm_variants() -> tuple[dict, dict]:
    """Interleaved variants timing one fp32 and one bf16 oneDNN GEMM (the machine's compute limit under the
    same load as the models), and their FLOPs."""
    from lkvision.bench.roofline import gemm_call

    calls = {f"@gemm_{dt}": gemm_call(dtype) for dt, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    return {k: fn for k, (fn, _) in calls.items()}, {k: fl for k, (_, fl) in calls.items()}


def _gemm_fraction(t: dict, key: str, flops: float, gemm: str, gemm_flops: dict) -> float:
    """Median over rounds of (model FLOP/s) / (GEMM FLOP/s) measured in the same round."""
    from lkvision.bench.compare import median

    return median([(flops / tm) / (gemm_flops[gemm] / tg) for tm, tg in zip(t[key], t[gemm])])


# --------------------------------------------------------------------------------------------------- sections
def section_limits(args) -> dict:
    from lkvision.bench.roofline import machine_limits

    lim = machine_limits(repeats=3 if args.quick else 5, clock=args.clock)
    print(f"\n## Machine limits ({args.threads} threads)\n")
    print("| measure | value |")
    print("|---|---|")
    for dt in ("fp32", "bf16"):
        g = lim[f"gemm_{dt}"]
        print(f"| GEMM {dt} (4096x1024 @ 1024x1024): torch.mm / oneDNN | {g['mm'] / 1e9:.0f} / "
              f"{g['onednn'] / 1e9:.0f} GFLOP/s |")
    bw = lim["bandwidth"]
    print(f"| memory bandwidth: copy / add (256 MB) | {bw['copy'] / 1e9:.1f} / {bw['add'] / 1e9:.1f} GB/s |")
    return lim


def section_infer(args) -> list[dict]:
    import lkvision

    rows = []
    for name in args.models:
        _log(f"infer: {name} ({_load()})")
        torch.manual_seed(0)
        deploy = lkvision.reparameterize(lkvision.create_model(name).eval())
        flops = _flops(deploy, args.batch, args.img)
        x = torch.randn(args.batch, 3, args.img, args.img)
        models = {"nchw": (deploy, x), "cl": (_cl(lkvision.reparameterize(deploy)), _cl(x))}
        variants, gemm_flops = _gemm_variants()
        for side, plain in (("ours", False), ("plain", True)):
            for lay, (m, xx) in models.items():
                variants[f"{side}_{lay}"] = _inference_call(m, xx, plain=plain)
        from lkvision.bench.compare import interleave, median, ratio

        t = interleave(variants, rounds=args.rounds, iters=args.iters, warmup=args.warmup, clock=args.clock)
        best = {side: min((f"{side}_{lay}" for lay in models), key=lambda k: median(t[k]))
                for side in ("ours", "plain")}
        r = ratio(t, best["plain"], best["ours"])
        ours_s = median(t[best["ours"]])
        rec = {"model": name, "times_s": t, "best": best, "ratio": r, "flops": flops,
               "img_s_ours": args.batch / ours_s, "img_s_plain": args.batch / median(t[best["plain"]]),
               "gflops_ours": flops / ours_s / 1e9,
               "gemm_fraction": _gemm_fraction(t, best["ours"], flops, "@gemm_fp32", gemm_flops)}
        rows.append(rec)
    print(f"\n## fp32 inference, deploy form, batch {args.batch}, {args.img}^2: ours vs plain PyTorch "
          f"(same weights, each on its best layout)\n")
    print("| model | ours img/s (layout) | plain img/s (layout) | ours / plain | GFLOP/s | of fp32 GEMM |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        frac = f"{100 * r['gemm_fraction']:.0f}%"
        print(f"| {r['model']} | {r['img_s_ours']:.2f} ({r['best']['ours'][5:]}) | {r['img_s_plain']:.2f} "
              f"({r['best']['plain'][6:]}) | {_fmt_ratio(r['ratio'])} | {r['gflops_ours']:.0f} | {frac} |")
    return rows


def _bf16_groups(models: list[str], pair: tuple[str, str]) -> list[list[str]]:
    groups, rest = [], list(models)
    if all(p in rest for p in pair):
        groups.append(list(pair))
        rest = [m for m in rest if m not in pair]
    return groups + [[m] for m in rest]


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))


def section_bf16(args) -> list[dict]:
    import lkvision
    from lkvision.bench.compare import interleave, median, ratio

    rows = []
    for group in _bf16_groups(args.models, args.pair):
        _log(f"bf16: {' + '.join(group)} ({_load()})")
        variants, gemm_flops = _gemm_variants()
        info = {}
        for name in group:
            torch.manual_seed(0)
            fp32 = _cl(lkvision.reparameterize(lkvision.create_model(name).eval()))
            bf16 = lkvision.reparameterize(fp32).to(torch.bfloat16)
            x = _cl(torch.randn(args.batch, 3, args.img, args.img))
            xb = x.to(torch.bfloat16)
            with torch.no_grad():
                ref = fp32(x)
                err_bf16 = _rel_err(bf16(xb), ref)
                with torch.autocast("cpu", torch.bfloat16):
                    err_amp = _rel_err(fp32(x), ref)
            info[name] = {"flops": _flops(fp32, args.batch, args.img), "rel_err_bf16": err_bf16,
                          "rel_err_autocast": err_amp}
            variants[f"{name}|fp32"] = _inference_call(fp32, x)
            variants[f"{name}|bf16"] = _inference_call(bf16, xb)
            variants[f"{name}|autocast"] = _inference_call(fp32, x, amp=True)
        t = interleave(variants, rounds=args.rounds, iters=args.iters, warmup=args.warmup, clock=args.clock)
        for name in group:
            rec = {"model": name, **info[name], "times_s": {k: v for k, v in t.items() if k.startswith(name + "|")}}
            for mode in ("bf16", "autocast"):
                rec[f"{mode}_vs_fp32"] = ratio(t, f"{name}|fp32", f"{name}|{mode}")
                s = median(t[f"{name}|{mode}"])
                rec[f"img_s_{mode}"] = args.batch / s
                rec[f"gemm_fraction_{mode}"] = _gemm_fraction(t, f"{name}|{mode}", info[name]["flops"], "@gemm_bf16",
                                                             gemm_flops)
            rec["img_s_fp32"] = args.batch / median(t[f"{name}|fp32"])
            if len(group) == 2 and name == group[1]:
                rec["vs_" + group[0]] = {mode: ratio(t, f"{group[0]}|{mode}", f"{name}|{mode}")
                                         for mode in ("fp32", "bf16", "autocast")}
            rows.append(rec)
    print(f"\n## bf16 inference (deploy form, channels_last, batch {args.batch}, {args.img}^2): ours, bf16 vs "
          "ours fp32\n")
    print("| model | fp32 img/s | bf16 img/s | bf16 / fp32 | autocast img/s | autocast / fp32 | rel. L2 error "
          "bf16 / autocast | bf16 of bf16 GEMM |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        frac = f"{100 * r['gemm_fraction_bf16']:.0f}%"
        print(f"| {r['model']} | {r['img_s_fp32']:.2f} | {r['img_s_bf16']:.2f} | {_fmt_ratio(r['bf16_vs_fp32'])} | "
              f"{r['img_s_autocast']:.2f} | {_fmt_ratio(r['autocast_vs_fp32'])} | {r['rel_err_bf16']:.4f} / "
              f"{r['rel_err_autocast']:.4f} | {frac} |")
    _print_pairs(rows, "")
    return rows


def _print_pairs(rows: list[dict], what: str) -> None:
    """Print the ``vs_<other>`` ratios of the models that shared an interleaved group with another model."""
    for r in rows:
        for key, val in r.items():
            if key.startswith("vs_"):
                print(f"\n{r['model']} / {key[3:]}{what} (same group): " + ", ".join(
                    f"{mode} {_fmt_ratio(v)}" for mode, v in val.items()))


def _train_call(model, opt, x, y, amp: bool, plain: bool):
    from lkvision.bench.baseline import plain_pytorch

    def run():
        ctx = plain_pytorch() if plain else contextlib.nullcontext()
        with ctx:
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", torch.bfloat16, enabled=amp):
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            loss.backward()
            opt.step()
    return run


def section_train(args) -> list[dict]:
    import lkvision
    from lkvision.bench.compare import interleave, median, ratio

    rows = []
    modes = tuple(args.train_modes)
    for group in _bf16_groups(args.models, args.pair):
        _log(f"train: {' + '.join(group)} ({_load()})")
        variants, gemm_flops = _gemm_variants()
        info = {}
        for name in group:
            torch.manual_seed(0)
            model = _cl(lkvision.create_model(name).train())
            info[name] = {"flops": 3 * _flops(model, args.batch, args.img)}
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
            x = _cl(torch.randn(args.batch, 3, args.img, args.img))
            y = torch.randint(0, getattr(model, "num_classes", 1000) or 1000, (args.batch,))
            for mode in modes:
                for side in ("ours", "plain"):
                    variants[f"{name}|{side}|{mode}"] = _train_call(model, opt, x, y, mode == "autocast",
                                                                    side == "plain")
        t = interleave(variants, rounds=args.train_rounds, iters=1, warmup=1, clock=args.clock)
        for name in group:
            rec = {"model": name, **info[name],
                   "times_s": {k: v for k, v in t.items() if k.startswith(name + "|")}}
            for mode in modes:
                rec[f"{mode}_vs_plain"] = ratio(t, f"{name}|plain|{mode}", f"{name}|ours|{mode}")
                s = median(t[f"{name}|ours|{mode}"])
                rec[f"img_s_{mode}"] = args.batch / s
                rec[f"img_s_plain_{mode}"] = args.batch / median(t[f"{name}|plain|{mode}"])
                rec[f"gemm_fraction_{mode}"] = _gemm_fraction(t, f"{name}|ours|{mode}", info[name]["flops"],
                                                             "@gemm_fp32" if mode == "fp32" else "@gemm_bf16",
                                                             gemm_flops)
            if len(group) == 2 and name == group[1]:
                rec["vs_" + group[0]] = {mode: ratio(t, f"{group[0]}|ours|{mode}", f"{name}|ours|{mode}")
                                         for mode in modes}
            rows.append(rec)
    print(f"\n## Training step (train form, fwd + CE + bwd + SGD, channels_last, batch {args.batch}, "
          f"{args.img}^2): ours vs plain PyTorch\n")
    print("| model | " + " | ".join(f"{m} ours / plain img/s | {m} ours / plain" for m in modes)
          + f" | of GEMM ({' / '.join(modes)}) |")
    print("|---|" + "---|---|" * len(modes) + "---|")
    for r in rows:
        frac = " / ".join(f"{100 * r[f'gemm_fraction_{m}']:.0f}%" for m in modes)
        print(f"| {r['model']} | " + " | ".join(
            f"{r[f'img_s_{m}']:.2f} / {r[f'img_s_plain_{m}']:.2f} | {_fmt_ratio(r[f'{m}_vs_plain'])}" for m in modes)
            + f" | {frac} |")
    _print_pairs(rows, " training step")
    return rows


# --------------------------------------------------------------------------------------------------- main
SECTIONS = ("limits", "infer", "bf16", "train")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--models", nargs="+", default=None, help=f"default: {' '.join(FAMILIES)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--warmup", type=int, default=1, help="untimed passes per variant (inference)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds (inference)")
    p.add_argument("--iters", type=int, default=2, help="passes per variant per round (inference)")
    p.add_argument("--train-rounds", type=int, default=3, help="interleaved rounds of one step per variant")
    p.add_argument("--train-modes", nargs="+", default=["fp32", "autocast"], choices=("fp32", "autocast"),
                   help="training-step precisions (autocast: bf16; leave it out where bf16 runs in software)")
    p.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                   help="wall: elapsed time (quiet machine); cpu: process CPU time, robust on a shared machine "
                        "with --threads 1 (lkvision.bench.compare)")
    p.add_argument("--quick", action="store_true", help="smoke run: test-size models, 64^2, 1 round")
    p.add_argument("--json", default="benchmarks/results/cpu_models.json",
                   help="where to write all records ('' to skip)")
    args = p.parse_args(argv)
    if args.quick:
        args.img, args.rounds, args.iters, args.train_rounds, args.warmup = 64, 1, 1, 1, 1
    args.models = args.models or list(QUICK_FAMILIES if args.quick else FAMILIES)
    args.pair = QUICK_PAIR if args.quick else PAIR

    import lkvision

    torch.set_num_threads(args.threads)
    missing = [m for m in args.models if m not in set(lkvision.list_models())]
    if missing:
        p.error(f"unknown model(s) {missing}; see lkvision.list_models()")
    t0 = time.perf_counter()
    load_start = _load()
    print(f"# CPU benchmark: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} threads, {args.clock} clock, {datetime.now(timezone.utc).isoformat(timespec='seconds')}; "
          f"{load_start} at start")
    out = {"args": {k: v for k, v in vars(args).items()}, "load_start": load_start}
    if "limits" in args.sections:
        out["limits"] = section_limits(args)
    if "infer" in args.sections:
        out["infer"] = section_infer(args)
    if "bf16" in args.sections:
        out["bf16"] = section_bf16(args)
    if "train" in args.sections:
        out["train"] = section_train(args)
    out["seconds"] = time.perf_counter() - t0
    out["load_end"] = _load()
    from lkvision.bench.throughput import environment

    out["environment"] = environment("cpu")
    print(f"\n{args.threads} threads; {load_start} at start, {out['load_end']} at end; "
          f"{out['seconds']:.0f} s in all")
    if args.json:
        from lkvision.fileio import atomic_write_json

        print(f"wrote {atomic_write_json(args.json, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
