"""lkvision.utils.rebind: the module-attribute swap behind plain_dwconv / plain_pytorch."""

import types

import pytest

from lkvision.utils import rebind


def _fast():
    return "fast"


def _ref():
    return "ref"


def _other():
    return "other"


@pytest.fixture
def modules(monkeypatch):
    """Two lkvision modules holding ``_fast`` (as if imported with ``from ... import``) and one outside."""
    import sys

    mods = {}
    for name in ("lkvision._rebind_home", "lkvision._rebind_user", "not_lkvision_rebind"):
        mod = types.ModuleType(name)
        mod.fn, mod.keep = _fast, _other
        monkeypatch.setitem(sys.modules, name, mod)
        mods[name] = mod
    return mods


def test_rebind_swaps_every_lkvision_binding_and_restores(modules):
    home, user, outside = modules.values()
    with rebind([(_fast, _ref)]):
        assert home.fn is _ref and user.fn is _ref
        assert outside.fn is _fast  # only lkvision.* modules are touched
        assert home.keep is _other
    assert home.fn is _fast and user.fn is _fast and outside.fn is _fast


def test_rebind_restores_on_error_and_nests(modules):
    home = modules["lkvision._rebind_home"]
    with pytest.raises(RuntimeError, match="boom"):
        with rebind([(_fast, _ref)]):
            with rebind([(_ref, _other)]):  # rebinding the replacement again
                assert home.fn is _other
            assert home.fn is _ref
            raise RuntimeError("boom")
    assert home.fn is _fast


def test_baseline_and_export_share_it():
    from lkvision.bench import baseline
    from lkvision.export import onnx

    assert baseline.rebind is rebind and onnx.rebind is rebind
