"""The least Python an L4 proxy can run per wakeup: the floor Loble is measured against.

Not Loble and not a product: no core, no health, no timeouts, no half-close,
no backpressure (a write that would block ends the connection, and the
rest of a partial write is lost: it is measured with request-sized messages
only, and ``bench/cpu.py`` reports wrk's errors), one backend.
An ``epoll`` loop that accepts, connects, and for each readable socket does
one ``recv_into`` a shared buffer and one ``send`` to its peer: the system
calls every proxy makes, and as little interpreter work around them as
Python allows. ``bench/cpu.py`` runs it beside HAProxy and Loble; the CPU it
spends per request is what any Python proxy pays before its own logic.

    python bench/floor_proxy.py LISTEN_PORT BACKEND_PORT
"""

from __future__ import annotations

import select
import signal
import socket
import sys
from types import FrameType

NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def serve(listen_port: int, backend_port: int) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(*NODELAY)  # inherited by accepted sockets on Linux
    listener.bind(("127.0.0.1", listen_port))
    listener.listen(4096)
    listener.setblocking(False)
    listening = listener.fileno()
    epoll = select.epoll()
    epoll.register(listening, select.EPOLLIN)
    buffer = memoryview(bytearray(65_536))
    peers: dict[int, tuple[socket.socket, socket.socket]] = {}
    while True:
        for fd, _ in epoll.poll():
            if fd == listening:
                accept(listener, backend_port, epoll, peers)
                continue
            pair = peers.get(fd)
            if pair is None:
                continue
            source, sink = pair
            try:
                read = source.recv_into(buffer)
            except BlockingIOError:
                continue
            except OSError:
                read = 0
            if read:
                try:
                    sink.send(buffer[:read])
                    continue
                except OSError:
                    pass
            for sock in pair:  # EOF or an error: close both
                peers.pop(sock.fileno(), None)
                sock.close()


def accept(
    listener: socket.socket,
    backend_port: int,
    epoll: select.epoll,
    peers: dict[int, tuple[socket.socket, socket.socket]],
) -> None:
    while True:
        try:
            client, _ = listener.accept()
        except BlockingIOError:
            return
        client.setblocking(False)
        backend = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        backend.setsockopt(*NODELAY)
        backend.connect_ex(("127.0.0.1", backend_port))  # loopback: done, or nearly
        peers[client.fileno()] = (client, backend)
        peers[backend.fileno()] = (backend, client)
        epoll.register(client.fileno(), select.EPOLLIN)
        epoll.register(backend.fileno(), select.EPOLLIN)


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _stop)
    serve(int(sys.argv[1]), int(sys.argv[2]))
