"""DilatedReparamConv (UniRepLKNet's Dilated Reparam Block): semantics, exact merge for every K, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import randomize_bn_and_scales
from lkvision.layers import DilatedReparamConv
from lkvision.layers.dilated import DILATED_BRANCHES, dilated_to_dense

ALL_K = sorted(DILATED_BRANCHES)


def _bn_eval(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def _reference(m: DilatedReparamConv, x: torch.Tensor) -> torch.Tensor:
    """The paper's formula written with F.conv2d only (independent of the module's forward)."""
    c, k = m.channels, m.kernel_size
    y = _bn_eval(F.conv2d(x, m.main.conv.weight, padding=k // 2, groups=c), m.main.bn)
    for (kk, r), br in zip(m.branch_specs, m.branches):
        y = y + _bn_eval(F.conv2d(x, br.conv.weight, padding=r * (kk - 1) // 2, dilation=r, groups=c), br.bn)
    return y


def test_branch_table_matches_the_official_code():
    assert DILATED_BRANCHES[13] == ((5, 1), (7, 2), (3, 3), (3, 4), (3, 5))
    assert DILATED_BRANCHES[17] == ((5, 1), (9, 2), (3, 4), (3, 5), (3, 7))
    assert ALL_K == [5, 7, 9, 11, 13, 15, 17]
    for big, specs in DILATED_BRANCHES.items():
        for k, r in specs:
            eq = r * (k - 1) + 1
            assert eq <= big and eq % 2 == 1, (big, k, r)


@pytest.mark.parametrize("r", [1, 2, 5])
@pytest.mark.parametrize("ks", [(3, 3), (5, 5), (3, 5)])
@pytest.mark.parametrize("groups", [1, 4])
def test_dilated_to_dense_equals_dilated_conv(r, ks, groups):
    g = torch.Generator().manual_seed(r * 10 + groups)
    w = torch.randn(4, 4 // groups, *ks, generator=g, dtype=torch.float64)
    x = torch.randn(2, 4, 25, 23, generator=g, dtype=torch.float64)
    dense = dilated_to_dense(w, r)
    assert dense.shape[-2:] == (r * (ks[0] - 1) + 1, r * (ks[1] - 1) + 1)
    assert int((dense != 0).sum()) == int((w != 0).sum())
    ref = F.conv2d(x, w, dilation=r, groups=groups)
    torch.testing.assert_close(F.conv2d(x, dense, groups=groups), ref, rtol=0, atol=1e-12)


def test_dilated_to_dense_rejects_bad_dilation():
    with pytest.raises(ValueError, match="dilation must be >= 1"):
        dilated_to_dense(torch.ones(1, 1, 3, 3), 0)


@pytest.mark.parametrize("k", ALL_K)
def test_forward_matches_reference_and_merge_is_exact(k):
    torch.manual_seed(k)
    m = randomize_bn_and_scales(DilatedReparamConv(6, k), seed=k).eval().double()
    assert [b.conv.dilation[0] for b in m.branches] == [r for _, r in DILATED_BRANCHES[k]]
    x = torch.randn(2, 6, 19, 22, dtype=torch.float64)  # odd x even, non-square
    with torch.no_grad():
        y = m(x)
        torch.testing.assert_close(y, _reference(m, x), rtol=0, atol=1e-12)
        m.reparameterize()
        assert m.is_merged and len(m.branches) == 0 and isinstance(m.main.bn, nn.Identity)
        assert m.main.conv.bias is not None and m.main.conv.weight.shape == (6, 1, k, k)
        torch.testing.assert_close(m(x), y, rtol=0, atol=1e-12)
        w = m.main.conv.weight.clone()
        m.reparameterize()  # idempotent
        assert torch.equal(m.main.conv.weight, w)


def test_merge_exact_when_input_smaller_than_kernel():
    m = randomize_bn_and_scales(DilatedReparamConv(3, 17), seed=3).eval().double()
    x = torch.randn(1, 3, 4, 7, dtype=torch.float64)
    with torch.no_grad():
        y = m(x)
        m.reparameterize()
        torch.testing.assert_close(m(x), y, rtol=0, atol=1e-12)


def test_merge_after_children_were_fused_first():
    """lkvision.reparameterize folds the ConvBN children before the parent; the result is the same."""
    import lkvision

    m = randomize_bn_and_scales(DilatedReparamConv(5, 11), seed=1).eval().double()
    x = torch.randn(2, 5, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        y = m(x)
        d = lkvision.reparameterize(nn.Sequential(m))  # the walker skips its root: wrap the layer
        torch.testing.assert_close(d(x), y, rtol=0, atol=1e-12)
    assert sorted(d.state_dict()) == ["0.main.conv.bias", "0.main.conv.weight"]


@pytest.mark.parametrize("k", [7, 13])
def test_deploy_constructor_matches_merged_structure(k):
    merged = DilatedReparamConv(4, k)
    merged.reparameterize()
    built = DilatedReparamConv(4, k, deploy=True)
    a = {n: tuple(t.shape) for n, t in merged.state_dict().items()}
    b = {n: tuple(t.shape) for n, t in built.state_dict().items()}
    assert a == b == {"main.conv.weight": (4, 1, k, k), "main.conv.bias": (4,)}


def test_forward_backward_fp32_matches_reference():
    m = randomize_bn_and_scales(DilatedReparamConv(4, 9), seed=2).eval()
    x = torch.randn(2, 4, 10, 13, requires_grad=True)
    y = m(x)
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, m.main.conv.weight), g)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = _reference(m, x2)
    gx2, gw2 = torch.autograd.grad(y2, (x2, m.main.conv.weight), g)
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, gw2, rtol=1e-4, atol=1e-4)


def test_train_mode_all_params_get_grads():
    m = DilatedReparamConv(4, 7).train()
    m(torch.randn(2, 4, 9, 9)).square().mean().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_bf16_forward_close_to_fp32():
    m = randomize_bn_and_scales(DilatedReparamConv(4, 13), seed=4).eval()
    x = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        y = m(x)
        yb = m.to(torch.bfloat16)(x.to(torch.bfloat16)).float()
    assert (yb - y).abs().max() <= 0.05 * y.abs().max()


@pytest.mark.parametrize("k", [3, 4, 6, 12, 19, 0])
def test_unsupported_kernel_size_is_a_clear_error(k):
    with pytest.raises(ValueError, match=r"supports kernel sizes \(5, 7, 9, 11, 13, 15, 17\)"):
        DilatedReparamConv(4, k)
