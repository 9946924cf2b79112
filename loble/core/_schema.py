"""A small schema helper: check a parsed TOML table, collecting every problem.

:class:`Checker` walks a document the caller describes key by key and keeps
*every* error it finds, each naming the key path and the bad value
(``balancer.connect_retries: -1 must be >= 0``), so a user fixes a file in
one go. A *check* is a function of a raw value that returns ``None`` when it
is good, or the end of the sentence saying what is wrong (``"must be >= 0"``);
:func:`integer`, :func:`seconds`, :func:`choice` and :func:`boolean` make the
common ones. The configuration parser (``_config``) and the simulator's
scenario parser (``loble.sim``) share this one copy, so their messages read
the same.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

__all__ = ["Check", "Checker", "boolean", "choice", "integer", "seconds"]

Check = Callable[[Any], "str | None"]
"""A raw value to ``None`` (good) or what is wrong with it (``"is not an integer"``)."""

_T = TypeVar("_T")


class Checker:
    """Collects every error instead of stopping at the first.

    Read values with :meth:`value` and tables with :meth:`table`, flag stray
    keys with :meth:`unknown_keys`; when the walk is done, raise
    ``ConfigError(checker.errors)`` if there are any.
    """

    __slots__ = ("errors",)

    def __init__(self) -> None:
        self.errors: list[str] = []
        """One line per problem, ``"path: message"``, in the order found."""

    def error(self, path: str, message: str) -> None:
        self.errors.append(f"{path}: {message}")

    def unknown_keys(self, path: str, table: Mapping[str, Any], valid: tuple[str, ...]) -> None:
        """Flag each key of ``table`` not in ``valid``, with the closest valid one."""
        for key in table:
            if key in valid:
                continue
            # A key that would not print as itself (a control or separator
            # character, which would also split the error into lines) is quoted.
            shown = key if isinstance(key, str) and key.isprintable() else repr(key)
            where = f"{path}.{shown}" if path else shown
            close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
            self.errors.append(f"{where}: unknown key{hint}")

    def value(self, path: str, table: Mapping[str, Any], key: str, default: _T, check: Check) -> _T:
        """``table[key]`` if present and good; else ``default`` (noting why, if bad)."""
        if key not in table:
            return default
        raw = table[key]
        problem = check(raw)
        if problem is not None:
            self.error(f"{path}.{key}", f"{raw!r} {problem}")
            return default
        return raw  # type: ignore[no-any-return]

    def table(self, path: str, raw: Any) -> Mapping[str, Any]:
        """``raw`` as a table: absent is empty, anything else but a table is an error."""
        if raw is None:
            return {}
        if not isinstance(raw, Mapping):
            self.error(path, f"{raw!r} is not a table")
            return {}
        return raw


def integer(minimum: int, maximum: int | None = None) -> Check:
    """An integer (not a bool) from ``minimum`` to ``maximum``, both included."""

    def check(raw: Any) -> str | None:
        if isinstance(raw, bool) or not isinstance(raw, int):
            return "is not an integer"
        if raw < minimum:
            return f"must be >= {minimum}"
        if maximum is not None and raw > maximum:
            return f"must be <= {maximum}"
        return None

    return check


def seconds(*, positive: bool = True, minimum: float | None = None) -> Check:
    """A finite number of seconds up to 10^9; > 0 if ``positive``, >= ``minimum`` if given."""

    def check(raw: Any) -> str | None:
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            return "is not a number of seconds"
        try:
            value = float(raw)
        except OverflowError:
            return "is too large"
        if not math.isfinite(value):
            return "is not finite"
        if value > 10**9:
            return "is too large (more than 10^9 seconds)"
        if minimum is not None and value < minimum:
            return f"must be at least {minimum} seconds"
        if positive and value <= 0:
            return "must be > 0 seconds"
        return None

    return check


def choice(options: tuple[str, ...]) -> Check:
    """One of ``options``; a near miss gets a "did you mean" hint."""

    def check(raw: Any) -> str | None:
        if not isinstance(raw, str):
            return "is not a string"
        if raw not in options:
            close = difflib.get_close_matches(raw, options, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            return f"is not one of {', '.join(options)}{hint}"
        return None

    return check


def boolean() -> Check:
    """``true`` or ``false`` (a check maker like the others, so call sites read alike)."""
    return _boolean


def _boolean(raw: Any) -> str | None:
    return None if isinstance(raw, bool) else "is not true or false"
