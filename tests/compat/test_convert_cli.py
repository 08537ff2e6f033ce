"""`lkvision convert` end to end on the ShiftWise golden checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import lkvision
from conftest import GOLDEN
from lkvision.cli import main as lkvision_main
from lkvision.compat.cli import load_converted, main
from lkvision.compat.shiftwise import to_official


@pytest.fixture(scope="module")
def golden():
    kwargs = json.loads((GOLDEN / "sw_dev.json").read_text())["constructor"]["kwargs"]
    return kwargs, load_file(str(GOLDEN / "sw_dev.safetensors"))


def test_convert_official_pth_with_kwargs(golden, tmp_path, capsys):
    kwargs, t = golden
    src = tmp_path / "official.pth"
    # the official checkpoint layout: {'model': state_dict, 'epoch': ...}
    torch.save({"model": {k: v for k, v in t.items() if not k.startswith("__")}, "epoch": 299}, src)
    dst = tmp_path / "out" / "sw_dev.safetensors"
    assert lkvision_main(["convert", "--family", "sw", "--src", str(src), "--dst", str(dst),
                          "--kwargs", json.dumps(kwargs)]) == 0
    out = capsys.readouterr().out
    assert "parameters:  211,964" in out and str(dst) in out
    with safe_open(str(dst), framework="pt") as f:
        meta = f.metadata()
    assert meta["lkvision.family"] == "shiftwise"
    assert json.loads(meta["lkvision.official_kwargs"]) == kwargs
    assert json.loads(meta["lkvision.model_kwargs"])["big_kernels"] == [13, 11, 9, 7]
    model = load_converted(dst).eval()
    with torch.no_grad():
        assert (model(t["__input__"]) - t["__output__"]).abs().max() <= 1e-5
        deploy = lkvision.reparameterize(model)
        assert (deploy(t["__input__"]) - t["__output_deploy__"]).abs().max() <= 1e-5


def test_convert_by_model_name_roundtrip(tmp_path, capsys):
    torch.manual_seed(0)
    ref = lkvision.create_model("sw_femto").eval()
    src = tmp_path / "femto_official.pth"
    torch.save({"model": to_official(ref)}, src)
    dst = tmp_path / "femto.safetensors"
    assert main(["--family", "shiftwise", "--src", str(src), "--dst", str(dst), "--model", "sw_femto"]) == 0
    assert "sw_femto" in capsys.readouterr().out
    with safe_open(str(dst), framework="pt") as f:
        kw = json.loads(f.metadata()["lkvision.model_kwargs"])
    other = lkvision.create_model("sw_femto", pretrained=str(dst), **kw).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ref(x), other(x))


def test_convert_errors(golden, tmp_path, capsys):
    kwargs, _ = golden
    src = GOLDEN / "sw_dev.safetensors"
    dst = tmp_path / "x.safetensors"
    # wrong architecture: the error names the missing/unexpected official keys
    assert main(["--family", "sw", "--src", str(src), "--dst", str(dst), "--model", "sw_femto",
                 "--kwargs", '{"depths": [1, 1, 1, 1]}']) == 2
    err = capsys.readouterr().err
    assert "unexpected keys" in err and "stages.2.1." in err
    assert not dst.exists()
    assert main(["--family", "nope", "--src", str(src), "--dst", str(dst), "--model", "x"]) == 2
    assert "unknown family" in capsys.readouterr().err
    assert main(["--family", "sw", "--src", str(src), "--dst", str(dst), "--model", "sw_huge"]) == 2
    assert "unknown shiftwise model" in capsys.readouterr().err
    assert main(["--family", "sw", "--src", str(tmp_path / "missing.pth"), "--dst", str(dst),
                 "--kwargs", json.dumps(kwargs)]) == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--family", "sw", "--src", str(src), "--dst", str(dst)])  # no --model/--kwargs


@pytest.mark.parametrize("suffix", ["", ".deploy"], ids=["train_form", "official_deploy_form"])
def test_convert_dense_slak_checkpoint(tmp_path, capsys, suffix):
    """An official Decom=False SLaK checkpoint (as utils.save_model writes it, with its args Namespace)
    converts without any opt-in, and the converted file rebuilds the model from its metadata alone."""
    import argparse

    kwargs = json.loads((GOLDEN / "slak_dense_dev.json").read_text())["constructor"]["kwargs"]
    t = load_file(str(GOLDEN / f"slak_dense_dev{suffix}.safetensors"))
    src = tmp_path / "checkpoint-best.pth"
    torch.save({"model": {k: v for k, v in t.items() if not k.startswith("__")}, "epoch": "best",
                "args": argparse.Namespace(Decom=False, kernel_size=kwargs["kernel_size"])}, src)
    dst = tmp_path / "slak_dense.safetensors"
    assert main(["--family", "slak", "--src", str(src), "--dst", str(dst), "--kwargs", json.dumps(kwargs)]) == 0
    model = load_converted(dst).eval()
    assert model.config["decomposed"] is False
    with torch.no_grad():
        y = model(t["__input__"])
    assert (y - t["__output_deploy__"]).abs().max() <= 1e-5


@pytest.mark.parametrize("suffix", ["", ".deploy"], ids=["train_form", "official_deploy_form"])
def test_convert_replknet_rebuilds_from_metadata(tmp_path, suffix):
    """RepLKNet converted from its official kwargs alone (no --model): the file records the constructor
    arguments, and a converted deploy-form file rebuilds in that form."""
    kwargs = json.loads((GOLDEN / "replknet_dev.json").read_text())["constructor"]["kwargs"]
    t = load_file(str(GOLDEN / f"replknet_dev{suffix}.safetensors"))
    src = tmp_path / "replknet.pth"
    torch.save({"model": {k: v for k, v in t.items() if not k.startswith("__")}}, src)
    dst = tmp_path / "replknet.safetensors"
    assert main(["--family", "replknet", "--src", str(src), "--dst", str(dst), "--kwargs", json.dumps(kwargs)]) == 0
    model = load_converted(dst).eval()
    ref = t["__output__" if not suffix else "__output_deploy__"]
    with torch.no_grad():
        assert (model(t["__input__"]) - ref).abs().max() <= 1e-5


def test_partly_merged_checkpoints_align_only_on_an_exact_match():
    """reparameterize_to_match merges a module only when that makes its keys equal the checkpoint's: a broken
    checkpoint leaves the model as built (so the error names keys of the form the user asked for)."""
    from lkvision.compat._common import reparameterize_to_match
    from lkvision.layers import ReparamLargeKernelConv

    merged = ReparamLargeKernelConv(4, 7, 3)
    merged.reparameterize()
    fresh = torch.nn.Sequential(ReparamLargeKernelConv(4, 7, 3))
    sd = {"0." + k: v for k, v in merged.state_dict().items()}
    assert reparameterize_to_match(fresh, sd) == ["0"] and fresh[0].is_merged
    broken = torch.nn.Sequential(ReparamLargeKernelConv(4, 7, 3))
    del sd["0.conv.bias"]
    assert reparameterize_to_match(broken, sd) == [] and not broken[0].is_merged
