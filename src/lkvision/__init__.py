"""lkvision: large-kernel-effect ConvNets (ShiftwiseConv, RepLKNet, UniRepLKNet, SLaK, ConvNeXt-LK).

``import lkvision`` also makes every lkvision model available to ``timm.create_model`` (registered when timm is
imported, see :mod:`lkvision._timm`).
"""

from . import _timm
from .models import create_model, list_models, list_pretrained, load_weights, save_weights
from .reparam import reparameterize

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "list_pretrained", "reparameterize", "load_weights", "save_weights",
           "register_with_timm", "__version__"]


def register_with_timm() -> list[str]:
    """Register every lkvision model with timm now (``import lkvision`` already arranges it); returns the names
    timm knows them by (``lkv_<name>`` where timm already uses the name)."""
    return _timm.register_all()


_timm.install()
