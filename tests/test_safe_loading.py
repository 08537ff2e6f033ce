"""Loading a file never runs code from it (issue 10 §1).

A torch checkpoint is a pickle: unpickled naively, any callable it names runs (``os.system``, ``open``...). These
tests plant such a callable next to a perfectly loadable state dict -- so a loader that fell back to a full
unpickle would succeed and leave a marker file behind -- and check every public entry point refuses it, names
the offending global, says how to opt in, and leaves no side effect. Checkpoints laid out like the official
releases (ConvNeXt/DeiT-style ``utils.save_model``: ``model``, ``optimizer``, ``epoch``, ``scaler``, ``args``
Namespace, ``model_ema``; timm's and mmcv's savers; numpy metrics) must still load without any opt-in.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lkvision
from conftest import golden_meta, golden_tensors
from lkvision.compat import from_official
from lkvision.models import CheckpointError, UnsafeCheckpointError, load_state_dict_file, load_weights
from lkvision.models._weights import read_torch_file

MODEL = "slak_test"
SLAK_CASE = "slak_dev"


class _ShellPayload:
    """Unpickles as ``os.system("echo pwned > marker")`` (pickled as ``posix.system``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {shlex.quote(str(self.marker))}",))


class _OpenPayload:
    """Unpickles as ``open(marker, "w")`` (pickled as ``io.open``): creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


PAYLOADS = {"os.system": (_ShellPayload, "posix.system"), "open": (_OpenPayload, "io.open")}


def _official(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if not (k.startswith("__") and k.endswith("__"))}


@pytest.fixture(scope="module")
def model_sd() -> dict[str, torch.Tensor]:
    return lkvision.create_model(MODEL).state_dict()


@pytest.fixture(scope="module")
def slak_official() -> tuple[dict[str, torch.Tensor], dict, dict[str, torch.Tensor]]:
    golden = golden_tensors(SLAK_CASE)
    return _official(golden), golden_meta(SLAK_CASE)["constructor"]["kwargs"], golden


def _hostile(tmp_path: Path, sd: dict, payload: str, tag: str = "", **save_kw) -> tuple[Path, Path]:
    """A checkpoint whose 'model' entry loads fine and whose 'args' entry runs ``payload`` when unpickled."""
    cls, _ = PAYLOADS[payload]
    stem = f"{tag}{payload.replace('.', '_')}"
    marker = tmp_path / f"marker_{stem}"
    path = tmp_path / f"hostile_{stem}.pth"
    torch.save({"model": sd, "epoch": 3, "args": cls(marker)}, path, **save_kw)
    return path, marker


def _refused(excinfo_or_msg, payload: str) -> None:
    msg = str(excinfo_or_msg)
    assert PAYLOADS[payload][1] in msg, msg  # names the offending global
    assert "allow_pickle=True" in msg and "--allow-pickle" in msg, msg  # and how to opt in


# ------------------------------------------------------------------------------------- python API
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy_format"])
def test_library_entry_points_refuse_and_run_nothing(tmp_path, model_sd, payload, legacy):
    path, marker = _hostile(tmp_path, model_sd, payload, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UnsafeCheckpointError) as e:
        load_state_dict_file(path)
    _refused(e.value, payload)
    assert e.value.globals == [PAYLOADS[payload][1]]
    with pytest.raises(UnsafeCheckpointError):
        read_torch_file(path)
    with pytest.raises(UnsafeCheckpointError):
        load_weights(lkvision.create_model(MODEL), path)
    with pytest.raises(UnsafeCheckpointError) as e:
        lkvision.create_model(MODEL, pretrained=path)
    _refused(e.value, payload)
    assert not marker.exists()


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_from_official_refuses_and_runs_nothing(tmp_path, slak_official, payload):
    sd, kwargs, _ = slak_official
    path, marker = _hostile(tmp_path, sd, payload)
    with pytest.raises(UnsafeCheckpointError) as e:
        from_official("slak", str(path), **kwargs)
    _refused(e.value, payload)
    assert not marker.exists()


def test_allow_pickle_opts_in_deliberately(tmp_path, model_sd, slak_official):
    """The opt-in really unpickles (the harmless ``open`` payload runs) and the weights load."""
    path, marker = _hostile(tmp_path, model_sd, "open")
    model = load_weights(lkvision.create_model(MODEL), path, allow_pickle=True)
    assert marker.exists()
    assert torch.equal(model.state_dict()["head.weight"], model_sd["head.weight"])
    sd, kwargs, golden = slak_official
    path2, marker2 = _hostile(tmp_path, sd, "open", tag="official_")
    official = from_official("slak", str(path2), allow_pickle=True, **kwargs)
    with torch.no_grad():
        assert (official(golden["__input__"]) - golden["__output__"]).abs().max() <= 1e-5
    assert marker2.exists()


def test_loading_leaves_torch_allow_list_as_it_was(tmp_path, model_sd):
    before = list(torch.serialization.get_safe_globals())
    torch.serialization.add_safe_globals([argparse.Namespace])  # the user's own opt-in survives our loads
    try:
        torch.save({"model": model_sd, "args": argparse.Namespace(lr=1.0)}, tmp_path / "a.pth")
        load_state_dict_file(tmp_path / "a.pth")
        assert argparse.Namespace in torch.serialization.get_safe_globals()
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)
    load_state_dict_file(tmp_path / "a.pth")
    assert set(torch.serialization.get_safe_globals()) == set(before)


# ------------------------------------------------------------------------------------------ the CLI
def _cli_refuses(fn, argv: list[str], capsys, payload: str) -> None:
    """The command refuses: an UnsafeCheckpointError, or a non-zero exit with the message on stderr."""
    try:
        rc = fn(argv)
    except UnsafeCheckpointError as e:
        _refused(e, payload)
        return
    assert rc not in (0, None), f"{argv} accepted a hostile checkpoint"
    _refused(capsys.readouterr().err, payload)


def test_every_cli_command_refuses_and_runs_nothing(tmp_path, model_sd, slak_official, capsys):
    from lkvision.analysis.cli import erf_main, flops_main, kernels_main, sparsity_main
    from lkvision.compat.cli import main as convert_main
    from lkvision.export.cli import main as export_main
    from lkvision.train.cli import eval_main, train_main

    path, marker = _hostile(tmp_path, model_sd, "os.system")
    sd, kwargs, _ = slak_official
    official, marker2 = _hostile(tmp_path, sd, "os.system", tag="official_")

    out = tmp_path / "out"
    commands = [
        (convert_main, ["--family", "slak", "--src", str(official), "--dst", str(out / "c.safetensors"),
                        "--kwargs", json.dumps(kwargs)]),
        (eval_main, ["--checkpoint", str(path), "--model", MODEL, "--subset", "4", "--no-progress"]),
        (eval_main, ["--checkpoint", str(official), "--family", "slak", "--model", "slak_t", "--subset", "4",
                     "--no-progress"]),
        (erf_main, ["-m", MODEL, "--checkpoint", str(path), "--out-dir", str(out), "--num-images", "1",
                    "--resolution", "64"]),
        (kernels_main, ["-m", MODEL, "--checkpoint", str(path), "--out-dir", str(out)]),
        (flops_main, ["-m", MODEL, "--checkpoint", str(path), "--out-dir", str(out), "--resolution", "64"]),
        (sparsity_main, ["--checkpoint", str(path), "--out-dir", str(out)]),
        (sparsity_main, ["--checkpoint", str(path), "--model", MODEL, "--out-dir", str(out)]),
        (export_main, ["--model", MODEL, "--checkpoint", str(path), "--out", str(out / "m.onnx"),
                       "--img-size", "64", "--no-check"]),
        (train_main, ["--model", MODEL, "--finetune", str(path), "--output", str(out / "run"), "--epochs", "1",
                      "--max-steps", "1", "--no-progress", "--set", "num_classes=10", "--set", "in_chans=1"]),
    ]
    for fn, argv in commands:
        _cli_refuses(fn, argv, capsys, "os.system")
    assert not marker.exists() and not marker2.exists()
    assert not (out / "c.safetensors").exists() and not (out / "m.onnx").exists()


def test_cli_subprocess_refuses_then_opts_in(tmp_path, slak_official):
    """`python -m lkvision convert` as a user runs it: one clear message, non-zero exit, no side effect; the
    same command with --allow-pickle converts (and the harmless payload runs, proving the opt-in is real)."""
    sd, kwargs, _ = slak_official
    path, marker = _hostile(tmp_path, sd, "os.system")
    dst = tmp_path / "slak.safetensors"
    cmd = [sys.executable, "-m", "lkvision", "convert", "--family", "slak", "--src", str(path), "--dst", str(dst),
           "--kwargs", json.dumps(kwargs)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "posix.system" in r.stderr and "--allow-pickle" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not marker.exists() and not dst.exists()

    path2, marker2 = _hostile(tmp_path, sd, "open")
    cmd[cmd.index(str(path))] = str(path2)
    r = subprocess.run([*cmd, "--allow-pickle"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert marker2.exists() and dst.exists()


# ------------------------------------------------------------------- official layouts load as they are
def _optimizer_state(sd: dict[str, torch.Tensor]) -> dict:
    """AdamW state after one step with ConvNeXt-style parameter groups (weight_decay / lr_scale per group)."""
    params = [torch.nn.Parameter(v.clone()) for v in sd.values() if v.is_floating_point()][:4]
    opt = torch.optim.AdamW([{"params": params[:2], "weight_decay": 0.0, "lr_scale": 0.7},
                             {"params": params[2:], "weight_decay": 0.05, "lr_scale": 1.0}], lr=4e-3)
    sum((p * p).sum() for p in params).backward()
    opt.step()
    return opt.state_dict()


def _training_args() -> argparse.Namespace:
    """The kind of Namespace the official main.py files pickle under 'args' (strings, numbers, bools, None,
    lists)."""
    return argparse.Namespace(
        batch_size=64, epochs=300, update_freq=8, model="SLaK_tiny", drop_path=0.1, input_size=224,
        layer_scale_init_value=1e-6, model_ema=True, model_ema_decay=0.9999, model_ema_force_cpu=False,
        model_ema_eval=False, opt="adamw", opt_eps=1e-8, opt_betas=None, clip_grad=None, momentum=0.9,
        weight_decay=0.05, weight_decay_end=None, lr=4e-3, layer_decay=1.0, min_lr=1e-6, warmup_epochs=20,
        warmup_steps=-1, color_jitter=0.4, aa="rand-m9-mstd0.5-inc1", smoothing=0.1, train_interpolation="bicubic",
        crop_pct=None, reprob=0.25, remode="pixel", recount=1, resplit=False, mixup=0.8, cutmix=1.0,
        cutmix_minmax=None, finetune="", head_init_scale=1.0, model_key="model|module", model_prefix="",
        data_path="/datasets/imagenet", eval_data_path=None, nb_classes=1000, imagenet_default_mean_and_std=True,
        data_set="IMNET", output_dir="/results/SLaK_tiny", log_dir=None, device="cuda", seed=0, resume="",
        auto_resume=True, save_ckpt=True, save_ckpt_freq=1, save_ckpt_num=3, start_epoch=0, eval=False,
        dist_eval=True, disable_eval=False, num_workers=10, pin_mem=True, world_size=8, local_rank=-1,
        dist_on_itp=False, dist_url="env://", use_amp=False, rank=0, gpu=0, distributed=True, dist_backend="nccl",
        sparse=True, growth="random", prune="magnitude", redistribution="none", prune_rate=0.5, sparsity=0.4,
        sparse_init="snip", update_frequency=2000, Decom=True, kernel_size=[51, 49, 47, 13, 5], width_factor=1.3,
        bn=True, ghost_ratio=0.23, N_path=2, N_rep=4,
    )


def _layouts(sd: dict[str, torch.Tensor]) -> dict[str, dict]:
    ema = {k: v.clone() for k, v in sd.items()}
    scaler = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
              "_growth_tracker": 117}
    return {
        # RepLKNet-pytorch / UniRepLKNet / SLaK / shift-wiseConv utils.save_model (ConvNeXt/DeiT style)
        "save_model": {"model": sd, "optimizer": _optimizer_state(sd), "epoch": 299, "scaler": scaler,
                       "args": _training_args(), "model_ema": ema},
        "save_model_best": {"model": sd, "optimizer": _optimizer_state(sd), "epoch": "best", "scaler": {},
                            "args": _training_args()},
        "ddp_prefixed": {"model": {"module." + k: v for k, v in sd.items()}, "epoch": 1, "args": _training_args()},
        # metrics stored as numpy values (max accuracy, per-class counts, dtypes)
        "numpy_metadata": {"model": sd, "max_accuracy": np.float64(82.5), "acc5": np.float32(96.1),
                           "n_parameters": np.int64(30_000_000), "counts": np.arange(10),
                           "names": np.array(["a", "b"]), "dtype": np.dtype("float16"), "flag": np.bool_(True)},
        # timm's CheckpointSaver
        "timm": {"epoch": 10, "arch": "slak_tiny", "state_dict": sd, "optimizer": _optimizer_state(sd),
                 "version": 2, "args": _training_args(), "metric": 82.1, "state_dict_ema": ema},
        "bare": dict(sd),
    }


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy_format"])
def test_official_release_layouts_load_without_opt_in(tmp_path, slak_official, legacy):
    sd, kwargs, golden = slak_official
    for name, obj in _layouts(sd).items():
        path = tmp_path / f"{name}.pth"
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
        loaded = load_state_dict_file(path)
        assert set(loaded) == set(sd), name
        assert all(torch.equal(loaded[k], sd[k]) for k in sd), name
        model = from_official("slak", str(path), **kwargs)
        with torch.no_grad():
            assert (model(golden["__input__"]) - golden["__output__"]).abs().max() <= 1e-5, name
    full = read_torch_file(tmp_path / "save_model.pth")
    assert full["args"].kernel_size == [51, 49, 47, 13, 5] and full["epoch"] == 299
    meta = read_torch_file(tmp_path / "numpy_metadata.pth")
    assert meta["max_accuracy"] == 82.5 and meta["counts"].tolist() == list(range(10))
    assert meta["dtype"] == np.dtype("float16")


# -------------------------------------------------------------------------------- corrupt files
def test_corrupt_truncated_and_empty_files_give_checkpoint_error(tmp_path, model_sd):
    torch.save({"model": model_sd}, tmp_path / "ok.pth")
    torch.save({"model": model_sd}, tmp_path / "ok_legacy.pth", _use_new_zipfile_serialization=False)
    lkvision.save_weights(model_sd, tmp_path / "ok.safetensors")
    bad = {}
    for name in ("ok.pth", "ok_legacy.pth", "ok.safetensors"):
        data = (tmp_path / name).read_bytes()
        for cut, frac in (("half", 0.5), ("head", 0.01)):
            p = tmp_path / f"{cut}_{name}"
            p.write_bytes(data[: max(1, int(len(data) * frac))])
            bad[p.name] = p
    bad["random.pth"] = tmp_path / "random.pth"
    bad["random.pth"].write_bytes(np.random.default_rng(0).bytes(4096))
    bad["empty.pth"] = tmp_path / "empty.pth"
    bad["empty.pth"].write_bytes(b"")
    bad["text.safetensors"] = tmp_path / "text.safetensors"
    bad["text.safetensors"].write_text("not a safetensors file")
    for name, p in bad.items():
        with pytest.raises(CheckpointError) as e:
            load_state_dict_file(p)
        assert str(p) in str(e.value), name
        assert "\n" not in str(e.value), f"{name}: the error should be one line: {e.value}"
        with pytest.raises(CheckpointError):
            lkvision.create_model(MODEL, pretrained=p)
    with pytest.raises(FileNotFoundError):
        load_state_dict_file(tmp_path / "missing.pth")
    torch.save({"model": {"w": "not a tensor"}}, tmp_path / "nottensors.pth")
    with pytest.raises(CheckpointError, match="state dict of tensors"):
        load_state_dict_file(tmp_path / "nottensors.pth")
