"""MobileNetV2 testbed of RepLKNet Guidelines 2/3/5: kernels, shortcuts, re-param branch, exact deploy form."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lkvision
from conftest import randomize_bn_and_scales
from lkvision.layers import ReparamLargeKernelConv
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


def test_deploy_exact_no_bn():
    torch.manual_seed(0)
    m = randomize_bn_and_scales(lkvision.create_model("mobilenetv2_nano_k13_rep3", num_classes=10), seed=1).eval()
    with torch.no_grad():
        x = torch.randn(2, 3, 64, 96)  # fp32: CPU grouped convs in fp64 loop over groups (slow)
        y = m(x)
        d = lkvision.reparameterize(m)
        assert (d(x) - y).abs().max() <= 1e-5 * y.abs().max()
    assert not [n for n, mm in d.named_modules() if isinstance(mm, nn.BatchNorm2d)]
    assert all(lk.is_merged for lk in d.modules() if isinstance(lk, ReparamLargeKernelConv))


def test_small_kernel_not_smaller_is_skipped():
    m = MobileNetV2(kernel_size=3, small_kernel=3, width_mult=0.25)
    assert all(d.small is None for d in _dws(m))
