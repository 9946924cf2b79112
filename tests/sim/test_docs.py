"""docs/simulation.md is true: its commands run, and print what it shows.

Every ``$ loble ...`` line in a ``console`` block runs as written (a ``toml``
block whose first line is ``# name.toml`` is written out as that file first).
The lines under a command, up to the next command or the end of the block,
are its documented output: the test compares them with what the command
prints (stdout; stderr for an error), so a pasted report cannot go stale. A
block preceded by ``<!-- docs-test: NAME -->`` runs with the core broken the
way :data:`BREAKAGES` names, to show a real failure.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib

from loble.__main__ import main
from loble.core import HealthInput, HealthState, _health
from loble.sim import parse_scenario

from .conftest import REPO

DOC = REPO / "docs" / "simulation.md"


def _never_drains(monkeypatch: pytest.MonkeyPatch) -> None:
    # DRAINING never moves on: neither to UNHEALTHY when it drains nor back
    # to HEALTHY on its probes (which would rescue some runs).
    draining = HealthState.DRAINING
    monkeypatch.setitem(
        _health.TRANSITIONS, (draining, HealthInput.CONNECTION_FINISHED), _health._finished
    )
    monkeypatch.setitem(
        _health.TRANSITIONS, (draining, HealthInput.PROBE_SUCCESS), _health._count_success
    )


BREAKAGES: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "draining never ends": _never_drains,
}


@dataclass(frozen=True)
class Example:
    command: str
    output: str
    breakage: str | None

    def __str__(self) -> str:
        return self.command


def documented_files() -> dict[str, str]:
    blocks = re.findall(r"```toml\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    named = (re.match(r"# (\S+\.toml)\n", block) for block in blocks)
    return {match.group(1): block for match, block in zip(named, blocks, strict=True) if match}


def documented_examples() -> list[Example]:
    examples = []
    pattern = r"(?:<!-- docs-test: (?P<breakage>[^>]*?) -->\n)?```console\n(?P<body>.*?)```"
    for block in re.finditer(pattern, DOC.read_text(), flags=re.DOTALL):
        command: str | None = None
        output: list[str] = []
        for line in [*block["body"].splitlines(), "$ "]:
            if line.startswith("$ "):
                if command is not None:
                    examples.append(Example(command, "\n".join(output), block["breakage"]))
                command, output = line[2:].strip(), []
            else:
                output.append(line)
    return [example for example in examples if example.command.startswith("loble ")]


def test_the_page_has_examples_with_output() -> None:
    examples = documented_examples()
    assert len(examples) >= 6
    assert sum(1 for example in examples if example.output) >= 4
    assert "bad.toml" in documented_files()


def test_the_example_scenario_is_valid() -> None:
    """The first toml block on the page is the annotated scenario: it must load."""
    block = re.findall(r"```toml\n(.*?)```", DOC.read_text(), flags=re.DOTALL)[0]
    assert parse_scenario(tomllib.loads(block)).sim.faults


@pytest.mark.parametrize("example", documented_examples(), ids=str)
def test_documented_command_prints_what_the_page_shows(
    example: Example,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(REPO)
    files = documented_files()
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    argv = shlex.split(example.command)[1:]
    argv = [str(tmp_path / a) if a in files else a for a in argv]
    for option in ("--trace", "--plot"):  # written in a scratch directory, never over the page's
        if option in argv:
            target = argv.index(option) + 1
            argv[target] = str(tmp_path / Path(argv[target]).name)
    if "--runs" in argv:
        jobs = 1 if example.breakage else min(2, os.cpu_count() or 1)
        argv += ["--jobs", str(jobs)]
    if example.breakage:
        BREAKAGES[example.breakage](monkeypatch)
    status = main(argv)
    captured = capsys.readouterr()
    if example.output.startswith("error: "):
        assert status == 1
        printed = captured.err
    else:
        assert status == (3 if "replay: " in example.output else 0), captured.err
        printed = captured.out
    if example.output:
        lines = [line.rstrip() for line in printed.rstrip("\n").splitlines()]
        assert "\n".join(lines) == example.output
