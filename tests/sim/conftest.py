"""Helpers for the simulator's tests: small scenarios built in code."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from loble.sim import Scenario, parse_scenario

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = sorted((REPO / "scenarios").glob("*.toml"))

BASE: dict[str, Any] = {
    "health": {
        "failure_threshold": 2,
        "success_threshold": 2,
        "probe_interval": 0.5,
        "probe_timeout": 0.5,
    },
    "timeouts": {"connect": 0.5, "idle": 30.0, "drain": 5.0},
    "backends": [{"address": "10.9.0.1:80"}, {"address": "10.9.0.2:80"}],
    "sim": {
        "duration": 10.0,
        "clients": {"rate": 20.0, "duration": {"kind": "uniform", "low": 0.1, "high": 1.0}},
        "network": {"latency": 0.001},
    },
}


def document(**changes: Any) -> dict[str, Any]:
    """The base scenario document with top-level tables replaced or (sim.*) merged."""
    result = copy.deepcopy(BASE)
    for key, value in changes.items():
        if key.startswith("sim_"):
            result["sim"][key[4:]] = value
        else:
            result[key] = value
    return result


def scenario(**changes: Any) -> Scenario:
    return parse_scenario(document(**changes), name="test")


@pytest.fixture
def repo() -> Path:
    return REPO
