"""SLaK's dense form (official ``Decom=False``) vs the official implementation: golden case ``slak_dense_dev``
(dense M x M + 3 x 3 small kernel, BN after each; its official deploy form is ``merge_kernel()``)."""

from __future__ import annotations

import pytest
import torch

import lkvision
from conftest import assert_features_match, golden_meta, golden_tensors
from lkvision.compat import from_official
from lkvision.compat.slak import official_to_model_kwargs
from lkvision.layers import ReparamLargeKernelConv, StripConv
from lkvision.models import CheckpointError

CASE = "slak_dense_dev"
TOL = 1e-5


def _kwargs() -> dict:
    return golden_meta(CASE)["constructor"]["kwargs"]


def _strip(sd):
    return {k: v for k, v in sd.items() if not (k.startswith("__") and k.endswith("__"))}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max())


@pytest.fixture(scope="module")
def train_model():
    sd = golden_tensors(CASE)
    return from_official("slak", sd, **_kwargs()), sd


def test_train_form_reproduces_output(train_model):
    model, sd = train_model
    assert not any(isinstance(m, StripConv) for m in model.modules())
    lks = [m for m in model.modules() if isinstance(m, ReparamLargeKernelConv)]
    assert len(lks) == 5 and all(m.small_kernel == (3, 3) for m in lks)
    with torch.no_grad():
        assert _max_diff(model(sd["__input__"]), sd["__output__"]) <= TOL
    assert sum(p.numel() for p in model.parameters()) == golden_meta(CASE)["num_parameters"]


def test_features_match_stage_by_stage(train_model):
    model, sd = train_model
    assert_features_match(model, sd["__input__"], golden_tensors(CASE, ".features"), TOL)


def test_our_deploy_form_reproduces_both_outputs(train_model):
    model, sd = train_model
    deploy = lkvision.reparameterize(model)
    assert not [n for n, m in deploy.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert all(m.is_merged for m in deploy.modules() if isinstance(m, ReparamLargeKernelConv))
    x = sd["__input__"]
    with torch.no_grad():
        y = deploy(x)
    assert _max_diff(y, sd["__output__"]) <= TOL
    assert _max_diff(y, sd["__output_deploy__"]) <= TOL


def test_official_deploy_checkpoint_loads(train_model):
    """The state dict after the official ``merge_kernel()`` (``lkb_reparam``) loads into our merged model."""
    model, _ = train_model
    dsd = golden_tensors(CASE, ".deploy")
    assert any(".lkb_reparam." in k for k in dsd) and not any(".lkb_origin." in k for k in dsd)
    official_deploy = from_official("slak", dsd, **_kwargs())
    x = dsd["__input__"]
    with torch.no_grad():
        assert _max_diff(official_deploy(x), dsd["__output_deploy__"]) <= TOL
        assert _max_diff(lkvision.reparameterize(official_deploy)(x), dsd["__output_deploy__"]) <= TOL
    # same merged kernels as our own re-parameterisation of the train form
    ours = lkvision.reparameterize(model).state_dict()
    for k, v in official_deploy.state_dict().items():
        if k.endswith(("large_kernel.conv.weight", "large_kernel.conv.bias")):
            assert _max_diff(v, ours[k]) <= 1e-6, k
    assert sum(p.numel() for p in official_deploy.parameters()) == golden_meta(CASE)["deploy"]["num_parameters"]


def test_kwargs_translation():
    kw = official_to_model_kwargs(**_kwargs())
    assert kw["decomposed"] is False and kw["kernel_sizes"] == (13, 11, 9, 7) and kw["small_kernel"] == 3
    assert kw["dims"] == (16, 32, 48, 64)
    no_decom = {k: v for k, v in _kwargs().items() if k != "Decom"}
    assert official_to_model_kwargs(**no_decom)["decomposed"] is False  # the official default Decom=None
    assert official_to_model_kwargs(**{**no_decom, "Decom": True})["decomposed"] is True


def test_wrong_form_and_missing_keys_are_named():
    sd = _strip(golden_tensors(CASE))
    with pytest.raises(CheckpointError, match="pass Decom=False"):
        from_official("slak", sd, **{**_kwargs(), "Decom": True})
    with pytest.raises(CheckpointError, match="shape mismatch"):
        from_official("slak", sd, **{**_kwargs(), "kernel_size": [15, 11, 9, 7, 3]})
    sd.pop("stages.2.1.large_kernel.lkb_origin.bn.running_var")
    with pytest.raises(CheckpointError, match=r"stages\.2\.1\.large_kernel\.large\.bn\.running_var"):
        from_official("slak", sd, **_kwargs())
