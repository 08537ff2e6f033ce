"""The README's Python snippets run as written (in an empty folder).

A line marked ``# needs your file`` reads a file the user brings (an official checkpoint); the test makes a
stand-in with the same layout under the same name first. A new marked file needs a maker in ``USER_FILES``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
MARK = "# needs your file"


def _official_sw_tiny(path: Path) -> None:
    """An official-layout ShiftWise checkpoint ({'model': official state dict}) of a random sw_tiny."""
    import lkvision
    from lkvision.compat.shiftwise import to_official

    torch.save({"model": to_official(lkvision.create_model("sw_tiny")), "epoch": 0}, path)


USER_FILES = {"checkpoint-best.pth": _official_sw_tiny}


def python_snippets(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.slow  # builds sw_tiny / unireplknet_t at 224 px several times: ~20 s on 2 cores
def test_readme_python_snippets_run_as_written(tmp_path, monkeypatch):
    snippets = python_snippets(README.read_text())
    assert snippets, "README has no python snippet"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for code in snippets:
        for line in code.splitlines():
            if MARK in line:
                names = [n for n in re.findall(r"\"([^\"]+\.[A-Za-z]+)\"", line) if n in USER_FILES]
                assert names, f"no stand-in for the user file in: {line.strip()}"
                for n in names:
                    USER_FILES[n](tmp_path / n)
        exec(compile(code, str(README), "exec"), namespace)  # the README is ours
    assert "sw" in namespace and "deploy" in namespace


def test_readme_marks_every_file_it_reads():
    """Every file name a snippet reads is either written by an earlier line or marked as the user's."""
    for code in python_snippets(README.read_text()):
        written: set[str] = set()
        for line in code.splitlines():
            written |= set(re.findall(r"save_weights\([^,]+,\s*\"([^\"]+)\"", line))
            for name in re.findall(r"\"([^\"/]+\.(?:pth|pt|safetensors|bin))\"", line):
                assert name in written or MARK in line, f"README reads {name!r} without making or marking it"
