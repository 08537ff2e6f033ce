"""Shared helpers for the Triton kernels: lazy triton import, availability checks, argument validation.

Nothing here imports triton at module level; :func:`triton_modules` does it on first use so that the package
imports on machines without triton.
"""

from __future__ import annotations

import functools
import os

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpret_mode() -> bool:
    """True when triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``).

    The variable must be set before triton is first imported; triton reads it when kernels are decorated.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=1)
def triton_modules():
    """Return ``(triton, triton.language)`` or ``None`` when triton cannot be imported."""
    try:
        import triton
        import triton.language as tl
    except Exception:  # ImportError, or a broken install raising anything at import time
        return None
    return triton, tl


def has_triton() -> bool:
    return triton_modules() is not None


def device_supported(x: torch.Tensor) -> bool:
    """True when the Triton kernels can run on ``x``'s device and dtype.

    CUDA tensors need a working triton; CPU tensors are accepted only under ``TRITON_INTERPRET=1`` (tests).
    """
    if not isinstance(x, torch.Tensor) or x.dtype not in SUPPORTED_DTYPES:
        return False
    if x.is_cuda:
        return has_triton()
    if x.device.type == "cpu" and interpret_mode():
        return has_triton()
    return False


def is_channels_last(x: torch.Tensor) -> bool:
    """True when a 4-D tensor is laid out NHWC (channels_last) rather than NCHW."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


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
