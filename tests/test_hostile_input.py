"""Hostile configurations and scenarios: one-line errors, never a traceback.

hypothesis builds documents in three ways: anything TOML can hold, a shipped
file with one value replaced by something odd, and a shipped file with a
key deleted or added. Whatever comes in, the config parser and the scenario
parser either accept it or raise :class:`ConfigError` whose every line names
a key; nothing else escapes. A few of the generated documents also go
through the real ``loble check-config`` command, which must print
``error: ...`` lines (or the effective config) and exit 0 or 1.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loble.config import read_toml
from loble.core import ConfigError, LobleError, parse_config
from loble.sim import parse_scenario

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CONFIG = read_toml(ROOT / "config.toml")
SHIPPED_SCENARIOS = [read_toml(path) for path in sorted((ROOT / "scenarios").glob("*.toml"))]

SECTIONS = ("listener", "balancer", "health", "timeouts", "metrics", "logging", "runtime", "admin")

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(
        [
            "127.0.0.1:0",
            "[::1]:80",
            "host:",
            ":80",
            "\uff11\uff12\uff17.0.0.1:\uff18\uff10",
            "a" * 300,
            "0x10",
            "-1",
        ]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
documents = st.dictionaries(
    st.sampled_from((*SECTIONS, "backends", "sim", "extra")), values, max_size=6
)


def check(document: Any) -> None:
    """Parse as a config and as a scenario: accepted, or a ConfigError of named lines."""
    for parse in (parse_config, lambda d: parse_scenario(d, name="fuzz")):
        try:
            parse(document)
        except ConfigError as error:
            lines = str(error).splitlines()
            assert lines, "an error with no message"
            for line in lines:
                assert line.strip() and "Traceback" not in line
        except LobleError as error:  # a subclass with one line, e.g. a runtime not installed
            assert "\n" not in str(error)


def replace_somewhere(document: dict[str, Any], data: st.DataObject) -> dict[str, Any]:
    """A copy of ``document`` with one value, at any depth, replaced by an odd one."""
    changed = copy.deepcopy(document)
    node: Any = changed
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            return changed
        key = data.draw(st.sampled_from(keys))
        child = node[key]
        if isinstance(child, (dict, list)) and child and data.draw(st.booleans()):
            node = child
            continue
        node[key] = data.draw(values)
        return changed


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_any_document_is_accepted_or_refused_in_named_lines(document: dict[str, Any]) -> None:
    check(document)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([SHIPPED_CONFIG, *SHIPPED_SCENARIOS]), st.data())
def test_a_shipped_file_with_one_odd_value_is_accepted_or_refused_in_named_lines(
    document: dict[str, Any], data: st.DataObject
) -> None:
    check(replace_somewhere(document, data))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([SHIPPED_CONFIG, *SHIPPED_SCENARIOS]), st.data())
def test_a_shipped_file_with_a_key_gone_or_added_is_accepted_or_refused_in_named_lines(
    document: dict[str, Any], data: st.DataObject
) -> None:
    changed = copy.deepcopy(document)
    section = data.draw(st.sampled_from(list(changed)))
    table = changed[section]
    if isinstance(table, dict) and table and data.draw(st.booleans()):
        del table[data.draw(st.sampled_from(list(table)))]
    elif isinstance(table, dict):
        table[data.draw(st.text(min_size=1, max_size=12))] = data.draw(values)
    else:
        del changed[section]
    check(changed)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([SHIPPED_CONFIG]), st.data())
def test_check_config_on_odd_files_prints_lines_and_exits_0_or_1(
    tmp_path_factory: Any, document: dict[str, Any], data: st.DataObject
) -> None:
    odd = replace_somewhere(document, data)
    try:
        text = tomli_w.dumps(odd)
    except (TypeError, ValueError):
        return  # None, NaN keys and the like: not writable as TOML, nothing to run
    path = tmp_path_factory.mktemp("odd") / "config.toml"
    path.write_text(text, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "loble", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode in (0, 1), done.stderr
    assert "Traceback" not in done.stderr
    if done.returncode == 1:
        assert all(line.startswith("error: ") for line in done.stderr.splitlines())
