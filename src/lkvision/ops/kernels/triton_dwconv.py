"""Triton depth-wise convolution (stride 1, any KH x KW, asymmetric zero padding), forward and both backwards.

Public entry point: :func:`triton_dwconv2d` (differentiable through the torch.library custom op
``lkvision::triton_dwconv2d``). The generic kernels here are shared with :mod:`.triton_shiftwise`:

* ``_dw_fwd_kernel``: up to three depth-wise terms (each with its own input, kernel and offsets) summed
  into one output, or written to three outputs, plus an optional identity term and per-channel bias. One
  program computes a ``BLOCK_C x BLOCK_H x BLOCK_W`` output tile, reads every input it needs through the
  cache (the tile plus its halo) and writes the tile once. fp32 accumulation for every input dtype.
  ``grad_input`` of a depth-wise conv is the same kernel run on ``grad_out`` with the flipped kernel and the
  complementary offsets (``KH - 1 - top``, ``KW - 1 - left``).
* ``_dw_grad_weight_kernel``: ``gw[c, i, j] = sum_{b, y, x} g[b, c, y, x] * x[b, c, y + i - top, x + j - left]``
  as a deterministic two-stage reduction: each program owns (channel block, kernel row i, column block,
  split s) and writes its partial sum to ``partial[s]``; ``partial.sum(0)`` finishes. No atomics.

Both kernels take arbitrary strides, so NCHW, channels_last and non-contiguous inputs run without copies;
the tile shape family (NCHW: ``BLOCK_C = 1`` and wide rows; NHWC: a channel vector per pixel) is picked by
the output layout and autotuned per shape on the GPU. Without triton (or on CPU without ``TRITON_INTERPRET=1``)
the custom ops fall back to PyTorch, so everything imports and computes the same function everywhere.
"""

from __future__ import annotations

import collections
import contextlib
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import autocast_inputs, check_depthwise_args, device_supported, interpret_mode, is_channels_last, num_sms

__all__ = ["triton_dwconv2d", "dwconv2d_sum", "dwconv2d_reference", "dwconv_forward_terms", "dwconv_grad_weight",
           "HAS_TRITON"]

try:  # triton is optional: the module must import without it
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    HAS_TRITON = False


# Under the interpreter the kernels run one fixed small tile, unless LKVISION_TRITON_AUTOTUNE_IN_INTERPRETER=1
# asks for the autotuned wrappers (two configs each, timed on the host): a CPU test of the autotune plumbing.
FIXED_TILES = interpret_mode() and os.environ.get("LKVISION_TRITON_AUTOTUNE_IN_INTERPRETER", "0") != "1"

# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _accumulate_dw_term(acc, x_ptr, w_ptr, x_base, c, c_mask, oh, ow, H_in, W_in, sxh, sxw,
                            KH, KW, PT, PL):
        """acc[c, y, x] += sum_{i<KH, j<KW} w[c, i, j] * x[c, y + i - PT, x + j - PL] (zero outside)."""
        w_row = w_ptr + c * (KH * KW)
        for i in range(KH):
            ih = oh + (i - PT)
            mh = c_mask & (ih >= 0) & (ih < H_in)
            row_ptr = x_ptr + x_base + ih * sxh
            for j in range(KW):
                iw = ow + (j - PL)
                m = mh & (iw >= 0) & (iw < W_in)
                xv = tl.load(row_ptr + iw * sxw, mask=m, other=0.0)
                wv = tl.load(w_row + (i * KW + j), mask=c_mask, other=0.0)
                acc += xv.to(tl.float32) * wv
        return acc

    @triton.jit
    def _dw_fwd_kernel(
        x0_ptr, x1_ptr, x2_ptr, id_ptr, w0_ptr, w1_ptr, w2_ptr, bias_ptr, out0_ptr, out1_ptr, out2_ptr,
        C, H_in, W_in, H_out, W_out,
        sxb, sxc, sxh, sxw, sob, soc, soh, sow,
        KH0, KW0, PT0, PL0, KH1, KW1, PT1, PL1, KH2, KW2, PT2, PL2,
        NUM_TERMS: tl.constexpr, SEPARATE: tl.constexpr, ADD_IDENTITY: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    ):
        pid_bc = tl.program_id(0)
        pid_hw = tl.program_id(1)
        n_cb = tl.cdiv(C, BLOCK_C)
        b = (pid_bc // n_cb).to(tl.int64)
        cb = pid_bc % n_cb
        n_wb = tl.cdiv(W_out, BLOCK_W)
        hb = pid_hw // n_wb
        wb = pid_hw % n_wb

        c = cb * BLOCK_C + tl.arange(0, BLOCK_C)[:, None, None]
        oh = hb * BLOCK_H + tl.arange(0, BLOCK_H)[None, :, None]
        ow = wb * BLOCK_W + tl.arange(0, BLOCK_W)[None, None, :]
        c_mask = c < C
        x_base = b * sxb + c * sxc

        acc0 = tl.zeros([BLOCK_C, BLOCK_H, BLOCK_W], dtype=tl.float32)
        acc0 = _accumulate_dw_term(acc0, x0_ptr, w0_ptr, x_base, c, c_mask, oh, ow, H_in, W_in, sxh, sxw,
                                   KH0, KW0, PT0, PL0)
        if NUM_TERMS >= 2:
            if SEPARATE:
                acc1 = tl.zeros([BLOCK_C, BLOCK_H, BLOCK_W], dtype=tl.float32)
                acc1 = _accumulate_dw_term(acc1, x1_ptr, w1_ptr, x_base, c, c_mask, oh, ow, H_in, W_in,
                                           sxh, sxw, KH1, KW1, PT1, PL1)
            else:
                acc0 = _accumulate_dw_term(acc0, x1_ptr, w1_ptr, x_base, c, c_mask, oh, ow, H_in, W_in,
                                           sxh, sxw, KH1, KW1, PT1, PL1)
        if NUM_TERMS >= 3:
            if SEPARATE:
                acc2 = tl.zeros([BLOCK_C, BLOCK_H, BLOCK_W], dtype=tl.float32)
                acc2 = _accumulate_dw_term(acc2, x2_ptr, w2_ptr, x_base, c, c_mask, oh, ow, H_in, W_in,
                                           sxh, sxw, KH2, KW2, PT2, PL2)
            else:
                acc0 = _accumulate_dw_term(acc0, x2_ptr, w2_ptr, x_base, c, c_mask, oh, ow, H_in, W_in,
                                           sxh, sxw, KH2, KW2, PT2, PL2)

        out_mask = c_mask & (oh < H_out) & (ow < W_out)
        if ADD_IDENTITY:  # identity term (H_in == H_out, W_in == W_out, same strides as the inputs)
            idv = tl.load(id_ptr + x_base + oh * sxh + ow * sxw, mask=out_mask, other=0.0)
            acc0 += idv.to(tl.float32)
        if HAS_BIAS:
            acc0 += tl.load(bias_ptr + c, mask=c_mask, other=0.0)
        o_off = b * sob + c * soc + oh * soh + ow * sow
        tl.store(out0_ptr + o_off, acc0.to(out0_ptr.dtype.element_ty), mask=out_mask)
        if NUM_TERMS >= 2:
            if SEPARATE:
                tl.store(out1_ptr + o_off, acc1.to(out1_ptr.dtype.element_ty), mask=out_mask)
        if NUM_TERMS >= 3:
            if SEPARATE:
                tl.store(out2_ptr + o_off, acc2.to(out2_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _dw_grad_weight_kernel(
        g_ptr, x_ptr, part_ptr,
        C, H_in, W_in, H_out, W_out, ROWS, ROWS_PER_SPLIT,
        sgb, sgc, sgh, sgw, sxb, sxc, sxh, sxw,
        KH, KW, PT, PL,
        BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_W: tl.constexpr,
    ):
        pid_c = tl.program_id(0)
        pid_ij = tl.program_id(1)
        split = tl.program_id(2)
        n_jb = tl.cdiv(KW, BLOCK_J)
        i = pid_ij // n_jb
        jb = pid_ij % n_jb

        c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)[:, None, None]
        j = jb * BLOCK_J + tl.arange(0, BLOCK_J)[None, :, None]
        xw = tl.arange(0, BLOCK_W)[None, None, :]
        c_mask = c < C
        j_mask = j < KW

        acc = tl.zeros([BLOCK_C, BLOCK_J, BLOCK_W], dtype=tl.float32)
        r_start = split * ROWS_PER_SPLIT
        r_end = tl.minimum(r_start + ROWS_PER_SPLIT, ROWS)
        for r in range(r_start, r_end):
            bb = (r // H_out).to(tl.int64)
            oy = r % H_out
            iy = oy + i - PT
            if (iy >= 0) & (iy < H_in):
                g_row = g_ptr + bb * sgb + c * sgc + oy * sgh
                x_row = x_ptr + bb * sxb + c * sxc + iy * sxh
                for w0 in range(0, W_out, BLOCK_W):
                    ox = w0 + xw
                    gm = c_mask & (ox < W_out)
                    gv = tl.load(g_row + ox * sgw, mask=gm, other=0.0)
                    ix = ox + j - PL
                    xm = gm & j_mask & (ix >= 0) & (ix < W_in)
                    xv = tl.load(x_row + ix * sxw, mask=xm, other=0.0)
                    acc += gv.to(tl.float32) * xv.to(tl.float32)
        res = tl.sum(acc, axis=2)  # [BLOCK_C, BLOCK_J]
        c2 = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)[:, None]
        j2 = jb * BLOCK_J + tl.arange(0, BLOCK_J)[None, :]
        p_off = ((split.to(tl.int64) * C + c2) * KH + i) * KW + j2
        tl.store(part_ptr + p_off, res, mask=(c2 < C) & (j2 < KW))

    @triton.jit
    def _mma_term(acc, x_ptr, w_ptr, x_off, c, h0, w0, H_in, W_in, sxh, sxw, KH, KW, PT, PL,
                  MODE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_V: tl.constexpr):
        """acc[y, x] += sum_{i, j} w[c, i, j] * x[h0 + y + i - PT, w0 + x + j - PL] on one (b, c) plane tile.

        MODE 1 (wide kernels, "row Toeplitz"): per kernel row i, ``X_i (BH x BU) @ T_i (BU x BW)`` with
        ``T_i[u, x] = w[i, u - x]`` (0 <= u - x < KW) and ``X_i[y, u] = x[h0 + y + i - PT, w0 - PL + u]``.
        MODE 2 (tall kernels, "column Toeplitz"): per kernel column j, ``T_j (BH x BV) @ X_j (BV x BW)`` with
        ``T_j[y, v] = w[v - y, j]`` (0 <= v - y < KH) and ``X_j[v, x] = x[h0 - PT + v, w0 + x + j - PL]``.
        MODE 0 (small kernels): direct fp32 multiply-adds, one tap at a time."""
        oh = h0 + tl.arange(0, BLOCK_H)[:, None]  # [BH, 1]
        ow = w0 + tl.arange(0, BLOCK_W)[None, :]  # [1, BW]
        x_base = x_ptr + x_off
        w_base = w_ptr + c * (KH * KW)
        if MODE == 1:
            u = tl.arange(0, BLOCK_U)
            iw = (w0 - PL + u)[None, :]  # [1, BU]
            w_ok = (iw >= 0) & (iw < W_in)
            d = u[:, None] - tl.arange(0, BLOCK_W)[None, :]  # [BU, BW]: tap u - x
            d_ok = (d >= 0) & (d < KW)
            for i in range(KH):
                ih = oh + (i - PT)
                a = tl.load(x_base + ih * sxh + iw * sxw, mask=(ih >= 0) & (ih < H_in) & w_ok, other=0.0)
                t = tl.load(w_base + i * KW + d, mask=d_ok, other=0.0).to(a.dtype)
                acc = tl.dot(a, t, acc, input_precision=DOT_PRECISION)
        elif MODE == 2:
            v = tl.arange(0, BLOCK_V)
            ih = (h0 - PT + v)[:, None]  # [BV, 1]
            h_ok = (ih >= 0) & (ih < H_in)
            d = v[None, :] - tl.arange(0, BLOCK_H)[:, None]  # [BH, BV]: tap v - y
            d_ok = (d >= 0) & (d < KH)
            for j in range(KW):
                iw = ow + (j - PL)
                b = tl.load(x_base + ih * sxh + iw * sxw, mask=h_ok & (iw >= 0) & (iw < W_in), other=0.0)
                t = tl.load(w_base + d * KW + j, mask=d_ok, other=0.0).to(b.dtype)
                acc = tl.dot(t, b, acc, input_precision=DOT_PRECISION)
        else:
            for i in range(KH):
                ih = oh + (i - PT)
                mh = (ih >= 0) & (ih < H_in)
                for j in range(KW):
                    iw = ow + (j - PL)
                    xv = tl.load(x_base + ih * sxh + iw * sxw, mask=mh & (iw >= 0) & (iw < W_in), other=0.0)
                    acc += xv.to(tl.float32) * tl.load(w_base + i * KW + j)
        return acc

    @triton.jit
    def _dw_fwd_mma_kernel(
        x0_ptr, x1_ptr, x2_ptr, id_ptr, w0_ptr, w1_ptr, w2_ptr, bias_ptr, out0_ptr, out1_ptr, out2_ptr,
        C, H_in, W_in, H_out, W_out,
        sxb, sxc, sxh, sxw, sob, soc, soh, sow,
        KH0, KW0, PT0, PL0, KH1, KW1, PT1, PL1, KH2, KW2, PT2, PL2,
        MODE0: tl.constexpr, MODE1: tl.constexpr, MODE2: tl.constexpr,
        NUM_TERMS: tl.constexpr, SEPARATE: tl.constexpr, ADD_IDENTITY: tl.constexpr, HAS_BIAS: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        """The tensor-core variant of ``_dw_fwd_kernel`` for NCHW planes: same arguments and semantics, one
        ``BLOCK_H x BLOCK_W`` tile of one (b, c) plane per program, each term computed in its own MODE
        (see ``_mma_term``): a SW layer's horizontal strip as row-Toeplitz products, its vertical strip as
        column-Toeplitz products and its small kernel directly, all into the same accumulator."""
        pid_bc = tl.program_id(0)
        pid_hw = tl.program_id(1)
        b = (pid_bc // C).to(tl.int64)
        c = pid_bc % C
        n_wb = tl.cdiv(W_out, BLOCK_W)
        h0 = (pid_hw // n_wb) * BLOCK_H
        w0 = (pid_hw % n_wb) * BLOCK_W
        x_off = b * sxb + c * sxc

        acc0 = tl.zeros([BLOCK_H, BLOCK_W], dtype=tl.float32)
        acc0 = _mma_term(acc0, x0_ptr, w0_ptr, x_off, c, h0, w0, H_in, W_in, sxh, sxw, KH0, KW0, PT0, PL0,
                         MODE0, DOT_PRECISION, BLOCK_H, BLOCK_W, BLOCK_U, BLOCK_V)
        if NUM_TERMS >= 2:
            if SEPARATE:
                acc1 = tl.zeros([BLOCK_H, BLOCK_W], dtype=tl.float32)
                acc1 = _mma_term(acc1, x1_ptr, w1_ptr, x_off, c, h0, w0, H_in, W_in, sxh, sxw, KH1, KW1, PT1,
                                 PL1, MODE1, DOT_PRECISION, BLOCK_H, BLOCK_W, BLOCK_U, BLOCK_V)
            else:
                acc0 = _mma_term(acc0, x1_ptr, w1_ptr, x_off, c, h0, w0, H_in, W_in, sxh, sxw, KH1, KW1, PT1,
                                 PL1, MODE1, DOT_PRECISION, BLOCK_H, BLOCK_W, BLOCK_U, BLOCK_V)
        if NUM_TERMS >= 3:
            if SEPARATE:
                acc2 = tl.zeros([BLOCK_H, BLOCK_W], dtype=tl.float32)
                acc2 = _mma_term(acc2, x2_ptr, w2_ptr, x_off, c, h0, w0, H_in, W_in, sxh, sxw, KH2, KW2, PT2,
                                 PL2, MODE2, DOT_PRECISION, BLOCK_H, BLOCK_W, BLOCK_U, BLOCK_V)
            else:
                acc0 = _mma_term(acc0, x2_ptr, w2_ptr, x_off, c, h0, w0, H_in, W_in, sxh, sxw, KH2, KW2, PT2,
                                 PL2, MODE2, DOT_PRECISION, BLOCK_H, BLOCK_W, BLOCK_U, BLOCK_V)

        oh = h0 + tl.arange(0, BLOCK_H)[:, None]
        ow = w0 + tl.arange(0, BLOCK_W)[None, :]
        out_mask = (oh < H_out) & (ow < W_out)
        if ADD_IDENTITY:
            idv = tl.load(id_ptr + x_off + oh * sxh + ow * sxw, mask=out_mask, other=0.0)
            acc0 += idv.to(tl.float32)
        if HAS_BIAS:
            acc0 += tl.load(bias_ptr + c)
        o_off = b * sob + c * soc + oh * soh + ow * sow
        tl.store(out0_ptr + o_off, acc0.to(out0_ptr.dtype.element_ty), mask=out_mask)
        if NUM_TERMS >= 2:
            if SEPARATE:
                tl.store(out1_ptr + o_off, acc1.to(out1_ptr.dtype.element_ty), mask=out_mask)
        if NUM_TERMS >= 3:
            if SEPARATE:
                tl.store(out2_ptr + o_off, acc2.to(out2_ptr.dtype.element_ty), mask=out_mask)

    # Autotune configs. Not tuned on hardware yet (no GPU in the session that wrote them): a spread of
    # reasonable tiles; the autotuner picks per shape key on first use.
    def _cfg(bc, bh, bw, warps, stages=1, names=("BLOCK_C", "BLOCK_H", "BLOCK_W")):
        return triton.Config(dict(zip(names, (bc, bh, bw))), num_warps=warps, num_stages=stages)

    _FWD_NCHW_CONFIGS = [
        _cfg(1, 8, 32, 2), _cfg(1, 8, 64, 4), _cfg(1, 16, 32, 4), _cfg(1, 16, 64, 4),
        _cfg(1, 16, 64, 8), _cfg(1, 32, 32, 4), _cfg(1, 32, 64, 8), _cfg(1, 8, 128, 4),
        _cfg(1, 4, 64, 2), _cfg(1, 8, 16, 2),
    ]
    _FWD_NHWC_CONFIGS = [
        _cfg(32, 2, 8, 4), _cfg(64, 2, 8, 4), _cfg(64, 4, 8, 8), _cfg(32, 4, 8, 4),
        _cfg(128, 1, 8, 4), _cfg(128, 2, 4, 8), _cfg(16, 4, 16, 4), _cfg(64, 1, 16, 4),
    ]
    _GW = ("BLOCK_C", "BLOCK_J", "BLOCK_W")
    _GW_NCHW_CONFIGS = [
        _cfg(1, 16, 32, 4, names=_GW), _cfg(1, 16, 64, 4, names=_GW), _cfg(1, 32, 32, 4, names=_GW),
        _cfg(1, 32, 64, 8, names=_GW), _cfg(1, 64, 32, 8, names=_GW), _cfg(1, 8, 64, 4, names=_GW),
        _cfg(1, 4, 64, 2, names=_GW),
    ]
    _GW_NHWC_CONFIGS = [
        _cfg(32, 4, 8, 4, names=_GW), _cfg(64, 4, 4, 4, names=_GW), _cfg(64, 8, 4, 8, names=_GW),
        _cfg(32, 8, 8, 8, names=_GW), _cfg(128, 4, 2, 8, names=_GW), _cfg(16, 4, 16, 4, names=_GW),
    ]
    _FWD_KEY = ["C", "H_out", "W_out", "KH0", "KW0", "KH1", "KW1", "KH2", "KW2", "NUM_TERMS", "SEPARATE"]
    _GW_KEY = ["C", "H_out", "W_out", "KH", "KW", "ROWS_PER_SPLIT"]
    _MMA_CONFIGS = [
        triton.Config(dict(BLOCK_H=bh, BLOCK_W=bw), num_warps=nw, num_stages=ns)
        for bh, bw, nw, ns in [(16, 32, 4, 2), (32, 32, 4, 2), (64, 32, 4, 3), (32, 64, 4, 2), (64, 64, 8, 2),
                               (16, 64, 4, 2), (128, 32, 8, 2), (64, 16, 4, 2)]
    ]
    _MMA_KEY = _FWD_KEY + ["MODE0", "MODE1", "MODE2", "DOT_PRECISION"]

    def _band(a: dict, mode: int, size: str, block: str) -> int:
        """Window length of the Toeplitz products: next_pow2(tile + longest kernel side - 1), >= 16."""
        ext = [a[f"{size}{t}"] for t in range(a["NUM_TERMS"]) if a[f"MODE{t}"] == mode]
        return max(16, triton.next_power_of_2(a[block] + max(ext) - 1)) if ext else 16

    _mma_bands = triton.heuristics({"BLOCK_U": lambda a: _band(a, 1, "KW", "BLOCK_W"),
                                    "BLOCK_V": lambda a: _band(a, 2, "KH", "BLOCK_H")})

    def _host_bench(fn, quantiles=None, **_):
        """Wall-clock timing for the autotuner under the interpreter (tests of the autotune plumbing)."""
        import time

        start = time.perf_counter()
        fn()
        ms = (time.perf_counter() - start) * 1e3
        return [ms] * len(quantiles) if quantiles else ms

    def _autotuned(kernel, configs, key):
        """The kernel wrapped in triton.autotune. Under the interpreter with AUTOTUNE_IN_INTERPRETER set, two
        configs timed on the host (checks keys, heuristics and configs without a GPU)."""
        if interpret_mode():
            return triton.autotune(configs=configs[:2], key=key, do_bench=_host_bench)(kernel)
        return triton.autotune(configs=configs, key=key)(kernel)

    if FIXED_TILES:  # the interpreter runs one fixed small config (autotuning would be pointless)
        _fwd_nchw = _fwd_nhwc = _dw_fwd_kernel
        _gw_nchw = _gw_nhwc = _dw_grad_weight_kernel
        _fwd_mma = _mma_bands(_dw_fwd_mma_kernel)
    else:
        _fwd_mma = _autotuned(_mma_bands(_dw_fwd_mma_kernel), _MMA_CONFIGS, _MMA_KEY)
        _fwd_nchw = _autotuned(_dw_fwd_kernel, _FWD_NCHW_CONFIGS, _FWD_KEY)
        _fwd_nhwc = _autotuned(_dw_fwd_kernel, _FWD_NHWC_CONFIGS, _FWD_KEY)
        _gw_nchw = _autotuned(_dw_grad_weight_kernel, _GW_NCHW_CONFIGS, _GW_KEY)
        _gw_nhwc = _autotuned(_dw_grad_weight_kernel, _GW_NHWC_CONFIGS, _GW_KEY)

# Fixed tiles for the CPU interpreter (small, to exercise masking and several programs on tiny shapes).
_INTERP_MMA = dict(BLOCK_H=16, BLOCK_W=16)
_INTERP_FWD = {False: dict(BLOCK_C=1, BLOCK_H=8, BLOCK_W=16), True: dict(BLOCK_C=4, BLOCK_H=8, BLOCK_W=8)}
_INTERP_GW = {False: dict(BLOCK_C=1, BLOCK_J=8, BLOCK_W=16), True: dict(BLOCK_C=4, BLOCK_J=8, BLOCK_W=8)}


# ----------------------------------------------------------------------------------------------------------
# Launchers (raw, no autograd). Shared with triton_shiftwise.
# ----------------------------------------------------------------------------------------------------------
# Kernel launches by path ("mma", "direct_nchw", "direct_nhwc", "grad_weight"): lets tests check which kernel
# a case exercised, and users see what ran (``triton_dwconv.LAUNCHES``).
LAUNCHES: collections.Counter = collections.Counter()

TOEPLITZ_MIN_SIDE = 7  # a term whose kernel is at least this wide (or tall) runs as Toeplitz products


def term_mode(kh: int, kw: int) -> int:
    """How the NCHW tensor-core kernel computes a (kh x kw) term: 1 row-Toeplitz (wide, incl. square large
    kernels), 2 column-Toeplitz (tall strips such as 51 x 3), 0 direct multiply-adds (small kernels)."""
    if kw >= TOEPLITZ_MIN_SIDE:
        return 1
    if kh >= TOEPLITZ_MIN_SIDE:
        return 2
    return 0


def _mma_enabled() -> bool:
    """``LKVISION_DW_TOEPLITZ=0`` switches the tensor-core kernel off (everything runs the direct kernel)."""
    return os.environ.get("LKVISION_DW_TOEPLITZ", "1") != "0"


def dot_precision(x: Tensor) -> str:
    """``tl.dot`` input precision of the tensor-core kernel for fp32 inputs, following PyTorch's convention for
    convolutions: TF32 (one pass, ~1e-3 relative error, like cuDNN) when ``torch.backends.cudnn.allow_tf32``
    (PyTorch's default), else ``tf32x3`` (three TF32 passes, ~fp32 accuracy). fp16/bf16 use the native MMA."""
    if x.dtype == torch.float32 and x.is_cuda and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "tf32x3" if x.dtype == torch.float32 else "tf32"


def _flat_weight(w: Tensor) -> Tensor:
    """(C, 1, KH, KW) -> contiguous fp32 (C, KH * KW)."""
    return w.detach().reshape(w.shape[0], -1).to(torch.float32).contiguous()


def dwconv_forward_terms(
    inputs: Sequence[Tensor],
    weights: Sequence[Tensor],
    offsets: Sequence[tuple[int, int]],
    out_hw: tuple[int, int],
    *,
    separate: bool = False,
    identity: Tensor | None = None,
    bias: Tensor | None = None,
    channels_last: bool | None = None,
) -> list[Tensor]:
    """Launch the fused depth-wise kernel.

    Computes ``out[b, c, y, x] = sum_t sum_{i, j} w_t[c, 0, i, j] * in_t[b, c, y + i - top_t, x + j - left_t]``
    (+ ``identity[b, c, y, x]`` + ``bias[c]``), zero outside each input. ``inputs`` (1 to 3 tensors of shape
    (B, C, H_in, W_in), all with the same strides), ``weights`` (C, 1, KH_t, KW_t), ``offsets`` ``(top_t,
    left_t)``. ``separate=True`` returns one output per term (identity/bias not allowed); otherwise a
    single-element list. Output dtype = input dtype; layout channels_last iff ``channels_last`` (default: that
    of ``inputs[0]``).
    """
    n = len(inputs)
    if not 1 <= n <= 3 or len(weights) != n or len(offsets) != n:
        raise ValueError("dwconv_forward_terms: need 1 to 3 (input, weight, offset) terms")
    x0 = inputs[0]
    for t in inputs[1:]:
        if t.shape != x0.shape or t.stride() != x0.stride() or t.dtype != x0.dtype:
            raise ValueError("dwconv_forward_terms: all inputs must share shape, strides and dtype")
    bsz, c, h_in, w_in = x0.shape
    h_out, w_out = out_hw
    if identity is not None and (identity.shape != (bsz, c, h_out, w_out) or identity.stride() != x0.stride()):
        raise ValueError("dwconv_forward_terms: identity must match the output shape and the input strides")
    if separate and (identity is not None or bias is not None):
        raise ValueError("dwconv_forward_terms: identity/bias only apply to the summed output")
    if channels_last is None:
        channels_last = is_channels_last(x0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    n_out = n if separate else 1
    outs = [torch.empty((bsz, c, h_out, w_out), dtype=x0.dtype, device=x0.device, memory_format=fmt)
            for _ in range(n_out)]
    if bsz * c * h_out * w_out == 0:
        return outs
    ws = [_flat_weight(w) for w in weights]
    geo = []
    for w, (top, left) in zip(weights, offsets):
        geo += [int(w.shape[-2]), int(w.shape[-1]), int(top), int(left)]
    while len(ws) < 3:  # unused slots: valid pointers, never read
        ws.append(ws[0])
        geo += [1, 1, 0, 0]
    ins = list(inputs) + [x0] * (3 - n)
    o = outs + [outs[0]] * (3 - n_out)
    bias_t = bias.detach().to(torch.float32).contiguous() if bias is not None else ws[0]
    id_t = identity if identity is not None else x0
    args = (ins[0], ins[1], ins[2], id_t, ws[0], ws[1], ws[2], bias_t, o[0], o[1], o[2],
            c, h_in, w_in, h_out, w_out, *x0.stride(), *outs[0].stride(), *geo)
    consts = dict(NUM_TERMS=n, SEPARATE=bool(separate), ADD_IDENTITY=identity is not None,
                  HAS_BIAS=bias is not None)

    modes = [term_mode(int(w.shape[-2]), int(w.shape[-1])) for w in weights] + [0] * (3 - n)
    # (the interpreter computes bf16 tl.dot wrongly in triton 3.7: bf16 runs the direct kernel there)
    interp_bf16 = interpret_mode() and x0.dtype == torch.bfloat16
    use_mma = not channels_last and not interp_bf16 and any(modes) and _mma_enabled()

    def grid(meta):
        return (bsz * (c if use_mma else triton.cdiv(c, meta["BLOCK_C"])),
                triton.cdiv(h_out, meta["BLOCK_H"]) * triton.cdiv(w_out, meta["BLOCK_W"]))

    with torch.cuda.device(x0.device) if x0.is_cuda else contextlib.nullcontext():
        LAUNCHES["mma" if use_mma else "direct_nhwc" if channels_last else "direct_nchw"] += 1
        if use_mma:
            consts.update(MODE0=modes[0], MODE1=modes[1], MODE2=modes[2], DOT_PRECISION=dot_precision(x0))
            _fwd_mma[grid](*args, **consts, **(_INTERP_MMA if FIXED_TILES else {}))
        elif FIXED_TILES:
            _dw_fwd_kernel[grid](*args, **consts, **_INTERP_FWD[channels_last])
        else:
            (_fwd_nhwc if channels_last else _fwd_nchw)[grid](*args, **consts)
    return outs


def _grad_weight_split(rows: int, c: int, kh: int, kw: int, channels_last: bool, device: torch.device) -> int:
    """Number of row splits so the grid has ~8 programs per SM (two-stage reduction)."""
    if interpret_mode():
        return min(rows, 2)
    progs = (triton.cdiv(c, 64) if channels_last else c) * kh * triton.cdiv(kw, 8 if channels_last else 32)
    target = 8 * num_sms(device)
    return max(1, min(rows, 65535, triton.cdiv(target, max(progs, 1))))


def dwconv_grad_weight(grad_out: Tensor, x: Tensor, kernel_hw: tuple[int, int],
                       offsets: tuple[int, int]) -> Tensor:
    """fp32 ``(C, 1, KH, KW)`` weight gradient of a depth-wise conv with offsets ``(top, left)``.

    grad_out (B, C, H_out, W_out) and x (B, C, H_in, W_in), any strides. Deterministic (two-stage reduction).
    """
    bsz, c, h_in, w_in = x.shape
    _, _, h_out, w_out = grad_out.shape
    kh, kw = kernel_hw
    top, left = offsets
    rows = bsz * h_out
    if rows == 0 or c == 0:
        return torch.zeros((c, 1, kh, kw), dtype=torch.float32, device=x.device)
    channels_last = is_channels_last(x)
    split = _grad_weight_split(rows, c, kh, kw, channels_last, x.device)
    rows_per_split = triton.cdiv(rows, split)
    split = triton.cdiv(rows, rows_per_split)
    partial = torch.empty((split, c, kh, kw), dtype=torch.float32, device=x.device)
    args = (grad_out, x, partial, c, h_in, w_in, h_out, w_out, rows, rows_per_split,
            *grad_out.stride(), *x.stride(), kh, kw, int(top), int(left))

    def grid(meta):
        return (triton.cdiv(c, meta["BLOCK_C"]), kh * triton.cdiv(kw, meta["BLOCK_J"]), split)

    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        LAUNCHES["grad_weight"] += 1
        if FIXED_TILES:
            _dw_grad_weight_kernel[grid](*args, **_INTERP_GW[channels_last])
        else:
            (_gw_nhwc if channels_last else _gw_nchw)[grid](*args)
    return partial.sum(0).unsqueeze(1)


# ----------------------------------------------------------------------------------------------------------
# PyTorch reference (fallback when the kernels cannot run)
# ----------------------------------------------------------------------------------------------------------
def dwconv2d_reference(x: Tensor, weight: Tensor, bias: Tensor | None, padding: Sequence[int]) -> Tensor:
    """``F.pad(x, padding)`` (left, right, top, bottom; negative crops) then a depth-wise ``F.conv2d``."""
    left, right, top, bottom = (int(p) for p in padding)
    if any(padding):
        x = F.pad(x, (left, right, top, bottom))
    return F.conv2d(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), groups=x.shape[1])


def _out_hw(x_shape, kernel_hw, padding) -> tuple[int, int]:
    left, right, top, bottom = padding
    return (x_shape[2] + top + bottom - kernel_hw[0] + 1, x_shape[3] + left + right - kernel_hw[1] + 1)


def _use_kernels(*tensors: Tensor) -> bool:
    return HAS_TRITON and all(device_supported(t) for t in tensors)


# ----------------------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------------------
@torch.library.custom_op("lkvision::triton_dwconv2d", mutates_args=(),
                         schema="(Tensor x, Tensor weight, Tensor? bias, int[] padding) -> Tensor")
def _dwconv2d_op(x: Tensor, weight: Tensor, bias: Tensor | None, padding: Sequence[int]) -> Tensor:
    if not _use_kernels(x):
        return dwconv2d_reference(x, weight, bias, padding).contiguous(
            memory_format=torch.channels_last if is_channels_last(x) else torch.contiguous_format)
    left, _, top, _ = padding
    return dwconv_forward_terms([x], [weight], [(top, left)], _out_hw(x.shape, weight.shape[-2:], padding),
                                bias=bias)[0]


@_dwconv2d_op.register_fake
def _(x, weight, bias, padding):
    h_out, w_out = _out_hw(x.shape, weight.shape[-2:], padding)
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    return torch.empty((x.shape[0], x.shape[1], h_out, w_out), dtype=x.dtype, device=x.device,
                       memory_format=fmt)


def _grad_input_terms(grads: Sequence[Tensor], weights: Sequence[Tensor], paddings: Sequence[Sequence[int]],
                      input_hw: Sequence[int], channels_last: bool, add_identity: bool = False) -> Tensor:
    """dx of ``sum_t pad_t+conv(x, w_t)`` whose term t receives the output gradient ``grads[t]`` (the same
    tensor for a summed output): the sum of full correlations of the gradients with the flipped kernels,
    cropped to the input, plus ``grads[0]`` for an identity term (one fused launch on the kernels' device)."""
    h_in, w_in = (int(v) for v in input_hw)
    flipped = [w.flip((-2, -1)) for w in weights]
    offsets = [(w.shape[-2] - 1 - pad[2], w.shape[-1] - 1 - pad[0]) for w, pad in zip(weights, paddings)]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if not _use_kernels(grads[0]):
        gx = grads[0] if add_identity else None
        for g, wf, (top, left) in zip(grads, flipped, offsets):
            pad_t = (left, w_in - 1 - g.shape[3] + wf.shape[-1] - left,
                     top, h_in - 1 - g.shape[2] + wf.shape[-2] - top)
            t = dwconv2d_reference(g, wf, None, pad_t)
            gx = t if gx is None else gx + t
        return gx.contiguous(memory_format=fmt)
    laid_out = {id(g): g.contiguous(memory_format=fmt) for g in grads}  # one copy per distinct gradient
    grads = [laid_out[id(g)] for g in grads]
    gx = dwconv_forward_terms(grads, flipped, offsets, (h_in, w_in), channels_last=channels_last,
                              identity=grads[0] if add_identity else None)[0]
    return gx.contiguous(memory_format=fmt)


@torch.library.custom_op("lkvision::triton_dwconv2d_grad_input", mutates_args=(),
                         schema="(Tensor grad_out, Tensor weight, int[] padding, int[] input_hw, "
                                "bool channels_last) -> Tensor")
def _dwconv2d_grad_input_op(grad_out: Tensor, weight: Tensor, padding: Sequence[int], input_hw: Sequence[int],
                            channels_last: bool) -> Tensor:
    return _grad_input_terms([grad_out], [weight], [padding], input_hw, channels_last)


@_dwconv2d_grad_input_op.register_fake
def _(grad_out, weight, padding, input_hw, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((grad_out.shape[0], grad_out.shape[1], *input_hw), dtype=grad_out.dtype,
                       device=grad_out.device, memory_format=fmt)


@torch.library.custom_op("lkvision::triton_dwconv2d_grad_weight", mutates_args=(),
                         schema="(Tensor grad_out, Tensor x, int[] kernel_hw, int[] padding) -> Tensor")
def _dwconv2d_grad_weight_op(grad_out: Tensor, x: Tensor, kernel_hw: Sequence[int],
                             padding: Sequence[int]) -> Tensor:
    """fp32 (C, 1, KH, KW) weight gradient."""
    left, _, top, _ = padding
    if not _use_kernels(grad_out, x):
        # gw[c, i, j] = sum g[b, c, y, x] * xpad[b, c, y + i, x + j]: a conv of xpad (channels as batch)
        bsz, c = x.shape[:2]
        xp = F.pad(x.float(), tuple(int(p) for p in padding)).transpose(0, 1)
        xp = xp.reshape(1, c * bsz, xp.shape[2], xp.shape[3])
        gw = F.conv2d(xp, grad_out.float().transpose(0, 1), groups=c)  # (1, C, KH', KW') with KH' >= KH
        return gw[0, :, : kernel_hw[0], : kernel_hw[1]].unsqueeze(1).contiguous()
    return dwconv_grad_weight(grad_out, x, (int(kernel_hw[0]), int(kernel_hw[1])), (int(top), int(left)))


@_dwconv2d_grad_weight_op.register_fake
def _(grad_out, x, kernel_hw, padding):
    return torch.empty((x.shape[1], 1, *kernel_hw), dtype=torch.float32, device=x.device)


def _dwconv2d_setup(ctx, inputs, output):
    x, weight, bias, padding = inputs
    ctx.save_for_backward(x, weight)
    ctx.padding = list(padding)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _dwconv2d_backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.lkvision.triton_dwconv2d_grad_input(
            grad_out, weight, ctx.padding, list(x.shape[-2:]), is_channels_last(x))
    if ctx.needs_input_grad[1]:
        grad_w = torch.ops.lkvision.triton_dwconv2d_grad_weight(
            grad_out, x, list(weight.shape[-2:]), ctx.padding).to(weight.dtype)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = grad_out.sum(dim=(0, 2, 3), dtype=torch.float32).to(ctx.bias_dtype)
    return grad_x, grad_w, grad_b, None


_dwconv2d_op.register_autograd(_dwconv2d_backward, setup_context=_dwconv2d_setup)


# ----------------------------------------------------------------------------------------------------------
# Sum of depth-wise convs of one input (the deploy form of a Shiftwise layer: two strips + bias, one launch)
# ----------------------------------------------------------------------------------------------------------
def _split_paddings(paddings: Sequence[int]) -> list[list[int]]:
    return [list(paddings[4 * t:4 * t + 4]) for t in range(len(paddings) // 4)]


@torch.library.custom_op("lkvision::triton_dwconv2d_sum", mutates_args=(),
                         schema="(Tensor x, Tensor[] weights, Tensor? bias, int[] paddings) -> Tensor")
def _dwconv2d_sum_op(x: Tensor, weights: Sequence[Tensor], bias: Tensor | None, paddings: Sequence[int]) -> Tensor:
    pads = _split_paddings(paddings)
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    if not _use_kernels(x):
        out = sum(dwconv2d_reference(x, w, None, pad) for w, pad in zip(weights, pads))
        if bias is not None:
            out = out + bias.to(out.dtype).view(1, -1, 1, 1)
        return out.contiguous(memory_format=fmt)
    return dwconv_forward_terms([x] * len(weights), weights, [(pad[2], pad[0]) for pad in pads],
                                _out_hw(x.shape, weights[0].shape[-2:], pads[0]), bias=bias)[0]


@_dwconv2d_sum_op.register_fake
def _(x, weights, bias, paddings):
    h_out, w_out = _out_hw(x.shape, weights[0].shape[-2:], _split_paddings(paddings)[0])
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    return torch.empty((x.shape[0], x.shape[1], h_out, w_out), dtype=x.dtype, device=x.device,
                       memory_format=fmt)


@torch.library.custom_op("lkvision::triton_dwconv2d_sum_grad_input", mutates_args=(),
                         schema="(Tensor grad_out, Tensor[] weights, int[] paddings, int[] input_hw, "
                                "bool channels_last) -> Tensor")
def _dwconv2d_sum_grad_input_op(grad_out: Tensor, weights: Sequence[Tensor], paddings: Sequence[int],
                                input_hw: Sequence[int], channels_last: bool) -> Tensor:
    return _grad_input_terms([grad_out] * len(weights), weights, _split_paddings(paddings), input_hw,
                             channels_last)


@_dwconv2d_sum_grad_input_op.register_fake
def _(grad_out, weights, paddings, input_hw, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((grad_out.shape[0], grad_out.shape[1], *input_hw), dtype=grad_out.dtype,
                       device=grad_out.device, memory_format=fmt)


def _dwconv2d_sum_setup(ctx, inputs, output):
    x, weights, bias, paddings = inputs
    ctx.save_for_backward(x, *weights)
    ctx.paddings = list(paddings)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _dwconv2d_sum_backward(ctx, grad_out):
    x, *weights = ctx.saved_tensors
    grad_x = grad_b = None
    grad_ws = [None] * len(weights)
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.lkvision.triton_dwconv2d_sum_grad_input(
            grad_out, weights, ctx.paddings, list(x.shape[-2:]), is_channels_last(x))
    if ctx.needs_input_grad[1]:
        grad_ws = [torch.ops.lkvision.triton_dwconv2d_grad_weight(grad_out, x, list(w.shape[-2:]), pad).to(w.dtype)
                   for w, pad in zip(weights, _split_paddings(ctx.paddings))]
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = grad_out.sum(dim=(0, 2, 3), dtype=torch.float32).to(ctx.bias_dtype)
    return grad_x, grad_ws, grad_b, None


_dwconv2d_sum_op.register_autograd(_dwconv2d_sum_backward, setup_context=_dwconv2d_sum_setup)


# ----------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------
def triton_dwconv2d(x: Tensor, weight: Tensor, bias: Tensor | None, padding: Sequence[int]) -> Tensor:
    """Depth-wise conv, stride 1: x (B, C, H, W) (NCHW, channels_last or strided), weight (C, 1, KH, KW),
    bias (C,) or None, ``padding`` = F.pad-style (left, right, top, bottom).

    Returns (B, C, H + top + bottom - KH + 1, W + left + right - KW + 1) in the layout of ``x``
    (channels_last stays channels_last). Differentiable; runs the Triton kernels when
    :func:`lkvision.ops.kernels.is_available` holds for ``x`` and PyTorch otherwise.
    """
    x, weight, bias = autocast_inputs(x, weight, bias)
    check_depthwise_args(x, weight, bias)
    padding = [int(p) for p in padding]
    if len(padding) != 4:
        raise ValueError(f"padding must be (left, right, top, bottom), got {padding}")
    h_out, w_out = _out_hw(x.shape, weight.shape[-2:], padding)
    if h_out <= 0 or w_out <= 0:
        raise ValueError(f"empty output: input {tuple(x.shape[-2:])}, kernel {tuple(weight.shape[-2:])}, "
                         f"padding {padding} give an output of {h_out} x {w_out}")
    return torch.ops.lkvision.triton_dwconv2d(x, weight, bias, padding)


def dwconv2d_sum(x: Tensor, weights: Sequence[Tensor], bias: Tensor | None,
                 paddings: Sequence[Sequence[int]]) -> Tensor:
    """``sum_t triton_dwconv2d(x, weights[t], None, paddings[t]) + bias`` in ONE launch (x read once, y written once).

    x (B, C, H, W); 1 to 3 weights (C, 1, KH_t, KW_t) whose F.pad-style paddings (left, right, top, bottom)
    give the same output size; bias (C,) or None. This is the deploy form of a Shiftwise layer (horizontal
    strip with the small kernel and the identity folded in, plus the vertical strip). Differentiable w.r.t.
    x, every weight and bias; output in the layout of ``x``.
    """
    x, bias, *weights = autocast_inputs(x, bias, *weights)
    if not 1 <= len(weights) <= 3 or len(paddings) != len(weights):
        raise ValueError(f"dwconv2d_sum: need 1 to 3 weights with one padding each, got {len(weights)} weights "
                         f"and {len(paddings)} paddings")
    flat: list[int] = []
    out_hw = None
    for t, (w, pad) in enumerate(zip(weights, paddings)):
        check_depthwise_args(x, w, bias, name=f"weights[{t}]")
        pad = [int(p) for p in pad]
        if len(pad) != 4 or min(pad) < 0:
            raise ValueError(f"dwconv2d_sum: paddings[{t}] must be non-negative (left, right, top, bottom), "
                             f"got {pad}")
        hw = _out_hw(x.shape, w.shape[-2:], pad)
        if min(hw) <= 0:
            raise ValueError(f"dwconv2d_sum: term {t} gives an empty output: input {tuple(x.shape[-2:])}, kernel "
                             f"{tuple(w.shape[-2:])}, padding {pad}")
        if out_hw is not None and hw != out_hw:
            raise ValueError(f"dwconv2d_sum: term {t} gives a {hw} output, term 0 gives {out_hw}")
        if w.dtype != x.dtype:
            raise TypeError(f"dwconv2d_sum: weights[{t}] dtype {w.dtype} differs from input dtype {x.dtype}")
        out_hw = hw
        flat += pad
    return torch.ops.lkvision.triton_dwconv2d_sum(x, weights, bias, flat)
