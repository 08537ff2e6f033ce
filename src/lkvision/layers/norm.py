"""Normalisation layers shared by every family: channels-first LayerNorm and GRN."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops._fx import fx_leaf, fx_traces_as
from ..ops.kernels._common import autocast_dtype
from ..ops.linear import fast_cpu_path_ok

__all__ = ["LayerNorm2d", "GRN", "layer_norm_2d", "grn", "grn_reference"]


@fx_leaf
def layer_norm_2d(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                  eps: float, num_channels: int | None = None) -> torch.Tensor:
    """LayerNorm over the channels of (B, C, H, W) ``x``; ``weight``/``bias`` (C,) or None. ``num_channels``
    (C) keeps the normalised shape a constant for tracers (ONNX export); by default it is read from ``x``."""
    if x.is_contiguous(memory_format=torch.channels_last):
        # (B, C, H, W) stored as NHWC: normalise the contiguous last dim without copies.
        c = x.shape[1] if num_channels is None else num_channels
        y = F.layer_norm(x.permute(0, 2, 3, 1), (c,), weight, bias, eps)
        return y.permute(0, 3, 1, 2)
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    x = (x - u) * torch.rsqrt(s + eps)
    if weight is not None:
        x = weight[:, None, None] * x + bias[:, None, None]
    return x


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of an NCHW tensor.

    Shapes: input (B, C, H, W) -> output (B, C, H, W). Parameters ``weight``/``bias`` have shape (C,),
    like ``nn.LayerNorm(C)``, so official "channels_first" LayerNorm weights load unchanged.
    The default eps is 1e-6, as in ConvNeXt, SLaK, UniRepLKNet and ShiftWise.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True) -> None:
        super().__init__(num_channels, eps=eps, elementwise_affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm_2d(x, self.weight, self.bias, self.eps, self.normalized_shape[0])


def grn_reference(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor | None, eps: float = 1e-6, *,
                  inplace: bool = False) -> torch.Tensor:
    """GRN as the official code writes it: ``(gamma * N(x) + 1) * x + beta`` (x (B, H, W, C)). ``inplace`` is
    accepted for signature parity with :func:`grn` and ignored (the reference never writes into ``x``)."""
    gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
    nx = gx / (gx.mean(dim=-1, keepdim=True) + eps)
    y = (gamma * nx + 1) * x
    return y if beta is None else y + beta


class _SumSquaresHW(torch.autograd.Function):
    """``sum(x * x)`` over (H, W) of an NHWC tensor, keepdim: (B, H, W, C) -> (B, 1, 1, C).

    Autograd's own backward of ``(x * x).sum()`` multiplies the *expanded* (stride-0) gradient by ``x``; on CPU an
    element-wise product whose first operand is broadcast runs ~9x slower than with the operands swapped
    (measured 6.0 vs 0.68 ms at (4, 56, 56, 320)), so this backward is written as ``x * (2 * grad)``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return (x * x).sum(dim=(1, 2), keepdim=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return x * (2 * grad)


def _sum_squares_hw(x: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return (x * x).sum(dim=(1, 2), keepdim=True)
    if torch.is_grad_enabled() and x.requires_grad:
        return _SumSquaresHW.apply(x)
    if x.dim() == 4 and x.dtype in (torch.float32, torch.float64) and x.is_contiguous():
        # no full-size x * x (UniRepLKNet-T stage 1, (4, 56, 56, 320): 12 ms in the model, mostly page faults)
        b, h, w, c = x.shape
        x3 = x.view(b, h * w, c)
        return _hw_dot(x3, x3).view(b, 1, 1, c)
    return (x * x).sum(dim=(1, 2), keepdim=True)


def _hw_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum(1)`` of two (B, N, C) tensors -> (B, C), in row chunks through one small reused buffer:
    a full-size product would be a fresh allocation per call, and on CPU a fresh buffer costs page faults that
    take longer than the product (measured ~11 ms of first-touch faults for 16 MB in a KVM guest, against
    2.5 ms for the product itself)."""
    bsz, n, c = a.shape
    rows = max(1, min(n, _HW_DOT_CHUNK // max(1, bsz * c)))
    if rows >= n or a.numel() < _HW_DOT_MIN_CHUNKED:
        return (a * b).sum(1)
    out = torch.zeros(bsz, c, dtype=a.dtype, device=a.device)
    buf = torch.empty(bsz, rows, c, dtype=a.dtype, device=a.device)
    for i in range(0, n, rows):
        k = min(rows, n - i)
        part = torch.mul(a[:, i:i + k], b[:, i:i + k], out=buf[:, :k])
        out += part.sum(1)
    return out


_HW_DOT_CHUNK = 1 << 16  # elements of the reused product buffer (256 KB in fp32: stays in L2)
# below this many elements the full product is as fast (freed buffers of that size are reused without faults;
# measured at UniRepLKNet-T's stage-3 / stage-4 MLP widths, (4, 14, 14, 1280) and (4, 7, 7, 2560))
_HW_DOT_MIN_CHUNKED = 1 << 21


class _GRNTrain(torch.autograd.Function):
    """GRN with autograd, for a (B, H, W, C) tensor that needs a gradient: one full-size buffer forward (the
    output) and one backward (the input gradient), where autograd through :func:`grn`'s ops allocates five
    (``x * x``, the output, ``g * scale``, ``g * x``, ``x * (2 g)``) and adds two gradients of ``x``. The small
    (B, C) statistics are differentiated by hand:
    ``s = gamma * G / (mean_C G + eps) + 1`` with ``G = sqrt(max(sum_HW x^2, 1e-30))``, ``y = x * s + beta``.
    Once differentiable: second derivatives (``create_graph=True``) raise; :func:`grn_reference` has them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor | None, eps: float) -> torch.Tensor:
        b, h, w, c = x.shape
        x3 = x.reshape(b, h * w, c)
        sq = _hw_dot(x3, x3)
        norm = sq.clamp_min(1e-30).sqrt()  # (B, C)
        denom = norm.mean(-1, keepdim=True) + eps  # (B, 1)
        ratio = norm / denom
        scale = gamma.reshape(1, c) * ratio + 1  # (B, C)
        s3 = scale.unsqueeze(1)
        y = x3 * s3 if beta is None else torch.addcmul(beta.reshape(1, 1, c), x3, s3)
        ctx.save_for_backward(x, gamma, sq, norm, denom, ratio, scale)
        ctx.has_beta = beta is not None
        return y.view(b, h, w, c)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, gamma, sq, norm, denom, ratio, scale = ctx.saved_tensors
        b, h, w, c = x.shape
        x3, g3 = x.reshape(b, h * w, c), grad.reshape(b, h * w, c)
        g_scale = _hw_dot(g3, x3)  # (B, C)
        g_gamma = (g_scale * ratio).sum(0).reshape(gamma.shape) if ctx.needs_input_grad[1] else None
        g_beta = g3.sum((0, 1)).reshape(1, 1, 1, c) if ctx.has_beta and ctx.needs_input_grad[2] else None
        g_x = None
        if ctx.needs_input_grad[0]:
            g_ratio = g_scale * gamma.reshape(1, c)
            # ratio_i = norm_i / denom, denom = mean_j norm_j + eps
            g_norm = g_ratio / denom - (g_ratio * norm).sum(-1, keepdim=True) / (denom * denom * c)
            coef = torch.where(sq > 1e-30, g_norm / norm, torch.zeros_like(norm))  # d norm / dx = x / norm
            g_x = (g3 * scale.unsqueeze(1)).addcmul_(x3, coef.unsqueeze(1)).view(b, h, w, c)
        return g_x, g_gamma, g_beta, None


def _grn_train_ok(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor | None) -> bool:
    """Where :class:`_GRNTrain` serves :func:`grn`: an eager call that records a graph, no autocast, one dtype."""
    return (torch.is_grad_enabled() and (x.requires_grad or gamma.requires_grad) and x.dim() == 4
            and autocast_dtype(x.device.type) is None
            and x.dtype in (torch.float32, torch.float64) and gamma.dtype == x.dtype
            and (beta is None or beta.dtype == x.dtype) and fast_cpu_path_ok(x, gamma, beta))


@fx_traces_as(grn_reference)
def grn(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor | None, eps: float = 1e-6, *,
        inplace: bool = False) -> torch.Tensor:
    """GRN computed with cheap passes over ``x`` (B, H, W, C) -> (B, H, W, C); the same function as
    :func:`grn_reference`.

    * The L2 norm over (H, W) is ``sqrt(sum(x * x))``: ``torch.norm`` over non-trailing dims runs a scalar
      strided reduction on CPU, measured 2-11x slower than a square and a vectorised sum (2.8 vs 1.3 ms at
      (4, 56, 56, 320); 1.25 vs 0.11 ms at (4, 14, 14, 1280), one thread). The sum of squares is clamped at
      1e-30 before the root, so an all-zero channel gets the zero gradient ``torch.norm`` gives it (not NaN);
      its backward avoids a slow broadcast product (:class:`_SumSquaresHW`).
    * The factor ``gamma * N(x) + 1`` is formed on the small (B, 1, 1, C) tensor and applied with one
      ``addcmul`` (or an in-place multiply when ``inplace`` and there is no ``beta``: only for tensors nothing
      else reads, e.g. under ``no_grad``), instead of the reference's two full-size passes (``* x``, ``+ beta``).
    """
    if _grn_train_ok(x, gamma, beta):
        return _GRNTrain.apply(x, gamma, beta, eps)
    gx = _sum_squares_hw(x).clamp_min(1e-30).sqrt()
    scale = gamma * (gx / (gx.mean(dim=-1, keepdim=True) + eps)) + 1
    if scale.dtype != x.dtype and autocast_dtype(x.device.type) == x.dtype:
        # under autocast: keep the big tensor in the autocast dtype (the next linear casts it to that anyway)
        scale, beta = scale.to(x.dtype), None if beta is None else beta.to(x.dtype)
    if beta is not None:
        return torch.addcmul(beta, x, scale)
    return x.mul_(scale) if inplace else x * scale


class GRN(nn.Module):
    """Global Response Normalisation (ConvNeXt-V2 / UniRepLKNet / ShiftWise), channels-last input.

    ``y = (gamma * N(x) + 1) * x + beta`` with ``N(x) = ||x||_2 over (H, W) / (mean_C ||x||_2 + eps)``.

    Shapes: input (B, H, W, C) -> output (B, H, W, C). ``gamma``/``beta`` have shape (1, 1, 1, C) (the
    official layout). ``use_bias=False`` is the deploy form, where ``beta`` has been folded into the
    following Linear (see :meth:`fold_beta_into`).
    """

    def __init__(self, dim: int, use_bias: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.use_bias = use_bias
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        if use_bias:
            self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grn(x, self.gamma, self.beta if self.use_bias else None, self.eps)

    @torch.no_grad()
    def fold_beta_into(self, linear: nn.Linear) -> nn.Linear:
        """Fold ``beta`` into the Linear that follows (``b += W @ beta``); returns a biased Linear.

        After this call the GRN has no bias (its deploy form). Exact: the Linear is affine.
        """
        if not self.use_bias:
            return linear
        w = linear.weight
        extra = w @ self.beta.reshape(-1)
        new = nn.Linear(linear.in_features, linear.out_features, bias=True, device=w.device, dtype=w.dtype)
        new.weight.copy_(w)
        new.bias.copy_(extra if linear.bias is None else linear.bias + extra)
        del self.beta
        self.use_bias = False
        return new
