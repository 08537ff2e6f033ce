"""The model API every lkvision family shares (timm conventions).

A family subclasses :class:`LargeKernelNet`, builds ``self.stages`` etc., and implements
:meth:`stage_pairs` (downsample/stem module + stage module, in order), :meth:`forward_head` and
:meth:`make_feature_norm`. The base class provides ``forward``, ``forward_features``, the
``features_only``/``out_indices`` mode, input checks, activation checkpointing, ``reset_classifier``
and ``reparameterize``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["LargeKernelNet", "ConvNeXtMacroNet", "check_input"]


def check_input(x: torch.Tensor, in_chans: int, min_size: int, name: str) -> None:
    """Raise a clear error for inputs a model cannot take (wrong rank, channels, size or dtype)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name}: expected a 4-D (B, C, H, W) input, got shape {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(
            f"{name}: expected {in_chans} input channels, got {x.shape[1]} (input shape {tuple(x.shape)})"
        )
    if x.shape[2] < min_size or x.shape[3] < min_size:
        raise ValueError(
            f"{name}: input spatial size {tuple(x.shape[2:])} is too small; the model needs at least "
            f"{min_size}x{min_size} (its total stride)"
        )
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point input, got {x.dtype}")


class LargeKernelNet(nn.Module):
    """Base class of all lkvision classification backbones.

    Subclass contract (set in ``__init__`` before calling :meth:`_init_features_mode`):

    * ``self.in_chans``, ``self.num_classes``, ``self.num_features`` (channels entering the head),
      ``self.feature_info``: one dict per stage, ``dict(num_chs=C, reduction=stride, module=name)``.
    * :meth:`stage_pairs` returns ``[(pre_0, stage_0), (pre_1, stage_1), ...]`` where ``pre_i`` is the
      stem or downsampling module applied before stage i (``nn.Identity`` if none).
    * :meth:`forward_head` maps the last feature map (B, num_features, H/32, W/32) to logits.
    * :meth:`make_feature_norm` gives the per-stage norm used by ``features_only`` (the official
      detection/segmentation backbones add one LayerNorm per output; RepLKNet uses none).
    """

    min_input_size: int = 32
    reparameterize_is_walk = True  # see lkvision.reparam._walk
    in_chans: int = 3
    num_classes: int = 1000
    num_features: int = 0
    features_only: bool = False
    out_indices: tuple[int, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.feature_info: list[dict] = []

    # ----------------------------------------------------------------------------------- subclass hooks
    def stage_pairs(self) -> list[tuple[nn.Module, nn.Module]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def make_feature_norm(self, index: int, channels: int) -> nn.Module:
        return nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier by a fresh ``Linear(num_features, num_classes)`` (Identity if 0)."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"only global_pool='avg' is supported, got {global_pool!r}")
        self.num_classes = num_classes
        ref = self.get_classifier()
        kw = {}
        if isinstance(ref, nn.Linear):
            kw = dict(device=ref.weight.device, dtype=ref.weight.dtype)
        self.head = nn.Linear(self.num_features, num_classes, **kw) if num_classes > 0 else nn.Identity()

    # ------------------------------------------------------------------------------------------ set-up
    def _init_features_mode(self, features_only: bool, out_indices: Sequence[int] | None) -> None:
        """Call at the end of a subclass ``__init__``: drops the head in ``features_only`` mode."""
        n = len(self.feature_info)
        idx = tuple(range(n)) if out_indices is None else tuple(int(i) for i in out_indices)
        for i in idx:
            if not -n <= i < n:
                raise ValueError(f"out_indices {tuple(out_indices)} out of range for {n} stages")
        idx = tuple(sorted({i % n for i in idx}))
        self.out_indices = idx
        self.features_only = bool(features_only)
        if self.features_only:
            self.feature_norms = nn.ModuleDict(
                {str(i): self.make_feature_norm(i, self.feature_info[i]["num_chs"]) for i in idx}
            )
            for name in ("head", "norm", "head_norm"):
                if hasattr(self, name):
                    delattr(self, name)
            self.feature_info = [self.feature_info[i] for i in idx]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of every block (trades compute for memory during training)."""
        self.grad_checkpointing = enable

    # ------------------------------------------------------------------------------------------ forward
    def run_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and isinstance(stage, nn.Sequential):
            for block in stage:
                x = checkpoint(block, x, use_reentrant=False)
            return x
        return stage(x)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of every stage, strides 4/8/16/32: list of (B, C_i, H/s_i, W/s_i)."""
        outs = []
        for pre, stage in self.stage_pairs():
            x = self.run_stage(stage, pre(x))
            outs.append(x)
        return outs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> last-stage feature map (B, num_features, H/32, W/32) (before the head)."""
        check_input(x, self.in_chans, self.min_input_size, type(self).__name__)
        for pre, stage in self.stage_pairs():
            x = self.run_stage(stage, pre(x))
        return x

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Normed feature maps of ``out_indices`` (what ``features_only`` models return)."""
        check_input(x, self.in_chans, self.min_input_size, type(self).__name__)
        feats = []
        pairs = self.stage_pairs()
        last = max(self.out_indices)
        for i, (pre, stage) in enumerate(pairs):
            x = self.run_stage(stage, pre(x))
            if i in self.out_indices:
                feats.append(self.feature_norms[str(i)](x) if self.features_only else x)
            if i == last:
                break
        return feats

    def forward(self, x: torch.Tensor):
        if self.features_only:
            return self.forward_intermediates(x)
        return self.forward_head(self.forward_features(x))

    # ----------------------------------------------------------------------------------- deploy form
    def reparameterize(self) -> LargeKernelNet:
        """Convert this model in place to its deploy form (exact in ``eval()``); returns ``self``."""
        from ..reparam import reparameterize

        return reparameterize(self, inplace=True)


class ConvNeXtMacroNet(LargeKernelNet):
    """The macro design shared by ConvNeXt, SLaK, UniRepLKNet and ShiftWise.

    A subclass builds ``self.stem``, ``self.downsamples`` (3 modules) and ``self.stages`` (4 sequentials), then
    calls :meth:`_build_head` and, last, :meth:`_finish_init`. This class provides the head (global mean ->
    LayerNorm(eps 1e-6) -> Linear, named ``norm`` and ``head`` as in the official checkpoints), the
    truncated-normal(0.02) init of every conv/linear with zero biases, the head-init scale, strides 4/8/16/32
    ``feature_info`` and a LayerNorm2d per stage in ``features_only`` mode (the official ``norm0..3``).
    """

    def _build_stem(self, in_chans: int, dims: Sequence[int], kind: str) -> None:
        """``self.stem`` and ``self.downsamples``, named as in the official checkpoints' layouts.

        ``kind="patchify"`` (ConvNeXt, SLaK): 4x4/s4 conv + LN; downsample = LN + 2x2/s2 conv.
        ``kind="conv"`` (UniRepLKNet, ShiftWise): 3x3/s2 conv (C/2) + LN + GELU + 3x3/s2 conv + LN;
        downsample = 3x3/s2 conv + LN.
        """
        from ..layers import LayerNorm2d

        n = len(dims)
        if kind == "patchify":
            self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], 4, stride=4), LayerNorm2d(dims[0]))
            self.downsamples = nn.ModuleList(
                nn.Sequential(LayerNorm2d(dims[i]), nn.Conv2d(dims[i], dims[i + 1], 2, stride=2)) for i in range(n - 1)
            )
        elif kind == "conv":
            self.stem = nn.Sequential(
                nn.Conv2d(in_chans, dims[0] // 2, 3, stride=2, padding=1), LayerNorm2d(dims[0] // 2), nn.GELU(),
                nn.Conv2d(dims[0] // 2, dims[0], 3, stride=2, padding=1), LayerNorm2d(dims[0]),
            )
            self.downsamples = nn.ModuleList(
                nn.Sequential(nn.Conv2d(dims[i], dims[i + 1], 3, stride=2, padding=1), LayerNorm2d(dims[i + 1]))
                for i in range(n - 1)
            )
        else:
            raise ValueError(f"unknown stem kind {kind!r}; expected 'patchify' or 'conv'")

    def _build_head(self, dims: Sequence[int], num_classes: int) -> None:
        self.num_classes, self.num_features = num_classes, dims[-1]
        self.feature_info = [dict(num_chs=c, reduction=4 * 2**i, module=f"stages.{i}") for i, c in enumerate(dims)]
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()

    def _finish_init(self, head_init_scale: float, features_only: bool, out_indices: Sequence[int] | None) -> None:
        self.apply(self.init_weights)
        if isinstance(self.head, nn.Linear):
            with torch.no_grad():
                self.head.weight.mul_(head_init_scale)
                self.head.bias.mul_(head_init_scale)
        self._init_features_mode(features_only, out_indices)

    @staticmethod
    def init_weights(m: nn.Module) -> None:
        """trunc_normal(std 0.02) for every Conv2d/Linear weight, zero biases (the official init)."""
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def stage_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return list(zip([self.stem, *self.downsamples], self.stages))

    def make_feature_norm(self, index: int, channels: int) -> nn.Module:
        from ..layers import LayerNorm2d

        return LayerNorm2d(channels)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, C, h, w) -> global mean -> LayerNorm -> (B, C) features (``pre_logits``) or (B, classes) logits."""
        x = self.norm(x.mean((2, 3)))
        return x if pre_logits else self.head(x)
