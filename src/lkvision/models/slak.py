"""SLaK (Liu et al., ICLR 2023): ConvNeXt macro-architecture with decomposed 51x51 kernels.

Block (dim C, big kernel M, small kernel N)::

    y = StripConv(x)                      BN(DW M x N) + BN(DW N x M) + BN(DW N x N)
    y = NHWC -> LayerNorm -> Linear(4C) -> GELU -> Linear(C) -> NCHW
    out = x + DropPath(gamma * y)

Stem: 4x4 s4 conv -> LN. Downsample: LN -> 2x2 s2 conv. Head: global mean -> LayerNorm -> Linear.
The published widths are ConvNeXt's times ``width_factor`` 1.3 (``int(d * 1.3)``: 124, 249, 499, 998);
our constructor takes the final ``dims`` (the config table applies the factor).

The official SLaK has no deploy form. Ours (:func:`lkvision.reparameterize`): each StripConv merges into two
biased strips (or one dense L x L kernel with ``deploy_dense=True``, slower with native PyTorch convs), and
the layer scale folds into the second Linear. Sparse training (40% sparsity in the paper) lives in
:mod:`lkvision.sparse`; the models here are dense.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..layers import DropPath, LayerScale2d
from ..layers.pointwise import passes_through, pointwise_mlp
from ..layers.strip import StripConv
from ._base import ConvNeXtMacroNet
from ._registry import register_model

__all__ = ["SLaK", "SLaKBlock", "slak_dims", "TEST_MODELS"]


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
    ) -> None:
        super().__init__()
        self.large_kernel = StripConv(dim, kernel_size, small_kernel, bn=bn, sync_bn=sync_bn, deploy=deploy,
                                      deploy_dense=deploy_dense)
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


class SLaK(ConvNeXtMacroNet):
    """SLaK classifier / backbone.

    Args:
        depths: blocks per stage.
        dims: channels per stage (already multiplied by the width factor; see :func:`slak_dims`).
        kernel_sizes: big kernel M per stage.
        small_kernel: N, shared by all stages.
        in_chans, num_classes: input channels, classes (0: no classifier).
        drop_path_rate: stochastic depth, linear over all blocks.
        layer_scale_init_value: initial layer scale.
        head_init_scale: multiplies the initial classifier weight and bias.
        bn: BatchNorm after every strip branch (official default True).
        sync_bn: SyncBatchNorm.
        deploy: build the merged (deploy) form directly.
        deploy_dense: the merged form uses one dense M x M kernel per block instead of two strips.
        features_only, out_indices: return the per-stage feature maps after a channels-first LayerNorm.

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
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float | None = 1e-6,
        head_init_scale: float = 1.0,
        bn: bool = True,
        sync_bn: bool = False,
        deploy: bool = False,
        deploy_dense: bool = False,
        features_only: bool = False,
        out_indices: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
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
            sync_bn=sync_bn, deploy=deploy, deploy_dense=deploy_dense, features_only=features_only,
            out_indices=None if out_indices is None else list(out_indices),
        )
        self.in_chans, self.num_classes = in_chans, num_classes
        self.depths, self.dims = depths, dims
        self.kernel_sizes, self.small_kernel = kernel_sizes, small_kernel

        self._build_stem(in_chans, dims, "patchify")
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.stages = nn.ModuleList()
        cur = 0
        for i in range(4):
            self.stages.append(nn.Sequential(*[
                SLaKBlock(dims[i], kernel_sizes[i], small_kernel, drop_path=rates[cur + j],
                          layer_scale_init_value=layer_scale_init_value, bn=bn, sync_bn=sync_bn,
                          deploy=deploy, deploy_dense=deploy_dense)
                for j in range(depths[i])
            ]))
            cur += depths[i]
        self._build_head(dims, num_classes)
        self._finish_init(head_init_scale, features_only, out_indices)


# ---------------------------------------------------------------------------------------- configs
_CFGS: dict[str, dict] = {
    "slak_t": dict(depths=(3, 3, 9, 3), dims=slak_dims((96, 192, 384, 768))),
    "slak_s": dict(depths=(3, 3, 27, 3), dims=slak_dims((96, 192, 384, 768))),
    "slak_b": dict(depths=(3, 3, 27, 3), dims=slak_dims((128, 256, 512, 1024))),
    # tiny CPU configuration for tests (no width factor; kernels that fit a 64x64 input)
    "slak_test": dict(depths=(1, 1, 2, 1), dims=(16, 32, 48, 64), kernel_sizes=(13, 11, 9, 7)),
}


def _create(name: str, **kwargs) -> SLaK:
    return SLaK(**{**_CFGS[name], **kwargs})


@register_model
def slak_t(**kwargs) -> SLaK:
    """SLaK-T: kernels 51/49/47/13 (N = 5), dims 124..998; 50.7M dense params (30M non-zero at 40%)."""
    return _create("slak_t", **kwargs)


@register_model
def slak_s(**kwargs) -> SLaK:
    """SLaK-S: depths 3/3/27/3, dims 124..998; 55M non-zero params at 40% sparsity."""
    return _create("slak_s", **kwargs)


@register_model
def slak_b(**kwargs) -> SLaK:
    """SLaK-B: depths 3/3/27/3, dims 166..1331; 95M non-zero params at 40% sparsity."""
    return _create("slak_b", **kwargs)


@register_model
def slak_test(**kwargs) -> SLaK:
    """Tiny SLaK for CPU tests (not a published configuration)."""
    return _create("slak_test", **kwargs)


#: tiny CPU configurations iterated by the generic model tests (name -> constructor kwargs).
TEST_MODELS: dict[str, dict] = {"slak_test": {}}
