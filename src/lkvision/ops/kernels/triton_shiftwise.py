"""Fused Triton kernel for the folded Shiftwise (SW) layer (SW.md §2, "equivalent large-kernel view").

With the shift-add op folded into depth-wise kernels, one SW layer on the rep channels is

    H = x (*) kh   kh (R, 1, k, L), padded (left=mid, right=L-1-mid, top=k//2, bottom=k//2)
    V = x (*) kv   kv (R, 1, L, k), padded (left=k//2, right=k//2, top=mid, bottom=L-1-mid)
    S = x (*) ks   ks (R, 1, k, k), 'same'

with L = k * ceil(M / k), mid = M // 2 (M = ``big_kernel``; paddings from :func:`lkvision.ops.strip_paddings`).
:func:`fused_strips` computes the three
terms in ONE kernel launch (each output tile reads its input window once through the cache and is written
once):

* ``separate=True`` (training: three BNs follow): returns (H, V, S);
* ``separate=False`` (eval/deploy, BN folded into kh/kv/ks/bias): returns ``H + V + S + x + bias``.

Backward: the input gradient is the same fused kernel on the output gradient(s) with flipped kernels and
complementary offsets (plus the identity term for the deploy form); the three weight gradients use the
deterministic two-stage reduction kernel of :mod:`.triton_dwconv`. Differentiable through the custom ops
``lkvision::triton_shiftwise`` (separate) and ``lkvision::triton_shiftwise_fused`` (deploy form); PyTorch
fallback when the kernels cannot run on the input's device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..shift_add import strip_paddings
from . import _common
from ._common import (
    SUPPORTED_DTYPES,
    autocast_inputs,
    is_channels_last,
    memory_format_of,
    run_guarded,
    same_device_reason,
)
from .triton_dwconv import _grad_input_terms, _use_kernels, dwconv2d_reference, dwconv_forward_terms, launch_reason

__all__ = ["fused_strips", "fused_strips_reference", "can_run"]


def _term_paddings(kh: Tensor, big_kernel: int) -> list[list[int]]:
    """F.pad-style (left, right, top, bottom) paddings of the horizontal, vertical and small terms."""
    k, strip_len = kh.shape[2], kh.shape[3]
    pad_h, pad_v = strip_paddings(big_kernel, k, strip_len)
    return [list(pad_h), list(pad_v), [k // 2] * 4]


def _check(x: Tensor, kh: Tensor, kv: Tensor, ks: Tensor, bias: Tensor | None, big_kernel: int,
           small_kernel: int) -> None:
    if x.dim() != 4:
        raise ValueError(f"fused_strips: expected x of shape (B, R, H, W), got {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"fused_strips: unsupported dtype {x.dtype}; use float32/float16/bfloat16")
    r = x.shape[1]
    k = small_kernel
    if k % 2 != 1:
        raise ValueError(f"fused_strips: small_kernel must be odd, got {k}")
    if kh.dim() != 4 or kh.shape[0] != r or kh.shape[1] != 1 or kh.shape[2] != k:
        raise ValueError(f"fused_strips: kh must have shape ({r}, 1, {k}, L), got {tuple(kh.shape)}")
    strip_len = kh.shape[3]
    if tuple(kv.shape) != (r, 1, strip_len, k):
        raise ValueError(f"fused_strips: kv must have shape ({r}, 1, {strip_len}, {k}), got {tuple(kv.shape)}")
    if tuple(ks.shape) != (r, 1, k, k):
        raise ValueError(f"fused_strips: ks must have shape ({r}, 1, {k}, {k}), got {tuple(ks.shape)}")
    if not 0 <= big_kernel // 2 < strip_len:
        raise ValueError(f"fused_strips: big_kernel={big_kernel} needs mid={big_kernel // 2} < L={strip_len}")
    if bias is not None and tuple(bias.shape) != (r,):
        raise ValueError(f"fused_strips: bias must have shape ({r},), got {tuple(bias.shape)}")


def _offsets(kh: Tensor, big_kernel: int) -> list[tuple[int, int]]:
    """(top, left) offsets of the three terms."""
    return [(left_right_top_bottom[2], left_right_top_bottom[0])
            for left_right_top_bottom in _term_paddings(kh, big_kernel)]


def fused_strips_reference(x: Tensor, kh: Tensor, kv: Tensor, ks: Tensor, bias: Tensor | None,
                               big_kernel: int, separate: bool = True):
    """Three depth-wise ``F.conv2d`` calls (the PyTorch definition the kernel must match)."""
    ph, pv, ps = _term_paddings(kh, big_kernel)
    h = dwconv2d_reference(x, kh, None, ph)
    v = dwconv2d_reference(x, kv, None, pv)
    s = dwconv2d_reference(x, ks, None, ps)
    if separate:
        return h, v, s
    out = h + v + s + x
    if bias is not None:
        out = out + bias.to(out.dtype).view(1, -1, 1, 1)
    return out


def can_run(x: Tensor, kh: Tensor, kv: Tensor, ks: Tensor, bias: Tensor | None, big_kernel: int,
            small_kernel: int = 3, *, separate: bool = True, needs_grad: bool = False) -> str | None:
    """Why :func:`fused_strips` cannot run its Triton kernels on this problem, or None when it can
    (platform, devices, shapes, and the launch limits of the forward and, with ``needs_grad``, backward kernels;
    see :func:`lkvision.ops.kernels.triton_dwconv.can_run`)."""
    why = _common.platform_reason(x) or same_device_reason(x, kh, kv, ks, bias)
    if why:
        return why
    try:
        _check(x, kh, kv, ks, bias, big_kernel, small_kernel)
        if separate and bias is not None:
            raise ValueError("fused_strips: bias is only used with separate=False (the deploy form)")
    except (ValueError, TypeError) as exc:
        return str(exc)
    return launch_reason(x.shape, x.stride(), [tuple(w.shape[-2:]) for w in (kh, kv, ks)], tuple(x.shape[-2:]),
                         is_channels_last(x), x.dtype, x.device, needs_grad=needs_grad)


# ----------------------------------------------------------------------------------------------------------
# Custom ops (``fallback``: see triton_dwconv's custom ops and _common.run_guarded)
# ----------------------------------------------------------------------------------------------------------
@torch.library.custom_op("lkvision::triton_shiftwise", mutates_args=(),
                         schema="(Tensor x, Tensor kh, Tensor kv, Tensor ks, int big_kernel, str fallback) "
                                "-> (Tensor, Tensor, Tensor)")
def _shiftwise_op(x: Tensor, kh: Tensor, kv: Tensor, ks: Tensor, big_kernel: int, fallback: str):
    def reference():
        fmt = memory_format_of(x)
        return tuple(t.contiguous(memory_format=fmt)
                     for t in fused_strips_reference(x, kh, kv, ks, None, big_kernel, separate=True))

    if not _use_kernels(x):
        return reference()
    return run_guarded("lkvision::triton_shiftwise (forward)", fallback,
                       lambda: tuple(dwconv_forward_terms([x, x, x], [kh, kv, ks], _offsets(kh, big_kernel),
                                                          tuple(x.shape[-2:]), separate=True)),
                       reference)


@_shiftwise_op.register_fake
def _(x, kh, kv, ks, big_kernel, fallback):
    return tuple(torch.empty_like(x, memory_format=memory_format_of(x)) for _ in range(3))


@torch.library.custom_op("lkvision::triton_shiftwise_fused", mutates_args=(),
                         schema="(Tensor x, Tensor kh, Tensor kv, Tensor ks, Tensor? bias, int big_kernel, "
                                "str fallback) -> Tensor")
def _shiftwise_fused_op(x: Tensor, kh: Tensor, kv: Tensor, ks: Tensor, bias: Tensor | None,
                        big_kernel: int, fallback: str) -> Tensor:
    def reference() -> Tensor:
        out = fused_strips_reference(x, kh, kv, ks, bias, big_kernel, separate=False)
        return out.contiguous(memory_format=memory_format_of(x))

    def launch() -> Tensor:
        xs = x.contiguous(memory_format=memory_format_of(x))
        return dwconv_forward_terms([xs, xs, xs], [kh, kv, ks], _offsets(kh, big_kernel), tuple(x.shape[-2:]),
                                    identity=xs, bias=bias)[0]

    if not _use_kernels(x):
        return reference()
    return run_guarded("lkvision::triton_shiftwise_fused (forward)", fallback, launch, reference)


@_shiftwise_fused_op.register_fake
def _(x, kh, kv, ks, bias, big_kernel, fallback):
    return torch.empty_like(x, memory_format=memory_format_of(x))


@torch.library.custom_op("lkvision::triton_shiftwise_grad_input", mutates_args=(),
                         schema="(Tensor gh, Tensor gv, Tensor gs, Tensor kh, Tensor kv, Tensor ks, int big_kernel, "
                                "bool add_identity, bool channels_last, str fallback) -> Tensor")
def _shiftwise_grad_input_op(gh: Tensor, gv: Tensor, gs: Tensor, kh: Tensor, kv: Tensor, ks: Tensor,
                             big_kernel: int, add_identity: bool, channels_last: bool, fallback: str) -> Tensor:
    """dx = H^T gh + V^T gv + S^T gs (+ gh when add_identity; the deploy form passes gh = gv = gs = g)."""
    return _grad_input_terms([gh, gv, gs], [kh, kv, ks], _term_paddings(kh, big_kernel),
                             gh.shape[-2:], channels_last, add_identity,
                             kernel="lkvision::triton_shiftwise_grad_input (backward)", fallback=fallback)


@_shiftwise_grad_input_op.register_fake
def _(gh, gv, gs, kh, kv, ks, big_kernel, add_identity, channels_last, fallback):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty_like(gh, memory_format=fmt)


def _weight_grads(ctx, grads: Sequence[Tensor], x: Tensor, kh: Tensor, kv: Tensor, ks: Tensor):
    pads = _term_paddings(kh, ctx.big_kernel)
    out = []
    for n, (g, w, pad) in enumerate(zip(grads, (kh, kv, ks), pads)):
        if ctx.needs_input_grad[1 + n]:
            gw = torch.ops.lkvision.triton_dwconv2d_grad_weight(g, x, list(w.shape[-2:]), pad, ctx.fallback)
            out.append(gw.to(w.dtype))
        else:
            out.append(None)
    return out


def _setup(ctx, inputs, output):
    x, kh, kv, ks = inputs[:4]
    ctx.save_for_backward(x, kh, kv, ks)
    ctx.big_kernel, ctx.fallback = inputs[-2], inputs[-1]
    ctx.has_bias = len(inputs) == 7 and inputs[4] is not None
    ctx.bias_dtype = inputs[4].dtype if ctx.has_bias else None


def _shiftwise_backward(ctx, gh, gv, gs):
    x, kh, kv, ks = ctx.saved_tensors
    gh, gv, gs = (torch.zeros_like(x) if g is None else g for g in (gh, gv, gs))
    gx = None
    if ctx.needs_input_grad[0]:
        gx = torch.ops.lkvision.triton_shiftwise_grad_input(gh, gv, gs, kh, kv, ks, ctx.big_kernel, False,
                                                             is_channels_last(x), ctx.fallback)
    gkh, gkv, gks = _weight_grads(ctx, (gh, gv, gs), x, kh, kv, ks)
    return gx, gkh, gkv, gks, None, None


def _shiftwise_fused_backward(ctx, g):
    x, kh, kv, ks = ctx.saved_tensors
    gx = None
    if ctx.needs_input_grad[0]:
        gx = torch.ops.lkvision.triton_shiftwise_grad_input(g, g, g, kh, kv, ks, ctx.big_kernel, True,
                                                             is_channels_last(x), ctx.fallback)
    gkh, gkv, gks = _weight_grads(ctx, (g, g, g), x, kh, kv, ks)
    gb = None
    if ctx.has_bias and ctx.needs_input_grad[4]:
        gb = g.sum(dim=(0, 2, 3), dtype=torch.float32).to(ctx.bias_dtype)
    return gx, gkh, gkv, gks, gb, None, None


_shiftwise_op.register_autograd(_shiftwise_backward, setup_context=_setup)
_shiftwise_fused_op.register_autograd(_shiftwise_fused_backward, setup_context=_setup)


# ----------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------
def fused_strips(x: Tensor, kh: Tensor, kv: Tensor, ks: Tensor, bias: Tensor | None, big_kernel: int,
                 small_kernel: int = 3, separate: bool = True, *, fallback: str = ""):
    """Folded SW layer on the rep channels, one fused kernel.

    x (B, R, H, W) (NCHW or channels_last); kh (R, 1, k, L), kv (R, 1, L, k), ks (R, 1, k, k) with
    k = ``small_kernel`` (odd) and L = k * ceil(M / k) for M = ``big_kernel``; bias (R,) or None.

    ``separate=True``: returns (H, V, S), each (B, R, H, W) (``bias`` must be None: the BNs follow).
    ``separate=False``: returns ``H + V + S + x + bias`` (B, R, H, W), the eval/deploy form.
    Outputs keep the layout of ``x``; differentiable w.r.t. x, kh, kv, ks and bias. A kernel that fails raises
    :class:`~._common.KernelError` unless ``fallback`` (an autoselect tag, set by
    :func:`lkvision.ops.shiftwise_conv`'s ``impl="auto"``) asks for the PyTorch result and a warning.
    """
    x, kh, kv, ks, bias = autocast_inputs(x, kh, kv, ks, bias)
    _check(x, kh, kv, ks, bias, big_kernel, small_kernel)
    if separate:
        if bias is not None:
            raise ValueError("fused_strips: bias is only used with separate=False (the deploy form)")
        return torch.ops.lkvision.triton_shiftwise(x, kh, kv, ks, int(big_kernel), fallback)
    return torch.ops.lkvision.triton_shiftwise_fused(x, kh, kv, ks, bias, int(big_kernel), fallback)
