"""Log lines: logfmt quoting, one JSON object per line, level from the config."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from loble.core import LoggingConfig, ProbeFailure
from loble.io._journal import Journal
from loble.io._logging import (
    LIBRARY_LOGGERS,
    JsonFormatter,
    LogfmtFormatter,
    configure_logging,
    log,
)


def record(message: str, **fields: object) -> logging.LogRecord:
    line = logging.LogRecord("loble", logging.WARNING, __file__, 1, message, None, None)
    line.fields = fields
    return line


def test_logfmt_quotes_only_what_needs_it() -> None:
    line = LogfmtFormatter().format(
        record(
            "backend state changed",
            backend="127.0.0.1:9102",
            reason='3 "bad" x=1',
            n=3,
            ok=True,
            none=None,
        )
    )
    assert line.startswith("ts=")
    assert ' level=warning logger=loble msg="backend state changed" backend=127.0.0.1:9102 ' in line
    assert line.endswith(' reason="3 \\"bad\\" x=1" n=3 ok=true none=""')


def test_logfmt_keeps_a_record_on_one_line() -> None:
    line = LogfmtFormatter().format(record("x", text="two\nlines", empty=""))
    assert "\n" not in line
    assert 'text="two\\nlines" empty=""' in line


def test_json_is_one_object_per_line() -> None:
    line = JsonFormatter().format(record("connection", client="127.0.0.1:5", bytes_to_client=6))
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["msg"] == "connection" and parsed["level"] == "warning"
    assert parsed["bytes_to_client"] == 6 and parsed["client"] == "127.0.0.1:5"


@pytest.fixture
def loble_logger() -> Iterator[logging.Logger]:
    # configure_logging sets up Loble's logger and the libraries' loggers:
    # put all of them back as they were.
    loggers = [logging.getLogger(name) for name in ("loble", *LIBRARY_LOGGERS)]
    saved = [(list(x.handlers), x.level, x.propagate) for x in loggers]
    yield loggers[0]
    for logger, (handlers, level, propagate) in zip(loggers, saved, strict=True):
        logger.handlers[:], logger.level, logger.propagate = handlers, level, propagate


def test_configure_logging_applies_format_and_level(loble_logger: logging.Logger) -> None:
    stream = io.StringIO()
    logger = configure_logging(LoggingConfig(level="warning", format="json"), stream)
    log(logger, logging.INFO, "hidden")
    log(logger.getChild("demo"), logging.WARNING, "shown", n=1)
    (line,) = stream.getvalue().splitlines()
    assert json.loads(line)["msg"] == "shown"
    assert json.loads(line)["logger"] == "loble.demo"


def test_a_probe_whose_answer_changed_is_info_a_repeat_is_debug() -> None:
    logger = logging.getLogger("loble.test.probes")
    logger.setLevel(logging.DEBUG)
    seen: list[tuple[int, object]] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            fields = getattr(record, "fields", {})
            seen.append((record.levelno, fields.get("ok"), fields.get("reason")))

    logger.addHandler(Keep())
    logger.propagate = False
    journal = Journal(logger, LoggingConfig(), drain_timeout=30.0)
    failures = (ProbeFailure.REFUSED, ProbeFailure.MISMATCH, ProbeFailure.REPLY_TIMEOUT)
    for failure in (*failures, None, None):
        journal.probed("127.0.0.1:9101", failure)
    assert seen == [
        (logging.INFO, False, "connect refused"),
        (logging.DEBUG, False, "reply did not match"),
        (logging.DEBUG, False, "timed out awaiting the reply"),
        (logging.INFO, True, None),
        (logging.DEBUG, True, None),
    ]


def test_every_line_of_a_worker_says_which(loble_logger: logging.Logger) -> None:
    stream = io.StringIO()
    logger = configure_logging(LoggingConfig(format="json"), stream, worker=1)
    log(logger, logging.INFO, "listening", address="127.0.0.1:9000")
    logging.getLogger("asyncio").warning("a library's warning")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(line["msg"], line["worker"]) for line in lines] == [
        ("listening", 1),
        ("a library's warning", 1),
    ]
