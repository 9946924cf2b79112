"""The PROXY protocol in the core: the parser, the encoders, who may send a header, the keys.

Round trips (hypothesis): any IPv4 or IPv6 addresses and ports, v1 and v2,
encoded, then fed to a parser in pieces of random sizes with random stream
bytes after the header, come back as themselves, and the stream bytes are
left exactly as they were. The fuzz tests feed random bytes and mutations of
valid headers: the parser raises nothing but :class:`ProxyProtocolError`
(whose message is one line), never takes a byte past the header, and a
header it accepts encodes again to the same addresses.
"""

from __future__ import annotations

import ipaddress
import itertools
import random
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from loble.core import (
    PROXY_ERROR_REASONS,
    ConfigError,
    HeaderParser,
    LobleError,
    ProxyCore,
    ProxyHeader,
    ProxyProtocolError,
    Reconfigured,
    TrustedSources,
    config_to_dict,
    encode,
    encode_v1,
    encode_v2,
    parse_config,
    send_proxy_versions,
)
from loble.core._proxy_protocol import SIGNATURE, V1_MAX_LENGTH, V2_MAX_LENGTH

# -- strategies ---------------------------------------------------------------------

ports = st.integers(0, 65535)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)


@st.composite
def address_pairs(draw: st.DrawFn) -> tuple[tuple[str, int], tuple[str, int]]:
    """A client and the address it connected to, of one family (as one socket has them)."""
    hosts = draw(st.sampled_from([ipv4, ipv6]))
    return (draw(hosts), draw(ports)), (draw(hosts), draw(ports))


tlv_lists = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=4)


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at ``cuts`` (positions, any order, repeats allowed: empty pieces)."""
    points = sorted(min(cut, len(data)) for cut in cuts)
    bounds = [0, *points, len(data)]
    return [data[start:end] for start, end in itertools.pairwise(bounds)]


def feed_all(parser: HeaderParser, chunks: list[bytes]) -> ProxyHeader | None:
    """Feed ``chunks`` in order until the parser has a header; what it answered last."""
    header = None
    for chunk in chunks:
        header = parser.feed(chunk)
        if header is not None:
            break
    return header


def fed_after(chunks: list[bytes], header: ProxyHeader) -> bytes:
    """Everything that was fed, for comparing with the header's length and ``rest``."""
    fed = b""
    for chunk in chunks:
        fed += chunk
        if len(fed) >= header.length:
            break
    return fed


def canonical(address: tuple[str, int]) -> tuple[str, int]:
    return str(ipaddress.ip_address(address[0])), address[1]


# -- round trips --------------------------------------------------------------------


@given(
    pair=address_pairs(),
    version=st.sampled_from([1, 2]),
    stream=st.binary(max_size=200),
    cuts=st.lists(st.integers(0, 400), max_size=8),
)
def test_a_header_fed_in_any_pieces_reads_back_and_leaves_the_stream_untouched(
    pair: tuple[tuple[str, int], tuple[str, int]],
    version: int,
    stream: bytes,
    cuts: list[int],
) -> None:
    source, destination = pair
    header_bytes = encode(version, source, destination)
    data = header_bytes + stream
    chunks = pieces(data, cuts)
    parser = HeaderParser()
    header = feed_all(parser, chunks)
    assert header is not None
    assert header.version == version
    assert header.length == len(header_bytes)
    assert header.source == canonical(source)
    assert header.destination == canonical(destination)
    assert not header.local
    # The bytes fed after the header are the stream's, exactly; the rest were never fed.
    fed = fed_after(chunks, header)
    assert parser.rest == fed[header.length :]
    assert parser.rest + data[len(fed) :] == stream


@given(pair=address_pairs(), tlvs=tlv_lists, cuts=st.lists(st.integers(0, 300), max_size=6))
def test_v2_tlvs_round_trip(
    pair: tuple[tuple[str, int], tuple[str, int]],
    tlvs: list[tuple[int, bytes]],
    cuts: list[int],
) -> None:
    source, destination = pair
    data = encode_v2(source, destination, tlvs=tlvs)
    header = feed_all(HeaderParser(), pieces(data, cuts))
    assert header is not None
    assert header.tlvs == tuple(tlvs)
    assert header.length == len(data)


@given(stream=st.binary(max_size=50), cuts=st.lists(st.integers(0, 80), max_size=5))
def test_local_and_unknown_name_no_client(stream: bytes, cuts: list[int]) -> None:
    for data, version, local in (
        (encode_v2(None, None), 2, True),
        (encode_v1(None, None), 1, False),
    ):
        parser = HeaderParser()
        chunks = pieces(data + stream, cuts)
        header = feed_all(parser, chunks)
        assert header == ProxyHeader(version=version, length=len(data), local=local)
        assert parser.rest + (data + stream)[len(fed_after(chunks, header)) :] == stream


def test_the_spec_s_examples_read_as_the_spec_says() -> None:
    v1 = HeaderParser().feed(b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET /")
    assert v1 == ProxyHeader(
        version=1,
        length=47,
        source=("192.168.0.1", 56324),
        destination=("192.168.0.11", 443),
    )
    six = HeaderParser().feed(b"PROXY TCP6 2001:DB8::1 2001:db8::11 56324 443\r\n")
    assert six is not None and six.source == ("2001:db8::1", 56324)
    assert HeaderParser().feed(b"PROXY UNKNOWN\r\n") == ProxyHeader(version=1, length=15)
    # "the receiver must ignore anything presented before the CRLF"
    anything = b"PROXY UNKNOWN ffff::1 \xff\xfe whatever\r\n"
    assert HeaderParser().feed(anything) == ProxyHeader(version=1, length=len(anything))
    # v2: TCP over IPv4 from 1.2.3.4:5 to 6.7.8.9:10, as bytes on the wire.
    wire = SIGNATURE + bytes.fromhex("2111000c 01020304 06070809 0005 000a".replace(" ", ""))
    assert encode_v2(("1.2.3.4", 5), ("6.7.8.9", 10)) == wire
    assert HeaderParser().feed(wire) == ProxyHeader(
        version=2, length=28, source=("1.2.3.4", 5), destination=("6.7.8.9", 10)
    )
    assert encode_v2(None, None) == SIGNATURE + b"\x20\x00\x00\x00"


def test_the_longest_v1_header_is_107_bytes_and_is_read() -> None:
    full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    line = encode_v1((full, 65535), (full, 65535))
    assert len(line) == 104
    assert HeaderParser().feed(line) is not None
    # 107 bytes, CRLF included, are allowed: padding inside UNKNOWN's free text.
    longest = b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 16) + b"\r\n"
    assert len(longest) == V1_MAX_LENGTH
    assert HeaderParser().feed(longest) == ProxyHeader(version=1, length=V1_MAX_LENGTH)


def test_v2_families_without_addresses_keep_the_connection_s_own() -> None:
    for family in (0x00, 0x12, 0x22, 0x31, 0x32, 0x01, 0x10):
        block = bytes(216)
        data = SIGNATURE + bytes((0x21, family)) + len(block).to_bytes(2, "big") + block
        header = HeaderParser().feed(data + b"stream")
        assert header == ProxyHeader(version=2, length=len(data)), hex(family)
    # LOCAL: whatever the family says, the addresses are discarded.
    data = SIGNATURE + b"\x20\x11\x00\x0c" + bytes(12)
    assert HeaderParser().feed(data) == ProxyHeader(version=2, length=28, local=True)


def test_mixed_families_are_written_ipv4_mapped() -> None:
    line = encode_v1(("::1", 1), ("10.0.0.1", 2))
    assert line == b"PROXY TCP6 ::1 ::ffff:a00:1 1 2\r\n"
    header = HeaderParser().feed(encode_v2(("10.0.0.1", 1), ("::1", 2)))
    assert header is not None
    assert ipaddress.IPv6Address(header.source[0]).ipv4_mapped == ipaddress.IPv4Address("10.0.0.1")
    # A zone has no room in a header: it is dropped.
    assert encode_v1(("fe80::1%eth0", 1), ("fe80::2", 2)) == b"PROXY TCP6 fe80::1 fe80::2 1 2\r\n"


# -- bad input: one line, the module's own error ---------------------------------------


BAD = [
    (b"GET / HTTP/1.1\r\n", "missing", "not a PROXY protocol header: starts b'GET / HTTP/1.1\\r\\n'"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03abcdefghijk", "missing", "starts b'\\x16"),
    (b"PROXY TCP4 1.2.3.04 1.2.3.4 1 2\r\n", "malformed", "source address '1.2.3.04'"),
    (b"PROXY TCP4 ::1 1.2.3.4 1 2\r\n", "malformed", "is not an IPv4 address"),
    (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "malformed", "is not an IPv6 address"),
    (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "malformed", "'fe80::1%eth0'"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n", "malformed", "source port '01'"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 65536\r\n", "malformed", "destination port '65536'"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 -1\r\n", "malformed", "destination port '-1'"),
    (b"PROXY TCP4 1.2.3.4  1.2.3.4 1 2\r\n", "malformed", "5 fields after TCP4, not 4"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n", "malformed", "3 fields after TCP4"),
    (b"PROXY UDP4 1.2.3.4 1.2.3.4 1 2\r\n", "malformed", "protocol 'UDP4'"),
    (b"PROXY TCP4 1.2.3.4\n", "malformed", "a line feed without a carriage return"),
    (b"PROXY TCP4 1.2\r3.4", "malformed", "a carriage return without a line feed"),
    (b"PROXY " + b"x" * 101, "malformed", "no CRLF in its first 107 bytes"),
    (SIGNATURE + b"\x11\x11\x00\x00", "malformed", "version 1 in byte 13, not 2"),
    (SIGNATURE + b"\x22\x11\x00\x00", "malformed", "command 0x2 is neither LOCAL"),
    (SIGNATURE + b"\x21\x41\x00\x00", "malformed", "family and transport 0x41 are unknown"),
    (SIGNATURE + b"\x21\x13\x00\x00", "malformed", "family and transport 0x13 are unknown"),
    (SIGNATURE + b"\x21\x11\x00\x08" + bytes(8), "malformed", "8 address bytes, a TCP4 header needs 12"),
    (SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12), "malformed", "a TCP6 header needs 36"),
    (SIGNATURE + b"\x21\x11\x00\x0e" + bytes(14), "malformed", "a TLV at byte 28 is cut short (2 of its 3 bytes)"),
    (
        SIGNATURE + b"\x21\x11\x00\x10" + bytes(12) + b"\x04\x00\x05\x00",
        "malformed",
        "TLV 0x04 at byte 28 claims 5 bytes, 1 are left",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("data", "reason", "words"), BAD)
def test_a_bad_header_is_one_line_naming_what_is_wrong(
    data: bytes, reason: str, words: str
) -> None:
    with pytest.raises(ProxyProtocolError) as caught:
        HeaderParser().feed(data)
    assert caught.value.reason == reason
    assert reason in PROXY_ERROR_REASONS
    message = str(caught.value)
    assert words in message
    assert "\n" not in message and "\r" not in message
    assert isinstance(caught.value, LobleError)


def test_a_v2_length_beyond_the_limit_is_refused_before_the_rest_arrives() -> None:
    parser = HeaderParser(max_length=1000)
    head = SIGNATURE + b"\x21\x11" + (1000 - 16 + 1).to_bytes(2, "big")
    with pytest.raises(ProxyProtocolError, match="1001 bytes long, more than the 1000 allowed"):
        parser.feed(head)  # only the 16 fixed bytes: no need to wait for the 985 others
    # At the limit, it waits for the rest.
    parser = HeaderParser(max_length=1000)
    assert parser.feed(SIGNATURE + b"\x21\x00" + (1000 - 16).to_bytes(2, "big")) is None
    assert parser.feed(bytes(984)) == ProxyHeader(version=2, length=1000)


def test_the_protocol_s_own_bound_is_the_default() -> None:
    data = SIGNATURE + b"\x21\x00\xff\xff" + bytes(0xFFFF)
    assert len(data) == V2_MAX_LENGTH
    assert HeaderParser().feed(data) == ProxyHeader(version=2, length=V2_MAX_LENGTH)
    for bad in (15, V2_MAX_LENGTH + 1):
        with pytest.raises(ValueError, match="max_length"):
            HeaderParser(max_length=bad)


def test_a_prefix_waits_and_a_wrong_byte_is_refused_at_once() -> None:
    for prefix in (b"", b"P", b"PROXY", b"PROXY ", b"\r\n\r\n\x00", SIGNATURE, SIGNATURE + b"\x21"):
        assert HeaderParser().feed(prefix) is None, prefix
    with pytest.raises(ProxyProtocolError, match="not a PROXY protocol header"):
        HeaderParser().feed(b"PROXZ")
    parser = HeaderParser()
    assert parser.feed(b"\r\n") is None
    with pytest.raises(ProxyProtocolError) as caught:
        parser.feed(b"\r\nX")
    assert caught.value.reason == "missing"


def test_a_complete_parser_takes_no_more() -> None:
    parser = HeaderParser()
    assert parser.feed(b"PROXY UNKNOWN\r\nabc") is not None
    assert parser.rest == b"abc"
    with pytest.raises(LobleError, match="the bytes after it are the stream's"):
        parser.feed(b"more")


def test_a_header_value_checks_itself() -> None:
    with pytest.raises(ValueError, match="version 3"):
        ProxyHeader(version=3, length=16)
    with pytest.raises(ValueError, match="length 0"):
        ProxyHeader(version=1, length=0)
    with pytest.raises(ValueError, match="both or neither"):
        ProxyHeader(version=2, length=16, source=("1.2.3.4", 1))
    with pytest.raises(ValueError, match="LOCAL"):
        ProxyHeader(version=1, length=16, local=True)


def test_the_encoders_refuse_what_no_header_can_carry() -> None:
    for source, words in (
        (("example.com", 1), "'example.com' is not an IP address"),
        (("1.2.3.4", 70000), "port 70000 is not 0-65535"),
        (("1.2.3.4", True), "port True"),
        (("1.2.3.4", "80"), "port '80'"),
    ):
        for encoder in (encode_v1, encode_v2):
            with pytest.raises(ProxyProtocolError, match=words):
                encoder(source, ("1.2.3.4", 2))  # type: ignore[arg-type]
    with pytest.raises(ProxyProtocolError, match="TLV 256"):
        encode_v2(("1.2.3.4", 1), ("1.2.3.4", 2), tlvs=[(256, b"")])
    with pytest.raises(ProxyProtocolError, match="at most 65535"):
        encode_v2(("1.2.3.4", 1), ("1.2.3.4", 2), tlvs=[(1, bytes(65000)), (2, bytes(1000))])
    with pytest.raises(ProxyProtocolError, match="version 3 is not 1 or 2"):
        encode(3, None, None)


# -- fuzz ---------------------------------------------------------------------------------


def check_parser_on(data: bytes, cuts: list[int]) -> None:
    """The parser's contract on any input: its own error only (one line), never a byte
    past the header, and an accepted header encodes again to the same addresses."""
    parser = HeaderParser()
    chunks = pieces(data, cuts)
    try:
        header = feed_all(parser, chunks)
    except ProxyProtocolError as error:
        assert error.reason in PROXY_ERROR_REASONS
        assert "\n" not in str(error) and "\r" not in str(error)
        return
    if header is None:
        # Waiting for more: only while what came could still begin a header.
        assert len(data) < V2_MAX_LENGTH
        return
    fed = fed_after(chunks, header)
    assert header.length <= len(fed)
    assert parser.rest == fed[header.length :]
    assert data[: header.length] + parser.rest == fed
    if header.source is not None:
        assert header.destination is not None
        again = HeaderParser().feed(encode(header.version, header.source, header.destination))
        assert again is not None
        assert (again.source, again.destination) == (header.source, header.destination)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.one_of(
        st.binary(max_size=300),
        st.binary(max_size=120).map(lambda tail: b"PROXY " + tail),
        st.binary(max_size=120).map(lambda tail: SIGNATURE + tail),
        st.binary(max_size=60).map(lambda tail: b"PROXY TCP4 " + tail),
        st.binary(max_size=60).map(lambda tail: b"PROXY TCP6 " + tail),
    ),
    cuts=st.lists(st.integers(0, 300), max_size=6),
)
@example(data=SIGNATURE + b"\x21\x11\x00\x0c" + bytes(12), cuts=[])
def test_fuzz_random_bytes(data: bytes, cuts: list[int]) -> None:
    check_parser_on(data, cuts)


@st.composite
def mutated_headers(draw: st.DrawFn) -> bytes:
    """A valid header (any version, family, TLVs) with stream bytes, then some mutations."""
    source, destination = draw(address_pairs())
    kind = draw(st.sampled_from(["v1", "v2", "v2-tlv", "local", "unknown"]))
    if kind == "v1":
        data = encode_v1(source, destination)
    elif kind == "v2":
        data = encode_v2(source, destination)
    elif kind == "v2-tlv":
        data = encode_v2(source, destination, tlvs=draw(tlv_lists))
    elif kind == "local":
        data = encode_v2(None, None)
    else:
        data = encode_v1(None, None)
    buffer = bytearray(data + draw(st.binary(max_size=30)))
    for _ in range(draw(st.integers(1, 4))):
        operation = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if not buffer:
            break
        where = draw(st.integers(0, len(buffer) - 1))
        if operation == "flip":
            buffer[where] ^= 1 << draw(st.integers(0, 7))
        elif operation == "set":
            buffer[where] = draw(st.sampled_from([0, 0x0A, 0x0D, 0x20, 0x30, 0x39, 0xFF]))
        elif operation == "insert":
            buffer[where:where] = draw(st.binary(min_size=1, max_size=3))
        elif operation == "delete":
            del buffer[where]
        else:
            del buffer[where:]
    return bytes(buffer)


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(data=mutated_headers(), cuts=st.lists(st.integers(0, 200), max_size=6))
def test_fuzz_mutated_headers(data: bytes, cuts: list[int]) -> None:
    check_parser_on(data, cuts)


@settings(max_examples=200)
@given(pair=address_pairs(), length=st.integers(0, 60000), seed=st.integers(0, 2**32))
def test_fuzz_v2_lengths_and_tlv_soup(
    pair: tuple[tuple[str, int], tuple[str, int]], length: int, seed: int
) -> None:
    """A TCP header whose length and TLV bytes are random: read, or one line refused."""
    source, destination = pair
    start = encode_v2(source, destination)
    rng = random.Random(seed)
    soup = rng.randbytes(min(length, 300))
    block_end = len(start) - 16
    data = start[:14] + struct.pack("!H", block_end + len(soup)) + start[16:] + soup
    assume(len(data) <= V2_MAX_LENGTH)
    check_parser_on(data + b"tail", [rng.randrange(len(data) + 1)])


# -- who may send one ----------------------------------------------------------------------


def test_trusted_sources_match_networks_and_ipv4_on_a_dual_stack_socket() -> None:
    trusted = TrustedSources(["10.0.0.0/8", "::1/128", "192.0.2.7/32"])
    assert trusted
    for host in ("10.1.2.3", "::1", "192.0.2.7", "::ffff:10.9.9.9", "::ffff:192.0.2.7"):
        assert trusted.trusts(host), host
    for host in ("11.0.0.1", "::2", "192.0.2.8", "", "not-an-ip", "::ffff:11.0.0.1"):
        assert not trusted.trusts(host), host
    assert not TrustedSources([])
    assert not TrustedSources([]).trusts("10.0.0.1")


# -- the keys ---------------------------------------------------------------------------------


def backends(*entries: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"address": f"127.0.0.1:{index + 1}", **entry} for index, entry in enumerate(entries)]


def test_send_proxy_is_off_by_default_and_a_backend_overrides_the_balancer() -> None:
    assert send_proxy_versions(parse_config({"backends": backends({}, {})})) == {}
    config = parse_config(
        {
            "balancer": {"send_proxy": "v2"},
            "backends": backends(
                {}, {"send_proxy": "v1"}, {"send_proxy": "off"}, {"send_proxy": ""}
            ),
        }
    )
    assert send_proxy_versions(config) == {"127.0.0.1:1": 2, "127.0.0.1:2": 1, "127.0.0.1:4": 2}
    only_one = parse_config({"backends": backends({}, {"send_proxy": "v2"})})
    assert send_proxy_versions(only_one) == {"127.0.0.1:2": 2}


def test_accept_proxy_from_is_canonical_and_printed_as_an_array() -> None:
    config = parse_config(
        {
            "listener": {"accept_proxy_from": ["10.0.0.0/8", "::1", "2001:DB8::/32", "127.0.0.1"]},
            "backends": backends({}),
        }
    )
    assert config.listener.accept_proxy_from == (
        "10.0.0.0/8",
        "::1/128",
        "2001:db8::/32",
        "127.0.0.1/32",
    )
    printed = config_to_dict(config)
    assert printed["listener"]["accept_proxy_from"] == list(config.listener.accept_proxy_from)
    assert printed["backends"] == [
        {
            "address": "127.0.0.1:1",
            "weight": 1,
            "send_proxy": "",
            "backup": False,
            "max_connections": 0,
        }
    ]
    assert parse_config({"backends": backends({})}).listener.accept_proxy_from == ()


def test_bad_values_are_one_line_each_naming_the_key() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {
                "listener": {
                    "accept_proxy_from": ["10.0.0.1/8", "10.0.0.0/33", 8, "fe80::%eth0/64"]
                },
                "balancer": {"send_proxy": "v3"},
                "backends": backends({"send_proxy": "V1"}, {"send_proxy": 2}),
            }
        )
    assert caught.value.errors == [
        "listener.accept_proxy_from[0]: '10.0.0.1/8' has host bits set: the network is 10.0.0.0/8",
        "listener.accept_proxy_from[1]: '10.0.0.0/33' is not an IPv4 or IPv6 network "
        "(such as 10.0.0.0/8 or ::1/128)",
        'listener.accept_proxy_from[2]: 8 is not a string (a network such as "10.0.0.0/8")',
        "listener.accept_proxy_from[3]: 'fe80::%eth0/64' has a zone (%...): write the network alone",
        "balancer.send_proxy: 'v3' is not one of off, v1, v2",
        "backends[0].send_proxy: 'V1' is not one of off, v1, v2 "
        '(or "" for [balancer] send_proxy)',
        'backends[1].send_proxy: 2 is not a string ("off", "v1", "v2", '
        'or "" for [balancer] send_proxy)',
    ]
    with pytest.raises(ConfigError, match=r"^listener.accept_proxy_from: '10.0.0.0/8' is not an"):
        parse_config({"listener": {"accept_proxy_from": "10.0.0.0/8"}, "backends": backends({})})


def test_a_reload_names_the_proxy_keys_it_changed() -> None:
    old = parse_config({"backends": backends({}, {"send_proxy": "v1"}, {})})
    core = ProxyCore(old, random.Random(0))
    new = parse_config(
        {
            "listener": {"accept_proxy_from": ["10.0.0.0/8"]},
            "balancer": {"send_proxy": "v2"},
            "backends": backends({}, {"send_proxy": "v2"}, {}, {"send_proxy": "v1"}),
        }
    )
    (reloaded, *_) = core.reconfigure(new, 1.0)
    assert isinstance(reloaded, Reconfigured)
    assert reloaded.changed == (
        "listener.accept_proxy_from",
        "balancer.send_proxy",
        "backends[127.0.0.1:2].send_proxy",  # a backend added (127.0.0.1:4) is in added
    )
    assert reloaded.added == ("127.0.0.1:4",)
