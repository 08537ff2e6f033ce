"""Training-curve figure (matplotlib Agg canvas, no pyplot state; imported only when plotting)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..fileio import atomic_path

__all__ = ["plot_curves"]


def plot_curves(steps: list[list[float]], epochs: list[dict[str, Any]], path: str | Path) -> Path:
    """Write a 3-panel PNG: train loss per step (raw + moving average), lr per step, val top-1/top-5 per
    epoch. ``steps``: rows ``[step, loss, lr]``; ``epochs``: metrics rows (``step``, ``val_top1``, ...)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(13, 3.6))
    FigureCanvasAgg(fig)  # render with Agg without touching the global pyplot backend
    axes = fig.subplots(1, 3)
    if steps:
        s = [r[0] for r in steps]
        loss = [r[1] for r in steps]
        k = max(1, len(loss) // 25)
        smooth = [sum(loss[max(0, i - k + 1):i + 1]) / len(loss[max(0, i - k + 1):i + 1]) for i in range(len(loss))]
        axes[0].plot(s, loss, color="0.75", lw=0.8, label="per step")
        axes[0].plot(s, smooth, color="C0", lw=1.5, label=f"moving avg ({k})")
        axes[1].plot(s, [r[2] for r in steps], color="C1")
    ev = [r for r in epochs if "val_top1" in r]
    if ev:
        axes[2].plot([r["step"] for r in ev], [r["val_top1"] for r in ev], "o-", label="val top-1")
        axes[2].plot([r["step"] for r in ev], [r["val_top5"] for r in ev], "s--", label="val top-5")
        if any("ema_top1" in r for r in ev):
            axes[2].plot([r["step"] for r in ev if "ema_top1" in r], [r["ema_top1"] for r in ev if "ema_top1" in r],
                         "^:", label="EMA top-1")
        axes[2].legend(loc="lower right")
    axes[0].set(title="train loss", xlabel="optimizer step")
    axes[0].legend(loc="upper right")
    axes[1].set(title="learning rate", xlabel="optimizer step")
    axes[2].set(title="validation accuracy (%)", xlabel="optimizer step")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    return path
