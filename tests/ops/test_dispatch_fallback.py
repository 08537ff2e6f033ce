"""Kernel dispatch never takes a model down: eligibility checks, fallback on failure, force/forbid by name.

The measured dispatch of ``impl="auto"`` runs on CUDA only; these tests drive the *same* code on CPU:

* ``autoselect.MEASURED_DEVICE_TYPES`` gets ``"cpu"`` (the one switch between the CUDA and the CPU choice);
* the Triton platform check (``lkvision.ops.kernels._common.platform_reason``) is told that CPU float tensors
  are a supported GPU, so the dispatchers offer the Triton backend and the real custom ops, autograd and guards
  run; only the two kernel launchers (``dwconv_forward_terms``: forward and input gradient, and
  ``dwconv_grad_weight``) are replaced by PyTorch emulations that count their calls and raise where a test
  injects a failure (``out of resource: shared memory``, as a real GPU would report it).

The same dispatch with the real kernels under the Triton interpreter is in tests/ops/test_triton_kernels.py
(``dispatch_*`` cases). Every test counts the ``BackendFallbackWarning``s and compares outputs and gradients
with the PyTorch path.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F

import lkvision
from lkvision.ops import autoselect as A
from lkvision.ops import dwconv2d, kernels, shiftwise_conv, shiftwise_deploy_conv
from lkvision.ops.kernels import _common, triton_dwconv, triton_shiftwise
from lkvision.ops.kernels.triton_dwconv import dwconv2d_reference

FAILURE = "out of resource: shared memory, Required: 262144, Hardware limit: 232448"


@pytest.fixture(autouse=True)
def _clean_autoselect(monkeypatch):
    for var in (A.ENV_ENABLE, A.ENV_TABLE, A.ENV_FORBID, A.ENV_FORCE):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(A, "_env_table_done", None)
    A.clear_cache()
    yield
    A.clear_cache()


class InjectedKernelFailure(RuntimeError):
    """Stands for triton's OutOfResources / CompilationError / a driver error."""


class FakeGPU:
    """CPU made to look like a GPU the Triton kernels support (see the module docstring).

    ``fail``: which launcher raises ("forward": dwconv_forward_terms, used by every forward and input-gradient
    launch; "grad_weight": dwconv_grad_weight). ``launches`` counts the emulated launches that succeeded,
    ``attempts`` every call. The timer runs each candidate once and ranks them in the order they are timed,
    so that Triton (always offered first) wins wherever it does not raise."""

    def __init__(self, monkeypatch):
        self.fail: set[str] = set()
        self.launches = {"forward": 0, "grad_weight": 0}
        self.attempts = {"forward": 0, "grad_weight": 0}
        self.timed: list[int] = []
        real_platform = _common.platform_reason
        monkeypatch.setattr(A, "MEASURED_DEVICE_TYPES", frozenset({"cuda", "cpu"}))
        monkeypatch.setattr(_common, "platform_reason",
                            lambda x: None if isinstance(x, torch.Tensor) and x.dtype in _common.SUPPORTED_DTYPES
                            and x.device.type == "cpu" else real_platform(x))
        for mod in (triton_dwconv, triton_shiftwise):
            monkeypatch.setattr(mod, "dwconv_forward_terms", self._forward_terms)
        monkeypatch.setattr(triton_dwconv, "dwconv_grad_weight", self._grad_weight)
        monkeypatch.setattr(A, "_timer", self._timer)

    def _timer(self, fn, cuda):
        fn()
        self.timed.append(len(self.timed))
        return float(len(self.timed))

    def _launch(self, kind: str) -> None:
        self.attempts[kind] += 1
        if kind in self.fail:
            raise InjectedKernelFailure(FAILURE)
        self.launches[kind] += 1

    def _forward_terms(self, inputs, weights, offsets, out_hw, *, separate=False, identity=None, bias=None,
                       channels_last=None):
        self._launch("forward")
        outs = []
        for x, w, (top, left) in zip(inputs, weights, offsets):
            kh, kw = w.shape[-2:]
            pad = (left, out_hw[1] + kw - 1 - x.shape[3] - left, top, out_hw[0] + kh - 1 - x.shape[2] - top)
            outs.append(dwconv2d_reference(x, w.float().to(x.dtype), None, pad))
        if not separate:
            y = sum(outs)
            if identity is not None:
                y = y + identity
            if bias is not None:
                y = y + bias.to(y.dtype).view(1, -1, 1, 1)
            outs = [y]
        cl = _common.is_channels_last(inputs[0]) if channels_last is None else channels_last
        fmt = torch.channels_last if cl else torch.contiguous_format
        return [o.detach().contiguous(memory_format=fmt) for o in outs]

    def _grad_weight(self, grad_out, x, kernel_hw, offsets):
        self._launch("grad_weight")
        (kh, kw), (top, left) = kernel_hw, offsets
        pad = (left, grad_out.shape[3] + kw - 1 - x.shape[3] - left, top, grad_out.shape[2] + kh - 1 - x.shape[2] - top)
        return triton_dwconv._grad_weight_reference(grad_out, x, kernel_hw, pad)


@pytest.fixture
def gpu(monkeypatch):
    return FakeGPU(monkeypatch)


def fallback_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, A.BackendFallbackWarning)]


def warned_ops(msgs: list[str]) -> list[str]:
    """The operator each warning is about ("lkvision: <op>: ..."), sorted: one entry per warning."""
    return sorted(m.split(":")[1].strip() for m in msgs)


def assert_close(a, b, tol=1e-5, atol=1e-7):
    """``||a - b|| <= tol * ||b|| + atol`` (fp32 results against a float64 reference; the absolute floor is for
    gradients that vanish analytically, e.g. a conv bias before a BatchNorm)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    diff, norm = (a.double() - b.double()).norm().item(), b.double().norm().item()
    assert diff <= tol * norm + atol, f"||a - b|| = {diff:.2e}, ||b|| = {norm:.2e} (tol {tol:.0e})"


# -------------------------------------------------------------------------------------- the three public ops
def _dw_problem(requires_grad=True, seed=0, hw=(9, 11)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, *hw, generator=g).requires_grad_(requires_grad)
    w = torch.randn(4, 1, 3, 9, generator=g).requires_grad_(requires_grad)
    b = torch.randn(4, generator=g).requires_grad_(requires_grad)
    return (x, w, b)


def _sw_problem(requires_grad=True, seed=0, hw=(9, 11)):
    from lkvision.ops import make_shift_tables

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, *hw, generator=g).requires_grad_(requires_grad)
    w = torch.randn(4 * 3, 1, 3, 3, generator=g).requires_grad_(requires_grad)  # R=4, M=9, k=3: nk=3
    pad_hv, idx = make_shift_tables(4, 9, 3, edges=2)
    return (x, w, pad_hv, idx)


def _deploy_problem(requires_grad=True, seed=0, hw=(9, 11)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, *hw, generator=g).requires_grad_(requires_grad)
    wh = torch.randn(4, 1, 3, 11, generator=g).requires_grad_(requires_grad)
    wv = torch.randn(4, 1, 9, 3, generator=g).requires_grad_(requires_grad)
    bh = torch.randn(4, generator=g).requires_grad_(requires_grad)
    return (x, wh, bh, wv, None)


OPS = {
    # op name -> (problem, call(args, impl), reference(args): the PyTorch definition)
    "dwconv2d": (_dw_problem, lambda a, impl: dwconv2d(a[0], a[1], a[2], (4, 4, 1, 1), impl=impl),
                 lambda a: dwconv2d_reference(a[0], a[1], a[2], (4, 4, 1, 1))),
    "shiftwise_conv": (_sw_problem, lambda a, impl: sum(shiftwise_conv(*a, 9, 3, impl=impl)),
                       lambda a: sum(shiftwise_conv(*a, 9, 3, impl="reference"))),
    "shiftwise_deploy_conv": (_deploy_problem,
                              lambda a, impl: shiftwise_deploy_conv(*a, (5, 5, 1, 1), (1, 1, 4, 4), impl=impl),
                              lambda a: dwconv2d_reference(a[0], a[1], a[2], (5, 5, 1, 1))
                              + dwconv2d_reference(a[0], a[3], None, (1, 1, 4, 4))),
}


@pytest.fixture
def isolated(monkeypatch, op):
    """The Shiftwise ops' PyTorch forms call dwconv2d(impl="auto"), itself dispatched (and failing) on this
    "GPU", with its own warning: the per-op tests keep dwconv2d off Triton (LKVISION_FORBID_BACKENDS=
    dwconv2d=triton) to count the op's own warnings; the model tests below run both together."""
    if op != "dwconv2d":
        monkeypatch.setenv(A.ENV_FORBID, "dwconv2d=triton")


def _the_warning(msgs: list[str], op: str) -> str:
    """The one warning (asserting that there is exactly one, about ``op``)."""
    assert warned_ops(msgs) == [op], msgs
    return msgs[0]


def _run(op: str, args, impl: str = "auto", backward: bool = True):
    """Output and input/parameter gradients of one call (fresh leaves, so calls do not share gradients)."""
    leaves = [a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) and a.is_floating_point()
              else a for a in args]
    y = OPS[op][1](leaves, impl)
    grads = []
    if backward:
        y.square().sum().backward()
        grads = [t.grad for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    return y.detach(), grads


def _reference(op: str, args):
    leaves = [a.detach().double().requires_grad_(a.requires_grad)
              if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    y = OPS[op][2](leaves)
    y.square().sum().backward()
    return y.detach().float(), [t.grad.float() for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]


def _assert_matches_reference(op, args, out, grads):
    ref_out, ref_grads = _reference(op, args)
    assert_close(out, ref_out)
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r)


def _table_naming_triton(gpu, op, tmp_path, problems):
    """Measure ``problems`` with a working Triton backend (it wins), save the table, forget everything."""
    for args in problems:
        _run(op, args)
    assert {e["winner"] for (o, _), e in A.cache_table().items() if o == op} == {"triton"}
    path = tmp_path / "table.json"
    A.save_table(path)
    A.clear_cache()
    return path


@pytest.mark.parametrize("op", list(OPS))
def test_failure_while_timed_falls_back_with_one_warning(gpu, op, isolated):
    """Fresh cache: the Triton candidate raises while being timed (forward), for two problems (training and
    inference keys): dropped for both keys, the PyTorch path serves them, exactly one warning for the op."""
    gpu.fail = {"forward"}
    args = OPS[op][0]()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out, grads = _run(op, args)
        with torch.no_grad():
            out2, _ = _run(op, OPS[op][0](requires_grad=False, hw=(7, 12)), backward=False)
    msg = _the_warning(fallback_warnings(rec), op)
    assert FAILURE in msg and "being timed" in msg and "LKVISION_FORBID_BACKENDS=triton" in msg
    _assert_matches_reference(op, args, out, grads)
    keys = [k for k in A.cache_table() if k[0] == op]
    assert len(keys) == 2 and all(A.cache_table()[k]["winner"] != "triton" for k in keys)
    assert all("triton" in A.failures()[k] for k in keys)
    attempts = dict(gpu.attempts)
    with warnings.catch_warnings(record=True) as rec:  # later calls: no kernel attempt, no warning
        warnings.simplefilter("always")
        out3, grads3 = _run(op, args)
    assert gpu.attempts == attempts and not fallback_warnings(rec)
    assert_close(out3, out)


@pytest.mark.parametrize("op", list(OPS))
def test_failure_at_run_time_from_a_loaded_table(gpu, op, isolated, tmp_path):
    """A saved table names Triton; on this "GPU" its kernel fails at run time (forward): the call is served by
    the PyTorch path, exactly one warning, the key's choice moves off Triton and the kernel is not retried."""
    args = OPS[op][0]()
    other = OPS[op][0](hw=(6, 13), seed=1)
    path = _table_naming_triton(gpu, op, tmp_path, [args, other])
    gpu.fail = {"forward"}
    assert A.load_table(path) == len(json.loads(path.read_text())["entries"])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out, grads = _run(op, args)
        out_other, grads_other = _run(op, other)
    msg = _the_warning(fallback_warnings(rec), op)
    assert FAILURE in msg and "(forward)" in msg and "chosen for the problem" in msg and "impl='triton'" in msg
    _assert_matches_reference(op, args, out, grads)
    _assert_matches_reference(op, other, out_other, grads_other)
    assert all(e["winner"] != "triton" for (o, _), e in A.cache_table().items() if o == op)
    attempts = dict(gpu.attempts)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        _run(op, args)
    assert gpu.attempts == attempts and not fallback_warnings(rec)


@pytest.mark.parametrize("op", list(OPS))
def test_backward_failure_falls_back_and_drops_the_key(gpu, op, isolated, tmp_path):
    """The forward kernel works, the weight-gradient kernel fails in the backward (table entry): the backward is
    served by PyTorch (gradients exact), one warning naming the backward kernel, and the next forward of that
    problem no longer runs Triton (forward and backward stay on one path)."""
    args = OPS[op][0]()
    path = _table_naming_triton(gpu, op, tmp_path, [args])
    A.load_table(path)
    gpu.fail = {"grad_weight"}
    forward_launches = gpu.launches["forward"]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out, grads = _run(op, args)
    assert gpu.launches["forward"] > forward_launches  # the Triton forward did run
    msg = _the_warning(fallback_warnings(rec), op)
    assert "grad_weight (backward)" in msg
    _assert_matches_reference(op, args, out, grads)
    forward_launches = gpu.launches["forward"]
    out2, grads2 = _run(op, args)
    assert gpu.launches["forward"] == forward_launches  # the problem moved to PyTorch, forward included
    assert_close(out2, out)


@pytest.mark.parametrize("op", list(OPS))
def test_backward_failure_while_timed(gpu, op, isolated):
    """Fresh cache, training: the candidate is timed forward + backward and its weight-gradient kernel raises:
    dropped before it is ever chosen; one warning; results exact."""
    gpu.fail = {"grad_weight"}
    args = OPS[op][0]()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out, grads = _run(op, args)
    msg = _the_warning(fallback_warnings(rec), op)
    assert "being timed" in msg and "grad_weight (backward)" in msg
    _assert_matches_reference(op, args, out, grads)
    (key,) = [k for k in A.cache_table() if k[0] == op]
    assert A.cache_table()[key]["winner"] != "triton" and A.cache_table()[key]["times_ms"]["triton"] is None


@pytest.mark.parametrize("op", list(OPS))
def test_working_kernel_is_chosen_and_used(gpu, op, isolated):
    """Control for the tests above: with a working backend the Triton path is chosen and its kernels run,
    forward and backward, without warnings."""
    args = OPS[op][0]()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        _run(op, args)  # measures
        before = dict(gpu.launches)
        out, grads = _run(op, args)
    assert not fallback_warnings(rec)
    assert gpu.launches["forward"] > before["forward"] and gpu.launches["grad_weight"] > before["grad_weight"]
    _assert_matches_reference(op, args, out, grads)


def test_a_real_launch_failure_falls_back(monkeypatch):
    """No emulation: CPU tensors passed off as a supported GPU reach triton's real launcher, which raises (no
    GPU driver here); the dispatch drops the kernel with one warning and the result is exact."""
    monkeypatch.setattr(A, "MEASURED_DEVICE_TYPES", frozenset({"cuda", "cpu"}))
    monkeypatch.setattr(A, "WARMUP", 0)
    monkeypatch.setattr(A, "REPEATS", 1)
    monkeypatch.setattr(_common, "platform_reason", lambda x: None)
    args = _dw_problem()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out, grads = _run("dwconv2d", args)
    msg = _the_warning(fallback_warnings(rec), "dwconv2d")
    assert "lkvision::triton_dwconv2d (forward) raised" in msg
    _assert_matches_reference("dwconv2d", args, out, grads)
    with pytest.raises(kernels.KernelError, match="requested explicitly"):
        _run("dwconv2d", args, impl="triton")


@pytest.mark.parametrize("op", list(OPS))
def test_explicit_triton_raises_with_the_reason(gpu, op):
    """impl="triton" is a request: a failing kernel raises KernelError naming it (no fallback, no warning),
    and a problem the kernels cannot serve raises RuntimeError with the can_run reason."""
    gpu.fail = {"forward"}
    args = OPS[op][0]()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with pytest.raises(kernels.KernelError, match="shared memory.*requested explicitly"):
            _run(op, args, impl="triton")
    assert not fallback_warnings(rec)
    gpu.fail = {"grad_weight"}
    with pytest.raises(kernels.KernelError, match=r"triton_dwconv2d_grad_weight \(backward\) raised"):
        _run(op, args, impl="triton")
    doubles = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    with pytest.raises(RuntimeError, match=r"impl='triton' cannot run here: dtype torch.float64 is not supported"):
        _run(op, doubles, impl="triton", backward=False)


@pytest.mark.parametrize("op", list(OPS))
def test_ineligible_candidate_is_never_timed(gpu, op):
    """float64 is not a Triton dtype: the Triton candidate is not offered at all (not timed, no warning)."""
    args = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in OPS[op][0]()]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        _run(op, args)
    assert not fallback_warnings(rec) and gpu.attempts == {"forward": 0, "grad_weight": 0}
    assert all("triton" not in e["times_ms"] for e in A.cache_table().values())


# ---------------------------------------------------------------------------- tables naming what cannot run
@pytest.mark.parametrize("op", list(OPS))
def test_table_entry_that_cannot_run_here_warns_once(monkeypatch, op, isolated, tmp_path):
    """A table from a machine where Triton ran, loaded where the kernels cannot run (here: plain CPU, no
    interpreter): the entry is dropped with one warning giving the can_run reason; the PyTorch path serves it."""
    with pytest.MonkeyPatch.context() as mp:
        gpu = FakeGPU(mp)
        args = OPS[op][0]()
        path = _table_naming_triton(gpu, op, tmp_path, [args, OPS[op][0](hw=(6, 13))])
    monkeypatch.setattr(A, "MEASURED_DEVICE_TYPES", frozenset({"cuda", "cpu"}))  # the dispatch, no fake kernels
    monkeypatch.setattr(A, "WARMUP", 0)
    monkeypatch.setattr(A, "REPEATS", 1)
    A.load_table(path)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out, grads = _run(op, args)
        _run(op, OPS[op][0](hw=(6, 13)))
    msg = _the_warning(fallback_warnings(rec), op)
    assert "names 'triton'" in msg and "cannot run here: the Triton kernels need a CUDA tensor" in msg
    _assert_matches_reference(op, args, out, grads)


def test_table_entry_with_an_unknown_name_warns_once(monkeypatch, tmp_path):
    monkeypatch.setattr(A, "MEASURED_DEVICE_TYPES", frozenset({"cuda", "cpu"}))
    monkeypatch.setattr(A, "WARMUP", 0)
    monkeypatch.setattr(A, "REPEATS", 1)
    args = _dw_problem()
    _run("dwconv2d", args)
    table = A.cache_table()
    path = tmp_path / "t.json"
    A.save_table(path)
    doc = json.loads(path.read_text())
    for e in doc["entries"]:
        e["winner"] = "cutlass"
    path.write_text(json.dumps(doc))
    A.clear_cache()
    A.load_table(path)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out, grads = _run("dwconv2d", args)
        _run("dwconv2d", args)
    msgs = fallback_warnings(rec)
    assert len(msgs) == 1 and "'cutlass' is not an implementation of dwconv2d" in msgs[0], msgs
    _assert_matches_reference("dwconv2d", args, out, grads)
    assert set(A.cache_table()) == set(table)


# ------------------------------------------------------------------------------------------- force / forbid
@pytest.mark.parametrize("op", list(OPS))
def test_forbid_by_name(gpu, op, monkeypatch, tmp_path):
    """LKVISION_FORBID_BACKENDS=triton: never offered, never timed, a table entry naming it is ignored
    silently (the user asked), even though its kernel would fail."""
    args = OPS[op][0]()
    path = _table_naming_triton(gpu, op, tmp_path, [args])
    gpu.fail = {"forward", "grad_weight"}
    attempts = dict(gpu.attempts)
    monkeypatch.setenv(A.ENV_FORBID, "triton")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out, grads = _run(op, args)  # fresh cache
        A.load_table(path)
        out2, grads2 = _run(op, args)  # the table names triton
    assert not fallback_warnings(rec) and gpu.attempts == attempts
    _assert_matches_reference(op, args, out, grads)
    _assert_matches_reference(op, args, out2, grads2)
    monkeypatch.setenv(A.ENV_FORBID, f"{op}=triton, dwconv2d=triton")  # per op (the Shiftwise ops use dwconv2d)
    A.clear_cache()
    _run(op, args)
    assert gpu.attempts == attempts


@pytest.mark.parametrize("op", list(OPS))
def test_force_by_name(gpu, op, monkeypatch):
    """LKVISION_FORCE_BACKEND=triton: taken without timing; a failure is then an error (a request), and so is a
    problem it cannot serve."""
    args = OPS[op][0]()
    monkeypatch.setenv(A.ENV_FORCE, "triton")
    out, grads = _run(op, args)
    assert gpu.timed == [] and gpu.launches["forward"] > 0 and gpu.launches["grad_weight"] > 0
    _assert_matches_reference(op, args, out, grads)
    gpu.fail = {"grad_weight"}
    with pytest.raises(kernels.KernelError, match="grad_weight"):
        _run(op, args)
    doubles = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    with pytest.raises(RuntimeError, match="LKVISION_FORCE_BACKEND forces 'triton'.*float64"):
        _run(op, doubles)
    monkeypatch.setenv(A.ENV_FORCE, f"{op}=cudnn")
    with pytest.raises(ValueError, match=f"{op} has no implementation 'cudnn'"):
        _run(op, args)


def test_force_another_backend_of_one_op(gpu, monkeypatch):
    monkeypatch.setenv(A.ENV_FORCE, "dwconv2d=torch")
    x, w, b = _dw_problem()
    y = dwconv2d(x, w, b, (4, 4, 1, 1))
    assert gpu.timed == [] and gpu.attempts["forward"] == 0
    assert y.is_contiguous()  # the NCHW "torch" path, not channels_last
    monkeypatch.setenv(A.ENV_FORCE, "dwconv2d=torch,dwconv2d=triton")
    with pytest.raises(ValueError, match="forces two implementations for dwconv2d"):
        dwconv2d(x, w, b, (4, 4, 1, 1))
    monkeypatch.setenv(A.ENV_FORCE, "=triton")
    with pytest.raises(ValueError, match="expected NAME or OP=NAME"):
        dwconv2d(x, w, b, (4, 4, 1, 1))


# ------------------------------------------------------------------------------------------ a whole model
def _model_step(model, x):
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.square().mean().backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_step(a, b):
    assert_close(a[0], b[0])
    assert a[1].keys() == b[1].keys()
    for n in a[1]:
        assert_close(a[1][n], b[1][n], tol=1e-4)


MODELS = {"unireplknet_test": {"dwconv2d"}, "sw_femto": {"shiftwise_conv", "dwconv2d"}}


# ops that autoselect measures on CPU (GEMM library, direct vs FFT); they have no Triton kernel
CPU_OPS = frozenset({"linear", "dwconv2d_cpu", "dwconv2d_sum_cpu", "dwconv2d_cpu_train", "dwconv2d_dilated_cpu",
                     "dwconv2d_grad_weight_cpu"})


def _kernel_entries() -> dict:
    return {k: e for k, e in A.cache_table().items() if k[0] not in CPU_OPS}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("source", ["fresh", "table"])
def test_model_forward_backward_with_failing_kernels(gpu, name, source, tmp_path):
    """A whole model, forward + backward, every Triton kernel failing: fresh cache (failures while timed) or a
    table naming Triton for every layer (failures at run time). Same output and gradients as the model on its
    PyTorch paths; exactly one warning per operator the model uses (unireplknet_test: one in all)."""
    torch.manual_seed(0)
    model = lkvision.create_model(name, num_classes=10).train()
    x = torch.randn(2, 3, 32, 32)
    with pytest.MonkeyPatch.context() as mp:  # the reference: the model's default CPU paths
        mp.setattr(A, "MEASURED_DEVICE_TYPES", frozenset({"cuda"}))
        ref = _model_step(copy.deepcopy(model), x)
    if source == "table":
        _model_step(model, x)
        assert {e["winner"] for e in _kernel_entries().values()} == {"triton"}
        path = tmp_path / "table.json"
        A.save_table(path)
        A.clear_cache()
        A.load_table(path)
    gpu.fail = {"forward", "grad_weight"}
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        got = _model_step(model, x)
        again = _model_step(model, x)
    msgs = fallback_warnings(rec)
    assert warned_ops(msgs) == sorted(MODELS[name]), msgs
    _assert_same_step(got, ref)
    _assert_same_step(again, ref)
    assert all(e["winner"] != "triton" for e in A.cache_table().values())


def test_deployed_model_with_failing_kernels(gpu, tmp_path):
    """sw_femto's deploy form (shiftwise_deploy_conv + dwconv2d layers) from a table naming Triton for every
    layer, kernels failing at run time: same output as the PyTorch paths, one warning per operator."""
    torch.manual_seed(0)
    model = lkvision.reparameterize(lkvision.create_model("sw_femto", num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(A, "MEASURED_DEVICE_TYPES", frozenset({"cuda"}))
            ref = model(x)
        model(x)
        assert {op for op, _ in _kernel_entries()} == {"shiftwise_deploy_conv", "dwconv2d"}
        path = tmp_path / "table.json"
        A.save_table(path)
        A.clear_cache()
        A.load_table(path)
        gpu.fail = {"forward"}
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            out = model(x)
    msgs = fallback_warnings(rec)
    assert warned_ops(msgs) == ["dwconv2d", "shiftwise_deploy_conv"], msgs  # one each
    assert_close(out, ref)


# ------------------------------------------------------------------------------------ torch.compile / export
def test_compiled_graph_falls_back_at_run_time(gpu, tmp_path):
    """Under torch.compile the measured choice is baked into the graph (the Triton op with its fallback tag);
    the kernel fails at run time inside the compiled forward and backward: the op's PyTorch computation serves
    every call, one warning, and after the first failure the kernel is not tried again."""
    args = _dw_problem()
    path = _table_naming_triton(gpu, "dwconv2d", tmp_path, [args])
    A.load_table(path)
    gpu.fail = {"forward", "grad_weight"}

    def f(x, w, b):
        return dwconv2d(x, w, b, (4, 4, 1, 1)).square().sum()

    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    x, w, b = (a.detach().requires_grad_() for a in args)
    before = dict(gpu.attempts)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        loss = cf(x, w, b)
        loss.backward()
        attempts = dict(gpu.attempts)
        x2, w2, b2 = (a.detach().requires_grad_() for a in args)
        cf(x2, w2, b2).backward()
    msgs = fallback_warnings(rec)
    assert len(msgs) == 1 and "(forward)" in msgs[0], msgs
    # tried once (the compiled forward); its backward and the next call skip the failed kernel
    assert attempts == {"forward": before["forward"] + 1, "grad_weight": before["grad_weight"]}
    assert gpu.attempts == attempts
    ref_out, ref_grads = _reference("dwconv2d", args)
    assert_close(loss.detach(), ref_out.square().sum())
    for g, r in zip((x.grad, w.grad, b.grad), ref_grads):
        assert_close(g, r)
    assert_close(x2.grad, x.grad)


def test_export_keeps_the_fallback_tag(gpu, tmp_path):
    """torch.export of a model whose table names Triton: the exported graph holds the Triton op with its tag,
    and running it where the kernel fails falls back (one warning)."""
    args = _dw_problem(requires_grad=False)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(args[1].clone())

        def forward(self, x):
            return dwconv2d(x, self.w, None, (4, 4, 1, 1))

    m = M().eval()
    m(args[0])  # measures (with grad enabled and a parameter, as export traces it): Triton wins
    assert [e["winner"] for e in A.cache_table().values()] == ["triton"]
    ep = torch.export.export(m, (args[0],))
    assert "lkvision.triton_dwconv2d" in str(ep.graph) and "dwconv2d|triton|" in str(ep.graph)
    gpu.fail = {"forward"}
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = ep.module()(args[0])
    assert len(fallback_warnings(rec)) == 1
    assert_close(out, F.conv2d(F.pad(args[0], (4, 4, 1, 1)), args[1], groups=4))


# --------------------------------------------------------------------------------------- eligibility checks
def test_can_run_reasons_without_a_gpu():
    x = torch.randn(1, 2, 5, 5)
    w = torch.randn(2, 1, 3, 3)
    assert "need a CUDA tensor" in kernels.can_run_dwconv2d(x, w, None, (1, 1, 1, 1))
    assert "dtype torch.float64 is not supported" in kernels.can_run_dwconv2d(x.double(), w.double(), None,
                                                                              (1, 1, 1, 1))
    assert "do not run on meta tensors" in kernels.unavailable_reason(x.to("meta"))
    assert not kernels.is_available(x)


def test_can_run_reasons_on_a_supported_platform(monkeypatch):
    monkeypatch.setattr(_common, "platform_reason", lambda x: None)
    x = torch.randn(1, 2, 5, 5)
    w = torch.randn(2, 1, 3, 3)
    assert kernels.can_run_dwconv2d(x, w, None, (1, 1, 1, 1)) is None
    assert "expected weight of shape (2, 1, KH, KW)" in kernels.can_run_dwconv2d(x, w[:1], None, (1, 1, 1, 1))
    assert "empty output" in kernels.can_run_dwconv2d(x, torch.randn(2, 1, 9, 3), None, (0, 0, 0, 0))
    assert "different devices" in kernels.can_run_dwconv2d(x, w.to("meta"), None, (1, 1, 1, 1))
    kh, kv, ks = torch.randn(2, 1, 3, 9), torch.randn(2, 1, 9, 3), torch.randn(2, 1, 3, 3)
    assert kernels.can_run_shiftwise(x, kh, kv, ks, None, 9) is None
    assert "kv must have shape" in kernels.can_run_shiftwise(x, kh, kh, ks, None, 9)
    assert "bias is only used with separate=False" in kernels.can_run_shiftwise(x, kh, kv, ks, torch.zeros(2), 9)
    assert kernels.can_run_dwconv2d_sum(x, [kh, kv], None, [(4, 4, 1, 1), (1, 1, 4, 4)]) is None
    assert "term 1 gives a" in kernels.can_run_dwconv2d_sum(x, [kh, kv], None, [(4, 4, 1, 1), (1, 1, 0, 0)])


def test_can_run_launch_limits(monkeypatch):
    """Shapes the kernels cannot launch: int32 indexing within a sample, the 65535 limit on output tiles per
    plane (the tensor-core kernel's larger tiles still fit where the direct kernel's do not), and the grid for
    the backward."""
    lr = triton_dwconv.launch_reason
    cpu = torch.device("cpu")
    monkeypatch.setattr(triton_dwconv, "FIXED_TILES", False)  # the GPU tile lists
    big = (1, 2, 40000, 40000)
    assert "int32" in lr(big, (3200000000, 1600000000, 40000, 1), [(3, 3)], (40000, 40000), False,
                         torch.float32, cpu)
    plane = (1, 1, 12000, 12000)
    stride = (144000000, 144000000, 12000, 1)
    assert "tiles" in lr(plane, stride, [(3, 3)], (12000, 12000), False, torch.float32, cpu)
    assert lr(plane, stride, [(13, 13)], (12000, 12000), False, torch.float32, cpu) is None  # tensor-core tiles
    assert triton_dwconv.forward_plan(1, 1, (12000, 12000), [(13, 13)], False, torch.float32, cpu)[0] == "mma"
    assert "tiles" in lr(plane, stride, [(13, 13)], (12000, 12000), True, torch.float32, cpu)  # NHWC: direct only
    small = (2, 4, 64, 64)
    assert lr(small, (16384, 4096, 64, 1), [(3, 51)], (64, 64), False, torch.float32, cpu, needs_grad=True) is None
    assert "weight-gradient kernel" in lr(small, (16384, 4096, 64, 1), [(4000, 4000)], (64, 64), False,
                                          torch.float32, cpu, needs_grad=True)


def test_shared_memory_limit_picks_the_direct_kernel(monkeypatch):
    """Tensor-core tiles whose shared memory exceeds the device's limit are not used; when none fits, the direct
    kernel serves the problem (no failure to fall back from)."""
    monkeypatch.setattr(triton_dwconv, "FIXED_TILES", False)
    cpu = torch.device("cpu")
    sw_stage1 = [(3, 51), (51, 3), (3, 3)]
    need = min(triton_dwconv.mma_shared_memory(t, sw_stage1, 4) for t in triton_dwconv.MMA_TILES)
    assert need < 100 * 1024  # fits consumer GPUs' ~100 KiB (and the H100's 227 KiB) with some tile
    monkeypatch.setattr(triton_dwconv, "shared_memory_limit", lambda device: 232448)  # H100 / H200
    assert triton_dwconv.forward_plan(8, 60, (56, 56), sw_stage1, False, torch.float32, cpu)[0] == "mma"
    monkeypatch.setattr(triton_dwconv, "shared_memory_limit", lambda device: 16 * 1024)
    assert triton_dwconv.forward_plan(8, 60, (56, 56), sw_stage1, False, torch.float32, cpu)[0] == "direct_nchw"
    # the autotuner's pruning uses the same test per config: RepLKNet's 31x31 on a GPU with 99 KiB per block
    # keeps the smaller tiles only
    fits = [t for t in triton_dwconv.MMA_TILES if triton_dwconv.mma_tile_ok(t, 64, 64, [(31, 31)], 4, 99 * 1024)]
    assert (16, 32, 4, 2) in fits and (64, 64, 8, 2) not in fits


def test_platform_reasons_for_gpus_triton_cannot_use(monkeypatch):
    """Compute capability, bf16 support and a missing triton, on (fake) CUDA tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(1, 2, 4, 4, device="cuda")
        xb = torch.empty(1, 2, 4, 4, device="cuda", dtype=torch.bfloat16)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(_common, "_TRITON", [((None, None), None)])
    monkeypatch.setattr(_common, "_CAPABILITY", {0: (6, 1)})
    assert "compute capability 6.1 is below" in _common.platform_reason(x)
    monkeypatch.setattr(_common, "_CAPABILITY", {0: (7, 5)})
    assert _common.platform_reason(x) is None
    assert "bfloat16 needs compute capability 8.0" in _common.platform_reason(xb)
    monkeypatch.setattr(_common, "_CAPABILITY", {0: (9, 0)})
    assert _common.platform_reason(xb) is None
    monkeypatch.setattr(_common, "_TRITON", [(None, "triton is not installed (pip install triton)")])
    assert _common.platform_reason(x) == "triton is not installed (pip install triton)"


# ---------------------------------------------------------------------------------------------- tag plumbing
def test_fallback_tag_round_trip(monkeypatch):
    key = ("cuda:0", "NVIDIA H200", torch.float32, "contiguous", 2, 3, (1, 2, 3, 4), True, None)
    tag = A.fallback_tag("dwconv2d", key, "triton")
    assert A._parse_tag(tag) == ("dwconv2d", "triton", A._normalize_key("dwconv2d", key)[1])
    assert A._parse_tag("dwconv2d|triton|__import__('os').system('x')") == ("dwconv2d", "triton", None)  # no eval
    monkeypatch.setenv(A.ENV_FORCE, "triton")
    assert A.fallback_tag("dwconv2d", key, "triton") == ""  # forced: failures raise
    assert A.fallback_tag("dwconv2d", key, "torch") != ""


def test_report_failure_moves_the_winner_to_the_next_fastest():
    cands = {n: (lambda n=n: n) for n in ("triton", "channels_last", "torch")}
    costs = {"triton": 1.0, "channels_last": 3.0, "torch": 2.0}
    A.choose("op", (1,), cands, "channels_last", timer=lambda fn, cuda: costs[fn()])
    assert A.cache_table()[("op", (1,))]["winner"] == "triton"
    with pytest.warns(A.BackendFallbackWarning, match="boom"):
        A.report_failure(A.fallback_tag("op", (1,), "triton"), "kernel raised RuntimeError: boom")
    assert A.cache_table()[("op", (1,))]["winner"] == "torch"  # the fastest remaining measured one
    assert A.tag_failed(A.fallback_tag("op", (1,), "triton"))
    assert A.choose("op", (1,), cands, "channels_last", timer=lambda fn, cuda: 1 / 0) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        A.report_failure(A.fallback_tag("op", (2,), "triton"), "kernel raised RuntimeError: boom")  # same reason
    A.clear_cache()
    assert not A.tag_failed(A.fallback_tag("op", (1,), "triton")) and A.failures() == {}
