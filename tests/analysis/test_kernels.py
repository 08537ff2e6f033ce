import pytest
import torch
from torch import nn

from lkvision.analysis.kernels import (
    aggregate_kernel,
    equivalent_kernel,
    find_kernel_layers,
    kernel_maps,
    large_branch_kernel,
)

from ._tiny import kwargs_arg, tiny_sw


def _randomize_bn(m: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.weight.data.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.bias.data.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
    return m.eval()


def test_equivalent_kernel_of_a_plain_depthwise_conv_is_its_weight():
    conv = nn.Conv2d(4, 4, 7, padding=3, groups=4, bias=True)
    k = equivalent_kernel(conv)
    torch.testing.assert_close(k, conv.weight.detach().double()[:, 0])
    torch.testing.assert_close(aggregate_kernel(conv.weight), (lambda a: a / a.max())(
        conv.weight.detach().double()[:, 0].abs().sum(0)))


def test_replk_before_is_fused_large_branch_and_after_is_merged_kernel():
    from lkvision.layers import ReparamLargeKernelConv

    layer = _randomize_bn(ReparamLargeKernelConv(6, 11, 3))
    before = large_branch_kernel(layer)
    torch.testing.assert_close(before, layer.large.fused_weight_bias()[0].double()[:, 0])
    w_merged, _ = layer.merged_weight_bias()
    torch.testing.assert_close(equivalent_kernel(layer), w_merged.double()[:, 0])


def test_shiftwise_after_kernel_matches_the_deploy_strips():
    from lkvision.layers import ShiftWiseConv2d

    layer = _randomize_bn(ShiftWiseConv2d(8, 13, 3, num_branches=2, edges=2, ghost_ratio=0.25))
    wh, _, wv, _ = layer.folded_kernels()
    (lh, rh, th, bh), (lv, rv, tv, bv) = layer.deploy_paddings()
    r = max(lh, rh, tv, bv)
    exp = torch.zeros(layer.rep_channels, 2 * r + 1, 2 * r + 1, dtype=torch.float64)
    exp[:, r - th:r + bh + 1, r - lh:r + rh + 1] += wh.detach().double()[:, 0]
    exp[:, r - tv:r + bv + 1, r - lv:r + rv + 1] += wv.detach().double()[:, 0]
    got = equivalent_kernel(layer, select=layer.rep_idx)
    c = got.shape[-1] // 2
    torch.testing.assert_close(got, exp[:, r - c:r + c + 1, r - c:r + c + 1], atol=1e-6, rtol=1e-6)  # fp32 deploy
    maps = kernel_maps(nn.ModuleDict({"sw": layer}), "sw")
    assert set(maps) == {"before re-param", "after re-param"} and all(m.max() == 1 for m in maps.values())


def test_kernel_layer_errors():
    with pytest.raises(ValueError, match="no re-parameterizable large-kernel layer"):
        kernel_maps(nn.Sequential(nn.Conv2d(3, 3, 3)))
    with pytest.raises(ValueError, match="no depth-wise conv"):
        large_branch_kernel(nn.Conv2d(3, 4, 3))


def test_kernels_cli(tmp_path, capsys):
    import lkvision
    from lkvision.cli import main

    name, kw = tiny_sw()
    assert find_kernel_layers(lkvision.create_model(name, **kw))
    assert main(["kernels", "--models", name, *kwargs_arg(kw), "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "kernels.png").stat().st_size > 0 and (tmp_path / "kernels.json").exists()
    assert "after re-param" in capsys.readouterr().out
