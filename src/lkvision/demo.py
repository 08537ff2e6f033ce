"""``lkvision demo``: build a model, re-parameterize it, check train/deploy parity, print size, MACs, speed.

Example::

    lkvision demo --model sw_tiny --img-size 224 --batch 2

Steps: build the model (random init), give every BatchNorm random running statistics and affine parameters
and every layer scale / GRN non-trivial values (otherwise folding them would be trivially exact), compare
the eval-mode outputs of the train form and the deploy form (:func:`lkvision.reparameterize`), then report
parameters (train form, rep branches merged, fully folded), MACs (:func:`lkvision.utils.count_macs`, batch 1)
and eval throughput of both forms. Exit status 1 if the relative parity error exceeds ``--tol``.

``--dtype bf16`` (weights and inputs cast to bf16) or ``--dtype autocast`` (fp32 weights under
``torch.autocast("cpu", torch.bfloat16)``) times both forms in that precision and also checks the deploy form's
bf16 logits against its fp32 logits (``max|y_bf16 - y_fp32| / max|y_fp32| <= --bf16-tol``, default
:data:`lkvision.bench.precision.BF16_TOLERANCE`); the train/deploy parity check always runs in fp32.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn

from .cli import command

__all__ = ["main", "randomize_statistics"]


@torch.no_grad()
def randomize_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """BN running stats/affine ~ the golden-file distributions; layer-scale/GRN gamma ~ U(0.5, 1.5),
    GRN beta ~ N(0, 0.1^2). Uses its own generator (the global RNG is untouched)."""
    g = torch.Generator().manual_seed(seed)

    def draw(t: torch.Tensor, kind: str) -> None:
        r = torch.rand(t.shape, generator=g) + 0.5 if kind == "u" else torch.randn(t.shape, generator=g) * 0.1
        t.copy_(r.to(t.dtype))

    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            draw(m.running_mean, "n")
            draw(m.running_var, "u")
            if m.weight is not None:
                draw(m.weight, "u")
                draw(m.bias, "n")
        for name, kind in (("gamma", "u"), ("beta", "n")):
            p = getattr(m, name, None)
            if isinstance(p, nn.Parameter) and p.is_floating_point():
                draw(p, kind)
    return model


def _throughput(model: nn.Module, x: torch.Tensor, min_time: float, autocast: bool = False) -> float:
    """Images per second of eval-mode inference: at least one pass and ``min_time`` seconds (the model is
    assumed warm: the parity check already ran it on the same input)."""
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        n, t0 = 0, time.perf_counter()
        while n < 1 or time.perf_counter() - t0 < min_time:
            model(x)
            n += 1
        dt = time.perf_counter() - t0
    return n * x.shape[0] / dt


def _merged_params(model: nn.Module) -> int:
    """Parameters after merging every layer's rep branches (``merge_branches()``) without building it."""
    from lkvision.utils import count_params

    n = count_params(model)
    for m in model.modules():
        branches = getattr(m, "branches", None)
        if callable(getattr(m, "merge_branches", None)) and isinstance(branches, nn.ModuleList):
            n -= sum(p.numel() for b in branches[1:] for p in b.parameters())
    return n


@command("lkvision demo")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lkvision demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sw_tiny", help="registered model name (default: sw_tiny)")
    p.add_argument("--img-size", "--resolution", dest="img_size", type=int, default=224)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=1e-4, help="max |y_train - y_deploy| / max |y_train| (1e-4)")
    p.add_argument("--bench-time", type=float, default=1.0, help="seconds per throughput measurement")
    p.add_argument("--no-flops", action="store_true", help="skip the MAC count")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--model-kwargs", default=None, help="extra model constructor kwargs as JSON")
    p.add_argument("--dtype", choices=("fp32", "bf16", "autocast"), default="fp32",
                   help="precision of the timed passes: fp32, bf16 (model and input cast) or autocast (bf16)")
    p.add_argument("--bf16-tol", type=float, default=None,
                   help="max|y_bf16 - y_fp32| / max|y_fp32| of the deploy form (default: BF16_TOLERANCE, 5e-2)")
    args = p.parse_args(argv)
    if args.img_size < 32 or args.batch < 1:
        p.error("--img-size must be >= 32 and --batch >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    import lkvision
    from lkvision.analysis.cli import build_model, parse_model_kwargs
    from lkvision.utils import count_macs, count_params

    extra = parse_model_kwargs(args.model_kwargs)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model = build_model(args.model, None, extra)
    randomize_statistics(model, args.seed).eval()
    x = torch.randn(args.batch, model.in_chans, args.img_size, args.img_size,
                    generator=torch.Generator().manual_seed(args.seed + 1))
    deploy = lkvision.reparameterize(model)
    t_build = time.perf_counter() - t0

    with torch.no_grad():
        y = model(x)
        y_deploy = deploy(x)
    diff = float((y - y_deploy).abs().max())
    scale = float(y.abs().max())
    rel = diff / max(scale, 1e-12)

    print(f"model: {args.model}   input: {tuple(x.shape)}   threads: {torch.get_num_threads()}   "
          f"(build + re-parameterize {t_build:.1f} s)")
    print(f"parity (eval, randomized BN statistics): max|y_train - y_deploy| = {diff:.3e}  "
          f"(max|y| = {scale:.3f}, relative {rel:.2e}, tolerance {args.tol:.0e})")
    size = (1, model.in_chans, args.img_size, args.img_size)
    macs = {"train": float("nan"), "deploy": float("nan")}
    if not args.no_flops:
        macs = {"train": count_macs(model, size) / 1e9, "deploy": count_macs(deploy, size) / 1e9}
    bf16_failed = False
    if args.dtype != "fp32":
        from lkvision.bench.precision import BF16_TOLERANCE, relative_error
        from lkvision.bench.roofline import bf16_speed_note

        if note := bf16_speed_note("cpu"):
            print(note, file=sys.stderr)
        tol = BF16_TOLERANCE if args.bf16_tol is None else args.bf16_tol
        if args.dtype == "bf16":
            model, deploy, x = model.to(torch.bfloat16), deploy.to(torch.bfloat16), x.to(torch.bfloat16)
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=args.dtype == "autocast"):
            err = relative_error(deploy(x), y_deploy)
        bf16_failed = not err <= tol
        print(f"{args.dtype} vs fp32 (deploy form): max|y_bf16 - y_fp32| / max|y_fp32| = {err:.2e} "
              f"(tolerance {tol:.0e})")
    amp = args.dtype == "autocast"
    speed = {"train": _throughput(model, x, args.bench_time, amp),
             "deploy": _throughput(deploy, x, args.bench_time, amp)}
    rows = [("train", count_params(model), macs["train"], speed["train"]),
            # branches are summed before the op, so the merged form runs the same ops as the train form
            ("rep branches merged", _merged_params(model), macs["train"], None),
            ("deploy (fully folded)", count_params(deploy), macs["deploy"], speed["deploy"])]
    print(f"{'form':<26}{'params (M)':>12}{'GMACs':>10}{'img/s ' + args.dtype:>16}")
    for label, n, g, sp in rows:
        sps = f"{sp:16.2f}" if sp is not None else f"{'-':>16}"
        print(f"{label:<26}{n / 1e6:12.2f}{g:10.2f}{sps}")
    if not rel <= args.tol:
        print(f"FAIL: train/deploy mismatch {rel:.2e} > {args.tol:.0e}", file=sys.stderr)
        return 1
    if bf16_failed:
        print(f"FAIL: {args.dtype} deploy output differs from fp32 by more than the bf16 tolerance", file=sys.stderr)
        return 1
    print("OK: the deploy form computes the same function")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
