"""Operator commands and ledger retention.

- A dry run runs one real cycle against proxies of the MDR client and the
  ticket adapter. Reads reach both systems, except attachment downloads,
  which are skipped. Every write is reported instead of sent, with a
  placeholder result so the cycle goes on. The
  cycle keeps its ledger in a throwaway SQLite copy of the connection's
  rows, so the real ledger is only read.
- `resync` reconciles one incident at once, `link` and `unlink` repair a
  pairing by hand, and `trace` collects the ledger's record of one incident.
- `LedgerRetention` is a cycle step that deletes the ledger rows of
  incidents closed long ago.

The CLI side (parsers, printing, translations) is in cli_operations.py.
"""

from __future__ import annotations

import itertools
import logging
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from mdr_connector.adapters.mdr.client import AttachmentPage, CommentPage, ResponsePage
from mdr_connector.adapters.mdr.models import Attachment, Comment, Incident
from mdr_connector.connector.config import ConnectionSettings, Settings
from mdr_connector.connector.engine import HISTORY_CURSOR, INCIDENT, MDR_CURSOR, ConnectionSync
from mdr_connector.connector.errors import InvalidPayloadError, ItemError
from mdr_connector.connector.i18n import N_
from mdr_connector.connector.mappingfile import load_mapping
from mdr_connector.connector.status import CLOSED
from mdr_connector.connector.store import (
    PENDING,
    Cursor,
    DeletedRows,
    Link,
    ParkedItem,
    ResponseDecision,
    Store,
    SyncedItem,
    utc_now,
)
from mdr_connector.connector.sync_common import (
    AttachmentPageLike,
    CommentPageLike,
    IncidentPageLike,
    MdrApi,
    ResponsePageLike,
    SyncContext,
    SyncStats,
)
from mdr_connector.connector.ticket_requests import PARKED_REQUEST, request_scope
from mdr_connector.connector.tickets import (
    AttachmentUpload,
    CommentDraft,
    TicketAccount,
    TicketAdapter,
    TicketAttachment,
    TicketCapabilities,
    TicketChange,
    TicketComment,
    TicketDraft,
    TicketFields,
    TicketQuery,
    TicketRef,
    TicketState,
    system_title,
)

log = logging.getLogger(__name__)

# The cursor row that stores when retention last ran, as an ISO 8601 UTC time.
RETENTION_CURSOR = "retention"
RETENTION_INTERVAL = timedelta(days=1)
# The cursor row where mode new_only keeps the creation time before which incidents are ignored.
CREATION_FLOOR_CURSOR = "mdr_creation_floor"
# Incidents pruned per transaction.
RETENTION_BATCH = 200
# Placeholder ids of objects a dry run would create start with this.
DRY_RUN_PREFIX = "dry-run"
EXCERPT_CHARACTERS = 120
TICKET_SIDE = "ticket"
MDR_SIDE = "mdr"
# Texts of a planned write that its log line leaves out: they are incident content, not ids.
UNLOGGED_DETAILS = frozenset({"excerpt", "summary", "comment", "hosts"})

INCIDENT_LINKED_ELSEWHERE = N_(
    "MDR incident {incident_id} is already linked to {ticket_key}, not {requested_key}; "
    "run `mdr-connector unlink -- {incident_id}` first to pair it with {requested_key}"
)
INCIDENT_LINK_PENDING = N_(
    "MDR incident {incident_id} has a pending link: a ticket create was sent and its outcome is not known yet; "
    "wait for the next cycle, or run `mdr-connector unlink --force -- {incident_id}` first"
)
TICKET_LINKED_ELSEWHERE = N_(
    "{ticket_key} is already linked to MDR incident {other_incident_id}, not {incident_id}; "
    "run `mdr-connector unlink -- {other_incident_id}` first to pair the ticket with {incident_id}"
)
TICKET_NOT_FOUND = N_("{system} has no ticket {ticket_key}, or the connector's account cannot see it")
NOT_LINKED = N_("MDR incident {incident_id} has no link in connection {connection}; nothing to unlink")
UNLINK_PENDING = N_(
    "the link of MDR incident {incident_id} is pending: a ticket create was sent and its outcome is not known, "
    "so the ticket may exist; wait for the next cycle, or pass --force to remove the link anyway"
)
ISSUE_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_]*-[1-9][0-9]{0,17}$")


# Dry run


@dataclass(frozen=True)
class PlannedWrite:
    """A write that a dry run reports instead of sending.

    `side` is `mdr` or `ticket`, `operation` the client or adapter method,
    and `detail` the values that the CLI message about it shows.
    """

    side: str
    operation: str
    detail: dict[str, str]


def excerpt(text: str) -> str:
    """Return the first words of `text` on one line, cut to EXCERPT_CHARACTERS."""
    flat = " ".join(text.split())
    if len(flat) <= EXCERPT_CHARACTERS:
        return flat
    return flat[: EXCERPT_CHARACTERS - 1].rstrip() + "…"


class WriteRecorder:
    """Collects the writes of one dry run, hands each to `report`, and numbers the placeholder ids."""

    def __init__(self, connection: str, report: Callable[[PlannedWrite], None]) -> None:
        self.connection = connection
        self.report = report
        self.writes: list[PlannedWrite] = []
        # Sizes of the downloads that were skipped, by spool path, for the upload that follows.
        self.spooled: dict[Path, int] = {}
        self._numbers = itertools.count(1)

    def record(self, side: str, operation: str, **detail: object) -> None:
        write = PlannedWrite(side, operation, {name: str(value) for name, value in detail.items()})
        self.writes.append(write)
        ids = {name: value for name, value in write.detail.items() if name not in UNLOGGED_DETAILS}
        log.info("dry_run.write", extra={"connection": self.connection, "side": side, "operation": operation, **ids})
        self.report(write)

    def placeholder(self, kind: str) -> str:
        return f"{DRY_RUN_PREFIX}-{kind}-{next(self._numbers)}"


def _now_ms() -> int:
    return int(time.time() * 1000)


class DryRunMdr:
    """An MdrApi that reads from MDR and reports every write instead of sending it.

    Comments and files it pretends to add show up in later list calls, and
    incidents it pretends to create can be read back, so later calls
    of one cycle return its own pretend writes. Attachment downloads are skipped: the size the
    record lists is returned and no file is written.
    """

    def __init__(self, inner: MdrApi, recorder: WriteRecorder, author_name: str) -> None:
        self.inner = inner
        self.recorder = recorder
        self.author_name = author_name
        self.created_incidents: dict[str, Incident] = {}
        self.added_comments: dict[str, list[Comment]] = {}
        self.deleted_comments: set[str] = set()
        self.added_attachments: dict[str, list[Attachment]] = {}

    # Reads

    async def list_incidents(self, **filters: object) -> IncidentPageLike:
        return await self.inner.list_incidents(**filters)

    async def get_incident(self, incident_id: str) -> Incident:
        created = self.created_incidents.get(incident_id)
        if created is not None:
            return created
        return await self.inner.get_incident(incident_id)

    async def list_comments(self, incident_id: str) -> CommentPageLike:
        added = self.added_comments.get(incident_id, [])
        if incident_id in self.created_incidents:
            return CommentPage(items=list(added))
        page = await self.inner.list_comments(incident_id)
        remaining = [comment for comment in page.items if comment.comment_id not in self.deleted_comments]
        return CommentPage(items=[*remaining, *added], malformed=list(page.malformed))

    async def list_attachments(self, incident_id: str) -> AttachmentPageLike:
        added = self.added_attachments.get(incident_id, [])
        if incident_id in self.created_incidents:
            return AttachmentPage(items=list(added))
        page = await self.inner.list_attachments(incident_id)
        return AttachmentPage(items=[*page.items, *added], malformed=list(page.malformed))

    async def download_attachment(
        self, attachment: Attachment, destination: Path, *, max_bytes: int | None = None
    ) -> int:
        if max_bytes is not None and attachment.file_size > max_bytes:
            # The same check the client makes before it sends the request.
            raise InvalidPayloadError(
                f"MDR attachment {attachment.attachment_id} ({attachment.full_name!r}) has {attachment.file_size} "
                f"bytes, more than the limit of {max_bytes} bytes; raise the limit to copy it"
            )
        self.recorder.spooled[destination] = attachment.file_size
        return attachment.file_size

    async def list_responses(self, incident_id: str) -> ResponsePageLike:
        if incident_id in self.created_incidents:
            return ResponsePage()
        return await self.inner.list_responses(incident_id)

    async def get_asset(self, asset_id: str) -> Any:
        return await self.inner.get_asset(asset_id)

    async def list_history(self, **query: Any) -> Any:
        return await self.inner.list_history(**query)

    # Writes

    async def create_comment(self, incident_id: str, text: str, markdown_to_html: bool = True) -> Comment:
        self.recorder.record(MDR_SIDE, "create_comment", incident_id=incident_id, excerpt=excerpt(text))
        comment = Comment(
            comment_id=self.recorder.placeholder("comment"),
            author_name=self.author_name,
            text=text,
            creation_time=_now_ms(),
        )
        self.added_comments.setdefault(incident_id, []).append(comment)
        return comment

    async def delete_comment(self, comment_id: str) -> None:
        self.recorder.record(MDR_SIDE, "delete_comment", comment_id=comment_id)
        self.deleted_comments.add(comment_id)

    async def upload_attachment(self, incident_id: str, path: Path, filename: str, caption: str = "") -> Attachment:
        size = self.recorder.spooled.pop(path, 0)
        self.recorder.record(MDR_SIDE, "upload_attachment", incident_id=incident_id, filename=filename, size=size)
        attachment = Attachment(
            attachment_id=self.recorder.placeholder("attachment"),
            full_name=filename,
            file_size=size,
            author_name=self.author_name,
            caption=caption,
            creation_time=_now_ms(),
        )
        self.added_attachments.setdefault(incident_id, []).append(attachment)
        return attachment

    async def update_response(self, response_id: str, status: str, comment: str) -> None:
        await self.update_responses([response_id], status, comment)

    async def update_responses(self, response_ids: Iterable[str], status: str, comment: str) -> None:
        self.recorder.record(
            MDR_SIDE, "update_responses", response_ids=", ".join(response_ids), status=status, comment=excerpt(comment)
        )

    async def close_incident(self, incident_id: str, resolution_status: str, summary: str) -> None:
        self.recorder.record(
            MDR_SIDE, "close_incident", incident_id=incident_id, resolution=resolution_status, summary=excerpt(summary)
        )

    async def create_incident(
        self,
        *,
        summary: str,
        client_description: str,
        affected_hosts: Iterable[str],
        priority: str,
        tenant_id: str = "",
    ) -> Incident:
        hosts = list(affected_hosts)
        self.recorder.record(
            MDR_SIDE, "create_incident", summary=excerpt(summary), priority=priority, hosts=", ".join(hosts)
        )
        now = _now_ms()
        incident = Incident(
            incident_id=self.recorder.placeholder("incident"),
            incident_number=0,
            summary=summary,
            priority=priority,
            status="Open",
            creation_time=now,
            update_time=now,
            client_description=client_description,
            affected_hosts=hosts,
        )
        self.created_incidents[incident.incident_id] = incident
        return incident


class DryRunTickets:
    """A TicketAdapter that reads from the ticket system and reports every write instead of sending it.

    A ticket it pretends to create gets the key `<project>-NEW<n>`, which
    no real ticket can have, and reads of it return what the dry run added.
    Attachment downloads are skipped like those of DryRunMdr.
    """

    def __init__(self, inner: TicketAdapter, recorder: WriteRecorder) -> None:
        self.inner = inner
        self.recorder = recorder
        self.own_account: TicketAccount | None = None
        self.created: dict[str, TicketRef] = {}
        self.added_comments: dict[str, list[TicketComment]] = {}
        self.edited_comments: dict[str, TicketComment] = {}
        self.added_attachments: dict[str, list[TicketAttachment]] = {}
        self._new_tickets = itertools.count(1)

    @property
    def system(self) -> str:
        return self.inner.system

    @property
    def capabilities(self) -> TicketCapabilities:
        return self.inner.capabilities

    # Reads

    async def open(self) -> TicketAccount:
        self.own_account = await self.inner.open()
        return self.own_account

    async def close(self) -> None:
        await self.inner.close()

    async def find_ticket(self, incident_id: str) -> TicketRef | None:
        return await self.inner.find_ticket(incident_id)

    async def find_incident_tickets(self, incident_ids: Sequence[str]) -> dict[str, TicketRef]:
        return await self.inner.find_incident_tickets(incident_ids)

    async def get_ticket(self, key: str) -> TicketRef | None:
        return await self.inner.get_ticket(key)

    async def list_comments(self, ref: TicketRef) -> list[TicketComment]:
        added = self.added_comments.get(ref.id, [])
        if ref.id in self.created:
            return list(added)
        comments = await self.inner.list_comments(ref)
        return [self.edited_comments.get(comment.id, comment) for comment in comments] + added

    async def changed_tickets(self, since: datetime) -> list[TicketChange]:
        return await self.inner.changed_tickets(since)

    async def check(self, issue_type: str, priorities: Iterable[str], project: str | None = None) -> list[str]:
        return await self.inner.check(issue_type, priorities, project)

    def search_delay_seconds(self) -> float:
        return self.inner.search_delay_seconds()

    async def list_attachments(self, ref: TicketRef) -> list[TicketAttachment]:
        added = self.added_attachments.get(ref.id, [])
        if ref.id in self.created:
            return list(added)
        return [*await self.inner.list_attachments(ref), *added]

    async def download_attachment(self, attachment: TicketAttachment, destination: Path) -> int:
        self.recorder.spooled[destination] = attachment.size
        return attachment.size

    async def attachment_limit(self) -> int | None:
        return await self.inner.attachment_limit()

    async def get_state(self, ref: TicketRef, field_ids: Iterable[str] = ()) -> TicketState:
        if ref.id in self.created:
            # NOTE: the status a new ticket starts in is not known without
            # creating one, so a pretend ticket has none and any mapped
            # status shows up as a move.
            return TicketState(status="", status_category="new", updated=utc_now(), values=dict.fromkeys(field_ids))
        return await self.inner.get_state(ref, field_ids)

    async def find_tickets(self, query: TicketQuery, since: datetime) -> list[TicketRef]:
        return await self.inner.find_tickets(query, since)

    async def account_groups(self, account_id: str) -> set[str]:
        return await self.inner.account_groups(account_id)

    # Writes

    async def create_ticket(self, draft: TicketDraft) -> TicketRef:
        number = next(self._new_tickets)
        ref = TicketRef(key=f"{draft.project}-NEW{number}", id=f"{DRY_RUN_PREFIX}-ticket-{number}", url="")
        self.recorder.record(
            TICKET_SIDE,
            "create_ticket",
            system=system_title(self.system),
            ticket_key=ref.key,
            project=draft.project,
            issue_type=draft.issue_type,
            incident_id=draft.incident_id,
            summary=excerpt(draft.fields.summary),
        )
        self.created[ref.id] = ref
        return ref

    async def update_ticket(self, ref: TicketRef, fields: TicketFields, skip: frozenset[str] = frozenset()) -> None:
        names = ["summary", "description", "priority", "labels", "components", *fields.extra]
        written = [name for name in names if name not in skip]
        self.recorder.record(TICKET_SIDE, "update_ticket", ticket_key=ref.key, fields=", ".join(written))

    async def add_comment(self, ref: TicketRef, draft: CommentDraft) -> TicketComment:
        self.recorder.record(
            TICKET_SIDE,
            "add_comment",
            ticket_key=ref.key,
            origin=draft.marker.origin,
            source_id=draft.marker.source_id,
            excerpt=excerpt(draft.body),
        )
        comment = TicketComment(
            id=self.recorder.placeholder("comment"),
            author=self._author(),
            created=utc_now(),
            body=draft.body,
            marker=draft.marker,
        )
        self.added_comments.setdefault(ref.id, []).append(comment)
        return comment

    async def comment_length(self, body: str) -> int:
        return await self.inner.comment_length(body)

    async def edit_comment(self, ref: TicketRef, comment_id: str, draft: CommentDraft) -> TicketComment:
        self.recorder.record(
            TICKET_SIDE,
            "edit_comment",
            ticket_key=ref.key,
            comment_id=comment_id,
            origin=draft.marker.origin,
            source_id=draft.marker.source_id,
            excerpt=excerpt(draft.body),
        )
        now = utc_now()
        comment = TicketComment(
            id=comment_id, author=self._author(), created=now, body=draft.body, marker=draft.marker, updated=now
        )
        self.edited_comments[comment_id] = comment
        return comment

    async def upload_attachment(self, ref: TicketRef, upload: AttachmentUpload) -> TicketAttachment:
        self.recorder.spooled.pop(upload.path, None)
        self.recorder.record(
            TICKET_SIDE, "upload_attachment", ticket_key=ref.key, filename=upload.filename, size=upload.size
        )
        attachment = TicketAttachment(
            id=self.recorder.placeholder("attachment"),
            filename=upload.filename,
            size=upload.size,
            author=self._author(),
            created=utc_now(),
            content_type=upload.content_type,
        )
        self.added_attachments.setdefault(ref.id, []).append(attachment)
        return attachment

    async def transition_to(self, ref: TicketRef, status: str) -> None:
        self.recorder.record(TICKET_SIDE, "transition_to", ticket_key=ref.key, status=status)

    async def set_correlation(self, ref: TicketRef, incident_id: str) -> None:
        self.recorder.record(TICKET_SIDE, "set_correlation", ticket_key=ref.key, incident_id=incident_id)

    def _author(self) -> TicketAccount:
        if self.own_account is None:
            raise RuntimeError("open() the dry-run ticket adapter before writing")
        return self.own_account


@dataclass
class DryRunResult:
    """The counters and the reported writes of one dry-run cycle of a connection."""

    stats: SyncStats
    writes: list[PlannedWrite]
    copied_rows: dict[str, int]


async def open_ledger_for_reading(settings: Settings) -> Store | None:
    """Open the ledger without applying migrations; None when its SQLite file does not exist yet.

    A missing SQLite file means an empty ledger, and opening it would create the file.
    """
    url = settings.resolved_database_url()
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and not Path(parsed.database).exists():
        return None
    return await Store.open(url, upgrade=False)


async def dry_run_cycle(
    settings: Settings,
    connection: ConnectionSettings,
    ledger: Store | None,
    report: Callable[[PlannedWrite], None],
    *,
    mdr_factory: Callable[[ConnectionSettings], Any] | None = None,
) -> DryRunResult:
    """Run one cycle of a connection that sends no write and leaves `ledger` as it was.

    The cycle works on a SQLite copy of the connection's ledger rows in a
    temporary folder inside `data_dir`, which is deleted afterwards. Its
    attachment spool is in that folder too. The MDR client comes from
    `mdr_factory`, by default the connection's client, whose token pair is
    in `ledger` in cluster mode.
    """
    from mdr_connector.connector.service import build_ticket_adapter, open_mdr_client

    mapping = load_mapping(connection.mapping)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".dry-run-", dir=settings.data_dir) as folder:
        scratch = Path(folder)
        copy = await Store.open(f"sqlite+aiosqlite:///{scratch / 'ledger.db'}")
        try:
            copied = await ledger.copy_connection(copy, connection.name) if ledger is not None else {}
            recorder = WriteRecorder(connection.name, report)
            opened = mdr_factory(connection) if mdr_factory else open_mdr_client(settings, connection, ledger)
            async with opened as client:
                tickets = DryRunTickets(build_ticket_adapter(connection, mapping), recorder)
                try:
                    mdr = DryRunMdr(client, recorder, connection.mdr.connection_name)
                    sync = ConnectionSync(connection, mapping, copy, mdr, tickets, spool_dir=scratch / "spool")
                    await sync.open()
                    stats = await sync.run_cycle()
                finally:
                    await tickets.close()
        finally:
            await copy.close()
    return DryRunResult(stats=stats, writes=recorder.writes, copied_rows=copied)


# Resync


@dataclass
class ResyncResult:
    """The outcome of reconciling one incident by hand."""

    incident_id: str
    done: bool
    link: Link | None
    # The parked entry before the reconciliation, and after it when the incident still waits.
    parked_before: ParkedItem | None
    parked_after: ParkedItem | None
    counts: dict[str, int]


# The SyncStats counters a resync reports, by name.
RESYNC_COUNTERS = (
    "tickets_created",
    "tickets_linked",
    "tickets_updated",
    "comments_to_ticket",
    "comments_to_mdr",
    "attachments_to_ticket",
    "attachments_to_mdr",
    "statuses_to_ticket",
)


async def resync_incident(
    settings: Settings,
    connection: ConnectionSettings,
    store: Store,
    incident_id: str,
    *,
    wait_seconds: float = 0,
    factory: Callable[..., Any] | None = None,
) -> ResyncResult:
    """Take the connection's lock, open it as `sync` does, and reconcile one incident now."""
    from mdr_connector.connector.runner import held_lock
    from mdr_connector.connector.service import open_connection

    factory = factory or open_connection
    async with held_lock(settings, connection.name, wait_seconds, store), factory(settings, connection, store) as sync:
        return await reconcile_now(sync, incident_id)


async def reconcile_now(sync: ConnectionSync, incident_id: str) -> ResyncResult:
    """Reconcile one incident regardless of the cursors and its parked entry, and unpark it when it is in line.

    A failure is raised as it is and leaves the parked entry unchanged, so
    a mistyped id is not retried by every later cycle.
    """
    parked_before = await sync.store.get_parked(sync.name, INCIDENT, incident_id)
    before = {name: getattr(sync.stats, name) for name in RESYNC_COUNTERS}

    done = await sync.reconcile(incident_id)

    if done:
        await sync.store.unpark(sync.name, INCIDENT, incident_id)
    counts = {name: getattr(sync.stats, name) - before[name] for name in RESYNC_COUNTERS}
    log.info(
        "operations.resync.finished",
        extra={"connection": sync.name, "incident_id": incident_id, "done": done, **counts},
    )
    return ResyncResult(
        incident_id=incident_id,
        done=done,
        link=await sync.store.get_link(sync.name, incident_id),
        parked_before=parked_before,
        parked_after=await sync.store.get_parked(sync.name, INCIDENT, incident_id),
        counts=counts,
    )


# Link and unlink


@dataclass
class LinkResult:
    """A link made by hand, or found already in place (`changed` False)."""

    link: Link
    changed: bool


async def link_incident(
    settings: Settings,
    connection: ConnectionSettings,
    store: Store,
    incident_id: str,
    ticket_key: str,
    *,
    wait_seconds: float = 0,
    mdr_factory: Callable[[ConnectionSettings], Any] | None = None,
) -> LinkResult:
    """Pair an MDR incident with an existing ticket under the connection's lock.

    The incident is read from MDR and the ticket looked up by key first.
    A pairing that conflicts with the ledger is rejected with both sides
    named. The ticket is stamped with the incident's correlation marker
    before the link is recorded, so a crash in between leaves a ticket
    that the next reconciliation finds and links anyway.
    """
    from mdr_connector.connector.runner import held_lock
    from mdr_connector.connector.service import build_ticket_adapter, open_mdr_client

    async with held_lock(settings, connection.name, wait_seconds, store):
        existing = await store.get_link(connection.name, incident_id)
        reject_conflicting_link(existing, incident_id, ticket_key)
        if existing is not None:
            return LinkResult(existing, changed=False)

        mapping = load_mapping(connection.mapping)
        opened = mdr_factory(connection) if mdr_factory else open_mdr_client(settings, connection, store)
        async with opened as mdr:
            incident = await mdr.get_incident(incident_id)
        tickets = build_ticket_adapter(connection, mapping)
        try:
            await tickets.open()
            ref = await tickets.get_ticket(ticket_key)
            if ref is None:
                raise ItemError.from_template(TICKET_NOT_FOUND, system=system_title(tickets.system), ticket_key=ticket_key)
            owners = await store.get_links_by_ticket_ids(connection.name, [ref.id])
            other = owners.get(ref.id)
            if other is not None and other.incident_id != incident_id:
                raise ItemError.from_template(
                    TICKET_LINKED_ELSEWHERE,
                    ticket_key=ref.key,
                    other_incident_id=other.incident_id,
                    incident_id=incident_id,
                )
            await tickets.set_correlation(ref, incident_id)
        finally:
            await tickets.close()

        link = await store.record_link(
            connection.name,
            incident_id,
            incident.incident_number,
            ticket_key=ref.key,
            ticket_id=ref.id,
            ticket_url=ref.url,
            fields_hash=None,
        )
        log.info(
            "operations.link.recorded",
            extra={"connection": connection.name, "incident_id": incident_id, "ticket_key": ref.key},
        )
        return LinkResult(link, changed=True)


def reject_conflicting_link(existing: Link | None, incident_id: str, ticket_key: str) -> None:
    """Raise ItemError when the incident has a pending link or a link to another ticket than `ticket_key`."""
    if existing is None:
        return
    if existing.state == PENDING:
        raise ItemError.from_template(INCIDENT_LINK_PENDING, incident_id=incident_id)
    if (existing.ticket_key or "").upper() != ticket_key.upper():
        raise ItemError.from_template(
            INCIDENT_LINKED_ELSEWHERE, incident_id=incident_id, ticket_key=existing.ticket_key, requested_key=ticket_key
        )


async def unlink_incident(
    settings: Settings,
    connection: ConnectionSettings,
    store: Store,
    incident_id: str,
    *,
    force: bool = False,
    wait_seconds: float = 0,
) -> DeletedRows:
    """Delete the link of an incident, its synced items and its parked entry under the connection's lock.

    MDR and the ticket are not touched, and response decisions stay as the
    audit record. The rows of a ticket's incident request stay too,
    because they keep that ticket from creating a second incident.
    """
    from mdr_connector.connector.runner import held_lock

    async with held_lock(settings, connection.name, wait_seconds, store):
        link = await store.get_link(connection.name, incident_id)
        if link is None:
            raise ItemError.from_template(NOT_LINKED, incident_id=incident_id, connection=connection.name)
        if link.state == PENDING and not force:
            raise ItemError.from_template(UNLINK_PENDING, incident_id=incident_id)

        deleted = await store.delete_incidents(connection.name, [incident_id], parked=[(INCIDENT, incident_id)])
        log.info(
            "operations.unlink.done",
            extra={
                "connection": connection.name,
                "incident_id": incident_id,
                "ticket_key": link.ticket_key,
                "synced_items": len(deleted.items),
                "parked_items": len(deleted.parked),
                "forced": force,
            },
        )
        return deleted


# Trace


@dataclass
class LiveIncident:
    """The incident as MDR returns it now, read by `trace --live`."""

    update_time: int
    status: str
    # None when nothing was reconciled yet.
    newer_than_reconciled: bool | None
    # The sync filters that keep an unlinked incident from getting a ticket:
    # status, priority, tenant, creation_time (mode new_only).
    skipped_by: list[str]


@dataclass
class CursorPosition:
    """The position of the incident's last known MDR change relative to the MDR change cursor.

    `position` is one of:
    - `unknown`: no change time is known.
    - `no_cursor`: no cycle ran yet.
    - `ahead`: the next cycle reads the change.
    - `overlap`: the change is behind the cursor, but the next cycle reads it again in the overlap window.
    - `behind`: no cycle reads this change again.
    """

    cursor_name: str
    cursor_ms: int | None
    overlap_ms: int
    change_ms: int | None
    # `reconciled` (the link's time) or `live` (read from MDR).
    change_source: str
    position: str


@dataclass
class Trace:
    """The ledger rows of one incident, and the position of its last MDR change against the MDR change cursor."""

    connection: str
    incident_id: str
    link: Link | None
    items: list[SyncedItem]
    parked: list[ParkedItem]
    decisions: list[ResponseDecision]
    cursors: list[Cursor]
    cursor_position: CursorPosition
    live: LiveIncident | None = None

    @property
    def empty(self) -> bool:
        return self.link is None and not self.items and not self.parked and not self.decisions


async def build_trace(
    store: Store, connection: ConnectionSettings, incident_id: str, live_incident: Incident | None = None
) -> Trace:
    """Collect the ledger rows of one incident; `live_incident` is the incident read from MDR, for `--live`."""
    name = connection.name
    link = await store.get_link(name, incident_id)
    items = await store.list_incident_items(name, incident_id)
    parked = [await store.get_parked(name, INCIDENT, incident_id)]
    if link is not None and link.ticket_id:
        # A ticket that requested this incident files its rows under its own scope.
        request = TicketRef(key=link.ticket_key or "", id=link.ticket_id, url=link.ticket_url or "")
        items += await store.list_incident_items(name, request_scope(request))
        parked.append(await store.get_parked(name, PARKED_REQUEST, link.ticket_id))
    items.sort(key=lambda item: (item.attempt_started_at, item.id))

    cursors = await store.list_cursors(name)
    live = live_view(connection, cursors, link, live_incident) if live_incident is not None else None
    return Trace(
        connection=name,
        incident_id=incident_id,
        link=link,
        items=items,
        parked=[entry for entry in parked if entry is not None],
        decisions=await store.list_decisions(name, incident_id=incident_id),
        cursors=cursors,
        cursor_position=cursor_position(connection, cursors, link, live),
        live=live,
    )


def empty_trace(connection: ConnectionSettings, incident_id: str, live_incident: Incident | None = None) -> Trace:
    """Return the trace of an incident when the ledger does not exist yet."""
    live = live_view(connection, [], None, live_incident) if live_incident is not None else None
    return Trace(
        connection=connection.name,
        incident_id=incident_id,
        link=None,
        items=[],
        parked=[],
        decisions=[],
        cursors=[],
        cursor_position=cursor_position(connection, [], None, live),
        live=live,
    )


def live_view(
    connection: ConnectionSettings, cursors: list[Cursor], link: Link | None, incident: Incident
) -> LiveIncident:
    """Compare the incident as MDR returns it with the ledger and the connection's filters."""
    reconciled = link.mdr_update_time if link is not None else None
    filters = connection.sync.filters
    skipped_by = []
    if filters.statuses and incident.status not in filters.statuses:
        skipped_by.append("status")
    if filters.priorities and incident.priority not in filters.priorities:
        skipped_by.append("priority")
    if filters.tenants and incident.tenant_name not in filters.tenants:
        skipped_by.append("tenant")
    floor = next((cursor.value for cursor in cursors if cursor.side == CREATION_FLOOR_CURSOR), None)
    new_only = connection.sync.mode == "new_only"
    if new_only and floor is not None and floor.isdigit() and incident.creation_time < int(floor):
        skipped_by.append("creation_time")
    return LiveIncident(
        update_time=incident.update_time,
        status=incident.status,
        newer_than_reconciled=None if reconciled is None else incident.update_time > reconciled,
        skipped_by=skipped_by,
    )


def cursor_position(
    connection: ConnectionSettings, cursors: list[Cursor], link: Link | None, live: LiveIncident | None
) -> CursorPosition:
    """Compare the incident's last MDR change, live or as reconciled, with the MDR change cursor."""
    sync = connection.sync
    cursor_name = HISTORY_CURSOR if sync.change_source == "history" else MDR_CURSOR
    stored = next((cursor.value for cursor in cursors if cursor.side == cursor_name), None)
    cursor_ms = int(stored) if stored is not None and stored.lstrip("-").isdigit() else None
    overlap_ms = int(sync.mdr_overlap_seconds * 1000)
    if live is not None:
        change_ms, change_source = live.update_time, "live"
    else:
        change_ms, change_source = (link.mdr_update_time if link is not None else None), "reconciled"

    if change_ms is None:
        position = "unknown"
    elif cursor_ms is None:
        position = "no_cursor"
    elif change_ms > cursor_ms:
        position = "ahead"
    elif change_ms > cursor_ms - overlap_ms:
        position = "overlap"
    else:
        position = "behind"
    return CursorPosition(cursor_name, cursor_ms, overlap_ms, change_ms, change_source, position)


async def read_live_incident(settings: Settings, connection: ConnectionSettings, incident_id: str) -> Incident:
    """Read the incident from MDR for `trace --live`."""
    from mdr_connector.connector.service import open_mdr_client

    async with open_mdr_client(settings, connection) as mdr:
        return await mdr.get_incident(incident_id)


def iso(moment: datetime | None) -> str | None:
    return moment.astimezone(timezone.utc).isoformat() if moment is not None else None


def epoch_iso(milliseconds: int | None) -> str | None:
    if milliseconds is None:
        return None
    return datetime.fromtimestamp(milliseconds / 1000, tz=timezone.utc).isoformat()


def trace_document(trace: Trace) -> dict[str, Any]:
    """Return the trace as JSON-ready data, every time in ISO 8601 UTC, MDR times also in epoch milliseconds."""
    link = trace.link
    position = trace.cursor_position
    return {
        "connection": trace.connection,
        "incident_id": trace.incident_id,
        "link": None
        if link is None
        else {
            "state": link.state,
            "incident_number": link.incident_number,
            "ticket_key": link.ticket_key,
            "ticket_id": link.ticket_id,
            "ticket_url": link.ticket_url,
            "created_at": iso(link.created_at),
            "updated_at": iso(link.updated_at),
            "create_started_at": iso(link.create_started_at),
            "mdr_update_time": link.mdr_update_time,
            "mdr_update_time_iso": epoch_iso(link.mdr_update_time),
            "ticket_updated": iso(link.ticket_updated),
            "mdr_status": link.mdr_status,
            "ticket_status": link.ticket_status,
        },
        "items": [
            {
                "kind": item.kind,
                "direction": item.direction,
                "source_id": item.source_id,
                "target_id": item.target_id,
                "state": item.state,
                "started_at": iso(item.attempt_started_at),
                "done_at": iso(item.done_at),
                "source_version": item.source_version,
            }
            for item in trace.items
        ],
        "parked": [
            {
                "kind": entry.kind,
                "item_id": entry.item_id,
                "reason": entry.reason,
                "attempts": entry.attempts,
                "first_failed_at": iso(entry.first_failed_at),
                "last_failed_at": iso(entry.last_failed_at),
                "next_try_at": iso(entry.next_try_at),
            }
            for entry in trace.parked
        ],
        "decisions": [
            {
                "response_id": decision.response_id,
                "decision": decision.decision,
                "actor_id": decision.actor_id,
                "actor_name": decision.actor_name,
                "source": decision.source,
                "source_id": decision.source_id,
                "reason": decision.reason,
                "outcome": decision.outcome,
                "error": decision.error,
                "decided_at": iso(decision.decided_at),
                "sent_at": iso(decision.sent_at),
            }
            for decision in trace.decisions
        ],
        "cursors": {
            cursor.side: {"value": cursor.value, "updated_at": iso(cursor.updated_at)} for cursor in trace.cursors
        },
        "cursor_position": {
            "cursor": position.cursor_name,
            "cursor_ms": position.cursor_ms,
            "cursor_iso": epoch_iso(position.cursor_ms),
            "overlap_ms": position.overlap_ms,
            "change_ms": position.change_ms,
            "change_iso": epoch_iso(position.change_ms),
            "change_source": position.change_source,
            "position": position.position,
        },
        "live": None
        if trace.live is None
        else {
            "update_time": trace.live.update_time,
            "update_time_iso": epoch_iso(trace.live.update_time),
            "status": trace.live.status,
            "newer_than_reconciled": trace.live.newer_than_reconciled,
            "skipped_by": trace.live.skipped_by,
        },
    }


# Retention


@dataclass
class PruneCounts:
    """Rows deleted by one retention run."""

    incidents: int = 0
    synced_items: int = 0
    parked_items: int = 0
    response_decisions: int = 0

    def add(self, deleted: DeletedRows) -> None:
        self.incidents += len(deleted.links)
        self.synced_items += len(deleted.items)
        self.parked_items += len(deleted.parked)
        self.response_decisions += len(deleted.decisions)


class LedgerRetention:
    """A cycle step that deletes the ledger rows of incidents closed long ago, at most once a day.

    An incident qualifies when its link records the MDR status Closed, the
    link has not changed for `retention_days`, and its last MDR change is
    behind the MDR change cursor and its overlap. The link, the synced
    items, the parked entries and the response decisions of the incident
    go, and so do the rows of a ticket's incident request.

    NOTE: an incident that changes again after it was pruned is linked
    again through its ticket's marker. Its comments are matched
    by their markers, but files carry no marker, so attachments copied
    before are copied again.
    """

    label = "retention"

    def __init__(self, context: SyncContext) -> None:
        self.context = context
        self.name = context.name

    async def run(self) -> None:
        days = self.context.settings.sync.retention_days
        if days is None:
            return
        store = self.context.store
        now = self.context.clock()
        last_run = await store.get_cursor(self.name, RETENTION_CURSOR)
        if last_run is not None and not self._due(datetime.fromisoformat(last_run), now):
            return

        counts = await self.prune(now - timedelta(days=days))

        await store.set_cursor(self.name, RETENTION_CURSOR, now.isoformat())
        log.info(
            "sync.retention.pruned",
            extra={
                "connection": self.name,
                "retention_days": days,
                "incidents": counts.incidents,
                "synced_items": counts.synced_items,
                "parked_items": counts.parked_items,
                "response_decisions": counts.response_decisions,
            },
        )

    @staticmethod
    def _due(last_run: datetime, now: datetime) -> bool:
        # A last run in the future means the clock went back: run rather than wait for it.
        return last_run > now or now - last_run >= RETENTION_INTERVAL

    async def prune(self, updated_before: datetime) -> PruneCounts:
        """Delete closed incidents whose link last changed before `updated_before`, in batches.

        An incident whose last reconciled MDR change is not older than the
        MDR change cursor minus its overlap is kept: the next cycle reads
        that change again, and without a link it would treat the incident as new.
        """
        store = self.context.store
        counts = PruneCounts()
        settings = self.context.settings.sync
        cursor_name = HISTORY_CURSOR if settings.change_source == "history" else MDR_CURSOR
        cursor = await store.get_cursor(self.name, cursor_name)
        if cursor is None or not cursor.isdigit():
            return counts
        reconciled_before = int(cursor) - int(settings.mdr_overlap_seconds * 1000)

        while True:
            links = await store.closed_links(
                self.name,
                mdr_status=CLOSED,
                updated_before=updated_before,
                reconciled_before=reconciled_before,
                limit=RETENTION_BATCH,
            )
            if not links:
                return counts
            deleted = await store.delete_incidents(
                self.name,
                [link.incident_id for link in links],
                parked=retention_parked_keys(links),
                item_scopes=retention_request_scopes(links),
                with_decisions=True,
            )
            counts.add(deleted)
            if len(links) < RETENTION_BATCH or not deleted.links:
                return counts


def retention_parked_keys(links: list[Link]) -> list[tuple[str, str]]:
    """Return the parked entries of pruned incidents: the incident's own and its ticket's request."""
    keys = [(INCIDENT, link.incident_id) for link in links]
    keys += [(PARKED_REQUEST, link.ticket_id) for link in links if link.ticket_id]
    return keys


def retention_request_scopes(links: list[Link]) -> list[str]:
    """Return the ledger scopes of the incident requests of the pruned incidents' tickets."""
    return [
        request_scope(TicketRef(key=link.ticket_key or "", id=link.ticket_id, url=link.ticket_url or ""))
        for link in links
        if link.ticket_id
    ]


# Helpers shared with the CLI


def is_issue_key(text: str) -> bool:
    """Tell whether `text` has the form of an issue key such as SEC-12."""
    return ISSUE_KEY.fullmatch(text) is not None

