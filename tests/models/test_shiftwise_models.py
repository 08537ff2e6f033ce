"""ShiftWise models: variants, init, deploy form, parameter and MAC counts (SW.md section 3)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lkvision
from conftest import randomize_bn_and_scales
from lkvision.layers import LayerNorm2d, ShiftWiseConv2d
from lkvision.layers.shiftwise import ghost_split
from lkvision.models.shiftwise import TEST_MODELS, ShiftWiseBlock, ShiftWiseNet, model_cfgs
from lkvision.utils import count_macs, count_params


def test_registered_variants():
    names = lkvision.list_models("sw_*")
    for n in ("sw_tiny", "sw_small", "sw_base", "sw_large", "sw_nano", "sw_pico", "sw_femto"):
        assert n in names
    assert set(TEST_MODELS) <= set(names)


def test_sw_tiny_stage_geometry_matches_paper():
    cfg = model_cfgs["sw_tiny"]
    got = []
    for c, m in zip(cfg["dims"], cfg["big_kernels"]):
        rep, ghost = ghost_split(c, cfg["ghost_ratio"])
        got.append((len(rep), len(ghost), math.ceil(m / 3)))
    assert got == [(60, 20, 17), (122, 38, 17), (246, 74, 16), (492, 148, 5)]
    small = [len(ghost_split(c, 0.23)[0]) for c in model_cfgs["sw_small"]["dims"]]
    assert small == [72, 146, 294, 590]


def test_structure_init_and_drop_path():
    torch.manual_seed(0)
    m = lkvision.create_model("sw_pico", drop_path_rate=0.3, layer_scale_init_value=1e-6)
    blocks = [b for s in m.stages for b in s]
    assert all(isinstance(b, ShiftWiseBlock) for b in blocks)
    rates = [b.drop_path.drop_prob if hasattr(b.drop_path, "drop_prob") else 0.0 for b in blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3)
    assert rates == sorted(rates)
    w = torch.cat([b.sw_conv.branches[i].weight.flatten() for b in blocks for i in range(2)])
    assert 0.018 < w.std() < 0.022  # trunc_normal(std=0.02) (timm/official: cut at +-2 absolute)
    for mod in m.modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)) and mod.bias is not None:
            assert mod.bias.abs().max() == 0
    assert torch.all(blocks[0].layer_scale.gamma == 1e-6)
    assert isinstance(m.stem[1], LayerNorm2d) and isinstance(m.stem[2], nn.GELU)
    assert isinstance(m.norm, nn.LayerNorm) and m.norm.eps == 1e-6
    f = lkvision.create_model("sw_pico", features_only=True)
    assert all(isinstance(n, LayerNorm2d) for n in f.feature_norms.values())


def _parity(name: str, img: int, **kw) -> float:
    torch.manual_seed(0)
    model = randomize_bn_and_scales(lkvision.create_model(name, **kw), seed=2).eval()
    x = torch.randn(1, 3, img, img)
    with torch.no_grad():
        y = model(x)
        deploy = lkvision.reparameterize(model)
        y2 = deploy(x)
    assert not [n for n, m in deploy.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    blk = deploy.stages[0][0]
    assert isinstance(blk.sw_norm, nn.Identity) and isinstance(blk.fc_norm, nn.Identity)
    assert isinstance(blk.layer_scale, nn.Identity) and blk.fc2.bias is not None
    assert not blk.grn.use_bias and blk.sw_conv.deployed
    return float((y - y2).abs().max() / y.abs().max())


def test_sw_nano_train_deploy_parity():
    assert _parity("sw_nano", 64) <= 1e-4


def test_sw_tiny_full_train_deploy_parity_64px():
    assert _parity("sw_tiny", 64) <= 1e-4


def test_block_deploy_form_without_layer_scale_and_restored_order():
    torch.manual_seed(0)
    blk = randomize_bn_and_scales(
        ShiftWiseBlock(24, 9, layer_scale_init_value=0.0, restore_channel_order=True), seed=4
    ).double().eval()
    x = torch.randn(2, 24, 7, 9, dtype=torch.float64)
    y = blk(x)
    blk.reparameterize()
    torch.testing.assert_close(blk(x), y, rtol=1e-10, atol=1e-10)
    blk.reparameterize()
    torch.testing.assert_close(blk(x), y, rtol=1e-10, atol=1e-10)


def test_constructor_errors():
    with pytest.raises(ValueError, match="4 entries"):
        ShiftWiseNet(depths=(1, 1, 1), dims=(8, 16, 32))
    with pytest.raises(ValueError, match="must be >= small_kernel"):
        ShiftWiseNet(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64), big_kernels=(13, 11, 9, 1))
    with pytest.raises(ValueError, match="ghost_ratio must be a number"):
        lkvision.create_model("sw_femto", ghost_ratio=1.2)


def _merged(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, ShiftWiseConv2d):
            m.merge_branches()
    return model


@pytest.mark.parametrize("name,params_2br,params_merged,gmacs", [
    ("sw_tiny", 31.79, 31.00, 5.02),
    pytest.param("sw_small", 57.31, 55.99, 9.33, marks=pytest.mark.slow),
])
def test_paper_param_and_mac_counts(name, params_2br, params_merged, gmacs):
    # Paper convention (Table 3, SW.md section 3): dense counts, grouped 3x3 conv counted at its padded output,
    # the shift-add op itself (additions only) not counted -- what impl="reference" executes. Counted on meta.
    model = lkvision.create_model(name, impl="reference")
    assert count_params(model) / 1e6 == pytest.approx(params_2br, rel=5e-3)
    _merged(model)
    assert count_params(model) / 1e6 == pytest.approx(params_merged, rel=5e-3)
    macs = count_macs(model.to("meta")) / 1e9
    assert macs == pytest.approx(gmacs, rel=0.02)
    assert macs == pytest.approx({"sw_tiny": 5.0, "sw_small": 9.3}[name], rel=0.02)


def _strip_macs(model: ShiftWiseNet, img: int) -> tuple[int, int, int]:
    """Per-model MACs of the SW convs as executed: reference (grouped conv at (H+2)^2), fast (3 strip convs
    plus the per-forward weight fold, R*nk*k*k*(2*nk+1) MACs per layer), deploy (2 strip convs with the S
    kernel inside the horizontal one, run on all C channels so that no channel split/concat is needed)."""
    ref = fast = dep = 0
    for i, stage in enumerate(model.stages):
        hw = (img // 2 ** (i + 2)) ** 2
        side = int(math.isqrt(hw))
        for blk in stage:
            sw = blk.sw_conv
            r, k, nk, L = sw.rep_channels, sw.small_kernel, sw.num_filters, sw.strip_length
            ref += r * nk * k * k * (side + k - 1) ** 2
            fast += r * hw * (2 * k * L + k * k) + r * nk * k * k * (2 * nk + 1)
            (left, right, _, _), _ = sw.deploy_paddings()
            dep += sw.channels * hw * (k * (left + right + 1) + L * k)  # deploy strips cover all C channels
    return ref, fast, dep


def test_count_flops_counts_the_shiftwise_op():
    torch.manual_seed(0)
    img = 64
    fast = lkvision.create_model("sw_femto", impl="fast")
    ref = lkvision.create_model("sw_femto", impl="reference")
    m_ref, m_fast, m_dep = _strip_macs(fast, img)
    size = (1, 3, img, img)
    base = count_macs(ref, size) - m_ref  # everything but the SW convs
    assert count_macs(fast, size) == base + m_fast
    deploy = lkvision.reparameterize(fast)
    # the deploy form adds nothing else that is counted (BN/GRN-bias/layer-scale folds are free)
    assert count_macs(deploy, size) == base + m_dep


def test_demo_command_runs_and_checks_parity(capsys):
    from lkvision.demo import main

    assert main(["--model", "sw_femto", "--img-size", "64", "--batch", "1", "--bench-time", "0"]) == 0
    out = capsys.readouterr().out
    assert "relative" in out and "deploy (fully folded)" in out and "OK" in out
    # an impossible tolerance makes it fail with a non-zero status
    assert main(["--model", "sw_femto", "--img-size", "64", "--batch", "1", "--bench-time", "0",
                 "--no-flops", "--tol", "0"]) == 1
