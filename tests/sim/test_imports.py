"""The simulator drives the core through its public face only, as any driver would.

And ``loble sim`` loads nothing of the other driver, the daemon: not anyio nor
the HTTP stack, so it starts fast and runs wherever the core runs.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import loble.sim
from loble.__main__ import build_parser, main
from loble.io._admin import ADMIN_ACTIONS

from .conftest import REPO

SIM = Path(loble.sim.__file__).parent


def test_the_simulator_imports_no_core_private() -> None:
    for path in sorted(SIM.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module is not None:
                assert not node.module.startswith("loble.core._"), (path.name, node.module)
                if node.module == "loble.core":
                    private = [a.name for a in node.names if a.name.startswith("_")]
                    assert private == [], (path.name, private)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("loble.core._"), (path.name, alias.name)


# -- what `loble sim` loads --------------------------------------------------------------

DAEMON_DEPENDENCIES = ("anyio", "hypercorn", "prometheus_client", "starlette", "trio", "uvicorn")

PARSER_ONLY = {"loble.io", "loble.io.cli", "loble.io.admin_cli", "loble.io._demo_defaults"}
"""The daemon's side of the ``loble`` parser: ``loble sim`` may load these and no more."""

_LOADED = """
import contextlib, json, os, sys
from loble.__main__ import main
with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
    try:
        status = main(sys.argv[1:])
    except SystemExit as stop:  # --help
        status = stop.code
print(json.dumps({"status": status, "modules": sorted(sys.modules)}))
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["sim", "scenarios/backend-crash.toml", "--json"],
        ["sim", "--help"],
        ["--help"],
        ["run", "--help"],
        ["ctl", "drain", "--help"],
    ],
    ids=" ".join,
)
def test_the_parser_and_the_simulator_load_nothing_of_the_daemon(argv: list[str]) -> None:
    # A fresh interpreter: this one has imported the daemon for other tests.
    done = subprocess.run(
        [sys.executable, "-c", _LOADED, *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    loaded = json.loads(done.stdout)
    assert loaded["status"] == 0, done.stderr
    modules = set(loaded["modules"])
    heavy = sorted(name for name in modules if name.split(".")[0] in DAEMON_DEPENDENCIES)
    assert heavy == []
    ours = {name for name in modules if name == "loble.io" or name.startswith("loble.io.")}
    assert ours <= PARSER_ONLY, sorted(ours - PARSER_ONLY)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(commands.choices)


def test_every_command_still_has_its_help(capsys: pytest.CaptureFixture[str]) -> None:
    commands = _subcommands(build_parser())
    assert {"run", "demo", "status", "top", "ctl", "reload", "sim"} <= set(commands)
    for name in ["", *commands]:
        with pytest.raises(SystemExit) as stop:
            main([name, "--help"] if name else ["--help"])
        assert stop.value.code == 0, name
        assert capsys.readouterr().out.startswith(f"usage: loble {name}".rstrip()), name


def test_ctl_offers_the_admin_apis_actions() -> None:
    # admin_cli names them from the core's AdminInput, not from the admin API's module.
    ctl = _subcommands(build_parser())["ctl"]
    assert list(_subcommands(ctl)) == [*ADMIN_ACTIONS, "weight", "max-connections"]


def test_the_daemon_is_imported_on_first_use() -> None:
    import loble.io
    from loble.io._daemon import Daemon

    assert loble.io.Daemon is Daemon
    with pytest.raises(AttributeError, match="Deamon"):
        loble.io.Deamon  # noqa: B018
