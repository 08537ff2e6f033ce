"""Export of deploy forms: ONNX (onnxruntime parity) for every family's tiny model, torch.export, the CLI,
and torch.compile of a training-form model."""

from __future__ import annotations

import copy

import pytest
import torch

import lkvision
from conftest import family_test_models, randomize_bn_and_scales
from lkvision.export import ExportError, export_onnx, export_program, plain_dwconv

CASES = family_test_models()
IDS = [n for n, _ in CASES]
IMG = 64


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_onnx_export_matches_onnxruntime(name, kw, tmp_path):
    torch.manual_seed(0)
    model = randomize_bn_and_scales(lkvision.create_model(name, num_classes=10, **kw), seed=2).eval()
    res = export_onnx(model, tmp_path / f"{name}.onnx", IMG, opset=17, dynamic_batch=True)
    assert res.path.is_file() and res.output_names == ["logits"]
    assert res.max_abs_diff is not None and res.max_abs_diff <= 1e-4
    assert "Conv" in res.op_types and "BatchNormalization" not in res.op_types
    # the deploy export must also equal the *training-form* model (re-parameterisation is exact)
    import onnxruntime as ort

    x = torch.randn(3, 3, IMG, IMG)
    out = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x)
    assert float((torch.from_numpy(out) - ref).abs().max()) <= 1e-4 * max(1.0, float(ref.abs().max()))


def test_onnx_features_only_outputs(tmp_path):
    model = lkvision.create_model("replknet_nano", features_only=True, out_indices=(1, 3)).eval()
    res = export_onnx(model, tmp_path / "f.onnx", (3, 64, 96), dynamic_batch=False)
    assert res.output_names == ["features.0", "features.1"]


def test_plain_dwconv_restores_dispatcher():
    from lkvision.ops import dwconv as dw

    before = dw.dwconv2d
    with plain_dwconv():
        assert dw.dwconv2d is not before
        x, w = torch.randn(1, 2, 9, 9), torch.randn(2, 1, 3, 5)
        y = dw.dwconv2d(x, w, None, padding=(0, 1, 2, 0))
    assert dw.dwconv2d is before
    torch.testing.assert_close(y, before(x, w, None, padding=(0, 1, 2, 0)), rtol=0, atol=1e-6)


def test_bad_input_size_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="input_size"):
        export_onnx(lkvision.create_model("replknet_nano"), tmp_path / "x.onnx", (1, 2, 3, 4, 5))
    assert issubclass(ExportError, RuntimeError)


def test_torch_export_program_dynamic_batch():
    torch.manual_seed(0)
    model = randomize_bn_and_scales(lkvision.create_model("convnext_nano_lk", num_classes=10)).eval()
    ep = export_program(model, torch.randn(1, 3, IMG, IMG))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("lkvision" in t or "batch_norm" in t for t in targets), targets
    x = torch.randn(3, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), model(x), rtol=0, atol=1e-4)


def test_cli_onnx(tmp_path, capsys):
    from lkvision.export.cli import main

    out = tmp_path / "m.onnx"
    assert main(["--model", "replknet_nano", "--out", str(out), "--img-size", "64", "--num-classes", "5"]) == 0
    assert out.is_file() and "onnxruntime max |diff|" in capsys.readouterr().out
    assert main(["--model", "no_such_model", "--out", str(out)]) == 2
    assert "unknown model" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_torch_format(tmp_path):
    from lkvision.export.cli import main

    out = tmp_path / "m.pt2"
    assert main(["--model", "mobilenetv2_nano_k13_rep3", "--format", "torch", "--out", str(out),
                 "--img-size", "64"]) == 0
    ep = torch.export.load(str(out))
    assert ep.module()(torch.randn(2, 3, 64, 64)).shape == (2, 1000)


@pytest.mark.slow
def test_torch_compile_training_form():
    torch.manual_seed(0)
    model = lkvision.create_model("replknet_nano", num_classes=10).train()
    compiled = torch.compile(model, fullgraph=True)  # no graph breaks (the dwconv custom op traces)
    x = torch.randn(2, 3, IMG, IMG)
    y = compiled(x)
    y.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    y_ref = model(x)  # BN batch statistics: same batch -> same output
    y_ref.square().mean().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    # The gradients are compared with an fp64 run of the same model: the compiled graph (standard ops) must be
    # about as accurate as eager mode (CPU fast paths, another summation order). BN weight gradients are sums
    # with heavy cancellation, so fp32 noise there is ~1e-2 of their size whatever the path; a direct
    # compiled-vs-eager bound would be either that loose or flaky.
    m64 = copy.deepcopy(model).double()
    m64(x.double()).square().mean().backward()
    for (n, p), p64 in zip(model.named_parameters(), m64.parameters()):
        truth = p64.grad.float()
        err_compiled = (grads[n] - truth).abs().max()
        err_eager = (p.grad - truth).abs().max()
        assert err_compiled <= 4 * err_eager + 1e-4 * truth.abs().max() + 1e-7, (n, err_compiled, err_eager)
