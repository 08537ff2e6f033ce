"""DDP + dynamic sparse training + stop/resume together: 2 CPU processes under a real ``torchrun`` (gloo).

One run goes straight through; another gets SIGTERM in only one of its two workers (rank 1) mid-run, so the
ranks must agree on the step to stop at, checkpoint together and exit 143; it is then resumed with
``--resume auto``. Final weights, masks, mask counters and optimizer state equal the uninterrupted run's, and
the masks were identical on both ranks after every mask update (digests recorded by the engine).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lkvision.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow  # three 2-process torchrun launches: ~1 minute on 2 cores

STEPS = 16  # 128 images / 2 ranks / batch 8 = 8 steps per epoch, 2 epochs; a mask update every 2 steps


def _args(out: Path) -> list[str]:
    return ["--recipe", "default_sparse", "--model", "sw_femto", "--output", str(out), "--set", "input_size=32",
            "--set", "train_subset=128", "--set", "val_subset=64", "--batch-size", "8", "--epochs", "2",
            "--workers", "0", "--no-progress", "--set", "reparam_check=false", "--set", "plot=false",
            "--set", "threads=1", "--set", "log_every=1", "--set", "warmup_epochs=0.5",
            "--set", "sparse.update_every=2", "--set", "sparse.sync_gap=2", "--set", "keep_last=5"]


def _torchrun(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "lkvision.train", *args]


def _env() -> dict[str, str]:
    # bit-exact comparison of separate processes: no kernel chosen by timing (each process, and each rank,
    # would time its own; docs/training.md, "deterministic")
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "LKVISION_AUTOSELECT": "0"}


def _worker_pid(agent: int, rank: int, timeout: float = 60.0) -> int:
    """The pid of torchrun's worker process with RANK=rank (a child of the agent), from /proc."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                env = (d / "environ").read_bytes().split(b"\0") if ppid == agent else []
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return int(d.name)
        time.sleep(0.1)
    raise AssertionError(f"no RANK={rank} worker under torchrun pid {agent}")


def _state(path: Path) -> dict:
    return load_checkpoint(path)[1]


def _assert_equal_tensors(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_equal_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker pids through Linux /proc")
def test_torchrun_sparse_sigterm_one_rank_then_resume_equals_straight_run(tmp_path):
    a, b = tmp_path / "straight", tmp_path / "stopped"
    straight = subprocess.run(_torchrun(_args(a)), capture_output=True, text=True, env=_env(), timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]

    proc = subprocess.Popen(_torchrun(_args(b)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())
    try:
        rank1 = _worker_pid(proc.pid, 1)
        for line in proc.stdout:
            if line.startswith("step 3/"):
                os.kill(rank1, signal.SIGTERM)  # only rank 1 is told to stop
                break
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    # both workers stopped cleanly with 143 (torchrun then reports the job as failed, with its own traceback)
    assert proc.returncode != 0 and err.count("exitcode  : 143") == 2, err[-3000:]
    assert "KeyboardInterrupt" not in err and 'lkvision/train/engine.py", line' not in err, err[-3000:]
    assert "lkvision train: stopped by SIGTERM after step" in err and "--resume auto" in err
    stopped = sorted(b.glob("ckpt-*.state.pt"))
    assert stopped, err[-3000:]
    stop_step = _state(stopped[-1])["step"]
    assert 3 <= stop_step < STEPS, f"the run should stop mid-way, at step {stop_step}"

    resumed = subprocess.run(_torchrun([*_args(b), "--resume", "auto"]), capture_output=True, text=True,
                             env=_env(), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {stopped[-1]} at step {stop_step}" in resumed.stdout

    wa, wb = load_file(str(a / "final.safetensors")), load_file(str(b / "final.safetensors"))
    _assert_equal_tensors(wa, wb, "weights")
    sa, sb = _state(a / f"ckpt-{STEPS:08d}.state.pt"), _state(b / f"ckpt-{STEPS:08d}.state.pt")
    assert sa["world_size"] == sb["world_size"] == 2
    _assert_equal_tensors(sa["optimizer"], sb["optimizer"], "optimizer")
    for key in ("masks", "densities", "steps", "updates", "syncs", "rng_state"):
        _assert_equal_tensors(sa["sparse"][key], sb["sparse"][key], f"sparse.{key}")
    assert sa["sparse"]["updates"] == STEPS // 2 and sa["sparse"]["syncs"] >= 2
    assert any(not m.all() for m in sa["sparse"]["masks"].values())
    # after every mask update, both ranks held the same masks -- in both runs, and the same masks in both runs
    da, db = sa["history"]["mask_digests"], sb["history"]["mask_digests"]
    assert [s for s, _ in da] == list(range(2, STEPS + 1, 2))
    assert da == db
    assert all(len(d) == 2 and d[0] == d[1] for _, d in da)
