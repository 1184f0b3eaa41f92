"""The configuration file and the field-mapping files, validated with pydantic.

Both are YAML read with `yaml.safe_load`, then validated with unknown keys
rejected, so a misspelled key fails at start-up with the file, the key path
and the expected value named. Secrets never sit in these files: a secret
field names an environment variable (`env:`) or a file (`file:`) to read.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import stat
import string
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from mdr_connector.connector.errors import ConfigError
from mdr_connector.connector.i18n import N_
from mdr_connector.connector.logs import register_secret

log = logging.getLogger(__name__)

BUILTIN_MAPPING_PREFIX = "builtin:"
MAX_SECRET_BYTES = 64 * 1024
MAX_DOCUMENT_BYTES = 1024 * 1024
# YAML aliases let a small file describe a huge structure, so documents are
# measured as serialising would expand them, an alias counting each time it is used.
MAX_DOCUMENT_NODES = 10_000
MAX_FIELDS_CHARACTERS = 64 * 1024
MAX_YAML_PROBLEM_LENGTH = 200
# Ticket fields the mapping sets through its own keys, never through `fields`.
CORE_TICKET_FIELDS = frozenset({"project", "issuetype", "issue_type", "summary", "description", "priority", "labels"})
LOOPBACK_NAMES = {"localhost", "localhost.localdomain"}
CONNECTION_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"

# Placeholders a mapping template may use; each is filled from the incident.
TEMPLATE_FIELDS = {
    "incident_id": "MDR incident id",
    "incident_number": "human-readable incident number",
    "summary": "incident title",
    "description": "incident description (Markdown)",
    "priority": "HIGH, NORMAL or LOW",
    "status": "Open, On hold, Resolved or Closed",
    "resolution": "resolution, empty until the incident is closed",
    "tenant_name": "tenant, empty for the root tenant",
    "affected_hosts": "Markdown list of affected hosts with their asset ids",
    "host_names": "comma-separated affected host names",
    "console_link": "link to the incident in the MDR web console",
    "creation_time": "creation time, UTC",
    "update_time": "last update time, UTC",
    "detection_technology": "detection technology",
    "attack_stage": "attack stage",
    "mitre_tactics": "comma-separated MITRE ATT&CK tactics",
    "mitre_techniques": "comma-separated MITRE ATT&CK techniques",
    "client_description": "text the customer gave when creating the incident",
    "recommendations": "SOC recommendations",
}
CANNOT_READ = N_("cannot read {path}: {reason}")
NOT_REGULAR_FILE = N_("cannot read {path}: not a regular file")
FILE_TOO_LARGE = N_("cannot read {path}: larger than {limit} bytes; is it the right file?")
NOT_UTF8 = N_("cannot read {path}: not UTF-8 text")

COMMENT_TEMPLATE_FIELDS = {
    "author": "name of the comment's author",
    "created": "comment creation time, UTC",
    "ticket_key": "ticket key, for example SEC-12",
    "system": "ticket system name, for example Jira",
}


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SecretRef(StrictModel):
    """A reference to a secret in an environment variable or a file, never in the YAML itself."""

    env: str | None = None
    file: Path | None = None

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
    ca_bundle: Path | None = None
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
    client_id: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_-]+$")
    connection_name: str = Field(min_length=1)
    token_dir: Path
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


TicketSettings = Annotated[JiraSettings, Field(discriminator="system")]


class StartSettings(StrictModel):
    """The starting point of a connection's first sync."""

    lookback_days: float = Field(default=7, gt=0)
    since: datetime | None = None

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
    start: StartSettings = Field(default_factory=StartSettings)
    filters: FilterSettings = Field(default_factory=FilterSettings)
    mdr_overlap_seconds: float = Field(default=300, ge=0)
    ticket_overlap_seconds: float = Field(default=300, ge=0)
    page_size: int = Field(default=100, ge=1, le=1000)
    max_pages_per_cycle: int = Field(default=20, ge=1)
    retry_base_seconds: float = Field(default=60, gt=0)
    retry_max_seconds: float = Field(default=3600, gt=0)


class ConnectionSettings(StrictModel):
    """One MDR client paired with one ticket system."""

    name: str = Field(pattern=CONNECTION_NAME_PATTERN)
    mdr: MdrSettings
    ticket: TicketSettings
    mapping: str = "builtin:jira"
    sync: SyncSettings = Field(default_factory=SyncSettings)


class LogSettings(StrictModel):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["auto", "json", "text"] = "auto"


class Settings(StrictModel):
    """The whole configuration file."""

    data_dir: Path = Path("data")
    database_url: str | SecretRef | None = None
    language: Literal["en", "ru"] | None = None
    log: LogSettings = Field(default_factory=LogSettings)
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
        return reject_inline_password(value) if isinstance(value, str) else value

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


class CommentFormat(StrictModel):
    """The comment mirroring rules: header lines naming the original author, and which comments go."""

    mdr_to_ticket_header: str = "**{author}** (Kaspersky MDR, {created})"
    ticket_to_mdr_header: str = "**{author}** ({system} {ticket_key}, {created})"
    # A ticket comment restricted to a role or group is internal to the SOC
    # team; it goes to MDR only when this is true.
    mirror_restricted: bool = False

    @field_validator("mdr_to_ticket_header", "ticket_to_mdr_header")
    @classmethod
    def _known_placeholders(cls, value: str) -> str:
        check_template(value, COMMENT_TEMPLATE_FIELDS)
        return value


class Mapping(StrictModel):
    """The mapping of an MDR incident to a ticket."""

    project: str = Field(min_length=1)
    issue_type: str = Field(min_length=1)
    summary: str = "[MDR-{incident_number}] {summary}"
    description: str
    priority: dict[Literal["HIGH", "NORMAL", "LOW"], str]
    labels: list[str] = Field(default_factory=list)
    fields: dict[str, Any] = Field(default_factory=dict)
    comments: CommentFormat = Field(default_factory=CommentFormat)

    @field_validator("summary", "description")
    @classmethod
    def _known_placeholders(cls, value: str) -> str:
        check_template(value, TEMPLATE_FIELDS)
        return value

    @field_validator("labels")
    @classmethod
    def _label_templates(cls, value: list[str]) -> list[str]:
        for label in value:
            check_template(label, TEMPLATE_FIELDS)
        return value

    @field_validator("fields")
    @classmethod
    def _no_core_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        core = sorted(set(value) & CORE_TICKET_FIELDS)
        if core:
            raise ValueError(
                f"{', '.join(core)} cannot be set under 'fields'; use the top-level keys "
                "project, issue_type, summary, description, priority and labels"
            )
        return value

    @field_validator("fields")
    @classmethod
    def _small_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        too_large = ValueError(
            f"the custom fields are too large: at most {MAX_DOCUMENT_NODES} values and "
            f"{MAX_FIELDS_CHARACTERS} characters of JSON, with YAML aliases counted each time they are used; "
            "write the values out instead of repeating anchors"
        )
        if not within_budget(value, MAX_DOCUMENT_NODES, MAX_FIELDS_CHARACTERS):
            raise too_large
        if len(json.dumps(value, ensure_ascii=False, default=str)) > MAX_FIELDS_CHARACTERS:
            raise too_large
        return value

    @field_validator("priority")
    @classmethod
    def _every_priority(cls, value: dict[str, str]) -> dict[str, str]:
        missing = [name for name in ("HIGH", "NORMAL", "LOW") if name not in value]
        if missing:
            raise ValueError(f"map every MDR priority; missing: {', '.join(missing)}")
        return value


def check_template(template: str, allowed: dict[str, str]) -> None:
    """Reject a template that uses an unknown placeholder, attribute/index access or a format spec.

    Every format spec is rejected, because a width can make one render take
    gigabytes, a nested field lets incident data choose the spec, and a
    type code such as `d` fails on every incident.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ValueError(f"invalid template {template!r}: {err}; write a literal brace as {{{{ or }}}}") from err

    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not re.fullmatch(r"[a-z_]+", name):
            raise ValueError(f"placeholder {{{name}}} is not allowed; use a plain name such as {{summary}}")
        if name not in allowed:
            raise ValueError(f"unknown placeholder {{{name}}}; allowed: {', '.join(sorted(allowed))}")
        if conversion not in (None, "s"):
            raise ValueError(f"conversion !{conversion} in {{{name}}} is not allowed")
        if spec:
            raise ValueError(f"placeholder {{{name}}} has a format spec, and format specs are not supported; "
                             f"write {{{name}}}")


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
        raise ConfigError(format_validation_error(str(path), err, raw)) from err
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
        update={"data_dir": absolute(settings.data_dir), "connections": connections, "database_url": database_url}
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


def load_mapping(reference: str) -> Mapping:
    """Load a mapping from a path or from `builtin:<name>` (the defaults shipped in the package)."""
    if reference.startswith(BUILTIN_MAPPING_PREFIX):
        name = reference[len(BUILTIN_MAPPING_PREFIX):]
        if not re.fullmatch(r"[a-z0-9_-]+", name):
            raise ConfigError(f"invalid built-in mapping name {name!r}")
        resource = resources.files("mdr_connector.mappings").joinpath(f"{name}.yaml")
        if not resource.is_file():
            raise ConfigError(f"no built-in mapping named {name!r}")
        source, raw = reference, yaml.safe_load(resource.read_text(encoding="utf-8"))
        check_document_size(source, raw)
    else:
        source, raw = reference, read_yaml(Path(reference))

    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level")
    try:
        return Mapping.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(source, err, raw)) from err


def utc_now() -> datetime:
    return datetime.now(timezone.utc)
