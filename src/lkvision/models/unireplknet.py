"""UniRepLKNet (Ding et al., CVPR 2024): large-kernel ConvNet with Dilated Reparam Blocks, SE and GRN.

Block (dim C, kernel K)::

    y = BN(dwconv_K(x))          K >= 7: DilatedReparamConv; K in {3, 5}: plain DW conv; K = 0: identity
    y = SE(y)                    avgpool -> 1x1 C->C/4 -> ReLU -> 1x1 C/4->C -> sigmoid -> scale
    y = Linear(4C)(y) -> GELU -> GRN -> Linear(C, no bias) -> BN      (channels-last, BN over channels)
    out = x + DropPath(gamma * y)

Stem: 3x3 s2 conv (C/2) -> LN -> GELU -> 3x3 s2 conv (C) -> LN. Downsample: 3x3 s2 conv -> LN. Head: global
mean -> LayerNorm -> Linear. ``features_only`` adds one channels-first LayerNorm per output (the official
downstream ``norm0..3``).

Deploy form (:func:`lkvision.reparameterize`, or ``deploy=True`` at construction), spec LK.md §4.4:
the dilated branches merge into the K x K kernel, the post-dwconv BN folds into it (3x3/5x5 convs gain a
bias), the GRN beta folds into the last Linear, and the trailing BN and layer scale fold into that Linear too.

Pretrained weights: the official checkpoints on the Hugging Face Hub (``DingXiaoH/UniRepLKNet``) are in
``default_cfgs``; ``create_model("unireplknet_t", pretrained=True)`` downloads the official file and converts it
through :mod:`lkvision.compat.unireplknet` (``checkpoint_filter_fn``).

File order (timm's): block -> model -> ``checkpoint_filter_fn`` -> ``_create_unireplknet`` -> ``default_cfgs``
-> ``model_cfgs`` and the registered variants.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..layers import GRN, DropPath, LayerScale2d, SEBlock, fold_bn_after_linear, fuse_bn, make_bn
from ..layers.dilated import DILATED_BRANCHES, DilatedReparamConv
from ..layers.pointwise import passes_through, pointwise_mlp
from ._base import ConvNeXtMacroNet, drop_path_rates, factory_device
from ._pretrained import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, build_model_with_cfg, pretrained_cfg
from ._registry import register_model

__all__ = ["UniRepLKNet", "UniRepLKNetBlock", "DEFAULT_KERNEL_SIZES", "model_cfgs", "default_cfgs",
           "checkpoint_filter_fn", "TEST_MODELS"]


class UniRepLKNetBlock(nn.Module):
    """One UniRepLKNet block. Shapes: (B, C, H, W) -> (B, C, H, W).

    Args:
        dim: channels C.
        kernel_size: 0 (no spatial mixing), 3 or 5 (plain depth-wise conv) or a size supported by
            :class:`~lkvision.layers.DilatedReparamConv` (5..17, odd; used for K >= 7).
        drop_path: stochastic-depth rate.
        layer_scale_init_value: initial layer scale (``None``/0: no layer scale).
        ffn_ratio: hidden width of the MLP relative to C.
        sync_bn: SyncBatchNorm everywhere.
        deploy: build the deploy form directly.
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int,
        drop_path: float = 0.0,
        layer_scale_init_value: float | None = 1e-6,
        ffn_ratio: float = 4.0,
        sync_bn: bool = False,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        if kernel_size == 0:
            self.dwconv: nn.Module = nn.Identity()
            self.dwconv_bn: nn.Module = nn.Identity()
        elif kernel_size in (3, 5):
            self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=deploy)
            self.dwconv_bn = nn.Identity() if deploy else make_bn(dim, sync_bn)
        elif kernel_size >= 7 and kernel_size in DILATED_BRANCHES:
            self.dwconv = DilatedReparamConv(dim, kernel_size, sync_bn=sync_bn, deploy=deploy)
            self.dwconv_bn = nn.Identity() if deploy else make_bn(dim, sync_bn)
        else:
            supported = (0, 3, 5) + tuple(k for k in sorted(DILATED_BRANCHES) if k >= 7)
            raise ValueError(f"UniRepLKNetBlock: kernel_size must be one of {supported}, got {kernel_size!r}")
        self.se = SEBlock(dim, dim // 4)
        hidden = int(ffn_ratio * dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.grn = GRN(hidden, use_bias=not deploy)
        self.fc2 = nn.Linear(hidden, dim, bias=deploy)
        self.fc2_bn = nn.Identity() if deploy else make_bn(dim, sync_bn)
        use_ls = not deploy and layer_scale_init_value is not None and layer_scale_init_value > 0
        self.layer_scale = LayerScale2d(dim, layer_scale_init_value) if use_ls else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.se(self.dwconv_bn(self.dwconv(x))).permute(0, 2, 3, 1)  # NHWC
        if passes_through(self.fc2_bn, self.layer_scale, self.drop_path):  # deploy: residual add fused into fc2
            return pointwise_mlp(y, self.fc1, self.act, self.fc2, self.grn, x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        y = self.fc2_bn(pointwise_mlp(y, self.fc1, self.act, self.fc2, self.grn).permute(0, 3, 1, 2))
        return x + self.drop_path(self.layer_scale(y))

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold into the deploy form in place (exact in eval mode, idempotent)."""
        if hasattr(self.dwconv, "reparameterize"):
            self.dwconv.reparameterize()
        if isinstance(self.dwconv_bn, nn.modules.batchnorm._BatchNorm):
            if isinstance(self.dwconv, DilatedReparamConv):
                conv = self.dwconv.main.conv
            else:
                conv = self.dwconv
            w, b = fuse_bn(conv.weight, self.dwconv_bn, conv.bias)
            new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding,
                            groups=conv.groups, bias=True, device=w.device, dtype=w.dtype)
            new.weight.copy_(w)
            new.bias.copy_(b)
            if isinstance(self.dwconv, DilatedReparamConv):
                self.dwconv.main.conv = new
            else:
                self.dwconv = new
            self.dwconv_bn = nn.Identity()
        if self.grn.use_bias:
            self.fc2 = self.grn.fold_beta_into(self.fc2)
        scale = self.layer_scale.gamma if isinstance(self.layer_scale, LayerScale2d) else None
        if isinstance(self.fc2_bn, nn.modules.batchnorm._BatchNorm):
            self.fc2 = fold_bn_after_linear(self.fc2, self.fc2_bn, scale)
            self.fc2_bn = nn.Identity()
        elif scale is not None:
            fc = self.fc2
            new = nn.Linear(fc.in_features, fc.out_features, bias=True, device=fc.weight.device,
                            dtype=fc.weight.dtype)
            new.weight.copy_(fc.weight * scale[:, None])
            new.bias.copy_((fc.bias if fc.bias is not None else 0) * scale)
            self.fc2 = new
        self.layer_scale = nn.Identity()

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}"


#: depths -> per-block kernel sizes (the official defaults).
DEFAULT_KERNEL_SIZES: dict[tuple[int, ...], tuple[tuple[int, ...], ...]] = {
    (2, 2, 6, 2): ((3,) * 2, (13,) * 2, (13,) * 6, (13,) * 2),
    (2, 2, 8, 2): ((3,) * 2, (13,) * 2, (13,) * 8, (13,) * 2),
    (3, 3, 18, 3): ((3,) * 3, (13,) * 3, (13, 3) * 9, (13,) * 3),
    (3, 3, 27, 3): ((3,) * 3, (13,) * 3, (13, 3, 3) * 9, (13,) * 3),
}


class UniRepLKNet(ConvNeXtMacroNet):
    """UniRepLKNet classifier / backbone.

    Args:
        depths: blocks per stage (4 stages).
        dims: channels per stage.
        kernel_sizes: per-stage tuples of per-block kernel sizes; ``None`` takes the official default for
            ``depths`` (:data:`DEFAULT_KERNEL_SIZES`).
        in_chans, num_classes: input channels, classes (0: no classifier; ``forward`` returns features).
        global_pool: ``"avg"`` (official), ``"max"``, ``"avgmax"`` or ``""`` (unpooled maps).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, linear over all blocks.
        layer_scale_init_value: initial layer-scale value (``None``/0: no layer scale).
        head_init_scale: multiplies the initial classifier weight and bias.
        ffn_ratio: MLP hidden width relative to C.
        sync_bn: SyncBatchNorm.
        deploy: build the deploy form directly (to load deploy-form weights).
        features_only, out_indices: return the per-stage feature maps (strides 4/8/16/32) after a LayerNorm.
        output_stride: 32 only. device, dtype: where and in which dtype the parameters are created.

    Input (B, in_chans, H, W), H, W >= 32; output logits (B, num_classes).
    """

    def __init__(
        self,
        depths: Sequence[int] = (3, 3, 27, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        kernel_sizes: Sequence[Sequence[int]] | None = None,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float | None = 1e-6,
        head_init_scale: float = 1.0,
        ffn_ratio: float = 4.0,
        sync_bn: bool = False,
        deploy: bool = False,
        features_only: bool = False,
        out_indices: int | Sequence[int] | None = None,
        output_stride: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_chans=in_chans, num_classes=num_classes, global_pool=global_pool, drop_rate=drop_rate,
                         output_stride=output_stride)
        depths, dims = tuple(int(d) for d in depths), tuple(int(d) for d in dims)
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"UniRepLKNet needs 4 stages: got depths={depths}, dims={dims}")
        if kernel_sizes is None:
            if depths not in DEFAULT_KERNEL_SIZES:
                raise ValueError(
                    f"UniRepLKNet: no default kernel_sizes for depths={depths}; pass kernel_sizes explicitly "
                    f"(defaults exist for {sorted(DEFAULT_KERNEL_SIZES)})"
                )
            kernel_sizes = DEFAULT_KERNEL_SIZES[depths]
        kernel_sizes = tuple(tuple(int(k) for k in ks) for ks in kernel_sizes)
        if len(kernel_sizes) != 4 or any(len(ks) != d for ks, d in zip(kernel_sizes, depths)):
            raise ValueError(
                f"UniRepLKNet: kernel_sizes must give one size per block: depths={depths}, "
                f"kernel_sizes={kernel_sizes}"
            )
        #: constructor arguments (JSON-able), used to rebuild converted checkpoints
        self.config = dict(
            depths=list(depths), dims=list(dims), kernel_sizes=[list(k) for k in kernel_sizes],
            in_chans=in_chans, num_classes=num_classes, drop_path_rate=drop_path_rate,
            layer_scale_init_value=layer_scale_init_value, head_init_scale=head_init_scale,
            ffn_ratio=ffn_ratio, sync_bn=sync_bn, deploy=deploy, features_only=features_only,
            out_indices=None if out_indices is None or isinstance(out_indices, int) else list(out_indices),
        )
        self.depths, self.dims, self.kernel_sizes = depths, dims, kernel_sizes
        with factory_device(device):
            self._build_stem(in_chans, dims, "conv")
            self.stages = nn.ModuleList(
                nn.Sequential(*[
                    UniRepLKNetBlock(dims[i], kernel_sizes[i][j], drop_path=rate,
                                     layer_scale_init_value=layer_scale_init_value, ffn_ratio=ffn_ratio,
                                     sync_bn=sync_bn, deploy=deploy)
                    for j, rate in enumerate(rates)
                ])
                for i, rates in enumerate(drop_path_rates(drop_path_rate, depths))
            )
            self._build_head(dims)
            self._finish_init(head_init_scale, features_only, out_indices, device, dtype)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: UniRepLKNet) -> dict[str, torch.Tensor]:
    """An official UniRepLKNet checkpoint (classification, deploy form, or the backbone of an official COCO /
    ADE20K checkpoint) -> this model's keys; lkvision checkpoints pass unchanged. The official key map lives in
    :mod:`lkvision.compat.unireplknet`."""
    from ..compat import checkpoint_filter  # compat builds on this module: imported when weights are loaded

    return checkpoint_filter("unireplknet", state_dict, model)


def _create_unireplknet(variant: str, pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """Build the registered ``variant`` (its ``model_cfgs`` entry, overridden by ``kwargs``)."""
    return build_model_with_cfg(UniRepLKNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                **{**model_cfgs[variant], **kwargs})


# -------------------------------------------------------------------------------------- pretrained cfgs
# The official files on the Hugging Face Hub (names from the official unireplknet.py and the detection /
# segmentation READMEs). "in22k" = ImageNet-22K (21841 classes); 384 models are evaluated by resizing to
# 384x384 without cropping (ConvNeXt's protocol: crop_pct 1.0, "squash").
_HUB = "DingXiaoH/UniRepLKNet"
_CFG = dict(first_conv="stem.0", classifier="head", license="apache-2.0", paper_ids="arXiv:2311.15599",
            paper_name="UniRepLKNet: A Universal Perception Large-Kernel ConvNet for Audio, Video, Point Cloud, "
                       "Time-Series and Image Recognition (CVPR 2024)",
            origin_url="https://github.com/AILab-CVC/UniRepLKNet", mean=IMAGENET_DEFAULT_MEAN,
            std=IMAGENET_DEFAULT_STD)
_384 = dict(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0, crop_mode="squash")
_22K = dict(num_classes=21841)
_192 = dict(input_size=(3, 192, 192), pool_size=(6, 6))
_DOWNSTREAM = dict(num_classes=0, classifier=None, notes=(
    "backbone of an official downstream checkpoint (head not included); use features_only=True to get the "
    "per-stage norms of the official detector/segmenter",))


def _hub(filename: str, **kwargs) -> dict:
    return pretrained_cfg(**{**_CFG, **kwargs}, hf_hub_id=_HUB, hf_hub_filename=filename)


default_cfgs: dict[str, dict] = {
    "unireplknet_a.in1k": _hub("unireplknet_a_in1k_224_acc77.03.pth"),
    "unireplknet_f.in1k": _hub("unireplknet_f_in1k_224_acc78.58.pth"),
    "unireplknet_p.in1k": _hub("unireplknet_p_in1k_224_acc80.23.pth"),
    "unireplknet_n.in1k": _hub("unireplknet_n_in1k_224_acc81.64.pth"),
    "unireplknet_t.in1k": _hub("unireplknet_t_in1k_224_acc83.21.pth"),
    "unireplknet_t.in1k_ade20k_upernet_512": _hub("upernet_unireplknet_t_512_160k_ade20k_miou48.56.pth",
                                                  **_DOWNSTREAM, input_size=(3, 512, 512), pool_size=(16, 16)),
    "unireplknet_t.in1k_coco_cascade_mask_rcnn": _hub("casc_mask_rcnn_unireplknet_t_in1k_3x_coco_ap51.75.pth",
                                                      **_DOWNSTREAM),
    "unireplknet_s.in1k": _hub("unireplknet_s_in1k_224_acc83.91.pth"),
    "unireplknet_s.in22k_ft_in1k_384": _hub("unireplknet_s_in22k_to_in1k_384_acc86.44.pth", **_384),
    "unireplknet_s.in22k": pretrained_cfg(**_CFG, **_22K, notes=(
        "the authors report this checkpoint lost (official README); no file to download",)),
    "unireplknet_b.in22k_ft_in1k_384": _hub("unireplknet_b_in22k_to_in1k_384_acc87.40.pth", **_384),
    "unireplknet_b.in22k": _hub("unireplknet_b_in22k_pretrain.pth", **_22K),
    "unireplknet_b.in22k_ade20k_upernet_640": _hub("upernet_unireplknet_b_in22k_640_160k_ade20k_miou53.52.pth",
                                                   **_DOWNSTREAM, input_size=(3, 640, 640), pool_size=(20, 20)),
    "unireplknet_l.in22k_ft_in1k_384": _hub("unireplknet_l_in22k_to_in1k_384_acc87.88.pth", **_384),
    "unireplknet_l.in22k": _hub("unireplknet_l_in22k_pretrain.pth", **_22K, **_192),
    "unireplknet_xl.in22k": _hub("unireplknet_xl_in22k_pretrain.pth", **_22K, **_192),
    "unireplknet_xl.in22k_coco_cascade_mask_rcnn": _hub(
        "casc_mask_rcnn_unireplknet_xl_in22k_3x_coco_ap56.39.pth", **_DOWNSTREAM),
    "unireplknet_xl.in22k_ft_in1k_384": pretrained_cfg(**_CFG, **_384, notes=(
        "the authors report this checkpoint lost (official README); no file to download",)),
    "unireplknet_test": pretrained_cfg(**_CFG, input_size=(3, 64, 64), pool_size=(2, 2), crop_pct=1.0,
                                       notes=("CPU test configuration (not published)",)),
}


# ----------------------------------------------------------------------------------- registered variants
model_cfgs: dict[str, dict] = {
    "unireplknet_a": dict(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320)),
    "unireplknet_f": dict(depths=(2, 2, 6, 2), dims=(48, 96, 192, 384)),
    "unireplknet_p": dict(depths=(2, 2, 6, 2), dims=(64, 128, 256, 512)),
    "unireplknet_n": dict(depths=(2, 2, 8, 2), dims=(80, 160, 320, 640)),
    "unireplknet_t": dict(depths=(3, 3, 18, 3), dims=(80, 160, 320, 640)),
    "unireplknet_s": dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768)),
    "unireplknet_b": dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)),
    "unireplknet_l": dict(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536)),
    "unireplknet_xl": dict(depths=(3, 3, 27, 3), dims=(256, 512, 1024, 2048)),
    # tiny CPU configuration for tests (covers 3x3, 5x5 and several dilated sizes)
    "unireplknet_test": dict(depths=(1, 1, 2, 1), dims=(16, 32, 48, 64),
                             kernel_sizes=((3,), (9,), (13, 5), (7,))),
}


@register_model
def unireplknet_a(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-A (4.4M params)."""
    return _create_unireplknet("unireplknet_a", pretrained, **kwargs)


@register_model
def unireplknet_f(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-F (6.2M params)."""
    return _create_unireplknet("unireplknet_f", pretrained, **kwargs)


@register_model
def unireplknet_p(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-P (10.7M params)."""
    return _create_unireplknet("unireplknet_p", pretrained, **kwargs)


@register_model
def unireplknet_n(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-N (18.3M params)."""
    return _create_unireplknet("unireplknet_n", pretrained, **kwargs)


@register_model
def unireplknet_t(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-T (31M params, 4.9 GMACs at 224; deploy-form counts)."""
    return _create_unireplknet("unireplknet_t", pretrained, **kwargs)


@register_model
def unireplknet_s(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-S (56M params, 9.1 GMACs at 224; deploy-form counts)."""
    return _create_unireplknet("unireplknet_s", pretrained, **kwargs)


@register_model
def unireplknet_b(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-B (98M params)."""
    return _create_unireplknet("unireplknet_b", pretrained, **kwargs)


@register_model
def unireplknet_l(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-L (218M params; ImageNet-22K pretraining at 192, fine-tuned at 384)."""
    return _create_unireplknet("unireplknet_l", pretrained, **kwargs)


@register_model
def unireplknet_xl(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-XL (386M params; ImageNet-22K pretraining at 192)."""
    return _create_unireplknet("unireplknet_xl", pretrained, **kwargs)


@register_model
def unireplknet_test(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """Tiny UniRepLKNet for CPU tests (not a published configuration)."""
    return _create_unireplknet("unireplknet_test", pretrained, **kwargs)


#: tiny CPU configurations iterated by the generic model tests (name -> constructor kwargs).
TEST_MODELS: dict[str, dict] = {"unireplknet_test": {}}
