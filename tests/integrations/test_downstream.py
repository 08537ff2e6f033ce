"""`lkvision downstream`: real (short) mmseg / mmdet training on the bundled dense digits."""

from __future__ import annotations

import json

import pytest

from ._helpers import require


@pytest.fixture(scope="module")
def dense_root(tmp_path_factory):
    from lkvision.data.dense import write_dense_digits

    return write_dense_digits(tmp_path_factory.mktemp("dense") / "digits", num_train=240, num_val=60)


@pytest.mark.slow
def test_cli_smoke(tmp_path, capsys):
    """The command end to end (3 iterations): metrics, overlays, table."""
    require("mmseg")
    from lkvision.cli import main

    argv = ["downstream", "seg", "--model", "sw_femto", "--iters", "3", "--batch-size", "2", "--num-train", "8",
            "--num-val", "4", "--data-root", str(tmp_path / "data"), "--out-dir", str(tmp_path / "runs"),
            "--model-kwargs", "big_kernels=[3,3,3,3]"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| model | seed |" in out and "big_kernels=[3, 3, 3, 3]" in out
    run = tmp_path / "runs" / "seg" / "sw_femto_big_kernels3333_seed0"
    row = json.loads((run / "metrics.json").read_text())
    assert row["iters"] == 3 and "mIoU" in row["metrics"] and (run / "overlays.png").stat().st_size > 0


def test_model_kwargs_parsing():
    from lkvision.integrations.cli import parse_model_kwargs

    assert parse_model_kwargs(["big_kernels=[3,3,3,3]", "drop_path_rate=0.1"]) == dict(
        big_kernels=[3, 3, 3, 3], drop_path_rate=0.1)
    with pytest.raises(ValueError, match="key=value"):
        parse_model_kwargs(["big_kernels"])


def test_configs_take_channels_from_a_meta_backbone(monkeypatch):
    """The configs read the backbone's output channels from a copy that holds no real weights."""
    import torch

    from lkvision.integrations import downstream
    from lkvision.integrations.backbone import build_backbone, feature_channels

    built = []

    def spy(*args, **kwargs):
        built.append(build_backbone(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(downstream, "build_backbone", spy)
    kw = dict(dims=[8, 16, 24, 40], big_kernels=[3, 3, 3, 3])
    seg = downstream.seg_config("sw_femto", "root", "work", model_kwargs=kw)
    det = downstream.det_config("sw_femto", "root", "work", model_kwargs=kw)
    assert seg["model"]["decode_head"]["in_channels"] == det["model"]["neck"]["in_channels"] == [8, 16, 24, 40]
    assert feature_channels(build_backbone("sw_femto", **kw)) == [8, 16, 24, 40]  # the same on the CPU
    assert seg["model"]["backbone"]["model_kwargs"] == kw and len(built) == 2
    assert {t.device for m in built for t in [*m.parameters(), *m.buffers()]} == {torch.device("meta")}
    assert downstream.seg_config("sw_femto", "root", "work")["model"]["decode_head"]["in_channels"] == [
        16, 32, 48, 64]


@pytest.mark.slow
def test_seg_training_learns(dense_root, tmp_path):
    require("mmseg")
    from lkvision.integrations.downstream import run_downstream

    row = run_downstream("seg", "sw_femto", str(dense_root), str(tmp_path / "seg"), iters=400, lr=2e-3,
                         batch_size=8, overlays=2)
    assert row["loss_last"] < 0.7 * row["loss_first"]
    # chance: everything background gives mIoU = IoU(background) / 11 classes ~ 97 / 11 ~ 8.8 %
    # (600 iterations on 800 images reach 20-27, docs/downstream.md)
    assert row["metrics"]["mIoU"] > 12.0, row


@pytest.mark.slow
def test_det_training_learns(dense_root, tmp_path):
    require("mmdet")
    from lkvision.integrations.downstream import run_downstream

    row = run_downstream("det", "sw_femto", str(dense_root), str(tmp_path / "det"), iters=300, lr=2e-3,
                         batch_size=4, overlays=2)
    assert row["loss_last"] < 0.7 * row["loss_first"]
    # random boxes score ~0 AP; 600 iterations on 800 images reach AP50 0.84 (docs/downstream.md)
    assert row["metrics"]["coco/bbox_mAP_50"] > 0.1, row
    assert row["metrics"]["coco/segm_mAP_50"] > 0.1, row
