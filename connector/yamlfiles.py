"""Reading of the YAML files that users write, with size limits on the file and on its alias-expanded document.

The module also contains the strict pydantic base of their models, and it
renders YAML and validation errors as one-line messages.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from mdr_connector.connector.errors import ConfigError
from mdr_connector.connector.i18n import N_

MAX_DOCUMENT_BYTES = 1024 * 1024
# YAML aliases let a small file describe a huge structure, so documents are
# measured as serialising would expand them, an alias counting each time it is used.
MAX_DOCUMENT_NODES = 10_000
MAX_YAML_PROBLEM_LENGTH = 200
CANNOT_READ = N_("cannot read {path}: {reason}")
NOT_REGULAR_FILE = N_("cannot read {path}: not a regular file")
FILE_TOO_LARGE = N_("cannot read {path}: larger than {limit} bytes; is it the right file?")
NOT_UTF8 = N_("cannot read {path}: not UTF-8 text")


class StrictModel(BaseModel):
    """Base of the config and mapping models: unknown keys are rejected and instances are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def within_budget(value: Any, max_nodes: int, max_characters: int) -> bool:
    """Return whether `value` has at most `max_nodes` values and `max_characters` characters of strings.

    Shared parts (YAML aliases) count each time they are reached, and
    children are counted before they are visited, so the walk itself never
    does more than `max_nodes` steps, even on a structure that contains itself.
    """
    nodes, characters = 1, 0
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            nodes += 2 * len(item)
            children: Any = [*item.keys(), *item.values()] if nodes <= max_nodes else ()
        elif isinstance(item, list | tuple | set | frozenset):
            nodes += len(item)
            children = item if nodes <= max_nodes else ()
        else:
            characters += len(item) if isinstance(item, str | bytes) else 1
            children = ()
        if nodes > max_nodes or characters > max_characters:
            return False
        pending.extend(children)
    return True


def format_validation_error(source: str, err: ValidationError, raw: Any = None) -> str:
    """Render pydantic errors as `file: key.path: message` lines, without echoing secret values."""
    lines = []
    for error in err.errors():
        location = format_location(raw, error["loc"])
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key; check its spelling against the documentation"
        elif error["type"] == "missing":
            message = "required key is missing"
        elif "SecretRef" in message:
            message = "expected a secret reference such as {env: VARIABLE_NAME} or {file: /path/to/file}"
        lines.append(f"{source}: {location or '<top level>'}: {message}")
    return "\n".join(lines)


def format_location(raw: Any, location: tuple[int | str, ...]) -> str:
    """Join an error location as `a.b[0].c`, leaving out the tags pydantic adds for union members.

    A tag is a location part that is not a key of the raw input and is not
    the last part (the last part may be a missing key, which is kept).
    """
    parts: list[str] = []
    node = raw
    for position, part in enumerate(location):
        last = position == len(location) - 1
        if isinstance(part, int) and isinstance(node, list):
            parts.append(f"[{part}]")
            node = node[part] if part < len(node) else None
        elif isinstance(node, dict) and part in node:
            parts.append(f".{part}")
            node = node[part]
        elif last or not isinstance(node, dict):
            parts.append(f".{part}")
            node = None
    return "".join(parts).lstrip(".")


def read_text_file(path: Path, limit: int) -> str:
    """Read a regular file of at most `limit` bytes as UTF-8 text.

    The file is opened without blocking and checked through its descriptor,
    so a FIFO, a device or a folder is rejected before anything is read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise ConfigError.from_template(CANNOT_READ, path=path, reason=err.strerror) from err
    try:
        data = _read_regular(fd, path, limit)
    finally:
        os.close(fd)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError.from_template(NOT_UTF8, path=path) from err


def _read_regular(fd: int, path: Path, limit: int) -> bytes:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError.from_template(NOT_REGULAR_FILE, path=path)
    if info.st_size > limit:
        raise ConfigError.from_template(FILE_TOO_LARGE, path=path, limit=limit)
    chunks: list[bytes] = []
    size = 0
    # Read one byte past the limit, so a file that grew after fstat is caught.
    while size <= limit:
        chunk = os.read(fd, limit + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > limit:
        raise ConfigError.from_template(FILE_TOO_LARGE, path=path, limit=limit)
    return b"".join(chunks)


def read_yaml(path: Path) -> Any:
    """Read a config or mapping file, reporting any YAML problem on one line with its position."""
    text = read_text_file(path, MAX_DOCUMENT_BYTES)
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(yaml_error_line(path, err, text)) from err
    except RecursionError as err:
        raise ConfigError(f"{path}: not valid YAML: nested too deeply; flatten the document") from err
    except ValueError as err:
        # PyYAML lets conversion errors through: a number of over 4300 digits,
        # or a date such as 2026-02-30. Python's advice after ";" is dropped.
        reason = str(err).split(";", 1)[0]
        raise ConfigError(f"{path}: not valid YAML: {one_line(reason)}; quote the value to keep it as text") from err
    check_document_size(str(path), document)
    return document


def yaml_error_line(path: Path, err: yaml.YAMLError, text: str) -> str:
    """Render a YAML error as `PATH: not valid YAML at line L, column C: PROBLEM`."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    if mark is not None:
        line, column = mark.line + 1, mark.column + 1
        problem = getattr(err, "problem", None) or getattr(err, "context", None) or "syntax error"
    elif isinstance(err, yaml.reader.ReaderError):
        line, column = line_and_column(text, err.position)
        code = err.character if isinstance(err.character, int) else ord(err.character)
        problem = f"character U+{code:04X} is not allowed in YAML"
    else:
        return f"{path}: not valid YAML: {one_line(str(err))}"
    return f"{path}: not valid YAML at line {line}, column {column}: {one_line(problem)}"


def line_and_column(text: str, position: int) -> tuple[int, int]:
    """Return the 1-based line and column of a character offset in `text`."""
    line_start = text.rfind("\n", 0, position) + 1
    return text.count("\n", 0, position) + 1, position - line_start + 1


def one_line(text: str) -> str:
    """Collapse whitespace and line breaks, and shorten, so a message stays on one line."""
    flat = " ".join(text.split())
    if len(flat) > MAX_YAML_PROBLEM_LENGTH:
        return flat[: MAX_YAML_PROBLEM_LENGTH - 3] + "..."
    return flat


def check_document_size(source: str, document: Any) -> None:
    """Reject a document that YAML aliases expand past the node or size budget."""
    if within_budget(document, MAX_DOCUMENT_NODES, MAX_DOCUMENT_BYTES):
        return
    raise ConfigError(
        f"{source}: too large once YAML aliases are expanded (more than {MAX_DOCUMENT_NODES} values or "
        f"{MAX_DOCUMENT_BYTES} characters); write the document without anchors that repeat large parts"
    )
