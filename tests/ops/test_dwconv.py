"""dwconv2d: every selectable path vs F.conv2d (forward + backward), paddings, errors, FLOPs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lkvision.ops import dwconv2d
from lkvision.ops.dwconv import dwconv2d_grad_weight, normalize_padding

CPU_IMPLS = ["auto", "torch", "channels_last", "custom"]


def _ref(x, w, b, pad4):
    return F.conv2d(F.pad(x, pad4), w, b, groups=x.shape[1])


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("kernel,padding", [
    ((3, 3), "same"), ((7, 7), 3), ((3, 51), (24, 26, 1, 1)), ((51, 3), (1, 1, 23, 24)), ((5, 13), (2, 6)),
    ((13, 13), (0, 12, 6, 6)), ((3, 15), (0, 0, 0, 0)),
])
def test_paths_match_conv2d(impl, kernel, padding):
    g = torch.Generator().manual_seed(0)
    c = 3
    x = torch.randn(2, c, 9, 20, generator=g, dtype=torch.float64)
    w = torch.randn(c, 1, *kernel, generator=g, dtype=torch.float64)
    b = torch.randn(c, generator=g, dtype=torch.float64)
    pad4 = normalize_padding(padding, kernel)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    got, want = dwconv2d(xs, ws, bs, padding, impl=impl), _ref(xr, wr, br, pad4)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    go = torch.randn(want.shape, generator=g, dtype=torch.float64)
    (got * go).sum().backward()
    (want * go).sum().backward()
    for a, r in ((xs, xr), (ws, wr), (bs, br)):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_and_channels_last(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 8, 12, 12, generator=g)
    w = torch.randn(8, 1, 3, 31, generator=g) * 0.2
    pad = (15, 15, 1, 1)
    want = _ref(x.double(), w.double(), None, pad)
    tol = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}[dtype]
    for fmt in (torch.contiguous_format, torch.channels_last):
        xi = x.to(dtype).clone().contiguous(memory_format=fmt).requires_grad_()
        wi = w.to(dtype).clone().requires_grad_()
        out = dwconv2d(xi, wi, None, pad)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol * 8)
        out.float().sum().backward()
        xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
        _ref(xr, wr, None, pad).sum().backward()
        torch.testing.assert_close(xi.grad.double(), xr.grad, rtol=tol, atol=tol * 8)
        torch.testing.assert_close(wi.grad.double(), wr.grad, rtol=tol, atol=tol * 100)


def test_gradcheck_custom():
    x = torch.randn(2, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 1, 3, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: dwconv2d(*a, padding=(3, 1, 0, 2), impl="custom"), (x, w, b),
                                    fast_mode=True)


def test_grad_weight_helper_large_kernel():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 7, 7, generator=g, dtype=torch.float64)
    go = torch.randn(3, 4, 7, 7, generator=g, dtype=torch.float64)
    pad = (25, 25, 1, 1)
    w = torch.randn(4, 1, 3, 51, dtype=torch.float64, requires_grad=True)
    _ref(x, w, None, pad).mul(go).sum().backward()
    torch.testing.assert_close(dwconv2d_grad_weight(go, x, (3, 51), pad), w.grad)


def test_errors():
    x, w = torch.randn(1, 4, 8, 8), torch.randn(4, 1, 3, 3)
    with pytest.raises(ValueError, match="4-D input"):
        dwconv2d(x[0], w)
    with pytest.raises(ValueError, match="channel mismatch"):
        dwconv2d(x, torch.randn(3, 1, 3, 3))
    with pytest.raises(ValueError, match=r"shape \(C, 1, KH, KW\)"):
        dwconv2d(x, torch.randn(4, 2, 3, 3))
    with pytest.raises(TypeError, match="unsupported dtype"):
        dwconv2d(x.long(), w.long())
    with pytest.raises(ValueError, match="bias"):
        dwconv2d(x, w, torch.randn(5))
    with pytest.raises(ValueError, match="impl"):
        dwconv2d(x, w, impl="fft")
    with pytest.raises(ValueError, match="padding"):
        dwconv2d(x, w, padding=(1, 2, 3))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        dwconv2d(x, torch.randn(4, 1, 3, 13), padding=0)
    with pytest.raises(RuntimeError, match="triton"):
        dwconv2d(x, w, impl="triton")


def test_flop_formula():
    from torch.utils.flop_counter import FlopCounterMode

    x, w = torch.randn(2, 5, 10, 12), torch.randn(5, 1, 3, 17)
    with FlopCounterMode(display=False) as fc:
        y = dwconv2d(x, w, None, (8, 8, 1, 1), impl="custom")
    assert fc.get_total_flops() == 2 * y.numel() * 3 * 17 > 0


@pytest.mark.parametrize("impl", ["torch", "channels_last", "custom"])
@pytest.mark.parametrize("kernel,padding", [
    ((3, 15), (6, 8, 1, 1)),    # small asymmetry: zero taps are added to the kernel (SW strip, M = 13)
    ((15, 3), (1, 1, 6, 8)),
    ((3, 48), (23, 24, 1, 1)),  # large kernel: the input is padded (SW strip, M = 47)
    ((3, 3), (0, 2, 2, 0)),     # large asymmetry: the input is padded instead
    ((5, 7), (3, 0, 0, 4)),
])
def test_asymmetric_padding_both_strategies(impl, kernel, padding):
    """Both ways of realising asymmetric padding (kernel zero taps / padded input) equal F.pad + F.conv2d."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 10, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 1, *kernel, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    ref = F.conv2d(F.pad(x, padding), w, b, groups=4)
    out = dwconv2d(x, w, b, padding, impl=impl)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (x, w, b), g)
    grads_ref = torch.autograd.grad(ref, (x, w, b), g)
    for a, r in zip(grads, grads_ref):
        torch.testing.assert_close(a, r)
