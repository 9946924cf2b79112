"""The PROXY protocol, versions 1 and 2: read a peer's header as it arrives, write one.

HAProxy's PROXY protocol (``doc/proxy-protocol.txt`` in HAProxy's source)
lets a proxy tell the server behind it who the client is: before any byte of
the client's, the proxy writes one header naming the client's address and
port and the address and port the client connected to. Version 1 is a line
of text, ``PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\\r\\n``, at most 107
bytes; version 2 is binary: a 12-byte signature, a version and command byte
(``0x21`` PROXY, ``0x20`` LOCAL), a family and transport byte (``0x11``
TCP over IPv4, ``0x21`` TCP over IPv6, ``0x00`` unspecified), a 16-bit
length, the addresses, then optional type-length-value records (TLVs).

This module is the whole protocol and does no I/O:

* :class:`HeaderParser` reads one header from bytes fed as they arrive, in
  pieces of any size. :meth:`HeaderParser.feed` answers None (send more) or
  the :class:`ProxyHeader`. It never takes a byte past the header: the bytes
  fed after it are the client's stream and wait in :attr:`HeaderParser.rest`,
  unchanged, for the driver to pass on;
* :func:`encode_v1`, :func:`encode_v2` and :func:`encode` (by version) write
  the header Loble sends a backend (``send_proxy``);
* :class:`TrustedSources` says whether a peer may send a header at all
  (``[listener] accept_proxy_from``): anyone else's bytes are never parsed.

A peer's bytes that are not a good header raise :class:`ProxyProtocolError`,
one line saying what is wrong, with a ``reason`` for metrics: ``missing``
(they do not start like a PROXY header at all) or ``malformed`` (they do,
then break a rule). Nothing else is raised, whatever the input: a fuzz test
holds the parser to that.

Everything is bounded. A v1 header is at most 107 bytes with its CRLF, so
107 bytes without one are refused then. A v2 header is 16 bytes plus its
16-bit length, so at most 65,551 bytes; a length that makes it longer than
the parser's ``max_length`` is refused as soon as the 16 fixed bytes are in,
before the rest is waited for. How long a peer may take is the driver's to
bound (the daemon gives it the idle timeout).

What a header means follows the spec. A v2 ``LOCAL`` header (the proxy
connected on its own account, a health check say), a v1 ``UNKNOWN`` one and
a v2 family other than TCP over IPv4 or IPv6 (unspecified, UDP, UNIX
sockets) name no client: :attr:`ProxyHeader.source` is None and the
connection's own addresses stand. The TLVs of a TCP header are walked and
bounds-checked, kept in :attr:`ProxyHeader.tlvs` and not interpreted (a
CRC32C TLV is not verified); those of other families are skipped unread
with the rest of their address block.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeAlias

from ._errors import LobleError

__all__ = [
    "PROXY_ERROR_REASONS",
    "SIGNATURE",
    "V1_MAX_LENGTH",
    "V2_MAX_LENGTH",
    "Address",
    "HeaderParser",
    "ProxyHeader",
    "ProxyProtocolError",
    "TrustedSources",
    "encode",
    "encode_v1",
    "encode_v2",
]

Address = tuple[str, int]
"""An IP address as text (``"192.0.2.1"``, ``"2001:db8::1"``) and a port."""

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
"""The 12 bytes every v2 header starts with."""

V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107
"""The longest v1 header, CRLF included (``PROXY TCP6`` and two full IPv6 addresses)."""

V2_FIXED_LENGTH = 16
"""A v2 header's fixed part: the signature, two bytes of command and family, the length."""
V2_MAX_LENGTH = V2_FIXED_LENGTH + 0xFFFF
"""The longest v2 header its 16-bit length allows."""

MISSING = "missing"
MALFORMED = "malformed"
PROXY_ERROR_REASONS = (MISSING, MALFORMED)
"""The ``reason`` of every :class:`ProxyProtocolError`."""

_LOCAL, _PROXY = 0x0, 0x1
_TCP4, _TCP6 = 0x11, 0x21
_ADDRESS_BLOCK = {_TCP4: 12, _TCP6: 36}
"""Bytes of the address block of the families whose addresses a header carries."""
_TLV_HEADER = 3
_SHOWN = 16
"""Bytes of a peer's input quoted in an error at most."""


class ProxyProtocolError(LobleError):
    """A peer's bytes are not a good PROXY header (or an encoder was given bad addresses).

    The message is one line saying what is wrong; ``reason`` is one of
    :data:`PROXY_ERROR_REASONS`, for a metric's label.
    """

    def __init__(self, message: str, reason: str = MALFORMED) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyHeader:
    """One PROXY header, as read from a peer.

    ``source`` and ``destination`` are the client's address and the one it
    connected to, both or neither: None for ``LOCAL`` (``local``), ``UNKNOWN``
    and families without addresses, where the connection's own stand.
    ``length`` is how many bytes the header took.
    """

    version: int
    length: int
    source: Address | None = None
    destination: Address | None = None
    local: bool = False
    """A v2 ``LOCAL`` header: the proxy's own connection, not a client's."""
    tlvs: tuple[tuple[int, bytes], ...] = ()
    """A v2 TCP header's TLVs, ``(type, value)`` in order; not interpreted."""

    def __post_init__(self) -> None:
        if self.version not in (1, 2):
            raise ValueError(f"version {self.version!r} is not 1 or 2")
        if self.length < 1:
            raise ValueError(f"length {self.length!r} must be >= 1")
        if (self.source is None) != (self.destination is None):
            raise ValueError("source and destination go together: both or neither")
        if self.local and (self.version != 2 or self.source is not None):
            raise ValueError("only a v2 header is LOCAL, and it names no addresses")


class HeaderParser:
    """Reads one PROXY header, v1 or v2, from bytes fed in pieces of any size.

    :meth:`feed` answers None until the header is complete, then the
    :class:`ProxyHeader` (also :attr:`header`); the bytes fed after the
    header are in :attr:`rest`. A bad header raises
    :class:`ProxyProtocolError` as soon as it can be told from a good one.
    """

    __slots__ = ("_buffer", "_max_length", "header", "rest")

    def __init__(self, *, max_length: int = V2_MAX_LENGTH) -> None:
        if not V2_FIXED_LENGTH <= max_length <= V2_MAX_LENGTH:
            raise ValueError(f"max_length {max_length!r} is not {V2_FIXED_LENGTH}-{V2_MAX_LENGTH}")
        self._max_length = max_length
        self._buffer = bytearray()
        self.header: ProxyHeader | None = None
        """The header, once complete."""
        self.rest = b""
        """The bytes fed after the header: the start of the client's stream."""

    def feed(self, data: bytes) -> ProxyHeader | None:
        """Take the next bytes from the peer; the header once complete, else None."""
        if self.header is not None:
            raise LobleError("the header is complete: the bytes after it are the stream's")
        buffer = self._buffer
        buffer += data
        if buffer.startswith(SIGNATURE):
            header = self._v2(buffer)
        elif buffer.startswith(V1_PREFIX):
            header = _v1(buffer)
        elif SIGNATURE.startswith(buffer) or V1_PREFIX.startswith(buffer):
            return None  # what came so far could still begin either
        else:
            raise ProxyProtocolError(
                f"not a PROXY protocol header: starts {_show(buffer)}", MISSING
            )
        if header is not None:
            self.header = header
            self.rest = bytes(buffer[header.length :])
            buffer.clear()
        return header

    def _v2(self, buffer: bytearray) -> ProxyHeader | None:
        if len(buffer) < V2_FIXED_LENGTH:
            return None
        version_command, family = buffer[12], buffer[13]
        version, command = version_command >> 4, version_command & 0x0F
        if version != 2:
            raise ProxyProtocolError(f"v2 header: version {version} in byte 13, not 2")
        if command not in (_LOCAL, _PROXY):
            raise ProxyProtocolError(
                f"v2 header: command {command:#x} is neither LOCAL (0x0) nor PROXY (0x1)"
            )
        if family >> 4 > 3 or family & 0x0F > 2:
            raise ProxyProtocolError(f"v2 header: family and transport {family:#04x} are unknown")
        length = V2_FIXED_LENGTH + int.from_bytes(buffer[14:16], "big")
        if length > self._max_length:
            raise ProxyProtocolError(
                f"v2 header: {length} bytes long, more than the {self._max_length} allowed"
            )
        if len(buffer) < length:
            return None
        block_size = _ADDRESS_BLOCK.get(family)
        if command == _LOCAL:
            return ProxyHeader(version=2, length=length, local=True)
        if block_size is None:
            return ProxyHeader(version=2, length=length)  # no client address to read
        block = bytes(buffer[V2_FIXED_LENGTH:length])
        if len(block) < block_size:
            name = "TCP4" if family == _TCP4 else "TCP6"
            raise ProxyProtocolError(
                f"v2 header: {len(block)} address bytes, a {name} header needs {block_size}"
            )
        half = (block_size - 4) // 2
        source_ip = ipaddress.ip_address(block[:half])
        destination_ip = ipaddress.ip_address(block[half : 2 * half])
        source_port, destination_port = struct.unpack_from("!HH", block, 2 * half)
        return ProxyHeader(
            version=2,
            length=length,
            source=(str(source_ip), source_port),
            destination=(str(destination_ip), destination_port),
            tlvs=_tlvs(block, block_size),
        )


def _v1(buffer: bytearray) -> ProxyHeader | None:
    end = buffer.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if len(buffer) >= V1_MAX_LENGTH:
            raise ProxyProtocolError(f"v1 header: no CRLF in its first {V1_MAX_LENGTH} bytes")
        if b"\n" in buffer:
            raise ProxyProtocolError("v1 header: a line feed without a carriage return")
        if b"\r" in buffer[:-1]:
            raise ProxyProtocolError("v1 header: a carriage return without a line feed")
        return None
    line = bytes(buffer[:end])
    length = end + 2
    fields = line.split(b" ")
    if fields[1] == b"UNKNOWN":
        # The spec: the receiver ignores whatever follows UNKNOWN on the line.
        return ProxyHeader(version=1, length=length)
    protocol = fields[1].decode("ascii", "replace")
    if protocol not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(f"v1 header: protocol {protocol!r} is not TCP4, TCP6 or UNKNOWN")
    if len(fields) != 6:
        raise ProxyProtocolError(
            f"v1 header: {len(fields) - 2} fields after {protocol}, not 4 "
            "(source, destination, source port, destination port)"
        )
    version = 4 if protocol == "TCP4" else 6
    source = _v1_host(fields[2], version, "source")
    destination = _v1_host(fields[3], version, "destination")
    source_port = _v1_port(fields[4], "source")
    destination_port = _v1_port(fields[5], "destination")
    return ProxyHeader(
        version=1,
        length=length,
        source=(source, source_port),
        destination=(destination, destination_port),
    )


def _v1_host(raw: bytes, version: int, which: str) -> str:
    shown = raw.decode("ascii", "replace")
    # ipaddress takes a zone ("fe80::1%eth0") that the protocol has no room for.
    if b"%" not in raw and raw.isascii():
        try:
            ip = ipaddress.ip_address(raw.decode("ascii"))
        except ValueError:
            pass
        else:
            if ip.version == version:
                return str(ip)
    raise ProxyProtocolError(f"v1 header: {which} address {shown!r} is not an IPv{version} address")


def _v1_port(raw: bytes, which: str) -> int:
    # Decimal 0-65535 without leading zeros (the spec: no octal confusion).
    if raw.isdigit() and len(raw) <= 5 and (raw == b"0" or not raw.startswith(b"0")):
        port = int(raw)
        if port <= 0xFFFF:
            return port
    shown = raw.decode("ascii", "replace")
    raise ProxyProtocolError(f"v1 header: {which} port {shown!r} is not a number 0-65535")


def _tlvs(block: bytes, offset: int) -> tuple[tuple[int, bytes], ...]:
    """The TLVs after the address block, each checked to fit in the header."""
    found: list[tuple[int, bytes]] = []
    size = len(block)
    while offset < size:
        where = V2_FIXED_LENGTH + offset
        if size - offset < _TLV_HEADER:
            raise ProxyProtocolError(
                f"v2 header: a TLV at byte {where} is cut short ({size - offset} of its 3 bytes)"
            )
        kind = block[offset]
        value_size = int.from_bytes(block[offset + 1 : offset + 3], "big")
        end = offset + _TLV_HEADER + value_size
        if end > size:
            raise ProxyProtocolError(
                f"v2 header: TLV {kind:#04x} at byte {where} claims {value_size} bytes, "
                f"{size - offset - _TLV_HEADER} are left"
            )
        found.append((kind, block[offset + _TLV_HEADER : end]))
        offset = end
    return tuple(found)


def _show(buffer: bytearray) -> str:
    shown = repr(bytes(buffer[:_SHOWN]))
    return shown + ("..." if len(buffer) > _SHOWN else "")


# -- writing ------------------------------------------------------------------------------

_IP: TypeAlias = "ipaddress.IPv4Address | ipaddress.IPv6Address"


def encode_v1(source: Address | None, destination: Address | None) -> bytes:
    """A v1 header naming ``source`` and ``destination``; ``PROXY UNKNOWN`` if either is None."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    source_ip, destination_ip = _pair(source, destination)
    protocol = "TCP4" if source_ip.version == 4 else "TCP6"
    line = f"PROXY {protocol} {source_ip} {destination_ip} {source[1]} {destination[1]}\r\n"
    return line.encode("ascii")


def encode_v2(
    source: Address | None,
    destination: Address | None,
    *,
    tlvs: Iterable[tuple[int, bytes]] = (),
) -> bytes:
    """A v2 PROXY header for TCP from ``source`` to ``destination``, with ``tlvs`` after.

    Either address None makes a ``LOCAL`` header with no addresses, as
    HAProxy sends when it has none to give (the receiver keeps the
    connection's own).
    """
    if source is None or destination is None:
        body = b""
        command, family = 0x20 | _LOCAL, 0x00
    else:
        source_ip, destination_ip = _pair(source, destination)
        family = _TCP4 if source_ip.version == 4 else _TCP6
        command = 0x20 | _PROXY
        body = (
            source_ip.packed + destination_ip.packed + struct.pack("!HH", source[1], destination[1])
        )
    for kind, value in tlvs:
        if not 0 <= kind <= 0xFF or len(value) > 0xFFFF:
            raise ProxyProtocolError(f"TLV {kind!r} of {len(value)} bytes does not fit")
        body += bytes((kind,)) + len(value).to_bytes(2, "big") + value
    if len(body) > 0xFFFF:
        raise ProxyProtocolError(
            f"v2 header: {len(body)} bytes after the fixed part, at most 65535"
        )
    return SIGNATURE + bytes((command, family)) + len(body).to_bytes(2, "big") + body


def encode(version: int, source: Address | None, destination: Address | None) -> bytes:
    """The header of ``version`` (1 or 2) for a client at ``source`` that connected to
    ``destination``."""
    if version == 1:
        return encode_v1(source, destination)
    if version == 2:
        return encode_v2(source, destination)
    raise ProxyProtocolError(f"PROXY protocol version {version!r} is not 1 or 2")


def _pair(source: Address, destination: Address) -> tuple[_IP, _IP]:
    """Both addresses as one family: an IPv4 one beside an IPv6 one is written IPv4-mapped."""
    source_ip, destination_ip = _ip(source), _ip(destination)
    if source_ip.version != destination_ip.version:
        source_ip, destination_ip = _mapped(source_ip), _mapped(destination_ip)
    return source_ip, destination_ip


def _ip(address: Address) -> _IP:
    host, port = address
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise ProxyProtocolError(f"port {port!r} is not 0-65535")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ProxyProtocolError(f"{host!r} is not an IP address") from None
    return ipaddress.ip_address(ip.packed)  # without a zone (%eth0): the header has no room


def _mapped(ip: _IP) -> ipaddress.IPv6Address:
    if isinstance(ip, ipaddress.IPv6Address):
        return ip
    return ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + ip.packed)


# -- who may send one ----------------------------------------------------------------------


class TrustedSources:
    """The networks whose peers must send a PROXY header (``[listener] accept_proxy_from``).

    Only a peer whose address is in one of them may tell Loble who the
    client is: anyone else could claim any address. False when empty.
    """

    __slots__ = ("networks",)

    def __init__(self, cidrs: Iterable[str]) -> None:
        self.networks = tuple(ipaddress.ip_network(cidr) for cidr in cidrs)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, host: str) -> bool:
        """Whether a peer at ``host`` (as ``accept`` gave it) is in a trusted network."""
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        candidates: tuple[_IP, ...] = (ip,)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            candidates = (ip, ip.ipv4_mapped)  # an IPv4 client on a dual-stack socket
        return any(candidate in network for network in self.networks for candidate in candidates)
