"""Analysis tools: effective receptive field (``erf``), kernel maps and the SLaK -> Shiftwise layout
(``kernels``), filter sparsity (``sparsity``), shift-add coverage (``coverage``), params/FLOPs tables
(``flops``); figures in ``plotting``, sample images in ``images``. Sub-modules are imported on use."""

from __future__ import annotations

import importlib

__all__ = ["erf", "kernels", "sparsity", "coverage", "flops", "plotting", "images"]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
