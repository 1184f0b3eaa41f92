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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

MDR_ORIGIN = "mdr"
TICKET_ORIGIN = "ticket"
# The marker origin of the one ticket comment that shows an MDR response.
RESPONSE_ORIGIN = "mdr-response"
# The marker origin of a ticket comment the connector wrote about its own
# work: a filtered attachment, a response decision, a refused command.
NOTICE_ORIGIN = "mdr-notice"

SYSTEM_TITLES = {"jira": "Jira", "servicenow": "ServiceNow", "redmine": "Redmine"}


def system_title(system: str) -> str:
    """Return the product name of a ticket system as people write it: ServiceNow, not Servicenow."""
    return SYSTEM_TITLES.get(system, system.title())


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
    components: tuple[str, ...] = ()


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
    # The time of the last edit, or None when the ticket system reports none.
    updated: datetime | None = None


@dataclass(frozen=True)
class CommentVisibility:
    """The readers of a comment the connector posts.

    `role` and `group` name a Jira project role or group in `value`.
    `internal` requests the system's internal note (a ServiceNow work note,
    a Redmine private note) and takes no value.
    """

    type: Literal["role", "group", "internal"]
    value: str = ""


@dataclass(frozen=True)
class TicketCapabilities:
    """The features a ticket system stores, so the engine and `check` never request more from an adapter.

    The engine reads these instead of the system's name: a comment that
    cannot be edited is followed by a new one, and `check` reports a mapping
    that requests labels, components or a visibility the system lacks.
    """

    # Comments the connector wrote can be edited in place.
    edit_comments: bool = True
    # Tickets carry free-form labels, so mapping labels and label-based requests work.
    labels: bool = True
    # Tickets carry named components from the project.
    components: bool = True
    # The CommentVisibility types the system understands.
    visibility_types: frozenset[str] = frozenset({"role", "group"})
    # The maximum length of one comment the system stores, in the unit of
    # `comment_length`, or None when no limit is known. The engine splits a longer MDR comment
    # into several comments, each within this limit.
    max_comment_chars: int | None = None
    # `find_incident_tickets` looks up many incidents with few requests, so
    # the engine calls it once per page instead of `find_ticket` per incident.
    batch_lookup: bool = False


@dataclass(frozen=True)
class CommentDraft:
    """A comment to add to a ticket; the marker names the MDR comment it mirrors."""

    body: str
    marker: SyncMarker
    visibility: CommentVisibility | None = None


@dataclass(frozen=True)
class TicketAttachment:
    """A file attached to a ticket, as listed. `download_attachment` reads its bytes."""

    id: str
    filename: str
    size: int
    author: TicketAccount
    created: datetime
    content_type: str = "application/octet-stream"


@dataclass(frozen=True)
class AttachmentUpload:
    """A file to attach to a ticket, spooled on disk. Its `filename` is already sanitised."""

    filename: str
    path: Path
    size: int
    content_type: str = "application/octet-stream"


@dataclass(frozen=True)
class TicketState:
    """The workflow state of a ticket and the field values the status mapping reads."""

    status: str
    # new, indeterminate or done, as the ticket system classifies the status.
    status_category: str
    updated: datetime
    # Field values by field id, for the fields named in the request.
    values: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TicketQuery:
    """Search for tickets that request a new MDR incident, by label, by issue type, or both."""

    project: str
    label: str | None = None
    issue_type: str | None = None


@dataclass(frozen=True)
class TicketChange:
    """A ticket whose `updated` time moved, as found by a change search."""

    ref: TicketRef
    updated: datetime


@runtime_checkable
class TicketAdapter(Protocol):
    """The operations the engine needs from a ticket system."""

    system: str
    capabilities: TicketCapabilities

    async def open(self) -> TicketAccount:
        """Connect, check the credentials, and return the connector's own account."""

    async def close(self) -> None:
        """Release connections and worker threads."""

    async def find_ticket(self, incident_id: str) -> TicketRef | None:
        """Find the ticket carrying the correlation marker of an MDR incident."""

    async def find_incident_tickets(self, incident_ids: Sequence[str]) -> dict[str, TicketRef]:
        """Return, by incident id, what `find_ticket` would return for each incident that has a ticket.

        Called only when `capabilities.batch_lookup` is set.
        """

    async def create_ticket(self, draft: TicketDraft) -> TicketRef:
        """Create a ticket carrying the correlation marker of `draft.incident_id`."""

    async def update_ticket(self, ref: TicketRef, fields: TicketFields, skip: frozenset[str] = frozenset()) -> None:
        """Write the mapped fields of an existing ticket, except those named in `skip`.

        `skip` contains core names (summary, description, priority, labels,
        components) and keys of `fields.extra` that the ticket owns after creation.
        """

    async def list_comments(self, ref: TicketRef) -> list[TicketComment]:
        """Return every comment of a ticket, oldest first, across all pages."""

    async def add_comment(self, ref: TicketRef, draft: CommentDraft) -> TicketComment:
        """Add a comment stamped with `draft.marker`."""

    async def comment_length(self, body: str) -> int:
        """Return the length of a Markdown comment body as the system stores it, in the unit of `max_comment_chars`."""

    async def changed_tickets(self, since: datetime) -> list[TicketChange]:
        """Return tickets updated at or after `since` (UTC), oldest first.

        The result must include every ticket the connector created, even one
        whose markers a person removed; other tickets may be included too.
        """

    async def check(self, issue_type: str, priorities: Iterable[str], project: str | None = None) -> list[str]:
        """Return what would stop ticket creation: a missing project, issue type or priority.

        `project` defaults to the adapter's own project, and routes name others.
        """

    def search_delay_seconds(self) -> float:
        """Seconds after a write before `find_ticket` is sure to see it."""

    async def edit_comment(self, ref: TicketRef, comment_id: str, draft: CommentDraft) -> TicketComment:
        """Replace the body of a comment the connector wrote, keeping its marker."""

    async def list_attachments(self, ref: TicketRef) -> list[TicketAttachment]:
        """Return every attachment of a ticket."""

    async def download_attachment(self, attachment: TicketAttachment, destination: Path) -> int:
        """Stream an attachment into `destination` without holding it in memory, and return the bytes written."""

    async def upload_attachment(self, ref: TicketRef, upload: AttachmentUpload) -> TicketAttachment:
        """Stream a spooled file to the ticket as an attachment."""

    async def attachment_limit(self) -> int | None:
        """Return the largest attachment the ticket system accepts, in bytes, or None when attachments are off."""

    async def get_state(self, ref: TicketRef, field_ids: Iterable[str] = ()) -> TicketState:
        """Read the status of a ticket and the named field values."""

    async def transition_to(self, ref: TicketRef, status: str) -> None:
        """Move the ticket to the status named `status` by one available transition.

        Raises RejectedError naming the statuses that can be reached when no
        transition leads there, so the engine never guesses a path.
        """

    async def find_tickets(self, query: TicketQuery, since: datetime) -> list[TicketRef]:
        """Return tickets matching `query` created at or after `since`, oldest first."""

    async def set_correlation(self, ref: TicketRef, incident_id: str) -> None:
        """Stamp an existing ticket with the correlation marker of an MDR incident."""

    async def account_groups(self, account_id: str) -> set[str]:
        """Return the names of the groups an account belongs to, for the response allow-list."""

    async def get_ticket(self, key: str) -> TicketRef | None:
        """Return the ticket with this key (SEC-12) or this id (10012), or None when there is none."""


async def find_each_ticket(adapter: TicketAdapter, incident_ids: Sequence[str]) -> dict[str, TicketRef]:
    """Look up each incident's ticket with `find_ticket`, one request after another.

    This is `find_incident_tickets` for adapters without a search that
    covers many incidents. Their `capabilities.batch_lookup` stays off, so
    the engine does not call it and keeps its concurrent single lookups.
    """
    found: dict[str, TicketRef] = {}
    for incident_id in incident_ids:
        ref = await adapter.find_ticket(incident_id)
        if ref is not None:
            found[incident_id] = ref
    return found
