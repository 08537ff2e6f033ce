"""lkvision.ops.dwconv2d_dilated: dilated depth-wise convs (UniRepLKNet's branches) on the sub-grid form or
PyTorch's own kernel, whichever is measured faster, against float64 F.conv2d, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lkvision.ops import autoselect
from lkvision.ops import dwconv as D


@pytest.fixture
def forced(request, monkeypatch):
    monkeypatch.setenv("LKVISION_FORCE_BACKEND", f"dwconv2d_dilated_cpu={request.param}")
    autoselect.clear_cache()
    yield request.param
    autoselect.clear_cache()


@pytest.mark.parametrize("forced", ["torch", "space_to_batch"], indirect=True)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("hw,k,d", [((14, 14), 7, 2), ((13, 11), 3, 5), ((9, 10), 5, 3), ((7, 7), 3, 4)])
def test_dilated_matches_float64(hw, k, d, layout, forced):
    """Maps that are not multiples of the dilation (zero-extended sub-grids), both paths, fwd + bwd."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, *hw, generator=g).contiguous(memory_format=layout)
    w = torch.randn(6, 1, k, k, generator=g)
    b = torch.randn(6, generator=g)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    out = D.dwconv2d_dilated(*leaves, d)
    ref_leaves = [t.double().requires_grad_() for t in (x, w, b)]
    want = F.conv2d(ref_leaves[0], ref_leaves[1], ref_leaves[2], padding=d * (k - 1) // 2, dilation=d, groups=6)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    go = torch.randn(want.shape, generator=g)
    out.backward(go)
    want.backward(go.double())
    for a, r in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad.double(), r.grad, rtol=1e-4, atol=1e-4)
    (entry,) = [e for (op, _), e in autoselect.cache_table().items() if op == "dwconv2d_dilated_cpu"] or [None]
    assert entry is None  # forced: nothing timed


def test_measured_choice_and_fallbacks(monkeypatch):
    monkeypatch.delenv("LKVISION_FORCE_BACKEND", raising=False)
    autoselect.clear_cache()
    x, w = torch.randn(2, 8, 12, 12), torch.randn(8, 1, 7, 7)
    try:
        with torch.no_grad():
            y = D.dwconv2d_dilated(x, w, None, 2)
        (entry,) = [e for (op, _), e in autoselect.cache_table().items() if op == "dwconv2d_dilated_cpu"]
        assert set(entry["times_ms"]) == {"torch", "space_to_batch"}
        torch.testing.assert_close(y, D.dwconv2d_dilated_reference(x, w, None, 2), rtol=1e-5, atol=1e-5)
        # FX traces the reference; a dispatch mode (FLOP counter) gets the reference and counts its FLOPs
        gm = torch.fx.symbolic_trace(lambda t: D.dwconv2d_dilated(t, w, None, 2))
        torch.testing.assert_close(gm(x), y, rtol=1e-5, atol=1e-5)
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            D.dwconv2d_dilated(x, w, None, 2)
        assert fc.get_total_flops() == 2 * 2 * 8 * 12 * 12 * 49
    finally:
        autoselect.clear_cache()
