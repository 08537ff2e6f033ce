"""MobileNetV2 testbed of RepLKNet Guidelines 2/3/5: kernels, shortcuts, re-param branch, exact deploy form."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lkvision
from conftest import randomize_bn_and_scales
from lkvision.layers import ReparamLargeKernelConv
from lkvision.layers.conv_bn import ConvBN
from lkvision.layers.dilated import dilated_to_dense
from lkvision.models.mobilenetv2 import InvertedResidual, MobileNetV2
from lkvision.utils import count_macs, count_params


def _dws(m):
    return [b.dw for s in m.stages for b in s if isinstance(b, InvertedResidual)]


def test_kernel_options():
    m = lkvision.create_model("mobilenetv2_k13_rep3")
    assert all(d.kernel_size == (13, 13) and d.small_kernel == (3, 3) for d in _dws(m))
    last = lkvision.create_model("mobilenetv2_last13_rep3")
    ks = [(i, d.kernel_size[0], d.small_kernel) for i, s in enumerate(last.stages) for b in s
          if isinstance(b, InvertedResidual) for d in [b.dw]]
    assert all(k == 13 and sk == (3, 3) for i, k, sk in ks if i == 3)
    assert all(k == 3 and sk is None for i, k, sk in ks if i < 3)
    # stride-2 depth-wise convs are large too ("replace all the DW 3x3 layers")
    assert any(d.stride == (2, 2) and d.kernel_size == (13, 13) for d in _dws(m))


def test_shortcuts_on_off():
    on = lkvision.create_model("mobilenetv2_100")
    off = lkvision.create_model("mobilenetv2_noskip")
    assert sum(b.use_shortcut for s in on.stages for b in s if isinstance(b, InvertedResidual)) == 10
    assert not any(b.use_shortcut for s in off.stages for b in s if isinstance(b, InvertedResidual))


def test_feature_info_and_counts():
    m = lkvision.create_model("mobilenetv2_100")
    assert [(i["num_chs"], i["reduction"]) for i in m.feature_info] == [(24, 4), (32, 8), (96, 16), (1280, 32)]
    assert count_params(m) / 1e6 == pytest.approx(3.50, rel=0.02)  # the standard MobileNetV2 1.0
    with torch.device("meta"):
        macs = count_macs(lkvision.create_model("mobilenetv2_100")) / 1e6
    assert macs == pytest.approx(300, rel=0.02)


@pytest.mark.parametrize("name", ["mobilenetv2_nano_k13_rep3", "mobilenetv2_nano_k3_dil4"])
def test_deploy_exact_no_bn(name):
    torch.manual_seed(0)
    m = randomize_bn_and_scales(lkvision.create_model(name, num_classes=10), seed=1).eval()
    with torch.no_grad():
        x = torch.randn(2, 3, 64, 96)  # fp32: CPU grouped convs in fp64 loop over groups (slow)
        y = m(x)
        d = lkvision.reparameterize(m)
        assert (d(x) - y).abs().max() <= 1e-5 * y.abs().max()
    assert not [n for n, mm in d.named_modules() if isinstance(mm, nn.BatchNorm2d)]
    assert all(lk.is_merged for lk in d.modules() if isinstance(lk, ReparamLargeKernelConv))
    if "dil4" in name:  # only the BN folds: the deploy conv stays dilated (and biased)
        assert all(dw.conv.dilation == (4, 4) and dw.conv.bias is not None for dw in _dws(d))


def test_small_kernel_not_smaller_is_skipped():
    m = MobileNetV2(kernel_size=3, small_kernel=3, width_mult=0.25)
    assert all(d.small is None for d in _dws(m))


# ------------------------------------------------------------------ dense vs dilated (App. C, Table 12)
def _dw_output_elements(name: str) -> int:
    """Sum over the depth-wise layers of C * H_out * W_out at 224^2 (MACs per kernel tap)."""
    with torch.device("meta"):
        m = lkvision.create_model(name).eval()
        total = []
        for b in (b for s in m.stages for b in s if isinstance(b, InvertedResidual)):
            b.dw.register_forward_hook(lambda mod, i, o: total.append(o[0].numel()))
        m(torch.randn(1, 3, 224, 224))
    return sum(total)


def test_dilated_option():
    m = lkvision.create_model("mobilenetv2_k3_dil4")
    dws = _dws(m)
    assert len(dws) == 17 and all(isinstance(d, ConvBN) for d in dws)
    assert all(d.conv.kernel_size == (3, 3) and d.conv.dilation == (4, 4) and d.conv.padding == (4, 4) for d in dws)
    assert any(d.conv.stride == (2, 2) for d in dws)  # the stride-2 depth-wise convs are dilated too
    assert all(d.conv.dilation == (6, 6) for d in _dws(lkvision.create_model("mobilenetv2_k3_dil6")))
    # same feature-map sizes as the dense 9x9 model of the same maximum receptive field
    x = torch.randn(1, 3, 64, 96)
    dense = lkvision.create_model("mobilenetv2_k9", features_only=True).eval()
    dil = lkvision.create_model("mobilenetv2_k3_dil4", features_only=True).eval()
    with torch.no_grad():
        assert [f.shape for f in dense(x)] == [f.shape for f in dil(x)]
    with pytest.raises(ValueError, match="cannot be combined with small_kernel"):
        MobileNetV2(kernel_size=3, dilation=4, small_kernel=3)
    with pytest.raises(ValueError, match="dilation must be >= 1"):
        MobileNetV2(dilation=0)


def test_dilated_kernel_is_a_sparse_dense_kernel():
    """A 3x3 conv with dilation r equals the (2r+1)^2 dense conv whose kernel holds its 9 taps at multiples of
    r and zeros elsewhere (forward, both strides)."""
    torch.manual_seed(0)
    for stride in (1, 2):
        layer = randomize_bn_and_scales(ConvBN(8, 8, 3, stride=stride, groups=8, dilation=4)).double().eval()
        w, b = layer.fused_weight_bias()
        x = torch.randn(2, 8, 23, 19, dtype=torch.float64)
        dense = F.conv2d(x, dilated_to_dense(w, 4), b, stride=stride, padding=4, groups=8)
        with torch.no_grad():
            assert torch.allclose(layer(x), dense, atol=1e-12)


def test_table12_counts():
    """RepLKNet Table 12: params 4.0 / 3.5 / 4.6 / 3.5 M and 300 M FLOPs (= MACs) for the dilated rows.
    Train-form counts on the meta device (the deploy form has 17 k fewer: BN pairs become biases). The dense
    rows' MACs are the standard count, MACs(3x3) + (K^2 - 9) x (depth-wise output elements): 466.5 M and
    669.1 M -- not the paper's 319 M / 361 M, which no convention we tried reproduces."""
    paper_params = {"mobilenetv2_k9": 4.0, "mobilenetv2_k3_dil4": 3.5, "mobilenetv2_k13": 4.6,
                    "mobilenetv2_k3_dil6": 3.5}
    macs = {}
    for name, p in paper_params.items():
        with torch.device("meta"):
            m = lkvision.create_model(name)
            macs[name] = count_macs(m)
        assert count_params(m) / 1e6 == pytest.approx(p, rel=0.02), name
    base = macs["mobilenetv2_k3_dil4"]
    assert base / 1e6 == pytest.approx(300, rel=0.02) and macs["mobilenetv2_k3_dil6"] == base
    taps = _dw_output_elements("mobilenetv2_100")
    assert macs["mobilenetv2_k9"] == base + (81 - 9) * taps
    assert macs["mobilenetv2_k13"] == base + (169 - 9) * taps
    assert macs["mobilenetv2_k9"] / 1e6 == pytest.approx(466.5, abs=0.1)
    assert macs["mobilenetv2_k13"] / 1e6 == pytest.approx(669.1, abs=0.1)


def test_kernels_show_the_dilated_kernel_on_its_dense_grid():
    """`lkvision kernels`: the default layer is App. D's first stride-1 conv of the last stage, and a dilated
    3x3 (r = 4) appears as a 9x9 map with non-zeros exactly at the 9 dilated taps, before and after re-param."""
    from lkvision.analysis.kernels import default_kernel_layer, find_kernel_layers, kernel_maps

    torch.manual_seed(0)
    m = randomize_bn_and_scales(lkvision.create_model("mobilenetv2_nano_k3_dil4", num_classes=10)).eval()
    names = find_kernel_layers(m)
    assert len(names) == 17 and all(n.endswith(".dw") for n in names)
    layer = default_kernel_layer(m)
    assert layer == "stages.3.1.dw" and dict(m.named_modules())[layer].conv.stride == (1, 1)
    maps = kernel_maps(m, layer)
    lattice = torch.zeros(9, 9, dtype=torch.bool)
    lattice[::4, ::4] = True
    for form, k in maps.items():
        assert k.shape == (9, 9), form
        assert (k[lattice] > 0).all() and (k[~lattice] == 0).all(), form
    assert torch.allclose(maps["before re-param"], maps["after re-param"], atol=1e-12)
    dense = lkvision.create_model("mobilenetv2_nano_k13_rep3").eval()
    assert default_kernel_layer(dense) == "stages.3.1.dw"  # stride-1, as App. D (stages.3.0 has stride 2)
