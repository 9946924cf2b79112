"""Configuration: defaults, every validation rule, and `loble check-config`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomllib

from loble.__main__ import main
from loble.config import load_config, read_toml
from loble.core import (
    AdminConfig,
    Backend,
    Config,
    ConfigError,
    config_to_dict,
    parse_address,
    parse_config,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config.toml"


def errors_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as error:
        parse_config(data)
    return error.value.errors


def one_backend(**extra: Any) -> dict[str, Any]:
    return {"backends": [{"address": "127.0.0.1:8080"}], **extra}


def test_defaults_are_documented_values() -> None:
    config = parse_config(one_backend())
    assert config.listener.address == "127.0.0.1:9000"
    assert config.balancer.algorithm == "round_robin"
    assert config.balancer.connect_retries == 2
    assert (config.health.failure_threshold, config.health.success_threshold) == (3, 2)
    assert (config.health.probe_interval, config.health.probe_timeout) == (2.0, 1.0)
    assert config.health.active is False
    assert (config.timeouts.connect, config.timeouts.idle, config.timeouts.drain) == (
        5.0,
        300.0,
        30.0,
    )
    assert (config.metrics.enabled, config.metrics.address) == (False, "127.0.0.1:9090")
    assert (config.logging.level, config.logging.format) == ("info", "logfmt")
    assert (config.runtime.backend, config.runtime.workers) == ("asyncio", 1)
    assert config.backends[0].weight == 1
    assert config.timeouts.removal == 0.0
    assert config.runtime.pid_file == ""
    assert config.runtime.user == ""
    assert (config.listener.backlog, config.listener.max_connections) == (1024, 0)
    assert config.admin == AdminConfig(enabled=False, address="127.0.0.1:9091", token="")


def test_the_example_config_is_valid() -> None:
    config = load_config(EXAMPLE)
    assert [b.address for b in config.backends] == [
        "127.0.0.1:9101",
        "127.0.0.1:9102",
        "127.0.0.1:9103",
    ]
    assert config.metrics.enabled


@pytest.mark.parametrize("value", [0, 1, 50, 1_000_000])
def test_max_connections_takes_0_for_no_limit_and_any_count_up_to_a_million(value: int) -> None:
    config = parse_config(one_backend(listener={"max_connections": value}))
    assert config.listener.max_connections == value


def test_integers_are_accepted_as_seconds() -> None:
    config = parse_config(one_backend(timeouts={"connect": 1, "drain": 0}))
    assert config.timeouts.connect == 1.0 and isinstance(config.timeouts.connect, float)
    assert config.timeouts.drain == 0.0


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"backends": [{"address": "10.0.0.1:80"}, {"address": "10.0.0.2"}]},
            "backends[1].address: '10.0.0.2' has no port",
        ),
        (
            {"backends": [{"address": "::1:80"}]},
            "backends[0].address: '::1:80' is IPv6 without brackets",
        ),
        (
            {"backends": [{"address": "[::1]:80"}, {"address": "[0:0::1]:80"}]},
            "backends[1].address: '[0:0::1]:80' duplicates backends[0].address",
        ),
        ({"backends": [{"address": "[zz]:80"}]}, "'zz' is not an IPv6 address"),
        ({"backends": [{"address": "[::1:80"}]}, "has no closing ']'"),
        ({"backends": [{"address": "[::1]80"}]}, "'[::1]80' has no port"),
        ({"backends": [{"address": ":80"}]}, "has no host"),
        ({"backends": [{"address": "bad_host!:80"}]}, "is not a valid host name"),
        ({"backends": [{"address": "10.0.0.1\n:80"}]}, "'10.0.0.1\\n' is not a valid host name"),
        (
            {"backends": [{"address": "999.300.1.1:80"}]},
            "'999.300.1.1' is not a valid IPv4 address",
        ),
        (one_backend(timeouts={"connect": 10**400}), "timeouts.connect: 1000"),
        (one_backend(timeouts={"connect": 10**400}), "is too large"),
        (one_backend(timeouts={"idle": 1e12}), "timeouts.idle: 1000000000000.0 is too large"),
        (one_backend(health={"failure_threshold": 10**400}), "must be <= 1000"),
        (one_backend(listener={"backlog": 0}), "listener.backlog: 0 must be >= 1"),
        (
            one_backend(listener={"max_connections": -1}),
            "listener.max_connections: -1 must be >= 0",
        ),
        (
            one_backend(listener={"max_connections": 10**7}),
            "listener.max_connections: 10000000 must be <= 1000000",
        ),
        (
            one_backend(listener={"max_connections": 2.5}),
            "listener.max_connections: 2.5 is not an integer",
        ),
        (
            one_backend(listener={"max_connections": "100"}),
            "listener.max_connections: '100' is not an integer",
        ),
        (
            one_backend(listener={"max_connections": True}),
            "listener.max_connections: True is not an integer",
        ),
        (
            one_backend(listener={"max_conections": 5}),
            "listener.max_conections: unknown key; did you mean 'max_connections'?",
        ),
        ({"backends": [{"address": "h:http"}]}, "port 'http' is not a number"),
        ({"backends": [{"address": "h:0"}]}, "port 0 is out of range 1-65535"),
        ({"backends": [{"address": "h:70000"}]}, "port 70000 is out of range"),
        ({"backends": [{"address": 80}]}, "backends[0].address: 80 is not a 'host:port' string"),
        ({"backends": [{"address": "a:1", "weight": 0}]}, "backends[0].weight: 0 must be >= 1"),
        ({"backends": [{"address": "a:1", "weight": -3}]}, "backends[0].weight: -3 must be >= 1"),
        (
            {"backends": [{"address": "a:1", "weight": 1.5}]},
            "backends[0].weight: 1.5 is not an integer",
        ),
        (
            {"backends": [{"address": "a:1", "wieght": 2}]},
            "backends[0].wieght: unknown key; did you mean 'weight'?",
        ),
        ({"backends": [{"weight": 2}]}, "backends[0].address: missing"),
        ({"backends": ["a:1"]}, "backends[0]: 'a:1' is not a table"),
        ({"backends": {"address": "a:1"}}, "is not an array of tables"),
        ({"backends": []}, "backends: no backends"),
        ({}, "backends: no backends"),
        (one_backend(health={"failure_threshold": 0}), "health.failure_threshold: 0 must be >= 1"),
        (
            one_backend(health={"success_threshold": True}),
            "health.success_threshold: True is not an integer",
        ),
        (
            one_backend(health={"probe_interval": 0}),
            "health.probe_interval: 0 must be at least 0.001 seconds",
        ),
        (
            one_backend(health={"probe_interval": 1e-300}),
            "health.probe_interval: 1e-300 must be at least",
        ),
        (
            one_backend(health={"probe_timeout": "1s"}),
            "health.probe_timeout: '1s' is not a number of seconds",
        ),
        (one_backend(health={"active": "yes"}), "health.active: 'yes' is not true or false"),
        (one_backend(timeouts={"idle": float("inf")}), "timeouts.idle: inf is not finite"),
        (one_backend(timeouts={"drain": -1}), "timeouts.drain: -1.0 must be >= 0 seconds"),
        (
            one_backend(balancer={"algorithm": "round-robin"}),
            "balancer.algorithm: 'round-robin' is not one of round_robin, random, least_connections, p2c, maglev, ring_hash; did you mean 'round_robin'?",
        ),
        (one_backend(balancer={"algorithm": 3}), "balancer.algorithm: 3 is not a string"),
        (
            one_backend(balancer={"connect_retries": -1}),
            "balancer.connect_retries: -1 must be >= 0",
        ),
        (one_backend(balancer={"connect_retries": 101}), "must be <= 100"),
        (one_backend(listener={"address": "0.0.0.0"}), "listener.address: '0.0.0.0' has no port"),
        (one_backend(listener="0.0.0.0:80"), "listener: '0.0.0.0:80' is not a table"),
        (one_backend(logging={"level": "verbose"}), "logging.level: 'verbose' is not one of"),
        (one_backend(logging={"levl": "info"}), "logging.levl: unknown key; did you mean 'level'?"),
        (
            one_backend(runtime={"backend": "gevent"}),
            "runtime.backend: 'gevent' is not one of asyncio, uvloop, trio",
        ),
        (one_backend(metrics={"enabled": 1}), "metrics.enabled: 1 is not true or false"),
        (one_backend(listner={"address": "a:1"}), "listner: unknown key; did you mean 'listener'?"),
        (one_backend(zzz=1), "zzz: unknown key; valid keys: listener, balancer"),
        (one_backend(timeouts={"removal": -1}), "timeouts.removal: -1.0 must be >= 0 seconds"),
        (one_backend(timeouts={"removal": "1m"}), "timeouts.removal: '1m' is not a number"),
        (
            one_backend(runtime={"pid_file": 1}),
            'runtime.pid_file: 1 is not a string (a file path, or "" for none)',
        ),
        (one_backend(runtime={"pid_file": "a\0b"}), "runtime.pid_file: 'a\\x00b' contains a NUL"),
        (
            one_backend(runtime={"user": 0}),
            'runtime.user: 0 is not a string (a user name, or "" to stay who started it)',
        ),
        (one_backend(runtime={"user": "root; rm"}), "runtime.user: 'root; rm' is not a user name"),
        (one_backend(admin={"enabled": "on"}), "admin.enabled: 'on' is not true or false"),
        (one_backend(admin={"address": "localhost"}), "admin.address: 'localhost' has no port"),
        (one_backend(admin={"tokn": "x"}), "admin.tokn: unknown key; did you mean 'token'?"),
        (one_backend(admin={"token": 12}), "admin.token: is not a string"),
    ],
)
def test_each_error_names_the_key_and_the_value(data: dict[str, Any], message: str) -> None:
    assert any(message in error for error in errors_of(data)), errors_of(data)


# -- the checks a new user tripped on (issue 11, item 6) --------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"backends": [{"address": "10.0.0.1:\uff18\uff10"}]},
            "backends[0].address: '10.0.0.1:\uff18\uff10' port '\uff18\uff10' must be ASCII digits",
        ),
        (
            {"backends": [{"address": "10.0.0.1:8\u00b2"}]},
            "backends[0].address: '10.0.0.1:8\u00b2' port '8\u00b2' must be ASCII digits",
        ),
        (
            one_backend(listener={"address": "127.0.0.1:\u0669\u0660"}),
            "listener.address: '127.0.0.1:\u0669\u0660' port '\u0669\u0660' must be ASCII digits",
        ),
        (
            one_backend(metrics={"enabled": True, "address": "127.0.0.1:9000"}),
            "metrics.address: '127.0.0.1:9000' is also listener.address ('127.0.0.1:9000'): "
            "give each its own port",
        ),
        (
            one_backend(
                listener={"address": "0.0.0.0:8000"},
                admin={"enabled": True, "address": "127.0.0.1:8000"},
            ),
            "admin.address: '127.0.0.1:8000' is also listener.address ('0.0.0.0:8000'): "
            "give each its own port",
        ),
        (
            one_backend(
                listener={"address": "[::1]:8000"},
                admin={"enabled": True, "address": "[0::1]:8000"},
            ),
            "admin.address: '[0::1]:8000' is also listener.address ('[::1]:8000'): "
            "give each its own port",
        ),
        (
            one_backend(health={"probe_interval": 1.0, "probe_timeout": 1.5}),
            "health.probe_timeout: 1.5 is longer than health.probe_interval (1.0)",
        ),
        (
            one_backend(health={"probe_interval": 0.5}),
            "health.probe_timeout: 1.0 is longer than health.probe_interval (0.5)",
        ),
    ],
)
def test_mistakes_a_new_user_made_are_one_line_each(data: dict[str, Any], message: str) -> None:
    assert errors_of(data) == [message]


@pytest.mark.parametrize(
    "sections",
    [
        {"metrics": {"enabled": False, "address": "127.0.0.1:9000"}},  # off: no clash
        {"admin": {"enabled": False, "address": "127.0.0.1:9000"}},
        {  # port 0: the OS picks two different ports
            "listener": {"address": "127.0.0.1:0"},
            "metrics": {"enabled": True, "address": "127.0.0.1:0"},
            "admin": {"enabled": True, "address": "127.0.0.1:0"},
        },
        {"metrics": {"enabled": True, "address": "127.0.0.2:9000"}},
        {"health": {"probe_interval": 1.0, "probe_timeout": 1.0}},  # equal is fine
    ],
)
def test_what_is_not_a_clash(sections: dict[str, Any]) -> None:
    parse_config(one_backend(**sections))


def test_an_admin_tokens_errors_never_show_it() -> None:
    (error,) = errors_of(one_backend(admin={"token": "s3cret with spaces"}))
    assert error == "admin.token: must be printable ASCII without spaces (value not shown)"
    assert parse_config(one_backend(admin={"token": "Zm9v-._~+/="})).admin.token == "Zm9v-._~+/="


def test_every_error_is_reported_at_once() -> None:
    errors = errors_of(
        {
            "balancer": {"algorithm": "fastest"},
            "health": {"failure_threshold": 0},
            "backends": [{"address": "10.0.0.2"}, {"address": "h:1", "weight": 0}],
        }
    )
    assert len(errors) == 4


def test_listener_and_metrics_may_use_port_zero() -> None:
    config = parse_config(one_backend(listener={"address": "127.0.0.1:0"}))
    assert config.listener.address == "127.0.0.1:0"


def test_hostnames_and_ipv6_parse() -> None:
    assert parse_address("[::1]:8080") == ("::1", 8080)
    assert parse_address("backend.internal:80") == ("backend.internal", 80)
    assert parse_address("my_service:80") == ("my_service", 80)  # a compose service name
    assert parse_address("example.com.:80") == ("example.com.", 80)
    assert Backend(address="[::1]:8080").host == "::1"
    assert Backend(address="[::1]:8080").port == 8080
    assert Backend(address="example.org:1").host == "example.org"
    with pytest.raises(ValueError):
        Backend(address="a:1", weight=0)
    with pytest.raises(ValueError):
        Backend(address="")


def test_effective_config_round_trips_through_toml() -> None:
    import tomli_w

    config = load_config(EXAMPLE)
    again = parse_config(tomllib.loads(tomli_w.dumps(config_to_dict(config))))
    assert again == config
    assert isinstance(again, Config)
    full = parse_config(
        one_backend(
            timeouts={"removal": 2.5},
            runtime={"pid_file": "/run/loble.pid"},
            admin={"enabled": True, "address": "127.0.0.1:9191", "token": "abc"},
        )
    )
    document = config_to_dict(full)
    assert document["admin"] == {"enabled": True, "address": "127.0.0.1:9191", "token": "abc"}
    assert document["timeouts"]["removal"] == 2.5
    assert document["runtime"]["pid_file"] == "/run/loble.pid"
    assert parse_config(tomllib.loads(tomli_w.dumps(document))) == full


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[listener\n", "invalid TOML"),
        (b"\xff\xfe".decode("latin-1"), "is not UTF-8 text"),
    ],
)
def test_unreadable_files_give_one_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(ConfigError, match=message):
        read_toml(path)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        read_toml(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="is a directory"):
        read_toml(tmp_path)


# -- the command line ---------------------------------------------------------------------


def test_check_config_prints_the_effective_configuration(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["check-config", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "valid; the effective configuration" in out
    document = tomllib.loads(out)
    assert document["timeouts"]["drain"] == 30.0
    assert document["logging"]["format"] == "logfmt"  # a default, filled in
    assert document["listener"]["max_connections"] == 0  # none: the descriptors' limit
    assert len(document["backends"]) == 3


def test_check_config_reports_the_bad_backend_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(EXAMPLE.read_text().replace('"127.0.0.1:9102"', '"10.0.0.2"'))
    result = subprocess.run(
        [sys.executable, "-m", "loble", "check-config", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == "error: backends[1].address: '10.0.0.2' has no port\n"


def test_check_config_lists_every_error_one_per_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[health]\nfailure_treshold = 0\n[[backends]]\naddress = "x"\n')
    assert main(["check-config", str(bad)]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "error: health.failure_treshold: unknown key; did you mean 'failure_threshold'?",
        "error: backends[0].address: 'x' has no port",
    ]


def test_check_config_on_a_missing_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "/nonexistent/loble.toml"]) == 1
    assert capsys.readouterr().err == "error: /nonexistent/loble.toml: no such file\n"
