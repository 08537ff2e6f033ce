"""The one atomic-write helper: complete file or old file, never a half-written one."""

import json
import os

import pytest

from lkvision import fileio
from lkvision.fileio import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text, make_durable


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


def test_writes_and_replaces(tmp_path):
    target = tmp_path / "sub" / "metrics.json"
    atomic_write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert _leftovers(target.parent) == []


def test_failure_keeps_old_file_and_removes_temp(tmp_path):
    target = tmp_path / "weights.safetensors"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_keyboard_interrupt_also_cleans_up(tmp_path):
    target = tmp_path / "state.pt"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"x")
            raise KeyboardInterrupt
    assert not target.exists()
    assert _leftovers(tmp_path) == []


def test_temp_keeps_suffix_and_sits_beside_target(tmp_path):
    target = tmp_path / "curves.png"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".png" and tmp.name.startswith(".curves.")
        tmp.write_bytes(b"png")
    assert target.read_bytes() == b"png"


def test_writer_that_writes_nothing_is_an_error(tmp_path):
    target = tmp_path / "x.json"
    with pytest.raises(FileNotFoundError, match="did not create"):
        with atomic_path(target) as tmp:
            tmp.unlink()
    assert not target.exists()


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_permissions_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        target = atomic_write_text(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert (target.stat().st_mode & 0o777) == 0o644


def test_deferred_fsync_and_make_durable(tmp_path, monkeypatch):
    synced = []
    real = fileio._fsync_path
    monkeypatch.setattr(fileio, "_fsync_path", lambda p: (synced.append(p), real(p)))
    a, b, c = tmp_path / "x" / "a.png", tmp_path / "x" / "b.png", tmp_path / "y" / "c.png"
    for path in (a, b, c):
        atomic_write_bytes(path, b"old")
        atomic_write_bytes(path, path.name.encode(), fsync=False)  # still an atomic replacement
        assert path.read_bytes() == path.name.encode() and _leftovers(path.parent) == []
    assert len(synced) == 3 * 2  # only the three default writes: file + folder each
    synced.clear()
    gone = tmp_path / "x" / "removed.json"
    make_durable([a, b, c, gone])  # a removed file: only its folder
    assert synced == [a, b, c, a.parent, c.parent]
