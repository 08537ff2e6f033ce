"""autoselect: measured dispatch (choice, cache, when not to measure, tables) and dwconv2d's CUDA "auto" choice.

Everything runs on CPU with an injected fake timer, so the choices are deterministic and the file is fast.
"""

from __future__ import annotations

import json
import logging
import threading

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lkvision.ops import autoselect as A
from lkvision.ops import dwconv as D
from lkvision.ops.dwconv import dwconv2d


@pytest.fixture(autouse=True)
def _clean_autoselect(monkeypatch):
    monkeypatch.delenv(A.ENV_ENABLE, raising=False)
    monkeypatch.delenv(A.ENV_TABLE, raising=False)
    monkeypatch.setattr(A, "_env_table_done", None)
    A.clear_cache()
    yield
    A.clear_cache()


class FakeTimer:
    """Runs the candidate once (it returns its own name) and charges that name's cost."""

    def __init__(self, **costs: float):
        self.costs = costs
        self.calls: list[str] = []

    def __call__(self, fn, cuda):
        name = fn()
        self.calls.append(name)
        return self.costs[name]


def _cands(*names):
    return {n: (lambda n=n: n) for n in names}


def _boom():
    raise RuntimeError("candidate failed")


# --------------------------------------------------------------------------------------------------- choose
def test_fake_timer_picks_cheapest():
    t = FakeTimer(a=3.0, b=1.0, c=2.0)
    assert A.choose("op", (1, 2), _cands("a", "b", "c"), "a", timer=t) == "b"
    assert t.calls == ["a", "b", "c"]
    table = A.cache_table()
    assert table == {("op", (1, 2)): {"winner": "b", "times_ms": {"a": 3000.0, "b": 1000.0, "c": 2000.0}}}


def test_cache_hit_does_not_retime():
    t = FakeTimer(a=2.0, b=1.0)
    for _ in range(3):
        assert A.choose("op", ("k",), _cands("a", "b"), "a", timer=t) == "b"
    assert len(t.calls) == 2
    A.choose("op", ("other",), _cands("a", "b"), "a", timer=t)  # another key
    A.choose("op2", ("k",), _cands("a", "b"), "a", timer=t)  # the same key of another op
    assert len(t.calls) == 6


def test_module_level_timer_is_the_default(monkeypatch):
    t = FakeTimer(a=1.0, b=2.0)
    monkeypatch.setattr(A, "_timer", t)
    assert A.choose("op", (0,), _cands("a", "b"), "b") == "a"
    assert t.calls == ["a", "b"]


def test_raising_candidate_is_dropped_loudly(caplog):
    """A candidate that raises while being timed is dropped for that key, with one BackendFallbackWarning per
    (op, reason) (not a debug line nobody sees), and the failure is logged with its traceback."""
    t = FakeTimer(a=5.0, c=7.0)
    cands = {"a": lambda: "a", "b": _boom, "c": lambda: "c"}
    with caplog.at_level(logging.INFO, logger=A.__name__):
        with pytest.warns(A.BackendFallbackWarning) as rec:
            assert A.choose("op", (0,), cands, "c", timer=t) == "a"
            assert A.choose("op", (1,), cands, "c", timer=t) == "a"  # the same reason for another key: no warning
            assert A.choose("op2", (0,), cands, "c", timer=t) == "a"  # another op: its own warning
    assert [str(w.message).split(":")[1].strip() for w in rec] == ["op", "op2"]
    msg = str(rec[0].message)
    assert "'b' raised RuntimeError: candidate failed, while the 'b' implementation was being timed" in msg
    assert "LKVISION_FORBID_BACKENDS=b" in msg and "impl='b'" in msg
    assert "candidate 'b' failed" in caplog.text and "Traceback" in caplog.text
    assert A.cache_table()[("op", (0,))]["times_ms"] == {"a": 5000.0, "b": None, "c": 7000.0}
    assert A.failures()[("op", (0,))] == {"b": "'b' raised RuntimeError: candidate failed"}


def test_dropped_candidate_is_not_timed_again():
    """A key whose cached winner becomes unusable is measured again, without the candidate that failed."""
    t = FakeTimer(a=5.0, c=7.0)
    cands = {"a": lambda: "a", "b": _boom, "c": lambda: "c"}
    with pytest.warns(A.BackendFallbackWarning):
        A.choose("op", (0,), cands, "c", timer=t)
    t2 = FakeTimer(c=2.0, d=1.0)
    with pytest.warns(A.BackendFallbackWarning, match="names 'a' for the problem .* cannot run here: gone"):
        assert A.choose("op", (0,), {"b": _boom, "c": lambda: "c", "d": lambda: "d"}, "c", timer=t2,
                        unavailable={"a": "gone"}) == "d"
    assert t2.calls == ["c", "d"]  # "a" cannot run: re-measured, without "b" (it failed for this key)


def test_all_raising_returns_default_and_is_cached():
    calls = []

    def timer(fn, cuda):
        calls.append(fn)
        return fn()

    with pytest.warns(A.BackendFallbackWarning):
        assert A.choose("op", (0,), {"a": _boom, "b": _boom}, "b", timer=timer) == "b"
        assert A.choose("op", (0,), {"a": _boom, "b": _boom}, "b", timer=timer) == "b"
    assert len(calls) == 2  # not re-timed on every call


def test_env_disabled_returns_default_without_timing(monkeypatch):
    t = FakeTimer(a=2.0, b=1.0)
    assert A.choose("op", (0,), _cands("a", "b"), "a", timer=t) == "b"  # cached winner "b"
    monkeypatch.setenv(A.ENV_ENABLE, "0")
    assert A.choose("op", (0,), _cands("a", "b"), "a", timer=t) == "a"  # cache ignored too
    assert A.choose("op", (1,), _cands("a", "b"), "a", timer=t) == "a"
    assert len(t.calls) == 2
    assert not A.measuring_allowed()


def test_measure_ok_false_never_times():
    t = FakeTimer(a=2.0, b=1.0)
    assert A.choose("op", (0,), _cands("a", "b"), "a", timer=t, measure_ok=False) == "a"
    assert t.calls == [] and A.cache_table() == {}
    A.choose("op", (0,), _cands("a", "b"), "a", timer=t)
    assert A.choose("op", (0,), _cands("a", "b"), "a", timer=t, measure_ok=False) == "b"  # cached winner
    assert len(t.calls) == 2


def test_single_candidate_is_not_timed():
    t = FakeTimer(a=1.0)
    assert A.choose("op", (0,), _cands("a"), "z", timer=t) == "a"
    assert t.calls == [] and A.cache_table() == {}


def test_cached_winner_missing_from_candidates_is_a_miss():
    """A cached winner that cannot run here (e.g. a table from a machine with Triton) is a miss, announced once
    per (op, reason) with the reason; a name the op does not have at all is announced too."""
    t = FakeTimer(triton=1.0, cl=2.0, nchw=3.0)
    assert A.choose("op", (0,), _cands("triton", "cl", "nchw"), "cl", timer=t) == "triton"
    gone = {"triton": "triton is not installed (pip install triton)"}
    with pytest.warns(A.BackendFallbackWarning) as rec:
        assert A.choose("op", (0,), _cands("cl", "nchw"), "cl", timer=t, measure_ok=False, unavailable=gone) == "cl"
        assert A.choose("op", (0,), _cands("cl", "nchw"), "nchw", timer=t, unavailable=gone) == "cl"  # re-measured
    assert len(rec) == 1 and "cannot run here: triton is not installed" in str(rec[0].message)
    assert t.calls == ["triton", "cl", "nchw", "cl", "nchw"]
    A.choose("op", (1,), _cands("triton", "cl"), "cl", timer=t)
    with pytest.warns(A.BackendFallbackWarning, match="'triton' is not an implementation of op"):
        assert A.choose("op", (1,), _cands("cl", "nchw"), "nchw", timer=t, measure_ok=False) == "nchw"


@pytest.mark.parametrize("kind", ["meta", "fake", "subclass"])
def test_unmeasurable_tensors(kind):
    t = FakeTimer(a=2.0, b=1.0)
    if kind == "meta":
        x = torch.empty(2, 3, device="meta")
    elif kind == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode

        x = FakeTensorMode().from_tensor(torch.empty(2, 3))
    else:
        x = torch.empty(2, 3).as_subclass(type("MyTensor", (torch.Tensor,), {}))
    assert A.choose("op", (0,), _cands("a", "b"), "a", tensors=(x, None), timer=t) == "a"
    assert t.calls == []
    assert A.choose("op", (0,), _cands("a", "b"), "a", tensors=(torch.empty(2), None), timer=t) == "b"


def test_no_measuring_inside_dispatch_modes_and_transforms():
    from torch.utils.flop_counter import FlopCounterMode

    t = FakeTimer(a=2.0, b=1.0)
    with FlopCounterMode(display=False):
        assert A.choose("op", (0,), _cands("a", "b"), "a", timer=t) == "a"
    torch.func.vmap(lambda v: A.choose("op", (1,), _cands("a", "b"), "a", tensors=(v,), timer=t) and v)(
        torch.ones(3, 2))
    assert t.calls == []


def test_no_measuring_during_stream_capture(monkeypatch):
    assert A._stream_capturing() is False  # CPU-only build: the guarded check must not raise
    monkeypatch.setattr(A, "_stream_capturing", lambda: True)
    t = FakeTimer(a=2.0, b=1.0)
    assert A.choose("op", (0,), _cands("a", "b"), "a", timer=t) == "a"
    assert t.calls == []


def test_no_measuring_under_torch_compile():
    t = FakeTimer(a=2.0, b=1.0)

    def f(x):
        w = A.choose("op", (x.dtype, x.shape[0]), _cands("a", "b"), "a", tensors=(x,), timer=t)
        return x * (1.0 if w == "a" else 2.0)

    cf = torch.compile(f, backend="eager", fullgraph=True)
    x = torch.ones(3)
    assert cf(x).sum().item() == 3.0  # the default, nothing timed or cached
    assert t.calls == [] and A.cache_table() == {}
    assert f(x).sum().item() == 6.0  # eager: measured -> "b"
    assert cf(x).sum().item() == 6.0  # the compiled graph is re-traced and uses the cached winner
    assert len(t.calls) == 2


def test_key_normalisation_and_bad_keys():
    t = FakeTimer(a=2.0, b=1.0)
    A.choose("op", (torch.float16, torch.device("cpu"), [1, (2, 3)], torch.Size([4])), _cands("a", "b"), "a",
             timer=t)
    assert list(A.cache_table()) == [("op", ("torch.float16", "cpu", (1, (2, 3)), (4,)))]
    # the normalised spelling is the same key: a hit
    assert A.choose("op", ("torch.float16", "cpu", (1, (2, 3)), (4,)), _cands("a", "b"), "a", timer=t) == "b"
    assert len(t.calls) == 2
    with pytest.raises(TypeError, match="unsupported key element"):
        A.choose("op", (object(),), _cands("a", "b"), "a", timer=t)
    with pytest.raises(TypeError, match="key must be a tuple"):
        A.choose("op", [1], _cands("a", "b"), "a", timer=t)


def test_concurrent_misses_measure_once():
    lock = threading.Lock()
    calls = []

    def timer(fn, cuda):
        with lock:
            calls.append(fn())
        return {"a": 2.0, "b": 1.0}[calls[-1]]

    barrier = threading.Barrier(4)
    results = []

    def worker():
        barrier.wait()
        results.append(A.choose("op", (0,), _cands("a", "b"), "a", timer=timer))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert results == ["b"] * 4
    assert sorted(calls) == ["a", "b"]


def test_measure_counts_warmup_and_repeats():
    calls = []
    sec = A.measure(lambda: calls.append(1), warmup=2, repeats=3)
    assert len(calls) == 5 and sec >= 0.0


def test_candidate_forward_only_and_forward_backward():
    x = torch.randn(2, 3, requires_grad=True)
    w = torch.randn(3, requires_grad=True)
    frozen = torch.randn(3)
    seen = {}

    def fn(a, b, c, none, scale):
        seen.update(grad=torch.is_grad_enabled(), leaf=a is not x, none=none, scale=scale)
        return (a * b * scale, [a.sum() + c.sum()])

    out = A.candidate(fn, (x, w, frozen, None, 2.0), train=False)()
    assert seen == {"grad": False, "leaf": False, "none": None, "scale": 2.0}
    assert not out[0].requires_grad

    grads = A.candidate(fn, (x, w, frozen, None, 2.0), train=True)()
    assert seen["grad"] and seen["leaf"]
    # d/dx of sum(x*w*2) + sum(x) = 2w + 1, d/dw = 2 * sum_rows(x); the frozen tensor gets none
    torch.testing.assert_close(grads[0], (2 * w + 1).detach().expand(2, 3))
    torch.testing.assert_close(grads[1], 2 * x.detach().sum(0))
    assert len(grads) == 2 and x.grad is None and w.grad is None


def test_candidate_without_gradients_to_take():
    x = torch.randn(3)
    assert A.candidate(lambda a: a * 2, (x,), train=True)() == ()
    w = torch.randn(3, requires_grad=True)
    (g,) = A.candidate(lambda a, b: a * 2, (w, x), train=True)()  # only w wants a gradient
    torch.testing.assert_close(g, torch.full((3,), 2.0))


# ---------------------------------------------------------------------------------------------------- tables
def _fill_cache():
    t = FakeTimer(a=2.0, b=1.0, c=0.5)
    A.choose("op", (torch.float32, 1, (2, 3), True, None), _cands("a", "b"), "a", timer=t)
    A.choose("other", ("x", 1.5), _cands("a", "b", "c"), "a", timer=t)
    with pytest.warns(A.BackendFallbackWarning):
        A.choose("bad", (0,), {"a": _boom, "b": _boom}, "a", timer=t)
    return t


def test_save_load_round_trip(tmp_path):
    _fill_cache()
    before = A.cache_table()
    path = tmp_path / "sub" / "table.json"
    A.save_table(path)
    doc = json.loads(path.read_text())
    assert doc["format"] == A.TABLE_FORMAT and doc["version"] == A.TABLE_VERSION
    assert doc["torch"] == torch.__version__ and isinstance(doc["device"], str) and doc["device"]
    assert len(doc["entries"]) == 3
    assert [p.name for p in path.parent.iterdir()] == ["table.json"]  # no temporary file left behind

    A.clear_cache()
    assert A.cache_table() == {}
    assert A.load_table(path) == 3
    assert A.cache_table() == before
    t = FakeTimer(a=1.0, b=1.0)
    assert A.choose("op", (torch.float32, 1, (2, 3), True, None), _cands("a", "b"), "a", timer=t) == "b"
    assert A.choose("other", ("x", 1.5), _cands("a", "b", "c"), "a", timer=t) == "c"
    assert t.calls == []


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "table.json"
    _fill_cache()
    A.save_table(path)
    old = path.read_text()

    def broken_fsync(fd):
        raise OSError("disk full")

    import lkvision.fileio

    monkeypatch.setattr(lkvision.fileio.os, "fsync", broken_fsync)  # the write fails before the rename
    with pytest.raises(OSError, match="disk full"):
        A.save_table(path)
    assert path.read_text() == old
    assert [p.name for p in tmp_path.iterdir()] == ["table.json"]


_HEADER = {"format": A.TABLE_FORMAT, "version": A.TABLE_VERSION, "torch": torch.__version__, "device": "x"}


@pytest.mark.parametrize("content,message", [
    ("{not json", "not valid JSON"),
    ("[]", "expected a JSON object"),
    (json.dumps({**_HEADER, "format": "something-else"}), "'format' is 'something-else'"),
    (json.dumps({**_HEADER, "version": 99}), "unsupported 'version' 99"),
    (json.dumps({**_HEADER, "entries": {}}), "'entries' is missing or not a list"),
    (json.dumps({**_HEADER, "entries": [{"op": "o", "key": [1], "winner": 3}]}), "entry 0: 'winner' must be"),
    (json.dumps({**_HEADER, "entries": [{"op": "o", "key": [{"a": 1}], "winner": "a"}]}), "entry 0: 'key'"),
    (json.dumps({**_HEADER, "entries": [{"op": "o", "key": [1], "winner": "a", "times_ms": {"a": "x"}}]}),
     "entry 0: 'times_ms'"),
])
def test_corrupt_table_raises_clear_value_error(tmp_path, content, message):
    path = tmp_path / "table.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        A.load_table(path)
    assert str(path) in str(info.value)
    assert A.cache_table() == {}


def test_env_table_loaded_at_first_use(tmp_path, monkeypatch, caplog):
    _fill_cache()
    path = tmp_path / "table.json"
    A.save_table(path)
    A.clear_cache()
    monkeypatch.setenv(A.ENV_TABLE, str(path))
    t = FakeTimer(a=1.0, b=1.0)
    assert A.choose("op", (torch.float32, 1, (2, 3), True, None), _cands("a", "b"), "a", timer=t) == "b"
    assert t.calls == []
    # a missing file is reported and skipped; choose still measures
    monkeypatch.setenv(A.ENV_TABLE, str(tmp_path / "missing.json"))
    with caplog.at_level(logging.WARNING, logger=A.__name__):
        assert A.choose("new", (0,), _cands("a", "b"), "b", timer=FakeTimer(a=1.0, b=2.0)) == "a"
    assert "does not exist" in caplog.text
    # a corrupt one raises
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    monkeypatch.setenv(A.ENV_TABLE, str(bad))
    with pytest.raises(ValueError, match="not valid JSON"):
        A.choose("new", (1,), _cands("a", "b"), "b", timer=t)


# ------------------------------------------------------------------------------------- dwconv2d on "CUDA"
class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


class _DwconvHarness:
    """Triton reported available, every path recorded; the fake timer charges the impl that the candidate ran
    and records the aten ops it executed (to see whether a backward ran)."""

    def __init__(self, monkeypatch, costs, triton=True):
        self.costs, self.impls, self.timed = costs, [], []
        self.ops: dict[str, list[str]] = {}
        self.grad_enabled: dict[str, bool] = {}
        forward = D._forward_impl

        def recording_forward(x, weight, bias, pad4, impl, fallback=""):
            assert fallback == ""  # timed candidates raise on failure (never time a fallback as "triton")
            self.impls.append(impl)
            self.grad_enabled[impl] = torch.is_grad_enabled()
            return forward(x, weight, bias, pad4, "torch" if impl == "triton" else impl)

        monkeypatch.setattr(D, "_triton_reason", lambda *args: None if triton else "no triton here")
        monkeypatch.setattr(D, "_forward_impl", recording_forward)
        monkeypatch.setattr(A, "_timer", self)

    def __call__(self, fn, cuda):
        assert cuda is False
        rec = _OpRecorder()
        with rec:
            result = fn()
        impl = self.impls[-1]
        self.timed.append(impl)
        self.ops[impl] = rec.ops
        self.result = result
        return self.costs[impl]


def _dw_inputs(requires_grad=(False, False, False), channels_last=False, bias=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 9, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(3, 1, 3, 5, generator=g)
    b = torch.randn(3, generator=g) if bias else None
    for t, rg in zip((x, w, b), requires_grad):
        if t is not None:
            t.requires_grad_(rg)
    return x, w, b


def test_cuda_auto_impl_inference_key_and_choice(monkeypatch):
    h = _DwconvHarness(monkeypatch, {"triton": 3.0, "channels_last": 1.0, "torch": 2.0})
    x, w, b = _dw_inputs()
    pad4 = (1, 3, 1, 1)
    assert D._cuda_auto_impl(x, w, b, pad4) == ("channels_last", "")
    assert h.timed == ["triton", "channels_last", "torch"]
    assert h.grad_enabled == {"triton": False, "channels_last": False, "torch": False}  # forward only
    assert not any("backward" in op for ops in h.ops.values() for op in ops)
    key = ("cpu", "cpu", "torch.float32", "contiguous", 2, 3, 6, 9, 3, 5, (1, 3, 1, 1), False, None)
    assert list(A.cache_table()) == [("dwconv2d", key)]
    assert D._cuda_auto_impl(x, w, b, pad4) == ("channels_last", "")  # cached: not re-timed
    assert len(h.timed) == 3


@pytest.mark.parametrize("requires_grad", [(True, True, True), (False, True, False), (True, False, False)])
def test_cuda_auto_impl_times_forward_backward_when_training(monkeypatch, requires_grad):
    h = _DwconvHarness(monkeypatch, {"triton": 1.0, "channels_last": 2.0, "torch": 3.0})
    x, w, b = _dw_inputs(requires_grad, channels_last=True)
    impl, fallback = D._cuda_auto_impl(x, w, b, (2, 2, 1, 1))
    assert impl == "triton" and fallback == A.fallback_tag("dwconv2d", next(iter(A.cache_table()))[1], "triton")
    assert h.timed == ["triton", "channels_last", "torch"]
    assert all(h.grad_enabled.values())
    for impl in ("channels_last", "torch"):
        assert "convolution_backward" in h.ops[impl], (impl, h.ops[impl])
    # the candidate returned exactly the gradients the caller will need, with the right shapes
    wanted = [t for t in (x, w, b) if t.requires_grad]
    assert [g.shape for g in h.result] == [t.shape for t in wanted]
    assert all(t.grad is None for t in (x, w, b))  # nothing leaked into the caller's tensors
    (key,) = A.cache_table()
    assert key[1][3] == "channels_last" and key[1][11] is True


def test_cuda_auto_impl_no_grad_context_is_inference(monkeypatch):
    h = _DwconvHarness(monkeypatch, {"channels_last": 2.0, "torch": 1.0}, triton=False)
    x, w, b = _dw_inputs((True, True, True))
    with torch.no_grad():
        assert D._cuda_auto_impl(x, w, b, (2, 2, 1, 1)) == ("torch", "")
    assert h.timed == ["channels_last", "torch"]  # no triton candidate without triton
    assert not any(h.grad_enabled.values())
    (key,) = A.cache_table()
    assert key[1][11] is False


def test_cuda_auto_impl_non_leaf_input_keeps_its_graph(monkeypatch):
    _DwconvHarness(monkeypatch, {"triton": 1.0, "channels_last": 2.0, "torch": 3.0})
    leaf = torch.randn(2, 3, 6, 9, requires_grad=True)
    x = leaf * 2
    _, w, b = _dw_inputs()
    D._cuda_auto_impl(x, w, b, (2, 2, 1, 1))
    assert leaf.grad is None
    x.sum().backward()  # the caller's graph is intact and only gets its own gradient
    torch.testing.assert_close(leaf.grad, torch.full_like(leaf, 2.0))


def test_cuda_auto_impl_default_when_not_measurable(monkeypatch):
    h = _DwconvHarness(monkeypatch, {"triton": 1.0, "channels_last": 2.0, "torch": 3.0})
    monkeypatch.setattr(A, "_stream_capturing", lambda: True)
    x, w, b = _dw_inputs()
    assert D._cuda_auto_impl(x, w, b, (2, 2, 1, 1)) == ("channels_last", "")
    monkeypatch.setenv(A.ENV_ENABLE, "0")
    assert D._cuda_auto_impl(x, w, b, (2, 2, 1, 1)) == ("channels_last", "")
    assert h.timed == []


def test_cuda_auto_impl_compiles_without_graph_breaks(monkeypatch):
    h = _DwconvHarness(monkeypatch, {"triton": 1.0, "channels_last": 2.0, "torch": 3.0})
    x, w, b = _dw_inputs((True, True, True))
    codes = {"triton": 1.0, "channels_last": 2.0, "torch": 3.0}

    def f(x, w, b):
        return x * codes[D._cuda_auto_impl(x, w, b, (2, 2, 1, 1))[0]]

    cf = torch.compile(f, backend="eager", fullgraph=True)
    torch.testing.assert_close(cf(x, w, b), x * 2.0)  # the default, nothing timed
    assert h.timed == []


def test_cpu_auto_without_gradient_is_custom_and_never_measures(monkeypatch):
    def no_choose(*args, **kwargs):
        raise AssertionError("choose must not be called for a no-grad CPU problem of this size")

    monkeypatch.setattr(A, "choose", no_choose)
    x, w, b = _dw_inputs()
    y = dwconv2d(x, w, b, (2, 2, 1, 1))
    assert y.is_contiguous(memory_format=torch.channels_last)  # the "custom" path's layout
    assert D._auto_impl(x, w, b, (2, 2, 1, 1)) == ("custom", "")


@pytest.mark.parametrize("faster", ["custom", "channels_last"])
def test_cpu_training_takes_the_backward_measured_faster(faster, monkeypatch):
    """An eager CPU call that needs a gradient times one training step of our backward ("custom") against
    PyTorch's own ("channels_last") once per problem and keeps the faster; the gradients are the same either
    way; under a dispatch mode (no measuring) it is "custom"."""
    monkeypatch.delenv("LKVISION_FORCE_BACKEND", raising=False)
    monkeypatch.delenv("LKVISION_AUTOSELECT", raising=False)
    A.clear_cache()
    timed = []
    real_op = D._dwconv2d_op

    def spy_op(*args):
        timed.append("custom")
        return real_op(*args)

    def timer(fn, cuda=False):
        n = len(timed)
        fn()
        name = "custom" if len(timed) > n else "channels_last"
        timed.append(name)
        return 1e-3 if name == faster else 2e-3

    monkeypatch.setattr(D, "_dwconv2d_op", spy_op)
    monkeypatch.setattr(A, "measure_min", timer)
    x, w, b = _dw_inputs((True, True, True))
    try:
        y = dwconv2d(x, w, b, (2, 2, 1, 1))
        (entry,) = [e for (op, _), e in A.cache_table().items() if op == "dwconv2d_cpu_train"]
        assert entry["winner"] == faster and set(entry["times_ms"]) == {"custom", "channels_last"}
        y.square().sum().backward()
        ref = [t.detach().double().requires_grad_() for t in (x, w, b)]
        F.conv2d(F.pad(ref[0], (2, 2, 1, 1)), ref[1], ref[2], groups=3).square().sum().backward()
        for got, want in zip((x, w, b), ref):
            torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-4)
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False):  # a dispatch mode: nothing measured, the default
            assert D._auto_impl(x, w, b, (2, 2, 1, 1)) == ("custom", "")
    finally:
        A.clear_cache()
