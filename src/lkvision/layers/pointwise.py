"""Fused point-wise parts of the blocks: the channels-last MLP and 1x1 convolutions.

Every ConvNeXt-style block (ConvNeXt, SLaK, UniRepLKNet, ShiftWise) ends in ``Linear -> act [-> GRN] -> Linear``
on an NHWC tensor, plus a residual add; RepLKNet's blocks are ``1x1 conv -> act`` pairs. :func:`pointwise_mlp`
and :func:`pointwise_conv` run them through :func:`lkvision.ops.linear` (oneDNN on CPU: bias, activation and
residual add fused, see ``docs/ops.md``) and fall back to exactly the plain PyTorch sequence elsewhere. Each has
a ``*_reference`` twin, the literal PyTorch computation, which the parity tests and the plain-PyTorch baseline
of the benchmarks (:func:`lkvision.bench.baseline.plain_pytorch`) use.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops._fx import fx_traces_as
from ..ops.linear import linear
from .drop import DropPath
from .norm import GRN, grn

__all__ = ["pointwise_mlp", "pointwise_mlp_reference", "pointwise_conv", "pointwise_conv_reference",
           "fusable_act", "passes_through"]


def fusable_act(act: nn.Module | None) -> str | None | bool:
    """The :func:`lkvision.ops.linear` name of an activation module (None for identity), or False when it
    cannot be fused (then the module is applied after the linear)."""
    if act is None or isinstance(act, nn.Identity):
        return None
    if type(act) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate, False)
    if type(act) is nn.ReLU:
        return "relu"
    return False


def passes_through(*modules: nn.Module) -> bool:
    """True when every module is the identity in the current mode (``nn.Identity``, or a ``DropPath`` in eval
    mode or with rate 0): then a block's residual add may be fused into its last linear."""
    return all(isinstance(m, nn.Identity) or (isinstance(m, DropPath) and (not m.training or m.drop_prob == 0))
               for m in modules)


def _apply_act(y: Tensor, act: nn.Module | None) -> Tensor:
    return y if act is None else act(y)


def pointwise_mlp_reference(x: Tensor, fc1: nn.Linear, act: nn.Module | None, fc2: nn.Linear,
                            grn_layer: GRN | None = None, residual: Tensor | None = None) -> Tensor:
    """``fc2(grn(act(fc1(x)))) + residual`` with the modules' own forwards (the official computation)."""
    y = _apply_act(fc1(x), act)
    if grn_layer is not None:
        y = grn_layer(y)
    y = fc2(y)
    return y if residual is None else y + residual


@fx_traces_as(pointwise_mlp_reference)
def pointwise_mlp(x: Tensor, fc1: nn.Linear, act: nn.Module | None, fc2: nn.Linear,
                  grn_layer: GRN | None = None, residual: Tensor | None = None) -> Tensor:
    """The channels-last MLP of a ConvNeXt-style block: ``fc2(grn(act(fc1(x)))) + residual``.

    Args:
        x: (B, H, W, C) (any (..., C) for ``grn_layer=None``), best contiguous (an NHWC view of a
            channels_last tensor is).
        fc1: Linear C -> D; act: activation module (GELU/ReLU are fused into fc1, others applied after);
        fc2: Linear D -> C'; grn_layer: optional :class:`~lkvision.layers.GRN` over D (NHWC input).
        residual: optional (B, H, W, C') added at the end (fused into fc2 when possible).

    Returns:
        (B, H, W, C'), contiguous.
    """
    name = fusable_act(act)
    if name is False:
        y = act(linear(x, fc1.weight, fc1.bias))
    else:
        y = linear(x, fc1.weight, fc1.bias, act=name)
    if grn_layer is not None:
        y = grn(y, grn_layer.gamma, grn_layer.beta if grn_layer.use_bias else None, grn_layer.eps,
                inplace=not torch.is_grad_enabled())
    return linear(y, fc2.weight, fc2.bias, residual=residual)


def _is_pointwise(conv: nn.Conv2d) -> bool:
    return (conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding in ((0, 0), "valid")
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


def pointwise_conv_reference(x: Tensor, conv: nn.Conv2d, act: nn.Module | None = None,
                             residual: Tensor | None = None) -> Tensor:
    """``act(conv(x)) + residual`` with the modules' own forwards."""
    y = _apply_act(conv(x), act)
    return y if residual is None else y + residual


@fx_traces_as(pointwise_conv_reference)
def pointwise_conv(x: Tensor, conv: nn.Conv2d, act: nn.Module | None = None,
                   residual: Tensor | None = None) -> Tensor:
    """``act(conv(x)) + residual`` for a conv module; a 1x1, stride-1, ungrouped conv runs as a channels-last
    :func:`lkvision.ops.linear` (oneDNN inner product with the bias, activation or residual fused), others
    as the module itself.

    Shapes: x (B, C, H, W) -> (B, C', H, W); the 1x1 path returns a channels_last tensor (the NHWC matrix the
    GEMM writes); residual (B, C', H, W) in any layout.
    """
    if not _is_pointwise(conv) or x.dim() != 4:
        return pointwise_conv_reference(x, conv, act, residual)
    name = fusable_act(act)
    nhwc = x.permute(0, 2, 3, 1)
    w = conv.weight.reshape(conv.out_channels, conv.in_channels)
    if name is False:
        y = act(linear(nhwc, w, conv.bias)).permute(0, 3, 1, 2)
        return y if residual is None else y + residual
    res = None if residual is None else residual.permute(0, 2, 3, 1)
    return linear(nhwc, w, conv.bias, act=name, residual=res).permute(0, 3, 1, 2)
