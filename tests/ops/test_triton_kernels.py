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

import contextlib
import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

from lkvision.ops.kernels import is_available, triton_dwconv
from lkvision.ops.kernels.triton_dwconv import dwconv2d_reference, dwconv2d_sum, triton_dwconv2d
from lkvision.ops.kernels.triton_shiftwise import fused_strips, fused_strips_reference

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
    y = triton_dwconv2d(x, wt, bt, padding)
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
    """Errors of fused_strips (forward and all gradients) against three float64 F.conv2d calls."""
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
    out = fused_strips(x, *params, bias, big_kernel, small_kernel=k, separate=separate)
    outs = list(out) if separate else [out]
    grads64 = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]
    torch.autograd.backward(outs, [gg.to(dtype).to(device) for gg in grads64])

    xr = x.detach().double().cpu().requires_grad_()
    pr = [p.detach().double().cpu().requires_grad_() for p in params]
    br = bias.detach().double().cpu().requires_grad_() if bias is not None else None
    ref = fused_strips_reference(xr, *pr, br, big_kernel, separate=separate)
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


def dwsum_case(shape, kernels, paddings, *, dtype=torch.float32, layout="nchw", bias=True, device="cpu",
               seed=0) -> dict:
    """Errors of dwconv2d_sum (sum of depth-wise convs of one input + bias; forward and all gradients)."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x64 = torch.randn(shape, generator=g, dtype=torch.float64)
    w64 = [torch.randn((c, 1, *k), generator=g, dtype=torch.float64) / math.prod(k) ** 0.5 for k in kernels]
    b64 = torch.randn(c, generator=g, dtype=torch.float64) if bias else None
    x = _layout(x64.to(dtype), layout).to(device).requires_grad_()
    ws = [w.to(dtype).to(device).requires_grad_() for w in w64]
    bt = b64.to(dtype).to(device).requires_grad_() if bias else None
    y = dwconv2d_sum(x, ws, bt, paddings)
    gy64 = torch.randn(y.shape, generator=g, dtype=torch.float64)
    y.backward(gy64.to(dtype).to(device))

    xr = x.detach().double().cpu().requires_grad_()
    wr = [w.detach().double().cpu().requires_grad_() for w in ws]
    br = bt.detach().double().cpu().requires_grad_() if bias else None
    yr = sum(dwconv2d_reference(xr, w, None, pad) for w, pad in zip(wr, paddings))
    if bias:
        yr = yr + br.view(1, -1, 1, 1)
    yr.backward(gy64)
    errs = {"out": _rel(y, yr), "grad_x": _rel(x.grad, xr.grad)}
    errs.update({f"grad_w{t}": _rel(w.grad, w_ref.grad) for t, (w, w_ref) in enumerate(zip(ws, wr))})
    if bias:
        errs["grad_b"] = _rel(bt.grad, br.grad)
    errs["layout_kept"] = float((layout == "nhwc") == y.is_contiguous(memory_format=torch.channels_last))
    errs["shape_ok"] = float(tuple(y.shape) == tuple(yr.shape))
    return errs


def layer_case(channels, big_kernel, shape, *, deploy=False, dtype=torch.float32, layout="nchw", device="cpu",
               seed=0, impl="triton") -> dict:
    """ShiftWiseConv2d with impl="triton" (training form: the fused separate op; deploy form: dwconv2d_sum)
    against the same layer on the PyTorch paths in float64, forward and gradients (eval mode, random BN)."""
    import copy

    from lkvision.layers.shiftwise import ShiftWiseConv2d

    torch.manual_seed(seed)
    layer = ShiftWiseConv2d(channels, big_kernel, impl=impl, dwconv_impl=impl).eval()
    with torch.no_grad():
        for m in layer.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    if deploy:
        layer.reparameterize()
    ref = copy.deepcopy(layer).double()
    ref.impl, ref.dwconv_impl = "fast", "torch"
    layer = layer.to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    x64 = torch.randn(shape, generator=g, dtype=torch.float64)
    x = _layout(x64.to(dtype), layout).to(device).requires_grad_()
    xr = x64.clone().requires_grad_()
    y, yr = layer(x), ref(xr)
    gy = torch.randn(yr.shape, generator=g, dtype=torch.float64)
    y.backward(gy.to(dtype).to(device))
    yr.backward(gy)
    errs = {"out": _rel(y, yr), "grad_x": _rel(x.grad, xr.grad)}
    for (name, p), p_ref in zip(layer.named_parameters(), ref.parameters()):
        if p_ref.grad is not None and p_ref.grad.abs().sum() > 0:
            errs[f"grad_{name}"] = _rel(p.grad, p_ref.grad)
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
    # tensor-core (tl.dot) kernel: row-Toeplitz, column-Toeplitz and direct terms in one launch, several tiles
    "sw_separate_mma_tiles": ("sw", dict(shape=(1, 2, 19, 21), big_kernel=13)),
    "sw_deploy_mma_fp16": ("sw", dict(shape=(1, 2, 9, 18), big_kernel=13, separate=False, dtype=_HF)),
    "dw_tall_strip_51x3": ("dw", dict(shape=(1, 2, 20, 6), kernel=(51, 3), padding=(1, 1, 25, 25))),
    # dwconv2d_sum: the SW deploy form (widened horizontal strip with the small kernel folded in + vertical strip)
    "dwsum_sw_deploy_nchw": ("dwsum", dict(shape=(2, 3, 10, 17), kernels=[(3, 15), (13, 3)],
                                           paddings=[(7, 7, 1, 1), (1, 1, 6, 6)])),
    "layer_sw_train_triton": ("layer", dict(channels=8, big_kernel=13, shape=(2, 8, 9, 11))),
    "layer_sw_deploy_triton": ("layer", dict(channels=8, big_kernel=13, shape=(2, 8, 9, 11), deploy=True)),
    "layer_sw_auto_measured": ("auto", dict(channels=8, big_kernel=13, shape=(1, 8, 7, 9))),
    "dwsum_sw_deploy_nhwc": ("dwsum", dict(shape=(1, 5, 7, 8), kernels=[(3, 9), (8, 3), (3, 3)],
                                           paddings=[(4, 4, 1, 1), (1, 1, 4, 3), (1, 1, 1, 1)], layout="nhwc")),
    # the measured dispatch with the real kernels: Triton chosen and run; a kernel failing at run time
    "dispatch_dw_triton_runs": ("dispatch", dict(op="dwconv2d")),
    "dispatch_dw_grad_weight_fails": ("dispatch", dict(op="dwconv2d", fail_path="grad_weight")),
    "dispatch_sw_forward_fails": ("dispatch", dict(op="shiftwise_conv", fail_path="mma")),
}
SLOW_CASES = {
    "dw_k13_nchw": ("dw", dict(shape=(2, 3, 10, 12), kernel=(13, 13), padding=(6, 6, 6, 6))),
    "dw_strip_3x51": ("dw", dict(shape=(1, 2, 6, 20), kernel=(3, 51), padding=(25, 25, 1, 1))),
    "dw_k13_nhwc_fp16": ("dw", dict(shape=(1, 6, 9, 9), kernel=(13, 13), padding=(6, 6, 6, 6), layout="nhwc",
                                    dtype=_HF)),
    "sw_separate_m13_strided": ("sw", dict(shape=(2, 4, 8, 10), big_kernel=13, layout="strided")),
    "sw_deploy_m13_k5": ("sw", dict(shape=(1, 3, 9, 9), big_kernel=13, k=5, separate=False)),
}


# The kernel paths (triton_dwconv.LAUNCHES keys) each case must run under the interpreter: the PyTorch fallback
# inside the ops is also the reference, so a case that silently ran it would pass the error checks; every case
# names the kernels it tests, and the test asserts exactly those ran ("mma": tensor-core kernel, "direct_*": the
# direct kernel per layout, "grad_weight": the weight-gradient reduction; the input gradient runs a forward one).
EXPECTED_PATHS = {
    "dw_nchw_asym": {"direct_nchw", "grad_weight"},  # 3 x 5: no term wide enough for the tensor cores
    "dw_nhwc_same": {"direct_nhwc", "grad_weight"},
    "dw_strided_small_input": {"mma", "grad_weight"},  # strided views take the NCHW kernels
    "dw_toeplitz_wide": {"mma", "grad_weight"},
    "dw_bf16": {"direct_nchw", "grad_weight"},  # bf16 tl.dot is wrong in the 3.7 interpreter: direct there
    "sw_separate_nchw": {"mma", "grad_weight"},
    "sw_deploy_nhwc": {"direct_nhwc", "grad_weight"},
    "sw_deploy_fp16": {"direct_nchw", "grad_weight"},  # M=5: 3 x 6 and 6 x 3 strips, all direct
    "sw_separate_mma_tiles": {"mma", "grad_weight"},
    "sw_deploy_mma_fp16": {"mma", "grad_weight"},
    "dw_tall_strip_51x3": {"mma", "grad_weight"},
    "dwsum_sw_deploy_nchw": {"mma", "grad_weight"},
    "dwsum_sw_deploy_nhwc": {"direct_nhwc", "grad_weight"},
    "layer_sw_train_triton": {"mma", "grad_weight"},
    "layer_sw_deploy_triton": {"mma", "grad_weight"},
    # timed candidates: the fused ops (NCHW) and, through the strips' dwconv2d(auto), the NHWC direct kernel
    "layer_sw_auto_measured": {"mma", "direct_nhwc", "grad_weight"},
    "dispatch_dw_triton_runs": {"mma", "grad_weight"},
    "dispatch_dw_grad_weight_fails": {"mma", "grad_weight"},
    "dispatch_sw_forward_fails": {"mma", "direct_nhwc", "grad_weight"},
    # slow cases
    "dw_k13_nchw": {"mma", "grad_weight"},
    "dw_strip_3x51": {"mma", "grad_weight"},
    "dw_k13_nhwc_fp16": {"direct_nhwc", "grad_weight"},
    "sw_separate_m13_strided": {"mma", "grad_weight"},
    "sw_deploy_m13_k5": {"mma", "grad_weight"},
}
# The kernels the *failing call* of a dispatch case ran (its failing launch is not counted: LAUNCHES counts
# launches that were enqueued without error).
EXPECTED_RAN = {
    "dispatch_dw_triton_runs": {"mma", "grad_weight"},
    "dispatch_dw_grad_weight_fails": {"mma"},  # forward (and input gradient) on Triton, weight gradient failed
    "dispatch_sw_forward_fails": set(),  # the fused forward failed: all PyTorch
}


@contextlib.contextmanager
def measured_on_cpu(timer=None):
    """The CUDA-only measured dispatch opened to CPU tensors (here: the interpreter), one timed call per
    candidate (``timer`` replaces the timer), a fresh cache; yields the list of recorded warnings."""
    from lkvision.ops import autoselect

    saved = (autoselect.MEASURED_DEVICE_TYPES, autoselect.WARMUP, autoselect.REPEATS, autoselect._timer)
    autoselect.MEASURED_DEVICE_TYPES = frozenset({"cuda", "cpu"})
    autoselect.WARMUP, autoselect.REPEATS = 0, 1  # the interpreter is slow
    if timer is not None:
        autoselect._timer = timer
    autoselect.clear_cache()
    try:
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            yield rec
    finally:
        (autoselect.MEASURED_DEVICE_TYPES, autoselect.WARMUP, autoselect.REPEATS, autoselect._timer) = saved
        autoselect.clear_cache()


def _fallback_warnings(record) -> list[str]:
    from lkvision.ops import autoselect

    return [str(w.message) for w in record if issubclass(w.category, autoselect.BackendFallbackWarning)]


def auto_case(channels, big_kernel, shape, *, dtype=torch.float32, device="cpu") -> dict:
    """impl="auto" of a ShiftWiseConv2d (train form, then deploy form) with the CUDA-only measured dispatch
    opened to CPU tensors (interpreter): every candidate (fused Triton op vs PyTorch strips) must run
    forward + backward under autoselect's timer, without failing, and the layer must still match the float64
    reference."""
    from lkvision.ops import autoselect

    with measured_on_cpu() as fallbacks:
        errs = {f"train_{k}": v for k, v in layer_case(channels, big_kernel, shape, impl="auto").items()}
        errs.update({f"deploy_{k}": v for k, v in layer_case(channels, big_kernel, shape, deploy=True,
                                                              impl="auto").items()})
        table = {op: entry for (op, _), entry in autoselect.cache_table().items()}
        errs["check_no_fallback"] = float(not _fallback_warnings(fallbacks))
    for op, names in (("shiftwise_conv", {"triton", "fast"}), ("shiftwise_deploy_conv", {"triton", "two_convs"})):
        timed = table.get(op, {}).get("times_ms", {})
        errs[f"check_timed_{op}"] = float(set(timed) == names and all(t is not None and t > 0 for t in timed.values()))
    return errs


def _first_candidate_wins():
    """A timer that runs each candidate once and ranks them in the order they are timed: Triton (always offered
    first) wins wherever it does not raise, so that the dispatch takes the real kernels."""
    order = iter(range(1, 10**6))

    def timer(fn, cuda):
        fn()
        return float(next(order))

    return timer


def dispatch_case(op, *, fail_path=None, dtype=torch.float32, device="cpu") -> dict:
    """The measured dispatch with the real kernels (interpreter): ``op`` ("dwconv2d" or "shiftwise_conv") with
    impl="auto" chooses Triton (first-candidate-wins timer) and runs its kernels forward and backward; then, with
    ``fail_path`` set, the kernel launches of that ``LAUNCHES`` path raise (as a GPU's OutOfResources would) at
    run time: the call falls back to PyTorch (results still exact), exactly one BackendFallbackWarning, and the
    next call does not run Triton at all. ``paths`` lists the kernels of the call that failed (that ran)."""
    from lkvision.ops import autoselect, dwconv2d, make_shift_tables, shiftwise_conv

    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(1, 2, 7, 9, generator=g, dtype=torch.float64)
    if op == "dwconv2d":
        w64 = torch.randn(2, 1, 3, 9, generator=g, dtype=torch.float64)

        def call(x, w):
            return dwconv2d(x, w, None, (4, 4, 1, 1))
    else:
        w64 = torch.randn(2 * 3, 1, 3, 3, generator=g, dtype=torch.float64)
        tables = make_shift_tables(2, 9, 3, edges=2)

        def call(x, w):
            return sum(shiftwise_conv(x, w, *tables, 9, 3))

    def step():
        x, w = (t.to(dtype).requires_grad_() for t in (x64, w64))
        y = call(x, w)
        y.backward(gy)
        return y, x.grad, w.grad

    xr, wr = x64.clone().requires_grad_(), w64.clone().requires_grad_()
    with torch.no_grad():
        gy = torch.randn(call(x64, w64).shape, generator=g, dtype=torch.float64)
    yr = call(xr, wr)
    yr.backward(gy)
    gy = gy.to(dtype)
    errs = {}
    orig_launch = triton_dwconv._launch
    failed_attempts = []

    def failing_launch(path, *args, **kwargs):
        if path == fail_path:
            failed_attempts.append(path)
            raise RuntimeError("out of resource: shared memory, Required: 262144, Hardware limit: 232448")
        return orig_launch(path, *args, **kwargs)

    with measured_on_cpu(_first_candidate_wins()) as fallbacks:
        step()  # measures: Triton wins
        errs["check_triton_chosen"] = float(all(e["winner"] == "triton" for e in autoselect.cache_table().values()))
        triton_dwconv._launch = failing_launch
        try:
            before = dict(triton_dwconv.LAUNCHES)
            outs = step()
            ran = {k for k, v in triton_dwconv.LAUNCHES.items() if v > before.get(k, 0)}
            before, tried = dict(triton_dwconv.LAUNCHES), len(failed_attempts)
            again = step()
            errs["check_failed_kernel_not_retried"] = float(len(failed_attempts) == tried)
            if fail_path and op == "dwconv2d":  # the problem moved off Triton altogether
                errs["check_no_triton_after_failure"] = float(dict(triton_dwconv.LAUNCHES) == before)
        finally:
            triton_dwconv._launch = orig_launch
        msgs = _fallback_warnings(fallbacks)
        errs["check_warnings"] = float(len(msgs) == (1 if fail_path else 0))
        errs["check_warning_names_kernel"] = float(not fail_path or (len(msgs) == 1 and
                                                   "raised RuntimeError: out of resource" in msgs[0]))
    for name, (got, ref) in {"out": (outs[0], yr), "grad_x": (outs[1], xr.grad), "grad_w": (outs[2], wr.grad),
                             "again_out": (again[0], yr), "again_grad_w": (again[2], wr.grad)}.items():
        errs[name] = _rel(got, ref)
    errs["ran"] = sorted(ran)
    return errs


def run_case(name: str, device: str = "cpu") -> dict:
    kind, kw = {**FAST_CASES, **SLOW_CASES}[name]
    kw = dict(kw)
    dtype = getattr(torch, kw.pop("dtype", "float32"))
    fn = {"dw": dw_case, "sw": sw_case, "dwsum": dwsum_case, "layer": layer_case, "auto": auto_case,
          "dispatch": dispatch_case}[kind]
    before = dict(triton_dwconv.LAUNCHES)
    errs = fn(**kw, dtype=dtype, device=device)
    errs["paths"] = sorted(k for k, v in triton_dwconv.LAUNCHES.items() if v > before.get(k, 0))
    errs["tol"] = TOL[dtype]
    return errs


def _assert_case(errs: dict, name: str, expected_paths: set[str] | None = None) -> None:
    """Every error within tolerance, every check passed, and (``expected_paths``) exactly these kernels ran."""
    assert "error" not in errs, f"{name}: {errs.get('error')}"
    tol = errs["tol"]
    for key, val in errs.items():
        if key in ("tol", "paths", "ran"):
            continue
        if key in ("layout_kept", "shape_ok") or key.startswith("check_"):
            assert val == 1.0, f"{name}: {key} failed ({errs})"
        else:
            assert val <= tol, f"{name}: {key} rel. error {val:.2e} > {tol:.0e} ({errs})"
    if expected_paths is not None:
        assert set(errs["paths"]) == expected_paths, f"{name}: kernels that ran {errs['paths']}, expected " \
                                                     f"{sorted(expected_paths)}"


# ----------------------------------------------------------------------------------------------------------
# Tier 1: fallback path, errors, fake impls (no triton needed)
# ----------------------------------------------------------------------------------------------------------
def test_is_available_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not is_available(torch.randn(1, 1, 2, 2))
    assert not is_available(torch.randn(1, 1, 2, 2, dtype=torch.float64))
    assert not is_available("not a tensor")


@pytest.mark.parametrize("name", ["dw_nchw_asym", "dw_nhwc_same", "dw_strided_small_input",
                                  "sw_separate_nchw", "sw_deploy_nhwc", "dwsum_sw_deploy_nchw",
                                  "dwsum_sw_deploy_nhwc"])
def test_fallback_matches_reference(monkeypatch, name):
    """The ops' PyTorch computation where the kernels cannot run (CPU without the interpreter): no kernel ran."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _assert_case(run_case(name), name, expected_paths=set())


def test_dwconv_errors():
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match=r"expected weight of shape \(4, 1, KH, KW\)"):
        triton_dwconv2d(x, torch.randn(3, 1, 3, 3), None, (1, 1, 1, 1))
    with pytest.raises(ValueError, match="padding must be"):
        triton_dwconv2d(x, torch.randn(4, 1, 3, 3), None, (1, 1))
    with pytest.raises(ValueError, match="empty output"):
        triton_dwconv2d(x, torch.randn(4, 1, 11, 3), None, (1, 1, 1, 1))
    with pytest.raises(ValueError, match=r"bias of shape \(4,\)"):
        triton_dwconv2d(x, torch.randn(4, 1, 3, 3), torch.randn(3), (1, 1, 1, 1))
    with pytest.raises(TypeError, match="unsupported dtype"):
        triton_dwconv2d(x.double(), torch.randn(4, 1, 3, 3).double(), None, (1, 1, 1, 1))


def test_shiftwise_errors():
    x = torch.randn(1, 2, 6, 6)
    kh, kv, ks = torch.randn(2, 1, 3, 9), torch.randn(2, 1, 9, 3), torch.randn(2, 1, 3, 3)
    with pytest.raises(ValueError, match=r"kv must have shape \(2, 1, 9, 3\)"):
        fused_strips(x, kh, kh, ks, None, 9)
    with pytest.raises(ValueError, match="mid=9 < L=9"):
        fused_strips(x, kh, kv, ks, None, 19)
    with pytest.raises(ValueError, match="small_kernel must be odd"):
        fused_strips(x, kh, kv, ks, None, 9, small_kernel=2)
    with pytest.raises(ValueError, match="bias is only used with separate=False"):
        fused_strips(x, kh, kv, ks, torch.zeros(2), 9, separate=True)


def test_opcheck_fake_and_autograd_registrations():
    """torch.library.opcheck: schema, fake (meta) impl and autograd registration of every custom op."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 7, requires_grad=True)
    w = torch.randn(3, 1, 3, 5, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    ops = torch.ops.lkvision
    quick = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(ops.triton_dwconv2d, (x, w, b, [2, 2, 1, 1], ""))  # + aot_dispatch (torch.compile)
    torch.library.opcheck(ops.triton_dwconv2d, (x.contiguous(memory_format=torch.channels_last), w, None,
                                                [0, 4, 2, 0], "dwconv2d|triton|(1,)"), test_utils=quick)
    r, strip_len = 3, 9
    kh = torch.randn(r, 1, 3, strip_len, requires_grad=True)
    kv = torch.randn(r, 1, strip_len, 3, requires_grad=True)
    ks = torch.randn(r, 1, 3, 3, requires_grad=True)
    torch.library.opcheck(ops.triton_shiftwise, (x, kh, kv, ks, 9, ""), test_utils=quick)
    torch.library.opcheck(ops.triton_shiftwise_fused, (x, kh, kv, ks, b, 7, ""), test_utils=quick)
    w2 = torch.randn(3, 1, 7, 3, requires_grad=True)
    torch.library.opcheck(ops.triton_dwconv2d_sum, (x, [w, w2], b, [2, 2, 1, 1, 1, 1, 3, 3], ""))
    torch.library.opcheck(ops.triton_dwconv2d_sum_grad_input, (x.detach(), [w.detach(), w2.detach()],
                                                               [2, 2, 1, 1, 1, 1, 3, 3], [6, 7], False, ""),
                          test_utils=quick)


def test_dwconv2d_sum_errors():
    x = torch.randn(1, 4, 8, 8)
    wh, wv = torch.randn(4, 1, 3, 5), torch.randn(4, 1, 5, 3)
    with pytest.raises(ValueError, match="term 1 gives a"):
        dwconv2d_sum(x, [wh, wv], None, [(2, 2, 1, 1), (1, 1, 0, 0)])
    with pytest.raises(ValueError, match="one padding each"):
        dwconv2d_sum(x, [wh, wv], None, [(2, 2, 1, 1)])
    with pytest.raises(ValueError, match=r"expected weights\[1\] of shape \(4, 1, KH, KW\)"):
        dwconv2d_sum(x, [wh, wv[:3]], None, [(2, 2, 1, 1), (1, 1, 2, 2)])
    with pytest.raises(ValueError, match="must be non-negative"):
        dwconv2d_sum(x, [wh], None, [(2, 2, -1, 3)])
    with pytest.raises(TypeError, match="dtype"):
        dwconv2d_sum(x, [wh.double()], None, [(2, 2, 1, 1)])


def test_torch_export_sees_custom_op():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 1, 5, 5))

        def forward(self, x):
            return triton_dwconv2d(x, self.w, None, (2, 2, 2, 2))

    ep = torch.export.export(M(), (torch.randn(1, 4, 8, 8),))
    assert "lkvision.triton_dwconv2d" in str(ep.graph)


# ----------------------------------------------------------------------------------------------------------
# Tier 2: Triton interpreter (subprocess)
# ----------------------------------------------------------------------------------------------------------
def _run_interpreter(names: list[str], **extra_env: str) -> dict:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", **extra_env)
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


AUTOTUNE_CASES = ["dw_nchw_asym", "dw_nhwc_same", "dw_toeplitz_wide", "sw_separate_nchw"]


@pytest.fixture(scope="module")
def interp_autotune():
    return _run_interpreter(AUTOTUNE_CASES, LKVISION_TRITON_AUTOTUNE_IN_INTERPRETER="1")


@pytest.mark.triton
def test_interpreter_autotune_plumbing(interp_autotune):
    """The GPU launch path (triton.autotune wrappers, keys, heuristics, configs) run on CPU: two configs per
    kernel timed on the host. Every autotuned kernel must have been tuned for at least one key."""
    for name in AUTOTUNE_CASES:
        _assert_case(interp_autotune[name], name, EXPECTED_PATHS[name])
    tuned = interp_autotune["_autotuned"]
    assert set(tuned) == {"_fwd_mma", "_fwd_nchw", "_fwd_nhwc", "_gw_nchw", "_gw_nhwc"}, tuned
    assert all(n >= 1 for n in tuned.values()), tuned


@pytest.mark.triton
@pytest.mark.parametrize("name", list(FAST_CASES))
def test_interpreter_kernels(interp_fast, name):
    assert interp_fast["_available"], "is_available(cpu tensor) must be True under TRITON_INTERPRET=1"
    _assert_case(interp_fast[name], name, EXPECTED_PATHS[name])
    if name in EXPECTED_RAN:
        assert set(interp_fast[name]["ran"]) == EXPECTED_RAN[name], interp_fast[name]["ran"]


def test_every_interpreter_case_pins_its_kernels():
    assert set(EXPECTED_PATHS) == set(FAST_CASES) | set(SLOW_CASES)
    assert set(EXPECTED_RAN) == {n for n, (kind, _) in FAST_CASES.items() if kind == "dispatch"}


@pytest.mark.triton
@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_CASES))
def test_interpreter_kernels_slow(interp_slow, name):
    _assert_case(interp_slow[name], name, EXPECTED_PATHS[name])


# ----------------------------------------------------------------------------------------------------------
# Tier 3: GPU
# ----------------------------------------------------------------------------------------------------------
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _kernels_ran(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` and the set of kernel paths (``LAUNCHES`` keys) it launched."""
    before = dict(triton_dwconv.LAUNCHES)
    out = fn(*args, **kwargs)
    return out, {k for k, v in triton_dwconv.LAUNCHES.items() if v > before.get(k, 0)}


@pytest.fixture(autouse=True)
def _exact_fp32_convs():
    """fp32 parity at 2e-5 needs full-precision convs: no TF32 in cuDNN (the reference) nor in our tensor-core
    kernel (which follows torch.backends.cudnn.allow_tf32, see dot_precision); test_gpu_tf32_follows_cudnn_flag
    covers the TF32 setting."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old
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
@pytest.mark.parametrize("mma", ["mma", "direct"])
@pytest.mark.parametrize("dtype", [_BF, _HF, "float32"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "strided"])
@pytest.mark.parametrize("geom", GPU_DW, ids=lambda g: f"{g[0]}-{g[1]}")
def test_gpu_dwconv(geom, layout, dtype, mma, monkeypatch):
    if mma == "direct":
        monkeypatch.setenv("LKVISION_DW_TOEPLITZ", "0")
    shape, kernel, padding = geom
    dt = getattr(torch, dtype)
    errs, ran = _kernels_ran(dw_case, shape, kernel, padding, dtype=dt, layout=layout, device="cuda")
    errs["tol"] = TOL[dt]
    _assert_case(errs, f"{geom}-{layout}-{dtype}")
    forward = "direct_nhwc" if layout == "nhwc" else "mma" if mma == "mma" else "direct_nchw"
    assert ran == {forward, "grad_weight"}, ran  # every GPU_DW kernel has a side >= 7: tensor cores for NCHW


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
    errs, ran = _kernels_ran(sw_case, shape, m, separate=separate, dtype=dt, layout=layout, device="cuda")
    errs["tol"] = TOL[dt]
    _assert_case(errs, f"{geom}-{separate}-{layout}-{dtype}")
    assert ran == {"direct_nhwc" if layout == "nhwc" else "mma", "grad_weight"}, ran


def _sw_deploy_geometry(m: int, k: int = 3):
    """Kernel sizes and paddings of a deployed ShiftWiseConv2d (widened horizontal strip, vertical strip)."""
    strip_len, mid = k * -(-m // k), m // 2
    left, right = max(mid, k // 2), max(strip_len - 1 - mid, k // 2)
    return [(k, left + right + 1), (strip_len, k)], [(left, right, k // 2, k // 2), (k // 2, k // 2, mid,
                                                                                      strip_len - 1 - mid)]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [_BF, "float32"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("geom", [((4, 80, 56, 56), 51), ((2, 160, 28, 28), 49), ((2, 320, 14, 14), 47),
                                  ((3, 640, 7, 7), 13)])
def test_gpu_dwconv2d_sum_sw_deploy(geom, layout, dtype):
    shape, m = geom
    kernels, paddings = _sw_deploy_geometry(m)
    dt = getattr(torch, dtype)
    errs, ran = _kernels_ran(dwsum_case, shape, kernels, paddings, dtype=dt, layout=layout, device="cuda")
    errs["tol"] = TOL[dt]
    _assert_case(errs, f"{geom}-{layout}-{dtype}")
    assert ran == {"direct_nhwc" if layout == "nhwc" else "mma", "grad_weight"}, ran


@pytest.mark.gpu
@needs_gpu
def test_gpu_is_available_and_compile():
    x = torch.randn(2, 32, 20, 20, device="cuda")
    assert is_available(x) and is_available(x.half()) and not is_available(x.double())
    w = torch.randn(32, 1, 13, 13, device="cuda")

    def f(t):
        return triton_dwconv2d(t, w, None, (6, 6, 6, 6)).relu()

    ref = f(x)
    out, ran = _kernels_ran(torch.compile(f, fullgraph=True), x)
    torch.testing.assert_close(out, ref)
    assert ran == {"mma"}, ran  # the compiled graph runs the kernel (not the op's PyTorch fallback)


@pytest.mark.gpu
@needs_gpu
def test_gpu_tf32_follows_cudnn_flag(monkeypatch):
    """With cudnn.allow_tf32 (PyTorch's default) the fp32 tensor-core kernel runs one TF32 pass: error at TF32
    level, larger than the tf32x3 error but far below bf16's."""
    errs = {}
    for flag in (False, True):
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", flag)
        errs[flag] = dw_case((2, 32, 32, 32), (31, 31), (15, 15, 15, 15), device="cuda")["out"]
    assert errs[False] <= 2e-5 and errs[True] <= 5e-3, errs


@pytest.mark.gpu
@needs_gpu
def test_gpu_weight_grad_deterministic():
    torch.manual_seed(0)
    x = torch.randn(8, 64, 32, 32, device="cuda")
    g = torch.randn(8, 64, 32, 32, device="cuda")
    ops = torch.ops.lkvision
    before = triton_dwconv.LAUNCHES["grad_weight"]
    a = ops.triton_dwconv2d_grad_weight(g, x, [31, 31], [15, 15, 15, 15], "")
    b = ops.triton_dwconv2d_grad_weight(g, x, [31, 31], [15, 15, 15, 15], "")
    assert triton_dwconv.LAUNCHES["grad_weight"] == before + 2  # the kernel, not the PyTorch fallback
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
    if not triton_dwconv.FIXED_TILES:  # autotuned wrappers: how many shape keys each one has tuned
        results["_autotuned"] = {name: len(getattr(triton_dwconv, name).cache)
                                 for name in ("_fwd_mma", "_fwd_nchw", "_fwd_nhwc", "_gw_nchw", "_gw_nhwc")}
    print(json.dumps(results))
