"""Registry, weights I/O and CLI dispatch."""

from __future__ import annotations

import pytest
import torch

import lkvision
from lkvision.cli import COMMANDS, main
from lkvision.models import CheckpointError, load_state_dict_file, save_weights


def test_list_models_has_the_papers_models():
    names = set(lkvision.list_models())
    for required in ("sw_tiny", "sw_small", "sw_nano"):
        assert required in names
    assert lkvision.list_models("sw_*") == sorted(n for n in names if n.startswith("sw_"))


def test_unknown_model_error_names_it():
    with pytest.raises(ValueError, match="unknown model 'sw_gigantic'"):
        lkvision.create_model("sw_gigantic")


def test_pretrained_true_without_path_is_a_clear_error():
    with pytest.raises(ValueError, match="no downloadable weights for sw_nano.*pretrained=<path"):
        lkvision.create_model("sw_nano", pretrained=True)
    # weights hosted elsewhere: the error says where (the cfg's notes) and how to pass the file
    with pytest.raises(ValueError, match=r"replknet_31b\.in1k.*Google Drive.*pretrained_cfg_overlay=dict\(file="):
        lkvision.create_model("replknet_31b", pretrained=True, device="meta")


def test_corrupt_and_missing_checkpoint_errors(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_state_dict_file(bad)
    with pytest.raises(FileNotFoundError):
        load_state_dict_file(tmp_path / "nope.pth")
    torch.save({"model": {"a": torch.ones(2)}}, tmp_path / "ok.pth")
    assert torch.equal(load_state_dict_file(tmp_path / "ok.pth")["a"], torch.ones(2))


def test_save_weights_is_atomic_and_leaves_no_temp(tmp_path):
    p = save_weights({"x": torch.arange(3.0)}, tmp_path / "sub" / "w.safetensors")
    assert p.exists() and [f.name for f in p.parent.iterdir()] == ["w.safetensors"]


def test_timm_registration():
    pytest.importorskip("timm")
    from lkvision.data._compat import ensure_torchvision

    ensure_torchvision()
    import timm

    lkvision.register_with_timm()
    m = timm.create_model("sw_nano", num_classes=3)
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_cli_dispatch_lists_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for cmd in COMMANDS:
        assert cmd in out
    assert main(["no-such-command"]) == 2


def test_every_cli_command_has_help(capsys):
    for cmd in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0, cmd
        assert f"lkvision {cmd}" in capsys.readouterr().out
