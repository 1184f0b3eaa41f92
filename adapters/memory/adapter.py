"""An in-memory TicketAdapter for engine tests and for CI runs without a ticket server.

It keeps the Jira adapter's rules. Tickets carry the `mdr-connector` and
`mdr-<incident id>` labels plus the incident id as metadata, comments carry
their SyncMarker, and label updates only add. A new ticket or change is
visible to `find_ticket` and `changed_tickets` only after the search delay.

    adapter = MemoryTicketAdapter(project="SEC", search_delay_seconds=60)
    account = await adapter.open()
    ref = await adapter.create_ticket(draft)
    assert await adapter.find_ticket(draft.incident_id) is None   # not indexed yet
    adapter.advance(60)
    assert await adapter.find_ticket(draft.incident_id) == ref

    adapter.add_human_comment(ref.key, "Isolated the host.")
    adapter.fail_next("add_comment", OutcomeUnknownError("reply lost"), after_write=True)
    assert adapter.writes["create_ticket"] == 1
"""

from __future__ import annotations

import logging
import re
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any

from mdr_connector.connector.errors import ConnectorError, InvalidPayloadError, RejectedError
from mdr_connector.connector.tickets import (
    CommentDraft,
    SyncMarker,
    TicketAccount,
    TicketChange,
    TicketComment,
    TicketDraft,
    TicketFields,
    TicketRef,
)

log = logging.getLogger(__name__)

CONNECTOR_LABEL = "mdr-connector"
INCIDENT_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,200}$")
DEFAULT_ACCOUNT = TicketAccount(id="mdr-connector", display_name="MDR connector")
DEFAULT_HUMAN = TicketAccount(id="analyst", display_name="SOC Analyst")


@dataclass
class MemoryTicket:
    """One ticket and its comments; `index` contains (visible from, updated) pairs for search."""

    ref: TicketRef
    incident_id: str | None
    project: str
    issue_type: str
    fields: TicketFields
    metadata: dict[str, Any]
    created: datetime
    updated: datetime
    comments: list[TicketComment] = field(default_factory=list)
    index: list[tuple[datetime, datetime]] = field(default_factory=list)


@dataclass
class _Failure:
    error: ConnectorError
    after_write: bool


class MemoryTicketAdapter:
    """TicketAdapter that keeps tickets in a dict, with helpers to act as a person and inspect."""

    system = "memory"

    def __init__(
        self,
        *,
        project: str = "SEC",
        account: TicketAccount = DEFAULT_ACCOUNT,
        search_delay_seconds: float = 0.0,
        clock: Callable[[], datetime] | None = None,
        base_url: str = "memory://tickets",
    ) -> None:
        self.project = project
        self.account = account
        self.search_delay = search_delay_seconds
        self.base_url = base_url
        self.tickets: dict[str, MemoryTicket] = {}
        self.writes: Counter[str] = Counter()
        self.opened = False
        self._clock = clock
        self._offset = timedelta()
        self._next_number = 1
        self._next_comment_id = 10000
        self._failures: dict[str, deque[_Failure]] = defaultdict(deque)

    # Test helpers

    def now(self) -> datetime:
        """Adapter time: the injected clock, or real UTC time, plus `advance` offsets."""
        base = self._clock() if self._clock else datetime.now(timezone.utc)
        return base + self._offset

    def advance(self, seconds: float) -> None:
        """Move adapter time forward, for example past the search delay."""
        self._offset += timedelta(seconds=seconds)

    def fail_next(self, operation: str, error: ConnectorError, *, after_write: bool = False) -> None:
        """Make the next call of `operation` raise `error`; with `after_write`, apply the write first."""
        self._failures[operation].append(_Failure(error, after_write))

    def ticket(self, key: str) -> MemoryTicket:
        """Return a ticket by key, raising KeyError if there is none."""
        return self.tickets[key]

    def add_human_comment(
        self,
        key: str,
        body: str,
        *,
        author: TicketAccount = DEFAULT_HUMAN,
        marker: SyncMarker | None = None,
    ) -> TicketComment:
        """Add a comment as a person in the ticket system; it moves the ticket's `updated`."""
        return self._append_comment(self.tickets[key], body, author, marker)

    def edit_ticket(self, key: str, **changes: Any) -> MemoryTicket:
        """Change fields as a person would: `summary=`, `description=`, `priority=`, `labels=`, `extra=`."""
        ticket = self.tickets[key]
        if "labels" in changes:
            changes["labels"] = tuple(changes["labels"])
        ticket.fields = replace(ticket.fields, **changes)
        self._touch(ticket)
        return ticket

    def comments(self, key: str) -> list[TicketComment]:
        """Return a ticket's comments in the order they were added."""
        return list(self.tickets[key].comments)

    # TicketAdapter

    async def open(self) -> TicketAccount:
        self.opened = True
        return self.account

    async def close(self) -> None:
        self.opened = False

    async def find_ticket(self, incident_id: str) -> TicketRef | None:
        _check_incident_id(incident_id)
        now = self.now()
        for ticket in sorted(self.tickets.values(), key=lambda item: item.created):
            visible = any(visible_from <= now for visible_from, _ in ticket.index)
            if visible and ticket.incident_id == incident_id and ticket.project == self.project:
                return ticket.ref
        return None

    async def create_ticket(self, draft: TicketDraft) -> TicketRef:
        _check_incident_id(draft.incident_id)
        failure = self._take_failure("create_ticket")
        if failure and not failure.after_write:
            raise failure.error

        number = self._next_number
        self._next_number += 1
        key = f"{draft.project}-{number}"
        labels = _labels([CONNECTOR_LABEL, f"mdr-{draft.incident_id}", *draft.fields.labels])
        now = self.now()
        ticket = MemoryTicket(
            ref=TicketRef(key=key, id=str(10000 + number), url=f"{self.base_url}/{key}"),
            incident_id=draft.incident_id,
            project=draft.project,
            issue_type=draft.issue_type,
            fields=replace(draft.fields, labels=tuple(labels)),
            metadata={**draft.metadata, "incident_id": draft.incident_id},
            created=now,
            updated=now,
        )
        self.tickets[key] = ticket
        self._index(ticket)
        self.writes["create_ticket"] += 1
        log.info("memory.ticket.created", extra={"ticket_key": key, "incident_id": draft.incident_id})

        if failure:
            raise failure.error
        return ticket.ref

    async def update_ticket(self, ref: TicketRef, fields: TicketFields) -> None:
        ticket = self._ticket_of(ref)
        failure = self._take_failure("update_ticket")
        if failure and not failure.after_write:
            raise failure.error

        labels = _labels([*ticket.fields.labels, *fields.labels])
        ticket.fields = replace(fields, labels=tuple(labels))
        self._touch(ticket)
        self.writes["update_ticket"] += 1

        if failure:
            raise failure.error

    async def list_comments(self, ref: TicketRef) -> list[TicketComment]:
        ticket = self._ticket_of(ref)
        self._raise_failure("list_comments")
        return sorted(ticket.comments, key=lambda comment: (comment.created, int(comment.id)))

    async def add_comment(self, ref: TicketRef, draft: CommentDraft) -> TicketComment:
        ticket = self._ticket_of(ref)
        failure = self._take_failure("add_comment")
        if failure and not failure.after_write:
            raise failure.error

        comment = self._append_comment(ticket, draft.body, self.account, draft.marker)
        self.writes["add_comment"] += 1

        if failure:
            raise failure.error
        return comment

    async def changed_tickets(self, since: datetime) -> list[TicketChange]:
        if since.tzinfo is None:
            raise ValueError("since must be timezone-aware")
        self._raise_failure("changed_tickets")

        now = self.now()
        changes: list[TicketChange] = []
        for ticket in self.tickets.values():
            seen = [updated for visible_from, updated in ticket.index if visible_from <= now]
            if ticket.project == self.project and seen and seen[-1] >= since:
                changes.append(TicketChange(ticket.ref, seen[-1]))
        return sorted(changes, key=lambda change: (change.updated, int(change.ref.id)))

    async def check(self, issue_type: str, priorities: Iterable[str]) -> list[str]:
        """Accept any issue type and priority; in memory, only the project is fixed."""
        return []

    def search_delay_seconds(self) -> float:
        return self.search_delay

    # Internals

    def _ticket_of(self, ref: TicketRef) -> MemoryTicket:
        ticket = self.tickets.get(ref.key)
        if ticket is None or ticket.ref.id != ref.id:
            raise RejectedError(f"ticket {ref.key} does not exist", status=404)
        return ticket

    def _append_comment(
        self, ticket: MemoryTicket, body: str, author: TicketAccount, marker: SyncMarker | None
    ) -> TicketComment:
        comment = TicketComment(
            id=str(self._next_comment_id),
            author=author,
            created=self.now(),
            body=body,
            marker=marker,
        )
        self._next_comment_id += 1
        ticket.comments.append(comment)
        self._touch(ticket)
        return comment

    def _touch(self, ticket: MemoryTicket) -> None:
        ticket.updated = max(self.now(), ticket.updated)
        self._index(ticket)

    def _index(self, ticket: MemoryTicket) -> None:
        visible_from = self.now() + timedelta(seconds=self.search_delay)
        ticket.index.append((visible_from, ticket.updated))

    def _take_failure(self, operation: str) -> _Failure | None:
        queue = self._failures.get(operation)
        return queue.popleft() if queue else None

    def _raise_failure(self, operation: str) -> None:
        failure = self._take_failure(operation)
        if failure:
            raise failure.error


def _check_incident_id(incident_id: str) -> None:
    if not INCIDENT_ID_PATTERN.fullmatch(incident_id):
        raise InvalidPayloadError(
            f"MDR incident id {incident_id!r} has characters other than letters, digits, '-' and '_'"
        )


def _labels(labels: list[str]) -> list[str]:
    cleaned = (re.sub(r"\s+", "_", label.strip()) for label in labels)
    return list(dict.fromkeys(label for label in cleaned if label))
