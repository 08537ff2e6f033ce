"""Fast paths of the point-wise block parts (MLP, 1x1 conv, GRN, SE) against their reference twins, and the
plain-PyTorch baseline context of the benchmarks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lkvision
from lkvision.bench.baseline import FAST_PATHS, plain_pytorch
from lkvision.layers import GRN, SEBlock
from lkvision.layers.norm import grn, grn_reference
from lkvision.layers.pointwise import (
    fusable_act,
    passes_through,
    pointwise_conv,
    pointwise_conv_reference,
    pointwise_mlp,
    pointwise_mlp_reference,
)
from lkvision.layers.se import se_scale, se_scale_reference

FP32 = dict(rtol=1e-5, atol=1e-5)


def _grads(out, leaves, g):
    return torch.autograd.grad(out, leaves, g)


def _mlp(c=12, d=40, grn_bias=True, act=None):
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(c, d), nn.Linear(d, c)
    g = GRN(d, use_bias=grn_bias)
    nn.init.normal_(g.gamma)
    if grn_bias:
        nn.init.normal_(g.beta)
    return fc1, act if act is not None else nn.GELU(), fc2, g


@pytest.mark.parametrize("act", [nn.GELU(), nn.GELU(approximate="tanh"), nn.ReLU(), nn.SiLU(), nn.Identity()])
@pytest.mark.parametrize("use_grn", [True, False])
@pytest.mark.parametrize("residual", [True, False])
def test_mlp_matches_reference_fwd_bwd(act, use_grn, residual):
    fc1, act, fc2, g = _mlp(act=act)
    x = torch.randn(2, 5, 6, 12, requires_grad=True)
    r = torch.randn(2, 5, 6, 12, requires_grad=True) if residual else None
    args = (x, fc1, act, fc2, g if use_grn else None, r)
    y, ref = pointwise_mlp(*args), pointwise_mlp_reference(*args)
    torch.testing.assert_close(y, ref, **FP32)
    leaves = [x, fc1.weight, fc1.bias, fc2.weight] + ([r] if residual else []) + ([g.gamma, g.beta] if use_grn else [])
    gy = torch.randn_like(y)
    for a, b in zip(_grads(y, leaves, gy), _grads(ref, leaves, gy)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # the inference path (fused activation / residual, in-place GRN)
        torch.testing.assert_close(pointwise_mlp(*args), ref, **FP32)


def test_mlp_bf16_close_to_fp32():
    fc1, act, fc2, g = _mlp()
    x = torch.randn(2, 7, 7, 12)
    r = torch.randn(2, 7, 7, 12)
    with torch.no_grad():
        ref = pointwise_mlp_reference(x, fc1, act, fc2, g, r)
        y = pointwise_mlp(x.bfloat16(), fc1.bfloat16(), act, fc2.bfloat16(), g.bfloat16(), r.bfloat16())
    assert y.dtype == torch.bfloat16
    assert float((y.float() - ref).norm() / ref.norm()) < 2e-2


@pytest.mark.parametrize("act", [None, nn.ReLU(), nn.GELU(), nn.Hardswish()])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pointwise_conv_matches_reference(act, channels_last):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 1)
    x = torch.randn(2, 8, 5, 6, requires_grad=True)
    xi = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    r = torch.randn(2, 16, 5, 6, requires_grad=True)
    y, ref = pointwise_conv(xi, conv, act, r), pointwise_conv_reference(xi, conv, act, r)
    torch.testing.assert_close(y, ref, **FP32)
    gy = torch.randn_like(ref)
    for a, b in zip(_grads(y, [x, conv.weight, conv.bias, r], gy), _grads(ref, [x, conv.weight, conv.bias, r], gy)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_pointwise_conv_leaves_other_convs_alone():
    conv = nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(1, 8, 5, 5)
    torch.testing.assert_close(pointwise_conv(x, conv, nn.ReLU()), torch.relu(conv(x)))


@pytest.mark.parametrize("beta", [True, False])
def test_grn_matches_reference_and_zero_channel_gradient(beta):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    x[0, :, :, 2] = 0  # an all-zero channel: the norm's gradient must stay finite (zero), as torch.norm's
    x.requires_grad_()
    gamma = torch.randn(1, 1, 1, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, 1, 1, 6, dtype=torch.float64, requires_grad=True) if beta else None
    y, ref = grn(x, gamma, b), grn_reference(x, gamma, b)
    torch.testing.assert_close(y, ref)
    leaves = [x, gamma] + ([b] if beta else [])
    gy = torch.randn_like(y)
    ga, gr = _grads(y, leaves, gy), _grads(ref, leaves, gy)
    assert all(torch.isfinite(t).all() for t in ga)
    for a, e in zip(ga, gr):
        torch.testing.assert_close(a, e)
    with torch.no_grad():
        xc = x.detach().clone()
        torch.testing.assert_close(grn(xc, gamma, None, inplace=True), grn_reference(x.detach(), gamma, None))


@pytest.mark.parametrize("chunked", [False, True])
def test_grn_training_function_gradcheck(chunked, monkeypatch):
    """GRN's hand-written backward (one full-size buffer each way), with its H*W reduction in one product or in
    row chunks through a reused buffer (as for large maps), against numerical gradients."""
    from lkvision.layers import norm

    if chunked:
        monkeypatch.setattr(norm, "_HW_DOT_CHUNK", 2 * 3 * 5)  # 2 rows of (B=2, C=5) per chunk: 4 chunks
        monkeypatch.setattr(norm, "_HW_DOT_MIN_CHUNKED", 0)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    gamma = torch.randn(1, 1, 1, 5, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(1, 1, 1, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, g, b: norm._GRNTrain.apply(a, g, b, 1e-6), (x, gamma, beta))
    assert torch.autograd.gradcheck(lambda a, g: norm._GRNTrain.apply(a, g, None, 1e-6), (x, gamma))
    with torch.no_grad():
        torch.testing.assert_close(norm._hw_dot(x.reshape(2, 12, 5), x.reshape(2, 12, 5)),
                                   (x * x).sum((1, 2)).reshape(2, 5))


def test_grn_inference_reduces_in_chunks_for_large_maps(monkeypatch):
    """Inference GRN sums x^2 over (H, W) through the chunked reduction (no full-size x * x) for a contiguous
    fp32/fp64 map: the reference's values, in one product or in chunks; a non-contiguous map or bf16 keeps the
    full product."""
    from lkvision.layers import norm

    used = []
    real = norm._hw_dot
    monkeypatch.setattr(norm, "_hw_dot", lambda a, b: used.append(a.shape) or real(a, b))
    monkeypatch.setattr(norm, "_HW_DOT_CHUNK", 2 * 3 * 5)
    monkeypatch.setattr(norm, "_HW_DOT_MIN_CHUNKED", 0)
    torch.manual_seed(3)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    gamma, beta = torch.randn(1, 1, 1, 5, dtype=torch.float64), torch.randn(1, 1, 1, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(grn(x, gamma, beta), grn_reference(x, gamma, beta))
        assert used == [(2, 12, 5)]
        xt = x.transpose(1, 2)  # (2, 4, 3, 5), not contiguous
        torch.testing.assert_close(grn(xt, gamma, beta), grn_reference(xt, gamma, beta))
        grn(x.bfloat16(), gamma.bfloat16(), beta.bfloat16())
    assert used == [(2, 12, 5)]


def test_grn_takes_the_training_function_only_where_it_applies(monkeypatch):
    """fp32 with a gradient: the training function (same values and gradients as the reference, fp32 tolerance);
    no gradient, or under autocast: the ops path."""
    from lkvision.layers import norm

    calls = []
    real = norm._GRNTrain.apply
    monkeypatch.setattr(norm._GRNTrain, "apply", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(2)
    x = torch.randn(2, 7, 7, 16, requires_grad=True)
    gamma = torch.randn(1, 1, 1, 16, requires_grad=True)
    beta = torch.randn(1, 1, 1, 16, requires_grad=True)
    y, ref = grn(x, gamma, beta), grn_reference(x, gamma, beta)
    assert calls == [1]
    torch.testing.assert_close(y, ref, **FP32)
    gy = torch.randn_like(y)
    for a, e in zip(_grads(y, [x, gamma, beta], gy), _grads(ref, [x, gamma, beta], gy)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        grn(x, gamma, beta)
    with torch.autocast("cpu", torch.bfloat16):
        grn(x.bfloat16(), gamma, beta)
    assert calls == [1]


def test_se_matches_reference():
    torch.manual_seed(0)
    se = SEBlock(16, 4)
    x = torch.randn(2, 16, 7, 5, requires_grad=True).contiguous(memory_format=torch.channels_last)
    y, ref = se_scale(x, se.down, se.up), se_scale_reference(x, se.down, se.up)
    torch.testing.assert_close(y, ref, **FP32)
    gy = torch.randn_like(y)
    leaves = [x, se.down.weight, se.up.weight, se.up.bias]
    for a, b in zip(_grads(y, leaves, gy), _grads(ref, leaves, gy)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_helpers():
    assert fusable_act(nn.GELU()) == "gelu" and fusable_act(nn.GELU(approximate="tanh")) == "gelu_tanh"
    assert fusable_act(nn.ReLU()) == "relu" and fusable_act(nn.Identity()) is None
    assert fusable_act(nn.SiLU()) is False
    dp = lkvision.layers.DropPath(0.1)
    assert not passes_through(dp.train()) and passes_through(dp.eval(), nn.Identity())
    assert not passes_through(nn.BatchNorm2d(3))


def test_plain_pytorch_rebinds_and_restores():
    import importlib

    originals = [getattr(importlib.import_module(m), f) for m, f, _ in FAST_PATHS]
    from lkvision.models import unireplknet

    with plain_pytorch():
        assert unireplknet.pointwise_mlp is pointwise_mlp_reference
        for m, f, ref in FAST_PATHS:
            assert getattr(importlib.import_module(m), f) is getattr(importlib.import_module(m), ref)
    assert unireplknet.pointwise_mlp is pointwise_mlp
    assert [getattr(importlib.import_module(m), f) for m, f, _ in FAST_PATHS] == originals


@pytest.mark.parametrize("name", ["unireplknet_test", "convnext_nano_lk", "replknet_nano", "slak_test", "sw_femto"])
def test_models_equal_on_both_paths(name):
    """The same weights give the same outputs on lkvision's path and on the plain-PyTorch baseline, in the
    train form (eval) and the deploy form (residual adds fused)."""
    torch.manual_seed(0)
    model = lkvision.create_model(name).eval()
    deploy = lkvision.reparameterize(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for m in (model, deploy):
            y = m(x)
            with plain_pytorch():
                ref = m(x)
            torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
