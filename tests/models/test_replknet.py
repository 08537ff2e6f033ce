"""RepLKNet: structure, deploy form, features, drop path, and parameter/MAC counts vs the paper."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lkvision
from conftest import randomize_bn_and_scales
from lkvision.layers import ReparamLargeKernelConv
from lkvision.models.replknet import ConvFFN, RepLKBlock, RepLKNet
from lkvision.utils import count_macs, count_params

IMG = 64


def test_structure_matches_spec():
    m = lkvision.create_model("replknet_nano")
    assert isinstance(m, RepLKNet)
    assert [len(s) for s in m.stages] == [2, 2, 4, 2]  # [RepLK block, ConvFFN] x B_i
    assert all(isinstance(b, RepLKBlock if j % 2 == 0 else ConvFFN) for s in m.stages for j, b in enumerate(s))
    lk = m.stages[0][0].large_kernel
    assert lk.kernel_size == (13, 13) and lk.small_kernel == (5, 5)
    assert m.stages[2][2].large_kernel.kernel_size == (9, 9)
    assert m.stages[1][1].pw1.conv.out_channels == 4 * 32  # ConvFFN hidden 4C
    assert len(m.transitions) == 3
    assert m.transitions[0][1].conv.stride == (2, 2) and m.transitions[0][1].conv.groups == 32
    assert [c.conv.stride[0] for c in m.stem] == [2, 1, 1, 2]


def test_xl_style_dw_ratio_and_no_small_kernel():
    m = RepLKNet((7, 7, 5, 5), (1, 1, 1, 1), (8, 16, 32, 64), small_kernel=None, dw_ratio=1.5)
    blk = m.stages[1][0]
    assert blk.pw1.conv.out_channels == 24 and blk.large_kernel.small is None
    assert blk.pw2.conv.in_channels == 24


def test_drop_path_rates_linear_and_shared():
    m = RepLKNet((5, 5, 5, 5), (2, 1, 1, 1), (8, 16, 32, 64), drop_path_rate=0.5)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for s in m.stages for b in s]
    expected = torch.linspace(0, 0.5, 5).tolist()
    assert rates[0::2] == pytest.approx(expected) and rates[1::2] == pytest.approx(expected)


def test_deploy_form_exact_and_batchnorm_free():
    torch.manual_seed(0)
    m = randomize_bn_and_scales(lkvision.create_model("replknet_nano", num_classes=10)).eval()
    x = torch.randn(2, 3, IMG, IMG + 32)  # fp32: CPU grouped convs in fp64 loop over groups (slow)
    with torch.no_grad():
        y = m(x)
        d = lkvision.reparameterize(m)
        assert (d(x) - y).abs().max() <= 1e-5 * y.abs().max()
    assert not [n for n, mm in d.named_modules() if isinstance(mm, nn.modules.batchnorm._BatchNorm)]
    assert all(lk.is_merged for lk in d.modules() if isinstance(lk, ReparamLargeKernelConv))
    # the original model is untouched (reparameterize copies by default)
    assert not any(lk.is_merged for lk in m.modules() if isinstance(lk, ReparamLargeKernelConv))
    with pytest.raises(RuntimeError, match="deploy form"):
        d.reset_classifier(5)


def test_features_only_norms_and_strides():
    torch.manual_seed(0)
    m = lkvision.create_model("replknet_nano", features_only=True, norm_intermediate_features=True).eval()
    assert isinstance(m.feature_norms["0"], nn.BatchNorm2d)
    feats = m(torch.randn(1, 3, IMG, IMG))
    assert [f.shape[1] for f in feats] == [16, 32, 64, 128]
    assert [IMG // f.shape[-1] for f in feats] == [4, 8, 16, 32]
    plain = lkvision.create_model("replknet_nano", features_only=True, out_indices=(2,))
    assert isinstance(plain.feature_norms["2"], nn.Identity)
    # no classifier and no stage after the last output (no unused parameters under DDP)
    assert not [k for k in plain.state_dict() if k.startswith(("head.", "stages.3.", "transitions.2."))]
    assert [f.shape[1] for f in plain(torch.randn(1, 3, IMG, IMG))] == [64]


def test_length_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="same length"):
        RepLKNet((31, 29, 27), (2, 2, 18, 2), (128, 256, 512, 1024))


def test_grad_checkpointing_flag():
    m = lkvision.create_model("replknet_nano", use_checkpoint=True)
    assert m.grad_checkpointing


def _meta_counts(name: str, img: int) -> tuple[float, float, float]:
    with torch.device("meta"):
        m = lkvision.create_model(name)
        p_train = count_params(m)
        lkvision.reparameterize(m, inplace=True)
        p_deploy = count_params(m)
        macs = count_macs(m, (1, 3, img, img))
    return p_train / 1e6, p_deploy / 1e6, macs / 1e9


# Paper numbers: Table 5 / Table 6 (params in M; "FLOPs" are multiply-accumulates, in G).
@pytest.mark.parametrize("name,img,params,gmacs", [
    ("replknet_31b", 224, 79.3, 15.3),
    pytest.param("replknet_31b", 384, 79.3, 45.1, marks=pytest.mark.slow),
    pytest.param("replknet_3", 224, 71.8, 12.9, marks=pytest.mark.slow),
    pytest.param("replknet_7", 224, 72.2, 13.1, marks=pytest.mark.slow),
    pytest.param("replknet_13", 224, 73.7, 13.4, marks=pytest.mark.slow),
    pytest.param("replknet_25", 224, 78.2, 14.8, marks=pytest.mark.slow),
])
def test_counts_match_paper_base_width(name, img, params, gmacs):
    _, p_deploy, g = _meta_counts(name, img)
    assert p_deploy == pytest.approx(params, rel=0.02)
    assert g == pytest.approx(gmacs, rel=0.02)


@pytest.mark.parametrize("name,img,params,gmacs", [
    ("replknet_31l", 384, 172, 96.0),
    ("replknet_xl", 320, 335, 128.7),
])
def test_counts_match_paper_large(name, img, params, gmacs):
    p_train, p_deploy, g = _meta_counts(name, img)
    assert p_train == pytest.approx(params, rel=0.02) and p_deploy == pytest.approx(params, rel=0.02)
    assert g == pytest.approx(gmacs, rel=0.02)
