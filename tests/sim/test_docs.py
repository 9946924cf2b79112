"""The commands in docs/simulation.md run and succeed, as written."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from loble.__main__ import main

from .conftest import REPO

DOC = REPO / "docs" / "simulation.md"


def documented_commands() -> list[str]:
    blocks = re.findall(r"```console\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    return [
        line[2:].strip()
        for block in blocks
        for line in block.splitlines()
        if line.startswith("$ loble ")
    ]


def test_the_worked_example_has_commands() -> None:
    assert len(documented_commands()) >= 4


@pytest.mark.parametrize("command", documented_commands())
def test_documented_command_succeeds(
    command: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(REPO)
    argv = shlex.split(command)[1:]
    argv = [str(tmp_path / Path(a).name) if a.startswith("/tmp/") else a for a in argv]
    if "--runs" in argv:
        argv += ["--jobs", str(min(2, os.cpu_count() or 1))]
    assert main(argv) == 0
