"""Training configuration: one flat dataclass, YAML recipes (with ``base:`` inheritance), overrides.

Recipes live in ``lkvision/train/recipes/<name>.yaml``. A recipe may start with ``base: <other recipe>``;
its keys then override the base's. Every key must be a :class:`TrainConfig` field -- an unknown key is an
error that names it (with close matches). ``sparse`` is a nested mapping passed to
``lkvision.sparse.SparseConfig`` (``sparse.enabled: true`` turns sparse training on).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["TrainConfig", "ConfigError", "load_recipe", "list_recipes", "make_config", "parse_set",
           "RECIPE_DIR", "describe_fields", "sparse_keys"]

RECIPE_DIR = Path(__file__).parent / "recipes"


class ConfigError(ValueError):
    """A bad recipe / override (unknown key, wrong type, unknown recipe)."""


def _f(default, help: str, **kw):  # noqa: A002 - mirrors argparse naming
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class TrainConfig:
    # ---------------------------------------------------------------- model
    model: str = _f("sw_nano", "registered model name (lkvision.list_models())")
    model_kwargs: dict = _f({}, "extra keyword arguments for create_model")
    num_classes: int | None = _f(None, "classes (default: from the dataset)")
    in_chans: int | None = _f(None, "input channels (default: from the dataset; bundled digits: 1)")
    drop_path: float = _f(0.0, "stochastic-depth rate (linear over blocks); SW-T 0.2")
    finetune: str = _f("", "initial weights (.safetensors / .pth); the classifier is dropped on a class mismatch")
    # ---------------------------------------------------------------- data
    data: str = _f("bundled", "'bundled' (MNIST digits on a canvas, no download) or a folder with train/ and val/")
    train_subset: int | None = _f(None, "use only this many training images (quick runs / tests)")
    val_subset: int | None = _f(None, "use only this many validation images")
    bundled_distractors: int = _f(2, "bundled data: distractor fragments per canvas")
    input_size: int = _f(224, "training / eval image size (bundled: canvas size)")
    crop_pct: float = _f(0.875, "eval: resize to input_size/crop_pct then center-crop")
    interpolation: str = _f("bicubic", "resize interpolation")
    mean: list = _f([0.485, 0.456, 0.406], "normalization mean (image folders)")
    std: list = _f([0.229, 0.224, 0.225], "normalization std (image folders)")
    scale: list = _f([0.08, 1.0], "RandomResizedCrop scale range")
    ratio: list = _f([0.75, 1.3333333], "RandomResizedCrop aspect-ratio range")
    hflip: float = _f(0.5, "horizontal flip probability")
    color_jitter: float = _f(0.4, "color jitter (inactive when aa is set, as in timm)")
    aa: str = _f("rand-m9-mstd0.5-inc1", "timm auto-augment policy ('' = none)")
    reprob: float = _f(0.25, "RandomErasing probability")
    remode: str = _f("pixel", "RandomErasing mode")
    recount: int = _f(1, "RandomErasing count")
    mixup: float = _f(0.8, "mixup alpha (0 = off)")
    cutmix: float = _f(1.0, "cutmix alpha (0 = off)")
    mixup_prob: float = _f(1.0, "probability of applying mixup/cutmix to a batch")
    mixup_switch_prob: float = _f(0.5, "probability of cutmix instead of mixup when both are on")
    mixup_mode: str = _f("batch", "mixup mode: batch | pair | elem")
    smoothing: float = _f(0.1, "label smoothing")
    workers: int = _f(8, "DataLoader worker processes per rank")
    pin_mem: bool = _f(True, "pin host memory (CUDA only)")
    # ---------------------------------------------------------------- optimization
    epochs: int = _f(300, "training epochs")
    batch_size: int = _f(64, "batch size per process (per micro-batch)")
    update_freq: int = _f(1, "gradient accumulation steps per optimizer step")
    opt: str = _f("adamw", "optimizer: adamw | sgd")
    lr: float = _f(4e-3, "peak learning rate (at lr_base_batch when that is set)")
    lr_base_batch: int | None = _f(None, "if set: lr scales linearly with global batch / lr_base_batch")
    min_lr: float = _f(1e-6, "final learning rate of the cosine schedule")
    warmup_lr: float = _f(0.0, "learning rate at step 0 of the linear warm-up")
    warmup_epochs: float = _f(5.0, "linear warm-up length in epochs")
    warmup_steps: int | None = _f(None, "linear warm-up length in optimizer steps (overrides warmup_epochs)")
    weight_decay: float = _f(0.05, "AdamW weight decay (none on 1-D params and biases)")
    opt_eps: float = _f(1e-8, "optimizer epsilon")
    opt_betas: list = _f([0.9, 0.999], "AdamW betas")
    momentum: float = _f(0.9, "SGD momentum")
    clip_grad: float | None = _f(None, "clip the global gradient norm to this value (None = off)")
    layer_decay: float | None = _f(None, "layer-wise lr decay (RepLKNet fine-tuning uses 0.7; None = off)")
    layer_decay_block_group: int = _f(1, "layer decay: consecutive blocks sharing one lr group")
    # ---------------------------------------------------------------- model EMA
    ema: bool = _f(False, "keep an exponential moving average of the weights")
    ema_decay: float = _f(0.9999, "EMA decay per optimizer step")
    ema_eval: bool = _f(True, "also evaluate the EMA weights when ema is on")
    # ---------------------------------------------------------------- speed / memory
    amp: str = _f("none", "mixed precision: none | bf16 | fp16 (fp16 uses a grad scaler)")
    channels_last: bool = _f(False, "use channels_last memory format")
    grad_checkpointing: bool = _f(False, "activation checkpointing (model.set_grad_checkpointing)")
    compile: bool = _f(False, "torch.compile the training model")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    threads: int | None = _f(None, "torch.set_num_threads (CPU)")
    # ---------------------------------------------------------------- distributed
    sync_bn: bool = _f(False, "convert BatchNorm to SyncBatchNorm under DDP")
    dist_backend: str = _f("auto", "auto (nccl on GPU, gloo on CPU) | nccl | gloo")
    find_unused_parameters: bool = _f(False, "DDP find_unused_parameters")
    # ---------------------------------------------------------------- sparse training
    sparse: dict = _f({"enabled": False}, "sparse training: {enabled: true, ...lkvision.sparse.SparseConfig fields}")
    # ---------------------------------------------------------------- evaluation / reparam
    eval_every: int = _f(1, "evaluate every N epochs (0 = only at the end)")
    eval_start_epoch: int = _f(0, "first epoch (0-based) after which validation runs (SW: 70)")
    eval_batch_size: int | None = _f(None, "eval batch size (default: 2 x batch_size)")
    reparam_check: bool = _f(True, "at the end: re-parameterize, check deploy parity and evaluate the deploy form")
    # ---------------------------------------------------------------- output / checkpoints
    output: str = _f("runs/default", "output folder (checkpoints, metrics.csv/json, curves.png)")
    save_every_epochs: int = _f(1, "write a checkpoint every N epochs")
    save_every_steps: int = _f(0, "also write a checkpoint every N optimizer steps (mid-epoch resume; 0 = off)")
    keep_last: int = _f(3, "periodic checkpoints to keep (plus last and best)")
    resume: str = _f("", "'' | 'auto' (newest valid checkpoint in output) | path to a *.state.pt file")
    overwrite: bool = _f(False, "replace an existing run in output (its checkpoints, metrics, best/final weights)")
    max_steps: int | None = _f(None, "stop after this many optimizer steps in total (like a kill; for tests)")
    seed: int = _f(0, "random seed (data order, augmentation, init)")
    deterministic: bool = _f(False, "torch.use_deterministic_algorithms, no kernel choice by timing (autoselect off)")
    progress: bool = _f(True, "tqdm progress bars (rank 0)")
    log_every: int = _f(50, "log train loss/lr every N optimizer steps")
    plot: bool = _f(True, "write curves.png (matplotlib, Agg)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def describe_fields() -> str:
    """One line per recipe key: name, default, help (for ``lkvision train --help``)."""
    lines = []
    for f in dataclasses.fields(TrainConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        lines.append(f"  {f.name:<24} {f.metadata['help']} [default: {default!r}]")
    return "\n".join(lines)


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def _closest_hint(key: str, valid: list[str], prefix: str = "") -> str:
    """``"; did you mean 'sparse.sparsity'?"`` (close matches), else the single closest valid key."""
    close = difflib.get_close_matches(key, valid, n=3)
    if close:
        return "; did you mean " + ", ".join(repr(prefix + c) for c in close) + "?"
    nearest = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
    return f"; closest valid key: {prefix + nearest[0]!r}" if nearest else ""


def _unknown(key: str, where: str) -> ConfigError:
    return ConfigError(f"unknown recipe key {key!r} in {where}{_closest_hint(key, list(_FIELDS))} "
                       "(`lkvision train --help` lists the keys)")


def sparse_keys() -> list[str]:
    """The keys allowed under ``sparse:``: ``enabled`` plus every :class:`lkvision.sparse.SparseConfig` field."""
    from ..sparse import SparseConfig

    return ["enabled", *(f.name for f in dataclasses.fields(SparseConfig))]


def _check_nested(top: str, value: Any, where: str) -> None:
    """Unknown keys inside a nested mapping with a schema (``sparse``) are errors, at any depth.
    ``model_kwargs`` has no schema here: the model constructor checks it (see ``engine.build_model``)."""
    if top != "sparse" or not isinstance(value, dict):
        return
    valid = sparse_keys()
    for k, v in value.items():
        if k not in valid:
            full = f"sparse.{k}"
            raise ConfigError(f"unknown recipe key {full!r} in {where}{_closest_hint(k, valid, 'sparse.')} "
                              "(sparse keys are the lkvision.sparse.SparseConfig fields, see docs/sparse.md)")
        if isinstance(v, dict):  # no sparse option is itself a mapping
            raise ConfigError(f"recipe key 'sparse.{k}' in {where} takes a value, not a mapping ({v!r})")


def _load_yaml(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {' '.join(str(e).split())}") from e


def load_recipe(name_or_path: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a recipe (package name like ``sw_tiny_in1k`` or a path to a .yaml), resolving ``base:``."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = RECIPE_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown recipe {name_or_path!r}; available: {', '.join(list_recipes())}")
    if str(path) in _seen:
        raise ConfigError(f"recipe inheritance cycle: {' -> '.join(_seen + (str(path),))}")
    data = _load_yaml(path.read_text(), f"recipe {path}") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of key: value")
    base = data.pop("base", None)
    merged: dict[str, Any] = load_recipe(base, _seen + (str(path),)) if base else {}
    for k in data:
        if k not in _FIELDS:
            raise _unknown(k, str(path))
        _check_nested(k, data[k], str(path))
    for k, v in data.items():
        if k == "sparse" and isinstance(v, dict) and isinstance(merged.get("sparse"), dict):
            merged["sparse"] = {**merged["sparse"], **v}
        else:
            merged[k] = v
    return merged


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["lr=1e-3", "sparse.sparsity=0.3"]`` -> ``{"lr": 0.001, "sparse": {"sparsity": 0.3}}``.
    Values are parsed as YAML (numbers, booleans, lists ``[1,2]``, ``null``)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        value = _load_yaml(raw, f"--set {key}=...") if raw.strip() else ""
        if "." in key:
            top, sub = key.split(".", 1)
            if top not in _FIELDS or _FIELDS[top].default_factory is dataclasses.MISSING or not isinstance(
                    _FIELDS[top].default_factory(), dict):
                raise _unknown(key, "--set")
            out.setdefault(top, {})[sub] = value
            _check_nested(top, {sub: value}, "--set")
        else:
            if key not in _FIELDS:
                raise _unknown(key, "--set")
            out[key] = value
    return out


def _coerce(name: str, value: Any) -> Any:
    f = _FIELDS[name]
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if value is None:
        return None
    t = str(f.type)
    try:
        if isinstance(default, bool) or t.startswith("bool"):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if t.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if t.startswith("float"):
            return float(value)
        if t.startswith("str"):
            return str(value)
        if t.startswith("list"):
            if not isinstance(value, (list, tuple)):
                raise ValueError(value)
            return list(value)
        if t.startswith("dict"):
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"recipe key {name!r}: cannot use {value!r} as {t}") from e
    return value


def make_config(recipe: str | dict | None = "default", overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Recipe (name, path or dict) + overrides -> validated :class:`TrainConfig`."""
    data = load_recipe(recipe) if isinstance(recipe, str) else dict(recipe or {})
    for k, v in (overrides or {}).items():
        if k not in _FIELDS:
            raise _unknown(k, "overrides")
        _check_nested(k, v, "overrides")
        if k == "sparse" and isinstance(v, dict):
            data["sparse"] = {**(data.get("sparse") or {}), **v}
        else:
            data[k] = v
    for k in data:
        if k not in _FIELDS:
            raise _unknown(k, "recipe")
        _check_nested(k, data[k], "recipe")
    cfg = TrainConfig(**{k: _coerce(k, v) for k, v in data.items()})
    if cfg.amp not in ("none", "bf16", "fp16"):
        raise ConfigError(f"recipe key 'amp' must be none | bf16 | fp16, got {cfg.amp!r}")
    if cfg.opt not in ("adamw", "sgd"):
        raise ConfigError(f"recipe key 'opt' must be adamw | sgd, got {cfg.opt!r}")
    if cfg.batch_size < 1 or cfg.update_freq < 1 or cfg.epochs < 1:
        raise ConfigError("batch_size, update_freq and epochs must be >= 1")
    if cfg.layer_decay is not None and not 0 < cfg.layer_decay <= 1:
        raise ConfigError(f"layer_decay must be in (0, 1], got {cfg.layer_decay}")
    if cfg.overwrite and cfg.resume:
        raise ConfigError(f"--overwrite and --resume {cfg.resume} contradict each other: resume continues the run "
                          "in the output folder, overwrite deletes it")
    cfg.sparse = dict(cfg.sparse or {})
    cfg.sparse.setdefault("enabled", False)
    _check_sparse_values(cfg.sparse)
    return cfg


def _check_sparse_values(sparse: dict[str, Any]) -> None:
    """Build a :class:`lkvision.sparse.SparseConfig` from the options so a bad value fails here, not mid-run."""
    from ..sparse import SparseConfig

    try:
        opts = {k: v for k, v in sparse.items() if k != "enabled"}
        opts.setdefault("total_steps", 1)  # the engine fills in the real number of optimizer steps
        SparseConfig(**opts)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"recipe key 'sparse': {e}") from e
