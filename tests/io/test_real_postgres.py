"""Real protocols through Loble: PostgreSQL's own clients against a real server.

The test starts its own PostgreSQL (Debian's package ``postgresql``, whose
binaries live in ``/usr/lib/postgresql/<version>/bin``) in a temporary
directory, on loopback with trust authentication, and puts Loble in front
of it. Through Loble:

- ``pgbench -i`` builds its tables (with COPY), then ``pgbench`` runs 8
  clients x 200 TPC-B transactions on the extended protocol: every one must
  commit, and the server, asked directly, must hold exactly 1600 history rows
  whose deltas sum to the balance of every account, teller and branch;
- ``psql``'s ``\\copy`` sends 100,000 generated rows in and reads them back
  out: the bytes out are the bytes in, and the server, asked directly, holds
  exactly those values.

initdb and postgres refuse to run as root: as root (CI), the server runs as
the ``postgres`` user the package creates. Skipped, saying why, when the
binaries are not installed (``.ci/run`` installs them).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest


def find_bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` that has a server and clients."""
    found = []
    for candidate in Path("/usr/lib/postgresql").glob("*/bin"):
        tools = ("initdb", "pg_ctl", "postgres", "psql", "pgbench")
        if candidate.parent.name.isdigit() and all((candidate / t).exists() for t in tools):
            found.append((int(candidate.parent.name), candidate))
    return max(found)[1] if found else None


BIN = find_bin_dir()
AS_ROOT = os.geteuid() == 0


def server_user() -> pwd.struct_passwd | None:
    """Who runs initdb and the server: ``postgres`` as root, else whoever we are."""
    if not AS_ROOT:
        return None
    with contextlib.suppress(KeyError):
        return pwd.getpwnam("postgres")
    pytest.skip("running as root and there is no 'postgres' user to run the server as")


pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(
        BIN is None,
        reason="PostgreSQL is not installed (apt-get install postgresql: "
        "/usr/lib/postgresql/<version>/bin/initdb, pg_ctl, postgres, psql, pgbench)",
    ),
    # One run, on the loop and data path `loble run` uses: a real server costs
    # seconds, and the data planes' byte moving is covered by the TLS test.
    pytest.mark.parametrize("anyio_backend", ["asyncio"], indirect=True),
]

CLIENTS, TRANSACTIONS = 8, 200
ROWS = 100_000
BOUND = 60.0
"""Seconds one client command may take (each takes one or two here)."""


@dataclass
class Postgres:
    port: int
    log: Path

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
        return ""


def as_server_user(user: pwd.struct_passwd | None) -> dict[str, Any]:
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


@pytest.fixture
def postgres(net: Any) -> Iterator[Postgres]:
    """A fresh server on 127.0.0.1 (port picked by the OS), stopped and removed on exit."""
    assert BIN is not None
    user = server_user()
    # Not pytest's tmp_path: its parents are private to root, closed to `postgres`.
    root = Path(tempfile.mkdtemp(prefix="loble-pg-"))
    data, log = root / "data", root / "server.log"
    run = as_server_user(user)
    try:
        if user is not None:
            os.chown(root, user.pw_uid, user.pw_gid)
        made = subprocess.run(
            [
                BIN / "initdb", "-D", data, "-U", "postgres", "--auth=trust",
                "-E", "UTF8", "--locale=C", "--no-sync",
            ],
            cwd=root, capture_output=True, timeout=BOUND, **run,
        )  # fmt: skip
        assert made.returncode == 0, f"initdb failed:\n{made.stderr.decode(errors='replace')}"
        server = Postgres(port=net.free_port(), log=log)
        with (data / "postgresql.conf").open("a", encoding="utf-8") as conf:
            # A throwaway server: durability off, so the test measures the wire.
            conf.write(
                f"listen_addresses = '127.0.0.1'\nport = {server.port}\n"
                f"unix_socket_directories = '{root}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
            )
        # -w: pg_ctl returns once the server accepts connections (or fails).
        started = subprocess.run(
            [BIN / "pg_ctl", "-D", data, "-l", log, "-w", "-t", "30", "start"],
            cwd=root, capture_output=True, timeout=BOUND, **run,
        )  # fmt: skip
        assert started.returncode == 0, f"postgres did not start:\n{server.log_tail()}"
        yield server
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(
                [BIN / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"],
                cwd=root, capture_output=True, timeout=BOUND, **run,
            )  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


CLIENT_ENV = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {
    "PGCONNECT_TIMEOUT": "10"
}


async def client(
    tool: str, port: int, *arguments: str, stdin: bytes | None = None, server: Postgres
) -> bytes:
    """Run ``tool`` (psql, pgbench) against 127.0.0.1:``port``; its stdout, or fail saying why."""
    assert BIN is not None
    command = [str(BIN / tool), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres"]
    if tool == "psql":
        command += ["-X", "-v", "ON_ERROR_STOP=1"]
    with anyio.fail_after(BOUND):
        done = await anyio.run_process(
            [*command, *arguments, "postgres"], input=stdin, check=False, env=CLIENT_ENV
        )
    assert done.returncode == 0, (
        f"{tool} {' '.join(arguments)} exited {done.returncode}:\n"
        f"{done.stderr.decode(errors='replace')}\nserver log:\n{server.log_tail()}"
    )
    return bytes(done.stdout)


async def only_completed(net: Any, daemon: Any, backend: str) -> dict[str, object]:
    """Once every connection has ended: Loble's figures for ``backend``, each
    connection through it having ended cleanly (no reset, no cut)."""
    await net.wait_for(lambda: daemon.open_connections == 0, what="every connection ended")
    figures: dict[str, object] = daemon.metrics.figures(backend)
    connections = figures["connections"]
    assert isinstance(connections, dict)
    assert set(connections) == {"completed"}, figures
    return figures


async def test_pgbench_through_loble(net: Any, postgres: Postgres) -> None:
    backend = f"127.0.0.1:{postgres.port}"
    async with net.loopback() as lab:
        daemon = await lab.daemon([backend])
        port = daemon.listen_address[1]

        await client("pgbench", port, "-i", "-q", "-s", "1", server=postgres)
        out = (
            await client(
                "pgbench", port, "-M", "prepared",
                "-c", str(CLIENTS), "-j", "2", "-t", str(TRANSACTIONS),
                server=postgres,
            )
        ).decode()  # fmt: skip
        total = CLIENTS * TRANSACTIONS
        processed = re.search(
            r"^number of transactions actually processed: (\d+)/(\d+)$", out, re.M
        )
        failed = re.search(r"^number of failed transactions: (\d+) ", out, re.M)
        assert processed and failed, out
        assert (int(processed[1]), int(processed[2]), int(failed[1])) == (total, total, 0), out

        # Asked directly, not through Loble: every transaction is there, once.
        row = await client(
            "psql", postgres.port, "-At", "-F", " ", "-c",
            "SELECT (SELECT count(*) FROM pgbench_history),"
            " (SELECT sum(delta) FROM pgbench_history),"
            " (SELECT sum(abalance) FROM pgbench_accounts),"
            " (SELECT sum(tbalance) FROM pgbench_tellers),"
            " (SELECT sum(bbalance) FROM pgbench_branches)",
            server=postgres,
        )  # fmt: skip
        count, *sums = row.split()
        assert int(count) == total, row
        assert len(set(sums)) == 1, f"history, accounts, tellers, branches disagree: {row!r}"
        figures = await only_completed(net, daemon, backend)
        print(
            f"\npgbench through Loble: {count.decode()} of {total} transactions, 0 failed;"
            f" {figures['connections']} connections"
        )


def copy_rows(count: int) -> tuple[bytes, bytes]:
    """``count`` rows in COPY's text format, as PostgreSQL writes them back (so the
    bytes out must equal the bytes in), and the md5 of the values they stand for,
    as the server computes it in :data:`STORED_MD5`."""
    text, values = [], []
    for number in range(count):
        word = hashlib.md5(b"%d" % number).hexdigest()
        if number % 97 == 0:
            text.append(f"{number}\t{word}\t\\N\n")
            values.append(f"{number}:{word}:~")
        else:
            # A tab and a backslash (escaped in the format), non-ASCII, a varying length.
            note = f"{word[: number % 33]}\t«{number % 1000}»\\ü"
            escaped = note.replace("\\", "\\\\").replace("\t", "\\t")
            text.append(f"{number}\t{word}\t{escaped}\n")
            values.append(f"{number}:{word}:{note}")
    return "".join(text).encode(), hashlib.md5("\n".join(values).encode()).hexdigest().encode()


STORED_MD5 = (
    "SELECT count(*), md5(string_agg(id || ':' || word || ':' || coalesce(note, '~'),"
    " E'\\n' ORDER BY id)) FROM items"
)


async def test_copy_in_and_out_through_loble(net: Any, postgres: Postgres) -> None:
    rows, values_md5 = copy_rows(ROWS)
    backend = f"127.0.0.1:{postgres.port}"
    async with net.loopback() as lab:
        daemon = await lab.daemon([backend])
        port = daemon.listen_address[1]

        created = await client(
            "psql", port, "-c", "CREATE TABLE items (id int PRIMARY KEY, word text, note text)",
            server=postgres,
        )  # fmt: skip
        assert created == b"CREATE TABLE\n", created
        copied_in = await client(
            "psql", port, "-c", "\\copy items from stdin", stdin=rows, server=postgres
        )
        assert copied_in == b"COPY %d\n" % ROWS, copied_in

        # Asked directly: the server holds exactly the rows sent, value for value.
        stored = await client(
            "psql", postgres.port, "-At", "-F", " ", "-c", STORED_MD5, server=postgres
        )
        assert stored.split() == [b"%d" % ROWS, values_md5], stored

        copied_out = await client(
            "psql", port, "-c", "\\copy (SELECT * FROM items ORDER BY id) to stdout",
            server=postgres,
        )  # fmt: skip
        assert len(copied_out) == len(rows)
        assert hashlib.md5(copied_out).digest() == hashlib.md5(rows).digest()

        figures = await only_completed(net, daemon, backend)
        assert isinstance(figures["bytes_to_backend"], int)
        assert isinstance(figures["bytes_to_client"], int)
        assert figures["bytes_to_backend"] > len(rows) and figures["bytes_to_client"] > len(rows)
        print(
            f"\nCOPY through Loble: {ROWS} rows, {len(rows)} bytes in and out, md5 equal;"
            f" {figures['connections']} connections"
        )
