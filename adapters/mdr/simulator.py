"""An in-memory Kaspersky MDR API server for tests, the demo and `mdr-connector simulate mdr`.

It speaks the wire protocol of the real API, quirks included:

- every method is `POST /api/v1/{client_id}/{path}` with a JSON body, which
  is parsed whatever its Content-Type header;
- lists are bare JSON arrays, counts are `{"count": n}`, and times are Unix
  epoch milliseconds;
- paging is 1-based, and `incidents/history` pages each entity type separately;
- an expired access token gets HTTP 403.

Behaviour that no public source confirms is a field of `SimulatorSettings`,
so a test can switch it.

All state lives in `MdrSimulator`, whose methods form the control API that
tests call in-process. The same control API is served as JSON under
`/_sim/` for the demo and for manual use. The simulator clock is real time
plus an offset that `advance()` moves forward; token expiry and every
timestamp come from it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import copy
import functools
import hashlib
import hmac
import json
import logging
import random
import secrets
import signal
import string
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from dataclasses import fields as dataclass_fields
from typing import Any

import pypandoc
from aiohttp import web

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
CONTROL_PREFIX = "/_sim"

HOUR = 3600
DAY = 24 * HOUR

PRIORITIES = ("HIGH", "NORMAL", "LOW")
STATUSES = ("Open", "On hold", "Resolved", "Closed")
RESPONSE_DECISIONS = ("Confirmed", "Declined")
ASSET_STATUSES = ("OK", "WARNING", "CRITICAL", "OFFLINE", "ABSENT")
HISTORY_ENTITY_TYPES = ("incident_details", "incident_comment", "incident_attachment", "incident_response")

INCIDENT_FIELDS = (
    "incident_id",
    "incident_number",
    "summary",
    "description",
    "priority",
    "status",
    "resolution",
    "status_description",
    "affected_hosts",
    "affected_hosts_mappings",
    "host_based_iocs",
    "network_based_iocs",
    "iocs",
    "detection_technology",
    "attack_stage",
    "mitre_tactics",
    "mitre_techniques",
    "creation_time",
    "update_time",
    "client_description",
    "client_comment",
    "recommendations",
    "origin",
    "tenant_name",
    "was_read",
    "attachments",
    "comments",
    "responses",
)
COMMENT_FIELDS = ("author_name", "comment_id", "creation_time", "origin", "text", "was_read")
ATTACHMENT_FIELDS = (
    "attachment_id",
    "author_name",
    "caption",
    "creation_time",
    "file_size",
    "full_name",
    "link",
    "origin",
    "was_read",
)
RESPONSE_FIELDS = (
    "response_id",
    "type",
    "details",
    "parameters",
    "asset_id",
    "status",
    "comment",
    "description",
    "creation_time",
    "update_time",
    "was_read",
)
ASSET_FIELDS = (
    "asset_id",
    "domain",
    "first_seen",
    "host_name",
    "installed_product_info",
    "isolation",
    "isolation_task_id",
    "ksc_host_id",
    "last_seen",
    "network_interfaces",
    "os_version",
    "product_map",
    "protection_issues",
    "protection_issues_integral",
    "status",
    "status_reasons",
    "tenant_name",
)

INCIDENT_FILTER_KEYS = frozenset(
    {
        "affected_hosts",
        "asset_ids",
        "detection_technologies",
        "min_creation_time",
        "max_creation_time",
        "min_update_time",
        "max_update_time",
        "mitre_tactics",
        "mitre_techniques",
        "priorities",
        "resolutions",
        "response_statuses",
        "response_types",
        "search_phrase",
        "statuses",
        "tenants_names",
    }
)
ASSET_FILTER_KEYS = frozenset(
    {
        "domain",
        "host_names",
        "is_isolated",
        "min_first_seen",
        "max_first_seen",
        "min_last_seen",
        "max_last_seen",
        "network_interface",
        "os_version",
        "product",
        "related_incidents_ids",
        "search_phrase",
        "statuses",
        "tenants_names",
        "version",
    }
)
PAGING_KEYS = frozenset({"page", "page_size", "sort", "fields"})
INCIDENT_SORT_FIELDS = ("creation_time", "update_time", "incident_number")
# `computer_name_hostname` is the wire's sort key for the `host_name` field.
ASSET_SORT_FIELDS = {
    "first_seen": "first_seen",
    "last_seen": "last_seen",
    "computer_name_hostname": "host_name",
}

PUSH_ID_ALPHABET = "-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"
ES_ID_ALPHABET = string.ascii_letters + string.digits + "-_"


@dataclass
class SimulatorSettings:
    """Switches for the simulator; the INFERRED behaviours of the real API are fields here."""

    access_token_seconds: int = HOUR
    refresh_token_seconds: int = 7 * DAY
    console_token_seconds: int = DAY
    # INFERRED: only the console-issued token is documented as single-use.
    single_use_refresh_tokens: bool = True
    # INFERRED: whether a refresh ends the access tokens issued before it.
    revoke_access_on_refresh: bool = False
    # CONFIRMED from client behaviour: 403. Set 401 to test clients against that status.
    expired_access_status: int = 403
    # INFERRED: the status for an invalid, used or expired refresh token.
    rejected_refresh_status: int = 401
    # INFERRED from a tester's note about an Elasticsearch limit: page * page_size <= 10 000.
    result_window: int = 10_000
    # INFERRED: the page size used when a list request omits `page_size`.
    default_page_size: int = 100
    # INFERRED: the per-entity-type history page size when the request omits it.
    default_history_page_size: int = 100
    # INFERRED: the status of a new remediation response before a decision.
    response_initial_status: str = "New"
    # INFERRED: the upload size limit; larger files get 413.
    max_upload_bytes: int = 100 * 1024 * 1024
    latency_seconds: float = 0.0
    # An incident changed at T shows in incidents/list and incidents/count only
    # from T + this delay on, still with update_time T (late indexing).
    visibility_delay_seconds: float = 0.0


@dataclass(frozen=True)
class SimConnection:
    """One API token chain of a client: its connection name and optional tenant restriction."""

    client_id: str
    connection_name: str
    tenants: tuple[str, ...] | None = None

    def sees_tenant(self, tenant_name: str) -> bool:
        return self.tenants is None or tenant_name in self.tenants


@dataclass
class _TokenRecord:
    client_id: str
    connection_name: str
    expires_at: int
    console: bool = False
    used: bool = False
    revoked: bool = False


@dataclass
class _Incident:
    """An incident with its embedded objects, plus what incidents/list currently shows."""

    client_id: str
    record: dict[str, Any]
    comments: list[dict[str, Any]] = field(default_factory=list)
    attachments: list[dict[str, Any]] = field(default_factory=list)
    responses: list[dict[str, Any]] = field(default_factory=list)
    listed: dict[str, Any] | None = None
    pending: list[tuple[int, dict[str, Any]]] = field(default_factory=list)

    @property
    def incident_id(self) -> str:
        return self.record["incident_id"]

    def snapshot(self) -> dict[str, Any]:
        return copy.deepcopy(
            {
                **self.record,
                "comments": self.comments,
                "attachments": self.attachments,
                "responses": self.responses,
            }
        )


@dataclass
class _HistoryRecord:
    client_id: str
    incident_id: str
    entity_type: str
    changed_at: int
    changed_by: str
    operation: str
    entity: dict[str, Any]
    sequence: int

    def order(self) -> tuple[int, int]:
        """Time order; records of the same millisecond keep the order they were made in."""
        return self.changed_at, self.sequence

    def to_wire(self) -> dict[str, Any]:
        return {
            "changed_at": self.changed_at,
            "changed_by": self.changed_by,
            "operation": self.operation,
            "entity": {self.entity_type: copy.deepcopy(self.entity)},
        }


class SimError(Exception):
    """An error reply of the simulated API: `{"code": status, "message": message}`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --- JWT -----------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode_jwt(claims: dict[str, Any], key: bytes) -> str:
    """Sign `claims` as an HS256 JWT."""
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    payload = _b64url(json.dumps(claims, separators=(",", ":")).encode())
    signature = hmac.new(key, f"{header}.{payload}".encode("ascii"), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64url(signature)}"


def verify_jwt(token: str, key: bytes) -> dict[str, Any] | None:
    """Return the claims of an HS256 JWT signed with `key`, or None when it is not one."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    expected = hmac.new(key, f"{parts[0]}.{parts[1]}".encode("ascii", "replace"), hashlib.sha256).digest()
    try:
        valid = hmac.compare_digest(_b64url_decode(parts[2]), expected)
        claims = json.loads(_b64url_decode(parts[1])) if valid else None
    except (ValueError, UnicodeDecodeError):
        return None
    return claims if isinstance(claims, dict) else None


@functools.lru_cache(maxsize=2048)
def markdown_to_html(text: str) -> str:
    """Render GitHub-flavoured Markdown as HTML, as MDR does for `markdown_to_html: true`."""
    return pypandoc.convert_text(text, "html", format="gfm")


# --- request parameters ----------------------------------------------------


class Params:
    """Typed access to a request body that rejects unknown keys and wrong types with 400."""

    def __init__(self, body: dict[str, Any], allowed: Iterable[str]) -> None:
        unknown = sorted(set(body) - set(allowed))
        if unknown:
            raise SimError(400, f"unknown request fields: {', '.join(unknown)}")
        self.body = body

    def string(self, name: str, *, required: bool = False) -> str | None:
        value = self._get(name, required)
        if value is not None and not isinstance(value, str):
            raise SimError(400, f"{name} must be a string")
        return value

    def required_string(self, name: str) -> str:
        value = self.string(name, required=True)
        assert value is not None
        return value

    def integer(self, name: str, *, minimum: int | None = None) -> int | None:
        value = self._get(name, False)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise SimError(400, f"{name} must be an integer")
        if minimum is not None and value < minimum:
            raise SimError(400, f"{name} must be at least {minimum}")
        return value

    def boolean(self, name: str) -> bool:
        value = self._get(name, False)
        if value is not None and not isinstance(value, bool):
            raise SimError(400, f"{name} must be a boolean")
        return bool(value)

    def strings(self, name: str, *, choices: Iterable[str] | None = None) -> list[str]:
        value = self._get(name, False)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise SimError(400, f"{name} must be an array of strings")
        if choices is not None:
            invalid = sorted(set(value) - set(choices))
            if invalid:
                raise SimError(400, f"invalid {name}: {', '.join(invalid)}")
        return value

    def _get(self, name: str, required: bool) -> Any:
        value = self.body.get(name)
        if required and value in (None, ""):
            raise SimError(400, f"{name} is required")
        return value


def parse_sort(value: str | None, allowed: Iterable[str], default: str) -> tuple[str, bool]:
    """Split `"<field>:asc"` or `"<field>:desc"` into the field and whether it is descending."""
    spec = value or default
    name, _, direction = spec.partition(":")
    direction = direction or "asc"
    if name not in allowed or direction not in ("asc", "desc"):
        raise SimError(
            400, f"invalid sort {spec!r}: use <field>:asc or <field>:desc with one of {', '.join(allowed)}"
        )
    return name, direction == "desc"


def sort_key(record: dict[str, Any], name: str, tie_key: str) -> tuple[Any, ...]:
    value = record.get(name)
    # Records seeded with a wrong type sort first instead of breaking the sort.
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return (0, "", str(record.get(tie_key, "")))
    return (1, value, str(record.get(tie_key, "")))


def select_fields(record: dict[str, Any], names: list[str]) -> dict[str, Any]:
    if not names:
        return record
    return {name: record[name] for name in names if name in record}


def in_range(value: Any, minimum: int | None, maximum: int | None) -> bool:
    """Check `minimum <= value <= maximum`; both bounds are inclusive and optional."""
    if minimum is None and maximum is None:
        return True
    if isinstance(value, bool) or not isinstance(value, int):
        return False
    return (minimum is None or value >= minimum) and (maximum is None or value <= maximum)


# --- the simulator ---------------------------------------------------------


class MdrSimulator:
    """State and control API of the simulated MDR service."""

    def __init__(self, settings: SimulatorSettings | None = None, *, seed: int | None = None) -> None:
        self.settings = settings or SimulatorSettings()
        self.call_counts: Counter[str] = Counter()
        # Called with (method, request) before each API request is handled;
        # tests use it to observe what the client sends and when.
        self.request_hook: Callable[[str, web.Request], None] | None = None
        self._offset = 0.0
        self._key = secrets.token_bytes(32)
        self._random = random.Random(seed)
        self._connections: dict[tuple[str, str], SimConnection] = {}
        self._refresh_tokens: dict[str, _TokenRecord] = {}
        self._access_tokens: dict[str, _TokenRecord] = {}
        self._incidents: dict[str, _Incident] = {}
        self._assets: dict[str, dict[str, Any]] = {}
        self._asset_clients: dict[str, str] = {}
        self._blobs: dict[str, bytes] = {}
        self._history: list[_HistoryRecord] = []
        self._next_incident_number = 1_336_650

    # --- clock ---

    def now(self) -> float:
        """Simulator time in Unix seconds: real time plus the offset set by `advance`."""
        return time.time() + self._offset

    def now_ms(self) -> int:
        return int(self.now() * 1000)

    def advance(self, seconds: float) -> int:
        """Move the simulator clock forward and return the new time in milliseconds."""
        if seconds < 0:
            raise ValueError("the simulator clock only moves forward")
        self._offset += seconds
        return self.now_ms()

    # --- clients and tokens ---

    def create_client(
        self,
        client_id: str | None = None,
        *,
        connection_name: str = "mdr-connector",
        tenants: Iterable[str] | None = None,
    ) -> SimConnection:
        """Register an API connection of a client; incidents are shared by a client's connections."""
        connection = SimConnection(
            client_id=client_id or secrets.token_hex(17),
            connection_name=connection_name,
            tenants=tuple(tenants) if tenants is not None else None,
        )
        self._connections[(connection.client_id, connection_name)] = connection
        return connection

    def issue_console_token(self, client_id: str, connection_name: str | None = None) -> str:
        """Issue a refresh token as the MDR console does: valid 24 h (by default) and single-use."""
        connection = self._connection(client_id, connection_name)
        return self._issue_refresh(connection, self.settings.console_token_seconds, console=True)

    @property
    def confirm_calls(self) -> int:
        """Number of `session/confirm` requests received, rejected ones included."""
        return self.call_counts["session/confirm"]

    def reset_counts(self) -> None:
        self.call_counts.clear()

    def _connection(self, client_id: str, connection_name: str | None = None) -> SimConnection:
        if connection_name is not None:
            connection = self._connections.get((client_id, connection_name))
            if connection is None:
                raise KeyError(f"no connection {connection_name!r} for client {client_id!r}")
            return connection

        matches = [c for (cid, _), c in self._connections.items() if cid == client_id]
        if not matches:
            raise KeyError(f"no client {client_id!r}; call create_client first")
        return matches[0]

    def _issue_refresh(self, connection: SimConnection, lifetime: int, *, console: bool) -> str:
        token_id = uuid.uuid4().hex
        expires_at = int(self.now()) + lifetime
        self._refresh_tokens[token_id] = _TokenRecord(
            connection.client_id, connection.connection_name, expires_at, console=console
        )
        return self._sign(connection, "refresh", token_id, expires_at)

    def _issue_access(self, connection: SimConnection) -> str:
        token_id = uuid.uuid4().hex
        expires_at = int(self.now()) + self.settings.access_token_seconds
        self._access_tokens[token_id] = _TokenRecord(
            connection.client_id, connection.connection_name, expires_at
        )
        return self._sign(connection, "access", token_id, expires_at)

    def _sign(self, connection: SimConnection, kind: str, token_id: str, expires_at: int) -> str:
        claims = {
            "sub": connection.client_id,
            "conn": connection.connection_name,
            "typ": kind,
            "jti": token_id,
            "iat": int(self.now()),
            "exp": expires_at,
        }
        return encode_jwt(claims, self._key)

    def _token_record(self, token: str, kind: str) -> _TokenRecord | None:
        claims = verify_jwt(token, self._key)
        if claims is None or claims.get("typ") != kind:
            return None
        records = self._refresh_tokens if kind == "refresh" else self._access_tokens
        return records.get(str(claims.get("jti")))

    def confirm_session(self, client_id: str, refresh_token: str) -> dict[str, str]:
        """Exchange a refresh token for a new access and refresh token (the `session/confirm` logic)."""
        record = self._token_record(refresh_token, "refresh")
        rejected = (
            record is None or record.client_id != client_id or record.used or self.now() >= record.expires_at
        )
        # NOTE: the status for a rejected refresh token is INFERRED (setting).
        if rejected:
            raise SimError(
                self.settings.rejected_refresh_status, "the refresh token is invalid, expired or already used"
            )

        assert record is not None
        if record.console or self.settings.single_use_refresh_tokens:
            record.used = True
        if self.settings.revoke_access_on_refresh:
            self._revoke_access(record.client_id, record.connection_name)

        connection = self._connection(record.client_id, record.connection_name)
        return {
            "access_token": self._issue_access(connection),
            "refresh_token": self._issue_refresh(
                connection, self.settings.refresh_token_seconds, console=False
            ),
        }

    def authenticate(self, client_id: str, authorization: str | None) -> SimConnection:
        """Return the connection of a valid `Bearer` access token for `client_id`, or raise SimError."""
        status = self.settings.expired_access_status
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise SimError(status, "missing bearer access token")

        record = self._token_record(token.strip(), "access")
        if record is None or record.revoked or self.now() >= record.expires_at:
            raise SimError(status, "the access token is invalid or expired")
        if record.client_id != client_id:
            raise SimError(403, "the access token belongs to another client")
        return self._connection(record.client_id, record.connection_name)

    def _revoke_access(self, client_id: str, connection_name: str) -> None:
        for record in self._access_tokens.values():
            if record.client_id == client_id and record.connection_name == connection_name:
                record.revoked = True

    # --- seeding and SOC-side changes ---

    def seed_incident(
        self, client_id: str, *, author: str = "Kaspersky MDR SOC", **fields: Any
    ) -> dict[str, Any]:
        """Create an incident as the SOC would; `fields` override the realistic defaults.

        Any key is accepted and stored as given, so tests can seed malformed records.
        """
        self._connection(client_id)
        now = self.now_ms()
        record = self._default_incident(client_id, now)
        record.update(fields)
        if "update_time" not in fields:
            record["update_time"] = record.get("creation_time")

        incident = _Incident(client_id, record)
        self._incidents[incident.incident_id] = incident
        self._ensure_assets(client_id, record)
        self._changed(
            incident,
            author,
            "create",
            "incident_details",
            incident.snapshot(),
            changed_at=record["update_time"],
        )
        return copy.deepcopy(incident.snapshot())

    def update_incident(
        self, client_id: str, incident_id: str, *, author: str = "Kaspersky MDR SOC", **fields: Any
    ) -> dict[str, Any]:
        """Change incident fields as the SOC would; `update_time` moves to now unless given."""
        incident = self._incident(client_id, incident_id)
        incident.record.update(fields)
        if "update_time" not in fields:
            incident.record["update_time"] = self.now_ms()
        self._changed(incident, author, "update", "incident_details", incident.snapshot())
        return copy.deepcopy(incident.snapshot())

    def add_soc_comment(
        self, client_id: str, incident_id: str, text: str, *, author: str = "Kaspersky MDR SOC"
    ) -> dict[str, Any]:
        """Add an analyst comment (HTML text, origin `Service`) and move the incident's `update_time`."""
        incident = self._incident(client_id, incident_id)
        return self._add_comment(incident, text, author=author, origin="Service")

    def add_response(self, client_id: str, incident_id: str, **fields: Any) -> dict[str, Any]:
        """Propose a remediation response on an incident, in the initial status unless given."""
        incident = self._incident(client_id, incident_id)
        now = self.now_ms()
        asset_id = self._first_asset_id(incident.record)
        response = {
            "response_id": f"MDR_{uuid.UUID(int=self._random.getrandbits(128), version=4)}",
            "type": "RUN_SCRIPT",
            "details": {"file_path": "", "file_size_limit": 0},
            "parameters": {
                "interpreter": "powershell",
                "workingDirectory": "C:\\Windows",
                "interpreterParameters": None,
            },
            "asset_id": asset_id,
            "status": self.settings.response_initial_status,
            "comment": "",
            "description": "Collect the autorun entries of the host for analysis.",
            "creation_time": now,
            "update_time": now,
            "was_read": False,
        }
        response.update(fields)
        incident.responses.append(response)
        incident.record["update_time"] = now
        self._changed(incident, "Kaspersky MDR SOC", "create", "incident_response", response)
        self._changed(incident, "Kaspersky MDR SOC", "update", "incident_details", incident.snapshot())
        return copy.deepcopy(response)

    def add_attachment(
        self,
        client_id: str,
        incident_id: str,
        full_name: str,
        content: bytes,
        *,
        caption: str = "",
        author: str = "Kaspersky MDR SOC",
        origin: str = "Service",
    ) -> dict[str, Any]:
        """Attach a file to an incident and move the incident's `update_time`."""
        incident = self._incident(client_id, incident_id)
        now = self.now_ms()
        attachment = {
            "attachment_id": self._es_id(),
            "author_name": author,
            "caption": caption,
            "creation_time": now,
            "file_size": len(content),
            "full_name": full_name,
            "origin": origin,
            "was_read": False,
        }
        self._blobs[attachment["attachment_id"]] = content
        incident.attachments.append(attachment)
        incident.record["update_time"] = now
        self._changed(incident, author, "create", "incident_attachment", attachment)
        self._changed(incident, author, "update", "incident_details", incident.snapshot())
        return copy.deepcopy(attachment)

    def add_asset(self, client_id: str, host_name: str, **fields: Any) -> dict[str, Any]:
        """Register an asset of a client; `fields` override the defaults."""
        self._connection(client_id)
        now = self.now_ms()
        asset = {
            "asset_id": "0x" + "%032x" % self._random.getrandbits(128),
            "host_name": host_name,
            "domain": "corp.example",
            "first_seen": now - 90 * DAY * 1000,
            "last_seen": now,
            "installed_product_info": "Kaspersky Endpoint Security for Windows 12.6",
            "isolation": False,
            "isolation_task_id": "",
            "ksc_host_id": str(uuid.UUID(int=self._random.getrandbits(128), version=4)),
            "network_interfaces": [self._network_interface()],
            "os_version": "Windows 10 Enterprise 22H2",
            # NOTE: the type of product_map is not known; a name-to-version map is a guess.
            "product_map": {"KES": "12.6.0.438"},
            "protection_issues": [],
            "protection_issues_integral": "OK",
            "status": "OK",
            "status_reasons": [],
            "tenant_name": "",
        }
        asset.update(fields)
        self._assets[asset["asset_id"]] = asset
        self._asset_clients[asset["asset_id"]] = client_id
        return copy.deepcopy(asset)

    # --- inspection ---

    def incidents(self, client_id: str) -> list[dict[str, Any]]:
        """Return every incident of a client in its current state, oldest first."""
        found = [i.snapshot() for i in self._incidents.values() if i.client_id == client_id]
        return sorted(found, key=lambda record: sort_key(record, "creation_time", "incident_id"))

    def incident(self, client_id: str, incident_id: str) -> dict[str, Any]:
        return self._incident(client_id, incident_id).snapshot()

    def comments(self, client_id: str, incident_id: str) -> list[dict[str, Any]]:
        """Return the comments of an incident, each with `author_name` and `origin`."""
        return copy.deepcopy(self._incident(client_id, incident_id).comments)

    def history(self, client_id: str) -> list[dict[str, Any]]:
        return [r.to_wire() for r in self._history if r.client_id == client_id]

    def state(self) -> dict[str, Any]:
        """Summarize the state as JSON-ready data: clients, incident counts, call counts and the clock."""
        return {
            "now_ms": self.now_ms(),
            "clients": [asdict(c) for c in self._connections.values()],
            "incident_counts": dict(Counter(i.client_id for i in self._incidents.values())),
            "call_counts": dict(self.call_counts),
            "confirm_calls": self.confirm_calls,
        }

    def update_settings(self, **changes: Any) -> SimulatorSettings:
        known = {f.name for f in dataclass_fields(SimulatorSettings)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise KeyError(f"unknown simulator settings: {', '.join(unknown)}")
        for name, value in changes.items():
            setattr(self.settings, name, value)
        return self.settings

    # --- internals shared by the control API and the wire API ---

    def _default_incident(self, client_id: str, now: int) -> dict[str, Any]:
        number = self._next_incident_number
        self._next_incident_number += 1
        host = f"WS-FIN-{self._random.randint(1, 99):03d}"
        asset_id = "0x" + "%032x" % self._random.getrandbits(128)
        return {
            "incident_id": self._push_id(now),
            "incident_number": number,
            "summary": f"Suspicious PowerShell activity on {host}",
            "description": f"An encoded PowerShell command started from a macro on **{host}**.",
            "priority": "NORMAL",
            "status": "Open",
            "resolution": "",
            "status_description": "",
            "affected_hosts": [f"{host}:{asset_id}"],
            "affected_hosts_mappings": [{"host_id": asset_id, "host_name": host}],
            "host_based_iocs": [],
            "network_based_iocs": [],
            "iocs": [],
            "detection_technology": "EDR",
            "attack_stage": "Execution",
            "mitre_tactics": ["Execution"],
            "mitre_techniques": ["T1059.001: PowerShell"],
            "creation_time": now,
            "update_time": now,
            "client_description": "",
            "client_comment": "",
            "recommendations": "",
            "origin": "Service",
            "tenant_name": "",
            "was_read": False,
        }

    def _ensure_assets(self, client_id: str, record: dict[str, Any]) -> None:
        hosts = record.get("affected_hosts")
        if not isinstance(hosts, list):
            return
        for entry in hosts:
            if not isinstance(entry, str) or ":" not in entry:
                continue
            host_name, asset_id = entry.split(":", 1)
            if asset_id not in self._assets:
                tenant = record.get("tenant_name") if isinstance(record.get("tenant_name"), str) else ""
                self.add_asset(client_id, host_name, asset_id=asset_id, tenant_name=tenant)

    @staticmethod
    def _first_asset_id(record: dict[str, Any]) -> str:
        hosts = record.get("affected_hosts") or []
        if hosts and isinstance(hosts[0], str) and ":" in hosts[0]:
            return hosts[0].split(":", 1)[1]
        return ""

    def _incident(self, client_id: str, incident_id: str) -> _Incident:
        incident = self._incidents.get(incident_id)
        if incident is None or incident.client_id != client_id:
            raise KeyError(f"no incident {incident_id!r} for client {client_id!r}")
        return incident

    def _add_comment(self, incident: _Incident, text: str, *, author: str, origin: str) -> dict[str, Any]:
        now = self.now_ms()
        comment = {
            "comment_id": self._es_id(),
            "author_name": author,
            "text": text,
            "creation_time": now,
            "origin": origin,
            "was_read": False,
        }
        incident.comments.append(comment)
        incident.record["update_time"] = now
        # A new comment shows in history as two records: the comment and an
        # incident update whose only change is update_time.
        self._changed(incident, author, "create", "incident_comment", comment)
        self._changed(incident, author, "update", "incident_details", incident.snapshot())
        return copy.deepcopy(comment)

    def _changed(
        self,
        incident: _Incident,
        author: str,
        operation: str,
        entity_type: str,
        entity: dict[str, Any],
        *,
        changed_at: int | None = None,
    ) -> None:
        """Record a change in history and queue the new state for incidents/list."""
        now = self.now_ms()
        when = changed_at if isinstance(changed_at, int) else now
        self._history.append(
            _HistoryRecord(
                incident.client_id,
                incident.incident_id,
                entity_type,
                when,
                author,
                operation,
                copy.deepcopy(entity),
                sequence=len(self._history),
            )
        )
        if entity_type == "incident_details":
            visible_at = now + int(self.settings.visibility_delay_seconds * 1000)
            incident.pending.append((visible_at, incident.snapshot()))

    def _listed_incidents(self, connection: SimConnection) -> list[dict[str, Any]]:
        """Return the incident states that incidents/list and incidents/count show now."""
        now = self.now_ms()
        visible = []
        for incident in self._incidents.values():
            if incident.client_id != connection.client_id:
                continue
            self._index(incident, now)
            listed = incident.listed
            if listed is not None and connection.sees_tenant(str(listed.get("tenant_name", ""))):
                visible.append(listed)
        return visible

    @staticmethod
    def _index(incident: _Incident, now: int) -> None:
        """Show the newest state whose visibility time has come; older pending states are dropped."""
        ready = [i for i, (visible_at, _) in enumerate(incident.pending) if visible_at <= now]
        if not ready:
            return
        last = ready[-1]
        incident.listed = incident.pending[last][1]
        del incident.pending[: last + 1]

    def _visible_incident(self, connection: SimConnection, incident_id: str) -> _Incident:
        incident = self._incidents.get(incident_id)
        if incident is None or incident.client_id != connection.client_id:
            raise SimError(404, f"incident {incident_id} not found")
        if not connection.sees_tenant(str(incident.record.get("tenant_name", ""))):
            raise SimError(404, f"incident {incident_id} not found")
        return incident

    def _push_id(self, now_ms: int) -> str:
        """Make a 20-character id in the Firebase push-id style: 8 time characters, 12 random ones."""
        time_part = []
        value = now_ms
        for _ in range(8):
            time_part.append(PUSH_ID_ALPHABET[value % 64])
            value //= 64
        random_part = "".join(self._random.choice(PUSH_ID_ALPHABET) for _ in range(12))
        return "".join(reversed(time_part)) + random_part

    def _es_id(self) -> str:
        return "".join(self._random.choice(ES_ID_ALPHABET) for _ in range(20))

    def _network_interface(self) -> dict[str, str]:
        octet = self._random.randint(10, 250)
        mac = ":".join(f"{self._random.randint(0, 255):02X}" for _ in range(6))
        return {
            "defg": "10.20.0.1",
            "dnsd": "corp.example",
            "dsc": "Intel(R) Ethernet Connection I219-LM",
            "ip": f"10.20.0.{octet}",
            "ipcm": f"10.20.0.{octet}/24",
            "mac": mac,
        }

    def seed_demo_incidents(self, client_id: str, count: int = 12) -> list[dict[str, Any]]:
        """Seed `count` realistic incidents in Russian and English, with SOC comments and responses."""
        return _seed_demo_incidents(self, client_id, count)


# --- wire API: one function per method ---------------------------------------

ApiMethod = Callable[[MdrSimulator, SimConnection, dict[str, Any], web.Request], Awaitable[Any]]


async def api_incidents_count(
    sim: MdrSimulator, connection: SimConnection, body: dict[str, Any], request: web.Request
) -> Any:
    params = Params(body, INCIDENT_FILTER_KEYS)
    records = [r for r in sim._listed_incidents(connection) if incident_matches(r, params)]
    return {"count": len(records)}


async def api_incidents_list(
    sim: MdrSimulator, connection: SimConnection, body: dict[str, Any], request: web.Request
) -> Any:
    params = Params(body, INCIDENT_FILTER_KEYS | PAGING_KEYS | {"markdown_to_html"})
    wanted = params.strings("fields", choices=INCIDENT_FIELDS)
    as_html = params.boolean("markdown_to_html")
    name, descending = parse_sort(params.string("sort"), INCIDENT_SORT_FIELDS, "creation_time:asc")
    start, end = page_bounds(sim, params)

    records = [r for r in sim._listed_incidents(connection) if incident_matches(r, params)]
    records.sort(key=lambda r: sort_key(r, name, "incident_id"), reverse=descending)
    page = records[start:end]
    return [await render_incident(record, wanted, as_html) for record in page]


async def api_incidents_details(
    sim: MdrSimulator, connection: SimConnection, body: dict[str, Any], request: web.Request
) -> Any:
    params = Params(body, {"incident_id", "fields", "markdown_to_html"})
    incident = sim._visible_incident(connection, params.required_string("incident_id"))
    wanted = params.strings("fields", choices=INCIDENT_FIELDS)
    return await render_incident(incident.snapshot(), wanted, params.boolean("markdown_to_html"))


async def api_incidents_history(
    sim: MdrSimulator, connection: SimConnection, body: dict[str, Any], request: web.Request
) -> Any:
    params = Params(
        body,
        {"incident_id", "min_record_time", "max_record_time", "ignore_self", "page", "entity_type_page_size"},
    )
    incident_id = params.string("incident_id")
    if incident_id:
        sim._visible_incident(connection, incident_id)
    minimum = params.integer("min_record_time")
    maximum = params.integer("max_record_time")
    page = params.integer("page", minimum=1) or 1
    page_size = params.integer("entity_type_page_size", minimum=1) or sim.settings.default_history_page_size
    # NOTE: hiding the caller's own changes under ignore_self is INFERRED.
    ignore_self = params.boolean("ignore_self")

    def wanted(record: _HistoryRecord) -> bool:
        incident = sim._incidents.get(record.incident_id)
        return (
            record.client_id == connection.client_id
            and (not incident_id or record.incident_id == incident_id)
            and incident is not None
            and connection.sees_tenant(str(incident.record.get("tenant_name", "")))
            and in_range(record.changed_at, minimum, maximum)
            and not (ignore_self and record.changed_by == connection.connection_name)
        )

    # Paging runs per entity type (one search index each on the real
    # service), so a page holds up to page_size records of every type.
    result: list[_HistoryRecord] = []
    for entity_type in HISTORY_ENTITY_TYPES:
        of_type = sorted(
            (r for r in sim._history if r.entity_type == entity_type and wanted(r)),
            key=_HistoryRecord.order,
        )
        result.extend(of_type[(page - 1) * page_size : page * page_size])
    result.sort(key=_HistoryRecord.order)
    return [record.to_wire() for record in result]


async def api_comments_list(
    sim: MdrSimulator, connection: SimConnection, body: dict[str, Any], request: web.Request
) -> Any:
    params = Params(body, {"incident_id", "fields", "markdown_to_html"})
    incident = sim._visible_incident(connection, params.required_string("incident_id"))
    wanted = params.strings("fields", choices=COMMENT_FIELDS)
    params.boolean("markdown_to_html")
    return [select_fields(copy.deepcopy(c), wanted) for c in incident.comments]


async def api_comments_create(
    sim: MdrSimulator, connection: SimConnection, body: dict[str, Any], request: web.Request
) -> Any:
    params = Params(body, {"incident_id", "text", "markdown_to_html"})
    incident = sim._visible_incident(connection, params.required_string("incident_id"))
    text = params.required_string("text")
    # NOTE: the simulator converts Markdown once, at creation; whether the
    # real service stores Markdown and converts on read is not known.
    if params.boolean("markdown_to_html"):
        text = await asyncio.to_thread(markdown_to_html, text)
    return sim._add_comment(incident, text, author=connection.connection_name, origin="Client")


async def api_comments_delete(
    sim: MdrSimulator, connection: SimConnection, body: dict[str, Any], request: web.Request
) -> Any:
    params = Params(body, {"comment_id"})
    comment_id = params.required_string("comment_id")
    for incident in sim._incidents.values():
        if incident.client_id != connection.client_id:
            continue
        for comment in incident.comments:
            if comment["comment_id"] != comment_id:
                continue
            # NOTE: that only the author may delete a comment, and the 403 for
            # anyone else, are INFERRED.
            if comment["author_name"] != connection.connection_name or comment["origin"] != "Client":
                raise SimError(403, "only the connection that wrote a comment can delete it")
            incident.comments.remove(comment)
            incident.record["update_time"] = sim.now_ms()
            sim._changed(incident, connection.connection_name, "delete", "incident_comment", comment)
            sim._changed(
                incident, connection.connection_name, "update", "incident_details", incident.snapshot()
            )
            # NOTE: the reply body of comments/delete is not known; `{}` is a guess.
            return {}
    raise SimError(404, f"comment {comment_id} not found")


async def api_attachments_list(
    sim: MdrSimulator, connection: SimConnection, body: dict[str, Any], request: web.Request
) -> Any:
    params = Params(body, {"incident_id", "fields", "markdown_to_html"})
    incident = sim._visible_incident(connection, params.required_string("incident_id"))
    wanted = params.strings("fields", choices=ATTACHMENT_FIELDS)
    params.boolean("markdown_to_html")
    return [
        select_fields(attachment_view(a, request, connection.client_id), wanted) for a in incident.attachments
    ]


async def api_attachments_download(
    sim: MdrSimulator, connection: SimConnection, body: dict[str, Any], request: web.Request
) -> Any:
    params = Params(body, {"attachment_id"})
    attachment_id = params.required_string("attachment_id")
    for incident in sim._incidents.values():
        if incident.client_id != connection.client_id or not connection.sees_tenant(
            str(incident.record.get("tenant_name", ""))
        ):
            continue
        for attachment in incident.attachments:
            if attachment["attachment_id"] == attachment_id:
                return web.Response(
                    body=sim._blobs[attachment_id],
                    content_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{attachment["full_name"]}"'},
                )
    raise SimError(404, f"attachment {attachment_id} not found")


async def api_attachments_upload(
    sim: MdrSimulator, connection: SimConnection, body: dict[str, Any], request: web.Request
) -> Any:
    meta, file_name, content = await read_upload(request, sim.settings.max_upload_bytes)
    params = Params(meta, {"incident_id", "caption"})
    incident = sim._visible_incident(connection, params.required_string("incident_id"))
    attachment = sim.add_attachment(
        connection.client_id,
        incident.incident_id,
        file_name,
        content,
        caption=params.string("caption") or "",
        author=connection.connection_name,
        origin="Client",
    )
    # NOTE: the reply shape of attachments/upload is INFERRED: the new attachment.
    return attachment_view(attachment, request, connection.client_id)


async def api_responses_list(
    sim: MdrSimulator, connection: SimConnection, body: dict[str, Any], request: web.Request
) -> Any:
    params = Params(body, {"incident_id", "fields", "page", "page_size"})
    incident = sim._visible_incident(connection, params.required_string("incident_id"))
    wanted = params.strings("fields", choices=RESPONSE_FIELDS)
    start, end = page_bounds(sim, params)
    return [select_fields(copy.deepcopy(r), wanted) for r in incident.responses[start:end]]


async def api_response_update(
    sim: MdrSimulator, connection: SimConnection, body: dict[str, Any], request: web.Request
) -> Any:
    params = Params(body, {"response_id", "status", "comment"})
    response_id = params.required_string("response_id")
    status, comment = decision(params)
    return decide_response(sim, connection, response_id, status, comment)


async def api_responses_update(
    sim: MdrSimulator, connection: SimConnection, body: dict[str, Any], request: web.Request
) -> Any:
    params = Params(body, {"responses_ids", "status", "comment"})
    response_ids = params.strings("responses_ids")
    if not response_ids:
        raise SimError(400, "responses_ids is required")
    status, comment = decision(params)
    # NOTE: the reply of responses/update is INFERRED: the updated responses.
    return [decide_response(sim, connection, response_id, status, comment) for response_id in response_ids]


async def api_assets_count(
    sim: MdrSimulator, connection: SimConnection, body: dict[str, Any], request: web.Request
) -> Any:
    params = Params(body, ASSET_FILTER_KEYS)
    return {"count": len(matching_assets(sim, connection, params))}


async def api_assets_list(
    sim: MdrSimulator, connection: SimConnection, body: dict[str, Any], request: web.Request
) -> Any:
    params = Params(body, ASSET_FILTER_KEYS | PAGING_KEYS)
    wanted = params.strings("fields", choices=ASSET_FIELDS)
    name, descending = parse_sort(params.string("sort"), ASSET_SORT_FIELDS, "first_seen:asc")
    start, end = page_bounds(sim, params)
    version = params.integer("version") or 1

    assets = matching_assets(sim, connection, params)
    assets.sort(key=lambda a: sort_key(a, ASSET_SORT_FIELDS[name], "asset_id"), reverse=descending)
    return [select_fields(asset_view(a, version), wanted) for a in assets[start:end]]


async def api_assets_details(
    sim: MdrSimulator, connection: SimConnection, body: dict[str, Any], request: web.Request
) -> Any:
    params = Params(body, {"asset_id", "fields", "version"})
    asset_id = params.required_string("asset_id")
    wanted = params.strings("fields", choices=ASSET_FIELDS)
    asset = sim._assets.get(asset_id)
    visible = (
        asset is not None
        and sim._asset_clients.get(asset_id) == connection.client_id
        and connection.sees_tenant(str(asset.get("tenant_name", "")))
    )
    if not visible:
        raise SimError(404, f"asset {asset_id} not found")
    assert asset is not None
    return select_fields(asset_view(asset, params.integer("version") or 1), wanted)


API_METHODS: dict[str, ApiMethod] = {
    "incidents/count": api_incidents_count,
    "incidents/list": api_incidents_list,
    "incidents/details": api_incidents_details,
    "incidents/history": api_incidents_history,
    "comments/list": api_comments_list,
    "comments/create": api_comments_create,
    "comments/delete": api_comments_delete,
    "attachments/list": api_attachments_list,
    "attachments/download": api_attachments_download,
    "attachments/upload": api_attachments_upload,
    "responses/list": api_responses_list,
    "response/update": api_response_update,
    "responses/update": api_responses_update,
    "assets/count": api_assets_count,
    "assets/list": api_assets_list,
    "assets/details": api_assets_details,
}


# --- wire API helpers -------------------------------------------------------


def page_bounds(sim: MdrSimulator, params: Params) -> tuple[int, int]:
    """Slice bounds of a 1-based page, rejecting pages past the result window with 400."""
    page = params.integer("page", minimum=1) or 1
    page_size = params.integer("page_size", minimum=1) or sim.settings.default_page_size
    if page * page_size > sim.settings.result_window:
        raise SimError(
            400,
            f"page * page_size must not exceed the result window of {sim.settings.result_window}; "
            "narrow the filter instead of paging deeper",
        )
    return (page - 1) * page_size, page * page_size


def incident_matches(record: dict[str, Any], params: Params) -> bool:
    """Apply the documented incidents/list and incidents/count filters to one record."""

    def any_of(name: str, values: list[str]) -> bool:
        return not values or bool(set(values) & set(_as_list(record.get(name))))

    def one_of(name: str, values: list[str]) -> bool:
        return not values or record.get(name) in values

    asset_ids = params.strings("asset_ids")
    host_assets = [
        entry.split(":", 1)[-1] for entry in _as_list(record.get("affected_hosts")) if isinstance(entry, str)
    ]
    phrase = (params.string("search_phrase") or "").lower()
    responses = _as_list(record.get("responses"))
    response_statuses = params.strings("response_statuses")
    response_types = params.strings("response_types")

    return all(
        (
            in_range(
                record.get("creation_time"),
                params.integer("min_creation_time"),
                params.integer("max_creation_time"),
            ),
            in_range(
                record.get("update_time"),
                params.integer("min_update_time"),
                params.integer("max_update_time"),
            ),
            one_of("status", params.strings("statuses")),
            one_of("priority", params.strings("priorities")),
            one_of("resolution", params.strings("resolutions")),
            one_of("tenant_name", params.strings("tenants_names")),
            one_of("detection_technology", params.strings("detection_technologies")),
            any_of("affected_hosts", params.strings("affected_hosts")),
            any_of("mitre_tactics", params.strings("mitre_tactics")),
            any_of("mitre_techniques", params.strings("mitre_techniques")),
            not asset_ids or bool(set(asset_ids) & set(host_assets)),
            not response_statuses
            or any(r.get("status") in response_statuses for r in responses if isinstance(r, dict)),
            not response_types
            or any(r.get("type") in response_types for r in responses if isinstance(r, dict)),
            not phrase
            or phrase
            in " ".join(
                str(record.get(key, "")) for key in ("incident_number", "summary", "description")
            ).lower(),
        )
    )


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


async def render_incident(record: dict[str, Any], wanted: list[str], as_html: bool) -> dict[str, Any]:
    rendered = copy.deepcopy(record)
    if as_html and isinstance(rendered.get("description"), str):
        rendered["description"] = await asyncio.to_thread(markdown_to_html, rendered["description"])
    return select_fields(rendered, wanted)


def attachment_view(attachment: dict[str, Any], request: web.Request, client_id: str) -> dict[str, Any]:
    # NOTE: what `link` points to on the real service is not known; here it
    # names this simulator's download method, never a remote host.
    view = copy.deepcopy(attachment)
    view["link"] = (
        f"{request.url.origin()}{API_PREFIX}/{client_id}/attachments/download?attachment_id={attachment['attachment_id']}"
    )
    return view


def asset_view(asset: dict[str, Any], version: int) -> dict[str, Any]:
    # NOTE: that version 2 swaps status_reasons for protection_issues is INFERRED.
    view = copy.deepcopy(asset)
    if version == 2:
        view.pop("status_reasons", None)
    else:
        view.pop("protection_issues", None)
        view.pop("protection_issues_integral", None)
    return view


def matching_assets(sim: MdrSimulator, connection: SimConnection, params: Params) -> list[dict[str, Any]]:
    version = params.integer("version")
    if version not in (None, 1, 2):
        raise SimError(400, "version must be 1 or 2")
    statuses = params.strings("statuses", choices=ASSET_STATUSES)
    host_names = params.strings("host_names")
    tenants = params.strings("tenants_names")
    related = set(params.strings("related_incidents_ids"))
    related_assets = {
        entry.split(":", 1)[-1]
        for incident_id in related
        if incident_id in sim._incidents
        for entry in _as_list(sim._incidents[incident_id].record.get("affected_hosts"))
        if isinstance(entry, str)
    }
    texts = {
        key: (params.string(key) or "").lower()
        for key in ("domain", "os_version", "network_interface", "search_phrase")
    }
    product = params.string("product")
    isolated = params.body.get("is_isolated")

    def matches(asset: dict[str, Any]) -> bool:
        interfaces = json.dumps(asset.get("network_interfaces", [])).lower()
        return all(
            (
                sim._asset_clients.get(asset["asset_id"]) == connection.client_id,
                connection.sees_tenant(str(asset.get("tenant_name", ""))),
                not statuses or asset.get("status") in statuses,
                not host_names or asset.get("host_name") in host_names,
                not tenants or asset.get("tenant_name") in tenants,
                not related or asset["asset_id"] in related_assets,
                isolated is None or asset.get("isolation") is bool(isolated),
                not product or product in (asset.get("product_map") or {}),
                in_range(
                    asset.get("first_seen"),
                    params.integer("min_first_seen"),
                    params.integer("max_first_seen"),
                ),
                in_range(
                    asset.get("last_seen"), params.integer("min_last_seen"), params.integer("max_last_seen")
                ),
                not texts["domain"] or texts["domain"] in str(asset.get("domain", "")).lower(),
                not texts["os_version"] or texts["os_version"] in str(asset.get("os_version", "")).lower(),
                not texts["network_interface"] or texts["network_interface"] in interfaces,
                not texts["search_phrase"]
                or texts["search_phrase"] in f"{asset.get('host_name')} {asset.get('domain')}".lower(),
            )
        )

    return [copy.deepcopy(a) for a in sim._assets.values() if matches(a)]


def decision(params: Params) -> tuple[str, str]:
    status = params.required_string("status")
    if status not in RESPONSE_DECISIONS:
        raise SimError(400, f"status must be one of {', '.join(RESPONSE_DECISIONS)}")
    return status, params.string("comment") or ""


def decide_response(
    sim: MdrSimulator, connection: SimConnection, response_id: str, status: str, comment: str
) -> dict[str, Any]:
    """Confirm or decline one response; only a response in the initial status can change (INFERRED)."""
    for incident in sim._incidents.values():
        if incident.client_id != connection.client_id or not connection.sees_tenant(
            str(incident.record.get("tenant_name", ""))
        ):
            continue
        for response in incident.responses:
            if response["response_id"] != response_id:
                continue
            if response["status"] != sim.settings.response_initial_status:
                raise SimError(
                    400,
                    f"response {response_id} is already {response['status']}; only a response in "
                    f"status {sim.settings.response_initial_status} can be confirmed or declined",
                )
            now = sim.now_ms()
            response.update(status=status, comment=comment, update_time=now)
            incident.record["update_time"] = now
            sim._changed(incident, connection.connection_name, "update", "incident_response", response)
            sim._changed(
                incident, connection.connection_name, "update", "incident_details", incident.snapshot()
            )
            return copy.deepcopy(response)
    raise SimError(404, f"response {response_id} not found")


async def read_upload(request: web.Request, max_bytes: int) -> tuple[dict[str, Any], str, bytes]:
    """Read the `file` and `meta` (a JSON string) parts of an attachments/upload request."""
    if not request.content_type.startswith("multipart/"):
        raise SimError(400, "attachments/upload takes multipart/form-data with the parts file and meta")

    reader = await request.multipart()
    meta: dict[str, Any] | None = None
    file_name, content = "", b""
    while (part := await reader.next()) is not None:
        if part.name == "meta":
            meta = parse_json_object(await part.read(decode=True))
        elif part.name == "file":
            file_name = part.filename or "attachment.bin"
            content = await read_limited(part, max_bytes)

    if meta is None or not file_name:
        raise SimError(400, "attachments/upload needs both a file part and a meta part")
    return meta, file_name, content


async def read_limited(part: Any, max_bytes: int) -> bytes:
    chunks, size = [], 0
    while chunk := await part.read_chunk():
        size += len(chunk)
        if size > max_bytes:
            raise SimError(413, f"the file is larger than the upload limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json_object(data: bytes) -> dict[str, Any]:
    if not data.strip():
        return {}
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise SimError(400, "the request body is not valid JSON") from err
    if not isinstance(body, dict):
        raise SimError(400, "the request body must be a JSON object")
    return body


# --- HTTP app ------------------------------------------------------------------


def error_response(status: int, message: str) -> web.Response:
    return web.json_response({"code": status, "message": message}, status=status)


SIM_KEY = web.AppKey("mdr_simulator", MdrSimulator)


@web.middleware
async def wire_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Count API calls and add the configured latency.

    Fault injection (429, 5xx, dropped connections) belongs here, before the
    handler runs or after it has produced its reply.
    """
    sim = request.app[SIM_KEY]
    if request.path.startswith(API_PREFIX + "/"):
        method = request.match_info.get("method", request.path)
        sim.call_counts[method] += 1
        if sim.request_hook is not None:
            sim.request_hook(method, request)
        if sim.settings.latency_seconds > 0:
            await asyncio.sleep(sim.settings.latency_seconds)
    return await handler(request)


async def handle_api(request: web.Request) -> web.StreamResponse:
    sim = request.app[SIM_KEY]
    client_id = request.match_info["client_id"]
    method = request.match_info["method"]
    try:
        return await dispatch(sim, request, client_id, method)
    except SimError as err:
        return error_response(err.status, err.message)


async def dispatch(
    sim: MdrSimulator, request: web.Request, client_id: str, method: str
) -> web.StreamResponse:
    if method == "session/confirm":
        body = parse_json_object(await request.read())
        refresh_token = Params(body, {"refresh_token"}).required_string("refresh_token")
        return web.json_response(sim.confirm_session(client_id, refresh_token))

    api_method = API_METHODS.get(method)
    if api_method is None:
        raise SimError(404, f"unknown method {method}")

    connection = sim.authenticate(client_id, request.headers.get("Authorization"))
    body = {} if method == "attachments/upload" else parse_json_object(await request.read())
    result = await api_method(sim, connection, body, request)
    if isinstance(result, web.StreamResponse):
        return result
    return web.json_response(result, dumps=lambda data: json.dumps(data, ensure_ascii=False))


# --- control API over HTTP -------------------------------------------------------


def control_routes() -> list[web.RouteDef]:
    return [
        web.get(f"{CONTROL_PREFIX}/state", control_state),
        web.get(f"{CONTROL_PREFIX}/settings", control_settings),
        web.patch(f"{CONTROL_PREFIX}/settings", control_settings),
        web.post(f"{CONTROL_PREFIX}/clock/advance", control_advance),
        web.post(f"{CONTROL_PREFIX}/clients", control_create_client),
        web.post(f"{CONTROL_PREFIX}/clients/{{client_id}}/console-token", control_console_token),
        web.get(f"{CONTROL_PREFIX}/clients/{{client_id}}/incidents", control_incidents),
        web.post(f"{CONTROL_PREFIX}/clients/{{client_id}}/incidents", control_seed_incident),
        web.post(f"{CONTROL_PREFIX}/clients/{{client_id}}/demo-incidents", control_seed_demo),
        web.patch(
            f"{CONTROL_PREFIX}/clients/{{client_id}}/incidents/{{incident_id}}", control_update_incident
        ),
        web.get(
            f"{CONTROL_PREFIX}/clients/{{client_id}}/incidents/{{incident_id}}/comments", control_comments
        ),
        web.post(
            f"{CONTROL_PREFIX}/clients/{{client_id}}/incidents/{{incident_id}}/comments", control_add_comment
        ),
    ]


def control_handler(
    function: Callable[[MdrSimulator, web.Request, dict[str, Any]], Any],
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """Wrap a control function: parse the JSON body, turn KeyError and ValueError into 404 and 400."""

    @functools.wraps(function)
    async def handler(request: web.Request) -> web.Response:
        sim = request.app[SIM_KEY]
        try:
            body = parse_json_object(await request.read()) if request.can_read_body else {}
            return web.json_response(function(sim, request, body))
        except SimError as err:
            return error_response(err.status, err.message)
        except KeyError as err:
            return error_response(404, str(err.args[0]) if err.args else "not found")
        except (TypeError, ValueError) as err:
            return error_response(400, str(err))

    return handler


@control_handler
def control_state(sim: MdrSimulator, request: web.Request, body: dict[str, Any]) -> Any:
    return sim.state()


@control_handler
def control_settings(sim: MdrSimulator, request: web.Request, body: dict[str, Any]) -> Any:
    if request.method == "PATCH":
        sim.update_settings(**body)
    return asdict(sim.settings)


@control_handler
def control_advance(sim: MdrSimulator, request: web.Request, body: dict[str, Any]) -> Any:
    return {"now_ms": sim.advance(float(body.get("seconds", 0)))}


@control_handler
def control_create_client(sim: MdrSimulator, request: web.Request, body: dict[str, Any]) -> Any:
    connection = sim.create_client(
        body.get("client_id"),
        connection_name=body.get("connection_name", "mdr-connector"),
        tenants=body.get("tenants"),
    )
    return {
        **asdict(connection),
        "console_token": sim.issue_console_token(connection.client_id, connection.connection_name),
    }


@control_handler
def control_console_token(sim: MdrSimulator, request: web.Request, body: dict[str, Any]) -> Any:
    client_id = request.match_info["client_id"]
    return {"refresh_token": sim.issue_console_token(client_id, body.get("connection_name"))}


@control_handler
def control_incidents(sim: MdrSimulator, request: web.Request, body: dict[str, Any]) -> Any:
    return sim.incidents(request.match_info["client_id"])


@control_handler
def control_seed_incident(sim: MdrSimulator, request: web.Request, body: dict[str, Any]) -> Any:
    return sim.seed_incident(request.match_info["client_id"], **body)


@control_handler
def control_seed_demo(sim: MdrSimulator, request: web.Request, body: dict[str, Any]) -> Any:
    return sim.seed_demo_incidents(request.match_info["client_id"], int(body.get("count", 12)))


@control_handler
def control_update_incident(sim: MdrSimulator, request: web.Request, body: dict[str, Any]) -> Any:
    return sim.update_incident(request.match_info["client_id"], request.match_info["incident_id"], **body)


@control_handler
def control_comments(sim: MdrSimulator, request: web.Request, body: dict[str, Any]) -> Any:
    return sim.comments(request.match_info["client_id"], request.match_info["incident_id"])


@control_handler
def control_add_comment(sim: MdrSimulator, request: web.Request, body: dict[str, Any]) -> Any:
    if not isinstance(body.get("text"), str):
        raise ValueError("text is required")
    return sim.add_soc_comment(
        request.match_info["client_id"],
        request.match_info["incident_id"],
        body["text"],
        author=body.get("author", "Kaspersky MDR SOC"),
    )


def make_app(sim: MdrSimulator) -> web.Application:
    """Build the aiohttp application serving the MDR API and the `/_sim/` control API."""
    app = web.Application(
        middlewares=[wire_middleware], client_max_size=sim.settings.max_upload_bytes + 1024 * 1024
    )
    app[SIM_KEY] = sim
    app.router.add_post(API_PREFIX + "/{client_id}/{method:.+}", handle_api)
    app.router.add_routes(control_routes())
    return app


@contextlib.asynccontextmanager
async def run_simulator(sim: MdrSimulator, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Serve `sim` on host:port (0 picks a free port) and yield the API base URL."""
    runner = web.AppRunner(make_app(sim), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    try:
        bound_port = runner.addresses[0][1]
        yield f"http://{host}:{bound_port}{API_PREFIX}"
    finally:
        await runner.cleanup()


async def serve(
    host: str = "127.0.0.1",
    port: int = 8480,
    *,
    client_id: str = "sim-client",
    connection_name: str = "mdr-connector",
    demo_incidents: int = 12,
) -> None:
    """Run a simulator with one client and demo incidents until SIGINT or SIGTERM."""
    sim = MdrSimulator()
    sim.create_client(client_id, connection_name=connection_name)
    sim.seed_demo_incidents(client_id, demo_incidents)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    async with run_simulator(sim, host, port) as base_url:
        origin = base_url.removesuffix(API_PREFIX)
        print(f"MDR simulator: API base URL {base_url}, client_id {client_id}", flush=True)
        print(
            "Issue a console token (valid 24 h, single-use):\n"
            f"  curl -s -X POST {origin}{CONTROL_PREFIX}/clients/{client_id}/console-token",
            flush=True,
        )
        print("Stop with Ctrl-C.", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mdr-connector simulate mdr", description="Run the MDR API simulator."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8480, help="TCP port to listen on (default 8480)")
    parser.add_argument("--client-id", default="sim-client", help="client id of the simulated customer")
    parser.add_argument("--connection-name", default="mdr-connector", help="connection name of the API token")
    parser.add_argument("--demo-incidents", type=int, default=12, help="number of demo incidents to seed")
    args = parser.parse_args(argv)
    asyncio.run(
        serve(
            args.host,
            args.port,
            client_id=args.client_id,
            connection_name=args.connection_name,
            demo_incidents=args.demo_incidents,
        )
    )
    return 0


# --- demo data -------------------------------------------------------------------

DEMO_TENANTS = ("", "Филиал Казань", "Retail EU")
DEMO_HOSTS = ("WS-FIN-017", "WS-HR-004", "SRV-DC-01", "SRV-SQL-02", "LT-DEV-112", "WS-ACC-033", "SRV-WEB-05")
DEMO_ANALYSTS = ("Анна Кузнецова (MDR SOC L2)", "Kaspersky MDR SOC", "Dmitry Volkov (MDR SOC L3)")

DEMO_INCIDENTS = (
    {
        "summary": "Подозрительный запуск PowerShell из макроса Office на {host}",
        "description": (
            "Пользователь открыл вложение `Счёт_0425.docm`, после чего макрос запустил "
            "`powershell.exe -enc ...`.\n\n**Рекомендации:**\n\n1. Изолируйте хост.\n"
            "2. Сбросьте пароль учётной записи пользователя.\n"
        ),
        "priority": "HIGH",
        "detection_technology": "EDR",
        "attack_stage": "Execution",
        "mitre_tactics": ["Execution", "Initial access"],
        "mitre_techniques": ["T1059.001: PowerShell", "T1566.001: Spearphishing Attachment"],
    },
    {
        "summary": "Credential dumping attempt (LSASS access) on {host}",
        "description": (
            "A process opened `lsass.exe` with `PROCESS_VM_READ` rights. The binary is an "
            "unsigned copy of *procdump* renamed to `svch0st.exe`.\n\n| Field | Value |\n|---|---|\n"
            "| SHA256 | `3f1c...9ab2` |\n| User | CORP\\svc_backup |\n"
        ),
        "priority": "HIGH",
        "detection_technology": "KATA",
        "attack_stage": "Credential access",
        "mitre_tactics": ["Credential access"],
        "mitre_techniques": ["T1003.001: LSASS Memory"],
    },
    {
        "summary": "Сканирование сети с рабочей станции {host}",
        "description": "Хост выполнил SMB-сканирование подсети 10.20.0.0/24 (более 200 адресов за 5 минут).",
        "priority": "NORMAL",
        "detection_technology": "NDR",
        "attack_stage": "Discovery",
        "mitre_tactics": ["Discovery"],
        "mitre_techniques": ["T1046: Network Service Discovery"],
    },
    {
        "summary": "Outbound connection to a known C2 domain from {host}",
        "description": (
            "DNS queries to `update-check.cdn-stat.example` match an indicator of a "
            "commodity RAT. The connection was blocked by the web threat protection."
        ),
        "priority": "NORMAL",
        "detection_technology": "EPP",
        "attack_stage": "Command and control",
        "mitre_tactics": ["Command and control"],
        "mitre_techniques": ["T1071.004: DNS"],
    },
    {
        "summary": "Установка нежелательного ПО для удалённого доступа на {host}",
        "description": (
            "Обнаружена установка AnyDesk пользователем без прав администратора. "
            "Вероятно, легитимная активность."
        ),
        "priority": "LOW",
        "detection_technology": "EPP",
        "attack_stage": "Persistence",
        "mitre_tactics": ["Persistence"],
        "mitre_techniques": ["T1219: Remote Access Software"],
    },
    {
        "summary": "Scheduled task created for persistence on {host}",
        "description": (
            "A scheduled task `\\Microsoft\\Windows\\UpdateOrchestrator\\Sync` runs a script "
            "from `%TEMP%` every 15 minutes."
        ),
        "priority": "NORMAL",
        "detection_technology": "EDR",
        "attack_stage": "Persistence",
        "mitre_tactics": ["Persistence", "Execution"],
        "mitre_techniques": ["T1053.005: Scheduled Task"],
    },
)

DEMO_COMMENTS = (
    "<p>Мы проанализировали дамп процесса. Полезная нагрузка — загрузчик <b>Cobalt Strike</b>.</p>",
    "<p>Please confirm whether the activity of <code>svc_backup</code> was planned by your IT team.</p>",
    "<p>Хост изолирован от сети. Ожидаем подтверждения на удаление файла.</p>",
    "<p>No further activity observed in the last 24 hours. We lower the priority.</p>",
)


def _seed_demo_incidents(sim: MdrSimulator, client_id: str, count: int) -> list[dict[str, Any]]:
    rng = sim._random
    now = sim.now_ms()
    seeded = []
    for index in range(count):
        template = DEMO_INCIDENTS[index % len(DEMO_INCIDENTS)]
        host = rng.choice(DEMO_HOSTS)
        tenant = DEMO_TENANTS[index % len(DEMO_TENANTS)]
        asset = sim.add_asset(client_id, host, tenant_name=tenant)
        created = now - rng.randint(1, 72) * HOUR * 1000
        fields = {
            **template,
            "summary": template["summary"].format(host=host),
            "affected_hosts": [f"{host}:{asset['asset_id']}"],
            "affected_hosts_mappings": [{"host_id": asset["asset_id"], "host_name": host}],
            "status": "Open" if index % 4 else "On hold",
            "tenant_name": tenant,
            "creation_time": created,
            "update_time": created,
        }
        incident = sim.seed_incident(client_id, **fields)
        if index % 2 == 0:
            sim.add_soc_comment(
                client_id,
                incident["incident_id"],
                DEMO_COMMENTS[index % len(DEMO_COMMENTS)],
                author=rng.choice(DEMO_ANALYSTS),
            )
        if template["priority"] == "HIGH":
            sim.add_response(
                client_id,
                incident["incident_id"],
                type="NETWORK_ISOLATION",
                description="Isolate the host from the network for 24 hours.",
                parameters={"period": 86400},
            )
        seeded.append(sim.incident(client_id, incident["incident_id"]))
    return seeded


if __name__ == "__main__":
    raise SystemExit(main())
