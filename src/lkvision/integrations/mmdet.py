"""lkvision backbones and the layer-decay optimizer constructor in mmdet 3.x's registries.

Use in a config: ``custom_imports = dict(imports=["lkvision.integrations.mmdet"], allow_failed_imports=False)``
and ``backbone=dict(type="LKVisionBackbone", model_name="unireplknet_t", ...)``. See docs/downstream.md.
"""

from __future__ import annotations

# _mm runs lkvision's torchvision shim before anything of OpenMMLab is imported
from ._mm import LKLayerDecayOptimWrapperConstructor, LKVisionBackbone, allow_numpy_checkpoints, register_into

__all__ = ["LKVisionBackbone", "LKLayerDecayOptimWrapperConstructor", "allow_numpy_checkpoints"]



def _register() -> None:
    from mmdet.registry import MODELS, OPTIM_WRAPPER_CONSTRUCTORS

    register_into(MODELS, OPTIM_WRAPPER_CONSTRUCTORS)


_register()
