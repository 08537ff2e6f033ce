"""Effective receptive field (RepLKNet §5.1 / Appendix B).

For every image, the contribution of each input pixel to the centre of the last feature map is the
gradient of the (summed) central outputs with respect to the input, negative parts removed, summed
over the RGB channels. The maps are aggregated over images:

* ``variant="paper"`` -- Appendix B, eq. (1)-(2): ``P = max(d(sum_c M[:, c, h'//2, w'//2]) / dI, 0)``,
  **summed** over images.
* ``variant="code"`` (default; what produced Table 10) -- the official ``visualize_erf.py``: the central
  outputs go through a ReLU before the sum (``sum_c relu(M[:, c, h'//2, w'//2])``) and the per-image
  maps are **averaged** over images.

:func:`compute_erf` returns the aggregated map *before* the log scaling;
:func:`log_normalize` applies the paper's ``log10(A + 1) / max``; :func:`area_ratio` is the
high-contribution area ratio r of Table 10 for one threshold.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

__all__ = [
    "ERF_VARIANTS", "DEFAULT_THRESHOLDS", "feature_extractor", "compute_erf", "log_normalize", "area_ratio",
    "area_ratios", "format_ratio",
]

ERF_VARIANTS = ("code", "paper")
DEFAULT_THRESHOLDS = (0.2, 0.3, 0.5, 0.99)


def feature_extractor(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function mapping images to the last feature map: ``forward_features`` for lkvision/timm
    models, else the module itself (which must return a (B, C, h, w) tensor)."""
    fn = getattr(model, "forward_features", None)
    return fn if callable(fn) else model


def _last_map(out) -> torch.Tensor:
    if isinstance(out, (list, tuple)):  # features_only models return a list of maps: take the last
        out = out[-1]
    if not isinstance(out, torch.Tensor) or out.ndim != 4:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"compute_erf needs a model returning a 4-D feature map (B, C, h, w), got {shape}; pass a "
            "module returning the last feature map or a model with forward_features"
        )
    return out


def compute_erf(
    model: nn.Module,
    images: Iterable[torch.Tensor],
    variant: str = "code",
    device: torch.device | str | None = None,
    skip_nonfinite: bool = True,
) -> torch.Tensor:
    """Aggregated contribution map of the centre of the last feature map.

    ``model``: any module returning a (B, C, h, w) feature map, or a model with ``forward_features``
    (used instead of ``forward``). It is run in ``eval()`` mode (restored afterwards) with its parameters'
    ``requires_grad`` temporarily off (no weight gradients, less saved activation memory).
    ``images``: an iterable of (B, 3, H, W) batches (all of the same H, W). Batches are processed one at a
    time and no graph is kept between them. ``variant``: ``"code"`` (official script: ReLU on the central
    outputs, mean over images) or ``"paper"`` (eq. 1-2: no ReLU on outputs, sum over images).
    Images whose gradient is not finite are skipped (as the official script does) when ``skip_nonfinite``.

    Returns the (H, W) float64 map on CPU, before any log scaling.
    """
    if variant not in ERF_VARIANTS:
        raise ValueError(f"unknown ERF variant {variant!r}; choose one of {ERF_VARIANTS}")
    fn = feature_extractor(model)
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    total: torch.Tensor | None = None
    count = 0
    model.eval()
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for batch in images:
            if not isinstance(batch, torch.Tensor) or batch.ndim != 4:
                raise ValueError("images must be an iterable of (B, 3, H, W) tensors")
            x = batch.to(device=device, dtype=torch.float32).detach().requires_grad_(True)
            with torch.enable_grad():
                fmap = _last_map(fn(x))
                h, w = fmap.shape[-2:]
                centre = fmap[:, :, h // 2, w // 2]
                if variant == "code":
                    centre = torch.relu(centre)
                (grad,) = torch.autograd.grad(centre.sum(), x)
            del fmap, centre
            per_image = torch.relu(grad.detach()).sum(dim=1).double().cpu()  # (B, H, W)
            del grad, x
            if skip_nonfinite:
                ok = torch.isfinite(per_image).flatten(1).all(dim=1)
                per_image = per_image[ok]
            if total is None:
                total = torch.zeros(per_image.shape[-2:], dtype=torch.float64)
            elif per_image.shape[-2:] != total.shape:
                raise ValueError(f"all images must have one size: got {tuple(per_image.shape[-2:])} "
                                 f"after {tuple(total.shape)}")
            total += per_image.sum(dim=0)
            count += per_image.shape[0]
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    if total is None:
        raise ValueError("no images given")
    if count == 0:
        raise ValueError("every image gave a non-finite gradient; nothing to aggregate")
    return total / count if variant == "code" else total


def log_normalize(erf: torch.Tensor) -> torch.Tensor:
    """The paper's heat-map scale: ``A = log10(erf + 1); A / A.max()`` (an all-zero map stays zero)."""
    a = torch.log10(erf.double().clamp_min(0) + 1)
    m = a.max()
    return a / m if m > 0 else a


def area_ratio(A: torch.Tensor, t: float) -> float:
    """High-contribution area ratio r (RepLKNet Table 10) of a non-negative (H, W) map for threshold t.

    Centred squares of side 2i+1 (centre (H//2, W//2)) grow from i = 1; r is the area of the first square
    whose share of ``A.sum()`` exceeds ``t``, divided by H*W. Squares are clipped to the map, so the search
    always ends at the whole map (r = 1.0). If even the whole map does not exceed t (t >= 1, or an
    all-zero map), returns ``math.inf``, shown as ">100%" by :func:`format_ratio`.

    The paper thresholds the log-normalised map: ``area_ratio(log_normalize(compute_erf(...)), t)``.
    """
    if A.ndim != 2:
        raise ValueError(f"area_ratio expects an (H, W) map, got shape {tuple(A.shape)}")
    if not 0.0 <= t:
        raise ValueError(f"threshold t must be >= 0, got {t}")
    A = A.double()
    H, W = A.shape
    total = float(A.sum())
    if not math.isfinite(total):
        raise ValueError("area_ratio: the map contains non-finite values")
    if total <= 0:
        return math.inf
    # cumulative sums give every square's mass in O(1)
    S = torch.zeros(H + 1, W + 1, dtype=torch.float64)
    S[1:, 1:] = A.cumsum(0).cumsum(1)
    cy, cx = H // 2, W // 2
    for i in range(1, max(H, W)):
        y0, y1 = max(cy - i, 0), min(cy + i + 1, H)
        x0, x1 = max(cx - i, 0), min(cx + i + 1, W)
        mass = float(S[y1, x1] - S[y0, x1] - S[y1, x0] + S[y0, x0])
        if mass / total > t:
            return (y1 - y0) * (x1 - x0) / (H * W)
        if y0 == 0 and x0 == 0 and y1 == H and x1 == W:
            break
    return math.inf


def area_ratios(A: torch.Tensor, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> dict[float, float]:
    """``{t: area_ratio(A, t)}`` for several thresholds."""
    return {float(t): area_ratio(A, t) for t in thresholds}


def format_ratio(r: float) -> str:
    """r as a percentage with one decimal; ">100%" when no square reached the threshold."""
    return ">100%" if not math.isfinite(r) else f"{100 * r:.1f}%"
