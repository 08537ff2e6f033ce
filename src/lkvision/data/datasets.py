"""Datasets and the resumable sampler.

* :class:`ImageFolderDataset`: ImageNet-style ``root/<class>/<image>`` folders with clear errors for a
  missing folder or an empty class folder, and corrupt images skipped (warned once, counted), not a crash.
* :class:`EpochSeededDataset`: makes the random augmentation of sample ``i`` in epoch ``e`` a pure function
  of ``(seed, e, i)`` -- independent of worker count, batch order and where a run was resumed.
* :class:`ResumableSampler`: a seeded per-epoch permutation, sharded across ranks like
  ``DistributedSampler``, that can start in the middle of an epoch (mid-epoch resume).
* :func:`build_datasets`: the train/val pair for a config (an image folder, or the bundled digits).
"""

# ruff: noqa: NPY002 -- the legacy global numpy RNG is what timm (mixup, RandAugment) draws from,
# so it is seeded, saved and restored on purpose.
from __future__ import annotations

import math
import os
import random
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

__all__ = ["ImageFolderDataset", "EpochSeededDataset", "ResumableSampler", "build_datasets", "IMG_EXTENSIONS",
           "sample_seed"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _pil_loader(path: str):
    from PIL import Image

    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


class ImageFolderDataset(Dataset):
    """``root/<class_name>/**/<image>`` (classes = sorted sub-folder names, as torchvision's ImageFolder).

    ``class_to_idx``: reuse the train split's mapping for val (a val class unknown to train is an error;
    a train class absent from val is fine). ``allow_empty``: accept class folders without images.
    Corrupt/unreadable images are replaced by the next readable sample (so batches keep their size); each
    is warned about once and counted in :attr:`num_skipped` (per process). With ``return_status=True`` items
    are ``(image, target, ok)`` so a training loop can count skips made inside DataLoader workers.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None,
                 class_to_idx: dict[str, int] | None = None, allow_empty: bool = False,
                 return_status: bool = False, loader: Callable = _pil_loader) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"data folder not found: {root} (expected <root>/<class>/<images>)")
        classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not classes:
            raise FileNotFoundError(f"no class sub-folders in {root} (expected <root>/<class>/<images>)")
        if class_to_idx is None:
            class_to_idx = {c: i for i, c in enumerate(classes)}
        else:
            unknown = [c for c in classes if c not in class_to_idx]
            if unknown:
                raise ValueError(f"{root} has class folders unknown to the training set: {unknown[:10]}")
        samples: list[tuple[str, int]] = []
        empty = []
        for c in classes:
            files = sorted(
                str(p) for p in (root / c).rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file()
            )
            if not files:
                empty.append(str(root / c))
            samples += [(f, class_to_idx[c]) for f in files]
        if empty and not allow_empty:
            raise ValueError(
                f"empty class folder(s) with no images ({', '.join(IMG_EXTENSIONS)}): {empty[:10]}; remove them "
                "or pass allow_empty=True"
            )
        if not samples:
            raise ValueError(f"no images found under {root}")
        self.root = root
        self.classes = sorted(class_to_idx, key=class_to_idx.get)
        self.class_to_idx = dict(class_to_idx)
        self.samples = samples
        self.targets = [t for _, t in samples]
        self.transform = transform
        self.loader = loader
        self.return_status = return_status
        self.skipped: set[str] = set()

    def keep_every(self, n: int) -> None:
        """Keep ``n`` samples spread evenly over the (class-sorted) list: a quick, roughly balanced subset."""
        step = max(1, len(self.samples) // n)
        self.samples = self.samples[::step][:n]
        self.targets = [t for _, t in self.samples]

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int):
        path, target = self.samples[index]
        img = self.loader(path)
        if self.transform is not None:
            img = self.transform(img)
        return img, target

    def __getitem__(self, index: int):
        n = len(self.samples)
        for attempt in range(min(n, 64)):
            i = (index + attempt) % n
            try:
                img, target = self._load(i)
            except Exception as e:  # noqa: BLE001 - any unreadable image is skipped, never fatal
                path = self.samples[i][0]
                if path not in self.skipped:
                    self.skipped.add(path)
                    warnings.warn(f"skipping unreadable image {path}: {type(e).__name__}: {e}", stacklevel=2)
                continue
            if self.return_status:
                return img, target, attempt == 0
            return img, target
        raise RuntimeError(f"{min(n, 64)} consecutive unreadable images in {self.root} starting at index {index}")


_M64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    # splitmix64 finalizer: a cheap, well-distributed bijection of 64-bit integers
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _M64
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _M64
    return z ^ (z >> 31)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed that is a pure function of (seed, epoch, index)."""
    z = _mix64((seed & _M64) + 0x9E3779B97F4A7C15)
    z = _mix64((z + epoch) & _M64)
    z = _mix64((z + index) & _M64)
    return z >> 32


class EpochSeededDataset(Dataset):
    """Wraps a dataset so that the random augmentation of each item depends only on (seed, epoch, index).

    Indexed with ``(epoch, index)`` pairs (what :class:`ResumableSampler` yields) or plain ints (epoch 0).
    Before calling ``base[index]`` the global ``torch``/``numpy``/``random`` generators are seeded with
    :func:`sample_seed`; in the main process (``num_workers=0``) their previous states are restored
    afterwards so that training randomness (drop path, mixup) is untouched.
    """

    def __init__(self, base: Dataset, seed: int = 0) -> None:
        self.base = base
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getattr__(self, name: str):
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        s = sample_seed(self.seed, epoch, index)
        in_main = get_worker_info() is None
        if in_main:
            states = (torch.get_rng_state(), np.random.get_state(), random.getstate())
        torch.default_generator.manual_seed(s)  # CPU generator only (torch.manual_seed also visits devices)
        np.random.seed(s)
        random.seed(s)
        try:
            return self.base[index]
        finally:
            if in_main:
                torch.set_rng_state(states[0])
                np.random.set_state(states[1])
                random.setstate(states[2])


class ResumableSampler(Sampler):
    """Seeded per-epoch order, sharded over ``world_size`` ranks, resumable mid-epoch.

    Yields ``(epoch, index)`` pairs (for :class:`EpochSeededDataset`). The epoch order is
    ``randperm(n, seed + epoch)`` (or ``arange`` without shuffle), padded by wrapping to a multiple of
    ``world_size`` (or truncated with ``drop_last``); rank r takes positions r, r + world, ... -- so with
    batch b per rank, optimizer step k of a W-rank run sees exactly the samples that a 1-rank run with
    batch W*b sees at step k. ``set_epoch(e, start=i)`` skips the first ``i`` samples of this rank's share.
    ``pad=False`` (evaluation): no padding, each sample is visited exactly once over all ranks.
    """

    def __init__(self, n: int, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False, pad: bool = True) -> None:
        if n <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.n = n
        self.shuffle = shuffle
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.pad = pad
        self.epoch = 0
        self.start = 0
        if drop_last:
            self.per_rank = n // world_size
        elif pad:
            self.per_rank = math.ceil(n / world_size)
        else:  # evaluation: every sample exactly once over all ranks (shares differ by at most one)
            self.per_rank = len(range(rank, n, world_size))

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = int(epoch)
        self.start = int(start)

    def order(self) -> list[int]:
        """This rank's full index order for the current epoch."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
        else:
            perm = list(range(self.n))
        if not (self.drop_last or self.pad):
            return perm[self.rank::self.world_size]
        total = self.per_rank * self.world_size
        if total > len(perm):
            perm = (perm * math.ceil(total / len(perm)))[:total]
        perm = perm[:total]
        return perm[self.rank:total:self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i in self.order()[self.start:]:
            yield (self.epoch, i)

    def __len__(self) -> int:
        return max(self.per_rank - self.start, 0)


def build_datasets(cfg) -> tuple[Dataset, Dataset, dict]:
    """(train, val, info) for a :class:`~lkvision.train.config.TrainConfig`-like object.

    ``cfg.data == "bundled"``: :class:`~lkvision.data.bundled.BundledDigits`. Otherwise ``cfg.data`` is a
    folder with ``train/`` and ``val/`` sub-folders of class folders. ``info`` holds ``num_classes``,
    ``in_chans``, ``classes``, ``mean``, ``std``.
    """
    from .transforms import build_transform

    if cfg.data in ("bundled", "", None):
        from .bundled import BundledDigits

        kw = dict(canvas=cfg.input_size, distractors=cfg.bundled_distractors)
        train = BundledDigits("train", limit=cfg.train_subset, **kw)
        val = BundledDigits("val", limit=cfg.val_subset, **kw)
        info = dict(num_classes=10, in_chans=1, classes=train.classes, mean=train.mean, std=train.std)
    else:
        root = Path(cfg.data)
        if not root.is_dir():
            raise FileNotFoundError(f"data folder not found: {root}")
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise FileNotFoundError(f"{root} has no '{split}/' sub-folder (expected {root}/{split}/<class>/...)")
        train = ImageFolderDataset(root / "train", build_transform(cfg, True), return_status=True)
        val = ImageFolderDataset(root / "val", build_transform(cfg, False), class_to_idx=train.class_to_idx,
                                 allow_empty=True, return_status=True)
        if cfg.train_subset:
            train.keep_every(cfg.train_subset)
        if cfg.val_subset:
            val.keep_every(cfg.val_subset)
        info = dict(num_classes=len(train.classes), in_chans=3, classes=train.classes,
                    mean=tuple(cfg.mean), std=tuple(cfg.std))
    return EpochSeededDataset(train, cfg.seed), EpochSeededDataset(val, cfg.seed), info
