"""`loble run` and `loble demo` turn bad input into one line, never a traceback."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from loble.__main__ import main
from loble.core import ConnectBackend, HealthReport, parse_config
from loble.io import Daemon
from loble.io._copy import SPLICE_AVAILABLE, CopyMethod


@pytest.fixture(autouse=True)
def restore_loble_logger() -> Iterator[None]:
    """The commands configure the ``loble`` logger; leave it as other tests expect."""
    logger = logging.getLogger("loble")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


def config_file(tmp_path: Path, **sections: object) -> str:
    document = {
        "listener": {"address": "127.0.0.1:0"},
        "backends": [{"address": "127.0.0.1:9"}],
        **sections,
    }
    path = tmp_path / "config.toml"
    path.write_text(tomli_w.dumps(document), encoding="utf-8")
    return str(path)


def one_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_missing_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = one_error(capsys, ["run", "-c", str(tmp_path / "nope.toml")])
    assert line.endswith("nope.toml: no such file")


def test_invalid_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = config_file(tmp_path, balancer={"algorithm": "round_robbin"})
    assert "did you mean 'round_robin'?" in one_error(capsys, ["run", "-c", path])


def test_listener_address_in_use(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = config_file(tmp_path, listener={"address": f"127.0.0.1:{port}"})
        line = one_error(capsys, ["run", "-c", path])
    assert (
        line
        == f"error: listener.address: cannot listen on 127.0.0.1:{port}: Address already in use"
    )


def test_metrics_address_in_use(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = config_file(tmp_path, metrics={"enabled": True, "address": f"127.0.0.1:{port}"})
        line = one_error(capsys, ["run", "-c", path])
    assert line.startswith(f"error: metrics.address: cannot listen on 127.0.0.1:{port}")


def test_uvloop_not_installed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now fails
    path = config_file(tmp_path, runtime={"backend": "uvloop"})
    line = one_error(capsys, ["run", "-c", path])
    assert line.startswith("error: runtime.backend: 'uvloop' is not installed: pip install")


def test_demo_backend_address_not_local(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = config_file(tmp_path, backends=[{"address": "192.0.2.1:9101"}])
    line = one_error(capsys, ["demo", "-c", path, "--backends-only"])
    assert line.startswith("error: demo backend backend-1: cannot listen on 192.0.2.1:9101: ")


def test_demo_negative_rate(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert "--rate" in one_error(capsys, ["demo", "-c", config_file(tmp_path), "--rate", "-1"])


def test_copy_and_data_path_variables_are_checked(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = config_file(tmp_path)
    monkeypatch.setenv("LOBLE_COPY", "sendfile")
    line = one_error(capsys, ["run", "-c", path])
    assert line == "error: LOBLE_COPY: 'sendfile' is not one of auto, splice, recv_into"
    monkeypatch.delenv("LOBLE_COPY")
    monkeypatch.setenv("LOBLE_DATA_PATH", "threads")
    line = one_error(capsys, ["run", "-c", path])
    assert line == "error: LOBLE_DATA_PATH: 'threads' is not one of callbacks, tasks"
    monkeypatch.setenv("LOBLE_DATA_PATH", "callbacks")
    path = config_file(tmp_path, runtime={"backend": "trio"})
    line = one_error(capsys, ["run", "-c", path])
    assert line == "error: LOBLE_DATA_PATH: 'callbacks' needs asyncio or uvloop"


def test_the_variables_choose_how_bytes_move(monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_config({"backends": [{"address": "127.0.0.1:9"}]})
    monkeypatch.setenv("LOBLE_COPY", "recv_into")
    daemon = Daemon(config)
    assert daemon.copy_method is CopyMethod.RECV_INTO
    monkeypatch.delenv("LOBLE_COPY")
    expected = CopyMethod.AUTO if SPLICE_AVAILABLE else CopyMethod.RECV_INTO
    assert Daemon(config).copy_method is expected
    assert Daemon(config, copy="recv_into").copy_method is CopyMethod.RECV_INTO


class ReportFollower:
    """A listener that follows the connections' health reports."""

    def __init__(self) -> None:
        self.reports: list[HealthReport] = []

    def handlers(self) -> dict[type, Any]:
        return {HealthReport: self.reports.append}

    def link_accepted(self, link: Any) -> None: ...

    def backend_connected(self, address: str, seconds: float) -> None: ...

    def link_dropped(self, link: Any, closed: Any) -> None: ...

    def probed(self, address: str, failure: Any) -> None: ...


def test_the_core_makes_health_reports_only_for_a_listener_that_follows_them() -> None:
    config = parse_config({"backends": [{"address": "127.0.0.1:9"}]})
    # Metrics and the journal read the events: no report objects by default.
    _, outputs = Daemon(config).core.accept(0.0)
    assert [type(output) for output in outputs] == [ConnectBackend]
    _, outputs = Daemon(config, listeners=(ReportFollower(),)).core.accept(0.0)
    assert [type(output) for output in outputs] == [HealthReport, ConnectBackend]


def test_check_config_never_prints_the_admin_token(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        '[admin]\nenabled = true\ntoken = "hunter2-secret"\n[[backends]]\naddress = "127.0.0.1:9"\n'
    )
    assert main(["check-config", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "hunter2-secret" not in printed
    assert 'token = "(set, not shown)"' in printed


def test_the_main_install_runs_without_the_test_extras(tmp_path: Path) -> None:
    # `pip install -e .` has no trio, selenium or hypothesis: hide them and
    # run the commands a new user runs first, as the README has them.
    for module in ("trio", "selenium", "hypothesis", "simpy"):
        (tmp_path / f"{module}.py").write_text(f"raise ImportError('no {module} here')\n")
    config = Path(__file__).resolve().parents[2] / "config.toml"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    for command in (["check-config", str(config)], ["status", "--help"], ["sim", "--help"]):
        done = subprocess.run(
            [sys.executable, "-m", "loble", *command],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=env,
        )
        assert done.returncode == 0, (command, done.stderr[-800:])
        assert "Traceback" not in done.stderr
