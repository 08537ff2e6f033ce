"""``lkvision <command> [args]``: a thin dispatcher; each command lives in its own module."""

from __future__ import annotations

import importlib
import sys

# command -> (module, function, one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("lkvision.demo", "main", "build a model, re-parameterize it, check parity, print params/FLOPs/timing"),
    "train": ("lkvision.train.cli", "train_main", "train a model from a YAML recipe (default: bundled data)"),
    "eval": ("lkvision.train.cli", "eval_main", "top-1/top-5 and throughput of a checkpoint"),
    "erf": ("lkvision.analysis.cli", "erf_main", "effective receptive field maps and area ratios"),
    "kernels": ("lkvision.analysis.cli", "kernels_main", "aggregated |kernel| maps before/after re-param"),
    "sparsity": ("lkvision.analysis.cli", "sparsity_main", "per-layer sparsity statistics of a checkpoint"),
    "coverage": ("lkvision.analysis.cli", "coverage_main", "shift-add path coverage vs number of edges"),
    "flops": ("lkvision.analysis.cli", "flops_main", "params / FLOPs / MACs table, train vs deploy form"),
    "bench": ("lkvision.bench.cli", "main", "model / training-step / depth-wise conv throughput"),
    "convert": ("lkvision.compat.cli", "main", "convert an official checkpoint to lkvision safetensors"),
    "export": ("lkvision.export.cli", "main", "export a deploy-form model to ONNX or torch.export"),
    "downstream": ("lkvision.integrations.cli", "main", "UperNet / Mask R-CNN on the bundled dense digits (mm)"),
}


def _usage() -> str:
    lines = ["usage: lkvision <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {h}" for name, (_, _, h) in COMMANDS.items()]
    lines += ["", "`lkvision <command> --help` documents each command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(__version__)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"lkvision: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    mod, fn, _ = COMMANDS[cmd]
    ret = getattr(importlib.import_module(mod), fn)(rest)
    return int(ret or 0)


if __name__ == "__main__":
    sys.exit(main())
