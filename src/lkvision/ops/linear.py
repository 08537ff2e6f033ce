"""Fully connected layers on CPU through oneDNN, with the bias, the activation and a residual add fused.

``linear(x, weight, bias, act=..., residual=...)`` computes ``act(x @ weight.T + bias) + residual``.

Why: on this project's CPU (AMD Zen 5, AVX-512 + bf16), ``F.linear`` in fp32 runs MKL's SGEMM, which reaches
about half of what oneDNN's AVX-512 matmul (``brg_matmul``) reaches for the MLP shapes of the ConvNeXt-style
families (measured 80-100 vs 180-210 GFLOP/s per core), and ``addmm`` first copies the broadcast bias into the
output (one extra pass over the largest tensor of every block). oneDNN's inner-product primitive, reached
through ``torch.ops.mkldnn._linear_pointwise`` (the op ``torch.compile`` uses for CPU linears), takes the
bias, an activation (GELU, ReLU) and a residual add as post-ops, so the MLP's elementwise passes disappear.
The results equal ``F.linear`` (+ act + add) up to fp32 summation order (tested).

Which GEMM library is faster depends on the CPU: oneDNN's is about 2x MKL's on an AMD Zen 5 (AVX-512), equal on
an Intel Xeon VM, and 0.85x on an AMD Zen 3 (AVX2, where MKL's SGEMM reaches 89 GFLOP/s per core and oneDNN's 75).
So each product is timed once per problem on its first call, oneDNN (epilogue fused) against MKL (``addmm``, then
the activation and the residual add in place on its output), and the faster one is cached
(:mod:`lkvision.ops.autoselect`, op ``"linear"``; the key holds the kind of product, M, K, N, the dtype, the
epilogue and the thread count). ``LKVISION_FORCE_BACKEND=linear=mkl`` (or ``=onednn``) fixes the choice, and
``LKVISION_AUTOSELECT=0`` keeps oneDNN everywhere without timing (bitwise-reproducible runs).

Paths:
  * inference (no gradient needed): one oneDNN call, with the activation or the residual add fused, or MKL's
    ``addmm`` with the activation and the residual add in place;
  * training: :class:`_FastLinear`, an autograd function whose forward and both backward products
    (``grad_x = g @ W``, ``grad_W = g.T @ x``) each run on the library measured fastest for them; the activation
    and the residual add then run as ordinary PyTorch ops (their backward needs the pre-activation);
  * everywhere else (not CPU, fp64/fp16, meta/fake/subclass tensors, ``torch.compile``/``torch.export``/
    ``torch.jit`` tracing, a ``TorchDispatchMode`` such as the FLOP counter, oneDNN missing): the reference,
    :func:`linear_reference` (``F.linear`` + activation + add), so compilers and exporters see standard ops.

Under ``torch.autocast("cpu", torch.bfloat16)`` the inputs are cast like ``F.linear`` would be (autocast does not
see the oneDNN op).
"""

from __future__ import annotations

import contextlib
import functools
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from . import autoselect
from .kernels._common import autocast_dtype, autocast_inputs, needs_grad

__all__ = ["linear", "linear_reference", "LINEAR_ACTS", "LINEAR_BACKENDS", "onednn_linear_available",
           "fast_cpu_path_ok"]

#: the GEMM libraries a CPU product can run on (the autoselect candidates of op "linear"); the first is the default
LINEAR_BACKENDS = ("onednn", "mkl")

#: activations that can be fused: name -> (oneDNN post-op, algorithm)
LINEAR_ACTS: dict[str | None, tuple[str, str]] = {
    None: ("none", ""),
    "gelu": ("gelu", "none"),
    "gelu_tanh": ("gelu", "tanh"),
    "relu": ("relu", ""),
}
_FAST_DTYPES = (torch.float32, torch.bfloat16)


def _activation(y: Tensor, act: str | None) -> Tensor:
    if act is None:
        return y
    if act == "gelu":
        return F.gelu(y)
    if act == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    return F.relu(y)


def linear_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, act: str | None = None,
                     residual: Tensor | None = None) -> Tensor:
    """The plain PyTorch computation: ``act(F.linear(x, weight, bias)) + residual``."""
    y = _activation(F.linear(x, weight, bias), act)
    return y if residual is None else y + residual


@functools.cache
def onednn_linear_available(dtype: torch.dtype) -> bool:
    """True when oneDNN's fused inner product runs here for ``dtype`` (probed once on a tiny problem)."""
    if dtype not in _FAST_DTYPES or not torch.backends.mkldnn.is_available():
        return False
    try:
        op = torch.ops.mkldnn._linear_pointwise
        x = torch.ones(2, 3, dtype=dtype)
        w = torch.ones(4, 3, dtype=dtype)
        y = op(x, w, torch.zeros(4, dtype=dtype), "gelu", [], "none")
        z = op.binary(x, torch.ones(2, 4, dtype=dtype), w, None, "add")
        return bool((y - F.gelu(torch.full((2, 4), 3.0, dtype=dtype))).abs().max() < 0.05) and bool((z == 4).all())
    except Exception:  # noqa: BLE001 - any failure (missing op, unsupported ISA) means: use the reference
        return False


def _plain(t: Tensor | None) -> bool:
    return t is None or (type(t) in (Tensor, torch.nn.Parameter) and t.device.type == "cpu")


def fast_cpu_path_ok(*tensors: Tensor | None) -> bool:
    """Whether an eager CPU fast path (a direct oneDNN call that autograd, compilers and dispatch modes do not
    know) may run on ``tensors``: plain CPU tensors, not compiling, exporting or tracing, no TorchDispatchMode
    (FLOP counter, FakeTensorMode) and no ``torch.func`` transform active."""
    if not all(_plain(t) for t in tensors):
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    try:
        from torch.utils._python_dispatch import is_in_torch_dispatch_mode

        if is_in_torch_dispatch_mode() or torch._C._functorch.peek_interpreter_stack() is not None:
            return False
    except Exception:  # pragma: no cover - private API moved: be safe
        return False
    return True


# (id(weight), dtype) -> (weakref(weight), weight._version, cast copy). Under autocast, F.linear reuses one
# cast of each weight per autocast region (autocast's own cache); the oneDNN op is invisible to autocast, so
# without this cache every call would cast every weight again (28 M parameters per forward of SW-tiny).
# Used only when no gradient is needed (a cast inside a training graph must be recorded every step); the
# weak reference and the version counter make a stale hit impossible (in-place updates bump the version).
_CAST_CACHE: dict[tuple[int, torch.dtype], tuple] = {}
_CAST_CACHE_SIZE = 1024


def _cached_cast(weight: Tensor, dtype: torch.dtype) -> Tensor:
    key = (id(weight), dtype)
    hit = _CAST_CACHE.get(key)
    if hit is not None and hit[0]() is weight and hit[1] == weight._version:
        return hit[2]
    cast = weight.detach().to(dtype)
    if len(_CAST_CACHE) >= _CAST_CACHE_SIZE:
        _CAST_CACHE.pop(next(iter(_CAST_CACHE)))
    _CAST_CACHE[key] = (weakref.ref(weight), weight._version, cast)
    return cast


def _autocast_weights(weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Autocast's cast of an fp32 weight and bias for a no-grad call, cached per parameter (see above)."""
    dtype = autocast_dtype(weight.device.type)
    if dtype is None or weight.dtype == dtype or weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return weight, bias
    return _cached_cast(weight, dtype), None if bias is None else _cached_cast(bias, dtype)


def _onednn(x: Tensor, weight: Tensor, bias: Tensor | None, act: str | None = None) -> Tensor:
    attr, algorithm = LINEAR_ACTS[act]
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, [], algorithm)


def _activation_(y: Tensor, act: str | None) -> Tensor:
    """The activation in place on a fresh GEMM output (no second full-size buffer)."""
    if act == "gelu":
        return torch._C._nn.gelu_(y)
    if act == "gelu_tanh":
        return torch._C._nn.gelu_(y, approximate="tanh")
    return y if act is None else y.relu_()


def _mkl(x2d: Tensor, weight: Tensor, bias: Tensor | None, act: str | None = None,
         residual2d: Tensor | None = None) -> Tensor:
    """``act(x2d @ weight.T + bias) + residual2d`` as the plain path computes it (MKL's GEMM through ``addmm``),
    with the activation and the add in place on the GEMM's output. Any strides (MKL reads transposed operands)."""
    y = torch.mm(x2d, weight.t()) if bias is None else torch.addmm(bias, x2d, weight.t())
    y = _activation_(y, act)
    return y if residual2d is None else y.add_(residual2d)


def _onednn_epilogue(x2d: Tensor, weight: Tensor, bias: Tensor | None, act: str | None,
                     residual2d: Tensor | None) -> Tensor:
    """The same with oneDNN: activation fused, or the residual add fused when there is no activation."""
    if residual2d is None:
        return _onednn(x2d, weight, bias, act)
    if act is None:
        return torch.ops.mkldnn._linear_pointwise.binary(x2d, residual2d, weight, bias, "add")
    return _onednn(x2d, weight, bias, act).add_(residual2d)


_PRODUCTS = {"onednn": _onednn_epilogue, "mkl": _mkl}


def _timer(fn, cuda: bool = False) -> float:
    return autoselect.measure_min(fn, cuda)


def _product(kind: str, x2d: Tensor, weight: Tensor, bias: Tensor | None = None, act: str | None = None,
             residual2d: Tensor | None = None) -> Tensor:
    """``act(x2d @ weight.T + bias) + residual2d`` (no autograd) on the library measured fastest for this
    problem; ``kind`` ("forward", "grad_input", "grad_weight") tells the operands' layouts apart in the key."""
    key = (kind, *x2d.shape, weight.shape[0], str(x2d.dtype), act, bias is not None, residual2d is not None,
           torch.get_num_threads())  # (plain scalars: autoselect's look-up needs no conversion)
    args = (x2d, weight, bias, act, residual2d)
    with torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext():
        name = autoselect.choose("linear", key, {n: functools.partial(f, *args) for n, f in _PRODUCTS.items()},
                                 LINEAR_BACKENDS[0], tensors=(x2d, weight), timer=_timer)
        return _PRODUCTS[name](*args)


class _FastLinear(torch.autograd.Function):
    """``x2d @ W.T + b`` whose forward and backward products each run on the measured faster of oneDNN and MKL.
    x2d (M, K), W (N, K), b (N,)."""

    @staticmethod
    def forward(ctx, x2d: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x2d, weight)
        ctx.has_bias = bias is not None
        return _product("forward", x2d, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x2d, weight = ctx.saved_tensors
        grad = grad.contiguous()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _product("grad_input", grad, weight.t())  # (M, N) @ (N, K); both libraries read the strides
        if ctx.needs_input_grad[1]:
            gw = _product("grad_weight", grad.t(), x2d.t())  # (N, M) @ (M, K); both libraries read the strides
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.sum(0)
        return gx, gw, gb


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, act: str | None = None,
           residual: Tensor | None = None) -> Tensor:
    """``act(x @ weight.T + bias) + residual`` (fused through oneDNN on CPU where possible).

    Args:
        x: (..., K) floating-point input (any strides; contiguous is fastest).
        weight: (N, K); bias: optional (N,).
        act: None, "gelu" (exact erf GELU, ``nn.GELU()``), "gelu_tanh" or "relu".
        residual: optional tensor of the output's shape (..., N), added after the activation.

    Returns:
        (..., N), contiguous, in the input's dtype (the autocast dtype under ``torch.autocast``).
    """
    if act not in LINEAR_ACTS:
        raise ValueError(f"linear: act must be one of {tuple(LINEAR_ACTS)}, got {act!r}")
    plain = fast_cpu_path_ok(x, weight, bias, residual)  # (the casts below keep plain CPU tensors plain)
    if plain and not torch.is_grad_enabled():
        weight, bias = _autocast_weights(weight, bias)
    x, weight, bias = autocast_inputs(x, weight, bias)  # the residual add promotes as it would after F.linear
    fast = (plain and x.dtype in _FAST_DTYPES and weight.dtype == x.dtype and x.dim() >= 2
            and onednn_linear_available(x.dtype))
    if not fast:
        return linear_reference(x, weight, bias, act=act, residual=residual)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    lead, n = x.shape[:-1], weight.shape[0]
    if not needs_grad(x, weight, bias, residual):
        x2d = x.reshape(-1, x.shape[-1])
        fuse = residual is not None and residual.dtype == x.dtype and residual.shape == (*lead, n)
        out = _product("forward", x2d, weight, bias, act, residual.reshape(-1, n) if fuse else None).view(*lead, n)
        return out if residual is None or fuse else out + residual
    y = _FastLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias).view(*lead, n)
    y = _activation(y, act)
    return y if residual is None else y + residual
