"""lkvision's models in timm's registry: ``import lkvision`` and ``timm.create_model("sw_tiny")`` works.

``import lkvision`` calls :func:`install`: if timm is already imported, every lkvision model is registered with
timm at once; otherwise a one-shot import hook waits for ``import timm`` and registers them right after timm
has loaded (so ``import lkvision`` stays cheap and never imports timm). The hook also applies
:func:`lkvision.data._compat.ensure_torchvision` before timm loads, so ``import timm`` works where torchvision's
C++ operators cannot load. Models registered later (``lkvision.register_model``) follow automatically.

What timm sees, per lkvision model (a name timm already uses gets the prefix ``lkv_``: ``lkv_resnet50``):

* an entry point in the module ``lkvision_<family>`` (``timm.list_models(module="lkvision_shiftwise")``);
* the model's pretrained cfgs (``default_cfgs`` of its family file), so ``timm.list_pretrained()``,
  ``pretrained_cfg`` tags (``"unireplknet_s.in22k_ft_in1k_384"``) and ``pretrained_cfg_overlay`` work.

The entry point builds through lkvision (:func:`lkvision.create_model`): weights are read with lkvision's safe
loader and converted by the family's checkpoint filter. ``features_only=True`` builds the model in lkvision's
``features_only`` mode and wraps it in timm's feature machinery: ``feature_cls="getter"`` (default:
:class:`timm.models.FeatureGetterNet` over ``forward_intermediates``; ``feature_cfg=dict(norm=True)`` keeps the
per-output norms of the official detection/segmentation backbones) or ``"fx"`` (FX graph extraction).
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys
import types
import warnings
from collections.abc import Callable

from torch import nn

__all__ = ["install", "register_all", "timm_name"]

_TIMM_NAMES: dict[str, str] = {}  # lkvision name -> timm name
_listening = False


def timm_name(name: str) -> str | None:
    """The name under which lkvision model ``name`` is registered with timm (None if it is not)."""
    return _TIMM_NAMES.get(name)


def _family_module(family: str) -> types.ModuleType:
    """The module timm files lkvision's ``family`` models under (timm reads its ``default_cfgs``)."""
    name = f"{__name__}.lkvision_{family}"
    mod = sys.modules.get(name)
    if mod is None:
        mod = types.ModuleType(name, f"timm registry module of lkvision's {family} models (lkvision._timm)")
        mod.default_cfgs = {}
        mod.__all__ = []
        sys.modules[name] = mod
    return mod


@functools.lru_cache(maxsize=1)
def _feature_getter_cls() -> type:
    """timm's ``FeatureGetterNet`` plus ``set_grad_checkpointing`` (passed to the wrapped lkvision model)."""
    from timm.models._features import FeatureGetterNet

    class LkvFeatureGetterNet(FeatureGetterNet):
        def set_grad_checkpointing(self, enable: bool = True) -> None:
            self.model.set_grad_checkpointing(enable)

    return LkvFeatureGetterNet


def _create(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """timm's call of an lkvision entry point: lkvision builds; ``features_only`` goes through timm's wrappers."""
    from .models import create_model
    from .models._pretrained import cfg_for_features

    cfg = kwargs.pop("pretrained_cfg", None)
    if cfg is not None and hasattr(cfg, "to_dict"):  # a timm PretrainedCfg
        cfg = cfg.to_dict()
    if cfg:
        kwargs["pretrained_cfg"] = cfg
    if not kwargs.pop("features_only", False):
        return create_model(name, pretrained=pretrained, **kwargs)

    from timm.models._features import FeatureGetterNet

    feature_cfg = dict(kwargs.pop("feature_cfg", None) or {})
    for key in ("out_indices", "feature_cls"):
        if key in kwargs:
            feature_cfg[key] = kwargs.pop(key)
    feature_cls = feature_cfg.pop("feature_cls", "getter")
    out_indices = feature_cfg.pop("out_indices", None)
    for key in ("flatten_sequential", "no_rewrite", "output_fmt"):  # options of timm's other wrappers
        feature_cfg.pop(key, None)
    if feature_cls in ("getter", FeatureGetterNet):
        model = create_model(name, pretrained=pretrained, features_only=True, out_indices=out_indices, **kwargs)
        wrapped = _feature_getter_cls()(model, out_indices=model.out_indices, **feature_cfg)
    elif feature_cls == "fx" or getattr(feature_cls, "__name__", None) == "FeatureGraphNet":
        from timm.models._features_fx import FeatureGraphNet

        model = create_model(name, pretrained=pretrained, **kwargs)
        wrapped = FeatureGraphNet(model, out_indices=(0, 1, 2, 3) if out_indices is None else out_indices,
                                  **feature_cfg)
    else:
        raise ValueError(
            f"feature_cls={feature_cls!r} is not supported for lkvision models: their downsampling layers sit "
            "between the stage modules, which timm's 'list'/'dict'/'hook' wrappers cannot follow; use "
            "'getter' (default) or 'fx'"
        )
    wrapped.pretrained_cfg = wrapped.default_cfg = cfg_for_features(model.pretrained_cfg)
    wrapped.in_chans = model.in_chans
    return wrapped


def _register(name: str, fn: Callable[..., nn.Module]) -> str | None:
    """Register lkvision model ``name`` (entry point ``fn``) with timm; returns the timm name."""
    from timm.models import _registry as tr
    from timm.models import generate_default_cfgs

    from .models._registry import _CFGS, family_of

    if name in _TIMM_NAMES:
        return _TIMM_NAMES[name]
    tname = f"lkv_{name}" if name in tr._model_entrypoints else name
    if tname in tr._model_entrypoints:
        return None
    mod = _family_module(family_of(name))
    cfgs = {(f"{tname}.{tag}" if tag else tname): dict(cfg) for tag, cfg in _CFGS.get(name, {}).items()}
    mod.default_cfgs.update(generate_default_cfgs(cfgs))

    def entry(pretrained: bool = False, **kwargs) -> nn.Module:
        return _create(name, pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = tname
    entry.__module__ = mod.__name__
    entry.__doc__ = fn.__doc__
    setattr(mod, tname, entry)
    tr.register_model(entry)
    _TIMM_NAMES[name] = tname
    return tname


def register_all() -> list[str]:
    """Register every lkvision model with timm (imports timm); returns the timm names. Idempotent."""
    global _listening
    import timm  # noqa: F401  (raises ImportError if timm is absent)

    from .models._registry import _MODELS, add_registration_listener, list_models

    if not _listening:
        _listening = True
        add_registration_listener(lambda name, fn: _register(name, fn))
    names = [_register(n, _MODELS[n]) for n in list_models()]
    return sorted(n for n in names if n)


class _RegisterAfterTimm(importlib.abc.Loader):
    """Wraps timm's loader: ``ensure_torchvision`` before timm runs, :func:`register_all` after."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        from .data._compat import ensure_torchvision

        try:
            ensure_torchvision()
        except Exception:  # noqa: BLE001 - torchvision absent or broken: timm's own import reports it
            pass
        module.__loader__ = module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        _remove_hook()  # timm is loaded: the hook has done its job
        try:
            register_all()
        except Exception as e:  # noqa: BLE001 - never break `import timm`; say why the models are missing
            warnings.warn(f"lkvision: could not register its models with timm: {type(e).__name__}: {e}",
                          stacklevel=2)

    def __getattr__(self, item: str):  # resource readers, is_package, get_code, ...
        return getattr(self._loader, item)


class _TimmImportHook(importlib.abc.MetaPathFinder):
    """Finder for ``timm`` that hands back timm's own spec with its loader wrapped.

    It stays installed until timm is actually executed (:meth:`_RegisterAfterTimm.exec_module` removes it):
    libraries probe for timm with ``importlib.util.find_spec("timm")`` without importing it (transformers does,
    and mmengine imports transformers), and a hook that removed itself on the first lookup would miss the real
    import that follows. ``_busy`` keeps the hook's own look-up of timm's spec from recursing into itself.
    """

    _busy = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm" or self._busy:
            return None
        self._busy = True
        try:
            spec = importlib.util.find_spec("timm")  # the other finders' spec (this one answers None meanwhile)
        finally:
            self._busy = False
        if spec is None or spec.loader is None:
            return None
        if not isinstance(spec.loader, _RegisterAfterTimm):  # never wrap twice
            spec.loader = _RegisterAfterTimm(spec.loader)
        return spec


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TimmImportHook)]


def install() -> None:
    """Register with timm now if it is imported, else when it is (called by ``import lkvision``)."""
    if "timm" in sys.modules and getattr(sys.modules["timm"], "create_model", None) is not None:
        try:
            register_all()
        except Exception as e:  # noqa: BLE001 - lkvision must import even if timm is broken
            warnings.warn(f"lkvision: could not register its models with timm: {type(e).__name__}: {e}",
                          stacklevel=2)
        return
    if not any(isinstance(f, _TimmImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _TimmImportHook())
