"""StripConv (SLaK's decomposed kernel): official padding, exact merges (two strips / dense), errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lkvision
from conftest import randomize_bn_and_scales
from lkvision.layers import StripConv
from lkvision.utils import count_flops


def _bn_eval(x, bn):
    if isinstance(bn, nn.Identity):
        return x
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def _official(m: StripConv, x: torch.Tensor) -> torch.Tensor:
    """The official iGEMM semantics: every branch pads (kh//2, kw//2) taken from its FILTER shape."""
    out = 0
    for br in (m.strip_v, m.strip_h, m.small):
        if br is None:
            continue
        w = br.conv.weight
        kh, kw = w.shape[-2:]
        xp = F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2))
        out = out + _bn_eval(F.conv2d(xp, w, br.conv.bias, groups=m.channels), br.bn)
    return out


def _model(c, m, n, seed=0, **kw):
    torch.manual_seed(seed)
    return randomize_bn_and_scales(StripConv(c, m, n, **kw), seed=seed).eval().double()


SIZES = [(13, 5), (51, 5), (7, 3), (5, 5), (3, 7), (9, 1), (1, 1)]


@pytest.mark.parametrize("m_,n_", SIZES)
def test_forward_matches_official_padding(m_, n_):
    mod = _model(4, m_, n_)
    assert mod.strip_v.conv.weight.shape[-2:] == (m_, n_)
    assert mod.strip_h.conv.weight.shape[-2:] == (n_, m_)
    assert (mod.small is None) == (n_ >= m_)
    x = torch.randn(2, 4, 11, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(mod(x), _official(mod, x), rtol=0, atol=1e-12)


def test_symmetric_padding_bug_slak15_is_not_reproduced():
    """nn.Conv2d(padding=M//2) on an M x N strip gives a different output shape (SLaK#15)."""
    mod = _model(2, 13, 5)
    x = torch.randn(1, 2, 20, 24, dtype=torch.float64)
    buggy = F.conv2d(x, mod.strip_v.conv.weight, padding=13 // 2, groups=2)
    assert buggy.shape[-2:] != x.shape[-2:]
    assert mod(x).shape == x.shape


@pytest.mark.parametrize(
    "m_,n_,hw", [(m, n, (11, 16)) for m, n in SIZES] + [(13, 5, (3, 4)), (3, 7, (2, 9))]  # + input < kernel
)
def test_two_strip_and_dense_merges_are_exact(m_, n_, hw):
    mod = _model(5, m_, n_, seed=m_ + n_)
    x = torch.randn(2, 5, *hw, dtype=torch.float64)
    with torch.no_grad():
        y = mod(x)
        dense_from_train = copy.deepcopy(mod)
        dense_from_train.reparameterize(dense=True)
        mod.reparameterize()  # default: two strips
        assert mod.small is None and mod.dense is None
        for br, shape in ((mod.strip_v, (m_, n_)), (mod.strip_h, (n_, m_))):
            assert isinstance(br.bn, nn.Identity) and br.conv.bias is not None
            assert br.conv.weight.shape[-2:] == shape
        torch.testing.assert_close(mod(x), y, rtol=0, atol=1e-12)
        mod.reparameterize()  # idempotent
        torch.testing.assert_close(mod(x), y, rtol=0, atol=1e-12)
        mod.reparameterize(dense=True)  # two strips -> dense
        L = max(m_, n_)
        for d in (mod, dense_from_train):
            assert d.strip_v is None and d.strip_h is None and d.small is None
            assert d.dense.weight.shape == (5, 1, L, L)
            torch.testing.assert_close(d(x), y, rtol=0, atol=1e-12)


def test_dense_cannot_be_split_back():
    mod = _model(2, 7, 3)
    mod.reparameterize(dense=True)
    mod.reparameterize()  # deploy_dense is now True: no-op
    with pytest.raises(ValueError, match="cannot be split into strips"):
        mod.reparameterize(dense=False)


def test_without_bn():
    mod = _model(3, 9, 3, bn=False)
    branches = (mod.strip_v, mod.strip_h, mod.small)
    assert all(isinstance(b.bn, nn.Identity) and b.conv.bias is None for b in branches)
    x = torch.randn(1, 3, 8, 10, dtype=torch.float64)
    with torch.no_grad():
        y = mod(x)
        torch.testing.assert_close(y, _official(mod, x), rtol=0, atol=1e-12)
        lkvision.reparameterize(nn.Sequential(mod), inplace=True)
        torch.testing.assert_close(mod(x), y, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dense", [False, True])
def test_deploy_constructor_matches_merged_structure(dense):
    merged = StripConv(4, 13, 5, deploy_dense=dense)
    lkvision.reparameterize(nn.Sequential(merged), inplace=True)
    built = StripConv(4, 13, 5, deploy=True, deploy_dense=dense)
    a = {k: tuple(v.shape) for k, v in merged.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in built.state_dict().items()}
    assert a == b
    if dense:
        assert a == {"dense.weight": (4, 1, 13, 13), "dense.bias": (4,)}
    else:
        assert a == {"strip_v.conv.weight": (4, 1, 13, 5), "strip_v.conv.bias": (4,),
                     "strip_h.conv.weight": (4, 1, 5, 13), "strip_h.conv.bias": (4,)}


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_forward_backward_match_reference(dtype, tol):
    mod = randomize_bn_and_scales(StripConv(3, 11, 3), seed=5).eval().to(dtype)
    x = torch.randn(2, 3, 9, 12, dtype=dtype, requires_grad=True)
    params = [mod.strip_v.conv.weight, mod.strip_h.conv.weight, mod.small.conv.weight]
    y = mod(x)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *params], g)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = _official(mod, x2)
    grads2 = torch.autograd.grad(y2, [x2, *params], g)
    torch.testing.assert_close(y, y2, rtol=tol, atol=tol)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * 10)


def test_bf16_forward_close_to_fp32():
    mod = randomize_bn_and_scales(StripConv(4, 13, 5), seed=6).eval()
    x = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        y = mod(x)
        yb = mod.to(torch.bfloat16)(x.to(torch.bfloat16)).float()
    assert (yb - y).abs().max() <= 0.05 * y.abs().max()


def test_macs_two_strips_vs_dense():
    c, m_, n_, h = 8, 31, 5, 16
    strips = StripConv(c, m_, n_)
    lkvision.reparameterize(nn.Sequential(strips), inplace=True)
    dense = StripConv(c, m_, n_, deploy=True, deploy_dense=True)
    assert count_flops(strips, (1, c, h, h)) // 2 == c * h * h * 2 * m_ * n_
    assert count_flops(dense, (1, c, h, h)) // 2 == c * h * h * m_ * m_


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(big_kernel=50), "big_kernel=50 is even"),
        (dict(big_kernel=13, small_kernel=4), "small_kernel=4 is even"),
        (dict(big_kernel=0), "big_kernel must be a positive int"),
        (dict(big_kernel=13, small_kernel=None), "small_kernel must be a positive int"),
        (dict(big_kernel=13.0), "big_kernel must be a positive int"),
    ],
)
def test_bad_configurations_are_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        StripConv(4, **kw)


def test_sparse_training_hooks():
    mod = StripConv(4, 5, 5)  # square "strips": found through sparse_weight_names, not by shape
    assert StripConv.is_strip_conv is True
    assert [tuple(mod.get_parameter(n).shape) for n in mod.sparse_weight_names] == [(4, 1, 5, 5)] * 2
    mod.reparameterize(dense=True)
    assert mod.sparse_weight_names == ["dense.weight"]
