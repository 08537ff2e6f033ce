"""UniRepLKNet: block semantics, deploy folds (LK.md §4.4), configs, counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lkvision
from conftest import randomize_bn_and_scales
from lkvision.layers import GRN, LayerNorm2d
from lkvision.models.unireplknet import DEFAULT_KERNEL_SIZES, UniRepLKNet, UniRepLKNetBlock
from lkvision.utils import count_macs, count_params


def _shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _bn(x, bn):
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def _block_reference(b: UniRepLKNetBlock, x: torch.Tensor) -> torch.Tensor:
    """LK.md §4.2 written out with functional ops."""
    if b.kernel_size == 0:
        y = x
    else:
        y = _bn(b.dwconv(x), b.dwconv_bn)
    s = F.relu(F.conv2d(y.mean((2, 3), keepdim=True), b.se.down.weight, b.se.down.bias))
    s = torch.sigmoid(F.conv2d(s, b.se.up.weight, b.se.up.bias))
    y = (y * s).permute(0, 2, 3, 1)
    y = F.gelu(F.linear(y, b.fc1.weight, b.fc1.bias))
    gx = y.pow(2).sum((1, 2), keepdim=True).sqrt()
    y = (b.grn.gamma * gx / (gx.mean(-1, keepdim=True) + 1e-6) + 1) * y + b.grn.beta
    y = _bn(F.linear(y, b.fc2.weight).permute(0, 3, 1, 2), b.fc2_bn)
    return x + b.layer_scale.gamma.view(1, -1, 1, 1) * y


@pytest.mark.parametrize("k", [0, 3, 5, 7, 13])
def test_block_matches_reference_and_deploy_is_exact(k):
    torch.manual_seed(k)
    b = randomize_bn_and_scales(UniRepLKNetBlock(8, k), seed=k).eval().double()
    x = torch.randn(2, 8, 9, 12, dtype=torch.float64)
    with torch.no_grad():
        y = b(x)
        torch.testing.assert_close(y, _block_reference(b, x), rtol=1e-10, atol=1e-10)
        b.reparameterize()
        torch.testing.assert_close(b(x), y, rtol=1e-10, atol=1e-10)
        sd = b.state_dict()
        b.reparameterize()  # idempotent
        assert all(torch.equal(sd[n], t) for n, t in b.state_dict().items())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in b.modules())
    assert not b.grn.use_bias and isinstance(b.layer_scale, nn.Identity) and b.fc2.bias is not None


@pytest.mark.parametrize("k", [0, 3, 13])
def test_block_deploy_constructor_matches_reparameterized(k):
    b = UniRepLKNetBlock(8, k)
    b.reparameterize()
    built = UniRepLKNetBlock(8, k, deploy=True)
    assert _shapes(b) == _shapes(built)


def test_block_without_layer_scale_folds_exactly():
    b = randomize_bn_and_scales(UniRepLKNetBlock(8, 7, layer_scale_init_value=None), seed=3).eval().double()
    x = torch.randn(1, 8, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        y = b(x)
        b.reparameterize()
        torch.testing.assert_close(b(x), y, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("k", [1, 2, 4, 19, 6])
def test_block_rejects_unsupported_kernel(k):
    with pytest.raises(ValueError, match=r"kernel_size must be one of \(0, 3, 5, 7, 9, 11, 13, 15, 17\)"):
        UniRepLKNetBlock(8, k)


def test_model_config_errors():
    with pytest.raises(ValueError, match="no default kernel_sizes for depths=\\(1, 1, 1, 1\\)"):
        UniRepLKNet(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))
    with pytest.raises(ValueError, match="one size per block"):
        UniRepLKNet(depths=(1, 1, 2, 1), dims=(8, 16, 32, 64), kernel_sizes=((3,), (13,), (13,), (13,)))
    with pytest.raises(ValueError, match="4 stages"):
        UniRepLKNet(depths=(1, 1, 1), dims=(8, 16, 32))


def test_default_kernel_sizes_follow_the_official_tables():
    t = DEFAULT_KERNEL_SIZES[(3, 3, 18, 3)]
    assert t[0] == (3, 3, 3) and t[1] == (13, 13, 13) and t[2][:4] == (13, 3, 13, 3) and t[3] == (13, 13, 13)
    s = DEFAULT_KERNEL_SIZES[(3, 3, 27, 3)]
    assert s[2][:6] == (13, 3, 3, 13, 3, 3) and len(s[2]) == 27


def test_features_only_uses_layernorm_per_output_and_drop_path_rates():
    m = lkvision.create_model("unireplknet_test", features_only=True, out_indices=(0, 2), drop_path_rate=0.3)
    assert all(isinstance(n, LayerNorm2d) for n in m.feature_norms.values())
    assert not [k for k in m.state_dict() if k.startswith(("head.", "norm.", "stages.3."))]  # pruned after output 2
    rates = [b.drop_path.drop_prob if hasattr(b.drop_path, "drop_prob") else 0.0 for s in m.stages for b in s]
    assert rates == pytest.approx([0.0, 0.075, 0.15, 0.225])  # linear over all 5 blocks, stage 3 (0.3) pruned


def test_init_is_trunc_normal_002_and_grn_zero():
    torch.manual_seed(0)
    m = lkvision.create_model("unireplknet_test")
    w = m.stages[2][0].fc1.weight
    assert 0.015 < w.std().item() < 0.025  # timm semantics: truncation at +-2 absolute, not 2 sigma
    assert m.stages[2][0].fc1.bias.abs().max() == 0
    g = [mod for mod in m.modules() if isinstance(mod, GRN)][0]
    assert g.gamma.abs().max() == 0 and g.beta.abs().max() == 0
    assert torch.allclose(m.stages[0][0].layer_scale.gamma, torch.full((16,), 1e-6))


def _meta_counts(name: str) -> tuple[int, int, int, int]:
    with torch.device("meta"):
        m = lkvision.create_model(name)
    p, macs = count_params(m), count_macs(m)
    d = lkvision.reparameterize(m, inplace=True)
    return p, macs, count_params(d), count_macs(d)


@pytest.mark.parametrize(
    "name,params_m,gmacs",
    [("unireplknet_t", 31.0, 4.9), ("unireplknet_s", 56.0, 9.1)],
)
def test_paper_counts_match_the_deploy_form(name, params_m, gmacs):
    """The paper's params/FLOPs are those of the DEPLOY form (train form: +2% params, +2% MACs)."""
    p, macs, pd, macs_d = _meta_counts(name)
    assert abs(pd / 1e6 - params_m) / params_m <= 0.02
    assert abs(macs_d / 1e9 - gmacs) / gmacs <= 0.02
    assert p > pd and macs > macs_d


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,params_m", [("unireplknet_a", 4.4), ("unireplknet_f", 6.2), ("unireplknet_p", 10.7),
                      ("unireplknet_n", 18.3), ("unireplknet_b", 98.0)],
)
def test_small_and_base_param_counts(name, params_m):
    _, _, pd, _ = _meta_counts(name)
    assert abs(pd / 1e6 - params_m) / params_m <= 0.02


def test_config_rebuilds_the_same_model():
    import json

    m = lkvision.create_model("unireplknet_test", features_only=True, out_indices=(1, 3))
    cfg = json.loads(json.dumps(m.config))
    other = type(m)(**cfg)
    assert _shapes(other) == _shapes(m) and other.out_indices == (1, 3)
