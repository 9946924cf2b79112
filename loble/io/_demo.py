"""``loble demo``: three small backends, the balancer and a trickle of clients.

Everything a newcomer needs to watch Loble work, in one process on loopback:

* a backend on each ``[[backends]]`` address of the configuration. It answers
  an HTTP request (``curl``) with one line naming itself, and echoes anything
  else (``nc``) until the client sends EOF;
* the real daemon (:class:`Daemon`) with the same configuration;
* a client load: a few HTTP-ish requests a second through the balancer, and a
  summary line every few seconds saying which backend answered how often.

With ``--backends-only`` only the backends run, for ``loble run`` in another
terminal.
"""

from __future__ import annotations

import logging
import signal
from collections import Counter

import anyio
from anyio.abc import SocketListener, SocketStream

from loble.core import Config, LobleError, parse_address

from ._daemon import Daemon
from ._logging import log

__all__ = ["open_backend", "run_backends", "run_demo", "serve_backend"]

_HTTP_METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ")
_REQUEST_LIMIT = 65_536
_CLIENT_TIMEOUT = 5.0
_SUMMARY_EVERY = 5.0


async def open_backend(address: str, name: str) -> list[SocketListener]:
    """Bind a demo backend's address; a busy or foreign address is a one-line error."""
    host, port = parse_address(address)
    try:
        multi = await anyio.create_tcp_listener(local_host=host, local_port=port)
    except OSError as error:
        reason = error.strerror or str(error)
        raise LobleError(f"demo backend {name}: cannot listen on {address}: {reason}") from None
    return [listener for listener in multi.listeners if isinstance(listener, SocketListener)]


async def serve_backend(
    listeners: list[SocketListener], address: str, name: str, logger: logging.Logger
) -> None:
    """Serve the demo protocol on ``listeners`` until cancelled."""
    try:
        async with anyio.create_task_group() as connections:
            for listener in listeners:
                connections.start_soon(_accept, listener, name, address, connections)
            log(logger, logging.INFO, "demo backend listening", backend=name, address=address)
    finally:
        with anyio.CancelScope(shield=True):
            for listener in listeners:
                await listener.aclose()


async def _accept(
    listener: SocketListener, name: str, address: str, connections: anyio.abc.TaskGroup
) -> None:
    while True:
        try:
            stream = await listener.accept()
        except (OSError, anyio.BrokenResourceError):  # trio: EMFILE is BrokenResourceError
            await anyio.sleep(0.1)  # out of file descriptors: let some close
            continue
        connections.start_soon(_answer, stream, name, address)


async def _answer(stream: SocketStream, name: str, address: str) -> None:
    async with stream:
        try:
            data = await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            return
        try:
            if data.startswith(_HTTP_METHODS):
                await _answer_http(stream, data, name, address)
            else:
                await _echo(stream, data)
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            return


async def _answer_http(stream: SocketStream, request: bytes, name: str, address: str) -> None:
    while b"\r\n\r\n" not in request and b"\n\n" not in request:
        if len(request) > _REQUEST_LIMIT:
            return
        request += await stream.receive()
    body = f"hello from {name} ({address})\n".encode()
    await stream.send(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
        + f"Content-Length: {len(body)}\r\nX-Backend: {name}\r\n".encode()
        + b"Connection: close\r\n\r\n"
        + (b"" if request.startswith(b"HEAD ") else body)
    )
    await stream.send_eof()
    # Let the client close first, so no unread byte turns our close into a reset.
    with anyio.move_on_after(_CLIENT_TIMEOUT):
        while True:
            await stream.receive()


async def _echo(stream: SocketStream, data: bytes) -> None:
    while True:
        await stream.send(data)
        try:
            data = await stream.receive()
        except anyio.EndOfStream:
            await stream.send_eof()
            return


async def _load(address: tuple[str, int], rate: float, logger: logging.Logger) -> None:
    """Send ``rate`` requests a second through the balancer and summarise the answers."""
    answered: Counter[str] = Counter()
    failed = 0
    since = anyio.current_time()
    host, port = address
    while True:
        answer = b""
        with anyio.move_on_after(_CLIENT_TIMEOUT):
            try:
                async with await anyio.connect_tcp(host, port) as stream:
                    await stream.send(b"GET / HTTP/1.0\r\nHost: loble-demo\r\n\r\n")
                    await stream.send_eof()
                    while True:
                        answer += await stream.receive()
            except anyio.EndOfStream:
                pass
            except (anyio.BrokenResourceError, OSError):
                answer = b""
        name = _backend_name(answer)
        if name is None:
            failed += 1
        else:
            answered[name] += 1
        now = anyio.current_time()
        if now - since >= _SUMMARY_EVERY:
            log(
                logger,
                logging.INFO,
                "demo load",
                answered=sum(answered.values()),
                failed=failed,
                **{name: count for name, count in sorted(answered.items())},
            )
            answered.clear()
            failed = 0
            since = now
        await anyio.sleep(1 / rate)


def _backend_name(answer: bytes) -> str | None:
    for line in answer.splitlines():
        if line.startswith(b"X-Backend: "):
            return line[len(b"X-Backend: ") :].decode(errors="replace")
    return None


def _names(config: Config) -> list[tuple[str, str]]:
    return [
        (backend.address, f"backend-{index}") for index, backend in enumerate(config.backends, 1)
    ]


async def _open_backends(config: Config) -> list[tuple[list[SocketListener], str, str]]:
    opened: list[tuple[list[SocketListener], str, str]] = []
    try:
        for address, name in _names(config):
            opened.append((await open_backend(address, name), address, name))
    except LobleError:
        for listeners, _, _ in opened:
            for listener in listeners:
                await listener.aclose()
        raise
    return opened


async def run_backends(config: Config, logger: logging.Logger) -> None:
    """``--backends-only``: serve the demo backends until SIGINT or SIGTERM."""
    backends = await _open_backends(config)
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with anyio.create_task_group() as tasks:
            for listeners, address, name in backends:
                tasks.start_soon(serve_backend, listeners, address, name, logger)
            async for signum in signals:
                log(logger, logging.INFO, "stopping", signal=signal.Signals(signum).name)
                tasks.cancel_scope.cancel()
                break


async def run_demo(config: Config, logger: logging.Logger, *, rate: float) -> None:
    """Backends, the balancer and a client load; ends when the balancer has shut down."""
    # Bind everything first: a busy port is then a one-line error, not a task group's.
    backends = await _open_backends(config)
    daemon = Daemon(config, logger=logger)
    try:
        await daemon.bind()
    except LobleError:
        for listeners, _, _ in backends:
            for listener in listeners:
                await listener.aclose()
        raise
    demo_logger = logger.getChild("demo")
    async with anyio.create_task_group() as helpers:
        for listeners, address, name in backends:
            helpers.start_soon(serve_backend, listeners, address, name, demo_logger)
        async with anyio.create_task_group() as balancer:
            await balancer.start(daemon.run)
            if rate > 0:
                helpers.start_soon(_load, daemon.listen_address, rate, demo_logger)
        helpers.cancel_scope.cancel()
