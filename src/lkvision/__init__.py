"""lkvision: large-kernel-effect ConvNets (ShiftwiseConv, RepLKNet, UniRepLKNet, SLaK, ConvNeXt-LK)."""

from .models import create_model, list_models, load_weights, register_with_timm, save_weights
from .reparam import reparameterize

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "reparameterize", "load_weights", "save_weights",
           "register_with_timm", "__version__"]
