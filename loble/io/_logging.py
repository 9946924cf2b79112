"""Log lines in logfmt or JSON, one line per record, fields kept structured.

Code logs with :func:`log`, giving a short message and named fields; the
formatters render them as ``ts=... level=info msg="..." key=value`` (logfmt)
or one JSON object per line. Only the command line calls
:func:`configure_logging`: tests and embedders keep their own handlers and
read the ``fields`` attribute of each record.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any, TextIO

from loble.core import LoggingConfig

__all__ = [
    "LEVELS",
    "LIBRARY_LOGGERS",
    "JsonFormatter",
    "LogfmtFormatter",
    "WorkerTag",
    "configure_logging",
    "formatter_for",
    "log",
]

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def log(logger: logging.Logger, level: int, message: str, **fields: object) -> None:
    """Log ``message`` with structured ``fields`` (skipped cheaply when disabled)."""
    if logger.isEnabledFor(level):
        logger.log(level, message, extra={"fields": fields})


def _base(record: logging.LogRecord) -> dict[str, Any]:
    stamp = datetime.fromtimestamp(record.created, tz=timezone.utc)
    line: dict[str, Any] = {
        "ts": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    line.update(getattr(record, "fields", {}))
    return line


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = _base(record)
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return " ".join(f"{key}={_logfmt_value(value)}" for key, value in line.items())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = _base(record)
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, separators=(",", ":"))


def _logfmt_value(value: object) -> str:
    if value is None:
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value)
    if text and not any(c in text for c in ' ="\\') and text.isprintable():
        return text
    escaped = (
        text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    )
    return f'"{escaped}"'


def formatter_for(config: LoggingConfig) -> logging.Formatter:
    """The formatter of ``[logging] format``."""
    return JsonFormatter() if config.format == "json" else LogfmtFormatter()


LIBRARY_LOGGERS = ("asyncio", "trio", "hypercorn.error")
"""Loggers of the libraries the daemon runs on, whose warnings an operator must see:
the event loop's (e.g. ``socket.accept() out of system resource`` when
descriptors run out under the HTTP endpoints) and the HTTP server's."""


class WorkerTag(logging.Filter):
    """Adds ``worker=k`` to every line of worker ``k`` (with ``[runtime] workers``)."""

    def __init__(self, worker: int) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        record.fields = {**getattr(record, "fields", {}), "worker": self.worker}
        return True


def configure_logging(
    config: LoggingConfig, stream: TextIO | None = None, *, worker: int | None = None
) -> logging.Logger:
    """Send the ``loble`` loggers to ``stream`` (stderr) in the configured format.

    The libraries' warnings and errors (:data:`LIBRARY_LOGGERS`) go to the same
    handler, so every line the process writes has one format; a worker's
    lines each carry ``worker=k``.
    """
    logger = logging.getLogger("loble")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter_for(config))
    if worker is not None:
        handler.addFilter(WorkerTag(worker))
    levels = {"loble": LEVELS[config.level]}
    levels.update(dict.fromkeys(LIBRARY_LOGGERS, logging.WARNING))
    for name, level in levels.items():
        target = logging.getLogger(name)
        for old in list(target.handlers):
            target.removeHandler(old)
        target.addHandler(handler)
        target.setLevel(level)
        target.propagate = False
    return logger
