"""SW §3.2 #1: SLaK strip weights laid out into the Shiftwise form reproduce the strip depth-wise conv."""

import pytest
import torch
import torch.nn.functional as F

from lkvision.analysis.kernels import strip_to_shiftwise_weight
from lkvision.ops.shift_add import make_shift_tables, shiftwise_conv


@pytest.mark.parametrize("M", [51, 49, 13, 7])
@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_horizontal_strip_layout_reproduces_strip_conv(M, impl):
    R = 3
    pad_hv, ident = make_shift_tables(R, M, 3, edges=1)
    x = torch.randn(2, R, 11, 15, dtype=torch.float64, requires_grad=True)
    strip = torch.randn(R, 1, 3, M, dtype=torch.float64, requires_grad=True)
    w = strip_to_shiftwise_weight(strip, pad_hv, M)
    h, _, _ = shiftwise_conv(x, w, pad_hv, ident, M, 3, impl=impl)
    ref = F.conv2d(x, strip, padding=(1, M // 2), groups=R)
    torch.testing.assert_close(h, ref)
    g = torch.randn_like(ref)
    gx, gs = torch.autograd.grad(h, (x, strip), g)
    rx, rs = torch.autograd.grad(ref, (x, strip), g)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gs, rs)


@pytest.mark.parametrize("M", [49, 13])
def test_vertical_strip_layout_and_float32(M):
    R = 2
    pad_hv, ident = make_shift_tables(R, M, 3, edges=1, seed=7)
    x = torch.randn(1, R, 16, 9)
    strip = torch.randn(R, 1, M, 3)
    w = strip_to_shiftwise_weight(strip, pad_hv, M, direction="v")
    _, v, _ = shiftwise_conv(x, w, pad_hv, ident, M, 3, impl="reference")
    torch.testing.assert_close(v, F.conv2d(x, strip, padding=(M // 2, 1), groups=R), atol=1e-5, rtol=1e-5)


def test_layout_is_a_permutation_of_the_padded_tiles_and_errors():
    M, R = 13, 2
    pad_hv, _ = make_shift_tables(R, M, 3, edges=2)
    strip = torch.randn(R, 1, 3, M)
    w = strip_to_shiftwise_weight(strip, pad_hv, M, edge=1)
    assert w.shape == (R * 5, 1, 3, 3)
    nonzero = w.flatten()[w.flatten() != 0]  # every strip tap exactly once, plus the padding zeros
    assert torch.equal(nonzero.sort().values, strip.flatten().sort().values)
    assert int((w == 0).sum()) == R * 3 * (15 - M)
    with pytest.raises(ValueError, match="short side"):
        strip_to_shiftwise_weight(torch.randn(R, 1, 5, M), pad_hv, M)
    with pytest.raises(ValueError, match="edge"):
        strip_to_shiftwise_weight(strip, pad_hv, M, edge=2)
    with pytest.raises(ValueError, match="not in shift_offsets"):
        strip_to_shiftwise_weight(strip, pad_hv + 1, M)
