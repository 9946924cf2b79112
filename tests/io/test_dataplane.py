"""The daemon on real loopback sockets: balancing, half-close, retries, timeouts.

Each test runs on asyncio (Loble's own loop, and a plain one) and on trio
(the ``anyio_backend`` fixture).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import socket
import time
import warnings
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from loble.core import HealthState, Outcome
from loble.io._copy import POOL_LIMIT, SPLICE_AVAILABLE
from loble.io._datapath import accept_batch, prepare_listener

from .conftest import outcomes

pytestmark = pytest.mark.anyio


def served_by(reply: bytes) -> str:
    return reply.partition(b":")[0].decode()


async def test_round_robin_spreads_over_three_backends(net: Any) -> None:
    async with net.loopback() as lab:
        backends = [await lab.backend(name) for name in ("a", "b", "c")]
        daemon = await lab.daemon([b.address for b in backends])
        replies = [await net.request(daemon.listen_address, b"x%d" % i) for i in range(30)]
        assert Counter(served_by(reply) for reply in replies) == {"a": 10, "b": 10, "c": 10}
        assert replies[0].endswith(b":x0")
        await net.wait_for(lambda: daemon.core.in_flight == 0)
        assert outcomes(daemon, Outcome.COMPLETED) == 30


async def test_ipv6_loopback_on_both_sides(net: Any) -> None:
    async with net.loopback() as lab:
        v6 = await lab.backend("six", host="::1")
        v4 = await lab.backend("four")
        daemon = await lab.daemon([v6.address, v4.address], listen="[::1]:0")
        assert daemon.listen_address[0] == "::1"
        replies = [await net.request(daemon.listen_address) for _ in range(4)]
        assert Counter(served_by(reply) for reply in replies) == {"six": 2, "four": 2}
        assert v6.address.startswith("[::1]:")


async def test_weights_set_the_share_of_each_backend(net: Any) -> None:
    async with net.loopback() as lab:
        backends = [await lab.backend(name) for name in ("a", "b", "c")]
        daemon = await lab.daemon([b.address for b in backends], weights={"a": 3, "b": 2, "c": 1})
        replies = [await net.request(daemon.listen_address) for _ in range(60)]
        assert Counter(served_by(reply) for reply in replies) == {"a": 30, "b": 20, "c": 10}


async def test_client_half_close_reaches_backend_and_reply_still_flows(
    net: Any, data_plane: dict[str, str]
) -> None:
    async with net.loopback() as lab:
        backend = await lab.backend("a")
        daemon = await lab.daemon([backend.address], **data_plane)
        # 1 MiB each way: more than any buffer, so backpressure is exercised too.
        payload = bytes(range(256)) * 4096
        async with await anyio.connect_tcp(*daemon.listen_address) as stream:
            await stream.send(payload[:1000])
            await stream.send(payload[1000:])
            await stream.send_eof()  # the backend answers only once this EOF arrives
            reply = await net.read_all(stream)
        assert reply == b"a:" + payload
        await net.wait_for(lambda: outcomes(daemon, Outcome.COMPLETED) == 1)


async def test_backend_half_close_reaches_client_and_client_data_still_flows(
    net: Any, data_plane: dict[str, str]
) -> None:
    async with net.loopback() as lab:
        backend = await lab.backend("a", mode="greet")
        daemon = await lab.daemon([backend.address], **data_plane)
        async with await anyio.connect_tcp(*daemon.listen_address) as stream:
            assert await net.read_all(stream) == b"a"  # greeting, then the backend's EOF
            await stream.send(b"after your EOF")
            await net.wait_for(lambda: daemon.core.in_flight == 1)
            await stream.send_eof()
            await net.wait_for(lambda: backend.received == [b"after your EOF"])
        await net.wait_for(lambda: outcomes(daemon, Outcome.COMPLETED) == 1)


async def test_a_large_upload_after_the_backend_half_closed_completes(
    net: Any, data_plane: dict[str, str]
) -> None:
    # Backpressure leaves nothing reading the client while its EOF arrives after
    # ours: both directions shut down in order is a hangup, not a reset.
    upload = os.urandom(16 << 20)
    async with net.loopback() as lab:
        backend = await lab.backend("a", mode="greet")
        daemon = await lab.daemon([backend.address], **data_plane)
        async with await anyio.connect_tcp(*daemon.listen_address) as stream:
            assert await net.read_all(stream) == b"a"
            await stream.send(upload)
            await stream.send_eof()
            await net.wait_for(lambda: len(backend.received) == 1)
        assert backend.received[0] == upload
        await net.wait_for(lambda: outcomes(daemon, Outcome.COMPLETED) == 1)


async def test_refused_connect_is_retried_on_another_backend(
    net: Any, data_plane: dict[str, str]
) -> None:
    async with net.loopback() as lab:
        good = await lab.backend("good")
        refused = f"127.0.0.1:{net.free_port()}"
        daemon = await lab.daemon(
            [refused, good.address],
            health={"failure_threshold": 100},  # keep it eligible: every pick of it retries
            **data_plane,
        )
        replies = [await net.request(daemon.listen_address) for _ in range(6)]
        assert {served_by(reply) for reply in replies} == {"good"}
        retries = daemon.metrics.retries.labels(good.address)._value.get()
        failures = daemon.metrics.connect_failures.labels(refused, "refused")._value.get()
        assert retries == failures >= 3
        assert outcomes(daemon, Outcome.COMPLETED) == 6
        assert outcomes(daemon, Outcome.CONNECT_FAILED) == 0


async def test_connect_timeout_abandons_the_attempt_and_retries_elsewhere(
    net: Any, data_plane: dict[str, str]
) -> None:
    with socket.socket() as blackhole, socket.socket() as filler:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(0)
        filler.connect(blackhole.getsockname())  # the one queue slot is taken: SYNs go unanswered
        silent = f"127.0.0.1:{blackhole.getsockname()[1]}"
        async with net.loopback() as lab:
            good = await lab.backend("good")
            daemon = await lab.daemon(
                [silent, good.address],
                timeouts={"connect": 0.2},
                health={"failure_threshold": 100},
                **data_plane,
            )
            replies = [await net.request(daemon.listen_address) for _ in range(2)]
            assert {served_by(reply) for reply in replies} == {"good"}
            timed_out = daemon.metrics.connect_failures.labels(silent, "timeout")._value.get()
            assert daemon.metrics.retries.labels(good.address)._value.get() == timed_out >= 1
            assert daemon.core.control.active_connections(silent) == 0
            assert outcomes(daemon, Outcome.COMPLETED) == 2


async def test_every_attempt_refused_closes_the_client(net: Any) -> None:
    async with net.loopback() as lab:
        refused = [f"127.0.0.1:{port}" for port in net.free_ports(2)]
        daemon = await lab.daemon(refused, health={"failure_threshold": 100})
        assert await net.request(daemon.listen_address) == b""
        await net.wait_for(lambda: outcomes(daemon, Outcome.CONNECT_FAILED) == 1)


async def test_no_backend_eligible_closes_the_client_at_once_and_counts_it(net: Any) -> None:
    async with net.loopback() as lab:
        refused = f"127.0.0.1:{net.free_port()}"
        daemon = await lab.daemon([refused], health={"failure_threshold": 1})
        assert await net.request(daemon.listen_address) == b""  # connect refused: unhealthy
        assert daemon.core.control.state(refused) is HealthState.UNHEALTHY
        assert await net.request(daemon.listen_address) == b""
        await net.wait_for(lambda: daemon.metrics.no_backend._value.get() == 1)
        assert outcomes(daemon, Outcome.NO_BACKEND) == 1
        # An error line, at most one a second however many clients are refused.
        for _ in range(3):
            assert await net.request(daemon.listen_address) == b""
        await net.wait_for(lambda: outcomes(daemon, Outcome.NO_BACKEND) == 4)
        lines = lab.logs.find("no backend eligible: closing clients at once")
        # The first refusal logs at once; the next three come within the same
        # second on any but a stalled machine, so they add no line (or one).
        assert lines[0]["clients"] == 1 and len(lines) <= 2


async def test_idle_connection_is_closed_on_both_sides(
    net: Any, data_plane: dict[str, str]
) -> None:
    async with net.loopback() as lab:
        backend = await lab.backend("a")
        daemon = await lab.daemon([backend.address], timeouts={"idle": 0.2}, **data_plane)
        async with await anyio.connect_tcp(*daemon.listen_address) as stream:
            await stream.send(b"then silence")
            assert await net.read_all(stream) == b""  # the daemon closed it
        await net.wait_for(lambda: outcomes(daemon, Outcome.IDLE_TIMEOUT) == 1)
        await net.wait_for(lambda: not backend.open)
        assert backend.received == [b"then silence"]


async def reset_or_eof(stream: Any) -> str:
    """Read until the stream ends; say how: ``"eof"`` (FIN) or ``"reset"`` (RST)."""
    while True:
        try:
            await stream.receive()
        except anyio.EndOfStream:
            return "eof"
        except (anyio.BrokenResourceError, ConnectionResetError):
            return "reset"


async def test_a_backend_reset_reaches_the_client_as_a_reset(
    net: Any, data_plane: dict[str, str]
) -> None:
    async with net.loopback() as lab:
        backend = await lab.backend("a")
        daemon = await lab.daemon([backend.address], **data_plane)
        async with await anyio.connect_tcp(*daemon.listen_address) as stream:
            await stream.send(b"upload")
            await net.wait_for(lambda: len(backend.open) == 1)
            await backend.kill_connections()
            with anyio.fail_after(10):
                assert await reset_or_eof(stream) == "reset"  # a FIN would look complete
        await net.wait_for(lambda: outcomes(daemon, Outcome.BACKEND_RESET) == 1)


@contextlib.asynccontextmanager
async def proxied_to(net: Any, backend: Any, data_plane: dict[str, str]) -> AsyncIterator[Any]:
    """A daemon in front of one backend served by ``backend(stream)``."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener, net.loopback() as lab:  # the rig stops before the listener closes
        lab.tasks.start_soon(listener.serve, backend)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        yield await lab.daemon([f"127.0.0.1:{port}"], **data_plane)


async def test_a_client_reset_reaches_the_backend_as_a_reset(
    net: Any, data_plane: dict[str, str]
) -> None:
    ended: list[str] = []

    async def backend(stream: Any) -> None:
        async with stream:
            ended.append(await reset_or_eof(stream))

    async with proxied_to(net, backend, data_plane) as daemon:
        stream = await anyio.connect_tcp(*daemon.listen_address)
        await stream.send(b"truncated upl")
        await net.wait_for(lambda: daemon.open_connections == 1)
        net.reset(stream)
        await stream.aclose()
        await net.wait_for(lambda: outcomes(daemon, Outcome.CLIENT_RESET) == 1)
        await net.wait_for(lambda: ended)
        assert ended == ["reset"]  # a FIN would make the upload look whole


async def test_a_reset_after_a_half_close_is_noticed_at_once(
    net: Any, data_plane: dict[str, str]
) -> None:
    if data_plane["data_path"] == "tasks":
        pytest.skip("the tasks path notices it at the next write or the idle timeout")
    ended: list[str] = []
    answer = anyio.Event()

    async def backend(stream: Any) -> None:
        async with stream:
            ended.append(await reset_or_eof(stream))  # the client's EOF; then it thinks
            await answer.wait()
            raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
            try:  # the raw socket: asyncio's transport would report a failed write later
                os.write(raw.fileno(), b"too late")
                ended.append("sent")
            except OSError:
                ended.append("reset")

    async with proxied_to(net, backend, data_plane) as daemon:
        stream = await anyio.connect_tcp(*daemon.listen_address)
        await stream.send(b"request")
        await stream.send_eof()
        await net.wait_for(lambda: ended == ["eof"])
        net.reset(stream)  # the client gives up while the backend is still quiet
        await stream.aclose()
        await net.wait_for(lambda: outcomes(daemon, Outcome.CLIENT_RESET) == 1)
        await net.wait_for(lambda: daemon.open_connections == 0)
        answer.set()
        await net.wait_for(lambda: len(ended) == 2)
        assert ended == ["eof", "reset"]  # the reset went on to the backend


async def test_killed_backend_drains_goes_unhealthy_and_comes_back_through_probes(
    net: Any,
) -> None:
    async with net.loopback() as lab:
        a, b, c = [await lab.backend(name) for name in ("a", "b", "c")]
        daemon = await lab.daemon(
            [a.address, b.address, c.address],
            health={
                "failure_threshold": 3,
                "success_threshold": 2,
                "probe_interval": 0.05,
                "probe_timeout": 0.05,
            },
        )
        state = daemon.core.control.state
        # One long connection on each backend (round robin hands out one each).
        long = [await anyio.connect_tcp(*daemon.listen_address) for _ in range(3)]
        for index, stream in enumerate(long):
            await stream.send(b"long%d" % index)
        await net.wait_for(lambda: len(a.open) == len(b.open) == len(c.open) == 1)

        # b dies: new connects are refused while its connection is still open.
        b.stop_listening()
        for _ in range(12):
            assert served_by(await net.request(daemon.listen_address)) in ("a", "c")
        assert state(b.address) is HealthState.DRAINING

        # b's connections die with it: the one client there loses its connection.
        await b.kill_connections()
        await net.wait_for(lambda: outcomes(daemon, Outcome.BACKEND_RESET) == 1)
        await net.wait_for(lambda: state(b.address) is HealthState.UNHEALTHY)
        for _ in range(6):
            assert served_by(await net.request(daemon.listen_address)) in ("a", "c")
        # ...and it is the only one: the long connections on a and c complete.
        answers = []
        for stream in long:
            with contextlib.suppress(anyio.BrokenResourceError, OSError):
                await stream.send_eof()
            answers.append(served_by(await net.read_all(stream)))
            await stream.aclose()
        assert sorted(answers) == ["", "a", "c"]

        # b is back on its port: probes see it, and it takes traffic again.
        await lab.backend("b", port=b.port)
        await net.wait_for(lambda: state(b.address) is HealthState.HEALTHY)

        async def b_answers() -> bool:
            return served_by(await net.request(daemon.listen_address)) == "b"

        await net.wait_for(b_answers)
        moves = [(f["old"], f["new"]) for f in lab.logs.find("backend state changed")]
        assert moves == [
            ("healthy", "draining"),
            ("draining", "unhealthy"),
            ("unhealthy", "healthy"),
        ]
        assert outcomes(daemon, Outcome.BACKEND_RESET) == 1
        assert outcomes(daemon, Outcome.CONNECT_FAILED) == 0


async def test_file_descriptors_do_not_outlive_1000_connections(
    net: Any, data_plane: dict[str, str]
) -> None:
    async with net.loopback() as lab:
        backends = [await lab.backend(name) for name in ("a", "b", "c")]
        daemon = await lab.daemon([b.address for b in backends], **data_plane)
        await net.request(daemon.listen_address)  # the loop's own lazily made descriptors

        def open_fds() -> int:
            return len(os.listdir("/proc/self/fd"))

        def quiet() -> bool:
            return daemon.open_connections == 0 and not any(b.open for b in backends)

        def without_pooled_pipes() -> int:
            # Empty pipes kept for reuse belong to the daemon, not to a connection.
            return open_fds() - 2 * daemon.pool.open_pipes

        await net.wait_for(quiet)
        before = without_pooled_pipes()
        limit = anyio.Semaphore(20)
        replies: list[bytes] = []

        async def one(index: int) -> None:
            async with limit:
                replies.append(await net.request(daemon.listen_address, b"%d" % index))

        # A socket left for the garbage collector would close, too, but late and
        # with a ResourceWarning: count those as leaks.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            async with anyio.create_task_group() as clients:
                for index in range(1000):
                    clients.start_soon(one, index)
            assert len(replies) == 1000 and all(b":" in reply for reply in replies)
            await net.wait_for(quiet)
            await net.wait_for(
                lambda: without_pooled_pipes() == before,
                what=f"{without_pooled_pipes()} fds, was {before}",
            )
            gc.collect()
        assert [str(w.message) for w in caught if w.category is ResourceWarning] == []
        assert outcomes(daemon, Outcome.COMPLETED) == 1001
        # Every pipe still open is an empty one in the (bounded) pool.
        assert daemon.pool.open_pipes == daemon.pool.pooled_pipes <= POOL_LIMIT


def bytes_to_backend(net: Any, daemon: Any) -> float:
    """Bytes the daemon has moved to its backends, open connections included."""
    found = net.samples(daemon.metrics.render().decode())
    return sum(
        value
        for (name, labels), value in found.items()
        if name == "loble_backend_bytes_total" and ("direction", "to_backend") in labels
    )


async def test_both_sockets_of_a_proxied_connection_send_small_writes_at_once(
    net: Any, data_plane: dict[str, str]
) -> None:
    # TCP_NODELAY on the client's socket and the backend's: no Nagle delay
    # on a request or a reply smaller than a segment.
    async with net.loopback() as lab:
        backend = await lab.backend("a")
        daemon = await lab.daemon([backend.address], **data_plane)
        async with await anyio.connect_tcp(*daemon.listen_address) as stream:
            await stream.send(b"x")
            await net.wait_for(lambda: bytes_to_backend(net, daemon) == 1)
            (connection,) = daemon.conductor.links.values()
            for sock in (connection.client, connection.backend):
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


@pytest.mark.skipif(not SPLICE_AVAILABLE, reason="splice(2) is Linux only")
@pytest.mark.parametrize("data_path", ["callbacks", "tasks"])
async def test_auto_copy_switches_a_connection_to_splice_when_it_turns_bulky(
    net: Any, anyio_backend_name: str, data_path: str
) -> None:
    if data_path == "callbacks" and anyio_backend_name != "asyncio":
        pytest.skip("the callbacks data path runs on asyncio only")
    small = os.urandom(1_000)
    bulk = os.urandom(16 << 20)
    async with net.loopback() as lab:
        backend = await lab.backend("a")
        daemon = await lab.daemon([backend.address], copy="auto", data_path=data_path)
        async with await anyio.connect_tcp(*daemon.listen_address) as stream:
            for sent in range(1, 11):  # request-sized messages, one at a time
                await stream.send(small)
                await net.wait_for(lambda n=sent: bytes_to_backend(net, daemon) == n * len(small))
            assert daemon.pool.open_pipes == 0  # through a pooled buffer: no pipe
            await stream.send(bulk)  # the same connection turns bulky, both ways
            await stream.send_eof()
            reply = await net.read_all(stream)
        assert daemon.pool.open_pipes >= 1  # it switched to splice (the pipe is pooled)
        expected = b"a:" + small * 10 + bulk
        assert hashlib.sha256(reply).digest() == hashlib.sha256(expected).digest()
        assert hashlib.sha256(backend.received[0]).digest() == hashlib.sha256(expected[2:]).digest()
        await net.wait_for(lambda: outcomes(daemon, Outcome.COMPLETED) == 1)


def pipe_fds() -> int:
    return sum(
        os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:")
        for fd in os.listdir("/proc/self/fd")
        if os.path.exists(f"/proc/self/fd/{fd}")
    )


async def test_pipes_are_taken_lazily_and_closed_when_the_daemon_stops(
    net: Any, data_plane: dict[str, str]
) -> None:
    before = pipe_fds()
    async with net.loopback() as lab:
        backend = await lab.backend("a", mode="greet")
        daemon = await lab.daemon([backend.address], **data_plane)
        idle = [await anyio.connect_tcp(*daemon.listen_address) for _ in range(10)]
        await net.wait_for(lambda: len(backend.open) == 10)
        for stream in idle:
            assert await net.read_all(stream) == b"a"  # greeting and EOF, then idle
        # Ten open connections that moved bytes hold no pipe each: at most the
        # pool's few, however many connections there are.
        assert daemon.pool.open_pipes <= 1
        for stream in idle:
            await stream.aclose()
        await net.wait_for(lambda: daemon.open_connections == 0)
    assert daemon.pool.open_pipes == 0
    await net.wait_for(lambda: pipe_fds() == before, what=f"{pipe_fds()} pipes, was {before}")


async def test_environment_variables_choose_the_data_path_and_copy(
    net: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOBLE_DATA_PATH", "tasks")
    monkeypatch.setenv("LOBLE_COPY", "recv_into")
    async with net.loopback() as lab:
        backend = await lab.backend("a")
        daemon = await lab.daemon([backend.address])
        assert await net.request(daemon.listen_address) == b"a:ping"
        assert (daemon.data_path_name, daemon.copy_method.value) == ("tasks", "recv_into")
        assert lab.logs.find("listening", data_path="tasks", copy="recv_into")


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_an_accepted_client_is_nonblocking_close_on_exec_and_nodelay(family: int) -> None:
    # Where Linux's inheritance is counted on, this is what checks it holds:
    # the listener is set once and each client must come out set too.
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.bind((host, 0))
        listener.listen()
        prepare_listener(listener)
        with socket.create_connection(listener.getsockname()[:2]):
            accepted: list[tuple[socket.socket, object]] = []

            def on_client(client: socket.socket, address: object) -> bool:
                accepted.append((client, address))
                return True

            deadline = time.monotonic() + 5
            while not accepted and time.monotonic() < deadline:
                assert accept_batch(listener, on_client) is None
            ((client, address),) = accepted
            with client:
                assert client.family == family and client.type == socket.SOCK_STREAM
                assert client.gettimeout() == 0.0 and not os.get_blocking(client.fileno())
                assert not os.get_inheritable(client.fileno())
                assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                assert address == client.getpeername()
