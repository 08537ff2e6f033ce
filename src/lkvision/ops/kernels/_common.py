"""Shared helpers for the Triton kernels: lazy triton import, eligibility checks (the platform part, launch
limits), argument validation, and the guard that turns a failing kernel into an error or a PyTorch fallback.

Nothing here imports triton at module level; :func:`triton_modules` does it on first use so that the package
imports on machines without triton.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpret_mode() -> bool:
    """True when triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``).

    The variable must be set before triton is first imported; triton reads it when kernels are decorated.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_TRITON: list[tuple] = []  # [((triton, tl) or None, reason or None)] once imported (a plain global: traceable)


def _import_triton() -> tuple:
    """``((triton, triton.language), None)``, or ``(None, reason)`` when triton cannot be imported."""
    if not _TRITON:
        try:
            import triton
            import triton.language as tl
        except Exception as exc:  # ImportError, or a broken install raising anything at import time
            if isinstance(exc, ImportError) and getattr(exc, "name", None) == "triton":
                _TRITON.append((None, "triton is not installed (pip install triton)"))
            else:
                _TRITON.append((None, f"triton cannot be imported ({type(exc).__name__}: {exc})"))
        else:
            _TRITON.append(((triton, tl), None))
    return _TRITON[0]


def triton_modules():
    """Return ``(triton, triton.language)`` or ``None`` when triton cannot be imported."""
    return _import_triton()[0]


def has_triton() -> bool:
    return triton_modules() is not None


# device index -> (major, minor): one driver query per device
_CAPABILITY: dict[int, tuple[int, int]] = {}


def device_capability(device: torch.device) -> tuple[int, int]:
    """CUDA compute capability of ``device`` (cached)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    cap = _CAPABILITY.get(index)
    if cap is None:
        cap = tuple(torch.cuda.get_device_capability(index))
        _CAPABILITY[index] = cap
    return cap


MIN_CAPABILITY = (7, 0)  # Triton's NVIDIA backend (and torch.compile's) minimum
BF16_MIN_CAPABILITY = (8, 0)  # native bf16 MMA and conversions


def platform_reason(x: object) -> str | None:
    """Why the Triton kernels cannot run on ``x``'s device and dtype (``None``: they can).

    Checks the dtype (float32/float16/bfloat16), that triton imports, the device (CUDA; a CPU tensor only under
    ``TRITON_INTERPRET=1``, for tests) and, on NVIDIA GPUs, the compute capability (7.0+, bfloat16 8.0+). Shapes,
    strides and launch limits are checked per kernel (``triton_dwconv.can_run`` and friends)."""
    if not isinstance(x, torch.Tensor):
        return f"expected a tensor, got {type(x).__name__}"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"dtype {x.dtype} is not supported (float32, float16 and bfloat16 only)"
    if x.is_cuda:
        why = _import_triton()[1]
        if why is not None:
            return why
        if torch.version.hip is None:
            cap = device_capability(x.device)
            if cap < MIN_CAPABILITY:
                return f"compute capability {cap[0]}.{cap[1]} is below Triton's minimum 7.0"
            if x.dtype == torch.bfloat16 and cap < BF16_MIN_CAPABILITY:
                return f"bfloat16 needs compute capability 8.0+, this GPU has {cap[0]}.{cap[1]}"
        return None
    if x.device.type == "cpu":
        if not interpret_mode():
            return "the Triton kernels need a CUDA tensor (CPU tensors only under TRITON_INTERPRET=1, for tests)"
        return _import_triton()[1]
    return f"the Triton kernels do not run on {x.device.type} tensors"


def same_device_reason(x: torch.Tensor, *others: torch.Tensor | None) -> str | None:
    """Why the tensors cannot go to one kernel launch (``None``: all are on ``x``'s device)."""
    for t in others:
        if t is not None and t.device != x.device:
            return f"tensors on different devices ({x.device} and {t.device})"
    return None


INT32_MAX = 2**31 - 1
GRID_MAX = (INT32_MAX, 65535, 65535)  # CUDA grid limits (x, y, z)


def sample_span(shape: Sequence[int], stride: Sequence[int]) -> int:
    """Elements spanned by one sample of a (B, C, H, W) tensor (the kernels index within a sample in int32;
    batch offsets are int64)."""
    return 1 + sum((n - 1) * abs(s) for n, s in zip(shape[1:], stride[1:]) if n > 0)


def int32_reason(what: str, shape: Sequence[int], stride: Sequence[int]) -> str | None:
    """Why a tensor is too large for the kernels' int32 indexing within a sample (``None``: it is not)."""
    span = sample_span(shape, stride)
    if span > INT32_MAX:
        return f"{what} spans {span} elements per sample; the kernels index a sample with int32 (<= {INT32_MAX})"
    return None


# ------------------------------------------------------------------------------------------ failure handling
class KernelError(RuntimeError):
    """A Triton kernel failed (compile error, out of resources, launch error, ...) where no fallback was allowed:
    the kernel was requested explicitly (``impl="triton"``, a forced backend, or a direct kernel call)."""

    def __init__(self, kernel: str, cause: BaseException):
        self.kernel, self.cause = kernel, cause
        super().__init__(f"{failure_reason(kernel, cause)}. This kernel was requested explicitly; impl='auto' "
                         "falls back to the PyTorch path instead (with a warning)")


def failure_reason(kernel: str, exc: BaseException) -> str:
    """One line naming the kernel and its error: the text of a fallback warning and its de-duplication key."""
    if isinstance(exc, KernelError):
        kernel, exc = exc.kernel, exc.cause
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0].rstrip(".") if lines else ""
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{kernel} raised {type(exc).__name__}" + (f": {text}" if text else "")


T = TypeVar("T")


def run_guarded(kernel: str, fallback: str, launch: Callable[[], T], reference: Callable[[], T]) -> T:
    """Run ``launch()`` (a kernel launch); what a failure does depends on ``fallback``.

    ``fallback == ""`` (the kernel was asked for explicitly): raise :class:`KernelError` naming the kernel.
    Otherwise ``fallback`` is the tag of an ``impl="auto"`` choice (:func:`lkvision.ops.autoselect.fallback_tag`):
    the failure is reported to :mod:`lkvision.ops.autoselect` (the Triton path is dropped for that problem key;
    one warning per (op, reason)) and ``reference()``, the PyTorch computation, serves the call. A tag that failed
    before goes straight to ``reference()`` without trying the kernel again (inside a compiled graph, where the
    choice is baked in, every later call is served that way)."""
    if fallback:
        from .. import autoselect  # lazy: the dispatcher this reports to (ops.autoselect imports no kernels)

        if autoselect.tag_failed(fallback):
            return reference()
    try:
        return launch()
    except Exception as exc:
        if not fallback:
            raise KernelError(kernel, exc) from exc
        autoselect.report_failure(fallback, failure_reason(kernel, exc))
        return reference()


def is_channels_last(x: torch.Tensor) -> bool:
    """True when a 4-D tensor is laid out NHWC (channels_last) rather than NCHW."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """``torch.channels_last`` for an NHWC tensor (:func:`is_channels_last`), else ``torch.contiguous_format``."""
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


def empty_like_layout(x: torch.Tensor, shape: tuple[int, ...], channels_last: bool,
                      dtype: torch.dtype | None = None) -> torch.Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype or x.dtype, device=x.device, memory_format=fmt)


def num_sms(device: torch.device) -> int:
    """Multiprocessor count (a guess of 8 on CPU / interpreter, where it only sizes the reduction split)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def check_depthwise_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         name: str = "weight") -> None:
    """Validate x (B, C, H, W), weight (C, 1, KH, KW) and bias (C,) for a depth-wise conv."""
    if x.dim() != 4:
        raise ValueError(f"expected x of shape (B, C, H, W), got {tuple(x.shape)}")
    c = x.shape[1]
    if weight.dim() != 4 or weight.shape[0] != c or weight.shape[1] != 1:
        raise ValueError(f"expected {name} of shape ({c}, 1, KH, KW) for x with {c} channels, "
                         f"got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (c,):
        raise ValueError(f"expected bias of shape ({c},), got {tuple(bias.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"unsupported dtype {x.dtype}; the Triton kernels support float32/float16/bfloat16")


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether a call on ``tensors`` (None entries allowed) records a graph: grad mode on and one requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype when autocast is enabled for ``device_type``, else None (also for device types that
    autocast does not know, such as ``meta``, used by the FLOP/parameter counters)."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except RuntimeError:  # "unknown device type for autocast"
        pass
    return None


def autocast_inputs(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Apply autocast's policy for convolutions to a custom conv op's tensors.

    Custom ops are invisible to autocast, so under ``torch.autocast`` a conv's input may arrive in bf16 while
    its weight is an fp32 parameter (or the reverse). When autocast is enabled for the device of the first
    tensor, every fp32/fp16/bf16 tensor is cast to the autocast dtype, as ``F.conv2d`` would be; fp64 and
    ``None`` pass through. Outside autocast the tensors are returned unchanged."""
    dtype = autocast_dtype(tensors[0].device.type)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t is not None and t.dtype in SUPPORTED_DTYPES and t.dtype != dtype else t
                 for t in tensors)
