"""ReparamLargeKernelConv / ConvBNAct / pre-BN folding: exact re-parameterisation and clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import randomize_bn_and_scales
from lkvision.layers import ReparamLargeKernelConv
from lkvision.layers.reparam_conv import ConvBNAct, DepthwiseConv2d, fold_bn_into_next_conv1x1


def _reference(layer: ReparamLargeKernelConv, x: torch.Tensor) -> torch.Tensor:
    """The two-branch definition written with F.conv2d and F.batch_norm (eval statistics)."""

    def branch(cb):
        c, bn = cb.conv, cb.bn
        y = F.conv2d(x, c.weight, None, c.stride, c.padding, groups=c.groups)
        return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)

    y = branch(layer.large)
    return y + branch(layer.small) if layer.small is not None else y


CASES = [
    # (kernel, small, stride, H, W)
    (13, 5, 1, 17, 12),
    ((7, 5), (3, 1), 1, 9, 11),       # rectangular kernels
    ((31, 1), (5, 1), 1, 20, 7),      # strip kernel, larger than the map
    (4, 2, 1, 10, 9),                 # even kernels (even difference): still exact
    (5, 5, 1, 8, 8),                  # small == large
    (9, None, 1, 11, 10),             # no small branch: only the BN folds
    (13, 3, 2, 15, 14),               # strided (MobileNetV2 down-sampling)
]


@pytest.mark.parametrize("kernel,small,stride,h,w", CASES)
def test_reparameterize_is_exact_fp64(kernel, small, stride, h, w):
    torch.manual_seed(0)
    layer = randomize_bn_and_scales(ReparamLargeKernelConv(6, kernel, small, stride=stride)).double().eval()
    x = torch.randn(2, 6, h, w, dtype=torch.float64)
    with torch.no_grad():
        ref = _reference(layer, x)
        y = layer(x)
        torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
        layer.reparameterize()
        assert layer.is_merged and layer.large is None and layer.small is None
        y2 = layer(x)
        assert y2.shape == ref.shape
        torch.testing.assert_close(y2, ref, rtol=0, atol=1e-12)
        layer.reparameterize()  # idempotent
        torch.testing.assert_close(layer(x), y2, rtol=0, atol=0)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    assert tuple(layer.conv.weight.shape) == (6, 1, kh, kw)
    assert set(layer.state_dict()) == {"conv.weight", "conv.bias"}


def test_reparameterize_fp32_close():
    torch.manual_seed(1)
    layer = randomize_bn_and_scales(ReparamLargeKernelConv(8, 31, 5)).eval()
    x = torch.randn(2, 8, 24, 20)
    with torch.no_grad():
        y = layer(x)
        layer.reparameterize()
        torch.testing.assert_close(layer(x), y, rtol=0, atol=2e-5)


def test_forward_backward_match_reference_fp64():
    torch.manual_seed(2)
    layer = randomize_bn_and_scales(ReparamLargeKernelConv(4, (9, 7), (3, 5))).double().train()
    ref_layer = randomize_bn_and_scales(ReparamLargeKernelConv(4, (9, 7), (3, 5))).double().train()
    ref_layer.load_state_dict(layer.state_dict())
    x = torch.randn(2, 4, 12, 10, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y = layer(x)

    def branch(cb, inp):
        return cb.bn(F.conv2d(inp, cb.conv.weight, None, 1, cb.conv.padding, groups=4))

    y_ref = branch(ref_layer.large, x2) + branch(ref_layer.small, x2)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=1e-10)
    for (n, p), (_, q) in zip(layer.named_parameters(), ref_layer.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-10, msg=n)


@pytest.mark.parametrize("kernel,small", [(7, 4), ((7, 5), (3, 2)), (5, 7), (4, 3)])
def test_uncentrable_small_kernel_is_a_clear_error(kernel, small):
    with pytest.raises(ValueError, match="difference K - k must be even"):
        ReparamLargeKernelConv(4, kernel, small)


def test_bad_kernel_spec():
    with pytest.raises(ValueError, match="pair"):
        ReparamLargeKernelConv(4, (3, 3, 3))
    with pytest.raises(ValueError, match="positive"):
        ReparamLargeKernelConv(4, 0)


def test_conv_bn_act_fold_exact():
    torch.manual_seed(3)
    for groups, k, stride in ((1, 3, 2), (8, 3, 1), (1, 1, 1)):
        m = randomize_bn_and_scales(ConvBNAct(8, 8, k, stride=stride, groups=groups, act=nn.ReLU6())).double().eval()
        x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
        with torch.no_grad():
            y = m(x)
            m.reparameterize()
            assert isinstance(m.bn, nn.Identity) and m.conv.bias is not None
            torch.testing.assert_close(m(x), y, rtol=0, atol=1e-12)


def test_depthwise_conv2d_matches_conv2d():
    torch.manual_seed(4)
    m = DepthwiseConv2d(5, (7, 3))
    x = torch.randn(2, 5, 8, 9)
    ref = F.conv2d(x, m.weight, m.bias, padding=(3, 1), groups=5)
    torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-5)


def test_fold_prebn_into_1x1():
    torch.manual_seed(5)
    bn = randomize_bn_and_scales(nn.BatchNorm2d(6)).double().eval()
    conv = nn.Conv2d(6, 4, 1, bias=True).double()
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        y = conv(bn(x))
        torch.testing.assert_close(fold_bn_into_next_conv1x1(bn, conv)(x), y, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="unpadded 1x1"):
        fold_bn_into_next_conv1x1(bn, nn.Conv2d(6, 4, 3, padding=1))


def test_without_bn_is_a_plain_sum_and_merges_exactly():
    """bn=False (SLaK's bn=False): y = DWConv_K(x) + DWConv_k(x), bias-free, no BN keys; merge is exact."""
    torch.manual_seed(0)
    layer = ReparamLargeKernelConv(6, 9, 3, bn=False).eval()
    assert not any(".bn." in k for k in layer.state_dict())
    x = torch.randn(2, 6, 13, 11, dtype=torch.float64)
    layer = layer.double()
    wl, ws = layer.large.conv.weight, layer.small.conv.weight
    ref = F.conv2d(x, wl, padding=4, groups=6) + F.conv2d(x, ws, padding=1, groups=6)
    with torch.no_grad():
        assert torch.allclose(layer(x), ref, atol=1e-12)
        layer.reparameterize()
        assert layer.is_merged and torch.equal(layer.conv.bias, torch.zeros(6, dtype=torch.float64))
        assert torch.allclose(layer(x), ref, atol=1e-12)


ACT_CASES = [
    # (in, out, kernel, stride, groups, act, layout)
    (3, 16, 3, 2, 1, nn.ReLU(), torch.channels_last),          # RepLKNet's first stem conv
    (16, 16, 3, 1, 16, nn.ReLU(), torch.channels_last),        # its stride-1 depth-wise stem conv
    (16, 16, 3, 2, 16, nn.ReLU6(), torch.contiguous_format),   # a strided depth-wise conv, ReLU6, NCHW
    (8, 12, 5, 1, 4, nn.GELU(), torch.channels_last),          # grouped, GELU
    (8, 12, 3, 1, 1, nn.GELU(approximate="tanh"), torch.contiguous_format),
]


@pytest.mark.parametrize("cin,cout,k,stride,groups,act,layout", ACT_CASES)
def test_conv_act_matches_reference_in_deploy_form(cin, cout, k, stride, groups, act, layout):
    """A deployed ConvBNAct runs conv + activation as one oneDNN call in inference: the same values as
    ``act(conv(x))`` (fp32 summation order), in the input's layout, for every fusable activation."""
    from lkvision.layers.reparam_conv import _fused_conv_act_ok, conv_act, conv_act_reference, onednn_conv_act_available

    torch.manual_seed(0)
    m = ConvBNAct(cin, cout, k, stride=stride, groups=groups, act=act)
    randomize_bn_and_scales(m)
    m.eval()
    x = torch.randn(2, cin, 11, 10).contiguous(memory_format=layout)
    with torch.no_grad():
        want = m(x)
        m.reparameterize()
        got = m(x)
        ref = conv_act_reference(x, m.conv, m.act)
        assert _fused_conv_act_ok(x, m.conv, m.act) == onednn_conv_act_available(torch.float32)
    assert not _fused_conv_act_ok(x, m.conv, m.act)  # the weights need gradients: the two-op path
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert got.is_contiguous(memory_format=layout)
    assert conv_act(x, m.conv, m.act).shape == ref.shape


def test_conv_act_falls_back_where_it_cannot_fuse():
    """Training (a graph is recorded), an activation oneDNN has no post-op for, autocast and a large stride-1
    depth-wise kernel (dwconv2d's measured choice) take the conv-then-activation path, with gradients."""
    from lkvision.layers.reparam_conv import _fused_conv_act_ok, conv_act, conv_act_reference

    torch.manual_seed(1)
    conv = nn.Conv2d(6, 6, 3, padding=1, groups=6)
    x = torch.randn(2, 6, 9, 9)
    assert not _fused_conv_act_ok(x, conv, nn.SiLU())
    assert not _fused_conv_act_ok(x.requires_grad_(), conv, nn.ReLU())  # conv.weight needs a gradient too
    y = conv_act(x, conv, nn.ReLU())
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.autograd.grad(conv_act_reference(x, conv, nn.ReLU()).sum(), x)[0])
    big = nn.Conv2d(6, 6, 13, padding=6, groups=6)
    with torch.no_grad():
        assert not _fused_conv_act_ok(x.detach(), big, nn.ReLU())
        torch.testing.assert_close(conv_act(x.detach(), big, nn.ReLU()),
                                   conv_act_reference(x.detach(), big, nn.ReLU()), rtol=1e-5, atol=1e-5)
        with torch.autocast("cpu", torch.bfloat16):
            assert not _fused_conv_act_ok(x.detach(), conv, nn.ReLU())
