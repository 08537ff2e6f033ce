"""Every config under configs/ parses, names a registered backbone with the right channels, and builds (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ._helpers import require

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
MODEL_CONFIGS = sorted(p for p in CONFIGS.glob("mm*/*.py"))
# the models and frameworks the issue asks for: 7 models x (UperNet 160k, Cascade Mask R-CNN 3x, Mask R-CNN 1x)
EXPECTED_MODELS = ("sw_tiny", "sw_small", "replknet_31b", "unireplknet_t", "unireplknet_s", "slak_t",
                   "convnext_lk_t")


def _load(path: Path):
    require("mmdet" if path.parent.name == "mmdet" else "mmseg")
    from mmengine.config import Config

    return Config.fromfile(str(path))


def test_the_expected_configs_exist():
    names = {p.name for p in MODEL_CONFIGS}
    for m in EXPECTED_MODELS:
        assert f"upernet_{m}_512x512_160k_ade20k.py" in names
        assert f"cascade_mask_rcnn_{m}_fpn_3x_coco.py" in names
        assert f"mask_rcnn_{m}_fpn_1x_coco.py" in names


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda p: p.stem)
def test_config_parses_with_matching_channels(path):
    cfg = _load(path)
    bb = cfg.model.backbone
    assert bb.type == "LKVisionBackbone" and bb.model_name in path.stem
    chs = _channels(bb.model_name)
    if path.parent.name == "mmseg":
        assert list(cfg.model.decode_head.in_channels) == chs
        assert cfg.model.auxiliary_head.in_channels == chs[2]
        assert cfg.train_cfg.max_iters == 160000 and cfg.crop_size == (512, 512)
    else:
        assert list(cfg.model.neck.in_channels) == chs
        assert cfg.train_cfg.max_epochs == (36 if "3x" in path.stem else 12)
    assert cfg.custom_imports.imports == [f"lkvision.integrations.{path.parent.name}"]


def _channels(name: str) -> list[int]:
    """Output channels of a registered model (built once per name)."""
    from lkvision.integrations.backbone import build_backbone, feature_channels

    if name not in _CHANNELS:
        try:  # no weights needed: build on the meta device where the model allows it
            with torch.device("meta"):
                _CHANNELS[name] = feature_channels(build_backbone(name))
        except (NotImplementedError, RuntimeError):
            _CHANNELS[name] = feature_channels(build_backbone(name))
    return _CHANNELS[name]


_CHANNELS: dict[str, list[int]] = {}


@pytest.mark.slow
@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda p: p.stem)
def test_config_builds_and_runs(path):
    """Build the full-size model of every config and run a tiny forward (predict) on CPU."""
    cfg = _load(path)
    from mmengine.registry import init_default_scope

    scope = path.parent.name
    init_default_scope(scope)
    __import__(f"lkvision.integrations.{scope}")
    registry = __import__(f"{scope}.registry", fromlist=["MODELS"]).MODELS
    cfg.model.backbone.with_cp = False
    model = registry.build(cfg.model)
    model.init_weights()
    model.eval()
    size = 64
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        feats = model.backbone(x)
        assert [f.shape[-1] for f in feats] == [size // s for s in (4, 8, 16, 32)]
        if scope == "mmseg":
            from mmseg.structures import SegDataSample

            s = SegDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size), pad_shape=(size, size)))
            out = model.predict(x, [s])
            assert out[0].pred_sem_seg.data.shape == (1, size, size)
        else:
            from mmdet.structures import DetDataSample

            s = DetDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size), scale_factor=(1.0, 1.0),
                                            batch_input_shape=(size, size), pad_shape=(size, size)))
            out = model.predict(x, [s])
            assert "bboxes" in out[0].pred_instances
