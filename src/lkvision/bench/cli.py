"""``lkvision bench {models,train,dwconv}``: throughput tables printed and saved as JSON with the environment."""

from __future__ import annotations

import argparse
import json
import sys

from ..analysis.cli import parse_model_kwargs
from ..cli import command
from ..fileio import atomic_write_text

__all__ = ["main"]


def _save(out: str | None, payload: dict, argv: list[str]) -> None:
    from .throughput import environment

    if not out:
        return
    payload = dict(payload)
    payload["environment"] = environment(payload.get("device", "cpu"))
    payload["command"] = " ".join(["lkvision", "bench", *argv])
    path = atomic_write_text(out, json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {path}")


def _models(args, argv: list[str], train: bool) -> int:
    import lkvision

    from ..analysis.plotting import format_table
    from .throughput import inference_throughput, train_throughput

    rows = []
    if args.dtype == "bf16":
        from .roofline import bf16_speed_note

        if note := bf16_speed_note(args.device):
            print(note, file=sys.stderr)
    kwargs = parse_model_kwargs(args.model_kwargs)
    form_arg = getattr(args, "form", "train")
    forms = ["train", "deploy"] if form_arg == "both" else [form_arg]
    for name in args.models:
        for form in forms if not train else ["train"]:
            model = lkvision.create_model(name, **kwargs)
            row = {"model": name, "form": form if not train else "train-step"}
            try:
                if train:
                    r = train_throughput(model, args.batch_size, args.resolution, args.dtype, args.channels_last,
                                         args.compile, args.warmup, args.iters, args.device)
                else:
                    r = inference_throughput(model, args.batch_size, args.resolution, args.dtype,
                                             args.channels_last, form == "deploy", args.compile, args.warmup,
                                             args.iters, args.device)
                row.update(img_s=r["img_s"], ms=r.get("ms_per_batch", r.get("ms_per_step")))
                if args.compile:
                    row["compile_s"] = r.get("compile_s", 0.0)
            except Exception as e:  # noqa: BLE001 - one failing model must not hide the others
                row.update(img_s=float("nan"), ms=float("nan"), error=f"{type(e).__name__}: {e}"[:160])
            rows.append(row)
    base = rows[0]["img_s"] if rows else float("nan")
    for r in rows:
        r["ratio_to_first"] = r["img_s"] / base if base and base == base else float("nan")
    what = "training steps (fwd+bwd+AdamW)" if train else "inference (eval, no_grad)"
    print(f"{what}: batch {args.batch_size}, {args.resolution}px, {args.dtype}, channels_last="
          f"{args.channels_last}, compile={args.compile}, device={args.device}, warm-up {args.warmup}, "
          f"timed {args.iters}")
    print(format_table(rows))
    _save(args.json, {"kind": "train" if train else "inference", "device": args.device,
                      "settings": {k: v for k, v in vars(args).items() if k != "func"}, "rows": rows}, argv)
    return 0


def _dwconv(args, argv: list[str]) -> int:
    from ..analysis.plotting import format_table
    from .dwconv import dwconv_benchmark, dwconv_paths

    passes = {"fwd": (False,), "bwd": (True,), "both": (False, True)}[args.passes]
    paths = args.paths or dwconv_paths(args.device)
    rows = dwconv_benchmark(args.kernels, args.resolutions, args.batch_size, args.channels, args.depth, paths,
                            args.dtype, passes, args.channels_last, args.runs, args.device)
    print(f"depth-wise conv stack: depth {args.depth}, input ({args.batch_size}, {args.channels}, R, R), "
          f"{args.dtype}, channels_last={args.channels_last}, device={args.device}; ms = mean of sorted(times)"
          f"[1:-2] over {args.runs} runs")
    print(format_table(rows))
    _save(args.json, {"kind": "dwconv", "device": args.device,
                      "settings": {k: v for k, v in vars(args).items() if k != "func"}, "rows": rows}, argv)
    return 0


@command("lkvision bench")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lkvision bench", description=(
        "Throughput benchmarks: models (inference, papers' protocol), train (fwd+bwd+optimizer step) and "
        "dwconv (RepLKNet Table 1 depth-wise conv stack over every dwconv2d path and plain PyTorch)."))
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("models", "train"):
        q = sub.add_parser(name, help=f"{name} throughput of several models (ratios to the first)")
        q.add_argument("--models", "-m", nargs="+", required=True)
        q.add_argument("--model-kwargs", default=None, help="JSON dict for create_model")
        q.add_argument("--batch-size", "-b", type=int, default=8 if name == "models" else 4)
        q.add_argument("--resolution", "--img-size", "-r", type=int, default=224)
        q.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
        q.add_argument("--channels-last", action="store_true")
        q.add_argument("--compile", action="store_true", help="torch.compile the model")
        q.add_argument("--warmup", type=int, default=3 if name == "models" else 2,
                       help="warm-up passes (papers: 50 for inference)")
        q.add_argument("--iters", type=int, default=5 if name == "models" else 3,
                       help="timed passes (papers: 30 for inference)")
        q.add_argument("--device", default="cpu")
        q.add_argument("--json", default=None, help="write results + environment + command line here")
        if name == "models":
            q.add_argument("--form", default="deploy", choices=("train", "deploy", "both"),
                           help="time the training form, the re-parameterized deploy form, or both")
    q = sub.add_parser("dwconv", help="depth-wise conv stack micro-benchmark (RepLKNet Table 1)")
    q.add_argument("--kernels", "-k", type=int, nargs="+", default=[3, 7, 13, 31])
    q.add_argument("--resolutions", "-R", type=int, nargs="+", default=[16, 32])
    q.add_argument("--batch-size", "-b", type=int, default=2, help="Table 1: 64")
    q.add_argument("--channels", "-c", type=int, default=64, help="Table 1: 384")
    q.add_argument("--depth", type=int, default=4, help="Table 1: 24")
    q.add_argument("--paths", nargs="+", default=None, help="subset of: pytorch auto torch channels_last custom "
                                                            "triton (default: all that run here)")
    q.add_argument("--passes", default="both", choices=("fwd", "bwd", "both"))
    q.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    q.add_argument("--channels-last", action="store_true")
    q.add_argument("--runs", type=int, default=5, help="official: 10 (mean of sorted(times)[1:-2])")
    q.add_argument("--device", default="cpu")
    q.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.cmd == "dwconv":
        return _dwconv(args, argv)
    return _models(args, argv, train=args.cmd == "train")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
