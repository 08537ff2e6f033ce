"""Optional Triton kernels: large depth-wise conv and the fused Shiftwise strip op.

Importing this package never imports triton; the submodules do so inside ``try`` and fall back to PyTorch
when it is missing. The dispatchers (``lkvision.ops.dwconv2d``, ``shiftwise_conv``, ``shiftwise_deploy_conv``)
ask, before they offer the Triton backend for a problem, why it could not serve it (NATTEN-style ``can_run``
checks that return a reason string, or None when it can):

* :func:`unavailable_reason` / :func:`is_available`: the platform (triton imports, ``x`` is a CUDA tensor, or a
  CPU tensor under ``TRITON_INTERPRET=1`` for tests, dtype float32/float16/bfloat16, compute capability);
* :func:`can_run_dwconv2d`, :func:`can_run_dwconv2d_sum`, :func:`can_run_shiftwise`: the platform plus shapes,
  devices and the launch limits of every kernel the call (and its backward) would launch.

Submodules (import lazily): ``triton_dwconv.triton_dwconv2d`` / ``dwconv2d_sum`` and ``triton_shiftwise.fused_strips``.
A kernel that fails at run time raises :class:`KernelError` when it was requested explicitly, and falls back to
PyTorch with one warning under ``impl="auto"`` (see ``_common.run_guarded`` and docs/kernels.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _common
from ._common import SUPPORTED_DTYPES, KernelError, has_triton, interpret_mode

__all__ = ["is_available", "unavailable_reason", "can_run_dwconv2d", "can_run_dwconv2d_sum", "can_run_shiftwise",
           "has_triton", "interpret_mode", "KernelError", "SUPPORTED_DTYPES"]


def unavailable_reason(x: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot run on ``x``'s device and dtype, or None when they can; never raises."""
    try:
        return _common.platform_reason(x)
    except Exception as exc:  # a broken driver must not break the op that asks
        return f"the platform check failed ({type(exc).__name__}: {exc})"


def is_available(x: torch.Tensor) -> bool:
    """True iff the Triton kernels can run on ``x`` (device and dtype); never raises."""
    return unavailable_reason(x) is None


def _check_failed(what: str, exc: Exception) -> str:
    return f"{what} failed ({type(exc).__name__}: {exc})"


# The checks import their submodule with a plain import statement (traceable by torch.compile once loaded) and
# turn an import failure or a failing check into the reason: an optional backend never breaks the op that asks.
def can_run_dwconv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: Sequence[int], *,
                     needs_grad: bool = False) -> str | None:
    """Why ``triton_dwconv.triton_dwconv2d`` cannot serve this problem (None: it can). ``padding`` is F.pad-style
    (left, right, top, bottom); ``needs_grad`` also checks the backward kernels."""
    try:
        from . import triton_dwconv

        return triton_dwconv.can_run(x, weight, bias, padding, needs_grad=needs_grad)
    except Exception as exc:
        return _check_failed("the Triton depth-wise conv eligibility check", exc)


def can_run_dwconv2d_sum(x: torch.Tensor, weights: Sequence[torch.Tensor], bias: torch.Tensor | None,
                         paddings: Sequence[Sequence[int]], *, needs_grad: bool = False) -> str | None:
    """Why ``triton_dwconv.dwconv2d_sum`` cannot serve this problem (None: it can)."""
    try:
        from . import triton_dwconv

        return triton_dwconv.can_run_sum(x, weights, bias, paddings, needs_grad=needs_grad)
    except Exception as exc:
        return _check_failed("the Triton depth-wise sum eligibility check", exc)


def can_run_shiftwise(x: torch.Tensor, kh: torch.Tensor, kv: torch.Tensor, ks: torch.Tensor,
                      bias: torch.Tensor | None, big_kernel: int, small_kernel: int = 3, *, separate: bool = True,
                      needs_grad: bool = False) -> str | None:
    """Why ``triton_shiftwise.fused_strips`` cannot serve this problem (None: it can)."""
    try:
        from . import triton_shiftwise

        return triton_shiftwise.can_run(x, kh, kv, ks, bias, big_kernel, small_kernel, separate=separate,
                                        needs_grad=needs_grad)
    except Exception as exc:
        return _check_failed("the Triton Shiftwise eligibility check", exc)
