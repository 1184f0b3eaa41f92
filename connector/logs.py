"""Logging: stable event names with ids as fields, JSON or text, secrets redacted.

Modules log `log.info("sync.ticket.created", extra={"incident_id": ...})`.
The message is the event name; the `extra` keys become fields. A filter on
the root handler redacts secrets before any formatter sees the record: by
field name, by the value of every registered secret, and by the shape of a
JWT, so a token cannot reach a log even inside an exception text.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import datetime, timezone
from typing import Any

REDACTED = "[REDACTED]"
SECRET_KEY_PATTERN = re.compile(
    r"(token|password|passwd|secret|authorization|api[_-]?key|cookie|credential)", re.IGNORECASE
)
# `eyJ` is base64url for `{"`, the start of every JWT header. Ten more
# characters, dots allowed between them, catch a JWT cut short inside an
# error text as well as a whole one.
JWT_PATTERN = re.compile(r"eyJ(?:\.?[A-Za-z0-9_-]){10,}")
# C0 and C1 controls (newline, carriage return, ESC...), Unicode line and
# paragraph separators and the bidirectional overrides. Each of them lets a
# value start a forged line or change what a terminal shows.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

# Attributes every LogRecord has; anything else on a record came from `extra`.
STANDARD_ATTRIBUTES = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys() | {"message", "asctime", "taskName"}
)

_secret_values: set[str] = set()


def register_secret(value: str | None) -> None:
    """Redact this exact value wherever it appears in a log record from now on."""
    if value and len(value) >= 6:
        _secret_values.add(value)


def redact_text(text: str) -> str:
    for secret in sorted(_secret_values, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, REDACTED)
    return JWT_PATTERN.sub(REDACTED, text)


def escape_controls(text: str) -> str:
    """Replace control characters with escapes such as `\\n` and `\\x1b`, so the text stays on one line."""
    return CONTROL_CHARACTERS.sub(_escape_character, text)


def _escape_character(match: re.Match[str]) -> str:
    character = match.group()
    if character in NAMED_ESCAPES:
        return NAMED_ESCAPES[character]
    code = ord(character)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def redact_value(key: str, value: Any) -> Any:
    if SECRET_KEY_PATTERN.search(key) and value not in (None, "", 0):
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_value(key, v) for v in value]
    return value


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {key: value for key, value in record.__dict__.items() if key not in STANDARD_ATTRIBUTES}


class RedactingFilter(logging.Filter):
    """Redact secrets in the message, the arguments, the extra fields and the exception text."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact_text(str(record.msg))
        if record.args:
            record.args = tuple(redact_value("", arg) for arg in record.args) if isinstance(record.args, tuple) else record.args
        for key, value in record_fields(record).items():
            setattr(record, key, redact_value(key, value))
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, event, fields."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        document.update(record_fields(record))
        if record.exc_text:
            document["exception"] = record.exc_text
        return json.dumps(document, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """A readable line for a terminal: time, level, event, then key=value fields.

    Control characters in the event and the fields are escaped, so a value
    such as an incident id cannot forge a log line. A traceback follows on
    indented lines, so none of its lines can pass for a record either.
    """

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        fields = " ".join(
            f"{escape_controls(str(key))}={escape_controls(str(value))}"
            for key, value in record_fields(record).items()
        )
        line = f"{moment} {record.levelname:<7} {escape_controls(record.getMessage())}"
        if fields:
            line = f"{line}  {fields}"
        if record.exc_text:
            line += "".join(f"\n    {escape_controls(text)}" for text in record.exc_text.splitlines())
        return line


def configure_logging(level: str = "INFO", fmt: str = "auto", stream: Any = None) -> None:
    """Send every log record to stderr through the redacting filter."""
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "text" if getattr(stream, "isatty", lambda: False)() else "json"

    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(TextFormatter() if fmt == "text" else JsonFormatter())

    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    # The jira package and urllib3 log request details at DEBUG, URLs with
    # query strings included. aiosqlite logs every statement with its
    # parameters, which contain incident and comment text, and alembic logs
    # every migration step at INFO. These stay at WARNING whatever the level.
    for noisy in ("urllib3", "jira", "requests_oauthlib", "aiohttp.access", "aiosqlite", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
