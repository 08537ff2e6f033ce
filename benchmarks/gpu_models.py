"""Model throughput on the GPU: batch 128, 224^2, fp32 and bf16 (LK.md §3.3 protocol, CUDA events).

Inference: ``lkvision.create_model(name)`` -> ``lkvision.reparameterize`` (deploy form) -> eval, ``no_grad``,
weights and input in the dtype, ``--warmup`` forwards then the median of ``--runs`` timed forwards;
images/s = batch / median. Training: train mode, AdamW step, cross-entropy on random labels, bf16 through
autocast (fp32 master weights); images/s of whole steps.

``--backends triton torch`` runs every model twice: with the Triton kernels (the dispatcher's default on
CUDA) and with them hidden (``lkvision.ops.kernels.is_available`` patched to return False), so the gain of
the kernels is measured inside the models.

Targets (issue): sw_tiny deploy >= 1.0x unireplknet_t (fp32 and bf16), training >= 0.8x.

Usage: ``python benchmarks/gpu_models.py [--models sw_tiny unireplknet_t] [--dtypes fp32 bf16]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_dwconv_table1 import DTYPES, RESULTS, append_json, cuda_time, environment  # noqa: E402

MODELS = ["sw_tiny", "sw_small", "unireplknet_t", "unireplknet_s", "replknet_31b", "slak_t", "convnext_t"]
BASELINE = "unireplknet_t"


@contextlib.contextmanager
def kernels_hidden(hide: bool):
    """Make ``lkvision.ops.kernels.is_available`` return False inside the block (PyTorch paths only)."""
    if not hide:
        yield
        return
    import lkvision.ops.kernels as k

    orig = k.is_available
    k.is_available = lambda x: False
    try:
        yield
    finally:
        k.is_available = orig


def inference(name: str, dtype: str, args) -> dict:
    import lkvision

    dt = DTYPES[dtype]
    model = lkvision.create_model(name).eval()
    model = lkvision.reparameterize(model)
    model = model.to(device="cuda", dtype=dt)
    x = torch.randn(args.batch, 3, args.res, args.res, device="cuda").to(dt)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def fn():
        with torch.no_grad():
            return model(x)

    t = cuda_time(fn, warmup=args.warmup, runs=args.runs)
    return {"img_s": args.batch / (t["median_ms"] * 1e-3), **t}


def training(name: str, dtype: str, args) -> dict:
    import lkvision

    model = lkvision.create_model(name).cuda().train()
    x = torch.randn(args.batch, 3, args.res, args.res, device="cuda")
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch,), device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    amp = dtype != "fp32"

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=DTYPES[dtype], enabled=amp):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()

    t = cuda_time(step, warmup=max(3, args.warmup // 5), runs=max(5, args.runs // 3))
    return {"img_s": args.batch / (t["median_ms"] * 1e-3), **t}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    ap.add_argument("--backends", nargs="+", default=["triton"], choices=["triton", "torch"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--out", type=Path, default=RESULTS / "gpu_models.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_models: no CUDA device; nothing to do")
        return 0
    import lkvision

    torch.backends.cudnn.benchmark = True
    env = environment()
    print(json.dumps(env))
    known = set(lkvision.list_models())
    rows = []
    for mode in args.modes:
        for dtype in args.dtypes:
            for backend in args.backends:
                for name in args.models:
                    row = {"model": name, "mode": mode, "dtype": dtype, "backend": backend, "batch": args.batch,
                           "res": args.res, "channels_last": args.channels_last}
                    if name not in known:
                        row.update(img_s=math.nan, error="not registered")
                    else:
                        try:
                            with kernels_hidden(backend == "torch"):
                                row.update((inference if mode == "infer" else training)(name, dtype, args))
                        except Exception as exc:
                            row.update(img_s=math.nan, error=f"{type(exc).__name__}: {exc}"[:500])
                    torch.cuda.empty_cache()
                    rows.append(row)
                    append_json(args.out, {**row, "env": env})
                    print(json.dumps(row), flush=True)
    base = {(r["mode"], r["dtype"], r["backend"]): r["img_s"] for r in rows if r["model"] == BASELINE}
    print(f"\n{'mode':6}{'dtype':6}{'backend':>8}{'model':>16}{'img/s':>10}{'vs ' + BASELINE:>18}")
    for r in rows:
        ratio = r["img_s"] / base.get((r["mode"], r["dtype"], r["backend"]), math.nan)
        note = f"  ({r['error'][:50]})" if "error" in r else ""
        print(f"{r['mode']:6}{r['dtype']:6}{r['backend']:>8}{r['model']:>16}{r['img_s']:>10.1f}{ratio:>18.2f}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
