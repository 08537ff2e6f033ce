"""Optional Triton kernels: large depth-wise conv and the fused Shiftwise strip op.

Importing this package never imports triton; the submodules do so inside ``try`` and fall back to PyTorch
when it is missing. ``is_available(x)`` tells the dispatcher (``lkvision.ops.dwconv``) whether the kernels
can run on a tensor: triton imports, ``x`` is a CUDA tensor (or a CPU tensor under ``TRITON_INTERPRET=1``,
for tests) and its dtype is float32, float16 or bfloat16.

Submodules (import lazily): ``triton_dwconv.triton_dwconv2d`` and ``triton_shiftwise.fused_strips``.
"""

from __future__ import annotations

import torch

from ._common import SUPPORTED_DTYPES, device_supported, has_triton, interpret_mode

__all__ = ["is_available", "has_triton", "interpret_mode", "SUPPORTED_DTYPES"]


def is_available(x: torch.Tensor) -> bool:
    """True iff the Triton kernels can run on ``x`` (device and dtype); never raises."""
    try:
        return device_supported(x)
    except Exception:
        return False
