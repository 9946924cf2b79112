"""Moving bytes one way between two sockets: the only code that touches payload.

:func:`copy_bytes` reads a bounded chunk, writes it, and only then reads
again, so a reader that stops reading stops the copy, not Loble's memory:
at most one chunk per direction is in Loble's hands (anyio's streams keep no
unbounded buffer either: asyncio transports pause reading between receives
and ``send`` waits until the write buffer has drained). It knows nothing of
the core: it returns how the copy ended and the caller reports that.

This module is deliberately small so a faster copier (splice(2), readiness
callbacks) can replace it behind the same function.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import anyio
from anyio.abc import ByteReceiveStream, ByteSendStream

__all__ = ["CHUNK_SIZE", "CopyEnd", "copy_bytes"]

CHUNK_SIZE = 65_536
"""The most bytes held in memory per direction of one connection."""

_STREAM_ERRORS = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


class CopyEnd(enum.Enum):
    """Why a one-way copy stopped."""

    EOF = "eof"
    """The source sent EOF; everything before it reached the sink."""
    SOURCE_ERROR = "source_error"
    SINK_ERROR = "sink_error"


async def copy_bytes(
    source: ByteReceiveStream,
    sink: ByteSendStream,
    moved: Callable[[int], None],
) -> CopyEnd:
    """Copy until EOF or an error; call ``moved(n)`` after each chunk is written."""
    while True:
        try:
            data = await source.receive(CHUNK_SIZE)
        except anyio.EndOfStream:
            return CopyEnd.EOF
        except _STREAM_ERRORS:
            return CopyEnd.SOURCE_ERROR
        try:
            await sink.send(data)
        except _STREAM_ERRORS:
            return CopyEnd.SINK_ERROR
        moved(len(data))
