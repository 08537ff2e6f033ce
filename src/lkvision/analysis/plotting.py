"""Figures and tables of the analysis tools (matplotlib with the Agg backend; imported lazily)."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..fileio import atomic_path, atomic_write_text

__all__ = [
    "format_table", "save_csv", "save_json", "plot_erf_maps", "plot_kernel_maps", "plot_sparsity",
    "plot_coverage",
]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def format_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> str:
    """Plain-text table with aligned columns (floats with 4 significant digits)."""
    if not rows:
        return "(empty)"
    columns = list(columns or rows[0].keys())

    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if math.isfinite(v) else str(v)
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join([line, sep, *body])


def save_csv(rows: Sequence[Mapping], path: str | Path) -> Path:
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    w.writerows(dict(r) for r in rows)
    return atomic_write_text(path, buf.getvalue())


def save_json(obj, path: str | Path) -> Path:
    def default(o):
        if isinstance(o, torch.Tensor):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        return str(o)

    return atomic_write_text(path, json.dumps(obj, indent=2, default=default) + "\n")


def _save_figure(fig, path: str | Path, suptitle: str | None = None) -> Path:
    """Lay out, write (PNG, creating the folder) and close a figure; returns the path."""
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        _plt().close(fig)
    return Path(path)


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def _plot_map_grid(maps: Mapping[str, torch.Tensor], path: str | Path, suptitle: str | None, *, cmap: str,
                   cell: tuple[float, float], fontsize: int, hide_ticks: bool) -> Path:
    """Maps with values in [0, 1] side by side (up to 4 per row), one colour bar each."""
    plt = _plt()
    rows, cols = _grid(len(maps))
    fig, axes = plt.subplots(rows, cols, figsize=(cell[0] * cols, cell[1] * rows), squeeze=False)
    for ax in axes.flat[len(maps):]:
        ax.axis("off")
    for ax, (name, a) in zip(axes.flat, maps.items()):
        im = ax.imshow(a.float().numpy(), cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(name, fontsize=fontsize)
        if hide_ticks:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _save_figure(fig, path, suptitle)


def plot_erf_maps(maps: Mapping[str, torch.Tensor], path: str | Path, suptitle: str | None = None) -> Path:
    """Several log-normalised ERF maps (values in [0, 1]) side by side, one colour bar each."""
    return _plot_map_grid(maps, path, suptitle, cmap="RdYlGn", cell=(4.2, 4.0), fontsize=10, hide_ticks=True)


def plot_kernel_maps(maps: Mapping[str, torch.Tensor], path: str | Path, suptitle: str | None = None) -> Path:
    """Aggregated |kernel| maps (each rescaled to [0, 1]) side by side."""
    return _plot_map_grid(maps, path, suptitle, cmap="viridis", cell=(3.8, 3.6), fontsize=9, hide_ticks=False)


def plot_sparsity(report, path: str | Path) -> Path:
    """SW paper Figs 5-6 from a :class:`lkvision.analysis.sparsity.SparsityReport`: (a) sparsity vs layer
    index coloured by stage, (b) pruned share per filter index for each stage, (c) share of groups by number
    of pruned filters for each stage."""
    plt = _plt()
    stages = sorted({layer.stage for layer in report.layers})
    colors = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    ax = axes[0]
    for s in stages:
        idx = [i for i, layer in enumerate(report.layers) if layer.stage == s]
        ax.bar(idx, [report.layers[i].sparsity for i in idx], color=colors(s % 10), label=f"stage {s}")
    ax.set_xlabel("Layer No.")
    ax.set_ylabel("sparsity (pruned filters / filters)")
    ax.set_title("(a) sparsity vs depth")
    ax.legend(fontsize=8)
    panels = (  # (axis, per-stage distribution, marker, x label, y label, title)
        (axes[1], report.index_distribution, "o", "Filter No. (index inside a group)", "pruned at index / groups",
         "(b) pruned filter indices"),
        (axes[2], report.count_distribution, "s", "pruned num (filters removed in a group)", "share of groups",
         "(c) pruned filters per group"),
    )
    for ax, dist, marker, xlabel, ylabel, title in panels:
        for s in stages:
            ax.plot(range(len(dist[s])), dist[s], marker=marker, color=colors(s % 10), label=f"stage {s}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=8)
    return _save_figure(fig, path)


def plot_coverage(curves: Sequence[Mapping], path: str | Path, maps: Mapping[str, torch.Tensor] | None = None
                  ) -> Path:
    """SW paper Fig. 4(b): utilisation vs number of edges, one line per (M, shuffled) pair.

    ``curves``: rows with keys ``M``, ``shuffle``, ``edges``, ``utilization``. ``maps``: optional use-count
    maps (nk, Hin, Win) to draw as in Fig. 4(a) (one panel per filter) next to the curves."""
    plt = _plt()
    extra = 0 if not maps else 1
    fig, axes = plt.subplots(1, 1 + extra, figsize=(6 + 6 * extra, 4.5), squeeze=False)
    ax = axes[0, 0]
    keys = sorted({(r["M"], bool(r["shuffle"])) for r in curves})
    colors = plt.get_cmap("tab10")
    ms = sorted({k[0] for k in keys})
    for M, sh in keys:
        pts = sorted((r["edges"], r["utilization"]) for r in curves if r["M"] == M and bool(r["shuffle"]) == sh)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if sh else "x",
                linestyle="-" if sh else "--", color=colors(ms.index(M) % 10),
                label=f"{'w/' if sh else 'w/o'}: M={M}")
    ax.set_xlabel("edges E (shift-add paths)")
    ax.set_ylabel("feature-map utilisation")
    ax.set_ylim(0, 1.02)
    ax.set_title("Feature utilisation rate")
    ax.legend(fontsize=8)
    if maps:
        name, m = next(iter(maps.items()))
        nk = m.shape[0]
        tiles = torch.cat([torch.nn.functional.pad(m[j].float(), (1, 1, 1, 1), value=-1) for j in range(nk)], 1)
        im = axes[0, 1].imshow(tiles.numpy(), cmap="viridis", vmin=0, interpolation="nearest", aspect="auto")
        axes[0, 1].set_title(f"use count per filter map ({name})", fontsize=9)
        fig.colorbar(im, ax=axes[0, 1], fraction=0.046, pad=0.04)
    return _save_figure(fig, path)
