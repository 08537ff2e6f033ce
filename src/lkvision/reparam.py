"""Whole-model structural re-parameterisation."""

from __future__ import annotations

import copy

from torch import nn

__all__ = ["reparameterize", "has_reparam_layers"]


def _walk(module: nn.Module, root: nn.Module) -> None:
    for child in list(module.children()):
        _walk(child, root)
    # A whole model's own reparameterize() is this walk (it calls back here), so skip it for the root;
    # a lone layer passed as the root (e.g. reparameterize(StripConv(...))) is merged like any child.
    if module is root and getattr(type(module), "reparameterize_is_walk", False):
        return
    fn = getattr(module, "reparameterize", None)
    if callable(fn):
        fn()


def reparameterize(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Return the deploy form of ``model``: every layer's ``reparameterize()`` is called bottom-up
    (children before parents), so a block can fold into layers that are already merged.

    The result computes the same function as ``model`` in ``eval()`` mode (up to fp rounding) and is
    put in ``eval()`` mode. With ``inplace=False`` (default) ``model`` is deep-copied first.
    """
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    _walk(model, model)
    return model


def has_reparam_layers(model: nn.Module) -> bool:
    return any(callable(getattr(m, "reparameterize", None)) for m in model.modules() if m is not model)
