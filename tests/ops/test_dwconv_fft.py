"""lkvision.ops.dwconv_fft: large depth-wise convs (and sums of strips) through the FFT on CPU, against float64
F.conv2d; and the measured choice between it and oneDNN's direct kernel in dwconv2d / dwconv2d_sum."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lkvision.ops import autoselect, dwconv2d, dwconv2d_sum
from lkvision.ops import dwconv_fft as fft_mod
from lkvision.ops.dwconv_fft import dwconv2d_fft, dwconv2d_sum_fft, fft_eligible, fft_size, merge_terms


def _ref(x, w, b, pad4):
    return F.conv2d(F.pad(x, pad4), w, b, groups=x.shape[1])


def _close(out, want, rel):
    assert out.shape == want.shape
    assert (out.double() - want).abs().max() <= rel * want.abs().max(), (out.double() - want).abs().max()


def test_fft_size_is_the_next_7_smooth_number():
    for n in range(1, 300):
        m = fft_size(n)
        r = m
        for p in (2, 3, 5, 7):
            while r % p == 0:
                r //= p
        assert m >= n and r == 1
        assert all(fft_size(k) != k for k in range(n, m))  # nothing smaller in between is 7-smooth


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("hw,kernel,pad4", [
    ((20, 20), (15, 15), (7, 7, 7, 7)),  # "same"
    ((17, 23), (13, 17), (2, 9, 10, 1)),  # asymmetric, rectangular, smaller output
    ((14, 14), (3, 48), (23, 24, 1, 1)),  # an SW strip wider than the map
    ((9, 11), (9, 9), (8, 0, 0, 8)),  # all padding on one side
])
def test_fft_conv_matches_float64(hw, kernel, pad4, dtype, rel):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, *hw, generator=g, dtype=torch.float64)
    w = torch.randn(6, 1, *kernel, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    out = dwconv2d_fft(x.to(dtype), w.to(dtype), b.to(dtype), pad4)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    _close(out, _ref(x, w, b, pad4), rel)


def test_merged_kernel_is_the_sum_of_the_terms():
    """3x51 + 51x3 (+ a 5x5 and a bias-free term): one merged kernel, and one FFT conv, give the sum."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 30, 30, generator=g, dtype=torch.float64)
    ws = [torch.randn(5, 1, *k, generator=g, dtype=torch.float64) for k in ((3, 51), (51, 3), (5, 5))]
    bs = [torch.randn(5, generator=g, dtype=torch.float64), None, torch.randn(5, generator=g, dtype=torch.float64)]
    ps = [(24, 26, 1, 1), (1, 1, 25, 25), (2, 2, 2, 2)]
    want = sum(_ref(x, w, b, p) for w, b, p in zip(ws, bs, ps))
    merged, bias, pad4 = merge_terms(ws, bs, ps)
    assert merged.shape == (5, 1, 51, 51) and pad4 == (24, 26, 25, 25)
    _close(_ref(x, merged, bias, pad4), want, 1e-12)
    _close(dwconv2d_sum_fft(x, ws, bs, ps), want, 1e-12)


def test_spectrum_cache_follows_in_place_weight_updates():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 16, 16, generator=g)
    w = torch.randn(4, 1, 15, 15, generator=g)
    pad4 = (7, 7, 7, 7)
    first = dwconv2d_fft(x, w, None, pad4)
    with torch.no_grad():
        w.mul_(2)  # bumps the version counter: the cached spectrum must not be reused
    _close(dwconv2d_fft(x, w, None, pad4), _ref(x.double(), w.double(), None, pad4), 1e-5)
    _close(first, _ref(x.double(), w.double() / 2, None, pad4), 1e-5)


def test_eligibility():
    big = torch.empty(1, 64, 64, 64)
    assert fft_eligible(big, (15, 15), (7, 7, 7, 7))
    assert not fft_eligible(big, (7, 7), (3, 3, 3, 3))  # too few taps: the direct kernel wins by far
    assert not fft_eligible(big[:, :8], (15, 15), (7, 7, 7, 7))  # too small an input
    assert not fft_eligible(big.bfloat16(), (15, 15), (7, 7, 7, 7))  # no bf16 FFT on CPU
    assert not fft_eligible(big, (15, 15), (15, 0, 7, 7))  # padding >= kernel: rows of pure padding


@pytest.fixture
def fresh_autoselect(monkeypatch):
    for var in ("LKVISION_FORCE_BACKEND", "LKVISION_AUTOSELECT", "LKVISION_FORBID_BACKENDS"):
        monkeypatch.delenv(var, raising=False)
    autoselect.clear_cache()
    yield monkeypatch
    autoselect.clear_cache()


def _spy(monkeypatch, name):
    calls = []
    real = getattr(fft_mod, name)
    monkeypatch.setattr(fft_mod, name, lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


@pytest.mark.parametrize("faster", ["direct", "fft"])
def test_dwconv2d_takes_the_measured_faster_path(faster, fresh_autoselect):
    """No-grad eager CPU calls of an eligible problem time both paths once and keep the faster; the result is
    the conv either way; with a gradient needed the FFT is never used."""
    monkeypatch = fresh_autoselect
    calls = _spy(monkeypatch, "dwconv2d_fft")
    timed = []

    # which candidate a timing call ran is told by whether the FFT spy fired during it
    def timer(fn, cuda=False):
        before = len(calls)
        fn()
        ran_fft = len(calls) > before
        timed.append("fft" if ran_fft else "direct")
        return 1e-3 if timed[-1] == faster else 2e-3

    monkeypatch.setattr(autoselect, "measure_min", timer)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 64, 64, 64, generator=g)
    w = torch.randn(64, 1, 15, 15, generator=g) / 15
    b = torch.randn(64, generator=g)
    want = _ref(x.double(), w.double(), b.double(), (7, 7, 7, 7))
    with torch.no_grad():
        calls.clear()
        out = dwconv2d(x, w, b, "same")
        n_after_first = len(calls)
        out2 = dwconv2d(x, w, b, "same")
    assert sorted(timed) == ["direct", "fft"]  # each timed once
    assert len(calls) - n_after_first == (1 if faster == "fft" else 0)  # the second call only looks it up
    _close(out, want, 1e-5)
    _close(out2, want, 1e-5)
    calls.clear()
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    dwconv2d(*leaves, "same").sum().backward()
    assert not calls and leaves[1].grad is not None


def test_force_and_disable(fresh_autoselect):
    monkeypatch = fresh_autoselect
    calls = _spy(monkeypatch, "dwconv2d_sum_fft")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 96, 56, 56, generator=g)  # SLaK/SW stage-1 sized, eligible
    ws = [torch.randn(96, 1, 3, 51, generator=g) / 12, torch.randn(96, 1, 51, 3, generator=g) / 12]
    bs = [torch.randn(96, generator=g), torch.randn(96, generator=g)]
    ps = [(25, 25, 1, 1), (1, 1, 25, 25)]
    want = sum(_ref(x.double(), w.double(), b.double(), p) for w, b, p in zip(ws, bs, ps))
    monkeypatch.setenv("LKVISION_FORCE_BACKEND", "fft")
    with torch.no_grad():
        _close(dwconv2d_sum(x, ws, bs, ps), want, 1e-5)
    assert len(calls) == 1
    monkeypatch.setenv("LKVISION_FORCE_BACKEND", "direct")
    with torch.no_grad():
        _close(dwconv2d_sum(x, ws, bs, ps), want, 1e-5)
    monkeypatch.delenv("LKVISION_FORCE_BACKEND")
    monkeypatch.setenv("LKVISION_AUTOSELECT", "0")
    with torch.no_grad():
        _close(dwconv2d_sum(x, ws, bs, ps), want, 1e-5)
    assert len(calls) == 1  # neither forced-direct nor disabled measuring ran the FFT


def test_spectrum_cache_drops_dead_weights_and_keeps_a_byte_cap(monkeypatch):
    fft_mod._SPECTRA.clear()
    x = torch.randn(1, 4, 16, 16)
    w = torch.randn(4, 1, 15, 15)
    dwconv2d_fft(x, w, None, (7, 7, 7, 7))
    assert len(fft_mod._SPECTRA) == 1
    del w  # the weights are gone: their entry goes at the next insert
    keep = [torch.randn(4, 1, 15, 15) for _ in range(3)]
    monkeypatch.setattr(fft_mod, "_SPECTRA_BYTES", 2 * 4 * 24 * 13 * 8)  # two spectra of (4, 24, 13) complex64
    for k in keep:
        dwconv2d_fft(x, k, None, (7, 7, 7, 7))
    ids = {key[0][0] for key in fft_mod._SPECTRA}
    assert ids == {id(keep[1]), id(keep[2])}  # the oldest live one was evicted beyond the cap
    fft_mod._SPECTRA.clear()


def _grad_weight_ref(g, x, kernel, pad4):
    """float64 weight gradient through autograd of F.conv2d (the definition, not our direct path)."""
    w = torch.zeros(x.shape[1], 1, *kernel, dtype=torch.float64, requires_grad=True)
    (gw,) = torch.autograd.grad(_ref(x.double(), w, None, pad4), w, g.double())
    return gw


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("hw,kernel,pad4", [
    ((20, 20), (15, 15), (7, 7, 7, 7)),  # "same"
    ((17, 23), (13, 17), (2, 9, 10, 1)),  # asymmetric, rectangular, smaller output
    ((14, 14), (3, 13), (6, 6, 1, 1)),  # a strip
    ((9, 11), (9, 9), (8, 0, 0, 8)),  # all padding on one side
    ((12, 10), (51, 5), (0, 4, 25, 25)),  # taller than the map (dead rows are cut before the FFT runs)
])
def test_fft_weight_gradient_matches_float64(hw, kernel, pad4, dtype, rel, channels_last):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, *hw, generator=gen, dtype=torch.float64)
    ho = hw[0] + pad4[2] + pad4[3] - kernel[0] + 1
    wo = hw[1] + pad4[0] + pad4[1] - kernel[1] + 1
    g = torch.randn(3, 4, ho, wo, generator=gen, dtype=torch.float64)
    want = _grad_weight_ref(g, x, kernel, pad4)
    xs, gs = x.to(dtype), g.to(dtype)
    if channels_last:
        xs, gs = xs.contiguous(memory_format=torch.channels_last), gs.contiguous(memory_format=torch.channels_last)
    if max(pad4[0], pad4[1]) < kernel[1] and max(pad4[2], pad4[3]) < kernel[0] and kernel[0] <= hw[0] + 1:
        out = fft_mod.dwconv2d_grad_weight_fft(gs, xs, kernel, pad4)
        assert out.shape == (4, 1, *kernel) and out.dtype == dtype and out.is_contiguous()
        _close(out, want, rel)
    # through dwconv2d's backward with the FFT forced (where a problem is not eligible, the direct path serves)
    from lkvision.ops import dwconv as dw_mod

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LKVISION_FORCE_BACKEND", "dwconv2d_grad_weight_cpu=fft")
        mp.setattr(fft_mod, "MIN_FFT_TAPS", 1)
        mp.setattr(fft_mod, "MIN_FFT_ELEMENTS", 1)
        autoselect.clear_cache()
        _close(dw_mod.dwconv2d_grad_weight(gs, xs, kernel, pad4), want, rel)
    autoselect.clear_cache()


@pytest.mark.parametrize("faster", ["direct", "fft"])
def test_training_weight_gradient_takes_the_measured_faster_path(faster, fresh_autoselect):
    """The backward of dwconv2d on an eligible CPU problem times the direct (batch-folded conv) and the FFT weight
    gradient once and keeps the faster; the gradient is right either way and the forward is not the FFT."""
    monkeypatch = fresh_autoselect
    calls = _spy(monkeypatch, "dwconv2d_grad_weight_fft")
    fwd_calls = _spy(monkeypatch, "dwconv2d_fft")
    timed = []

    def timer(fn, cuda=False):
        before = len(calls)
        fn()
        timed.append("fft" if len(calls) > before else "direct")
        return 1e-3 if timed[-1] == faster else 2e-3

    monkeypatch.setattr(autoselect, "measure_min", timer)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 32, 64, 64, generator=gen).contiguous(memory_format=torch.channels_last)
    w = torch.randn(32, 1, 51, 5, generator=gen) / 16
    g = torch.randn(2, 32, 64, 64, generator=gen)
    want = _grad_weight_ref(g, x, (51, 5), (2, 2, 25, 25))
    for _ in range(2):
        wl = w.clone().requires_grad_()
        dwconv2d(x, wl, None, "same", impl="custom").backward(g)
        _close(wl.grad, want, 1e-5)
    assert timed.count("fft") == 1 and timed.count("direct") == 1  # timed once, then looked up
    n_fft = len(calls)
    assert n_fft == (3 if faster == "fft" else 1)  # one timing call, then both backward passes if it won
    assert not fwd_calls
    entry = autoselect.cache_table()
    assert [e["winner"] for (op, _), e in entry.items() if op == "dwconv2d_grad_weight_cpu"] == [faster]
