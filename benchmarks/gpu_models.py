"""Model throughput on the GPU: batch 128, 224^2, fp32 and bf16 (LK.md §3.3 protocol, CUDA events).

Inference: ``lkvision.create_model(name)`` -> ``lkvision.reparameterize`` (deploy form) -> eval, ``no_grad``,
weights and input in the dtype, ``--warmup`` forwards then the median of ``--runs`` timed forwards;
images/s = batch / median. ``rel_err``: the deploy model's output (in the dtype, on the device) against the
train-form model in float64 on the same two images. Training: train mode, AdamW step, cross-entropy on random
labels, bf16 through autocast (fp32 master weights); images/s of whole steps (``rel_err`` is nan). fp32 means
fp32: TF32 is off in cuDNN and matmuls. Every model is built with the same seed (same weights in every record).

Backends: ``triton`` is the library's default dispatch. On CUDA that is :mod:`lkvision.ops.autoselect`: the
first call of each depth-wise / Shiftwise problem times the Triton kernels against cuDNN (channels_last) and
ATen (NCHW) and keeps the fastest (the warm-up calls include that; ``first_ms`` shows it). ``torch``: the same
with the kernels hidden (``LKVISION_FORBID_BACKENDS=triton`` inside the record), so that the gain of
the kernels is measured inside the models. The autoselect cache is cleared before each record; ``autoselect``
in a record counts its winners per operator (and lists candidates that raised, with the reason: autoselect
drops those, with one warning per reason), ``kernels`` whether they could be dispatched at all (``available``,
``hidden``, ``unavailable``).

Targets (issue): sw_tiny deploy >= 1.0x unireplknet_t (fp32 and bf16), training >= 0.8x.

Usage: ``python benchmarks/gpu_models.py [--models sw_tiny unireplknet_t] [--dtypes fp32 bf16]``;
``--smoke``: CPU, sw_femto and unireplknet_test (the baseline) at 64^2, batch 2, both backends, one timed call.
On CPU the dispatchers never pick the Triton kernels; ``--cpu-kernels`` with ``TRITON_INTERPRET=1`` makes them
(as on CUDA), so that the kernels run inside the models in triton's interpreter (minutes, even at ``--res 32``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu_common import (  # noqa: E402
    DTYPES,
    Deadline,
    add_common_args,
    append_json,
    empty_cache,
    error_text,
    finish_run,
    fmt,
    parse_with_defaults,
    rel_err,
    start_run,
    time_fn,
)

RESULT_NAME = "gpu_models.json"
# the key comparison (sw_tiny vs the baseline) first, so that a time limit cuts the others
MODELS = ["sw_tiny", "unireplknet_t", "sw_small", "unireplknet_s", "replknet_31b", "slak_t", "convnext_t"]
BASELINE = "unireplknet_t"
SMOKE_MODELS = ["sw_femto", "unireplknet_test"]
# (full run, --smoke) defaults
DEFAULTS = {"models": (MODELS, SMOKE_MODELS), "baseline": (BASELINE, "unireplknet_test"),
            "dtypes": (["fp32", "bf16"], ["fp32", "bf16"]), "batch": (128, 2), "res": (224, 64), "warmup": (20, 0),
            "runs": (30, 1), "train_warmup": (4, 0), "train_runs": (10, 1), "budget_s": (10.0, 1.0),
            "backends": (["triton"], ["triton", "torch"])}
MEASURED = ("img_s", "median_ms", "min_ms", "max_ms", "runs", "first_ms", "rel_err")


@contextlib.contextmanager
def kernels_hidden(hide: bool):
    """Keep lkvision's dispatchers off the Triton kernels inside the block (PyTorch paths only), through the
    documented switch ``LKVISION_FORBID_BACKENDS=triton``."""
    if not hide:
        yield
        return
    import os

    from lkvision.ops import autoselect

    old = os.environ.get(autoselect.ENV_FORBID)
    os.environ[autoselect.ENV_FORBID] = "triton"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(autoselect.ENV_FORBID, None)
        else:
            os.environ[autoselect.ENV_FORBID] = old


@contextlib.contextmanager
def kernels_dispatched_on_cpu(enable: bool):
    """Smoke runs on CPU under ``TRITON_INTERPRET=1``: let the dispatchers of ``lkvision.ops`` take their CUDA
    route on CPU, so that the model-level kernel path (dispatch, autoselect, kernels) is exercised there.

    Adds "cpu" to ``autoselect.MEASURED_DEVICE_TYPES`` (the operators measure on CPU as on CUDA; the kernels'
    own can_run checks accept CPU tensors under the interpreter) and replaces autoselect's timer: the first
    candidate, i.e. "triton" when offered, wins (timing the interpreter would pick PyTorch); every candidate
    still runs once, so a failing kernel is dropped with its warning as on a GPU."""
    if not enable:
        yield
        return
    au = importlib.import_module("lkvision.ops.autoselect")
    saved = (au.MEASURED_DEVICE_TYPES, au._timer)
    order = itertools.count()

    def first_candidate_wins(fn, cuda=False):
        fn()
        return float(next(order))  # candidates are timed in order: the first one gets the smallest time

    au.MEASURED_DEVICE_TYPES = frozenset({*au.MEASURED_DEVICE_TYPES, "cpu"})
    au._timer = first_candidate_wins
    try:
        yield
    finally:
        au.MEASURED_DEVICE_TYPES, au._timer = saved


def autoselect_reset() -> None:
    """Forget lkvision's measured dispatch choices (each record measures its own, as a first use does)."""
    with contextlib.suppress(Exception):
        importlib.import_module("lkvision.ops.autoselect").clear_cache()


def autoselect_summary() -> dict:
    """``{op: {winner: count}}`` of lkvision's measured dispatch, plus ``failed``: ``op:candidate: reason`` for
    the candidates dropped because they raised (while timed or at run time; autoselect also warns once per
    reason): a ``triton`` record whose kernels failed shows here."""
    try:
        au = importlib.import_module("lkvision.ops.autoselect")
        table, failures = au.cache_table(), au.failures()
    except Exception:
        return {}
    out: dict = {}
    for (op, _key), entry in table.items():
        out.setdefault(op, {}).setdefault(entry["winner"], 0)
        out[op][entry["winner"]] += 1
    failed = {f"{op}:{name}: {reason}" for (op, _key), names in failures.items() for name, reason in names.items()}
    if failed:
        out["failed"] = sorted(failed)
    return out


def _kernels_state(device: str, backend: str, cpu_kernels: bool) -> str:
    """Whether the dispatchers may pick the Triton kernels in this record (``autoselect`` says what they did)."""
    if backend == "torch":
        return "hidden"
    try:
        from lkvision.ops.kernels import is_available

        ok = is_available(torch.empty(1, 1, 1, 1, device=device))
    except Exception:
        ok = False
    if device == "cpu":
        return "available (interpreter)" if ok and cpu_kernels else "not dispatched on cpu"
    return "available" if ok else "unavailable"


def _create(name: str):
    import lkvision

    torch.manual_seed(0)  # the same weights for every row of a model (the fp64 reference is cached)
    return lkvision.create_model(name)


def _input(args) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(args.batch, 3, args.res, args.res, generator=gen)


def reference_output(name: str, args) -> torch.Tensor:
    """Train-form model in eval mode, float64, on the first two images (the deploy rows' reference)."""
    model = _create(name).eval().to(device=args.device, dtype=torch.float64)
    x = _input(args)[:2].to(device=args.device, dtype=torch.float64)
    with torch.no_grad(), kernels_hidden(True):
        out = model(x)
    del model
    return out


def inference(name: str, dtype: str, args, ref: torch.Tensor) -> dict:
    import lkvision

    dt = DTYPES[dtype]
    model = lkvision.reparameterize(_create(name).eval())
    model = model.to(device=args.device, dtype=dt)
    x = _input(args).to(device=args.device, dtype=dt)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        err = rel_err(model(x[:2]), ref)

    def fn():
        with torch.no_grad():
            return model(x)

    t = time_fn(fn, args.device, warmup=args.warmup, runs=args.runs, budget_s=args.budget_s)
    return {"img_s": args.batch / (t["median_ms"] * 1e-3), **t, "rel_err": err}


def training(name: str, dtype: str, args) -> dict:
    model = _create(name).to(args.device).train()
    x = _input(args).to(args.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, getattr(model, "num_classes", 1000), (args.batch,), device=args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    amp = dtype != "fp32"

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(args.device, dtype=DTYPES[dtype], enabled=amp):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()

    t = time_fn(step, args.device, warmup=args.train_warmup, runs=args.train_runs, budget_s=args.budget_s)
    return {"img_s": args.batch / (t["median_ms"] * 1e-3), **t}


def print_table(rows: list[dict], baseline: str) -> None:
    base = {(r["mode"], r["dtype"], r["backend"]): r["img_s"] for r in rows if r["model"] == baseline}
    print(f"\n{'mode':6}{'dtype':6}{'backend':>8}{'model':>18}{'img/s':>10}{'vs ' + baseline:>20}{'rel_err':>10}")
    for r in rows:
        ratio = r["img_s"] / base.get((r["mode"], r["dtype"], r["backend"]), math.nan)
        note = r["error"] or r["skipped"]
        note = f"  ({note[:60]})" if note else ""
        print(f"{r['mode']:6}{r['dtype']:6}{r['backend']:>8}{r['model']:>18}" + fmt(r["img_s"], ">10.1f")
              + fmt(ratio, ">20.2f") + fmt(r["rel_err"], ">10.1e") + note)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", help=f"default {' '.join(MODELS)} (smoke: {' '.join(SMOKE_MODELS)})")
    ap.add_argument("--baseline", help=f"model the ratios refer to (default {BASELINE}; smoke: unireplknet_test)")
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="default fp32 bf16")
    ap.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    ap.add_argument("--backends", nargs="+", choices=["triton", "torch"], help="default triton (smoke: both)")
    ap.add_argument("--batch", type=int, help="default 128 (smoke: 2)")
    ap.add_argument("--res", type=int, help="default 224 (smoke: 64)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--warmup", type=int, help="inference warm-up forwards (default 20; smoke: 0)")
    ap.add_argument("--runs", type=int, help="timed inference forwards (default 30; smoke: 1)")
    ap.add_argument("--train-warmup", type=int, help="training warm-up steps (default 4; smoke: 0)")
    ap.add_argument("--train-runs", type=int, help="timed training steps (default 10; smoke: 1)")
    ap.add_argument("--budget-s", type=float, help="time budget per measurement, fewer runs when slow (default 10)")
    ap.add_argument("--cpu-kernels", action="store_true",
                    help="on CPU under TRITON_INTERPRET=1: route the models' dispatchers to the Triton kernels as on "
                         "CUDA (slow: minutes even for the smoke models at --res 32)")
    add_common_args(ap, RESULT_NAME)
    return parse_with_defaults(ap, argv, DEFAULTS)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = start_run(args, "gpu_models", RESULT_NAME)
    if env is None:
        return 1
    import lkvision

    print(json.dumps(env))
    print(f"gpu_models: writing {args.out}")
    deadline = Deadline(args.time_limit_s)
    known = set(lkvision.list_models())
    cpu_kernels = args.cpu_kernels and args.device == "cpu"
    if cpu_kernels and _kernels_state("cpu", "triton", True) != "available (interpreter)":
        print("gpu_models: --cpu-kernels needs triton and TRITON_INTERPRET=1")
        return 1
    refs: dict[str, torch.Tensor] = {}
    rows = []
    for mode in args.modes:
        for dtype in args.dtypes:
            for name in args.models:
                for backend in args.backends:
                    if deadline.expired():
                        deadline.skip(f"{name} {mode} {dtype} {backend}")
                        continue
                    row = {"model": name, "mode": mode, "dtype": dtype, "backend": backend, "batch": args.batch,
                           "res": args.res, "channels_last": args.channels_last,
                           "kernels": _kernels_state(args.device, backend, cpu_kernels),
                           **dict.fromkeys(MEASURED, math.nan), "autoselect": {}, "error": None, "skipped": None}
                    if name not in known:
                        row["skipped"] = "not registered"
                    else:
                        try:
                            if mode == "infer" and name not in refs:
                                refs[name] = reference_output(name, args)
                            autoselect_reset()
                            with kernels_dispatched_on_cpu(cpu_kernels), kernels_hidden(backend == "torch"):
                                if mode == "infer":
                                    row.update(inference(name, dtype, args, refs[name]))
                                else:
                                    row.update(training(name, dtype, args))
                        except Exception as exc:
                            row["error"] = error_text(exc)
                        row["autoselect"] = autoselect_summary()
                    empty_cache(args.device)
                    rows.append(row)
                    append_json(args.out, {**row, "env": env})
                    print(json.dumps(row), flush=True)
    print_table(rows, args.baseline)
    return finish_run("gpu_models", rows, deadline, args.out)


if __name__ == "__main__":
    sys.exit(main())
