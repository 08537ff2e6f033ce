"""``lkvision shape-bias``: shape vs texture decisions on cue-conflict images (RepLKNet §5.2, Fig. 5).

Thin argument parsing over :mod:`lkvision.analysis.shape_bias`; writes ``shape_bias.csv``,
``shape_bias.json`` (with every decision) and ``shape_bias.png`` into ``--out-dir``.
"""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

from ..cli import command
from ..models._weights import ALLOW_PICKLE_HELP

__all__ = ["main"]

_EPILOG = """\
data:
  No cue-conflict images ship with lkvision. The 16-category set of Geirhos et al. (1,280 images, as used by
  RepLKNet Fig. 5; 80 of them without conflict) is published by the model-vs-human toolbox:
    https://github.com/bethgelab/model-vs-human/releases/download/v0.1/cue-conflict.tar.gz
  Unpack it and pass the folder (layout <root>/<shape>/<shape><i>-<texture><j>.png) with --data.
  --bundled-digits instead generates an offline digit version from the bundled MNIST subset (shape of digit a,
  texture of digit b) and evaluates 10-class digit classifiers trained with `lkvision train`.

examples:
  lkvision shape-bias --models replknet_31b resnet152 --checkpoint replknet_31b.safetensors - \\
      --data cue-conflict --out-dir shape_bias_out
  lkvision shape-bias --bundled-digits --models replknet_nano --checkpoint runs/digits/final.safetensors
"""


def _model_kwargs(texts: list[str] | None, n: int) -> list[dict]:
    """One JSON object for every model, or one per model."""
    from .cli import parse_model_kwargs

    if not texts:
        return [{} for _ in range(n)]
    if len(texts) not in (1, n):
        raise ValueError(f"give one --model-kwargs JSON for all models or one per model ({n}), got {len(texts)}")
    out = [parse_model_kwargs(t) for t in texts]
    return [dict(out[0]) for _ in range(n)] if len(out) == 1 else out


def _labels(models: list[str], ckpts: list[str | None]) -> list[str]:
    """``name`` or ``name (folder/file)``, numbered where two would be equal."""
    labels = [m if c is None else f"{m} ({Path(c).parent.name}/{Path(c).name})" for m, c in zip(models, ckpts)]
    return [f"{lab} #{labels[:i].count(lab) + 1}" if labels.count(lab) > 1 else lab for i, lab in enumerate(labels)]


def _digit_controls(canvas: int, per_class: int, batch_size: int) -> dict[str, tuple[list, list[str]]]:
    """The two one-cue control sets of the digit version: kind -> (input batches, true category names)."""
    import torch

    from ..data.bundled import BUNDLED_MEAN, BUNDLED_STD
    from ..data.cue_conflict import DIGIT_NAMES, digit_cue_controls

    out = {}
    for kind in ("shape", "texture"):
        pairs = list(digit_cue_controls(kind, per_class, canvas=canvas))
        x = torch.stack([img for _, img in pairs]).float().div(255.0).sub(BUNDLED_MEAN[0]).div(BUNDLED_STD[0])
        out[kind] = (list(x[:, None].split(batch_size)), [DIGIT_NAMES[c] for c, _ in pairs])
    return out


def _accuracy(decisions: list[str], labels: list[str]) -> float:
    return sum(d == t for d, t in zip(decisions, labels)) / len(labels)


@command("lkvision shape-bias")
def main(argv: list[str] | None = None) -> int:
    from ..data.bundled import BUNDLED_MEAN, BUNDLED_STD
    from .cli import _per_model, build_model
    from .images import IMAGENET_MEAN, IMAGENET_STD
    from .plotting import format_table, save_csv, save_json
    from .shape_bias import (
        _NO_DATA_HINT,
        batch_decisions,
        digit_mapping,
        imagenet16_mapping,
        model_decisions,
        plot_shape_bias,
        read_cue_conflict_folder,
        shape_bias,
    )

    p = argparse.ArgumentParser(
        prog="lkvision shape-bias", epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Shape bias (Geirhos et al.; RepLKNet §5.2, Fig. 5): on cue-conflict images (shape of one class, "
            "texture of another) the share of decisions naming the shape among those naming the shape or the "
            "texture, per shape category and pooled. ImageNet-1k models decide among the 16 categories by the "
            "mean softmax probability of each category's member classes (the model-vs-human mapping)."))
    p.add_argument("--models", "-m", nargs="+", required=True, help="registered model names")
    p.add_argument("--checkpoint", nargs="+", default=None,
                   help="lkvision weights, one per model ('-' for none); loaded with lkvision.load_weights")
    p.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)
    p.add_argument("--model-kwargs", nargs="+", default=None,
                   help="JSON dict(s) for create_model: one for every model or one per model "
                        "(--bundled-digits adds in_chans=1, num_classes=10)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", default=None, help="cue-conflict folder <root>/<shape>/<shape><i>-<texture><j>.png")
    src.add_argument("--bundled-digits", action="store_true",
                     help="generate the offline digit cue-conflict set into <out-dir>/digit_cue_conflict "
                          "(replaced on every run) and use it")
    p.add_argument("--per-pair", type=int, default=4,
                   help="--bundled-digits: images per ordered digit pair (90 pairs; default 4 -> 360 images)")
    p.add_argument("--categories", default="auto", choices=("auto", "imagenet16", "digits"),
                   help="decision categories (auto: digits for --bundled-digits or digit-named folders, "
                        "else the 16 ImageNet categories)")
    p.add_argument("--resolution", "--img-size", type=int, default=None,
                   help="input size (default 224 for imagenet16, 64 for digits)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out-dir", default="analysis_out")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    out = Path(args.out_dir)
    if args.bundled_digits:
        from ..data.cue_conflict import write_digit_cue_conflict

        data = out / "digit_cue_conflict"
        if data.is_dir():  # our own generated folder: regenerate, so that no image of an earlier run stays
            shutil.rmtree(data)
        write_digit_cue_conflict(data, per_pair=args.per_pair, canvas=args.resolution or 64)
    elif args.data:
        data = Path(args.data)
    else:
        raise ValueError(f"give --data DIR or --bundled-digits: {_NO_DATA_HINT}")

    mapping = {"imagenet16": imagenet16_mapping, "digits": digit_mapping}
    kind = args.categories
    if kind == "auto":
        names = {d.name for d in data.iterdir() if d.is_dir()} if data.is_dir() else set()
        kind = "digits" if args.bundled_digits or (names and names <= set(digit_mapping().categories)) else "imagenet16"
    cmap = mapping[kind]()
    images = read_cue_conflict_folder(data, cmap.categories)
    digits = kind == "digits"
    resolution = args.resolution or (64 if digits else 224)
    in_chans, mean, std = (1, BUNDLED_MEAN, BUNDLED_STD) if digits else (3, IMAGENET_MEAN, IMAGENET_STD)
    controls = _digit_controls(resolution, 9 * args.per_pair, args.batch_size) if args.bundled_digits else {}

    ckpts = _per_model(args.checkpoint, len(args.models), "checkpoint")
    kwargs = _model_kwargs(args.model_kwargs, len(args.models))
    labels = _labels(args.models, ckpts)
    results, summary_rows, csv_rows, decisions_json = {}, [], [], {}
    for name, ckpt, kw, label in zip(args.models, ckpts, kwargs, labels):
        if digits:
            kw = {"in_chans": 1, "num_classes": 10, **kw}
        model = build_model(name, ckpt, kw, False, args.device, args.allow_pickle)
        decisions = model_decisions(model, images, cmap, resolution, in_chans, mean, std, args.batch_size,
                                    args.device)
        control_acc = {f"{kind}_only_acc": _accuracy(batch_decisions(model, batches, cmap, args.device), labels_)
                       for kind, (batches, labels_) in controls.items()}
        del model
        res = shape_bias(((im.shape, im.texture, d) for im, d in zip(images, decisions)), cmap.categories)
        results[label] = res
        summary_rows.append({"model": label, "shape_bias": res.shape_bias, "category_mean": res.category_mean,
                             "shape": res.shape_decisions, "texture": res.texture_decisions,
                             "other": res.other_decisions, "conflict_images": res.conflict_images, **control_acc})
        for r in res.per_category:
            csv_rows.append({"model": label, **r})
        csv_rows.append({"model": label, "category": "all (pooled)", "images": res.conflict_images,
                         "shape": res.shape_decisions, "texture": res.texture_decisions,
                         "other": res.other_decisions, "shape_bias": res.shape_bias})
        csv_rows.append({"model": label, "category": "mean over categories", "shape_bias": res.category_mean})
        decisions_json[label] = {**res.as_dict(), **control_acc, "decisions": {str(im.path.relative_to(data)): d
                                                                for im, d in zip(images, decisions)}}

    excluded = next(iter(results.values())).excluded_same_class
    print(f"shape bias on {len(images)} images of {data} ({kind}: {len(cmap.categories)} categories; "
          f"{excluded} same-class images excluded)")
    print(format_table(summary_rows))
    if controls:
        print("shape_only_acc / texture_only_acc: accuracy on the one-cue control images (silhouette alone, "
              f"texture alone; {90 * args.per_pair} each) -- how well the model reads each cue by itself")
    per_cat = [{"category": c, **{lab: results[lab].per_category[i]["shape_bias"] for lab in results}}
               for i, c in enumerate(cmap.categories)]
    print(format_table(per_cat))
    plot_shape_bias(results, cmap.categories, out / "shape_bias.png",
                    title=f"shape bias, {kind} cue-conflict ({len(images)} images)")
    save_csv(csv_rows, out / "shape_bias.csv")
    save_json({"data": str(data), "categories": kind, "resolution": resolution,
               "models": decisions_json,
               "command": " ".join(["lkvision", "shape-bias", *argv])}, out / "shape_bias.json")
    if any(math.isnan(r["shape_bias"]) for r in summary_rows):
        print("note: a model never named the shape or the texture class; its shape bias is undefined (nan)")
    print(f"wrote {out / 'shape_bias.png'}, shape_bias.csv, shape_bias.json")
    return 0
