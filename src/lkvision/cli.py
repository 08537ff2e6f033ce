"""``lkvision <command> [args]``: a thin dispatcher; each command lives in its own module.

**User errors, one mechanism for every command.** A mistake by the person at the keyboard (a path that does
not exist, a bad value, a checkpoint of another model, a misspelled key) is reported as one line,
``lkvision <command>: error: <message>``, with exit status 2 -- never a traceback. Commands do not print or
catch these themselves; they raise, and :func:`run_command` (applied by the dispatcher to every command, and
by the :func:`command` decorator to each sub-command's ``main`` so that calling it directly behaves the same)
turns the exception into that line. What counts as a user error (:func:`user_error_types`):

* :class:`UsageError` -- raise it for a bad argument / input the command detects itself (it is a
  ``ValueError``, so library code may equally raise ``ValueError``);
* ``ValueError`` (``ConfigError``, JSON errors, unknown model names, ...), ``OSError`` (file not found,
  permission denied, not a folder, disk full), ``ImportError`` (an optional package that is not installed)
  and ``lkvision.models.CheckpointError``.

Anything else is a bug and keeps its traceback. ``Ctrl-C`` prints ``lkvision <command>: interrupted`` and
exits with 130 (``lkvision train`` first writes a checkpoint, see ``docs/training.md``).
``LKVISION_TRACEBACK=1`` re-raises user errors too, for debugging.

Adding a command: put ``"name": (module, function, help)`` in :data:`COMMANDS`; give the function the
signature ``main(argv: list[str] | None) -> int`` and decorate it with ``@command("lkvision name")``.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Callable

__all__ = ["COMMANDS", "UsageError", "command", "main", "run_command", "user_error_types"]

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
    "shape-bias": ("lkvision.analysis.shape_bias_cli", "main", "shape vs texture decisions on cue-conflict images"),
    "bench": ("lkvision.bench.cli", "main", "model / training-step / depth-wise conv throughput"),
    "convert": ("lkvision.compat.cli", "main", "convert an official checkpoint to lkvision safetensors"),
    "export": ("lkvision.export.cli", "main", "export a deploy-form model to ONNX or torch.export"),
    "downstream": ("lkvision.integrations.cli", "main", "UperNet / Mask R-CNN on the bundled dense digits (mm)"),
}

#: exit status of a command stopped by a user error (argparse uses the same for bad options)
EXIT_USAGE = 2
#: exit status after Ctrl-C (128 + SIGINT)
EXIT_INTERRUPTED = 130


class UsageError(ValueError):
    """A bad argument or input that a command detects itself. The message is one line that names the problem
    and, where there is one, the fix (``"--images /x: folder not found"``)."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exception types reported as one line + exit status 2 (see the module docstring)."""
    from .models import CheckpointError  # the models room is light to import; only needed once an error occurs

    return (ValueError, OSError, ImportError, CheckpointError)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def run_command(prog: str, fn: Callable[[list[str] | None], int | None], argv: list[str] | None) -> int:
    """Run ``fn(argv)``; a user error becomes ``"<prog>: error: <message>"`` on stderr and 2, Ctrl-C becomes
    ``"<prog>: interrupted"`` and 130. Other exceptions propagate with their traceback."""
    try:
        return int(fn(argv) or 0)
    except KeyboardInterrupt:
        if os.environ.get("LKVISION_TRACEBACK"):
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        if os.environ.get("LKVISION_TRACEBACK") or not isinstance(e, user_error_types()):
            raise
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE


def command(prog: str) -> Callable:
    """Decorator for a sub-command's ``main(argv) -> int``: user errors and Ctrl-C handled by :func:`run_command`
    whether the command runs through ``lkvision <name>`` or its function is called directly."""

    def deco(fn: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
        @functools.wraps(fn)
        def wrapper(argv: list[str] | None = None) -> int:
            return run_command(prog, fn, list(sys.argv[1:] if argv is None else argv))

        return wrapper

    return deco


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
        import difflib

        close = difflib.get_close_matches(cmd, list(COMMANDS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"lkvision: unknown command {cmd!r}{hint}\n\n{_usage()}", file=sys.stderr)
        return EXIT_USAGE
    mod, fn, _ = COMMANDS[cmd]

    def call(args: list[str] | None) -> int | None:
        return getattr(importlib.import_module(mod), fn)(args)

    return run_command(f"lkvision {cmd}", call, rest)


if __name__ == "__main__":
    sys.exit(main())
