"""Reading a configuration file: the only I/O between a TOML file and the core.

Every way a user's file can be wrong ends in :class:`ConfigError` with one
message per problem, never a traceback.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import Any

from loble.core import Config, ConfigError, parse_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

__all__ = ["load_config", "read_toml"]


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file, turning every failure into a one-line ConfigError."""
    if not str(path):  # Path("") is ".", which would name the current directory
        raise ConfigError(["config path is empty"])
    path = Path(path)
    try:
        text = _read_regular_file(path)
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except PermissionError:
        raise ConfigError([f"{path}: permission denied"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: is not UTF-8 text"]) from None
    except OSError as error:
        raise ConfigError([f"{path}: {error.strerror or error}"]) from None
    try:
        document: dict[str, Any] = tomllib.loads(text)
        return document
    except tomllib.TOMLDecodeError as error:
        raise ConfigError([f"{path}: invalid TOML: {error}"]) from None
    except RecursionError:
        # tomllib parses nested arrays and inline tables by recursion, so a
        # few hundred levels exhaust the interpreter's stack.
        raise ConfigError([f"{path}: invalid TOML: nested too deeply"]) from None


def _read_regular_file(path: Path) -> str:
    """The text of ``path``, refusing a FIFO, socket or device before opening it.

    Opening a FIFO blocks until a writer comes (and would unblock a writer
    waiting for a reader); a device such as /dev/zero never ends. ``stat``
    follows symlinks without opening, so ``/dev/stdin`` redirected from a
    file still reads. The ``fstat`` after a non-blocking open catches a path
    swapped for a FIFO in between.
    """
    mode = path.stat().st_mode
    if stat.S_ISDIR(mode):
        raise ConfigError([f"{path}: is a directory, not a TOML file"])
    _require_regular(path, mode)
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with open(descriptor, encoding="utf-8") as file:
        _require_regular(path, os.fstat(descriptor).st_mode)
        return file.read()


def _require_regular(path: Path, mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise ConfigError([f"{path}: is not a regular file"])


def load_config(path: str | Path) -> Config:
    """Read, parse and validate a configuration file."""
    return parse_config(read_toml(path))
