"""Reduced-precision inference: the documented bf16 tolerance and the error measure it applies to.

A model run in bf16 (weights and activations cast, or fp32 weights under ``torch.autocast("cpu",
torch.bfloat16)``) is accepted when ``relative_error(y_bf16, y_fp32) <= BF16_TOLERANCE`` for its logits, where the
error is ``max |y_bf16 - y_fp32| / max |y_fp32|``. Measured on the deploy forms of UniRepLKNet-T, RepLKNet-31B,
SLaK-T, ConvNeXt-LK-T and SW-tiny (random weights with randomized BN statistics, 224^2): 0.004-0.017; the tests
check every family's test model against the same bound (``tests/models/test_bf16_inference.py``).
"""

from __future__ import annotations

import torch

__all__ = ["BF16_TOLERANCE", "relative_error"]

#: max |y_bf16 - y_fp32| / max |y_fp32| accepted for a model's bf16 logits
BF16_TOLERANCE = 5e-2


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |y - ref| / max |ref|`` computed in float64 (``ref`` all zero: the plain max |y - ref|)."""
    y, ref = y.detach().double(), ref.detach().double()
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30)) if ref.numel() else 0.0
