"""Active checks with payloads: what a probe sends, what it expects, the verdict.

A probe is a TCP connect; with a :class:`ProbeCheck` that has something to
send or to expect it is also a short exchange (HAProxy's ``tcp-check
send``/``expect``, Envoy's ``tcp_health_check`` ``send``/``receive``): the
driver connects, writes :attr:`ProbeCheck.send`, then reads, asking
:func:`judge_reply` about the bytes so far after each read, until it says
yes or no, the backend closes, or the probe timeout passes. Every decision is
here, as pure functions of bytes, so a test judges a reply without a socket
and the simulator and the daemon agree on what a check means:

* no expectation (connect only, or a send without an expect) passes as soon
  as the connect and the write succeed: the reply is not read. HAProxy's
  ``tcp-check`` does the same, its check ending with its last rule;
* ``expect`` (a prefix) passes when the reply begins with it, fails as soon
  as a byte differs;
* ``expect_regex`` passes as soon as the pattern is found in the reply so far
  (``re.search``), so an anchor at the end (``$``) matches the end of what
  has arrived, not of a reply the backend has yet to finish;
* either way at most :data:`REPLY_LIMIT` bytes are read: no verdict by then
  is a failure, and so is the backend's close (or reset) or the timeout
  before one (the driver's to see: it says which with a :class:`ProbeFailure`).

Which check each backend gets is ``_config.probe_checks``, from the configuration:
a backend's own ``probe_send`` and expectation, else ``[health]``'s.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

__all__ = [
    "CONNECT_ONLY",
    "PAYLOAD_LIMIT",
    "REPLY_LIMIT",
    "ProbeCheck",
    "ProbeFailure",
    "judge_reply",
]

REPLY_LIMIT = 16 * 1024
"""The most bytes of a reply a probe reads: no verdict within them is a failure."""
PAYLOAD_LIMIT = 16 * 1024
"""The most bytes a probe sends (and the longest ``probe_expect``): a check, not a transfer."""


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class ProbeCheck:
    """What a probe sends once connected, and what the reply must show.

    At most one of :attr:`expect` and :attr:`expect_regex`; neither, and the
    probe passes once connected and :attr:`send` is written.
    """

    send: bytes = b""
    expect: bytes = b""
    """A prefix the reply must begin with."""
    expect_regex: re.Pattern[bytes] | None = None
    """A pattern that must be found in the reply (``re.search``)."""

    def __post_init__(self) -> None:
        if self.expect and self.expect_regex is not None:
            raise ValueError("a probe expects a prefix or a pattern, not both")
        if len(self.send) > PAYLOAD_LIMIT or len(self.expect) > PAYLOAD_LIMIT:
            raise ValueError(f"a probe sends and expects at most {PAYLOAD_LIMIT} bytes")

    def __repr__(self) -> str:
        # Only what is set: a connect-only probe's action reads as before payloads.
        parts = [f"send={self.send!r}"] if self.send else []
        if self.expect:
            parts.append(f"expect={self.expect!r}")
        if self.expect_regex is not None:
            parts.append(f"expect_regex={self.expect_regex!r}")
        return f"ProbeCheck({', '.join(parts)})"

    @property
    def awaits_reply(self) -> bool:
        """Whether the probe reads a reply (it expects something)."""
        return bool(self.expect) or self.expect_regex is not None

    @property
    def connect_only(self) -> bool:
        """Whether the probe is a bare TCP connect: nothing sent, nothing expected."""
        return not self.send and not self.awaits_reply


CONNECT_ONLY = ProbeCheck()
"""The check of a probe that only connects (no ``probe_send``, no expectation)."""


def judge_reply(check: ProbeCheck, data: bytes) -> bool | None:
    """The verdict on the reply received so far: True (pass), False (fail), None (read more).

    Only the first :data:`REPLY_LIMIT` bytes of ``data`` count; with that many
    and no verdict, it is False. A check that expects nothing is True at once.
    """
    if len(data) > REPLY_LIMIT:
        data = data[:REPLY_LIMIT]
    pattern = check.expect_regex
    if pattern is not None:
        if pattern.search(data) is not None:
            return True
    elif check.expect:
        expect = check.expect
        if len(data) >= len(expect):
            return data.startswith(expect)
        if not expect.startswith(data):
            return False  # a byte already differs: no more can fix it
    else:
        return True
    return False if len(data) >= REPLY_LIMIT else None


class ProbeFailure(enum.Enum):
    """Why a probe failed, as a driver saw it: for the log line and the metric."""

    REFUSED = "refused"
    """The connect was refused, or the host unreachable."""
    CONNECT_TIMEOUT = "connect_timeout"
    """No connection within the probe timeout."""
    REPLY_TIMEOUT = "reply_timeout"
    """Connected, but no verdict on the reply within the probe timeout (a
    frozen backend: the kernel still completes the handshake)."""
    MISMATCH = "mismatch"
    """The reply did not match (:func:`judge_reply` said False)."""
    CLOSED = "closed"
    """The backend closed or reset the connection before the reply matched."""

    @property
    def description(self) -> str:
        """A few words for the log line (``reason="reply did not match"``)."""
        return _DESCRIPTIONS[self]


_DESCRIPTIONS = {
    ProbeFailure.REFUSED: "connect refused",
    ProbeFailure.CONNECT_TIMEOUT: "connect timed out",
    ProbeFailure.REPLY_TIMEOUT: "timed out awaiting the reply",
    ProbeFailure.MISMATCH: "reply did not match",
    ProbeFailure.CLOSED: "closed before the reply matched",
}
