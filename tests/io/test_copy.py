"""The byte copier: bounded reads, and how each way of ending is reported."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from loble.io._copy import CHUNK_SIZE, CopyEnd, copy_bytes

pytestmark = pytest.mark.anyio


class EndlessSource:
    """Always has data; counts the reads (a fake: only the copier's view matters)."""

    def __init__(self, *, fail_after: int | None = None) -> None:
        self.reads = 0
        self.fail_after = fail_after

    async def receive(self, max_bytes: int = 65_536) -> bytes:
        await anyio.lowlevel.checkpoint()
        if self.fail_after is not None and self.reads == self.fail_after:
            raise anyio.BrokenResourceError
        self.reads += 1
        return b"x" * max_bytes

    async def aclose(self) -> None: ...


class GatedSink:
    """Each send waits for a token: a peer that reads only when the test says."""

    def __init__(self, *, fail: bool = False) -> None:
        self.tokens, self._take = anyio.create_memory_object_stream[None](100)
        self.pending = 0
        self.written = 0
        self.fail = fail

    async def send(self, item: bytes) -> None:
        self.pending += 1
        await self._take.receive()
        self.pending -= 1
        if self.fail:
            raise anyio.BrokenResourceError
        self.written += len(item)

    async def send_eof(self) -> None: ...

    async def aclose(self) -> None: ...


async def test_reads_again_only_after_the_write_completed(net: Any) -> None:
    source, sink = EndlessSource(), GatedSink()
    moved: list[int] = []
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(copy_bytes, source, sink, moved.append)
        for released in range(5):
            # The copier is blocked writing chunk number released + 1...
            await net.wait_for(
                lambda n=released: sink.pending == 1 and sink.written == n * CHUNK_SIZE
            )
            # ...and has read that chunk and nothing more: a peer that does not
            # read holds one chunk of Loble's memory, no more.
            assert source.reads == released + 1
            sink.tokens.send_nowait(None)
        tasks.cancel_scope.cancel()
    assert moved == [CHUNK_SIZE] * 5


async def test_eof_ends_the_copy(net: Any) -> None:
    class ShortSource:
        def __init__(self) -> None:
            self.chunks = [b"ab", b"c"]

        async def receive(self, max_bytes: int = 65_536) -> bytes:
            if not self.chunks:
                raise anyio.EndOfStream
            return self.chunks.pop(0)

    sink = GatedSink()
    for _ in range(2):
        sink.tokens.send_nowait(None)
    moved: list[int] = []
    assert await copy_bytes(ShortSource(), sink, moved.append) is CopyEnd.EOF  # type: ignore[arg-type]
    assert moved == [2, 1] and sink.written == 3


async def test_source_error_and_sink_error_are_told_apart() -> None:
    sink = GatedSink()
    sink.tokens.send_nowait(None)
    ended = await copy_bytes(EndlessSource(fail_after=1), sink, lambda n: None)  # type: ignore[arg-type]
    assert ended is CopyEnd.SOURCE_ERROR

    failing = GatedSink(fail=True)
    failing.tokens.send_nowait(None)
    ended = await copy_bytes(EndlessSource(), failing, lambda n: None)  # type: ignore[arg-type]
    assert ended is CopyEnd.SINK_ERROR
