"""The contract between the sync engine and a ticket system adapter.

The engine does not depend on which ticket system it talks to. An adapter turns
these system-neutral records into its own API calls and markup: bodies
cross this boundary as Markdown (CommonMark with GitHub extensions), and
the adapter converts them to and from its native markup.

Every write an adapter makes carries a marker (a label, an entity
property, a correlation field) so that a write whose outcome is unknown
can be found again before it is repeated.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

MDR_ORIGIN = "mdr"
TICKET_ORIGIN = "ticket"


@dataclass(frozen=True)
class TicketRef:
    """A ticket as the engine stores it: key for people, id for the API, URL for links."""

    key: str
    id: str
    url: str


@dataclass(frozen=True)
class TicketAccount:
    """An account of the ticket system: the stable id and the display name."""

    id: str
    display_name: str


@dataclass(frozen=True)
class TicketFields:
    """The mapped fields of a ticket, rendered from an MDR incident by the mapping."""

    summary: str
    description: str
    priority: str | None
    labels: tuple[str, ...]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TicketDraft:
    """A ticket to create for one MDR incident."""

    incident_id: str
    project: str
    issue_type: str
    fields: TicketFields
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SyncMarker:
    """The connector's stamp on a comment it wrote: where the comment came from."""

    origin: str
    source_id: str


@dataclass(frozen=True)
class TicketComment:
    """A comment read from a ticket, with its body converted to Markdown."""

    id: str
    author: TicketAccount
    created: datetime
    body: str
    marker: SyncMarker | None = None
    # True when the ticket system limits who may read the comment (a Jira
    # comment visible to one role or group); such comments stay internal.
    restricted: bool = False


@dataclass(frozen=True)
class CommentDraft:
    """A comment to add to a ticket; the marker names the MDR comment it mirrors."""

    body: str
    marker: SyncMarker


@dataclass(frozen=True)
class TicketChange:
    """A ticket whose `updated` time moved, as found by a change search."""

    ref: TicketRef
    updated: datetime


@runtime_checkable
class TicketAdapter(Protocol):
    """The operations the engine needs from a ticket system."""

    system: str

    async def open(self) -> TicketAccount:
        """Connect, check the credentials, and return the connector's own account."""

    async def close(self) -> None:
        """Release connections and worker threads."""

    async def find_ticket(self, incident_id: str) -> TicketRef | None:
        """Find the ticket carrying the correlation marker of an MDR incident."""

    async def create_ticket(self, draft: TicketDraft) -> TicketRef:
        """Create a ticket carrying the correlation marker of `draft.incident_id`."""

    async def update_ticket(self, ref: TicketRef, fields: TicketFields) -> None:
        """Write the mapped fields of an existing ticket."""

    async def list_comments(self, ref: TicketRef) -> list[TicketComment]:
        """Return every comment of a ticket, oldest first, across all pages."""

    async def add_comment(self, ref: TicketRef, draft: CommentDraft) -> TicketComment:
        """Add a comment stamped with `draft.marker`."""

    async def changed_tickets(self, since: datetime) -> list[TicketChange]:
        """Return tickets updated at or after `since` (UTC), oldest first.

        The result must include every ticket the connector created, even one
        whose markers a person removed; other tickets may be included too.
        """

    async def check(self, issue_type: str, priorities: Iterable[str]) -> list[str]:
        """Return what would stop ticket creation: a missing project, issue type or priority."""

    def search_delay_seconds(self) -> float:
        """Seconds after a write before `find_ticket` is sure to see it."""
