"""ConvNeXt / ConvNeXt-LK (RepLKNet Table 11): structure, exact deploy form, counts vs the paper."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lkvision
from lkvision.layers import ReparamLargeKernelConv
from lkvision.layers.reparam_conv import DepthwiseConv2d
from lkvision.models.convnext import ConvNeXt
from lkvision.utils import count_macs, count_params


@torch.no_grad()
def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("gamma"):
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def test_kernel_sizes_and_small_branch():
    m = ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), kernel_sizes=(31, 29, 5, 3), small_kernel=5)
    dws = [s[0].dwconv for s in m.stages]
    assert isinstance(dws[0], ReparamLargeKernelConv) and dws[0].kernel_size == (31, 31)
    assert dws[1].small_kernel == (5, 5)
    # no small branch where the kernel is not larger than it
    assert isinstance(dws[2], DepthwiseConv2d) and isinstance(dws[3], DepthwiseConv2d)
    plain = lkvision.create_model("convnext_t")
    assert all(isinstance(b.dwconv, DepthwiseConv2d) and b.dwconv.kernel_size == (7, 7)
               for s in plain.stages for b in s)


def test_deploy_exact_and_layer_scale_folded():
    torch.manual_seed(0)
    m = _randomize(lkvision.create_model("convnext_nano_lk", num_classes=10)).eval()
    x = torch.randn(2, 3, 64, 96)  # fp32: CPU grouped convs in fp64 loop over groups (slow)
    with torch.no_grad():
        y = m(x)
        d = lkvision.reparameterize(m)
        assert (d(x) - y).abs().max() <= 1e-5 * y.abs().max()
    assert all(b.gamma is None for s in d.stages for b in s)
    assert not [n for n, mm in d.named_modules() if isinstance(mm, nn.BatchNorm2d)]


def test_features_only_layernorm():
    m = lkvision.create_model("convnext_nano_lk", features_only=True).eval()
    feats = m(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [16, 32, 64, 128]
    assert all(type(n).__name__ == "LayerNorm2d" for n in m.feature_norms.values())


def test_config_length_mismatch():
    with pytest.raises(ValueError, match="same length"):
        ConvNeXt(depths=(3, 3, 9), kernel_sizes=(7, 7, 7, 7))


@pytest.mark.parametrize("name,params,gmacs", [
    ("convnext_t", 29, 4.5),        # Table 11: 29M / 4.5G
    ("convnext_lk_t", 32, 6.1),     # Table 11: 32M / 6.1G
    pytest.param("convnext_s", 50, 8.7, marks=pytest.mark.slow),
    pytest.param("convnext_lk_s", 58, 11.3, marks=pytest.mark.slow),
])
def test_counts_match_table11(name, params, gmacs):
    with torch.device("meta"):
        m = lkvision.create_model(name)
        lkvision.reparameterize(m, inplace=True)
        p, g = count_params(m) / 1e6, count_macs(m) / 1e9
    assert p == pytest.approx(params, rel=0.02)
    assert g == pytest.approx(gmacs, rel=0.02)
