"""Images for the analysis tools: a folder of images, or real sample photographs that ship with an
installed package (no download).

Sources of bundled samples, in order of preference:

* ``foolbox`` (if installed): its 20 ImageNet validation samples ``foolbox/data/imagenet_*.jpg``
  (224x224 each). The files are read directly; foolbox itself is never imported.
* ``scikit-image`` (``lkvision[analysis]`` depends on it): the photographs in ``skimage/data``
  (astronaut, chelsea, coffee, rocket, ...), again read as files without importing skimage.

Everything is read with PIL and converted with plain tensor ops (torchvision is not needed).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_SUFFIXES", "sample_image_paths", "folder_image_paths",
    "load_image", "image_batches",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")

# Real photographs among scikit-image's bundled files (colour first; grey ones are replicated to RGB).
_SKIMAGE_PHOTOS = (
    "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg", "ihc.png",
    "retina.jpg", "motorcycle_left.png", "camera.png", "coins.png", "moon.png", "grass.png", "gravel.png",
    "brick.png", "clock_motion.png", "page.png", "text.png", "cell.png", "microaneurysms.png",
)


def _package_dir(name: str) -> Path | None:
    """Directory of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def sample_image_paths(source: str = "auto") -> list[Path]:
    """Paths of bundled real sample images.

    ``source``: ``"foolbox"`` (20 ImageNet samples), ``"skimage"`` (scikit-image photographs) or
    ``"auto"`` (foolbox if installed, else skimage). Raises ``RuntimeError`` naming what to install when
    neither package is present.
    """
    if source not in ("auto", "foolbox", "skimage"):
        raise ValueError(f"unknown sample source {source!r}; use 'auto', 'foolbox' or 'skimage'")
    if source in ("auto", "foolbox"):
        d = _package_dir("foolbox")
        paths = sorted((d / "data").glob("imagenet_*.jpg")) if d is not None else []
        if paths:
            return paths
        if source == "foolbox":
            raise RuntimeError("foolbox is not installed (pip install --no-deps foolbox gives its 20 samples)")
    d = _package_dir("skimage")
    paths = [d / "data" / n for n in _SKIMAGE_PHOTOS if (d / "data" / n).is_file()] if d is not None else []
    if not paths:
        raise RuntimeError(
            "no bundled sample images: install scikit-image (pip install 'lkvision[analysis]') or foolbox, "
            "or pass a folder of images"
        )
    return paths


def folder_image_paths(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted: the official ERF script's ImageFolder order)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return paths


def load_image(
    path: str | Path,
    size: int | tuple[int, int],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Read one image as RGB, resize to ``size`` (bicubic, aspect ratio NOT kept, as the official ERF
    script does) and normalise: returns (3, H, W) float32."""
    from PIL import Image

    h, w = (size, size) if isinstance(size, int) else size
    with Image.open(path) as im:
        im = im.convert("RGB").resize((w, h), Image.BICUBIC)
        data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    x = data.view(h, w, 3).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(3, 1, 1)
    return (x - m) / s


def image_batches(
    paths: Sequence[str | Path],
    size: int | tuple[int, int],
    batch_size: int = 1,
    num_images: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Iterator[torch.Tensor]:
    """Yield (B, 3, H, W) batches, reading one batch at a time (memory-safe at 1024^2).

    ``num_images``: use the first N paths (cycling through them if fewer exist, so that a fixed N can be
    asked of a small bundled set).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    paths = list(paths)
    if not paths:
        raise ValueError("no image paths given")
    n = len(paths) if num_images is None else int(num_images)
    order = [paths[i % len(paths)] for i in range(n)]
    for i in range(0, n, batch_size):
        yield torch.stack([load_image(p, size, mean, std) for p in order[i:i + batch_size]])
