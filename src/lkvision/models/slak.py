"""SLaK (Liu et al., ICLR 2023): ConvNeXt macro-architecture with decomposed 51x51 kernels.

Block (dim C, big kernel M, small kernel N)::

    y = StripConv(x)                      BN(DW M x N) + BN(DW N x M) + BN(DW N x N)
    y = NHWC -> LayerNorm -> Linear(4C) -> GELU -> Linear(C) -> NCHW
    out = x + DropPath(gamma * y)

With ``decomposed=False`` (the official ``Decom=False``, e.g. the README's ConvNeXt setting
``--kernel_size 7 7 7 7 100``) the large kernel is dense: ``BN(DW M x M) + BN(DW N x N)`` (the N x N branch only
when N < M), a :class:`~lkvision.layers.ReparamLargeKernelConv` that merges exactly into one biased M x M conv.

Stem: 4x4 s4 conv -> LN. Downsample: LN -> 2x2 s2 conv. Head: global mean -> LayerNorm -> Linear.
The published widths are ConvNeXt's times ``width_factor`` 1.3 (``int(d * 1.3)``: 124, 249, 499, 998);
our constructor takes the final ``dims`` (the config table applies the factor).

The official SLaK has no deploy form for the decomposed kernel (its ``merge_kernel`` handles only the dense
one). Ours (:func:`lkvision.reparameterize`): each StripConv merges into two
biased strips (or one dense L x L kernel with ``deploy_dense=True``, slower with native PyTorch convs), and
the layer scale folds into the second Linear. Sparse training (40% sparsity in the paper) lives in
:mod:`lkvision.sparse`; the models here are dense.

File order (timm's): block -> model -> ``checkpoint_filter_fn`` -> ``_create_slak`` -> ``default_cfgs`` ->
``model_cfgs`` and the registered variants.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..layers import DropPath, LayerScale2d
from ..layers.pointwise import passes_through, pointwise_mlp
from ..layers.reparam_conv import ReparamLargeKernelConv
from ..layers.strip import StripConv
from ._base import ConvNeXtMacroNet, drop_path_rates, factory_device
from ._pretrained import build_model_with_cfg, pretrained_cfg
from ._registry import register_model

__all__ = ["SLaK", "SLaKBlock", "slak_dims", "model_cfgs", "default_cfgs", "checkpoint_filter_fn", "TEST_MODELS"]


def slak_dims(dims: Sequence[int], width_factor: float = 1.3) -> tuple[int, ...]:
    """Official width rule: ``int(d * width_factor)`` per stage."""
    return tuple(int(d * width_factor) for d in dims)


class SLaKBlock(nn.Module):
    """One SLaK block. Shapes: (B, C, H, W) -> (B, C, H, W).

    Args:
        dim: channels C.
        kernel_size: M (odd).
        small_kernel: N (odd); no square branch when N >= M.
        drop_path: stochastic-depth rate.
        layer_scale_init_value: initial layer scale (``None``/0: none).
        bn: BatchNorm after every strip branch.
        sync_bn: SyncBatchNorm.
        deploy, deploy_dense: build the merged form directly / merge to a dense kernel (see StripConv).
        decomposed: True (default): M x N + N x M strips (:class:`StripConv`, official ``Decom=True``);
            False: a dense M x M kernel + the N x N kernel when N < M (:class:`ReparamLargeKernelConv`,
            official ``Decom=False``; any N >= M, even or odd, means no small kernel).
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int,
        small_kernel: int = 5,
        drop_path: float = 0.0,
        layer_scale_init_value: float | None = 1e-6,
        bn: bool = True,
        sync_bn: bool = False,
        deploy: bool = False,
        deploy_dense: bool = False,
        decomposed: bool = True,
    ) -> None:
        super().__init__()
        if decomposed:
            self.large_kernel: nn.Module = StripConv(dim, kernel_size, small_kernel, bn=bn, sync_bn=sync_bn,
                                                     deploy=deploy, deploy_dense=deploy_dense)
        else:
            self.large_kernel = _dense_large_kernel(dim, kernel_size, small_kernel, bn, sync_bn, deploy)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * dim, dim)
        use_ls = not deploy and layer_scale_init_value is not None and layer_scale_init_value > 0
        self.layer_scale = LayerScale2d(dim, layer_scale_init_value) if use_ls else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.large_kernel(x).permute(0, 2, 3, 1))  # NHWC
        if passes_through(self.layer_scale, self.drop_path):  # deploy: residual add fused into fc2
            return pointwise_mlp(y, self.fc1, self.act, self.fc2, residual=x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        y = self.layer_scale(pointwise_mlp(y, self.fc1, self.act, self.fc2).permute(0, 3, 1, 2))
        return x + self.drop_path(y)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Merge the strips (StripConv.reparameterize) and fold the layer scale into ``fc2``; idempotent."""
        self.large_kernel.reparameterize()
        if isinstance(self.layer_scale, LayerScale2d):
            g = self.layer_scale.gamma
            self.fc2.weight.mul_(g[:, None])
            self.fc2.bias.mul_(g)
            self.layer_scale = nn.Identity()


def _dense_large_kernel(dim: int, kernel_size: int, small_kernel: int, bn: bool, sync_bn: bool,
                        deploy: bool) -> ReparamLargeKernelConv:
    """SLaK's ``Decom=False`` kernel: BN(DW M x M) (+ BN(DW N x N) when N < M), padding from the filter shape."""
    for name, k in (("kernel_size", kernel_size), ("small_kernel", small_kernel)):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"SLaK: {name} must be a positive int, got {k!r}")
    small = small_kernel if small_kernel < kernel_size else None
    if kernel_size % 2 == 0 or (small is not None and small % 2 == 0):
        raise ValueError(
            f"SLaK (decomposed=False): kernel sizes must be odd where both branches exist, got M={kernel_size}, "
            f"N={small_kernel}: with the official (k//2) padding an even kernel makes the output one row/column "
            "larger than the input, so the residual cannot be added (N >= M, any parity, means no N x N branch)"
        )
    layer = ReparamLargeKernelConv(dim, kernel_size, small, sync_bn=sync_bn, bn=bn)
    if deploy:
        layer.reparameterize()
    return layer


class SLaK(ConvNeXtMacroNet):
    """SLaK classifier / backbone.

    Args:
        depths: blocks per stage.
        dims: channels per stage (already multiplied by the width factor; see :func:`slak_dims`).
        kernel_sizes: big kernel M per stage.
        small_kernel: N, shared by all stages.
        in_chans, num_classes: input channels, classes (0: no classifier).
        global_pool: ``"avg"`` (official), ``"max"``, ``"avgmax"`` or ``""`` (unpooled maps).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, linear over all blocks.
        layer_scale_init_value: initial layer scale.
        head_init_scale: multiplies the initial classifier weight and bias.
        bn: BatchNorm after every strip branch (official default True).
        sync_bn: SyncBatchNorm.
        deploy: build the merged (deploy) form directly.
        deploy_dense: the merged form uses one dense M x M kernel per block instead of two strips.
        decomposed: strips (default, official ``Decom=True``) or a dense M x M kernel (``Decom=False``); see
            :class:`SLaKBlock`.
        features_only, out_indices: return the per-stage feature maps after a channels-first LayerNorm.
        output_stride: 32 only. device, dtype: where and in which dtype the parameters are created.

    Input (B, in_chans, H, W), H, W >= 32; output logits (B, num_classes).
    """

    def __init__(
        self,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (124, 249, 499, 998),
        kernel_sizes: Sequence[int] = (51, 49, 47, 13),
        small_kernel: int = 5,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float | None = 1e-6,
        head_init_scale: float = 1.0,
        bn: bool = True,
        sync_bn: bool = False,
        deploy: bool = False,
        deploy_dense: bool = False,
        decomposed: bool = True,
        features_only: bool = False,
        out_indices: int | Sequence[int] | None = None,
        output_stride: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_chans=in_chans, num_classes=num_classes, global_pool=global_pool, drop_rate=drop_rate,
                         output_stride=output_stride)
        depths, dims = tuple(int(d) for d in depths), tuple(int(d) for d in dims)
        kernel_sizes = tuple(int(k) for k in kernel_sizes)
        if len(depths) != 4 or len(dims) != 4 or len(kernel_sizes) != 4:
            raise ValueError(
                f"SLaK needs 4 stages: got depths={depths}, dims={dims}, kernel_sizes={kernel_sizes}"
            )
        #: constructor arguments (JSON-able), used to rebuild converted checkpoints
        self.config = dict(
            depths=list(depths), dims=list(dims), kernel_sizes=list(kernel_sizes), small_kernel=small_kernel,
            in_chans=in_chans, num_classes=num_classes, drop_path_rate=drop_path_rate,
            layer_scale_init_value=layer_scale_init_value, head_init_scale=head_init_scale, bn=bn,
            sync_bn=sync_bn, deploy=deploy, deploy_dense=deploy_dense, decomposed=decomposed,
            features_only=features_only,
            out_indices=None if out_indices is None or isinstance(out_indices, int) else list(out_indices),
        )
        self.depths, self.dims = depths, dims
        self.kernel_sizes, self.small_kernel = kernel_sizes, small_kernel
        with factory_device(device):
            self._build_stem(in_chans, dims, "patchify")
            self.stages = nn.ModuleList(
                nn.Sequential(*[
                    SLaKBlock(dims[i], kernel_sizes[i], small_kernel, drop_path=rate,
                              layer_scale_init_value=layer_scale_init_value, bn=bn, sync_bn=sync_bn,
                              deploy=deploy, deploy_dense=deploy_dense, decomposed=decomposed)
                    for rate in rates
                ])
                for i, rates in enumerate(drop_path_rates(drop_path_rate, depths))
            )
            self._build_head(dims)
            self._finish_init(head_init_scale, features_only, out_indices, device, dtype)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: SLaK) -> dict[str, torch.Tensor]:
    """An official SLaK checkpoint (strip kernels ``LoRA1``/``LoRA2``) -> this model's keys; lkvision
    checkpoints pass unchanged. The official key map lives in :mod:`lkvision.compat.slak`."""
    from ..compat import checkpoint_filter  # compat builds on this module: imported when weights are loaded

    return checkpoint_filter("slak", state_dict, model)


def _create_slak(variant: str, pretrained: bool = False, **kwargs) -> SLaK:
    """Build the registered ``variant`` (its ``model_cfgs`` entry, overridden by ``kwargs``)."""
    return build_model_with_cfg(SLaK, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                **{**model_cfgs[variant], **kwargs})


# -------------------------------------------------------------------------------------- pretrained cfgs
_CFG = dict(first_conv="stem.0", classifier="head", license="mit", paper_ids="arXiv:2207.03620",
            paper_name="More ConvNets in the 2020s: Scaling up Kernels Beyond 51x51 using Sparsity (ICLR 2023)",
            origin_url="https://github.com/VITA-Group/SLaK")


def _drive(link: str, top1: str) -> dict:
    return pretrained_cfg(**_CFG, notes=(
        f"official weights ({top1} top-1, 300 epochs, 40% sparsity; official kwargs in "
        f"lkvision.compat.slak.MODEL_KWARGS) are on Google Drive: {link}",))


default_cfgs: dict[str, dict] = {
    "slak_t.in1k": _drive("https://drive.google.com/file/d/1Iut2f5FMS_77jGPYoUJDQzDIXOsax1u4/view?usp=sharing",
                          "82.5%"),
    "slak_s.in1k": _drive("https://drive.google.com/file/d/1etM6KQbnlsgDAZ37adsQJ3UI8Bbv2AVe/view?usp=sharing",
                          "83.8%"),
    "slak_b.in1k": _drive("https://drive.google.com/file/d/1duUxUD3RSblQ6eDHd0n-u0aulwGypf1j/view?usp=sharing",
                          "84.0%"),
    "slak_test": pretrained_cfg(**_CFG, input_size=(3, 64, 64), pool_size=(2, 2), crop_pct=1.0,
                                notes=("CPU test configuration (not published)",)),
}


# ----------------------------------------------------------------------------------- registered variants
model_cfgs: dict[str, dict] = {
    "slak_t": dict(depths=(3, 3, 9, 3), dims=slak_dims((96, 192, 384, 768))),
    "slak_s": dict(depths=(3, 3, 27, 3), dims=slak_dims((96, 192, 384, 768))),
    "slak_b": dict(depths=(3, 3, 27, 3), dims=slak_dims((128, 256, 512, 1024))),
    # tiny CPU configuration for tests (no width factor; kernels that fit a 64x64 input)
    "slak_test": dict(depths=(1, 1, 2, 1), dims=(16, 32, 48, 64), kernel_sizes=(13, 11, 9, 7)),
}


@register_model
def slak_t(pretrained: bool = False, **kwargs) -> SLaK:
    """SLaK-T: kernels 51/49/47/13 (N = 5), dims 124..998; 50.7M dense params (30M non-zero at 40%)."""
    return _create_slak("slak_t", pretrained, **kwargs)


@register_model
def slak_s(pretrained: bool = False, **kwargs) -> SLaK:
    """SLaK-S: depths 3/3/27/3, dims 124..998; 55M non-zero params at 40% sparsity."""
    return _create_slak("slak_s", pretrained, **kwargs)


@register_model
def slak_b(pretrained: bool = False, **kwargs) -> SLaK:
    """SLaK-B: depths 3/3/27/3, dims 166..1331; 95M non-zero params at 40% sparsity."""
    return _create_slak("slak_b", pretrained, **kwargs)


@register_model
def slak_test(pretrained: bool = False, **kwargs) -> SLaK:
    """Tiny SLaK for CPU tests (not a published configuration)."""
    return _create_slak("slak_test", pretrained, **kwargs)


#: tiny CPU configurations iterated by the generic model tests (name -> constructor kwargs).
TEST_MODELS: dict[str, dict] = {"slak_test": {}}
