"""Smoke tests of the GPU benchmark scripts (``benchmarks/gpu_*.py``, ``benchmarks/run_gpu_all.sh``) on CPU.

A GPU session gets about 30 minutes of device time, so the scripts must work the first time they run there. Their
``--smoke`` mode runs the whole script logic (grids, correctness checks, timing, JSON records, tables) on tiny
shapes on the CPU; with ``TRITON_INTERPRET=1`` the Triton paths run in triton's interpreter. Each script runs in a
subprocess (TRITON_INTERPRET must be set before triton is imported) with the lkvision this test imports.

Fast: ``--help`` of every script, the refusal to write smoke results into ``benchmarks/results``, the step-name
check of ``run_gpu_all.sh``. Slow (the interpreter takes ~20 s per script): the smoke runs and their records.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lkvision

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
SCRIPTS = ["gpu_dwconv_table1.py", "gpu_sw_op.py", "gpu_models.py"]
ENV_KEYS = {"torch", "python", "host", "time", "device_type", "smoke", "device", "sms", "memory_gb", "cuda", "cudnn",
            "cpu_threads", "triton", "triton_interpret", "lkvision", "tf32"}
TIMINGS = ("median_ms", "min_ms", "max_ms", "first_ms")
TOL = {"fp32": 1e-5, "bf16": 3e-2}


def _env(interpret: bool) -> dict:
    env = dict(os.environ)
    src = str(Path(lkvision.__file__).resolve().parents[1])  # the lkvision this test imports
    env["PYTHONPATH"] = src + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else src
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return env


def _run(args: list[str], interpret: bool = False, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(interpret), capture_output=True, text=True,
                          timeout=timeout)


def _smoke(script: str, out_dir: Path, *extra: str, interpret: bool = True) -> tuple[subprocess.CompletedProcess,
                                                                                     list[dict]]:
    out = out_dir / script.replace(".py", ".json")
    before = sorted(p.name for p in RESULTS.iterdir())
    proc = _run([str(BENCH / script), "--smoke", "--device", "cpu", "--out", str(out), *extra], interpret)
    assert sorted(p.name for p in RESULTS.iterdir()) == before, "a smoke run wrote into benchmarks/results"
    records = json.loads(out.read_text()) if out.exists() else []
    return proc, records


def _log(proc: subprocess.CompletedProcess) -> str:
    return f"rc {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"


def _check_common(records: list[dict], interpret: bool) -> None:
    """Same keys in every record; the env block of a CPU smoke run; finite timings where measured."""
    assert records
    keys = set(records[0])
    for r in records:
        assert set(r) == keys, f"records differ in their keys: {sorted(set(r) ^ keys)}"
        env = r["env"]
        assert ENV_KEYS <= set(env), sorted(ENV_KEYS - set(env))
        assert env["smoke"] is True and env["device_type"] == "cpu" and env["tf32"] is False
        assert env["triton_interpret"] is interpret
        if r["error"] is None and r["skipped"] is None:
            for k in TIMINGS:
                assert math.isfinite(r[k]) and r[k] > 0, (k, r)
            assert r["runs"] == 1
        else:
            assert math.isnan(r["median_ms"])


def _needs_triton():
    pytest.importorskip("triton")


# ----------------------------------------------------------------------------------------------------- fast
@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    env = _env(interpret=False)
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, str(BENCH / script), "--help"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, _log(proc)
    for flag in ("--smoke", "--device", "--out", "--time-limit-s"):
        assert flag in proc.stdout


def test_smoke_never_writes_into_results():
    proc = _run([str(BENCH / "gpu_sw_op.py"), "--smoke", "--out", str(RESULTS / "smoke.json")])
    assert proc.returncode == 1 and "never writes" in proc.stdout, _log(proc)
    assert not (RESULTS / "smoke.json").exists()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_run_gpu_all_rejects_unknown_step(tmp_path):
    proc = subprocess.run(["bash", str(BENCH / "run_gpu_all.sh"), "bogus"], cwd=ROOT, capture_output=True, text=True,
                          env=dict(_env(False), OUT=str(tmp_path)), timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr


# ----------------------------------------------------------------------------------------------------- slow
@pytest.mark.slow
@pytest.mark.triton
def test_table1_smoke(tmp_path):
    _needs_triton()
    proc, records = _smoke("gpu_dwconv_table1.py", tmp_path)
    assert proc.returncode == 0, _log(proc)
    assert len(records) == 2 * 2 * 3 * 4  # modes x dtypes x (K = 3, 7 + a 3x9 strip) x paths
    _check_common(records, interpret=True)
    assert {r["path"] for r in records} == {"triton", "triton_cl", "torch", "torch_cl"}
    assert {(r["KH"], r["KW"]) for r in records} == {(3, 3), (7, 7), (3, 9)}
    for r in records:
        assert r["error"] is None and r["skipped"] is None, r
        assert r["rel_err"] < TOL[r["dtype"]], r
        assert (r["R"], r["batch"], r["depth"]) == (8, 2, 2)
    assert "best_torch/ours" in proc.stdout


@pytest.mark.slow
@pytest.mark.triton
def test_sw_op_smoke(tmp_path):
    _needs_triton()
    proc, records = _smoke("gpu_sw_op.py", tmp_path)
    assert proc.returncode == 0, _log(proc)
    paths = {"fused", "fused_deploy", "deploy_sum", "torch_deploy_cl", "torch_strips", "torch_strips_cl", "reference"}
    assert len(records) == 2 * 2 * 1 * len(paths)  # modes x dtypes x stage 4 x paths
    _check_common(records, interpret=True)
    assert {r["path"] for r in records} == paths
    for r in records:
        assert r["error"] is None and r["skipped"] is None, r
        assert r["rel_err"] < TOL[r["dtype"]], r
        assert (r["stage"], r["M"], r["nk"], r["batch"]) == (4, 13, 5, 2)
        assert math.isfinite(r["env"]["copy_GBs"]) and r["env"]["copy_GBs"] > 0
        for k in ("achieved_GBs", "frac_of_copy_bw", "TFMA_per_s"):
            assert math.isfinite(r[k]) and r[k] > 0, (k, r)


@pytest.mark.slow
def test_smoke_without_interpreter_skips_triton_paths(tmp_path):
    """Without TRITON_INTERPRET the Triton paths are skipped (noted, recorded), not measured as PyTorch."""
    for script, triton_paths in (("gpu_dwconv_table1.py", {"triton", "triton_cl"}),
                                 ("gpu_sw_op.py", {"fused", "fused_deploy", "deploy_sum"})):
        proc, records = _smoke(script, tmp_path, "--modes", "fwd", "--dtypes", "fp32", interpret=False)
        assert proc.returncode == 0, _log(proc)
        assert "note:" in proc.stdout and "TRITON_INTERPRET=1" in proc.stdout
        _check_common(records, interpret=False)
        for r in records:
            assert r["error"] is None
            assert (r["skipped"] is not None) == (r["path"] in triton_paths), r


@pytest.fixture(scope="module")
def models_smoke(tmp_path_factory):
    return _smoke("gpu_models.py", tmp_path_factory.mktemp("models"))


@pytest.mark.slow
def test_models_smoke(models_smoke):
    proc, records = models_smoke
    assert proc.returncode == 0, _log(proc)
    assert len(records) == 2 * 2 * 2 * 2  # modes x dtypes x models x backends
    _check_common(records, interpret=True)
    assert {r["model"] for r in records} == {"sw_femto", "unireplknet_test"}
    assert {r["kernels"] for r in records} == {"not dispatched on cpu", "hidden"}
    for r in records:
        assert r["error"] is None and r["skipped"] is None, r
        assert r["img_s"] > 0 and (r["res"], r["batch"]) == (64, 2)
        if r["mode"] == "infer":
            assert r["rel_err"] < TOL[r["dtype"]], r
        else:
            assert math.isnan(r["rel_err"])
    assert "vs unireplknet_test" in proc.stdout


@pytest.mark.slow
def test_models_smoke_bf16_training(models_smoke):
    proc, records = models_smoke
    rows = [r for r in records if r["mode"] == "train" and r["dtype"] == "bf16"]
    assert len(rows) == 4
    errors = [r["error"] for r in rows if r["error"]]
    assert not errors, errors  # (autocast once broke every large-kernel model's bf16 training step)
    assert all(r["img_s"] > 0 for r in rows), rows


@pytest.mark.slow
@pytest.mark.triton
def test_models_smoke_with_kernels_in_the_models(tmp_path):
    """--cpu-kernels: the models' dispatchers take their CUDA route (autoselect -> Triton) on CPU."""
    _needs_triton()
    proc, records = _smoke("gpu_models.py", tmp_path, "--cpu-kernels", "--models", "sw_femto", "--modes", "infer",
                           "--dtypes", "fp32", "--backends", "triton", "--res", "32")
    assert proc.returncode == 0, _log(proc)
    assert "not routed" not in proc.stdout, "the CPU routing no longer matches lkvision.ops: update gpu_models.py"
    (r,) = records
    assert r["error"] is None and r["kernels"] == "available (interpreter)" and r["rel_err"] < TOL["fp32"], r
    assert set(r["autoselect"].get("shiftwise_deploy_conv", {})) == {"triton"}, r["autoselect"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_run_gpu_all_smoke_step(tmp_path):
    """SMOKE=1 runs a step of the GPU session's command on CPU: JSON and log into $OUT."""
    env = dict(_env(False), SMOKE="1", OUT=str(tmp_path))
    proc = subprocess.run(["bash", str(BENCH / "run_gpu_all.sh"), "sw_op"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, _log(proc)
    records = json.loads((tmp_path / "gpu_sw_op.json").read_text())
    n_paths = len(json.loads(subprocess.run(
        [sys.executable, "-c", "import json, gpu_sw_op; print(json.dumps(gpu_sw_op.PATHS))"], cwd=BENCH,
        env=_env(False), capture_output=True, text=True, check=True).stdout))
    assert len(records) == 2 * 2 * n_paths and all(r["error"] is None for r in records)  # modes x dtypes x paths
    log = (tmp_path / "logs" / "sw_op.log").read_text()
    assert "summary:" in log and "end sw_op: rc 0" in log
