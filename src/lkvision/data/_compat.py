"""Make ``import torchvision`` (and therefore ``import timm``) work when torchvision's C++ ops cannot load.

Why this module exists
----------------------
Some environments pair a torchvision wheel with a torch build whose ABI it was not compiled for (here:
torchvision 0.28.0 with torch 2.13.0+cpu). torchvision then silently fails to load its ``_C`` extension,
so the ``torchvision::*`` operator schemas are never defined -- and ``torchvision/_meta_registrations.py``
unconditionally calls ``torch.library.register_fake("torchvision::nms")``, which raises
``RuntimeError: operator torchvision::nms does not exist`` and aborts ``import torchvision``.

The transforms, datasets and timm's data pipeline never call those detection operators. So, *only when the
import fails with exactly that error*, :func:`ensure_torchvision` defines the missing schema (no kernel: the
op still raises "no kernel registered" if anyone calls it) and imports again. When torchvision's extension
loads normally this module does nothing. Which operators are missing is found by trying: each failing import
names one operator; we define it from :data:`_SCHEMAS` and retry.

Nothing else in lkvision touches torchvision internals; call :func:`ensure_torchvision` before importing
``torchvision`` or ``timm`` (``lkvision.data`` does this for you).
"""

from __future__ import annotations

import importlib
import re
import sys

__all__ = ["ensure_torchvision", "defined_schemas"]

# Schemas of torchvision's C++ operators (from torchvision/csrc/ops/*.cpp). In torchvision 0.28.0 only
# ``nms`` and ``qnms`` are needed (every other meta/autograd registration is guarded by ``_has_ops()``);
# the rest are listed so that a neighbouring torchvision release that needs them also imports.
_SCHEMAS: dict[str, str] = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align": ("roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
                  "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor"),
    "roi_pool": ("roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
                 "SymInt pooled_width) -> (Tensor, Tensor)"),
    "ps_roi_align": ("ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
                     "SymInt pooled_width, int sampling_ratio) -> (Tensor, Tensor)"),
    "ps_roi_pool": ("ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
                    "SymInt pooled_width) -> (Tensor, Tensor)"),
    "deform_conv2d": ("deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, "
                      "SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, "
                      "SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) -> Tensor"),
}

_MISSING_OP = re.compile(r"operator torchvision::(\w+) does not exist")
_LIB = None  # the torch.library.Library holding our definitions (kept alive for the process lifetime)
_DEFINED: list[str] = []


def defined_schemas() -> list[str]:
    """Names of the ``torchvision::`` operators this module had to define (empty when none were needed)."""
    return list(_DEFINED)


def _define(op: str) -> None:
    global _LIB
    import torch

    if op not in _SCHEMAS:
        raise RuntimeError(
            f"torchvision failed to import because operator torchvision::{op} is missing and lkvision has no "
            "schema for it; install a torchvision build that matches your torch "
            f"(torch {torch.__version__})"
        )
    if _LIB is None:
        _LIB = torch.library.Library("torchvision", "FRAGMENT")  # noqa: TOR901 - process-lifetime library
    _LIB.define(_SCHEMAS[op])
    _DEFINED.append(op)


def _drop_partial_modules() -> None:
    # A failed import leaves submodules (torchvision.extension, ...) in sys.modules; drop them so the retry
    # re-executes the package top to bottom. The loaded ``extension`` state is harmless to re-run.
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def ensure_torchvision():
    """Import torchvision, defining missing operator schemas first if (and only if) the import needs them.

    Returns the ``torchvision`` module. Raises the original error for any other import failure.
    """
    if "torchvision" in sys.modules and hasattr(sys.modules["torchvision"], "transforms"):
        return sys.modules["torchvision"]
    for _ in range(len(_SCHEMAS) + 1):
        try:
            return importlib.import_module("torchvision")
        except RuntimeError as e:
            m = _MISSING_OP.search(str(e))
            if m is None or m.group(1) in _DEFINED:
                raise
            _drop_partial_modules()
            _define(m.group(1))
    raise RuntimeError("could not import torchvision")  # pragma: no cover - loop bound exhausted
