"""Parameter / FLOP / MAC tables (papers' Table 3 style) for the training and the deploy form.

Counting uses :func:`lkvision.utils.count_flops` (``torch.utils.flop_counter.FlopCounterMode``), so lkvision's
custom operators are counted with the formulas their authors registered. Conventions: 1 MAC = 2 FLOPs; the
papers' "FLOPs" column is what we call MACs. ``nonzero_params`` counts non-zero weights (sparse checkpoints).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["complexity", "complexity_table"]


def complexity(model: nn.Module, resolution: int = 224, batch_size: int = 1, by_operator: bool = False) -> dict:
    """Params, non-zero params, FLOPs and MACs of one forward of ``model`` at ``resolution``^2.

    Returns ``dict(params, nonzero_params, flops, macs[, flops_by_op])`` (plain ints; FLOPs per batch of
    ``batch_size`` images). The model is put in eval mode for the count and restored.
    """
    from ..utils import count_flops, count_params, nonzero_params

    in_chans = int(getattr(model, "in_chans", 3))
    size = (batch_size, in_chans, resolution, resolution)
    if by_operator:
        flops, ops = count_flops(model, size, by_operator=True)
    else:
        flops, ops = count_flops(model, size), None
    out = {"params": count_params(model), "nonzero_params": nonzero_params(model), "flops": int(flops),
           "macs": int(flops) // 2}
    if ops is not None:
        out["flops_by_op"] = ops
    return out


def complexity_table(
    models: Sequence[str | nn.Module],
    resolution: int = 224,
    forms: Sequence[str] = ("train", "deploy"),
    model_kwargs: dict | None = None,
    checkpoints: Sequence[str | None] | None = None,
    by_operator: bool = False,
    allow_pickle: bool = False,
) -> list[dict]:
    """One row per (model, form): ``model, form, resolution, params_M, nonzero_params_M, GFLOPs, GMACs``.

    ``models``: registered names or modules. ``forms``: ``"train"`` (as built) and/or ``"deploy"``
    (:func:`lkvision.reparameterize`, i.e. every re-param branch merged). ``allow_pickle``: see
    :func:`lkvision.load_weights` (only for checkpoint files you trust).
    """
    import lkvision

    for f in forms:
        if f not in ("train", "deploy"):
            raise ValueError(f"unknown form {f!r}; use 'train' and/or 'deploy'")
    checkpoints = list(checkpoints) if checkpoints is not None else [None] * len(models)
    rows = []
    for m, ckpt in zip(models, checkpoints):
        if isinstance(m, str):
            name = m
            model = lkvision.create_model(m, **(model_kwargs or {}))
            if ckpt:
                lkvision.load_weights(model, ckpt, allow_pickle=allow_pickle)
        else:
            name, model = type(m).__name__, m
        model.eval()
        for form in forms:
            target = lkvision.reparameterize(model, inplace=False) if form == "deploy" else model
            with torch.no_grad():
                c = complexity(target, resolution, by_operator=by_operator)
            row = {"model": name, "form": form, "resolution": resolution,
                   "params_M": c["params"] / 1e6, "nonzero_params_M": c["nonzero_params"] / 1e6,
                   "GFLOPs": c["flops"] / 1e9, "GMACs": c["macs"] / 1e9}
            if by_operator:
                row["flops_by_op"] = c["flops_by_op"]
            rows.append(row)
    return rows
