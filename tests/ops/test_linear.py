"""lkvision.ops.linear: the oneDNN fused linear against F.linear (+ activation + residual), forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lkvision.ops import autoselect
from lkvision.ops import linear as linear_mod
from lkvision.ops.linear import (
    LINEAR_ACTS,
    LINEAR_BACKENDS,
    fast_cpu_path_ok,
    linear,
    linear_reference,
    onednn_linear_available,
)

needs_onednn = pytest.mark.skipif(not onednn_linear_available(torch.float32),
                                  reason="oneDNN inner product not available in this torch build")
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _data(dtype, shape=(2, 5, 7, 24), n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).to(dtype)
    w = (torch.randn(n, shape[-1], generator=g) / shape[-1] ** 0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    r = torch.randn(*shape[:-1], n, generator=g).to(dtype)
    return x, w, b, r


@pytest.fixture(params=LINEAR_BACKENDS)
def backend(request, monkeypatch):
    """Each GEMM library in turn (autoselect would pick one per problem by timing)."""
    monkeypatch.setenv("LKVISION_FORCE_BACKEND", f"linear={request.param}")
    return request.param


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", list(LINEAR_ACTS))
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("with_residual", [True, False])
def test_inference_matches_reference(dtype, act, with_bias, with_residual, backend):
    """Fused oneDNN call where it runs for the dtype; elsewhere (bf16 on a CPU without AVX-512) the reference
    serves the call, and the result is checked the same way."""
    x, w, b, r = _data(dtype)
    b = b if with_bias else None
    r = r if with_residual else None
    with torch.no_grad():
        y = linear(x, w, b, act=act, residual=r)
        ref = linear_reference(x.double(), w.double(), None if b is None else b.double(), act=act,
                               residual=None if r is None else r.double())
    assert y.dtype == dtype and y.shape == ref.shape
    torch.testing.assert_close(y.double(), ref, **TOL[dtype])


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", [None, "gelu"])
def test_backward_matches_reference(dtype, act, backend):
    """fwd + bwd against float64 F.linear: grad_x, grad_W (oneDNN reads the transposed strides), grad_b."""
    x, w, b, r = _data(dtype, shape=(3, 6, 5, 16), n=24, seed=1)
    leaves = [t.clone().requires_grad_() for t in (x, w, b, r)]
    y = linear(*leaves[:3], act=act, residual=leaves[3])
    g = torch.randn_like(y)
    y.backward(g)
    ref_leaves = [t.double().requires_grad_() for t in (x, w, b, r)]
    ref = linear_reference(*ref_leaves[:3], act=act, residual=ref_leaves[3])
    ref.backward(g.double())
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(y.double(), ref, **tol)
    for a, e in zip(leaves, ref_leaves):
        assert a.grad.dtype == dtype
        torch.testing.assert_close(a.grad.double(), e.grad, **tol)


@needs_onednn
def test_noncontiguous_input_and_residual():
    x = torch.randn(2, 24, 5, 7).permute(0, 2, 3, 1)  # the NHWC view of an NCHW tensor
    w, b = torch.randn(8, 24), torch.randn(8)
    r = torch.randn(2, 8, 5, 7).permute(0, 2, 3, 1)
    with torch.no_grad():
        torch.testing.assert_close(linear(x, w, b, residual=r), F.linear(x, w, b) + r)


@needs_onednn
def test_autocast_casts_like_f_linear():
    x, w, b, r = _data(torch.float32)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        y = linear(x, w, b, act="gelu")
        ref = F.gelu(F.linear(x, w, b))
        y_res = linear(x, w, b, residual=r)  # fp32 residual: promotes like F.linear(...) + r
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)
    assert y_res.dtype == (F.linear(x.bfloat16(), w.bfloat16(), b.bfloat16()) + r).dtype == torch.float32


def test_fallbacks_use_the_reference():
    """fp64, meta tensors and dispatch modes (the FLOP counter) take F.linear: same values, counted FLOPs."""
    x, w, b, r = _data(torch.float64)
    torch.testing.assert_close(linear(x, w, b, act="relu", residual=r), linear_reference(x, w, b, act="relu",
                                                                                        residual=r))
    xm = torch.empty(2, 3, 8, device="meta")
    assert linear(xm, torch.empty(4, 8, device="meta")).shape == (2, 3, 4)
    from torch.utils.flop_counter import FlopCounterMode

    x32 = torch.randn(10, 8)
    with FlopCounterMode(display=False) as fc:
        assert not fast_cpu_path_ok(x32)
        linear(x32, torch.randn(4, 8))
    assert fc.get_total_flops() == 2 * 10 * 8 * 4


def test_bad_activation_is_rejected():
    with pytest.raises(ValueError, match="act must be one of"):
        linear(torch.randn(2, 3), torch.randn(4, 3), act="swish")


def test_compile_sees_the_reference():
    x, w, b, _ = _data(torch.float32, shape=(4, 8), n=6)
    fn = torch.compile(lambda x_: linear(x_, w, b, act="gelu"), backend="eager", fullgraph=True)
    torch.testing.assert_close(fn(x), F.gelu(F.linear(x, w, b)))


@needs_onednn
@pytest.mark.parametrize("faster", LINEAR_BACKENDS)
def test_each_product_runs_on_the_library_measured_faster(faster, monkeypatch):
    """The first call of a problem times both libraries (forward, grad_input and grad_weight products apart) and
    caches the faster; later calls of the problem only look it up; LKVISION_AUTOSELECT=0 keeps oneDNN."""
    monkeypatch.delenv("LKVISION_FORCE_BACKEND", raising=False)
    monkeypatch.delenv("LKVISION_AUTOSELECT", raising=False)
    autoselect.clear_cache()
    timed, ran, names = [], [], {}
    for name in LINEAR_BACKENDS:  # spies that record which library served a call
        real = linear_mod._PRODUCTS[name]
        spy = lambda *a, real=real, name=name: ran.append(name) or real(*a)  # noqa: E731
        names[spy] = name
        monkeypatch.setitem(linear_mod._PRODUCTS, name, spy)

    def fake_timer(fn, cuda=False):
        timed.append(names[fn.func])
        return 1e-3 if names[fn.func] == faster else 2e-3

    monkeypatch.setattr(linear_mod, "_timer", fake_timer)
    x, w, b, r = _data(torch.float32, shape=(3, 6, 5, 16), n=24, seed=2)
    try:
        with torch.no_grad():
            y = linear(x, w, b, act="gelu")
            linear(x, w, b, act="gelu")
        assert len(timed) == 2 and ran == [faster, faster]  # measured once, then looked up
        torch.testing.assert_close(y, F.gelu(F.linear(x, w, b)), rtol=1e-5, atol=1e-5)
        keys = {k[1][0] for k in autoselect.cache_table() if k[0] == "linear"}
        assert keys == {"forward"}
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        ran.clear()
        linear(*leaves, residual=r).sum().backward()
        assert ran == [faster] * 3 and len(timed) == 2 + 2 * 3
        assert {k[1][0] for k in autoselect.cache_table() if k[0] == "linear"} == {"forward", "grad_input",
                                                                                   "grad_weight"}
        monkeypatch.setenv("LKVISION_AUTOSELECT", "0")
        ran.clear()
        with torch.no_grad():
            linear(x, w, b, act="gelu")
        assert ran == ["onednn"]
    finally:
        autoselect.clear_cache()
