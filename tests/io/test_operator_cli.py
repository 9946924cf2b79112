"""`loble status`, `top`, `ctl` and `reload` against a real daemon's admin API.

Every command runs as an operator runs it, ``python -m loble ...`` in a child
process, against a daemon on loopback: in this process (its state is read
straight from the core) or, where a reload must read a file or take a
signal, as ``loble run`` in another. Every failure is checked as the one
line on stderr the operator sees, with exit status 1 and no traceback.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from rich.console import Console

from loble.io.admin_cli import status_view

pytestmark = pytest.mark.anyio

TOKEN = "s3cret-token"
ADMIN = {"enabled": True, "address": "127.0.0.1:0", "token": TOKEN}

COMMAND_BOUND = 30.0
"""Seconds one ``loble`` command may take, interpreter start-up included."""


@pytest.fixture
def anyio_backend() -> str:
    # These tests are about the client; the daemon's loops have tests of their own.
    return "asyncio"


@dataclass
class Ran:
    code: int
    out: str
    err: str

    def error_line(self) -> str:
        """The one error line of a failed command (exit 1, no traceback)."""
        assert self.code == 1, (self.code, self.out, self.err)
        assert "Traceback" not in self.err, self.err
        lines = self.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), self.err
        return lines[0]


async def loble(*args: str, token: str | None = None) -> Ran:
    """Run ``loble ARGS`` to its end; ``token`` goes in LOBLE_ADMIN_TOKEN."""
    env = {key: value for key, value in os.environ.items() if key != "LOBLE_ADMIN_TOKEN"}
    if token is not None:
        env["LOBLE_ADMIN_TOKEN"] = token
    with anyio.fail_after(COMMAND_BOUND):
        done = await anyio.run_process(
            [sys.executable, "-m", "loble", *args], check=False, env=env, stdin=subprocess.DEVNULL
        )
    return Ran(done.returncode, done.stdout.decode(), done.stderr.decode())


def admin_of(daemon: Any) -> str:
    host, port = daemon.admin_address
    return f"{host}:{port}"


def row(table: str, backend: str) -> list[str]:
    """The cells of ``backend``'s row in a printed status table."""
    (line,) = [line for line in table.splitlines() if line.startswith(backend + " ")]
    return line.split()


# -- status and top -------------------------------------------------------------------


async def test_status_prints_a_row_per_backend_under_the_header(net: Any, tmp_path: Path) -> None:
    async with net.loopback() as lab:
        a, b = await lab.backend("a"), await lab.backend("b")
        daemon = await lab.daemon(
            [a.address, b.address], admin=ADMIN, weights={a.address: 3, b.address: 1}
        )
        for _ in range(4):
            await net.request(daemon.listen_addresses[0], b"hello")
        # The address comes from the configuration file, as an operator's would.
        config = net.write_config(
            tmp_path / "c.toml",
            {
                "admin": {"enabled": True, "address": admin_of(daemon)},
                "backends": [{"address": a.address}],
            },
        )
        ran = await loble("status", "-c", str(config))
    assert ran.code == 0, ran.err
    header, columns, *rows = ran.out.splitlines()
    assert header.startswith("process running · snapshot v1 · 0 in flight · ")
    assert "2 of 2 backends eligible" in header
    assert columns.split()[:4] == ["backend", "state", "admin", "weight"]
    assert len(rows) == 2
    # backend, state, admin, weight, active, peak, completed, failed, bytes each way
    cells = row(ran.out, a.address)
    assert cells[:5] == [a.address, "healthy", "ready", "3", "0"]
    assert cells[6:8] == ["3", "0"]  # 3 of the 4 requests, by weight; none failed
    assert cells[8:12] == ["15", "B", "21", "B"]  # "hello" x3 up, "a:hello" x3 down
    assert row(ran.out, b.address)[:7] == [b.address, "healthy", "ready", "1", "0", "1", "1"]


async def test_status_json_is_the_admin_api_document(net: Any) -> None:
    async with net.loopback() as lab:
        a = await lab.backend("a")
        daemon = await lab.daemon([a.address], admin=ADMIN)
        ran = await loble("status", "--json", "--admin", admin_of(daemon))
    assert ran.code == 0, ran.err
    document = json.loads(ran.out)
    assert document["process"] == "running"
    assert document["eligible"] == [a.address]
    assert [backend["address"] for backend in document["backends"]] == [a.address]
    assert document["backends"][0]["admin"] == "ready"


async def test_top_prints_each_refresh_until_its_count(net: Any) -> None:
    async with net.loopback() as lab:
        a = await lab.backend("a")
        daemon = await lab.daemon([a.address], admin=ADMIN)
        ran = await loble("top", "--count", "2", "--interval", "0.1", "--admin", admin_of(daemon))
    assert ran.code == 0, ran.err
    # Not a terminal: every refresh is printed, one after the other.
    headers = [line for line in ran.out.splitlines() if line.startswith("process running")]
    assert len(headers) == 2
    assert ran.out.count(f"{a.address} ") == 2


async def test_top_ends_with_status_0_on_ctrl_c(net: Any) -> None:
    async with net.loopback() as lab:
        a = await lab.backend("a")
        daemon = await lab.daemon([a.address], admin=ADMIN)
        command = [sys.executable, "-m", "loble", "top", "--admin", admin_of(daemon)]
        async with await anyio.open_process(command) as top:
            assert top.stdout is not None
            with anyio.fail_after(COMMAND_BOUND):
                first = await top.stdout.receive()  # it is running: the first table is out
                assert first.startswith(b"process running")
                top.send_signal(signal.SIGINT)
                assert await top.wait() == 0


# -- ctl ------------------------------------------------------------------------------


async def test_ctl_drain_shows_in_status_then_weight_and_undrain(net: Any) -> None:
    async with net.loopback() as lab:
        a, b = await lab.backend("a"), await lab.backend("b")
        daemon = await lab.daemon([a.address, b.address], admin=ADMIN)
        admin = ("--admin", admin_of(daemon))

        ran = await loble("ctl", "drain", a.address, *admin, token=TOKEN)
        assert (ran.code, ran.out) == (0, f"{a.address}: healthy, admin drain, weight 1\n")
        status = await loble("status", *admin)
        assert row(status.out, a.address)[:3] == [a.address, "healthy", "drain"]
        assert "1 of 2 backends eligible" in status.out
        assert daemon.core.statistics().eligible == (b.address,)

        ran = await loble("ctl", "weight", a.address, "7", *admin, "--token", TOKEN)
        assert (ran.code, ran.out) == (0, f"{a.address}: healthy, admin drain, weight 7\n")

        ran = await loble("ctl", "undrain", a.address, *admin, token=TOKEN)
        assert (ran.code, ran.out) == (0, f"{a.address}: healthy, admin ready, weight 7\n")
        assert row((await loble("status", *admin)).out, a.address)[:4] == [
            a.address,
            "healthy",
            "ready",
            "7",
        ]

        ran = await loble("ctl", "maintenance", b.address, *admin, token=TOKEN)
        assert ran.out == f"{b.address}: healthy, admin maint, weight 1\n"
        ran = await loble("ctl", "ready", b.address, *admin, token=TOKEN)
        assert ran.out == f"{b.address}: healthy, admin ready, weight 1\n"
        assert set(daemon.core.statistics().eligible) == {a.address, b.address}


async def test_ctl_quotes_an_ipv6_backend_in_the_url(net: Any) -> None:
    async with net.loopback() as lab:
        a = await lab.backend("a")
        daemon = await lab.daemon([a.address, "[::1]:9"], admin=ADMIN)
        ran = await loble("ctl", "drain", "[::1]:9", "--admin", admin_of(daemon), token=TOKEN)
    assert (ran.code, ran.out) == (0, "[::1]:9: healthy, admin drain, weight 1\n")


# -- the errors an operator meets --------------------------------------------------------


async def test_an_unreachable_admin_api_is_one_line(net: Any) -> None:
    port = net.free_port()
    for command in (["status"], ["top", "--count", "1"], ["ctl", "drain", "127.0.0.1:9"]):
        ran = await loble(*command, "--admin", f"127.0.0.1:{port}", token=TOKEN)
        assert ran.error_line() == (
            f"error: cannot reach the admin API at http://127.0.0.1:{port}: Connection refused"
        )


async def test_a_refused_token_is_the_servers_reason(net: Any) -> None:
    async with net.loopback() as lab:
        a = await lab.backend("a")
        daemon = await lab.daemon([a.address], admin=ADMIN)
        url = f"http://{admin_of(daemon)}"
        wrong = await loble("ctl", "drain", a.address, "--admin", admin_of(daemon), token="nope")
        missing = await loble("ctl", "drain", a.address, "--admin", admin_of(daemon))
        await net.wait_for(lambda: len(lab.logs.find("admin request refused")) == 2)
        assert daemon.core.statistics().backends[0].admin.value == "ready"
    assert wrong.error_line() == (
        f"error: the admin API at {url} refused the change: missing or wrong bearer token"
    )
    assert missing.error_line() == (
        f"error: the admin API at {url} refused the change: missing or wrong bearer token "
        "(pass --token or set LOBLE_ADMIN_TOKEN)"
    )


async def test_no_token_configured_refuses_every_change(net: Any) -> None:
    async with net.loopback() as lab:
        a = await lab.backend("a")
        daemon = await lab.daemon([a.address], admin={**ADMIN, "token": ""})
        ran = await loble("ctl", "drain", a.address, "--admin", admin_of(daemon), token=TOKEN)
        status = await loble("status", "--admin", admin_of(daemon))  # reading still works
    assert ran.error_line() == (
        f"error: the admin API at http://{admin_of(daemon)} refused the change: "
        "no [admin] token is configured: changes are refused"
    )
    assert status.code == 0 and a.address in status.out


async def test_an_unknown_backend_or_a_bad_weight_is_one_line(net: Any) -> None:
    async with net.loopback() as lab:
        a = await lab.backend("a")
        daemon = await lab.daemon([a.address], admin=ADMIN)
        admin = ("--admin", admin_of(daemon))
        unknown = await loble("ctl", "drain", "127.0.0.1:9", *admin, token=TOKEN)
        zero = await loble("ctl", "weight", a.address, "0", *admin, token=TOKEN)
    assert unknown.error_line() == "error: no backend '127.0.0.1:9'"
    assert zero.error_line().startswith(f"error: backend {a.address}: weight 0 ")


async def test_admin_disabled_or_on_port_0_in_the_config_is_one_line(
    net: Any, tmp_path: Path
) -> None:
    disabled = net.write_config(tmp_path / "off.toml", {"backends": [{"address": "127.0.0.1:9"}]})
    chosen = net.write_config(
        tmp_path / "zero.toml", {"admin": ADMIN, "backends": [{"address": "127.0.0.1:9"}]}
    )
    for command in (["status"], ["top"], ["ctl", "ready", "127.0.0.1:9"]):
        ran = await loble(*command, "-c", str(disabled))
        assert ran.error_line() == (
            f"error: {disabled}: [admin] enabled is false: the daemon serves no admin API "
            "(enable it, or pass --admin HOST:PORT)"
        )
    assert "has port 0, chosen when the daemon starts" in (
        (await loble("status", "-c", str(chosen))).error_line()
    )
    ran = await loble("reload", "-c", str(disabled))
    assert ran.error_line() == (
        f"error: {disabled}: neither [runtime] pid_file nor [admin] enabled is set: "
        "no way to reach the daemon (or pass --admin HOST:PORT)"
    )


async def test_bad_arguments_are_one_line(net: Any) -> None:
    assert (await loble("top", "--count", "0", "--admin", "127.0.0.1:1")).error_line() == (
        "error: --count: 0 must be at least 1"
    )
    assert (await loble("status", "--admin", "localhost")).error_line() == (
        "error: --admin: 'localhost' has no port"
    )


# -- reload ---------------------------------------------------------------------------


def _daemon_config(tmp_path: Path, backends: dict[str, int], **extra: Any) -> dict[str, Any]:
    return {
        "listener": {"address": "127.0.0.1:0"},
        "logging": {"format": "json"},
        "admin": ADMIN,
        "runtime": {"pid_file": str(tmp_path / "loble.pid")},
        "backends": [
            {"address": address, "weight": weight} for address, weight in backends.items()
        ],
        **extra,
    }


async def test_reload_by_signal_and_by_the_admin_api(net: Any, tmp_path: Path) -> None:
    async with net.loopback() as lab:
        a, b = await lab.backend("a"), await lab.backend("b")
        path = net.write_config(tmp_path / "c.toml", _daemon_config(tmp_path, {a.address: 1}))
        async with net.loble_process("run", "-c", str(path)) as child:
            url = (await child.wait_json("admin API"))["address"]
            admin = url.removeprefix("http://").rstrip("/")
            await net.wait_for(lambda: (tmp_path / "loble.pid").exists(), what="the pid file")

            # Through the admin API: what changed comes back.
            net.write_config(path, _daemon_config(tmp_path, {a.address: 4, b.address: 1}))
            ran = await loble("reload", "-c", str(path), "--admin", admin, token=TOKEN)
            assert (ran.code, ran.out) == (
                0,
                f"reloaded\n  added: {b.address}\n  reweighted: {a.address}\n",
            ), ran.err
            reloaded = await child.wait_json("configuration reloaded")
            assert (reloaded["added"], reloaded["reweighted"]) == (b.address, a.address)

            # By SIGHUP to the pid in [runtime] pid_file, after checking the file.
            net.write_config(path, _daemon_config(tmp_path, {a.address: 4}))
            ran = await loble("reload", "-c", str(path))
            assert ran.code == 0, ran.err
            assert ran.out.startswith(f"{path}: valid; sent SIGHUP to loble (pid ")
            await net.wait_for(lambda: len(child.json_lines("configuration reloaded")) == 2)
            assert child.json_lines("configuration reloaded")[1]["removed"] == b.address

            # An invalid file: its errors, exit 1, and no signal sent.
            document = _daemon_config(tmp_path, {a.address: 4})
            document["balancer"] = {"algorithm": "round_robbin"}
            net.write_config(path, document)
            assert (
                "did you mean 'round_robin'?"
                in (await loble("reload", "-c", str(path))).error_line()
            )
            # Through the API the daemon reads the file itself and says no.
            rejected = await loble("reload", "--admin", admin, token=TOKEN)
            assert "did you mean 'round_robin'?" in rejected.error_line()
            await child.wait_json("reload rejected: the running configuration stays")

            # Signals arrive in order: had the invalid file been signalled, this
            # reload's "signal received" would be the daemon's third, not second.
            net.write_config(path, _daemon_config(tmp_path, {a.address: 2}))
            assert (await loble("reload", "-c", str(path))).code == 0
            await net.wait_for(lambda: len(child.json_lines("configuration reloaded")) == 3)
            assert len(child.json_lines("signal received")) == 2
            assert len(child.json_lines("reload rejected: the running configuration stays")) == 1
            child.signal(signal.SIGTERM)
            assert await child.exit_code() == 0
            assert not child.has("Traceback")


async def test_reload_through_the_configured_admin_api_without_a_pid_file(
    net: Any, tmp_path: Path
) -> None:
    async with net.loopback() as lab:
        a = await lab.backend("a")
        daemon = await lab.daemon([a.address], admin=ADMIN)
        config = net.write_config(
            tmp_path / "c.toml",
            {
                "admin": {"enabled": True, "address": admin_of(daemon)},
                "backends": [{"address": a.address}],
            },
        )
        ran = await loble("reload", "-c", str(config), token=TOKEN)
    # This daemon was built from a dict, not a file: the API's 400, as one line.
    assert ran.error_line() == "error: reload: this daemon has no configuration file to read"


async def test_reload_with_a_missing_or_stale_pid_file_is_one_line(
    net: Any, tmp_path: Path
) -> None:
    path = net.write_config(tmp_path / "c.toml", _daemon_config(tmp_path, {"127.0.0.1:9": 1}))
    pid_file = tmp_path / "loble.pid"
    ran = await loble("reload", "-c", str(path))
    assert ran.error_line() == (
        f"error: runtime.pid_file: {pid_file}: no such file: is the daemon running?"
    )

    async with await anyio.open_process([sys.executable, "-c", "pass"]) as gone:
        with anyio.fail_after(COMMAND_BOUND):
            await gone.wait()  # reaped: its pid names no process now
    pid_file.write_text(f"{gone.pid}\n")
    ran = await loble("reload", "-c", str(path))
    assert "a stale pid file?" in ran.error_line()

    pid_file.write_text("garbage\n")
    ran = await loble("reload", "-c", str(path))
    assert ran.error_line() == (
        f"error: runtime.pid_file: {pid_file}: holds 'garbage', not a process id"
    )

    # A live process that is not loble is never signalled.
    command = [sys.executable, "-c", "import sys; sys.stdin.read()"]
    async with await anyio.open_process(command) as other:
        pid_file.write_text(f"{other.pid}\n")
        ran = await loble("reload", "-c", str(path))
        assert ran.error_line() == (
            f"error: runtime.pid_file: {pid_file}: process {other.pid} is not loble: "
            "a stale pid file?"
        )
        assert other.returncode is None
        assert other.stdin is not None
        await other.stdin.aclose()
        with anyio.fail_after(COMMAND_BOUND):
            assert await other.wait() == 0


def test_the_table_shows_probes_removal_and_bytes_in_units() -> None:
    backend = {
        "address": "10.0.0.1:80",
        "state": "unhealthy",
        "admin": "maint",
        "weight": 2,
        "active_connections": 1,
        "peak_connections": 9,
        "since_seconds": 125.0,
        "reason": "3 consecutive failures",
        "last_probe_ok": False,
        "last_probe_seconds": 0.5,
        "removing": True,
        "connections": {"completed": 4, "connect_failed": 2, "cut": 1},
        "bytes_to_backend": 1536,
        "bytes_to_client": 3 * 1024**3,
    }
    probed = {**backend, "address": "10.0.0.2:80", "removing": False, "last_probe_ok": True}
    document = {
        "process": "draining",
        "snapshot_version": 7,
        "in_flight": 1,
        "eligible": [],
        "uptime": 7200.0,
        "pid": 42,
        "worker": None,
        "backends": [backend, probed],
    }
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(status_view(document))
    text = console.export_text()
    assert text.splitlines()[0] == (
        "process draining · snapshot v7 · 1 in flight · 0 of 2 backends eligible · up 2.0 h · pid 42"
    )
    assert row(text, "10.0.0.1:80") == [
        *("10.0.0.1:80", "(removing)", "unhealthy", "maint", "2", "1", "9", "4", "3"),
        *("1.5", "KiB", "3.0", "GiB", "2.1", "min", "ago:", "3", "consecutive", "failures"),
        *("failed,", "0.5", "s", "ago"),
    ]
    assert row(text, "10.0.0.2:80")[-4:] == ["ok,", "0.5", "s", "ago"]


def test_the_table_shows_a_backends_limit_and_the_queue() -> None:
    backend = {
        "address": "10.0.0.1:80",
        "state": "healthy",
        "admin": "ready",
        "weight": 1,
        "active_connections": 15,
        "peak_connections": 15,
        "max_connections": 15,
        "connections": {},
    }
    document = {
        "process": "running",
        "snapshot_version": 1,
        "in_flight": 18,
        "queued": 3,
        "eligible": ["10.0.0.1:80"],
        "uptime": 60.0,
        "pid": 42,
        "worker": None,
        "backends": [backend, {**backend, "address": "10.0.0.2:80", "max_connections": 0}],
    }
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(status_view(document))
    text = console.export_text()
    assert "· 18 in flight (3 queued) ·" in text.splitlines()[0]
    assert row(text, "10.0.0.1:80")[4:6] == ["15/15", "15"]
    assert row(text, "10.0.0.2:80")[4:6] == ["15", "15"]  # no limit: the count alone


async def test_ctl_max_connections_sets_the_limit_and_status_shows_it(net: Any) -> None:
    async with net.loopback() as lab:
        a = await lab.backend("a")
        daemon = await lab.daemon([a.address], admin=ADMIN)
        admin = ("--admin", admin_of(daemon))
        ran = await loble("ctl", "max-connections", a.address, "5", *admin, token=TOKEN)
        assert (ran.code, ran.out) == (
            0,
            f"{a.address}: healthy, admin ready, weight 1, max_connections 5\n",
        )
        assert row((await loble("status", *admin)).out, a.address)[4] == "0/5"
        ran = await loble("ctl", "max-connections", a.address, "0", *admin, token=TOKEN)
        assert ran.out == f"{a.address}: healthy, admin ready, weight 1\n"
        assert daemon.core.statistics().backends[0].max_connections == 0
