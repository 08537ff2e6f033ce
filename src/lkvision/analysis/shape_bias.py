"""Shape bias with cue-conflict images (Geirhos et al., ICLR 2019; RepLKNet §5.2, Fig. 5).

A cue-conflict image has the *shape* of one class and the *texture* of another. A classifier's decision on
it counts as a **shape decision** when it names the shape class, a **texture decision** when it names the
texture class, and is ignored otherwise. Images whose shape and texture class are the same carry no
conflict and are excluded. Then::

    shape bias = shape decisions / (shape decisions + texture decisions)

per shape category (the scatter points of Fig. 5) and pooled over all conflict images (the vertical line of
the model-vs-human toolbox's figure; :attr:`ShapeBiasResult.category_mean` is the plain mean of the
per-category values, what the RepLKNet caption calls "the averages across categories"; the two differ when
categories have different numbers of counted decisions).

Decisions come from a :class:`CategoryMapping`: the model's softmax probabilities are averaged over the
member classes of each category and the category with the highest mean wins (the toolbox's
16-class decision rule; :func:`imagenet16_mapping` holds the published ImageNet-1k -> 16 mapping,
:func:`digit_mapping` the ten digits of the bundled cue-conflict set).

Folder layout (the toolbox's ``cue-conflict`` data set): ``<root>/<shape>/<shape><i>-<texture><j>.png``,
optionally with a prefix ending in ``_`` before the shape name (the human-experiment files). No such images
ship with lkvision: download ``cue-conflict.tar.gz`` from :data:`CUE_CONFLICT_URL` (1,280 images, 16
categories), or use the offline digit version (:mod:`lkvision.data.cue_conflict`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .imagenet16 import IMAGENET16_CATEGORIES, IMAGENET16_INDICES
from .images import IMAGE_SUFFIXES, IMAGENET_MEAN, IMAGENET_STD, load_image

__all__ = [
    "CUE_CONFLICT_URL", "CueConflictImage", "CategoryMapping", "ShapeBiasResult", "imagenet16_mapping",
    "digit_mapping", "parse_cue_conflict_name", "read_cue_conflict_folder", "shape_bias", "batch_decisions",
    "model_decisions", "plot_shape_bias",
]

#: Where the 16-category cue-conflict images are published (model-vs-human release v0.1).
CUE_CONFLICT_URL = "https://github.com/bethgelab/model-vs-human/releases/download/v0.1/cue-conflict.tar.gz"

_NO_DATA_HINT = (f"no cue-conflict images ship with lkvision: download and unpack {CUE_CONFLICT_URL} "
                 "(model-vs-human, 16 ImageNet categories) and pass the unpacked folder, or run "
                 "`lkvision shape-bias --bundled-digits` for the offline digit version")

# '<shape><i>-<texture><j>' with class names made of letters only (digits mark the exemplar numbers).
_NAME = re.compile(r"([^\W\d_]+)(\d+)-([^\W\d_]+)(\d+)")


@dataclass(frozen=True)
class CueConflictImage:
    """One image: its path, its shape class (the folder) and its texture class (from the file name)."""

    path: Path
    shape: str
    texture: str

    @property
    def is_conflict(self) -> bool:
        return self.shape != self.texture


@dataclass(frozen=True)
class CategoryMapping:
    """How a model's logits become a category decision.

    ``categories[k]`` owns the model outputs ``indices[k]``; a decision is the category whose member
    classes have the highest **mean** softmax probability. ``num_outputs``: the number of logits the model
    must produce.
    """

    name: str
    categories: tuple[str, ...]
    indices: tuple[tuple[int, ...], ...]
    num_outputs: int

    def __post_init__(self) -> None:
        if len(self.categories) != len(self.indices) or len(set(self.categories)) != len(self.categories):
            raise ValueError("a CategoryMapping needs one index tuple per category and unique category names")
        flat = [i for idx in self.indices for i in idx]
        if any(not idx for idx in self.indices) or len(flat) != len(set(flat)):
            raise ValueError("every category needs at least one output index and no index may serve two")
        if min(flat) < 0 or max(flat) >= self.num_outputs:
            raise ValueError(f"output indices must lie in [0, {self.num_outputs})")

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, num_outputs) logits -> (N, categories) mean member probabilities."""
        if logits.ndim != 2 or logits.shape[1] != self.num_outputs:
            raise ValueError(
                f"the {self.name} mapping needs (N, {self.num_outputs}) logits, the model gives "
                f"{tuple(logits.shape)}: use a {self.num_outputs}-class classifier (e.g. --model-kwargs "
                f"'{{\"num_classes\": {self.num_outputs}}}' with matching weights) or another --categories")
        probs = logits.float().softmax(dim=1)
        return torch.stack([probs[:, list(idx)].mean(dim=1) for idx in self.indices], dim=1)

    def decide(self, logits: torch.Tensor) -> list[str]:
        """(N, num_outputs) logits -> N category names."""
        return [self.categories[k] for k in self.scores(logits).argmax(dim=1).tolist()]


def imagenet16_mapping() -> CategoryMapping:
    """ImageNet-1k logits -> the 16 categories of the cue-conflict set (the model-vs-human mapping)."""
    return CategoryMapping("imagenet16", IMAGENET16_CATEGORIES,
                           tuple(IMAGENET16_INDICES[c] for c in IMAGENET16_CATEGORIES), 1000)


def digit_mapping() -> CategoryMapping:
    """10-class digit logits -> the digit names of :data:`lkvision.data.cue_conflict.DIGIT_NAMES`."""
    from ..data.cue_conflict import DIGIT_NAMES

    return CategoryMapping("digits", DIGIT_NAMES, tuple((i,) for i in range(10)), 10)


def parse_cue_conflict_name(filename: str | Path) -> tuple[str, str]:
    """``'[prefix_]<shape><i>-<texture><j>.<ext>'`` -> (shape, texture); a clear ``ValueError`` otherwise."""
    name = Path(filename).name
    stem = name.rsplit(".", 1)[0] if "." in name else name
    m = _NAME.fullmatch(stem.rsplit("_", 1)[-1])
    if m is None:
        raise ValueError(f"cue-conflict image name {name!r} is not '<shape><i>-<texture><j>.png' "
                         "(e.g. 'cat3-dog7.png'; class names in letters, exemplar numbers in digits)")
    return m.group(1), m.group(3)


def read_cue_conflict_folder(root: str | Path, categories: Sequence[str] | None = None) -> list[CueConflictImage]:
    """All images of a cue-conflict folder ``<root>/<shape>/<shape><i>-<texture><j>.png``, sorted.

    The shape class is the folder name and must match the file name; with ``categories``, every shape and
    texture class must be one of them. Hidden files and files that are not images are ignored. Raises
    ``FileNotFoundError`` (missing folder, no images) or ``ValueError`` (a bad name or class) naming the file.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"cue-conflict folder not found: {root} ({_NO_DATA_HINT})")
    known = set(categories) if categories is not None else None
    stray = sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if stray:
        raise ValueError(f"{root} holds images directly ({stray[0]}, ...): expected one sub-folder per shape "
                         f"class, <root>/<shape>/<shape><i>-<texture><j>.png")
    images = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if known is not None and folder.name not in known:
            raise ValueError(f"{folder} is not one of the categories ({', '.join(sorted(known))})")
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            shape, texture = parse_cue_conflict_name(path.name)
            if shape != folder.name:
                raise ValueError(f"{path}: the file name gives shape {shape!r} but the image is in folder "
                                 f"{folder.name!r} (layout <root>/<shape>/<shape><i>-<texture><j>.png)")
            if known is not None and texture not in known:
                raise ValueError(f"{path}: texture class {texture!r} is not one of the categories "
                                 f"({', '.join(sorted(known))})")
            images.append(CueConflictImage(path, shape, texture))
    if not images:
        raise FileNotFoundError(f"no cue-conflict images under {root} ({_NO_DATA_HINT})")
    return images


@dataclass
class ShapeBiasResult:
    """Shape bias of one model. ``per_category``: one row per shape category (``shape_bias`` is NaN where no
    decision named the shape or the texture); the scalars pool every conflict image."""

    per_category: list[dict] = field(default_factory=list)
    shape_decisions: int = 0
    texture_decisions: int = 0
    other_decisions: int = 0
    conflict_images: int = 0
    excluded_same_class: int = 0

    @property
    def shape_bias(self) -> float:
        """Pooled over all conflict images (the toolbox's vertical line); NaN without counted decisions."""
        n = self.shape_decisions + self.texture_decisions
        return self.shape_decisions / n if n else math.nan

    @property
    def category_mean(self) -> float:
        """Mean of the per-category shape biases (categories without counted decisions left out)."""
        vals = [r["shape_bias"] for r in self.per_category if not math.isnan(r["shape_bias"])]
        return sum(vals) / len(vals) if vals else math.nan

    def as_dict(self) -> dict:
        return {"shape_bias": self.shape_bias, "category_mean": self.category_mean,
                "shape_decisions": self.shape_decisions, "texture_decisions": self.texture_decisions,
                "other_decisions": self.other_decisions, "conflict_images": self.conflict_images,
                "excluded_same_class": self.excluded_same_class, "per_category": self.per_category}


def shape_bias(trials: Iterable[tuple[str, str, str]], categories: Sequence[str] | None = None) -> ShapeBiasResult:
    """Shape bias from ``(shape class, texture class, decision)`` triples.

    ``categories``: the rows of ``per_category`` (default: every shape class met, sorted); a category with
    no conflict image gets a row with zero counts and NaN. Same-class triples are counted in
    ``excluded_same_class`` and nothing else.
    """
    rows: dict[str, dict] = {}
    res = ShapeBiasResult()

    def row(cat: str) -> dict:
        return rows.setdefault(cat, {"category": cat, "images": 0, "shape": 0, "texture": 0, "other": 0})

    for cat in categories or ():
        row(cat)
    for shape, texture, decision in trials:
        if shape == texture:
            res.excluded_same_class += 1
            continue
        r = row(shape)
        r["images"] += 1
        res.conflict_images += 1
        key = "shape" if decision == shape else "texture" if decision == texture else "other"
        r[key] += 1
    if categories:
        extra = sorted(set(rows) - set(categories))
        if extra:
            raise ValueError(f"shape classes {extra} are not among the categories {list(categories)}")
    order = list(categories) if categories else sorted(rows)
    for cat in order:
        r = rows[cat]
        n = r["shape"] + r["texture"]
        r["shape_bias"] = r["shape"] / n if n else math.nan
        res.per_category.append(r)
        res.shape_decisions += r["shape"]
        res.texture_decisions += r["texture"]
        res.other_decisions += r["other"]
    return res


@torch.no_grad()
def batch_decisions(model: nn.Module, batches: Iterable[torch.Tensor], mapping: CategoryMapping,
                    device: str | torch.device = "cpu") -> list[str]:
    """The model's category decision on every image of ``batches`` ((B, C, H, W) model inputs), in eval
    mode without gradients."""
    model.eval().to(device)
    decisions: list[str] = []
    for x in batches:
        decisions += mapping.decide(model(x.to(device)).cpu())
    return decisions


def model_decisions(
    model: nn.Module,
    images: Sequence[CueConflictImage],
    mapping: CategoryMapping,
    resolution: int = 224,
    in_chans: int = 3,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> list[str]:
    """The model's category decision on every image file.

    Images are read as RGB, resized to ``resolution`` (bicubic; the toolbox's images are 224x224 and used as
    they are) and normalised with ``mean``/``std``; ``in_chans=1`` keeps the first channel (grey images).
    """
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 (grey) or 3 (RGB), got {in_chans}")
    mean3 = tuple(mean) * 3 if len(mean) == 1 else tuple(mean)
    std3 = tuple(std) * 3 if len(std) == 1 else tuple(std)
    batches = (torch.stack([load_image(im.path, resolution, mean3, std3) for im in images[i:i + batch_size]])
               [:, :in_chans] for i in range(0, len(images), batch_size))
    return batch_decisions(model, batches, mapping, device)


def plot_shape_bias(results: Mapping[str, ShapeBiasResult], categories: Sequence[str], path: str | Path,
                    title: str | None = None) -> Path:
    """Fig.-5-style figure: one row per category, per model a marker at each category's shape bias and a
    vertical line at the pooled shape bias (x: fraction of 'shape' decisions, 0..1)."""
    from .plotting import _plt, _save_figure

    plt = _plt()
    ncol = 2 if max((len(lab) for lab in results), default=0) <= 30 else 1
    legend_rows = -(-len(results) // ncol)
    fig, ax = plt.subplots(figsize=(6.4, 0.32 * len(categories) + 1.6 + 0.2 * legend_rows))
    ys = {c: i for i, c in enumerate(categories)}
    markers = "osD^v<>ph*"
    for k, (label, res) in enumerate(results.items()):
        color = f"C{k % 10}"
        pts = [(r["shape_bias"], ys[r["category"]]) for r in res.per_category
               if r["category"] in ys and not math.isnan(r["shape_bias"])]
        xs, ys_ = (list(v) for v in zip(*pts)) if pts else ([], [])
        ax.scatter(xs, ys_, color=color, marker=markers[k % len(markers)], s=36, alpha=0.85, zorder=3,
                   label=f"{label} ({res.shape_bias:.2f})")
        if not math.isnan(res.shape_bias):
            ax.axvline(res.shape_bias, color=color, lw=1.5)
    ax.set_yticks(range(len(categories)), list(categories))
    ax.set_ylim(-0.5, len(categories) - 0.5)
    ax.invert_yaxis()
    ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel("fraction of 'shape' decisions (shape bias); line = pooled mean")
    ax.grid(axis="y", ls=":", alpha=0.4)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.5 / max(len(categories), 1)),
              ncol=ncol, frameon=False)
    return _save_figure(fig, path, title)
