"""Generic model tests in the spirit of timm's test_models.py, run for every family's tiny test configs."""

from __future__ import annotations

import pytest
import torch

import lkvision
from conftest import family_test_models, randomize_bn_and_scales
from lkvision.models import CheckpointError, load_weights, save_weights

CASES = family_test_models()
IDS = [name for name, _ in CASES]
IMG = 64


def _build(name: str, kw: dict, **extra):
    torch.manual_seed(0)
    return lkvision.create_model(name, **{**kw, **extra})


def test_every_family_has_test_models():
    """Every discovered family contributes a tiny configuration to the generic tests (and to timm's suite)."""
    fams = {lkvision.models.family_of(n) for n, _ in CASES}
    missing = set(lkvision.models.families()) - fams
    assert not missing, f"families without TEST_MODELS: {missing}"


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_forward_backward_all_params_get_grads(name, kw):
    model = _build(name, kw, num_classes=10)
    model.train()
    x = torch.randn(2, 3, IMG, IMG)
    y = model(x)
    assert y.shape == (2, 10)
    assert torch.isfinite(y).all()
    y.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None)]
    assert not missing, f"parameters without gradient: {missing[:10]}"
    nonfinite = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not nonfinite


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_bf16_autocast_train_and_deploy(name, kw):
    """Mixed precision as the training engine runs it (torch.autocast, fp32 weights): the large-kernel custom
    ops must follow autocast's conv policy (they are invisible to it), in the train form and the deploy form,
    and stay close to the fp32 result."""
    model = randomize_bn_and_scales(_build(name, kw, num_classes=10)).eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    assert ((y.float() - ref).norm() / ref.norm()).item() < 0.05
    y.float().square().mean().backward()
    grads = [(n, p.grad) for n, p in model.named_parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for _, g in grads)
    lkvision.reparameterize(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y_dep = model(x)
    assert ((y_dep.float() - ref).norm() / ref.norm()).item() < 0.05


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_api_features_head_reset(name, kw):
    model = _build(name, kw).eval()
    x = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        f = model.forward_features(x)
        assert f.shape[1] == model.num_features
        assert f.shape[-1] == IMG // 32
        logits = model.forward_head(f)
        assert torch.allclose(logits, model(x), atol=1e-5)
        pre = model.forward_head(f, pre_logits=True)
        assert pre.shape == (1, model.num_features)
    model.reset_classifier(7)
    assert model(x).shape == (1, 7)
    model.reset_classifier(0)
    assert model(x).shape == (1, model.num_features)


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_features_only(name, kw):
    ref = _build(name, kw)
    info = ref.feature_info
    assert [i["reduction"] for i in info] == [4, 8, 16, 32]
    model = _build(name, kw, features_only=True, out_indices=(1, 3)).eval()
    feats = model(torch.randn(1, 3, IMG, IMG))
    assert len(feats) == 2
    fi = model.feature_info  # timm's FeatureInfo semantics: every stage's info, channels()/reduction() of outputs
    assert len(fi) == 4 and fi.out_indices == (1, 3)
    for f, c, r in zip(feats, fi.channels(), fi.reduction()):
        assert f.shape[1] == c
        assert f.shape[-1] == IMG // r
    assert fi.channels() == [info[1]["num_chs"], info[3]["num_chs"]]
    with pytest.raises(ValueError, match="out_indices"):
        _build(name, kw, features_only=True, out_indices=(5,))


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_train_deploy_parity(name, kw):
    model = randomize_bn_and_scales(_build(name, kw), seed=1).eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        y = model(x)
        deploy = lkvision.reparameterize(model)
        y2 = deploy(x)
        # idempotent: a second pass changes nothing
        y3 = lkvision.reparameterize(deploy)(x)
    scale = y.abs().max().clamp_min(1e-6)
    assert (y - y2).abs().max() / scale <= 1e-4
    assert (y2 - y3).abs().max() / scale <= 1e-6
    bns = [n for n, m in deploy.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    allowed = getattr(deploy, "deploy_batchnorms_allowed", False)
    assert allowed or not bns, f"BatchNorm left in deploy form: {bns[:5]}"


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_safetensors_roundtrip_and_mismatch(name, kw, tmp_path):
    model = randomize_bn_and_scales(_build(name, kw)).eval()
    path = save_weights(model, tmp_path / "w.safetensors")
    torch.manual_seed(123)
    other = lkvision.create_model(name, pretrained=str(path), **kw).eval()
    x = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        assert torch.equal(model(x), other(x))
    sd = dict(model.state_dict())
    key = next(iter(sd))
    sd.pop(key)
    sd["not.a.real.key"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e:
        load_weights(other, sd)
    assert key in str(e.value) and "not.a.real.key" in str(e.value)


@pytest.mark.parametrize("name,kw", CASES[:1], ids=IDS[:1])
def test_bad_inputs(name, kw):
    model = _build(name, kw).eval()
    with pytest.raises(ValueError, match="input channels"):
        model(torch.randn(1, 4, IMG, IMG))
    with pytest.raises(ValueError, match="4-D"):
        model(torch.randn(3, IMG, IMG))
    with pytest.raises(ValueError, match="too small"):
        model(torch.randn(1, 3, 8, 8))
    with pytest.raises(TypeError, match="floating"):
        model(torch.zeros(1, 3, IMG, IMG, dtype=torch.long))


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_grad_checkpointing_same_grads(name, kw):
    model = _build(name, kw, num_classes=5).eval()  # eval: no BN-stat / drop-path randomness
    x = torch.randn(1, 3, IMG, IMG)
    model(x).sum().backward()
    g1 = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        if n in g1:
            torch.testing.assert_close(p.grad, g1[n], rtol=1e-4, atol=1e-6)
