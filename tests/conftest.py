"""Shared fixtures: deterministic seeds and helpers used across the suite."""

from __future__ import annotations

import importlib
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

GOLDEN = Path(__file__).parent / "data" / "golden"


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)  # noqa: NPY002 - tests that use the legacy global RNG stay deterministic
    yield


def family_test_models() -> list[tuple[str, dict]]:
    """(name, kwargs) of every family's tiny CPU test configuration (module-level TEST_MODELS)."""
    from lkvision.models import families

    out = []
    for fam in families():
        mod = importlib.import_module(f"lkvision.models.{fam}")
        for name, kw in getattr(mod, "TEST_MODELS", {}).items():
            out.append((name, dict(kw)))
    return out


@torch.no_grad()
def randomize_bn_and_scales(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BN running stats/affine, layer scales and GRN params non-trivial values (as the golden files do),
    so that train/deploy parity tests exercise every fold."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        for pname in ("gamma", "beta"):
            p = getattr(m, pname, None)
            if isinstance(p, nn.Parameter) and p.dtype.is_floating_point:
                if pname == "gamma":
                    p.copy_(torch.rand(p.shape, generator=g) + 0.5)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def set_threads():
    if os.environ.get("LKV_TEST_THREADS"):
        torch.set_num_threads(int(os.environ["LKV_TEST_THREADS"]))


def golden_tensors(case: str, part: str = "") -> dict[str, torch.Tensor]:
    """Tensors of ``tests/data/golden/<case><part>.safetensors`` (part: "", ".deploy", ".features",
    ".sw_tables"). The golden files ship with the repository, so a missing one is a failure, never a skip."""
    from safetensors.torch import load_file

    path = GOLDEN / f"{case}{part}.safetensors"
    assert path.is_file(), f"golden file {path} is missing (it ships with the repository)"
    return load_file(str(path))


def golden_meta(case: str) -> dict:
    """The JSON metadata of a golden case (constructor kwargs, counts, listings)."""
    import json

    return json.loads((GOLDEN / f"{case}.json").read_text())


@torch.no_grad()
def assert_features_match(model: nn.Module, x: torch.Tensor, feats: dict[str, torch.Tensor], tol: float = 1e-5) -> None:
    """Compare a ConvNeXt-macro model (stem/downsample + stages + head norm) stage by stage with a golden
    ``<case>.features`` file (official module names ``downsample_layers.i``, ``stages.i.j``, ``norm``), with
    ``atol = tol * max(1, max |feature|)``; localises a mismatch to the first module that differs."""
    ours = {}
    for i, (pre, stage) in enumerate(model.stage_pairs()):
        x = pre(x)
        ours[f"downsample_layers.{i}"] = x
        for j, block in enumerate(stage):
            x = block(x)
            ours[f"stages.{i}.{j}"] = x
    ours["norm"] = model.forward_head(x, pre_logits=True)
    assert set(ours) == set(feats)
    for k, ref in feats.items():
        assert (ours[k] - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item()), k
