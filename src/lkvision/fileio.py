"""Atomic file writes: the one helper every file lkvision writes goes through.

A reader (or a run resumed after a crash or a power cut) sees either the old file or the complete new one,
never a half-written file: the content goes to a temporary file in the *same folder* (so the final rename
stays on one file system), which is flushed and ``fsync``-ed, renamed over the target with ``os.replace``
(atomic on POSIX and Windows), and the folder itself is ``fsync``-ed so that the rename survives a crash.
On any failure, Ctrl-C included, the temporary file is removed and the target is left untouched.

A batch of many small files can defer the two ``fsync`` calls per file: write each with ``fsync=False``
(still atomic against a killed process) and call :func:`make_durable` on the batch once, before whatever
declares the batch complete is written.

This module imports nothing from lkvision, so every room (``ops`` included) may use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "make_durable"]


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync_path(path)
    except OSError:  # folders cannot be opened/fsync-ed on some platforms (Windows); the rename still holds
        pass


def _new_temp(path: Path) -> Path:
    """Create an empty, uniquely named file beside ``path`` with the umask's permissions (not mkstemp's 0600)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp{path.suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"could not create a temporary file beside {path}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit it atomically becomes ``path``.

    The temporary name keeps the target's suffix (``.png``, ``.safetensors``, ...), so writers that pick a
    format from the extension (matplotlib, onnx) behave as they would on ``path``. Parent folders are created.
    ``fsync=False`` skips the ``fsync`` of the file and of its folder: the replacement is still atomic for
    readers and against a killed process, but survives a power cut only after :func:`make_durable`.

    Example::

        with atomic_path("run/weights.safetensors") as tmp:
            safetensors.torch.save_file(sd, str(tmp))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp(path)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"the writer for {path} did not create its temporary file {tmp}")
        if fsync:
            _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if fsync:
        _fsync_dir(path.parent)


def make_durable(paths: Iterable[str | os.PathLike]) -> None:
    """Make earlier writes, renames and removals of ``paths`` survive a crash or a power cut: ``fsync`` each
    path that exists (its content), then each distinct parent folder once (its entries). One pass for a batch
    written with ``atomic_path(..., fsync=False)``."""
    folders: dict[Path, None] = {}
    for path in map(Path, paths):
        if path.exists():
            _fsync_path(path)
        folders.setdefault(path.parent, None)
    for folder in folders:
        _fsync_dir(folder)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (``fsync``: see :func:`atomic_path`); returns ``Path(path)``."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; returns ``Path(path)``."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (with a trailing newline) to ``path`` atomically; returns ``Path(path)``."""
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")
