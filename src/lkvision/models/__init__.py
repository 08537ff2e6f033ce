"""Model families (one public module each, discovered by the registry) and the shared model API."""

from ._base import FeatureInfo, LargeKernelNet, check_input
from ._pretrained import build_model_with_cfg, load_pretrained, pretrained_cfg, resolve_pretrained_cfg
from ._registry import (
    create_model,
    families,
    family_of,
    get_pretrained_cfg,
    list_models,
    list_pretrained,
    model_entrypoint,
    register_model,
    split_model_name_tag,
)
from ._weights import CheckpointError, UnsafeCheckpointError, load_state_dict_file, load_weights, save_weights

__all__ = [
    "LargeKernelNet", "FeatureInfo", "check_input", "create_model", "list_models", "list_pretrained",
    "model_entrypoint", "register_model", "families", "family_of", "get_pretrained_cfg", "split_model_name_tag",
    "build_model_with_cfg", "load_pretrained", "pretrained_cfg", "resolve_pretrained_cfg", "CheckpointError",
    "UnsafeCheckpointError", "load_state_dict_file", "load_weights", "save_weights",
]
