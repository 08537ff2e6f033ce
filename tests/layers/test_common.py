"""Shared layers: LayerNorm2d, GRN (+ beta fold), ConvBN fusion, BN-after-Linear fold, DropPath."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import randomize_bn_and_scales
from lkvision.layers import GRN, ConvBN, DropPath, LayerNorm2d, fold_bn_after_linear, fuse_bn, pad_kernel_to


def test_layernorm2d_matches_layernorm_over_channels_both_layouts():
    ln = LayerNorm2d(6)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.normal_()
    x = torch.randn(2, 6, 5, 7)
    ref = F.layer_norm(x.permute(0, 2, 3, 1), (6,), ln.weight, ln.bias, 1e-6).permute(0, 3, 1, 2)
    torch.testing.assert_close(ln(x), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ln(x.to(memory_format=torch.channels_last)), ref, rtol=1e-5, atol=1e-5)


def test_grn_formula_and_beta_fold():
    grn = GRN(8)
    with torch.no_grad():
        grn.gamma.uniform_(0.5, 1.5)
        grn.beta.normal_()
    x = torch.randn(2, 4, 5, 8)
    gx = x.pow(2).sum(dim=(1, 2), keepdim=True).sqrt()
    nx = gx / (gx.mean(-1, keepdim=True) + 1e-6)
    ref = (grn.gamma * nx + 1) * x + grn.beta
    torch.testing.assert_close(grn(x), ref)
    lin = nn.Linear(8, 3, bias=False)
    y = lin(grn(x))
    new_lin = grn.fold_beta_into(lin)
    assert not grn.use_bias and not hasattr(grn, "beta")
    torch.testing.assert_close(new_lin(grn(x)), y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("groups,k", [(1, 3), (4, 5), (8, (7, 3))])
def test_convbn_reparameterize_exact(groups, k):
    m = randomize_bn_and_scales(ConvBN(8, 8, k, groups=groups)).eval()
    x = torch.randn(2, 8, 9, 11, dtype=torch.float64)
    m = m.double()
    y = m(x)
    m.reparameterize()
    assert isinstance(m.bn, nn.Identity) and m.conv.bias is not None
    torch.testing.assert_close(m(x), y, rtol=1e-12, atol=1e-12)
    m.reparameterize()  # idempotent
    torch.testing.assert_close(m(x), y, rtol=1e-12, atol=1e-12)


def test_fuse_bn_with_conv_bias_and_fold_after_linear():
    bn = randomize_bn_and_scales(nn.BatchNorm2d(4)).eval().double()
    w = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64)
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    fw, fb = fuse_bn(w, bn, b)
    torch.testing.assert_close(F.conv2d(x, fw, fb), bn(F.conv2d(x, w, b)))

    lin = nn.Linear(5, 4).double()
    bn1 = randomize_bn_and_scales(nn.BatchNorm2d(4), seed=3).eval().double()
    scale = torch.rand(4, dtype=torch.float64) + 0.5
    z = torch.randn(3, 5, dtype=torch.float64)
    ref = bn1(lin(z)[:, :, None, None])[:, :, 0, 0] * scale
    torch.testing.assert_close(fold_bn_after_linear(lin, bn1, scale)(z), ref)


def test_pad_kernel_to_centres_and_rejects_odd_difference():
    k = torch.ones(1, 1, 3, 3)
    p = pad_kernel_to(k, (7, 5))
    assert p.shape[-2:] == (7, 5) and p[0, 0, 2:5, 1:4].eq(1).all() and p.sum() == 9
    with pytest.raises(ValueError, match="even"):
        pad_kernel_to(k, (6, 6))


def test_droppath_eval_identity_train_scaling():
    dp = DropPath(0.5)
    x = torch.ones(1000, 3)
    dp.eval()
    assert torch.equal(dp(x), x)
    dp.train()
    y = dp(x)
    kept = y[:, 0] != 0
    assert 350 < int(kept.sum()) < 650
    assert torch.allclose(y[kept], torch.full_like(y[kept], 2.0))
