"""MobileNetV2 (Sandler et al., 2018) as the testbed of RepLKNet's Guidelines 2, 3 and 5 (Tables 2-4).

Options over the standard model: the depth-wise kernel size (all blocks, or a different one for the last,
stride-32 stage), identity shortcuts on/off (Table 2), a parallel small (3x3) re-param branch next to
every large depth-wise conv (Table 3), and dilated depth-wise convs (App. C, Table 12: a 3x3 conv with
dilation r has the maximum receptive field of a dense (2r+1)x(2r+1) one; it *is* that kernel with all but 9
taps fixed at zero). ``reparameterize()`` folds every BN and merges the small branches: the deploy form is
plain biased convs + ReLU6 (exact in eval mode; dilated convs stay dilated).

Stages (``feature_info``): stride 4 (stem + t,c,n,s = 1,16,1,1 and 6,24,2,2), stride 8 (6,32,3,2),
stride 16 (6,64,4,2 and 6,96,3,1), stride 32 (6,160,3,2, 6,320,1,1 and the 1x1 conv to 1280).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..layers.conv_bn import ConvBN
from ..layers.reparam_conv import ConvBNAct, ReparamLargeKernelConv
from ._base import LargeKernelNet, factory_device
from ._pretrained import build_model_with_cfg, pretrained_cfg
from ._registry import register_model

__all__ = ["MobileNetV2", "InvertedResidual", "model_cfgs", "default_cfgs", "TEST_MODELS"]

# (expansion t, output channels c, repeats n, first stride s, stage index) - the standard MobileNetV2 table.
_SETTINGS = (
    (1, 16, 1, 1, 0),
    (6, 24, 2, 2, 0),
    (6, 32, 3, 2, 1),
    (6, 64, 4, 2, 2),
    (6, 96, 3, 1, 2),
    (6, 160, 3, 2, 3),
    (6, 320, 1, 1, 3),
)


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class InvertedResidual(nn.Module):
    """``x + project(dw_K(expand(x)))`` (the shortcut only when stride 1, C_in = C_out and enabled).

    ``expand`` = ReLU6(BN(1x1)), ``dw_K`` = ReLU6(re-param depth-wise K x K [+ k x k]), ``project`` = BN(1x1).
    With ``dilation`` r > 1, ``dw`` is a :class:`ConvBN` depth-wise K x K conv with dilation r (padding
    r(K-1)/2, no small branch).
    Shapes: (B, C_in, H, W) -> (B, C_out, H/stride, W/stride).
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand_ratio: int, kernel_size: int,
                 small_kernel: int | None, shortcut: bool = True, sync_bn: bool = False,
                 dilation: int = 1) -> None:
        super().__init__()
        hidden = int(round(in_chs * expand_ratio))
        self.use_shortcut = shortcut and stride == 1 and in_chs == out_chs
        self.expand = (ConvBNAct(in_chs, hidden, 1, act=nn.ReLU6(), sync_bn=sync_bn) if expand_ratio != 1
                       else nn.Identity())
        sk = small_kernel if small_kernel is not None and small_kernel < kernel_size else None
        self.dw: nn.Module = (
            ReparamLargeKernelConv(hidden, kernel_size, sk, stride=stride, sync_bn=sync_bn) if dilation == 1
            else ConvBN(hidden, hidden, kernel_size, stride=stride, groups=hidden, dilation=dilation, sync_bn=sync_bn))
        self.act = nn.ReLU6()
        self.project = ConvBNAct(hidden, out_chs, 1, act=None, sync_bn=sync_bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.act(self.dw(self.expand(x))))
        return x + y if self.use_shortcut else y


class MobileNetV2(LargeKernelNet):
    """MobileNetV2 with configurable depth-wise kernels, shortcuts and small-kernel re-parameterisation.

    Args:
        kernel_size: depth-wise kernel of every inverted residual block (3 in the original model).
        last_stage_kernel: kernel of the stride-32 stage (Table 4); ``None`` = ``kernel_size``.
        small_kernel: parallel re-param kernel (3 in Table 3) for every depth-wise conv larger than it, or None.
        dilation: dilation of every depth-wise conv (Table 12: 3x3 with r = 4 or 6, max RF 9 or 13); > 1
            excludes ``small_kernel``.
        shortcut: identity shortcuts (Table 2 compares with and without).
        width_mult: channel multiplier, as in MobileNetV2.
        in_chans, num_classes: input channels, classes (0: no classifier).
        global_pool: ``"avg"``, ``"max"``, ``"avgmax"`` or ``""`` (unpooled maps).
        drop_rate: dropout before the classifier (0.2 in MobileNetV2).
        features_only / out_indices: stage outputs at strides 4/8/16/32.
        output_stride: 32 only. device, dtype: where and in which dtype the parameters are created.

    Shapes: (B, in_chans, H, W) -> (B, num_classes); H and W >= 32.
    """

    def __init__(
        self,
        kernel_size: int = 3,
        last_stage_kernel: int | None = None,
        small_kernel: int | None = None,
        dilation: int = 1,
        shortcut: bool = True,
        width_mult: float = 1.0,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.2,
        settings: Sequence[tuple[int, int, int, int, int]] = _SETTINGS,
        last_channels: int = 1280,
        features_only: bool = False,
        out_indices: int | Sequence[int] | None = None,
        sync_bn: bool = False,
        output_stride: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_chans=in_chans, num_classes=num_classes, global_pool=global_pool, drop_rate=drop_rate,
                         output_stride=output_stride)
        if dilation < 1 or (dilation > 1 and small_kernel is not None):
            raise ValueError(f"dilation must be >= 1 and cannot be combined with small_kernel (a dilated conv "
                             f"has no re-param branch here), got dilation={dilation}, small_kernel={small_kernel}")
        with factory_device(device):
            self._build(kernel_size, last_stage_kernel, small_kernel, dilation, shortcut, width_mult, settings,
                        last_channels, sync_bn)
            self._init_weights()
            self._init_features_mode(features_only, out_indices)
        self._to_device_dtype(device, dtype)

    def _build(self, kernel_size: int, last_stage_kernel: int | None, small_kernel: int | None, dilation: int,
               shortcut: bool, width_mult: float, settings: Sequence[tuple[int, int, int, int, int]],
               last_channels: int, sync_bn: bool) -> None:
        in_chans, num_classes = self.in_chans, self.num_classes
        stem_chs = _make_divisible(32 * width_mult)
        self.stem = ConvBNAct(in_chans, stem_chs, 3, stride=2, act=nn.ReLU6(), sync_bn=sync_bn)
        n_stages = max(s[4] for s in settings) + 1
        stage_blocks: list[list[nn.Module]] = [[] for _ in range(n_stages)]
        c_in = stem_chs
        for t, c, n, s, stage in settings:
            c_out = _make_divisible(c * width_mult)
            k = last_stage_kernel if (stage == n_stages - 1 and last_stage_kernel is not None) else kernel_size
            for i in range(n):
                stage_blocks[stage].append(InvertedResidual(c_in, c_out, s if i == 0 else 1, t, k, small_kernel,
                                                            shortcut, sync_bn, dilation))
                c_in = c_out
        self.num_features = _make_divisible(last_channels * max(1.0, width_mult))
        stage_blocks[-1].append(ConvBNAct(c_in, self.num_features, 1, act=nn.ReLU6(), sync_bn=sync_bn))
        self.stages = nn.ModuleList(nn.Sequential(*b) for b in stage_blocks)
        self.feature_info = []
        for i, blocks in enumerate(stage_blocks):
            last = blocks[-1]
            chs = last.conv.out_channels if isinstance(last, ConvBNAct) else last.project.conv.out_channels
            self.feature_info.append(dict(num_chs=chs, reduction=4 * 2 ** i, module=f"stages.{i}"))
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.pass_through = nn.Identity()  # the (no-op) module before stages 1..3

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def stage_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.stem if i == 0 else self.pass_through, s) for i, s in enumerate(self.stages)]


def _create_mobilenetv2(variant: str, pretrained: bool = False, **kwargs) -> MobileNetV2:
    """Build the registered ``variant`` (its ``model_cfgs`` entry, overridden by ``kwargs``)."""
    return build_model_with_cfg(MobileNetV2, variant, pretrained, **{**model_cfgs[variant], **kwargs})


# -------------------------------------------------------------------------------------- pretrained cfgs
# No released weights (the RepLKNet paper trains these for its ablations); cfgs hold the data defaults.
_CFG = dict(first_conv="stem.conv", classifier="head", paper_ids="arXiv:2203.06717",
            paper_name="RepLKNet Tables 2-4 (MobileNetV2 test-bed of Guidelines 2, 3 and 5)",
            notes=("no released weights",))
default_cfgs: dict[str, dict] = {
    **{name: pretrained_cfg(**_CFG) for name in (
        "mobilenetv2_100", "mobilenetv2_noskip", "mobilenetv2_k13", "mobilenetv2_k13_noskip", "mobilenetv2_k9",
        "mobilenetv2_k9_rep3", "mobilenetv2_k13_rep3", "mobilenetv2_last7_rep3", "mobilenetv2_last13_rep3",
        "mobilenetv2_k3_dil4", "mobilenetv2_k3_dil6")},
    **{name: pretrained_cfg(**{**_CFG, "notes": ("CPU test configuration",)}, input_size=(3, 64, 64),
                            pool_size=(2, 2), crop_pct=1.0)
       for name in ("mobilenetv2_nano_k13_rep3", "mobilenetv2_nano_k3_dil4")},
}


# ------------------------------------------------------------------------------------- registered variants
model_cfgs: dict[str, dict] = {
    # Table 2 (Guideline 2): shortcuts on / off, 3x3 vs 13x13 (no re-param)
    "mobilenetv2_100": dict(kernel_size=3),
    "mobilenetv2_noskip": dict(kernel_size=3, shortcut=False),
    "mobilenetv2_k13": dict(kernel_size=13),
    "mobilenetv2_k13_noskip": dict(kernel_size=13, shortcut=False),
    # Table 3 (Guideline 3): 9x9 / 13x13 with and without the parallel 3x3 re-param branch
    "mobilenetv2_k9": dict(kernel_size=9),
    "mobilenetv2_k9_rep3": dict(kernel_size=9, small_kernel=3),
    "mobilenetv2_k13_rep3": dict(kernel_size=13, small_kernel=3),
    # Table 4 (Guideline 5): only the last (7x7-map) stage enlarged, with 3x3 re-param
    "mobilenetv2_last7_rep3": dict(kernel_size=3, last_stage_kernel=7, small_kernel=3),
    "mobilenetv2_last13_rep3": dict(kernel_size=3, last_stage_kernel=13, small_kernel=3),
    # Table 12 (App. C): every depth-wise 3x3 dilated to the max RF of the dense 9x9 / 13x13 rows (k9 / k13)
    "mobilenetv2_k3_dil4": dict(kernel_size=3, dilation=4),
    "mobilenetv2_k3_dil6": dict(kernel_size=3, dilation=6),
    # tiny model for tests
    "mobilenetv2_nano_k13_rep3": dict(kernel_size=13, small_kernel=3, width_mult=0.25, last_channels=128),
    "mobilenetv2_nano_k3_dil4": dict(kernel_size=3, dilation=4, width_mult=0.25, last_channels=128),
}


@register_model
def mobilenetv2_100(pretrained: bool = False, **kwargs) -> MobileNetV2:
    """Standard MobileNetV2 1.0 (3x3 depth-wise, shortcuts; 3.5 M params)."""
    return _create_mobilenetv2("mobilenetv2_100", pretrained, **kwargs)


@register_model
def mobilenetv2_noskip(pretrained: bool = False, **kwargs) -> MobileNetV2:
    """MobileNetV2 without identity shortcuts (Table 2)."""
    return _create_mobilenetv2("mobilenetv2_noskip", pretrained, **kwargs)


@register_model
def mobilenetv2_k13(pretrained: bool = False, **kwargs) -> MobileNetV2:
    """MobileNetV2 with every depth-wise 3x3 replaced by 13x13 (Table 2)."""
    return _create_mobilenetv2("mobilenetv2_k13", pretrained, **kwargs)


@register_model
def mobilenetv2_k13_noskip(pretrained: bool = False, **kwargs) -> MobileNetV2:
    """MobileNetV2 with 13x13 depth-wise kernels and no shortcuts (Table 2)."""
    return _create_mobilenetv2("mobilenetv2_k13_noskip", pretrained, **kwargs)


@register_model
def mobilenetv2_k9(pretrained: bool = False, **kwargs) -> MobileNetV2:
    """MobileNetV2 with 9x9 depth-wise kernels (Table 3)."""
    return _create_mobilenetv2("mobilenetv2_k9", pretrained, **kwargs)


@register_model
def mobilenetv2_k9_rep3(pretrained: bool = False, **kwargs) -> MobileNetV2:
    """MobileNetV2 with 9x9 depth-wise kernels + parallel 3x3 re-param branches (Table 3)."""
    return _create_mobilenetv2("mobilenetv2_k9_rep3", pretrained, **kwargs)


@register_model
def mobilenetv2_k13_rep3(pretrained: bool = False, **kwargs) -> MobileNetV2:
    """MobileNetV2 with 13x13 depth-wise kernels + parallel 3x3 re-param branches (Table 3)."""
    return _create_mobilenetv2("mobilenetv2_k13_rep3", pretrained, **kwargs)


@register_model
def mobilenetv2_last7_rep3(pretrained: bool = False, **kwargs) -> MobileNetV2:
    """MobileNetV2 with 7x7 (+3x3 re-param) kernels in the stride-32 stage only (Table 4)."""
    return _create_mobilenetv2("mobilenetv2_last7_rep3", pretrained, **kwargs)


@register_model
def mobilenetv2_last13_rep3(pretrained: bool = False, **kwargs) -> MobileNetV2:
    """MobileNetV2 with 13x13 (+3x3 re-param) kernels in the stride-32 stage only (Table 4)."""
    return _create_mobilenetv2("mobilenetv2_last13_rep3", pretrained, **kwargs)


@register_model
def mobilenetv2_k3_dil4(pretrained: bool = False, **kwargs) -> MobileNetV2:
    """MobileNetV2 with every depth-wise 3x3 dilated by 4 (max RF 9, as 9x9; Table 12)."""
    return _create_mobilenetv2("mobilenetv2_k3_dil4", pretrained, **kwargs)


@register_model
def mobilenetv2_k3_dil6(pretrained: bool = False, **kwargs) -> MobileNetV2:
    """MobileNetV2 with every depth-wise 3x3 dilated by 6 (max RF 13, as 13x13; Table 12)."""
    return _create_mobilenetv2("mobilenetv2_k3_dil6", pretrained, **kwargs)


@register_model
def mobilenetv2_nano_k3_dil4(pretrained: bool = False, **kwargs) -> MobileNetV2:
    """Tiny (width 0.25) MobileNetV2 with 3x3 depth-wise convs dilated by 4, for tests."""
    return _create_mobilenetv2("mobilenetv2_nano_k3_dil4", pretrained, **kwargs)


@register_model
def mobilenetv2_nano_k13_rep3(pretrained: bool = False, **kwargs) -> MobileNetV2:
    """Tiny (width 0.25) MobileNetV2 with 13x13 + 3x3 re-param kernels, for tests."""
    return _create_mobilenetv2("mobilenetv2_nano_k13_rep3", pretrained, **kwargs)


TEST_MODELS: dict[str, dict] = {
    "mobilenetv2_nano_k13_rep3": {},
    "mobilenetv2_nano_k3_dil4": {},
}
