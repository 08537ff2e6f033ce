"""Tests of lkvision.ops.kernels (Triton depth-wise conv and fused Shiftwise strips).

Three tiers:
* always: PyTorch fallback (CPU, no interpreter), argument errors, fake/meta impls (opcheck), is_available;
* ``triton``: the real kernels under the Triton CPU interpreter. TRITON_INTERPRET must be set before triton
  is imported, so the cases run in ONE subprocess (this file executed as a script) and report their errors
  as JSON; each test asserts its case;
* ``gpu``: the same cases (bigger shapes, all dtypes) on CUDA, plus torch.compile.

Every case compares forward and backward (input, weight and bias gradients) with a float64 PyTorch
reference by ``||out - ref|| / ||ref||``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from lkvision.ops.kernels import is_available
from lkvision.ops.kernels.triton_dwconv import dwconv2d, dwconv2d_reference
from lkvision.ops.kernels.triton_shiftwise import shiftwise_strips, shiftwise_strips_reference

TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


# ----------------------------------------------------------------------------------------------------------
# Case helpers (shared by the interpreter subprocess, the CPU fallback tests and the GPU tests)
# ----------------------------------------------------------------------------------------------------------
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    if not torch.isfinite(a).all():
        return math.inf
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "nhwc":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # a non-contiguous view: every other column of a wider tensor
        wide = torch.repeat_interleave(t, 2, dim=-1)
        wide[..., 1::2] = float("nan")  # never read
        return wide[..., ::2]
    return t.contiguous()


def dw_case(shape, kernel, padding, *, dtype=torch.float32, layout="nchw", bias=True, device="cpu",
            seed=0) -> dict:
    """Errors of dwconv2d (forward, grad x / weight / bias) against a float64 reference."""
    g = torch.Generator().manual_seed(seed)
    b, c, h, w = shape
    x64 = torch.randn(shape, generator=g, dtype=torch.float64)
    w64 = torch.randn((c, 1, *kernel), generator=g, dtype=torch.float64) / math.prod(kernel) ** 0.5
    b64 = torch.randn(c, generator=g, dtype=torch.float64) if bias else None
    x = _layout(x64.to(dtype), layout).to(device).requires_grad_()
    wt = w64.to(dtype).to(device).requires_grad_()
    bt = b64.to(dtype).to(device).requires_grad_() if bias else None
    y = dwconv2d(x, wt, bt, padding)
    gy64 = torch.randn(y.shape, generator=g, dtype=torch.float64)
    y.backward(gy64.to(dtype).to(device))

    xr = x.detach().double().cpu().requires_grad_()
    wr = wt.detach().double().cpu().requires_grad_()
    br = bt.detach().double().cpu().requires_grad_() if bias else None
    yr = dwconv2d_reference(xr, wr, br, padding)
    yr.backward(gy64)
    errs = {"out": _rel(y, yr), "grad_x": _rel(x.grad, xr.grad), "grad_w": _rel(wt.grad, wr.grad)}
    if bias:
        errs["grad_b"] = _rel(bt.grad, br.grad)
    errs["layout_kept"] = float((layout == "nhwc") == y.is_contiguous(memory_format=torch.channels_last)
                                or y.shape[1] == 1)
    errs["shape_ok"] = float(tuple(y.shape) == tuple(yr.shape))
    return errs


def sw_case(shape, big_kernel, *, k=3, separate=True, dtype=torch.float32, layout="nchw", device="cpu",
            seed=0) -> dict:
    """Errors of shiftwise_strips (forward and all gradients) against three float64 F.conv2d calls."""
    g = torch.Generator().manual_seed(seed)
    b, r, h, w = shape
    strip_len = k * -(-big_kernel // k)
    x64 = torch.randn(shape, generator=g, dtype=torch.float64)
    kh64 = torch.randn((r, 1, k, strip_len), generator=g, dtype=torch.float64) / 4
    kv64 = torch.randn((r, 1, strip_len, k), generator=g, dtype=torch.float64) / 4
    ks64 = torch.randn((r, 1, k, k), generator=g, dtype=torch.float64) / 3
    bias64 = None if separate else torch.randn(r, generator=g, dtype=torch.float64)
    x = _layout(x64.to(dtype), layout).to(device).requires_grad_()
    params = [t.to(dtype).to(device).requires_grad_() for t in (kh64, kv64, ks64)]
    bias = bias64.to(dtype).to(device).requires_grad_() if bias64 is not None else None
    out = shiftwise_strips(x, *params, bias, big_kernel, small_kernel=k, separate=separate)
    outs = list(out) if separate else [out]
    grads64 = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]
    torch.autograd.backward(outs, [gg.to(dtype).to(device) for gg in grads64])

    xr = x.detach().double().cpu().requires_grad_()
    pr = [p.detach().double().cpu().requires_grad_() for p in params]
    br = bias.detach().double().cpu().requires_grad_() if bias is not None else None
    ref = shiftwise_strips_reference(xr, *pr, br, big_kernel, separate=separate)
    refs = list(ref) if separate else [ref]
    torch.autograd.backward(refs, grads64)
    errs = {f"out{i}": _rel(o, r_) for i, (o, r_) in enumerate(zip(outs, refs))}
    errs["grad_x"] = _rel(x.grad, xr.grad)
    for name, p, p_ref in zip(("grad_kh", "grad_kv", "grad_ks"), params, pr):
        errs[name] = _rel(p.grad, p_ref.grad)
    if bias is not None:
        errs["grad_b"] = _rel(bias.grad, br.grad)
    errs["layout_kept"] = float((layout == "nhwc") == outs[0].is_contiguous(memory_format=torch.channels_last))
    return errs


_BF, _HF = "bfloat16", "float16"
# name -> (kind, kwargs). Shapes are tiny: the interpreter runs every program in Python.
FAST_CASES = {
    "dw_nchw_asym": ("dw", dict(shape=(2, 2, 6, 9), kernel=(3, 5), padding=(1, 3, 2, 0))),
    "dw_nhwc_same": ("dw", dict(shape=(2, 5, 6, 7), kernel=(5, 3), padding=(1, 1, 2, 2), layout="nhwc")),
    "dw_strided_small_input": ("dw", dict(shape=(1, 2, 4, 5), kernel=(7, 7), padding=(3, 3, 3, 3),
                                          layout="strided", bias=False)),
    "dw_toeplitz_wide": ("dw", dict(shape=(1, 1, 5, 37), kernel=(3, 9), padding=(2, 6, 1, 1))),
    "dw_bf16": ("dw", dict(shape=(1, 3, 6, 6), kernel=(5, 5), padding=(2, 2, 2, 2), dtype=_BF)),
    "sw_separate_nchw": ("sw", dict(shape=(1, 2, 6, 7), big_kernel=7)),
    "sw_deploy_nhwc": ("sw", dict(shape=(1, 5, 5, 6), big_kernel=8, separate=False, layout="nhwc")),
    "sw_deploy_fp16": ("sw", dict(shape=(1, 2, 5, 6), big_kernel=5, separate=False, dtype=_HF)),
}
SLOW_CASES = {
    "dw_k13_nchw": ("dw", dict(shape=(2, 3, 10, 12), kernel=(13, 13), padding=(6, 6, 6, 6))),
    "dw_strip_3x51": ("dw", dict(shape=(1, 2, 6, 20), kernel=(3, 51), padding=(25, 25, 1, 1))),
    "dw_k13_nhwc_fp16": ("dw", dict(shape=(1, 6, 9, 9), kernel=(13, 13), padding=(6, 6, 6, 6), layout="nhwc",
                                    dtype=_HF)),
    "sw_separate_m13_strided": ("sw", dict(shape=(2, 4, 8, 10), big_kernel=13, layout="strided")),
    "sw_deploy_m13_k5": ("sw", dict(shape=(1, 3, 9, 9), big_kernel=13, k=5, separate=False)),
}


def run_case(name: str, device: str = "cpu") -> dict:
    kind, kw = {**FAST_CASES, **SLOW_CASES}[name]
    kw = dict(kw)
    dtype = getattr(torch, kw.pop("dtype", "float32"))
    fn = dw_case if kind == "dw" else sw_case
    errs = fn(**kw, dtype=dtype, device=device)
    errs["tol"] = TOL[dtype]
    return errs


def _assert_case(errs: dict, name: str) -> None:
    assert "error" not in errs, f"{name}: {errs.get('error')}"
    tol = errs["tol"]
    for key, val in errs.items():
        if key in ("tol",):
            continue
        if key in ("layout_kept", "shape_ok"):
            assert val == 1.0, f"{name}: {key} failed"
        else:
            assert val <= tol, f"{name}: {key} rel. error {val:.2e} > {tol:.0e} ({errs})"


# ----------------------------------------------------------------------------------------------------------
# Tier 1: fallback path, errors, fake impls (no triton needed)
# ----------------------------------------------------------------------------------------------------------
def test_is_available_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not is_available(torch.randn(1, 1, 2, 2))
    assert not is_available(torch.randn(1, 1, 2, 2, dtype=torch.float64))
    assert not is_available("not a tensor")


@pytest.mark.parametrize("name", ["dw_nchw_asym", "dw_nhwc_same", "dw_strided_small_input",
                                  "sw_separate_nchw", "sw_deploy_nhwc"])
def test_fallback_matches_reference(monkeypatch, name):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _assert_case(run_case(name), name)


def test_dwconv_errors():
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match=r"expected weight of shape \(4, 1, KH, KW\)"):
        dwconv2d(x, torch.randn(3, 1, 3, 3), None, (1, 1, 1, 1))
    with pytest.raises(ValueError, match="padding must be"):
        dwconv2d(x, torch.randn(4, 1, 3, 3), None, (1, 1))
    with pytest.raises(ValueError, match="empty output"):
        dwconv2d(x, torch.randn(4, 1, 11, 3), None, (1, 1, 1, 1))
    with pytest.raises(ValueError, match=r"bias of shape \(4,\)"):
        dwconv2d(x, torch.randn(4, 1, 3, 3), torch.randn(3), (1, 1, 1, 1))
    with pytest.raises(TypeError, match="unsupported dtype"):
        dwconv2d(x.double(), torch.randn(4, 1, 3, 3).double(), None, (1, 1, 1, 1))


def test_shiftwise_errors():
    x = torch.randn(1, 2, 6, 6)
    kh, kv, ks = torch.randn(2, 1, 3, 9), torch.randn(2, 1, 9, 3), torch.randn(2, 1, 3, 3)
    with pytest.raises(ValueError, match=r"kv must have shape \(2, 1, 9, 3\)"):
        shiftwise_strips(x, kh, kh, ks, None, 9)
    with pytest.raises(ValueError, match="mid=9 < L=9"):
        shiftwise_strips(x, kh, kv, ks, None, 19)
    with pytest.raises(ValueError, match="small_kernel must be odd"):
        shiftwise_strips(x, kh, kv, ks, None, 9, small_kernel=2)
    with pytest.raises(ValueError, match="bias is only used with separate=False"):
        shiftwise_strips(x, kh, kv, ks, torch.zeros(2), 9, separate=True)


def test_opcheck_fake_and_autograd_registrations():
    """torch.library.opcheck: schema, fake (meta) impl and autograd registration of every custom op."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 7, requires_grad=True)
    w = torch.randn(3, 1, 3, 5, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    ops = torch.ops.lkvision
    quick = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(ops.triton_dwconv2d, (x, w, b, [2, 2, 1, 1]))  # + aot_dispatch (torch.compile)
    torch.library.opcheck(ops.triton_dwconv2d, (x.contiguous(memory_format=torch.channels_last), w, None,
                                                [0, 4, 2, 0]), test_utils=quick)
    r, strip_len = 3, 9
    kh = torch.randn(r, 1, 3, strip_len, requires_grad=True)
    kv = torch.randn(r, 1, strip_len, 3, requires_grad=True)
    ks = torch.randn(r, 1, 3, 3, requires_grad=True)
    torch.library.opcheck(ops.triton_shiftwise, (x, kh, kv, ks, 9), test_utils=quick)
    torch.library.opcheck(ops.triton_shiftwise_fused, (x, kh, kv, ks, b, 7), test_utils=quick)


def test_torch_export_sees_custom_op():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 1, 5, 5))

        def forward(self, x):
            return dwconv2d(x, self.w, None, (2, 2, 2, 2))

    ep = torch.export.export(M(), (torch.randn(1, 4, 8, 8),))
    assert "lkvision.triton_dwconv2d" in str(ep.graph)


# ----------------------------------------------------------------------------------------------------------
# Tier 2: Triton interpreter (subprocess)
# ----------------------------------------------------------------------------------------------------------
def _run_interpreter(names: list[str]) -> dict:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--interp", *names], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"interpreter subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def interp_fast():
    return _run_interpreter(list(FAST_CASES))


@pytest.fixture(scope="module")
def interp_slow():
    return _run_interpreter(list(SLOW_CASES))


@pytest.mark.triton
@pytest.mark.parametrize("name", list(FAST_CASES))
def test_interpreter_kernels(interp_fast, name):
    assert interp_fast["_available"], "is_available(cpu tensor) must be True under TRITON_INTERPRET=1"
    _assert_case(interp_fast[name], name)


@pytest.mark.triton
@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_CASES))
def test_interpreter_kernels_slow(interp_slow, name):
    _assert_case(interp_slow[name], name)


# ----------------------------------------------------------------------------------------------------------
# Tier 3: GPU
# ----------------------------------------------------------------------------------------------------------
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GPU_DW = [
    ((2, 16, 33, 45), (31, 31), (15, 15, 15, 15)),  # odd sizes
    ((1, 8, 12, 10), (51, 51), (25, 25, 25, 25)),  # H, W < K, batch 1
    ((2, 24, 20, 30), (3, 51), (25, 25, 1, 1)),  # strip
    ((2, 24, 30, 20), (51, 3), (1, 1, 25, 25)),
    ((3, 40, 17, 19), (13, 13), (2, 10, 0, 12)),  # asymmetric
    ((2, 64, 14, 14), (7, 5), (3, 1, 3, 3)),
]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [_BF, _HF, "float32"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "strided"])
@pytest.mark.parametrize("geom", GPU_DW, ids=lambda g: f"{g[0]}-{g[1]}")
def test_gpu_dwconv(geom, layout, dtype):
    shape, kernel, padding = geom
    dt = getattr(torch, dtype)
    errs = dw_case(shape, kernel, padding, dtype=dt, layout=layout, device="cuda")
    errs["tol"] = TOL[dt]
    _assert_case(errs, f"{geom}-{layout}-{dtype}")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [_BF, "float32"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("separate", [True, False])
@pytest.mark.parametrize("geom", [((4, 60, 56, 56), 51), ((2, 122, 28, 28), 49), ((2, 246, 14, 14), 47),
                                  ((3, 49, 7, 7), 13)])
def test_gpu_shiftwise(geom, separate, layout, dtype):
    shape, m = geom
    dt = getattr(torch, dtype)
    errs = sw_case(shape, m, separate=separate, dtype=dt, layout=layout, device="cuda")
    errs["tol"] = TOL[dt]
    _assert_case(errs, f"{geom}-{separate}-{layout}-{dtype}")


@pytest.mark.gpu
@needs_gpu
def test_gpu_is_available_and_compile():
    x = torch.randn(2, 32, 20, 20, device="cuda")
    assert is_available(x) and is_available(x.half()) and not is_available(x.double())
    w = torch.randn(32, 1, 13, 13, device="cuda")

    def f(t):
        return dwconv2d(t, w, None, (6, 6, 6, 6)).relu()

    ref = f(x)
    out = torch.compile(f, fullgraph=True)(x)
    torch.testing.assert_close(out, ref)


@pytest.mark.gpu
@needs_gpu
def test_gpu_weight_grad_deterministic():
    torch.manual_seed(0)
    x = torch.randn(8, 64, 32, 32, device="cuda")
    g = torch.randn(8, 64, 32, 32, device="cuda")
    ops = torch.ops.lkvision
    a = ops.triton_dwconv2d_grad_weight(g, x, [31, 31], [15, 15, 15, 15])
    b = ops.triton_dwconv2d_grad_weight(g, x, [31, 31], [15, 15, 15, 15])
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------------
# Script mode: run cases under the interpreter and print JSON (used by the triton tier)
# ----------------------------------------------------------------------------------------------------------
if __name__ == "__main__" and "--interp" in sys.argv:
    results = {"_available": is_available(torch.randn(1, 1, 1, 1))}
    for case in sys.argv[sys.argv.index("--interp") + 1:]:
        try:
            results[case] = run_case(case)
        except Exception as exc:  # reported per case so one failure does not hide the others
            results[case] = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(results))
