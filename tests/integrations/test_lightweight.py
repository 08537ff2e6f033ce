"""The lightweight dense-prediction paths: segmentation_models_pytorch (``tu-*`` encoders) and Hugging Face
transformers (``UperNetForSemanticSegmentation`` with a ``TimmBackbone``), both through timm's ``features_only``
API. Channels and strides must be lkvision's ``feature_info``, the maps lkvision's stage outputs, and training
(loss + backward) must reach every backbone parameter."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lkvision
from conftest import randomize_bn_and_scales
from lkvision._timm import timm_name

from ._helpers import require

DOCS = Path(__file__).resolve().parents[2] / "docs" / "downstream.md"
SRC = str(Path(lkvision.__file__).resolve().parents[1])
CLASSES = 5
SIZE = 64


def _one_per_family() -> list[str]:
    """The first tiny test configuration without extra arguments of every family (sw_femto for ShiftWise)."""
    out = []
    for fam in lkvision.models.families():
        tests = getattr(importlib.import_module(f"lkvision.models.{fam}"), "TEST_MODELS", {})
        out += [next(name for name, kw in tests.items() if not kw)]
    return out


FAMILIES = _one_per_family()
# sw_femto in the default suite; one tiny configuration of every other family in the slow one
CASES = [pytest.param(n, marks=() if n == "sw_femto" else pytest.mark.slow) for n in FAMILIES]


@pytest.fixture(scope="module")
def smp():
    return require("segmentation_models_pytorch", "lightweight")


@pytest.fixture(scope="module")
def hf():
    return require("transformers", "lightweight")


def _timm(name: str) -> str:
    """timm's name of an lkvision model (lkvision registers its models when timm is imported)."""
    import timm  # noqa: F401

    return timm_name(name)


def _reference(name: str) -> lkvision.models.FeatureInfo:
    return lkvision.create_model(name, features_only=True).feature_info


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, SIZE, SIZE, generator=g), torch.randint(0, CLASSES, (2, SIZE, SIZE), generator=g)


def _assert_trains_every_parameter(module: torch.nn.Module, what: str) -> None:
    missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{what}: parameters without a gradient (unused in forward): {missing[:6]}"
    bad = [n for n, p in module.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"{what}: non-finite gradients in {bad[:6]}"


# --------------------------------------------------------------------------------- segmentation_models_pytorch
@pytest.mark.parametrize("arch", ["UPerNet", "FPN"])
@pytest.mark.parametrize("name", CASES)
def test_smp_trains_with_lkvision_channels_and_strides(smp, name, arch):
    info = _reference(name)
    model = getattr(smp, arch)(encoder_name=f"tu-{_timm(name)}", encoder_weights=None, classes=CLASSES)
    # smp's view of the encoder: the input, an empty stride-2 map (strides start at 4), then lkvision's outputs
    assert model.encoder.out_channels == [3, 0, *info.channels()]
    x, labels = _batch()
    feats = model.encoder(x)
    assert [tuple(f.shape) for f in feats[2:]] == [(2, c, SIZE // r, SIZE // r)
                                                   for c, r in zip(info.channels(), info.reduction())]
    logits = model(x)
    assert logits.shape == (2, CLASSES, SIZE, SIZE)
    F.cross_entropy(logits, labels).backward()
    _assert_trains_every_parameter(model.encoder, f"{arch}/{name} encoder")


@pytest.mark.parametrize("name", ["sw_femto", pytest.param("unireplknet_test", marks=pytest.mark.slow)])
def test_smp_features_are_lkvision_stage_outputs(smp, name):
    """smp's encoder maps are lkvision's stage outputs (raw by default; with ``feature_cfg=dict(norm=True)`` those
    of ``lkvision.create_model(features_only=True)``, i.e. through the official per-output norms)."""
    x, _ = _batch()
    raw = smp.FPN(encoder_name=f"tu-{name}", encoder_weights=None, classes=CLASSES).eval()
    normed = smp.FPN(encoder_name=f"tu-{name}", encoder_weights=None, classes=CLASSES,
                     feature_cfg=dict(norm=True)).eval()
    ref = lkvision.create_model(name, features_only=True).eval()
    randomize_bn_and_scales(ref)
    for p in ref.feature_norms.parameters():  # identity-initialised norms would hide a skipped norm
        torch.nn.init.normal_(p, 0.5, 0.1)
    normed.encoder.model.model.load_state_dict(ref.state_dict())  # the same modules, strict
    raw.encoder.model.model.load_state_dict(ref.state_dict(), strict=False)  # raw: the norms are pruned
    assert not any(k.startswith("feature_norms.") for k in raw.encoder.model.model.state_dict())
    with torch.no_grad():
        expect_normed = ref(x)
        expect_raw = ref.forward_intermediates(x, intermediates_only=True)
        got_normed, got_raw = normed.encoder(x)[2:], raw.encoder(x)[2:]
    for a, b, c, d in zip(got_normed, expect_normed, got_raw, expect_raw):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        torch.testing.assert_close(c, d, atol=0, rtol=0)
        assert not torch.allclose(a, c)


def test_smp_pretrained_weights_preprocessing_and_errors(smp, tmp_path):
    """``encoder_weights=True`` + ``pretrained_cfg_overlay=dict(file=...)`` loads an official checkpoint through
    lkvision's loader; the preprocessing params come from lkvision's cfgs; no weights -> lkvision's error."""
    from lkvision.compat.shiftwise import to_official

    src = randomize_bn_and_scales(lkvision.create_model("sw_femto"))
    path = tmp_path / "checkpoint-best.pth"
    torch.save({"model": to_official(src), "epoch": 299}, path)
    model = smp.UPerNet(encoder_name="tu-sw_femto", encoder_weights=True, classes=CLASSES,
                        pretrained_cfg_overlay=dict(file=str(path)))
    ours = model.encoder.model.model.state_dict()
    expect = src.state_dict()
    assert ours and all(torch.equal(v, expect[k]) for k, v in ours.items()), "weights differ from the file"

    params = smp.encoders.get_preprocessing_params("tu-unireplknet_t")
    cfg = lkvision.models.get_pretrained_cfg("unireplknet_t")
    assert list(params["mean"]) == list(cfg["mean"]) and list(params["std"]) == list(cfg["std"])
    with pytest.raises(ValueError, match="no downloadable weights for sw_femto"):
        smp.UPerNet(encoder_name="tu-sw_femto", classes=CLASSES)  # smp's default encoder_weights="imagenet"
    with pytest.raises(ValueError, match="output_stride=16 is not supported"):
        smp.DeepLabV3Plus(encoder_name="tu-sw_femto", encoder_weights=None, classes=CLASSES)


def test_smp_save_and_load_pretrained(smp, tmp_path):
    model = smp.FPN(encoder_name="tu-sw_femto", encoder_weights=None, classes=CLASSES)
    randomize_bn_and_scales(model)
    model.save_pretrained(str(tmp_path / "fpn"))
    again = smp.from_pretrained(str(tmp_path / "fpn"))
    x, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), model.eval()(x), atol=0, rtol=0)


# ------------------------------------------------------------------------------------ Hugging Face transformers
def _hf_upernet(hf, name: str, out_indices=(0, 1, 2, 3), seed: int | None = None, **backbone):
    chs = _reference(name).channels(list(out_indices))  # the auxiliary head reads the third output
    cfg = hf.UperNetConfig(
        backbone_config=hf.TimmBackboneConfig(backbone=_timm(name), out_indices=out_indices, **backbone),
        num_labels=CLASSES, hidden_size=32, auxiliary_in_channels=chs[2])
    if seed is not None:
        torch.manual_seed(seed)
    return hf.UperNetForSemanticSegmentation(cfg)


@pytest.mark.parametrize("name", CASES)
def test_transformers_upernet_trains_with_lkvision_channels(hf, name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import timm

    info = _reference(name)
    torch.manual_seed(0)
    alone = timm.create_model(_timm(name), features_only=True, out_indices=(0, 1, 2, 3))
    model = _hf_upernet(hf, name, seed=0)
    # UperNet's weight init (post_init) leaves the backbone's own (lkvision) initialisation alone
    ref = alone.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.backbone._backbone.state_dict().items())
    assert model.backbone.channels == info.channels()
    assert model.backbone.stage_names == [d["module"] for d in info]
    x, labels = _batch()
    maps = model.backbone(x).feature_maps
    assert [tuple(f.shape) for f in maps] == [(2, c, SIZE // r, SIZE // r)
                                              for c, r in zip(info.channels(), info.reduction())]
    out = model(pixel_values=x, labels=labels)
    assert out.logits.shape == (2, CLASSES, SIZE, SIZE) and torch.isfinite(out.loss)
    out.loss.backward()
    _assert_trains_every_parameter(model.backbone, f"UperNet/{name} backbone")


def test_transformers_outputs_weights_and_round_trip(hf, tmp_path, monkeypatch):
    """A subset of outputs, lkvision weights loaded as docs/downstream.md shows, save_pretrained /
    from_pretrained (BN statistics and SW buffers survive), frozen BatchNorms."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import timm

    x, labels = _batch()
    info = _reference("sw_femto")
    model = _hf_upernet(hf, "sw_femto", out_indices=(1, 2, 3))
    assert model.backbone.channels == info.channels([1, 2, 3])
    assert model(pixel_values=x, labels=labels).logits.shape == (2, CLASSES, SIZE, SIZE)

    src = randomize_bn_and_scales(lkvision.create_model("sw_femto"))  # BN statistics must arrive too
    path = tmp_path / "sw_femto.safetensors"
    lkvision.save_weights(src, path)
    model = _hf_upernet(hf, "sw_femto")
    weights = timm.create_model("sw_femto", features_only=True, out_indices=(0, 1, 2, 3), pretrained=True,
                                pretrained_cfg_overlay=dict(file=str(path)))
    model.backbone._backbone.load_state_dict(weights.state_dict())
    expect = src.state_dict()
    assert all(torch.equal(v, expect[k]) for k, v in model.backbone._backbone.model.state_dict().items())
    model.eval()
    with torch.no_grad():
        maps = model.backbone(x).feature_maps
        for a, b in zip(maps, src.eval().forward_intermediates(x, intermediates_only=True)):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    model.save_pretrained(str(tmp_path / "upernet"))
    again = hf.UperNetForSemanticSegmentation.from_pretrained(str(tmp_path / "upernet")).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(pixel_values=x).logits, model(pixel_values=x).logits, atol=0, rtol=0)

    frozen = _hf_upernet(hf, "replknet_nano", freeze_batch_norm_2d=True)
    kinds = {type(m).__name__ for m in frozen.backbone.modules()}
    assert "FrozenBatchNorm2d" in kinds and "BatchNorm2d" not in kinds
    frozen(pixel_values=x, labels=labels).loss.backward()


# ------------------------------------------------------------------------------------------------------ docs
def _lightweight_snippets() -> list[str]:
    text = DOCS.read_text()
    section = text[text.index("## Lightweight paths"):text.index("**torchvision detection**")]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.slow  # a fresh interpreter importing smp + transformers, and sw_tiny in smp's UPerNet: ~20 s
def test_docs_snippets_run_as_written(smp, hf, tmp_path):
    """docs/downstream.md's lightweight snippets, verbatim, in a fresh interpreter (only ``import lkvision``
    registers the models); the files marked ``# needs your file`` get stand-ins of the same format first."""
    from lkvision.compat.shiftwise import to_official

    snippets = _lightweight_snippets()
    assert len(snippets) == 2
    makers = {
        "checkpoint-best.pth": lambda p: torch.save({"model": to_official(lkvision.create_model("sw_tiny"))}, p),
        "sw_femto.safetensors": lambda p: lkvision.save_weights(lkvision.create_model("sw_femto"), p),
    }
    for line in "\n".join(snippets).splitlines():
        if "# needs your file" in line:
            names = [n for n in makers if f'"{n}"' in line]
            assert names, f"no stand-in for the file in: {line.strip()}"
            for n in names:
                makers[n](tmp_path / n)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    printed = []
    for code in snippets:
        r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"snippet failed:\n{code}\n{r.stderr[-3000:]}"
        printed.append(r.stdout)
    assert "[3, 0, 16, 32, 48, 64]" in printed[0]  # the out_channels the smp snippet states
