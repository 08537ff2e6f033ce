"""ShiftWiseConv2d: ghost split, tables, forward semantics, merge/deploy forms, errors."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import randomize_bn_and_scales
from lkvision.layers import ShiftWiseConv2d
from lkvision.layers.shiftwise import ghost_split
from lkvision.ops import make_shift_tables


def _layer(channels=16, M=13, k=3, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    m = ShiftWiseConv2d(channels, M, k, **kw).to(dtype)
    return randomize_bn_and_scales(m, seed=seed + 1)


def test_ghost_split_official_formula_and_no_global_rng():
    np.random.seed(7)  # noqa: NPY002 - checking that the global RNG is left alone
    before = np.random.get_state()[1].copy()  # noqa: NPY002
    rep, ghost = ghost_split(16, 0.23)
    assert np.array_equal(np.random.get_state()[1], before)  # noqa: NPY002
    # golden sw_dev stage 0 (C=16, G=0.23): ghost = [0, 4, 7, 10]
    assert ghost == [0, 4, 7, 10]
    assert rep == sorted(set(range(16)) - set(ghost)) and len(rep) == 12
    for c, g in [(80, 0.23), (161, 0.0), (320, 0.5), (7, 0.1)]:
        rep, ghost = ghost_split(c, g)
        assert len(rep) == (int(c * (1 - g)) // 2) * 2 and len(rep) % 2 == 0
        assert sorted(rep + ghost) == list(range(c))
    assert ghost_split(161, 0.0)[1] == [int(np.random.RandomState(123).choice(161, 1, replace=False)[0])]


def test_buffers_in_state_dict_and_tables_match_ops():
    m = ShiftWiseConv2d(32, 11, edges=3)
    sd = m.state_dict()
    for key in ("pad_hv", "idx_identit", "rep_idx", "ghost_idx"):
        assert key in sd
    assert "_restore_idx" not in sd
    pad_hv, idx = make_shift_tables(m.rep_channels, 11, 3, 3, seed=123)
    assert torch.equal(m.pad_hv, pad_hv) and torch.equal(m.idx_identit, idx)
    assert m.pad_hv.dtype == torch.int32 and m.pad_hv.shape == (m.rep_channels * 4, 6)
    # the per-process table cache hands out copies
    m.pad_hv.zero_()
    assert torch.equal(ShiftWiseConv2d(32, 11, edges=3).pad_hv, pad_hv)
    # sparse-training contract: maskable per-branch weights
    assert m.num_branches == 2 and len(m.branches) == 2
    assert m.branches[1].weight.shape == (m.rep_channels * 4, 1, 3, 3)


def test_init_depends_on_the_global_seed():
    # the official constructor reseeds the global RNG (123) so every init is identical; ours must not
    torch.manual_seed(1)
    a = ShiftWiseConv2d(16, 13).branches[0].weight
    torch.manual_seed(2)
    b = ShiftWiseConv2d(16, 13).branches[0].weight
    assert not torch.equal(a, b)
    torch.manual_seed(5)
    ShiftWiseConv2d(16, 13, num_branches=1)
    r1 = torch.rand(3)
    torch.manual_seed(5)
    nn.Conv2d(12, 60, 3, padding=2, groups=12, bias=False)
    assert torch.equal(torch.rand(3), r1)  # the tables consume no global random numbers


def _literal(m: ShiftWiseConv2d, x: torch.Tensor) -> torch.Tensor:
    """Independent check: branches as separate convs, the op's reference path, explicit BN/ghost handling."""
    from lkvision.ops import shift_add

    xr, xg = x[:, m.rep_idx], x[:, m.ghost_idx]
    conv = sum(F.conv2d(xr, b.weight, padding=m.small_kernel - 1, groups=m.rep_channels) for b in m.branches)
    h, v, s = shift_add(conv, m.pad_hv, m.idx_identit, m.big_kernel, m.small_kernel, impl="reference")
    y = m.bn_h(h) + m.bn_v(v) + m.bn_s(s) + xr
    return torch.cat([y, xg], 1)


@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_forward_matches_literal_definition_forward_and_backward(impl):
    m = _layer(20, 13, impl=impl).eval()
    x = torch.randn(2, 20, 9, 12, dtype=torch.float64, requires_grad=True)
    y = m(x)
    ref = _literal(m, x)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad((y * g).sum(), (x, m.branches[0].weight))
    rx, rw = torch.autograd.grad((ref * g).sum(), (x, m.branches[0].weight))
    torch.testing.assert_close(gx, rx, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, rw, rtol=1e-10, atol=1e-12)


CASES = [  # (channels, M, k, edges, ghost_ratio)
    (16, 5, 3, 1, 0.0),
    (16, 7, 3, 2, 0.23),
    (12, 13, 3, 3, 0.23),
    (10, 49, 3, 4, 0.0),
    (14, 51, 3, 4, 0.23),
    (16, 6, 3, 2, 0.23),  # even M
    (9, 5, 5, 2, 0.23),  # M = N
    (12, 13, 5, 4, 0.0),
    (16, 9, 5, 3, 0.5),
]


@pytest.mark.parametrize("channels,M,k,edges,ghost", CASES,
                         ids=[f"C{c}-M{M}-N{k}-E{e}-G{g}" for c, M, k, e, g in CASES])
def test_deploy_form_exact_in_eval(channels, M, k, edges, ghost):
    m = _layer(channels, M, k, edges=edges, ghost_ratio=ghost, seed=M + k).eval()
    x = torch.randn(2, channels, 11, 8, dtype=torch.float64)
    y = m(x)
    m.reparameterize()
    assert m.deployed and not any(isinstance(s, nn.modules.batchnorm._BatchNorm) for s in m.modules())
    assert not hasattr(m, "branches") and "pad_hv" not in m.state_dict()
    nk = -(-M // k)
    lh = k * nk + max(0, k // 2 - (k * nk - 1 - M // 2))  # widened only if the S kernel would not fit
    assert m.weight_h.shape == (m.rep_channels, 1, k, lh) and m.weight_v.shape == (m.rep_channels, 1, k * nk, k)
    torch.testing.assert_close(m(x), y, rtol=1e-11, atol=1e-11)
    m.reparameterize()  # idempotent
    torch.testing.assert_close(m(x), y, rtol=1e-11, atol=1e-11)
    # a following BN folds into the strips (rep channels) and a per-channel affine (ghost channels)
    bn = randomize_bn_and_scales(nn.BatchNorm2d(channels), seed=9).double().eval()
    m.fuse_output_bn(bn)
    torch.testing.assert_close(m(x), bn(y), rtol=1e-11, atol=1e-11)


def test_deploy_float32_and_input_that_is_smaller_than_the_kernel():
    m = _layer(24, 49, dtype=torch.float32).eval()
    x = torch.randn(1, 24, 5, 7)  # the 51-wide strips are mostly padding
    y = m(x)
    m.reparameterize()
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)


def test_restore_channel_order_and_fused_bn():
    m = _layer(16, 7, restore_channel_order=True).eval()
    plain = _layer(16, 7).eval()
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64)
    y, yp = m(x), plain(x)
    order = torch.cat([m.rep_idx, m.ghost_idx])
    torch.testing.assert_close(y[:, order], yp)
    torch.testing.assert_close(y[:, m.ghost_idx], x[:, m.ghost_idx])  # ghost channels pass through in place
    bn = randomize_bn_and_scales(nn.BatchNorm2d(16), seed=3).double().eval()
    m.fuse_output_bn(bn)
    torch.testing.assert_close(m(x), bn(y), rtol=1e-11, atol=1e-11)


def test_merge_branches_exact_in_train_mode_and_bn_off():
    m = _layer(16, 11, num_branches=3)
    m.train()
    x = torch.randn(2, 16, 7, 9, dtype=torch.float64)
    y = m(x)
    m.merge_branches()
    assert m.num_branches == 1 and len(m.branches) == 1
    torch.testing.assert_close(m(x), y, rtol=1e-12, atol=1e-12)  # batch statistics: still exact

    nobn = _layer(16, 11, bn=False).eval()
    assert isinstance(nobn.bn_h, nn.Identity)
    y = nobn(x)
    nobn.reparameterize()
    torch.testing.assert_close(nobn(x), y, rtol=1e-11, atol=1e-11)


def test_all_parameters_get_gradients():
    m = _layer(16, 9, dtype=torch.float32).train()
    m(torch.randn(2, 16, 8, 8)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_clear_errors():
    m = ShiftWiseConv2d(16, 13)
    with pytest.raises(ValueError, match="expected 16 input channels, got 8"):
        m(torch.randn(1, 8, 6, 6))
    with pytest.raises(ValueError, match="4-D"):
        m(torch.randn(16, 6, 6))
    with pytest.raises(ValueError, match=r"big_kernel \(M=3\) must be >= small_kernel \(N=5\)"):
        ShiftWiseConv2d(16, 3, 5)
    with pytest.raises(ValueError, match="small_kernel must be odd"):
        ShiftWiseConv2d(16, 13, 4)
    for bad in (1.0, -0.1, "0.2", True, float("nan")):
        with pytest.raises(ValueError, match="ghost_ratio must be a number in"):
            ShiftWiseConv2d(16, 13, ghost_ratio=bad)
    with pytest.raises(ValueError, match="leaves no shift-wise channel"):
        ShiftWiseConv2d(2, 13, ghost_ratio=0.6)
    with pytest.raises(ValueError, match="channels must be an integer"):
        ShiftWiseConv2d(16.0, 13)
    with pytest.raises(ValueError, match="edges must be an integer >= 1"):
        ShiftWiseConv2d(16, 13, edges=0)
    with pytest.raises(ValueError, match="num_branches must be an integer >= 1"):
        ShiftWiseConv2d(16, 13, num_branches=0)


def test_bfloat16_forward_backward_loose():
    m = _layer(16, 13, dtype=torch.float32).eval()
    x = torch.randn(2, 16, 10, 10)
    y = m(x)
    (y * y).sum().backward()
    gw = m.branches[0].weight.grad.clone()
    mb = _layer(16, 13, dtype=torch.float32).eval()
    mb.load_state_dict(m.state_dict())
    mb = mb.to(torch.bfloat16)
    yb = mb(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    assert float((yb.float() - y).abs().max().detach() / y.abs().max().detach()) < 3e-2
    (yb.float() * yb.float()).sum().backward()
    gb = mb.branches[0].weight.grad.float()
    assert float((gb - gw).abs().max() / gw.abs().max()) < 5e-2
    mb.reparameterize()
    with torch.no_grad():
        assert float((mb(x.bfloat16()).float() - y).abs().max() / y.abs().max()) < 3e-2


@pytest.mark.parametrize("ghost_ratio,restore", [(0.23, False), (0.0, False), (0.3, True)])
def test_expand_to_all_channels_is_a_pure_permutation(ghost_ratio, restore):
    torch.manual_seed(3)
    m = ShiftWiseConv2d(20, 13, 3, ghost_ratio=ghost_ratio, restore_channel_order=restore)
    m = randomize_bn_and_scales(m, seed=5).double().eval()
    x = torch.randn(2, 20, 9, 11, dtype=torch.float64)
    m.reparameterize()
    m.fuse_output_bn(randomize_bn_and_scales(nn.BatchNorm2d(20), seed=6).double().eval())
    before = m(x)
    perm = m.expand_to_all_channels()
    after = m(x)
    torch.testing.assert_close(after[:, perm], before, rtol=1e-12, atol=1e-12)
    assert sorted(perm.tolist()) == list(range(20))
    assert torch.equal(m.expand_to_all_channels(), torch.arange(20))  # idempotent: already in input order
    with pytest.raises(RuntimeError, match="before expand_to_all_channels"):
        m.fuse_output_bn(nn.BatchNorm2d(20).double().eval())


def test_expand_to_all_channels_needs_the_deploy_form():
    with pytest.raises(RuntimeError, match="deploy form"):
        ShiftWiseConv2d(8, 7, 3).expand_to_all_channels()


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_select_channels_matches_index_select_and_keeps_channels_last(layout):
    """The ghost split's gather: values and gradients of ``index_select(1, idx)`` exactly, in the input's layout
    (a channels_last model stays channels_last after the split)."""
    from lkvision.layers.shiftwise import select_channels, select_channels_reference

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 9, 5, 6, generator=g).contiguous(memory_format=layout)
    idx = torch.tensor([7, 0, 3, 8, 2])
    go = torch.randn(2, 5, 5, 6, generator=g)
    outs, grads = [], []
    for fn in (select_channels, select_channels_reference):
        xi = x.clone().requires_grad_()
        y = fn(xi, idx)
        y.backward(go.contiguous(memory_format=layout))
        outs.append(y)
        grads.append(xi.grad)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    if layout == torch.channels_last:
        assert outs[0].is_contiguous(memory_format=torch.channels_last)
        assert grads[0].is_contiguous(memory_format=torch.channels_last)
    m = ShiftWiseConv2d(12, 7, ghost_ratio=0.3).to(memory_format=torch.channels_last)
    y = m(torch.randn(2, 12, 8, 8).contiguous(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)  # the split and the join keep the layout


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_join_channels_matches_cat_and_gives_contiguous_gradients(layout):
    """The ghost join: ``cat`` exactly, forward and backward, but each input's gradient is contiguous in that
    input's layout (``cat``'s backward hands out channel slices, on which the CPU BatchNorm backward is 5-10x
    slower); second derivatives still flow."""
    from lkvision.layers.shiftwise import join_channels, join_channels_reference

    g = torch.Generator().manual_seed(6)
    a = torch.randn(3, 5, 4, 6, generator=g, dtype=torch.float64).contiguous(memory_format=layout)
    b = torch.randn(3, 2, 4, 6, generator=g, dtype=torch.float64).contiguous(memory_format=layout)
    go = torch.randn(3, 7, 4, 6, generator=g, dtype=torch.float64).contiguous(memory_format=layout)
    res = []
    for fn in (join_channels, join_channels_reference):
        ai, bi = a.clone().requires_grad_(), b.clone().requires_grad_()
        seen = []  # the gradients as the join hands them out (a leaf's .grad would be a re-strided copy)
        a1, b1 = ai * 1, bi * 1
        for t in (a1, b1):
            t.register_hook(seen.append)
        y = fn(a1, b1)
        y.backward(go)
        res.append((y, ai.grad, bi.grad, *seen))
    for fast, ref in zip(*res):
        torch.testing.assert_close(fast, ref, rtol=0, atol=0)
    assert all(t.is_contiguous(memory_format=layout) for t in res[0][3:])
    assert not res[1][3].is_contiguous(memory_format=layout)  # what cat's own backward hands out
    ai, bi = a.clone().requires_grad_(), b.clone().requires_grad_()
    torch.autograd.gradcheck(join_channels, (ai, bi))
    torch.autograd.gradgradcheck(join_channels, (ai, bi))
    with torch.no_grad():  # no autograd node: the plain cat
        assert join_channels(a, b).grad_fn is None


def test_shiftwise_train_form_hands_batchnorms_contiguous_gradients():
    """In a channels_last SW layer with ghost channels, the gradient reaching the BNs after the shift is contiguous
    channels_last (the fast CPU BatchNorm backward) and the layer's gradients equal those of the plain path."""
    from lkvision.bench.baseline import plain_pytorch

    torch.manual_seed(0)
    m = ShiftWiseConv2d(16, 7, ghost_ratio=0.3).double().to(memory_format=torch.channels_last).train()
    x = torch.randn(2, 16, 9, 9, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    go = torch.randn(2, 16, 9, 9, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    seen = []
    hook = m.bn_h.register_full_backward_hook(lambda mod, gin, gout: seen.append(gout[0]))
    grads = []
    for ctx in (contextlib.nullcontext(), plain_pytorch()):
        m.zero_grad()
        xi = x.clone().requires_grad_()
        with ctx:
            m(xi).backward(go)
        grads.append([xi.grad] + [p.grad.clone() for p in m.parameters()])
    hook.remove()
    assert seen[0].is_contiguous(memory_format=torch.channels_last)
    for fast, ref in zip(*grads):
        torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
