"""The state of a simulated ServiceNow instance: tables, users, journal entries, attachments and tokens.

`ServiceNowSimulator` validates writes as a base instance does, with its
data policies and role checks, and keeps time as real UTC time plus an
offset that tests move forward. Attachment bytes live in a temporary folder
that `close()` removes. The HTTP layer in `simulator.py` serves it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import secrets
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from mdr_connector.adapters.faults import FaultPlan
from mdr_connector.adapters.servicenow import simulator_query as query_language
from mdr_connector.adapters.servicenow.simulator_files import (
    DEFAULT_MAX_BYTES,
    AttachmentFiles,
    SimAttachment,
    generated_chunks,
)
from mdr_connector.adapters.servicenow.simulator_schema import (
    ATTACHMENT_TABLE,
    CLOSED,
    FIELD_LABELS,
    JOURNAL_TABLE,
    NEW,
    ON_HOLD,
    PRIORITY_LOOKUP,
    REQUIRED_CHOICES,
    RESOLVED,
    FieldSpec,
    Row,
    SimTable,
    choice_rows,
    incident_table,
    reference_tables,
)

log = logging.getLogger(__name__)

SERVICE_USER = "mdr.connector"
SERVICE_PASSWORD = "simulator-password"
OAUTH_CLIENT_ID = "simulator-oauth-client"
OAUTH_CLIENT_SECRET = "simulator-oauth-secret"
HUMAN_USER = "soc.analyst"
HUMAN_PASSWORD = "analyst-secret"
# Roles that may move an incident to Closed and change a closed one.
CLOSE_ROLES = frozenset({"itil_admin", "admin"})
# The lifetime of an access token from oauth_token.do on a default OAuth client.
TOKEN_LIFETIME_SECONDS = 1799
FIRST_NUMBER = 10001
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


class SimError(Exception):
    """A ServiceNow error reply: HTTP status, `error.message` and `error.detail`."""

    def __init__(self, status: int, message: str, detail: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, message, detail)
        self.status = status
        self.message = message
        self.detail = detail
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "detail": self.detail}, "status": "failure"}


def not_found() -> SimError:
    return SimError(404, "No Record found", "Record doesn't exist or ACL restricts the record retrieval")


def acl_denied(operation: str) -> SimError:
    """Build the reply to a write that an ACL denies, where `operation` is Insert, Update or Delete."""
    return SimError(403, "Operation Failed", f"ACL Exception {operation} Failed due to security constraints")


@dataclass
class SimUser:
    """A sys_user record with what the simulator needs besides its columns: password, roles and time zone."""

    sys_id: str
    user_name: str
    name: str
    password: str
    roles: list[str]
    time_zone: str = "UTC"
    email: str = ""

    @property
    def can_close(self) -> bool:
        return bool(CLOSE_ROLES & set(self.roles))

    def row(self) -> Row:
        first, _, last = self.name.partition(" ")
        return {
            "sys_id": self.sys_id,
            "user_name": self.user_name,
            "name": self.name,
            "first_name": first,
            "last_name": last,
            "email": self.email,
            "time_zone": self.time_zone,
            "active": "true",
        }


@dataclass
class SimSettings:
    """Behaviour switches; change them between calls from a test or `/_sim/settings`."""

    latency_seconds: float = 0.0
    # The service user gets 200 with no rows from sys_journal_field, as under a read ACL; writes still add entries.
    journal_read_denied: bool = False
    # Apply sysparm_limit and sysparm_offset before the read ACL hides rows, as a real instance does,
    # so a page can be shorter than the limit, or empty, while more rows follow.
    short_pages: bool = False
    # A data policy that makes close_code and close_notes mandatory for Resolved and Closed.
    enforce_close_fields: bool = True
    # com.glide.attachment.max_size, in bytes rather than MB so tests can use small files.
    attachment_max_bytes: int = DEFAULT_MAX_BYTES
    token_lifetime_seconds: int = TOKEN_LIFETIME_SECONDS
    # Above 0, every attachment download stops after this many bytes and the connection is closed.
    download_cut_bytes: int = 0


def settings_errors(changes: dict[str, Any]) -> dict[str, str]:
    """Return, per setting name in `changes`, why its value is invalid; empty when every value fits."""
    kinds = {item.name: item.type for item in fields(SimSettings)}
    errors: dict[str, str] = {}
    for name, value in changes.items():
        kind = kinds.get(name)
        if kind is None:
            errors[name] = f"Unknown setting. Known settings: {', '.join(kinds)}."
            continue
        if kind == "bool":
            fits, expected = isinstance(value, bool), "true or false"
        elif kind == "int":
            fits, expected = isinstance(value, int) and not isinstance(value, bool) and value >= 0, "an integer of at least 0"
        else:
            fits = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
            expected = "a finite number of seconds, 0 or more"
        if not fits:
            errors[name] = f"Expected {expected}, got {json.dumps(value)[:80]}."
    return errors


@dataclass
class ListResult:
    """One page of a table read and the X-Total-Count to report with it."""

    rows: list[Row]
    total: int
    # How many rows the page held before the read ACL removed some, which decides whether a next page exists.
    fetched: int = 0


@dataclass
class RateLimit:
    """A fault switch that rejects the next `remaining` API calls with 429 and Retry-After."""

    remaining: int = 0
    retry_after_seconds: int = 0
    # Fixed id of the simulated sys_rate_limit_rules record, sent as X-RateLimit-Rule.
    rule_sys_id: str = field(default_factory=lambda: stable_sys_id("sys_rate_limit_rules", "mdr-connector"))


def stable_sys_id(table: str, key: str) -> str:
    """Return a sys_id that is the same on every run, for users, groups and choices."""
    return hashlib.sha256(f"{table}:{key}".encode()).hexdigest()[:32]


def format_time(moment: datetime, time_zone: str = "UTC") -> str:
    """Format a time as ServiceNow stores (UTC) or displays it (in the user's zone): `2026-01-31 10:00:00`."""
    return moment.astimezone(ZoneInfo(time_zone)).strftime(TIME_FORMAT)


def parse_time(text: str) -> datetime:
    """Read a stored `YYYY-MM-DD HH:MM:SS` value as UTC; raises ValueError."""
    return datetime.strptime(text, TIME_FORMAT).replace(tzinfo=timezone.utc)


class ServiceNowSimulator:
    """The state of one simulated ServiceNow instance and the Python control API over it."""

    def __init__(self, *, table: str = "incident", latency_seconds: float = 0.0, service_time_zone: str = "UTC") -> None:
        """Build an instance whose tickets live in `table`; the service user reads dates in `service_time_zone`."""
        _check_time_zone(service_time_zone)
        self.table = table
        self.service_time_zone = service_time_zone
        self.settings = SimSettings(latency_seconds=latency_seconds)
        self.clock_offset = timedelta()
        self.files = AttachmentFiles()
        self.calls: Counter[str] = Counter()
        # The injected faults; `drop_reply_after_commit` adds to it.
        self.faults = FaultPlan()
        self.faults.on_time_zone = self._set_service_time_zone
        self.rate_limit = RateLimit()
        # Access tokens from oauth_token.do: token -> (user_name, expiry).
        self.tokens: dict[str, tuple[str, datetime]] = {}
        self._build()

    def _build(self) -> None:
        self.tables: dict[str, SimTable] = {table.name: table for table in reference_tables()}
        self.tables[self.table] = incident_table(self.table)
        # Rows that the read ACL hides from the service user.
        self.hidden: set[str] = set()
        # Ticket sys_id -> (visible from, row state) for list queries, which lag writes by the fault plan's index lag.
        self.index: dict[str, list[tuple[datetime, Row]]] = {}
        self._attachments: dict[str, SimAttachment] = {}
        self._next_number = FIRST_NUMBER

        self.users: list[SimUser] = []
        self.service = self.add_user(
            SERVICE_USER, "MDR Connector", SERVICE_PASSWORD, ["itil"], self.service_time_zone, "mdr.connector@example.test"
        )
        self.human = self.add_user(
            HUMAN_USER, "SOC Analyst", HUMAN_PASSWORD, ["itil", "itil_admin"], "Europe/Moscow", "soc.analyst@example.test"
        )
        for name, members in (
            ("SOC", [self.human]),
            ("SOC Tier 2", [self.human]),
            ("Service Desk", []),
            ("MDR Integrations", [self.service]),
        ):
            self.add_group(name, members)
        for row in choice_rows(self.tables[self.table]):
            key = f"{row['name']}.{row['element']}.{row['value']}"
            self._insert("sys_choice", {**row, "sys_id": stable_sys_id("sys_choice", key)})

    def close(self) -> None:
        """Remove the attachment files, keeping their records."""
        self.files.close()

    def reset(self) -> None:
        """Remove every incident, journal entry and attachment, restore the users, groups and settings, and end faults.

        The clock keeps its offset, because it only moves forward, and issued access tokens stay valid.
        """
        self.files.close()
        latency = self.settings.latency_seconds
        self.settings = SimSettings(latency_seconds=latency)
        self.faults.clear()
        self.rate_limit = RateLimit()
        self._build()
        log.info("servicenow_sim.reset")

    # Clock

    def now(self) -> datetime:
        """Simulator time: real UTC time plus the offset set by `advance`, in whole seconds like sys_updated_on."""
        return (datetime.now(timezone.utc) + self.clock_offset).replace(microsecond=0)

    def now_text(self) -> str:
        return format_time(self.now())

    def advance(self, seconds: float) -> None:
        """Move simulator time forward; raise ValueError for a negative or non-finite `seconds`."""
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"the simulator clock only moves forward: expected 0 or more seconds, got {seconds}")
        self.clock_offset += timedelta(seconds=seconds)

    # Users, groups and tokens

    def add_user(
        self,
        user_name: str,
        name: str,
        password: str = "",
        roles: Iterable[str] = (),
        time_zone: str = "UTC",
        email: str = "",
    ) -> SimUser:
        """Add a sys_user record; an empty `password` means the user cannot sign in."""
        _check_time_zone(time_zone)
        user = SimUser(stable_sys_id("sys_user", user_name), user_name, name, password, list(roles), time_zone, email)
        self.users.append(user)
        self._insert("sys_user", user.row())
        return user

    def _set_service_time_zone(self, zone: str) -> None:
        """Move the connector's account to `zone`, so the dates in its queries are read there; used by the fault plan."""
        self.service_time_zone = zone
        self.update_user(self.service, time_zone=zone)

    def update_user(self, user: SimUser, *, roles: Iterable[str] | None = None, time_zone: str | None = None, password: str | None = None) -> None:
        """Change a user's roles, time zone or password."""
        if time_zone is not None:
            _check_time_zone(time_zone)
            user.time_zone = time_zone
        if roles is not None:
            user.roles = list(roles)
        if password is not None:
            user.password = password
        self.tables["sys_user"].rows[user.sys_id] = user.row()

    def add_group(self, name: str, members: Iterable[SimUser] = ()) -> Row:
        """Add a sys_user_group with `members` as sys_user_grmember rows."""
        group = self._insert("sys_user_group", {"sys_id": stable_sys_id("sys_user_group", name), "name": name, "description": "", "active": "true"})
        for user in members:
            key = f"{user.user_name}:{name}"
            self._insert("sys_user_grmember", {"sys_id": stable_sys_id("sys_user_grmember", key), "user": user.sys_id, "group": group["sys_id"]})
        return group

    def user(self, reference: str) -> SimUser:
        """Find a user by user_name or sys_id; raises KeyError."""
        for user in self.users:
            if reference in (user.user_name, user.sys_id):
                return user
        raise KeyError(f"no simulated user {reference!r}")

    def user_for_basic(self, user_name: str, password: str) -> SimUser | None:
        return next((user for user in self.users if user.password and (user.user_name, user.password) == (user_name, password)), None)

    def issue_token(self, client_id: str, client_secret: str) -> tuple[str, int]:
        """Grant a client credentials token for the service user; raises SimError 401 for an unknown client or secret."""
        if (client_id, client_secret) != (OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET):
            raise SimError(401, "access_denied")
        lifetime = self.settings.token_lifetime_seconds
        token = secrets.token_urlsafe(64)
        self.tokens[token] = (self.service.user_name, self.now() + timedelta(seconds=lifetime))
        log.info("servicenow_sim.token.issued", extra={"client_id": client_id, "expires_in": lifetime})
        return token, lifetime

    def user_for_token(self, token: str) -> SimUser | None:
        """Return the user of an access token that has not expired by the simulator clock."""
        entry = self.tokens.get(token)
        if entry is None or entry[1] <= self.now():
            return None
        return self.user(entry[0])

    # Faults

    def drop_reply_after_commit(self, method: str, path: str, times: int = 1) -> None:
        """Make the next `times` successful `method path` calls apply, then drop the connection.

        `path` is the route pattern, for example `/api/now/table/{table}` or
        `/api/now/attachment/file`. The versioned routes have their own
        patterns, such as `/api/now/{version}/table/{table}`.
        """
        self.faults.add("drop_after_commit", method=method, path=path, count=times)

    def limit_rate(self, calls: int, retry_after_seconds: int) -> None:
        """Reject the next `calls` authenticated API calls with 429 and `Retry-After: retry_after_seconds`."""
        if calls < 0 or retry_after_seconds < 0:
            raise ValueError("calls and retry_after_seconds must be 0 or more")
        self.rate_limit.remaining = calls
        self.rate_limit.retry_after_seconds = retry_after_seconds

    # Tables and reads

    def table_of(self, name: str) -> SimTable:
        """Find a table by name, or raise the 400 that an instance returns for an unknown one."""
        table = self.tables.get(name)
        if table is None:
            raise SimError(400, f"Invalid table {name}")
        return table

    def spec(self, table: SimTable, name: str) -> FieldSpec | None:
        """Return the column `name` of `table`, following dot-walks such as `group.name`, or None."""
        head, _, rest = name.partition(".")
        spec = table.fields.get(head)
        if spec is None or not rest:
            return spec
        if spec.kind != "reference":
            return None
        return self.spec(self.tables[spec.reference], rest)

    def value_of(self, table: SimTable, row: Row, name: str) -> str:
        """Return the stored value of column `name` of `row`, following dot-walks; journal columns read as ""."""
        head, _, rest = name.partition(".")
        spec = table.fields.get(head)
        if spec is None or spec.kind == "journal":
            return ""
        value = str(row.get(head, ""))
        if not rest:
            return value
        target = self.tables[spec.reference]
        referenced = target.rows.get(value)
        return self.value_of(target, referenced, rest) if referenced is not None else ""

    def visible(self, user: SimUser, table: SimTable, row: Row) -> bool:
        """Apply the read ACL: rows marked hidden, and attachments of hidden rows, are invisible to the service user."""
        if user is not self.service:
            return True
        if table.name == ATTACHMENT_TABLE and row.get("table_sys_id") in self.hidden:
            return False
        return row["sys_id"] not in self.hidden

    def table_readable(self, user: SimUser, table: SimTable) -> bool:
        return not (table.name == JOURNAL_TABLE and self.settings.journal_read_denied and user is self.service)

    def parse_query(self, table: SimTable, text: str, user: SimUser) -> query_language.Query:
        """Parse `sysparm_query` for `table`, dropping conditions on unknown fields as an instance does."""

        def convert(name: str, value: str) -> str:
            spec = self.spec(table, name)
            if spec is not None and spec.kind == "datetime":
                return _date_generate(value, user.time_zone)
            return value

        parsed = query_language.parse(text, lambda name: self.spec(table, name) is not None, convert)
        if parsed.ignored:
            log.info("servicenow_sim.query.ignored", extra={"table": table.name, "terms": parsed.ignored})
        return parsed

    def select(self, table: SimTable, user: SimUser, query_text: str, limit: int, offset: int) -> ListResult:
        """Run a table read as `user`: filter, order, page and apply the read ACL in the order the settings choose."""
        parsed = self.parse_query(table, query_text, user)

        def value_of(row: Row, name: str) -> str:
            return self.value_of(table, row, name)

        def numeric(name: str) -> bool:
            spec = self.spec(table, name)
            return spec is not None and spec.numeric

        indexed = (self.indexed_row(table, row) for row in table.rows.values())
        found = [row for row in indexed if row is not None and query_language.matches(parsed, row, value_of, numeric)]
        found = query_language.ordered(found, parsed.order, value_of, numeric)
        if not self.table_readable(user, table):
            return ListResult([], 0)

        if self.settings.short_pages:
            page = found[offset : offset + limit]
            return ListResult([row for row in page if self.visible(user, table, row)], len(found), len(page))
        allowed = [row for row in found if self.visible(user, table, row)]
        page = allowed[offset : offset + limit]
        return ListResult(page, len(allowed), len(page))

    def reindex(self, table: SimTable, row: Row) -> None:
        """Record a ticket row's state for list queries, visible once the fault plan's index lag has passed."""
        if table.name != self.table:
            return
        visible_from = self.now() + timedelta(seconds=self.faults.lag_seconds(0.0))
        self.index.setdefault(row["sys_id"], []).append((visible_from, dict(row)))

    def indexed_row(self, table: SimTable, row: Row) -> Row | None:
        """Return the state of a row that list queries see now, or None for a ticket not indexed yet."""
        entries = self.index.get(str(row.get("sys_id")))
        if table.name != self.table or not entries:
            return row
        now = self.now()
        visible = [number for number, (visible_from, _) in enumerate(entries) if visible_from <= now]
        if not visible:
            return None
        # Older states are never shown again, so only the newest visible one and the pending ones are kept.
        del entries[: visible[-1]]
        # With no newer state pending, the live row is what list queries show.
        return row if len(entries) == 1 else entries[0][1]

    def record(self, table: SimTable, sys_id: str, user: SimUser) -> Row:
        """Return one row that `user` may read, or raise the 404 of a missing or hidden record."""
        row = table.rows.get(sys_id)
        if row is None or not self.visible(user, table, row) or not self.table_readable(user, table):
            raise not_found()
        return row

    def display_value(self, table: SimTable, row: Row, name: str, user: SimUser) -> str:
        """Return the display value of a column: a choice label, a date in the user's zone, a referenced record's name.

        A journal column shows its entries, newest first, each under a line
        with its time, author and column label, as the incident form does.
        """
        head, _, rest = name.partition(".")
        spec = table.fields[head]
        if rest:
            target = self.tables[spec.reference]
            referenced = target.rows.get(str(row.get(head, "")))
            return self.display_value(target, referenced, rest, user) if referenced is not None else ""

        value = str(row.get(head, ""))
        if spec.kind == "journal":
            return self.journal_text(table.name, row["sys_id"], head, user)
        if spec.kind == "choice":
            return spec.label(value)
        if spec.kind == "datetime" and value:
            return format_time(parse_time(value), user.time_zone)
        if spec.kind == "reference" and value:
            target = self.tables[spec.reference]
            referenced = target.rows.get(value)
            return str(referenced.get(target.display_field, "")) if referenced is not None else ""
        return value

    def journal_text(self, table_name: str, sys_id: str, element: str, user: SimUser) -> str:
        entries = [
            entry
            for entry in self.tables[JOURNAL_TABLE].rows.values()
            if (entry["name"], entry["element_id"], entry["element"]) == (table_name, sys_id, element)
        ]
        blocks = []
        for entry in reversed(entries):
            author = next((other.name for other in self.users if other.user_name == entry["sys_created_by"]), entry["sys_created_by"])
            when = format_time(parse_time(entry["sys_created_on"]), user.time_zone)
            blocks.append(f"{when} - {author} ({FIELD_LABELS[element]})\n{entry['value']}\n\n")
        return "".join(blocks)

    # Writes

    def insert(
        self,
        table: SimTable,
        body: Any,
        user: SimUser,
        *,
        input_display: bool = False,
        hidden: bool = False,
        created_on: str | None = None,
    ) -> Row:
        """Insert a record as `user`, like POST on the Table API; only the ticket table takes inserts."""
        if not table.writable:
            raise acl_denied("Insert")

        changes, notes = self._changes(table, _body_object(body), input_display)
        new = {name: "" for name, spec in table.fields.items() if spec.kind != "journal"}
        new.update({"state": NEW, "impact": "3", "urgency": "3", "category": "inquiry", "opened_by": user.sys_id})
        new.update(changes)
        new["priority"] = PRIORITY_LOOKUP[(new["impact"], new["urgency"])]
        self._check_rules({}, new, changes, user)

        now = created_on or self.now_text()
        new.update(
            {
                "sys_id": secrets.token_hex(16),
                "number": f"INC{self._next_number:07d}",
                "sys_class_name": table.name,
                "opened_at": now,
                "sys_created_on": now,
                "sys_created_by": user.user_name,
                "sys_updated_on": now,
                "sys_updated_by": user.user_name,
                "sys_mod_count": "0",
            }
        )
        self._next_number += 1
        table.rows[new["sys_id"]] = new
        self.reindex(table, new)
        if hidden:
            self.hidden.add(new["sys_id"])
        self._add_journal(table, new, notes, user, now)
        log.info("servicenow_sim.record.inserted", extra={"table": table.name, "sys_id": new["sys_id"], "number": new["number"]})
        return new

    def update(self, table: SimTable, sys_id: str, body: Any, user: SimUser, *, input_display: bool = False) -> Row:
        """Update a record as `user`, like PATCH or PUT on the Table API.

        A request that changes nothing and adds no journal entry leaves
        sys_updated_on and sys_mod_count as they are, as an instance does.
        """
        row = self.record(table, sys_id, user)
        if not table.writable or (row.get("state") == CLOSED and not user.can_close):
            raise acl_denied("Update")

        changes, notes = self._changes(table, _body_object(body), input_display)
        new = {**row, **changes}
        if row["state"] == ON_HOLD and new["state"] != ON_HOLD:
            new["hold_reason"] = ""
        new["priority"] = PRIORITY_LOOKUP[(new["impact"], new["urgency"])]
        self._check_rules(row, new, changes, user)
        if new == row and not notes:
            return row

        now = self.now_text()
        new.update({"sys_updated_on": now, "sys_updated_by": user.user_name, "sys_mod_count": str(int(row["sys_mod_count"]) + 1)})
        row.update(new)
        self.reindex(table, row)
        self._add_journal(table, row, notes, user, now)
        log.info("servicenow_sim.record.updated", extra={"table": table.name, "sys_id": sys_id, "mod_count": row["sys_mod_count"]})
        return row

    def delete(self, table: SimTable, sys_id: str, user: SimUser) -> None:
        """Delete a record and its attachments, like DELETE on the Table API; journal entries stay, as on an instance."""
        self.record(table, sys_id, user)
        if not table.writable:
            raise acl_denied("Delete")
        del table.rows[sys_id]
        self.index.pop(sys_id, None)
        self.hidden.discard(sys_id)
        for attachment in [item for item in self._attachments.values() if item.record["table_sys_id"] == sys_id]:
            self.delete_attachment(attachment.sys_id)
        log.info("servicenow_sim.record.deleted", extra={"table": table.name, "sys_id": sys_id})

    def _changes(self, table: SimTable, body: dict[str, Any], input_display: bool) -> tuple[Row, list[tuple[str, str]]]:
        """Split a request body into stored column values and journal entries; unknown and system columns are ignored."""
        changes: Row = {}
        notes: list[tuple[str, str]] = []
        for name, raw in body.items():
            spec = table.fields.get(name)
            if spec is None or not spec.writable:
                continue
            text = _text_value(name, raw)
            if spec.kind == "journal":
                if text:
                    notes.append((name, text))
                continue
            changes[name] = self._stored_value(name, spec, text, input_display)
        return changes, notes

    def _stored_value(self, name: str, spec: FieldSpec, text: str, input_display: bool) -> str:
        if spec.kind == "choice":
            if input_display:
                text = next((value for value, label in spec.choices if label == text), text)
            if text == "" and name not in REQUIRED_CHOICES:
                return ""
            if text not in (value for value, _ in spec.choices):
                choices = ", ".join(value for value, _ in spec.choices)
                # NOTE: an instance may store a value outside the choice list; the simulator rejects it so a wrong mapping shows.
                raise SimError(400, "Invalid value", f"{name}: {text!r} is not one of the choices {choices}")
            return text
        if spec.kind == "reference":
            return self._reference(name, spec, text)
        if spec.kind == "integer" and text and not text.lstrip("-").isdigit():
            raise SimError(400, "Invalid value", f"{name}: {text!r} is not an integer")
        # Like an instance, cut text longer than the column's maximum length without an error.
        return text[: spec.max_length] if spec.max_length else text

    def _reference(self, name: str, spec: FieldSpec, text: str) -> str:
        """Resolve a reference given as a sys_id or as the display value (a group's name); "" clears it."""
        if text == "":
            return ""
        target = self.tables[spec.reference]
        if text in target.rows:
            return text
        for sys_id, row in target.rows.items():
            if row.get(target.display_field) == text:
                return sys_id
        raise SimError(400, "Invalid value", f"{name}: no {spec.reference} record has the sys_id or name {text!r}")

    def _check_rules(self, old: Row, new: Row, changes: Row, user: SimUser) -> None:
        """Apply the role check for Closed and the data policies of On Hold, Resolved and Closed."""
        state_changed = new["state"] != old.get("state")
        if not (state_changed or {"close_code", "close_notes", "hold_reason"} & changes.keys()):
            return
        if state_changed and new["state"] == CLOSED and not user.can_close:
            raise acl_denied("Update" if old else "Insert")

        mandatory = []
        if new["state"] == ON_HOLD and not new["hold_reason"]:
            mandatory.append("hold_reason")
        if new["state"] in (RESOLVED, CLOSED) and self.settings.enforce_close_fields:
            mandatory.extend(name for name in ("close_code", "close_notes") if not new[name])
        if mandatory:
            labels = ", ".join(FIELD_LABELS[name] for name in mandatory)
            raise SimError(403, "Operation Failed", f"Data Policy Exception: \n\tThe following fields are mandatory: {labels}\n")

    def _add_journal(self, table: SimTable, row: Row, notes: list[tuple[str, str]], user: SimUser, now: str) -> None:
        for element, value in notes:
            entry = self._insert(
                JOURNAL_TABLE,
                {
                    "sys_id": secrets.token_hex(16),
                    "element": element,
                    "element_id": row["sys_id"],
                    "name": table.name,
                    "value": value,
                    "sys_created_on": now,
                    "sys_created_by": user.user_name,
                },
            )
            log.info("servicenow_sim.journal.added", extra={"sys_id": row["sys_id"], "journal_id": entry["sys_id"], "element": element})

    def _insert(self, table_name: str, row: Row) -> Row:
        self.tables[table_name].rows[row["sys_id"]] = row
        return row

    # Python control API, acting as the human user unless a call names another author

    @property
    def incidents(self) -> dict[str, Row]:
        """The ticket table's rows by sys_id, with stored values."""
        return self.tables[self.table].rows

    @property
    def journal(self) -> list[Row]:
        """Every sys_journal_field row, oldest first."""
        return list(self.tables[JOURNAL_TABLE].rows.values())

    @property
    def attachments(self) -> dict[str, SimAttachment]:
        """Every attachment by sys_id, with its sys_attachment row and file."""
        return self._attachments

    def incident(self, reference: str) -> Row:
        """Find an incident by number or sys_id; raises SimError 404."""
        if reference in self.incidents:
            return self.incidents[reference]
        for row in self.incidents.values():
            if row["number"] == reference:
                return row
        raise not_found()

    def create_incident(
        self,
        fields: dict[str, Any] | None = None,
        *,
        author: str = HUMAN_USER,
        hidden: bool = False,
        created_on: str | None = None,
    ) -> Row:
        """Create an incident as `author`, as a person would in the form.

        `created_on` (`YYYY-MM-DD HH:MM:SS`, UTC) sets sys_created_on and
        sys_updated_on, so a test can seed rows that share one second.
        """
        if created_on is not None:
            parse_time(created_on)
        return self.insert(self.tables[self.table], fields or {}, self.user(author), hidden=hidden, created_on=created_on)

    def update_incident(self, reference: str, fields: dict[str, Any], *, author: str = HUMAN_USER) -> Row:
        """Change an incident as `author`; `work_notes` and `comments` add journal entries."""
        row = self.incident(reference)
        return self.update(self.tables[self.table], row["sys_id"], fields, self.user(author))

    def add_human_comment(self, reference: str, text: str, element: str = "comments", *, author: str = HUMAN_USER) -> Row:
        """Add a journal entry (`comments` or `work_notes`) as a person would, and return its sys_journal_field row."""
        if element not in ("comments", "work_notes"):
            raise ValueError(f"element must be comments or work_notes, got {element!r}")
        if not text:
            raise ValueError("a journal entry needs text")
        self.update_incident(reference, {element: text}, author=author)
        return self.journal[-1]

    def set_state(self, reference: str, state: str, *, author: str = HUMAN_USER, **fields: Any) -> Row:
        """Move an incident to `state` ("1".."8") with any other fields it needs, such as close_code."""
        return self.update_incident(reference, {"state": state, **fields}, author=author)

    def set_hidden(self, reference: str, hidden: bool = True) -> None:
        """Hide an incident from the service user behind the read ACL, or show it again."""
        sys_id = self.incident(reference)["sys_id"]
        if hidden:
            self.hidden.add(sys_id)
        else:
            self.hidden.discard(sys_id)

    # Attachments

    def attachment_target(self, table_name: str, table_sys_id: str, user: SimUser) -> SimTable:
        """Check that `user` may attach a file to the record, or raise 400, 403 or 404 as an instance does."""
        table = self.table_of(table_name)
        self.record(table, table_sys_id, user)
        if not table.writable:
            raise acl_denied("Insert")
        return table

    def register_attachment(
        self, table: SimTable, table_sys_id: str, file_name: str, content_type: str, path: Path, size: int, sha256: str, user: SimUser
    ) -> SimAttachment:
        """Record a file already written to `path`; the parent record's sys_updated_on does not move, as on an instance."""
        now = self.now_text()
        sys_id = path.stem
        record = self._insert(
            ATTACHMENT_TABLE,
            {
                "sys_id": sys_id,
                "file_name": file_name,
                "content_type": content_type,
                "size_bytes": str(size),
                "size_compressed": str(size),
                "compressed": "false",
                "table_name": table.name,
                "table_sys_id": table_sys_id,
                "hash": sha256,
                "average_image_color": "",
                "image_height": "",
                "image_width": "",
                "sys_tags": "",
                "sys_created_on": now,
                "sys_created_by": user.user_name,
                "sys_updated_on": now,
                "sys_updated_by": user.user_name,
                "sys_mod_count": "0",
            },
        )
        attachment = SimAttachment(record, path)
        self._attachments[sys_id] = attachment
        log.info("servicenow_sim.attachment.added", extra={"sys_id": table_sys_id, "attachment_id": sys_id, "bytes": size})
        return attachment

    def new_attachment_path(self) -> Path:
        """Reserve the file of a new attachment; its name is the attachment's sys_id."""
        return self.files.path_for(secrets.token_hex(16))

    def add_attachment(
        self,
        reference: str,
        file_name: str,
        data: bytes | None = None,
        *,
        size: int | None = None,
        content_type: str = "application/octet-stream",
        author: str = HUMAN_USER,
    ) -> SimAttachment:
        """Attach `data`, or `size` generated bytes, as a person would; the size limit does not apply."""
        if (data is None) == (size is None):
            raise ValueError("give the attachment's bytes as data or a generated size, not both")
        row = self.incident(reference)
        path = self.new_attachment_path()
        digest = hashlib.sha256()
        written = 0
        with path.open("wb") as file:
            for chunk in [data] if data is not None else generated_chunks(size or 0):
                file.write(chunk)
                digest.update(chunk)
                written += len(chunk)
        table = self.tables[self.table]
        return self.register_attachment(table, row["sys_id"], file_name, content_type, path, written, digest.hexdigest(), self.user(author))

    def attachment(self, sys_id: str, user: SimUser | None = None) -> SimAttachment:
        """Find an attachment that `user` may read; raises SimError 404."""
        attachment = self._attachments.get(sys_id)
        if attachment is None or (user is not None and not self.visible(user, self.tables[ATTACHMENT_TABLE], attachment.record)):
            raise SimError(404, "Attachment record not found")
        return attachment

    def delete_attachment(self, sys_id: str) -> None:
        attachment = self.attachment(sys_id)
        del self._attachments[sys_id]
        del self.tables[ATTACHMENT_TABLE].rows[sys_id]
        attachment.path.unlink(missing_ok=True)
        log.info("servicenow_sim.attachment.deleted", extra={"attachment_id": sys_id})

    # Inspection

    def state(self) -> dict[str, Any]:
        """Return incidents, journal entries, attachments, hidden rows and request counts as plain JSON values."""
        return {
            "now": self.now_text(),
            "table": self.table,
            "incidents": [dict(row) for row in self.incidents.values()],
            "hidden": sorted(self.hidden),
            "journal": [dict(row) for row in self.journal],
            "attachments": [dict(item.record) for item in self._attachments.values()],
            "users": [{**user.row(), "roles": list(user.roles)} for user in self.users],
            "rate_limit_remaining": self.rate_limit.remaining,
            "calls": dict(self.calls),
        }


def _check_time_zone(name: str) -> None:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as err:
        raise ValueError(f"unknown time zone {name!r}; use an IANA name such as Europe/Moscow") from err


def _body_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise SimError(400, "Exception while reading request", "The request body must be a JSON object.")
    return body


def _text_value(name: str, raw: Any) -> str:
    """Turn a JSON value into the string an instance stores: numbers and booleans as text, null as ""."""
    if raw is None:
        return ""
    if isinstance(raw, bool):
        return "true" if raw else "false"
    if isinstance(raw, int):
        return str(raw)
    if isinstance(raw, float):
        return str(int(raw)) if raw.is_integer() else str(raw)
    if isinstance(raw, str):
        return raw
    raise SimError(400, "Invalid value", f"{name}: expected a string, number, boolean or null, got {type(raw).__name__}")


def _date_generate(value: str, time_zone: str) -> str:
    """Turn `javascript:gs.dateGenerate('YYYY-MM-DD','HH:MM:SS')` from the user's zone into a stored UTC value.

    Other values pass unchanged, because a plain date in a web service query is already UTC.
    """
    prefix = "javascript:gs.dateGenerate("
    if not (value.startswith(prefix) and value.endswith(")")):
        return value
    parts = [part.strip().strip("'\"") for part in value[len(prefix) : -1].split(",")]
    if len(parts) != 2:
        return value
    try:
        local = datetime.strptime(" ".join(parts), TIME_FORMAT).replace(tzinfo=ZoneInfo(time_zone))
    except ValueError:
        return value
    return format_time(local)
