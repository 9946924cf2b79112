"""The schema helper the config and scenario parsers share: every problem, named."""

from __future__ import annotations

from typing import Any

import pytest

from loble.core import Checker, boolean, choice, integer, seconds


def test_a_checker_collects_every_error_in_order() -> None:
    checker = Checker()
    table = {"count": -1, "mode": "fsat", "on": "yes", "speed": 2}
    assert checker.value("top", table, "count", 5, integer(0)) == 5
    assert checker.value("top", table, "mode", "fast", choice(("fast", "slow"))) == "fast"
    assert checker.value("top", table, "on", False, boolean()) is False
    assert checker.value("top", table, "speed", 1, integer(1, 10)) == 2
    assert checker.value("top", table, "absent", 7, integer(0)) == 7
    assert checker.errors == [
        "top.count: -1 must be >= 0",
        "top.mode: 'fsat' is not one of fast, slow; did you mean 'fast'?",
        "top.on: 'yes' is not true or false",
    ]


def test_unknown_keys_get_the_closest_valid_one_or_the_list() -> None:
    checker = Checker()
    checker.unknown_keys("sim", {"duraton": 1, "zzz": 2, "seed": 3}, ("duration", "seed"))
    checker.unknown_keys("", {"listner": {}}, ("listener", "backends"))
    assert checker.errors == [
        "sim.duraton: unknown key; did you mean 'duration'?",
        "sim.zzz: unknown key; valid keys: duration, seed",
        "listner: unknown key; did you mean 'listener'?",
    ]


def test_tables() -> None:
    checker = Checker()
    assert checker.table("sim", None) == {}
    assert checker.table("sim", {"a": 1}) == {"a": 1}
    assert checker.table("sim.clients", 3) == {}
    assert checker.errors == ["sim.clients: 3 is not a table"]


@pytest.mark.parametrize(
    ("check", "raw", "problem"),
    [
        (integer(1, 5), True, "is not an integer"),
        (integer(1, 5), 2.0, "is not an integer"),
        (integer(1, 5), 0, "must be >= 1"),
        (integer(1, 5), 6, "must be <= 5"),
        (integer(1, 5), 5, None),
        (seconds(), "1s", "is not a number of seconds"),
        (seconds(), False, "is not a number of seconds"),
        (seconds(), 10**400, "is too large"),
        (seconds(), float("nan"), "is not finite"),
        (seconds(), 2e9, "is too large (more than 10^9 seconds)"),
        (seconds(), 0, "must be > 0 seconds"),
        (seconds(positive=False), 0, None),
        (seconds(minimum=0.001), 0.0001, "must be at least 0.001 seconds"),
        (seconds(), 1, None),
        (choice(("a", "b")), 1, "is not a string"),
        (choice(("alpha", "beta")), "gamma", "is not one of alpha, beta"),
        (choice(("a", "b")), "b", None),
        (boolean(), True, None),
        (boolean(), 1, "is not true or false"),
    ],
)
def test_checks(check: Any, raw: Any, problem: str | None) -> None:
    assert check(raw) == problem


def test_a_key_that_would_not_print_as_itself_is_quoted_in_one_line() -> None:
    checker = Checker()
    checker.unknown_keys("listener", {"a\x1eb": 1, "c\nd": 2}, ("address",))
    assert checker.errors == [
        "listener.'a\\x1eb': unknown key; valid keys: address",
        "listener.'c\\nd': unknown key; valid keys: address",
    ]
    assert all(len(error.splitlines()) == 1 for error in checker.errors)
