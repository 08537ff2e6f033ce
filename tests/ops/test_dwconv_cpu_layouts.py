"""The CPU channels_last rewrites of dwconv2d (zero columns for the kernel widths oneDNN runs slowly, zero taps
instead of a padded copy for asymmetric strips) against a float64 F.conv2d, forward and backward, in fp32 and
bf16, on the oneDNN path itself (fp32/bf16 tensors, not fp64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lkvision.ops import dwconv as dwconv_mod
from lkvision.ops import dwconv2d
from lkvision.ops.dwconv import _CPU_NHWC_WIDEN, _cpu_widen_table, dwconv2d_grad_weight, normalize_padding


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


@pytest.mark.parametrize("capability,widened", [("AVX512", True), ("AVX2", False), ("DEFAULT", False)])
def test_widening_only_where_onednn_runs_avx512(capability, widened, monkeypatch):
    """The slow widths are a property of oneDNN's AVX-512 NHWC kernel; its AVX2 kernel costs the same per tap
    for every width, so a 13x13 kernel is widened to 13x15 on an AVX-512 CPU only."""
    assert dwconv_mod._CPU_CAPABILITY == torch.backends.cpu.get_cpu_capability()
    monkeypatch.setattr(dwconv_mod, "_CPU_CAPABILITY", capability)
    x = torch.randn(1, 4, 9, 9).contiguous(memory_format=torch.channels_last)
    w, pad4 = dwconv_mod._widen_for_cpu(x, torch.randn(4, 1, 13, 13), (6, 6, 6, 6))
    assert w.shape[-1] == (15 if widened else 13) and pad4 == ((7, 7, 6, 6) if widened else (6, 6, 6, 6))


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


# ----------------------------------------------------------------------------------------------- dwconv2d_sum
SUM_CASES = {  # terms (kernel, padding) of one layer's deploy form, all giving the input's size
    "sw_strips": [((3, 51), (25, 25, 1, 1)), ((51, 3), (1, 1, 25, 25))],
    "sw_asymmetric": [((3, 48), (23, 24, 1, 1)), ((48, 3), (1, 1, 23, 24))],  # M=47: zero taps, in place
    "slak_strips": [((13, 5), (6, 2)), ((5, 13), (2, 6))],  # width 13: widened to 15 before the in-place add
    "three_terms": [((3, 3), "same"), ((1, 9), (0, 4)), ((9, 1), (4, 0))],
    "padded_copy": [((3, 3), "same"), ((5, 5), (4, 0, 4, 0))],  # 5x5 at a corner: a padded copy, unfused
}


def _sum_ref(x, weights, biases, paddings):
    return sum(_ref(x, w, b, normalize_padding(p, tuple(w.shape[-2:]))) for w, b, p in zip(weights, biases, paddings))


def _sum_problem(case, c=20, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, c, 15, 17, generator=g)
    terms = SUM_CASES[case]
    weights = [torch.randn(c, 1, *k, generator=g) / (k[0] * k[1]) ** 0.5 for k, _ in terms]
    biases = [torch.randn(c, generator=g) if bias else None for _ in terms]
    return x.to(dtype), [w.to(dtype) for w in weights], [b if b is None else b.to(dtype) for b in biases], \
        [p for _, p in terms]


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(SUM_CASES))
def test_dwconv2d_sum_in_place_matches_float64(case, dtype, layout, monkeypatch):
    """The inference path (oneDNN adds each later term into the first one's output) against float64 F.conv2d,
    and against the reference (separate convs and adds) of the same dtype; every term that can be fused is.
    Where oneDNN has no such kernel for the dtype (bf16 on a CPU without AVX-512: "bf16 path needs the cpu
    support avx_ne_convert or avx512bw ..."), the probe says so and no term is fused."""
    from lkvision.ops import dwconv as dw

    available = dw.onednn_conv_add_available(dtype)  # (its probe calls _conv_add_ once: before counting)
    assert available or (dtype == torch.bfloat16 and not dw._CPU_CAPABILITY.startswith("AVX512"))
    fused = []
    real = dw._conv_add_
    monkeypatch.setattr(dw, "_conv_add_", lambda acc, *a: fused.append(acc) or real(acc, *a))
    x, ws, bs, ps = _sum_problem(case, dtype=dtype, bias=case != "three_terms")
    x = x.contiguous(memory_format=layout)
    with torch.no_grad():
        out = dw.dwconv2d_sum(x, ws, bs, ps)
        ref = dw.dwconv2d_sum_reference(x, ws, bs, ps)
    want = _sum_ref(x.double(), [w.double() for w in ws], [b if b is None else b.double() for b in bs], ps)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=8e-2)
    torch.testing.assert_close(out.double(), want, **tol)
    torch.testing.assert_close(out, ref, **tol)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert len(fused) == ({"three_terms": 2, "padded_copy": 0}.get(case, 1) if available else 0)
    assert all(acc is out for acc in fused)  # in place: one output buffer


def test_dwconv2d_sum_with_autograd_is_the_reference():
    """With gradients, the terms run as separate dwconv2d calls (PyTorch autograd through the custom op)."""
    x, ws, bs, ps = _sum_problem("sw_asymmetric")
    leaves = [t.clone().requires_grad_() for t in (x, *ws, *bs)]
    from lkvision.ops import dwconv2d_sum

    out = dwconv2d_sum(leaves[0], leaves[1:3], leaves[3:5], ps)
    ref_leaves = [t.double().requires_grad_() for t in (x, *ws, *bs)]
    ref = _sum_ref(ref_leaves[0], ref_leaves[1:3], ref_leaves[3:5], ps)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    go = torch.randn(ref.shape)
    out.backward(go)
    ref.backward(go.double())
    for a, r in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad.double(), r.grad, rtol=1e-4, atol=1e-4)


def test_dwconv2d_sum_under_autocast_and_fx():
    from lkvision.ops import dwconv2d_sum

    x, ws, bs, ps = _sum_problem("sw_strips")
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        out = dwconv2d_sum(x, ws, bs, ps)
    assert out.dtype == torch.bfloat16
    want = _sum_ref(x.double(), [w.double() for w in ws], [b.double() for b in bs], ps)
    torch.testing.assert_close(out.double(), want, rtol=3e-2, atol=8e-2)

    class Layer(torch.nn.Module):
        def forward(self, x):
            return dwconv2d_sum(x, ws, bs, ps)

    traced = torch.fx.symbolic_trace(Layer())  # traces as the reference: standard dwconv2d nodes and an add
    torch.testing.assert_close(traced(x), Layer()(x), rtol=1e-5, atol=1e-5)


def test_dwconv2d_sum_errors():
    from lkvision.ops import dwconv2d_sum

    x, ws, bs, ps = _sum_problem("sw_strips")
    with pytest.raises(ValueError, match="as many weights, biases and paddings"):
        dwconv2d_sum(x, ws, bs[:1], ps)
    with torch.no_grad(), pytest.raises(ValueError, match="different output sizes"):
        dwconv2d_sum(x, ws, bs, [ps[0], (0, 0, 25, 25)])
    with torch.no_grad(), pytest.raises(ValueError, match="channel mismatch"):
        dwconv2d_sum(x, [ws[0], ws[1][:10]], bs, ps)


def test_no_grad_dwconv2d_skips_the_custom_op_and_matches_it():
    """Eager calls that need no gradient run the forward directly (same values as through the custom op)."""
    x, (w, _), (b, _), (p, _) = _sum_problem("sw_asymmetric")
    with torch.no_grad():
        direct = dwconv2d(x, w, b, p)
        via_op = torch.ops.lkvision.dwconv2d(x, w, b, list(normalize_padding(p, tuple(w.shape[-2:]))), "custom")
    torch.testing.assert_close(direct, via_op, rtol=0, atol=0)
    from torch.profiler import profile

    with profile() as prof, torch.no_grad():
        dwconv2d(x, w, b, p)
    assert "lkvision::dwconv2d" not in {e.key for e in prof.key_averages()}
    with profile() as prof:  # with a gradient our backward runs through the op ("auto" may time it against
        dwconv2d(x, w.requires_grad_(), b, p, impl="custom")  # PyTorch's own: test_autoselect)
    assert "lkvision::dwconv2d" in {e.key for e in prof.key_averages()}


def test_dwconv2d_sum_bf16_few_channels_avoids_the_hanging_kernel(monkeypatch):
    """bf16, <= 16 channels, a later term >= 14 wide: oneDNN's bf16 NHWC kernel would never return; that term is
    computed in fp32 (as dwconv2d does) and added, not fused (a fused call fails here instead of hanging)."""
    from lkvision.ops import dwconv as dw

    dw.onednn_conv_add_available(torch.bfloat16)  # probe first (False without AVX-512: nothing is fused then)

    def refuse(acc, x, w, *args):
        raise AssertionError(f"fused call with a {tuple(w.shape)} bf16 kernel on {x.shape[1]} channels")

    monkeypatch.setattr(dw, "_conv_add_", refuse)
    x, ws, bs, ps = _sum_problem("sw_strips", c=8, dtype=torch.bfloat16)
    ws, bs, ps = ws[::-1], bs[::-1], ps[::-1]  # the 3 x 51 strip second
    with torch.no_grad():
        out = dw.dwconv2d_sum(x, ws, bs, ps)
    want = _sum_ref(x.double(), [w.double() for w in ws], [b.double() for b in bs], ps)
    torch.testing.assert_close(out.double(), want, rtol=3e-2, atol=8e-2)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("hw,kernel,pad4,conv_kernel", [
    ((14, 14), (31, 31), (15, 15, 15, 15), (27, 27)),  # RepLKNet-31B stage 3
    ((7, 7), (31, 31), (15, 15, 15, 15), (13, 13)),  # stage 4 (widened to 13x15 on CPU)
    ((14, 14), (3, 48), (23, 24, 1, 1), (3, 27)),  # SW-tiny stage-3 strip, asymmetric
    ((14, 14), (47, 5), (2, 2, 23, 23), (27, 5)),  # SLaK-T stage-3 strip
    ((5, 6), (13, 17), (2, 9, 10, 1), (6, 6)),  # asymmetric, cut on both axes
    ((7, 7), (3, 15), (7, 7, 1, 1), (3, 13)),  # cut to a width widening would undo on channels_last
])
def test_dead_taps_are_cut(hw, kernel, pad4, conv_kernel, layout, monkeypatch):
    """Taps that only ever meet the zero padding (a kernel larger than its input plus padding can reach) are cut
    before the library conv runs, forward and for both gradients; the values are those of the full kernel
    (float64), and the weight gradient of a dead tap is exactly zero."""
    seen = []
    conv2d = F.conv2d

    def spy(inp, weight, *args, **kwargs):
        seen.append(tuple(weight.shape[-2:]))
        return conv2d(inp, weight, *args, **kwargs)

    monkeypatch.setattr(F, "conv2d", spy)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, *hw, generator=g, dtype=torch.float64)
    w = torch.randn(6, 1, *kernel, generator=g, dtype=torch.float64)
    xl = x.contiguous(memory_format=layout).requires_grad_()
    wl = w.clone().requires_grad_()
    out = dwconv2d(xl, wl, None, pad4)
    want = _ref(x.requires_grad_(), w.requires_grad_(), None, pad4)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    # the CPU path runs oneDNN's NHWC kernel for either input layout: slow widths are widened
    expect = (conv_kernel[0], conv_kernel[1] + 2 * _cpu_widen_table().get(conv_kernel[1], 0))
    if expect[1] >= kernel[1]:  # the cut is skipped where widening would give the width back
        expect = (conv_kernel[0], kernel[1])
    assert seen[0] == expect
    go = torch.randn(want.shape, generator=g, dtype=torch.float64)
    gx, gw = torch.autograd.grad(out, (xl, wl), go)
    rx, rw = torch.autograd.grad(want, (x, w), go)
    torch.testing.assert_close(gx, rx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, rw, rtol=1e-12, atol=1e-12)
    live = torch.zeros(kernel, dtype=torch.bool)
    h, w_ = hw
    for t in range(kernel[0]):
        for u in range(kernel[1]):
            rows = [o - pad4[2] + t for o in range(want.shape[2])]
            cols = [o - pad4[0] + u for o in range(want.shape[3])]
            live[t, u] = any(0 <= r < h for r in rows) and any(0 <= c < w_ for c in cols)
    assert not live.all() and (gw[:, :, ~live] == 0).all()
