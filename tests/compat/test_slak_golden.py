"""SLaK vs the official implementation (golden vectors in tests/data/golden, see its README)."""

from __future__ import annotations

import pytest
import torch

import lkvision
from conftest import assert_features_match, golden_meta, golden_tensors
from lkvision.compat import from_official
from lkvision.compat.slak import MODEL_KWARGS, official_to_model_kwargs
from lkvision.layers import StripConv
from lkvision.models import CheckpointError

CASE = "slak_dev"
TOL = 1e-5


def _load(suffix: str = "") -> dict[str, torch.Tensor]:
    return golden_tensors(CASE, suffix)


def _kwargs() -> dict:
    return golden_meta(CASE)["constructor"]["kwargs"]


def _strip(sd):
    return {k: v for k, v in sd.items() if not (k.startswith("__") and k.endswith("__"))}


@pytest.fixture(scope="module")
def train_model():
    sd = _load()
    return from_official("slak", sd, **_kwargs()), sd


def test_train_form_reproduces_output(train_model):
    model, sd = train_model
    with torch.no_grad():
        y = model(sd["__input__"])
    assert (y - sd["__output__"]).abs().max().item() <= TOL
    ref = golden_meta(CASE)["num_parameters"]
    assert sum(p.numel() for p in model.parameters()) == ref


def test_features_match_stage_by_stage(train_model):
    model, sd = train_model
    assert_features_match(model, sd["__input__"], _load(".features"), TOL)


@pytest.mark.parametrize("dense", [False, True], ids=["two_strips", "dense"])
def test_our_deploy_forms_reproduce_the_output(train_model, dense):
    model, sd = train_model
    for m in model.modules():
        if isinstance(m, StripConv):
            m.deploy_dense = dense
    deploy = lkvision.reparameterize(model)
    convs = [m for m in deploy.modules() if isinstance(m, StripConv)]
    assert all((m.dense is not None) == dense and m.small is None for m in convs)
    with torch.no_grad():
        y = deploy(sd["__input__"])
    assert (y - sd["__output__"]).abs().max().item() <= TOL


def test_kwargs_translation():
    kw = official_to_model_kwargs(**_kwargs())
    assert kw["dims"] == (20, 41, 62, 83) and kw["kernel_sizes"] == (13, 11, 9, 7) and kw["small_kernel"] == 5
    t = official_to_model_kwargs(**MODEL_KWARGS["slak_t"])
    assert t["dims"] == (124, 249, 499, 998) and t["kernel_sizes"] == (51, 49, 47, 13)
    assert set(MODEL_KWARGS) <= set(lkvision.list_models("slak_*"))


def test_errors():
    sd = _strip(_load())
    with pytest.raises(CheckpointError, match="pass Decom=True"):
        from_official("slak", sd, **{**_kwargs(), "Decom": False})
    with pytest.raises(CheckpointError, match="shape mismatch"):
        from_official("slak", sd, **{**_kwargs(), "kernel_size": [15, 11, 9, 7, 5]})
    sd.pop("stages.0.0.large_kernel.small_conv.conv.weight")
    with pytest.raises(CheckpointError, match=r"stages\.0\.0\.large_kernel\.small\.conv\.weight"):
        from_official("slak", sd, **_kwargs())
    with pytest.raises(TypeError, match="unknown official SLaK arguments"):
        from_official("slak", sd, **_kwargs(), sparsity=0.4)


def test_early_release_names_decom1_decom2_are_accepted(train_model):
    model, sd = train_model
    old = {k.replace("LoRA1", "Decom1").replace("LoRA2", "Decom2"): v for k, v in _strip(sd).items()}
    other = from_official("slak", old, **_kwargs())
    with torch.no_grad():
        assert torch.equal(other(sd["__input__"]), model(sd["__input__"]))
