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

__all__ = ["JsonFormatter", "LogfmtFormatter", "configure_logging", "log"]

_LEVELS = {
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


def configure_logging(config: LoggingConfig, stream: TextIO | None = None) -> logging.Logger:
    """Send the ``loble`` loggers to ``stream`` (stderr) in the configured format."""
    logger = logging.getLogger("loble")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if config.format == "json" else LogfmtFormatter())
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(_LEVELS[config.level])
    logger.propagate = False
    return logger
