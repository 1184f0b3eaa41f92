"""Config and mapping files: safe loading, strict validation, readable errors."""

from __future__ import annotations

import os
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from mdr_connector.connector.config import ConnectionSettings, SecretRef, load_settings
from mdr_connector.connector.errors import ConfigError
from mdr_connector.connector.mappingfile import load_mapping
from mdr_connector.connector.store import Store

VALID_CONFIG = """
data_dir: state
connections:
  - name: main
    mdr:
      client_id: 1f1f1f1f1f1fc144a4b9a3af6a6a6a6a6a
      connection_name: SOC Jira connector
      token_dir: tokens
    ticket:
      system: jira
      url: https://example.atlassian.net
      auth:
        type: api_token
        email: soc-bot@example.com
        token: {env: JIRA_API_TOKEN}
    mapping: mapping.yaml
"""


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_valid_config_resolves_paths(tmp_path: Path) -> None:
    """Relative paths in the config are resolved against the config file's folder."""
    settings = load_settings(write(tmp_path / "config.yaml", VALID_CONFIG))

    connection = settings.connection(None)
    assert settings.data_dir == tmp_path / "state"
    assert connection.mdr.token_dir == tmp_path / "tokens"
    assert connection.mapping == str(tmp_path / "mapping.yaml")
    assert settings.resolved_database_url().endswith(f"{tmp_path}/state/mdr-connector.db")
    assert connection.mdr.tls_verify is True


def test_unknown_key_names_file_and_path(tmp_path: Path) -> None:
    """A misspelled key is rejected with the file and the full key path."""
    path = write(tmp_path / "config.yaml", VALID_CONFIG.replace("token_dir: tokens", "token_dri: tokens"))

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    message = str(caught.value)
    assert f"{path}: connections[0].mdr.token_dri: unknown key" in message
    assert "connections[0].mdr.token_dir: required key is missing" in message


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("token_dir: tokens", "token_dri: tokens", "connections[0].mdr.token_dri: unknown key; did you mean token_dir?"),
        ("email: soc-bot", "emial: soc-bot", "connections[0].ticket.auth.emial: unknown key; did you mean email?"),
        ("data_dir: state", "data_dirr: state", "data_dirr: unknown key; did you mean data_dir?"),
        ("    mapping: mapping.yaml", "    mappin: mapping.yaml", "connections[0].mappin: unknown key; did you mean mapping?"),
        (
            "token_dir: tokens",
            "token_dir: tokens\n      proxy: {fiel: proxy-url}",
            "connections[0].mdr.proxy.fiel: unknown key; did you mean file?",
        ),
    ],
    ids=["mdr", "auth-union", "top-level", "connection", "secret-reference"],
)
def test_unknown_key_suggests_nearest(tmp_path: Path, old: str, new: str, expected: str) -> None:
    """A misspelled key names the valid key at the same place, inside unions too."""
    path = write(tmp_path / "config.yaml", VALID_CONFIG.replace(old, new))

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    assert f"{path}: {expected}" in str(caught.value).splitlines()


def test_unknown_key_far_from_any(tmp_path: Path) -> None:
    """A key like no valid one gets no guess, only the advice to check the spelling."""
    path = write(tmp_path / "config.yaml", VALID_CONFIG.replace("data_dir: state", "colour: blue"))

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    assert str(caught.value) == f"{path}: colour: unknown key; check its spelling against the documentation"


def test_unknown_mapping_key_suggests_nearest(tmp_path: Path) -> None:
    """The mapping file gets the same suggestion, in nested sections too."""
    path = write(
        tmp_path / "mapping.yaml",
        MAPPING_HEAD + "label: [mdr]\ncomments: {mirror_restrictd: true}\n",
    )

    with pytest.raises(ConfigError) as caught:
        load_mapping(str(path))

    lines = str(caught.value).splitlines()
    assert f"{path}: label: unknown key; did you mean labels?" in lines
    assert f"{path}: comments.mirror_restrictd: unknown key; did you mean mirror_restricted?" in lines


def test_messages_drop_pydantic_prefix(tmp_path: Path) -> None:
    """A validator's message is shown without pydantic's "Value error, " in front."""
    config = VALID_CONFIG.replace("name: main", "name: main\n    sync: {start: {since: 2026-11-01T00:00:00}}")
    path = write(tmp_path / "config.yaml", config)

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    assert str(caught.value) == (
        f"{path}: connections[0].sync.start.since: give a time zone, for example 2026-11-01T00:00:00Z"
    )


def test_plain_http_only_on_loopback(tmp_path: Path) -> None:
    """http:// is refused for a remote host and accepted for 127.0.0.1."""
    remote = VALID_CONFIG.replace("https://example.atlassian.net", "http://jira.example.com")
    with pytest.raises(ConfigError, match="plain http:// is accepted only for loopback"):
        load_settings(write(tmp_path / "remote.yaml", remote))

    local = VALID_CONFIG.replace("https://example.atlassian.net", "http://127.0.0.1:8080")
    assert load_settings(write(tmp_path / "local.yaml", local)).connections[0].ticket.url == "http://127.0.0.1:8080"


def test_inline_secret_is_rejected(tmp_path: Path) -> None:
    """A token written into the YAML itself is not accepted."""
    inline = VALID_CONFIG.replace("token: {env: JIRA_API_TOKEN}", "token: abc123secret")

    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path / "config.yaml", inline))

    assert "connections[0].ticket.auth.token: expected a secret reference" in str(caught.value)
    assert "abc123secret" not in str(caught.value)


def test_python_yaml_tags_are_not_executed(tmp_path: Path) -> None:
    """A YAML tag that would construct a Python object fails to load."""
    hostile = write(tmp_path / "config.yaml", "connections: !!python/object/new:os.system [echo pwned]\n")

    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(hostile)


def test_secret_from_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Secrets are read from an environment variable or a file, and a missing one is named."""
    monkeypatch.setenv("MDR_TEST_SECRET", "s3cret-value")
    assert SecretRef(env="MDR_TEST_SECRET").read() == "s3cret-value"

    secret_file = write(tmp_path / "secret", "from-file\n")
    assert SecretRef(file=secret_file).read() == "from-file"

    monkeypatch.delenv("MDR_TEST_SECRET")
    with pytest.raises(ConfigError, match="MDR_TEST_SECRET is not set"):
        SecretRef(env="MDR_TEST_SECRET").read()


def test_builtin_mapping_loads() -> None:
    """The default Jira mapping shipped in the package is valid."""
    mapping = load_mapping("builtin:jira")

    assert mapping.summary == "[MDR-{incident_number}] {summary}"
    assert set(mapping.priority) == {"HIGH", "NORMAL", "LOW"}


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{summry}", "unknown placeholder {summry}"),
        ("{summary.__class__}", "is not allowed"),
        ("{summary[0]}", "is not allowed"),
        ("{summary!r}", "conversion !r"),
        ("{summary", "invalid template"),
    ],
    ids=["unknown-name", "attribute", "index", "conversion", "unbalanced"],
)
def test_mapping_template_errors(tmp_path: Path, template: str, expected: str) -> None:
    """Templates may use only known placeholders, without attribute or index access."""
    path = write(
        tmp_path / "mapping.yaml",
        f"""
        project: SEC
        issue_type: Task
        summary: "{template}"
        description: "{{description}}"
        priority: {{HIGH: High, NORMAL: Medium, LOW: Low}}
        """,
    )

    with pytest.raises(ConfigError) as caught:
        load_mapping(str(path))

    assert expected in str(caught.value)
    assert f"{path}: summary:" in str(caught.value)


def test_mapping_requires_every_priority(tmp_path: Path) -> None:
    """A priority map without LOW names the missing priority."""
    path = write(
        tmp_path / "mapping.yaml",
        """
        project: SEC
        issue_type: Task
        description: x
        priority: {HIGH: High, NORMAL: Medium}
        """,
    )

    with pytest.raises(ConfigError, match="missing: LOW"):
        load_mapping(str(path))


@pytest.mark.parametrize("value", ["abc", "-1", "nan", "inf"])
def test_sqlite_timeout_is_checked(tmp_path: Path, value: str) -> None:
    """An SQLite URL whose timeout is not seconds from 0 up is rejected by the config check, with the fix named."""
    config = f"database_url: sqlite+aiosqlite:///state/ledger.db?timeout={value}\n" + VALID_CONFIG
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path / "db.yaml", config))
    assert f"timeout={value} in database_url is not a number of seconds" in str(caught.value)
    assert "?timeout=SECONDS" in str(caught.value)


def test_sqlite_timeout_is_accepted(tmp_path: Path) -> None:
    """A timeout in seconds passes the config check and sets the ledger's pool wait to at least that long."""
    config = "database_url: sqlite+aiosqlite:///state/ledger.db?timeout=90\n" + VALID_CONFIG
    settings = load_settings(write(tmp_path / "db.yaml", config))
    store = Store(settings.resolved_database_url())
    assert store.engine.pool.timeout() == 90


def test_url_with_password_is_rejected(tmp_path: Path) -> None:
    """A database or proxy URL with a password in the YAML is rejected; the fix is named."""
    with_database = "database_url: postgresql+asyncpg://mdr:hunter2@db/mdr\n" + VALID_CONFIG
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path / "db.yaml", with_database))
    assert "database_url: this URL contains a password" in str(caught.value)
    assert "hunter2" not in str(caught.value)

    with_proxy = VALID_CONFIG.replace("token_dir: tokens", "token_dir: tokens\n      proxy: http://u:p4ss@proxy:3128")
    with pytest.raises(ConfigError, match="connections\\[0\\].mdr.proxy"):
        load_settings(write(tmp_path / "proxy.yaml", with_proxy))


def test_database_url_from_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """database_url can come from an environment variable, password included."""
    monkeypatch.setenv("MDR_TEST_DB_URL", "postgresql+asyncpg://mdr:hunter2@db/mdr")
    settings = load_settings(write(tmp_path / "config.yaml", "database_url: {env: MDR_TEST_DB_URL}\n" + VALID_CONFIG))

    assert settings.resolved_database_url() == "postgresql+asyncpg://mdr:hunter2@db/mdr"


def test_relative_sqlite_path_follows_config(tmp_path: Path) -> None:
    """A relative SQLite path is resolved against the config file's folder, not the current one."""
    settings = load_settings(
        write(tmp_path / "config.yaml", "database_url: sqlite+aiosqlite:///state/ledger.db\n" + VALID_CONFIG)
    )

    assert settings.resolved_database_url() == f"sqlite+aiosqlite:///{tmp_path}/state/ledger.db"


@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_secret_file_must_be_regular(tmp_path: Path, kind: str) -> None:
    """A secret 'file' that is a FIFO, a folder or a device is rejected instead of read."""
    path = tmp_path / "secret"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero")

    with pytest.raises(ConfigError, match="is not a regular file"):
        SecretRef(file=path).read()


def test_secret_values_are_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    """A secret read from the config is redacted from log text from then on."""
    from mdr_connector.connector.logs import redact_text

    monkeypatch.setenv("MDR_TEST_CANARY", "canary-3f9a1c77")
    SecretRef(env="MDR_TEST_CANARY").read()

    assert redact_text("Jira said: bad token canary-3f9a1c77") == "Jira said: bad token [REDACTED]"


def test_mapping_rejects_core_fields(tmp_path: Path) -> None:
    """`fields` cannot set summary or priority behind the mapping's own keys."""
    path = write(
        tmp_path / "mapping.yaml",
        """
        project: SEC
        issue_type: Task
        description: x
        priority: {HIGH: High, NORMAL: Medium, LOW: Low}
        fields: {summary: overridden, customfield_10010: SOC}
        """,
    )

    with pytest.raises(ConfigError, match="summary cannot be set under 'fields'"):
        load_mapping(str(path))


MAPPING_HEAD = """\
project: SEC
issue_type: Task
description: x
priority: {HIGH: High, NORMAL: Medium, LOW: Low}
"""


def finishes_within(seconds: float, function, *args):
    """Run `function(*args)` in a daemon thread, so a read that blocks fails the test instead of hanging it."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = function(*args)
        except Exception as err:  # noqa: BLE001 - handed to the test to inspect
            outcome["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{function.__name__} still blocked after {seconds} s"
    return outcome


@pytest.mark.parametrize(
    "template",
    ["{summary:>999999999}", "{summary:{description}}", "{summary:{description.__class__}}", "{summary:d}"],
    ids=["huge-width", "nested-field", "nested-attribute", "type-code"],
)
def test_mapping_template_format_spec_rejected(tmp_path: Path, template: str) -> None:
    """Any format spec is rejected, naming the placeholder, before it can pad, probe or fail a render."""
    path = write(tmp_path / "mapping.yaml", MAPPING_HEAD + f'summary: "{template}"\n')

    with pytest.raises(ConfigError) as caught:
        load_mapping(str(path))

    assert f"{path}: summary: placeholder {{summary}} has a format spec, " \
           "and format specs are not supported; write {summary}" in str(caught.value)


def test_mapping_fields_alias_bomb_rejected(tmp_path: Path) -> None:
    """Nested aliases under `fields` that expand to 10**8 values are rejected quickly with a clear error."""
    levels = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for previous, name in zip("abcdefg", "bcdefgh"):
        levels.append(f"{name}: &{name} [{', '.join([f'*{previous}'] * 10)}]")
    bomb = "fields:\n  customfield_1:\n" + "".join(f"    {line}\n" for line in levels)
    path = write(tmp_path / "mapping.yaml", MAPPING_HEAD + bomb)

    outcome = finishes_within(5, load_mapping, str(path))

    assert isinstance(outcome.get("error"), ConfigError)
    assert "too large once YAML aliases are expanded" in str(outcome["error"])


def test_mapping_fields_repeated_long_text_rejected(tmp_path: Path) -> None:
    """A long string repeated by aliases under `fields` stays under the node count, but not under 64 KB."""
    text = "y" * 40_000
    path = write(
        tmp_path / "mapping.yaml",
        MAPPING_HEAD + f"fields:\n  customfield_1: &long {text}\n  customfield_2: *long\n",
    )

    with pytest.raises(ConfigError, match="fields: the custom fields are too large"):
        load_mapping(str(path))


def test_mapping_fields_that_contain_themselves_rejected(tmp_path: Path) -> None:
    """A `fields` value that refers to itself cannot reach serialisation."""
    path = write(tmp_path / "mapping.yaml", MAPPING_HEAD + "fields: &f {customfield_1: *f}\n")

    with pytest.raises(ConfigError, match="too large once YAML aliases are expanded"):
        load_mapping(str(path))


def test_mapping_small_fields_with_alias_load(tmp_path: Path) -> None:
    """A modest alias under `fields` still loads."""
    path = write(
        tmp_path / "mapping.yaml",
        MAPPING_HEAD + "fields:\n  customfield_1: &team {value: SOC}\n  customfield_2: *team\n",
    )

    assert load_mapping(str(path)).fields == {"customfield_1": {"value": "SOC"}, "customfield_2": {"value": "SOC"}}


def test_config_alias_bomb_rejected(tmp_path: Path) -> None:
    """The whole config document has the same budget: an alias bomb in any key is rejected."""
    levels = "".join(f"{name}: &{name} [{', '.join([f'*{prev}'] * 10)}]\n" for prev, name in zip("abcdef", "bcdefg"))
    path = write(tmp_path / "config.yaml", "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + levels + VALID_CONFIG)

    with pytest.raises(ConfigError, match=f"{path}: too large once YAML aliases are expanded"):
        load_settings(path)


@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
@pytest.mark.parametrize("loader", ["config", "mapping"])
def test_yaml_file_must_be_regular(tmp_path: Path, kind: str, loader: str) -> None:
    """A config or mapping 'file' that is a FIFO, a device or a folder is rejected without reading it."""
    path = tmp_path / "document.yaml"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path.symlink_to("/dev/null")
    else:
        path.mkdir()

    outcome = finishes_within(5, load_settings if loader == "config" else load_mapping,
                              path if loader == "config" else str(path))

    assert str(outcome.get("error")) == f"cannot read {path}: not a regular file"


@pytest.mark.parametrize("loader", ["config", "mapping"])
def test_yaml_file_size_limit(tmp_path: Path, loader: str) -> None:
    """A config or mapping file over 1 MB is rejected before it is read."""
    path = tmp_path / "document.yaml"
    with path.open("wb") as file:
        file.truncate(1024 * 1024 + 1)

    with pytest.raises(ConfigError) as caught:
        load_settings(path) if loader == "config" else load_mapping(str(path))

    assert str(caught.value) == f"cannot read {path}: larger than 1048576 bytes; is it the right file?"


def test_binary_config_is_one_line(tmp_path: Path) -> None:
    """A file that is not UTF-8 text is reported in one line, without a decoder traceback."""
    path = tmp_path / "config.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    assert str(caught.value) == f"cannot read {path}: not UTF-8 text"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a: [1\nb: 2\n", "not valid YAML at line 2, column 2: expected ',' or ']', but got ':'"),
        ("a: 1\nb: \x00\n", "not valid YAML at line 2, column 4: character U+0000 is not allowed in YAML"),
        ("a: " + "[" * 2000, "not valid YAML: nested too deeply; flatten the document"),
        ("a: " + "1" * 5000, "not valid YAML: Exceeds the limit (4300 digits)"),
    ],
    ids=["syntax", "control-character", "deep", "long-number"],
)
def test_yaml_errors_are_one_line(tmp_path: Path, text: str, expected: str) -> None:
    """YAML errors name the file, the line and the column on one line."""
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    message = str(caught.value)
    assert message.startswith(f"{path}: {expected}")
    assert "\n" not in message


def test_missing_ca_bundle_rejected_at_load(tmp_path: Path) -> None:
    """A ca_bundle that does not exist is reported when the config loads, with its key."""
    config = VALID_CONFIG.replace("token_dir: tokens", "token_dir: tokens\n      ca_bundle: corp-ca.pem")

    with pytest.raises(ConfigError, match=r"connections\[0\]\.mdr\.ca_bundle: .*corp-ca.pem is not a readable file"):
        load_settings(write(tmp_path / "config.yaml", config))


@pytest.mark.parametrize(
    ("ticket", "mapping"),
    [
        ({"system": "servicenow", "url": "https://example.service-now.com",
          "auth": {"type": "basic", "username": "mdr.connector", "password": {"env": "SNOW_PASSWORD"}}}, "builtin:servicenow"),
        ({"system": "redmine", "url": "https://redmine.example.internal", "api_key": {"env": "REDMINE_KEY"}}, "builtin:redmine"),
    ],
    ids=["servicenow", "redmine"],
)
def test_connection_without_mapping_gets_its_systems_mapping(tmp_path: Path, ticket: dict[str, Any], mapping: str) -> None:
    """A ServiceNow or Redmine connection never falls back to the Jira mapping; an explicit mapping wins."""
    raw = {"name": "main", "mdr": {"client_id": "c0ffee", "connection_name": "mdr", "token_dir": str(tmp_path)}, "ticket": ticket}

    assert ConnectionSettings.model_validate(raw).mapping == mapping
    assert ConnectionSettings.model_validate({**raw, "mapping": "builtin:jira"}).mapping == "builtin:jira"


@pytest.mark.parametrize(
    "database_url",
    [None, "sqlite+aiosqlite:///ledger.db", "postgresql://mdr@db/mdr"],
)
def test_cluster_needs_postgresql_url(tmp_path: Path, database_url: str | None) -> None:
    """Cluster mode with SQLite, or with a URL asyncpg does not serve, is rejected when the config loads."""
    document = yaml.safe_load(VALID_CONFIG)
    document["cluster"] = {"enabled": True, "token_key": {"env": "MDR_TEST_TOKEN_KEY"}}
    if database_url is not None:
        document["database_url"] = database_url
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document))

    with pytest.raises(ConfigError, match="cluster.enabled needs a PostgreSQL database_url"):
        load_settings(path)
