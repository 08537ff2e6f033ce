"""Data: bundled digits, image folders (bad inputs), sampler sharding/resume, seeded augmentation, transforms."""

# ruff: noqa: NPY002 -- the legacy global numpy RNG is what timm (mixup, RandAugment) draws from,
# so it is seeded, saved and restored on purpose.
from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch

from lkvision.data import (
    BundledDigits,
    EpochSeededDataset,
    ImageFolderDataset,
    ResumableSampler,
    build_mixup,
    build_transform,
    ensure_torchvision,
)
from lkvision.data._compat import _SCHEMAS, defined_schemas
from lkvision.train.config import make_config


@pytest.fixture(scope="module")
def bundled():
    return BundledDigits("train"), BundledDigits("val")


def test_bundled_split_is_fixed_balanced_and_disjoint(bundled):
    train, val = bundled
    assert len(train) == 4000 and len(val) == 1000
    assert np.bincount(train.targets).tolist() == [400] * 10
    assert np.bincount(val.targets).tolist() == [100] * 10
    # disjoint digits: no val digit image equals a train digit image
    tr = {bytes(d.numpy()) for d in train.digits}
    assert not any(bytes(d.numpy()) in tr for d in val.digits)
    x, y = val[3]
    assert x.shape == (1, 64, 64) and x.dtype == torch.float32 and 0 <= y < 10
    # val placements are fixed; the digit is really on the canvas
    assert torch.equal(val[3][0], BundledDigits("val")[3][0])
    raw = val.render(3, val._fixed[3])
    assert raw.sum() >= val.digits[3].sum() * 0.99


def test_bundled_subset_is_stratified():
    sub = BundledDigits("train", limit=50)
    assert len(sub) == 50 and np.bincount(sub.targets).tolist() == [5] * 10


def test_epoch_seeded_augmentation_is_a_function_of_seed_epoch_index(bundled):
    train, _ = bundled
    ds = EpochSeededDataset(train, seed=3)
    a, b = ds[(0, 5)][0], ds[(0, 5)][0]
    assert torch.equal(a, b)
    assert not torch.equal(ds[(0, 5)][0], ds[(1, 5)][0])  # new placement every epoch
    assert not torch.equal(ds[(0, 5)][0], EpochSeededDataset(train, seed=4)[(0, 5)][0])
    # the main-process RNG streams are untouched
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    ds[(0, 7)]
    t, n, p = torch.rand(1).item(), np.random.rand(), random.random()
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    assert (t, n, p) == (torch.rand(1).item(), np.random.rand(), random.random())


def test_sampler_shards_match_single_process_and_resume():
    n, world, b = 103, 2, 4
    single = ResumableSampler(n, True, seed=1, drop_last=True)
    single.set_epoch(2)
    shards = []
    for r in range(world):
        s = ResumableSampler(n, True, seed=1, rank=r, world_size=world, drop_last=True)
        s.set_epoch(2)
        shards.append([i for _, i in s])
    order = [i for _, i in single]
    for step in range(len(shards[0]) // b):  # step k of W ranks x b == step k of 1 rank x W*b
        both = sorted(shards[0][step * b:(step + 1) * b] + shards[1][step * b:(step + 1) * b])
        assert both == sorted(order[step * 2 * b:(step + 1) * 2 * b])
    s = ResumableSampler(n, True, seed=1, drop_last=True)
    s.set_epoch(2, start=10)
    assert [i for _, i in s] == order[10:] and len(s) == len(order) - 10
    # different epochs -> different orders; evaluation sharding visits every sample exactly once
    s.set_epoch(3)
    assert [i for _, i in s] != order
    ev = [i for r in range(3) for _, i in ResumableSampler(10, False, rank=r, world_size=3, pad=False)]
    assert sorted(ev) == list(range(10))


def _write_png(path, color, size=40):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)


def test_image_folder_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="data folder not found"):
        ImageFolderDataset(tmp_path / "nope")
    (tmp_path / "empty_root").mkdir()
    with pytest.raises(FileNotFoundError, match="no class sub-folders"):
        ImageFolderDataset(tmp_path / "empty_root")
    _write_png(tmp_path / "train" / "cat" / "a.png", (255, 0, 0))
    (tmp_path / "train" / "dog").mkdir()
    with pytest.raises(ValueError, match=r"empty class folder.*dog"):
        ImageFolderDataset(tmp_path / "train")
    ds = ImageFolderDataset(tmp_path / "train", allow_empty=True)
    assert ds.classes == ["cat", "dog"] and len(ds) == 1
    _write_png(tmp_path / "val" / "cow" / "a.png", (0, 0, 255))
    with pytest.raises(ValueError, match="unknown to the training set.*cow"):
        ImageFolderDataset(tmp_path / "val", class_to_idx=ds.class_to_idx)


def test_corrupt_image_is_skipped_warned_and_counted(tmp_path):
    root = tmp_path / "train"
    _write_png(root / "a" / "0.png", (10, 20, 30))
    (root / "a" / "1.png").write_bytes(b"this is not a png")
    _write_png(root / "b" / "0.png", (200, 100, 0))
    ds = ImageFolderDataset(root, transform=lambda im: torch.as_tensor(np.array(im)), return_status=True)
    with pytest.warns(UserWarning, match=r"skipping unreadable image .*1\.png"):
        img, target, ok = ds[1]
    assert not ok and target == 1 and ds.num_skipped == 1  # substituted by the next readable sample
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per file
        _, _, ok = ds[1]
    assert ds.num_skipped == 1 and ds[0][2]


def test_ensure_torchvision_and_timm_transforms():
    tv = ensure_torchvision()
    assert hasattr(tv, "transforms") and set(defined_schemas()) <= set(_SCHEMAS)
    from PIL import Image

    cfg = make_config("sw_tiny_in1k", {"input_size": 64})
    t_train, t_eval = build_transform(cfg, True), build_transform(cfg, False)
    names = repr(t_train)
    assert "RandAugment" in names and "RandomErasing" in names and "bicubic" in names
    img = Image.new("RGB", (80, 60), (120, 30, 200))
    assert t_train(img).shape == (3, 64, 64) and t_eval(img).shape == (3, 64, 64)
    mix = build_mixup(cfg, 10)
    x, y = mix(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    assert y.shape == (4, 10) and torch.allclose(y.sum(1), torch.ones(4))
    assert build_mixup(make_config("default"), 10) is None
