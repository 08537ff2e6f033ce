"""lkvision backbones inside mmseg 1.x / mmdet 3.x: build, loss, predict, checkpoints, layer decay, deploy."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import family_test_models, golden_tensors, randomize_bn_and_scales

from ._helpers import require

# one tiny configuration per family (the generic model tests' list)
FAMILY_MODELS: dict[str, dict] = {}
for _name, _kw in family_test_models():
    FAMILY_MODELS.setdefault(_name.split("_")[0], (_name, _kw))
FAMILY_MODELS = dict(FAMILY_MODELS.values())


class _ScopedRegistry:
    """A framework's MODELS registry that sets mmengine's default scope to that framework before each build (the
    module-scoped fixtures of both frameworks live in one process; the last register_all_modules would win)."""

    def __init__(self, fw: str) -> None:
        require(fw)
        require(f"lkvision.integrations.{fw}")
        importlib.import_module(f"{fw}.utils").register_all_modules(init_default_scope=False)
        self.fw = fw
        self.registry = importlib.import_module(f"{fw}.registry")

    def build(self, cfg):
        from mmengine.registry import init_default_scope

        init_default_scope(self.fw)
        return self.registry.MODELS.build(cfg)


def _framework_models(fw: str) -> _ScopedRegistry:
    return _ScopedRegistry(fw)


@pytest.fixture(scope="module")
def mmseg_models():
    return _framework_models("mmseg")


@pytest.fixture(scope="module")
def mmdet_models():
    return _framework_models("mmdet")


def _channels(name: str, kwargs: dict) -> tuple[list[int], list[int]]:
    from lkvision.integrations.backbone import build_backbone, feature_channels, feature_strides

    m = build_backbone(name, **kwargs)
    return feature_channels(m), feature_strides(m)


def _seg_model(MODELS, name: str, kwargs: dict, **backbone):
    from mmengine.config import ConfigDict

    chs, _ = _channels(name, kwargs)
    return MODELS.build(ConfigDict(
        type="EncoderDecoder",
        data_preprocessor=dict(type="SegDataPreProcessor", mean=[0.0] * 3, std=[1.0] * 3, size=(64, 64)),
        backbone=dict(type="LKVisionBackbone", model_name=name, model_kwargs=kwargs, **backbone),
        decode_head=dict(type="UPerHead", in_channels=chs, in_index=[0, 1, 2, 3], pool_scales=(1, 2, 3, 6),
                         channels=16, num_classes=5, norm_cfg=dict(type="BN", requires_grad=True),
                         loss_decode=dict(type="CrossEntropyLoss", loss_weight=1.0)),
        train_cfg=dict(), test_cfg=dict(mode="whole")))


def _seg_batch(n: int = 2, size: int = 64):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(n, 3, size, size, generator=g)
    samples = []
    for _ in range(n):
        s = SegDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size), pad_shape=(size, size)))
        s.gt_sem_seg = PixelData(data=torch.randint(0, 5, (1, size, size), generator=g))
        samples.append(s)
    return inputs, samples


@pytest.mark.parametrize("name", sorted(FAMILY_MODELS))
def test_upernet_every_family(mmseg_models, name):
    kwargs = FAMILY_MODELS[name]
    model = _seg_model(mmseg_models, name, kwargs)
    model.init_weights()
    inputs, samples = _seg_batch()
    feats = model.backbone(inputs)
    chs, strides = _channels(name, kwargs)
    assert [f.shape[1] for f in feats] == chs == model.backbone.out_channels
    assert [64 // f.shape[-1] for f in feats] == strides == [4, 8, 16, 32]
    losses = model.loss(inputs, samples)
    loss = sum(v for k, v in losses.items() if "loss" in k)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.backbone.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        preds = model.predict(inputs, samples)
    assert preds[0].pred_sem_seg.data.shape == (1, 64, 64)


def _det_cfg(name: str, kwargs: dict, cascade: bool) -> dict:
    from mmengine.config import Config
    from mmengine.utils import get_installed_path

    base = "cascade-mask-rcnn_r50_fpn.py" if cascade else "mask-rcnn_r50_fpn.py"
    cfg = Config.fromfile(f"{get_installed_path('mmdet')}/.mim/configs/_base_/models/{base}")
    chs, _ = _channels(name, kwargs)
    model = _slim(cfg.model)
    model.backbone = dict(type="LKVisionBackbone", model_name=name, model_kwargs=kwargs)
    model.neck.in_channels = chs
    model.data_preprocessor.mean, model.data_preprocessor.std = [0.0] * 3, [1.0] * 3
    return model


def _slim(node):
    """mmdet's model config with 32-channel FPN/heads, 64-d FCs and fewer proposals/samples (CPU test speed)."""
    if isinstance(node, list):
        return [_slim(v) for v in node]
    if not isinstance(node, dict):
        return node
    for key, value in node.items():
        if key in ("in_channels", "feat_channels", "out_channels", "conv_out_channels") and value == 256:
            node[key] = 32
        elif key == "fc_out_channels":
            node[key] = 64
        elif key in ("nms_pre", "max_per_img") and isinstance(value, int) and value > 100:
            node[key] = 100
        elif key == "num" and isinstance(value, int):
            node[key] = 32
        else:
            node[key] = _slim(value)
    return node


def _det_batch(size: int = 64):
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData

    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(1, 3, size, size, generator=g)
    s = DetDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size), pad_shape=(size, size),
                                    batch_input_shape=(size, size), scale_factor=(1.0, 1.0)))
    masks = torch.zeros(2, size, size, dtype=torch.uint8)
    masks[0, 8:30, 10:40] = 1
    masks[1, 35:60, 30:58] = 1
    s.gt_instances = InstanceData(bboxes=torch.tensor([[10.0, 8, 40, 30], [30.0, 35, 58, 60]]),
                                  labels=torch.tensor([1, 3]), masks=BitmapMasks(masks.numpy(), size, size))
    return inputs, [s]


@pytest.mark.parametrize("cascade", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["mask_rcnn", "cascade"])
@pytest.mark.parametrize("name", sorted(FAMILY_MODELS))
def test_mask_rcnn_every_family(mmdet_models, name, cascade):
    _check_detector(mmdet_models, name, cascade)


@pytest.mark.slow
def test_cascade_one_family(mmdet_models):
    """Cascade Mask R-CNN with the SW backbone (slow; every family: the parametrised slow cases)."""
    _check_detector(mmdet_models, "sw_femto", cascade=True)


def _check_detector(mmdet_models, name, cascade):
    kwargs = FAMILY_MODELS[name]
    model = mmdet_models.build(_det_cfg(name, kwargs, cascade))
    model.init_weights()
    inputs, samples = _det_batch()
    losses = model.loss(inputs, samples)
    total = sum(v if isinstance(v, torch.Tensor) else sum(v) for k, v in losses.items() if "loss" in k)
    assert torch.isfinite(total)
    total.backward()
    assert model.backbone.model.stage_pairs()[0][0].parameters().__next__().grad is not None
    model.eval()
    with torch.no_grad():
        preds = model.predict(inputs, samples)
    assert "masks" in preds[0].pred_instances and "bboxes" in preds[0].pred_instances


def test_import_lkvision_needs_no_openmmlab():
    code = ("import sys, lkvision; lkvision.create_model('sw_femto', features_only=True); "
            "import lkvision.integrations.backbone, lkvision.integrations.cli; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('mmengine', 'mmcv', 'mmdet', 'mmseg')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_official_checkpoint_through_init_cfg(mmseg_models, tmp_path):
    """The official SW dev checkpoint (golden, sw_femto's configuration) loads through init_cfg; the backbone then
    reproduces the official stage outputs (through the identity-initialised output LayerNorms)."""
    from safetensors.torch import save_file

    gold = golden_tensors("sw_dev")
    feats = golden_tensors("sw_dev", ".features")
    path = tmp_path / "official_sw.safetensors"
    save_file({k: v for k, v in gold.items() if not k.startswith("__")}, str(path))
    backbone = mmseg_models.build(dict(type="LKVisionBackbone", model_name="sw_femto",
                                       init_cfg=dict(type="Pretrained", checkpoint=str(path))))
    backbone.init_weights()
    backbone.eval()
    with torch.no_grad():
        outs = backbone(gold["__input__"])
    for out, key in zip(outs, ("stages.0.0", "stages.1.0", "stages.2.1", "stages.3.0")):
        ref = F.layer_norm(feats[key].permute(0, 2, 3, 1), (feats[key].shape[1],), eps=1e-6).permute(0, 3, 1, 2)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_official_checkpoint_custom_config(mmseg_models, tmp_path):
    """A configuration that is no registered name: official_kwargs in init_cfg."""
    from safetensors.torch import save_file

    gold = golden_tensors("unireplknet_dev")
    path = tmp_path / "official_uni.safetensors"
    save_file({k: v for k, v in gold.items() if not k.startswith("__")}, str(path))
    official = dict(depths=[1, 1, 2, 1], dims=[16, 32, 64, 128], kernel_sizes=[[3], [13], [13, 3], [13]])
    backbone = mmseg_models.build(dict(
        type="LKVisionBackbone", model_name="unireplknet_test",
        model_kwargs=dict(dims=(16, 32, 64, 128), kernel_sizes=((3,), (13,), (13, 3), (13,))),
        init_cfg=dict(type="Pretrained", checkpoint=str(path), official_kwargs=official)))
    backbone.init_weights()
    from lkvision.compat import from_official

    ref = from_official("unireplknet", {k: v for k, v in gold.items() if not k.startswith("__")}, **official)
    ours = backbone.model.state_dict()
    for k, v in ref.state_dict().items():
        if k in ours:
            torch.testing.assert_close(ours[k], v, atol=0, rtol=0)


def test_lkvision_checkpoint_and_errors(mmseg_models, tmp_path):
    import lkvision
    from lkvision.models import CheckpointError

    cls = lkvision.create_model("unireplknet_test", num_classes=7)
    randomize_bn_and_scales(cls)
    path = tmp_path / "cls.safetensors"
    lkvision.save_weights(cls, path)
    backbone = mmseg_models.build(dict(type="LKVisionBackbone", model_name="unireplknet_test",
                                       init_cfg=dict(type="Pretrained", checkpoint=str(path))))
    backbone.init_weights()
    for k, v in cls.state_dict().items():
        if not k.startswith(("head.", "norm.")):
            torch.testing.assert_close(backbone.model.state_dict()[k], v, atol=0, rtol=0)
    # a detector checkpoint (backbone.* keys) loads too
    det_sd = {f"backbone.model.{k}": v for k, v in backbone.model.state_dict().items()}
    det_sd["neck.conv.weight"] = torch.zeros(1)
    from lkvision.integrations.backbone import load_backbone_weights

    load_backbone_weights(backbone.model, "unireplknet_test", det_sd, prefix="backbone.model.")
    with pytest.raises(CheckpointError, match="no official format"):
        wrong = mmseg_models.build(dict(type="LKVisionBackbone", model_name="convnext_nano_lk",
                                        init_cfg=dict(type="Pretrained", checkpoint=str(path))))
        wrong.init_weights()
    with pytest.raises(ValueError, match="init_cfg"):
        mmseg_models.build(dict(type="LKVisionBackbone", model_name="sw_femto", init_cfg=dict(type="Normal")))


def test_layer_decay_constructor_rates(mmseg_models):
    from mmseg.registry import OPTIM_WRAPPER_CONSTRUCTORS

    model = _seg_model(mmseg_models, "sw_femto", {})  # also sets the default scope to mmseg
    base_lr, wd, rate, num_layers = 1e-3, 0.05, 0.5, 4
    ctor = OPTIM_WRAPPER_CONSTRUCTORS.build(dict(
        type="LKLayerDecayOptimWrapperConstructor",
        optim_wrapper_cfg=dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=base_lr, weight_decay=wd)),
        paramwise_cfg=dict(decay_rate=rate, decay_type="layer_wise", num_layers=num_layers)))
    groups = ctor(model).optimizer.param_groups
    by_param = {id(p): g for g in groups for p in g["params"]}
    bb = model.backbone.model
    pairs = bb.stage_pairs()
    # documented ids: stem 0, stage0 1, ds1/stage1 2, ds2 3, stage2 block j 3 + j // 3, ds3/stage3 num_layers,
    # everything else num_layers + 1; lr = base * rate ** (num_layers + 1 - id)
    expect = [(pairs[0][0], 0), (pairs[0][1], 1), (pairs[1][0], 2), (pairs[1][1], 2), (pairs[2][0], 3),
              (pairs[2][1][1], 3), (pairs[3][0], num_layers), (pairs[3][1], num_layers),
              (bb.feature_norms, num_layers + 1), (model.decode_head, num_layers + 1)]
    for module, lid in expect:
        for name, p in module.named_parameters():
            g = by_param[id(p)]
            assert g["lr"] == pytest.approx(base_lr * rate ** (num_layers + 1 - lid)), (name, lid)
            assert g["weight_decay"] == (0.0 if p.ndim == 1 or name.endswith("bias") else wd), name
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)
    # stage-wise (SLaK): stage i -> i + 1, stems 0
    ctor = OPTIM_WRAPPER_CONSTRUCTORS.build(dict(
        type="LKLayerDecayOptimWrapperConstructor",
        optim_wrapper_cfg=dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=base_lr, weight_decay=wd)),
        paramwise_cfg=dict(decay_rate=rate, decay_type="stage_wise", num_layers=6)))
    by_param = {id(p): g for g in ctor(model).optimizer.param_groups for p in g["params"]}
    for i, (pre, stage) in enumerate(pairs):
        assert by_param[id(next(pre.parameters()))]["lr"] == pytest.approx(base_lr * rate ** 7)
        assert by_param[id(next(stage.parameters()))]["lr"] == pytest.approx(base_lr * rate ** (6 - i))
    with pytest.raises(ValueError, match="num_layers"):
        OPTIM_WRAPPER_CONSTRUCTORS.build(dict(
            type="LKLayerDecayOptimWrapperConstructor",
            optim_wrapper_cfg=dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=base_lr)),
            paramwise_cfg=dict(decay_rate=rate, num_layers=2)))(model)


@pytest.mark.parametrize("name", sorted(FAMILY_MODELS))
def test_deploy_backbone_predicts_the_same(mmseg_models, name):
    kwargs = FAMILY_MODELS[name]
    train_form = _seg_model(mmseg_models, name, kwargs)
    randomize_bn_and_scales(train_form)
    deploy = _seg_model(mmseg_models, name, kwargs, deploy=True)
    deploy.load_state_dict(train_form.state_dict())
    train_form.eval()
    deploy.eval()
    inputs, samples = _seg_batch()
    with torch.no_grad():
        a = train_form.predict(inputs, samples)
        b = deploy.predict(inputs, [s.clone() for s in samples])
    assert deploy.backbone._deployed
    a, b = a[0].seg_logits.data, b[0].seg_logits.data
    # fp32 summation order differs between the forms: a tolerance relative to the logits' scale (ResNet-18 with
    # randomized BN gives logits up to ~150, where oneDNN's AVX2 kernels differ by 1.7e-4)
    torch.testing.assert_close(b, a, atol=1e-5 * float(a.abs().max()), rtol=1e-4)
    deploy.train()
    with pytest.raises(RuntimeError, match="inference"):
        deploy.backbone(inputs)


def test_frozen_stages_norm_eval_cp_syncbn(mmseg_models):
    bb = mmseg_models.build(dict(type="LKVisionBackbone", model_name="replknet_nano", frozen_stages=1,
                                 norm_eval=True, sync_bn=True))
    pairs = bb.model.stage_pairs()
    bb.train()
    for i, (pre, stage) in enumerate(pairs):
        for m in (pre, stage):
            assert all(p.requires_grad == (i > 1) for p in m.parameters())
            assert not m.training if i <= 1 else m.training
    norms = [m for m in bb.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, torch.nn.SyncBatchNorm) and not m.training for m in norms)
    # activation checkpointing: same outputs and gradients
    plain = mmseg_models.build(dict(type="LKVisionBackbone", model_name="unireplknet_test"))
    cp = mmseg_models.build(dict(type="LKVisionBackbone", model_name="unireplknet_test", with_cp=True))
    cp.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    outs = [sum(o.square().sum() for o in m(x)) for m in (plain, cp)]
    for o in outs:
        o.backward()
    torch.testing.assert_close(outs[0], outs[1])
    for p, q in zip(plain.parameters(), cp.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4)


def test_numpy_scalar_checkpoints_load_safely(mmseg_models, tmp_path):
    """mmengine's torch.load (weights-only on torch >= 2.6) fails on numpy scalars; allow_numpy_checkpoints()
    admits numpy scalars/arrays and nothing else (mmengine's HistoryBuffer needs ``getattr``, which stays out)."""
    import argparse

    import numpy as np
    from mmengine.logging.history_buffer import HistoryBuffer
    from mmengine.runner.checkpoint import _load_checkpoint

    from lkvision.integrations.mmseg import allow_numpy_checkpoints

    gold = golden_tensors("sw_dev")
    official = {k: v for k, v in gold.items() if not k.startswith("__")}
    path = tmp_path / "official.pth"
    torch.save(dict(model=official, epoch=np.int64(299), max_accuracy=np.float64(83.2), hist=np.arange(3)), path)
    with pytest.raises(Exception, match="weights_only|Unsupported global"):
        _load_checkpoint(str(path), map_location="cpu")
    with allow_numpy_checkpoints():
        ckpt = _load_checkpoint(str(path), map_location="cpu")
    assert ckpt["epoch"] == 299 and ckpt["hist"].tolist() == [0, 1, 2]
    # the same file through init_cfg (official format, numpy scalars beside the weights)
    backbone = mmseg_models.build(dict(type="LKVisionBackbone", model_name="sw_femto",
                                       init_cfg=dict(type="Pretrained", checkpoint=str(path))))
    backbone.init_weights()
    torch.testing.assert_close(backbone.model.stem[0].weight, official["downsample_layers.0.0.weight"])
    # anything else still fails
    buf = HistoryBuffer()
    buf.update(0.5)
    for i, obj in enumerate((buf, argparse.Namespace(a=1))):
        torch.save(dict(state_dict=dict(w=torch.ones(2)), extra=obj), tmp_path / f"other{i}.pth")
        with allow_numpy_checkpoints(), pytest.raises(Exception, match="weights_only|Unsupported global"):
            _load_checkpoint(str(tmp_path / f"other{i}.pth"), map_location="cpu")


def test_fewer_outputs_layer_ids_and_official_norms():
    """A backbone without the stages after its last output (``out_indices=(0, 1, 2)``) gets the layer ids the full
    backbone gives those parameters; an official downstream checkpoint (``norm0..3``) loads into a backbone that
    returns only some stages (the norms of the other stages are dropped, not taken for a different layout)."""
    from lkvision.integrations.backbone import build_backbone, layer_id, load_backbone_weights

    full, short = build_backbone("sw_femto"), build_backbone("sw_femto", out_indices=(0, 1, 2))
    assert len(short.stage_pairs()) == 3
    for decay_type, num_layers in (("layer_wise", 4), ("stage_wise", 6)):
        by_name = {}
        for model in (full, short):
            ids = layer_id(model, decay_type, num_layers)
            by_name[model] = {n: ids[id(p)] for n, p in model.named_parameters() if id(p) in ids}
        assert by_name[short] and all(by_name[full][n] == v for n, v in by_name[short].items())
        body = {n for n, _ in short.named_parameters() if not n.startswith("feature_norms.")}
        assert set(by_name[short]) == body, decay_type

    official = {k: v for k, v in golden_tensors("sw_dev").items() if not k.startswith("__")}
    g = torch.Generator().manual_seed(0)
    for i, c in enumerate(full.feature_info.channels()):
        official[f"norm{i}.weight"] = torch.rand(c, generator=g) + 0.5
        official[f"norm{i}.bias"] = torch.randn(c, generator=g)
    last3 = build_backbone("sw_femto", out_indices=(1, 2, 3))
    for model in (full, last3):
        assert load_backbone_weights(model, "sw_femto", official)["missing"] == []
    for i in (1, 2, 3):
        torch.testing.assert_close(last3.feature_norms[str(i)].weight, official[f"norm{i}.weight"], atol=0, rtol=0)
    x = golden_tensors("sw_dev")["__input__"]
    with torch.no_grad():
        for a, b in zip(last3.eval()(x), full.eval()(x)[1:]):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
