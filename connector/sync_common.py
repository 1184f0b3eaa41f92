"""Shared parts of the connection cycle (engine.py) and the parts it runs per incident.

These are the MDR calls they make, the counters of their work, the context
they share, a gather that cancels the remaining tasks when one fails, and
the watch on the tickets that reconciliations read and write.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from mdr_connector.adapters.mdr.models import Asset, Attachment, Comment, HistoryEntry, Incident, Response
from mdr_connector.connector.config import ConnectionSettings
from mdr_connector.connector.mappingfile import Mapping
from mdr_connector.connector.store import Link, Store
from mdr_connector.connector.tickets import (
    AttachmentUpload,
    CommentDraft,
    TicketAccount,
    TicketAdapter,
    TicketAttachment,
    TicketComment,
    TicketDraft,
    TicketFields,
    TicketRef,
    TicketState,
)

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
    # Ticket changes that a read showed to be the connector's own writes only, so no reconciliation ran for them.
    own_writes_confirmed: int = 0
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
    # Ids of the tickets this process created whose status the status part
    # has not synced yet. Only these are known to be untouched since the create.
    created_tickets: set[str] = field(default_factory=set)

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


# The watch on tickets: what a reconciliation read of its ticket and wrote there.
#
# The connector's own writes move a ticket's `updated`, so the ticket change
# search brings every ticket it wrote back to the engine. A full second
# reconciliation for that costs as many calls as the first one spent on
# reading. Instead, the ticket is read again, and when it shows exactly what
# the first reconciliation read plus what it wrote, nobody else changed it,
# and the change needs no reconciliation.

# How many finished watches wait for their ticket change. A watch dropped
# beyond this only means a full reconciliation of that ticket change.
MAX_KEPT_WATCHES = 10_000


def _text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def comment_key(comment: TicketComment, *, with_body: bool) -> tuple[Any, ...]:
    """Return what a comment is compared by: who wrote it when, its last edit, who may read it, its marker and its text.

    The text is left out for the connector's own writes, because the body
    that `add_comment` returns is the draft's Markdown, while a read
    converts what the ticket system stored.
    """
    body = _text_digest(comment.body) if with_body else None
    return (comment.author.id, comment.created, comment.updated, comment.restricted, comment.marker, body)


def attachment_key(attachment: TicketAttachment) -> tuple[Any, ...]:
    return (attachment.filename, attachment.size, attachment.author.id, attachment.created)


def state_key(state: TicketState) -> tuple[Any, ...]:
    """Return what a ticket state is compared by. `updated` is left out, because the connector's writes move it."""
    return (state.status, state.status_category, sorted(state.values.items(), key=lambda item: item[0]))


@dataclass
class TicketWatch:
    """The first read of each part of one ticket in one reconciliation, and the connector's writes there since.

    Only comments, attachments and the workflow state are watched, because
    a reconciliation reads nothing else of a ticket. A part that the
    reconciliation never read is not checked either, because a full
    reconciliation with the same settings would not read it.
    """

    incident_id: str
    ticket_id: str | None = None
    # The reconciliation wrote to the ticket, so its ticket change is expected.
    wrote: bool = False
    # The reconciliation created the ticket and has not tried to add a
    # comment or an attachment since, so that part is known to be empty and
    # its first read is not sent.
    no_comments_yet: bool = False
    no_attachments_yet: bool = False
    # A write whose effect on the watched parts is unknown, such as a
    # transition that may also set a resolution, so the ticket cannot be predicted.
    unpredictable: bool = False
    comments: dict[str, TicketComment] | None = None
    written_comments: dict[str, TicketComment] = field(default_factory=dict)
    attachments: dict[str, TicketAttachment] | None = None
    written_attachments: dict[str, TicketAttachment] = field(default_factory=dict)
    state: TicketState | None = None
    state_fields: tuple[str, ...] = ()

    def saw_comments(self, comments: list[TicketComment]) -> None:
        if self.comments is None:
            self.comments = {comment.id: comment for comment in comments}

    def saw_attachments(self, attachments: list[TicketAttachment]) -> None:
        if self.attachments is None:
            self.attachments = {attachment.id: attachment for attachment in attachments}

    def saw_state(self, state: TicketState, field_ids: tuple[str, ...]) -> None:
        if self.state is None:
            self.state, self.state_fields = state, field_ids

    def shows_only_own_writes(
        self,
        comments: list[TicketComment],
        attachments: list[TicketAttachment] | None,
        state: TicketState | None,
    ) -> bool:
        """Tell whether a later read equals the first reads plus the connector's writes, so nobody else changed the ticket.

        `attachments` and `state` are the later reads of the parts this
        watch read, and None for the parts it did not read.
        """
        if self.unpredictable or self.comments is None:
            return False
        if self._expected_comment_keys() != self._comment_keys(comments):
            return False
        if self.attachments is not None:
            expected = {**self.attachments, **self.written_attachments}
            if attachments is None or _attachment_keys(expected.values()) != _attachment_keys(attachments):
                return False
        if self.state is not None and (state is None or state_key(self.state) != state_key(state)):
            return False
        return True

    def _expected_comment_keys(self) -> dict[str, tuple[Any, ...]]:
        """Key the first read's comments by id, each comment the connector wrote or edited as its write returned it."""
        assert self.comments is not None
        keys = self._comment_keys(self.comments.values())
        for comment_id, comment in self.written_comments.items():
            keys[comment_id] = comment_key(comment, with_body=False)
        return keys

    def _comment_keys(self, comments: Iterable[TicketComment]) -> dict[str, tuple[Any, ...]]:
        return {comment.id: comment_key(comment, with_body=comment.id not in self.written_comments) for comment in comments}


def _attachment_keys(attachments: Iterable[TicketAttachment]) -> dict[str, tuple[Any, ...]]:
    return {attachment.id: attachment_key(attachment) for attachment in attachments}


class WatchedTickets:
    """The ticket adapter as a connection's engine and parts use it: each call goes to `inner`.

    While a reconciliation watches a ticket, the reads and writes of that
    ticket are recorded in its TicketWatch. Attributes and methods not
    defined here are those of `inner`, looked up at each use.
    """

    def __init__(self, inner: TicketAdapter) -> None:
        self.inner = inner
        self._active: dict[str, TicketWatch] = {}
        self._by_ticket: dict[str, TicketWatch] = {}
        self._kept: OrderedDict[str, TicketWatch] = OrderedDict()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    # The watches

    def start_watch(self, incident_id: str) -> TicketWatch:
        """Start watching the ticket of one incident for one reconciliation. An earlier watch of the incident is dropped."""
        self._kept.pop(incident_id, None)
        watch = TicketWatch(incident_id)
        self._active[incident_id] = watch
        return watch

    def bind(self, watch: TicketWatch, ticket_id: str) -> None:
        """Name the ticket a watch is about, once the reconciliation has found or created it."""
        watch.ticket_id = ticket_id
        self._by_ticket[ticket_id] = watch

    def end_watch(self, watch: TicketWatch, *, keep: bool) -> None:
        """Stop recording. With `keep`, hold the watch until the ticket change of its writes is checked."""
        self._active.pop(watch.incident_id, None)
        if watch.ticket_id is not None and self._by_ticket.get(watch.ticket_id) is watch:
            del self._by_ticket[watch.ticket_id]
        if not keep or not watch.wrote:
            return
        self._kept[watch.incident_id] = watch
        while len(self._kept) > MAX_KEPT_WATCHES:
            self._kept.popitem(last=False)

    def take_kept(self, incident_id: str) -> TicketWatch | None:
        """Remove and return the finished watch of an incident, if one is kept."""
        return self._kept.pop(incident_id, None)

    def _of_ticket(self, ticket_id: str) -> TicketWatch | None:
        return self._by_ticket.get(ticket_id)

    # Recorded calls

    async def create_ticket(self, draft: TicketDraft) -> TicketRef:
        watch = self._active.get(draft.incident_id)
        if watch is not None:
            # Set before the call, because a create whose reply is lost may have landed.
            watch.wrote = True
        ref = await self.inner.create_ticket(draft)
        if watch is not None:
            watch.no_comments_yet = watch.no_attachments_yet = True
        return ref

    async def set_correlation(self, ref: TicketRef, incident_id: str) -> None:
        for watch in (self._active.get(incident_id), self._of_ticket(ref.id)):
            if watch is not None:
                watch.wrote = True
        await self.inner.set_correlation(ref, incident_id)

    async def update_ticket(self, ref: TicketRef, fields: TicketFields, skip: frozenset[str] = frozenset()) -> None:
        self._mark_written(ref)
        await self.inner.update_ticket(ref, fields, skip=skip)

    async def list_comments(self, ref: TicketRef) -> list[TicketComment]:
        watch = self._of_ticket(ref.id)
        if watch is not None and watch.no_comments_yet and watch.comments is None:
            # NOTE: a comment that the ticket system adds on create (an
            # automation rule) is not seen here. The check of the ticket
            # change finds it, and a full reconciliation copies it.
            watch.saw_comments([])
            return []
        comments = await self.inner.list_comments(ref)
        if watch is not None:
            watch.saw_comments(comments)
        return comments

    async def add_comment(self, ref: TicketRef, draft: CommentDraft) -> TicketComment:
        self._mark_written(ref, part="comments")
        comment = await self.inner.add_comment(ref, draft)
        watch = self._of_ticket(ref.id)
        if watch is not None:
            watch.written_comments[comment.id] = comment
        return comment

    async def edit_comment(self, ref: TicketRef, comment_id: str, draft: CommentDraft) -> TicketComment:
        self._mark_written(ref, part="comments")
        comment = await self.inner.edit_comment(ref, comment_id, draft)
        watch = self._of_ticket(ref.id)
        if watch is not None:
            watch.written_comments[comment.id] = comment
        return comment

    async def list_attachments(self, ref: TicketRef) -> list[TicketAttachment]:
        watch = self._of_ticket(ref.id)
        if watch is not None and watch.no_attachments_yet and watch.attachments is None:
            watch.saw_attachments([])
            return []
        attachments = await self.inner.list_attachments(ref)
        if watch is not None:
            watch.saw_attachments(attachments)
        return attachments

    async def upload_attachment(self, ref: TicketRef, upload: AttachmentUpload) -> TicketAttachment:
        self._mark_written(ref, part="attachments")
        attachment = await self.inner.upload_attachment(ref, upload)
        watch = self._of_ticket(ref.id)
        if watch is not None:
            watch.written_attachments[attachment.id] = attachment
        return attachment

    async def get_state(self, ref: TicketRef, field_ids: Iterable[str] = ()) -> TicketState:
        requested = tuple(field_ids)
        state = await self.inner.get_state(ref, requested)
        watch = self._of_ticket(ref.id)
        if watch is not None:
            watch.saw_state(state, requested)
        return state

    async def transition_to(self, ref: TicketRef, status: str) -> None:
        watch = self._mark_written(ref)
        if watch is not None:
            watch.unpredictable = True
        await self.inner.transition_to(ref, status)

    def _mark_written(self, ref: TicketRef, part: Literal["comments", "attachments"] | None = None) -> TicketWatch | None:
        """Record a write before it is sent, because one whose reply is lost may have landed."""
        watch = self._of_ticket(ref.id)
        if watch is None:
            return None
        watch.wrote = True
        if part == "comments":
            watch.no_comments_yet = False
        if part == "attachments":
            watch.no_attachments_yet = False
        return watch
