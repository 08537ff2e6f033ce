"""``lkvision erf | kernels | sparsity | coverage | flops``: thin argument parsing over the analysis library.

Every command prints a table and writes its figure/data files into ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..cli import UsageError, command
from ..models._weights import ALLOW_PICKLE_HELP

__all__ = ["erf_main", "kernels_main", "sparsity_main", "coverage_main", "flops_main", "build_model",
           "parse_model_kwargs", "RANDOM_WEIGHTS"]

#: label suffix / note for a model analysed without --checkpoint
RANDOM_WEIGHTS = "random init"


def parse_model_kwargs(text: str | None, flag: str = "--model-kwargs") -> dict:
    """``'{"num_classes": 10}'`` -> dict; anything but a JSON object is a :class:`~lkvision.cli.UsageError`."""
    if not text:
        return {}
    try:
        kw = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{flag} must be a JSON object, got {text!r}: {e}") from e
    if not isinstance(kw, dict):
        raise UsageError(f"{flag} must be a JSON object, got {text!r}")
    return kw


def build_model(name: str, checkpoint: str | None = None, model_kwargs: dict | None = None,
                deploy: bool = False, device: str = "cpu", allow_pickle: bool = False) -> torch.nn.Module:
    """A registered model (optionally with lkvision weights from ``checkpoint``), in eval mode.

    ``allow_pickle``: see :func:`lkvision.load_weights` (only for checkpoint files you trust)."""
    import lkvision

    try:
        model = lkvision.create_model(name, **(model_kwargs or {}))
    except TypeError as e:  # an unknown constructor argument from --model-kwargs
        raise UsageError(f"--model-kwargs for {name!r}: {e}") from e
    if checkpoint:
        lkvision.load_weights(model, checkpoint, allow_pickle=allow_pickle)
    model.eval()
    if deploy:
        model = lkvision.reparameterize(model, inplace=True)
    return model.to(device)


def _weights_label(name: str, checkpoint: str | None) -> str:
    """``"sw_tiny (best.safetensors)"``, or ``"sw_tiny (random init)"`` for a model without a checkpoint."""
    return f"{name} ({Path(checkpoint).name if checkpoint else RANDOM_WEIGHTS})"


def _say_random(names: list[str]) -> str:
    """Print (and return, for figure titles) a one-line note when some models have no checkpoint."""
    if not names:
        return ""
    print(f"note: no --checkpoint for {', '.join(names)}: analysing RANDOM (untrained) weights; pass "
          "--checkpoint FILE (one per model, '-' for none) to analyse a trained model")
    return " -- random (untrained) weights: " + ", ".join(names)


def _per_model(values: list[str] | None, n: int, what: str) -> list[str | None]:
    if not values:
        return [None] * n
    if len(values) != n:
        raise UsageError(f"give one {what} per model ({n}), got {len(values)}")
    return [None if v in ("", "none", "-") else v for v in values]


def _common(p: argparse.ArgumentParser, models_required: bool = True) -> None:
    p.add_argument("--models", "-m", nargs="+", required=models_required, help="registered model names")
    p.add_argument("--checkpoint", nargs="+", default=None,
                   help="lkvision weights, one per model ('-' for none); loaded with lkvision.load_weights")
    p.add_argument("--model-kwargs", default=None, help="JSON dict passed to create_model for every model")
    p.add_argument("--out-dir", default="analysis_out", help="where figures/tables are written")
    p.add_argument("--device", default="cpu")
    p.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)


# ----------------------------------------------------------------------------------------------- erf
@command("lkvision erf")
def erf_main(argv: list[str] | None = None) -> int:
    from .erf import DEFAULT_THRESHOLDS, area_ratios, compute_erf, format_ratio, log_normalize
    from .images import folder_image_paths, image_batches, sample_image_paths
    from .plotting import format_table, plot_erf_maps, save_csv, save_json

    p = argparse.ArgumentParser(prog="lkvision erf", description=(
        "Effective receptive field (RepLKNet App. B): contribution map of the centre of the last feature "
        "map aggregated over images, area ratios r at thresholds t, heat map with the paper's log scale."))
    _common(p)
    p.add_argument("--images", default=None, help="folder of images (default: bundled real sample images)")
    p.add_argument("--sample-source", default="auto", choices=("auto", "foolbox", "skimage"))
    p.add_argument("--num-images", type=int, default=50, help="images to aggregate (official: 50)")
    p.add_argument("--resolution", "--img-size", type=int, default=1024, help="square input size (official: 1024)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--variant", default="code", choices=("code", "paper"),
                   help="code: official script (ReLU on central outputs, mean over images); "
                        "paper: App. B eq. 1-2 (no ReLU on outputs, sum over images)")
    p.add_argument("--thresholds", type=float, nargs="+", default=list(DEFAULT_THRESHOLDS))
    p.add_argument("--deploy", action="store_true", help="re-parameterize first (same function, faster)")
    args = p.parse_args(argv)

    paths = folder_image_paths(args.images) if args.images else sample_image_paths(args.sample_source)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kw = parse_model_kwargs(args.model_kwargs)
    rows, maps, raw = [], {}, {}
    ckpts = _per_model(args.checkpoint, len(args.models), "checkpoint")
    random_note = _say_random([n for n, c in zip(args.models, ckpts) if c is None])
    for name, ckpt in zip(args.models, ckpts):
        model = build_model(name, ckpt, kw, args.deploy, args.device, args.allow_pickle)
        batches = image_batches(paths, args.resolution, args.batch_size, args.num_images)
        erf = compute_erf(model, batches, variant=args.variant, device=args.device)
        a = log_normalize(erf)
        ratios = area_ratios(a, args.thresholds)
        label = _weights_label(name, ckpt)
        maps[label] = a
        raw[label] = erf
        row = {"model": label, "weights": ckpt or RANDOM_WEIGHTS}
        row.update({f"t={100 * t:g}%": format_ratio(r) for t, r in ratios.items()})
        rows.append(row)
        del model
    print(f"ERF at {args.resolution}x{args.resolution}, {args.num_images} images, variant={args.variant}")
    print(format_table(rows))
    plot_erf_maps(maps, out / "erf.png", suptitle=f"ERF {args.resolution}px, {args.variant} variant, log scale"
                  + random_note)
    save_csv(rows, out / "erf.csv")
    save_json({"resolution": args.resolution, "num_images": args.num_images, "variant": args.variant,
               "images": args.images or f"bundled:{args.sample_source}", "rows": rows,
               "command": " ".join(["lkvision", "erf", *argv])}, out / "erf.json")
    import numpy as np

    for label, erf in raw.items():
        np.save(out / f"erf_{label.split(' ')[0]}.npy", erf.numpy())
    print(f"wrote {out / 'erf.png'}, erf.csv, erf.json and the raw maps (erf_<model>.npy)")
    return 0


# ------------------------------------------------------------------------------------------- kernels
@command("lkvision kernels")
def kernels_main(argv: list[str] | None = None) -> int:
    from .kernels import find_kernel_layers, kernel_maps
    from .plotting import format_table, plot_kernel_maps, save_json

    p = argparse.ArgumentParser(prog="lkvision kernels", description=(
        "Aggregated |kernel| maps (sum over channels, rescaled to [0,1]) of one large-kernel layer before "
        "re-parameterization (large branch, BN fused; Shiftwise: folded cross kernel) and after (the exact "
        "equivalent kernel of the deploy form) -- RepLKNet App. D."))
    _common(p)
    p.add_argument("--layer", default=None,
                   help="module name (default: first large-kernel layer of the last stage)")
    p.add_argument("--list", action="store_true", help="list the large-kernel layers and exit")
    args = p.parse_args(argv)
    out = Path(args.out_dir)
    kw = parse_model_kwargs(args.model_kwargs)
    maps, rows, summary = {}, [], {}
    ckpts = _per_model(args.checkpoint, len(args.models), "checkpoint")
    random_note = "" if args.list else _say_random([n for n, c in zip(args.models, ckpts) if c is None])
    for name, ckpt in zip(args.models, ckpts):
        model = build_model(name, ckpt, kw, False, args.device, args.allow_pickle)
        if args.list:
            print(f"{name}:")
            for n in find_kernel_layers(model):
                print(f"  {n}")
            continue
        from .kernels import default_kernel_layer

        layer = args.layer or default_kernel_layer(model)
        km = kernel_maps(model, layer)
        for form, k in km.items():
            maps[f"{_weights_label(name, ckpt)} {layer}\n{form}"] = k
            c = k.shape[-1] // 2
            rows.append({"model": name, "weights": ckpt or RANDOM_WEIGHTS, "layer": layer, "form": form,
                         "size": f"{k.shape[0]}x{k.shape[1]}",
                         "centre": float(k[c, c]), "mean": float(k.mean()),
                         "centre_cross_mean": float((k[c, :].sum() + k[:, c].sum() - k[c, c]) /
                                                    (k.shape[0] + k.shape[1] - 1))})
            summary[f"{name}/{layer}/{form}"] = k
    if args.list:
        return 0
    print(format_table(rows))
    plot_kernel_maps(maps, out / "kernels.png", suptitle="aggregated |kernel| (sum over channels, max = 1)"
                     + random_note)
    save_json({"rows": rows, "maps": summary, "command": " ".join(["lkvision", "kernels", *argv])},
              out / "kernels.json")
    print(f"wrote {out / 'kernels.png'} and kernels.json")
    return 0


# ------------------------------------------------------------------------------------------ sparsity
@command("lkvision sparsity")
def sparsity_main(argv: list[str] | None = None) -> int:
    from .plotting import format_table, plot_sparsity, save_csv, save_json
    from .sparsity import sparsity_report

    p = argparse.ArgumentParser(prog="lkvision sparsity", description=(
        "Filter sparsity of the Shiftwise layers of a (sparse) checkpoint: per-layer sparsity vs depth by "
        "stage, pruned filter indices per stage, pruned counts per group (SW paper Figs. 5-6)."))
    p.add_argument("--checkpoint", required=True, help="checkpoint with zeros in pruned filters")
    p.add_argument("--model", default=None,
                   help="registered model to load the checkpoint into (needed when the state dict has no "
                        "Shiftwise tables); without it the state dict is read directly")
    p.add_argument("--model-kwargs", default=None)
    p.add_argument("--masks", default=None,
                   help="optional file of {weight key: mask} (safetensors or torch); else zeros define pruning")
    p.add_argument("--nk", type=int, default=None, help="filters per group when it cannot be inferred")
    p.add_argument("--out-dir", default="analysis_out")
    p.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)
    args = p.parse_args(argv)
    from ..models._weights import load_state_dict_file

    if args.model:
        source = build_model(args.model, args.checkpoint, parse_model_kwargs(args.model_kwargs),
                             allow_pickle=args.allow_pickle)
    else:
        source = load_state_dict_file(args.checkpoint, allow_pickle=args.allow_pickle)
    masks = _load_masks(args.masks, args.allow_pickle) if args.masks else None
    rep = sparsity_report(source, masks=masks, nk=args.nk)
    rows = rep.rows()
    print(format_table(rows, ["layer_no", "name", "stage", "groups", "nk", "pruned", "sparsity"]))
    print(f"overall filter sparsity: {rep.overall:.4f} over {len(rows)} Shiftwise layers")
    out = Path(args.out_dir)
    plot_sparsity(rep, out / "sparsity.png")
    save_csv(rows, out / "sparsity_layers.csv")
    save_csv(rep.distribution_rows(), out / "sparsity_distributions.csv")
    save_json({"overall": rep.overall, "layers": rows, "index_distribution": rep.index_distribution,
               "count_distribution": rep.count_distribution,
               "command": " ".join(["lkvision", "sparsity", *argv])}, out / "sparsity.json")
    print(f"wrote {out / 'sparsity.png'}, sparsity_layers.csv, sparsity_distributions.csv, sparsity.json")
    return 0


def _load_masks(path: str, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    from ..models._weights import load_state_dict_file

    sd = load_state_dict_file(path, allow_pickle=allow_pickle)
    return {k[:-5] + ".weight" if k.endswith(".mask") else k: v for k, v in sd.items()}


# ------------------------------------------------------------------------------------------ coverage
@command("lkvision coverage")
def coverage_main(argv: list[str] | None = None) -> int:
    from .coverage import coverage, coverage_curve, coverage_from_tables
    from .plotting import format_table, plot_coverage, save_csv, save_json

    p = argparse.ArgumentParser(prog="lkvision coverage", description=(
        "Feature-map utilisation of the shift-add paths vs number of edges, with and without shuffled order "
        "(SW paper §3.5, Fig. 4). Utilisation = share of conv-output elements that reach the output through "
        "at least one path (see docs/analysis.md)."))
    p.add_argument("--M", type=int, nargs="+", default=[51, 49, 47, 13], help="big kernel sizes")
    p.add_argument("--sizes", type=int, nargs="+", default=None,
                   help="feature-map size per M (default: SW-tiny stage sizes at 224: 56 28 14 7, or 56)")
    p.add_argument("--edges", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--small-kernel", type=int, default=3)
    p.add_argument("--groups", type=int, default=8, help="random channels averaged for shuffled orders")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--official-tables", action="store_true",
                   help="also evaluate the op's seed-123 tables (make_shift_tables) for each M and E")
    p.add_argument("--out-dir", default="analysis_out")
    args = p.parse_args(argv)
    sizes = args.sizes
    if sizes is None:
        default = {51: 56, 49: 28, 47: 14, 13: 7}
        sizes = [default.get(m, 56) for m in args.M]
    rows = coverage_curve(args.M, sizes, args.edges, args.small_kernel, args.groups, args.seed)
    if args.official_tables:
        from ..ops.shift_add import make_shift_tables

        for M, H in zip(args.M, sizes):
            for E in args.edges:
                pad_hv, ident = make_shift_tables(args.groups, M, args.small_kernel, edges=E)
                c = coverage_from_tables(pad_hv, ident, H, H, args.small_kernel)
                rows.append({"M": M, "H": H, "shuffle": "official", "edges": E,
                             "utilization": c["utilization"], "mean_use": c["mean_use"]})
    print(format_table(rows))
    out = Path(args.out_dir)
    ex = coverage(args.M[0], sizes[0], sizes[0], 1, False, args.small_kernel)
    plot_coverage([r for r in rows if r["shuffle"] != "official"], out / "coverage.png",
                  maps={f"M={args.M[0]}, E=1, w/o shuffle": ex["counts"][0]})
    save_csv(rows, out / "coverage.csv")
    save_json({"rows": rows, "command": " ".join(["lkvision", "coverage", *argv])}, out / "coverage.json")
    print(f"wrote {out / 'coverage.png'}, coverage.csv, coverage.json")
    return 0


# --------------------------------------------------------------------------------------------- flops
@command("lkvision flops")
def flops_main(argv: list[str] | None = None) -> int:
    from .flops import complexity_table
    from .plotting import format_table, save_csv, save_json

    p = argparse.ArgumentParser(prog="lkvision flops", description=(
        "Params / FLOPs / MACs (Table-3 style) of one or more models, training and deploy form "
        "(FlopCounterMode; custom ops counted with their registered formulas; 1 MAC = 2 FLOPs)."))
    _common(p)
    p.add_argument("--resolution", "--img-size", type=int, default=224)
    p.add_argument("--forms", nargs="+", default=["train", "deploy"], choices=("train", "deploy"))
    p.add_argument("--by-operator", action="store_true", help="also report FLOPs per aten operator")
    args = p.parse_args(argv)
    rows = complexity_table(args.models, args.resolution, args.forms, parse_model_kwargs(args.model_kwargs),
                            _per_model(args.checkpoint, len(args.models), "checkpoint"), args.by_operator,
                            allow_pickle=args.allow_pickle)
    cols = ["model", "form", "resolution", "params_M", "nonzero_params_M", "GFLOPs", "GMACs"]
    print(format_table(rows, cols))
    if args.by_operator:
        for r in rows:
            print(f"{r['model']} [{r['form']}]: " + ", ".join(f"{k}={v / 1e9:.3f}G" for k, v in
                                                            sorted(r["flops_by_op"].items())))
    out = Path(args.out_dir)
    save_csv([{c: r[c] for c in cols} for r in rows], out / "flops.csv")
    save_json({"rows": rows, "command": " ".join(["lkvision", "flops", *argv])}, out / "flops.json")
    print(f"wrote {out / 'flops.csv'} and flops.json")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(erf_main(sys.argv[1:]))
