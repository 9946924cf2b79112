"""Bad input tried as a new user would, through the real ``loble`` command.

Each case runs ``python -m loble`` as a subprocess, as a shell would, and
expects one ``error: ...`` line on stderr and exit status 1, or, for a reader
that closes stdout early, a quiet exit with status 141 (128 + SIGPIPE).
Never a traceback, never a hang.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from loble.__main__ import EXIT_STDOUT_CLOSED

REPO = Path(__file__).resolve().parents[1]
SCENARIO = str(REPO / "scenarios" / "backend-crash.toml")
TIMEOUT = 60  # seconds; a hang fails the test instead of the whole run

MINIMAL_CONFIG = '[listener]\naddress = "127.0.0.1:0"\n\n[[backends]]\naddress = "127.0.0.1:9"\n'


def loble(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loble", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
        cwd=REPO,
        check=False,
    )


def one_error(result: subprocess.CompletedProcess[str]) -> str:
    """The single ``error:`` line of a failed command, after checking it is alone."""
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def config_commands(path: str) -> list[list[str]]:
    return [["check-config", path], ["run", "-c", path]]


# -- 1. a TOML file nested too deeply ----------------------------------------------------

NESTED_500 = {
    "arrays": "a = " + "[" * 500 + "]" * 500 + "\n",
    "inline tables": "a = " + "{ b = " * 500 + "1" + " }" * 500 + "\n",
    "arrays, far deeper": "a = " + "[" * 100_000 + "]" * 100_000 + "\n",
}


@pytest.mark.parametrize("document", NESTED_500.values(), ids=NESTED_500.keys())
@pytest.mark.parametrize("command", ["check-config", "run", "sim"])
def test_a_deeply_nested_file_is_one_line(tmp_path: Path, document: str, command: str) -> None:
    path = tmp_path / "deep.toml"
    path.write_text(document, encoding="utf-8")
    argv = [command, "-c", str(path)] if command == "run" else [command, str(path)]
    line = one_error(loble(*argv))
    assert line == f"error: {path}: invalid TOML: nested too deeply"


# -- 2. a reader that closes stdout early ------------------------------------------------


def many_backends_config(tmp_path: Path) -> str:
    """A config whose effective configuration (150 kB) cannot fit in a pipe's buffer."""
    backends = "".join(
        f'\n[[backends]]\naddress = "10.{i // 250}.0.{i % 250 + 1}:80"\n' for i in range(3000)
    )
    path = tmp_path / "many.toml"
    path.write_text('[listener]\naddress = "127.0.0.1:0"\n' + backends, encoding="utf-8")
    return str(path)


def many_backends_scenario(tmp_path: Path) -> str:
    """A one-second scenario whose report (170 kB) cannot fit in a pipe's buffer."""
    backends = "".join(
        f'[[backends]]\naddress = "10.0.{i // 250}.{i % 250 + 1}:8080"\n\n' for i in range(400)
    )
    path = tmp_path / "fleet.toml"
    path.write_text(backends + "[sim]\nduration = 1.0\n", encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("command", ["check-config", "sim --json", "sim"])
def test_head_closing_the_pipe_ends_the_command_quietly(tmp_path: Path, command: str) -> None:
    # `loble ... | head -1`: the output is larger than the pipe's buffer, so
    # loble is still writing when the reader takes one line and goes away.
    if command == "check-config":
        argv = ["check-config", many_backends_config(tmp_path)]
    else:  # the report as JSON, and as rich tables
        argv = ["sim", many_backends_scenario(tmp_path), *command.split()[1:]]
    command_line = [sys.executable, "-m", "loble", *argv]
    process = subprocess.Popen(
        command_line, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, text=True
    )
    assert process.stdout is not None and process.stderr is not None
    first = process.stdout.readline()
    process.stdout.close()
    try:
        status = process.wait(timeout=TIMEOUT)
        stderr = process.stderr.read()
    finally:
        process.kill()
        process.stderr.close()
    assert first.strip()
    assert stderr == ""
    assert status == EXIT_STDOUT_CLOSED == 141


@pytest.fixture
def reader_gone() -> Iterator[int]:
    """The write end of a pipe whose reader has already closed (``loble ... | true``)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    yield write_end
    os.close(write_end)


SMALL_OUTPUT = {
    "check-config": ["check-config", str(REPO / "config.toml")],
    "sim --json": ["sim", SCENARIO, "--json"],
    "sim": ["sim", SCENARIO],
}


@pytest.mark.parametrize("argv", SMALL_OUTPUT.values(), ids=SMALL_OUTPUT.keys())
def test_a_reader_gone_before_any_output_ends_the_command_quietly(
    reader_gone: int, argv: list[str]
) -> None:
    # The whole output fits in stdout's buffer, so it is written by the last
    # flush: the one main() makes, not the interpreter's at exit.
    result = subprocess.run(
        [sys.executable, "-m", "loble", *argv],
        stdout=reader_gone,
        stderr=subprocess.PIPE,
        text=True,
        timeout=TIMEOUT,
        cwd=REPO,
        check=False,
    )
    assert result.stderr == ""
    assert result.returncode == EXIT_STDOUT_CLOSED


def test_help_with_the_reader_gone_ends_quietly(reader_gone: int) -> None:
    # argparse writes help through its own guard, which drops an OSError and
    # exits 0; main() must not turn that into a traceback either.
    result = subprocess.run(
        [sys.executable, "-m", "loble", "sim", "--help"],
        stdout=reader_gone,
        stderr=subprocess.PIPE,
        text=True,
        timeout=TIMEOUT,
        cwd=REPO,
        check=False,
    )
    assert result.stderr == ""
    assert result.returncode in (0, EXIT_STDOUT_CLOSED)


def test_an_error_with_stdout_closed_still_says_what_is_wrong(reader_gone: int) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "loble", "check-config", "nope.toml"],
        stdout=reader_gone,
        stderr=subprocess.PIPE,
        text=True,
        timeout=TIMEOUT,
        cwd=REPO,
        check=False,
    )
    assert result.stderr == "error: nope.toml: no such file\n"
    assert result.returncode == 1


# -- 3. a runtime that is not installed ---------------------------------------------------


def hidden_uvloop(tmp_path: Path) -> dict[str, str]:
    """An environment in which ``import uvloop`` fails, as it does where it is not installed."""
    hiding = tmp_path / "hide-uvloop"
    hiding.mkdir()
    (hiding / "uvloop.py").write_text(
        'raise ImportError("uvloop is hidden by tests/test_bad_input.py")\n', encoding="utf-8"
    )
    inherited = os.environ.get("PYTHONPATH")
    path = str(hiding) if not inherited else os.pathsep.join([str(hiding), inherited])
    return {**os.environ, "PYTHONPATH": path}


def test_check_config_refuses_a_runtime_that_is_not_installed_as_run_does(
    tmp_path: Path,
) -> None:
    path = tmp_path / "uvloop.toml"
    path.write_text(MINIMAL_CONFIG + '\n[runtime]\nbackend = "uvloop"\n', encoding="utf-8")
    env = hidden_uvloop(tmp_path)
    expected = (
        "error: runtime.backend: 'uvloop' is not installed: "
        "pip install 'loble[uvloop]', or set backend = \"asyncio\""
    )
    for argv in config_commands(str(path)):
        assert one_error(loble(*argv, env=env)) == expected, argv


def test_check_config_accepts_uvloop_where_it_is_installed(tmp_path: Path) -> None:
    pytest.importorskip("uvloop")
    path = tmp_path / "uvloop.toml"
    path.write_text(MINIMAL_CONFIG + '\n[runtime]\nbackend = "uvloop"\n', encoding="utf-8")
    result = loble("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert 'backend = "uvloop"' in result.stdout


# -- 4. a config path that is not a regular file -----------------------------------------


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    """A FIFO with a writer blocked in open(): it would be let through if loble opened it."""
    path = tmp_path / "config.fifo"
    os.mkfifo(path)
    opened: list[int] = []
    writer = threading.Thread(target=lambda: opened.append(os.open(path, os.O_WRONLY)))
    writer.start()
    yield path
    assert writer.is_alive() and not opened, "loble opened the FIFO"
    release = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    writer.join(TIMEOUT)
    os.close(release)
    for descriptor in opened:
        os.close(descriptor)


def test_a_fifo_is_refused_without_opening_it(fifo: Path) -> None:
    for argv in config_commands(str(fifo)):
        assert one_error(loble(*argv)) == f"error: {fifo}: is not a regular file", argv


@pytest.fixture
def unix_socket(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "config.sock"
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(path))
        yield path


@pytest.mark.parametrize("kind", ["socket", "device"])
def test_a_socket_or_device_is_refused(request: pytest.FixtureRequest, kind: str) -> None:
    path = str(request.getfixturevalue("unix_socket")) if kind == "socket" else os.devnull
    for argv in config_commands(path):
        assert one_error(loble(*argv)) == f"error: {path}: is not a regular file", argv


def test_an_empty_config_path_is_refused() -> None:
    for argv in config_commands(""):
        assert one_error(loble(*argv)) == "error: config path is empty", argv
    assert one_error(loble("sim", "")) == "error: scenario path is empty"


def test_a_directory_still_says_it_is_a_directory(tmp_path: Path) -> None:
    for argv in config_commands(str(tmp_path)):
        line = one_error(loble(*argv))
        assert line == f"error: {tmp_path}: is a directory, not a TOML file", argv


def test_a_symlink_to_a_regular_file_still_reads(tmp_path: Path) -> None:
    target = tmp_path / "real.toml"
    target.write_text(MINIMAL_CONFIG, encoding="utf-8")
    link = tmp_path / "link.toml"
    link.symlink_to(target)
    result = loble("check-config", str(link))
    assert result.returncode == 0, result.stderr


# -- 5. a connection limit that is not a count -------------------------------------------

BAD_MAX_CONNECTIONS = {
    "-1": "-1 must be >= 0",
    '"50"': "'50' is not an integer",
    "2.5": "2.5 is not an integer",
    "1e9": "1000000000.0 is not an integer",
    "10000001": "10000001 must be <= 1000000",
}


@pytest.mark.parametrize(("value", "problem"), BAD_MAX_CONNECTIONS.items())
def test_a_bad_max_connections_is_one_line(tmp_path: Path, value: str, problem: str) -> None:
    path = tmp_path / "limit.toml"
    path.write_text(
        MINIMAL_CONFIG.replace("[[backends]]", f"max_connections = {value}\n\n[[backends]]"),
        encoding="utf-8",
    )
    for argv in config_commands(str(path)):
        assert one_error(loble(*argv)) == f"error: listener.max_connections: {problem}", argv


def test_check_config_prints_max_connections_set_or_not(tmp_path: Path) -> None:
    path = tmp_path / "limit.toml"
    path.write_text(MINIMAL_CONFIG, encoding="utf-8")
    assert "max_connections = 0\n" in loble("check-config", str(path)).stdout
    path.write_text(
        MINIMAL_CONFIG.replace("[[backends]]", "max_connections = 50\n\n[[backends]]"),
        encoding="utf-8",
    )
    result = loble("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert "max_connections = 50\n" in result.stdout


BAD_LIMITS = {
    "backends[0].max_connections": (
        "[[backends]]\naddress",
        "max_connections = -1",
        "-1 must be >= 0",
    ),
    "balancer.queue_size": (
        "[[backends]]",
        '[balancer]\nqueue_size = "10"',
        "'10' is not an integer",
    ),
    "balancer.queue_timeout": (
        "[[backends]]",
        "[balancer]\nqueue_timeout = 0",
        "0 must be at least 0.001 seconds",
    ),
}


@pytest.mark.parametrize(("key", "edit"), BAD_LIMITS.items())
def test_a_bad_backend_limit_or_queue_key_is_one_line(
    tmp_path: Path, key: str, edit: tuple[str, str, str]
) -> None:
    anchor, line, problem = edit
    path = tmp_path / "limits.toml"
    if anchor == "[[backends]]":
        text = MINIMAL_CONFIG.replace(anchor, f"{line}\n\n{anchor}")
    else:  # a key of the backend table itself
        text = MINIMAL_CONFIG + f"{line}\n"
    path.write_text(text, encoding="utf-8")
    assert one_error(loble("check-config", str(path))) == f"error: {key}: {problem}"


def test_check_config_prints_a_backends_max_connections(tmp_path: Path) -> None:
    path = tmp_path / "limits.toml"
    path.write_text(MINIMAL_CONFIG + "max_connections = 7\nbackup = true\n", encoding="utf-8")
    result = loble("check-config", str(path))
    assert result.returncode == 0, result.stderr
    backend = result.stdout.split("[[backends]]")[1]
    assert "max_connections = 7\n" in backend and "backup = true\n" in backend
    assert "queue_size = 1024\n" in result.stdout and "queue_timeout = 5.0\n" in result.stdout
