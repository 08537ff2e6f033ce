"""ResNet baselines (timm definitions behind the lkvision API)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lkvision
from conftest import randomize_bn_and_scales
from lkvision.models.resnet import fold_conv_bn_pairs, timm_key_to_lkvision
from lkvision.utils import count_params


def test_resnet18_api_and_fold():
    torch.manual_seed(0)
    m = randomize_bn_and_scales(lkvision.create_model("resnet18", num_classes=10), seed=1).eval()
    with torch.no_grad():
        x = torch.randn(2, 3, 64, 64)
        y = m(x)
        f = m.forward_features(x)
        assert f.shape == (2, 512, 2, 2)
        d = lkvision.reparameterize(m)
        torch.testing.assert_close(d(x), y, rtol=0, atol=1e-4)
    assert not [n for n, mm in d.named_modules() if isinstance(mm, nn.BatchNorm2d)]
    assert [i["reduction"] for i in m.feature_info] == [4, 8, 16, 32]
    assert timm_key_to_lkvision("layer2.0.conv1.weight") == "stages.1.0.conv1.weight"
    assert timm_key_to_lkvision("bn1.running_mean") == "stem.1.running_mean"
    assert timm_key_to_lkvision("fc.bias") == "head.bias"


def test_fold_pairs_counts():
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    assert fold_conv_bn_pairs(seq) == 2
    assert fold_conv_bn_pairs(seq) == 0


@pytest.mark.parametrize("name,params", [("resnet101", 44.5), ("resnet152", 60.2)])
def test_erf_baselines_build(name, params):
    with torch.device("meta"):
        m = lkvision.create_model(name)
    assert count_params(m) / 1e6 == pytest.approx(params, rel=0.01)
    assert m.feature_info[-1]["num_chs"] == 2048
