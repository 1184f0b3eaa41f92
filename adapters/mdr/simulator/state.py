"""The state of the simulated MDR service: `MdrSimulator`, its settings and its records."""

from __future__ import annotations

import bisect
import copy
import json
import math
import random
import secrets
import string
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from aiohttp import web

from mdr_connector.adapters.faults import FaultPlan
from mdr_connector.adapters.mdr.simulator import demo_data
from mdr_connector.adapters.mdr.simulator.blobs import BlobStore
from mdr_connector.adapters.mdr.simulator.protocol import (
    DAY,
    HOUR,
    PRIORITIES,
    SimError,
    encode_jwt,
    sort_key,
    verify_jwt,
)

PUSH_ID_ALPHABET = "-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"
ES_ID_ALPHABET = string.ascii_letters + string.digits + "-_"
SOC_AUTHOR = "Kaspersky MDR SOC"
# NOTE: who a timed-out response's decline is attributed to in history is INFERRED.
TIMEOUT_AUTHOR = "Kaspersky MDR"
# The comment of an automatically declined response, from a public sample.
TIMEOUT_COMMENT = "Automatically rejected, because the task timeout has expired"
# incidents/close takes the constant and the incident shows the display form.
RESOLUTIONS = {"TRUE_POSITIVE": "True positive", "FALSE_POSITIVE": "False positive"}
OTHER_RESOLUTION = ("OTHER", "Other")


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
    # INFERRED: a response still in the initial status this long after its
    # creation is declined automatically; 0 turns that off. A public sample
    # shows such a decline 608 seconds after creation, hence 10 minutes.
    response_timeout_seconds: float = 600.0
    # INFERRED: the upload size limit; larger files get 413.
    max_upload_bytes: int = 100 * 1024 * 1024
    # For client tests: above 0, a download stops after this share of the
    # file. By default the connection is then closed short of the announced
    # Content-Length; with download_cutoff_drops_connection false the reply
    # announces only the cut length and ends normally.
    download_cutoff_fraction: float = 0.0
    download_cutoff_drops_connection: bool = True
    # INFERRED: closing a closed incident gets 400; false makes it a no-op that succeeds.
    reclose_rejected: bool = True
    # INFERRED: whether incidents/close also takes OTHER (shown as "Other").
    close_accepts_other: bool = False
    # INFERRED: whether incidents/create rejects an asset id the client does not have.
    create_requires_known_assets: bool = False
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


@dataclass(frozen=True)
class ConfirmRecord:
    """One `session/confirm` request: the client, the refresh token's id (`jti`) and the outcome.

    `outcome` is `rotated` for a success, else the reason of the rejection:
    `used`, `expired`, `invalid` (the token does not verify) or `other client`.
    """

    client_id: str
    token_id: str | None
    outcome: str
    at_ms: int


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
        # Every session/confirm request in arrival order, so a test can tell whether a refresh token was spent twice.
        self.confirm_log: list[ConfirmRecord] = []
        self._access_tokens: dict[str, _TokenRecord] = {}
        self._incidents: dict[str, _Incident] = {}
        # The settings the last full scan of `expire_responses` ran with and
        # the earliest expiry it left, so later calls before that moment skip
        # the scan. A new response clears it.
        self._next_expiry: tuple[tuple[int, str], int] | None = None
        self._assets: dict[str, dict[str, Any]] = {}
        self._asset_clients: dict[str, str] = {}
        self._tenants: dict[str, dict[str, str]] = {}
        self.blobs = BlobStore()
        self._history: list[HistoryRecord] = []
        # The history in time order per entity type, caught up with
        # `_history` on each read (see `history_of_type`).
        self._history_orders: dict[str, list[tuple[int, int]]] = {}
        self._history_by_type: dict[str, list[HistoryRecord]] = {}
        self._history_indexed = 0
        self._next_incident_number = 1_336_650
        # The injected faults; `drop_reply_after_commit` and `drop_rules` are its older, narrower interface.
        self.faults = FaultPlan(seed or 0)

    def close(self) -> None:
        """Remove the attachment files; the simulator must not serve attachments afterwards."""
        self.blobs.close()

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
        self.expire_responses()
        return self.now_ms()

    def drop_reply_after_commit(self, method: str, times: int = 1) -> None:
        """Make the next `times` successful calls of an API method, such as `attachments/upload`,
        apply their change and then close the connection without a reply."""
        if times < 1:
            raise ValueError(f"times must be 1 or more, got {times}")
        if method == "session/confirm":
            raise ValueError("session/confirm never drops its reply: a lost reply there breaks the token chain")
        self.faults.add("drop_after_commit", method="POST", path=method, count=times)

    @property
    def drop_rules(self) -> Counter[str]:
        """API method -> how many more successful replies the fault plan drops after applying the change."""
        remaining: Counter[str] = Counter()
        for rule in self.faults.rules:
            if rule.kind == "drop_after_commit" and rule.count is not None:
                remaining[rule.path] += rule.count
        return remaining

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
        outcome = self._confirm_outcome(client_id, record)
        self.confirm_log.append(ConfirmRecord(client_id, self._token_id(refresh_token), outcome, self.now_ms()))
        # NOTE: the status for a rejected refresh token is INFERRED (setting).
        if outcome != "rotated":
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

    def _confirm_outcome(self, client_id: str, record: _TokenRecord | None) -> str:
        if record is None:
            return "invalid"
        if record.client_id != client_id:
            return "other client"
        if record.used:
            return "used"
        if self.now() >= record.expires_at:
            return "expired"
        return "rotated"

    def _token_id(self, token: str) -> str | None:
        claims = verify_jwt(token, self._key)
        return str(claims["jti"]) if claims is not None and "jti" in claims else None

    def confirms(self) -> list[dict[str, Any]]:
        """Return every session/confirm request so far, oldest first, as JSON-ready records."""
        return [asdict(record) for record in self.confirm_log]

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
        self, client_id: str, incident_id: str, text: str, *, author: str = "Kaspersky MDR SOC", at_ms: int | None = None
    ) -> dict[str, Any]:
        """Add an analyst comment (HTML text, origin `Service`) and move the incident's `update_time`.

        `at_ms` dates the comment and its history records in the past, as
        for a backlog that grew before the connector started; default now.
        """
        incident = self._incident(client_id, incident_id)
        return self._add_comment(incident, text, author=author, origin="Service", at_ms=at_ms)

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
        self._next_expiry = None
        incident.record["update_time"] = now
        self._changed(incident, SOC_AUTHOR, "create", "incident_response", response)
        self._changed(incident, SOC_AUTHOR, "update", "incident_details", incident.snapshot())
        return copy.deepcopy(response)

    def add_attachment(
        self,
        client_id: str,
        incident_id: str,
        full_name: str,
        content: bytes | None = None,
        *,
        size: int | None = None,
        source: Path | None = None,
        caption: str = "",
        author: str = SOC_AUTHOR,
        origin: str = "Service",
        **fields: Any,
    ) -> dict[str, Any]:
        """Attach a file to an incident and move the incident's `update_time`.

        The content is exactly one of `content` (bytes), `size` (that many
        bytes of generated filler, written in chunks) or `source` (a file in
        `self.blobs.folder()`, which is moved). `fields` override the record,
        so a test can list a wrong `file_size`.
        """
        incident = self._incident(client_id, incident_id)
        if [content is not None, size is not None, source is not None].count(True) != 1:
            raise ValueError("give exactly one of content, size or source for the attachment's bytes")
        attachment_id = self._es_id()
        if content is not None:
            stored = self.blobs.write_bytes(attachment_id, content)
        elif size is not None:
            stored = self.blobs.write_generated(attachment_id, size)
        else:
            assert source is not None
            stored = self.blobs.adopt(attachment_id, source)
        return self._register_attachment(
            incident,
            {
                "attachment_id": attachment_id,
                "author_name": author,
                "caption": caption,
                "creation_time": self.now_ms(),
                "file_size": stored,
                "full_name": full_name,
                "origin": origin,
                "was_read": False,
                **fields,
            },
        )

    def _register_attachment(self, incident: _Incident, attachment: dict[str, Any]) -> dict[str, Any]:
        incident.attachments.append(attachment)
        incident.record["update_time"] = attachment["creation_time"]
        author = attachment["author_name"]
        self._changed(incident, author, "create", "incident_attachment", attachment)
        self._changed(incident, author, "update", "incident_details", incident.snapshot())
        return copy.deepcopy(attachment)

    def add_tenant(self, client_id: str, tenant_name: str, tenant_id: str | None = None) -> dict[str, str]:
        """Register a tenant of a client, so incidents/create can name it by `tenant_id`."""
        self._connection(client_id)
        if not tenant_name:
            raise ValueError("tenant_name must not be empty; the root tenant needs no registration")
        tenant_id = tenant_id or str(uuid.UUID(int=self._random.getrandbits(128), version=4))
        self._tenants.setdefault(client_id, {})[tenant_id] = tenant_name
        return {"tenant_id": tenant_id, "tenant_name": tenant_name}

    # --- the response lifecycle ---

    def expire_responses(self) -> int:
        """Decline every response whose timeout has passed in the initial status; return how many.

        The decline is dated at the moment the timeout ran out, not when this
        runs, so applying it lazily, before any state is read, looks the same
        from outside as a service that declines on time.
        """
        timeout_ms = int(self.settings.response_timeout_seconds * 1000)
        if timeout_ms <= 0:
            return 0
        now = self.now_ms()
        scanned_with = (timeout_ms, self.settings.response_initial_status)
        if self._next_expiry is not None and self._next_expiry[0] == scanned_with and now < self._next_expiry[1]:
            return 0

        expired = 0
        next_expiry = sys.maxsize
        for incident in self._incidents.values():
            for response in incident.responses:
                created = response.get("creation_time")
                if response.get("status") != self.settings.response_initial_status or not isinstance(created, int):
                    continue
                expires_at = created + timeout_ms
                if expires_at > now:
                    next_expiry = min(next_expiry, expires_at)
                    continue
                self._decline_on_timeout(incident, response, expires_at)
                expired += 1
        self._next_expiry = (scanned_with, next_expiry)
        return expired

    def _decline_on_timeout(self, incident: _Incident, response: dict[str, Any], expires_at: int) -> None:
        response.update(status="Declined", comment=TIMEOUT_COMMENT, update_time=expires_at)
        current = incident.record.get("update_time")
        # Later changes may already be recorded, and update_time never moves back.
        incident.record["update_time"] = max(current, expires_at) if isinstance(current, int) else expires_at
        self._changed(incident, TIMEOUT_AUTHOR, "update", "incident_response", response, changed_at=expires_at)
        self._changed(
            incident, TIMEOUT_AUTHOR, "update", "incident_details", incident.snapshot(), changed_at=expires_at
        )

    # --- customer writes: incidents/create and incidents/close ---

    def create_client_incident(
        self,
        connection: SimConnection,
        *,
        summary: str,
        client_description: str,
        affected_hosts: list[str],
        priority: str,
        tenant_id: str,
    ) -> dict[str, Any]:
        """Create an incident as a customer does through `incidents/create`; raise SimError 400 for bad input."""
        if not summary.strip():
            raise SimError(400, "summary must not be empty")
        if priority not in PRIORITIES:
            raise SimError(400, f"priority must be one of {', '.join(PRIORITIES)}, got {priority!r}")
        mappings = self._host_mappings(connection.client_id, affected_hosts)
        tenant_name = self._tenant_name(connection, tenant_id)

        now = self.now_ms()
        record = self._default_incident(connection.client_id, now)
        record.update(
            summary=summary,
            description="",
            client_description=client_description,
            priority=priority,
            affected_hosts=list(affected_hosts),
            affected_hosts_mappings=mappings,
            tenant_name=tenant_name,
            origin="Client",
            detection_technology="",
            attack_stage="",
            mitre_tactics=[],
            mitre_techniques=[],
        )
        incident = _Incident(connection.client_id, record)
        self._incidents[incident.incident_id] = incident
        self._changed(incident, connection.connection_name, "create", "incident_details", incident.snapshot())
        return incident.snapshot()

    def close_incident(
        self, connection: SimConnection, incident_id: str, resolution_status: str, summary: str
    ) -> dict[str, Any]:
        """Close an incident as `incidents/close` does: status Closed, the resolution's display form, the summary."""
        incident = self._visible_incident(connection, incident_id)
        resolutions = dict(RESOLUTIONS)
        if self.settings.close_accepts_other:
            resolutions[OTHER_RESOLUTION[0]] = OTHER_RESOLUTION[1]
        if resolution_status not in resolutions:
            raise SimError(400, f"resolution_status must be one of {', '.join(resolutions)}, got {resolution_status!r}")
        if not summary.strip():
            raise SimError(400, "summary must not be empty")

        if incident.record.get("status") == "Closed":
            if self.settings.reclose_rejected:
                raise SimError(400, f"incident {incident_id} is already closed")
            return incident.snapshot()

        incident.record.update(
            status="Closed",
            resolution=resolutions[resolution_status],
            status_description=summary,
            update_time=self.now_ms(),
        )
        self._changed(incident, connection.connection_name, "update", "incident_details", incident.snapshot())
        return incident.snapshot()

    def _host_mappings(self, client_id: str, affected_hosts: list[str]) -> list[dict[str, str]]:
        """Check `HOSTNAME:asset_id` entries and return their `affected_hosts_mappings`."""
        if not affected_hosts:
            raise SimError(400, "affected_hosts must list at least one HOSTNAME:asset_id")
        mappings = []
        for entry in affected_hosts:
            host_name, separator, asset_id = entry.partition(":")
            if not separator or not host_name or not asset_id:
                raise SimError(400, f"affected_hosts entry {entry!r} is not HOSTNAME:asset_id")
            known = self._asset_clients.get(asset_id) == client_id
            if self.settings.create_requires_known_assets and not known:
                raise SimError(400, f"asset {asset_id} of affected_hosts entry {entry!r} not found")
            mappings.append({"host_id": asset_id, "host_name": host_name})
        return mappings

    def _tenant_name(self, connection: SimConnection, tenant_id: str) -> str:
        if not tenant_id:
            tenant_name = ""
        else:
            tenants = self._tenants.get(connection.client_id, {})
            if tenant_id not in tenants:
                raise SimError(400, f"tenant {tenant_id} not found")
            tenant_name = tenants[tenant_id]
        # NOTE: the status for a tenant the token may not see is INFERRED.
        if not connection.sees_tenant(tenant_name):
            raise SimError(403, f"this connection may not create incidents in tenant {tenant_id or '(root)'}")
        return tenant_name

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
        self.expire_responses()
        found = [i.snapshot() for i in self._incidents.values() if i.client_id == client_id]
        return sorted(found, key=lambda record: sort_key(record, "creation_time", "incident_id"))

    def incident(self, client_id: str, incident_id: str) -> dict[str, Any]:
        return self._incident(client_id, incident_id).snapshot()

    def comments(self, client_id: str, incident_id: str) -> list[dict[str, Any]]:
        """Return the comments of an incident, each with `author_name` and `origin`."""
        return copy.deepcopy(self._incident(client_id, incident_id).comments)

    def attachments(self, client_id: str, incident_id: str) -> list[dict[str, Any]]:
        """Return the attachment records of an incident; `blobs.path(attachment_id)` is each one's file."""
        return copy.deepcopy(self._incident(client_id, incident_id).attachments)

    def attachment_content(self, attachment_id: str) -> bytes:
        """Return the bytes of an attachment; meant for small files in tests."""
        return self.blobs.path(attachment_id).read_bytes()

    def responses(self, client_id: str, incident_id: str) -> list[dict[str, Any]]:
        """Return the responses of an incident, with timed-out ones already declined."""
        return copy.deepcopy(self._incident(client_id, incident_id).responses)

    def history(self, client_id: str) -> list[dict[str, Any]]:
        """Return the history records of a client in time order, as incidents/history shows them."""
        self.expire_responses()
        records = sorted((r for r in self._history if r.client_id == client_id), key=HistoryRecord.order)
        return [r.to_wire() for r in records]

    def state(self) -> dict[str, Any]:
        """Summarize the state as JSON-ready data: clients, incident counts, call counts and the clock."""
        self.expire_responses()
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
        self.expire_responses()
        incident = self._incidents.get(incident_id)
        if incident is None or incident.client_id != client_id:
            raise KeyError(f"no incident {incident_id!r} for client {client_id!r}")
        return incident

    def _add_comment(
        self, incident: _Incident, text: str, *, author: str, origin: str, at_ms: int | None = None
    ) -> dict[str, Any]:
        now = self.now_ms() if at_ms is None else at_ms
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
        self._changed(incident, author, "create", "incident_comment", comment, changed_at=at_ms)
        self._changed(incident, author, "update", "incident_details", incident.snapshot(), changed_at=at_ms)
        return copy.deepcopy(comment)

    def history_of_type(self, entity_type: str) -> tuple[list[tuple[int, int]], list[HistoryRecord]]:
        """Return the history records of one entity type in time order, with their `order()` keys for bisecting.

        Records appended to `_history` since the last call are sorted in first.
        """
        for record in self._history[self._history_indexed :]:
            orders = self._history_orders.setdefault(record.entity_type, [])
            records = self._history_by_type.setdefault(record.entity_type, [])
            position = bisect.bisect(orders, record.order())
            orders.insert(position, record.order())
            records.insert(position, record)
        self._history_indexed = len(self._history)
        return self._history_orders.get(entity_type, []), self._history_by_type.get(entity_type, [])

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
            visible_at = now + int(self.faults.lag_seconds(self.settings.visibility_delay_seconds) * 1000)
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
