"""Benchmarks: model inference / training-step throughput (``throughput``) and the depth-wise conv stack
micro-benchmark of RepLKNet Table 1 (``dwconv``). Sub-modules are imported on use."""

from __future__ import annotations

import importlib

__all__ = ["throughput", "dwconv", "baseline", "compare", "roofline", "precision"]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
