"""Stopping a run on request: Ctrl-C (SIGINT) or SIGTERM finish the current step, save, and exit.

While the training loop runs, :class:`GracefulStop` replaces the SIGINT and SIGTERM handlers. The first signal
only records a request (and says so on stderr); the loop asks :meth:`GracefulStop.agreed` after every optimizer
step, writes a checkpoint and raises :class:`TrainingInterrupted`, which ``lkvision train`` turns into one line
with the resume command and exit status 128 + signal (130 for SIGINT, 143 for SIGTERM).

* **DDP.** Ranks can receive the signal at different steps (or only some ranks receive it), so
  :meth:`~GracefulStop.agreed` takes the maximum of the requests over all ranks (one 1-element all-reduce per
  step): every rank stops after the same step and takes part in the same checkpoint.
* **A second signal aborts at once** (:class:`TrainingAborted`, nothing more is saved; the atomic writers
  leave no partial file). Under ``torchrun`` it does not: the launcher forwards the terminal's Ctrl-C to
  every worker a moment after the terminal delivered it, and it enforces its own deadline
  (``--shutdown_timeout``, 30 s by default, then SIGKILL).
* DataLoader worker processes ignore both signals (:func:`ignore_stop_signals` is their ``worker_init_fn``):
  a terminal Ctrl-C reaches the whole process group, and a worker that died from it would take the data
  pipeline down before the checkpoint is written.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType

import torch

__all__ = ["GracefulStop", "TrainingInterrupted", "TrainingAborted", "ignore_stop_signals", "STOP_SIGNALS"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """The run stopped at a step boundary on a signal, after writing ``checkpoint``. ``exit_code`` = 128 + signum."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        self.signum, self.step, self.checkpoint = int(signum), int(step), checkpoint
        self.exit_code = 128 + self.signum
        super().__init__(f"stopped by {signal.Signals(self.signum).name} after step {step}; checkpoint {checkpoint}")


class TrainingAborted(KeyboardInterrupt):
    """A second signal: the run was abandoned at once, without a new checkpoint."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        self.exit_code = 128 + self.signum
        super().__init__(f"aborted by a second {signal.Signals(self.signum).name}")


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """``worker_init_fn`` of the DataLoaders: the main process decides when to stop (and ends the workers)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


class GracefulStop:
    """SIGINT / SIGTERM request a stop at the next step boundary (see the module docstring).

    A context manager whose handlers are installed by :meth:`arm` and restored by :meth:`disarm` (or on leaving
    the context), so that only the training loop is covered: a Ctrl-C while the data is being set up, or during
    the final deploy check, interrupts as usual. Handlers are installed only in the main thread (Python allows
    no other); elsewhere :meth:`agreed` reports what other ranks request. ``announce``: print the one-line
    notice (rank 0).
    """

    def __init__(self, announce: bool = True, abort_on_repeat: bool | None = None) -> None:
        self.announce = announce
        self.abort_on_repeat = (not _under_torchrun()) if abort_on_repeat is None else abort_on_repeat
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def arm(self) -> None:
        if not self._previous and threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def disarm(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> GracefulStop:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is TrainingInterrupted and not self.abort_on_repeat:
            # a torchrun worker on its way out: the launcher may signal it again (it does so as soon as another
            # rank has exited); ignore repeats so that it still reports and exits with 128 + signal. SIG_IGN, not
            # this handler: Python resets its own handlers to the default at interpreter shutdown, where a late
            # SIGTERM then killed the rank (exit -15 instead of 143); an ignored signal stays ignored
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)
            self._previous.clear()
            return
        self.disarm()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            if self.announce:
                again = "; press Ctrl-C again to abort without saving" if self.abort_on_repeat else ""
                # os.write, not print: a handler may interrupt a print to the same stream
                os.write(2, f"\nlkvision train: {signal.Signals(signum).name} received, stopping after the current "
                            f"step and writing a checkpoint{again}\n".encode())
        elif self.abort_on_repeat:
            raise TrainingAborted(signum)

    def agreed(self, info=None) -> int:
        """The signal number every rank agrees to stop on (the largest requested on any rank), 0 to go on.
        A collective under DDP: every rank must call it at the same point."""
        local = int(self.signum or 0)
        if info is None or not info.enabled:
            return local
        import torch.distributed as dist

        flag = torch.tensor([local], dtype=torch.int64, device=info.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())
