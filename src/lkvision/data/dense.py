"""Dense labels for the bundled digits: boxes, instance masks and semantic maps, generated deterministically.

The bundled MNIST subset (see :mod:`lkvision.data.bundled`, no download) is laid out as a small detection /
segmentation task. Each ``canvas`` x ``canvas`` (default 64) grey image holds 1..``max_digits`` (default 2) whole
digits at random, non-overlapping positions plus ``distractors`` (default 3) 10x10 fragments cut from other
digits of the same split. Labels:

* **instance masks**: the digit's own pixels (value >= ``MASK_THRESHOLD``) -- holes and all;
* **boxes**: the tight box of each mask, COCO ``[x, y, w, h]``;
* **semantic map**: 0 = background (fragments included), ``d + 1`` for a pixel of digit ``d``.

Fragments are real strokes but belong to no object, so a pixel's class is decided by the whole 28-pixel digit
around it, not by the stroke under it: context over ~7 feature pixels at stride 4 is what the task rewards.

Files (:func:`write_dense_digits`), one root serving both frameworks::

    root/img_dir/{train,val}/000000.png        grey images (mmseg ``img_path`` and COCO ``file_name``)
    root/ann_dir/{train,val}/000000.png        semantic maps, uint8 0..10 (mmseg ``seg_map_path``)
    root/annotations/instances_{train,val}.json COCO instances (uncompressed RLE masks, categories "0".."9")
    root/meta.json                             generation parameters (regenerated when they change)

Digits come from the bundled split (4,000 train / 1,000 val MNIST images); val images use val digits only.
Everything is a pure function of ``(split, num_images, canvas, max_digits, distractors, seed)``.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..fileio import atomic_write_bytes, atomic_write_json, make_durable
from .bundled import LICENSE_NOTE, _split, load_mnist_subset

__all__ = ["DenseSample", "DIGIT_CLASSES", "SEG_CLASSES", "MASK_THRESHOLD", "generate_dense_digits",
           "write_dense_digits", "mask_to_rle", "rle_to_mask", "DENSE_DEFAULTS"]

DIGIT_CLASSES = tuple(str(d) for d in range(10))
SEG_CLASSES = ("background", *DIGIT_CLASSES)
MASK_THRESHOLD = 64  # uint8 intensity from which a digit pixel belongs to its mask
_DIGIT = 28
_FRAG = 10
DENSE_DEFAULTS = dict(canvas=64, max_digits=2, distractors=3, seed=0)
_FORMAT_VERSION = 1


@dataclass
class DenseSample:
    """One image with its labels. ``image``/``semantic``: (H, W) uint8; ``masks``: (N, H, W) bool;
    ``boxes``: (N, 4) float32 xyxy (pixel edges, exclusive right/bottom); ``labels``: (N,) int64 digits."""

    image: np.ndarray
    semantic: np.ndarray
    masks: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    meta: dict = field(default_factory=dict)


def _place_digits(rng: np.random.Generator, n: int, canvas: int) -> list[tuple[int, int]]:
    """Top-left corners of ``n`` non-overlapping 28x28 boxes (fewer if the canvas is too full)."""
    span = canvas - _DIGIT + 1
    placed: list[tuple[int, int]] = []
    for _ in range(50 * n):
        if len(placed) == n:
            break
        y, x = (int(v) for v in rng.integers(0, span, 2))
        if all(abs(y - py) >= _DIGIT or abs(x - px) >= _DIGIT for py, px in placed):
            placed.append((y, x))
    return placed


def _render(rng: np.random.Generator, pool: np.ndarray, labels: np.ndarray, canvas: int, max_digits: int,
            distractors: int) -> DenseSample:
    n = int(rng.integers(1, max_digits + 1))
    positions = _place_digits(rng, n, canvas)
    sources = rng.integers(0, len(pool), len(positions))
    img = np.zeros((canvas, canvas), np.uint8)
    occupied = np.zeros((canvas, canvas), bool)
    for y, x in positions:
        occupied[y:y + _DIGIT, x:x + _DIGIT] = True
    # distractor fragments first, only where no digit box lies (so that masks stay the digits' own pixels)
    for _ in range(distractors):
        src = int(rng.integers(0, len(pool)))
        fy, fx = (int(v) for v in rng.integers(4, _DIGIT - _FRAG - 4 + 1, 2))
        for _try in range(20):
            py, px = (int(v) for v in rng.integers(0, canvas - _FRAG + 1, 2))
            if not occupied[py:py + _FRAG, px:px + _FRAG].any():
                region = img[py:py + _FRAG, px:px + _FRAG]
                np.maximum(region, pool[src, fy:fy + _FRAG, fx:fx + _FRAG], out=region)
                break
    semantic = np.zeros((canvas, canvas), np.uint8)
    masks, boxes, classes = [], [], []
    for (y, x), src in zip(positions, sources):
        digit = pool[int(src)]
        img[y:y + _DIGIT, x:x + _DIGIT] = digit
        m = np.zeros((canvas, canvas), bool)
        m[y:y + _DIGIT, x:x + _DIGIT] = digit >= MASK_THRESHOLD
        ys, xs = np.nonzero(m)
        if len(ys) == 0:  # an empty digit cannot be an object
            continue
        masks.append(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        classes.append(int(labels[int(src)]))
        semantic[m] = classes[-1] + 1
    return DenseSample(
        image=img, semantic=semantic,
        masks=np.stack(masks) if masks else np.zeros((0, canvas, canvas), bool),
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4), labels=np.asarray(classes, np.int64),
    )


def generate_dense_digits(split: str = "train", num_images: int = 800, canvas: int = 64, max_digits: int = 2,
                          distractors: int = 3, seed: int = 0) -> list[DenseSample]:
    """Deterministic list of :class:`DenseSample` for ``split`` ("train" or "val").

    ``seed`` fixes the layouts (train and val use different streams of it); digits come from the bundled
    split, so val images never show a training digit.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if canvas < _DIGIT:
        raise ValueError(f"canvas must be >= {_DIGIT} (the digit size), got {canvas}")
    if max_digits < 1 or num_images < 1 or distractors < 0:
        raise ValueError(f"need max_digits >= 1, num_images >= 1, distractors >= 0; got {max_digits}, "
                         f"{num_images}, {distractors}")
    images, labels = load_mnist_subset()
    train_idx, val_idx = _split(labels, 100, 0)
    idx = train_idx if split == "train" else val_idx
    pool, pool_labels = images[idx], labels[idx]
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    return [_render(rng, pool, pool_labels, canvas, max_digits, distractors) for _ in range(num_images)]


def mask_to_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE of a (H, W) bool mask: run lengths in column-major order, starting with zeros."""
    flat = np.asarray(mask, bool).flatten(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"counts": counts, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def rle_to_mask(rle: dict) -> np.ndarray:
    """Inverse of :func:`mask_to_rle`."""
    h, w = rle["size"]
    values = np.zeros(len(rle["counts"]), bool)
    values[1::2] = True
    return np.repeat(values, rle["counts"]).reshape(w, h).T


def _png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _coco_dict(samples: list[DenseSample], split: str) -> dict:
    images, annotations = [], []
    for i, s in enumerate(samples):
        h, w = s.image.shape
        images.append(dict(id=i, file_name=f"{i:06d}.png", height=h, width=w))
        for m, b, c in zip(s.masks, s.boxes, s.labels):
            x0, y0, x1, y1 = (float(v) for v in b)
            annotations.append(dict(
                id=len(annotations) + 1, image_id=i, category_id=int(c) + 1, iscrowd=0,
                bbox=[x0, y0, x1 - x0, y1 - y0], area=float(m.sum()), segmentation=mask_to_rle(m),
            ))
    return dict(
        info=dict(description=f"lkvision dense digits ({split}); {LICENSE_NOTE}", version=str(_FORMAT_VERSION)),
        images=images, annotations=annotations,
        categories=[dict(id=d + 1, name=name, supercategory="digit") for d, name in enumerate(DIGIT_CLASSES)],
    )


def write_dense_digits(root: str | os.PathLike, num_train: int = 800, num_val: int = 200, canvas: int = 64,
                       max_digits: int = 2, distractors: int = 3, seed: int = 0) -> Path:
    """Write the dataset under ``root`` (layout in the module docstring); returns ``Path(root)``.

    Skips the work when ``root/meta.json`` records the same parameters (the files are a pure function of them).
    ``meta.json`` is the completion marker: a stale one is removed before any file is rewritten, and the new one
    is written last. Each file is replaced atomically (a killed run never leaves a half-written PNG under its
    final name), but the PNGs are not ``fsync``-ed one by one (two ``fsync`` calls per small file dominated the
    run time): each split's PNGs and their folders are made durable in one pass (:func:`lkvision.fileio.make_durable`)
    before its COCO file and ``meta.json`` are written. So after a crash or a power cut, a ``meta.json`` that
    matches always vouches for complete files; without it everything is regenerated (the folder is a pure
    function of the parameters).
    """
    root = Path(root)
    meta = dict(format=_FORMAT_VERSION, num_train=num_train, num_val=num_val, canvas=canvas,
                max_digits=max_digits, distractors=distractors, seed=seed, classes=list(SEG_CLASSES),
                license=LICENSE_NOTE)
    meta_path = root / "meta.json"
    if meta_path.is_file():
        try:
            if json.loads(meta_path.read_text()) == meta:
                return root
        except (OSError, ValueError):
            pass
        meta_path.unlink()  # it describes other files: an interrupted rewrite must not be taken as complete
        make_durable([meta_path])
    for split, n in (("train", num_train), ("val", num_val)):
        samples = generate_dense_digits(split, n, canvas, max_digits, distractors, seed)
        for sub in ("img_dir", "ann_dir"):  # images of an earlier, larger generation would join the split
            folder = root / sub / split
            if folder.is_dir():
                for old in folder.glob("[0-9][0-9][0-9][0-9][0-9][0-9].png"):
                    if int(old.stem) >= n:
                        old.unlink()
        written = []
        for i, s in enumerate(samples):
            for sub, array in (("img_dir", s.image), ("ann_dir", s.semantic)):
                written.append(atomic_write_bytes(root / sub / split / f"{i:06d}.png", _png_bytes(array), fsync=False))
        make_durable(written)  # one pass instead of two fsync calls per PNG; before the files that vouch for them
        atomic_write_json(root / "annotations" / f"instances_{split}.json", _coco_dict(samples, split), indent=None)
    atomic_write_json(meta_path, meta)  # last: its presence means the files are complete
    return root
