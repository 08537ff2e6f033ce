"""``lkvision downstream seg|det``: UperNet (mmseg) / Mask R-CNN (mmdet) on the bundled dense digits, on CPU."""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import yaml

__all__ = ["main", "parse_model_kwargs"]


def parse_model_kwargs(items: list[str]) -> dict:
    """``["big_kernels=[3,3,3,3]", "drop_path_rate=0.1"]`` -> dict (values parsed as YAML)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--model-kwargs expects key=value, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lkvision downstream", description=__doc__)
    p.add_argument("task", choices=("seg", "det"), help="seg: UperNet + mIoU (mmseg); det: Mask R-CNN + COCO AP "
                   "(mmdet, pycocotools)")
    p.add_argument("--model", default="sw_femto", help="lkvision backbone name (default: sw_femto)")
    p.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="backbone constructor overrides, e.g. big_kernels=[3,3,3,3]")
    p.add_argument("--iters", type=int, default=600, help="training iterations (default 600)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed; the table gives mean/std")
    p.add_argument("--num-train", type=int, default=800, help="training images (default 800)")
    p.add_argument("--num-val", type=int, default=200, help="validation images (default 200)")
    p.add_argument("--canvas", type=int, default=64, help="image size (default 64)")
    p.add_argument("--max-digits", type=int, default=2, help="digits per image, 1..N (default 2)")
    p.add_argument("--data-root", default="data/dense_digits", help="where the dense digits are written")
    p.add_argument("--out-dir", default="runs/downstream", help="one sub-folder per run (config, log, overlays)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return p


def _metric_keys(task: str) -> list[tuple[str, str]]:
    if task == "seg":
        return [("mIoU", "mIoU"), ("aAcc", "aAcc")]
    return [("coco/bbox_mAP", "box AP"), ("coco/bbox_mAP_50", "box AP50"), ("coco/segm_mAP", "mask AP"),
            ("coco/segm_mAP_50", "mask AP50")]


def _table(task: str, rows: list[dict]) -> str:
    keys = _metric_keys(task)
    head = ["model", "seed", "backbone params", "iters", "loss first->last", "train s", *[k[1] for k in keys]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        name = r["model"] + ("(" + ", ".join(f"{k}={v}" for k, v in r["model_kwargs"].items()) + ")"
                             if r["model_kwargs"] else "")
        vals = [name, str(r["seed"]), f"{r['backbone_params']:,}", str(r["iters"]),
                f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}", f"{r['train_s']:.0f}",
                *[f"{r['metrics'].get(k, float('nan')):.3f}" for k, _ in keys]]
        lines.append("| " + " | ".join(vals) + " |")
    if len(rows) > 1:
        stats = []
        for k, _ in keys:
            xs = [r["metrics"][k] for r in rows if k in r["metrics"]]
            stats.append(f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else "-")
        lines.append("| mean ± std | | | | | | " + " | ".join(stats) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from ..data._compat import ensure_torchvision

    ensure_torchvision()  # OpenMMLab imports torchvision, whose C++ ops may not load on this torch
    try:
        import mmengine  # noqa: F401

        if args.task == "seg":
            import mmseg  # noqa: F401
        else:
            import mmdet  # noqa: F401
    except ImportError as e:
        raise ImportError(f"`lkvision downstream {args.task}` needs OpenMMLab ({e.name} is missing): "
                          "pip install 'lkvision[mm]' (see docs/downstream.md for mmcv)") from e
    import torch

    from ..data.dense import write_dense_digits
    from ..fileio import atomic_write_json, atomic_write_text
    from .downstream import run_downstream

    if args.threads:
        torch.set_num_threads(args.threads)
    kwargs = parse_model_kwargs(args.model_kwargs)
    root = write_dense_digits(args.data_root, num_train=args.num_train, num_val=args.num_val, canvas=args.canvas,
                              max_digits=args.max_digits, distractors=2 * args.max_digits - 1)
    rows = []
    for seed in args.seeds:
        tag = args.model + ("_" + "_".join(f"{k}{v}" for k, v in kwargs.items()) if kwargs else "")
        tag = "".join(c if c.isalnum() or c in "_-." else "" for c in tag)
        work_dir = Path(args.out_dir) / args.task / f"{tag}_seed{seed}"
        row = run_downstream(args.task, args.model, str(root), str(work_dir), iters=args.iters, lr=args.lr,
                             batch_size=args.batch_size, seed=seed, model_kwargs=kwargs, canvas=args.canvas)
        atomic_write_json(work_dir / "metrics.json", row)
        rows.append(row)
        print(f"{args.task} {tag} seed {seed}: " + ", ".join(
            f"{name} {row['metrics'].get(k, float('nan')):.3f}" for k, name in _metric_keys(args.task))
            + f" (overlays: {row.get('overlays')})", flush=True)
    table = _table(args.task, rows)
    atomic_write_text(Path(args.out_dir) / args.task / f"{tag}_table.md", table + "\n")
    print(table)
    return 0
