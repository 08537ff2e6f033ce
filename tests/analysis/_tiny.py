"""Helpers shared by the analysis/bench tests: the smallest registered Shiftwise test model."""

from __future__ import annotations

import json

import pytest


def tiny_sw() -> tuple[str, dict]:
    """(name, kwargs) of a tiny registered Shiftwise model from the family's TEST_MODELS."""
    mod = pytest.importorskip("lkvision.models.shiftwise")
    tm = getattr(mod, "TEST_MODELS", {})
    if not tm:
        pytest.skip("lkvision.models.shiftwise has no TEST_MODELS")
    name = "sw_pico" if "sw_pico" in tm else next(iter(tm))
    return name, dict(tm[name])


def kwargs_arg(kw: dict) -> list[str]:
    return ["--model-kwargs", json.dumps(kw)] if kw else []
