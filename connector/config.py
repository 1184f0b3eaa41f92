"""The configuration file, validated with pydantic.

It is YAML read with the safe loader, which rejects a repeated key. The
models reject unknown keys and values of the wrong type, so a misspelled
key or a quoted boolean fails at start-up with the file, the key path and
the expected value named. Secrets never sit in this file: a secret
field names an environment variable (`env:`) or a file (`file:`) to read.
The field-mapping files are read in mappingfile.py.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import stat
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from mdr_connector.connector.errors import ConfigError
from mdr_connector.connector.inline_sqlite import lock_wait_of
from mdr_connector.connector.logs import register_secret
from mdr_connector.connector.mappingfile import BUILTIN_MAPPING_PREFIX
from mdr_connector.connector.yamlfiles import (
    StrictModel,
    YamlDatetime,
    YamlPath,
    format_validation_error,
    read_yaml,
)

log = logging.getLogger(__name__)

MAX_SECRET_BYTES = 64 * 1024
LOOPBACK_NAMES = {"localhost", "localhost.localdomain"}
CONNECTION_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
MDR_CLIENT_ID_PATTERN = r"^[A-Za-z0-9_-]+$"
MAX_MDR_CLIENT_ID_LENGTH = 200


class SecretRef(StrictModel):
    """A reference to a secret in an environment variable or a file, never in the YAML itself."""

    env: str | None = None
    file: YamlPath | None = None

    @model_validator(mode="after")
    def _one_source(self) -> SecretRef:
        if (self.env is None) == (self.file is None):
            raise ValueError("set exactly one of 'env' (variable name) or 'file' (path)")
        return self

    def read(self) -> str:
        """Read the secret, raising ConfigError that names the source but never the value.

        Every value read is registered with the log redaction, so it cannot
        reach a log line even inside an error text from a library.
        """
        value = self._read_env() if self.env is not None else self._read_file()
        register_secret(value)
        return value

    def _read_env(self) -> str:
        assert self.env is not None
        value = os.environ.get(self.env)
        if not value:
            raise ConfigError(f"environment variable {self.env} is not set or empty")
        return value

    def _read_file(self) -> str:
        assert self.file is not None
        try:
            info = self.file.stat()
        except OSError as err:
            raise ConfigError(f"cannot read secret file {self.file}: {err.strerror}") from err
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"secret file {self.file} is not a regular file")
        if info.st_size > MAX_SECRET_BYTES:
            raise ConfigError(f"secret file {self.file} is larger than {MAX_SECRET_BYTES} bytes; is it the right file?")
        if info.st_mode & 0o077:
            log.warning("config.secret_file.readable_by_others", extra={"path": str(self.file)})

        try:
            value = self.file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"cannot read secret file {self.file}: {err}") from err
        if not value:
            raise ConfigError(f"secret file {self.file} is empty")
        return value


def reject_inline_password(url: str) -> str:
    """Refuse a URL that carries a password in the YAML; it belongs in an environment variable or file."""
    if urlsplit(url).password:
        raise ValueError(
            "this URL contains a password, and secrets must not sit in the YAML: "
            "move the whole URL to an environment variable or file, e.g. {env: VARIABLE_NAME}"
        )
    return url


def secret_or_plain(value: str | SecretRef | None) -> str | None:
    """Resolve a setting that is either a plain value or a SecretRef."""
    if isinstance(value, SecretRef):
        return value.read()
    return value


class TransportSettings(StrictModel):
    """TLS, proxy and timeout settings shared by every HTTP client."""

    tls_verify: bool = True
    ca_bundle: YamlPath | None = None
    proxy: str | SecretRef | None = None
    timeout_seconds: float = Field(default=30.0, gt=0, le=600)

    @field_validator("proxy")
    @classmethod
    def _proxy_without_password(cls, value: str | SecretRef | None) -> str | SecretRef | None:
        return reject_inline_password(value) if isinstance(value, str) else value

    def proxy_url(self) -> str | None:
        """Return the proxy URL, read from its environment variable or file when it is a secret."""
        return secret_or_plain(self.proxy)


def check_service_url(url: str) -> str:
    """Accept https:// anywhere and http:// only for loopback hosts (the simulators)."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url.rstrip("/")
    if parts.scheme == "http" and parts.hostname and is_loopback_host(parts.hostname):
        return url.rstrip("/")
    raise ValueError(
        f"{url!r} must be an https:// URL; plain http:// is accepted only for loopback addresses"
    )


def is_loopback_host(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class MdrSettings(TransportSettings):
    """How to reach one MDR client (one API token)."""

    base_url: str = "https://mdr.kaspersky.com/api/v1"
    client_id: str = Field(min_length=1, max_length=MAX_MDR_CLIENT_ID_LENGTH, pattern=MDR_CLIENT_ID_PATTERN)
    connection_name: str = Field(min_length=1)
    token_dir: YamlPath
    refresh_margin_seconds: int = Field(default=600, ge=0)
    max_concurrency: int = Field(default=4, ge=1, le=64)
    console_url: str = "https://mdr.kaspersky.com"

    _check_url = field_validator("base_url", "console_url")(check_service_url)


class JiraApiTokenAuth(StrictModel):
    """Jira Cloud: account e-mail and API token."""

    type: Literal["api_token"]
    email: str
    token: SecretRef


class JiraPersonalTokenAuth(StrictModel):
    """Jira Data Center: personal access token."""

    type: Literal["pat"]
    token: SecretRef


class JiraBasicAuth(StrictModel):
    """Jira Data Center: user name and password."""

    type: Literal["basic"]
    username: str
    password: SecretRef


JiraAuth = Annotated[
    JiraApiTokenAuth | JiraPersonalTokenAuth | JiraBasicAuth, Field(discriminator="type")
]


class JiraSettings(TransportSettings):
    """How to reach Jira Cloud or Jira Data Center."""

    system: Literal["jira"]
    url: str
    auth: JiraAuth
    deployment: Literal["auto", "cloud", "datacenter"] = "auto"
    search_delay_seconds: float | None = Field(default=None, ge=0)
    max_concurrency: int = Field(default=4, ge=1, le=32)

    _check_url = field_validator("url")(check_service_url)


class ServiceNowBasicAuth(StrictModel):
    """ServiceNow: the service account's user name and password on every request."""

    type: Literal["basic"]
    username: str = Field(min_length=1)
    password: SecretRef


class ServiceNowOAuth(StrictModel):
    """ServiceNow: an OAuth client credentials grant from `oauth_token.do`.

    The account the instance maps the OAuth client to is the connector's own
    account, so `username` must name it for echo suppression and the start-up checks.
    """

    type: Literal["oauth_client_credentials"]
    client_id: str = Field(min_length=1)
    client_secret: SecretRef
    username: str = Field(min_length=1)
    scope: str | None = None


ServiceNowAuth = Annotated[ServiceNowBasicAuth | ServiceNowOAuth, Field(discriminator="type")]


class ServiceNowSettings(TransportSettings):
    """How to reach a ServiceNow instance, and the table that contains the tickets."""

    system: Literal["servicenow"]
    url: str
    auth: ServiceNowAuth
    table: str = Field(default="incident", pattern=r"^[a-z][a-z0-9_]{0,79}$")
    # The close code and notes sent with a move to a resolved or closed
    # state, because instances enforce both with a data policy. Choice values differ
    # per instance, so `check` compares them with the instance's sys_choice list.
    close_code: str = "Solution provided"
    close_notes: str = "Resolved in Kaspersky MDR."
    max_concurrency: int = Field(default=4, ge=1, le=32)

    _check_url = field_validator("url")(check_service_url)


class RedmineSettings(TransportSettings):
    """How to reach a Redmine server through its REST API."""

    system: Literal["redmine"]
    url: str
    api_key: SecretRef
    # The issue custom field that carries the MDR incident id, by name. The
    # REST API cannot create custom fields, so an administrator creates it once.
    correlation_field: str = Field(default="MDR incident id", min_length=1)
    # Redmine's "Text formatting" setting, which the REST API does not show.
    text_formatting: Literal["textile", "common_mark"] = "textile"
    # Redmine's "Maximum attachment size", which only administrators can read.
    attachment_max_kb: int = Field(default=5120, ge=1)
    max_concurrency: int = Field(default=4, ge=1, le=32)

    _check_url = field_validator("url")(check_service_url)


TicketSettings = Annotated[JiraSettings | ServiceNowSettings | RedmineSettings, Field(discriminator="system")]


class StartSettings(StrictModel):
    """The starting point of a connection's first sync."""

    lookback_days: float = Field(default=7, gt=0)
    since: YamlDatetime | None = None

    @field_validator("since")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("give a time zone, for example 2026-11-01T00:00:00Z")
        return value


class FilterSettings(StrictModel):
    """The incident filters, passed to `incidents/list` as the API's own filters."""

    statuses: list[Literal["Open", "On hold", "Resolved", "Closed"]] = Field(default_factory=list)
    priorities: list[Literal["HIGH", "NORMAL", "LOW"]] = Field(default_factory=list)
    tenants: list[str] = Field(default_factory=list)


class SyncSettings(StrictModel):
    """Polling, paging and retry settings of one connection."""

    interval_seconds: float = Field(default=60, gt=0)
    mode: Literal["updated", "new_only"] = "updated"
    # How changed incidents are found: `incidents/history` records (each
    # object's change), or `incidents/list` sorted by `update_time`.
    change_source: Literal["history", "list"] = "history"
    start: StartSettings = Field(default_factory=StartSettings)
    filters: FilterSettings = Field(default_factory=FilterSettings)
    mdr_overlap_seconds: float = Field(default=300, ge=0)
    ticket_overlap_seconds: float = Field(default=300, ge=0)
    # NOTE: 100 is the largest incidents/list page size seen working in public
    # clients. A server that returns fewer items than asked would make a page
    # look like the last one, so larger values are not accepted.
    page_size: int = Field(default=100, ge=1, le=100)
    max_pages_per_cycle: int = Field(default=20, ge=1)
    # Incidents reconciled at once. Each incident's calls still wait for the
    # `max_concurrency` of the system they go to, so this bounds the work in
    # progress (ledger sessions, spooled files, memory), not the load on MDR
    # or the ticket system.
    max_incidents_in_flight: int = Field(default=16, ge=1, le=256)
    retry_base_seconds: float = Field(default=60, gt=0)
    retry_max_seconds: float = Field(default=3600, gt=0)
    # Days after which the ledger rows of an incident closed in MDR are
    # deleted, counted from the last change of its link; None keeps them forever.
    retention_days: int | None = Field(default=None, ge=1)


class ConnectionSettings(StrictModel):
    """One MDR client paired with one ticket system."""

    name: str = Field(pattern=CONNECTION_NAME_PATTERN)
    mdr: MdrSettings
    ticket: TicketSettings
    # Unset, the built-in mapping of the ticket system: builtin:jira, builtin:servicenow or builtin:redmine.
    mapping: str = "builtin:jira"
    sync: SyncSettings = Field(default_factory=SyncSettings)

    @model_validator(mode="before")
    @classmethod
    def _mapping_of_system(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "mapping" in data:
            return data
        ticket = data.get("ticket")
        system = ticket.get("system") if isinstance(ticket, dict) else getattr(ticket, "system", None)
        if system in ("servicenow", "redmine"):
            return {**data, "mapping": f"builtin:{system}"}
        return data


class LogSettings(StrictModel):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["auto", "json", "text"] = "auto"


class ObservabilitySettings(StrictModel):
    """The optional HTTP port for /metrics, /healthz and /readyz."""

    # No port, no server. 0 picks a free port (for tests).
    port: int | None = Field(default=None, ge=0, le=65535)
    # Loopback by default; the endpoints have no authentication.
    host: str = "127.0.0.1"
    # /readyz fails when a connection's last good cycle is older than this many intervals.
    ready_cycles: int = Field(default=3, ge=1)


class ClusterSettings(StrictModel):
    """Several instances sharing the connections through leases in one PostgreSQL database."""

    enabled: bool = False
    # This instance's name in the leases table; default `<host>-<pid>`.
    # At most 190 characters: commands hold leases as `<name>/command` in a 200-character column.
    instance_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,189}$")
    # The connections of an instance that dies are taken over within this many seconds.
    takeover_seconds: float = Field(default=30, ge=3, le=3600)
    # The key that encrypts the MDR token pairs stored in the database.
    token_key: SecretRef | None = None

    @model_validator(mode="after")
    def _key_when_enabled(self) -> ClusterSettings:
        if self.enabled and self.token_key is None:
            raise ValueError(
                "cluster.enabled needs cluster.token_key, the key that encrypts the MDR tokens "
                "in the database: {env: VARIABLE_NAME} or {file: PATH}; "
                "`mdr-connector token new-key` prints a new one"
            )
        return self


def check_sqlite_lock_wait(url: str) -> None:
    """Raise ValueError when an SQLite URL's `timeout` option is not a number of seconds; other URLs pass."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        # Opening the store reports a URL that does not parse, with SQLAlchemy's reason.
        return
    if parsed.get_backend_name() != "sqlite":
        return
    try:
        lock_wait_of(parsed.query)
    except ValueError:
        raise ValueError(
            f"timeout={parsed.query.get('timeout')} in database_url is not a number of seconds from 0 up; "
            "set ?timeout=SECONDS, how long a statement waits for another process's lock, for example ?timeout=30"
        ) from None


class Settings(StrictModel):
    """The whole configuration file."""

    data_dir: YamlPath = Path("data")
    database_url: str | SecretRef | None = None
    language: Literal["en", "ru"] | None = None
    log: LogSettings = Field(default_factory=LogSettings)
    observability: ObservabilitySettings = Field(default_factory=ObservabilitySettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    connections: list[ConnectionSettings] = Field(min_length=1)

    @field_validator("connections")
    @classmethod
    def _unique_names(cls, value: list[ConnectionSettings]) -> list[ConnectionSettings]:
        names = [connection.name for connection in value]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"connection names must be unique, repeated: {', '.join(duplicates)}")
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url_without_password(cls, value: str | SecretRef | None) -> str | SecretRef | None:
        if not isinstance(value, str):
            return value
        check_sqlite_lock_wait(value)
        return reject_inline_password(value)

    @model_validator(mode="after")
    def _cluster_on_postgresql(self) -> Settings:
        # A URL kept in a secret is checked when the database is opened.
        if not self.cluster.enabled or isinstance(self.database_url, SecretRef):
            return self
        if self.database_url is None or not self.database_url.startswith("postgresql+asyncpg://"):
            raise ValueError(
                "cluster.enabled needs a PostgreSQL database_url of the form "
                "postgresql+asyncpg://USER@HOST:5432/DATABASE, shared by every instance; "
                f"the configured one is {self.database_url or 'unset (SQLite in data_dir)'}"
            )
        return self

    def resolved_database_url(self) -> str:
        """Return the SQLAlchemy URL: the configured one (read from its secret if need be), else SQLite in data_dir."""
        url = secret_or_plain(self.database_url)
        if url:
            return url
        return f"sqlite+aiosqlite:///{self.data_dir / 'mdr-connector.db'}"

    def connection(self, name: str | None) -> ConnectionSettings:
        """Return the named connection, or the only one when no name is given."""
        if name is None:
            if len(self.connections) == 1:
                return self.connections[0]
            names = ", ".join(c.name for c in self.connections)
            raise ConfigError(f"several connections are configured ({names}): pick one with --connection")
        for connection in self.connections:
            if connection.name == name:
                return connection
        names = ", ".join(c.name for c in self.connections)
        raise ConfigError(f"no connection named {name!r}; configured: {names}")


def check_ca_bundles(settings: Settings) -> None:
    """Reject a `ca_bundle` that is missing or unreadable at start-up, naming the key and the path."""
    for index, connection in enumerate(settings.connections):
        for side in ("mdr", "ticket"):
            bundle = getattr(connection, side).ca_bundle
            if bundle is None:
                continue
            if not bundle.is_file() or not os.access(bundle, os.R_OK):
                raise ConfigError(
                    f"connections[{index}].{side}.ca_bundle: {bundle} is not a readable file; "
                    "point it at the PEM file of your CA"
                )


def load_settings(path: Path) -> Settings:
    """Load and validate the configuration file; relative paths are resolved against its folder."""
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(str(path), err, raw, Settings)) from err
    settings = resolve_paths(settings, path.parent.resolve())
    check_ca_bundles(settings)
    return settings


def resolve_paths(settings: Settings, base: Path) -> Settings:
    """Make every relative path in the settings relative to `base`."""

    def absolute(value: Path | None) -> Path | None:
        if value is None or value.is_absolute():
            return value
        return base / value

    def fix_secrets(model: BaseModel) -> BaseModel:
        updates: dict[str, Any] = {}
        for name in type(model).model_fields:
            value = getattr(model, name)
            if isinstance(value, SecretRef) and value.file is not None:
                updates[name] = value.model_copy(update={"file": absolute(value.file)})
            elif isinstance(value, BaseModel):
                updates[name] = fix_secrets(value)
            elif isinstance(value, Path):
                updates[name] = absolute(value)
        return model.model_copy(update=updates)

    connections = []
    for connection in settings.connections:
        fixed = fix_secrets(connection)
        mapping = connection.mapping
        if not mapping.startswith(BUILTIN_MAPPING_PREFIX) and not Path(mapping).is_absolute():
            fixed = fixed.model_copy(update={"mapping": str(base / mapping)})
        connections.append(fixed)
    database_url = settings.database_url
    if isinstance(database_url, SecretRef):
        database_url = fix_secrets(database_url)
    elif isinstance(database_url, str):
        database_url = absolute_sqlite_url(database_url, base)
    return settings.model_copy(
        update={
            "data_dir": absolute(settings.data_dir),
            "connections": connections,
            "database_url": database_url,
            "cluster": fix_secrets(settings.cluster),
        }
    )


def absolute_sqlite_url(url: str, base: Path) -> str:
    """Resolve a relative SQLite file path against the config file's folder, not the current folder."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - Store.open reports an invalid URL with its reason
        return url
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return url
    if Path(parsed.database).is_absolute():
        return url
    return parsed.set(database=str(base / parsed.database)).render_as_string(hide_password=False)

