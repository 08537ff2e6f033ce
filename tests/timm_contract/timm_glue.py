"""pytest plugin: timm's own ``tests/test_models.py`` (from the sdist of the installed timm, test bodies
unchanged) run on lkvision's models. ``bash tests/timm_contract/run.sh`` downloads the file and runs it with
``-p timm_glue``; nothing of timm's code is committed here.

What this plugin changes, and nothing else:

1. The model lists. ``timm.list_models`` / ``timm.list_pretrained`` (which test_models.py imports and calls
   at import time to parametrize its tests) answer with lkvision's models only: the tiny CPU configuration of
   every family (``TEST_MODELS`` entries without extra arguments) plus ``sw_tiny`` and ``unireplknet_t``.
   timm's name filters (``exclude_filters``, ``name_matches_cfg``, ``pretrained``, ``include_tags``) still
   apply; the ``module=`` filter (timm's list of *timm modules* implementing ``forward_intermediates`` and the
   getter feature wrapper) is dropped, because every lkvision model implements both.
2. Literal model lists. Tests of timm's generic API that name a few timm models (``REPOINTED``: pooling
   reset, grad checkpointing of features_only models, pruning, head width, stop_early) run on lkvision's tiny
   configurations instead (the other arguments of their parametrization: ``{}`` kwargs / ``True``). Tests of
   particular timm architectures (gcvit, naflexvit, swin, samvit, ...; or of their options such as
   ``output_stride``, which lkvision models do not support) are deselected. ``sw_tiny`` and
   ``unireplknet_t`` run only the cheap tests (``CHEAP_TESTS``: meta-device cfg checks, one forward,
   features, intermediates, FX forward); TorchScript tests are deselected: lkvision models are not
   scriptable (see docs/timm.md, "TorchScript"); so are the two tests that download pretrained weights (no
   network in CI; ``tests/models/test_pretrained.py`` covers ``pretrained=True`` from an offline hub cache).
3. timm's pytest markers are registered (timm's pyproject.toml declares them; ``timeout`` belongs to the
   pytest-timeout plugin, which timm's CI uses and this run does not).
"""

from __future__ import annotations

import importlib
from collections import Counter

import pytest

from lkvision.data._compat import ensure_torchvision

ensure_torchvision()  # torchvision (imported by timm) on a CPU-only torch build

import timm  # noqa: E402

import lkvision  # noqa: E402,F401  (registers lkvision's models with timm)
from lkvision._timm import timm_name  # noqa: E402
from lkvision.models import families  # noqa: E402


def _tiny_configs() -> list[str]:
    out = []
    for fam in families():
        mod = importlib.import_module(f"lkvision.models.{fam}")
        out += [name for name, kw in getattr(mod, "TEST_MODELS", {}).items() if not kw]
    return out


SMALL = [timm_name(n) for n in _tiny_configs()]
CHEAP_ONLY = [timm_name(n) for n in ("sw_tiny", "unireplknet_t")]
MODELS = set(SMALL + CHEAP_ONLY)
CHEAP_TESTS = {
    "test_model_default_cfgs", "test_model_forward", "test_model_forward_features",
    "test_model_forward_intermediates", "test_model_forward_intermediates_features", "test_model_forward_fx",
}
UNSUPPORTED = {
    "test_model_forward_torchscript": "TorchScript",
    "test_model_forward_fx_torchscript": "TorchScript",
    "test_model_forward_torchscript_with_features_fx": "TorchScript",
    # these download weights (CI has no network); tests/models/test_pretrained.py loads pretrained=True from an
    # offline Hugging Face cache instead
    "test_model_load_pretrained": "needs the network",
    "test_model_features_pretrained": "needs the network",
}
# generic-API tests with literal timm model lists -> lkvision's tiny configs (+ values of their other arguments)
REPOINTED = {
    "test_reset_classifier_keeps_pool": (),
    "test_features_only_grad_checkpointing_backward": (),
    "test_prune_intermediate_layers_params_used": (),
    "test_head_hidden_size": ({},),
    "test_catavgmax_unsupported": (),
    "test_forward_after_prune_intermediate_layers": (),
    "test_prune_intermediate_layers_last_feature": (True,),
    "test_prune_to_stem_feature": (),
    "test_forward_intermediates_stop_early_final_norm": ({},),
}
TIMM_MARKERS = ("base", "cfg", "cfg_nonstd", "forward", "backward", "features", "fxforward", "fxbackward",
                "torchscript", "timeout")

_list_models, _list_pretrained = timm.list_models, timm.list_pretrained


def list_models(filter="", module="", pretrained=False, exclude_filters="", name_matches_cfg=False,  # noqa: A002
                include_tags=None):
    """timm's list_models restricted to lkvision's test models (``module`` ignored, see the docstring)."""
    del module
    names = _list_models(filter=filter, pretrained=pretrained, exclude_filters=exclude_filters,
                         name_matches_cfg=name_matches_cfg, include_tags=include_tags)
    return [n for n in names if n.split(".")[0] in MODELS]


def list_pretrained(filter="", exclude_filters=""):  # noqa: A002
    return [n for n in _list_pretrained(filter, exclude_filters) if n.split(".")[0] in MODELS]


timm.list_models, timm.list_pretrained = list_models, list_pretrained
_deselected: Counter = Counter()


def pytest_configure(config):
    for marker in TIMM_MARKERS:
        config.addinivalue_line("markers", f"{marker}: timm's marker (declared in timm's pyproject.toml)")


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc):
    """Point the literal model lists of ``REPOINTED`` tests at lkvision's tiny configs (before pytest applies
    the ``parametrize`` marks)."""
    extra = REPOINTED.get(metafunc.function.__name__)
    if extra is None:
        return
    marks = metafunc.definition.own_markers
    for i, mark in enumerate(marks):
        names = mark.args[0] if mark.name == "parametrize" else ""
        if "model_name" in names:
            values = [(n, *extra) if extra else n for n in SMALL]
            marks[i] = pytest.mark.parametrize(names, values).mark


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        model = str(params.get("model_name", "")).split(".")[0]
        test = item.originalname
        if test in UNSUPPORTED:
            reason = UNSUPPORTED[test]
        elif model not in MODELS:
            reason = "tests a timm architecture"
        elif model in CHEAP_ONLY and test not in CHEAP_TESTS:
            reason = f"not a cheap test for {model}"
        else:
            keep.append(item)
            continue
        drop.append(item)
        _deselected[reason] += 1
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


def pytest_terminal_summary(terminalreporter):
    if _deselected:
        terminalreporter.write_line("timm_glue deselected: " + ", ".join(f"{n} {r}" for r, n in _deselected.items()))
