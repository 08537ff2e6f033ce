"""timm's model contract on the lkvision side: registration on import, standard kwargs, heads, feature API,
dtype checks, FX. (timm's own tests/test_models.py runs on every family via tests/timm_contract/run.sh.)"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import lkvision
from lkvision.models import FeatureInfo

SRC = str(Path(lkvision.__file__).resolve().parents[1])


def _run(code: str) -> str:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_import_lkvision_registers_with_timm_without_importing_it():
    out = _run("""
        import sys
        import lkvision
        assert "timm" not in sys.modules, "import lkvision must not import timm"
        import timm                                  # the import hook registers lkvision's models here
        m = timm.create_model("sw_femto", num_classes=3, drop_rate=0.1)
        assert type(m).__name__ == "ShiftWiseNet" and m.num_classes == 3 and m.drop_rate == 0.1
        assert "sw_tiny" in timm.list_models("sw_*") and "lkv_resnet50" in timm.list_models("lkv_*")
        assert "unireplknet_t.in1k" in timm.list_pretrained("unireplknet_t*")
        print(timm.get_pretrained_cfg_value("unireplknet_s.in22k_ft_in1k_384", "input_size"))
    """)
    assert out.strip() == "(3, 384, 384)"


def test_probing_for_timm_does_not_use_up_the_hook():
    """Libraries check timm's presence with find_spec (transformers does; mmengine imports transformers) long
    before anything imports it: the registration must still happen at the real ``import timm``."""
    _run("""
        import importlib.util, sys
        import lkvision
        assert importlib.util.find_spec("timm") is not None
        assert importlib.util.find_spec("timm") is not None
        assert "timm" not in sys.modules
        import timm
        assert "sw_femto" in timm.list_models("sw_*")
        import importlib
        importlib.reload(importlib.import_module("timm"))  # a re-import is harmless
        assert timm.create_model("sw_femto").num_classes == 1000
    """)


def test_timm_imported_first_registers_on_import_lkvision():
    _run("""
        import importlib.util, sys
        spec = importlib.util.find_spec("lkvision")
        path = spec.submodule_search_locations[0] + "/data/_compat.py"
        cs = importlib.util.spec_from_file_location("tv_compat", path)
        compat = importlib.util.module_from_spec(cs)
        cs.loader.exec_module(compat)
        compat.ensure_torchvision()                    # torchvision on the CPU torch build, without lkvision
        import timm
        assert "lkvision" not in sys.modules
        import lkvision                                # timm is loaded: registers at once
        assert timm.create_model("unireplknet_test").num_classes == 1000
    """)


def test_standard_kwargs_heads_and_pooling():
    x = torch.randn(2, 3, 64, 64)
    m = lkvision.create_model("unireplknet_test", num_classes=0, global_pool="").eval()
    assert m(x).shape == (2, 64, 2, 2)  # unpooled, normed map
    m = lkvision.create_model("replknet_nano", global_pool="max", num_classes=5).eval()
    assert m(x).shape == (2, 5) and m.head_hidden_size == m.num_features == 128
    with pytest.raises(ValueError, match="global_pool 'catavgmax' is not supported"):
        lkvision.create_model("sw_femto", global_pool="catavgmax")
    with pytest.raises(ValueError, match="output_stride=16 is not supported"):
        lkvision.create_model("sw_femto", output_stride=16)
    with pytest.raises(TypeError, match="not_an_arg"):
        lkvision.create_model("sw_femto", not_an_arg=1)
    m = lkvision.create_model("mobilenetv2_nano_k13_rep3", num_classes=4, global_pool="").eval()
    assert m(x).shape == (2, 4, 2, 2)  # classifier at every position
    r = lkvision.create_model("resnet18", global_pool="max", drop_rate=0.5, num_classes=3).eval()  # wrapped timm
    assert r.head_drop.p == 0.5
    with torch.no_grad():
        f = r.forward_features(x)
        torch.testing.assert_close(r(x), r.head(f.amax((2, 3))))


def test_reset_classifier_keeps_device_dtype_and_mode():
    m = lkvision.create_model("slak_test", dtype=torch.float64).eval()
    m.reset_classifier(7, "avgmax")
    fc = m.get_classifier()
    assert fc.weight.dtype == torch.float64 and not fc.training and m.global_pool == "avgmax"
    assert m(torch.randn(1, 3, 64, 64, dtype=torch.float64)).shape == (1, 7)
    m.reset_classifier(0, "")
    assert m(torch.randn(1, 3, 64, 64, dtype=torch.float64)).shape == (1, 64, 2, 2)


def test_meta_device_and_dtype_kwargs():
    m = lkvision.create_model("sw_tiny", device="meta", dtype=torch.bfloat16)
    assert {t.device.type for t in [*m.parameters(), *m.buffers()]} == {"meta"}
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert m(torch.randn(1, 3, 224, 224, device="meta", dtype=torch.bfloat16)).shape == (1, 1000)


def test_input_dtype_mismatch_is_a_clear_error_autocast_is_not():
    m = lkvision.create_model("convnext_nano_lk").eval()
    x = torch.randn(1, 3, 64, 64)
    for bad in (torch.float64, torch.bfloat16):
        with pytest.raises(TypeError, match=rf"input dtype {bad} differs from the model's torch.float32.*autocast"):
            m(x.to(bad))
    with pytest.raises(TypeError, match="differs from the model's"):
        m.forward_intermediates(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_fx_symbolic_trace_matches_eager():
    m = lkvision.create_model("sw_femto").eval()
    gm = torch.fx.symbolic_trace(m)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), m(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="input channels"):
        gm(torch.randn(1, 4, 64, 64))  # the input check runs inside the traced graph too


def test_forward_intermediates_and_prune():
    m = lkvision.create_model("unireplknet_test", num_classes=5).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, inter = m.forward_intermediates(x)
        torch.testing.assert_close(final, m.forward_features(x))
        assert [t.shape[1] for t in inter] == [16, 32, 48, 64]
        last2 = m.forward_intermediates(x, indices=2, intermediates_only=True, output_fmt="NHWC")
        assert [t.shape[-1] for t in last2] == [48, 64]
        kept = m.prune_intermediate_layers([-3])
        assert kept == [1] and len(m.stages) == 2 and m.num_features == m.head_hidden_size == 32
        assert m.num_classes == 0 and m(x).shape == (1, 32, 8, 8)
        torch.testing.assert_close(m.forward_features(x), inter[1])


def test_features_only_feature_info_is_timm_semantics():
    m = lkvision.create_model("sw_femto", features_only=True, out_indices=(-3, -1))
    fi = m.feature_info
    assert isinstance(fi, FeatureInfo) and isinstance(fi, list) and len(fi) == 4
    assert fi.out_indices == (1, 3) and fi.channels() == [32, 64] and fi.reduction() == [8, 32]
    assert m.pretrained_cfg.get("num_classes") is None  # features cfg: no classifier fields
    with pytest.raises(ValueError, match="out of range"):
        lkvision.create_model("sw_femto", features_only=True, out_indices=(4,))


def test_group_matcher_orders_stem_blocks_head():
    from timm.models._manipulate import group_parameters

    m = lkvision.create_model("replknet_nano")
    groups = group_parameters(m, m.group_matcher(coarse=False), reverse=True)
    assert groups["stem.0.conv.weight"] == 0
    assert groups["transitions.0.0.conv.weight"] == groups["stages.0.1.pw1.conv.weight"]  # joins the block before
    assert groups["head.fc.weight"] == max(groups.values())
    coarse = group_parameters(m, m.group_matcher(coarse=True), reverse=True)
    assert len(set(coarse.values())) == 6  # stem, 4 stages, head


def test_timm_features_only_wrappers():
    import timm

    x = torch.randn(1, 3, 64, 64)
    ref = lkvision.create_model("unireplknet_test", features_only=True).eval()
    getter = timm.create_model("unireplknet_test", features_only=True, out_indices=(1, 2)).eval()
    from timm.models._features import FeatureGetterNet

    assert isinstance(getter, FeatureGetterNet) and getter.feature_info.channels() == [32, 48]
    normed = timm.create_model("unireplknet_test", features_only=True, feature_cfg=dict(norm=True)).eval()
    normed.model.load_state_dict(ref.state_dict())
    getter.model.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.startswith(("stages.3",
                                                                                                 "downsamples.2",
                                                                                                 "feature_norms"))})
    with torch.no_grad():
        raw = ref.forward_intermediates(x, intermediates_only=True)
        torch.testing.assert_close(getter(x), raw[1:3])  # timm semantics: raw stage outputs
        torch.testing.assert_close(normed(x), ref(x))  # norm=True: the official per-output norms
    fx = timm.create_model("unireplknet_test", features_only=True, feature_cls="fx").eval()
    assert [t.shape[1] for t in fx(x)] == [16, 32, 48, 64]
    with pytest.raises(ValueError, match="feature_cls='list' is not supported"):
        timm.create_model("unireplknet_test", features_only=True, feature_cls="list")


def test_timm_create_passes_pretrained_cfg_overlay_and_cache_dir(tmp_path):
    """timm always passes ``pretrained_cfg_overlay`` and ``cache_dir`` (None by default): both reach lkvision."""
    import timm

    src = lkvision.create_model("sw_femto", num_classes=5).eval()
    path = lkvision.save_weights(src, tmp_path / "w.safetensors")
    for features_only in (False, True):
        m = timm.create_model("sw_femto", pretrained=True, num_classes=5, features_only=features_only,
                              pretrained_cfg_overlay=dict(file=str(path)), cache_dir=str(tmp_path / "cache"))
        own = m.model if features_only else m
        assert torch.equal(own.state_dict()["stem.0.weight"], src.state_dict()["stem.0.weight"])
    m = timm.create_model("sw_femto", features_only=True, pretrained_cfg_overlay=None, cache_dir=None)
    assert m.feature_info.channels() == [16, 32, 48, 64]
