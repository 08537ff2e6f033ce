"""Shift-add operator: official tables, reference vs literal scatter loop vs fast, autograd, compile/export."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lkvision.ops import (
    fold_shiftwise_weight,
    make_shift_tables,
    num_blocks,
    shift_add,
    shift_offsets,
    shiftwise_conv,
    strip_paddings,
)

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"


def _extra(k: int) -> int:
    return (k - 1) - k // 2


def scatter_loop(x: torch.Tensor, pad_hv: torch.Tensor, idx: torch.Tensor, m: int, k: int):
    """Literal transcription of the CUDA kernel: one 'thread' per input element, scatter-add with bound checks."""
    nk, e = num_blocks(m, k), _extra(k)
    b_, cin, hin, win = x.shape
    r, h, w, edges = cin // nk, hin - 2 * e, win - 2 * e, idx.shape[1]
    outs = [[[[[0.0] * w for _ in range(h)] for _ in range(r)] for _ in range(b_)] for _ in range(3)]
    xl, ph, il = x.tolist(), pad_hv.tolist(), idx.tolist()
    for b, pc, hh, ww in itertools.product(range(b_), range(cin), range(hin), range(win)):
        oc, v = pc // nk, xl[b][pc][hh][ww]
        for ii in range(edges):
            y, xx = hh - e, ww + ph[pc][ii]
            if 0 <= y < h and 0 <= xx < w:
                outs[0][b][oc][y][xx] += v
            y, xx = hh + ph[pc][edges + ii], ww - e
            if 0 <= y < h and 0 <= xx < w:
                outs[1][b][oc][y][xx] += v
            if pc == il[oc][ii]:
                y, xx = hh - e, ww - e
                if 0 <= y < h and 0 <= xx < w:
                    outs[2][b][oc][y][xx] += v
    return tuple(torch.tensor(o, dtype=x.dtype) for o in outs)


# ----------------------------------------------------------------------------------------------- tables
def test_offsets_and_paddings():
    assert shift_offsets(51) == list(range(23, -26, -3))
    assert num_blocks(49) == 17 and num_blocks(13) == 5 and num_blocks(13, 5) == 3
    (l, r, t, b), (l2, r2, t2, b2) = strip_paddings(49)
    assert (l, r, t, b) == (24, 26, 1, 1) and (l2, r2, t2, b2) == (1, 1, 24, 26)
    assert strip_paddings(51)[0][:2] == (25, 25) and strip_paddings(47)[0][:2] == (23, 24)
    assert strip_paddings(13)[0][:2] == (6, 8)


def test_tables_match_official_golden_and_keep_global_rng():
    from safetensors.torch import load_file

    golden = load_file(str(GOLDEN / "sw_dev.sw_tables.safetensors"))
    info = json.loads((GOLDEN / "sw_dev.json").read_text())["sw_stage_info"]
    torch.manual_seed(7)
    state = torch.get_rng_state()
    for st in info:
        pad_hv, idx = make_shift_tables(st["repN"], st["big_kernel_M"], st["small_kernel"], st["N_rep_edges"])
        assert pad_hv.dtype == torch.int32 and idx.dtype == torch.int32
        assert torch.equal(pad_hv, golden[f"stages.{st['stage']}.pad_hv"])
        assert torch.equal(idx, golden[f"stages.{st['stage']}.idx_identit"])
        assert num_blocks(st["big_kernel_M"], st["small_kernel"]) == st["nk"]
        assert shift_offsets(st["big_kernel_M"], st["small_kernel"]) == st["real_pad_offsets"]
    assert torch.equal(torch.get_rng_state(), state)
    # a caller-provided generator gives the same stream as seed 123
    g = torch.Generator().manual_seed(123)
    p2, i2 = make_shift_tables(12, 13, generator=g)
    assert torch.equal(p2, golden["stages.0.pad_hv"]) and torch.equal(i2, golden["stages.0.idx_identit"])


# ----------------------------------------------------------------------------------------------- parity
CASES = [(m, k, e) for m, k, e in itertools.product([51, 49, 47, 13, 7, 5], [3, 5], [1, 2, 4]) if m >= k]


def _case_data(m, k, e, seed):
    g = torch.Generator().manual_seed(seed)
    nk, r = num_blocks(m, k), 2
    h, w = (5, 9) if m > 13 else (4, 3) if m > 5 else (3, 2)  # many maps smaller than M
    pad_hv, idx = make_shift_tables(r, m, k, e, seed=seed)
    x = torch.randn(1, r, h, w, generator=g, dtype=torch.float64)
    wt = torch.randn(r * nk, 1, k, k, generator=g, dtype=torch.float64)
    return x, wt, pad_hv, idx


def _grads(outs, inputs, seed=0):
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("m,k,e", CASES)
def test_reference_fast_scatter_parity(m, k, e):
    x, wt, pad_hv, idx = _case_data(m, k, e, seed=m * 100 + k * 10 + e)
    big_x = F.conv2d(x, wt, padding=k - 1, groups=x.shape[1]).detach()
    want = scatter_loop(big_x, pad_hv, idx, m, k)
    xr = big_x.clone().requires_grad_()
    xf = big_x.clone().requires_grad_()
    ref = shift_add(xr, pad_hv, idx, m, k, impl="reference")
    fast = shift_add(xf, pad_hv, idx, m, k, impl="fast")
    for a, b, c in zip(ref, fast, want):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b, c, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_grads(ref, [xr])[0], _grads(fast, [xf])[0], rtol=1e-12, atol=1e-12)
    # conv + shift: the fast (folded strips) path equals the reference, forward and backward
    xa, wa = x.clone().requires_grad_(), wt.clone().requires_grad_()
    xb, wb = x.clone().requires_grad_(), wt.clone().requires_grad_()
    out_ref = shiftwise_conv(xa, wa, pad_hv, idx, m, k, impl="reference")
    out_fast = shiftwise_conv(xb, wb, pad_hv, idx, m, k, impl="fast")
    for a, b in zip(out_ref, out_fast):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
    for ga, gb in zip(_grads(out_ref, [xa, wa]), _grads(out_fast, [xb, wb])):
        torch.testing.assert_close(gb, ga, rtol=1e-10, atol=1e-10)


def test_repeated_identity_pick_counts_twice():
    m, k = 7, 3
    pad_hv, idx = make_shift_tables(1, m, k, 2)
    idx = torch.tensor([[1, 1]], dtype=torch.int32)
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    s = shift_add(x, pad_hv, idx, m, k, impl="fast")[2]
    torch.testing.assert_close(s, 2 * x[:, 1:2, 1:5, 1:5])
    torch.testing.assert_close(shift_add(x, pad_hv, idx, m, k, impl="reference")[2], s)


def test_gradcheck():
    m, k, e = 7, 3, 2
    x, wt, pad_hv, idx = _case_data(m, k, e, seed=3)
    big_x = torch.randn(1, 2 * 3, 5, 4, dtype=torch.float64, requires_grad=True)
    for impl in ("reference", "fast"):
        assert torch.autograd.gradcheck(lambda t, i=impl: shift_add(t, pad_hv, idx, m, k, impl=i), (big_x,))
        assert torch.autograd.gradcheck(lambda a, b, i=impl: shiftwise_conv(a, b, pad_hv, idx, m, k, impl=i),
                                        (x.requires_grad_(), wt.requires_grad_()), fast_mode=True)
    assert torch.autograd.gradcheck(lambda b: fold_shiftwise_weight(b, pad_hv, idx, m, k), (wt,))


# ----------------------------------------------------------------------------------------------- dtypes/layouts
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_channels_last_batch1(dtype):
    m, k, r = 13, 3, 4
    nk = num_blocks(m, k)
    g = torch.Generator().manual_seed(1)
    x64 = torch.randn(1, r, 10, 12, generator=g, dtype=torch.float64)
    w64 = torch.randn(r * nk, 1, k, k, generator=g, dtype=torch.float64) * 0.3
    pad_hv, idx = make_shift_tables(r, m, k, 4)
    want = shiftwise_conv(x64, w64, pad_hv, idx, m, k, impl="reference")
    tol = {torch.float32: 1e-5, torch.bfloat16: 8e-2, torch.float16: 1e-2}[dtype]
    x = x64.to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = w64.to(dtype).requires_grad_()
    got = shiftwise_conv(x, w, pad_hv, idx, m, k, impl="fast")
    for a, b in zip(got, want):
        assert a.dtype == dtype and a.shape == b.shape
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * 4)
    sum(o.float().sum() for o in got).backward()
    assert x.grad.dtype == dtype and w.grad.dtype == dtype
    x64r, w64r = x64.clone().requires_grad_(), w64.clone().requires_grad_()
    sum(o.sum() for o in shiftwise_conv(x64r, w64r, pad_hv, idx, m, k, impl="reference")).backward()
    torch.testing.assert_close(x.grad.double(), x64r.grad, rtol=tol, atol=tol * 8)
    torch.testing.assert_close(w.grad.double(), w64r.grad, rtol=tol, atol=tol * 40)
    # shift_add fast on a channels_last big X
    big_x = F.conv2d(x64, w64, padding=k - 1, groups=r)
    ref = shift_add(big_x, pad_hv, idx, m, k, impl="reference")
    fast = shift_add(big_x.to(dtype).contiguous(memory_format=torch.channels_last), pad_hv, idx, m, k)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * 8)


def test_deterministic():
    x, wt, pad_hv, idx = _case_data(49, 3, 4, seed=5)
    x, wt = x.float().requires_grad_(), wt.float().requires_grad_()
    runs = []
    for _ in range(2):
        x.grad = wt.grad = None
        out = shiftwise_conv(x, wt, pad_hv, idx, 49, 3)
        sum(o.sum() for o in out).backward()
        runs.append([*(o.detach() for o in out), x.grad.clone(), wt.grad.clone()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------- errors
def test_clear_errors():
    pad_hv, idx = make_shift_tables(2, 7, 3, 2)
    x = torch.randn(1, 2, 5, 5)
    w = torch.randn(6, 1, 3, 3)
    with pytest.raises(ValueError, match="big_kernel"):
        shiftwise_conv(x, torch.randn(2, 1, 5, 5), pad_hv, idx, 3, 5)
    with pytest.raises(ValueError, match="weight must have shape"):
        shiftwise_conv(x, torch.randn(8, 1, 3, 3), pad_hv, idx, 7, 3)
    with pytest.raises(ValueError, match="pad_hv must have shape"):
        shiftwise_conv(x, w, pad_hv[:, :3], idx, 7, 3)
    with pytest.raises(ValueError, match="int32/int64"):
        shiftwise_conv(x, w, pad_hv.float(), idx, 7, 3)
    with pytest.raises(ValueError, match="idx_identit must have shape"):
        shiftwise_conv(torch.randn(1, 3, 5, 5), torch.randn(9, 1, 3, 3), pad_hv, idx, 7, 3)
    with pytest.raises(ValueError, match="not in shift_offsets"):
        shiftwise_conv(x, w, pad_hv + 1, idx, 7, 3)
    with pytest.raises(ValueError, match=r"idx_identit\[c, e\]"):
        shiftwise_conv(x, w, pad_hv, idx + 3, 7, 3)
    with pytest.raises(ValueError, match="multiple of nk"):
        shift_add(torch.randn(1, 7, 7, 7), pad_hv, idx, 7, 3)
    with pytest.raises(TypeError, match="dtype"):
        shift_add(torch.ones(1, 6, 7, 7, dtype=torch.int64), pad_hv, idx, 7, 3)
    with pytest.raises(ValueError, match="impl"):
        shiftwise_conv(x, w, pad_hv, idx, 7, 3, impl="cuda")
    with pytest.raises(ValueError, match="4-D"):
        shiftwise_conv(x[0], w, pad_hv, idx, 7, 3)


# ----------------------------------------------------------------------------------------------- flops / compile
def test_flop_count_is_strip_macs():
    from torch.utils.flop_counter import FlopCounterMode

    b, r, h, w, m, k = 2, 4, 9, 11, 13, 3
    nk = num_blocks(m, k)
    L = k * nk
    pad_hv, idx = make_shift_tables(r, m, k, 4)
    x, wt = torch.randn(b, r, h, w), torch.randn(r * nk, 1, k, k)
    with FlopCounterMode(display=False) as fc:
        shiftwise_conv(x, wt, pad_hv, idx, m, k)
    strip_macs = b * r * h * w * (2 * k * L + k * k)
    fold_macs = r * (2 * nk * nk + nk) * k * k  # the tiny count-matrix products of the fold
    assert fc.get_total_flops() == 2 * (strip_macs + fold_macs)


class _SW(torch.nn.Module):
    def __init__(self, r=3, m=11, k=3):
        super().__init__()
        self.m, self.k = m, k
        self.weight = torch.nn.Parameter(torch.randn(r * num_blocks(m, k), 1, k, k) * 0.2)
        pad_hv, idx = make_shift_tables(r, m, k, 2)
        self.register_buffer("pad_hv", pad_hv)
        self.register_buffer("idx", idx)

    def forward(self, x):
        h, v, s = shiftwise_conv(x, self.weight, self.pad_hv, self.idx, self.m, self.k)
        return h + 2 * v - s


def test_torch_export_and_compile_eager_backend():
    mod = _SW()
    x = torch.randn(2, 3, 8, 10)
    want = mod(x)
    ep = torch.export.export(mod, (x,))
    assert "lkvision.dwconv2d" in str(ep.graph)
    torch.testing.assert_close(ep.module()(x), want)
    torch._dynamo.reset()
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
    xc = x.clone().requires_grad_()
    out = compiled(xc)
    torch.testing.assert_close(out, want)
    out.sum().backward()
    xr = x.clone().requires_grad_()
    mod(xr).sum().backward()
    torch.testing.assert_close(xc.grad, xr.grad)


@pytest.mark.slow
def test_torch_compile_inductor_fullgraph():
    mod = _SW()
    x = torch.randn(2, 3, 8, 10, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(mod, fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, mod(x))
    out.sum().backward()
    assert x.grad is not None and mod.weight.grad is not None


def test_fold_cache_sees_in_place_table_changes():
    """The per-table cache of the fold's count matrices must never serve stale tables."""
    from lkvision.ops.shift_add import fold_shiftwise_weight, make_shift_tables

    pad, idx = make_shift_tables(4, 13, 3, 2)
    w = torch.randn(4 * 5, 1, 3, 3, dtype=torch.float64)
    first = fold_shiftwise_weight(w, pad, idx, 13, 3)
    again = fold_shiftwise_weight(w, pad, idx, 13, 3)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    pad2, idx2 = make_shift_tables(4, 13, 3, 2, seed=7)
    pad.copy_(pad2)  # in place: same tensor object, new version counter
    idx.copy_(idx2)
    fresh = fold_shiftwise_weight(w, pad2.clone(), idx2.clone(), 13, 3)
    after = fold_shiftwise_weight(w, pad, idx, 13, 3)
    assert all(torch.equal(a, b) for a, b in zip(after, fresh))
    assert not torch.equal(after[0], first[0])
