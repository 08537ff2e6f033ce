"""Official RepLKNet golden vectors (tests/data/golden/replknet_dev*): train form, deploy form, both loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lkvision
from lkvision.compat import from_official
from lkvision.compat.replknet import MODEL_KWARGS, convert_state_dict, model_kwargs_from_official
from lkvision.models import CheckpointError

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"
TOL = 1e-5


def _load(name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(GOLDEN / name))


@pytest.fixture(scope="module")
def golden():
    meta = json.loads((GOLDEN / "replknet_dev.json").read_text())
    return meta["constructor"]["kwargs"], _load("replknet_dev.safetensors")


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max())


def test_train_form_and_our_deploy_form(golden):
    kwargs, sd = golden
    model = from_official("replknet", sd, **kwargs)
    x = sd["__input__"]
    with torch.no_grad():
        assert _max_diff(model(x), sd["__output__"]) <= TOL
        deploy = lkvision.reparameterize(model)
        assert _max_diff(deploy(x), sd["__output_deploy__"]) <= TOL
    assert not [n for n, m in deploy.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]


def test_features_localised(golden):
    """Every official intermediate output (stem layers, blocks, transitions, head BN) is reproduced."""
    kwargs, sd = golden
    model = from_official("replknet", sd, **kwargs)
    feats = _load("replknet_dev.features.safetensors")
    ours = {}
    names = {f"stem.{i}": model.stem[i] for i in range(4)}
    for i, stage in enumerate(model.stages):
        for j, blk in enumerate(stage):
            names[f"stages.{i}.blocks.{j}"] = blk
    for i, t in enumerate(model.transitions):
        names[f"transitions.{i}"] = t
    names["norm"] = model.head.norm
    hooks = [m.register_forward_hook(lambda _m, _i, o, k=k: ours.__setitem__(k, o)) for k, m in names.items()]
    with torch.no_grad():
        model(sd["__input__"])
    for h in hooks:
        h.remove()
    keys = [k for k in feats if not k.startswith("__")]
    assert set(keys) <= set(ours)
    for k in keys:
        ref = feats[k]
        assert _max_diff(ours[k], ref) <= TOL * max(1.0, float(ref.abs().max())), k


def test_official_deploy_checkpoint(golden):
    kwargs, _ = golden
    sd = _load("replknet_dev.deploy.safetensors")
    model = from_official("replknet", sd, **kwargs)
    x = sd["__input__"]
    with torch.no_grad():
        assert _max_diff(model(x), sd["__output_deploy__"]) <= TOL
        assert _max_diff(lkvision.reparameterize(model)(x), sd["__output_deploy__"]) <= TOL


def test_wrong_kwargs_or_keys_are_clear_errors(golden):
    kwargs, sd = golden
    with pytest.raises(CheckpointError, match="shape mismatch"):
        from_official("replknet", sd, **{**kwargs, "large_kernel_sizes": [13, 11, 9, 7]})
    bad = {k: v for k, v in sd.items() if "small_conv" not in k}
    with pytest.raises(CheckpointError, match="missing keys"):
        from_official("replknet", bad, **kwargs)
    with pytest.raises(ValueError, match="not both"):
        model_kwargs_from_official(**{**kwargs, "out_indices": [0, 1, 2, 3]})


def test_backbone_form_and_key_map(golden):
    kwargs, sd = golden
    kw = {**kwargs, "num_classes": None, "out_indices": [1, 3], "norm_intermediate_features": True}
    sd = dict(sd)
    for i, c in enumerate(kwargs["channels"]):  # an official backbone checkpoint has per-stage norms
        for p in ("weight", "bias", "running_mean", "running_var"):
            sd[f"stages.{i}.norm.{p}"] = torch.full((c,), 1.0 if p in ("weight", "running_var") else 0.0)
        sd[f"stages.{i}.norm.num_batches_tracked"] = torch.tensor(0)
    model = from_official("replknet", sd, **kw)
    assert model.features_only and model.out_indices == (1, 3)
    feats = model(sd["__input__"])
    assert [f.shape[1] for f in feats] == [32, 128]
    m = convert_state_dict({"stages.2.blocks.3.preffn_bn.weight": 0, "head.weight": 0, "norm.bias": 0})
    assert set(m) == {"stages.2.3.norm.weight", "head.fc.weight", "head.norm.bias"}


def test_model_kwargs_table_matches_registry():
    for name, kw in MODEL_KWARGS.items():
        ours = model_kwargs_from_official(**kw)
        from lkvision.models.replknet import model_cfgs as CONFIGS

        cfg = CONFIGS[name]
        assert tuple(cfg["large_kernel_sizes"]) == ours["large_kernel_sizes"]
        assert tuple(cfg["channels"]) == ours["channels"] and tuple(cfg["layers"]) == ours["layers"]
        assert cfg.get("small_kernel") == ours["small_kernel"]
        assert cfg.get("dw_ratio", 1) == ours["dw_ratio"]
