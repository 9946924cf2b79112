"""Payload probes in the core: judging a reply, the checks per backend, the
config keys, jitter on the probe interval, and a reload's new checks."""

from __future__ import annotations

import io
import itertools
import random
import re
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loble.__main__ import main
from loble.core import (
    REPLY_LIMIT,
    ConfigError,
    ConnectBackend,
    HealthInput,
    HealthState,
    ProbeBackend,
    ProbeCheck,
    ProbeFailure,
    ProxyCore,
    judge_reply,
    parse_config,
)
from loble.core._config import probe_checks
from loble.core._health import BackendHealth, Thresholds
from loble.core._probe import CONNECT_ONLY, PAYLOAD_LIMIT

A, B, C = "10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"
PONG = ProbeCheck(send=b"PING\r\n", expect=b"+PONG")


def config(*backends: dict[str, Any] | str, **sections: Any) -> Any:
    entries = [{"address": b} if isinstance(b, str) else b for b in backends or (A,)]
    return parse_config({"backends": entries, **sections})


def errors(**sections: Any) -> list[str]:
    backends = sections.pop("backends", [{"address": A}])
    with pytest.raises(ConfigError) as caught:
        parse_config({"backends": backends, **sections})
    return caught.value.errors


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` split at the sorted positions ``cuts`` (empty chunks dropped)."""
    edges = [0, *sorted(cut % (len(data) + 1) for cut in cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


def first_verdict(check: ProbeCheck, chunks: list[bytes]) -> bool | None:
    """What a driver reading these chunks one by one decides: the first verdict."""
    data = b""
    verdict = judge_reply(check, data)
    for chunk in chunks:
        if verdict is not None:
            break
        data += chunk
        verdict = judge_reply(check, data)
    return verdict


# -- judge_reply -----------------------------------------------------------------


def test_a_prefix_passes_once_it_has_arrived_and_fails_at_the_first_wrong_byte() -> None:
    assert judge_reply(PONG, b"") is None
    assert judge_reply(PONG, b"+PO") is None
    assert judge_reply(PONG, b"+PONG") is True
    assert judge_reply(PONG, b"+PONG\r\n") is True
    assert judge_reply(PONG, b"-ERR") is False
    assert judge_reply(PONG, b"+PA") is False  # no more bytes can fix it
    assert judge_reply(PONG, b"x+PONG") is False  # a prefix, not anywhere


def test_a_pattern_passes_once_found_and_waits_until_the_bound() -> None:
    check = ProbeCheck(send=b"INFO\r\n", expect_regex=re.compile(rb"role:(master|slave)"))
    assert judge_reply(check, b"# Replication\r\n") is None
    assert judge_reply(check, b"# Replication\r\nrole:master\r\n") is True
    assert judge_reply(check, b"x" * (REPLY_LIMIT - 1)) is None
    assert judge_reply(check, b"x" * REPLY_LIMIT) is False
    # Found beyond the bound is not read: a failure.
    assert judge_reply(check, b"x" * REPLY_LIMIT + b"role:master") is False


def test_no_expectation_passes_at_once_without_a_reply() -> None:
    assert judge_reply(CONNECT_ONLY, b"") is True
    assert judge_reply(ProbeCheck(send=b"QUIT\r\n"), b"") is True
    assert not ProbeCheck(send=b"x").awaits_reply and not ProbeCheck(send=b"x").connect_only
    assert ProbeCheck(expect=b"220").awaits_reply and CONNECT_ONLY.connect_only


def test_a_check_is_a_prefix_or_a_pattern_within_the_limit() -> None:
    with pytest.raises(ValueError, match="not both"):
        ProbeCheck(expect=b"+", expect_regex=re.compile(b"x"))
    with pytest.raises(ValueError, match="at most"):
        ProbeCheck(send=b"x" * (PAYLOAD_LIMIT + 1))


def test_every_failure_has_a_description_for_the_log() -> None:
    assert ProbeFailure.MISMATCH.description == "reply did not match"
    assert {failure.value for failure in ProbeFailure} == {
        "refused",
        "connect_timeout",
        "reply_timeout",
        "mismatch",
        "closed",
    }
    assert all(failure.description for failure in ProbeFailure)


@given(
    expect=st.binary(min_size=1, max_size=40),
    tail=st.binary(max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=8),
    matches=st.booleans(),
)
def test_a_prefix_over_any_chunking_is_judged_as_the_whole_reply(
    expect: bytes, tail: bytes, cuts: list[int], matches: bool
) -> None:
    check = ProbeCheck(expect=expect)
    reply = (expect if matches else bytes([expect[0] ^ 1]) + expect[1:]) + tail
    assert first_verdict(check, chunked(reply, cuts)) is matches
    assert judge_reply(check, reply) is matches


@given(
    needle=st.binary(min_size=1, max_size=20),
    before=st.binary(max_size=60),
    after=st.binary(max_size=20),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=8),
)
def test_a_literal_pattern_over_any_chunking_is_judged_as_the_whole_reply(
    needle: bytes, before: bytes, after: bytes, cuts: list[int]
) -> None:
    check = ProbeCheck(expect_regex=re.compile(re.escape(needle)))
    reply = before + needle + after
    assert first_verdict(check, chunked(reply, cuts)) is True
    # Without the needle the reply never passes: more bytes are asked for.
    missing = before.replace(needle, b"")
    assert needle in missing or judge_reply(check, missing) is None


@given(
    expect=st.binary(max_size=8),
    pattern=st.sampled_from([None, rb"\+OK", rb"^220 ", rb"a$"]),
    data=st.binary(max_size=64),
    padding=st.integers(min_value=0, max_value=3),
)
def test_nothing_past_the_bound_is_read_and_the_bound_always_ends_it(
    expect: bytes, pattern: bytes | None, data: bytes, padding: int
) -> None:
    regex = None if pattern is None else re.compile(pattern)
    check = ProbeCheck(expect=b"" if regex else expect, expect_regex=regex)
    long = data + b"\0" * (REPLY_LIMIT - len(data) + padding)
    assert judge_reply(check, long) == judge_reply(check, long[:REPLY_LIMIT])
    assert judge_reply(check, long) is not None  # at the bound there is a verdict


# -- the configuration --------------------------------------------------------------


def test_the_keys_default_to_a_connect_only_probe() -> None:
    health = config().health
    assert (health.probe_send, health.probe_expect, health.probe_expect_regex) == ("", "", "")
    assert health.probe_jitter == 0.0
    assert probe_checks(config(A, B)) == {A: CONNECT_ONLY, B: CONNECT_ONLY}


def test_a_backend_takes_each_key_of_its_own_else_the_global_one() -> None:
    checks = probe_checks(
        config(
            A,
            {"address": B, "probe_send": "INFO\r\n"},
            {"address": C, "probe_expect_regex": "^\\+(PONG|OK)"},
            health={"probe_send": "PING\r\n", "probe_expect": "+PONG"},
        )
    )
    assert checks[A] == PONG
    assert checks[B] == ProbeCheck(send=b"INFO\r\n", expect=b"+PONG")
    # An expect key of its own replaces both of [health]'s: no prefix as well.
    assert checks[C] == ProbeCheck(send=b"PING\r\n", expect_regex=re.compile(rb"^\+(PONG|OK)"))


def test_an_expect_without_a_send_is_a_server_that_speaks_first() -> None:
    (check,) = probe_checks(config(health={"probe_expect": "220 "})).values()
    assert check == ProbeCheck(expect=b"220 ") and check.awaits_reply


def test_text_is_sent_as_utf8() -> None:
    (check,) = probe_checks(config(health={"probe_send": "é\n"})).values()
    assert check.send == "é\n".encode()


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        (
            {"health": {"probe_expect_regex": "(unclosed"}},
            "health.probe_expect_regex: '(unclosed' is not a valid regular expression: "
            "missing ), unterminated subpattern at position 0",
        ),
        (
            {"health": {"probe_expect": "+PONG", "probe_expect_regex": "PONG"}},
            "health.probe_expect_regex: 'PONG' is set with health.probe_expect ('+PONG'): "
            "expect a prefix or a pattern, not both",
        ),
        (
            {"backends": [{"address": A, "probe_expect": "a", "probe_expect_regex": "b"}]},
            "backends[0].probe_expect_regex: 'b' is set with backends[0].probe_expect ('a'): "
            "expect a prefix or a pattern, not both",
        ),
        (
            {"health": {"probe_send": 7}},
            'health.probe_send: 7 is not a string (bytes as text, such as "PING\\r\\n", '
            'or "" for none)',
        ),
        (
            {"health": {"probe_expect": "x" * (PAYLOAD_LIMIT + 1)}},
            f"health.probe_expect: {'x' * (PAYLOAD_LIMIT + 1)!r} is {PAYLOAD_LIMIT + 1} bytes "
            f"as UTF-8: at most {PAYLOAD_LIMIT}",
        ),
        (
            {"health": {"probe_expect_regex": "(\\+PONG)?"}},
            "health.probe_expect_regex: '(\\\\+PONG)?' matches an empty reply, so a backend "
            "that answers nothing would pass",
        ),
        (
            {"health": {"probe_jitter": 0.6}},
            "health.probe_jitter: 0.6 must be from 0 to 0.5",
        ),
        (
            {"health": {"probe_jitter": True}},
            "health.probe_jitter: True is not a number",
        ),
        (
            {"health": {"probe_interval": 2.0, "probe_timeout": 1.5, "probe_jitter": 0.3}},
            "health.probe_jitter: 0.3 makes the shortest interval 1.4 s, shorter than "
            "health.probe_timeout (1.5)",
        ),
        (
            {"backends": [{"address": A, "probe_send": "\ud800"}]},
            "backends[0].probe_send: '\\ud800' is not valid Unicode text (a lone surrogate)",
        ),
    ],
)
def test_bad_values_are_one_line_naming_the_key(sections: dict[str, Any], message: str) -> None:
    assert errors(**sections) == [message]


def test_check_config_prints_the_probe_keys(tmp_path: Path) -> None:
    path = tmp_path / "redis.toml"
    path.write_text(
        '[health]\nprobe_send = "PING\\r\\n"\nprobe_expect = "+PONG"\nprobe_jitter = 0.2\n'
        '[[backends]]\naddress = "127.0.0.1:6379"\nprobe_expect_regex = "^\\\\+PONG"\n',
        encoding="utf-8",
    )
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["check-config", str(path)]) == 0
    printed = out.getvalue()
    assert 'probe_send = "PING\\r\\n"' in printed
    assert 'probe_expect = "+PONG"' in printed
    assert "probe_jitter = 0.2" in printed
    assert 'probe_expect_regex = "^\\\\+PONG"' in printed  # the backend's own


# -- the control plane: what a probe carries, and when it goes ------------------------


def probes_of(outputs: list[Any]) -> list[ProbeBackend]:
    return [output for output in outputs if isinstance(output, ProbeBackend)]


def run_probes(proxy: ProxyCore, until: float) -> list[tuple[float, ProbeBackend]]:
    """Drive the core's timer alone (every probe passes at once) until ``until``."""
    sent: list[tuple[float, ProbeBackend]] = []
    while (due := proxy.next_deadline()) is not None and due <= until:
        for probe in probes_of(proxy.handle_timer(due)):
            sent.append((due, probe))
            proxy.probe_result(probe.backend.address, True, due)
    return sent


def test_a_probe_carries_its_backends_check() -> None:
    proxy = ProxyCore(
        config(
            A,
            {"address": B, "probe_expect": "+OK"},
            health={"active": True, "probe_send": "PING\r\n", "probe_expect": "+PONG"},
        ),
        random.Random(1),
    )
    proxy.start(0.0)
    checks = {probe.backend.address: probe.check for _, probe in run_probes(proxy, 2.0)}
    assert checks == {A: PONG, B: ProbeCheck(send=b"PING\r\n", expect=b"+OK")}


@given(seed=st.integers(min_value=0, max_value=2**32), jitter=st.sampled_from([0.05, 0.2, 0.5]))
def test_jittered_probes_are_spaced_within_the_jitter_and_do_not_march_in_step(
    seed: int, jitter: float
) -> None:
    health = {"active": True, "probe_interval": 1.0, "probe_timeout": 0.5, "probe_jitter": jitter}
    proxy = ProxyCore(config(A, B, C, health=health), random.Random(seed))
    proxy.start(0.0)
    sent = run_probes(proxy, 30.0)
    last: dict[str, float] = {}
    gaps: list[float] = []
    for at, probe in sent:
        address = probe.backend.address
        if address in last:
            gaps.append(at - last[address])
        last[address] = at
    assert gaps and all(1.0 - jitter - 1e-9 <= gap <= 1.0 + jitter + 1e-9 for gap in gaps)
    assert len({round(gap, 9) for gap in gaps}) > 1  # drawn, not one fixed interval
    firsts = sorted({at for at, _ in sent[:3]})
    assert len(firsts) == 3  # the three backends' first probes are apart


def test_without_jitter_nothing_is_drawn_and_probes_keep_the_interval() -> None:
    rng = random.Random(5)
    state = rng.getstate()
    proxy = ProxyCore(config(A, B, health={"active": True}), rng)
    proxy.start(0.0)
    sent = run_probes(proxy, 10.0)
    assert [at for at, _ in sent] == [2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 8.0, 8.0, 10.0, 10.0]
    assert rng.getstate() == state  # round_robin draws nothing either


def test_the_timer_lead_allows_for_the_shortest_jittered_interval() -> None:
    health = {"probe_interval": 2.0, "probe_timeout": 0.5, "probe_jitter": 0.25}
    timeouts = {"connect": 9.0, "idle": 9.0, "drain": 9.0}
    proxy = ProxyCore(config(health=health, timeouts=timeouts), random.Random(1))
    assert proxy.timer_lead() == 1.5


def test_a_reload_gives_the_next_probes_the_new_check() -> None:
    before = config(A, health={"active": True, "probe_interval": 1.0, "probe_timeout": 0.5})
    proxy = ProxyCore(before, random.Random(1))
    proxy.start(0.0)
    assert [probe.check for _, probe in run_probes(proxy, 1.0)] == [CONNECT_ONLY]
    after = config(
        {"address": A, "probe_send": "PING\r\n", "probe_expect": "+PONG"},
        health={"active": True, "probe_interval": 1.0, "probe_timeout": 0.5},
    )
    (reloaded, *_) = proxy.reconfigure(after, 1.5)
    assert reloaded.changed == (  # type: ignore[union-attr]
        f"backends[{A}].probe_send",
        f"backends[{A}].probe_expect",
    )
    assert [probe.check for _, probe in run_probes(proxy, 2.0)] == [PONG]
    health = {"active": True, "probe_interval": 1.0, "probe_timeout": 0.5, "probe_jitter": 0.1}
    (reloaded, *_) = proxy.reconfigure(config(A, health=health), 2.5)
    assert reloaded.changed == (  # type: ignore[union-attr]
        "health.probe_jitter",
        f"backends[{A}].probe_send",
        f"backends[{A}].probe_expect",
    )
    assert [probe.check for _, probe in run_probes(proxy, 4.0)] == [CONNECT_ONLY] * 2


def test_a_check_shows_only_what_is_set() -> None:
    assert repr(CONNECT_ONLY) == "ProbeCheck()"
    assert repr(PONG) == "ProbeCheck(send=b'PING\\r\\n', expect=b'+PONG')"
    assert repr(ProbeCheck(expect_regex=re.compile(b"^220"))) == (
        "ProbeCheck(expect_regex=re.compile(b'^220'))"
    )


# -- the health rule: a payload check outweighs a connect ---------------------------------


@pytest.mark.parametrize(("payload", "out"), [(True, True), (False, False)])
def test_a_connect_success_breaks_a_run_of_failures_only_without_a_payload_check(
    payload: bool, out: bool
) -> None:
    record = BackendHealth(A, Thresholds(failure_threshold=3, success_threshold=2))
    record.payload_probed = payload
    for health_input in (
        HealthInput.PROBE_FAILURE,
        HealthInput.PROBE_FAILURE,
        HealthInput.PASSIVE_SUCCESS,  # a frozen backend's kernel accepted a client
        HealthInput.PROBE_FAILURE,
    ):
        transition = record.handle(health_input)
    assert (record.state is HealthState.UNHEALTHY) is out
    assert (transition is not None) is out


def test_the_control_plane_marks_the_backends_whose_probes_expect_a_reply() -> None:
    active = {"probe_send": "PING\r\n", "active": True}
    proxy = ProxyCore(
        config(A, {"address": B, "probe_expect": "+OK"}, health=active),
        random.Random(1),
    )
    assert [proxy.control.health(a).payload_probed for a in (A, B)] == [False, True]
    proxy.reconfigure(config(A, B, health={"probe_expect_regex": "OK", "active": True}), 1.0)
    assert [proxy.control.health(a).payload_probed for a in (A, B)] == [True, True]
    # Without active probes no probe ends a healthy backend's run of failures:
    # its connects must, or rare failures far apart would add up to a fall.
    proxy.reconfigure(config(A, B, health={"probe_expect_regex": "OK"}), 2.0)
    assert [proxy.control.health(a).payload_probed for a in (A, B)] == [False, False]


def test_without_active_probes_rare_connect_failures_do_not_add_up() -> None:
    document = {
        "health": {"probe_send": "PING\r\n", "probe_expect": "+PONG"},
        "balancer": {"connect_retries": 0},
        "backends": [{"address": A}, {"address": B}],
    }
    proxy = ProxyCore(parse_config(document), random.Random(1))
    proxy.start(0.0)
    now = 0.0
    for round_ in range(3):  # failure_threshold 3: one refused connect among 20 good ones
        for number in range(20):
            now += 0.01
            cid, outputs = proxy.accept(now)
            (connect,) = [o for o in outputs if isinstance(o, ConnectBackend)]
            if number == 0 and connect.backend.address == A:
                proxy.connect_failed(cid, 1, now)
            else:
                proxy.connected(cid, connect.attempt, now)
        assert proxy.control.health(A).consecutive_failures == 0, round_
    assert proxy.control.state(A) is HealthState.HEALTHY
