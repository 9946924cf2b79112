"""A stream cut short reaches the far side as a reset; a completed one as FIN.

The rule is the core's (``RESET_OUTCOMES``, carried by each
``CloseConnection``); these tests check that every data path and copy method
puts it on the wire, for each way a stream ends: completed, cut at the drain
deadline, ended by the idle timeout, reset by a peer. A raw stream has no
framing of its own, so a FIN after a cut would tell a client reading to the
end that the truncated transfer was whole.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from loble.core import Outcome

from .conftest import outcomes

pytestmark = pytest.mark.anyio

CHUNK = b"x" * 65536
"""What the streaming backend sends before it stalls: a transfer begun, not finished."""


async def ending(stream: Any) -> tuple[int, str]:
    """Bytes the stream delivers, and how it ended: ``eof`` (FIN) or ``reset`` (RST)."""
    received = 0
    while True:
        try:
            received += len(await stream.receive())
        except anyio.EndOfStream:
            return received, "eof"
        except (anyio.BrokenResourceError, ConnectionResetError):
            return received, "reset"


class Recorder:
    """A backend that notes how each of its connections ended.

    ``stream``: send :data:`CHUNK`, then keep the connection open and silent
    (a transfer that stalls); ``echo``: answer what it read, after the client's
    EOF, then EOF; ``quiet``: say nothing. Every mode reads until the client's
    EOF or reset and records which, in :attr:`endings`.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.port = 0
        self.endings: list[str] = []
        self.accepted = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def serve(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        task_status.started()
        await listener.serve(self._handle)

    async def _handle(self, stream: Any) -> None:
        self.accepted += 1
        async with stream:
            try:
                if self.mode == "stream":
                    await stream.send(CHUNK)
                data = b""
                while True:
                    try:
                        data += await stream.receive()
                    except anyio.EndOfStream:
                        how = "eof"
                        break
                    except (anyio.BrokenResourceError, ConnectionResetError):
                        how = "reset"
                        break
                if self.mode == "echo" and how == "eof":
                    await stream.send(b"echo:" + data)
                    await stream.send_eof()
                    await ending(stream)  # close after the client, never with unread data
            except (anyio.BrokenResourceError, ConnectionResetError, OSError):
                how = "reset"
            self.endings.append(how)


async def test_a_completed_exchange_still_ends_with_fin_both_ways(
    net: Any, data_plane: dict[str, str]
) -> None:
    async with net.loopback() as lab:
        backend = Recorder("echo")
        await lab.tasks.start(backend.serve)
        daemon = await lab.daemon([backend.address], **data_plane)
        with anyio.fail_after(10):
            async with await anyio.connect_tcp(*daemon.listen_address) as stream:
                await stream.send(b"payload")
                await stream.send_eof()
                data = b""
                with pytest.raises(anyio.EndOfStream):  # FIN, not a reset
                    while True:
                        data += await stream.receive()
                assert data == b"echo:payload"
        await net.wait_for(lambda: backend.endings == ["eof"], what="the backend saw the EOF")
        await net.wait_for(lambda: outcomes(daemon, Outcome.COMPLETED) == 1)


async def test_a_stream_cut_at_the_drain_deadline_reaches_both_sides_as_a_reset(
    net: Any, data_plane: dict[str, str]
) -> None:
    async with net.loopback() as lab:
        backend = Recorder("stream")
        await lab.tasks.start(backend.serve)
        daemon = await lab.daemon([backend.address], timeouts={"drain": 0.2}, **data_plane)
        with anyio.fail_after(10):
            async with await anyio.connect_tcp(*daemon.listen_address) as stream:
                # A download under way: the first bytes arrive, the rest never will.
                received = 0
                while received < len(CHUNK):
                    received += len(await stream.receive())
                daemon.shutdown()  # the drain deadline passes with the stream still open
                more, how = await ending(stream)
                assert (received + more, how) == (len(CHUNK), "reset")  # a FIN would look whole
        await net.wait_for(lambda: backend.endings == ["reset"], what="the backend saw a reset")
        assert outcomes(daemon, Outcome.CUT) == 1


async def test_an_idle_timeout_resets_the_client_and_the_backend(
    net: Any, data_plane: dict[str, str]
) -> None:
    async with net.loopback() as lab:
        backend = Recorder("quiet")
        await lab.tasks.start(backend.serve)
        daemon = await lab.daemon([backend.address], timeouts={"idle": 0.3}, **data_plane)
        with anyio.fail_after(10):
            async with await anyio.connect_tcp(*daemon.listen_address) as stream:
                await stream.send(b"hello, anyone?")
                # Nothing moves either way: the idle timeout ends it, for both.
                assert await ending(stream) == (0, "reset")
        await net.wait_for(lambda: backend.endings == ["reset"], what="the backend saw a reset")
        assert outcomes(daemon, Outcome.IDLE_TIMEOUT) == 1


async def test_a_backend_reset_reaches_the_client_mid_transfer(
    net: Any, data_plane: dict[str, str]
) -> None:
    async with net.loopback() as lab:
        backend = await lab.backend("a")
        daemon = await lab.daemon([backend.address], **data_plane)
        with anyio.fail_after(10):
            async with await anyio.connect_tcp(*daemon.listen_address) as stream:
                await stream.send(b"upload")
                await net.wait_for(lambda: len(backend.open) == 1)
                await backend.kill_connections()
                assert await ending(stream) == (0, "reset")
        await net.wait_for(lambda: outcomes(daemon, Outcome.BACKEND_RESET) == 1)


async def test_a_client_reset_reaches_the_backend(net: Any, data_plane: dict[str, str]) -> None:
    async with net.loopback() as lab:
        backend = Recorder("quiet")
        await lab.tasks.start(backend.serve)
        daemon = await lab.daemon([backend.address], **data_plane)
        with anyio.fail_after(10):
            stream = await anyio.connect_tcp(*daemon.listen_address)
            await stream.send(b"half an upl")
            await net.wait_for(lambda: daemon.core.statistics().backends[0].active_connections)
            await net.wait_for(lambda: backend.accepted == 1)
            net.reset(stream)
            await stream.aclose()
        await net.wait_for(lambda: backend.endings == ["reset"], what="the backend saw a reset")
        await net.wait_for(lambda: outcomes(daemon, Outcome.CLIENT_RESET) == 1)
