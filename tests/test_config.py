"""Config and mapping files: safe loading, strict validation, readable errors."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from mdr_connector.connector.config import SecretRef, load_mapping, load_settings
from mdr_connector.connector.errors import ConfigError

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


def test_url_with_password_is_rejected(tmp_path: Path) -> None:
    """A database or proxy URL with a password in the YAML is rejected; the fix is named."""
    with_database = "database_url: postgresql+asyncpg://mdr:hunter2@db/mdr\n" + VALID_CONFIG
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path / "db.yaml", with_database))
    assert "database_url: Value error, this URL contains a password" in str(caught.value)
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
