"""``torch.fx`` support: operators run as single graph nodes.

The public ops validate their arguments and pick an implementation with Python control flow on shapes, dtypes
and table values, which symbolic tracing cannot follow. :func:`fx_leaf` makes an op a leaf of the traced
graph (what ``torch.fx.wrap`` does for module globals, but bound to the function, so it holds however the op
is called): given an ``fx.Proxy`` argument, the wrapper records one ``call_function`` node; the traced
``GraphModule`` then calls the op with real tensors, checks included.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

__all__ = ["fx_leaf", "fx_traces_as"]

F = TypeVar("F", bound=Callable)


def _first_proxy(args: tuple, kwargs: dict) -> torch.fx.Proxy | None:
    """The first ``fx.Proxy`` among a call's arguments (None outside symbolic tracing)."""
    return next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.fx.Proxy)), None)


def fx_leaf(fn: F) -> F:
    """Decorator: ``fn`` is recorded as one node when traced with ``torch.fx`` (see the module docstring)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        proxy = _first_proxy(args, kwargs)
        if proxy is not None:
            return proxy.tracer.create_proxy("call_function", wrapper, args, kwargs)
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def fx_traces_as(reference: Callable) -> Callable[[F], F]:
    """Decorator for a fast path with a reference twin of the same signature: given an ``fx.Proxy`` argument,
    the reference runs instead, so ``torch.fx`` records its standard ops (the fast path branches on tensor
    layouts, dtypes and autograd state, which symbolic tracing cannot follow). Both compute the same function,
    so the traced graph computes what the eager model does."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if _first_proxy(args, kwargs) is not None:
                return reference(*args, **kwargs)
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
