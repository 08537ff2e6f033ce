import json

import pytest
import torch

from lkvision.bench.dwconv import dwconv_paths, dwconv_stack_time, trimmed_mean
from lkvision.bench.throughput import inference_throughput, train_throughput


def test_trimmed_mean_is_the_official_protocol():
    assert trimmed_mean([5.0, 1.0, 2.0, 3.0, 100.0, 50.0]) == pytest.approx((2 + 3 + 5) / 3)
    assert trimmed_mean([2.0, 4.0]) == 3.0


def test_dwconv_paths_compute_the_same_stack():
    from lkvision.bench.dwconv import _conv

    paths = dwconv_paths("cpu")
    assert paths[0] == "pytorch" and "torch" in paths and "triton" not in paths
    x = torch.randn(1, 4, 9, 9, requires_grad=True)
    w = torch.randn(4, 1, 7, 7, requires_grad=True)
    ref = _conv("pytorch")(x, w, 7)
    gref = torch.autograd.grad(ref.square().sum(), (x, w))
    for p in paths[1:]:
        y = _conv(p)(x, w, 7)
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
        for a, b in zip(torch.autograd.grad(y.square().sum(), (x, w)), gref):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert dwconv_stack_time("pytorch", 1, 4, 8, 5, depth=2, backward=True, runs=2) > 0


def test_throughput_functions_on_a_tiny_module():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 5))
    r = inference_throughput(model, batch_size=2, resolution=16, warmup=1, iters=2, channels_last=True)
    assert r["img_s"] > 0 and r["ms_per_batch"] > 0
    t = train_throughput(model, batch_size=2, resolution=16, dtype="bf16", warmup=1, iters=1)
    assert t["img_s"] > 0
    with pytest.raises(ValueError, match="dtype"):
        inference_throughput(model, dtype="int8")


def test_bench_cli_models_train_and_dwconv(tmp_path, capsys):
    from lkvision.cli import main
    from lkvision.models.shiftwise import TEST_MODELS

    name, kw = "sw_pico", dict(TEST_MODELS["sw_pico"])
    out = tmp_path / "m.json"
    args = ["--models", name, "--model-kwargs", json.dumps(kw), "-r", "32", "--warmup", "0", "--iters", "1"]
    assert main(["bench", "models", *args, "-b", "1", "--form", "both", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["form"] for r in res["rows"]] == ["train", "deploy"] and res["rows"][0]["ratio_to_first"] == 1.0
    assert all("error" not in r for r in res["rows"])
    assert res["environment"]["torch"] == torch.__version__ and "bench models" in res["command"]
    out = tmp_path / "t.json"
    assert main(["bench", "train", *args, "-b", "2", "--json", str(out)]) == 0
    assert "error" not in json.loads(out.read_text())["rows"][0]
    out = tmp_path / "d.json"
    assert main(["bench", "dwconv", "-k", "3", "7", "-R", "8", "-b", "1", "-c", "4", "--depth", "2", "--runs", "2",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["path"] for r in rows} >= {"pytorch", "torch", "custom"} and all("error" not in r for r in rows)
    assert "ratio_to_first" in capsys.readouterr().out


def test_bf16_speed_note_measures_and_is_printed_when_bf16_is_slower(monkeypatch, capsys):
    """``bf16_speed_note``: a real measurement (a positive ratio, cached), None on non-CPU devices, and a one-line
    note from the bf16 CLIs when this CPU runs bf16 GEMMs slower than fp32 ones (as on Intel Xeons without AMX)."""
    from lkvision.bench import roofline
    from lkvision.cli import main
    from lkvision.models.shiftwise import TEST_MODELS

    ratio = roofline.cpu_bf16_gemm_speedup()
    assert ratio > 0 and roofline.cpu_bf16_gemm_speedup() == ratio  # measured once
    assert roofline.bf16_speed_note("meta") is None
    assert (roofline.bf16_speed_note("cpu") is None) == (ratio >= 1.0)
    args = ["--models", "sw_pico", "--model-kwargs", json.dumps(dict(TEST_MODELS["sw_pico"])), "-r", "32",
            "--warmup", "0", "--iters", "1", "-b", "1", "--dtype", "bf16"]
    for fake, shown in ((0.5, True), (1.9, False)):
        monkeypatch.setattr(roofline, "cpu_bf16_gemm_speedup", lambda fake=fake: fake)
        assert main(["bench", "models", *args]) == 0
        err = capsys.readouterr().err
        assert ("bf16 matrix products run at 0.50x the speed of fp32" in err) == shown, err
