"""Logging: JWT redaction, control characters in text logs, and quiet third-party loggers."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mdr_connector.adapters.mdr.simulator import encode_jwt
from mdr_connector.connector.logs import REDACTED, TextFormatter, configure_logging, redact_text
from mdr_connector.connector.store import Store

QUIET_LOGGERS = ("urllib3", "jira", "requests_oauthlib", "aiohttp.access", "aiosqlite", "alembic")


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """Route logging into a string for one test, then restore the root logger and the quiet loggers."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    saved_levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    stream = io.StringIO()
    yield stream
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved_handlers:
        root.addHandler(handler)
    root.setLevel(saved_level)
    for name, level in saved_levels.items():
        logging.getLogger(name).setLevel(level)


def text_line(message: str, **fields: object) -> str:
    record = logging.LogRecord("test", logging.INFO, __file__, 1, message, (), None)
    for key, value in fields.items():
        setattr(record, key, value)
    return TextFormatter().format(record)


def sample_jwt() -> str:
    return encode_jwt({"sub": "client-canary", "exp": 1_900_000_000, "typ": "access"}, b"key")


def test_whole_jwt_is_redacted() -> None:
    """A whole JWT is redacted even when it was never registered."""
    token = sample_jwt()

    assert redact_text(f"rejected {token} here") == f"rejected {REDACTED} here"


def test_truncated_jwt_is_redacted() -> None:
    """A JWT cut inside its payload, as an error text cut at 200 characters leaves it, is redacted."""
    header, payload, _ = sample_jwt().split(".")
    cut = f"{header}.{payload[:12]}"

    redacted = redact_text(f"MDR said: invalid token {cut}...")

    assert redacted == f"MDR said: invalid token {REDACTED}..."
    assert payload[:12] not in redacted


@pytest.mark.parametrize("text", ["eyJhbGciOiJIUzI1", "eyJ0eXAiOi.JKV1QiLCJh"], ids=["no-dot", "dot"])
def test_jwt_shape_with_ten_characters_is_redacted(text: str) -> None:
    """`eyJ` and ten or more base64url characters, with or without dots, count as a JWT."""
    assert redact_text(f"token {text}.") == f"token {REDACTED}."


def test_short_eyj_word_is_kept() -> None:
    """`eyJ` with fewer than ten characters after it is ordinary text."""
    assert redact_text("eyJabc.def") == "eyJabc.def"


def test_text_log_escapes_controls_in_fields() -> None:
    """An incident id with a newline and ESC cannot start a forged line or drive the terminal."""
    forged = "INC-1\n12:00:00 ERROR   sync.connection.failed\r\x1b[2K"

    line = text_line("sync.incident.failed", incident_id=forged)

    assert "\n" not in line
    assert "\r" not in line
    assert "\x1b" not in line
    assert "incident_id=INC-1\\n12:00:00 ERROR   sync.connection.failed\\r\\x1b[2K" in line


def test_text_log_escapes_controls_in_message() -> None:
    """The event text is escaped the same way, including C1 controls and line separators."""
    line = text_line("event\nforged\x85next\u2028end\ttab")

    assert line.endswith("event\\nforged\\x85next\\u2028end\\ttab")


def test_text_log_indents_traceback() -> None:
    """Every traceback line is indented, so an exception text cannot pass for a log record."""
    record = logging.LogRecord("test", logging.ERROR, __file__, 1, "crashed", (), None)
    record.exc_text = "Traceback (most recent call last):\nValueError: bad\n12:00:00 INFO    forged"

    lines = TextFormatter().format(record).splitlines()

    assert len(lines) == 4
    assert all(line.startswith("    ") for line in lines[1:])


def test_alembic_quiet_at_debug(log_stream: io.StringIO) -> None:
    """At DEBUG, alembic's migration logger still drops INFO records."""
    configure_logging("DEBUG", "json", stream=log_stream)

    assert not logging.getLogger("alembic.runtime.migration").isEnabledFor(logging.INFO)


def test_sqlite_statements_not_logged(log_stream: io.StringIO) -> None:
    """At DEBUG, aiosqlite does not log statements with their parameters (incident and comment text)."""
    configure_logging("DEBUG", "json", stream=log_stream)

    assert not logging.getLogger("aiosqlite").isEnabledFor(logging.DEBUG)


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
async def test_upgrade_logs_no_alembic_lines(tmp_path: Path, log_stream: io.StringIO, level: str) -> None:
    """Creating the schema logs the connector's own event and no line from alembic, on the log or on stderr."""
    configure_logging(level, "json", stream=log_stream)
    captured_stderr = io.StringIO()
    real_stderr, sys.stderr = sys.stderr, captured_stderr
    try:
        store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}")
        await store.close()
    finally:
        sys.stderr = real_stderr

    loggers = [json.loads(line)["logger"] for line in log_stream.getvalue().splitlines()]
    assert "mdr_connector.connector.store" in loggers
    assert not [name for name in loggers if name.startswith("alembic")]
    assert captured_stderr.getvalue() == ""
