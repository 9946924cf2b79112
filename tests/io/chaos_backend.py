"""The chaos soak's backend: a greeting, then an echo, as a process of its own.

``python chaos_backend.py NAME PORT`` listens on 127.0.0.1:PORT (with
``SO_REUSEADDR`` and ``SO_REUSEPORT``: the soak keeps a placeholder socket
bound to the port so that no other socket takes it while this process is
dead), prints ``ready`` on stdout once listening, and serves every
connection the same way: it sends ``NAME`` (8 bytes), then echoes
everything it reads until the client's EOF, then closes.

A connection holds ``SO_LINGER`` 0 until its reply is complete, so however
this process dies (SIGKILL, a crash) the kernel ends its unfinished
connections with a reset, never with a FIN: a clean end that the proxy in
front passes on is then always a complete reply, and a client that sees a
short reply end cleanly has found the proxy's fault, not the backend's.
SIGUSR1 resets every connection open now (``SO_LINGER`` 0, then close) and
prints ``reset N connections`` once they are closed.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import struct
import sys

CHUNK = 65536
RESET = struct.pack("ii", 1, 0)
"""SO_LINGER on with a zero timeout: close sends RST."""
FINISH = struct.pack("ii", 0, 0)
"""SO_LINGER off: close sends what is left, then FIN."""


async def serve(name: bytes, port: int) -> None:
    loop = asyncio.get_running_loop()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(256)
    listener.setblocking(False)
    open_now: dict[socket.socket, asyncio.Task[None]] = {}
    reporting: set[asyncio.Task[None]] = set()

    def reset_all() -> None:
        tasks = []
        for conn, task in list(open_now.items()):
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
            task.cancel()  # its finally closes the socket: with linger 0, a reset
            tasks.append(task)
        report = loop.create_task(said_reset(tasks))
        reporting.add(report)  # a reference until it is done
        report.add_done_callback(reporting.discard)

    async def said_reset(tasks: list[asyncio.Task[None]]) -> None:
        await asyncio.gather(*tasks, return_exceptions=True)
        sys.stdout.write(f"reset {len(tasks)} connections\n")
        sys.stdout.flush()

    loop.add_signal_handler(signal.SIGUSR1, reset_all)

    async def handle(conn: socket.socket) -> None:
        try:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_sendall(conn, name)
            while data := await loop.sock_recv(conn, CHUNK):
                await loop.sock_sendall(conn, data)
            # The client's EOF, and every byte of the echo is in the kernel:
            # from here a close (or this process's death) ends it with FIN.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, FINISH)
        except OSError:
            pass  # reset by the proxy: the close below is a reset too
        finally:
            open_now.pop(conn, None)
            conn.close()

    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        try:
            conn, _ = await loop.sock_accept(listener)
        except OSError:
            continue  # a connection reset in the backlog (ECONNABORTED)
        conn.setblocking(False)
        open_now[conn] = loop.create_task(handle(conn))


def main() -> None:
    name = sys.argv[1].encode()
    assert len(name) == 8, name
    asyncio.run(serve(name, int(sys.argv[2])))


if __name__ == "__main__":
    main()
