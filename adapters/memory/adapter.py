"""An in-memory TicketAdapter for engine tests and for CI runs without a ticket server.

It keeps the Jira adapter's rules. Tickets carry the `mdr-connector` and
`mdr-<incident id>` labels plus the incident id as metadata, comments carry
their SyncMarker, and label and component updates only add. A new ticket
or change is visible to `find_ticket`, `find_tickets` and `changed_tickets`
only after the search delay. Tickets follow the same small workflow as the
Jira simulator (To Do, In Progress, On Hold, Done), attachments have an
upload limit, and accounts can belong to groups. A comment longer than
`capabilities.max_comment_chars`, None by default, is rejected.

    adapter = MemoryTicketAdapter(project="SEC", search_delay_seconds=60)
    account = await adapter.open()
    ref = await adapter.create_ticket(draft)
    assert await adapter.find_ticket(draft.incident_id) is None   # not indexed yet
    adapter.advance(60)
    assert await adapter.find_ticket(draft.incident_id) == ref

    adapter.add_human_comment(ref.key, "Isolated the host.")
    adapter.fail_next("add_comment", OutcomeUnknownError("reply lost"), after_write=True)
    assert adapter.writes["create_ticket"] == 1

Without `projects` and `priorities` any project, issue type, component and
priority is accepted; with them, unknown names are rejected as Jira rejects
them (RejectedError with status 400).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from mdr_connector.connector.errors import ConfigError, ConnectorError, InvalidPayloadError, RejectedError
from mdr_connector.connector.tickets import (
    AttachmentUpload,
    CommentDraft,
    CommentVisibility,
    SyncMarker,
    TicketAccount,
    TicketAttachment,
    TicketCapabilities,
    TicketChange,
    TicketComment,
    TicketDraft,
    TicketFields,
    TicketQuery,
    TicketRef,
    TicketState,
)

log = logging.getLogger(__name__)

CONNECTOR_LABEL = "mdr-connector"
INCIDENT_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,200}$")
DEFAULT_ACCOUNT = TicketAccount(id="mdr-connector", display_name="MDR connector")
DEFAULT_HUMAN = TicketAccount(id="analyst", display_name="SOC Analyst")
DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024
CHUNK_BYTES = 64 * 1024
CORE_NAMES = frozenset({"summary", "description", "priority", "labels", "components"})


@dataclass(frozen=True)
class MemoryProject:
    """The issue types and components a project of the fake accepts."""

    issue_types: tuple[str, ...]
    components: tuple[str, ...] = ()


@dataclass(frozen=True)
class MemoryTransition:
    """A transition of the fake's workflow, available from every status when `sources` is empty."""

    name: str
    to: str
    sources: tuple[str, ...] = ()


@dataclass(frozen=True)
class MemoryWorkflow:
    """Statuses with their category (new, indeterminate, done), transitions and resolutions. The first status is the initial one."""

    statuses: tuple[tuple[str, str], ...] = (
        ("To Do", "new"),
        ("In Progress", "indeterminate"),
        ("On Hold", "indeterminate"),
        ("Done", "done"),
    )
    transitions: tuple[MemoryTransition, ...] = (
        MemoryTransition("Start progress", "In Progress", ("To Do",)),
        MemoryTransition("Put on hold", "On Hold", ("To Do", "In Progress")),
        MemoryTransition("Resume", "In Progress", ("On Hold",)),
        MemoryTransition("Done", "Done", ("To Do", "In Progress", "On Hold")),
        MemoryTransition("Reopen", "To Do", ("Done",)),
    )
    resolutions: tuple[str, ...] = ("Done", "Won't Do", "Duplicate", "Cannot Reproduce")

    def category(self, status: str) -> str:
        return dict(self.statuses)[status]

    def available(self, status: str) -> list[MemoryTransition]:
        return [
            transition
            for transition in self.transitions
            if (not transition.sources or status in transition.sources) and transition.to != status
        ]


@dataclass(frozen=True)
class _SearchView:
    """The state of a ticket that search returns from the moment it is indexed."""

    updated: datetime
    incident_id: str | None
    labels: tuple[str, ...]
    issue_type: str


@dataclass
class MemoryAttachment:
    """An attachment record and its bytes."""

    record: TicketAttachment
    data: bytes


@dataclass
class MemoryTicket:
    """One ticket with its comments and attachments. `index` contains (visible from, view) pairs for search."""

    ref: TicketRef
    incident_id: str | None
    project: str
    issue_type: str
    fields: TicketFields
    metadata: dict[str, Any]
    created: datetime
    updated: datetime
    status: str = "To Do"
    resolution: str | None = None
    comments: list[TicketComment] = field(default_factory=list)
    attachments: list[MemoryAttachment] = field(default_factory=list)
    index: list[tuple[datetime, _SearchView]] = field(default_factory=list)


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
        projects: dict[str, MemoryProject] | None = None,
        priorities: Iterable[str] | None = None,
        workflow: MemoryWorkflow | None = None,
        upload_limit: int | None = DEFAULT_UPLOAD_LIMIT,
        groups: dict[str, Iterable[str]] | None = None,
        capabilities: TicketCapabilities | None = None,
    ) -> None:
        """Build the fake. `upload_limit` None disables attachments, and `groups` maps account ids to group names."""
        self.project = project
        self.account = account
        # Tests pass a narrower set to play a system like ServiceNow or Redmine.
        self.capabilities = capabilities or TicketCapabilities()
        self.search_delay = search_delay_seconds
        self.base_url = base_url
        self.known_projects = dict(projects) if projects is not None else None
        self.priorities = tuple(priorities) if priorities is not None else None
        self.workflow = workflow or MemoryWorkflow()
        self.upload_limit = upload_limit
        self.groups = {account_id: set(names) for account_id, names in (groups or {}).items()}
        # Every project searched for the connector's tickets, as in the Jira adapter.
        self.searched_projects: dict[str, None] = {project: None}
        self.tickets: dict[str, MemoryTicket] = {}
        self.writes: Counter[str] = Counter()
        self.opened = False
        self._clock = clock
        self._offset = timedelta()
        self._next_number: Counter[str] = Counter()
        self._next_id = 10001
        self._next_comment_id = 10000
        self._next_attachment_id = 10000
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

    def add_human_ticket(
        self,
        *,
        summary: str,
        project: str | None = None,
        issue_type: str = "Task",
        description: str = "",
        labels: Iterable[str] = (),
        extra: dict[str, Any] | None = None,
    ) -> TicketRef:
        """Create a ticket as a person would, without any connector marker."""
        fields = TicketFields(summary, description, None, tuple(_labels(list(labels))), dict(extra or {}))
        ticket = self._new_ticket(project or self.project, issue_type, fields, None, {})
        return ticket.ref

    def add_human_comment(
        self,
        key: str,
        body: str,
        *,
        author: TicketAccount = DEFAULT_HUMAN,
        marker: SyncMarker | None = None,
        visibility: CommentVisibility | None = None,
        internal: bool = False,
    ) -> TicketComment:
        """Add a comment as a person. `visibility` or `internal` (a service desk note) make it restricted."""
        return self._append_comment(self.tickets[key], body, author, marker, restricted=visibility is not None or internal)

    def edit_human_comment(self, key: str, comment_id: str, body: str) -> TicketComment:
        """Replace a comment's body as its author would, which moves `updated` of the comment and the ticket."""
        ticket = self.tickets[key]
        position = self._comment_position(ticket, comment_id)
        ticket.comments[position] = replace(ticket.comments[position], body=body, updated=self.now())
        self._touch(ticket)
        return ticket.comments[position]

    def delete_human_comment(self, key: str, comment_id: str) -> None:
        """Delete a comment as a person would, which moves the ticket's `updated`."""
        ticket = self.tickets[key]
        del ticket.comments[self._comment_position(ticket, comment_id)]
        self._touch(ticket)

    def add_human_attachment(
        self,
        key: str,
        filename: str,
        data: bytes,
        *,
        author: TicketAccount = DEFAULT_HUMAN,
        content_type: str = "application/octet-stream",
    ) -> TicketAttachment:
        """Attach a file as a person would, without the upload limit, which applies to the connector only."""
        return self._append_attachment(self.tickets[key], filename, data, author, content_type)

    def transition_as_human(self, key: str, status: str, resolution: str | None = None) -> None:
        """Move a ticket to `status` by an available transition, or raise RejectedError without one."""
        ticket = self.tickets[key]
        if resolution is not None and resolution not in self.workflow.resolutions:
            raise RejectedError(f"resolution {resolution!r} does not exist", status=400)
        self._transition(ticket, self._transition_for(ticket, status), resolution)

    def edit_ticket(self, key: str, **changes: Any) -> MemoryTicket:
        """Change fields as a person would: `summary=`, `description=`, `priority=`, `labels=`, `components=`, `extra=`."""
        ticket = self.tickets[key]
        for name in ("labels", "components"):
            if name in changes:
                changes[name] = tuple(changes[name])
        ticket.fields = replace(ticket.fields, **changes)
        self._touch(ticket)
        return ticket

    def comments(self, key: str) -> list[TicketComment]:
        """Return a ticket's comments in the order they were added."""
        return list(self.tickets[key].comments)

    def attachment_bytes(self, key: str, attachment_id: str) -> bytes:
        """Return the bytes of one attachment of a ticket."""
        return self._attachment(self.tickets[key], attachment_id).data

    # TicketAdapter: lifecycle and checks

    async def open(self) -> TicketAccount:
        self.opened = True
        return self.account

    async def close(self) -> None:
        self.opened = False

    async def check(self, issue_type: str, priorities: Iterable[str], project: str | None = None) -> list[str]:
        """Report a missing project, issue type or priority. Without configured projects and priorities, any is accepted."""
        key = project or self.project
        self._raise_failure("check")
        problems: list[str] = []
        if self.known_projects is not None:
            found = self.known_projects.get(key)
            if found is None:
                return [f"project {key!r} does not exist or the connector's account cannot see it"]
            if issue_type not in found.issue_types:
                problems.append(
                    f"issue type {issue_type!r} is not available in project {key}; "
                    f"available: {', '.join(found.issue_types) or 'none'}"
                )
        self.searched_projects.setdefault(key, None)
        if self.priorities is not None:
            for name in dict.fromkeys(priorities):
                if name not in self.priorities:
                    problems.append(f"priority {name!r} does not exist; available: {', '.join(self.priorities) or 'none'}")
        return problems

    def search_delay_seconds(self) -> float:
        return self.search_delay

    # TicketAdapter: tickets

    async def find_ticket(self, incident_id: str) -> TicketRef | None:
        _check_incident_id(incident_id)
        self._raise_failure("find_ticket")
        for ticket in sorted(self.tickets.values(), key=lambda item: (item.created, int(item.ref.id))):
            view = self._visible(ticket)
            if view is not None and view.incident_id == incident_id and ticket.project in self.searched_projects:
                return ticket.ref
        return None

    async def find_incident_tickets(self, incident_ids: Sequence[str]) -> dict[str, TicketRef]:
        for incident_id in incident_ids:
            _check_incident_id(incident_id)
        self._raise_failure("find_incident_tickets")
        requested = set(incident_ids)
        found: dict[str, TicketRef] = {}
        for ticket in sorted(self.tickets.values(), key=lambda item: (item.created, int(item.ref.id))):
            view = self._visible(ticket)
            if view is not None and view.incident_id in requested and ticket.project in self.searched_projects:
                found.setdefault(view.incident_id, ticket.ref)
        return found

    async def create_ticket(self, draft: TicketDraft) -> TicketRef:
        _check_incident_id(draft.incident_id)
        self._validate(draft.project, draft.issue_type, draft.fields.priority, draft.fields.components)
        self.searched_projects.setdefault(draft.project, None)
        failure = self._take_failure("create_ticket")
        if failure and not failure.after_write:
            raise failure.error

        labels = _labels([CONNECTOR_LABEL, f"mdr-{draft.incident_id}", *draft.fields.labels])
        fields = replace(
            draft.fields, labels=tuple(labels), components=tuple(dict.fromkeys(draft.fields.components))
        )
        metadata = {**draft.metadata, "incident_id": draft.incident_id}
        ticket = self._new_ticket(draft.project, draft.issue_type, fields, draft.incident_id, metadata)
        self.writes["create_ticket"] += 1
        log.info("memory.ticket.created", extra={"ticket_key": ticket.ref.key, "incident_id": draft.incident_id})

        if failure:
            raise failure.error
        return ticket.ref

    async def update_ticket(self, ref: TicketRef, fields: TicketFields, skip: frozenset[str] = frozenset()) -> None:
        """Write every field not in `skip`. Labels and components are only added, and extra fields are set one by one."""
        ticket = self._ticket_of(ref)
        if "priority" not in skip:
            self._validate(ticket.project, ticket.issue_type, fields.priority, ())
        if "components" not in skip:
            self._validate(ticket.project, ticket.issue_type, None, fields.components)
        failure = self._take_failure("update_ticket")
        if failure and not failure.after_write:
            raise failure.error

        current = ticket.fields
        changes: dict[str, Any] = {
            name: getattr(fields, name) for name in ("summary", "description") if name not in skip
        }
        if "priority" not in skip and fields.priority:
            changes["priority"] = fields.priority
        if "labels" not in skip:
            changes["labels"] = tuple(_labels([*current.labels, *fields.labels]))
        if "components" not in skip:
            changes["components"] = tuple(dict.fromkeys([*current.components, *fields.components]))
        extra = {name: value for name, value in fields.extra.items() if name not in skip | CORE_NAMES}
        changes["extra"] = {**current.extra, **extra}
        ticket.fields = replace(current, **changes)
        self._touch(ticket)
        self.writes["update_ticket"] += 1

        if failure:
            raise failure.error

    async def changed_tickets(self, since: datetime) -> list[TicketChange]:
        if since.tzinfo is None:
            raise ValueError("since must be timezone-aware")
        self._raise_failure("changed_tickets")

        changes: list[TicketChange] = []
        for ticket in self.tickets.values():
            view = self._visible(ticket)
            if ticket.project in self.searched_projects and view is not None and view.updated >= since:
                changes.append(TicketChange(ticket.ref, view.updated))
        return sorted(changes, key=lambda change: (change.updated, int(change.ref.id)))

    # TicketAdapter: comments

    async def list_comments(self, ref: TicketRef) -> list[TicketComment]:
        ticket = self._ticket_of(ref)
        self._raise_failure("list_comments")
        return sorted(ticket.comments, key=lambda comment: (comment.created, int(comment.id)))

    async def add_comment(self, ref: TicketRef, draft: CommentDraft) -> TicketComment:
        """Add a comment, or raise RejectedError (400) for a body longer than `capabilities.max_comment_chars`, as Jira does."""
        ticket = self._ticket_of(ref)
        limit = self.capabilities.max_comment_chars
        if limit is not None and await self.comment_length(draft.body) > limit:
            raise RejectedError(f"the comment on {ref.key} is longer than {limit} characters", status=400)
        failure = self._take_failure("add_comment")
        if failure and not failure.after_write:
            raise failure.error

        restricted = draft.visibility is not None
        comment = self._append_comment(ticket, draft.body, self.account, draft.marker, restricted=restricted)
        self.writes["add_comment"] += 1

        if failure:
            raise failure.error
        return comment

    async def comment_length(self, body: str) -> int:
        """Return the length of a comment body in characters: the fake stores the Markdown as it is."""
        return len(body)

    async def edit_comment(self, ref: TicketRef, comment_id: str, draft: CommentDraft) -> TicketComment:
        """Replace the body of the connector's own comment and stamp `draft.marker` on it again."""
        ticket = self._ticket_of(ref)
        position = self._comment_position(ticket, comment_id, status=404)
        existing = ticket.comments[position]
        if existing.author.id != self.account.id:
            raise RejectedError(
                f"comment {comment_id} of {ref.key} was written by {existing.author.id}, and only its author may edit it",
                status=403,
            )
        failure = self._take_failure("edit_comment")
        if failure and not failure.after_write:
            raise failure.error

        restricted = existing.restricted or draft.visibility is not None
        edited = replace(existing, body=draft.body, marker=draft.marker, restricted=restricted, updated=self.now())
        ticket.comments[position] = edited
        self._touch(ticket)
        self.writes["edit_comment"] += 1

        if failure:
            raise failure.error
        return edited

    # TicketAdapter: attachments

    async def list_attachments(self, ref: TicketRef) -> list[TicketAttachment]:
        ticket = self._ticket_of(ref)
        self._raise_failure("list_attachments")
        records = [item.record for item in ticket.attachments]
        return sorted(records, key=lambda record: (record.created, int(record.id)))

    async def download_attachment(self, attachment: TicketAttachment, destination: Path) -> int:
        """Write the attachment to a temporary name next to `destination`, then rename it."""
        stored = next(
            (item for ticket in self.tickets.values() for item in ticket.attachments if item.record.id == attachment.id),
            None,
        )
        if stored is None:
            raise RejectedError(f"attachment {attachment.id} does not exist", status=404)
        self._raise_failure("download_attachment")

        temporary = destination.with_name(f".{destination.name}.{secrets.token_hex(6)}.part")
        try:
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as file:
                for start in range(0, len(stored.data), CHUNK_BYTES):
                    file.write(stored.data[start : start + CHUNK_BYTES])
            os.replace(temporary, destination)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return len(stored.data)

    async def upload_attachment(self, ref: TicketRef, upload: AttachmentUpload) -> TicketAttachment:
        """Attach a spooled file as the connector's account, or raise RejectedError 413 above the upload limit."""
        ticket = self._ticket_of(ref)
        if self.upload_limit is None:
            raise RejectedError("attachments are disabled in the ticket system", status=403)
        size = upload.path.stat().st_size
        if size > self.upload_limit:
            raise RejectedError(
                f"the file {upload.filename!r} has {size} bytes, above the attachment size limit of {self.upload_limit}",
                status=413,
            )
        failure = self._take_failure("upload_attachment")
        if failure and not failure.after_write:
            raise failure.error

        record = self._append_attachment(ticket, upload.filename, upload.path.read_bytes(), self.account, upload.content_type)
        self.writes["upload_attachment"] += 1

        if failure:
            raise failure.error
        return record

    async def attachment_limit(self) -> int | None:
        self._raise_failure("attachment_limit")
        return self.upload_limit

    # TicketAdapter: workflow

    async def get_state(self, ref: TicketRef, field_ids: Iterable[str] = ()) -> TicketState:
        """Return status, category, `updated` and the named values, simplified as the Jira adapter does."""
        ticket = self._ticket_of(ref)
        self._raise_failure("get_state")
        values = {field_id: self._value_of(ticket, field_id) for field_id in dict.fromkeys(field_ids)}
        return TicketState(ticket.status, self.workflow.category(ticket.status), ticket.updated, values)

    async def transition_to(self, ref: TicketRef, status: str) -> None:
        ticket = self._ticket_of(ref)
        if ticket.status.casefold() == status.casefold():
            return
        transition = self._transition_for(ticket, status)
        failure = self._take_failure("transition_to")
        if failure and not failure.after_write:
            raise failure.error

        self._transition(ticket, transition, None)
        self.writes["transition_to"] += 1

        if failure:
            raise failure.error

    # TicketAdapter: tickets that ask for an MDR incident

    async def find_tickets(self, query: TicketQuery, since: datetime) -> list[TicketRef]:
        if since.tzinfo is None:
            raise ValueError("since must be timezone-aware")
        if query.label is None and query.issue_type is None:
            raise ConfigError(
                f"a ticket query on project {query.project} needs a label or an issue type, "
                "otherwise every ticket of the project would create an MDR incident"
            )
        self._raise_failure("find_tickets")
        self.searched_projects.setdefault(query.project, None)

        found: list[MemoryTicket] = []
        for ticket in self.tickets.values():
            view = self._visible(ticket)
            if view is None or ticket.project.casefold() != query.project.casefold() or ticket.created < since:
                continue
            if query.label is not None and query.label.casefold() not in {label.casefold() for label in view.labels}:
                continue
            if query.issue_type is not None and query.issue_type.casefold() != view.issue_type.casefold():
                continue
            found.append(ticket)
        return [ticket.ref for ticket in sorted(found, key=lambda item: (item.created, int(item.ref.id)))]

    async def set_correlation(self, ref: TicketRef, incident_id: str) -> None:
        """Give an existing ticket the labels and incident id that a created one has, unless it belongs to another incident."""
        _check_incident_id(incident_id)
        ticket = self._ticket_of(ref)
        if ticket.incident_id is not None and ticket.incident_id != incident_id:
            raise RejectedError(
                f"ticket {ref.key} is already linked to MDR incident {ticket.incident_id}, so it cannot carry {incident_id} too",
                status=409,
            )
        self.searched_projects.setdefault(ticket.project, None)
        failure = self._take_failure("set_correlation")
        if failure and not failure.after_write:
            raise failure.error

        ticket.incident_id = incident_id
        ticket.metadata = {**ticket.metadata, "incident_id": incident_id}
        labels = _labels([*ticket.fields.labels, CONNECTOR_LABEL, f"mdr-{incident_id}"])
        ticket.fields = replace(ticket.fields, labels=tuple(labels))
        self._touch(ticket)
        self.writes["set_correlation"] += 1

        if failure:
            raise failure.error

    async def account_groups(self, account_id: str) -> set[str]:
        self._raise_failure("account_groups")
        return set(self.groups.get(account_id, ()))

    async def get_ticket(self, key: str) -> TicketRef | None:
        self._raise_failure("get_ticket")
        ticket = self.tickets.get(key.upper())
        if ticket is None:
            ticket = next((candidate for candidate in self.tickets.values() if candidate.ref.id == key), None)
        return ticket.ref if ticket is not None else None

    # Internals

    def _new_ticket(
        self, project: str, issue_type: str, fields: TicketFields, incident_id: str | None, metadata: dict[str, Any]
    ) -> MemoryTicket:
        self._next_number[project] += 1
        key = f"{project}-{self._next_number[project]}"
        identifier = str(self._next_id)
        self._next_id += 1
        now = self.now()
        ticket = MemoryTicket(
            ref=TicketRef(key=key, id=identifier, url=f"{self.base_url}/{key}"),
            incident_id=incident_id,
            project=project,
            issue_type=issue_type,
            fields=fields,
            metadata=metadata,
            created=now,
            updated=now,
            status=self.workflow.statuses[0][0],
        )
        self.tickets[key] = ticket
        self._index(ticket)
        return ticket

    def _validate(self, project: str, issue_type: str, priority: str | None, components: Iterable[str]) -> None:
        """Reject what Jira rejects with 400: an unknown project, issue type, priority or component."""
        if priority and self.priorities is not None and priority not in self.priorities:
            raise RejectedError(f"priority: Priority name '{priority}' is not valid.", status=400)
        if self.known_projects is None:
            return
        found = self.known_projects.get(project)
        if found is None:
            raise RejectedError("project: valid project is required", status=400)
        if issue_type not in found.issue_types:
            raise RejectedError("issuetype: Specify a valid issue type", status=400)
        for name in components:
            if name not in found.components:
                raise RejectedError(f"components: Component name '{name}' is not valid", status=400)

    def _ticket_of(self, ref: TicketRef) -> MemoryTicket:
        ticket = self.tickets.get(ref.key)
        if ticket is None or ticket.ref.id != ref.id:
            raise RejectedError(f"ticket {ref.key} does not exist", status=404)
        return ticket

    def _comment_position(self, ticket: MemoryTicket, comment_id: str, *, status: int | None = None) -> int:
        for position, comment in enumerate(ticket.comments):
            if comment.id == comment_id:
                return position
        if status is None:
            raise KeyError(f"ticket {ticket.ref.key} has no comment {comment_id}")
        raise RejectedError(f"ticket {ticket.ref.key} has no comment {comment_id}", status=status)

    def _append_comment(
        self,
        ticket: MemoryTicket,
        body: str,
        author: TicketAccount,
        marker: SyncMarker | None,
        *,
        restricted: bool = False,
    ) -> TicketComment:
        now = self.now()
        comment = TicketComment(
            id=str(self._next_comment_id),
            author=author,
            created=now,
            body=body,
            marker=marker,
            restricted=restricted,
            updated=now,
        )
        self._next_comment_id += 1
        ticket.comments.append(comment)
        self._touch(ticket)
        return comment

    def _append_attachment(
        self, ticket: MemoryTicket, filename: str, data: bytes, author: TicketAccount, content_type: str
    ) -> TicketAttachment:
        record = TicketAttachment(
            id=str(self._next_attachment_id),
            filename=filename,
            size=len(data),
            author=author,
            created=self.now(),
            content_type=content_type,
        )
        self._next_attachment_id += 1
        ticket.attachments.append(MemoryAttachment(record, data))
        self._touch(ticket)
        return record

    def _attachment(self, ticket: MemoryTicket, attachment_id: str) -> MemoryAttachment:
        for item in ticket.attachments:
            if item.record.id == attachment_id:
                return item
        raise KeyError(f"ticket {ticket.ref.key} has no attachment {attachment_id}")

    def _transition_for(self, ticket: MemoryTicket, status: str) -> MemoryTransition:
        available = self.workflow.available(ticket.status)
        for transition in available:
            if transition.to.casefold() == status.casefold():
                return transition
        reachable = ", ".join(dict.fromkeys(transition.to for transition in available)) or "none"
        raise RejectedError(
            f"ticket {ticket.ref.key} cannot move from {ticket.status!r} to {status!r}: no transition leads there. "
            f"Statuses reachable from {ticket.status!r}: {reachable}. "
            "Map the MDR status to one of them or add the transition to the workflow"
        )

    def _transition(self, ticket: MemoryTicket, transition: MemoryTransition, resolution: str | None) -> None:
        ticket.status = transition.to
        done = self.workflow.category(transition.to) == "done"
        ticket.resolution = (resolution or self.workflow.resolutions[0]) if done else None
        self._touch(ticket)

    def _value_of(self, ticket: MemoryTicket, field_id: str) -> Any:
        fields = ticket.fields
        simple: dict[str, Any] = {
            "summary": fields.summary,
            "description": fields.description,
            "priority": fields.priority,
            "labels": list(fields.labels),
            "components": list(fields.components),
            "issuetype": ticket.issue_type,
            "status": ticket.status,
            "resolution": ticket.resolution,
        }
        if field_id in simple:
            return simple[field_id]
        return fields.extra.get(field_id)

    def _visible(self, ticket: MemoryTicket) -> _SearchView | None:
        """Return the newest indexed view whose search delay has passed."""
        now = self.now()
        views = [view for visible_from, view in ticket.index if visible_from <= now]
        return views[-1] if views else None

    def _touch(self, ticket: MemoryTicket) -> None:
        ticket.updated = max(self.now(), ticket.updated)
        self._index(ticket)

    def _index(self, ticket: MemoryTicket) -> None:
        visible_from = self.now() + timedelta(seconds=self.search_delay)
        view = _SearchView(ticket.updated, ticket.incident_id, tuple(ticket.fields.labels), ticket.issue_type)
        ticket.index.append((visible_from, view))

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
