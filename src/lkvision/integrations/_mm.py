"""The OpenMMLab 3.x (mmengine) classes shared by :mod:`lkvision.integrations.mmdet` and ``.mmseg``.

Imports mmengine at import time; ``import lkvision`` never imports this module.

* :class:`LKVisionBackbone` -- any lkvision model as a dense-prediction backbone (``type='LKVisionBackbone',
  model_name='sw_tiny'``), with the official downstream output norms, ``init_cfg`` loading lkvision or official
  checkpoints, ``deploy`` (re-parameterised) inference, ``frozen_stages``, ``norm_eval``, ``with_cp``, ``sync_bn``.
* :class:`LKLayerDecayOptimWrapperConstructor` -- the layer-wise / stage-wise learning-rate decay of the official
  ConvNeXt / UniRepLKNet / SLaK / SW downstream code (``paramwise_cfg=dict(decay_rate, decay_type, num_layers)``).
* :func:`~lkvision.integrations.backbone.allow_numpy_checkpoints` (re-exported) -- lets mmengine's ``torch.load``
  (weights-only by default since torch 2.6) read checkpoints that hold numpy scalars, without unpickling anything
  else.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..data._compat import ensure_torchvision

ensure_torchvision()  # mmengine/mmdet/mmseg import torchvision, whose C++ ops may not load on this torch

from mmengine.model import BaseModule  # noqa: E402
from mmengine.optim import DefaultOptimWrapperConstructor  # noqa: E402

from ..reparam import reparameterize  # noqa: E402
from .backbone import (  # noqa: E402
    allow_numpy_checkpoints,
    build_backbone,
    feature_channels,
    feature_strides,
    freeze_stages,
    layer_id,
    load_backbone_weights,
)

__all__ = ["LKVisionBackbone", "LKLayerDecayOptimWrapperConstructor", "allow_numpy_checkpoints", "register_into"]


class LKVisionBackbone(BaseModule):
    """An lkvision model as an mmdet / mmseg backbone: (B, 3, H, W) -> tuple of (B, C_i, H / s_i, W / s_i).

    Args:
        model_name: any ``lkvision.list_models()`` name (``sw_tiny``, ``replknet_31b``, ``unireplknet_t``, ...).
        out_indices: stages to return (strides 4, 8, 16, 32 for indices 0..3).
        drop_path_rate: stochastic depth of the backbone (the papers' downstream configs set it).
        frozen_stages: freeze the stem and stages ``0..frozen_stages`` (-1: none).
        norm_eval: keep every BatchNorm of the backbone in eval mode while training.
        with_cp: activation checkpointing of every block.
        sync_bn: convert the backbone's BatchNorms to SyncBatchNorm (the official RepLKNet/SW setting).
        deploy: inference with the re-parameterised form: the backbone folds itself (exactly, in eval mode) at its
            first eval-mode forward, after whatever weights were loaded; training-mode forward then raises.
        model_kwargs: further constructor arguments (e.g. ``layer_scale_init_value``, ``big_kernels``).
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH, format='auto'|'lkvision'|'official', prefix=None,
            official_kwargs=None)``; official checkpoints are converted through :mod:`lkvision.compat` (with the
            official constructor kwargs of ``model_name``, or ``official_kwargs``). ``None``: lkvision's own init.
    """

    def __init__(self, model_name: str, out_indices: Sequence[int] = (0, 1, 2, 3),
                 drop_path_rate: float | None = None, frozen_stages: int = -1, norm_eval: bool = False,
                 with_cp: bool = False, sync_bn: bool = False, deploy: bool = False,
                 model_kwargs: dict | None = None, init_cfg: dict | None = None) -> None:
        super().__init__(init_cfg=None)  # lkvision initialises itself; init_cfg is handled in init_weights
        if init_cfg is not None and (not isinstance(init_cfg, dict) or init_cfg.get("type") != "Pretrained"):
            raise ValueError(f"LKVisionBackbone: init_cfg must be None or dict(type='Pretrained', checkpoint=...), "
                             f"got {init_cfg!r}")
        if init_cfg is not None and not init_cfg.get("checkpoint"):
            init_cfg = None  # the official configs write checkpoint=None for "from scratch"
        self.pretrained_cfg = init_cfg
        self.model_name = model_name
        kwargs = dict(model_kwargs or {})
        if drop_path_rate is not None:
            kwargs["drop_path_rate"] = drop_path_rate
        self.model = build_backbone(model_name, out_indices, sync_bn=sync_bn, with_cp=with_cp, **kwargs)
        self.out_channels = feature_channels(self.model)
        self.out_strides = feature_strides(self.model)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.deploy = deploy
        self._deployed = False
        freeze_stages(self.model, frozen_stages)

    def init_weights(self) -> None:
        """Load ``init_cfg``'s checkpoint (lkvision or official format); without one keep lkvision's init."""
        if self.pretrained_cfg is not None:
            cfg = self.pretrained_cfg
            unknown = set(cfg) - {"type", "checkpoint", "format", "prefix", "official_kwargs"}
            if unknown:
                raise ValueError(f"LKVisionBackbone: unknown init_cfg keys {sorted(unknown)}")
            load_backbone_weights(self.model, self.model_name, cfg["checkpoint"], fmt=cfg.get("format", "auto"),
                                  prefix=cfg.get("prefix"), official_kwargs=cfg.get("official_kwargs"))
        self._is_init = True

    def switch_to_deploy(self) -> None:
        """Re-parameterise the backbone in place (exact in eval mode); idempotent."""
        if not self._deployed:
            reparameterize(self.model.eval(), inplace=True)
            self._deployed = True

    def train(self, mode: bool = True) -> LKVisionBackbone:
        super().train(mode)
        freeze_stages(self.model, self.frozen_stages)
        if mode and self.norm_eval:
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.deploy:
            if self.training:
                raise RuntimeError("LKVisionBackbone(deploy=True) is for inference: call .eval() first, or train "
                                   "with deploy=False and re-parameterise afterwards")
            self.switch_to_deploy()
        return tuple(self.model(x))


class LKLayerDecayOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """Layer-wise learning-rate decay as in the official ConvNeXt / UniRepLKNet / SLaK / SW downstream code.

    ``paramwise_cfg``: ``decay_rate`` (e.g. 0.8), ``decay_type`` (``'layer_wise'`` or ``'stage_wise'``),
    ``num_layers`` (9 for 18 blocks in stage 2, 12 for 27; 6 for SLaK's stage-wise). A parameter with layer id
    ``l`` (see :func:`lkvision.integrations.backbone.layer_id`) gets ``lr = base_lr * decay_rate ** (num_layers +
    1 - l)``; the neck and heads get ``l = num_layers + 1`` (scale 1). Biases and 1-D parameters (norms, layer
    scales) get no weight decay; everything else ``weight_decay``. Param groups carry ``lr_scale`` and
    ``group_name`` (``layer_{l}_decay`` / ``layer_{l}_no_decay``) like the official constructor.
    """

    def add_params(self, params: list[dict], module: nn.Module, **kwargs) -> None:
        cfg = self.paramwise_cfg
        for key in ("decay_rate", "num_layers"):
            if key not in cfg:
                raise ValueError(f"LKLayerDecayOptimWrapperConstructor: paramwise_cfg needs {key!r}, got {cfg}")
        decay_rate, num_layers = float(cfg["decay_rate"]), int(cfg["num_layers"])
        decay_type = cfg.get("decay_type", "layer_wise")
        backbone = getattr(module, "backbone", None)
        if not isinstance(backbone, LKVisionBackbone):
            raise TypeError("LKLayerDecayOptimWrapperConstructor needs a model whose .backbone is an "
                            f"LKVisionBackbone, got {type(backbone).__name__}")
        ids = layer_id(backbone.model, decay_type, num_layers)
        groups: dict[str, dict] = {}
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            no_decay = param.ndim == 1 or name.endswith(".bias")
            lid = ids.get(id(param), num_layers + 1)
            group_name = f"layer_{lid}_{'no_decay' if no_decay else 'decay'}"
            if group_name not in groups:
                scale = decay_rate ** (num_layers + 1 - lid)
                groups[group_name] = dict(params=[], param_names=[], lr_scale=scale, group_name=group_name,
                                          lr=scale * self.base_lr,
                                          weight_decay=0.0 if no_decay else self.base_wd)
            groups[group_name]["params"].append(param)
            groups[group_name]["param_names"].append(name)
        params.extend(groups[k] for k in sorted(groups, key=lambda g: (int(g.split("_")[1]), g)))


def register_into(models_registry, constructors_registry) -> None:
    """Register the classes into one framework's registries (idempotent)."""
    for registry, cls in ((models_registry, LKVisionBackbone),
                          (constructors_registry, LKLayerDecayOptimWrapperConstructor)):
        if registry.get(cls.__name__) is not cls:
            registry.register_module(module=cls, force=True)
