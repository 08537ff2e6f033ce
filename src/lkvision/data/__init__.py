"""lkvision.data: datasets (image folders, the bundled digits), resumable sampling, timm/torchvision transforms.

torchvision and timm are imported lazily, through :func:`ensure_torchvision` (see ``_compat.py``).
"""

from ._compat import ensure_torchvision
from .bundled import LICENSE_NOTE, BundledDigits
from .datasets import (
    IMG_EXTENSIONS,
    EpochSeededDataset,
    ImageFolderDataset,
    ResumableSampler,
    build_datasets,
    sample_seed,
)
from .transforms import IMAGENET_MEAN, IMAGENET_STD, build_mixup, build_train_loss, build_transform

__all__ = [
    "ensure_torchvision", "BundledDigits", "LICENSE_NOTE", "ImageFolderDataset", "EpochSeededDataset",
    "ResumableSampler", "build_datasets", "sample_seed", "IMG_EXTENSIONS", "build_transform", "build_mixup",
    "build_train_loss", "IMAGENET_MEAN", "IMAGENET_STD",
]
