"""Model registry (timm-style): ``register_model``, ``create_model``, ``list_models``, ``list_pretrained``.

Families are discovered, not listed: every public module of :mod:`lkvision.models` (``shiftwise.py``,
``replknet.py``, ...) is a family and is imported on first registry use, so ``import lkvision`` stays light.
A family module registers its entry points with :func:`register_model`; the pretrained cfgs of an entry point
are the module's ``default_cfgs`` entries ``"<name>.<tag>"`` (the first one with weights is the default tag).
:mod:`lkvision._timm` mirrors the registry into timm's (:func:`add_registration_listener`).
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import importlib
import os
import pkgutil
import sys
from collections.abc import Callable, Mapping

from torch import nn

__all__ = ["register_model", "create_model", "list_models", "list_pretrained", "list_pretrained_tags",
           "model_entrypoint", "get_pretrained_cfg", "split_model_name_tag", "families", "family_of",
           "add_registration_listener"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_FAMILY_OF: dict[str, str] = {}
_CFGS: dict[str, dict[str, dict]] = {}  # name -> {tag: cfg}, default tag first
_LISTENERS: list[Callable[[str, Callable[..., nn.Module]], None]] = []
_loaded = False


def split_model_name_tag(model_name: str) -> tuple[str, str]:
    """``"unireplknet_s.in22k_ft_in1k_384"`` -> ``("unireplknet_s", "in22k_ft_in1k_384")``."""
    arch, _, tag = model_name.partition(".")
    return arch, tag


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a model entry point under its function name, with its module's ``default_cfgs``."""
    name = fn.__name__
    if name in _MODELS and _MODELS[name] is not fn:
        raise ValueError(f"model {name!r} is registered twice")
    module = sys.modules.get(fn.__module__)
    cfgs = {}
    for key, cfg in getattr(module, "default_cfgs", {}).items():
        arch, tag = split_model_name_tag(key)
        if arch == name:
            cfgs[tag] = dict(cfg, architecture=name, tag=tag or None)
    from ._pretrained import has_weights

    default = next((t for t, c in cfgs.items() if has_weights(c)), next(iter(cfgs), None))
    _CFGS[name] = {default: cfgs[default], **cfgs} if default is not None else {}
    _MODELS[name] = fn
    _FAMILY_OF[name] = fn.__module__.rsplit(".", 1)[-1]
    for listener in _LISTENERS:
        listener(name, fn)
    return fn


def add_registration_listener(fn: Callable[[str, Callable[..., nn.Module]], None]) -> None:
    """Call ``fn(name, entrypoint)`` for every model registered from now on (used to mirror into timm)."""
    _LISTENERS.append(fn)


def families() -> list[str]:
    """Names of the family modules of :mod:`lkvision.models` (every public module is one)."""
    from . import __path__ as models_path

    return sorted(m.name for m in pkgutil.iter_modules(models_path) if not m.name.startswith("_"))


def _load_families() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for fam in families():
        importlib.import_module(f"lkvision.models.{fam}")


def family_of(model_name: str) -> str:
    """The family module of a registered model (``"sw_tiny"`` -> ``"shiftwise"``)."""
    model_entrypoint(model_name)
    return _FAMILY_OF[split_model_name_tag(model_name)[0]]


def list_models(filter: str = "*", pretrained: bool = False, include_tags: bool = False) -> list[str]:  # noqa: A002
    """Sorted names of registered models matching the shell-style ``filter``.

    ``pretrained``: only models (or, with ``include_tags``, ``model.tag`` names) with downloadable or local
    weights; ``include_tags``: list every ``model.tag`` of the pretrained cfgs instead of the model names.
    """
    _load_families()
    from ._pretrained import has_weights

    out = []
    for name in _MODELS:
        cfgs = _CFGS.get(name) or {"": {}}
        if include_tags:
            cand = [(f"{name}.{t}" if t else name, c) for t, c in cfgs.items()]
        else:
            cand = [(name, next((c for c in cfgs.values() if has_weights(c)), None) if pretrained else {})]
        out += [n for n, c in cand if fnmatch.fnmatch(n, filter) and (not pretrained or (c and has_weights(c)))]
    return sorted(set(out))


def list_pretrained(filter: str = "*") -> list[str]:  # noqa: A002
    """``model.tag`` names whose cfg points to weights (Hugging Face Hub, URL or a local file)."""
    return list_models(filter, pretrained=True, include_tags=True)


def list_pretrained_tags(model_name: str) -> list[str]:
    """The tags of a model's pretrained cfgs (default first)."""
    model_entrypoint(model_name)
    return list(_CFGS.get(split_model_name_tag(model_name)[0], {}))


def get_pretrained_cfg(model_name: str) -> dict | None:
    """A copy of the cfg of ``model.tag`` (without a tag: the default one), or None."""
    _load_families()
    arch, tag = split_model_name_tag(model_name)
    cfgs = _CFGS.get(arch, {})
    cfg = cfgs.get(tag) if tag else next(iter(cfgs.values()), None)
    return copy.deepcopy(cfg) if cfg is not None else None


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    _load_families()
    arch = split_model_name_tag(name)[0]
    if arch not in _MODELS:
        close = difflib.get_close_matches(arch, list(_MODELS), n=8, cutoff=0.5)
        close = close or [n for n in sorted(_MODELS) if n.split("_")[0] == arch.split("_")[0]][:8]
        raise ValueError(f"unknown model {name!r}; similar: {close or list_models()[:10]} "
                         "(lkvision.list_models() lists all)")
    return _MODELS[arch]


def create_model(
    model_name: str,
    pretrained: bool | str | os.PathLike = False,
    *,
    pretrained_cfg: str | Mapping | None = None,
    pretrained_cfg_overlay: Mapping | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    **kwargs,
) -> nn.Module:
    """Build a registered model, optionally with weights.

    ``model_name``: a registered name, optionally with a pretrained tag (``"unireplknet_s.in22k_ft_in1k_384"``).
    ``pretrained``: ``False``; ``True`` (the weights of the model's pretrained cfg: downloaded from the
    Hugging Face Hub and cached, or ``pretrained_cfg_overlay=dict(file=...)``); or a path to a local file
    (lkvision ``.safetensors`` or an official checkpoint, converted on the fly). ``kwargs`` go to the model
    constructor (``num_classes``, ``in_chans``, ``global_pool``, ``drop_rate``, ``drop_path_rate``,
    ``features_only``, ``out_indices``, ``device``, ``dtype``, ...). ``allow_pickle``: let a torch checkpoint
    hold pickled Python objects beyond the allowed types (only for files you trust).
    """
    arch, tag = split_model_name_tag(model_name)
    if tag and pretrained_cfg is None:
        pretrained_cfg = tag
    if isinstance(pretrained, (str, os.PathLike)) and not isinstance(pretrained, bool):
        pretrained_cfg_overlay = {**(pretrained_cfg_overlay or {}), "file": os.fspath(pretrained)}
        pretrained = True
    extra = dict(pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=pretrained_cfg_overlay, cache_dir=cache_dir,
                 allow_pickle=allow_pickle or None)
    return model_entrypoint(arch)(pretrained=bool(pretrained), **{k: v for k, v in extra.items() if v}, **kwargs)
