"""Model registry: ``create_model`` / ``list_models`` (timm-style), plus timm registration."""

from __future__ import annotations

import fnmatch
import importlib
import os
import sys
from collections.abc import Callable

from torch import nn

__all__ = ["register_model", "create_model", "list_models", "register_with_timm", "model_entrypoint"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_FAMILY_OF: dict[str, str] = {}
_TIMM_NAMES: dict[str, str] = {}  # lkvision name -> name registered with timm
# timm's loader options, passed by timm.create_model; lkvision models do not take them
_TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "pretrained_strict")

# Every family module; imported on first registry use so that `import lkvision` stays light.
_FAMILY_MODULES = ("shiftwise", "replknet", "unireplknet", "slak", "convnext", "mobilenetv2", "resnet")
_loaded = False


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a model entry point under its function name."""
    name = fn.__name__
    if name in _MODELS and _MODELS[name] is not fn:
        raise ValueError(f"model {name!r} is registered twice")
    _MODELS[name] = fn
    _FAMILY_OF[name] = fn.__module__.rsplit(".", 1)[-1]
    if "timm" in sys.modules:
        _register_one_with_timm(name, fn)
    return fn


def _load_families() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for fam in _FAMILY_MODULES:
        try:
            importlib.import_module(f"lkvision.models.{fam}")
        except ModuleNotFoundError as e:  # a family not written yet; anything else is a real error
            if e.name != f"lkvision.models.{fam}":
                raise


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of registered models matching a shell-style ``pattern``."""
    _load_families()
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    _load_families()
    if name not in _MODELS:
        close = [n for n in _MODELS if name.split("_")[0] in n][:8]
        raise ValueError(f"unknown model {name!r}; similar: {close or list_models()[:10]}")
    return _MODELS[name]


def create_model(name: str, pretrained: bool | str | os.PathLike = False, **kwargs) -> nn.Module:
    """Build a registered model.

    ``pretrained``: ``False``; or a local path to weights in lkvision format (``.safetensors`` or a torch
    checkpoint). Official checkpoints go through :func:`lkvision.compat.from_official` (or
    ``lkvision convert``). ``kwargs`` go to the model constructor (``num_classes``, ``drop_path_rate``,
    ``features_only``, ``out_indices``, ...).
    """
    model = model_entrypoint(name)(**kwargs)
    if pretrained is True:
        raise ValueError(
            f"no hosted weights for {name!r}: pass pretrained=<path to a .safetensors/.pth file>; "
            "official checkpoints are converted with `lkvision convert`"
        )
    if pretrained:
        from ._weights import load_weights

        load_weights(model, pretrained, strict=not kwargs.get("features_only", False))
    return model


def _register_one_with_timm(name: str, fn: Callable[..., nn.Module]) -> str | None:
    try:
        from timm.models import _registry as tr
    except Exception:  # noqa: BLE001 - timm missing or broken: nothing to register
        return None
    if _TIMM_NAMES.get(name):
        return _TIMM_NAMES[name]
    timm_name = name if name not in tr._model_entrypoints else f"lkv_{name}"
    if timm_name in tr._model_entrypoints:
        return None

    def _entry(pretrained: bool = False, **kwargs):
        for key in _TIMM_ONLY_KWARGS:
            kwargs.pop(key, None)
        if pretrained is True:
            raise ValueError(f"no hosted weights for {name!r}; use lkvision.create_model({name!r}, pretrained=PATH)")
        return create_model(name, pretrained=pretrained or False, **kwargs)

    _entry.__name__ = timm_name
    _entry.__module__ = "lkvision.models"
    tr.register_model(_entry)
    _TIMM_NAMES[name] = timm_name
    return timm_name


def register_with_timm() -> list[str]:
    """Register every lkvision model with timm (``timm.create_model('sw_tiny')``). Returns the timm names.

    Called automatically when timm is already imported; names that timm already uses get a ``lkv_`` prefix.
    """
    import timm  # noqa: F401  (raises ImportError if timm is absent)

    names = [_register_one_with_timm(name, _MODELS[name]) for name in list_models()]
    return sorted(n for n in names if n)
