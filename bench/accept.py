"""What one accept costs, two ways (a benchmark, not a test): issue 16's ``accept4``.

Loble accepts with the C ``_accept`` of the listening socket (``accept4``
with ``SOCK_CLOEXEC``: CPython passes no other flag), wraps the descriptor
in a ``socket.socket`` and makes it non-blocking (``ioctl(FIONBIO)``): two
system calls. ``accept4`` with ``SOCK_NONBLOCK | SOCK_CLOEXEC`` is one, but
Python can reach it only through ``ctypes``, which also has to hand back the
client's address (a ``sockaddr`` buffer, decoded here as Loble would have to).

For each round this fills a listener's backlog with ``--clients``
connections, accepts them all one way, then again the other way, and
prints the process's user and system CPU per accept (``getrusage``), each
way's median over the rounds, and the ratio.

    python bench/accept.py
    python bench/accept.py --rounds 9 --clients 2000
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import resource
import socket
import statistics
import struct
import sys
from collections.abc import Callable

SOCK_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0o4000)
SOCK_CLOEXEC = getattr(socket, "SOCK_CLOEXEC", 0o2000000)


def python_way(listener: socket.socket) -> Callable[[], tuple[socket.socket, object]]:
    """Loble's accept (``accept_batch``): C accept, a socket of known family, setblocking."""
    accept = listener._accept  # type: ignore[attr-defined]
    family = listener.family

    def one() -> tuple[socket.socket, object]:
        descriptor, address = accept()
        client = socket.socket(family, socket.SOCK_STREAM, 0, descriptor)
        client.setblocking(False)
        return client, address

    return one


def ctypes_way(
    listener: socket.socket, decode: bool = True
) -> Callable[[], tuple[socket.socket, object]]:
    """``accept4(SOCK_NONBLOCK | SOCK_CLOEXEC)`` through ctypes, the address decoded
    (or, with ``decode`` False, the raw buffer kept: decoded only if a log line asks)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    accept4 = libc.accept4
    accept4.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)
    accept4.restype = ctypes.c_int
    buffer = ctypes.create_string_buffer(128)
    length = ctypes.c_uint32(128)
    where, size = ctypes.addressof(buffer), ctypes.addressof(length)
    listening = listener.fileno()
    family = listener.family
    flags = SOCK_NONBLOCK | SOCK_CLOEXEC
    # The socket module's own constructor takes a type with SOCK_NONBLOCK as
    # "already non-blocking": no ioctl.
    kind = socket.SOCK_STREAM | SOCK_NONBLOCK
    unpack = struct.Struct("!H4s").unpack_from

    def one() -> tuple[socket.socket, object]:
        length.value = 128
        descriptor = accept4(listening, where, size, flags)
        if descriptor < 0:
            raise OSError(ctypes.get_errno(), "accept4")
        client = socket.socket(family, kind, 0, descriptor)
        if not decode:
            return client, buffer.raw
        port, packed = unpack(buffer.raw, 2)
        return client, (socket.inet_ntop(socket.AF_INET, packed), port)

    return one


def fill(port: int, clients: int) -> list[socket.socket]:
    """``clients`` connections to ``port``, all completed into the backlog."""
    made = []
    for _ in range(clients):
        made.append(socket.create_connection(("127.0.0.1", port)))
    return made


def measure(
    listener: socket.socket, way: Callable[[], tuple[socket.socket, object]], n: int
) -> float:
    """CPU seconds (user + system) per accept of ``n`` clients waiting in the backlog."""
    port = listener.getsockname()[1]
    peers = fill(port, n)
    accepted = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(n):
        accepted.append(way()[0])
    after = resource.getrusage(resource.RUSAGE_SELF)
    for sock in (*accepted, *peers):
        sock.close()
    return ((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)) / n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--clients", type=int, default=2000)
    args = parser.parse_args()
    if not sys.platform.startswith("linux"):
        print("accept4 is Linux only")
        return 2
    listener = socket.create_server(("127.0.0.1", 0), backlog=args.clients + 16)
    listener.setblocking(False)
    ways = {
        "python": python_way(listener),
        "accept4": ctypes_way(listener),
        "accept4-raw": ctypes_way(listener, decode=False),
    }
    # Both decode the same client address.
    check = socket.create_connection(listener.getsockname())
    expected = check.getsockname()[:2]
    for name, way in ways.items():
        client, address = way()
        assert name.endswith("-raw") or address == expected, (name, address, expected)
        client.close()
        check.close()
        check = socket.create_connection(listener.getsockname())
        expected = check.getsockname()[:2]
    check.close()
    results: dict[str, list[float]] = {name: [] for name in ways}
    for round_number in range(1, args.rounds + 1):
        for name, way in ways.items():
            cost = measure(listener, way, args.clients)
            results[name].append(cost)
            print(f"round {round_number} {name:8} {cost * 1e6:6.2f} us CPU per accept", flush=True)
    listener.close()
    medians = {name: statistics.median(costs) for name, costs in results.items()}
    labels = {
        "python": "_accept + setblocking (Loble)",
        "accept4": "ctypes accept4, address decoded",
        "accept4-raw": "ctypes accept4, address kept raw",
    }
    print(f"\nmedians of {args.rounds} interleaved rounds, {args.clients} clients each:")
    for name, cost in medians.items():
        ratio = cost / medians["python"]
        print(f"  {labels[name]:34} {cost * 1e6:6.2f} us per accept  {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
