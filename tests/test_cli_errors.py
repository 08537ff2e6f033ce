"""Every command turns a user error into one line and exit status 2 -- never a traceback (lkvision.cli)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lkvision.cli import COMMANDS, UsageError, command, main, run_command

MISSING = "/does/not/exist"

# one bad path or bad argument per command; a command added without a case here is still checked with an
# unknown option below (argparse: usage + one error line, status 2) -- add a case for it
CASES: dict[str, list[str]] = {
    "demo": ["--model", "sw_pico", "--model-kwargs", "{not json"],
    "train": ["--data", MISSING, "--epochs", "1", "--output", "{tmp}/run"],
    "eval": ["--checkpoint", f"{MISSING}/final.safetensors", "--model", "sw_femto"],
    "erf": ["--models", "sw_pico", "--images", MISSING],
    "kernels": ["--models", "sw_pico", "--checkpoint", f"{MISSING}/w.safetensors"],
    "sparsity": ["--checkpoint", f"{MISSING}/w.safetensors"],
    "coverage": ["--M", "51", "--sizes", "56", "28"],
    "flops": ["--models", "sw_pico", "--checkpoint", f"{MISSING}/w.safetensors"],
    "bench": ["models", "--models", "no_such_model"],
    "convert": ["--family", "sw", "--src", f"{MISSING}/ckpt.pth", "--dst", "{tmp}/x.safetensors",
                "--model", "sw_tiny"],
    "export": ["--model", "sw_pico", "--checkpoint", f"{MISSING}/w.safetensors", "--out", "{tmp}/m.onnx"],
    "shape-bias": ["--models", "sw_pico", "--data", MISSING, "--out-dir", "{tmp}/sb"],
}
EXPECT = {"demo": "--model-kwargs must be a JSON object", "coverage": "one feature-map size per M",
          "bench": "unknown model 'no_such_model'"}


@pytest.mark.parametrize("cmd", sorted(COMMANDS))
def test_each_command_reports_a_user_error_in_one_line(cmd, tmp_path, capsys):
    if cmd not in CASES:  # a command this test does not know yet: at least no traceback for a bad option
        with pytest.raises(SystemExit) as e:
            main([cmd, "--definitely-not-an-option"])
        assert e.value.code == 2
        return
    argv = [a.replace("{tmp}", str(tmp_path)) for a in CASES[cmd]]
    assert main([cmd, *argv]) == 2
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert len(err) == 1, cap.err
    assert err[0].startswith(f"lkvision {cmd}: error: ")
    assert EXPECT.get(cmd, MISSING) in err[0]
    assert "Traceback" not in cap.out + cap.err


def test_real_process_one_line_and_status_2():
    r = subprocess.run([sys.executable, "-m", "lkvision", "erf", "--models", "sw_pico", "--images", MISSING],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip() == f"lkvision erf: error: image folder not found: {MISSING}"


def test_the_mechanism(monkeypatch, capsys):
    def bad_value(argv):
        raise UsageError("--x 3: must be even;\n  try --x 4")

    def bug(argv):
        raise RuntimeError("an internal bug keeps its traceback")

    def ctrl_c(argv):
        raise KeyboardInterrupt

    assert run_command("lkvision t", bad_value, []) == 2
    assert capsys.readouterr().err == "lkvision t: error: --x 3: must be even; try --x 4\n"
    with pytest.raises(RuntimeError, match="internal bug"):
        run_command("lkvision t", bug, [])
    assert run_command("lkvision t", ctrl_c, []) == 130
    assert capsys.readouterr().err == "lkvision t: interrupted\n"
    # the decorator gives a command's function the same behaviour when it is called directly
    assert command("lkvision t")(lambda argv: int(argv[0]))(["7"]) == 7
    assert command("lkvision t")(bad_value)([]) == 2
    capsys.readouterr()
    monkeypatch.setenv("LKVISION_TRACEBACK", "1")
    with pytest.raises(UsageError):
        run_command("lkvision t", bad_value, [])
    monkeypatch.delenv("LKVISION_TRACEBACK")
    assert main(["trian"]) == 2 and "did you mean 'train'?" in capsys.readouterr().err


def test_erf_and_kernels_say_when_weights_are_random(tmp_path, capsys):
    import json

    from lkvision.models.shiftwise import TEST_MODELS

    name = "sw_pico" if "sw_pico" in TEST_MODELS else next(iter(TEST_MODELS))
    kw = ["--model-kwargs", json.dumps(TEST_MODELS[name])] if TEST_MODELS[name] else []
    common = ["--models", name, *kw, "--out-dir", str(tmp_path)]
    assert main(["erf", *common, "--num-images", "1", "--resolution", "32"]) == 0
    out = capsys.readouterr().out
    assert f"note: no --checkpoint for {name}: analysing RANDOM (untrained) weights" in out
    assert f"{name} (random init)" in (tmp_path / "erf.csv").read_text()
    assert main(["kernels", *common]) == 0
    assert "RANDOM (untrained) weights" in capsys.readouterr().out
    assert "random init" in (tmp_path / "kernels.json").read_text()
