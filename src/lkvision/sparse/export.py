"""Sparse model -> dense model with zeros, and per-layer sparsity reports computed from the weights."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .masking import Masking, _unwrap, find_shiftwise_layers

__all__ = ["export_dense", "bake_masks", "sparsity_report", "format_report"]


@torch.no_grad()
def export_dense(model: nn.Module, masking: Masking | None = None) -> nn.Module:
    """A deep copy of ``model`` (DDP wrapper removed) with every mask of ``masking`` multiplied into its
    weight. The result is a plain dense model (no masking state) whose pruned weights are exact zeros."""
    out = copy.deepcopy(_unwrap(model))
    if masking is not None:
        params = dict(out.named_parameters())
        for n, m in masking.masks.items():
            if n not in params:
                raise KeyError(f"export_dense: masked parameter {n!r} is not in the model")
            params[n].mul_(m.to(params[n].device))
    return out


def bake_masks(state_dict: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A copy of a model ``state_dict`` with ``masks`` (``Masking.state_dict()["masks"]`` or a whole
    Masking state dict) multiplied into the weights; works on checkpoints without building a model."""
    if "masks" in masks and isinstance(masks["masks"], Mapping):
        masks = masks["masks"]
    missing = sorted(set(masks) - set(state_dict))
    if missing:
        raise KeyError(f"bake_masks: masks for keys missing from the state dict: {missing[:8]}")
    out = dict(state_dict)
    for n, m in masks.items():
        w = state_dict[n]
        out[n] = w * m.to(device=w.device, dtype=torch.bool)
    return out


def _row(name: str, w: Tensor, kind: str) -> dict:
    nz = w != 0
    numel = w.numel()
    nonzero = int(nz.sum())
    filt = nz.reshape(w.shape[0], -1).any(1)
    return dict(
        name=name, kind=kind, shape=tuple(w.shape), numel=numel, nonzero=nonzero,
        density=nonzero / numel if numel else 1.0, sparsity=1.0 - nonzero / numel if numel else 0.0,
        filters=w.shape[0], nonzero_filters=int(filt.sum()),
        filter_sparsity=1.0 - float(filt.float().mean()),
    )


@torch.no_grad()
def sparsity_report(model: nn.Module, masking: Masking | None = None) -> list[dict]:
    """Achieved sparsity per layer, measured on the weights themselves (exact zeros).

    One row per weight with >= 2 dims (only the masked/maskable ones when ``masking`` is given), keys
    ``name, kind="weight", shape, numel, nonzero, density, sparsity, filters, nonzero_filters,
    filter_sparsity`` (a filter = one output row ``w[o]``; it counts as non-zero if any element is).
    Every ShiftWise layer also gets a row ``kind="shiftwise_merged"`` for the deploy form (the sum of its
    rep branches): a filter survives there if it survives in any branch.
    """
    model = _unwrap(model)
    keep = None if masking is None else {s["name"] for s in masking.stats()}
    params = dict(model.named_parameters())
    rows = [_row(n, p.detach(), "weight") for n, p in params.items()
            if p.dim() >= 2 and (keep is None or n in keep)]
    for lname, names in find_shiftwise_layers(model).items():
        merged = sum(params[n].detach().abs() for n in names)
        rows.append(_row(lname, merged, "shiftwise_merged"))
    return rows


def format_report(rows: list[dict]) -> str:
    """A fixed-width text table of :func:`sparsity_report` rows plus a total line."""
    head = f"{'layer':<56} {'shape':<20} {'nonzero/numel':>22} {'sparsity':>9} {'filters kept':>14}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['name'][:56]:<56} {str(r['shape']):<20} {r['nonzero']:>10}/{r['numel']:<11} "
            f"{r['sparsity']:>9.4f} {r['nonzero_filters']:>6}/{r['filters']:<7}"
        )
    w = [r for r in rows if r["kind"] == "weight"]
    tot, nz = sum(r["numel"] for r in w), sum(r["nonzero"] for r in w)
    lines.append(f"total (weights): {nz}/{tot} non-zero, sparsity {1 - nz / max(tot, 1):.4f}")
    return "\n".join(lines)
