"""Helpers shared by the analysis/bench tests: the smallest registered Shiftwise test model."""

from __future__ import annotations

import json


def tiny_sw() -> tuple[str, dict]:
    """(name, kwargs) of a tiny registered Shiftwise model from the family's TEST_MODELS."""
    from lkvision.models.shiftwise import TEST_MODELS as tm

    name = "sw_pico" if "sw_pico" in tm else next(iter(tm))
    return name, dict(tm[name])


def kwargs_arg(kw: dict) -> list[str]:
    return ["--model-kwargs", json.dumps(kw)] if kw else []
