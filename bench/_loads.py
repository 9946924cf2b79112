"""The loads: each runs against one listening port and returns a flat dict of figures.

* ``bulk1`` / ``bulk8``: ``iperf3 -c ... -J`` with 1 or 8 parallel streams;
  the figure is the receiver's ``end.sum_received.bits_per_second``.
* ``new_conns``: ``wrk -H "Connection: close"`` with 32 connections: every
  request is a fresh TCP connection through the proxy, so requests/s is new
  connections/s.
* ``keepalive``: ``wrk --latency`` with 32 persistent connections:
  requests/s and the latency percentiles.
* ``idle_rss``: open N client connections through the proxy to the idle
  holder, wait until the holder has accepted all N, and divide the growth of
  the proxy's RSS (summed over its processes) by N.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time
from typing import Any

from _procs import Registry, rss_kib
from _refs import Holder

__all__ = [
    "LOADS",
    "idle_rss",
    "parse_iperf",
    "parse_wrk",
    "run_iperf",
    "run_wrk",
]

LOADS = ("bulk1", "bulk8", "new_conns", "keepalive", "idle_rss")

_TIME_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_DURATION = r"([\d.]+)(us|ms|s|m|h)"


def _ms(value: str, unit: str) -> float:
    return float(value) * _TIME_UNITS[unit]


def parse_wrk(text: str) -> dict[str, Any]:
    """Requests/s, request count, errors and latency percentiles (in ms) from wrk's report."""
    result: dict[str, Any] = {}
    match = re.search(r"^Requests/sec:\s+([\d.]+)\s*$", text, re.M)
    if match is None:
        raise ValueError(f"no 'Requests/sec:' line in wrk's output: {text.strip()[-300:]!r}")
    result["requests_per_s"] = float(match.group(1))
    match = re.search(r"^\s*(\d+) requests in " + _DURATION + r",", text, re.M)
    if match is not None:
        result["requests"] = int(match.group(1))
        result["elapsed_s"] = _ms(match.group(2), match.group(3)) / 1e3
    match = re.search(r"^\s+Latency\s+" + _DURATION + r"\s+" + _DURATION, text, re.M)
    if match is not None:
        result["latency_avg_ms"] = _ms(match.group(1), match.group(2))
        result["latency_stdev_ms"] = _ms(match.group(3), match.group(4))
    for percent, value, unit in re.findall(
        r"^\s+(\d+(?:\.\d+)?)%\s+" + _DURATION + r"\s*$", text, re.M
    ):
        result[f"latency_p{float(percent):g}_ms"] = _ms(value, unit)
    errors = {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    match = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if match is not None:
        errors = dict(zip(errors, map(int, match.groups()), strict=True))
    result["socket_errors"] = errors
    match = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    result["non_2xx"] = int(match.group(1)) if match else 0
    return result


def run_wrk(
    reg: Registry,
    wrk: str,
    port: int,
    *,
    duration: float,
    connections: int,
    threads: int,
    close: bool,
) -> dict[str, Any]:
    argv = [wrk, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency"]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://127.0.0.1:{port}/")
    status, out, log = reg.run("wrk", argv, timeout=duration + 30)
    if status != 0:
        raise RuntimeError(f"wrk exited with {status}: {log or out.strip()[-300:]}")
    result = parse_wrk(out)
    bad = sum(result["socket_errors"].values()) + result["non_2xx"]
    if bad and bad > 0.01 * max(1, result.get("requests", 0)):
        result["warning"] = f"{bad} errors or non-2xx responses"
    return result


def parse_iperf(text: str) -> dict[str, Any]:
    """Gbit/s (receiver side) and retransmits from ``iperf3 -J`` output."""
    data = json.loads(text)
    if data.get("error"):
        raise RuntimeError(f"iperf3: {data['error']}")
    end = data["end"]
    received = end["sum_received"]
    sent = end.get("sum_sent", {})
    return {
        "gbit_per_s": received["bits_per_second"] / 1e9,
        "sender_gbit_per_s": sent.get("bits_per_second", 0.0) / 1e9,
        "retransmits": sent.get("retransmits"),
        "seconds": received.get("seconds"),
        "streams": len(end.get("streams", [])),
    }


def run_iperf(
    reg: Registry, iperf3: str, port: int, *, duration: float, streams: int
) -> dict[str, Any]:
    argv = [
        iperf3, "-c", "127.0.0.1", "-p", str(port), "-t", str(max(1, round(duration))),
        "-P", str(streams), "-J", "--connect-timeout", "5000",
    ]  # fmt: skip
    status, out, log = reg.run(f"iperf3-P{streams}", argv, timeout=duration + 30)
    if not out.strip():
        raise RuntimeError(f"iperf3 exited with {status} and no report: {log}")
    result = parse_iperf(out)
    if status != 0:
        raise RuntimeError(f"iperf3 exited with {status}: {log}")
    return result


def _wait_count(holder: Holder, predicate: Any, timeout: float, limit: float = 1e18) -> int:
    deadline = min(time.monotonic() + timeout, limit)
    count = holder.count()
    while not predicate(count) and time.monotonic() < deadline:
        time.sleep(0.01)
        count = holder.count()
    return count


def _open(port: int, sockets: list[socket.socket], count: int) -> None:
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(10.0)
        try:
            sock.connect(("127.0.0.1", port))
        except OSError:
            sock.close()
            raise
        sockets.append(sock)


def idle_rss(
    holder: Holder,
    pid: int,
    port: int,
    *,
    connections: int,
    batch: int = 64,
    timeout: float = 120.0,
) -> dict[str, Any]:
    """Memory per idle proxied connection: (RSS with N open - RSS before) / N.

    Connections open in batches smaller than the smallest listen backlog of
    the proxies (asyncio's default is 100), each batch waiting until the
    holder has them all, so no SYN is dropped and retried; the whole test
    gives up after *timeout* seconds.
    """
    limit = time.monotonic() + timeout
    sockets: list[socket.socket] = []
    try:
        if _wait_count(holder, lambda n: n == 0, 20.0) != 0:
            raise RuntimeError("the idle holder still holds connections from an earlier test")
        # A few connections first, so one-time lazy set-up is not charged to the N.
        _open(port, sockets, 10)
        _wait_count(holder, lambda n: n >= 10, 10.0)
        for sock in sockets:
            sock.close()
        sockets.clear()
        _wait_count(holder, lambda n: n == 0, 10.0)
        time.sleep(0.3)
        before = rss_kib(pid)
        started = time.monotonic()
        while len(sockets) < connections:
            _open(port, sockets, min(batch, connections - len(sockets)))
            target = len(sockets)
            held = _wait_count(holder, lambda n, t=target: n >= t, 20.0, limit)
            if held < target:
                raise RuntimeError(
                    f"only {held} of {target} connections reached the backend "
                    f"after {time.monotonic() - started:.0f} s"
                )
        opened_in = time.monotonic() - started
        time.sleep(1.0)  # let the proxy settle before reading its RSS
        after = rss_kib(pid)
        return {
            "bytes_per_conn": (after - before) * 1024 / connections,
            "rss_before_kib": before,
            "rss_after_kib": after,
            "connections": connections,
            "open_seconds": round(opened_in, 3),
        }
    finally:
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()
        _wait_count(holder, lambda n: n == 0, 20.0)
