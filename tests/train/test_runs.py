"""Runs a person interrupts, repeats and mistypes: resume that survives a damaged checkpoint, Ctrl-C / SIGTERM
that save and say how to continue, refusal to overwrite a run, unknown keys at any depth."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lkvision.cli import main as lkvision_main
from lkvision.models import CheckpointError, UnsafeCheckpointError
from lkvision.train import ConfigError, make_config, train
from lkvision.train.checkpoint import find_latest, load_checkpoint
from lkvision.train.cli import resume_command
from lkvision.train.config import load_recipe, parse_set
from lkvision.train.stop import TrainingAborted, TrainingInterrupted

from ._tiny import TINY, TINY_SIGNAL, plan_signals, quick_cfg, weights_of


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = weights_of(a), weights_of(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ----------------------------------------------------------------------------- resume past a damaged checkpoint
def test_resume_auto_falls_back_past_truncated_checkpoints(tmp_path):
    kw = dict(save_every_steps=3, keep_last=10, drop_path=0.2)
    straight = train(quick_cfg(tmp_path / "a", **kw))
    assert straight["steps"] == 16
    b = tmp_path / "b"
    train(quick_cfg(b, max_steps=7, **kw))  # checkpoints at steps 3, 6, 7
    assert find_latest(b).name == "ckpt-00000007.state.pt"
    _truncate(b / "ckpt-00000007.state.pt")  # a torn copy of the newest training state
    _truncate(b / "ckpt-00000006.safetensors")  # and of the weights one save earlier
    assert find_latest(b).name == "ckpt-00000003.state.pt"
    # an explicit --resume of a damaged file is an error that says why, not a fallback
    with pytest.raises(CheckpointError, match="cannot read training state"):
        train(quick_cfg(b, resume=str(b / "ckpt-00000007.state.pt"), **kw))
    # nothing usable at all: an error listing each reason (starting over would silently lose the run)
    c = tmp_path / "c"
    c.mkdir()
    for name in ("ckpt-00000007.state.pt", "ckpt-00000007.safetensors"):
        os.link(b / name, c / name)
    with pytest.warns(UserWarning, match="skipping"), \
            pytest.raises(CheckpointError, match="no usable checkpoint.*ckpt-00000007.state.pt: cannot read"):
        train(quick_cfg(c, resume="auto", **kw))

    with pytest.warns(UserWarning) as rec:
        resumed = train(quick_cfg(b, resume="auto", **kw))
    skipped = [str(w.message) for w in rec if "resume: skipping" in str(w.message)]
    assert len(skipped) == 2 and "ckpt-00000007.state.pt" in skipped[0] and "ckpt-00000006" in skipped[1]
    assert resumed["steps"] == 16
    assert "resumed from" in (log := (b / "log.txt").read_text()) and "ckpt-00000003.state.pt at step 3" in log
    _same_weights(tmp_path / "a" / "final.safetensors", b / "final.safetensors")  # bit-identical on CPU


def test_resume_checks_the_run_configuration(tmp_path):
    train(quick_cfg(tmp_path, max_steps=2, save_every_steps=1, keep_last=5))
    with pytest.warns(UserWarning, match="skipping"), \
            pytest.raises(CheckpointError, match=r"different run configuration \(ema: checkpoint False, now True"):
        train(quick_cfg(tmp_path, resume="auto", ema=True))
    # a setting that does not change what the checkpoint holds may change, and the log says so
    s = train(quick_cfg(tmp_path, resume="auto", max_steps=3, lr=1e-3))
    assert s["steps"] == 3
    assert "resumed with changed settings: lr: 0.004 -> 0.001" in (tmp_path / "log.txt").read_text()


# ------------------------------------------------------------------------------- an existing run is not overwritten
class _Payload:
    """Unpickles as ``open(marker, "w")``: a training-state file crafted to run code when loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_hostile_training_state_is_refused_as_unsafe_and_runs_nothing(tmp_path):
    train(quick_cfg(tmp_path, max_steps=2, save_every_steps=1, keep_last=5))
    state_path = tmp_path / "ckpt-00000002.state.pt"
    state = torch.load(state_path, weights_only=True)
    marker = tmp_path / "marker"
    torch.save({**state, "extra": _Payload(marker)}, state_path)
    # the explicit path: the unsafe-pickle error itself (its type and the global it names), not a generic one
    with pytest.raises(UnsafeCheckpointError, match="io.open") as info:
        load_checkpoint(state_path)
    assert info.value.globals == ["io.open"]
    with pytest.raises(UnsafeCheckpointError):
        train(quick_cfg(tmp_path, resume=str(state_path), max_steps=3))
    # --resume auto skips it (saying why) and resumes from the step before
    with pytest.warns(UserWarning, match="skipping ckpt-00000002.state.pt: .*io.open"):
        s = train(quick_cfg(tmp_path, resume="auto", max_steps=3))
    assert s["steps"] == 3 and "ckpt-00000001.state.pt at step 1" in (tmp_path / "log.txt").read_text()
    assert not marker.exists()


def test_existing_run_is_refused_unless_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    train(quick_cfg(out, max_steps=2))
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(ConfigError, match=r"already holds a run \(.*ckpt-00000002.*--resume auto.*--output.*"
                                          "--overwrite"):
        train(quick_cfg(out, max_steps=2))
    args = ["train", "--model", TINY, "--output", str(out), "--set", "input_size=32", "--epochs", "1",
            "--no-progress", "--workers", "0"]
    assert lkvision_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a run" in err[0] and "--overwrite" in err[0]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing touched
    # --overwrite replaces it: no stale checkpoint of the old run survives
    (out / "ckpt-00000099.state.pt").write_bytes(b"stale")
    train(quick_cfg(out, max_steps=1, overwrite=True))
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-00000001.safetensors", "ckpt-00000001.state.pt"]
    with pytest.raises(ConfigError, match="contradict"):
        quick_cfg(out, overwrite=True, resume="auto")


# ------------------------------------------------------------------------------------------- Ctrl-C / SIGTERM
def test_ctrl_c_finishes_the_step_checkpoints_and_resumes_bit_exactly(tmp_path):
    kw = dict(model=TINY_SIGNAL, drop_path=0.2, mixup=0.8, cutmix=1.0, ema=True, ema_decay=0.9)
    handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the tests run as a background job
    plan_signals(None)
    train(quick_cfg(tmp_path / "a", **kw))
    plan_signals({5: [signal.SIGINT]})  # Ctrl-C during the forward pass of step 5
    try:
        with pytest.raises(TrainingInterrupted) as exc:
            train(quick_cfg(tmp_path / "b", **kw))
    finally:
        plan_signals(None)
    e = exc.value
    assert (e.signum, e.step, e.exit_code) == (signal.SIGINT, 5, 130)  # step 5 was finished, then saved
    assert e.checkpoint == tmp_path / "b" / "ckpt-00000005.state.pt" and find_latest(tmp_path / "b") == e.checkpoint
    assert signal.getsignal(signal.SIGINT) is handler_before  # handlers restored
    assert not list((tmp_path / "b").glob(".*tmp*"))
    train(quick_cfg(tmp_path / "b", resume="auto", **kw))
    _same_weights(tmp_path / "a" / "final.safetensors", tmp_path / "b" / "final.safetensors")
    _, sa = load_checkpoint(tmp_path / "a" / "ckpt-00000016.state.pt")
    _, sb = load_checkpoint(tmp_path / "b" / "ckpt-00000016.state.pt")
    assert all(torch.equal(sa["ema"][k], sb["ema"][k]) for k in sa["ema"])


def test_sigterm_at_an_epoch_end_and_a_second_ctrl_c_aborts(tmp_path):
    # SIGTERM in the last step of epoch 1: the epoch is evaluated and checkpointed, exit status 143
    plan_signals({8: [signal.SIGTERM]})
    try:
        with pytest.raises(TrainingInterrupted) as exc:
            train(quick_cfg(tmp_path / "a", model=TINY_SIGNAL, save_every_epochs=0))
    finally:
        plan_signals(None)
    assert (exc.value.step, exc.value.exit_code) == (8, 143)
    _, state = load_checkpoint(exc.value.checkpoint)
    assert [r["epoch"] for r in state["history"]["epochs"]] == [1] and "val_top1" in state["history"]["epochs"][0]
    # a second Ctrl-C while the first is being honoured: abort at once, nothing new written
    plan_signals({3: [signal.SIGINT], 4: [signal.SIGINT]})  # both inside step 2 (two micro-batches per step)
    try:
        with pytest.raises(TrainingAborted) as exc2:
            train(quick_cfg(tmp_path / "b", model=TINY_SIGNAL, update_freq=2, batch_size=16))
    finally:
        plan_signals(None)
    assert exc2.value.exit_code == 130
    assert not list((tmp_path / "b").glob("ckpt-*")) and not list((tmp_path / "b").glob(".*tmp*"))


def test_resume_command_drops_overwrite_and_old_resume():
    assert resume_command(["--recipe", "x y", "--overwrite", "--resume", "ckpt.state.pt", "--epochs", "3"]) == \
        "lkvision train --recipe 'x y' --epochs 3 --resume auto"
    assert resume_command(["--resume=auto"]) == "lkvision train --resume auto"


@pytest.mark.slow
def test_real_ctrl_c_to_lkvision_train_then_resume(tmp_path, monkeypatch):
    """A real SIGINT to the process group of a real `lkvision train` (as a terminal's Ctrl-C: DataLoader workers
    get it too), then the printed resume command; the result equals an uninterrupted run bit for bit."""
    out = tmp_path / "run"
    args = ["--model", "sw_femto", "--output", str(out), "--set", "input_size=32", "--set", "train_subset=256",
            "--set", "val_subset=64", "--batch-size", "16", "--epochs", "2", "--workers", "1", "--no-progress",
            "--set", "reparam_check=false", "--set", "plot=false", "--set", "threads=1", "--set", "log_every=1"]
    # bit-exact comparison of separate processes: no kernel chosen by timing (each process times its own)
    monkeypatch.setenv("LKVISION_AUTOSELECT", "0")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lkvision", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        for line in proc.stdout:
            if line.startswith("step 2/32"):
                os.killpg(proc.pid, signal.SIGINT)
                break
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("lkvision train: stopped by SIGINT after step ") and "--resume auto" in last, stderr
    step = int(last.split("after step ")[1].split(",")[0])
    assert 2 <= step < 32 and (out / f"ckpt-{step:08d}.state.pt").is_file()
    cmd = last.split("continue with: ")[1]
    assert cmd.startswith("lkvision train ")
    done = subprocess.run([sys.executable, "-m", "lkvision", "train", *shlex.split(cmd)[2:]], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    ref = make_config("default", {"model": "sw_femto", "output": str(tmp_path / "ref"), "input_size": 32,
                                  "train_subset": 256, "val_subset": 64, "batch_size": 16, "epochs": 2,
                                  "workers": 0, "progress": False, "reparam_check": False, "plot": False,
                                  "threads": 1})
    train(ref)
    _same_weights(tmp_path / "ref" / "final.safetensors", out / "final.safetensors")


# ------------------------------------------------------------------------------------ unknown keys at any depth
def test_unknown_keys_at_any_depth_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"unknown recipe key 'sparse.sparsityy' in --set; did you mean "
                                          r"'sparse.sparsity'\?"):
        parse_set(["sparse.sparsityy=0.2"])
    with pytest.raises(ConfigError, match=r"'sparse.a.b'.*closest valid key"):
        parse_set(["sparse.a.b=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: default\nsparse:\n  enabled: true\n  update_evry: 10\n")
    with pytest.raises(ConfigError, match=r"'sparse.update_evry' in .*bad.yaml; did you mean 'sparse.update_every'"):
        load_recipe(str(bad))
    with pytest.raises(ConfigError, match="'sparse.sparsityy' in overrides"):
        make_config("default", {"sparse": {"sparsityy": 0.2}})
    with pytest.raises(ConfigError, match="sparsity must be in"):
        make_config("default", {"sparse": {"sparsity": 1.5}})
    # --print-config no longer shows a misspelled key: the command fails with one line and status 2
    for argv in (["--print-config", "--set", "sparse.sparsityy=0.2"], ["--recipe", str(bad), "--print-config"],
                 ["--print-config", "--set", "lr=[1,"]):
        assert lkvision_main(["train", *argv]) == 2
        cap = capsys.readouterr()
        assert cap.out == "" and len(cap.err.strip().splitlines()) == 1 and cap.err.startswith("lkvision train: ")
    # model_kwargs has no schema in the recipe: the model's constructor names the key when the run starts
    with pytest.raises(ConfigError, match=r"model_kwargs.*'dimm'.*closest valid argument: 'dim'"):
        train(quick_cfg(tmp_path / "x", model_kwargs={"dimm": 8}))


def test_torchrun_worker_on_its_way_out_ignores_later_signals_until_it_exits():
    """A worker that stopped on SIGTERM under torchrun keeps ignoring SIGINT/SIGTERM (the launcher sends another
    as soon as a peer exits) through interpreter shutdown, where Python resets its own handlers to the default:
    the process still exits with 143, not killed by the signal (-15)."""
    code = textwrap.dedent('''
        import atexit, os, signal, sys
        from lkvision.train.stop import GracefulStop, TrainingInterrupted
        stop = GracefulStop(announce=False, abort_on_repeat=False)
        try:
            with stop:
                stop.arm()
                os.kill(os.getpid(), signal.SIGTERM)  # the first signal: noted, the step finishes
                raise TrainingInterrupted(stop.signum, 3, None)
        except TrainingInterrupted as e:
            code = e.exit_code
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN, signal.getsignal(signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # the launcher's repeat while reporting: ignored
        atexit.register(lambda: os.kill(os.getpid(), signal.SIGTERM))  # and one during shutdown
        sys.exit(code)
    ''')
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 143, proc.stderr[-2000:]
