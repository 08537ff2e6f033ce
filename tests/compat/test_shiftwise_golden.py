"""Golden parity with the official ShiftWise_v2 (tests/data/golden/sw_dev.*, produced by the official code)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import lkvision
from conftest import GOLDEN
from lkvision.compat import from_official
from lkvision.compat.shiftwise import MODEL_KWARGS, to_official
from lkvision.models import CheckpointError

TOL = 1e-5


@pytest.fixture(scope="module")
def case():
    meta = json.loads((GOLDEN / "sw_dev.json").read_text())
    tensors = load_file(str(GOLDEN / "sw_dev.safetensors"))
    sd = {k: v for k, v in tensors.items() if not (k.startswith("__") and k.endswith("__"))}
    return meta["constructor"]["kwargs"], sd, tensors


@pytest.fixture(scope="module")
def model(case):
    kwargs, sd, _ = case
    return from_official("shiftwise", sd, **kwargs).eval()


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def test_train_form_logits(model, case):
    _, _, t = case
    with torch.no_grad():
        assert _maxdiff(model(t["__input__"]), t["__output__"]) <= TOL


def test_features_match_official_modules(model, case):
    _, _, t = case
    feats = load_file(str(GOLDEN / "sw_dev.features.safetensors"))
    ours = {"downsample_layers.0": model.stem, "norm": model.norm}
    ours.update({f"downsample_layers.{i + 1}": d for i, d in enumerate(model.downsamples)})
    ours.update({f"stages.{i}.{j}": b for i, s in enumerate(model.stages) for j, b in enumerate(s)})
    got = {}
    hooks = [m.register_forward_hook(lambda _m, _i, o, n=n: got.__setitem__(n, o)) for n, m in ours.items()]
    try:
        with torch.no_grad():
            model(t["__input__"])
    finally:
        for h in hooks:
            h.remove()
    assert set(feats) == set(got)
    for name, ref in feats.items():
        assert _maxdiff(got[name], ref) <= TOL * max(1.0, float(ref.abs().max())), name


def test_full_deploy_form_matches_official_deploy_output(model, case):
    _, _, t = case
    deploy = lkvision.reparameterize(model)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in deploy.modules())
    with torch.no_grad():
        assert _maxdiff(deploy(t["__input__"]), t["__output_deploy__"]) <= TOL


def test_official_deploy_checkpoint(case):
    kwargs, _, _ = case
    dep = load_file(str(GOLDEN / "sw_dev.deploy.safetensors"))
    m = from_official("sw", dep, **kwargs).eval()
    assert m.stages[0][0].sw_conv.num_branches == 1
    with torch.no_grad():
        assert _maxdiff(m(dep["__input__"]), dep["__output_deploy__"]) <= TOL
    # and back: the merged model exports the official deploy keys
    off = to_official(m)
    want = {k for k in dep if not k.startswith("__")}
    assert set(off) == want
    assert all(torch.equal(off[k], dep[k]) for k in want)


def test_tables_regenerated_bit_identical(model):
    tables = load_file(str(GOLDEN / "sw_dev.sw_tables.safetensors"))
    for i, stage in enumerate(model.stages):
        for blk in stage:
            sw = blk.sw_conv
            assert torch.equal(sw.pad_hv, tables[f"stages.{i}.pad_hv"])
            assert torch.equal(sw.idx_identit, tables[f"stages.{i}.idx_identit"])
            assert torch.equal(sw.rep_idx, tables[f"stages.{i}.rep"].long())
            assert torch.equal(sw.ghost_idx, tables[f"stages.{i}.ghost"].long())


def test_to_official_roundtrip(model, case):
    _, sd, _ = case
    off = to_official(model)
    assert set(off) == set(sd)
    assert all(torch.equal(off[k], sd[k]) for k in sd)


def test_golden_is_discriminative_bn_h_is_bn_lora1(case):
    # swapping the horizontal/vertical BN mapping must be detected (the golden README probe: 2.5e-3)
    kwargs, sd, t = case
    swapped = {}
    for k, v in sd.items():
        k2 = k.replace("bn_lora1", "@").replace("bn_lora2", "bn_lora1").replace("@", "bn_lora2")
        swapped[k2] = v
    m = from_official("sw", swapped, **kwargs).eval()
    with torch.no_grad():
        assert _maxdiff(m(t["__input__"]), t["__output__"]) > 100 * TOL


def test_missing_extra_keys_and_bad_arguments_are_named(case):
    kwargs, sd, _ = case
    bad = dict(sd)
    bad.pop("stages.2.1.se.up.bias")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): stages\.2\.1\.se\.up\.bias"):
        from_official("sw", bad, **kwargs)
    bad = dict(sd)
    bad["stages.0.0.large_kernel.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"stages\.0\.0\.large_kernel\.extra\.weight"):
        from_official("sw", bad, **kwargs)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        from_official("sw", sd, **{**kwargs, "kernel_size": [16, 11, 9, 7, 3]})
    with pytest.raises(CheckpointError, match="2 Rep branches"):
        from_official("sw", sd, **{**kwargs, "N_path": 3})
    # the official constructor takes **kwargs and ignores what it does not know: so do we, with a warning that
    # names it (a misspelt kernel_sizes would otherwise go unnoticed)
    with pytest.warns(UserWarning, match=r"ignoring ShiftWise_v2 arguments it does not use: \['kernel_sizes'\]"):
        from_official("sw", sd, **kwargs, kernel_sizes=[1])
    assert MODEL_KWARGS["sw_tiny"]["kernel_size"] == [51, 49, 47, 13, 3]
