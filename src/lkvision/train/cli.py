"""``lkvision train`` / ``lkvision eval`` (also ``python -m lkvision.train``)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from ..cli import command
from ..fileio import atomic_write_json
from ..models._weights import ALLOW_PICKLE_HELP
from .config import ConfigError, describe_fields, list_recipes, load_recipe, make_config, parse_set

__all__ = ["train_main", "eval_main", "build_train_parser", "build_eval_parser"]

_TRAIN_EPILOG = """\
examples:
  lkvision train                                   # bundled digits, small SW model, a few CPU minutes
  lkvision train --recipe sw_tiny_in1k --data /datasets/imagenet --output runs/sw_tiny
  torchrun --nproc_per_node=8 -m lkvision.train --recipe sw_tiny_in1k --data /datasets/imagenet
  torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
      -m lkvision.train --recipe sw_tiny_in1k --data /datasets/imagenet --set update_freq=4
  lkvision train --recipe sw_tiny_in1k --resume auto --output runs/sw_tiny     # continue a stopped run
  lkvision train --set lr=1e-3 --set sparse.enabled=true --set mixup=0

recipes (lkvision/train/recipes/*.yaml; --recipe also takes a path): {recipes}

Every recipe key can be overridden with --set key=value (values parsed as YAML; nested: sparse.key=value).
The dedicated flags above are shortcuts for the most common keys. Unknown keys are an error.
Global batch = batch_size x update_freq x processes; with lr_base_batch set, lr scales linearly with it.
Ctrl-C (or SIGTERM) finishes the current step, writes a checkpoint and prints the command that continues the
run (exit 130 / 143); a second Ctrl-C aborts at once. An output folder that already holds a run is refused
unless --resume auto (continue it) or --overwrite (replace it) is given.

recipe keys:
{fields}
"""

# flag -> recipe key (flags that take a value)
_FLAG_KEYS = {
    "model": "model", "data": "data", "epochs": "epochs", "batch_size": "batch_size", "lr": "lr",
    "output": "output", "resume": "resume", "device": "device", "workers": "workers", "amp": "amp",
    "seed": "seed", "update_freq": "update_freq", "drop_path": "drop_path", "max_steps": "max_steps",
    "input_size": "input_size", "finetune": "finetune",
}


def build_train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lkvision train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a model from a YAML recipe. With no arguments: the 'default' recipe (a small "
                    "ShiftWise model on the bundled MNIST-digits canvas set; no download, CPU friendly).",
        epilog=_TRAIN_EPILOG.format(recipes=", ".join(list_recipes()), fields=describe_fields()),
    )
    p.add_argument("--recipe", "-r", default="default", help="recipe name or path to a .yaml (default: default)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override any recipe key (repeatable), e.g. --set weight_decay=0.1")
    p.add_argument("--model", help="model name (recipe key model)")
    p.add_argument("--data", help="'bundled' or a folder with train/ and val/ class folders")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="batch size per process")
    p.add_argument("--update-freq", type=int, help="gradient accumulation steps")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--drop-path", type=float)
    p.add_argument("--input-size", "--img-size", dest="input_size", type=int, help="training crop size")
    p.add_argument("--output", "-o", help="output folder")
    p.add_argument("--resume", help="'auto' (newest valid checkpoint in --output) or a ckpt-*.state.pt path")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --output (deletes its checkpoints, metrics, best/final weights)")
    p.add_argument("--finetune", help="initial weights file")
    p.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP + "; applies to --finetune")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--workers", type=int, help="DataLoader workers per process")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"])
    p.add_argument("--seed", type=int)
    p.add_argument("--max-steps", type=int, help="stop (and checkpoint) after this many optimizer steps")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument("--list-recipes", action="store_true", help="print the recipe names and exit")
    p.add_argument("--print-config", action="store_true", help="print the resolved config (YAML) and exit")
    return p


def _config_from_args(args: argparse.Namespace):
    data = load_recipe(args.recipe)
    overrides = {}
    for flag, key in _FLAG_KEYS.items():
        v = getattr(args, flag, None)
        if v is not None:
            overrides[key] = v
    if getattr(args, "no_progress", False):
        overrides["progress"] = False
    if getattr(args, "overwrite", False):
        overrides["overwrite"] = True
    sets = parse_set(args.sets)
    if "sparse" in sets:
        sets["sparse"] = {**(data.get("sparse") or {}), **sets["sparse"]}
    overrides.update(sets)
    return make_config(data, overrides)


@command("lkvision train")
def train_main(argv: list[str] | None = None) -> int:
    parser = build_train_parser()
    args = parser.parse_args(argv)
    if args.list_recipes:
        print("\n".join(list_recipes()))
        return 0
    cfg = _config_from_args(args)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    from .engine import train
    from .stop import TrainingAborted, TrainingInterrupted

    try:
        summary = train(cfg, allow_pickle=args.allow_pickle)
    except TrainingInterrupted as e:
        _say_main(f"lkvision train: stopped by {_signame(e.signum)} after step {e.step}, checkpoint "
                  f"{e.checkpoint}; continue with: {resume_command(argv)}")
        return e.exit_code
    except TrainingAborted as e:
        from .checkpoint import find_latest

        _say_main(f"lkvision train: aborted by a second {_signame(e.signum)}; newest checkpoint "
                  f"{find_latest(cfg.output)}; continue with: {resume_command(argv)}")
        return e.exit_code
    deploy = summary.get("deploy") or {}
    return 0 if deploy.get("parity_ok", True) else 1


def _signame(signum: int) -> str:
    import signal

    return signal.Signals(signum).name


def _say_main(msg: str) -> None:
    """Print on the first process only (under torchrun every rank stops at once)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(msg, file=sys.stderr, flush=True)


def resume_command(argv: list[str] | None) -> str:
    """The command line that continues this run: the same arguments without ``--overwrite`` and any
    ``--resume X``, plus ``--resume auto`` (``torchrun [same options] -m lkvision.train ...`` under torchrun)."""
    args, skip = [], False
    for a in list(argv or []):
        if skip:
            skip = False
        elif a == "--overwrite":
            continue
        elif a == "--resume":
            skip = True
        elif not a.startswith("--resume="):
            args.append(a)
    from .stop import _under_torchrun

    head = "torchrun [same options] -m lkvision.train" if _under_torchrun() else "lkvision train"
    return " ".join([head, shlex.join([*args, "--resume", "auto"])])


# ---------------------------------------------------------------------------------------------------- eval
def build_eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lkvision eval", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Top-1/top-5 accuracy and throughput of a checkpoint on an image folder or the bundled set.",
        epilog="""examples:
  lkvision eval --checkpoint runs/default/final.safetensors --model sw_nano
  lkvision eval --checkpoint runs/default/ckpt-00000500.state.pt          # model/data from its recipe
  lkvision eval --checkpoint official_sw_tiny.pth --family shiftwise --model sw_tiny \\
      --data /datasets/imagenet --recipe sw_tiny_in1k --deploy
--data is 'bundled', a folder with val/<class>/ images, or a folder of class folders.""",
    )
    p.add_argument("--checkpoint", "-c", required=True,
                   help=".safetensors / .pth weights, a ckpt-*.state.pt, or an official checkpoint (--family)")
    p.add_argument("--model", "-m", help="model name (default: from the checkpoint's recipe)")
    p.add_argument("--family", help="official checkpoint family (shiftwise, replknet, unireplknet, slak): convert "
                                    "with lkvision.compat.from_official and the model's official kwargs")
    p.add_argument("--recipe", default=None, help="recipe for data settings (input size, crop, mean/std)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override recipe keys (e.g. input_size=224, crop_pct=0.875)")
    p.add_argument("--data", help="'bundled' (default) or an image folder")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="weights and inputs in this dtype (bf16: fast on CPUs with AMX or AMD's AVX-512-bf16; a "
                        "note says when it is slower than fp32 here; see docs/ops.md)")
    p.add_argument("--deploy", action="store_true", help="evaluate the re-parameterized (deploy) form")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--subset", type=int, help="evaluate only this many images")
    p.add_argument("--json", help="also write the result to this JSON file")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)
    return p


@command("lkvision eval")
def eval_main(argv: list[str] | None = None) -> int:
    args = build_eval_parser().parse_args(argv)
    result = run_eval(args)
    print(json.dumps(result, indent=2))
    if args.json:
        atomic_write_json(args.json, result)
    return 0


def _with_input_dtype(model, dtype):
    """``model`` cast to ``dtype`` behind a module that casts its input too (the loaders yield fp32 images)."""
    import torch

    class InputCast(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model.to(dtype)

        def forward(self, x):
            return self.model(x.to(dtype))

    return InputCast()


def run_eval(args: argparse.Namespace) -> dict:
    import torch

    from ..data import BundledDigits, EpochSeededDataset, ImageFolderDataset, ResumableSampler, build_transform
    from ..models import CheckpointError, load_state_dict_file, load_weights
    from .checkpoint import load_checkpoint
    from .distributed import init_distributed
    from .engine import build_model, evaluate, make_loader

    ckpt = Path(args.checkpoint)
    state_cfg = None
    weights = None
    if ckpt.name.endswith(".state.pt"):
        weights, state = load_checkpoint(ckpt)
        state_cfg = state.get("config")
    recipe: dict = dict(state_cfg or {})
    if args.recipe:
        recipe.update(load_recipe(args.recipe))
    elif state_cfg is None and args.data in (None, "bundled"):
        recipe.update(load_recipe("default"))  # bundled-data settings (64x64 canvas, 1 channel)
    overrides = parse_set(args.sets)
    if args.model:
        overrides["model"] = args.model
    if args.data:
        overrides["data"] = args.data
    if "model" not in recipe and "model" not in overrides:
        raise ConfigError("--model is required (the checkpoint carries no recipe)")
    cfg = make_config({**recipe, "progress": not args.no_progress}, overrides)
    subset = args.subset or cfg.val_subset

    info = init_distributed(args.device)
    # ---------------------------------------------------------------- data
    if cfg.data in ("bundled", "", None):
        val = BundledDigits("val", canvas=cfg.input_size, distractors=cfg.bundled_distractors, limit=subset)
        num_classes, in_chans = 10, 1
    else:
        root = Path(cfg.data)
        if not root.is_dir():
            raise FileNotFoundError(f"data folder not found: {root}")
        if (root / "val").is_dir():
            root = root / "val"
        val = ImageFolderDataset(root, build_transform(cfg, False), allow_empty=True, return_status=True)
        if subset:
            val.keep_every(subset)
        num_classes, in_chans = len(val.classes), 3
    num_classes = cfg.num_classes or num_classes
    in_chans = cfg.in_chans or in_chans

    # ---------------------------------------------------------------- model
    if args.family:
        import importlib

        from ..compat import canonical_family, from_official

        fam = canonical_family(args.family)
        kwargs_table = getattr(importlib.import_module(f"lkvision.compat.{fam}"), "MODEL_KWARGS", {})
        if cfg.model not in kwargs_table:
            raise ValueError(f"no official kwargs for model {cfg.model!r} in lkvision.compat.{fam}.MODEL_KWARGS "
                             f"(known: {sorted(kwargs_table)})")
        official_kwargs = {**kwargs_table[cfg.model], "num_classes": num_classes, "in_chans": in_chans}
        model = from_official(fam, str(ckpt), allow_pickle=args.allow_pickle, **official_kwargs)
    else:
        model = build_model(cfg, num_classes, in_chans)
        if weights is None:
            weights = load_state_dict_file(ckpt, allow_pickle=args.allow_pickle)
        try:
            load_weights(model, weights)
        except CheckpointError as e:
            if not args.deploy:
                raise CheckpointError(f"{e} (if this is a deploy-form checkpoint, pass --deploy)") from e
            # a deploy-form file (e.g. deploy.safetensors): re-parameterize the fresh model, then load
            from ..reparam import reparameterize

            model = reparameterize(model.eval(), inplace=True)
            load_weights(model, weights)
    model.to(info.device).eval()
    if args.deploy:
        from ..reparam import reparameterize

        model = reparameterize(model, inplace=True)  # idempotent on an already re-parameterized model
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.dtype == "bf16":
        from ..bench.roofline import bf16_speed_note

        if info.rank == 0 and (note := bf16_speed_note(info.device)):
            print(note, file=sys.stderr)
        model = _with_input_dtype(model, torch.bfloat16)
    sampler = ResumableSampler(len(val), False, 0, info.rank, info.world_size, pad=False)
    loader = make_loader(EpochSeededDataset(val, 0), args.batch_size, sampler, args.workers,
                         info.device.type == "cuda", drop_last=False)
    res = evaluate(model, loader, info.device, info, args.amp, args.channels_last, not args.no_progress)
    return {"checkpoint": str(ckpt), "model": cfg.model, "deploy": bool(args.deploy), "dtype": args.dtype,
            "data": cfg.data,
            "params_M": sum(p.numel() for p in model.parameters()) / 1e6, **res}
