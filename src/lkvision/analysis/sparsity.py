"""Filter-level sparsity of Shiftwise layers (SW paper §5, Figs. 5-6), from weights alone or from masks.

Each Shiftwise layer has Rep branches ``branches[b].weight`` of shape (R*nk, 1, k, k): R rep channels
(groups), each feeding nk 3x3 filters (index j = "Filter No."). A filter is *pruned* in a branch when its
k x k weights are all exactly zero (sparse checkpoints store zeros), or, when masks are given, when its mask
is all zero. After the Rep branches are merged, a filter is gone only if it is pruned in *every* branch;
``sparsity`` below uses that merged definition (pruned filters / filters), per-branch values are reported too.

* Fig. 5(a): sparsity per layer vs depth, coloured by stage.
* Fig. 5(b-e): for each stage, share of groups whose filter j is pruned, for every j < nk.
* Fig. 6: for each stage, share of groups with n = 0..nk pruned filters.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["LayerSparsity", "SparsityReport", "find_shiftwise_weights", "pruned_filters", "sparsity_report"]

_BRANCH_KEY = re.compile(r"^(?P<prefix>.+)\.branches\.(?P<b>\d+)\.weight$")
_STAGE = re.compile(r"(?:^|\.)stages\.(\d+)\.")


@dataclass
class LayerSparsity:
    name: str
    stage: int
    groups: int  # R: rep channels
    nk: int  # filters per group
    sparsity: float  # merged: pruned in every branch / filters
    branch_sparsity: list[float]
    pruned_per_index: list[int]  # (nk,): groups whose filter j is pruned
    groups_by_pruned_count: list[int]  # (nk+1,): groups with n pruned filters

    @property
    def filters(self) -> int:
        return self.groups * self.nk

    @property
    def pruned(self) -> int:
        return sum(self.pruned_per_index)


@dataclass
class SparsityReport:
    layers: list[LayerSparsity]
    index_distribution: dict[int, list[float]] = field(default_factory=dict)
    count_distribution: dict[int, list[float]] = field(default_factory=dict)

    @property
    def overall(self) -> float:
        f = sum(layer.filters for layer in self.layers)
        return sum(layer.pruned for layer in self.layers) / f if f else 0.0

    def rows(self) -> list[dict]:
        """One CSV/table row per layer."""
        out = []
        for i, layer in enumerate(self.layers):
            row = {"layer_no": i, "name": layer.name, "stage": layer.stage, "groups": layer.groups,
                   "nk": layer.nk, "filters": layer.filters, "pruned": layer.pruned, "sparsity": layer.sparsity}
            for b, s in enumerate(layer.branch_sparsity):
                row[f"sparsity_branch{b}"] = s
            out.append(row)
        return out

    def distribution_rows(self) -> list[dict]:
        """Rows ``stage, kind (filter_index | pruned_count), x, share`` for the Fig. 5(b-e)/6 data."""
        out = []
        for s, fr in sorted(self.index_distribution.items()):
            out += [{"stage": s, "kind": "filter_index", "x": j, "share": v} for j, v in enumerate(fr)]
        for s, fr in sorted(self.count_distribution.items()):
            out += [{"stage": s, "kind": "pruned_count", "x": n, "share": v} for n, v in enumerate(fr)]
        return out


def find_shiftwise_weights(
    source: nn.Module | Mapping[str, torch.Tensor], nk: int | Mapping[str, int] | None = None
) -> dict[str, tuple[list[torch.Tensor], int, list[str]]]:
    """``{layer_name: ([branch weights (R*nk, 1, k, k)], nk, [weight keys])}`` for every Shiftwise layer.

    From a model: modules with a ``branches`` list and an ``idx_identit`` table (R, E) give nk = rows / R.
    From a state dict: keys ``<layer>.branches.<b>.weight``; nk comes from ``<layer>.idx_identit`` when saved,
    else from ``nk`` (an int, or a dict per layer name).
    """
    found: dict[str, tuple[list[torch.Tensor], int, list[str]]] = {}
    if isinstance(source, nn.Module):
        for name, m in source.named_modules():
            branches = getattr(m, "branches", None)
            ident = getattr(m, "idx_identit", None)
            if branches is None or not isinstance(ident, torch.Tensor):
                continue
            ws = [br.weight.detach() for br in branches]
            found[name] = (ws, ws[0].shape[0] // ident.shape[0], [f"{name}.branches.{b}.weight"
                                                                  for b in range(len(ws))])
        return found
    groups: dict[str, dict[int, str]] = {}
    for key, t in source.items():
        mt = _BRANCH_KEY.match(key)
        if mt and isinstance(t, torch.Tensor) and t.ndim == 4:
            groups.setdefault(mt["prefix"], {})[int(mt["b"])] = key
    for prefix, keys in groups.items():
        ordered = [keys[b] for b in sorted(keys)]
        ws = [source[k] for k in ordered]
        ident = source.get(f"{prefix}.idx_identit")
        if ident is not None:
            n = ws[0].shape[0] // ident.shape[0]
        elif isinstance(nk, Mapping) and prefix in nk:
            n = int(nk[prefix])
        elif isinstance(nk, int):
            n = nk
        else:
            raise ValueError(f"cannot tell the filters per group (nk) of {prefix!r}: the state dict has no "
                             f"'{prefix}.idx_identit'; pass the model or nk=")
        found[prefix] = (ws, n, ordered)
    return found


def pruned_filters(weight: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(F,) bool: filter f is pruned when its mask (any shape broadcastable to ``weight``) or, without a mask,
    its weights are all zero."""
    t = weight if mask is None else mask.expand_as(weight)
    return (t.reshape(t.shape[0], -1) == 0).all(dim=1)


def sparsity_report(
    source: nn.Module | Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor] | None = None,
    nk: int | Mapping[str, int] | None = None,
) -> SparsityReport:
    """Per-layer and per-stage filter sparsity of every Shiftwise layer in a model or state dict.

    ``masks``: optional ``{weight key: mask}`` (e.g. a saved sparse-training mask state); layers without a
    mask fall back to their zeros. Stages are read from ``stages.<i>.`` in the layer names (0 otherwise).
    """
    found = find_shiftwise_weights(source, nk)
    if not found:
        raise ValueError("no Shiftwise layers (`<name>.branches.<b>.weight`) found")
    layers = []
    for name, (ws, n, keys) in found.items():
        per_branch = [pruned_filters(w, None if masks is None else masks.get(k)) for w, k in zip(ws, keys)]
        F = per_branch[0].numel()
        if F % n:
            raise ValueError(f"{name}: {F} filters is not a multiple of nk={n}")
        merged = torch.stack(per_branch).all(dim=0).view(F // n, n)
        counts = merged.sum(dim=1)
        st = _STAGE.search(name)
        layers.append(LayerSparsity(
            name=name, stage=int(st.group(1)) if st else 0, groups=F // n, nk=n,
            sparsity=float(merged.double().mean()), branch_sparsity=[float(p.double().mean()) for p in per_branch],
            pruned_per_index=merged.sum(dim=0).tolist(),
            groups_by_pruned_count=torch.bincount(counts, minlength=n + 1).tolist(),
        ))
    rep = SparsityReport(layers)
    for s in sorted({layer.stage for layer in layers}):
        ls = [layer for layer in layers if layer.stage == s]
        width = max(layer.nk for layer in ls)
        groups = sum(layer.groups for layer in ls)
        idx = [0] * width
        cnt = [0] * (width + 1)
        for layer in ls:
            for j, v in enumerate(layer.pruned_per_index):
                idx[j] += v
            for j, v in enumerate(layer.groups_by_pruned_count):
                cnt[j] += v
        rep.index_distribution[s] = [v / groups for v in idx]
        rep.count_distribution[s] = [v / groups for v in cnt]
    return rep
