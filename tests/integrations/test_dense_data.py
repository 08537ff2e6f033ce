"""Dense labels for the bundled digits: determinism, label consistency, COCO / mmseg file layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lkvision.data.dense import (
    MASK_THRESHOLD,
    SEG_CLASSES,
    generate_dense_digits,
    mask_to_rle,
    rle_to_mask,
    write_dense_digits,
)

from ._helpers import require


def test_deterministic_and_splits_differ():
    a = generate_dense_digits("train", 20, seed=3)
    b = generate_dense_digits("train", 20, seed=3)
    v = generate_dense_digits("val", 20, seed=3)
    assert all((x.image == y.image).all() and (x.semantic == y.semantic).all() for x, y in zip(a, b))
    assert not all((x.image == y.image).all() for x, y in zip(a, v))
    c = generate_dense_digits("train", 20, seed=4)
    assert not all((x.image == y.image).all() for x, y in zip(a, c))


def test_labels_are_consistent():
    samples = generate_dense_digits("val", 60, canvas=96, max_digits=3, distractors=4)
    counts = [len(s.labels) for s in samples]
    assert min(counts) >= 1 and max(counts) == 3
    for s in samples:
        assert s.masks.shape == (len(s.labels), 96, 96) and s.boxes.shape == (len(s.labels), 4)
        union = np.zeros_like(s.semantic, bool)
        for m, box, lab in zip(s.masks, s.boxes, s.labels):
            assert not (union & m).any(), "instances overlap"
            union |= m
            ys, xs = np.nonzero(m)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]  # tight box
            assert (s.semantic[m] == lab + 1).all()  # semantic map agrees with the instance
            assert (s.image[m] >= MASK_THRESHOLD).all()  # the digit's own pixels
        assert (s.semantic[~union] == 0).all()
        # distractor strokes exist but are background
        assert (s.image[~union] > 0).any()


def test_rle_roundtrip_matches_pycocotools():
    mask_utils = require("pycocotools.mask")
    rng = np.random.default_rng(0)
    for first in (False, True):
        m = rng.random((37, 23)) > 0.6
        m[0, 0] = first
        rle = mask_to_rle(m)
        assert (rle_to_mask(rle) == m).all()
        compressed = mask_utils.frPyObjects(rle, *rle["size"])
        assert (mask_utils.decode(compressed).astype(bool) == m).all()
        assert int(mask_utils.area(compressed)) == int(m.sum())


def test_written_layout(tmp_path):
    from PIL import Image

    root = write_dense_digits(tmp_path / "dd", num_train=6, num_val=4, canvas=64, max_digits=2)
    coco = json.loads((root / "annotations" / "instances_val.json").read_text())
    assert [c["name"] for c in coco["categories"]] == list(SEG_CLASSES[1:])
    assert len(coco["images"]) == 4
    samples = generate_dense_digits("val", 4, canvas=64, max_digits=2)
    for img_info, s in zip(coco["images"], samples):
        img = np.asarray(Image.open(root / "img_dir" / "val" / img_info["file_name"]))
        lab = np.asarray(Image.open(root / "ann_dir" / "val" / img_info["file_name"]))
        assert (img == s.image).all() and (lab == s.semantic).all()
        anns = [a for a in coco["annotations"] if a["image_id"] == img_info["id"]]
        assert [a["category_id"] - 1 for a in anns] == s.labels.tolist()
        for a, m in zip(anns, s.masks):
            assert (rle_to_mask(a["segmentation"]) == m).all() and a["area"] == m.sum()
    # regenerating with fewer images removes the extra files; same parameters: nothing rewritten
    write_dense_digits(tmp_path / "dd", num_train=3, num_val=4, canvas=64, max_digits=2)
    assert len(list((root / "img_dir" / "train").glob("*.png"))) == 3
    stamp = (root / "meta.json").stat().st_mtime_ns
    write_dense_digits(tmp_path / "dd", num_train=3, num_val=4, canvas=64, max_digits=2)
    assert (root / "meta.json").stat().st_mtime_ns == stamp


def test_pngs_are_made_durable_once_before_the_marker(tmp_path, monkeypatch):
    from lkvision import fileio

    synced = []
    real = fileio._fsync_path
    monkeypatch.setattr(fileio, "_fsync_path", lambda p: (synced.append(Path(p)), real(p)))
    root = write_dense_digits(tmp_path / "dd", num_train=3, num_val=2)
    pngs = sorted(root.glob("*_dir/*/*.png"))
    assert len(pngs) == 10
    names = [p for p in synced if p.suffix == ".png"]
    assert sorted(names) == pngs  # each PNG once, under its final name (no per-file fsync of a temp file)
    marker = next(i for i, p in enumerate(synced) if p.name.startswith(".meta."))  # meta.json's temp file
    assert max(synced.index(p) for p in pngs) < marker
    for split in ("train", "val"):  # each split's COCO file after its own PNGs
        coco = next(i for i, p in enumerate(synced) if p.name.startswith(f".instances_{split}."))
        assert max(synced.index(p) for p in pngs if p.parent.name == split) < coco


def test_interrupted_rewrite_is_not_taken_as_complete(tmp_path, monkeypatch):
    """A run with other parameters that stops half-way leaves no meta.json that vouches for mixed files."""
    from PIL import Image

    from lkvision.data import dense

    root = write_dense_digits(tmp_path / "dd", num_train=3, num_val=2)
    real, calls = dense._png_bytes, []

    def failing(array):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real(array)

    monkeypatch.setattr(dense, "_png_bytes", failing)
    with pytest.raises(KeyboardInterrupt):
        write_dense_digits(root, num_train=3, num_val=2, seed=1)  # rewrites train/000000.png, then stops
    assert not (root / "meta.json").exists()
    monkeypatch.setattr(dense, "_png_bytes", real)
    write_dense_digits(root, num_train=3, num_val=2)  # the original parameters: regenerated, not skipped
    img = np.asarray(Image.open(root / "img_dir" / "train" / "000000.png"))
    assert (img == generate_dense_digits("train", 3)[0].image).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        generate_dense_digits("test", 3)
    with pytest.raises(ValueError, match="canvas"):
        generate_dense_digits("train", 3, canvas=20)
