"""Shared parts of the connection cycle (engine.py) and the parts it runs per incident.

These are the MDR calls they make, the counters of their work, the context
they share, and a gather that cancels the remaining tasks when one fails.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol, TypeVar

from mdr_connector.adapters.mdr.models import Asset, Attachment, Comment, HistoryEntry, Incident, Response
from mdr_connector.connector.config import ConnectionSettings
from mdr_connector.connector.mappingfile import Mapping
from mdr_connector.connector.store import Link, Store
from mdr_connector.connector.tickets import TicketAccount, TicketAdapter, TicketComment, TicketRef

T = TypeVar("T")


class MalformedLike(Protocol):
    record_id: str | None
    update_time: int | None
    error: str


class CommentPageLike(Protocol):
    items: list[Comment]
    malformed: list[MalformedLike]


class AttachmentPageLike(Protocol):
    items: list[Attachment]
    malformed: list[MalformedLike]


class ResponsePageLike(Protocol):
    items: list[Response]
    malformed: list[MalformedLike]


class IncidentPageLike(Protocol):
    items: list[Incident]
    malformed: list[MalformedLike]
    raw_count: int


class MdrApi(Protocol):
    """The calls the engine makes to MDR (adapters/mdr/client.py implements them)."""

    async def list_incidents(self, **filters: object) -> IncidentPageLike: ...

    async def get_incident(self, incident_id: str) -> Incident: ...

    async def list_comments(self, incident_id: str) -> CommentPageLike: ...

    async def create_comment(self, incident_id: str, text: str, markdown_to_html: bool = True) -> Comment: ...

    async def delete_comment(self, comment_id: str) -> None: ...

    async def list_attachments(self, incident_id: str) -> AttachmentPageLike: ...

    async def download_attachment(self, attachment: Attachment, destination: Path, *, max_bytes: int | None = None) -> int: ...

    async def upload_attachment(self, incident_id: str, path: Path, filename: str, caption: str = "") -> Attachment: ...

    async def list_responses(self, incident_id: str) -> ResponsePageLike: ...

    async def update_response(self, response_id: str, status: str, comment: str) -> None: ...

    async def update_responses(self, response_ids: Iterable[str], status: str, comment: str) -> None: ...

    async def get_asset(self, asset_id: str) -> Asset: ...

    async def list_history(
        self,
        *,
        min_record_time: int,
        max_record_time: int | None = None,
        incident_id: str | None = None,
        page: int = 1,
        entity_type_page_size: int = 100,
    ) -> list[HistoryEntry]: ...

    async def close_incident(self, incident_id: str, resolution_status: str, summary: str) -> None: ...

    async def create_incident(
        self,
        *,
        summary: str,
        client_description: str,
        affected_hosts: Iterable[str],
        priority: str,
        tenant_id: str = "",
    ) -> Incident: ...


async def gather_or_cancel(*awaitables: Awaitable[T]) -> list[T]:
    """Run awaitables concurrently; when one raises, cancel the rest before the error goes up.

    Plain `asyncio.gather` leaves the other tasks running after the first
    error, so they would keep writing after the caller gave up on the cycle.
    """
    tasks = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


@dataclass
class SyncStats:
    """Counters of the engine's work across cycles; the sets count each item once."""

    cycles: int = 0
    incidents_seen: set[str] = field(default_factory=set)
    tickets_created: int = 0
    tickets_linked: int = 0
    tickets_updated: int = 0
    comments_to_ticket: int = 0
    comments_to_mdr: int = 0
    comment_notes: int = 0
    attachments_to_ticket: int = 0
    attachments_to_mdr: int = 0
    attachments_filtered: int = 0
    responses_shown: int = 0
    response_decisions: int = 0
    commands_refused: int = 0
    statuses_to_ticket: int = 0
    incidents_closed: int = 0
    incidents_created: int = 0
    echoes_suppressed: set[str] = field(default_factory=set)
    restricted_skipped: set[str] = field(default_factory=set)
    failures: int = 0


class ReadWithRetry(Protocol):
    """A read call run under the engine's read retry policy."""

    async def __call__(self, call: Callable[[], Awaitable[T]]) -> T: ...


@dataclass
class SyncContext:
    """State that every part of a reconciliation shares: settings, ledger, both sides, counters and clock.

    ConnectionSync (engine.py) builds one per connection and sets
    `own_account` when it opens.
    """

    settings: ConnectionSettings
    mapping: Mapping
    store: Store
    mdr: MdrApi
    tickets: TicketAdapter
    stats: SyncStats
    read: ReadWithRetry
    clock: Callable[[], datetime]
    # Large files are spooled here (inside the data folder) and removed afterwards.
    spool_dir: Path
    own_account: TicketAccount | None = None
    # Ticket comments by ticket id, read once per reconciliation and shared by
    # its parts. The engine drops an entry when the reconciliation ends.
    comment_snapshots: dict[str, list[TicketComment]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.settings.name

    async def ticket_comments(self, ref: TicketRef) -> list[TicketComment]:
        """Return the ticket's comments as first read in this reconciliation, reading them when not read yet.

        A comment added after that read changes the ticket's `updated`, so the
        ticket change search brings the incident back and no comment is missed.
        """
        snapshot = self.comment_snapshots.get(ref.id)
        if snapshot is None:
            snapshot = await self.read(lambda: self.tickets.list_comments(ref))
            self.comment_snapshots[ref.id] = snapshot
        return snapshot


class IncidentPart(Protocol):
    """One kind of object reconciled for a linked incident: attachments, responses, status.

    `sync` raises ItemError when some of its items failed, after doing the
    rest. The engine runs every part, then parks the incident once.
    """

    label: str

    async def sync(self, incident: Incident, link: Link, ref: TicketRef) -> None: ...


class CycleStep(Protocol):
    """Work of a cycle that is not about one known incident, such as tickets that ask for a new incident."""

    label: str

    async def run(self) -> None: ...
