"""Shape bias (RepLKNet §5.2, Fig. 5): the metric, the cue-conflict folder parser, the ImageNet-1k -> 16
category mapping, the bundled digit cue-conflict generator and `lkvision shape-bias` end to end."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lkvision.analysis.imagenet16 import IMAGENET16_CATEGORIES, IMAGENET16_INDICES
from lkvision.analysis.images import _package_dir
from lkvision.analysis.shape_bias import (
    CUE_CONFLICT_URL,
    CategoryMapping,
    digit_mapping,
    imagenet16_mapping,
    parse_cue_conflict_name,
    read_cue_conflict_folder,
    shape_bias,
)
from lkvision.data.cue_conflict import (
    DIGIT_NAMES,
    digit_cue_conflict,
    digit_cue_controls,
    render_cue_conflict,
    write_digit_cue_conflict,
)

# ------------------------------------------------------------------------------------------------ metric


def test_shape_bias_known_answer():
    trials = [
        ("cat", "dog", "cat"),    # shape
        ("cat", "dog", "dog"),    # texture
        ("cat", "bird", "car"),   # neither: not counted
        ("cat", "bird", "cat"),   # shape
        ("cat", "cat", "dog"),    # same class: excluded, whatever the decision
        ("dog", "cat", "dog"),    # shape
        ("dog", "bird", "bird"),  # texture
        ("dog", "bird", "bird"),  # texture
        ("dog", "car", "knife"),  # neither
        ("car", "dog", "cat"),    # neither -> car has no counted decision
    ]
    res = shape_bias(trials, categories=["bird", "car", "cat", "dog"])
    rows = {r["category"]: r for r in res.per_category}
    assert [r["category"] for r in res.per_category] == ["bird", "car", "cat", "dog"]
    assert (rows["cat"]["shape"], rows["cat"]["texture"], rows["cat"]["other"], rows["cat"]["images"]) == (2, 1, 1, 4)
    assert rows["cat"]["shape_bias"] == pytest.approx(2 / 3)
    assert rows["dog"]["shape_bias"] == pytest.approx(1 / 3)
    assert math.isnan(rows["car"]["shape_bias"]) and rows["car"]["other"] == 1
    assert rows["bird"]["images"] == 0 and math.isnan(rows["bird"]["shape_bias"])
    assert (res.shape_decisions, res.texture_decisions, res.other_decisions) == (3, 3, 3)
    assert res.conflict_images == 9 and res.excluded_same_class == 1
    assert res.shape_bias == pytest.approx(0.5)                  # pooled: 3 / (3 + 3)
    assert res.category_mean == pytest.approx((2 / 3 + 1 / 3) / 2)  # NaN categories left out


def test_shape_bias_pooled_differs_from_category_mean():
    trials = [("cat", "dog", "cat")] * 3 + [("dog", "cat", "cat")]  # cat: 1.0 (3 decisions), dog: 0.0 (1)
    res = shape_bias(trials)
    assert res.shape_bias == pytest.approx(0.75) and res.category_mean == pytest.approx(0.5)


def test_shape_bias_no_counted_decision_is_nan_and_unknown_shape_is_an_error():
    assert math.isnan(shape_bias([("cat", "dog", "car")]).shape_bias)
    assert math.isnan(shape_bias([]).category_mean)
    with pytest.raises(ValueError, match="not among the categories"):
        shape_bias([("zebra", "dog", "dog")], categories=["cat", "dog"])


# ------------------------------------------------------------------------------------------ folder parser

@pytest.mark.parametrize("name,expected", [
    ("cat3-dog7.png", ("cat", "dog")),
    ("airplane10-bicycle2.png", ("airplane", "bicycle")),
    ("0001_s5n_s01_0_bird_00_bird3-bird2.png", ("bird", "bird")),  # the human-experiment file names
    ("seven12-three1.PNG", ("seven", "three")),
])
def test_parse_name(name, expected):
    assert parse_cue_conflict_name(name) == expected


@pytest.mark.parametrize("bad", ["cat-dog.png", "cat3dog7.png", "cat3-dog.png", "3cat-dog1.png", "cat3-dog7-x1.png",
                                 "cat3_dog7.png", "cat 3-dog7.png"])
def test_parse_bad_name(bad):
    with pytest.raises(ValueError, match=r"is not '<shape><i>-<texture><j>\.png'"):
        parse_cue_conflict_name(bad)


def _touch_png(path: Path, value: int = 0) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def test_read_folder(tmp_path):
    for rel in ["cat/cat1-dog2.png", "cat/cat2-cat1.png", "dog/dog1-bird1.png"]:
        _touch_png(tmp_path / rel)
    (tmp_path / "cat" / "notes.txt").write_text("ignored")
    (tmp_path / "dog" / ".DS_Store").write_text("ignored")
    ims = read_cue_conflict_folder(tmp_path, ["bird", "cat", "dog"])
    assert [(i.path.name, i.shape, i.texture, i.is_conflict) for i in ims] == [
        ("cat1-dog2.png", "cat", "dog", True), ("cat2-cat1.png", "cat", "cat", False),
        ("dog1-bird1.png", "dog", "bird", True)]


@pytest.mark.parametrize("rel,match", [
    ("cat/dog1-cat2.png", "gives shape 'dog' but the image is in folder 'cat'"),
    ("cat/cat1-zebra2.png", "texture class 'zebra' is not one of the categories"),
    ("zebra/zebra1-cat2.png", "is not one of the categories"),
    ("cat/cat1_dog2.png", "is not '<shape><i>-<texture><j>.png'"),
    ("cat1-dog2.png", "holds images directly"),
])
def test_read_folder_bad_layout(tmp_path, rel, match):
    _touch_png(tmp_path / rel)
    with pytest.raises(ValueError, match=match):
        read_cue_conflict_folder(tmp_path, ["cat", "dog"])


def test_read_folder_missing_or_empty_points_to_the_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="model-vs-human"):
        read_cue_conflict_folder(tmp_path / "nope")
    (tmp_path / "cat").mkdir()
    with pytest.raises(FileNotFoundError, match="cue-conflict.tar.gz"):
        read_cue_conflict_folder(tmp_path)


# ------------------------------------------------------------------------------------- category mapping

# The toolbox's 16 categories, and per category the published WordNet IDs that are ILSVRC-2012 classes
# (model-vs-human helper/human_categories.py; its sets also hold WNIDs outside the 1k classes).
TOOLBOX_CATEGORIES = ["knife", "keyboard", "elephant", "bicycle", "airplane", "clock", "oven", "chair", "bear",
                      "boat", "cat", "bottle", "truck", "car", "bird", "dog"]
PUBLISHED_WNIDS = {
    "airplane": "n02690373",
    "bear": "n02132136 n02133161 n02134084 n02134418",
    "bicycle": "n02835271 n03792782",
    "bird": "n01514859 n01530575 n01531178 n01532829 n01534433 n01537544 n01558993 n01560419 n01582220 n01592084 "
            "n01601694 n01614925 n01616318 n01622779 n01795545 n01796340 n01797886 n01798484 n01817953 n01818515 "
            "n01819313 n01820546 n01824575 n01828970 n01829413 n01833805 n01843065 n01843383 n01855032 n01855672 "
            "n01860187 n02002556 n02002724 n02006656 n02007558 n02009229 n02009912 n02011460 n02013706 n02017213 "
            "n02018207 n02018795 n02025239 n02027492 n02028035 n02033041 n02037110 n02051845 n02056570",
    "boat": "n02951358 n03344393 n03662601 n04273569 n04612504",
    "bottle": "n02823428 n03937543 n03983396 n04557648 n04560804 n04579145 n04591713",
    "car": "n02814533 n03100240 n04285008",
    "cat": "n02123045 n02123159 n02123394 n02123597 n02124075 n02125311",
    "chair": "n02791124 n03376595 n04099969 n04429376",
    "clock": "n02708093 n03196217 n04548280",
    "dog": "n02085782 n02085936 n02086079 n02086240 n02086646 n02086910 n02087046 n02087394 n02088094 n02088238 "
           "n02088364 n02088466 n02088632 n02089078 n02089867 n02089973 n02090379 n02090622 n02090721 n02091032 "
           "n02091134 n02091244 n02091467 n02091635 n02091831 n02092002 n02092339 n02093256 n02093428 n02093647 "
           "n02093754 n02093859 n02093991 n02094114 n02094258 n02094433 n02095314 n02095570 n02095889 n02096051 "
           "n02096294 n02096437 n02096585 n02097047 n02097130 n02097209 n02097298 n02097474 n02097658 n02098105 "
           "n02098286 n02099267 n02099429 n02099601 n02099712 n02099849 n02100236 n02100583 n02100735 n02100877 "
           "n02101006 n02101388 n02101556 n02102040 n02102177 n02102318 n02102480 n02102973 n02104029 n02104365 "
           "n02105056 n02105162 n02105251 n02105505 n02105641 n02105855 n02106030 n02106166 n02106382 n02106550 "
           "n02106662 n02107142 n02107312 n02107574 n02107683 n02107908 n02108000 n02108422 n02108551 n02108915 "
           "n02109047 n02109525 n02109961 n02110063 n02110185 n02110627 n02110806 n02110958 n02111129 n02111277 "
           "n02111500 n02112018 n02112350 n02112706 n02113023 n02113624 n02113712 n02113799 n02113978",
    "elephant": "n02504013 n02504458",
    "keyboard": "n03085013 n04505470",
    "knife": "n03041632",
    "oven": "n04111531",
    "truck": "n03345487 n03417042 n03770679 n03796401 n03930630 n03977966 n04461696 n04467665",
}


def test_mapping_covers_exactly_the_16_categories_without_overlap():
    assert list(IMAGENET16_CATEGORIES) == sorted(TOOLBOX_CATEGORIES)
    assert set(IMAGENET16_INDICES) == set(TOOLBOX_CATEGORIES)
    flat = [i for c in IMAGENET16_CATEGORIES for i in IMAGENET16_INDICES[c]]
    assert len(flat) == len(set(flat)) == 207
    assert all(0 <= i < 1000 for i in flat)
    assert all(list(v) == sorted(v) for v in IMAGENET16_INDICES.values())
    counts = {c: len(v) for c, v in IMAGENET16_INDICES.items()}
    assert counts == {"airplane": 1, "bear": 4, "bicycle": 2, "bird": 49, "boat": 5, "bottle": 7, "car": 3,
                      "cat": 6, "chair": 4, "clock": 3, "dog": 109, "elephant": 2, "keyboard": 2, "knife": 1,
                      "oven": 1, "truck": 8}
    m = imagenet16_mapping()
    assert m.categories == IMAGENET16_CATEGORIES and m.num_outputs == 1000


def test_mapping_indices_are_the_published_wordnet_ids():
    """Each category's class indices are exactly the positions of its published WNIDs in the ILSVRC-2012
    class order (read from timm's synset list, a plain text file)."""
    timm_dir = _package_dir("timm")
    synsets_file = timm_dir / "data" / "_info" / "imagenet_synsets.txt" if timm_dir else None
    if synsets_file is None or not synsets_file.is_file():
        pytest.skip("timm's imagenet_synsets.txt is not installed (pip install 'lkvision[train]')")
    synsets = synsets_file.read_text().split()
    assert len(synsets) == 1000
    for cat, wnids in PUBLISHED_WNIDS.items():
        wanted = set(wnids.split())
        assert list(IMAGENET16_INDICES[cat]) == [i for i, s in enumerate(synsets) if s in wanted], cat


def test_decision_is_the_mean_member_probability():
    """The toolbox aggregates with the mean: 109 dog classes at 0.004 each (0.436 in total) lose against one
    cat class at 0.05 -- a sum would pick dog."""
    p = torch.full((1, 1000), 1e-6)
    p[0, list(IMAGENET16_INDICES["dog"])] = 0.004
    p[0, IMAGENET16_INDICES["cat"][0]] = 0.3  # cat mean = 0.3 / 6 = 0.05
    p[0, 0] = 1.0 - p.sum() + p[0, 0]         # a non-category class takes the rest
    m = imagenet16_mapping()
    scores = m.scores(p.log())
    assert scores[0, m.categories.index("dog")] == pytest.approx(0.004, rel=1e-4)
    assert scores[0, m.categories.index("cat")] == pytest.approx(0.05, rel=1e-4)
    assert m.decide(p.log()) == ["cat"]


def test_mapping_checks():
    with pytest.raises(ValueError, match=r"needs \(N, 1000\) logits, the model gives \(2, 10\)"):
        imagenet16_mapping().decide(torch.zeros(2, 10))
    with pytest.raises(ValueError, match="no index may serve two"):
        CategoryMapping("x", ("a", "b"), ((0, 1), (1,)), 3)
    d = digit_mapping()
    assert d.categories == DIGIT_NAMES and d.decide(torch.eye(10) * 5) == list(DIGIT_NAMES)


# ------------------------------------------------------------------------------------ digit generator

def test_render_known_answer():
    a = np.zeros((28, 28), np.uint8)
    a[4:24, 12:16] = 255                      # a bar: the shape
    b = np.zeros((28, 28), np.uint8)
    b[5:20, 9:19] = 200                       # a block: its bounding box is the (uniform) motif
    img = render_cue_conflict(a, b, canvas=64, background=0.0, dilate=0)
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[18 + 4:18 + 24, 18 + 12:18 + 16] = True  # centred: offset (64 - 28) // 2
    assert img.dtype == torch.uint8 and img.shape == (64, 64)
    assert (img[mask] == 255).all() and (img[~mask] == 0).all()
    big = render_cue_conflict(a, b, canvas=64, shape_scale=2, background=0.0, dilate=1)
    assert int((big > 0).sum()) == (40 + 2) * (8 + 2)  # the bar x2, dilated by one pixel
    # a real texture: the motif (b's bounding box) repeats with its own period, whatever the shape
    b2 = np.zeros((28, 28), np.uint8)
    b2[3:10, 2:7] = np.arange(35, dtype=np.uint8).reshape(7, 5) * 7
    full = render_cue_conflict(a, b2, background=1.0)
    assert torch.equal(full, render_cue_conflict(np.full((28, 28), 255, np.uint8), b2, background=1.0))
    assert torch.equal(full[:7, :5], full[7:14, 5:10]) and int(full.max()) == 255
    half = render_cue_conflict(a, b2, background=0.5, dilate=0)
    assert torch.equal(half[mask], full[mask])
    assert (half[~mask].float() - full[~mask].float() * 0.5).abs().max() <= 0.5 + 1e-6


def test_controls():
    shape = list(digit_cue_controls("shape", per_class=2))
    texture = list(digit_cue_controls("texture", per_class=2))
    assert [c for c, _ in shape] == [c for c, _ in texture] == [c for c in range(10) for _ in range(2)]
    assert all(set(img.unique().tolist()) <= {0, 255} for _, img in shape)  # white silhouette on black
    assert all(float((img > 0).float().mean()) > 0.2 for _, img in texture)  # texture over the whole canvas
    with pytest.raises(ValueError, match="kind must be"):
        next(digit_cue_controls("colour"))


def test_digit_set_is_deterministic_and_in_toolbox_layout(tmp_path):
    first = list(digit_cue_conflict(per_pair=1))
    assert len(first) == 90 and all(a != b for a, _, b, _, _ in first)
    again = list(digit_cue_conflict(per_pair=1))
    assert all(torch.equal(x[4], y[4]) and x[:4] == y[:4] for x, y in zip(first, again))
    paths = write_digit_cue_conflict(tmp_path, per_pair=1)
    ims = read_cue_conflict_folder(tmp_path, DIGIT_NAMES)
    assert len(paths) == len(ims) == 90
    assert {(im.shape, im.texture) for im in ims} == {(DIGIT_NAMES[a], DIGIT_NAMES[b]) for a, _, b, _, _ in first}


# ---------------------------------------------------------------------------------------- end to end

def _main(argv):
    from lkvision.cli import main

    return main(["shape-bias", *argv])


def test_cli_bundled_digits_end_to_end(tmp_path):
    out = tmp_path / "out"
    (out / "digit_cue_conflict" / "zero").mkdir(parents=True)  # an earlier run's image must not be read
    _touch_png(out / "digit_cue_conflict" / "zero" / "zero99-one99.png")
    assert _main(["--bundled-digits", "--per-pair", "1", "--models", "replknet_nano", "replknet_nano",
                  "--model-kwargs", "{}", '{"small_kernel": null}', "--out-dir", str(out), "--batch-size", "90"]) == 0
    for f in ("shape_bias.png", "shape_bias.csv", "shape_bias.json"):
        assert (out / f).stat().st_size > 0
    js = json.loads((out / "shape_bias.json").read_text())
    assert js["categories"] == "digits" and set(js["models"]) == {"replknet_nano #1", "replknet_nano #2"}
    rows = list(csv.DictReader((out / "shape_bias.csv").open()))
    for label, m in js["models"].items():
        assert 0 <= m["shape_only_acc"] <= 1 and 0 <= m["texture_only_acc"] <= 1
        dec = m["decisions"]
        assert len(dec) == 90 and set(dec.values()) <= set(DIGIT_NAMES)
        trials = [(Path(k).parent.name, parse_cue_conflict_name(k)[1], d) for k, d in dec.items()]
        ref = shape_bias(trials, DIGIT_NAMES)  # recomputed from the saved decisions
        pooled = next(r for r in rows if r["model"] == label and r["category"] == "all (pooled)")
        assert int(pooled["shape"]) == ref.shape_decisions and int(pooled["texture"]) == ref.texture_decisions
        assert int(pooled["images"]) == 90


def test_cli_imagenet16_folder_end_to_end(tmp_path):
    data = tmp_path / "cue"
    names = ["cat/cat1-dog1.png", "cat/cat2-cat1.png", "dog/dog1-clock2.png", "knife/knife1-bear1.png"]
    for i, rel in enumerate(names):
        _touch_png(data / rel, value=40 * i)
    out = tmp_path / "out"
    assert _main(["--data", str(data), "--models", "replknet_nano", "--resolution", "64",
                  "--out-dir", str(out)]) == 0
    js = json.loads((out / "shape_bias.json").read_text())
    m = js["models"]["replknet_nano"]
    assert js["categories"] == "imagenet16" and m["excluded_same_class"] == 1 and m["conflict_images"] == 3
    assert set(m["decisions"].values()) <= set(IMAGENET16_CATEGORIES)
    assert [r["category"] for r in m["per_category"]] == list(IMAGENET16_CATEGORIES)


def test_cli_without_data_says_where_to_get_it(tmp_path, capsys):
    assert _main(["--models", "replknet_nano", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lkvision shape-bias: error: ")
    assert "no cue-conflict images ship with lkvision" in err[0] and CUE_CONFLICT_URL in err[0]
