"""Large depth-wise convolutions on CPU through the FFT (inference and the weight gradient), and one kernel for a
sum of strips.

A depth-wise conv with a K x K kernel costs 2 K^2 multiply-adds per output; through the FFT it costs two real
2-D FFTs of the (zero-extended) map and one complex multiply per frequency, whatever K. On a 2-core AMD Zen 3
(AVX2), one thread, batch 4, a 31x31 kernel on a 56x56 map with 96 channels (ConvNeXt-LK-T / RepLKNet-31B stage 1)
takes 76 ms in oneDNN's direct kernel and 29 ms through the FFT; 29x29 on 28x28 36 vs 25 ms; on 14x14 maps, or
for 13x13 kernels, the direct kernel wins. Which is faster depends on the CPU and the problem, so
:func:`lkvision.ops.dwconv2d` and :func:`lkvision.ops.dwconv2d_sum` time both once per problem on CPU when no
gradient is needed (:mod:`lkvision.ops.autoselect`, ops ``"dwconv2d_cpu"`` / ``"dwconv2d_sum_cpu"``) and cache
the faster.

The sum of several depth-wise convs of one input (a SLaK or ShiftWise deploy form: 51x5 + 5x51, 3x51 + 51x3)
is one conv with the kernels laid over each other (:func:`merge_terms`), so through the FFT it costs one conv.

The weight gradient of a depth-wise conv, ``gw[c, u, v] = sum_{b, y, x} g[b, c, y, x] xpad[b, c, y + u, x + v]``,
is a cross-correlation of each (b, c) plane of the output gradient with the input plane, summed over the batch:
through the FFT the batch sum happens on the spectra, so only C inverse transforms run
(:func:`dwconv2d_grad_weight_fft`). oneDNN's direct form of it (a conv whose kernel is the whole output gradient
plane) is slow for large kernels: SLaK-T's 51x5 strip on (4, 124, 56, 56) takes 219 ms direct, 52 ms through the
FFT, a 31x31 kernel on (4, 128, 56, 56) 910 vs 57 ms (Zen 3, one thread). The training backward of
:func:`lkvision.ops.dwconv2d` times both once per problem (autoselect op ``"dwconv2d_grad_weight_cpu"``).

Exactness: the FFT rounds differently from a direct sum: the error is ~1e-6 of the largest output in fp32
(tested against float64). Only float32 and float64 (``torch.fft`` has no bf16 on CPU).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["dwconv2d_fft", "dwconv2d_sum_fft", "dwconv2d_grad_weight_fft", "merge_terms", "merge_geometry",
           "fft_eligible", "fft_size", "MIN_FFT_TAPS", "MIN_FFT_ELEMENTS"]

#: kernels with fewer taps are never offered the FFT (the direct kernel wins by far; keeps tests on small
#: problems on one deterministic path)
MIN_FFT_TAPS = 150
#: inputs with fewer elements (B*C*H*W) are never offered the FFT
MIN_FFT_ELEMENTS = 1 << 18


def fft_size(n: int) -> int:
    """The smallest m >= n whose only prime factors are 2, 3, 5 and 7 (sizes the FFT libraries run fast)."""
    m = max(1, n)
    while True:
        r = m
        for p in (2, 3, 5, 7):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


def _sizes(hw: tuple[int, int], kernel_hw: tuple[int, int], pad4: tuple[int, int, int, int]) -> tuple[int, int]:
    """FFT sizes (rows, cols) for which the circular convolution equals the zero-padded one on every output:
    the map plus the larger padding of the axis (and at least the kernel)."""
    (h, w), (kh, kw) = hw, kernel_hw
    left, right, top, bottom = pad4
    return fft_size(max(h + max(top, bottom), kh)), fft_size(max(w + max(left, right), kw))


def fft_eligible(x: Tensor, kernel_hw: tuple[int, int], pad4: tuple[int, int, int, int]) -> bool:
    """Whether the FFT path is offered: fp32/fp64 CPU tensor, a large kernel on a large enough input, padding
    within the kernel (every output reads at least one input column/row)."""
    kh, kw = kernel_hw
    left, right, top, bottom = pad4
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and kh * kw >= MIN_FFT_TAPS
            and x.numel() >= MIN_FFT_ELEMENTS and max(left, right) < kw and max(top, bottom) < kh)


# (ids of the weights, their versions, FFT sizes, paddings) -> (weak references, spectrum). Deploy-form weights
# do not change between calls; the weak references and version counters make a stale hit impossible.
_SPECTRA: dict[tuple, tuple] = {}
_SPECTRA_BYTES = 256 << 20  # at most this much is kept (oldest first out); a 224^2 ConvNeXt-LK-T holds ~15 MB


def _remember(key: tuple, sources: tuple[Tensor, ...], spec: Tensor) -> None:
    """Cache ``spec``: entries whose weights are gone are dropped first, then the oldest beyond the byte cap."""
    for k in [k for k, (refs, _) in _SPECTRA.items() if any(r() is None for r in refs)]:
        del _SPECTRA[k]
    _SPECTRA[key] = (tuple(weakref.ref(s) for s in sources), spec)
    total = sum(_nbytes(v[1]) for v in _SPECTRA.values())
    while total > _SPECTRA_BYTES and len(_SPECTRA) > 1:
        total -= _nbytes(_SPECTRA.pop(next(iter(_SPECTRA)))[1])


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _spectrum(build: Callable[[], Tensor], pad4: tuple[int, int, int, int], sizes: tuple[int, int],
              sources: tuple[Tensor, ...]) -> Tensor:
    """rfft2 of the kernel ``build()`` laid out for circular convolution: tap (t, u) at ((top - t) mod S_h,
    (left - u) mod S_w), so that ``irfft2(rfft2(x) * spectrum)[o, p] = sum_{t,u} x[o + t - top, p + u - left]
    w[t, u]``. Cached per ``sources`` (the parameters the kernel is made from; ``build`` runs on a miss only)."""
    key = (tuple(id(s) for s in sources), tuple(s._version for s in sources), sizes, pad4, sources[0].dtype)
    hit = _SPECTRA.get(key)
    if hit is not None and all(r() is s for r, s in zip(hit[0], sources)):
        return hit[1]
    weight = build()
    sh, sw = sizes
    kh, kw = weight.shape[-2:]
    left, _, top, _ = pad4
    placed = weight.new_zeros(weight.shape[0], sh, sw)
    placed[:, :kh, :kw] = weight[:, 0]
    placed = torch.roll(placed.flip((-2, -1)), shifts=(top + 1, left + 1), dims=(-2, -1))
    spec = torch.fft.rfft2(placed)
    _remember(key, sources, spec)
    return spec


def _rfft2(t: Tensor, sizes: tuple[int, int]) -> Tensor:
    """``torch.fft.rfft2(t, s=sizes)`` of a (B, C, H, W) map, zero-extended as a contiguous NCHW copy first:
    measured 1.7x (channels_last input) and 1.3x (NCHW) faster than letting ``rfft2`` extend it."""
    h, w = t.shape[-2:]
    return torch.fft.rfft2(F.pad(t.contiguous(), (0, sizes[1] - w, 0, sizes[0] - h)))


def _fft_conv(x: Tensor, build: Callable[[], Tensor], kernel_hw: tuple[int, int], bias: Tensor | None,
              pad4: tuple[int, int, int, int], sources: tuple[Tensor, ...]) -> Tensor:
    b, c, h, w = x.shape
    kh, kw = kernel_hw
    left, right, top, bottom = pad4
    ho, wo = h + top + bottom - kh + 1, w + left + right - kw + 1
    sizes = _sizes((h, w), kernel_hw, pad4)
    spec = _spectrum(build, pad4, sizes, sources)
    y = torch.fft.irfft2(_rfft2(x, sizes).mul_(spec), s=sizes)
    out = y[..., :ho, :wo].contiguous(memory_format=torch.channels_last)
    return out if bias is None else out.add_(bias.view(1, c, 1, 1))


def dwconv2d_fft(x: Tensor, weight: Tensor, bias: Tensor | None, pad4: tuple[int, int, int, int]) -> Tensor:
    """Depth-wise conv (stride 1, F.pad-style ``pad4``) through the FFT, no autograd.

    x (B, C, H, W) fp32/fp64; weight (C, 1, KH, KW); bias (C,) or None; each padding < its kernel size.
    Returns (B, C, H + top + bottom - KH + 1, W + left + right - KW + 1), channels_last (as the CPU direct path).
    """
    return _fft_conv(x, lambda: weight, tuple(weight.shape[-2:]), bias, pad4, (weight,))


def merge_geometry(kernel_hws: list[tuple[int, int]], pad4s: list[tuple[int, int, int, int]]
                   ) -> tuple[tuple[int, int], tuple[int, int, int, int], list[tuple[int, int]]]:
    """Size and padding of the kernel that sums several depth-wise convs of one input (all giving the same output
    size), and where each term's kernel sits in it (row, column offsets). Term i reads input offsets
    ``t - top_i`` for its taps, so the merged kernel spans the union of those offsets."""
    top = max(p[2] for p in pad4s)
    left = max(p[0] for p in pad4s)
    below = max(k[0] - 1 - p[2] for k, p in zip(kernel_hws, pad4s))  # largest offset below the output row
    after = max(k[1] - 1 - p[0] for k, p in zip(kernel_hws, pad4s))
    kh, kw = top + below + 1, left + after + 1
    (kh0, kw0), p0 = kernel_hws[0], pad4s[0]  # the output size is kept: bottom / right follow from term 0
    pad4 = (left, p0[0] + p0[1] - kw0 + kw - left, top, p0[2] + p0[3] - kh0 + kh - top)
    return (kh, kw), pad4, [(top - p[2], left - p[0]) for p in pad4s]


def merge_terms(weights: list[Tensor], biases: list[Tensor | None], pad4s: list[tuple[int, int, int, int]]
                ) -> tuple[Tensor, Tensor | None, tuple[int, int, int, int]]:
    """One depth-wise kernel (C, 1, KH, KW), bias and padding equal to the sum of several convs of one input
    (terms ``(weights[i], biases[i], pad4s[i])``; :func:`merge_geometry`): taps that coincide are added. A
    3x51 + 51x3 pair becomes one 51x51 kernel with two non-zero strips."""
    (kh, kw), pad4, offsets = merge_geometry([tuple(w.shape[-2:]) for w in weights], pad4s)
    merged = weights[0].new_zeros(weights[0].shape[0], 1, kh, kw)
    for w, (r0, c0) in zip(weights, offsets):
        merged[:, :, r0:r0 + w.shape[-2], c0:c0 + w.shape[-1]] += w
    return merged, _sum_biases(biases), pad4


def _sum_biases(biases: list[Tensor | None]) -> Tensor | None:
    present = [b for b in biases if b is not None]
    return None if not present else torch.stack(present).sum(0)


def dwconv2d_sum_fft(x: Tensor, weights: list[Tensor], biases: list[Tensor | None],
                     pad4s: list[tuple[int, int, int, int]]) -> Tensor:
    """The sum of several depth-wise convs of ``x`` as ONE FFT conv with the merged kernel (:func:`merge_terms`;
    built and transformed once per set of weights, then cached). Same shapes as :func:`dwconv2d_fft`."""
    kernel_hw, pad4, _ = merge_geometry([tuple(w.shape[-2:]) for w in weights], pad4s)
    return _fft_conv(x, lambda: merge_terms(weights, biases, pad4s)[0], kernel_hw, _sum_biases(biases), pad4,
                     tuple(weights))


def dwconv2d_grad_weight_fft(grad_out: Tensor, x: Tensor, kernel_hw: tuple[int, int],
                             pad4: tuple[int, int, int, int]) -> Tensor:
    """Weight gradient of the depth-wise conv ``dwconv2d(x, weight, padding=pad4)`` through the FFT, no autograd.

    grad_out (B, C, Ho, Wo) and x (B, C, H, W), fp32/fp64, any memory layout; each padding < its kernel size.
    Returns (C, 1, KH, KW), contiguous. With ``R = irfft2(sum_b conj(rfft2(g)) * rfft2(x))`` (sizes that keep the
    circular correlation exact, as for the conv: map + the larger padding of each axis), ``R[d]`` is
    ``sum_{b, y, x} g[y, x] x[y + d]`` for every lag ``d = (u - top, v - left)`` a tap reads, at index ``d mod S``.
    """
    kh, kw = kernel_hw
    left, _, top, _ = pad4
    sizes = _sizes(tuple(x.shape[-2:]), kernel_hw, pad4)
    spec = _rfft2(x, sizes).mul_(_rfft2(grad_out, sizes).conj()).sum(0)  # (C, S_h, S_w // 2 + 1): batch summed
    lags = torch.fft.irfft2(spec, s=sizes)
    return torch.roll(lags, shifts=(top, left), dims=(-2, -1))[:, None, :kh, :kw].contiguous()
