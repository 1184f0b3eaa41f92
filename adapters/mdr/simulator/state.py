"""The state of the simulated MDR service: `MdrSimulator`, its settings and its records."""

from __future__ import annotations

import copy
import json
import math
import random
import secrets
import string
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, get_type_hints

from aiohttp import web

from mdr_connector.adapters.mdr.simulator import demo_data
from mdr_connector.adapters.mdr.simulator.protocol import (
    DAY,
    HOUR,
    SimError,
    encode_jwt,
    sort_key,
    verify_jwt,
)

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


# The name of the JSON value that each setting type takes, for error messages.
SETTING_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}


def setting_type_error(name: str, expected: type, value: Any) -> str | None:
    """Return why `value` does not fit a setting of type `expected`, or None when it fits.

    JSON has one number type, so an integer fits a float setting, but true
    and false fit only a bool setting, and 2.0 does not fit an int one.
    """
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is bool:
        fits = isinstance(value, bool)
    elif expected is int:
        fits = isinstance(value, int) and not isinstance(value, bool)
    elif expected is float:
        fits = is_number and math.isfinite(value)
    else:
        fits = isinstance(value, expected)
    if fits:
        return None
    return f"{name} must be {SETTING_TYPE_NAMES[expected]}, got {json.dumps(value)[:80]}"


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
class HistoryRecord:
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
        self._history: list[HistoryRecord] = []
        self._next_incident_number = 1_336_650

    # --- clock ---

    def now(self) -> float:
        """Simulator time in Unix seconds: real time plus the offset set by `advance`."""
        return time.time() + self._offset

    def now_ms(self) -> int:
        return int(self.now() * 1000)

    def advance(self, seconds: float) -> int:
        """Move the simulator clock forward and return the new time in milliseconds."""
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"the simulator clock only moves forward: expected 0 or more seconds, got {seconds}")
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
        """Change settings; raise ValueError for an unknown name or a value of the wrong type, changing nothing."""
        types = get_type_hints(SimulatorSettings)
        unknown = sorted(set(changes) - set(types))
        if unknown:
            raise ValueError(f"unknown simulator settings: {', '.join(unknown)}; known: {', '.join(types)}")
        problems = [
            problem for name, value in changes.items() if (problem := setting_type_error(name, types[name], value))
        ]
        if problems:
            raise ValueError(f"invalid settings, nothing was changed: {'; '.join(problems)}")
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
            HistoryRecord(
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
        return demo_data.seed_demo_incidents(self, client_id, count)
