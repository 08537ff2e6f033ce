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

from . import _common
from ._common import (
    GRID_MAX,
    autocast_inputs,
    check_depthwise_args,
    device_capability,
    int32_reason,
    interpret_mode,
    is_channels_last,
    num_sms,
    run_guarded,
    same_device_reason,
)

__all__ = ["triton_dwconv2d", "dwconv2d_sum", "dwconv2d_reference", "dwconv_forward_terms", "dwconv_grad_weight",
           "can_run", "can_run_sum", "launch_reason", "forward_plan", "LAUNCHES", "HAS_TRITON"]

try:  # triton is optional: the module must import without it
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    HAS_TRITON = False


# ----------------------------------------------------------------------------------------------------------
# Tiles and launch limits (plain data and arithmetic: the eligibility checks need them without triton)
# ----------------------------------------------------------------------------------------------------------
# Autotune configs. Not tuned on hardware yet (no GPU in the session that wrote them): a spread of reasonable
# tiles; the autotuner picks per shape key on first use, among those that fit the launch limits.
# direct forward kernel: (BLOCK_C, BLOCK_H, BLOCK_W, num_warps, num_stages)
FWD_NCHW_TILES = ((1, 8, 32, 2, 1), (1, 8, 64, 4, 1), (1, 16, 32, 4, 1), (1, 16, 64, 4, 1), (1, 16, 64, 8, 1),
                  (1, 32, 32, 4, 1), (1, 32, 64, 8, 1), (1, 8, 128, 4, 1), (1, 4, 64, 2, 1), (1, 8, 16, 2, 1))
FWD_NHWC_TILES = ((32, 2, 8, 4, 1), (64, 2, 8, 4, 1), (64, 4, 8, 8, 1), (32, 4, 8, 4, 1), (128, 1, 8, 4, 1),
                  (128, 2, 4, 8, 1), (16, 4, 16, 4, 1), (64, 1, 16, 4, 1))
# weight gradient: (BLOCK_C, BLOCK_J, BLOCK_W, num_warps, num_stages)
GW_NCHW_TILES = ((1, 16, 32, 4, 1), (1, 16, 64, 4, 1), (1, 32, 32, 4, 1), (1, 32, 64, 8, 1), (1, 64, 32, 8, 1),
                 (1, 8, 64, 4, 1), (1, 4, 64, 2, 1))
GW_NHWC_TILES = ((32, 4, 8, 4, 1), (64, 4, 4, 4, 1), (64, 8, 4, 8, 1), (32, 8, 8, 8, 1), (128, 4, 2, 8, 1),
                 (16, 4, 16, 4, 1))
# tensor-core forward kernel: (BLOCK_H, BLOCK_W, num_warps, num_stages)
MMA_TILES = ((16, 32, 4, 2), (32, 32, 4, 2), (64, 32, 4, 3), (32, 64, 4, 2), (64, 64, 8, 2), (16, 64, 4, 2),
             (128, 32, 8, 2), (64, 16, 4, 2))

# Under the interpreter the kernels run one fixed small tile, unless LKVISION_TRITON_AUTOTUNE_IN_INTERPRETER=1
# asks for the autotuned wrappers (two configs each, timed on the host): a CPU test of the autotune plumbing.
FIXED_TILES = interpret_mode() and os.environ.get("LKVISION_TRITON_AUTOTUNE_IN_INTERPRETER", "0") != "1"
# Fixed tiles for the CPU interpreter (small, to exercise masking and several programs on tiny shapes).
_INTERP_MMA = dict(BLOCK_H=16, BLOCK_W=16)
_INTERP_FWD = {False: dict(BLOCK_C=1, BLOCK_H=8, BLOCK_W=16), True: dict(BLOCK_C=4, BLOCK_H=8, BLOCK_W=8)}
_INTERP_GW = {False: dict(BLOCK_C=1, BLOCK_J=8, BLOCK_W=16), True: dict(BLOCK_C=4, BLOCK_J=8, BLOCK_W=8)}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def mma_band(block: int, sides: Sequence[int]) -> int:
    """Window length of the Toeplitz products: next_pow2(tile + longest kernel side - 1), at least 16."""
    if not sides:
        return 16
    return max(16, 1 << (block + max(sides) - 2).bit_length())


def grid_rows_ok(h_out: int, w_out: int, block_h: int, block_w: int) -> bool:
    """The forward grid's second dimension (output tiles per plane) within CUDA's 65535."""
    return _cdiv(h_out, block_h) * _cdiv(w_out, block_w) <= GRID_MAX[1]


def grad_weight_grid_ok(kh: int, kw: int, block_j: int) -> bool:
    """The weight-gradient grid's second dimension (kernel rows x column blocks) within CUDA's 65535."""
    return kh * _cdiv(kw, block_j) <= GRID_MAX[1]


def mma_shared_memory(tile: Sequence[int], terms: Sequence[tuple[int, int]], element_size: int) -> int:
    """Estimated shared memory (bytes) of the tensor-core kernel: both ``tl.dot`` operand tiles of the widest
    Toeplitz product, one buffer per pipeline stage, plus an fp32 output tile for the epilogue's layout change."""
    bh, bw, _, stages = tile
    rows = [kw for kh, kw in terms if term_mode(kh, kw) == 1]
    cols = [kh for kh, kw in terms if term_mode(kh, kw) == 2]
    operands = 0
    if rows:
        bu = mma_band(bw, rows)
        operands = max(operands, bh * bu + bu * bw)
    if cols:
        bv = mma_band(bh, cols)
        operands = max(operands, bh * bv + bv * bw)
    return stages * operands * element_size + bh * bw * 4


def mma_tile_ok(tile: Sequence[int], h_out: int, w_out: int, terms: Sequence[tuple[int, int]], element_size: int,
                smem_limit: int | None) -> bool:
    """A tensor-core config can launch: grid within limits and (when the limit is known) its estimated shared
    memory within the device's per-block maximum."""
    if not grid_rows_ok(h_out, w_out, tile[0], tile[1]):
        return False
    return smem_limit is None or mma_shared_memory(tile, terms, element_size) <= smem_limit


_SMEM_LIMITS: dict[int, int | None] = {}


def shared_memory_limit(device: torch.device) -> int | None:
    """Per-block shared memory (bytes) a Triton kernel may use on ``device`` (the opt-in maximum that triton's
    compiler checks against); None where unknown or irrelevant (CPU / interpreter)."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMEM_LIMITS:
        limit = None
        try:
            from triton.runtime import driver

            limit = int(driver.active.utils.get_device_properties(index)["max_shared_mem"])
        except Exception:  # older/newer triton layout: the per-SM figure minus the 1 KiB the driver reserves
            with contextlib.suppress(Exception):
                limit = int(torch.cuda.get_device_properties(index).shared_memory_per_multiprocessor) - 1024
        _SMEM_LIMITS[index] = limit
    return _SMEM_LIMITS[index]


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

    def _cfg(names, tile):
        *blocks, warps, stages = tile
        return triton.Config(dict(zip(names, blocks)), num_warps=warps, num_stages=stages)

    _FWD = ("BLOCK_C", "BLOCK_H", "BLOCK_W")
    _GW = ("BLOCK_C", "BLOCK_J", "BLOCK_W")
    _FWD_NCHW_CONFIGS = [_cfg(_FWD, t) for t in FWD_NCHW_TILES]
    _FWD_NHWC_CONFIGS = [_cfg(_FWD, t) for t in FWD_NHWC_TILES]
    _GW_NCHW_CONFIGS = [_cfg(_GW, t) for t in GW_NCHW_TILES]
    _GW_NHWC_CONFIGS = [_cfg(_GW, t) for t in GW_NHWC_TILES]
    _MMA_CONFIGS = [_cfg(("BLOCK_H", "BLOCK_W"), t) for t in MMA_TILES]
    _FWD_KEY = ["C", "H_out", "W_out", "KH0", "KW0", "KH1", "KW1", "KH2", "KW2", "NUM_TERMS", "SEPARATE"]
    _GW_KEY = ["C", "H_out", "W_out", "KH", "KW", "ROWS_PER_SPLIT"]
    _MMA_KEY = _FWD_KEY + ["MODE0", "MODE1", "MODE2", "DOT_PRECISION"]

    def _band(a: dict, mode: int, size: str, block: str) -> int:
        return mma_band(a[block], [a[f"{size}{t}"] for t in range(a["NUM_TERMS"]) if a[f"MODE{t}"] == mode])

    _mma_bands = triton.heuristics({"BLOCK_U": lambda a: _band(a, 1, "KW", "BLOCK_W"),
                                    "BLOCK_V": lambda a: _band(a, 2, "KH", "BLOCK_H")})

    def _terms_of(nargs: dict, kwargs: dict) -> list[tuple[int, int]]:
        return [(int(nargs[f"KH{t}"]), int(nargs[f"KW{t}"])) for t in range(kwargs["NUM_TERMS"])]

    # Early pruning (before the autotuner benchmarks): configs whose grid exceeds the CUDA limits or whose
    # tensor-core tiles exceed the device's shared memory are never compiled (see _forward_plan).
    def _prune_mma(configs, nargs, **kwargs):
        x = nargs["x0_ptr"]
        limit = shared_memory_limit(x.device)
        terms = _terms_of(nargs, kwargs)
        ok = [cfg for cfg in configs
              if mma_tile_ok((cfg.kwargs["BLOCK_H"], cfg.kwargs["BLOCK_W"], cfg.num_warps, cfg.num_stages),
                             nargs["H_out"], nargs["W_out"], terms, x.element_size(), limit)]
        return ok or configs[:1]

    def _prune_direct(configs, nargs, **kwargs):
        ok = [cfg for cfg in configs if grid_rows_ok(nargs["H_out"], nargs["W_out"], cfg.kwargs["BLOCK_H"],
                                                     cfg.kwargs["BLOCK_W"])]
        return ok or configs[:1]

    def _prune_gw(configs, nargs, **kwargs):
        ok = [cfg for cfg in configs if grad_weight_grid_ok(nargs["KH"], nargs["KW"], cfg.kwargs["BLOCK_J"])]
        return ok or configs[:1]

    def _host_bench(fn, quantiles=None, **_):
        """Wall-clock timing for the autotuner under the interpreter (tests of the autotune plumbing)."""
        import time

        start = time.perf_counter()
        fn()
        ms = (time.perf_counter() - start) * 1e3
        return [ms] * len(quantiles) if quantiles else ms

    def _autotuned(kernel, configs, key, prune):
        """The kernel wrapped in triton.autotune. Under the interpreter with AUTOTUNE_IN_INTERPRETER set, two
        configs timed on the host (checks keys, heuristics, pruning and configs without a GPU)."""
        if interpret_mode():
            return triton.autotune(configs=configs[:2], key=key, do_bench=_host_bench,
                                   prune_configs_by={"early_config_prune": prune})(kernel)
        return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune})(kernel)

    if FIXED_TILES:  # the interpreter runs one fixed small config (autotuning would be pointless)
        _fwd_nchw = _fwd_nhwc = _dw_fwd_kernel
        _gw_nchw = _gw_nhwc = _dw_grad_weight_kernel
        _fwd_mma = _mma_bands(_dw_fwd_mma_kernel)
    else:
        _fwd_mma = _autotuned(_mma_bands(_dw_fwd_mma_kernel), _MMA_CONFIGS, _MMA_KEY, _prune_mma)
        _fwd_nchw = _autotuned(_dw_fwd_kernel, _FWD_NCHW_CONFIGS, _FWD_KEY, _prune_direct)
        _fwd_nhwc = _autotuned(_dw_fwd_kernel, _FWD_NHWC_CONFIGS, _FWD_KEY, _prune_direct)
        _gw_nchw = _autotuned(_dw_grad_weight_kernel, _GW_NCHW_CONFIGS, _GW_KEY, _prune_gw)
        _gw_nhwc = _autotuned(_dw_grad_weight_kernel, _GW_NHWC_CONFIGS, _GW_KEY, _prune_gw)


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
    (PyTorch's default), else ``tf32x3`` (three TF32 passes, ~fp32 accuracy). fp16/bf16 use the native MMA.
    GPUs without TF32 (compute capability < 8.0) get ``ieee`` (exact fp32 products)."""
    if x.dtype != torch.float32:
        return "tf32"
    if x.is_cuda and torch.version.hip is None and device_capability(x.device) < (8, 0):
        return "ieee"
    if x.is_cuda and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "tf32x3"


def _fwd_tiles_in_use(kind: str, channels_last: bool) -> Sequence[tuple[int, ...]]:
    """The tiles a launch may use: the interpreter's fixed tile, or the autotune configs."""
    if FIXED_TILES:
        if kind == "mma":
            return ((_INTERP_MMA["BLOCK_H"], _INTERP_MMA["BLOCK_W"], 4, 1),)
        t = (_INTERP_FWD if kind == "direct" else _INTERP_GW)[channels_last]
        return (tuple(t.values()) + (4, 1),)
    if kind == "mma":
        return MMA_TILES
    if kind == "direct":
        return FWD_NHWC_TILES if channels_last else FWD_NCHW_TILES
    return GW_NHWC_TILES if channels_last else GW_NCHW_TILES


def forward_plan(bsz: int, c: int, out_hw: Sequence[int], terms: Sequence[tuple[int, int]], channels_last: bool,
                 dtype: torch.dtype, device: torch.device) -> tuple[str | None, str | None]:
    """Which forward kernel a launch of these terms uses, ``(path, None)`` with path in ``LAUNCHES``' keys
    ("mma", "direct_nchw", "direct_nhwc"), or ``(None, reason)`` when no kernel can launch it.

    NCHW outputs with a term at least ``TOEPLITZ_MIN_SIDE`` wide or tall take the tensor-core kernel when one of
    its configs fits the grid limits and (on CUDA) the device's shared memory; otherwise the direct kernel."""
    h_out, w_out = int(out_hw[0]), int(out_hw[1])
    if bsz * c > GRID_MAX[0]:
        return None, f"batch x channels = {bsz * c} exceeds the grid limit {GRID_MAX[0]}"
    modes = [term_mode(kh, kw) for kh, kw in terms]
    # (the interpreter computes bf16 tl.dot wrongly in triton 3.7: bf16 runs the direct kernel there)
    interp_bf16 = interpret_mode() and dtype == torch.bfloat16
    if not channels_last and not interp_bf16 and any(modes) and _mma_enabled():
        limit = shared_memory_limit(device)
        if any(mma_tile_ok(t, h_out, w_out, terms, dtype.itemsize, limit) for t in _fwd_tiles_in_use("mma", False)):
            return "mma", None
    if any(grid_rows_ok(h_out, w_out, t[1], t[2]) for t in _fwd_tiles_in_use("direct", channels_last)):
        return ("direct_nhwc" if channels_last else "direct_nchw"), None
    return None, (f"an output plane of {h_out} x {w_out} needs more than {GRID_MAX[1]} tiles with every tile "
                  "size")


def grad_weight_reason(c: int, kh: int, kw: int, channels_last: bool) -> str | None:
    """Why the weight-gradient kernel cannot launch for a (kh x kw) kernel (None: it can)."""
    if not any(grad_weight_grid_ok(kh, kw, t[1]) for t in _fwd_tiles_in_use("grad_weight", channels_last)):
        return f"a {kh} x {kw} kernel needs more than {GRID_MAX[1]} programs per channel block"
    return None


def launch_reason(x_shape: Sequence[int], x_stride: Sequence[int], terms: Sequence[tuple[int, int]],
                  out_hw: Sequence[int], channels_last: bool, dtype: torch.dtype, device: torch.device, *,
                  needs_grad: bool = False) -> str | None:
    """Why the kernels cannot launch a (sum of) depth-wise conv(s) of ``x`` (None: they can): int32 indexing
    within a sample, grid limits and shared memory, for the forward and, with ``needs_grad``, the input-gradient
    (the forward kernel on the output gradient) and weight-gradient kernels."""
    bsz, c, h_in, w_in = (int(v) for v in x_shape)
    h_out, w_out = int(out_hw[0]), int(out_hw[1])
    if h_out <= 0 or w_out <= 0:
        return f"empty output ({h_out} x {w_out})"
    why = int32_reason("the input", x_shape, x_stride) or (
        int32_reason("the output", (bsz, c, h_out, w_out), (c * h_out * w_out, h_out * w_out, w_out, 1)))
    if why:
        return why
    why = forward_plan(bsz, c, (h_out, w_out), terms, channels_last, dtype, device)[1]
    if why:
        return f"forward kernel: {why}"
    if needs_grad:
        why = forward_plan(bsz, c, (h_in, w_in), terms, channels_last, dtype, device)[1]
        if why:
            return f"input-gradient kernel: {why}"
        for kh, kw in terms:
            why = grad_weight_reason(c, kh, kw, channels_last)
            if why:
                return f"weight-gradient kernel: {why}"
    return None


def _launch(path: str, kernel, grid, args: Sequence[object], consts: dict) -> None:
    """Launch ``kernel`` on the device of its first tensor; count it in ``LAUNCHES[path]`` once it was enqueued
    without error (so the counter says which kernels really ran)."""
    device = args[0].device
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernel[grid](*args, **consts)
    LAUNCHES[path] += 1


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

    terms = [(int(w.shape[-2]), int(w.shape[-1])) for w in weights]
    path, why = forward_plan(bsz, c, out_hw, terms, channels_last, x0.dtype, x0.device)
    if path is None:
        raise ValueError(f"dwconv_forward_terms: no Triton kernel can launch this problem: {why}")
    use_mma = path == "mma"

    def grid(meta):
        return (bsz * (c if use_mma else triton.cdiv(c, meta["BLOCK_C"])),
                triton.cdiv(h_out, meta["BLOCK_H"]) * triton.cdiv(w_out, meta["BLOCK_W"]))

    if use_mma:
        modes = [term_mode(kh, kw) for kh, kw in terms] + [0] * (3 - n)
        consts.update(MODE0=modes[0], MODE1=modes[1], MODE2=modes[2], DOT_PRECISION=dot_precision(x0))
        _launch(path, _fwd_mma, grid, args, {**consts, **(_INTERP_MMA if FIXED_TILES else {})})
    elif FIXED_TILES:
        _launch(path, _dw_fwd_kernel, grid, args, {**consts, **_INTERP_FWD[channels_last]})
    else:
        _launch(path, _fwd_nhwc if channels_last else _fwd_nchw, grid, args, consts)
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
    why = grad_weight_reason(c, kh, kw, channels_last)
    if why:
        raise ValueError(f"dwconv_grad_weight: no Triton kernel can launch this problem: {why}")
    split = _grad_weight_split(rows, c, kh, kw, channels_last, x.device)
    rows_per_split = triton.cdiv(rows, split)
    split = triton.cdiv(rows, rows_per_split)
    partial = torch.empty((split, c, kh, kw), dtype=torch.float32, device=x.device)
    args = (grad_out, x, partial, c, h_in, w_in, h_out, w_out, rows, rows_per_split,
            *grad_out.stride(), *x.stride(), kh, kw, int(top), int(left))

    def grid(meta):
        return (triton.cdiv(c, meta["BLOCK_C"]), kh * triton.cdiv(kw, meta["BLOCK_J"]), split)

    if FIXED_TILES:
        _launch("grad_weight", _dw_grad_weight_kernel, grid, args, _INTERP_GW[channels_last])
    else:
        _launch("grad_weight", _gw_nhwc if channels_last else _gw_nchw, grid, args, {})
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
    """Whether the kernels can run on the tensors' device and dtype; where they cannot (CPU without the
    interpreter, no triton) the custom ops compute with PyTorch, so that they exist and agree everywhere."""
    return HAS_TRITON and all(_common.platform_reason(t) is None for t in tensors)


def _fmt(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


# ----------------------------------------------------------------------------------------------------------
# Eligibility: can the kernels serve a problem? (checked by the dispatchers before they offer this backend)
# ----------------------------------------------------------------------------------------------------------
def can_run(x: Tensor, weight: Tensor, bias: Tensor | None, padding: Sequence[int], *,
            needs_grad: bool = False) -> str | None:
    """Why :func:`dwconv2d` cannot run its Triton kernels on this problem, or None when it can.

    Checks the platform (triton, device, dtype, compute capability: :func:`~._common.platform_reason`), that all
    tensors share the device, the shapes, and the launch limits of the kernels the call (and, with
    ``needs_grad``, its backward) would launch: int32 indexing within a sample, grid sizes, shared memory of the
    tensor-core tiles (:func:`launch_reason`)."""
    why = _common.platform_reason(x) or same_device_reason(x, weight, bias)
    if why:
        return why
    try:
        check_depthwise_args(x, weight, bias)
        padding = [int(p) for p in padding]
        if len(padding) != 4:
            raise ValueError(f"padding must be (left, right, top, bottom), got {padding}")
    except (ValueError, TypeError) as exc:
        return str(exc)
    return launch_reason(x.shape, x.stride(), [tuple(weight.shape[-2:])], _out_hw(x.shape, weight.shape[-2:], padding),
                         is_channels_last(x), x.dtype, x.device, needs_grad=needs_grad)


def can_run_sum(x: Tensor, weights: Sequence[Tensor], bias: Tensor | None, paddings: Sequence[Sequence[int]], *,
                needs_grad: bool = False) -> str | None:
    """Why :func:`dwconv2d_sum` cannot run its Triton kernels on this problem, or None when it can (the checks
    of :func:`can_run` for every term)."""
    why = _common.platform_reason(x) or same_device_reason(x, bias, *weights)
    if why:
        return why
    try:
        _, out_hw = _check_sum_args(x, weights, bias, paddings)
    except (ValueError, TypeError) as exc:
        return str(exc)
    return launch_reason(x.shape, x.stride(), [tuple(w.shape[-2:]) for w in weights], out_hw, is_channels_last(x),
                         x.dtype, x.device, needs_grad=needs_grad)


# ----------------------------------------------------------------------------------------------------------
# Custom ops. Each takes ``fallback`` (see _common.run_guarded): "" -> a kernel failure raises KernelError;
# an autoselect tag -> the failure is reported (Triton dropped for that problem, one warning) and the op's
# PyTorch computation serves the call. The forward saves it, so its backward ops follow the same policy.
# ----------------------------------------------------------------------------------------------------------
@torch.library.custom_op("lkvision::triton_dwconv2d", mutates_args=(),
                         schema="(Tensor x, Tensor weight, Tensor? bias, int[] padding, str fallback) -> Tensor")
def _dwconv2d_op(x: Tensor, weight: Tensor, bias: Tensor | None, padding: Sequence[int], fallback: str) -> Tensor:
    def reference() -> Tensor:
        return dwconv2d_reference(x, weight, bias, padding).contiguous(memory_format=_fmt(is_channels_last(x)))

    if not _use_kernels(x):
        return reference()
    left, _, top, _ = padding
    out_hw = _out_hw(x.shape, weight.shape[-2:], padding)
    return run_guarded("lkvision::triton_dwconv2d (forward)", fallback,
                       lambda: dwconv_forward_terms([x], [weight], [(top, left)], out_hw, bias=bias)[0], reference)


@_dwconv2d_op.register_fake
def _(x, weight, bias, padding, fallback):
    h_out, w_out = _out_hw(x.shape, weight.shape[-2:], padding)
    return torch.empty((x.shape[0], x.shape[1], h_out, w_out), dtype=x.dtype, device=x.device,
                       memory_format=_fmt(is_channels_last(x)))


def _grad_input_terms(grads: Sequence[Tensor], weights: Sequence[Tensor], paddings: Sequence[Sequence[int]],
                      input_hw: Sequence[int], channels_last: bool, add_identity: bool = False, *,
                      kernel: str, fallback: str = "") -> Tensor:
    """dx of ``sum_t pad_t+conv(x, w_t)`` whose term t receives the output gradient ``grads[t]`` (the same
    tensor for a summed output): the sum of full correlations of the gradients with the flipped kernels,
    cropped to the input, plus ``grads[0]`` for an identity term (one fused launch on the kernels' device).
    ``kernel`` names the calling op in failure messages; ``fallback`` as in the custom ops."""
    h_in, w_in = (int(v) for v in input_hw)
    flipped = [w.flip((-2, -1)) for w in weights]
    offsets = [(w.shape[-2] - 1 - pad[2], w.shape[-1] - 1 - pad[0]) for w, pad in zip(weights, paddings)]
    fmt = _fmt(channels_last)

    def reference() -> Tensor:
        gx = grads[0] if add_identity else None
        for g, wf, (top, left) in zip(grads, flipped, offsets):
            pad_t = (left, w_in - 1 - g.shape[3] + wf.shape[-1] - left,
                     top, h_in - 1 - g.shape[2] + wf.shape[-2] - top)
            t = dwconv2d_reference(g, wf, None, pad_t)
            gx = t if gx is None else gx + t
        return gx.contiguous(memory_format=fmt)

    def launch() -> Tensor:
        laid_out = {id(g): g.contiguous(memory_format=fmt) for g in grads}  # one copy per distinct gradient
        gs = [laid_out[id(g)] for g in grads]
        gx = dwconv_forward_terms(gs, flipped, offsets, (h_in, w_in), channels_last=channels_last,
                                  identity=gs[0] if add_identity else None)[0]
        return gx.contiguous(memory_format=fmt)

    if not _use_kernels(grads[0]):
        return reference()
    return run_guarded(kernel, fallback, launch, reference)


@torch.library.custom_op("lkvision::triton_dwconv2d_grad_input", mutates_args=(),
                         schema="(Tensor grad_out, Tensor weight, int[] padding, int[] input_hw, "
                                "bool channels_last, str fallback) -> Tensor")
def _dwconv2d_grad_input_op(grad_out: Tensor, weight: Tensor, padding: Sequence[int], input_hw: Sequence[int],
                            channels_last: bool, fallback: str) -> Tensor:
    return _grad_input_terms([grad_out], [weight], [padding], input_hw, channels_last,
                             kernel="lkvision::triton_dwconv2d_grad_input (backward)", fallback=fallback)


@_dwconv2d_grad_input_op.register_fake
def _(grad_out, weight, padding, input_hw, channels_last, fallback):
    return torch.empty((grad_out.shape[0], grad_out.shape[1], *input_hw), dtype=grad_out.dtype,
                       device=grad_out.device, memory_format=_fmt(channels_last))


def _grad_weight_reference(grad_out: Tensor, x: Tensor, kernel_hw: Sequence[int], padding: Sequence[int]) -> Tensor:
    """fp32 (C, 1, KH, KW) weight gradient with PyTorch: ``gw[c, i, j] = sum g[b, c, y, x] xpad[b, c, y+i, x+j]``,
    a conv of the padded input with the channels as the batch."""
    bsz, c = x.shape[:2]
    xp = F.pad(x.float(), tuple(int(p) for p in padding)).transpose(0, 1)
    xp = xp.reshape(1, c * bsz, xp.shape[2], xp.shape[3])
    gw = F.conv2d(xp, grad_out.float().transpose(0, 1), groups=c)  # (1, C, KH', KW') with KH' >= KH
    return gw[0, :, : kernel_hw[0], : kernel_hw[1]].unsqueeze(1).contiguous()


@torch.library.custom_op("lkvision::triton_dwconv2d_grad_weight", mutates_args=(),
                         schema="(Tensor grad_out, Tensor x, int[] kernel_hw, int[] padding, str fallback) "
                                "-> Tensor")
def _dwconv2d_grad_weight_op(grad_out: Tensor, x: Tensor, kernel_hw: Sequence[int], padding: Sequence[int],
                             fallback: str) -> Tensor:
    """fp32 (C, 1, KH, KW) weight gradient."""
    def reference() -> Tensor:
        return _grad_weight_reference(grad_out, x, kernel_hw, padding)

    if not _use_kernels(grad_out, x):
        return reference()
    left, _, top, _ = padding
    return run_guarded("lkvision::triton_dwconv2d_grad_weight (backward)", fallback,
                       lambda: dwconv_grad_weight(grad_out, x, (int(kernel_hw[0]), int(kernel_hw[1])),
                                                  (int(top), int(left))),
                       reference)


@_dwconv2d_grad_weight_op.register_fake
def _(grad_out, x, kernel_hw, padding, fallback):
    return torch.empty((x.shape[1], 1, *kernel_hw), dtype=torch.float32, device=x.device)


def _dwconv2d_setup(ctx, inputs, output):
    x, weight, bias, padding, fallback = inputs
    ctx.save_for_backward(x, weight)
    ctx.padding, ctx.fallback = list(padding), fallback
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _dwconv2d_backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.lkvision.triton_dwconv2d_grad_input(
            grad_out, weight, ctx.padding, list(x.shape[-2:]), is_channels_last(x), ctx.fallback)
    if ctx.needs_input_grad[1]:
        grad_w = torch.ops.lkvision.triton_dwconv2d_grad_weight(
            grad_out, x, list(weight.shape[-2:]), ctx.padding, ctx.fallback).to(weight.dtype)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = grad_out.sum(dim=(0, 2, 3), dtype=torch.float32).to(ctx.bias_dtype)
    return grad_x, grad_w, grad_b, None, None


_dwconv2d_op.register_autograd(_dwconv2d_backward, setup_context=_dwconv2d_setup)


# ----------------------------------------------------------------------------------------------------------
# Sum of depth-wise convs of one input (the deploy form of a Shiftwise layer: two strips + bias, one launch)
# ----------------------------------------------------------------------------------------------------------
def _split_paddings(paddings: Sequence[int]) -> list[list[int]]:
    return [list(paddings[4 * t:4 * t + 4]) for t in range(len(paddings) // 4)]


@torch.library.custom_op("lkvision::triton_dwconv2d_sum", mutates_args=(),
                         schema="(Tensor x, Tensor[] weights, Tensor? bias, int[] paddings, str fallback) "
                                "-> Tensor")
def _dwconv2d_sum_op(x: Tensor, weights: Sequence[Tensor], bias: Tensor | None, paddings: Sequence[int],
                     fallback: str) -> Tensor:
    pads = _split_paddings(paddings)

    def reference() -> Tensor:
        out = sum(dwconv2d_reference(x, w, None, pad) for w, pad in zip(weights, pads))
        if bias is not None:
            out = out + bias.to(out.dtype).view(1, -1, 1, 1)
        return out.contiguous(memory_format=_fmt(is_channels_last(x)))

    if not _use_kernels(x):
        return reference()
    return run_guarded("lkvision::triton_dwconv2d_sum (forward)", fallback,
                       lambda: dwconv_forward_terms([x] * len(weights), weights, [(pad[2], pad[0]) for pad in pads],
                                                    _out_hw(x.shape, weights[0].shape[-2:], pads[0]), bias=bias)[0],
                       reference)


@_dwconv2d_sum_op.register_fake
def _(x, weights, bias, paddings, fallback):
    h_out, w_out = _out_hw(x.shape, weights[0].shape[-2:], _split_paddings(paddings)[0])
    return torch.empty((x.shape[0], x.shape[1], h_out, w_out), dtype=x.dtype, device=x.device,
                       memory_format=_fmt(is_channels_last(x)))


@torch.library.custom_op("lkvision::triton_dwconv2d_sum_grad_input", mutates_args=(),
                         schema="(Tensor grad_out, Tensor[] weights, int[] paddings, int[] input_hw, "
                                "bool channels_last, str fallback) -> Tensor")
def _dwconv2d_sum_grad_input_op(grad_out: Tensor, weights: Sequence[Tensor], paddings: Sequence[int],
                                input_hw: Sequence[int], channels_last: bool, fallback: str) -> Tensor:
    return _grad_input_terms([grad_out] * len(weights), weights, _split_paddings(paddings), input_hw,
                             channels_last, kernel="lkvision::triton_dwconv2d_sum_grad_input (backward)",
                             fallback=fallback)


@_dwconv2d_sum_grad_input_op.register_fake
def _(grad_out, weights, paddings, input_hw, channels_last, fallback):
    return torch.empty((grad_out.shape[0], grad_out.shape[1], *input_hw), dtype=grad_out.dtype,
                       device=grad_out.device, memory_format=_fmt(channels_last))


def _dwconv2d_sum_setup(ctx, inputs, output):
    x, weights, bias, paddings, fallback = inputs
    ctx.save_for_backward(x, *weights)
    ctx.paddings, ctx.fallback = list(paddings), fallback
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _dwconv2d_sum_backward(ctx, grad_out):
    x, *weights = ctx.saved_tensors
    grad_x = grad_b = None
    grad_ws = [None] * len(weights)
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.lkvision.triton_dwconv2d_sum_grad_input(
            grad_out, weights, ctx.paddings, list(x.shape[-2:]), is_channels_last(x), ctx.fallback)
    if ctx.needs_input_grad[1]:
        grad_ws = [torch.ops.lkvision.triton_dwconv2d_grad_weight(grad_out, x, list(w.shape[-2:]), pad,
                                                                  ctx.fallback).to(w.dtype)
                   for w, pad in zip(weights, _split_paddings(ctx.paddings))]
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = grad_out.sum(dim=(0, 2, 3), dtype=torch.float32).to(ctx.bias_dtype)
    return grad_x, grad_ws, grad_b, None, None


_dwconv2d_sum_op.register_autograd(_dwconv2d_sum_backward, setup_context=_dwconv2d_sum_setup)


# ----------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------
def triton_dwconv2d(x: Tensor, weight: Tensor, bias: Tensor | None, padding: Sequence[int], *,
                    fallback: str = "") -> Tensor:
    """Depth-wise conv, stride 1: x (B, C, H, W) (NCHW, channels_last or strided), weight (C, 1, KH, KW),
    bias (C,) or None, ``padding`` = F.pad-style (left, right, top, bottom).

    Returns (B, C, H + top + bottom - KH + 1, W + left + right - KW + 1) in the layout of ``x``
    (channels_last stays channels_last). Differentiable; runs the Triton kernels when
    :func:`lkvision.ops.kernels.is_available` holds for ``x`` and PyTorch otherwise (:func:`can_run` says
    whether the kernels can serve a given problem). A kernel that fails raises :class:`~._common.KernelError`;
    ``fallback`` (set by :func:`lkvision.ops.dwconv2d`'s ``impl="auto"``, see ``_common.run_guarded``) turns
    that into a warning and the PyTorch result, forward and backward.
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
    return torch.ops.lkvision.triton_dwconv2d(x, weight, bias, padding, fallback)


def _check_sum_args(x: Tensor, weights: Sequence[Tensor], bias: Tensor | None,
                    paddings: Sequence[Sequence[int]]) -> tuple[list[int], tuple[int, int]]:
    """Validate :func:`dwconv2d_sum`'s arguments; returns the flat paddings and the output size."""
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
    return flat, out_hw


def dwconv2d_sum(x: Tensor, weights: Sequence[Tensor], bias: Tensor | None,
                 paddings: Sequence[Sequence[int]], *, fallback: str = "") -> Tensor:
    """``sum_t dwconv2d(x, weights[t], None, paddings[t]) + bias`` in ONE launch (x read once, y written once).

    x (B, C, H, W); 1 to 3 weights (C, 1, KH_t, KW_t) whose F.pad-style paddings (left, right, top, bottom)
    give the same output size; bias (C,) or None. This is the deploy form of a Shiftwise layer (horizontal
    strip with the small kernel and the identity folded in, plus the vertical strip). Differentiable w.r.t.
    x, every weight and bias; output in the layout of ``x``. ``fallback`` as in :func:`dwconv2d`.
    """
    x, bias, *weights = autocast_inputs(x, bias, *weights)
    flat, _ = _check_sum_args(x, weights, bias, paddings)
    return torch.ops.lkvision.triton_dwconv2d_sum(x, weights, bias, flat, fallback)
