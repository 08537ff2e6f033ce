"""UniRepLKNet vs the official implementation (golden vectors in tests/data/golden, see its README)."""

from __future__ import annotations

import pytest
import torch

import lkvision
from conftest import assert_features_match, golden_meta, golden_tensors
from lkvision.compat import from_official
from lkvision.compat.unireplknet import MODEL_KWARGS, convert_state_dict
from lkvision.models import CheckpointError

CASE = "unireplknet_dev"
TOL = 1e-5


def _shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _load(suffix: str = "") -> dict[str, torch.Tensor]:
    return golden_tensors(CASE, suffix)


def _kwargs() -> dict:
    return golden_meta(CASE)["constructor"]["kwargs"]


def _strip(sd):
    return {k: v for k, v in sd.items() if not (k.startswith("__") and k.endswith("__"))}


@pytest.fixture(scope="module")
def train_model():
    sd = _load()
    return from_official("unireplknet", sd, **_kwargs()), sd


def test_train_form_reproduces_output(train_model):
    model, sd = train_model
    with torch.no_grad():
        y = model(sd["__input__"])
    assert (y - sd["__output__"]).abs().max().item() <= TOL


def test_features_match_stage_by_stage(train_model):
    """Localises a mismatch: stem, every downsample, every block, final norm (official module names)."""
    model, sd = train_model
    assert_features_match(model, sd["__input__"], _load(".features"), TOL)


def test_our_deploy_form_reproduces_official_deploy_output(train_model):
    model, sd = train_model
    deploy = lkvision.reparameterize(model)
    with torch.no_grad():
        y = deploy(sd["__input__"])
    assert (y - sd["__output_deploy__"]).abs().max().item() <= TOL
    assert (y - sd["__output__"]).abs().max().item() <= TOL
    ref = golden_meta(CASE)["deploy"]["num_parameters"]
    assert sum(p.numel() for p in deploy.parameters()) == ref


def test_official_deploy_checkpoint_loads_into_our_deploy_form(train_model):
    dsd = _load(".deploy")
    model = from_official("unireplknet", dsd, **_kwargs())  # deploy form recognised from the keys
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    with torch.no_grad():
        y = model(dsd["__input__"])
    assert (y - dsd["__output_deploy__"]).abs().max().item() <= TOL
    # same structure as reparameterising our train form
    ours = lkvision.reparameterize(train_model[0])
    assert _shapes(ours) == _shapes(model)


def test_official_deploy_flag_builds_deploy_form():
    dsd = _strip(_load(".deploy"))
    kw = {**_kwargs(), "deploy": True}
    model = from_official("unireplknet", dsd, **kw)
    assert model.stages[1][0].fc2.bias is not None


def test_param_count_matches_official(train_model):
    ref = golden_meta(CASE)["num_parameters"]
    assert sum(p.numel() for p in train_model[0].parameters()) == ref


def test_downstream_feature_norms_are_mapped():
    sd = _strip(_load())
    for k in [k for k in sd if k.startswith(("norm.", "head."))]:
        sd.pop(k)
    for i, c in enumerate((16, 32, 64, 128)):
        sd[f"norm{i}.weight"] = torch.rand(c) + 0.5
        sd[f"norm{i}.bias"] = torch.zeros(c)
    kw = {**_kwargs(), "init_cfg": {"checkpoint": None}, "num_classes": None}  # official downstream mode
    model = from_official("unireplknet", sd, **kw)
    assert model.features_only and model.out_indices == (0, 1, 2, 3)
    assert torch.equal(model.feature_norms["2"].weight, sd["norm2.weight"])
    feats = model(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [16, 32, 64, 128]


def test_mismatched_checkpoint_is_a_clear_error():
    sd = _strip(_load())
    bad = {**_kwargs(), "dims": [16, 32, 64, 96]}
    with pytest.raises(CheckpointError, match="shape mismatch"):
        from_official("unireplknet", sd, **bad)
    sd.pop("stages.1.0.dwconv.dil_conv_k7_2.weight")
    with pytest.raises(CheckpointError, match=r"stages\.1\.0\.dwconv\.branches\.1\.conv\.weight"):
        from_official("unireplknet", sd, **_kwargs())
    with pytest.warns(UserWarning, match="ignoring official UniRepLKNet arguments"):
        with pytest.raises(CheckpointError):
            from_official("unireplknet", sd, **_kwargs(), not_an_arg=1)


def test_dilated_key_that_does_not_fit_the_kernel_size():
    sd = _strip(_load())
    sd["stages.1.0.dwconv.dil_conv_k9_9.weight"] = torch.zeros(32, 1, 9, 9)
    with pytest.raises(CheckpointError, match="dil_conv_k9_9"):
        from_official("unireplknet", sd, **_kwargs())


def test_model_kwargs_build_the_registered_models():
    for name, kw in MODEL_KWARGS.items():
        with torch.device("meta"):
            ours = lkvision.create_model(name)
        assert ours.depths == tuple(kw["depths"]) and ours.dims == tuple(kw["dims"])
    assert set(MODEL_KWARGS) <= set(lkvision.list_models("unireplknet_*"))
    assert convert_state_dict({"__input__": torch.zeros(1)}, ((3,),) * 4) == {}
