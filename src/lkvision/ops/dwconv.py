"""Depth-wise convolution with a per-device choice of the fastest correct implementation.

``dwconv2d(x, weight, bias, padding)`` computes ``y[b, c] = x[b, c] (*) weight[c, 0] + bias[c]`` (a
cross-correlation, stride 1, dilation 1, ``groups = C``) with zero padding that may be asymmetric, which the
strip kernels of SLaK and ShiftWise need (e.g. a 3 x 51 strip whose window is -24..+26).

Paths (``impl``):
  * ``"torch"``: ``F.conv2d`` in the memory format of the input, PyTorch autograd.
  * ``"channels_last"``: ``F.conv2d`` on a channels_last copy (oneDNN / cuDNN NHWC kernels), PyTorch autograd.
  * ``"custom"``: ``F.conv2d`` forward with our own backward (see :func:`dwconv2d_grad_input` and
    :func:`dwconv2d_grad_weight`); PyTorch's CPU backward of large strip depth-wise convs is slow.
  * ``"triton"``: ``lkvision.ops.kernels.triton_dwconv.triton_dwconv2d``; a RuntimeError with the reason where its
    can_run check fails, ``KernelError`` where a kernel fails.
  * ``"auto"``: CPU -> ``"custom"`` (measured once, see docs/ops.md); CUDA -> the fastest of ``"triton"`` (where
    its can_run check passes), ``"channels_last"`` and ``"torch"``, timed per problem (device, dtype, layout,
    shape, padding, training or not) on first use and cached by :mod:`lkvision.ops.autoselect` ("Measured
    dispatch on CUDA" in docs/ops.md). A Triton kernel that fails, while timed or later (forward or backward),
    is dropped for that problem and the PyTorch path serves it, with one warning ("When a fast path fails").
"""

from __future__ import annotations

import functools
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import autoselect, dwconv_fft
from ._fx import fx_leaf, fx_traces_as
from .kernels._common import autocast_inputs, needs_grad
from .linear import fast_cpu_path_ok

__all__ = ["dwconv2d", "dwconv2d_sum", "dwconv2d_sum_reference", "dwconv2d_dilated", "dwconv2d_dilated_reference",
           "normalize_padding", "dwconv2d_grad_input", "dwconv2d_grad_weight", "DWCONV_IMPLS"]

DWCONV_IMPLS = ("auto", "torch", "channels_last", "custom", "triton")

PaddingArg = Union[int, tuple[int, int], tuple[int, int, int, int], list, str]


def normalize_padding(padding: PaddingArg, kernel_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """Turn a padding argument into F.pad-style ``(left, right, top, bottom)``.

    ``"same"`` -> (KW//2, KW//2, KH//2, KH//2) (exactly 'same' for odd kernels); an int p -> (p, p, p, p);
    ``(ph, pw)`` -> (pw, pw, ph, ph); a 4-tuple is returned as is."""
    kh, kw = kernel_hw
    if isinstance(padding, str):
        if padding != "same":
            raise ValueError(f"dwconv2d: padding string must be 'same', got {padding!r}")
        return (kw // 2, kw // 2, kh // 2, kh // 2)
    if isinstance(padding, int):
        p = (padding,) * 4
    else:
        padding = tuple(int(p) for p in padding)
        if len(padding) == 2:
            p = (padding[1], padding[1], padding[0], padding[0])
        elif len(padding) == 4:
            p = padding
        else:
            raise ValueError(f"dwconv2d: padding must be an int, 'same', (ph, pw) or (left, right, top, bottom); "
                             f"got {padding!r}")
    if any(v < 0 for v in p):
        raise ValueError(f"dwconv2d: padding must be non-negative, got {p}")
    return tuple(int(v) for v in p)


def _check_inputs(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"dwconv2d: expected a 4-D input (B, C, H, W), got shape {tuple(getattr(x, 'shape', ()))}")
    if not x.is_floating_point():
        raise TypeError(f"dwconv2d: unsupported dtype {x.dtype}; use a floating-point tensor")
    if weight.dim() != 4 or weight.shape[1] != 1:
        raise ValueError(f"dwconv2d: weight must have shape (C, 1, KH, KW), got {tuple(weight.shape)}")
    if weight.shape[0] != x.shape[1]:
        raise ValueError(f"dwconv2d: channel mismatch: input has {x.shape[1]} channels but weight has "
                         f"{weight.shape[0]} filters (weight shape {tuple(weight.shape)})")
    if weight.dtype != x.dtype:
        raise TypeError(f"dwconv2d: weight dtype {weight.dtype} differs from input dtype {x.dtype}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != x.shape[1]):
        raise ValueError(f"dwconv2d: bias must have shape ({x.shape[1]},), got {tuple(bias.shape)}")


# Asymmetric padding costs either a padded copy of the input or zero taps added to the kernel (so that conv2d's
# symmetric padding applies). Zero taps win for small kernels, where the copy dominates the conv (SW strip M=13:
# 2 of 15 columns; measured 0.15 vs 0.23 ms at SW-tiny stage 4 on CPU). On CPU channels_last tensors they win for
# the long strips too (measured in thread CPU time, one thread, SW-tiny deploy strips 3xL + Lx3: 1.96 -> 1.72 ms
# at stage 2, 0.69 -> 0.52 ms at stage 3); elsewhere large kernels keep padding the input (an earlier wall-clock
# measurement on a loaded machine had seen oneDNN pick an intermittently slow path for a widened 3x49 kernel).
_MAX_ZERO_TAP_FRACTION = 0.25
_MAX_ZERO_TAP_KERNEL = 64  # kernel taps (KH*KW) up to which zero taps may be used


# oneDNN's NHWC depth-wise kernel on CPU (brdgmm_dw, oneDNN 3.x, AVX-512) is slow for kernel widths 10-13:
# measured per tap at (4, 160, 28, 28), one thread, fp32 (bf16 alike): widths 3-9: 8-11 units, 10-11: 12-14,
# 12-13: 21-22, 14-23: 6-7. A 13x13 kernel (UniRepLKNet, the last stage of RepLKNet / ConvNeXt-LK / SLaK) thus
# runs 3x faster widened to 13x15 with a zero column on each side (2.8 vs 8.5 ms at (4, 80, 56, 56)), although
# it does 15% more multiply-adds. Widths in this table get that many zero columns on each side on CPU
# channels_last tensors (the adjoint of the padding is the same widening, so backward benefits too).
# Only where oneDNN runs its AVX-512 kernels: its AVX2 kernel costs the same per tap for every width 3-31
# (0.030-0.034 ms per tap at that shape on an AMD Zen 3), so there widening would only add 15% of work.
_CPU_NHWC_WIDEN = {10: 2, 11: 2, 12: 1, 13: 1}


_CPU_CAPABILITY = torch.backends.cpu.get_cpu_capability()  # read once (torch.compile cannot trace the call)


def _cpu_widen_table() -> dict[int, int]:
    """:data:`_CPU_NHWC_WIDEN` on CPUs where PyTorch (and so oneDNN) runs AVX-512 code, else no widening."""
    return _CPU_NHWC_WIDEN if _CPU_CAPABILITY.startswith("AVX512") else {}


def _cpu_nhwc(x: Tensor) -> bool:
    """A CPU tensor in channels_last layout (oneDNN's NHWC depth-wise kernel will run)."""
    return x.device.type == "cpu" and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _widen_for_cpu(x: Tensor, weight: Tensor, pad4: tuple[int, int, int, int]
                   ) -> tuple[Tensor, tuple[int, int, int, int]]:
    """Zero columns for kernel widths that oneDNN's CPU NHWC depth-wise kernel runs slowly (table above)."""
    extra = _cpu_widen_table().get(weight.shape[-1], 0)
    if not extra or not _cpu_nhwc(x):
        return weight, pad4
    left, right, top, bottom = pad4
    return F.pad(weight, (extra, extra, 0, 0)), (left + extra, right + extra, top, bottom)


# oneDNN's bf16 NHWC depth-wise kernel on CPU never returns for 16 or fewer channels and kernel widths >= 15
# (oneDNN 3.12 in torch 2.13, AVX-512-bf16; found with MobileNetV2-nano's 8-channel 13x13 kernel widened to 13x15;
# also e.g. an unmodified 3x51 strip on 16 channels). Those problems are computed in fp32 and cast back.
_BF16_NHWC_HANG_MAX_CHANNELS = 16
_BF16_NHWC_HANG_MIN_WIDTH = 14


def _bf16_nhwc_would_hang(x: Tensor, weight: Tensor) -> bool:
    return (x.dtype == torch.bfloat16 and x.shape[1] <= _BF16_NHWC_HANG_MAX_CHANNELS
            and weight.shape[-1] >= _BF16_NHWC_HANG_MIN_WIDTH and _cpu_nhwc(x))


def _live_taps(size: int, k: int, before: int, after: int) -> tuple[int, int]:
    """The kernel taps ``[first, last]`` along one axis that ever meet the input (stride 1): with input length
    ``size`` and ``before`` / ``after`` zero padding, output ``o`` reads input ``o - before + t`` for tap ``t``,
    so a tap is live iff some output reads a real input element through it."""
    n_out = size + before + after - k + 1
    return max(0, before - n_out + 1), min(k - 1, size - 1 + before)


def _crop_dead_taps(hw: tuple[int, int], kernel_hw: tuple[int, int], pad4: tuple[int, int, int, int]
                    ) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """Where a kernel is larger than the input plus its padding can use (RepLKNet's 31x31 kernel on a 14x14 or
    7x7 map, a 3x48 strip on a 14-wide map), the outer taps only ever multiply the zero padding.

    Returns ``(rows0, rows1, cols0, cols1)``, the live part of the kernel (inclusive), and the F.pad-style padding
    that gives the same output with the kernel cut to it (exactly the same values: the dropped products are all
    zero). Leaves both unchanged where every tap is live."""
    (h, w), (kh, kw) = hw, kernel_hw
    left, right, top, bottom = pad4
    r0, r1 = _live_taps(h, kh, top, bottom)
    c0, c1 = _live_taps(w, kw, left, right)
    # output size kept: the far side's padding shrinks by what the cut removed there
    return (r0, r1, c0, c1), (left - c0, right - (kw - 1 - c1), top - r0, bottom - (kh - 1 - r1))


def _cpu_kernel(x: Tensor, weight: Tensor, pad4: tuple[int, int, int, int]
                ) -> tuple[Tensor, tuple[int, int, int, int]]:
    """The kernel and padding a CPU/GPU library conv gets: dead taps cut (:func:`_crop_dead_taps`: RepLKNet-31B's
    stage-3 31x31 kernels do 27x27 taps, its stage-4 ones 13x13), then slow widths widened
    (:func:`_widen_for_cpu`). A cut of the columns that widening would undo (a 15-wide strip on a 7-wide map cut
    to 13, widened back to 15) is not made."""
    kh, kw = weight.shape[-2:]
    (r0, r1, c0, c1), cut = _crop_dead_taps(tuple(x.shape[-2:]), (kh, kw), pad4)
    if c1 - c0 + 1 + 2 * _cpu_widen_table().get(c1 - c0 + 1, 0) * _cpu_nhwc(x) >= kw:  # keep the columns
        c0, c1 = 0, kw - 1
        cut = (pad4[0], pad4[1], cut[2], cut[3])
    if (r0, r1, c0, c1) != (0, kh - 1, 0, kw - 1):
        weight, pad4 = weight[..., r0:r1 + 1, c0:c1 + 1], cut
    return _widen_for_cpu(x, weight, pad4)


def _symmetric(x: Tensor, weight: Tensor, pad4: tuple[int, int, int, int]
               ) -> tuple[Tensor, Tensor, tuple[int, int]]:
    """``(x, weight, (ph, pw))`` such that ``F.conv2d(x, weight, padding=(ph, pw), groups=C)`` is the depth-wise
    conv of the inputs with F.pad-style ``pad4`` (a kernel already widened by :func:`_widen_for_cpu`): asymmetric
    padding turned into zero taps (small kernels, CPU channels_last) or, failing that, a padded copy of ``x``."""
    left, right, top, bottom = pad4
    if (left, top) == (right, bottom):
        return x, weight, (top, left)
    kh, kw = weight.shape[-2:]
    pw, ph = max(left, right), max(top, bottom)
    extra_taps = (kh + 2 * ph - top - bottom) * (kw + 2 * pw - left - right) - kh * kw
    if (kh * kw <= _MAX_ZERO_TAP_KERNEL or _cpu_nhwc(x)) and extra_taps <= _MAX_ZERO_TAP_FRACTION * kh * kw:
        return x, F.pad(weight, (pw - left, pw - right, ph - top, ph - bottom)), (ph, pw)
    sw, sh = min(left, right), min(top, bottom)
    return F.pad(x, (left - sw, right - sw, top - sh, bottom - sh)), weight, (sh, sw)


def _conv(x: Tensor, weight: Tensor, bias: Tensor | None, pad4: tuple[int, int, int, int]) -> Tensor:
    """F.conv2d with F.pad-style (left, right, top, bottom) padding, possibly asymmetric (dead taps cut and slow
    CPU widths widened by :func:`_cpu_kernel`)."""
    weight, pad4 = _cpu_kernel(x, weight, pad4)
    if _bf16_nhwc_would_hang(x, weight):
        with torch.autocast(x.device.type, enabled=False):  # autocast would cast the fp32 inputs back
            return _conv(x.float(), weight.float(), None if bias is None else bias.float(), pad4).to(x.dtype)
    x, weight, padding = _symmetric(x, weight, pad4)
    return F.conv2d(x, weight, bias, padding=padding, groups=x.shape[1])


def _transposed_padding(pad4: tuple[int, int, int, int], kernel_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """Padding of the adjoint problem (grad_input = correlation of grad_out with the flipped kernel)."""
    kh, kw = kernel_hw
    left, right, top, bottom = pad4
    return (kw - 1 - left, kw - 1 - right, kh - 1 - top, kh - 1 - bottom)


def _conv_any_pad(x: Tensor, weight: Tensor, bias: Tensor | None, pad4: tuple[int, int, int, int]) -> Tensor:
    """_conv that also accepts negative paddings (they crop)."""
    if min(pad4) < 0:
        x = F.pad(x, tuple(min(p, 0) for p in pad4))
        pad4 = tuple(max(p, 0) for p in pad4)
    return _conv(x, weight, bias, pad4)


def _to_channels_last(x: Tensor) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def _forward_impl(x: Tensor, weight: Tensor, bias: Tensor | None, pad4: tuple[int, int, int, int],
                  impl: str, fallback: str = "") -> Tensor:
    """The forward of every path (no autograd). ``fallback``: what the Triton op does when a kernel fails ("":
    raise; an autoselect tag: warn once and compute with PyTorch; see :func:`dwconv2d`)."""
    if impl == "triton":
        from lkvision.ops.kernels import triton_dwconv

        return triton_dwconv.triton_dwconv2d(x, weight, bias, pad4, fallback=fallback)
    if impl in ("channels_last", "custom"):
        # the NHWC kernels (oneDNN on CPU, cuDNN on CUDA) are by far the fastest for large strips
        return _conv_any_pad(_to_channels_last(x), weight, bias, pad4)
    return _conv_any_pad(x, weight, bias, pad4)


def dwconv2d_grad_input(grad_out: Tensor, weight: Tensor, pad4: tuple[int, int, int, int],
                        impl: str = "custom") -> Tensor:
    """Gradient w.r.t. the input: a depth-wise correlation of ``grad_out`` with the flipped kernel."""
    return _forward_impl(grad_out, weight.flip(-1, -2), None, _transposed_padding(pad4, weight.shape[-2:]), impl)


def dwconv2d_grad_weight(grad_out: Tensor, x: Tensor, kernel_hw: tuple[int, int],
                         pad4: tuple[int, int, int, int]) -> Tensor:
    """Gradient w.r.t. the weight, (C, 1, KH, KW): ``gw[c,u,v] = sum_{b,y,x} g[b,c,y,x] xpad[b,c,y+u,x+v]``.

    ONE depth-wise conv2d with the batch folded into the channels: the padded input as (1, B*C, Hp, Wp),
    the output gradient as a (B*C, 1, Ho, Wo) kernel, giving (1, B*C, KH, KW), then a sum over the batch.
    Measured on CPU it is 10-100x faster than PyTorch's own depth-wise weight gradient for long strips.
    float16 accumulates in float32. On CPU, bfloat16 runs oneDNN's bf16 kernel on the NCHW fold (``jit_dw``,
    fp32 accumulation inside; 1.2-4x faster than casting to fp32 at SW-tiny's strips) and sums the batch in
    fp32, and float32 folds the input as channels_last (oneDNN's NHWC ``brdgmm_dw`` kernel: 1.1-3x faster
    than NCHW there). Not bf16 on the NHWC fold: oneDNN's bf16 NHWC kernel hangs for some of these problems
    with 2 threads (e.g. 72 channels, a 14 x 15 kernel). Elsewhere bfloat16 is cast to fp32 as well.

    Large kernels in eager CPU calls (fp32/fp64, :func:`lkvision.ops.dwconv_fft.fft_eligible`): the faster of
    that conv and the FFT form (:func:`lkvision.ops.dwconv_fft.dwconv2d_grad_weight_fft`), timed once per
    problem (autoselect op ``"dwconv2d_grad_weight_cpu"``; default and ``LKVISION_AUTOSELECT=0``: the conv)."""
    kh, kw = kernel_hw
    (r0, r1, c0, c1), cut = _crop_dead_taps(tuple(x.shape[-2:]), kernel_hw, pad4)
    if (r0, r1, c0, c1) != (0, kh - 1, 0, kw - 1):  # dead taps (see _crop_dead_taps) have a zero gradient
        live = dwconv2d_grad_weight(grad_out, x, (r1 - r0 + 1, c1 - c0 + 1), cut)
        return F.pad(live, (c0, kw - 1 - c1, r0, kh - 1 - r1))
    if _eager_no_grad(grad_out, x) and dwconv_fft.fft_eligible(x, kernel_hw, pad4):
        return _direct_or_fft("dwconv2d_grad_weight_cpu", x, (grad_out,),
                              lambda: _grad_weight_direct(grad_out, x, kernel_hw, pad4),
                              lambda: dwconv_fft.dwconv2d_grad_weight_fft(grad_out, x, kernel_hw, pad4), pad4)
    return _grad_weight_direct(grad_out, x, kernel_hw, pad4)


def _grad_weight_direct(grad_out: Tensor, x: Tensor, kernel_hw: tuple[int, int],
                        pad4: tuple[int, int, int, int]) -> Tensor:
    """:func:`dwconv2d_grad_weight` as one batch-folded library conv (every tap live)."""
    b, c, ho, wo = grad_out.shape
    kh, kw = kernel_hw
    cpu = grad_out.device.type == "cpu"
    half = grad_out.dtype in (torch.float16, torch.bfloat16)
    work = torch.float32 if half and not (cpu and grad_out.dtype == torch.bfloat16) else grad_out.dtype
    xp = F.pad(x.to(work), pad4)
    hp, wp = xp.shape[-2:]
    if cpu and work == torch.float32:  # (1, B*C, Hp, Wp) channels_last = memory (Hp, Wp, B, C): one copy
        inp = xp.permute(2, 3, 0, 1).reshape(1, hp, wp, b * c).permute(0, 3, 1, 2)
    else:
        inp = xp.contiguous().reshape(1, b * c, hp, wp)
    g = grad_out.to(work).contiguous()
    gw = F.conv2d(inp, g.reshape(b * c, 1, ho, wo), groups=b * c)  # (1, B*C, KH, KW)
    return gw.reshape(b, c, kh, kw).sum(0, dtype=torch.float32 if half else None).reshape(c, 1, kh, kw).to(
        grad_out.dtype)


def _triton_reason(x: Tensor, weight: Tensor, bias: Tensor | None, pad4: tuple[int, int, int, int],
                   needs_grad: bool) -> str | None:
    """Why the Triton kernels cannot serve this problem (None: they can): ``lkvision.ops.kernels``' can_run check
    of the platform (triton, device, dtype, capability), shapes and launch limits, forward and backward."""
    from lkvision.ops import kernels  # the package never imports triton

    return kernels.can_run_dwconv2d(x, weight, bias, pad4, needs_grad=needs_grad)


# ----------------------------------------------------------------------------------------------- impl="auto"
_CUDA_AUTO_DEFAULT = "channels_last"  # cuDNN NHWC: the choice when nothing may be measured and nothing is cached


_DEVICE_NAMES: dict[torch.device, str] = {}


def _device_name(device: torch.device) -> str:
    """The GPU's name (so that a table from another GPU never matches); a plain dict, traceable by dynamo, and
    get_device_properties (which dynamo constant-folds) on a miss."""
    name = _DEVICE_NAMES.get(device)
    if name is None:
        name = torch.cuda.get_device_properties(device).name if device.type == "cuda" else device.type
        _DEVICE_NAMES[device] = name
    return name


def _memory_layout(x: Tensor) -> str:
    if x.is_contiguous():
        return "contiguous"
    if x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "strided"


def _auto_key(x: Tensor, weight: Tensor, pad4: tuple[int, int, int, int], train: bool) -> tuple:
    """The autoselect key of a dwconv2d problem: everything that changes which path is fastest."""
    b, c, h, w = x.shape
    kh, kw = weight.shape[-2:]
    dev_type = x.device.type
    autocast = str(torch.get_autocast_dtype(dev_type)) if torch.is_autocast_enabled(dev_type) else None
    return (str(x.device), _device_name(x.device), str(x.dtype), _memory_layout(x), b, c, h, w, kh, kw,
            tuple(pad4), train, autocast)


def _cuda_auto_impl(x: Tensor, weight: Tensor, bias: Tensor | None,
                    pad4: tuple[int, int, int, int]) -> tuple[str, str]:
    """impl="auto" on CUDA: ``(impl, fallback)``, the fastest of Triton (where its can_run check passes),
    channels_last (cuDNN NHWC) and torch (NCHW), timed once per problem by :func:`lkvision.ops.autoselect.choose`
    (forward + backward when a gradient will be needed), then cached; "channels_last" where nothing may be
    measured (see docs/ops.md). ``fallback`` is the tag the Triton op gets (a failure falls back to PyTorch)."""
    train = needs_grad(x, weight, bias)
    # _forward_impl is what dwconv2d runs for these three paths (the Triton one has its own autograd); timed
    # candidates raise on failure (fallback=""), so that a failing kernel is dropped, not timed as PyTorch
    candidates = {name: autoselect.candidate(lambda x_, w_, b_, name=name: _forward_impl(x_, w_, b_, pad4, name),
                                             (x, weight, bias), train)
                  for name in ("triton", "channels_last", "torch")}
    return autoselect.triton_choice("dwconv2d", lambda: _auto_key(x, weight, pad4, train),
                                    lambda: _triton_reason(x, weight, bias, pad4, train), candidates,
                                    _CUDA_AUTO_DEFAULT, "auto", (x, weight, bias))


def _cpu_train_impl(x: Tensor, weight: Tensor, bias: Tensor | None, pad4: tuple[int, int, int, int]) -> str:
    """impl="auto" for an eager CPU call that needs a gradient: "custom" (our backward: a transposed conv and a
    batch-folded conv for the weight) or "channels_last" (PyTorch's own depth-wise backward), whichever one
    training step (forward + backward) of this problem was measured faster (autoselect op
    ``"dwconv2d_cpu_train"``). Ours wins by 10-100x for long strips; on an AMD Zen 3 PyTorch's wins for small
    square kernels on large maps (5x5 on (4, 80, 56, 56): 12.6 vs 17.5 ms)."""
    key = (*_auto_key(x, weight, pad4, True), torch.get_num_threads())
    candidates = {
        "custom": autoselect.candidate(lambda x_, w_, b_: _dwconv2d_op(x_, w_, b_, list(pad4), "custom"),
                                       (x, weight, bias), True),
        "channels_last": autoselect.candidate(lambda x_, w_, b_: _forward_impl(x_, w_, b_, pad4, "channels_last"),
                                              (x, weight, bias), True)}
    return autoselect.choose("dwconv2d_cpu_train", key, candidates, "custom", tensors=(x, weight),
                             timer=autoselect.measure_min)


def _auto_impl(x: Tensor, weight: Tensor, bias: Tensor | None, pad4: tuple[int, int, int, int]) -> tuple[str, str]:
    """The choice for impl="auto" (docs/ops.md), ``(impl, fallback)``: CPU -> "custom" (measured once, see docs;
    in eager training measured per problem against PyTorch's own backward, :func:`_cpu_train_impl`);
    CUDA (``autoselect.MEASURED_DEVICE_TYPES``) -> measured per problem by :func:`_cuda_auto_impl`."""
    if autoselect.measured_device(x):
        return _cuda_auto_impl(x, weight, bias, pad4)
    if x.device.type == "cpu" and needs_grad(x, weight, bias) and fast_cpu_path_ok(x, weight, bias):
        return _cpu_train_impl(x, weight, bias, pad4), ""
    return "custom", ""


# ----------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("lkvision::dwconv2d", mutates_args=())
def _dwconv2d_op(x: Tensor, weight: Tensor, bias: Tensor | None, padding: list[int], impl: str) -> Tensor:
    """Depth-wise conv forward (custom op so that torch.compile/export see one node with a fast backward)."""
    return _forward_impl(x, weight, bias, tuple(padding), impl)


@_dwconv2d_op.register_fake
def _(x, weight, bias, padding, impl):
    left, right, top, bottom = padding
    ho = x.shape[2] + top + bottom - weight.shape[2] + 1
    wo = x.shape[3] + left + right - weight.shape[3] + 1
    out = x.new_empty(x.shape[0], x.shape[1], ho, wo)
    if impl in ("channels_last", "custom"):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


@torch.library.custom_op("lkvision::dwconv2d_grad_weight", mutates_args=())
def _dwconv2d_grad_weight_op(grad_out: Tensor, x: Tensor, kh: int, kw: int, padding: list[int]) -> Tensor:
    """Weight gradient of lkvision::dwconv2d: (C, 1, KH, KW)."""
    return dwconv2d_grad_weight(grad_out, x, (kh, kw), tuple(padding))


@_dwconv2d_grad_weight_op.register_fake
def _(grad_out, x, kh, kw, padding):
    return grad_out.new_empty(grad_out.shape[1], 1, kh, kw)


def _setup_context(ctx, inputs, output):
    x, weight, bias, padding, impl = inputs
    ctx.save_for_backward(x, weight)
    ctx.padding, ctx.impl, ctx.has_bias = list(padding), impl, bias is not None


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    gx = gw = gb = None
    impl = ctx.impl if ctx.impl != "torch" else "torch"
    if ctx.needs_input_grad[0]:
        tpad = list(_transposed_padding(tuple(ctx.padding), weight.shape[-2:]))
        gx = _dwconv2d_op(grad_out, weight.flip(-1, -2).contiguous(), None, tpad, impl)
    if ctx.needs_input_grad[1]:
        gw = _dwconv2d_grad_weight_op(grad_out, x, weight.shape[2], weight.shape[3], ctx.padding)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        gb = grad_out.sum((0, 2, 3))
    return gx, gw, gb, None, None


_dwconv2d_op.register_autograd(_backward, setup_context=_setup_context)


def _register_flop_formulas() -> None:
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.lkvision.dwconv2d)
    def _dw_flops(x_shape, w_shape, bias_shape, padding, impl, *, out_shape=None, **kwargs) -> int:
        b, c, ho, wo = out_shape
        return 2 * b * c * ho * wo * w_shape[2] * w_shape[3]

    @register_flop_formula(torch.ops.lkvision.dwconv2d_grad_weight)
    def _dw_gw_flops(g_shape, x_shape, kh, kw, padding, *, out_shape=None, **kwargs) -> int:
        b, c, ho, wo = g_shape
        return 2 * b * c * ho * wo * kh * kw


_register_flop_formulas()


# ----------------------------------------------------------------------------------------------- public API
@fx_leaf
def dwconv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, padding: PaddingArg = "same", *,
             impl: str = "auto") -> Tensor:
    """Depth-wise 2-D convolution (cross-correlation), stride 1, dilation 1, groups = C.

    Args:
        x: (B, C, H, W) floating-point input, contiguous or channels_last.
        weight: (C, 1, KH, KW), same dtype as ``x``.
        bias: optional (C,).
        padding: ``"same"`` (KH//2, KW//2), an int, ``(ph, pw)``, or F.pad-style ``(left, right, top, bottom)``.
        impl: one of ``DWCONV_IMPLS``; "auto" takes the measured fastest path for the device. "triton" forces the
            Triton kernels: a RuntimeError names the reason where they cannot serve the problem, and a kernel
            failure raises. Under "auto" a Triton kernel that fails (forward or backward) is dropped for the
            problem and the PyTorch path serves it, with one ``autoselect.BackendFallbackWarning`` per reason.

    Returns:
        (B, C, H + top + bottom - KH + 1, W + left + right - KW + 1). The "custom" and "channels_last" paths
        return a channels_last tensor (same values; NHWC is what the fast kernels produce).
    """
    if impl not in DWCONV_IMPLS:
        raise ValueError(f"dwconv2d: impl must be one of {DWCONV_IMPLS}, got {impl!r}")
    if isinstance(x, Tensor) and isinstance(weight, Tensor):
        x, weight, bias = autocast_inputs(x, weight, bias)  # custom ops are invisible to autocast
    _check_inputs(x, weight, bias)
    pad4 = normalize_padding(padding, tuple(weight.shape[-2:]))
    if x.shape[2] + pad4[2] + pad4[3] < weight.shape[2] or x.shape[3] + pad4[0] + pad4[1] < weight.shape[3]:
        raise ValueError(f"dwconv2d: padded input {tuple(x.shape[2:])} + {pad4} is smaller than the kernel "
                         f"{tuple(weight.shape[2:])}")
    fallback = ""  # explicit impl="triton": kernel failures raise
    auto = impl == "auto"
    if auto:  # resolved here, before the op call: the op's fake impl derives the layout from impl
        impl, fallback = _auto_impl(x, weight, bias, pad4)
    elif impl == "triton":
        why = _triton_reason(x, weight, bias, pad4, needs_grad(x, weight, bias))
        if why is not None:
            raise RuntimeError(f"dwconv2d: impl='triton' cannot run here: {why} (impl='auto' picks a path that can)")
    if impl in ("torch", "channels_last", "triton") or _eager_no_grad(x, weight, bias):
        # plain PyTorch autograd (the baselines), the Triton module's own custom op with its own backward, or
        # an eager call that needs no gradient: the custom op (for autograd, torch.compile and export) would
        # only add its dispatch cost (~0.1 ms a call on CPU, 5 ms of an SW-tiny forward)
        if auto and impl == "custom" and dwconv_fft.fft_eligible(x, tuple(weight.shape[-2:]), pad4):
            return _direct_or_fft("dwconv2d_cpu", x, (weight,), lambda: _forward_impl(x, weight, bias, pad4, impl),
                                  lambda: dwconv_fft.dwconv2d_fft(x, weight, bias, pad4), pad4)
        return _forward_impl(x, weight, bias, pad4, impl, fallback)
    return _dwconv2d_op(x, weight, bias, list(pad4), impl)


def _direct_or_fft(op: str, x: Tensor, weights: tuple[Tensor, ...], direct, fft, *pad4s) -> Tensor:
    """An eager no-grad CPU problem that both oneDNN's direct kernel and the FFT (:mod:`.dwconv_fft`) can serve:
    the faster of the two, timed once per problem (autoselect ``op``; default and ``LKVISION_AUTOSELECT=0``:
    direct; ``LKVISION_FORCE_BACKEND=fft`` forces the FFT where it is offered)."""
    key = (*x.shape, str(x.dtype), _memory_layout(x), tuple(tuple(w.shape[-2:]) for w in weights), pad4s,
           torch.get_num_threads())
    name = autoselect.choose(op, key, {"direct": direct, "fft": fft}, "direct", tensors=(x, *weights),
                             timer=autoselect.measure_min)
    return fft() if name == "fft" else direct()


def _eager_no_grad(*tensors: Tensor | None) -> bool:
    """A call on plain CPU tensors, outside compile/export/tracing and dispatch modes, that needs no gradient."""
    return not needs_grad(*tensors) and fast_cpu_path_ok(*tensors)


# ----------------------------------------------------------------------------------------------- sums of convs
def dwconv2d_sum_reference(x: Tensor, weights: list[Tensor], biases: list[Tensor | None], paddings: list,
                           impl: str = "auto") -> Tensor:
    """``sum_i dwconv2d(x, weights[i], biases[i], paddings[i], impl=impl)``: several depth-wise convs of one input
    (the strips of a SLaK or ShiftWise layer's deploy form), added in order."""
    out = dwconv2d(x, weights[0], biases[0], paddings[0], impl=impl)
    for w, b, p in zip(weights[1:], biases[1:], paddings[1:]):
        out = out + dwconv2d(x, w, b, p, impl=impl)
    return out


@functools.cache
def onednn_conv_add_available(dtype: torch.dtype) -> bool:
    """True when oneDNN's depth-wise conv with an in-place sum (``mkldnn::_convolution_pointwise_.binary``,
    ``other += conv(x)``) runs here for ``dtype`` and gives conv + add (probed once on a tiny problem)."""
    if dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return False
    try:
        x = torch.arange(2 * 16 * 5 * 5, dtype=dtype).reshape(2, 16, 5, 5).contiguous(
            memory_format=torch.channels_last) / 100
        w = torch.ones(16, 1, 3, 3, dtype=dtype)
        acc = F.conv2d(x, w, padding=1, groups=16)
        want = acc + F.conv2d(x, w, torch.ones(16, dtype=dtype), padding=1, groups=16)
        got = _conv_add_(acc, x, w, torch.ones(16, dtype=dtype), (1, 1))
        return got is acc and bool(torch.allclose(got, want, rtol=1e-2, atol=1e-2))
    except Exception:  # noqa: BLE001 - any failure (missing op, unsupported ISA) means: use the reference
        return False


def _conv_add_(acc: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, padding: tuple[int, int]) -> Tensor:
    """``acc += conv2d(x, weight, bias, padding, groups=C)`` in one oneDNN call (acc and x channels_last)."""
    return torch.ops.mkldnn._convolution_pointwise_.binary(acc, x, weight, bias, list(padding), [1, 1], [1, 1],
                                                            x.shape[1], "add", None, None, [], None)


@fx_traces_as(dwconv2d_sum_reference)
def dwconv2d_sum(x: Tensor, weights: list[Tensor], biases: list[Tensor | None], paddings: list,
                 impl: str = "auto") -> Tensor:
    """:func:`dwconv2d_sum_reference`, with every conv after the first accumulated into the first one's output
    by oneDNN (one fused conv + add, in place) on CPU when no gradient is needed: no separate add pass and no
    extra full-size buffer per term (SW-tiny's deploy strips: 1.1-1.6x faster per layer, measured in
    ``docs/ops.md``). Elsewhere, and for terms whose padding needs a padded copy of ``x``, the reference.

    x (B, C, H, W); ``weights[i]`` (C, 1, KH_i, KW_i) with ``paddings[i]`` (any :func:`dwconv2d` padding) giving
    the same (B, C, H', W') output for every i; ``biases[i]`` (C,) or None. Returns (B, C, H', W')."""
    if not (len(weights) == len(biases) == len(paddings)) or not weights:
        raise ValueError(f"dwconv2d_sum: need as many weights, biases and paddings (at least one), got "
                         f"{len(weights)}, {len(biases)}, {len(paddings)}")
    if impl not in ("auto", "custom", "channels_last") or len(weights) == 1:
        return dwconv2d_sum_reference(x, weights, biases, paddings, impl)
    if isinstance(x, Tensor) and all(isinstance(w, Tensor) for w in weights):
        cast = autocast_inputs(x, *weights, *biases)
        x, weights, biases = cast[0], list(cast[1:1 + len(weights)]), list(cast[1 + len(weights):])
    if not _eager_no_grad(x, *weights, *biases):
        return dwconv2d_sum_reference(x, weights, biases, paddings, impl)
    if impl == "auto":  # (past _eager_no_grad: plain CPU tensors)
        pad4s = [normalize_padding(p, tuple(w.shape[-2:])) for w, p in zip(weights, paddings)]
        kernel_hw, merged_pad4, _ = dwconv_fft.merge_geometry([tuple(w.shape[-2:]) for w in weights], pad4s)
        if dwconv_fft.fft_eligible(x, kernel_hw, merged_pad4) and all(b is None or b.dtype == x.dtype for b in biases):
            return _direct_or_fft("dwconv2d_sum_cpu", x, tuple(weights),
                                  lambda: _sum_in_place(x, weights, biases, paddings, impl),
                                  lambda: dwconv_fft.dwconv2d_sum_fft(x, weights, biases, pad4s), *pad4s)
    return _sum_in_place(x, weights, biases, paddings, impl)


def _sum_in_place(x: Tensor, weights: list[Tensor], biases: list[Tensor | None], paddings: list,
                  impl: str) -> Tensor:
    """dwconv2d_sum's oneDNN path: each later term added into the first one's output in place (see there)."""
    if not onednn_conv_add_available(x.dtype):
        return dwconv2d_sum_reference(x, weights, biases, paddings, impl)
    x = x.contiguous(memory_format=torch.channels_last)  # once, for every term (the CPU kernels' layout)
    out = dwconv2d(x, weights[0], biases[0], paddings[0], impl=impl)  # checks x and weights[0]; channels_last
    for w, b, p in zip(weights[1:], biases[1:], paddings[1:]):
        _check_inputs(x, w, b)
        pad4 = normalize_padding(p, tuple(w.shape[-2:]))
        wide, wide_pad4 = _cpu_kernel(x, w, pad4)
        xs, ws, padding = _symmetric(x, wide, wide_pad4)
        out_hw = (xs.shape[2] + 2 * padding[0] - ws.shape[2] + 1, xs.shape[3] + 2 * padding[1] - ws.shape[3] + 1)
        if out_hw != tuple(out.shape[2:]):
            raise ValueError(f"dwconv2d_sum: the terms give different output sizes: {tuple(out.shape[2:])} and "
                             f"{out_hw} (kernel {tuple(w.shape[-2:])}, padding {pad4})")
        if (xs is x and out.is_contiguous(memory_format=torch.channels_last) and not _bf16_nhwc_would_hang(x, wide)
                and (b is None or b.dtype == x.dtype)):
            out = _conv_add_(out, x, ws, b, padding)
        else:
            out = out + _conv(x, w, b, pad4)
    return out


# ----------------------------------------------------------------------------------------------- dilated convs
def dwconv2d_dilated_reference(x: Tensor, weight: Tensor, bias: Tensor | None, dilation: int) -> Tensor:
    """A depth-wise conv with dilation ``dilation`` and "same" padding ``dilation * (K - 1) // 2`` (odd K):
    ``F.conv2d`` (UniRepLKNet's dilated branches as the official code runs them)."""
    kh, kw = weight.shape[-2:]
    return F.conv2d(x, weight, bias, padding=(dilation * (kh - 1) // 2, dilation * (kw - 1) // 2),
                    dilation=dilation, groups=x.shape[1])


def _space_to_batch(x: Tensor, weight: Tensor, bias: Tensor | None, d: int) -> Tensor:
    """The dilated conv as an undilated one on the d x d interleaved sub-grids: output (h, w) = (d i + r, d j + s)
    only reads inputs of sub-grid (r, s), at sub-grid offsets of the undilated kernel. The map is zero-extended to
    a multiple of d (those zeros are the padding the reference sees), the sub-grids go to the batch dimension,
    :func:`dwconv2d` ("same") runs, and the result is interleaved back (differentiable). Both rearrangements work
    on the NHWC order (one copy each way, channels_last in and out: what the depth-wise kernel reads and writes,
    and what the BN and the sum of UniRepLKNet's branches that follow read fastest); a map that was extended is
    cut back with one more channels_last copy."""
    b, c, h, w = x.shape
    hp, wp = -(-h // d) * d, -(-w // d) * d
    if (hp, wp) != (h, w):
        x = F.pad(x, (0, wp - w, 0, hp - h))
    hs, ws = hp // d, wp // d
    sub = (x.permute(0, 2, 3, 1).reshape(b, hs, d, ws, d, c).permute(0, 2, 4, 1, 3, 5)
           .reshape(b * d * d, hs, ws, c).permute(0, 3, 1, 2))
    y = dwconv2d(sub, weight, bias, "same").permute(0, 2, 3, 1)  # (B d d, hs, ws, C)
    y = y.reshape(b, d, d, hs, ws, c).permute(0, 3, 1, 4, 2, 5).reshape(b, hp, wp, c).permute(0, 3, 1, 2)
    return y if (hp, wp) == (h, w) else y[..., :h, :w].contiguous(memory_format=torch.channels_last)


@fx_traces_as(dwconv2d_dilated_reference)
def dwconv2d_dilated(x: Tensor, weight: Tensor, bias: Tensor | None, dilation: int) -> Tensor:
    """:func:`dwconv2d_dilated_reference`, on CPU the faster of it and the sub-grid form (:func:`_space_to_batch`),
    measured once per problem (forward, or forward + backward when a gradient is needed; autoselect op
    ``"dwconv2d_dilated_cpu"``). PyTorch's CPU kernels for dilated depth-wise convs are slow for some kernels:
    a 7x7 kernel with dilation 2 on (4, 320, 14, 14) takes 20 ms forward and 44 ms forward + backward, the
    sub-grid form 2.1 and 11 ms (AMD Zen 3, one thread); 3x3 kernels with dilation 3 keep oneDNN's own.

    x (B, C, H, W); weight (C, 1, K, K) with odd K; bias (C,) or None. Returns (B, C, H, W)."""
    if dilation == 1 or x.device.type != "cpu" or x.dim() != 4 or weight.shape[-1] % 2 == 0:
        return dwconv2d_dilated_reference(x, weight, bias, dilation)
    if not fast_cpu_path_ok(x, weight, bias):
        return dwconv2d_dilated_reference(x, weight, bias, dilation)
    train = needs_grad(x, weight, bias)
    key = (*x.shape, str(x.dtype), _memory_layout(x), *weight.shape[-2:], dilation, bias is not None, train,
           torch.get_num_threads())
    candidates = {name: autoselect.candidate(lambda x_, w_, b_, f=f: f(x_, w_, b_, dilation), (x, weight, bias), train)
                  for name, f in (("torch", dwconv2d_dilated_reference), ("space_to_batch", _space_to_batch))}
    name = autoselect.choose("dwconv2d_dilated_cpu", key, candidates, "torch", tensors=(x, weight),
                             timer=autoselect.measure_min)
    return _space_to_batch(x, weight, bias, dilation) if name == "space_to_batch" else \
        dwconv2d_dilated_reference(x, weight, bias, dilation)
