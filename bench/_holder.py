"""An idle TCP backend for the memory test: accept connections and hold them open.

Run as ``python _holder.py``. It binds 127.0.0.1 on a port the OS picks, prints
that port on its first stdout line, then answers every stdin line with the
number of connections it holds open right now (one number per line). It never
sends a byte on a held connection and drops one only when the peer closes it.
Exits when stdin closes. A single ``selectors`` loop keeps it cheap and exact.
"""

from __future__ import annotations

import os
import resource
import selectors
import socket
import sys


def main() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    listener.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "listen")
    stdin = sys.stdin.fileno()
    selector.register(stdin, selectors.EVENT_READ, "control")
    held: set[socket.socket] = set()
    print(listener.getsockname()[1], flush=True)
    pending = b""
    while True:
        for key, _ in selector.select():
            if key.data == "listen":
                for _ in range(256):
                    try:
                        conn, _addr = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:  # out of descriptors: leave it in the backlog
                        break
                    conn.setblocking(False)
                    selector.register(conn, selectors.EVENT_READ, "held")
                    held.add(conn)
            elif key.data == "control":
                chunk = os.read(stdin, 4096)
                if not chunk:
                    return 0
                pending += chunk
                while b"\n" in pending:
                    _line, pending = pending.split(b"\n", 1)
                    sys.stdout.write(f"{len(held)}\n")
                    sys.stdout.flush()
            else:
                peer = key.fileobj
                assert isinstance(peer, socket.socket)
                try:
                    data = peer.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    selector.unregister(peer)
                    held.discard(peer)
                    peer.close()


if __name__ == "__main__":
    sys.exit(main())
