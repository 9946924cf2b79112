"""docs/configuration.md and the configuration schema agree, key by key.

The schema's side is read from the code, never retyped here: the sections,
keys, types and defaults from the dataclasses of ``loble/core/_config.py``
(``Config``'s fields and their types, each section's ``dataclasses.fields``),
and each key's check from ``parse_config`` itself, by feeding it values it
must refuse and reading its one-line errors: a value of the wrong type says
what kind of check it is, ``-10**12`` and ``10**12`` give an integer's bounds
(``must be >= 1``, ``must be <= 1000``) and a composite number within
them a prime's (``must be a prime number``), ``"zzz"`` gives a choice's options
(``is not one of round_robin, random, ...``, so ``ALGORITHMS``, ``LOG_LEVELS``
and the others as the code has them), ``-1.0`` and ``1e10`` a number of
seconds' range, ``"h:99999"`` an address's port range. The page's side is
its tables, one per section under a ``## `[section]``` heading. Then both
ways: a key missing from the page, a key on the page the schema lacks, and a
type, default or check that differs each fail, naming the key.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

import pytest
import tomllib

from loble.core import ConfigError, _config, parse_config

PAGE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
MISSING = dataclasses.MISSING
# TOML's names for the Python types a section's fields have.
TOML_TYPES = {str: "string", int: "integer", float: "float", bool: "boolean"}


def toml_type(kind: Any) -> str:
    """A field's TOML type: ``tuple[str, ...]`` is an array of strings."""
    if typing.get_origin(kind) is tuple:
        (item, _) = typing.get_args(kind)
        return f"array of {TOML_TYPES[item]}s"
    return TOML_TYPES[kind]


# -- the schema, from the code ---------------------------------------------------


def sections() -> dict[str, type[Any]]:
    """Heading (``[listener]``, ``[[backends]]``) to its dataclass, from ``Config``'s fields."""
    hints = typing.get_type_hints(_config.Config, vars(_config))
    found: dict[str, type[Any]] = {}
    for field in dataclasses.fields(_config.Config):
        kind = hints[field.name]
        if typing.get_origin(kind) is tuple:  # an array of tables
            (item, _) = typing.get_args(kind)
            found[f"[[{field.name}]]"] = item
        else:
            found[f"[{field.name}]"] = kind
    return found


def errors_for(heading: str, key: str, value: Any) -> list[str]:
    """What ``parse_config`` says about ``key = value`` alone (other keys' errors left out)."""
    name = heading.strip("[]")
    if heading.startswith("[["):
        entry = {"address": "127.0.0.1:1", key: value}
        document: dict[str, Any] = {name: [entry]}
        path = f"{name}[0].{key}"
    else:
        document = {name: {key: value}, "backends": [{"address": "127.0.0.1:1"}]}
        path = f"{name}.{key}"
    try:
        parse_config(document)
    except ConfigError as error:
        return [line[len(path) + 2 :] for line in error.errors if line.startswith(f"{path}: ")]
    return []


def refusal(heading: str, key: str, value: Any) -> str:
    """The message after the quoted value, or "" when the value is accepted."""
    found = errors_for(heading, key, value)
    assert len(found) <= 1, found
    return found[0].removeprefix(repr(value)).strip() if found else ""


def number(text: str) -> str:
    """1000000 -> 1,000,000, as the page writes integers."""
    return f"{int(text):,}"


def check_of(heading: str, key: str) -> str | None:
    """The key's check as the page writes it, worked out from parse_config; None for free text.

    A check it cannot read comes back as a sentence no page cell matches, so
    that key's test fails and says why.
    """
    kind = refusal(heading, key, [])
    if not kind:
        if refusal(heading, key, "zzz").startswith("is not an array"):
            return None  # an array: what its items may be is the page's prose
        return "(parse_config takes anything here, a list too: is the key read at all?)"
    if kind == "is not an integer":
        low = re.fullmatch(r"must be >= (-?\d+)", refusal(heading, key, -(10**12)))
        high = re.fullmatch(r"must be <= (-?\d+)", refusal(heading, key, 10**12))
        if not (low and high):
            return "(an integer without both bounds)"
        bounds = f"{number(low[1])} to {number(high[1])}"
        # A composite number within the bounds: refused only by a prime check.
        composite = max(int(low[1]), 2) * 2
        if refusal(heading, key, composite).startswith("must be a prime"):
            return f"{bounds}, prime"
        return bounds
    if kind == "is not a number of seconds":
        low_text = refusal(heading, key, -1.0)
        low = re.fullmatch(r"must be (?:at least|>=) ([\d.]+) seconds", low_text)
        high = re.fullmatch(
            r"is too large \(more than (10\^\d+) seconds\)", refusal(heading, key, 1e10)
        )
        if not (low and high):
            return f"(seconds without both bounds: {low_text!r})"
        return f"{low[1]} s to {high[1]} s"
    if kind == "is not a number":
        bounds = re.fullmatch(r"must be from 0 to ([\d.]+)", refusal(heading, key, 1.5))
        if bounds and refusal(heading, key, -0.5) == bounds[0]:
            return f"0 to {bounds[1]}"
        return "(a number without its bounds)"
    if kind == "is not true or false":
        return "`true`, `false`"
    if kind == "is not a 'host:port' string":
        ports = re.fullmatch(
            r"port 99999 is out of range (\d+)-(\d+)", refusal(heading, key, "h:99999")
        )
        if not ports:
            return "(an address without a port range)"
        return f"`host:port`, port {ports[1]} to {ports[2]}"
    options = re.fullmatch(r"is not one of (.+)", refusal(heading, key, "zzz"))
    if kind == "is not a string" and options:
        return ", ".join(f"`{option}`" for option in options[1].split(", "))
    if not kind.startswith("is not a string"):
        return f"(a check this test cannot read: {kind!r})"
    return None  # a string with a rule of its own (a path, a user name, a token): prose


@dataclasses.dataclass(frozen=True)
class Key:
    type: str
    default: Any
    check: str | None


def schema() -> dict[str, dict[str, Key]]:
    found: dict[str, dict[str, Key]] = {}
    for heading, section in sections().items():
        hints = typing.get_type_hints(section, vars(_config))
        found[heading] = {
            field.name: Key(
                toml_type(hints[field.name]),
                field.default,
                check_of(heading, field.name),
            )
            for field in dataclasses.fields(section)
        }
    return found


SCHEMA = schema()


# -- the page -----------------------------------------------------------------------


def page() -> dict[str, dict[str, dict[str, str]]]:
    """Heading to {key: {column: cell}} for each table under a ``## `[...]``` heading."""
    text = PAGE.read_text(encoding="utf-8")
    found: dict[str, dict[str, dict[str, str]]] = {}
    for part in re.split(r"^## ", text, flags=re.MULTILINE)[1:]:
        title, _, body = part.partition("\n")
        heading = re.fullmatch(r"`(\[\[?\w+\]\]?)`", title.strip())
        if heading is None:
            continue  # prose: addresses, rules across keys, reloading
        rows = [line for line in body.splitlines() if line.startswith("|")]
        assert len(rows) >= 3, f"{title}: no table"
        columns = cells(rows[0])
        assert columns == ["key", "type", "default", "check", "meaning"], title
        table: dict[str, dict[str, str]] = {}
        for row in rows[2:]:
            values = dict(zip(columns, cells(row), strict=True))
            key = values["key"].strip("`")
            assert key not in table, f"{heading[1]} {key} is listed twice"
            table[key] = values
        assert heading[1] not in found, f"{heading[1]} has two sections"
        found[heading[1]] = table
    return found


def cells(row: str) -> list[str]:
    return [cell.strip() for cell in row.strip().strip("|").split("|")]


PAGE_TABLES = page()


def documented_default(cell: str) -> Any:
    if cell == "required":
        return MISSING
    assert cell.startswith("`") and cell.endswith("`"), f"not a TOML value in code: {cell!r}"
    value = tomllib.loads(f"value = {cell[1:-1]}")["value"]
    return tuple(value) if isinstance(value, list) else value  # arrays are tuples in the schema


def every_key() -> list[tuple[str, str]]:
    return [(heading, key) for heading, keys in SCHEMA.items() for key in keys]


# -- both ways ---------------------------------------------------------------------


def test_the_page_has_every_section_and_no_other() -> None:
    assert sorted(PAGE_TABLES) == sorted(SCHEMA)


@pytest.mark.parametrize("heading", sorted(SCHEMA))
def test_the_page_lists_every_key_of_the_section_and_no_other(heading: str) -> None:
    documented = set(PAGE_TABLES.get(heading, {}))
    keys = set(SCHEMA[heading])
    assert not keys - documented, f"{heading}: {sorted(keys - documented)} not on the page"
    assert not documented - keys, f"{heading}: {sorted(documented - keys)} not in the schema"


@pytest.mark.parametrize(("heading", "key"), every_key())
def test_the_page_gives_the_type_default_and_check_of_the_schema(heading: str, key: str) -> None:
    row = PAGE_TABLES.get(heading, {}).get(key)
    assert row is not None, f"{heading} {key} is not on the page"
    expected = SCHEMA[heading][key]
    assert row["type"] == expected.type, f"{heading} {key}: type"
    default = documented_default(row["default"])
    # Typed: 2 is not 2.0, and 0 is not false.
    assert (type(default), default) == (type(expected.default), expected.default), (
        f"{heading} {key}: default"
    )
    if expected.check is None:
        assert row["check"], f"{heading} {key}: say what it accepts"
    else:
        # The check as the schema gives it, then optionally "; " and a rule of the page's.
        assert row["check"].split("; ")[0] == expected.check, f"{heading} {key}: check"
    assert row["meaning"], f"{heading} {key}: say what it does"


@pytest.mark.parametrize(("heading", "key"), every_key())
def test_parse_config_fills_in_the_documented_default(heading: str, key: str) -> None:
    """The parser's own fallback is the dataclass default the page shows (it names both)."""
    expected = SCHEMA[heading][key].default
    if expected is MISSING:  # "required": a backend without it is an error
        with pytest.raises(ConfigError, match=rf"backends\[0\]\.{key}: missing"):
            parse_config({"backends": [{}]})
        return
    config = parse_config({"backends": [{"address": "127.0.0.1:1"}]})
    name = heading.strip("[]")
    section = getattr(config, name)
    value = getattr(section[0] if heading.startswith("[[") else section, key)
    assert (type(value), value) == (type(expected), expected)


def test_the_reading_of_the_checks_is_right() -> None:
    """The probes above read what the code holds: a few keys worked out by hand."""
    assert SCHEMA["[balancer]"]["algorithm"].check == ", ".join(
        f"`{name}`" for name in _config.ALGORITHMS
    )
    assert SCHEMA["[logging]"]["level"].check == ", ".join(
        f"`{name}`" for name in _config.LOG_LEVELS
    )
    assert SCHEMA["[[backends]]"]["weight"].check == "1 to 1,000,000"
    assert SCHEMA["[health]"]["probe_jitter"].check == "0 to 0.5"
    assert SCHEMA["[timeouts]"]["drain"].check == "0 s to 10^9 s"
    assert SCHEMA["[runtime]"]["pid_file"].check is None
