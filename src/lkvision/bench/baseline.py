"""The plain-PyTorch execution path of lkvision's models: the in-process baseline of the speed benchmarks.

The official code of every family runs plain PyTorch ops: ``F.conv2d`` for the depth-wise convs, ``nn.Linear``
(``F.linear``) followed by a separate activation, GRN, SE and residual add, ``nn.Conv2d`` for 1x1 convs.
:func:`plain_pytorch` makes an lkvision model execute exactly that, with its own weights, by routing each of
lkvision's fast paths to its reference twin for the duration of a ``with`` block. Timing the same model inside
and outside the block, interleaved in one process, gives speed ratios that machine load affects equally on both
sides (``benchmarks/cpu_models.py``).

Every fast path listed in :data:`FAST_PATHS` is a module-level function with a reference twin of the same
signature; the parity tests check each pair. The swap is :func:`lkvision.utils.rebind` (re-exported here).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

from ..utils import rebind

__all__ = ["FAST_PATHS", "plain_pytorch", "rebind"]

#: (module, fast function, reference function): what :func:`plain_pytorch` swaps (besides ``dwconv2d``).
FAST_PATHS: tuple[tuple[str, str, str], ...] = (
    ("lkvision.ops.linear", "linear", "linear_reference"),
    ("lkvision.ops.dwconv", "dwconv2d_sum", "dwconv2d_sum_reference"),
    ("lkvision.ops.dwconv", "dwconv2d_dilated", "dwconv2d_dilated_reference"),
    ("lkvision.layers.pointwise", "pointwise_mlp", "pointwise_mlp_reference"),
    ("lkvision.layers.pointwise", "pointwise_conv", "pointwise_conv_reference"),
    ("lkvision.layers.norm", "grn", "grn_reference"),
    ("lkvision.layers.se", "se_scale", "se_scale_reference"),
    ("lkvision.layers.shiftwise", "select_channels", "select_channels_reference"),
    ("lkvision.layers.shiftwise", "join_channels", "join_channels_reference"),
    ("lkvision.layers.reparam_conv", "conv_act", "conv_act_reference"),
)


@contextlib.contextmanager
def plain_pytorch() -> Iterator[None]:
    """Run lkvision models on the plain PyTorch path (the official code's execution path) inside the block:
    depth-wise convs as ``F.conv2d`` (:func:`lkvision.export.plain_dwconv`) and every entry of
    :data:`FAST_PATHS` as its reference. Not thread-safe (it rebinds module attributes)."""
    from ..export import plain_dwconv

    pairs = []
    for module, fast, ref in FAST_PATHS:
        mod = importlib.import_module(module)
        pairs.append((getattr(mod, fast), getattr(mod, ref)))
    with plain_dwconv(), rebind(pairs):
        yield
