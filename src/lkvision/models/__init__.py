"""Model families (one file each) and the registry."""

from ._base import LargeKernelNet, check_input
from ._registry import create_model, list_models, model_entrypoint, register_model, register_with_timm
from ._weights import CheckpointError, UnsafeCheckpointError, load_state_dict_file, load_weights, save_weights

__all__ = [
    "LargeKernelNet", "check_input", "create_model", "list_models", "model_entrypoint", "register_model",
    "register_with_timm", "CheckpointError", "load_state_dict_file", "load_weights", "save_weights",
    "UnsafeCheckpointError",
]
