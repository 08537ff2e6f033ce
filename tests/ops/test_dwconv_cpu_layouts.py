"""The CPU channels_last rewrites of dwconv2d (zero columns for the kernel widths oneDNN runs slowly, zero taps
instead of a padded copy for asymmetric strips) against a float64 F.conv2d, forward and backward, in fp32 and
bf16, on the oneDNN path itself (fp32/bf16 tensors, not fp64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lkvision.ops import dwconv2d
from lkvision.ops.dwconv import _CPU_NHWC_WIDEN, dwconv2d_grad_weight, normalize_padding


def _ref(x, w, b, pad4):
    return F.conv2d(F.pad(x, pad4), w, b, groups=x.shape[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel,padding", [
    ((13, 13), "same"), ((5, 12), (2, 6)), ((7, 11), "same"), ((3, 10), (4, 5, 1, 1)),  # widened widths
    ((3, 48), (23, 24, 1, 1)), ((51, 3), (1, 1, 24, 26)), ((3, 15), (6, 8, 1, 1)),  # asymmetric strips
    ((31, 31), "same"),
])
def test_cpu_channels_last_rewrites(dtype, kernel, padding):
    g = torch.Generator().manual_seed(0)
    c = 20  # not a multiple of oneDNN's 16-channel blocks
    x = torch.randn(2, c, 15, 17, generator=g)
    w = torch.randn(c, 1, *kernel, generator=g) / (kernel[0] * kernel[1]) ** 0.5
    b = torch.randn(c, generator=g)
    pad4 = normalize_padding(padding, kernel)
    leaves = [t.to(dtype).clone().requires_grad_() for t in (x.contiguous(memory_format=torch.channels_last), w, b)]
    out = dwconv2d(*leaves, padding)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    ref_leaves = [t.double().requires_grad_() for t in (x, w, b)]  # x, w, b themselves stay plain
    ref = _ref(*ref_leaves, pad4)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=6e-2)
    torch.testing.assert_close(out.double(), ref, **tol)
    go = torch.randn(ref.shape, generator=g)
    out.backward(go.to(dtype))
    ref.backward(go.double())
    gtol = tol if dtype == torch.float32 else dict(rtol=5e-2, atol=0.5)
    for a, r in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad.double(), r.grad, **gtol)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("kernel,pad4", [((3, 48), (23, 24, 1, 1)), ((51, 3), (1, 1, 24, 26)), ((3, 3), (1, 1, 1, 1))])
def test_grad_weight_bf16_on_cpu(kernel, pad4, layout):
    """bf16 weight gradients run oneDNN's bf16 kernel on the (1, B*C, Hp, Wp) fold (fp32 accumulation inside,
    batch summed in fp32): within 1e-2 of the float64 gradient relative to its largest entry (measured 3.5e-3;
    the result itself is rounded to bf16, 2e-3), in any input layout; fp32 (channels_last fold) within 1e-4."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 24, 14, 15, generator=g).contiguous(memory_format=layout)
    go = torch.randn(3, 24, 14, 15, generator=g).contiguous(memory_format=layout)
    out = dwconv2d_grad_weight(go.bfloat16(), x.bfloat16(), kernel, pad4)
    assert out.dtype == torch.bfloat16 and out.shape == (24, 1, *kernel)
    want = dwconv2d_grad_weight(go.bfloat16().double(), x.bfloat16().double(), kernel, pad4)
    assert (out.double() - want).abs().max() <= 1e-2 * want.abs().max()
    fp32 = dwconv2d_grad_weight(go, x, kernel, pad4)
    torch.testing.assert_close(fp32.double(), dwconv2d_grad_weight(go.double(), x.double(), kernel, pad4),
                               rtol=1e-4, atol=1e-4)


def test_widening_table_is_symmetric_and_small():
    """Each listed width gets the same number of zero columns on both sides (the output size is unchanged) and
    lands on a width that oneDNN runs fast (>= 14)."""
    for width, extra in _CPU_NHWC_WIDEN.items():
        assert width + 2 * extra >= 14 and extra <= 2


def test_bf16_few_channel_wide_kernels_do_not_hang():
    """oneDNN's bf16 NHWC depth-wise kernel hangs for <= 16 channels and widths >= 15; dwconv2d computes those in
    fp32. Run in a subprocess with a timeout, so that a regression fails instead of hanging the suite."""
    import subprocess
    import sys

    code = """
import torch, torch.nn.functional as F
from lkvision.ops import dwconv2d
for c, kernel in ((8, (13, 13)), (16, (3, 51)), (4, (1, 15))):
    x = torch.randn(2, c, 12, 12).contiguous(memory_format=torch.channels_last)
    w = torch.randn(c, 1, *kernel) * 0.1
    y = dwconv2d(x.bfloat16(), w.bfloat16(), None, "same")
    ref = F.conv2d(x.double(), w.double(), None, padding=(kernel[0] // 2, kernel[1] // 2), groups=c)
    assert y.dtype == torch.bfloat16 and (y.double() - ref).abs().max() < 0.1, (c, kernel)
    with torch.autocast("cpu", torch.bfloat16):  # fp32 inputs cast by dwconv2d's autocast policy
        y = dwconv2d(x, w, None, "same")
    assert y.dtype == torch.bfloat16 and (y.double() - ref).abs().max() < 0.1, (c, kernel)
# the weight gradient folds the batch into the channels: (1, B*C <= 16, Hp, Wp) with an Ho x Wo >= 14 kernel
x = torch.randn(1, 8, 16, 16, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
w = (torch.randn(8, 1, 3, 15) * 0.1).bfloat16().requires_grad_()
dwconv2d(x, w, None, "same").float().sum().backward()
wr = w.detach().double().requires_grad_()
F.conv2d(x.double(), wr, None, padding=(1, 7), groups=8).sum().backward()
assert (w.grad.double() - wr.grad).abs().max() < 1e-2 * wr.grad.abs().max(), "grad_weight"
# a bf16 weight gradient whose NHWC fold (72 channels, 14 x 15 kernel) hangs oneDNN with 2 threads
torch.set_num_threads(2)
x = torch.randn(3, 24, 14, 15).bfloat16().contiguous(memory_format=torch.channels_last)
w = (torch.randn(24, 1, 3, 48) * 0.1).bfloat16().requires_grad_()
dwconv2d(x, w, None, (23, 24, 1, 1)).float().sum().backward()
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
