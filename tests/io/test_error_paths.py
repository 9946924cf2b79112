"""Both data paths, every copy method, through the same failures: one table of what happened.

Each data path owns its sockets, so each could get an error path subtly
different from the other's. This test drives every data plane through the
same list of failures on real loopback sockets and records, per case, the
core's outcome (from the access log) and what the peer on the far side saw
(its bytes, then a clean end or a reset). The expected table is one and the
same for all of them.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

EXPECTED = {
    "completed": ("completed", "echo:payload|eof"),
    "backend reset": ("backend_reset", "reset"),
    "client reset": ("client_reset", "backend saw reset"),
    "backend half-close": ("completed", "hi|eof, backend got 'after'"),
    "every attempt refused": ("connect_failed", "eof"),
    "idle timeout": ("idle_timeout", "reset"),
}


async def ending(stream: Any) -> tuple[bytes, str]:
    """Everything the stream delivers, and how it ended: ``eof`` (FIN) or ``reset`` (RST)."""
    data = b""
    while True:
        try:
            data += await stream.receive()
        except anyio.EndOfStream:
            return data, "eof"
        except (anyio.BrokenResourceError, ConnectionResetError):
            return data, "reset"


class ScriptedBackend:
    """One listener whose every connection follows the script its first line names.

    ``echo``: answer what was read, after the client's EOF, then close;
    ``reset``: reset as soon as the line is read; ``greet``: send ``hi`` and
    EOF at once, then read until the client's EOF; ``wait``: read until the
    client's EOF or reset, and note which.
    """

    def __init__(self, reset: Any) -> None:
        self.seen: dict[str, str] = {}
        self.port = 0
        self.reset = reset

    async def serve(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        task_status.started()
        await listener.serve(self._handle)

    async def _handle(self, stream: Any) -> None:
        async with stream:
            line = b""
            try:
                while b"\n" not in line:
                    line += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError):
                return
            command, _, rest = line.partition(b"\n")
            try:
                if command == b"echo":
                    more, _ = await ending(stream)
                    await stream.send(b"echo:" + rest + more)
                    await stream.send_eof()
                    await ending(stream)
                elif command == b"reset":
                    self.reset(stream)  # closing now sends RST
                elif command == b"greet":
                    await stream.send(b"hi")
                    await stream.send_eof()
                    more, how = await ending(stream)
                    self.seen["greet"] = f"got {(rest + more).decode()!r}, {how}"
                elif command == b"wait":
                    _, how = await ending(stream)
                    self.seen["wait"] = how
            except (anyio.BrokenResourceError, ConnectionResetError, OSError):
                self.seen.setdefault(command.decode(), "broken")


async def test_every_data_plane_ends_the_same_failures_the_same_way(
    net: Any, data_plane: dict[str, str]
) -> None:
    found: dict[str, tuple[str, str]] = {}
    async with net.loopback() as lab:
        backend = ScriptedBackend(net.reset)
        await lab.tasks.start(backend.serve)
        daemon = await lab.daemon(
            [f"127.0.0.1:{backend.port}"],
            logging={"access_log": True},
            timeouts={"idle": 0.3},
            **data_plane,
        )
        refused = await lab.daemon(
            [f"127.0.0.1:{net.free_port()}"],
            logging={"access_log": True},
            balancer={"connect_retries": 0},
            **data_plane,
        )

        async def outcome_of(client: str) -> str:
            await net.wait_for(lambda: lab.logs.find("connection", client=client))
            (line,) = lab.logs.find("connection", client=client)
            return str(line["outcome"])

        with anyio.fail_after(20):
            async with await anyio.connect_tcp(*daemon.listen_address) as stream:
                client = client_of(stream)
                await stream.send(b"echo\npay")
                await stream.send(b"load")
                await stream.send_eof()
                data, how = await ending(stream)
                found["completed"] = (await outcome_of(client), f"{data.decode()}|{how}")

            async with await anyio.connect_tcp(*daemon.listen_address) as stream:
                client = client_of(stream)
                await stream.send(b"reset\n")
                data, how = await ending(stream)
                found["backend reset"] = (await outcome_of(client), how)

            stream = await anyio.connect_tcp(*daemon.listen_address)
            await stream.send(b"wait\nhalf an upl")
            await net.wait_for(lambda: daemon.core.statistics().backends[0].active_connections)
            client = client_of(stream)
            net.reset(stream)
            await stream.aclose()
            name = await outcome_of(client)
            await net.wait_for(lambda: "wait" in backend.seen)
            found["client reset"] = (name, f"backend saw {backend.seen['wait']}")

            async with await anyio.connect_tcp(*daemon.listen_address) as stream:
                client = client_of(stream)
                await stream.send(b"greet\n")
                data = await stream.receive()
                while data != b"hi":
                    data += await stream.receive()
                with pytest.raises(anyio.EndOfStream):
                    await stream.receive()
                await stream.send(b"after")  # the other direction still flows
                await stream.send_eof()
                await net.wait_for(lambda: "greet" in backend.seen)
                assert backend.seen["greet"] == "got 'after', eof"
                found["backend half-close"] = (
                    await outcome_of(client),
                    "hi|eof, backend got 'after'",
                )

            async with await anyio.connect_tcp(*refused.listen_address) as stream:
                client = client_of(stream)
                data, how = await ending(stream)
                found["every attempt refused"] = (await outcome_of(client), how)

            async with await anyio.connect_tcp(*daemon.listen_address) as stream:
                client = client_of(stream)
                await stream.send(b"wait\n")
                data, how = await ending(stream)  # nothing moves: the idle timeout ends it
                found["idle timeout"] = (await outcome_of(client), how)

    assert found == EXPECTED


def client_of(stream: Any) -> str:
    """The client's address as the access log writes it (asked while the socket is open)."""
    host, port = stream.extra(anyio.abc.SocketAttribute.local_address)[:2]
    return f"{host}:{port}"
