"""Dynamic sparse training (SLaK fine-grained and ShiftWise coarse per-filter), masks in checkpoints,
AMP- and DDP-safe. See ``docs/sparse.md``."""

from .density import densities_from_scores, erk_densities, snip_saliency, uniform_densities
from .export import bake_masks, export_dense, format_report, sparsity_report
from .masking import (
    Masking,
    SparseConfig,
    find_shiftwise_layers,
    is_shiftwise_layer,
    is_strip_layer,
    scaler_step,
    strip_weight_names,
)
from .schedule import cosine_prune_rate, is_sync_update, is_update_step

__all__ = [
    "SparseConfig", "Masking", "scaler_step", "export_dense", "bake_masks", "sparsity_report", "format_report",
    "is_shiftwise_layer", "is_strip_layer", "find_shiftwise_layers", "strip_weight_names",
    "uniform_densities", "erk_densities", "snip_saliency", "densities_from_scores",
    "cosine_prune_rate", "is_update_step", "is_sync_update",
]
