"""Pretrained configurations and weight loading, the timm way, without importing timm.

Every family file ends with ``default_cfgs``: one :func:`pretrained_cfg` per ``model.tag`` (``sw_tiny.in1k``,
``unireplknet_s.in22k_ft_in1k_384``, ...) with timm's field names (input size, mean/std, crop, interpolation,
licence, paper and code links, and where the official weights live: ``hf_hub_id`` + ``hf_hub_filename`` for
files on the Hugging Face Hub, ``notes`` with the links for weights hosted elsewhere). The same dictionaries are
registered with timm (:mod:`lkvision._timm`), so ``timm.create_model(..., pretrained=True)`` and
``lkvision.create_model(..., pretrained=True)`` read the same file.

:func:`build_model_with_cfg` is the one builder behind every ``_create_<family>``: it resolves the cfg (a tag,
a dict, ``pretrained_cfg_overlay=dict(file=...)``), builds the model and, with ``pretrained``, loads the
weights through :func:`load_pretrained`: the file is read by :func:`lkvision.models.load_state_dict_file`
(safe loading, never unpickling code), official layouts are converted by the family's checkpoint filter (in
:mod:`lkvision.compat`), and every backbone tensor must be found (:func:`apply_state_dict`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from ._weights import CheckpointError, _fmt, load_state_dict_file

__all__ = ["pretrained_cfg", "resolve_pretrained_cfg", "build_model_with_cfg", "load_pretrained",
           "apply_state_dict", "drop_pruned", "adapt_input_conv", "cfg_for_features", "IMAGENET_DEFAULT_MEAN",
           "IMAGENET_DEFAULT_STD", "IMAGENET_INCEPTION_MEAN", "IMAGENET_INCEPTION_STD"]

_logger = logging.getLogger("lkvision.pretrained")

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
IMAGENET_INCEPTION_MEAN = (0.5, 0.5, 0.5)
IMAGENET_INCEPTION_STD = (0.5, 0.5, 0.5)

# timm's PretrainedCfg fields (timm/models/_pretrained.py); a cfg holds nothing else, so timm takes it as is.
_FIELDS = (
    "url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source", "architecture", "tag", "custom_load",
    "input_size", "test_input_size", "min_input_size", "fixed_input_size", "interpolation", "crop_pct",
    "test_crop_pct", "crop_mode", "mean", "std", "num_classes", "label_offset", "label_names",
    "label_descriptions", "pool_size", "test_pool_size", "first_conv", "classifier", "license", "description",
    "origin_url", "paper_name", "paper_ids", "notes",
)
_SOURCES = ("state_dict", "file", "hf_hub_id", "url")


def pretrained_cfg(**kwargs) -> dict:
    """A pretrained cfg with ImageNet defaults (224x224, bicubic, crop 0.875, ImageNet mean/std, 1000 classes,
    a 7x7 final map); keyword arguments (timm's field names) override them."""
    unknown = set(kwargs) - set(_FIELDS)
    if unknown:
        raise TypeError(f"unknown pretrained cfg fields {sorted(unknown)}; the fields are timm's: {_FIELDS}")
    cfg = dict(input_size=(3, 224, 224), interpolation="bicubic", crop_pct=0.875, crop_mode="center",
               mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, num_classes=1000, pool_size=(7, 7))
    cfg.update(kwargs)
    return cfg


def has_weights(cfg: Mapping) -> bool:
    """Whether a cfg names a weight source (timm's rule: ``url``, ``file`` or ``hf_hub_id``)."""
    return bool(cfg.get("url") or cfg.get("file") or cfg.get("hf_hub_id") or cfg.get("state_dict"))


def cfg_for_features(cfg: Mapping) -> dict:
    """The cfg of a ``features_only`` model: without the classifier fields (as timm does)."""
    return {k: v for k, v in cfg.items() if k not in ("num_classes", "classifier", "global_pool")}


def resolve_pretrained_cfg(variant: str, pretrained_cfg: str | Mapping | None = None,
                           pretrained_cfg_overlay: Mapping | None = None) -> dict:
    """The cfg a build uses: ``pretrained_cfg`` as a dict, or the registered cfg of ``variant`` with tag
    ``pretrained_cfg`` (default: the architecture's default tag), updated by ``pretrained_cfg_overlay``
    (e.g. ``dict(file="weights.pth")``)."""
    from ._registry import get_pretrained_cfg, split_model_name_tag

    arch, tag = split_model_name_tag(variant)
    if isinstance(pretrained_cfg, Mapping):
        cfg = dict(pretrained_cfg)
    else:
        tag = pretrained_cfg or tag
        cfg = get_pretrained_cfg(f"{arch}.{tag}" if tag else arch)
        if cfg is None:
            from ._registry import list_pretrained_tags

            raise ValueError(f"{arch!r} has no pretrained cfg {tag!r}; its tags: {list_pretrained_tags(arch)}")
    cfg.setdefault("architecture", arch)
    overlay = dict(pretrained_cfg_overlay or {})
    if any(overlay.get(k) for k in _SOURCES):  # an explicit source replaces the registered ones
        for k in ("url", "hf_hub_id", "hf_hub_filename", "file", "state_dict"):
            cfg.pop(k, None)
    cfg.update(overlay)
    return cfg


def build_model_with_cfg(
    model_cls: Callable[..., nn.Module],
    variant: str,
    pretrained: bool = False,
    pretrained_cfg: str | Mapping | None = None,
    pretrained_cfg_overlay: Mapping | None = None,
    pretrained_filter_fn: Callable[[dict, nn.Module], dict] | None = None,
    pretrained_strict: bool = True,
    cache_dir: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    **kwargs,
) -> nn.Module:
    """Build ``model_cls(**kwargs)`` for the registered ``variant`` and load its weights when ``pretrained``.

    The cfg supplies ``num_classes`` and ``in_chans`` unless given; the model gets ``pretrained_cfg`` and
    ``default_cfg``. ``pretrained_filter_fn(state_dict, model)`` converts official checkpoint layouts.
    ``allow_pickle``: see :func:`lkvision.models.load_state_dict_file` (only for files you trust).
    """
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg, pretrained_cfg_overlay)
    if cfg.get("num_classes") is not None and cfg["num_classes"] >= 0:
        kwargs.setdefault("num_classes", cfg["num_classes"])
    if cfg.get("input_size"):
        kwargs.setdefault("in_chans", cfg["input_size"][0])
    model = model_cls(**kwargs)
    model.pretrained_cfg = cfg_for_features(cfg) if kwargs.get("features_only") else cfg
    model.default_cfg = model.pretrained_cfg
    if pretrained:
        load_pretrained(model, cfg, filter_fn=pretrained_filter_fn, strict=pretrained_strict, cache_dir=cache_dir,
                        allow_pickle=allow_pickle)
    return model


def _fetch(cfg: Mapping, cache_dir, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """Read the state dict a cfg points to (``state_dict`` > ``file`` > Hugging Face Hub > ``url``)."""
    name = ".".join(x for x in (cfg.get("architecture"), cfg.get("tag")) if x)
    read_kw = {"allow_pickle": True} if allow_pickle else {}
    if cfg.get("state_dict") is not None:
        return dict(cfg["state_dict"])
    if cfg.get("file"):
        return load_state_dict_file(cfg["file"], **read_kw)
    if cfg.get("hf_hub_id"):
        try:
            from huggingface_hub import hf_hub_download
        except ImportError as e:
            raise ImportError(f"{name}: downloading from the Hugging Face Hub needs huggingface_hub "
                              "(pip install huggingface_hub)") from e
        repo, _, revision = cfg["hf_hub_id"].partition("@")
        filename = cfg.get("hf_hub_filename") or "model.safetensors"
        try:
            path = hf_hub_download(repo, filename, revision=revision or None, cache_dir=cache_dir)
        except Exception as e:  # noqa: BLE001 - offline, missing file, no access: re-raised with the remedy
            raise CheckpointError(
                f"{name}: could not get {filename!r} from the Hugging Face Hub repo {repo!r} "
                f"({type(e).__name__}: {e}); download it yourself and pass pretrained=<path>"
            ) from e
        return load_state_dict_file(path, **read_kw)
    if cfg.get("url"):
        directory = Path(cache_dir) if cache_dir else Path(torch.hub.get_dir()) / "checkpoints"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / os.path.basename(str(cfg["url"]).split("?")[0])
        if not path.exists():
            torch.hub.download_url_to_file(str(cfg["url"]), str(path), progress=False)
        return load_state_dict_file(path, **read_kw)
    notes = "".join(f"{n}. " for n in cfg.get("notes") or ())
    raise ValueError(
        f"no downloadable weights for {name or 'this model'}: {notes}Pass pretrained=<path to a weight file> "
        "(lkvision) or pretrained_cfg_overlay=dict(file=<path>) (lkvision and timm)"
    )


def adapt_input_conv(in_chans: int, weight: torch.Tensor) -> torch.Tensor:
    """Pretrained first-conv weight (O, 3, k, k) for ``in_chans`` inputs: summed over RGB for 1 channel,
    RGB repeated and rescaled (by 3 / in_chans) for more (timm's rule, so activations keep their scale)."""
    if weight.shape[1] == in_chans:
        return weight
    if weight.shape[1] != 3:
        raise CheckpointError(f"cannot adapt a first conv with {weight.shape[1]} input channels to {in_chans}")
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = -(-in_chans // 3)
    return weight.repeat(1, reps, 1, 1)[:, :in_chans] * (3 / in_chans)


def drop_pruned(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``state_dict`` without the parts ``model`` removed (``model.pruned_prefixes``: the stages after the last
    ``out_indices`` of a ``features_only`` model, its head): a full backbone checkpoint loads into a model that
    stops early. Names are lkvision's."""
    removed = tuple(getattr(model, "pruned_prefixes", ()))
    return {k: v for k, v in state_dict.items() if not k.startswith(removed)}


def apply_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True,
                     name: str = "checkpoint") -> None:
    """Load ``state_dict`` into ``model`` requiring every backbone tensor.

    Allowed differences (listed at info level): the classification head (``model.head_names``) missing from
    the file, or present in the file but absent from the model (``num_classes=0``, ``features_only``) or of
    another size (another ``num_classes``: the new classifier stays at its init); parts the model removed
    (``model.pruned_prefixes``: stages after the last ``out_indices``, filtered by :func:`drop_pruned`); the
    ``features_only`` per-output norms missing from a classification checkpoint. Anything else missing,
    unexpected or mis-shaped raises :class:`CheckpointError` naming the keys (``strict=False``: logged as a
    warning instead).
    """
    own = model.state_dict()
    heads = tuple(f"{h}." for h in getattr(model, "head_names", ()))
    new_parts = heads + ("feature_norms.",)
    sd = drop_pruned(state_dict, model)
    dropped = sorted(set(state_dict) - set(sd))
    shape_bad = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    for k in [k for k in shape_bad if k.startswith(heads)]:
        dropped.append(k)
        del sd[k]
    shape_bad = [k for k in shape_bad if k in sd]
    unexpected = sorted(set(sd) - set(own))
    head_extra = [k for k in unexpected if k.startswith(heads)]
    unexpected = [k for k in unexpected if not k.startswith(heads)]
    for k in head_extra:
        del sd[k]
    missing = sorted(set(own) - set(sd))
    fresh = [k for k in missing if k.startswith(new_parts) or k.endswith("num_batches_tracked")]
    missing = [k for k in missing if k not in fresh]
    if dropped or head_extra or fresh:
        _logger.info("%s: not loaded (head or removed parts): %s; left at init: %s", name,
                     _fmt(dropped + head_extra), _fmt(fresh))
    problems = []
    if shape_bad:
        problems.append("shape mismatch for " + "; ".join(
            f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in shape_bad[:12]))
    if missing:
        problems.append(f"backbone tensors missing from the checkpoint ({len(missing)} of "
                        f"{len(own) - len(fresh)}): {_fmt(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_fmt(unexpected)}")
    if problems:
        msg = f"{name} does not match {type(model).__name__}: " + " | ".join(problems)
        if strict:
            raise CheckpointError(msg)
        _logger.warning(msg)
    for k in shape_bad:
        del sd[k]
    model.load_state_dict(sd, strict=False)


def load_pretrained(model: nn.Module, cfg: Mapping | None = None,
                    filter_fn: Callable[[dict, nn.Module], dict] | None = None, strict: bool = True,
                    cache_dir: str | os.PathLike | None = None, allow_pickle: bool = False) -> nn.Module:
    """Load the weights ``cfg`` (default: ``model.pretrained_cfg``) points to: read safely, convert with
    ``filter_fn(state_dict, model)``, adapt the first conv to ``model.in_chans``, then
    :func:`apply_state_dict`."""
    cfg = dict(cfg if cfg is not None else getattr(model, "pretrained_cfg", {}))
    sd = _fetch(cfg, cache_dir, allow_pickle)
    source = cfg.get("file") or cfg.get("hf_hub_id") or cfg.get("url") or "state_dict"
    name = f"pretrained weights of {cfg.get('architecture', type(model).__name__)} ({source})"
    if filter_fn is not None:
        sd = filter_fn(sd, model)
    first = cfg.get("first_conv")
    in_chans = getattr(model, "in_chans", None)
    if first and in_chans and f"{first}.weight" in sd:
        sd[f"{first}.weight"] = adapt_input_conv(in_chans, sd[f"{first}.weight"])
    apply_state_dict(model, sd, strict=strict, name=name)
    return model
