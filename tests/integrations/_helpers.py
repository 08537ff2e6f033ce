"""Helpers for the integration tests: the OpenMMLab stack is optional locally, required in CI."""

from __future__ import annotations

import importlib
import os

import pytest


def require(module: str, extra: str = "mm"):
    """Import ``module``; skip when it is missing -- except in CI (``CI`` set), where ``.ci/run`` installs the
    extras ``mm`` and ``lightweight`` and a missing package is a failure, never a skip."""
    from lkvision.data import ensure_torchvision

    ensure_torchvision()  # OpenMMLab, smp and transformers import torchvision
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if os.environ.get("CI"):
            raise AssertionError(f"{module} must be installed in CI (.ci/run installs lkvision[{extra}]): {e}") from e
        pytest.skip(f"{module} not installed (pip install 'lkvision[{extra}]')")
