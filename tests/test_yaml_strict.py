"""Config and mapping files: duplicate keys and values of the wrong type are rejected, not guessed."""

from __future__ import annotations

import textwrap
from datetime import datetime, timezone
from pathlib import Path

import pytest
from test_config import MAPPING_HEAD, VALID_CONFIG, write

from mdr_connector.connector.config import load_settings
from mdr_connector.connector.errors import ConfigError
from mdr_connector.connector import mappingfile
from mdr_connector.connector.mappingfile import load_mapping
from mdr_connector.connector.yamlfiles import parse_yaml

DUPLICATE_FIX = "keep one of them, because a YAML mapping may contain each key only once"


def config_error(path: Path) -> list[str]:
    """Load the config at `path` and return the lines of the ConfigError it raises."""
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    return str(caught.value).splitlines()


def test_duplicate_key_rejected(tmp_path: Path) -> None:
    """A second `tls_verify` no longer switches verification off: the file is rejected, naming both lines."""
    config = VALID_CONFIG.replace("token_dir: tokens", 'token_dir: tokens\n      tls_verify: true\n      tls_verify: "off"')
    path = write(tmp_path / "config.yaml", config)
    first = textwrap.dedent(config).splitlines().index("      tls_verify: true") + 1

    lines = config_error(path)

    assert lines == [f"{path}: duplicate key 'tls_verify' at lines {first} and {first + 1}; {DUPLICATE_FIX}"]


def test_duplicate_top_level_key_rejected(tmp_path: Path) -> None:
    """Two `log` sections are rejected rather than the first one being dropped."""
    path = write(tmp_path / "config.yaml", "log: {level: DEBUG}\n" + VALID_CONFIG + "log: {format: json}\n")
    last = len(path.read_text(encoding="utf-8").splitlines())

    assert config_error(path) == [f"{path}: duplicate key 'log' at lines 1 and {last}; {DUPLICATE_FIX}"]


def test_duplicate_key_in_flow_mapping(tmp_path: Path) -> None:
    """Both copies on one line are reported with that line."""
    path = write(tmp_path / "config.yaml", "log: {level: INFO, level: DEBUG}\n" + VALID_CONFIG)

    assert config_error(path) == [f"{path}: duplicate key 'level' at line 1, twice; {DUPLICATE_FIX}"]


def test_duplicate_key_in_mapping_file(tmp_path: Path) -> None:
    """The mapping file uses the same reader, so a repeated key there is rejected too."""
    path = write(tmp_path / "mapping.yaml", MAPPING_HEAD + "responses:\n  enabled: true\n  enabled: false\n")

    with pytest.raises(ConfigError) as caught:
        load_mapping(str(path))

    assert str(caught.value) == f"{path}: duplicate key 'enabled' at lines 6 and 7; {DUPLICATE_FIX}"


@pytest.mark.parametrize(
    ("text", "key"),
    [("on: 1\ntrue: 2\n", "on"), ("1: a\n0x1: b\n", "1"), ("a: 1\n'a': 2\n", "a")],
    ids=["boolean-spellings", "integer-spellings", "quoted"],
)
def test_duplicate_key_by_loaded_value(text: str, key: str) -> None:
    """Keys that are spelled differently but load as the same value are duplicates."""
    with pytest.raises(ConfigError) as caught:
        parse_yaml("document.yaml", text)

    assert str(caught.value) == f"document.yaml: duplicate key {key!r} at lines 1 and 2; {DUPLICATE_FIX}"


def test_same_key_in_sibling_mappings_loads() -> None:
    """The same key in different mappings, such as two items of a list, is not a duplicate."""
    assert parse_yaml("document.yaml", "- {name: a}\n- {name: b}\n") == [{"name": "a"}, {"name": "b"}]


def test_merge_key_override_loads() -> None:
    """A key that overrides one brought in by the merge key `<<` is the intended YAML idiom, not a duplicate."""
    text = "base: &base {level: INFO, format: json}\nlog:\n  <<: *base\n  level: DEBUG\n"

    assert parse_yaml("document.yaml", text)["log"] == {"level": "DEBUG", "format": "json"}


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "token_dir: tokens",
            'token_dir: tokens\n      tls_verify: "no"',
            'connections[0].mdr.tls_verify: "no" is a string, but a boolean is expected; '
            "write true or false, without quotes",
        ),
        (
            "token_dir: tokens",
            "token_dir: tokens\n      tls_verify: 0",
            "connections[0].mdr.tls_verify: 0 is an integer, but a boolean is expected; "
            "write true or false, without quotes",
        ),
        (
            "token_dir: tokens",
            "token_dir: tokens\n      max_concurrency: '3'",
            'connections[0].mdr.max_concurrency: "3" is a string, but an integer is expected; '
            "write a whole number, without quotes",
        ),
        (
            "token_dir: tokens",
            "token_dir: tokens\n      refresh_margin_seconds: 600.0",
            "connections[0].mdr.refresh_margin_seconds: 600.0 is a floating-point number, but an integer is "
            "expected; write a whole number, without quotes",
        ),
        (
            "token_dir: tokens",
            "token_dir: tokens\n      timeout_seconds: '30'",
            'connections[0].mdr.timeout_seconds: "30" is a string, but a number is expected; '
            "write a number, without quotes",
        ),
        (
            "    mapping: mapping.yaml",
            "    mapping: mapping.yaml\n    sync: {interval_seconds: true}",
            "connections[0].sync.interval_seconds: true is a boolean, but a number is expected; "
            "write a number, without quotes",
        ),
        (
            "    mapping: mapping.yaml",
            "    mapping: mapping.yaml\n    sync: {start: {since: 1700000000}}",
            "connections[0].sync.start.since: 1700000000 is an integer, but a date and time is expected; "
            "write it like 2026-11-01T00:00:00Z",
        ),
        (
            "    mapping: mapping.yaml",
            "    mapping: mapping.yaml\n    sync: {start: {since: tomorrow}}",
            'connections[0].sync.start.since: "tomorrow" is not valid as a date and time; '
            "write it like 2026-11-01T00:00:00Z",
        ),
        (
            "data_dir: state",
            "data_dir: 2026",
            "data_dir: 2026 is an integer, but a path is expected; put the path in quotes",
        ),
        (
            "data_dir: state",
            "data_dir: state\nobservability: {port: '9090'}",
            'observability.port: "9090" is a string, but an integer is expected; write a whole number, without quotes',
        ),
        (
            "data_dir: state",
            "data_dir: state\nlog: {level: info}",
            "log.level: \"info\" is not allowed; expected 'DEBUG', 'INFO', 'WARNING' or 'ERROR'",
        ),
        (
            "email: soc-bot@example.com",
            "email: 42",
            "connections[0].ticket.auth.email: 42 is an integer, but a string is expected; put the value in quotes",
        ),
    ],
    ids=[
        "bool-from-string", "bool-from-integer", "integer-from-string", "integer-from-float", "number-from-string",
        "number-from-bool", "datetime-from-integer", "datetime-unparsable", "path-from-integer",
        "optional-integer", "literal", "string-from-integer",
    ],
)
def test_wrong_type_rejected(tmp_path: Path, old: str, new: str, expected: str) -> None:
    """A value of the wrong type stops the load, naming the key, the value, the expected type and the fix."""
    path = write(tmp_path / "config.yaml", VALID_CONFIG.replace(old, new))

    assert config_error(path) == [f"{path}: {expected}"]


def test_several_wrong_types_each_reported(tmp_path: Path) -> None:
    """Every wrong value gets its own line, so one run shows them all."""
    config = VALID_CONFIG.replace("token_dir: tokens", "token_dir: tokens\n      tls_verify: 'off'\n      max_concurrency: '3'")

    lines = config_error(write(tmp_path / "config.yaml", config))

    assert len(lines) == 2
    assert "connections[0].mdr.tls_verify: \"off\" is a string" in lines[0]
    assert "connections[0].mdr.max_concurrency: \"3\" is a string" in lines[1]


def test_values_yaml_gives_as_other_types_load(tmp_path: Path) -> None:
    """Paths from strings, timestamps, quoted times, integers for numbers and enum strings still load."""
    config = VALID_CONFIG.replace(
        "token_dir: tokens",
        "token_dir: tokens\n      tls_verify: false\n      timeout_seconds: 30\n      ca_bundle: ca.pem",
    ).replace(
        "    mapping: mapping.yaml",
        "    mapping: mapping.yaml\n"
        "    sync: {interval_seconds: 60, mode: new_only, page_size: 50,"
        " start: {lookback_days: 3, since: 2026-11-01T00:00:00Z}}",
    )
    write(tmp_path / "ca.pem", "not checked beyond being a readable file\n")
    path = write(tmp_path / "config.yaml", "language: ru\nlog: {level: DEBUG}\n" + config)

    settings = load_settings(path)

    connection = settings.connection(None)
    assert connection.mdr.tls_verify is False
    assert connection.mdr.timeout_seconds == 30.0
    assert connection.mdr.ca_bundle == tmp_path / "ca.pem"
    assert connection.mdr.token_dir == tmp_path / "tokens"
    assert connection.sync.interval_seconds == 60.0
    assert connection.sync.mode == "new_only"
    assert connection.sync.page_size == 50
    assert connection.sync.start.lookback_days == 3.0
    assert connection.sync.start.since == datetime(2026, 11, 1, tzinfo=timezone.utc)
    assert settings.language == "ru"


def test_quoted_since_loads(tmp_path: Path) -> None:
    """`since` given as a quoted ISO 8601 string parses like a YAML timestamp."""
    config = VALID_CONFIG.replace(
        "    mapping: mapping.yaml", "    mapping: mapping.yaml\n    sync: {start: {since: '2026-11-01T03:00:00+03:00'}}"
    )

    settings = load_settings(write(tmp_path / "config.yaml", config))

    assert settings.connection(None).sync.start.since == datetime(2026, 11, 1, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        (
            "comments: {mirror_restricted: 'yes'}\n",
            'comments.mirror_restricted: "yes" is a string, but a boolean is expected; '
            "write true or false, without quotes",
        ),
        (
            "attachments: {to_ticket: {max_bytes: '10485760'}}\n",
            'attachments.to_ticket.max_bytes: "10485760" is a string, but an integer is expected; '
            "write a whole number, without quotes",
        ),
        (
            "assets: {enabled: 1}\n",
            "assets.enabled: 1 is an integer, but a boolean is expected; write true or false, without quotes",
        ),
        (
            "status: {close_mdr: {enabled: 'true'}}\n",
            'status.close_mdr.enabled: "true" is a string, but a boolean is expected; '
            "write true or false, without quotes",
        ),
    ],
    ids=["comments", "attachments", "assets", "close"],
)
def test_mapping_wrong_type_rejected(tmp_path: Path, section: str, expected: str) -> None:
    """The mapping models are strict too."""
    path = write(tmp_path / "mapping.yaml", MAPPING_HEAD + section)

    with pytest.raises(ConfigError) as caught:
        load_mapping(str(path))

    assert str(caught.value).splitlines() == [f"{path}: {expected}"]


def test_builtin_mapping_duplicate_key_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A built-in mapping goes through the same reader as a mapping file."""
    write(tmp_path / "jira.yaml", MAPPING_HEAD + "project: OPS\n")
    monkeypatch.setattr(mappingfile.resources, "files", lambda package: tmp_path)

    with pytest.raises(ConfigError) as caught:
        load_mapping("builtin:jira")

    assert str(caught.value) == f"builtin:jira: duplicate key 'project' at lines 1 and 5; {DUPLICATE_FIX}"
