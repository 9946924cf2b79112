"""Loble's memory when its peers stop reading (a benchmark: it prints figures, asserts nothing).

Two loads, each with ``N`` connections through a ``loble run`` child process:

* ``upload``: every client pushes data at a backend that never reads;
* ``download``: the backend pushes data at clients that never read.

Each pusher writes until its socket would block, round after round, until
nothing moves any more: every buffer on the way is full, Loble's included.
Loble's RSS (``VmRSS`` in ``/proc/PID/status``) is read before the
connections open, sampled all through the push (the peak), and read again
once the peers have closed and Loble holds no connection. Socket buffers and
pipes are kernel memory, outside RSS; what a stalled direction holds in
Python (a ``recv_into`` buffer of 64 KiB) is inside it. So the figure per
connection says whether Loble's memory is bounded by its own fixed buffers,
or grows with what the peers push.

Run it alone on the machine (it fills socket buffers with ``N`` x 2 stalled
hops)::

    flock -x /tmp/loble-bench.lock python bench/rss.py
    python bench/rss.py --conns 100 --copy recv_into --loads upload
    python bench/rss.py --markdown bench/results/rss.md --json bench/results/rss.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from _procs import Registry, free_port, raise_nofile, wait_listening

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
CHUNK = bytes(range(256)) * 256
"""What a pusher writes at a time: 64 KiB."""
BUFFER_KIB = 64
"""Loble's ``recv_into`` buffer per direction (``loble.io._copy.CHUNK_SIZE``), in KiB."""
BATCH = 64
"""Connections opened at a time, each batch accepted by the backend before the next."""
STILL_ROUNDS = 20
"""Push rounds in a row that move nothing (10 ms apart) before the buffers count as full."""
SETTLE = 1.0
"""Seconds left for Loble to finish what it was doing before RSS is read."""
TIMEOUT = 120.0
"""Seconds any one phase may take."""


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def tcp_kernel_kib() -> int:
    """Memory of every TCP socket on the machine (``/proc/net/sockstat``), in KiB."""
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            fields = line.split()
            return int(fields[fields.index("mem") + 1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    return 0


def scrape(port: int) -> dict[str, float]:
    """The unlabelled samples of Loble's metrics endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                samples[name] = float(value)
    return samples


def wait(condition: Any, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.01)


class Loble:
    """``loble run`` in front of one backend port, its copy method chosen by ``LOBLE_COPY``."""

    def __init__(
        self, registry: Registry, workdir: Path, backend: int, copy: str, args: argparse.Namespace
    ) -> None:
        self.port = free_port()
        self.metrics = free_port()
        config = workdir / f"loble-{copy}.toml"
        config.write_text(
            f'[listener]\naddress = "127.0.0.1:{self.port}"\nbacklog = 4096\n'
            f'[runtime]\nbackend = "{args.runtime}"\n'
            "[timeouts]\nidle = 3600.0\n"
            f'[metrics]\nenabled = true\naddress = "127.0.0.1:{self.metrics}"\n'
            '[logging]\nlevel = "warning"\n'
            f'[[backends]]\naddress = "127.0.0.1:{backend}"\n',
            encoding="utf-8",
        )
        env = {"LOBLE_COPY": copy}
        if args.data_path:
            env["LOBLE_DATA_PATH"] = args.data_path
        self.started = registry.start(
            f"loble-{copy}", [args.loble_python, "-m", "loble", "run", "-c", str(config)], env=env
        )
        wait_listening(self.port, self.started, 30.0)
        wait_listening(self.metrics, self.started, 30.0)
        self.pid = self.started.pid
        self.failed_scrapes = 0

    def rss(self) -> int:
        return vm_rss_kib(self.pid)

    def in_flight(self) -> float:
        """Connections open at Loble, from its metrics endpoint. With the machine's TCP
        memory exhausted (``tcp_mem``), a scrape can be reset: counted, and tried again."""
        for _ in range(20):
            try:
                return scrape(self.metrics)["loble_connections_in_flight"]
            except OSError:
                self.failed_scrapes += 1
                time.sleep(0.1)  # the interval between two tries
        raise RuntimeError("the metrics endpoint failed 20 scrapes in a row")


def accept_all(listener: socket.socket, wanted: int, into: list[socket.socket]) -> None:
    def more() -> bool:
        with contextlib.suppress(BlockingIOError):
            while len(into) < wanted:
                peer, _ = listener.accept()
                peer.setblocking(False)
                into.append(peer)
        return len(into) >= wanted

    wait(more, f"{wanted} backend connections")


def open_connections(
    loble: Loble, listener: socket.socket, count: int
) -> tuple[list[socket.socket], list[socket.socket]]:
    clients: list[socket.socket] = []
    backends: list[socket.socket] = []
    while len(clients) < count:
        for _ in range(min(BATCH, count - len(clients))):
            client = socket.create_connection(("127.0.0.1", loble.port), timeout=10)
            client.setblocking(False)
            clients.append(client)
        accept_all(listener, len(clients), backends)
    return clients, backends


def push_until_full(pushers: list[socket.socket], loble: Loble) -> tuple[int, int]:
    """Write from every pusher until nothing moves; return (bytes pushed, peak RSS in KiB)."""
    pushed = 0
    peak = loble.rss()
    still = 0
    deadline = time.monotonic() + TIMEOUT
    while still < STILL_ROUNDS:
        if time.monotonic() > deadline:
            raise RuntimeError("the buffers never filled")
        moved = 0
        for sock in pushers:
            with contextlib.suppress(BlockingIOError):
                while True:
                    sent = sock.send(CHUNK)
                    moved += sent
                    if sent < len(CHUNK):
                        break
        pushed += moved
        peak = max(peak, loble.rss())
        still = still + 1 if moved == 0 else 0
        time.sleep(0.01)  # the interval between two push rounds
    time.sleep(SETTLE)
    return pushed, max(peak, loble.rss())


def tcp_pressure_kib() -> int:
    """Where the kernel starts to squeeze TCP memory (``tcp_mem``'s second figure), in KiB."""
    pages = Path("/proc/sys/net/ipv4/tcp_mem").read_text().split()[1]
    return int(pages) * os.sysconf("SC_PAGE_SIZE") // 1024


def one_run(
    registry: Registry, workdir: Path, load: str, copy: str, count: int, args: argparse.Namespace
) -> dict[str, Any]:
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    listener.setblocking(False)
    loble = Loble(registry, workdir, listener.getsockname()[1], copy, args)
    rounds: list[dict[str, Any]] = []
    try:
        # Lazy one-time set-up (imports, the scratch buffer, the endpoint) is not
        # charged to the connections: a few full round trips and a scrape first.
        warm_clients, warm_backends = open_connections(loble, listener, 8)
        for client, backend in zip(warm_clients, warm_backends, strict=True):
            client.setblocking(True)
            client.sendall(CHUNK)
            backend.setblocking(True)
            got = 0
            while got < len(CHUNK):
                got += len(backend.recv(len(CHUNK)))
            client.close()
            backend.close()
        wait(lambda: loble.in_flight() == 0, "the warm-up connections closed")
        time.sleep(SETTLE)
        before = loble.rss()
        kernel_before = tcp_kernel_kib()
        fds_before = len(os.listdir(f"/proc/{loble.pid}/fd"))
        # Twice in the same process: a second round that peaks no higher shows
        # the memory is reused, not leaked, whatever the first left allocated.
        for _ in range(args.rounds):
            clients, backends = open_connections(loble, listener, count)
            opened = loble.rss()
            pushers = clients if load == "upload" else backends
            pushed, peak = push_until_full(pushers, loble)
            kernel_full = tcp_kernel_kib()
            fds_full = len(os.listdir(f"/proc/{loble.pid}/fd"))
            in_flight = loble.in_flight()
            for sock in clients + backends:
                sock.close()
            wait(lambda: loble.in_flight() == 0, "Loble to close every connection")
            time.sleep(SETTLE)
            rounds.append(
                {
                    "rss_open_kib": opened,
                    "rss_peak_kib": peak,
                    "rss_after_kib": loble.rss(),
                    "pushed_bytes": pushed,
                    "kernel_tcp_kib": kernel_full - kernel_before,
                    "kernel_tcp_pressure": kernel_full >= tcp_pressure_kib(),
                    "fds": fds_full - fds_before,
                    "in_flight": in_flight,
                }
            )
    finally:
        registry.stop(loble.started)
        listener.close()
    first, last = rounds[0], rounds[-1]
    return {
        "load": load,
        "copy": copy,
        "connections": count,
        "rss_before_kib": before,
        "rss_open_kib": first["rss_open_kib"],
        "rss_peak_kib": first["rss_peak_kib"],
        "rss_after_kib": first["rss_after_kib"],
        "rss_last_peak_kib": last["rss_peak_kib"],
        "rss_last_after_kib": last["rss_after_kib"],
        "per_conn_open_kib": (first["rss_open_kib"] - before) / count,
        "per_conn_peak_kib": (first["rss_peak_kib"] - before) / count,
        "per_conn_after_kib": (first["rss_after_kib"] - before) / count,
        "per_conn_last_growth_kib": (last["rss_peak_kib"] - first["rss_peak_kib"]) / count,
        "per_conn_pushed_kib": first["pushed_bytes"] / 1024 / count,
        "kernel_tcp_per_conn_kib": first["kernel_tcp_kib"] / count,
        "kernel_tcp_pressure": first["kernel_tcp_pressure"],
        "fds_per_conn_at_peak": first["fds"] / count,
        "failed_scrapes": loble.failed_scrapes,
        "rounds": rounds,
    }


COLUMNS = (
    ("load", "load", "{}"),
    ("copy", "copy", "{}"),
    ("connections", "conns", "{}"),
    ("rss_before_kib", "RSS before (MiB)", "mib"),
    ("rss_peak_kib", "RSS peak (MiB)", "mib"),
    ("rss_after_kib", "RSS after (MiB)", "mib"),
    ("per_conn_open_kib", "KiB/conn open", "{:.1f}"),
    ("per_conn_peak_kib", "KiB/conn peak", "{:.1f}"),
    ("buffer_ratio", "peak / 64 KiB", "{:.2f}"),
    ("per_conn_after_kib", "KiB/conn after", "{:.1f}"),
    ("per_conn_last_growth_kib", "KiB/conn more, last round", "{:+.1f}"),
    ("per_conn_pushed_kib", "KiB pushed/conn", "{:.0f}"),
    ("kernel_tcp_per_conn_kib", "kernel TCP KiB/conn", "kernel"),
    ("fds_per_conn_at_peak", "fds/conn", "{:.1f}"),
)


def cell(result: dict[str, Any], key: str, form: str) -> str:
    value = result["per_conn_peak_kib"] / BUFFER_KIB if key == "buffer_ratio" else result[key]
    if form == "mib":
        return f"{value / 1024:.1f}"
    if form == "kernel":  # marked when the kernel squeezed TCP memory (tcp_mem)
        return f"{value:.0f}" + (" *" if result["kernel_tcp_pressure"] else "")
    return form.format(value)


def table(results: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    rows = ["| " + " | ".join(cell(r, k, f) for k, _, f in COLUMNS) + " |" for r in results]
    return "\n".join([head, rule, *rows])


def commit() -> str:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, check=True
        )
        return out.stdout.decode().strip()
    return ""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--conns", default="100,1000", help="connection counts (100,1000)")
    parser.add_argument("--copy", default="auto,recv_into,splice", help="LOBLE_COPY values")
    parser.add_argument("--loads", default="upload,download", help="upload and/or download")
    parser.add_argument(
        "--rounds", type=int, default=2, help="fill-and-close rounds in one Loble process (2)"
    )
    parser.add_argument("--runtime", default="asyncio", help="[runtime] backend (asyncio)")
    parser.add_argument("--data-path", default="", help="LOBLE_DATA_PATH (the default path)")
    parser.add_argument("--loble-python", default=sys.executable, help="python that runs loble")
    parser.add_argument("--json", type=Path, help="write every figure as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the table as Markdown here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counts = [int(n) for n in args.conns.split(",")]
    nofile = raise_nofile(4 * max(counts) + 1024)
    if nofile < 4 * max(counts) + 256:
        print(f"error: RLIMIT_NOFILE is {nofile}: too low for {max(counts)} connections")
        return 1
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="loble-rss-") as tmp:
        registry = Registry(Path(tmp))
        try:
            for load in args.loads.split(","):
                for count in counts:
                    for copy in args.copy.split(","):
                        began = time.monotonic()
                        result = one_run(registry, Path(tmp), load, copy, count, args)
                        result["seconds"] = round(time.monotonic() - began, 1)
                        results.append(result)
                        print(
                            f"{load:8} {copy:9} {count:5} conns: RSS {result['rss_before_kib']}"
                            f" -> peak {result['rss_peak_kib']} -> after"
                            f" {result['rss_after_kib']} KiB;"
                            f" {result['per_conn_peak_kib']:.1f} KiB/conn at the peak,"
                            f" {result['per_conn_pushed_kib']:.0f} KiB pushed/conn"
                            f" ({result['seconds']} s)",
                            flush=True,
                        )
        finally:
            registry.close()
    print()
    print(table(results))
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    setting = (
        f"{when}, commit {commit()}, Python {platform.python_version()}, "
        f"runtime {args.runtime}, data path {args.data_path or 'default'}"
    )
    if args.json:
        document = {"when": when, "commit": commit(), "settings": vars(args), "results": results}
        args.json.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    if args.markdown:
        args.markdown.write_text(
            f"# Loble's RSS with peers that stop reading\n\n{setting}; "
            "`python bench/rss.py`.\n\n" + table(results) + "\n",
            encoding="utf-8",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
