"""The model API every lkvision family shares: timm's model contract, implemented without importing timm.

A family subclasses :class:`LargeKernelNet` (or :class:`ConvNeXtMacroNet`), builds its modules inside
``with factory_device(device):`` and implements :meth:`~LargeKernelNet.stage_pairs` (the stem or downsampling
module before each stage, and the stage). The base class provides what timm's ``tests/test_models.py`` checks:

* standard arguments ``in_chans``, ``num_classes``, ``global_pool`` (``"avg"``, ``"max"``, ``"avgmax"`` or ``""``
  for unpooled maps), ``drop_rate`` (dropout before the classifier), ``output_stride`` (32 only), ``device``,
  ``dtype``; attributes ``num_features``, ``head_hidden_size``, ``feature_info``, ``pretrained_cfg`` /
  ``default_cfg``;
* ``forward_features`` / ``forward_head(pre_logits=...)`` / ``forward``;
* ``forward_intermediates(x, indices, norm, stop_early, output_fmt, intermediates_only)`` and
  ``prune_intermediate_layers(indices, prune_norm, prune_head)`` with timm's signatures and semantics;
* ``get_classifier`` / ``reset_classifier(num_classes, global_pool=None)`` (the new head takes the model's
  device, dtype and train/eval mode), ``set_grad_checkpointing``, ``group_matcher``, ``no_weight_decay``;
* lkvision's ``features_only`` mode: the model itself returns the feature maps of ``out_indices``, each through
  the family's per-output norm (the official detection/segmentation backbones' ``norm0..3``);
  ``feature_info`` is then a :class:`FeatureInfo` (timm's semantics: info of every stage, ``channels()`` /
  ``reduction()`` of the outputs).

Models build on the meta device (``torch.device("meta")`` context or ``device="meta"``) and trace with
``torch.fx`` (input checks are skipped for FX proxies).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from copy import deepcopy

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..ops._fx import fx_leaf

__all__ = [
    "LargeKernelNet", "ConvNeXtMacroNet", "FeatureInfo", "check_input", "feature_take_indices", "factory_device",
    "drop_path_rates", "global_pool_2d", "channels_last_apply", "POOL_TYPES", "UnsupportedPoolError",
]

#: global pooling types of every lkvision head ("" keeps the (B, C, H, W) map).
POOL_TYPES = ("avg", "max", "avgmax", "")


@fx_leaf
def check_input(x: torch.Tensor, in_chans: int, min_size: int, name: str, dtype: torch.dtype | None = None) -> None:
    """Raise a clear error for inputs a model cannot take (type, rank, channels, size, dtype).

    ``dtype``: the model's parameter dtype; an input of another floating dtype is refused unless autocast is
    active for its device (autocast casts the convolutions; outside it PyTorch would fail deep inside the first
    layer with a bias/weight dtype message). Under ``torch.fx`` tracing the check becomes a graph node (see
    :func:`lkvision.ops._fx.fx_leaf`), so traced models check their real inputs too.
    """
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
    if dtype is not None and x.dtype != dtype and not _autocast_enabled(x.device.type):
        raise TypeError(
            f"{name}: input dtype {x.dtype} differs from the model's {dtype}; cast the input "
            f"(x.to({dtype})), convert the model (model.to({x.dtype})) or run under torch.autocast"
        )


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta)
        return False


def feature_take_indices(num_features: int, indices: int | Sequence[int] | None = None) -> tuple[list[int], int]:
    """timm's index rule: ``None`` = all, an int ``n`` = the last ``n``, a sequence = those indices (negative
    ones count from the end). Returns (sorted absolute indices as given, max index)."""
    if indices is None:
        indices = num_features
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise ValueError(f"indices: last-n ({indices}) is out of range 1..{num_features}")
        take = list(range(num_features - indices, num_features))
    else:
        take = []
        for i in indices:
            idx = num_features + int(i) if int(i) < 0 else int(i)
            if not 0 <= idx < num_features:
                raise ValueError(f"out_indices/indices {tuple(indices)}: index {i} is out of range for "
                                 f"{num_features} stages (valid: {-num_features}..{num_features - 1})")
            take.append(idx)
        if not take:
            raise ValueError("indices: select at least one stage")
    return take, max(take)


class FeatureInfo(list):
    """Feature metadata with timm's ``FeatureInfo`` semantics (written here because models do not import timm).

    The list holds one dict per stage (``num_chs``, ``reduction``, ``module``, ``index``), so ``len()``,
    indexing and iteration cover every stage and timm's feature wrappers accept it as a model's
    ``feature_info``; ``out_indices`` are the stages a ``features_only`` model returns, and ``channels()`` /
    ``reduction()`` / ``module_name()`` give their values (with ``idx``: of those stages).
    """

    def __init__(self, info: Sequence[dict], out_indices: Sequence[int]) -> None:
        super().__init__(dict(d, index=i) for i, d in enumerate(info))
        self.out_indices = tuple(out_indices)

    @property
    def info(self) -> list[dict]:
        return list(self)

    def from_other(self, out_indices: Sequence[int]) -> FeatureInfo:
        return FeatureInfo(deepcopy(list(self)), out_indices)

    def get(self, key: str, idx: int | Sequence[int] | None = None):
        if idx is None:
            return [self[i][key] for i in self.out_indices]
        if isinstance(idx, (tuple, list)):
            return [self[i][key] for i in idx]
        return self[idx][key]

    def get_dicts(self, keys: Sequence[str] | None = None, idx: int | Sequence[int] | None = None):
        sel = self.out_indices if idx is None else idx
        if isinstance(sel, int):
            d = self[sel]
            return d if keys is None else {k: d[k] for k in keys}
        return [self[i] if keys is None else {k: self[i][k] for k in keys} for i in sel]

    def channels(self, idx: int | Sequence[int] | None = None):
        return self.get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None):
        return self.get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None):
        return self.get("module", idx)

    def __repr__(self) -> str:
        return f"FeatureInfo(out_indices={self.out_indices}, info={list(self)})"


def factory_device(device: torch.device | str | None):
    """Context in which a model's modules are created: ``torch.device(device)`` (so that nothing is allocated
    elsewhere first, e.g. on ``"meta"``), or no change when ``device`` is None."""
    return torch.device(device) if device is not None else contextlib.nullcontext()


def drop_path_rates(drop_path_rate: float, depths: Sequence[int]) -> list[list[float]]:
    """Stochastic-depth rate of every block, rising linearly from 0 over all blocks; one list per stage.
    (Computed on the CPU, so it also works under a meta-device context.)"""
    rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
    out, start = [], 0
    for d in depths:
        out.append(rates[start:start + d])
        start += d
    return out


def global_pool_2d(x: torch.Tensor, pool_type: str) -> torch.Tensor:
    """(B, C, H, W) -> (B, C) by ``"avg"``, ``"max"`` or ``"avgmax"`` (their mean); ``""`` returns ``x``."""
    if pool_type == "avg":
        return x.mean((2, 3))
    if pool_type == "max":
        return x.amax((2, 3))
    if pool_type == "avgmax":
        return 0.5 * (x.mean((2, 3)) + x.amax((2, 3)))
    return x


def channels_last_apply(module: nn.Module, x: torch.Tensor, spatial: bool) -> torch.Tensor:
    """Apply a channel-wise module (Linear, LayerNorm) to pooled (B, C) features, or at every position of a
    (B, C, H, W) map when ``spatial``."""
    if spatial:
        return module(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return module(x)


class UnsupportedPoolError(ValueError, AssertionError):
    """A ``global_pool`` the head cannot take. A ValueError, and an AssertionError as timm's heads raise
    (timm's callers probe pooling types with ``except AssertionError``)."""


def _check_pool(global_pool: str) -> str:
    if global_pool not in POOL_TYPES:
        raise UnsupportedPoolError(f"global_pool {global_pool!r} is not supported; use one of {POOL_TYPES} "
                         "('' returns the unpooled map)")
    return global_pool


class LargeKernelNet(nn.Module):
    """Base class of all lkvision classification backbones (see the module docstring for the API).

    Subclass contract: call ``super().__init__(in_chans=..., num_classes=..., global_pool=..., drop_rate=...,
    output_stride=...)``; set ``self.num_features`` and ``self.feature_info`` (one dict per stage:
    ``num_chs``, ``reduction``, ``module``); implement :meth:`stage_pairs` and the classifier
    (``self.head`` by default, see :meth:`get_classifier`); finish with :meth:`_init_features_mode` and
    :meth:`_to_device_dtype`. Class attributes name the parts the generic code needs: ``downsample_attr`` (the
    ModuleList of downsampling layers between stages, if any), ``head_names`` (top-level modules of the
    classification head, its norm included).
    """

    min_input_size: int = 32
    reparameterize_is_walk = True  # see lkvision.reparam._walk
    downsample_attr: str | None = None
    head_names: tuple[str, ...] = ("head",)

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, global_pool: str = "avg", drop_rate: float = 0.0,
                 output_stride: int | None = None) -> None:
        super().__init__()
        if output_stride not in (None, 32):
            raise ValueError(
                f"output_stride={output_stride} is not supported: lkvision models keep their large kernels at "
                "strides 4/8/16/32 (no dilated stages); use output_stride=32 (the default)"
            )
        self.in_chans = int(in_chans)
        self.num_classes = int(num_classes)
        self.global_pool = _check_pool(global_pool)
        self.drop_rate = float(drop_rate)
        self.num_features = 0
        self.head_hidden_size = 0
        self.grad_checkpointing = False
        self.features_only = False
        self.out_indices: tuple[int, ...] = ()
        self.feature_info: list[dict] | FeatureInfo = []
        #: state-dict prefixes removed by prune_intermediate_layers / features_only (checkpoint loading drops them)
        self.pruned_prefixes: tuple[str, ...] = ()
        self.pretrained_cfg: dict = {}
        self.default_cfg = self.pretrained_cfg
        self.head_drop = nn.Dropout(self.drop_rate)

    # ----------------------------------------------------------------------------------- subclass hooks
    def stage_pairs(self) -> list[tuple[nn.Module, nn.Module]]:  # pragma: no cover - abstract
        """``[(pre_0, stage_0), (pre_1, stage_1), ...]``: the stem or downsampling module before each stage."""
        raise NotImplementedError

    def make_feature_norm(self, index: int, channels: int) -> nn.Module:
        """The norm applied to output ``index`` in ``features_only`` mode (Identity unless a family adds one)."""
        return nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, C, h, w) -> global pool -> dropout -> (B, num_classes) logits, or the pooled (B, C) features
        with ``pre_logits``; with ``global_pool=""`` the classifier runs at every position (B, classes, h, w)."""
        x = self.head_drop(global_pool_2d(x, self.global_pool))
        return x if pre_logits else channels_last_apply(self.get_classifier(), x, not self.global_pool)

    def _prune_head_norm(self) -> None:
        """Remove the norm of the classification head (families with one override this)."""

    # ------------------------------------------------------------------------------------ classifier
    def get_classifier(self) -> nn.Module:
        return self.head

    def _set_classifier(self, module: nn.Module) -> None:
        self.head = module

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New classifier ``Linear(head_hidden_size, num_classes)`` (Identity for 0), created on the model's
        device and dtype and in its train/eval mode; ``global_pool`` None keeps the current pooling."""
        if global_pool is not None:
            self.global_pool = _check_pool(global_pool)
        self.num_classes = int(num_classes)
        ref = next(self.parameters(), None)
        kw = dict(device=ref.device, dtype=ref.dtype) if ref is not None else {}
        fc = nn.Linear(self.head_hidden_size, num_classes, **kw) if num_classes > 0 else nn.Identity()
        self._set_classifier(fc.train(self.training))

    # ------------------------------------------------------------------------------------- set-up
    def _init_features_mode(self, features_only: bool, out_indices: int | Sequence[int] | None) -> None:
        """Call at the end of a subclass ``__init__``. In ``features_only`` mode: add the per-output norms,
        drop the head and the stages after the last output (no unused parameters under DDP)."""
        self.head_hidden_size = self.num_features
        if not features_only:
            return
        take, _ = feature_take_indices(len(self.feature_info), out_indices)
        self.out_indices = tuple(sorted(set(take)))
        info = list(self.feature_info)
        self.feature_norms = nn.ModuleDict(
            {str(i): self.make_feature_norm(i, info[i]["num_chs"]) for i in self.out_indices}
        )
        self.prune_intermediate_layers(self.out_indices, prune_norm=False, prune_head=True)
        self.features_only = True
        self.feature_info = FeatureInfo(info, self.out_indices)

    def _to_device_dtype(self, device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        """Last step of ``__init__``: every parameter and buffer on ``device`` (default: the current default
        device, which a ``torch.device`` context sets) and floating ones in ``dtype``."""
        self.to(device=torch.get_default_device() if device is None else device)
        if dtype is not None:
            self.to(dtype=dtype)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of every block (trades compute for memory during training)."""
        self.grad_checkpointing = enable

    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups in forward order for layer-wise lr decay (timm's format): the stem, then each
        block (``coarse``: each stage); a downsampling layer joins the group before it; head last."""
        blocks: list[tuple[str, tuple | None]] = [(r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)", None)]
        if self.downsample_attr:
            blocks.append((rf"^{self.downsample_attr}\.(\d+)", (99999,)))
        return dict(stem=r"^stem", blocks=blocks)

    def no_weight_decay(self) -> set[str]:
        """Parameter-name patterns exempt from weight decay beyond timm's rule (1-D parameters and biases):
        none; the official recipes decay everything else, layer scales and GRN included."""
        return set()

    # ------------------------------------------------------------------------------------------ forward
    def _check(self, x: torch.Tensor) -> None:
        ref = next(self.parameters(), None)
        check_input(x, self.in_chans, self.min_input_size, type(self).__name__,
                    ref.dtype if ref is not None else None)

    def run_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and isinstance(stage, nn.Sequential):
            for block in stage:
                x = checkpoint(block, x, use_reentrant=False)
            return x
        return stage(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> last-stage feature map (B, num_features, H/32, W/32) (before the head)."""
        self._check(x)
        for pre, stage in self.stage_pairs():
            x = self.run_stage(stage, pre(x))
        return x

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs ``indices`` (None: all, int n: the last n, or a sequence) and the final feature map.

        ``norm``: apply the per-output norms of ``features_only`` mode (no effect on classifiers, whose final
        norm acts on pooled features inside the head). ``stop_early``: skip the stages after the last selected
        one (the returned final map is then that stage's output). ``output_fmt``: ``"NCHW"`` or ``"NHWC"``.
        Returns the list of intermediates, or ``(final, intermediates)``.
        """
        fmt = str(getattr(output_fmt, "value", output_fmt))
        if fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        self._check(x)
        pairs = self.stage_pairs()
        take, max_index = feature_take_indices(len(pairs), indices)
        if stop_early or intermediates_only:
            pairs = pairs[:max_index + 1]
        norms = getattr(self, "feature_norms", None) if norm else None
        intermediates = []
        for i, (pre, stage) in enumerate(pairs):
            x = self.run_stage(stage, pre(x))
            if i in take:
                y = norms[str(i)](x) if norms is not None and str(i) in norms else x
                intermediates.append(y.permute(0, 2, 3, 1) if fmt == "NHWC" else y)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Remove what the intermediates ``indices`` do not need: the stages after the last one (the head then
        goes too, ``num_features`` becomes that stage's width), the head (``prune_head``) and the norms
        (``prune_norm``: the head norm and the per-output norms). Returns the kept indices."""
        n = len(self.stage_pairs())
        take, max_index = feature_take_indices(n, indices)
        removed: list[str] = []
        if max_index < n - 1:
            removed += [f"stages.{i}." for i in range(max_index + 1, n)]
            self.stages = self.stages[:max_index + 1]
            if self.downsample_attr:
                removed += [f"{self.downsample_attr}.{i}." for i in range(max_index, n - 1)]
                setattr(self, self.downsample_attr, getattr(self, self.downsample_attr)[:max_index])
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            prune_head = True
        norms = getattr(self, "feature_norms", None)
        if norms is not None:
            drop = [k for k in norms if prune_norm or int(k) > max_index]
            for k in drop:
                del norms[k]
            removed += [f"feature_norms.{k}." for k in drop]
        if prune_norm or prune_head:
            self._prune_head_norm()
        if prune_head:
            self.reset_classifier(0, "")
            removed += [f"{name}." for name in self.head_names]
        self.pruned_prefixes = tuple(dict.fromkeys(self.pruned_prefixes + tuple(removed)))
        return take

    def forward(self, x: torch.Tensor):
        if self.features_only:
            return self.forward_intermediates(x, self.out_indices, norm=True, intermediates_only=True)
        return self.forward_head(self.forward_features(x))

    # ----------------------------------------------------------------------------------- deploy form
    def reparameterize(self) -> LargeKernelNet:
        """Convert this model in place to its deploy form (exact in ``eval()``); returns ``self``."""
        from ..reparam import reparameterize

        return reparameterize(self, inplace=True)


class ConvNeXtMacroNet(LargeKernelNet):
    """The macro design shared by ConvNeXt, SLaK, UniRepLKNet and ShiftWise.

    A subclass builds ``self.stem``, ``self.downsamples`` (3 modules) and ``self.stages`` (4 sequentials) with
    :meth:`_build_stem`, then :meth:`_build_head` and, last, :meth:`_finish_init`. This class provides the head
    (global pool -> LayerNorm(eps 1e-6) -> dropout -> Linear, named ``norm`` and ``head`` as in the official
    checkpoints), the truncated-normal(0.02) init of every conv/linear with zero biases, the head-init scale,
    strides 4/8/16/32 ``feature_info`` and a LayerNorm2d per output in ``features_only`` mode (the official
    ``norm0..3``).
    """

    downsample_attr = "downsamples"
    head_names = ("norm", "head")

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

    def _build_head(self, dims: Sequence[int]) -> None:
        self.num_features = dims[-1]
        self.feature_info = [dict(num_chs=c, reduction=4 * 2**i, module=f"stages.{i}") for i, c in enumerate(dims)]
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], self.num_classes) if self.num_classes > 0 else nn.Identity()

    def _finish_init(self, head_init_scale: float, features_only: bool, out_indices: int | Sequence[int] | None,
                     device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        self.apply(self.init_weights)
        if isinstance(self.head, nn.Linear):
            with torch.no_grad():
                self.head.weight.mul_(head_init_scale)
                self.head.bias.mul_(head_init_scale)
        self._init_features_mode(features_only, out_indices)
        self._to_device_dtype(device, dtype)

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

    def _prune_head_norm(self) -> None:
        self.norm = nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, C, h, w) -> global pool -> LayerNorm -> dropout -> (B, C) features (``pre_logits``) or
        (B, classes) logits; with ``global_pool=""`` norm and classifier act at every position."""
        spatial = not self.global_pool
        x = self.head_drop(channels_last_apply(self.norm, global_pool_2d(x, self.global_pool), spatial))
        return x if pre_logits else channels_last_apply(self.head, x, spatial)
