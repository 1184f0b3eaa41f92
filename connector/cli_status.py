"""The `status` command: each connection's cursors, ledger counts, last error and token chain.

It reads the database and the token files and nothing else: no network
call and no write, so it can run beside `mdr-connector run` and from a
monitoring check. In cluster mode the token pairs are read from the
database, where the first read imports a token file left from
single-instance mode, and each connection's lease and the live instances
are shown too. Registered from cli.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

from mdr_connector.connector.cli import (
    EXIT_FAILED,
    EXIT_OK,
    format_local,
    load_config,
    run_async,
    safe_text,
    selected,
)
from mdr_connector.connector.errors import ConfigError
from mdr_connector.connector.i18n import _
from mdr_connector.connector.logs import redact_text

# Every refresh of the access token brings a new refresh token, so one with
# less time left than this means the connector has not run for days.
REFRESH_WARNING_SECONDS = 2 * 24 * 3600
# The cursor names as engine.py stores them.
MDR_LIST_CURSOR = "mdr"
MDR_HISTORY_CURSOR = "mdr_history"
TICKET_CURSOR = "ticket"

# Problem codes that make a connection unhealthy, as the JSON output lists them.
TOKEN_PENDING = "token_pending_activation"
TOKEN_EXPIRED = "token_expired"
REFRESH_EXPIRING = "refresh_token_expiring"
TOKEN_UNREADABLE = "token_file_unreadable"

# The states of a connection's lease, as the JSON output names them.
LEASE_HELD = "held"
LEASE_EXPIRED = "expired"
LEASE_FREE = "free"


@dataclass(frozen=True)
class CursorReport:
    """A stored change cursor: its name, its value as a time, and how far that is behind now."""

    name: str
    stored: str | None
    time: datetime | None = None
    lag_seconds: int | None = None


@dataclass(frozen=True)
class LastError:
    """The most recently parked item and why it failed."""

    kind: str
    item_id: str
    reason: str
    attempts: int
    failed_at: datetime
    next_try_at: datetime


@dataclass(frozen=True)
class TokenReport:
    """The token pair's state and expiry times, or the error that kept it from being read."""

    # The pair's storage: "file", or "database" in cluster mode.
    storage: str
    state: str | None = None
    access_expires_at: datetime | None = None
    refresh_expires_at: datetime | None = None
    rejected_at: datetime | None = None
    refresh_seconds_left: int | None = None
    error: ConfigError | None = None


@dataclass(frozen=True)
class LeaseReport:
    """A connection's row in `leases`, with its expiry compared to the database's clock."""

    holder: str | None
    epoch: int
    expires_at: datetime | None
    # Seconds from the database's time to `expires_at`, negative once it has passed.
    seconds_left: int | None

    @property
    def state(self) -> str:
        """`held`, `expired` (free for another instance to take over) or `free` (handed back)."""
        if self.holder is None or self.seconds_left is None:
            return LEASE_FREE
        return LEASE_HELD if self.seconds_left > 0 else LEASE_EXPIRED


# The lease of a connection that no instance has taken yet (no row in `leases`).
NO_LEASE = LeaseReport(holder=None, epoch=0, expires_at=None, seconds_left=None)


@dataclass(frozen=True)
class InstanceReport:
    """A live row of `cluster_instances`: an instance of the connector that renewed its registration in time."""

    name: str
    host: str
    pid: int
    started_at: datetime
    expires_at: datetime
    seconds_left: int


@dataclass(frozen=True)
class ClusterReport:
    """The live instances, read at the database's time `checked_at`."""

    checked_at: datetime
    instances: list[InstanceReport]


@dataclass(frozen=True)
class ConnectionReport:
    name: str
    client_id: str
    token_dir: Path
    change_source: str
    mdr_cursor: CursorReport
    ticket_cursor: CursorReport
    linked_incidents: int
    pending_links: int
    parked_items: int
    last_error: LastError | None
    tokens: TokenReport
    # None outside cluster mode and before any instance took the lease.
    lease: LeaseReport | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.problems


def add_status_command(commands: Any, common: argparse.ArgumentParser) -> None:
    """Register `mdr-connector status`."""
    status = commands.add_parser(
        "status",
        parents=[common],
        help=_("show each connection's cursors, lag, linked incidents, parked items and token chain"),
        description=_(
            "Show, for each connection, the MDR and ticket change cursors with their lag (seconds between "
            "now and the cursor, which also grows while nothing changes), linked incidents, parked items, "
            "the last error and the expiry of the MDR token chain; in cluster mode also the instance that "
            "holds each connection's lease, its epoch and expiry, and the live instances. Reads the database "
            "and the token files only: no network call, no write. Exit status: 0 when every connection shown "
            "is healthy, 1 when a token chain is Pending activation or Expired, or its refresh token expires "
            "within 2 days."
        ),
    )
    status.add_argument("--connection", help=_("name of the connection (default: all)"))
    status.add_argument("--json", action="store_true", help=_("print one JSON document instead of text"))
    status.set_defaults(handler=command_status)


def command_status(args: argparse.Namespace) -> int:
    settings = load_config(args)
    connections = selected(settings, args.connection)
    url = read_only_url(settings.resolved_database_url())
    now = datetime.now(timezone.utc)

    async def go() -> tuple[list[ConnectionReport], ClusterReport | None]:
        from mdr_connector.connector.store import Store

        # Store.open would create the folder of a SQLite file; the file exists by now.
        store = Store(url)
        try:
            await store.check_schema(upgrade=False)
            reports = [await read_connection_report(store, settings, connection, now) for connection in connections]
            if not settings.cluster.enabled:
                return reports, None
            cluster, leases = await read_cluster_report(store, [connection.name for connection in connections])
            return [dataclasses.replace(report, lease=leases.get(report.name, NO_LEASE)) for report in reports], cluster
        finally:
            await store.close()

    reports, cluster = run_async(go)
    if args.json:
        print(json.dumps(status_document(reports, now, cluster), ensure_ascii=False, indent=2))
    else:
        for report in reports:
            print_report(report)
        if cluster is not None:
            for line in cluster_lines(cluster):
                print(line)
    return EXIT_OK if all(report.healthy for report in reports) else EXIT_FAILED


def read_only_url(url: str) -> str:
    """Return the database URL to read the ledger with, opening a SQLite file read-only.

    A read-only SQLite connection cannot change the file, not even its
    header, which the store's WAL setting would otherwise write to a new
    database. Raises ConfigError when the file is missing or empty, instead
    of creating it. Other databases are only queried, so their URL is kept.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        # Store reports an invalid URL with its own message.
        return url
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return url
    if parsed.query.get("uri"):
        # NOTE: a URL that is already an SQLite URI filename is used as it is,
        # so it is read-only only when it sets mode=ro itself.
        return url

    path = Path(parsed.database).absolute()
    if not path.is_file() or path.stat().st_size == 0:
        raise ConfigError(
            _("the database {path} is missing or empty; run `mdr-connector db upgrade` "
              "or a first `mdr-connector sync --once`").format(path=path)
        )
    read_only = parsed.set(database=f"file:{quote(str(path))}", query={**parsed.query, "mode": "ro", "uri": "true"})
    return read_only.render_as_string(hide_password=False)


# Reading


async def read_connection_report(store: Any, settings: Any, connection: Any, now: datetime) -> ConnectionReport:
    """Collect one connection's status from the ledger and its token pair."""
    change_source = connection.sync.change_source
    mdr_name = MDR_HISTORY_CURSOR if change_source == "history" else MDR_LIST_CURSOR
    mdr_stored = await store.get_cursor(connection.name, mdr_name)
    ticket_stored = await store.get_cursor(connection.name, TICKET_CURSOR)
    counts = await store.counts(connection.name)
    tokens = await read_token_report(store, settings, connection, now)

    return ConnectionReport(
        name=connection.name,
        client_id=connection.mdr.client_id,
        token_dir=connection.mdr.token_dir,
        change_source=change_source,
        mdr_cursor=cursor_report(mdr_name, mdr_stored, parse_epoch_ms(mdr_stored), now),
        ticket_cursor=cursor_report(TICKET_CURSOR, ticket_stored, parse_iso_time(ticket_stored), now),
        linked_incidents=counts.links,
        pending_links=counts.pending_links,
        parked_items=counts.parked_items,
        last_error=await newest_parked(store, connection.name),
        tokens=tokens,
        problems=token_problems(tokens),
    )


def cursor_report(name: str, stored: str | None, moment: datetime | None, now: datetime) -> CursorReport:
    if moment is None:
        return CursorReport(name, stored)
    lag = max(int((now - moment).total_seconds()), 0)
    return CursorReport(name, stored, moment, lag)


def parse_epoch_ms(stored: str | None) -> datetime | None:
    """Read an MDR cursor in Unix milliseconds, or return None when it is unset or unreadable."""
    if stored is None:
        return None
    try:
        return datetime.fromtimestamp(int(stored) / 1000, tz=timezone.utc)
    except (ValueError, OverflowError, OSError):
        return None


def parse_iso_time(stored: str | None) -> datetime | None:
    """Read the ticket cursor, an ISO 8601 time, or return None when it is unset or unreadable."""
    if stored is None:
        return None
    try:
        moment = datetime.fromisoformat(stored)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


async def newest_parked(store: Any, connection: str) -> LastError | None:
    """Return the item parked most recently, read with one query that loads a single row."""
    from sqlalchemy import select

    from mdr_connector.connector.store import ParkedItem

    async with store.sessions() as session:
        row = await session.scalar(
            select(ParkedItem)
            .where(ParkedItem.connection == connection)
            .order_by(ParkedItem.last_failed_at.desc(), ParkedItem.id.desc())
            .limit(1)
        )
    if row is None:
        return None
    return LastError(row.kind, row.item_id, row.reason, row.attempts, row.last_failed_at, row.next_try_at)


async def read_token_report(store: Any, settings: Any, connection: Any, now: datetime) -> TokenReport:
    """Read the token pair as `token status` does, from the database in cluster mode, else from the token file.

    No call to MDR is made.
    """
    from mdr_connector.adapters.mdr.tokens import TokenFileStore
    from mdr_connector.connector.service import token_storage

    storage = token_storage(settings, connection, store)
    where = "file" if storage is None else "database"
    try:
        if storage is None:
            status = TokenFileStore(connection.mdr.token_dir, connection.mdr.client_id).status(now.timestamp())
        else:
            status = await storage.read_status(now.timestamp())
    except ConfigError as err:
        return TokenReport(where, error=err)

    left = None
    if status.refresh_expires_at is not None:
        left = int((status.refresh_expires_at - now).total_seconds())
    return TokenReport(
        where,
        state=status.state,
        access_expires_at=status.access_expires_at,
        refresh_expires_at=status.refresh_expires_at,
        rejected_at=status.rejected_at,
        refresh_seconds_left=left,
    )


async def read_cluster_report(store: Any, connections: list[str]) -> tuple[ClusterReport, dict[str, LeaseReport]]:
    """Read the live instances and the lease of each connection in `connections`, by connection name.

    Expiry is compared with the database's clock, which set it, so a skewed
    local clock does not change whether a lease is shown as held.
    """
    from sqlalchemy import func, select

    from mdr_connector.connector.store import ClusterInstance, Lease

    async with store.engine.connect() as database:
        checked_at = as_utc(await database.scalar(select(func.now())))
        lease_rows = await database.execute(
            select(Lease.connection, Lease.holder, Lease.epoch, Lease.expires_at).where(Lease.connection.in_(connections))
        )
        instance_rows = await database.execute(
            select(
                ClusterInstance.name,
                ClusterInstance.host,
                ClusterInstance.pid,
                ClusterInstance.started_at,
                ClusterInstance.expires_at,
            )
            .where(ClusterInstance.expires_at > func.now())
            .order_by(ClusterInstance.name)
        )
        leases = {
            row.connection: LeaseReport(
                holder=row.holder,
                epoch=row.epoch,
                expires_at=row.expires_at,
                seconds_left=seconds_between(checked_at, row.expires_at),
            )
            for row in lease_rows
        }
        instances = [
            InstanceReport(
                name=row.name,
                host=row.host,
                pid=row.pid,
                started_at=row.started_at,
                expires_at=row.expires_at,
                seconds_left=seconds_between(checked_at, row.expires_at) or 0,
            )
            for row in instance_rows
        ]
    return ClusterReport(checked_at, instances), leases


def seconds_between(start: datetime, end: datetime | None) -> int | None:
    """Whole seconds from `start` to `end`, rounded toward zero; None when `end` is None."""
    if end is None:
        return None
    return int((as_utc(end) - start).total_seconds())


def as_utc(moment: datetime) -> datetime:
    return moment.astimezone(timezone.utc) if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def token_problems(tokens: TokenReport) -> list[str]:
    if tokens.error is not None:
        return [TOKEN_UNREADABLE]
    if tokens.state == "Pending activation":
        return [TOKEN_PENDING]
    if tokens.state == "Expired":
        return [TOKEN_EXPIRED]
    if tokens.refresh_seconds_left is not None and tokens.refresh_seconds_left < REFRESH_WARNING_SECONDS:
        return [REFRESH_EXPIRING]
    return []


# Text output


def print_report(report: ConnectionReport) -> None:
    print(report.name)
    mdr_label = _("MDR change cursor ({cursor})").format(cursor=report.mdr_cursor.name)
    print(f"  {mdr_label}: {cursor_text(report.mdr_cursor)}")
    print(f"  {_('ticket cursor')}: {cursor_text(report.ticket_cursor)}")
    print("  " + _("linked incidents: {linked}, pending links: {pending}").format(
        linked=report.linked_incidents, pending=report.pending_links))
    print("  " + _("parked items: {count}").format(count=report.parked_items))
    print("  " + last_error_text(report.last_error))
    for line in token_lines(report):
        print("  " + line)
    if report.lease is not None:
        print("  " + safe_text(lease_text(report.lease)))


def cursor_text(cursor: CursorReport) -> str:
    if cursor.stored is None:
        return _("not set, no sync cycle has run yet")
    if cursor.time is None:
        return _("unreadable value {value}").format(value=safe_text(cursor.stored))
    return _("{time}, lag {seconds} s").format(time=format_local(cursor.time), seconds=cursor.lag_seconds)


def last_error_text(last_error: LastError | None) -> str:
    if last_error is None:
        return _("last error: none")
    return safe_text(
        _("last error: {time}, {kind} {item_id} (attempt {attempts}, next try {next_try}): {reason}").format(
            time=format_local(last_error.failed_at),
            kind=last_error.kind,
            item_id=last_error.item_id,
            attempts=last_error.attempts,
            next_try=format_local(last_error.next_try_at),
            reason=last_error.reason,
        )
    )


def token_lines(report: ConnectionReport) -> list[str]:
    """Render the token chain: state, hint, both expiry times, and the warning for a refresh token near its end."""
    from mdr_connector.adapters.mdr.token_database import NOT_ACTIVATED_DATABASE
    from mdr_connector.adapters.mdr.tokens import EXPIRED_REFRESH, NOT_ACTIVATED

    tokens = report.tokens
    if tokens.error is not None:
        return [_("token chain: unreadable: {error}").format(error=safe_text(tokens.error.localized(_)))]

    lines = [_("token chain: {state}").format(state=_(tokens.state or ""))]
    if tokens.state == "Pending activation" and tokens.storage == "database":
        lines.append(_(NOT_ACTIVATED_DATABASE).format(client_id=report.client_id))
    elif tokens.state == "Pending activation":
        lines.append(_(NOT_ACTIVATED).format(client_id=report.client_id, token_dir=report.token_dir))
    elif tokens.rejected_at is not None:
        lines.append(_("MDR rejected the refresh token at {time}: issue a new token in the MDR console "
                       "(Settings, API) and run `mdr-connector token activate`").format(
            time=format_local(tokens.rejected_at)))
    elif tokens.state == "Expired":
        lines.append(_(EXPIRED_REFRESH).format(client_id=report.client_id))
    if tokens.access_expires_at is not None:
        lines.append(_("access token expires:  {time}").format(time=format_local(tokens.access_expires_at)))
    if tokens.refresh_expires_at is not None:
        lines.append(_("refresh token expires: {time}").format(time=format_local(tokens.refresh_expires_at)))
    if REFRESH_EXPIRING in report.problems and tokens.refresh_expires_at is not None:
        hours = f"{max(tokens.refresh_seconds_left or 0, 0) / 3600:.1f}"
        lines.append(f"{_('warning')}: " + _(
            "the MDR refresh token expires in {hours} hours, at {time}; a sync renews it, so run "
            "`mdr-connector sync --once` or start the service before then, or a new token must be "
            "issued in the MDR console"
        ).format(hours=hours, time=format_local(tokens.refresh_expires_at)))
    return lines


def lease_text(lease: LeaseReport) -> str:
    """Render a connection's lease: the instance that holds it, its epoch and when it expires."""
    if lease.epoch == 0:
        return _("lease: not taken by any instance yet")
    if lease.state == LEASE_FREE:
        return _("lease: free, handed back at epoch {epoch}").format(epoch=lease.epoch)
    expires_at = format_seconds(lease.expires_at) if lease.expires_at is not None else "-"
    if lease.state == LEASE_EXPIRED:
        return _("lease: expired {seconds} s ago at {time}, last held by {holder} at epoch {epoch}; "
                 "another instance can take it over").format(
            seconds=-(lease.seconds_left or 0), time=expires_at, holder=lease.holder, epoch=lease.epoch)
    return _("lease: held by {holder}, epoch {epoch}, expires in {seconds} s at {time}").format(
        holder=lease.holder, epoch=lease.epoch, seconds=lease.seconds_left, time=expires_at)


def cluster_lines(cluster: ClusterReport) -> list[str]:
    """Render the live instances, one indented line each under a heading line with their count."""
    if not cluster.instances:
        return [_("cluster instances: none live")]
    lines = [_("cluster instances: {count} live").format(count=len(cluster.instances))]
    for instance in cluster.instances:
        lines.append("  " + safe_text(
            _("{name} on {host}, pid {pid}: started {started}, registration expires in {seconds} s").format(
                name=instance.name,
                host=instance.host,
                pid=instance.pid,
                started=format_seconds(instance.started_at),
                seconds=instance.seconds_left,
            )
        ))
    return lines


def format_seconds(moment: datetime) -> str:
    """Format a time in UTC to the second, for leases that last seconds."""
    return as_utc(moment).strftime("%Y-%m-%d %H:%M:%S UTC")


# JSON output


def status_document(reports: list[ConnectionReport], now: datetime, cluster: ClusterReport | None = None) -> dict[str, Any]:
    """Build the `--json` document: English keys and values, times in ISO 8601 UTC, secrets redacted.

    `cluster` is null outside cluster mode.
    """
    return {
        "checked_at": now.isoformat(),
        "healthy": all(report.healthy for report in reports),
        "connections": [connection_document(report) for report in reports],
        "cluster": None if cluster is None else cluster_document(cluster),
    }


def cluster_document(cluster: ClusterReport) -> dict[str, Any]:
    return {
        "database_time": iso(cluster.checked_at),
        "instances": [
            {
                "name": instance.name,
                "host": instance.host,
                "pid": instance.pid,
                "started_at": iso(instance.started_at),
                "expires_at": iso(instance.expires_at),
                "seconds_left": instance.seconds_left,
            }
            for instance in cluster.instances
        ],
    }


def lease_document(lease: LeaseReport | None) -> dict[str, Any] | None:
    if lease is None:
        return None
    return {
        "state": lease.state,
        "holder": lease.holder,
        "epoch": lease.epoch,
        "expires_at": iso(lease.expires_at),
        "seconds_left": lease.seconds_left,
    }


def connection_document(report: ConnectionReport) -> dict[str, Any]:
    last_error = report.last_error
    tokens = report.tokens
    return {
        "name": report.name,
        "healthy": report.healthy,
        "problems": list(report.problems),
        "change_source": report.change_source,
        "mdr_cursor": cursor_document(report.mdr_cursor),
        "ticket_cursor": cursor_document(report.ticket_cursor),
        "linked_incidents": report.linked_incidents,
        "pending_links": report.pending_links,
        "parked_items": report.parked_items,
        "last_error": None if last_error is None else {
            "kind": last_error.kind,
            "item_id": last_error.item_id,
            "reason": redact_text(last_error.reason),
            "attempts": last_error.attempts,
            "failed_at": iso(last_error.failed_at),
            "next_try_at": iso(last_error.next_try_at),
        },
        "tokens": {
            "storage": tokens.storage,
            "state": tokens.state,
            "access_expires_at": iso(tokens.access_expires_at),
            "refresh_expires_at": iso(tokens.refresh_expires_at),
            "refresh_seconds_left": tokens.refresh_seconds_left,
            "rejected_at": iso(tokens.rejected_at),
            "error": None if tokens.error is None else redact_text(str(tokens.error)),
        },
        "lease": lease_document(report.lease),
    }


def cursor_document(cursor: CursorReport) -> dict[str, Any]:
    return {
        "name": cursor.name,
        "stored": cursor.stored,
        "time": iso(cursor.time),
        "lag_seconds": cursor.lag_seconds,
    }


def iso(moment: datetime | None) -> str | None:
    return moment.astimezone(timezone.utc).isoformat() if moment is not None else None
