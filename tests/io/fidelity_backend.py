"""One backend of the fidelity replay (tests/io/fidelity.py), as a process of its own.

``python fidelity_backend.py NAME PORT TOUCH [--standby]`` serves 127.0.0.1:PORT
(``SO_REUSEADDR`` and ``SO_REUSEPORT``: the harness keeps a placeholder
socket bound to the port, never listening, so a connect is refused while
nothing listens and no other socket takes the port), prints ``ready``, then
reads one command a line on stdin and answers ``ok COMMAND`` once it is in
force. ``--standby`` starts with nothing listening: the process that takes
over after a ``kill`` (the harness SIGKILLs the old one, then tells this one
what to be).

The protocol, the server speaking first: the backend sends ``NAME`` (8 bytes),
the client answers with a header (``HEADER``: a mode, a deadline and a reset
instant, on ``time.monotonic()``, which every process on the host shares,
and the number of the backend the simulation connected it to, 0 for none);
the backend sends a heartbeat ``.`` every ``TOUCH`` seconds (the simulator's
touches: bytes flowing, so a long stream is not idle) until the deadline.

* mode ``B``, the backend ends: at the deadline it sends ``#`` and a FIN,
  then reads until the client's FIN and closes. It reads every byte the
  client sends as it comes, so a kill finds nothing unread: a FIN.
* mode ``C``, the client ends: the client sends one byte more, which the
  backend leaves unread (it waits for the client's FIN with ``POLLRDHUP``,
  without reading), then at the deadline its FIN; the backend then reads
  everything, sends ``#`` and closes. A kill finds the byte unread: the
  kernel resets the connection, as the simulator's ``unread = "senders"``.
* mode ``R``: a stream the simulator's ``reset`` backend cut at the reset
  instant. A backend in ``reset`` when it accepted the connection resets it
  then; any other treats it as ``B``. A backend in ``reset`` given a
  connection the simulation put on another backend draws for itself, as
  the simulator does: with the fault's probability it resets the stream at
  a uniform point of it (its own ``random.Random``, seeded by its name).

A client sees ``#`` then a FIN: complete; a FIN without ``#``: truncated.

Commands (each puts the backend in one behaviour, whatever it was in):

* ``up``: listening, serving.
* ``down``: the listener closed (connects refused), connections run on
  (a flapping backend's down half).
* ``crash``: the listener closed, every open connection reset.
* ``reset PROBABILITY``: every open connection reset; new ones accepted (mode ``R``).
* ``blackhole``: connects hang: the listener is replaced by a *sink* whose
  accept queue (backlog 0) is filled by a connection of this process's own,
  so the kernel drops each SYN as it does on a full backlog; established
  connections run on.
* ``host_down``: as ``blackhole``, and every open connection goes silent for
  good: nothing more is sent or answered on it (the kernel still ACKs what
  arrives, as the peer of a dead host cannot tell before its retransmissions
  give up, far beyond any idle timeout).
* ``accept_hang``: the listener stays open and ``accept()`` is no longer
  called: the kernel completes handshakes into the backlog (4096). Leaving
  it restarts the server: the old listener is closed, which resets the
  connections waiting in its backlog, and a new one listens.
* ``slow DELAY``: the greeting, and the answer to a client's FIN, come
  ``DELAY`` seconds late (the handshake cannot be: the kernel completes it).
* ``capacity LIMIT``: the listener is closed while ``LIMIT`` connections are
  open, and listens again below that.
* ``quit``: exit.
"""

from __future__ import annotations

import contextlib
import math
import random
import select
import socket
import struct
import sys
import threading
import time

HEADER = struct.Struct("!cddH")
"""The client's header: mode (B, C or R), deadline, reset instant (monotonic
seconds), the simulated backend's number (0: none)."""
UNREAD = b"u"
"""The byte a mode-C client sends after its header, which the backend leaves unread."""
HEARTBEAT = b"."
TRAILER = b"#"
RESET = struct.pack("ii", 1, 0)
"""SO_LINGER on with a zero timeout: close sends RST."""
BACKLOG = 4096
CHUNK = 65536


class Connection:
    __slots__ = ("doomed", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.doomed = False


class Backend:
    def __init__(self, name: bytes, port: int, touch: float) -> None:
        self.name = name
        self.number = int(name[2:])
        self.rng = random.Random(name)
        self.probability = 0.0
        self.port = port
        self.touch = touch
        self.lock = threading.Condition()
        self.listener: socket.socket | None = None
        self.sink: list[socket.socket] = []
        self.behaviour = "dead"
        self.delay = 0.0
        self.limit = 0
        self.accepting = False
        self.open: dict[Connection, None] = {}
        self.hung: set[Connection] = set()
        self.forever = threading.Event()

    # -- sockets ---------------------------------------------------------------------------

    def _socket(self) -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", self.port))
        return sock

    def _listen(self) -> None:
        if self.listener is None:
            listener = self._socket()
            listener.listen(BACKLOG)
            listener.setblocking(False)
            self.listener = listener
            self.lock.notify_all()

    def _unlisten(self) -> None:
        # shutdown() stops listening at once, even while the accept thread
        # polls the socket (a close would wait for its poll to return), and
        # resets the connections left in the backlog.
        listener, self.listener = self.listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()

    def _open_sink(self) -> None:
        if not self.sink:
            sink = self._socket()
            sink.listen(0)
            # One connection of our own fills its queue (backlog 0 holds one).
            filler = socket.create_connection(("127.0.0.1", self.port), timeout=1.0)
            self.sink = [sink, filler]

    def _close_sink(self) -> None:
        for sock in self.sink:
            sock.close()
        self.sink = []

    def _reset_all(self) -> None:
        for connection in list(self.open):
            if connection in self.hung:
                continue
            connection.doomed = True
            with contextlib.suppress(OSError):
                connection.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
                # Wakes its thread (which closes it: with linger 0, a RST) and
                # sends nothing itself.
                connection.sock.shutdown(socket.SHUT_RD)

    # -- commands --------------------------------------------------------------------------

    def command(self, line: str) -> None:
        words = line.split()
        name = words[0]
        with self.lock:
            leaving = self.behaviour
            if leaving == "accept_hang" and name != "accept_hang":
                self._unlisten()  # the restart: the waiting backlog is reset
            if name in ("blackhole", "host_down"):
                # Nothing listens for the microseconds between the two: a
                # connect then is refused, never accepted by the sink.
                self._unlisten()
                self._open_sink()
                if name == "host_down":
                    self.hung.update(self.open)
            else:
                if name in ("down", "crash"):
                    self._unlisten()
                else:
                    self._listen()
                self._close_sink()
            if name in ("crash", "reset"):
                self._reset_all()
            self.behaviour = name
            self.delay = float(words[1]) if name == "slow" else 0.0
            self.limit = int(words[1]) if name == "capacity" else 0
            self.probability = float(words[1]) if name == "reset" else 0.0
            self.accepting = name != "accept_hang"
            self._check_capacity()
            self.lock.notify_all()

    def _check_capacity(self) -> None:
        if self.behaviour != "capacity":
            return
        if len(self.open) >= self.limit:
            self._unlisten()
        else:
            self._listen()

    # -- serving ---------------------------------------------------------------------------

    def accept_loop(self) -> None:
        while True:
            with self.lock:
                while self.listener is None or not self.accepting:
                    self.lock.wait()
                listener = self.listener
                poller = select.poll()  # a new one: the last one's socket may be closed
                poller.register(listener, select.POLLIN)
            ready = poller.poll(100)
            if not ready:
                continue
            with self.lock:
                if listener is not self.listener or not self.accepting:
                    continue
                try:
                    sock, _ = listener.accept()
                except OSError:
                    continue
                sock.setblocking(True)
                connection = Connection(sock)
                self.open[connection] = None
                slow = self.delay if self.behaviour == "slow" else 0.0
                resets = self.probability if self.behaviour == "reset" else None
                self._check_capacity()
            threading.Thread(
                target=self.serve, args=(connection, slow, resets), daemon=True
            ).start()

    def _send(self, connection: Connection, data: bytes) -> bool:
        """Send unless the connection is hung or doomed; False if it is."""
        with self.lock:
            if connection in self.hung or connection.doomed:
                return False
            connection.sock.sendall(data)
            return True

    def serve(self, connection: Connection, slow: float, resets: float | None) -> None:
        sock = connection.sock
        try:
            if slow:
                time.sleep(slow)
            if not self._send(connection, self.name):
                return
            header = b""
            while len(header) < HEADER.size:
                data = sock.recv(HEADER.size - len(header))
                if not data:
                    return
                header += data
            raw_mode, deadline, reset_at, simulated = HEADER.unpack(header)
            mode = raw_mode.decode()
            if resets is not None and simulated != self.number:
                # The simulation put it elsewhere: draw as a resetting backend does.
                with self.lock:
                    cut = self.rng.random() < resets
                    fraction = self.rng.random()
                if cut:
                    now = time.monotonic()
                    mode, reset_at = "R", now + max(0.0, deadline - now) * fraction
            if mode == "R":
                if resets is not None:
                    deadline = reset_at
                else:
                    mode = "B"
            self._run(connection, mode, deadline, slow)
        except OSError:
            pass  # reset by the proxy
        finally:
            self._finish(connection)

    def _run(self, connection: Connection, mode: str, deadline: float, slow: float) -> None:
        sock = connection.sock
        poller = select.poll()
        mask = select.POLLRDHUP if mode == "C" else select.POLLIN | select.POLLRDHUP
        poller.register(sock, mask)
        beat = time.monotonic() + self.touch if self.touch > 0 else math.inf
        if beat >= deadline:
            beat = math.inf
        while True:
            now = time.monotonic()
            if connection.doomed or connection in self.hung:
                return
            if now >= beat:
                if not self._send(connection, HEARTBEAT):
                    return
                beat += self.touch
                if beat >= deadline:
                    beat = math.inf
                continue
            if mode != "C" and now >= deadline:
                break
            wake = min(beat, deadline) if mode != "C" else beat
            timeout = -1 if wake == math.inf else max(0, int((wake - now) * 1000) + 1)
            events = poller.poll(timeout)
            if connection.doomed or connection in self.hung:
                return
            if not events:
                continue
            if mode == "C":
                # The client's FIN (or an error): read what it left, answer, close.
                if slow:
                    time.sleep(slow)
                _drain(sock)
                self._send(connection, TRAILER)
                return
            if not sock.recv(CHUNK):
                return  # the client's side ended early: close
        if mode == "R":
            connection.doomed = True
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
            return
        if not self._send(connection, TRAILER):
            return
        sock.shutdown(socket.SHUT_WR)
        _drain(sock)

    def _finish(self, connection: Connection) -> None:
        with self.lock:
            hung = connection in self.hung
        if hung:
            self.forever.wait()  # silent for good: never closed, never answered
            return
        with self.lock:
            self.open.pop(connection, None)
            connection.sock.close()
            self._check_capacity()


def _drain(sock: socket.socket) -> None:
    """Read until EOF (a reset ends it too)."""
    with contextlib.suppress(OSError):
        while sock.recv(CHUNK):
            pass


def main() -> None:
    name = sys.argv[1].encode()
    assert len(name) == 8, name
    backend = Backend(name, int(sys.argv[2]), float(sys.argv[3]))
    if "--standby" not in sys.argv[4:]:
        backend.command("up")
    threading.Thread(target=backend.accept_loop, daemon=True).start()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        if line.strip() == "quit":
            break
        backend.command(line)
        sys.stdout.write(f"ok {line.strip()}\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
