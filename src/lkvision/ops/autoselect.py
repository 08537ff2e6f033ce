"""Measured dispatch with fallback: pick the fastest of several equivalent implementations once per problem,
cache it, and never let a failing fast path take a model down.

Like cuDNN's benchmark mode: the first time an operator meets a problem (``op`` + a hashable ``key`` made of
whatever changes the relative speed of the paths: device, dtype, layout, shapes, padding, training or not),
:func:`choose` times every candidate and remembers the fastest; every later call with the same key is a
dictionary look-up::

    train = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    why = kernels.can_run_dwconv2d(x, weight, None, pad, needs_grad=train)   # None: Triton can serve it
    names = (["triton"] if why is None else []) + ["channels_last"]
    impl = autoselect.choose("dwconv2d", key, {n: autoselect.candidate(run[n], (x, weight), train) for n in names},
                             "channels_last", unavailable={"triton": why} if why else None, tensors=(x, weight))
    tag = autoselect.fallback_tag("dwconv2d", key, impl)   # handed to the Triton op: what to do if it fails

:func:`candidate` builds such a timing callable: the forward under ``no_grad``, or forward + backward on detached
leaves when ``train`` (so that the choice reflects training cost and no gradient reaches the caller's tensors).

Timing (:func:`measure`): ``WARMUP`` untimed calls (JIT compilation, cuDNN's own algorithm search, allocator
warm-up), then the median of ``REPEATS`` timed calls: CUDA events + ``torch.cuda.synchronize`` when the work is
on a CUDA device, ``time.perf_counter`` otherwise. The timer is injectable (``timer=`` argument or the
module-level ``_timer``) so that tests can drive the choice deterministically.

Failures (the backends are eligible only where their ``can_run`` check passed, so what is left are real
failures: a kernel that does not compile, runs out of shared memory, ...):

* a candidate that raises *while being timed* is dropped for that key (``times_ms`` None) and one
  :class:`BackendFallbackWarning` per (op, reason) says so; if every candidate raises, ``default`` is chosen;
* a chosen kernel that raises *later*, at run time, forward or backward, eager or inside a compiled graph,
  reports it through the ``fallback`` tag it was given (:func:`fallback_tag`, :func:`report_failure`): the
  kernel op serves the call with its PyTorch computation, the key's choice moves to the fastest remaining
  candidate (or is measured again), the same warning is emitted once per (op, reason), and later calls of that
  tag skip the kernel (:func:`tag_failed`);
* a cached choice (e.g. from a loaded table) naming an implementation that cannot run here (``unavailable``
  gives the reason) is dropped with the same warning; the problem is measured again where allowed, else
  ``default`` is used.
Explicit requests stay errors: an implementation passed as ``impl=`` or forced (below) raises.

Forcing and forbidding backends by name (read at every call; ``NAME`` applies to every op that has such an
implementation, ``OP=NAME`` to one op; comma-separated):

* ``LKVISION_FORBID_BACKENDS=triton``: never offered, timed or taken from a table (silently); an op's
  ``default`` (its PyTorch path) cannot be forbidden.
* ``LKVISION_FORCE_BACKEND=triton`` (or ``dwconv2d=triton,shiftwise_conv=fast``): taken without timing wherever
  it is a candidate; where it cannot run, or fails, that is an error (as with an explicit ``impl=``).

No measuring happens (the cached winner is returned if there is one, else ``default``; nothing is cached) when

* ``torch.compiler.is_compiling()`` (torch.compile / export tracing: the traced graph gets the cached winner
  or the default; run the model eagerly once before compiling to have the measured choice baked in; the
  look-up is plain traceable Python, so dynamo guards on the key, i.e. specialises on the shapes in it),
* a CUDA stream is being captured into a CUDA graph (warm up eagerly before capturing),
* ``torch.jit`` is tracing or scripting, a ``TorchDispatchMode`` (FakeTensorMode, FlopCounterMode, ...) or a
  ``torch.func`` transform (vmap, grad, ...) is active,
* one of ``tensors`` is a meta tensor, a FakeTensor or another tensor subclass,
* the caller passes ``measure_ok=False``.

Environment variables:

* ``LKVISION_AUTOSELECT=0`` (also ``false``/``off``/``no``): never measure and ignore the cache; every
  :func:`choose` returns its ``default``.
* ``LKVISION_AUTOSELECT_TABLE=/path/table.json``: load that table (see :func:`load_table`) when this module is
  imported (torch.compile cannot read files while tracing) and at the first eager :func:`choose` after the
  variable changes. A missing file is logged and skipped; a corrupt one is logged at import and raises
  ``ValueError`` from the first eager :func:`choose`.
* ``LKVISION_FORBID_BACKENDS``, ``LKVISION_FORCE_BACKEND``: above.

The operators measure on the device types in ``MEASURED_DEVICE_TYPES`` (``{"cuda"}``; tests add ``"cpu"`` to
drive the same dispatch on CPU, where the Triton kernels run under ``TRITON_INTERPRET=1``).

Tables: :func:`save_table` writes the cache as JSON (atomically, :mod:`lkvision.fileio`) together with
the device name and the torch version; :func:`load_table` validates and merges one. :func:`cache_table` returns
a copy of the cache for inspection, :func:`failures` the dropped candidates with their reasons, and
:func:`clear_cache` empties both. Keys are normalised to JSON-friendly tuples (``torch.dtype``/``torch.device``/
``torch.memory_format`` become their ``str``, lists become tuples), so a key made in one process matches the same
key loaded from a table.

The cache is guarded by a lock; measurements are serialised by a second (re-entrant) lock so that two threads
never time concurrently (which would distort both measurements) while cache hits never wait for a measurement.
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import os
import platform
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch

from ..fileio import atomic_write_json
from .kernels._common import failure_reason

__all__ = ["choose", "triton_choice", "candidate", "measure", "measuring_allowed", "measured_device", "eligibility",
           "fallback_tag", "tag_failed",
           "report_failure", "failures", "save_table", "load_table", "clear_cache", "cache_table",
           "measure_min", "BackendFallbackWarning", "MEASURED_DEVICE_TYPES", "TABLE_FORMAT", "TABLE_VERSION",
           "WARMUP", "REPEATS"]

logger = logging.getLogger(__name__)

TABLE_FORMAT = "lkvision-autoselect"
TABLE_VERSION = 1
WARMUP = 2  # untimed calls per candidate before timing
REPEATS = 5  # timed calls per candidate; the median is used

ENV_ENABLE = "LKVISION_AUTOSELECT"
ENV_TABLE = "LKVISION_AUTOSELECT_TABLE"
ENV_FORBID = "LKVISION_FORBID_BACKENDS"
ENV_FORCE = "LKVISION_FORCE_BACKEND"
_FALSE_VALUES = ("0", "false", "off", "no")

MEASURED_DEVICE_TYPES: frozenset[str] = frozenset({"cuda"})
"""Device types whose ``impl="auto"`` is measured per problem (elsewhere the operators use their fixed choice)."""


class BackendFallbackWarning(RuntimeWarning):
    """An implementation (a Triton kernel) failed or cannot run, and the PyTorch path serves the problem instead.
    Emitted once per (op, reason); silence it with ``LKVISION_FORBID_BACKENDS=<name>`` (never try that backend)
    or ``warnings.filterwarnings("ignore", category=BackendFallbackWarning)``."""

Timer = Callable[[Callable[[], object], bool], float]
"""``timer(fn, cuda) -> seconds``: the cost of one call of ``fn`` (``cuda``: the work runs on a CUDA device)."""


class _Entry(NamedTuple):
    winner: str
    times_ms: dict[str, float | None]  # per candidate; None = it raised


_cache: dict[tuple[str, tuple], _Entry] = {}
_failed: dict[tuple[str, tuple], dict[str, str]] = {}  # (op, key) -> {dropped candidate: reason}
_failed_tags: dict[str, str] = {}  # fallback tag -> reason: kernels that failed at run time
_warned: set[tuple[str, str]] = set()  # (op, reason) already warned about
_lock = threading.Lock()  # guards _cache, _failed, _failed_tags, _warned and _env_table_done
_measure_lock = threading.RLock()  # serialises measurements (re-entrant: a candidate may call choose itself)
_env_table_done: str | None = None  # the LKVISION_AUTOSELECT_TABLE value already loaded (or found missing)


# ----------------------------------------------------------------------------------------------------- timing
def measure(fn: Callable[[], object], cuda: bool = False, *, warmup: int | None = None,
            repeats: int | None = None) -> float:
    """Median seconds per call of ``fn`` after ``warmup`` untimed calls (defaults ``WARMUP``, ``REPEATS``).

    ``cuda=True``: each call is bracketed by CUDA events on the current stream and the device is synchronised
    before the first and after the last event; otherwise ``time.perf_counter`` around each call."""
    warmup = WARMUP if warmup is None else warmup
    repeats = max(1, REPEATS if repeats is None else repeats)
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) / 1e3 for start, end in events]
    else:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return float(statistics.median(times))


def measure_min(fn: Callable[[], object], cuda: bool = False) -> float:
    """Seconds of the fastest of three calls after two warm-up calls (wall clock): the CPU operators' timer
    (:mod:`lkvision.ops.linear`, the CPU FFT choice of :mod:`lkvision.ops.dwconv`). Their kernels' own time barely
    varies; what does is the rest of the machine and first-use costs (oneDNN's JIT, fresh pages), which the
    minimum discards. Small, because a model's first call measures every new shape."""
    if cuda:
        return measure(fn, True, warmup=2, repeats=3)
    for _ in range(2):
        fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


_timer: Timer = measure
"""The timer used by :func:`choose` when none is passed (tests replace it)."""


def _flat_tensors(out: object) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat_tensors(o)]
    return []


def candidate(fn: Callable[..., object], args: Sequence[object], train: bool) -> Callable[[], object]:
    """A timing candidate for :func:`choose`: a zero-argument callable that runs ``fn(*args)`` once.

    ``train=False``: the forward only, under ``torch.no_grad()``. ``train=True``: forward + backward, so that
    the choice reflects training cost: every tensor in ``args`` is replaced by a detached leaf with the same
    ``requires_grad`` (no copy), and ``torch.autograd.grad`` of the tensor outputs (a tensor or nested
    tuples/lists of tensors; all-ones output gradients) w.r.t. those leaves is taken. The caller's tensors get no
    ``.grad`` and their autograd graph is untouched. Non-tensor ``args`` (None, ints, ...) are passed as they are.
    The leaves are made when the candidate runs, never when it is built (building one is free, also while
    torch.compile traces the caller)."""
    if not train:
        def run_forward() -> object:
            with torch.no_grad():
                return fn(*args)

        return run_forward

    def run_forward_backward() -> object:
        leaves = [a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]
        with torch.enable_grad():
            outs = [o for o in _flat_tensors(fn(*leaves)) if o.requires_grad]
            wanted = [a for a in leaves if isinstance(a, torch.Tensor) and a.requires_grad]
            if not outs or not wanted:
                return ()
            return torch.autograd.grad(outs, wanted, [torch.ones_like(o) for o in outs], allow_unused=True)

    return run_forward_backward


# ------------------------------------------------------------------------------------------- when to measure
def _enabled() -> bool:
    value = os.environ.get(ENV_ENABLE)
    return value is None or value.strip().lower() not in _FALSE_VALUES


def _stream_capturing() -> bool:
    """True while the current CUDA stream is being captured (False on CPU-only builds / uninitialised CUDA)."""
    try:
        return bool(torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing())
    except Exception:  # CPU-only build: the binding is a dummy that raises
        return False


def _unmeasurable_tensor(t: torch.Tensor) -> str | None:
    if t.device.type == "meta":
        return "meta tensor"
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        return f"tensor subclass {type(t).__name__}"
    try:
        if torch._C._functorch.is_functorch_wrapped_tensor(t):
            return "functorch-wrapped tensor"
    except Exception:  # pragma: no cover - private API moved
        pass
    return None


def _not_measurable_reason(tensors: Iterable[object] = ()) -> str | None:
    """Why measuring is not allowed right now (None: it is)."""
    if torch.compiler.is_compiling():
        return "compiling"
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return "torch.jit tracing/scripting"
    if _stream_capturing():
        return "CUDA stream capture in progress"
    try:
        from torch.utils._python_dispatch import is_in_torch_dispatch_mode

        if is_in_torch_dispatch_mode():
            return "a TorchDispatchMode is active"
        if torch._C._functorch.peek_interpreter_stack() is not None:
            return "a torch.func transform is active"
    except Exception:  # pragma: no cover - private API moved
        pass
    for t in tensors:
        if isinstance(t, torch.Tensor):
            why = _unmeasurable_tensor(t)
            if why is not None:
                return why
    return None


def measuring_allowed(tensors: Iterable[object] = ()) -> bool:
    """Whether :func:`choose` may time candidates now, for work on ``tensors`` (see the module docstring)."""
    return _enabled() and _not_measurable_reason(tensors) is None


# ------------------------------------------------------------------------------------------------------- keys
class _Unkeyable(Exception):
    """The key holds a symbolic value (SymInt & co.): no table entry can match it."""


_SCALAR_TYPES = frozenset((type(None), bool, int, float, str))


def _is_normalized(key: tuple) -> bool:
    """Fast check (the per-call path): a tuple of scalars and tuples of scalars needs no conversion."""
    for e in key:
        te = type(e)
        if te not in _SCALAR_TYPES and not (te is tuple and all(type(f) in _SCALAR_TYPES for f in e)):
            return False
    return True


def _normalize(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        raise _Unkeyable
    if isinstance(v, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
        return str(v)
    if isinstance(v, (tuple, list)):  # torch.Size is a tuple
        return tuple(_normalize(e) for e in v)
    raise TypeError(f"autoselect: unsupported key element {v!r} of type {type(v).__name__}; use None, bool, "
                    "int, float, str, torch.dtype/device/memory_format/layout or tuples of these")


def _normalize_key(op: str, key: tuple) -> tuple[str, tuple]:
    if not isinstance(op, str):
        raise TypeError(f"autoselect: op must be a str, got {type(op).__name__}")
    if not isinstance(key, tuple):
        raise TypeError(f"autoselect: key must be a tuple, got {type(key).__name__}")
    return op, (key if _is_normalized(key) else _normalize(key))


# ------------------------------------------------------------------------------------- forcing and forbidding
class _Policy(NamedTuple):
    forbid: dict[str, frozenset[str]]  # op (or "*": every op) -> names never offered
    force: dict[str, str]  # op (or "*") -> the name taken without timing


_POLICIES: dict[tuple[str, str], _Policy] = {}  # (forbid value, force value) -> parsed (a plain dict: traceable)


def _parse_backends(var: str, value: str) -> list[tuple[str, str]]:
    """``"triton, dwconv2d=torch"`` -> [("*", "triton"), ("dwconv2d", "torch")]."""
    items = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        op, sep, name = item.partition("=")
        op, name = (op.strip(), name.strip()) if sep else ("*", op.strip())
        if not op or not name:
            raise ValueError(f"{var}={value!r}: expected NAME or OP=NAME items separated by commas, got {item!r}")
        items.append((op, name))
    return items


def _policy() -> _Policy:
    key = (os.environ.get(ENV_FORBID, ""), os.environ.get(ENV_FORCE, ""))
    policy = _POLICIES.get(key)
    if policy is None:
        forbid: dict[str, set[str]] = {}
        for op, name in _parse_backends(ENV_FORBID, key[0]):
            forbid.setdefault(op, set()).add(name)
        force: dict[str, str] = {}
        for op, name in _parse_backends(ENV_FORCE, key[1]):
            if force.get(op, name) != name:
                raise ValueError(f"{ENV_FORCE}={key[1]!r} forces two implementations for {op}")
            force[op] = name
        policy = _Policy({op: frozenset(names) for op, names in forbid.items()}, force)
        _POLICIES[key] = policy
    return policy


def _forbidden(op: str, policy: _Policy) -> frozenset[str]:
    return policy.forbid.get("*", frozenset()) | policy.forbid.get(op, frozenset())


def _forced(op: str, candidates: Mapping[str, object], unavailable: Mapping[str, str], key: tuple,
            policy: _Policy) -> str | None:
    """The name forced for ``op`` (``LKVISION_FORCE_BACKEND``) when it is one of its candidates; raises where it
    cannot run (an explicit request) or is not an implementation of ``op`` at all (a typo)."""
    name = policy.force.get(op)
    specific = name is not None
    if name is None:
        name = policy.force.get("*")
        if name is None:
            return None
    if name in candidates:
        return name
    if name in unavailable:
        raise RuntimeError(f"{ENV_FORCE} forces {name!r} for {op}, but it cannot run the problem {key}: "
                           f"{unavailable[name]} (unset {ENV_FORCE}, or force it for other ops only with OP=NAME)")
    if specific:
        raise ValueError(f"{ENV_FORCE}: {op} has no implementation {name!r}; it has "
                         f"{sorted({*candidates, *unavailable})}")
    return None  # a name forced for every op that this op does not have


def _usable(op: str, key: tuple, candidates: Mapping[str, object], default: str,
            policy: _Policy) -> dict[str, object]:
    """``candidates`` minus the forbidden ones (never ``default``) and those that failed for this key."""
    forbidden = _forbidden(op, policy)
    failed = _failed.get((op, key), {})
    return {n: c for n, c in candidates.items() if (n == default or n not in forbidden) and n not in failed}


# ---------------------------------------------------------------------------------------------------- failures
_TAG_SEP = "|"


def fallback_tag(op: str, key: tuple, name: str) -> str:
    """What the kernel op chosen for ``(op, key)`` is told to do when it fails at run time (its ``fallback``
    argument, see ``lkvision.ops.kernels._common.run_guarded``): "" (raise) when ``name`` is forced by
    ``LKVISION_FORCE_BACKEND``, else a tag naming op, implementation and key, so that the failure can be reported
    (:func:`report_failure`) and the key's choice moved to the PyTorch path. Plain traceable Python: under
    torch.compile the tag is a constant of the graph."""
    force = _policy().force
    if force.get(op, force.get("*")) == name:
        return ""
    try:
        k = _normalize_key(op, key)[1]
    except _Unkeyable:
        return f"{op}{_TAG_SEP}{name}{_TAG_SEP}"
    return f"{op}{_TAG_SEP}{name}{_TAG_SEP}{k!r}"


def _parse_tag(tag: str) -> tuple[str, str, tuple | None]:
    op, _, rest = tag.partition(_TAG_SEP)
    name, _, key_repr = rest.partition(_TAG_SEP)
    try:  # a literal (the repr of a normalised key): never code
        key = ast.literal_eval(key_repr) if key_repr else None
    except (ValueError, SyntaxError):
        key = None
    return op, name, key if isinstance(key, tuple) else None


def tag_failed(tag: str) -> bool:
    """Whether the kernel chosen under this ``fallback`` tag failed before (its calls go straight to PyTorch)."""
    return tag in _failed_tags


def _warn_once(op: str, reason: str, message: str) -> None:
    with _lock:
        if (op, reason) in _warned:
            return
        _warned.add((op, reason))
    warnings.warn(message, BackendFallbackWarning, stacklevel=3)


def _how_to(name: str) -> str:
    return (f"To stop trying it: {ENV_FORBID}={name} (or pass the operator an explicit PyTorch impl=); to get the "
            f"error instead: impl={name!r} or {ENV_FORCE}={name}.")


def _drop(op: str, key: tuple, name: str, reason: str) -> str | None:
    """Record that ``name`` failed for ``(op, key)``; returns the cached winner that replaces it (None: the key
    is measured again, or takes the default). Call with ``_lock`` held."""
    k = (op, key)
    _failed.setdefault(k, {})[name] = reason
    entry = _cache.get(k)
    if entry is None or entry.winner != name:
        return entry.winner if entry is not None else None
    times = dict(entry.times_ms)
    times[name] = None
    ok = {n: t for n, t in times.items() if t is not None and n not in _failed[k]}
    if ok:
        _cache[k] = _Entry(min(ok, key=ok.__getitem__), times)
        return _cache[k].winner
    del _cache[k]
    return None


def report_failure(tag: str, reason: str) -> None:
    """A kernel chosen under ``tag`` (:func:`fallback_tag`) failed at run time with ``reason``: drop it for that
    key (the next call takes the fastest remaining candidate, or measures again), remember the tag (its later
    calls skip the kernel) and warn once per (op, reason). The caller serves the call with PyTorch."""
    op, name, key = _parse_tag(tag)
    with _lock:
        _failed_tags[tag] = reason
        replacement = _drop(op, key, name, reason) if key is not None else None
    logger.info("autoselect %s %s: %r failed at run time (%s); now %s", op, key, name, reason,
                replacement or "measured again / default")
    _warn_once(op, reason, f"lkvision: {op}: {reason}, in the {name!r} implementation chosen for the problem "
                           f"{key}. This call and the later ones of this problem use the PyTorch path instead; other "
                           f"{op} problems failing the same way fall back without another warning. " + _how_to(name))


def failures() -> dict[tuple[str, tuple], dict[str, str]]:
    """The candidates dropped per (op, key) because they raised (while timed or at run time), with the reason."""
    with _lock:
        return {k: dict(v) for k, v in _failed.items()}


# ------------------------------------------------------------------------------------------------ eligibility
_eligible: dict[tuple, tuple[str | None]] = {}  # (op, key, extra) -> (reason,): memoised can_run results


def eligibility(op: str, key: tuple, check: Callable[[], str | None], extra: tuple = ()) -> str | None:
    """``check()`` (a backend's can_run reason, None when it can run) memoised per ``(op, key, extra)`` until
    :func:`clear_cache`: the checks cost tens of microseconds of Python, the look-up well under one. ``key`` is
    the operator's autoselect key (it holds everything the checks depend on but the strides of a strided input:
    pass those as ``extra``). Nothing is stored while torch.compile traces."""
    memo = (op, key, extra)
    hit = _eligible.get(memo)
    if hit is not None:
        return hit[0]
    reason = check()
    if not torch.compiler.is_compiling():
        _eligible[memo] = (reason,)
    return reason


# ----------------------------------------------------------------------------------------------------- choose
def measured_device(x: torch.Tensor) -> bool:
    """Whether ``impl="auto"`` is measured per problem on ``x``'s device type (``MEASURED_DEVICE_TYPES``)."""
    return x.device.type in MEASURED_DEVICE_TYPES


def _lookup_while_compiling(op: str, key: tuple, candidates: Mapping[str, object], default: str,
                            unavailable: Mapping[str, str]) -> str:
    """The choice inside a torch.compile trace: a plain look-up, no lock, logging or timing (all traceable)."""
    try:
        k = _normalize_key(op, key)[1]
    except _Unkeyable:
        return default
    policy = _policy()
    forced = _forced(op, candidates, unavailable, k, policy)
    if forced is not None:
        return forced
    entry = _cache.get((op, k))
    if entry is not None and entry.winner in _usable(op, k, candidates, default, policy):
        return entry.winner
    return default


def _stale_winner(op: str, key: tuple, winner: str, candidates: Mapping[str, object], unavailable: Mapping[str, str],
                  default: str) -> None:
    """A cached winner that is not usable here: silent when forbidden or already failed; warned about (once per
    (op, reason)) when it cannot run here or is not an implementation of ``op``."""
    if (winner in _forbidden(op, _policy()) and winner != default) or winner in _failed.get((op, key), {}):
        return
    if winner in unavailable:
        reason = unavailable[winner]
        what, hint = f"it cannot run here: {reason}", _how_to(winner)
    elif winner not in candidates:
        reason = f"{winner!r} is not an implementation of {op} (it has {sorted({*candidates, *unavailable})})"
        what, hint = reason, "Re-measure and save the table with this lkvision to update it."
    else:
        return
    with _lock:
        _failed.setdefault((op, key), {})[winner] = reason
    _warn_once(op, reason, f"lkvision: {op}: the autoselect cache/table names {winner!r} for the problem {key}, "
                           f"but {what}. That problem is measured again (where allowed) or uses the default "
                           f"{default!r}; other {op} problems in this situation follow without another warning. "
                           + hint)


def choose(op: str, key: tuple, candidates: dict[str, Callable[[], object]], default: str, *,
           unavailable: Mapping[str, str] | None = None, tensors: Iterable[object] = (), measure_ok: bool = True,
           timer: Timer | None = None, cuda: bool | None = None) -> str:
    """The name of the fastest candidate for ``(op, key)``, measured on the first call and cached.

    Args:
        op: the operator's name (a namespace for the keys), e.g. ``"dwconv2d"``.
        key: a tuple describing the problem; elements: None, bool, int, float, str, torch.dtype, torch.device,
            torch.memory_format, torch.layout, or nested tuples/lists of these.
        candidates: name -> a zero-argument callable that runs that implementation once on representative
            inputs (it must not have side effects the caller can see: no gradients into the caller's tensors).
            Only implementations that can serve the problem (their ``can_run`` check passed).
        default: the name returned when nothing may be measured and nothing is cached, when every candidate
            raises, or always when ``LKVISION_AUTOSELECT=0``. It is never forbidden.
        unavailable: name -> why that implementation cannot serve this problem here (not timed; a cached winner
            with that name is dropped with a :class:`BackendFallbackWarning` giving the reason).
        tensors: the tensors the work runs on; meta/fake/subclass tensors forbid measuring, and a CUDA one
            selects CUDA-event timing.
        measure_ok: False forbids measuring (the cached winner or ``default`` is returned).
        timer: ``timer(fn, cuda) -> seconds`` (default: the module's ``_timer``, i.e. :func:`measure`).
        cuda: whether the candidates run on CUDA (default: whether any of ``tensors`` is a CUDA tensor).

    A name forced by ``LKVISION_FORCE_BACKEND`` is returned without timing (a RuntimeError where it cannot run);
    forbidden names (``LKVISION_FORBID_BACKENDS``) and candidates that failed for this key are never returned. A
    cached winner that is not usable counts as a miss. Where measuring is allowed, a single usable candidate is
    returned without timing (and without caching).
    """
    unavailable = unavailable or {}
    if torch.compiler.is_compiling():
        return _lookup_while_compiling(op, key, candidates, default, unavailable) if _enabled() else default
    if not _enabled():
        return default
    _load_env_table()
    try:
        k = _normalize_key(op, key)
    except _Unkeyable:
        return default
    policy = _policy()  # (the environment is read once per call)
    forced = _forced(op, candidates, unavailable, k[1], policy)
    if forced is not None:
        return forced
    usable = _usable(op, k[1], candidates, default, policy)
    with _lock:
        entry = _cache.get(k)
    if entry is not None:
        if entry.winner in usable:
            return entry.winner
        _stale_winner(op, k[1], entry.winner, candidates, unavailable, default)
    tensors = tuple(tensors)
    why = "measure_ok=False" if not measure_ok else _not_measurable_reason(tensors)
    if why is not None or not usable:
        logger.debug("autoselect %s %s: not measuring (%s); using %r", op, k[1], why or "no candidates", default)
        return default
    if len(usable) == 1:  # nothing to compare
        return next(iter(usable))
    cuda_device = next((t.device for t in tensors if isinstance(t, torch.Tensor) and t.is_cuda), None)
    if cuda is None:
        cuda = cuda_device is not None
    with _measure_lock:
        with _lock:
            entry = _cache.get(k)
        if entry is not None and entry.winner in usable:  # another thread measured it meanwhile
            return entry.winner
        # the events and synchronize of the timer must be on the tensors' device, not on the current one
        with torch.cuda.device(cuda_device) if cuda_device is not None else contextlib.nullcontext():
            entry = _measure_all(op, k[1], usable, default, timer if timer is not None else _timer, cuda)
        with _lock:
            _cache[k] = entry
    return entry.winner


def triton_choice(op: str, key_fn: Callable[[], tuple], reason_fn: Callable[[], str | None], candidates: dict,
                  default: str, impl: str, tensors: tuple) -> tuple[str, str]:
    """``(choice, fallback)`` of an op between its Triton kernel ("triton") and its PyTorch paths.

    ``impl="triton"``: "triton" with fallback "" (failures raise), or a RuntimeError naming why it cannot run
    (``reason_fn()``: the kernel's can_run check). ``impl="auto"`` (on a measured device, CUDA):
    :func:`choose` among the eligible candidates (Triton only where its can_run check,
    memoised per key, passed), with the fallback tag for the Triton op. ``key_fn()`` builds the autoselect key."""
    if impl == "triton":
        unavailable_reason = reason_fn()
        if unavailable_reason is not None:
            raise RuntimeError(f"{op}: impl='triton' cannot run here: {unavailable_reason} (impl='auto' picks a path "
                               "that can)")
        return "triton", ""
    key = key_fn()
    unavailable_reason = eligibility(op, key, reason_fn, tuple(tensors[0].stride()))
    if unavailable_reason is not None:
        candidates = {n: c for n, c in candidates.items() if n != "triton"}
    choice = choose(op, key, candidates, default, tensors=tensors,
                    unavailable=None if unavailable_reason is None else {"triton": unavailable_reason})
    return choice, fallback_tag(op, key, choice) if choice == "triton" else ""


def _measure_all(op: str, key: tuple, candidates: Mapping[str, Callable[[], object]], default: str,
                 timer: Timer, cuda: bool) -> _Entry:
    times: dict[str, float | None] = {}
    for name, fn in candidates.items():
        try:
            seconds = float(timer(fn, cuda))
        except Exception as exc:  # a failing candidate is dropped for this key, loudly
            reason = failure_reason(repr(name), exc)
            logger.info("autoselect %s %s: candidate %r failed: %s", op, key, name, reason, exc_info=True)
            times[name] = None
            with _lock:
                _failed.setdefault((op, key), {})[name] = reason
            _warn_once(op, reason, f"lkvision: {op}: {reason}, while the {name!r} implementation was being timed "
                                   f"for the problem {key}. It is not used for that problem (the fastest of the "
                                   f"others serves it); other {op} problems failing the same way drop it without "
                                   "another warning. " + _how_to(name))
            continue
        times[name] = seconds * 1e3
    ok = {name: t for name, t in times.items() if t is not None}
    winner = min(ok, key=ok.__getitem__) if ok else default
    logger.debug("autoselect %s %s: %s -> %r", op, key, times, winner)
    return _Entry(winner, times)


# ----------------------------------------------------------------------------------------------------- tables
def clear_cache() -> None:
    """Forget every cached choice, every dropped candidate and failed kernel, the memoised eligibility checks and
    which fallbacks were warned about (a table named by ``LKVISION_AUTOSELECT_TABLE`` is not re-read)."""
    with _lock:
        _cache.clear()
        _failed.clear()
        _failed_tags.clear()
        _warned.clear()
        _eligible.clear()


def cache_table() -> dict[tuple[str, tuple], dict[str, Any]]:
    """A copy of the cache: ``{(op, normalised key): {"winner": name, "times_ms": {name: ms or None}}}``."""
    with _lock:
        return {k: {"winner": e.winner, "times_ms": dict(e.times_ms)} for k, e in _cache.items()}


def _device_description() -> str:
    try:
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(torch.cuda.current_device())
    except Exception:  # pragma: no cover - broken driver
        pass
    return f"cpu ({platform.processor() or platform.machine() or 'unknown'})"


def save_table(path: str | os.PathLike) -> None:
    """Write the cache as JSON to ``path`` (atomically), with the device name and the torch version."""
    with _lock:
        entries = [{"op": op, "key": key, "winner": e.winner, "times_ms": dict(e.times_ms)}
                   for (op, key), e in _cache.items()]
    doc = {"format": TABLE_FORMAT, "version": TABLE_VERSION, "torch": torch.__version__,
           "device": _device_description(), "entries": entries}
    atomic_write_json(path, doc, indent=1)


def _tuplify(v: Any) -> Any:
    return tuple(_tuplify(e) for e in v) if isinstance(v, list) else v


def _check_key_value(v: Any) -> bool:
    if isinstance(v, list):
        return all(_check_key_value(e) for e in v)
    return v is None or isinstance(v, (bool, int, float, str))


def _parse_table(doc: Any, where: str) -> dict[tuple[str, tuple], _Entry]:
    def bad(msg: str) -> ValueError:
        return ValueError(f"autoselect table {where}: {msg}")

    if not isinstance(doc, dict):
        raise bad(f"expected a JSON object at the top level, got {type(doc).__name__}")
    if doc.get("format") != TABLE_FORMAT:
        raise bad(f"'format' is {doc.get('format')!r}, expected {TABLE_FORMAT!r}")
    if doc.get("version") != TABLE_VERSION:
        raise bad(f"unsupported 'version' {doc.get('version')!r} (this lkvision reads version {TABLE_VERSION})")
    entries = doc.get("entries")
    if not isinstance(entries, list):
        raise bad("'entries' is missing or not a list")
    out: dict[tuple[str, tuple], _Entry] = {}
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise bad(f"entry {i} is not an object")
        op, key, winner, times = e.get("op"), e.get("key"), e.get("winner"), e.get("times_ms", {})
        if not isinstance(op, str):
            raise bad(f"entry {i}: 'op' must be a string, got {op!r}")
        if not isinstance(key, list) or not _check_key_value(key):
            raise bad(f"entry {i}: 'key' must be a list of null/bool/number/string (or nested lists), got {key!r}")
        if not isinstance(winner, str):
            raise bad(f"entry {i}: 'winner' must be a string, got {winner!r}")
        if not isinstance(times, dict) or not all(
                isinstance(n, str) and (t is None or (isinstance(t, (int, float)) and not isinstance(t, bool)))
                for n, t in times.items()):
            raise bad(f"entry {i}: 'times_ms' must map names to numbers or null, got {times!r}")
        out[(op, _tuplify(key))] = _Entry(winner, {n: (None if t is None else float(t)) for n, t in times.items()})
    return out


def load_table(path: str | os.PathLike) -> int:
    """Merge the table at ``path`` (written by :func:`save_table`) into the cache; returns the entry count.

    Its entries replace cached ones with the same key. Raises ``FileNotFoundError`` for a missing file and
    ``ValueError`` naming the problem for a file that is not such a table. A table written by another torch
    version is loaded with a warning (its timings may be stale; keys carry the device name, so entries of other
    devices never match)."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"autoselect table {path}: not valid JSON ({exc})") from exc
    table = _parse_table(doc, path)
    if doc.get("torch") != torch.__version__:
        logger.warning("autoselect table %s was written with torch %s (running %s); its timings may be stale",
                       path, doc.get("torch"), torch.__version__)
    with _lock:
        _cache.update(table)
    return len(table)


def _load_env_table() -> None:
    """Load the table named by ``LKVISION_AUTOSELECT_TABLE`` once per distinct value."""
    global _env_table_done
    path = os.environ.get(ENV_TABLE)
    if not path or path == _env_table_done:
        return
    with _measure_lock:  # one thread loads; the others wait and then see _env_table_done
        if path == _env_table_done:
            return
        try:
            n = load_table(path)
        except FileNotFoundError:
            logger.warning("autoselect: %s=%s does not exist; starting with an empty table", ENV_TABLE, path)
        else:
            logger.debug("autoselect: loaded %d entries from %s", n, path)
        with _lock:
            _env_table_done = path



def _load_env_table_at_import() -> None:
    # torch.compile cannot read files while tracing, so a table meant for compiled models is read right away;
    # a corrupt file is reported here and raised by the first eager choose().
    try:
        _load_env_table()
    except ValueError as exc:
        logger.error("autoselect: %s", exc)


_load_env_table_at_import()
