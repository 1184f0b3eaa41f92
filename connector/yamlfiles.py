"""Reading of the YAML files that users write, with size limits on the file and on its alias-expanded document.

A key written twice in one mapping is rejected, because PyYAML would
silently keep the last value. The module also contains the strict
pydantic base of the models of these files, and it renders YAML and
validation errors as one-line messages.
"""

from __future__ import annotations

import difflib
import json
import os
import stat
import types
import typing
from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Strict, ValidationError
from pydantic_core import PydanticCustomError

from mdr_connector.connector.errors import ConfigError
from mdr_connector.connector.i18n import N_

MAX_DOCUMENT_BYTES = 1024 * 1024
# YAML aliases let a small file describe a huge structure, so documents are
# measured as serialising would expand them, an alias counting each time it is used.
MAX_DOCUMENT_NODES = 10_000
MAX_YAML_PROBLEM_LENGTH = 200
# Minimum difflib similarity ratio (0 to 1) of a valid key to an unknown one for it to be suggested.
KEY_SUGGESTION_CUTOFF = 0.75
CANNOT_READ = N_("cannot read {path}: {reason}")
NOT_REGULAR_FILE = N_("cannot read {path}: not a regular file")
FILE_TOO_LARGE = N_("cannot read {path}: larger than {limit} bytes; is it the right file?")
NOT_UTF8 = N_("cannot read {path}: not UTF-8 text")
# Maximum length, in characters, of a string value that a validation error quotes.
MAX_SHOWN_VALUE_LENGTH = 60
# The tag of the YAML merge key `<<`.
MERGE_TAG = "tag:yaml.org,2002:merge"


class StrictModel(BaseModel):
    """Base of the config and mapping models: unknown keys are rejected, types are strict and instances are frozen.

    With strict types a boolean must be a YAML boolean and a number a YAML
    number, so "no", 0 or "3" are rejected instead of converted. A float
    field also accepts an integer. Fields that YAML gives as strings of
    another type (paths, dates) use `YamlPath` and `YamlDatetime`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _text_or_timestamp(value: Any) -> Any:
    """Pass on only a YAML timestamp, a date or a string, so that no number is read as epoch seconds."""
    if isinstance(value, str | datetime | date):
        return value
    raise PydanticCustomError("datetime_type", "Input should be a valid datetime")


# A path written as a YAML string.
YamlPath = Annotated[Path, Strict(False)]
# A date and time written as a YAML timestamp or as an ISO 8601 string.
YamlDatetime = Annotated[datetime, Strict(False), BeforeValidator(_text_or_timestamp)]


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


def format_validation_error(
    source: str, err: ValidationError, raw: Any = None, model: type[BaseModel] | None = None
) -> str:
    """Render pydantic errors as `file: key.path: message` lines, without echoing secret values.

    With `model`, the class that validated `raw`, an unknown key gets the
    nearest valid key at its place as a suggestion.
    """
    lines = []
    for error in err.errors():
        location = format_location(raw, error["loc"])
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = unknown_key_message(model, error["loc"])
        elif error["type"] == "missing":
            message = "required key is missing"
        elif "SecretRef" in message:
            message = "expected a secret reference such as {env: VARIABLE_NAME} or {file: /path/to/file}"
        elif error["type"] in EXPECTED_TYPES:
            message = wrong_type_message(error["type"], error["input"])
        elif error["type"] == "literal_error":
            message = f"{show_value(error['input'])} is not allowed; expected {message.removeprefix('Input should be ')}"
        elif error["type"] == "value_error":
            # pydantic puts "Value error, " before the text of a ValueError raised by a validator.
            message = message.removeprefix("Value error, ")
        lines.append(f"{source}: {location or '<top level>'}: {message}")
    return "\n".join(lines)


# The expected type and the fix, by pydantic error type. Lax-mode parsing
# errors are listed too, for a field that opts out of strict mode.
EXPECTED_TYPES = {
    "bool_type": ("a boolean", "write true or false, without quotes"),
    "bool_parsing": ("a boolean", "write true or false, without quotes"),
    "int_type": ("an integer", "write a whole number, without quotes"),
    "int_parsing": ("an integer", "write a whole number, without quotes"),
    "int_from_float": ("an integer", "write a whole number, without quotes"),
    "float_type": ("a number", "write a number, without quotes"),
    "float_parsing": ("a number", "write a number, without quotes"),
    "string_type": ("a string", "put the value in quotes"),
    "path_type": ("a path", "put the path in quotes"),
    "datetime_type": ("a date and time", "write it like 2026-11-01T00:00:00Z"),
    "datetime_parsing": ("a date and time", "write it like 2026-11-01T00:00:00Z"),
    "datetime_from_date_parsing": ("a date and time", "write it like 2026-11-01T00:00:00Z"),
    "list_type": ("a list", "write the items as [a, b] or one '- item' per line"),
    "dict_type": ("a mapping", "write the keys under it, one 'key: value' per line"),
    "model_type": ("a mapping", "write the keys under it, one 'key: value' per line"),
}


def wrong_type_message(error_type: str, value: Any) -> str:
    """Describe a value of the wrong type: the value, its YAML type, the expected type and the fix.

    For example: `"no" is a string, but a boolean is expected; write true or false, without quotes`.
    """
    expected, fix = EXPECTED_TYPES[error_type]
    if value is None:
        return f"the value is empty (null), but {expected} is expected; {fix}"

    kind = yaml_type_name(value)
    if kind == expected or error_type.endswith("_parsing"):
        return f"{show_value(value)} is not valid as {expected}; {fix}"
    return f"{show_value(value)} is {kind}, but {expected} is expected; {fix}"


def yaml_type_name(value: Any) -> str:
    """Name the YAML type that `value` was read as."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a floating-point number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, datetime):
        return "a date and time"
    if isinstance(value, date):
        return "a date"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple | set | frozenset):
        return "a list"
    return type(value).__name__


def show_value(value: Any) -> str:
    """Render a scalar as it reads in YAML, with strings in double quotes and long ones shortened.

    A mapping or a list is not rendered, so no nested value, such as a
    secret written in the wrong place, reaches the message.
    """
    if isinstance(value, bool):
        rendered = "true" if value else "false"
    elif value is None:
        rendered = "null"
    elif isinstance(value, str):
        text = value if len(value) <= MAX_SHOWN_VALUE_LENGTH else value[: MAX_SHOWN_VALUE_LENGTH - 3] + "..."
        rendered = json.dumps(text, ensure_ascii=False)
    elif isinstance(value, datetime | date):
        rendered = value.isoformat()
    elif isinstance(value, int | float):
        rendered = repr(value)
    else:
        return "the value"
    return one_line(rendered)


def unknown_key_message(model: type[BaseModel] | None, location: tuple[int | str, ...]) -> str:
    """Describe an unknown key, suggesting the closest valid key at the same place when one is close."""
    key = location[-1] if location else None
    valid_keys = allowed_keys(model, location[:-1]) if model is not None and isinstance(key, str) else []
    matches = difflib.get_close_matches(str(key), valid_keys, n=1, cutoff=KEY_SUGGESTION_CUTOFF)
    if matches:
        return f"unknown key; did you mean {matches[0]}?"
    return "unknown key; check its spelling against the documentation"


def allowed_keys(model: type[BaseModel], location: tuple[int | str, ...]) -> list[str]:
    """Return the keys that the model at `location` inside `model` accepts.

    The walk follows fields, list items, dict values and the tags pydantic
    puts in a location for union members. It returns [] when the location
    does not lead to exactly one model, so no suggestion can come from the
    wrong model.
    """
    candidates: list[Any] = [model]
    for part in location:
        candidates = [child for annotation in candidates for child in _location_children(annotation, part)]
    models = {candidate for candidate in candidates if _is_model(candidate)}
    if len(models) != 1:
        return []
    return list(models.pop().model_fields)


def _location_children(annotation: Any, part: int | str) -> list[Any]:
    """Return the annotations that location `part` can lead to from `annotation`."""
    children: list[Any] = []
    for member in _union_members(annotation):
        origin = typing.get_origin(member)
        arguments = typing.get_args(member)
        if isinstance(part, int) and origin in (list, tuple, set, frozenset) and arguments:
            children.append(arguments[0])
        elif origin is dict and len(arguments) == 2:
            children.append(arguments[1])
        elif _is_model(member) and isinstance(part, str):
            if part in member.model_fields:
                children.append(member.model_fields[part].annotation)
            elif _tagged_class_name(part) == member.__name__ or _has_tag(member, part):
                # A union member's tag: the model stays where it is.
                children.append(member)
    return children


def _union_members(annotation: Any) -> list[Any]:
    """Flatten Annotated and unions (`X | Y`, Optional) into their member types."""
    if typing.get_origin(annotation) is typing.Annotated:
        return _union_members(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [member for argument in typing.get_args(annotation) for member in _union_members(argument)]
    return [annotation]


def _tagged_class_name(part: str) -> str:
    """Return the class name in a union tag: `SecretRef`, or the last name in `function-after[check(), SecretRef]`."""
    if not part.endswith("]"):
        return part
    return part[:-1].rpartition(", ")[2].rpartition("[")[2]


def _has_tag(model: type[BaseModel], tag: str) -> bool:
    """Return whether a Literal field of `model` allows `tag`, as a discriminator field does."""
    for field in model.model_fields.values():
        annotation = field.annotation
        if typing.get_origin(annotation) is Literal and tag in typing.get_args(annotation):
            return True
    return False


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


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


class DuplicateKeyError(Exception):
    """A key written twice in one YAML mapping, with the 1-based lines of both."""

    def __init__(self, key: str, first_line: int, second_line: int) -> None:
        super().__init__(key, first_line, second_line)
        self.key = key
        self.first_line = first_line
        self.second_line = second_line

    def describe(self, source: str) -> str:
        lines = f"lines {self.first_line} and {self.second_line}"
        if self.first_line == self.second_line:
            lines = f"line {self.first_line}, twice"
        return (
            f"{source}: duplicate key {self.key!r} at {lines}; "
            "keep one of them, because a YAML mapping may contain each key only once"
        )


class UniqueKeyLoader(yaml.SafeLoader):
    """The safe YAML loader, rejecting a mapping that contains the same key twice.

    Keys are compared as the values they load as, so `on` and `true`, or
    `1` and `0x1`, count as the same key, as they would in the loaded dict.
    The merge key `<<` is not checked, because the keys that it brings in
    may be overridden by design.
    """

    def compose_mapping_node(self, anchor: Any) -> yaml.MappingNode:
        node = super().compose_mapping_node(anchor)
        first_nodes: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == MERGE_TAG:
                continue
            # Scalar construction has no side effects, and the loader reuses this value later.
            key = self.construct_object(key_node, deep=True)
            first = first_nodes.setdefault(key, key_node)
            if first is not key_node:
                raise DuplicateKeyError(first.value, first.start_mark.line + 1, key_node.start_mark.line + 1)
        return node


def read_yaml(path: Path) -> Any:
    """Read a config or mapping file, reporting any YAML problem on one line with its position."""
    text = read_text_file(path, MAX_DOCUMENT_BYTES)
    return parse_yaml(str(path), text)


def parse_yaml(source: str, text: str) -> Any:
    """Parse the YAML text of `source` with the safe loader, rejecting duplicate keys and oversized documents."""
    try:
        document = load_unique_keys(text)
    except DuplicateKeyError as err:
        raise ConfigError(err.describe(source)) from err
    except yaml.YAMLError as err:
        raise ConfigError(yaml_error_line(source, err, text)) from err
    except RecursionError as err:
        raise ConfigError(f"{source}: not valid YAML: nested too deeply; flatten the document") from err
    except ValueError as err:
        # PyYAML lets conversion errors through: a number of over 4300 digits,
        # or a date such as 2026-02-30. Python's advice after ";" is dropped.
        reason = str(err).split(";", 1)[0]
        raise ConfigError(f"{source}: not valid YAML: {one_line(reason)}; quote the value to keep it as text") from err
    check_document_size(source, document)
    return document


def load_unique_keys(text: str) -> Any:
    """Load one YAML document with `UniqueKeyLoader`."""
    loader = UniqueKeyLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def yaml_error_line(source: str, err: yaml.YAMLError, text: str) -> str:
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
        return f"{source}: not valid YAML: {one_line(str(err))}"
    return f"{source}: not valid YAML at line {line}, column {column}: {one_line(problem)}"


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
