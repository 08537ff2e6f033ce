"""Neural-network layers built on :mod:`lkvision.ops`. Every re-parameterisable layer has ``reparameterize()``."""

from .conv_bn import ConvBN, fold_bn_after_linear, fuse_bn, make_bn, pad_kernel_to
from .drop import DropPath, LayerScale2d, drop_path
from .norm import GRN, LayerNorm2d
from .se import SEBlock

__all__ = [
    "ConvBN", "fuse_bn", "fold_bn_after_linear", "make_bn", "pad_kernel_to",
    "DropPath", "drop_path", "LayerScale2d", "GRN", "LayerNorm2d", "SEBlock",
]

# Family-specific layers register themselves here as they are added (imported lazily to keep import light).
_LAZY = {
    "ShiftWiseConv2d": ".shiftwise",
    "ReparamLargeKernelConv": ".reparam_conv",
    "ConvBNAct": ".reparam_conv",
    "DepthwiseConv2d": ".reparam_conv",
    "fold_bn_into_next_conv1x1": ".reparam_conv",
    "DilatedReparamConv": ".dilated",
    "StripConv": ".strip",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
