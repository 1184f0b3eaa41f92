"""The ServiceNow ticket adapter: records of one table (incident by default) through the Table and Attachment APIs.

A ticket the connector creates carries the MDR incident id in
`correlation_id` and `mdr-connector` in `correlation_display`, both in the
create request. `find_ticket` looks the id up before any create. Unlike a
Jira search, that query returns a record as soon as the write that made it returns.

Comments are journal entries: `comments` (Additional comments, which the
caller sees) and `work_notes` (internal). They are read from
`sys_journal_field`, which has a read ACL of its own: an account that may
read incidents can get an empty list there. `open()` checks for that, and
`add_comment` reads every entry it writes back, so a missing permission
stops the connection instead of silently dropping every comment. Journal
entries carry no hidden data and cannot be edited, so the connector ends
each entry with a marker line (`adapters/textmarker.py`) and posts a new
entry where Jira would edit one.

The mapping's `project` is an assignment group name, `issue_type` a
category value, and a priority an impact label such as `1 - High`, which
sets impact and urgency to 1; the instance computes `priority` from them.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from mdr_connector.adapters.servicenow.client import Page, ServiceNowClient
from mdr_connector.adapters.servicenow.query import format_time, in_list, keyset_query, parse_time, query_value
from mdr_connector.adapters.textmarker import split_marker, with_marker
from mdr_connector.connector import markup
from mdr_connector.connector.config import ServiceNowSettings
from mdr_connector.connector.errors import (
    ConfigError,
    InvalidPayloadError,
    ItemError,
    MisconfiguredError,
    OutcomeUnknownError,
    RejectedError,
    RemoteUnavailableError,
    RetriableError,
)
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
    find_each_ticket,
)

log = logging.getLogger(__name__)

CORRELATION_DISPLAY = "mdr-connector"
JOURNAL_TABLE = "sys_journal_field"
JOURNAL_FIELDS = "sys_id,element,element_id,value,sys_created_by,sys_created_on"
PUBLIC_ELEMENT = "comments"
INTERNAL_ELEMENT = "work_notes"
PAGE_SIZE = 100
# Keyset pages always move forward, so this bound only stops a server that keeps returning the same rows.
MAX_PAGES = 10_000
# correlation_id has room for 100 characters, and an instance cuts a longer value without an error.
INCIDENT_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,100}$")
SYS_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
NUMBER_PATTERN = re.compile(r"^[A-Za-z]{2,12}[0-9]{1,20}$")
# The length of short_description in a base instance's dictionary. The database cuts longer text.
MAX_SHORT_DESCRIPTION = 160
# Stored state values of a base instance: 1 New, 6 Resolved, 7 Closed, 8 Canceled.
NEW_STATE = "1"
ON_HOLD_STATE = "3"
CLOSED_STATE = "7"
DONE_STATES = frozenset({"6", "7", "8"})
# Resolved and Closed need a resolution code and notes under the base data policy.
CLOSING_STATES = frozenset({"6", "7"})
# The state labels of a base instance, used when sys_choice cannot be read.
BASE_STATES = {"1": "New", "2": "In Progress", "3": "On Hold", "6": "Resolved", "7": "Closed", "8": "Canceled"}
# "Awaiting Caller" makes comments mandatory and a caller's update ends the hold, so it is never chosen.
PREFERRED_HOLD_REASON = "Awaiting Vendor"
AVOIDED_HOLD_REASON = "Awaiting Caller"
BASE_HOLD_REASON = "4"
# sys_mod_count is added to sys_updated_on as microseconds, which must stay within the second.
MAX_MOD_COUNT_MICROSECONDS = 999_999
ATTACHMENT_SIZE_PROPERTY = "com.glide.attachment.max_size"
# The documented default of com.glide.attachment.max_size, in MB.
DEFAULT_ATTACHMENT_MAX_MB = 1024
ATTACHMENT_LIMIT_CACHE_SECONDS = 600.0
# How many journal entries, and how many recently updated tickets with their whole journals, the start-up check reads.
JOURNAL_PROBE_ROWS = 50
JOURNAL_PROBE_TICKETS = 10
# A journal entry is stamped in the same transaction as the ticket update, so a minute covers any clock step between the two.
READ_BACK_MARGIN = timedelta(seconds=60)
# Columns the adapter fills itself, which `fields` in the mapping cannot override.
OWN_COLUMNS = frozenset(
    {
        "short_description",
        "description",
        "impact",
        "urgency",
        "priority",
        "correlation_id",
        "correlation_display",
        "assignment_group",
        "category",
        "state",
        "comments",
        "work_notes",
    }
)
# Contract field ids that name another column in ServiceNow.
FIELD_COLUMNS = {"summary": "short_description", "priority": "impact"}
# An instance renders the text between `[code]` and `[/code]` in a journal entry as HTML while
# glide.ui.security.allow_codetag is true, its default. Spaces and case are matched loosely,
# because how an instance parses the tag is not documented.
CODE_TAG = re.compile(r"\[(\s*/?\s*code\s*\])", re.IGNORECASE)
# U+FF3B FULLWIDTH LEFT SQUARE BRACKET: the tag stays readable but is no longer a tag.
CODE_TAG_BRACKET = "\uff3b"
# Characters that take 4 bytes in UTF-8, such as emoji. ServiceNow's KB0621602 describes String
# and journal fields that lose all text from the first of them on an instance on MySQL, and
# that show `?` in their place on MariaDB. A cut journal entry loses its marker line.
FOUR_BYTE_CHARACTER = re.compile("[\U00010000-\U0010ffff]")

RowFetcher = Callable[[str, int], Awaitable[Page]]


def checked_incident_id(incident_id: str) -> str:
    """Return an MDR incident id that fits correlation_id and an encoded query, or raise InvalidPayloadError."""
    if not INCIDENT_ID_PATTERN.fullmatch(incident_id):
        raise InvalidPayloadError(
            f"MDR incident id {incident_id!r} does not fit ServiceNow's correlation_id: "
            "it must be 1 to 100 letters, digits, '-' or '_'"
        )
    return incident_id


class ServiceNowTicketAdapter:
    """TicketAdapter for ServiceNow; `project` is the assignment group of new tickets."""

    system = "servicenow"
    # NOTE: ServiceNow documents a 4,000-character limit of multi-line text
    # fields in forms (the page "Enable the text field character counter").
    # Whether the Table API applies it to journal entries was not checked,
    # so no max_comment_chars is set.
    capabilities = TicketCapabilities(
        edit_comments=False, labels=False, components=False, visibility_types=frozenset({"internal"})
    )

    def __init__(
        self,
        settings: ServiceNowSettings,
        project: str,
        other_projects: Iterable[str] = (),
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`other_projects` are the assignment groups that routes name; `clock` (monotonic seconds) is for tests."""
        self.settings = settings
        self.project = project
        self.other_projects = tuple(other_projects)
        self.table = settings.table
        self.client = ServiceNowClient(settings, clock=clock)
        self.account: TicketAccount | None = None
        # Whether a journal entry was read from sys_journal_field since the connection opened.
        self.journal_verified = False
        # Whether the instance cut a journal entry at a 4-byte character, so such characters are replaced from then on.
        self.replaces_four_byte_characters = False
        self._clock = clock
        self._display_names: dict[str, str] = {}
        self._choices: dict[str, dict[str, str]] = {}
        self._group_ids: dict[str, str] = {}
        self._attachment_limit: tuple[float, int] | None = None

    # Lifecycle

    async def open(self) -> TicketAccount:
        """Connect, read the connector's sys_user record, and check that journal entries can be read."""
        await self.client.open()
        user_name = self.settings.auth.username
        page = await self.client.list_rows(
            "open",
            "sys_user",
            query=f"user_name={query_value(user_name, 'ticket.auth.username')}",
            fields="sys_id,user_name,name",
            limit=1,
        )
        if not page.rows:
            raise MisconfiguredError(
                f"ServiceNow has no sys_user record with user_name {user_name!r} that the connector's account can read: "
                "set ticket.auth.username to the account's user name and give the account read access to sys_user"
            )
        row = page.rows[0]
        self.account = TicketAccount(id=str(row.get("user_name") or user_name), display_name=str(row.get("name") or user_name))
        self._display_names[self.account.id] = self.account.display_name

        await self._check_journal_access()
        log.info("servicenow.opened", extra={"account_id": self.account.id, "table": self.table, "project": self.project})
        return self.account

    async def close(self) -> None:
        """Close the HTTP session."""
        await self.client.close()

    async def check(self, issue_type: str, priorities: Iterable[str], project: str | None = None) -> list[str]:
        """Return what would stop ticket creation: an unknown category, impact label, assignment group or close code."""
        problems: list[str] = []
        categories = await self._choice_list("check", "category")
        if issue_type not in categories:
            problems.append(
                f"category {issue_type!r} is not a choice of {self.table}.category; "
                f"available: {', '.join(categories) or 'none readable in sys_choice'}"
            )

        impacts = await self._choice_list("check", "impact")
        labels = list(impacts.values())
        for name in dict.fromkeys(priorities):
            if name not in labels:
                problems.append(
                    f"priority {name!r} is not an impact label of {self.table}.impact; "
                    f"available: {', '.join(labels) or 'none readable in sys_choice'}"
                )

        group = self.project if project is None else project
        if group and await self._group_id("check", group) is None:
            problems.append(
                f"assignment group {group!r} does not exist or the connector's account cannot read sys_user_group"
            )

        close_codes = await self._choice_list("check", "close_code")
        if self.settings.close_code not in close_codes:
            problems.append(
                f"ticket.close_code {self.settings.close_code!r} is not a choice of {self.table}.close_code; "
                f"available: {', '.join(close_codes) or 'none readable in sys_choice'}"
            )
        return problems

    def search_delay_seconds(self) -> float:
        """Return 0, because a Table API query returns a record as soon as the write that made it returns."""
        return 0.0

    # Tickets

    async def find_ticket(self, incident_id: str) -> TicketRef | None:
        """Find the connector's ticket whose correlation_id is exactly the incident id, the oldest one when there are several."""
        own = self._own_account()
        conditions = (
            f"correlation_id={checked_incident_id(incident_id)}"
            f"^correlation_display={CORRELATION_DISPLAY}^ORsys_created_by={query_value(own.id, 'user name')}"
        )
        fields = "sys_id,number,correlation_id,sys_created_on"
        rows = await self._table_rows("find_ticket", self.table, conditions, "sys_created_on", fields)

        # The database may compare without regard to case, while incident ids are case-sensitive.
        matches = [row for row in rows if row.get("correlation_id") == incident_id]
        # Numbers grow with each record, so they order two tickets created in one second.
        matches.sort(key=lambda row: (str(row.get("sys_created_on") or ""), str(row.get("number") or "")))
        if not matches:
            return None
        if len(matches) > 1:
            log.warning(
                "servicenow.ticket.duplicates",
                extra={"incident_id": incident_id, "ticket_keys": [str(row.get("number")) for row in matches]},
            )
        return self._ref(matches[0])

    async def find_incident_tickets(self, incident_ids: Sequence[str]) -> dict[str, TicketRef]:
        return await find_each_ticket(self, incident_ids)

    async def create_ticket(self, draft: TicketDraft) -> TicketRef:
        """Create a record carrying the correlation id. A lost reply is OutcomeUnknownError, to be followed by `find_ticket`."""
        body = {**self._extra_values(draft.fields.extra), **await self._field_values(draft.fields, frozenset())}
        body["correlation_id"] = checked_incident_id(draft.incident_id)
        body["correlation_display"] = CORRELATION_DISPLAY
        if draft.issue_type:
            body["category"] = draft.issue_type
        if draft.project:
            body["assignment_group"] = await self._required_group("create_ticket", draft.project)

        row = await self.client.insert_row("create_ticket", self.table, body, "sys_id,number")
        try:
            ref = self._ref(row)
        except (KeyError, InvalidPayloadError) as err:
            raise OutcomeUnknownError("ServiceNow accepted create_ticket but its reply has no sys_id or number") from err
        log.info("servicenow.ticket.created", extra={"ticket_key": ref.key, "incident_id": draft.incident_id})
        return ref

    async def update_ticket(self, ref: TicketRef, fields: TicketFields, skip: frozenset[str] = frozenset()) -> None:
        """Write the mapped fields except those in `skip`, and send nothing when every field is skipped.

        Setting values can be repeated safely, so a lost reply is retried like a read.
        """
        values = {
            **{name: value for name, value in self._extra_values(fields.extra).items() if name not in skip},
            **await self._field_values(fields, skip),
        }
        if not values:
            log.debug("servicenow.ticket.update_skipped", extra={"ticket_key": ref.key})
            return
        await self.client.update_row("update_ticket", self.table, _sys_id(ref), values, "sys_id", write=False)
        log.info("servicenow.ticket.updated", extra={"ticket_key": ref.key, "skipped": sorted(skip)})

    async def changed_tickets(self, since: datetime) -> list[TicketChange]:
        """Return the tickets updated at or after `since`, oldest first.

        The search covers every ticket with a correlation_id and every ticket
        the connector's account created, so clearing correlation_id does not
        cut off a ticket the connector made. The bound is cut to the second,
        because sys_updated_on has no finer precision.
        """
        if since.tzinfo is None:
            raise ValueError("since must be timezone-aware")
        own = self._own_account()
        conditions = f"correlation_idISNOTEMPTY^ORsys_created_by={query_value(own.id, 'user name')}"
        rows = await self._table_rows(
            "changed_tickets",
            self.table,
            conditions,
            "sys_updated_on",
            "sys_id,number,sys_updated_on,sys_mod_count",
            since=format_time(since),
        )
        changes = [TicketChange(self._ref(row), _version_time(row)) for row in rows]
        return sorted(changes, key=lambda change: (change.updated, change.ref.id))

    async def get_ticket(self, key: str) -> TicketRef | None:
        """Return the ticket with this number (INC0010001) or sys_id, or None when there is none or the text is neither."""
        if SYS_ID_PATTERN.fullmatch(key):
            row = await self.client.get_row("get_ticket", self.table, key, "sys_id,number")
            return self._ref(row) if row else None
        if not NUMBER_PATTERN.fullmatch(key):
            return None
        page = await self.client.list_rows(
            "get_ticket", self.table, query=f"number={key.upper()}", fields="sys_id,number", limit=1
        )
        return self._ref(page.rows[0]) if page.rows else None

    async def set_correlation(self, ref: TicketRef, incident_id: str) -> None:
        """Give an existing ticket the correlation fields of a created one, or raise RejectedError when it carries another id."""
        checked_incident_id(incident_id)
        row = await self.client.get_row("set_correlation", self.table, _sys_id(ref), "correlation_id,correlation_display")
        if row is None:
            raise RejectedError(f"ServiceNow ticket {ref.key} does not exist or the connector's account cannot read it", 404)
        other = str(row.get("correlation_id") or "")
        if other and other != incident_id:
            raise RejectedError(
                f"ServiceNow ticket {ref.key} already carries correlation_id {other!r} "
                f"(from {row.get('correlation_display') or 'another integration'}), so it cannot carry MDR incident "
                f"{incident_id} too; clear correlation_id on the ticket to link it"
            )

        body = {"correlation_id": incident_id, "correlation_display": CORRELATION_DISPLAY}
        await self.client.update_row("set_correlation", self.table, _sys_id(ref), body, "sys_id", write=False)
        log.info("servicenow.ticket.correlated", extra={"ticket_key": ref.key, "incident_id": incident_id})

    async def find_tickets(self, query: TicketQuery, since: datetime) -> list[TicketRef]:
        """Return the tickets of a category and assignment group created at or after `since`, oldest first.

        ServiceNow tickets have no labels, so a query with a label finds nothing.
        """
        if since.tzinfo is None:
            raise ValueError("since must be timezone-aware")
        if query.label is None and query.issue_type is None:
            raise ConfigError(
                f"a ticket query on assignment group {query.project} needs a category (issue_type), "
                "otherwise every ticket of the group would create an MDR incident"
            )
        if query.label is not None or query.issue_type is None:
            log.debug("servicenow.find_tickets.label_ignored", extra={"label": query.label})
            return []

        conditions = f"category={query_value(query.issue_type, 'category')}"
        if query.project:
            group_id = await self._group_id("find_tickets", query.project)
            if group_id is None:
                return []
            conditions += f"^assignment_group={group_id}"
        rows = await self._table_rows(
            "find_tickets", self.table, conditions, "sys_created_on", "sys_id,number,sys_created_on", since=format_time(since)
        )
        rows.sort(key=lambda row: (str(row.get("sys_created_on") or ""), str(row.get("number") or "")))
        return [self._ref(row) for row in rows]

    # Comments

    async def list_comments(self, ref: TicketRef) -> list[TicketComment]:
        """Return every comment and work note, oldest first, with work notes restricted.

        A marker line counts only on entries by the connector's own account,
        because anyone can type it. Other entries are plain text, shown as
        Markdown that renders every character as typed.
        """
        own = self._own_account()
        conditions = f"element_id={_sys_id(ref)}^elementIN{PUBLIC_ELEMENT},{INTERNAL_ELEMENT}"
        rows = await self._table_rows("list_comments", JOURNAL_TABLE, conditions, "sys_created_on", JOURNAL_FIELDS)
        names = await self._names_of({str(row.get("sys_created_by") or "") for row in rows})
        parts = await asyncio.to_thread(lambda: [self._journal_body(row, own) for row in rows])

        comments = []
        for row, (body, marker) in zip(rows, parts, strict=True):
            author_id = str(row.get("sys_created_by") or "")
            comments.append(
                TicketComment(
                    id=_required_text(row, "sys_id", "journal entry"),
                    author=TicketAccount(author_id, names.get(author_id, author_id)),
                    created=parse_time(row.get("sys_created_on")),
                    body=body,
                    marker=marker,
                    restricted=row.get("element") == INTERNAL_ELEMENT,
                )
            )
        return sorted(comments, key=lambda comment: (comment.created, comment.id))

    async def add_comment(self, ref: TicketRef, draft: CommentDraft) -> TicketComment:
        """Append a journal entry ending with the marker line, then read it back from sys_journal_field.

        `visibility` internal writes a work note, none writes an Additional
        comment. An entry that cannot be read back raises MisconfiguredError.
        An entry that the instance cut at a 4-byte character is written once
        more with U+FFFD in place of such characters, as every later text is.
        """
        element = _journal_element(draft.visibility)
        entry = await self._append_entry(ref, element, draft)
        if entry is None:
            self.replaces_four_byte_characters = True
            log.warning("servicenow.journal.text_cut", extra={"ticket_key": ref.key, "source_id": draft.marker.source_id})
            entry = await self._append_entry(ref, element, draft)
        if entry is None:
            raise self._journal_unreadable(f"the entry just written on {ref.key} is not among the entries it returned")
        comment = TicketComment(
            id=_required_text(entry, "sys_id", "journal entry"),
            author=self._own_account(),
            created=parse_time(entry.get("sys_created_on")),
            body=draft.body,
            marker=draft.marker,
            restricted=element == INTERNAL_ELEMENT,
        )
        log.info(
            "servicenow.comment.created",
            extra={"ticket_key": ref.key, "comment_id": comment.id, "source_id": draft.marker.source_id, "element": element},
        )
        return comment

    async def _append_entry(self, ref: TicketRef, element: str, draft: CommentDraft) -> dict[str, Any] | None:
        """Write one journal entry and return its sys_journal_field row, or None when the instance cut it short."""
        try:
            text = with_marker(_without_code_tags(self._storable_text(draft.body)), draft.marker)
        except ValueError as err:
            raise InvalidPayloadError(str(err)) from err

        reply = await self.client.update_row(
            "add_comment", self.table, _sys_id(ref), {element: text}, "sys_id,sys_updated_on", write=True
        )
        try:
            return await self._read_back(ref, element, text, draft.marker, reply.get("sys_updated_on"))
        except RetriableError as err:
            # The entry was written, so sending it again could post it twice.
            raise OutcomeUnknownError(
                f"ServiceNow took the journal entry for {ref.key}, but reading it back failed: {err}"
            ) from err
        except RejectedError as err:
            raise self._journal_unreadable(f"reading back the entry just written on {ref.key} was rejected: {err}") from err

    async def comment_length(self, body: str) -> int:
        """Return the Markdown length of a body: no comment limit is known here, so `max_comment_chars` is None."""
        return len(body)

    async def edit_comment(self, ref: TicketRef, comment_id: str, draft: CommentDraft) -> TicketComment:
        """Raise RejectedError: ServiceNow journal entries cannot be edited through the API."""
        raise RejectedError(
            f"ServiceNow journal entries cannot be edited, so comment {comment_id} of {ref.key} keeps its text; "
            "the connector posts a new entry instead (capabilities.edit_comments is False)"
        )

    # Attachments

    async def list_attachments(self, ref: TicketRef) -> list[TicketAttachment]:
        """Return every attachment of the ticket, oldest first, across all pages."""
        conditions = f"table_name={self.table}^table_sys_id={_sys_id(ref)}"

        def fetch(query: str, offset: int) -> Awaitable[Page]:
            return self.client.list_attachments("list_attachments", query=query, limit=PAGE_SIZE, offset=offset)

        rows = await self._keyset_rows("list_attachments", fetch, conditions, "sys_created_on")
        names = await self._names_of({str(row.get("sys_created_by") or "") for row in rows})
        attachments = [self._attachment_of(row, names) for row in rows]
        return sorted(attachments, key=lambda item: (item.created, item.id))

    async def download_attachment(self, attachment: TicketAttachment, destination: Path) -> int:
        """Stream an attachment's bytes into `destination` and return how many were written.

        The link comes from the attachment record and must be on the
        configured instance. The body must have the size that the record lists.
        """
        if not SYS_ID_PATTERN.fullmatch(attachment.id):
            raise InvalidPayloadError(f"ServiceNow attachment id {attachment.id!r} is not a sys_id")
        record = await self.client.attachment_record("download_attachment", attachment.id)
        size = _whole_number(record.get("size_bytes"))
        link = record.get("download_link")
        if size is None:
            raise InvalidPayloadError(f"ServiceNow attachment {attachment.id} has no readable size_bytes")
        if not isinstance(link, str) or not link:
            link = f"{self.client.base_url}/api/now/attachment/{attachment.id}/file"
        self.client.check_download_link(link, attachment.id)

        try:
            written = await self.client.download("download_attachment", link, destination, size)
        except OSError as err:
            raise ItemError(
                f"cannot write ServiceNow attachment {attachment.id} to {destination}: {err.strerror or err}; "
                "check the free space and permissions of the connector's data folder"
            ) from err
        log.info("servicenow.attachment.downloaded", extra={"attachment_id": attachment.id, "bytes": written})
        return written

    async def upload_attachment(self, ref: TicketRef, upload: AttachmentUpload) -> TicketAttachment:
        """Stream a spooled file to `attachment/file` as the raw body with its Content-Type, and return the new attachment."""
        try:
            record = await self.client.upload(
                "upload_attachment", self.table, _sys_id(ref), upload.path, upload.filename, upload.content_type
            )
        except OSError as err:
            raise ItemError(f"cannot read the spooled file {upload.path}: {err.strerror or err}") from err
        except RejectedError as err:
            raise _too_large(err, upload) from err
        try:
            attachment = self._attachment_of(record, {})
        except InvalidPayloadError as err:
            raise OutcomeUnknownError(
                f"ServiceNow accepted the upload of {upload.filename!r} to {ref.key} but its reply names no attachment"
            ) from err
        log.info(
            "servicenow.attachment.uploaded",
            extra={"ticket_key": ref.key, "attachment_id": attachment.id, "bytes": attachment.size},
        )
        return attachment

    async def attachment_limit(self) -> int | None:
        """Return com.glide.attachment.max_size in bytes, read again after 10 minutes.

        Reading sys_properties usually needs the admin role. Without it the
        documented default of 1024 MB is assumed.
        """
        now = self._clock()
        if self._attachment_limit is not None and now - self._attachment_limit[0] < ATTACHMENT_LIMIT_CACHE_SECONDS:
            return self._attachment_limit[1]

        megabytes = await self._attachment_max_mb()
        limit = megabytes * 1024 * 1024
        self._attachment_limit = (now, limit)
        return limit

    # Workflow

    async def get_state(self, ref: TicketRef, field_ids: Iterable[str] = ()) -> TicketState:
        """Read the state, its category, sys_updated_on and the named fields.

        `summary` reads short_description, `priority` the impact label, and
        `description` the text as Markdown. Other ids are column names whose
        stored value is returned, or None when the table has no such column.
        """
        wanted = list(dict.fromkeys(field_ids))
        columns = [FIELD_COLUMNS.get(field_id, field_id) for field_id in wanted]
        fields = ",".join(dict.fromkeys(["state", "sys_updated_on", *columns]))
        row = await self.client.get_row("get_state", self.table, _sys_id(ref), fields)
        if row is None:
            raise RejectedError(f"ServiceNow ticket {ref.key} does not exist or the connector's account cannot read it", 404)

        state = str(row.get("state") or "")
        states = await self._state_labels("get_state")
        result = TicketState(
            status=states.get(state, state),
            status_category=_status_category(state),
            updated=parse_time(row.get("sys_updated_on")),
        )
        for field_id, column in zip(wanted, columns, strict=True):
            result.values[field_id] = await self._plain_value(field_id, row.get(column))
        return result

    async def transition_to(self, ref: TicketRef, status: str) -> None:
        """Set the state whose label is `status`, compared without regard to case.

        Resolved and Closed are sent with ticket.close_code and
        ticket.close_notes, On Hold with a hold reason. A state the instance
        rejects raises RejectedError with its reason and the known states.
        """
        states = await self._state_labels("transition_to")
        target = next((value for value, label in states.items() if label.casefold() == status.casefold()), None)
        known = ", ".join(states.values())
        if target is None:
            raise RejectedError(
                f"ServiceNow has no {self.table} state named {status!r}; states: {known}. "
                "Map the MDR status to one of them in status.to_ticket"
            )

        row = await self.client.get_row("transition_to", self.table, _sys_id(ref), "state")
        if row is None:
            raise RejectedError(f"ServiceNow ticket {ref.key} does not exist or the connector's account cannot read it", 404)
        current = str(row.get("state") or "")
        if current == target:
            log.debug("servicenow.transition.not_needed", extra={"ticket_key": ref.key, "status": status})
            return

        body: dict[str, Any] = {"state": target}
        if target in CLOSING_STATES:
            body["close_code"] = self.settings.close_code
            body["close_notes"] = self.settings.close_notes
        if target == ON_HOLD_STATE:
            body["hold_reason"] = await self._hold_reason()
        try:
            await self.client.update_row("transition_to", self.table, _sys_id(ref), body, "sys_id", write=False)
        except RejectedError as err:
            raise RejectedError(
                f"ServiceNow ticket {ref.key} cannot move from {states.get(current, current)!r} to {status!r}: {err}. "
                f"{_transition_hint(target, self.settings.close_code)}States: {known}",
                err.status,
            ) from err
        log.info(
            "servicenow.ticket.transitioned",
            extra={"ticket_key": ref.key, "from_status": states.get(current, current), "status": status},
        )

    # Accounts

    async def account_groups(self, account_id: str) -> set[str]:
        """Return the names of the groups of the user with this user_name, or an empty set for an unknown user."""
        if not account_id:
            return set()
        page = await self.client.list_rows(
            "account_groups",
            "sys_user",
            query=f"user_name={query_value(account_id, 'user name')}",
            fields="sys_id",
            limit=1,
        )
        if not page.rows:
            log.warning("servicenow.account.unknown", extra={"account_id": account_id})
            return set()
        user_id = _required_text(page.rows[0], "sys_id", "sys_user record")

        members = await self._table_rows("account_groups", "sys_user_grmember", f"user={user_id}", None, "sys_id,group")
        group_ids = sorted({str(row.get("group") or "") for row in members} - {""})
        if not group_ids:
            return set()
        groups = await self._table_rows(
            "account_groups", "sys_user_group", f"sys_idIN{in_list(group_ids, 'group sys_id')}", None, "sys_id,name"
        )
        return {str(row["name"]) for row in groups if row.get("name")}

    # Journal access

    async def _check_journal_access(self) -> None:
        """Fail with MisconfiguredError when journal entries exist but sys_journal_field shows none.

        A readable entry proves access. Without one, the recent tickets are
        read with display values, where comments and work notes come back as
        text through the ticket's own field ACLs. Text there while
        sys_journal_field returns none of that ticket's entries means its
        read ACL hides the entries. An empty first probe alone proves
        nothing, because an instance applies the page limit before the ACL.
        NOTE: on an instance where neither shows any entry the check cannot
        decide, and the first `add_comment`, which reads its entry back,
        fails instead.
        """
        try:
            probe = await self.client.list_rows(
                "open",
                JOURNAL_TABLE,
                query=f"name={self.table}^elementIN{PUBLIC_ELEMENT},{INTERNAL_ELEMENT}",
                fields="sys_id",
                limit=JOURNAL_PROBE_ROWS,
            )
        except RejectedError as err:
            raise self._journal_unreadable(f"reading it was rejected: {err}") from err
        if probe.rows:
            self.journal_verified = True
            log.debug("servicenow.journal_check.passed", extra={"table": self.table})
            return

        recent = await self.client.list_rows(
            "open",
            self.table,
            query="ORDERBYDESCsys_updated_on",
            fields=f"sys_id,number,{PUBLIC_ELEMENT},{INTERNAL_ELEMENT}",
            limit=JOURNAL_PROBE_TICKETS,
            display_value=True,
        )
        for row in recent.rows:
            if not (_display_text(row.get(PUBLIC_ELEMENT)) or _display_text(row.get(INTERNAL_ELEMENT))):
                continue
            # The read ACL may have emptied the probe's page while entries of tickets the account reads stay readable.
            if await self._ticket_journal_readable(_display_text(row.get("sys_id"))):
                self.journal_verified = True
                log.debug("servicenow.journal_check.passed", extra={"table": self.table})
                return
            ticket = row.get("number") or row.get("sys_id")
            raise self._journal_unreadable(f"the table returned no entry, but ticket {ticket} shows comments or work notes")
        log.info("servicenow.journal_check.deferred", extra={"table": self.table})

    async def _ticket_journal_readable(self, sys_id: str) -> bool:
        if not SYS_ID_PATTERN.fullmatch(sys_id):
            return False
        try:
            page = await self.client.list_rows(
                "open",
                JOURNAL_TABLE,
                query=f"element_id={sys_id}^elementIN{PUBLIC_ELEMENT},{INTERNAL_ELEMENT}",
                fields="sys_id",
                limit=JOURNAL_PROBE_ROWS,
            )
        except RejectedError:
            return False
        return bool(page.rows)

    async def _read_back(
        self, ref: TicketRef, element: str, text: str, marker: SyncMarker, written_at: Any
    ) -> dict[str, Any] | None:
        """Find the entry `add_comment` just wrote, by its marker, among the ticket's recent entries of `element`.

        Return None when, instead of it, the connector's entries hold `text`
        cut at its first 4-byte character, where an instance on MySQL stops storing.
        """
        own = self._own_account()
        conditions = f"element_id={_sys_id(ref)}^element={element}"
        since = _read_back_start(written_at)
        rows = await self._table_rows("add_comment", JOURNAL_TABLE, conditions, "sys_created_on", JOURNAL_FIELDS, since=since)

        marked = [row for row in rows if split_marker(str(row.get("value") or ""))[1] == marker]
        mine = [row for row in marked if row.get("sys_created_by") == own.id]
        if mine:
            self.journal_verified = True
            return mine[-1]
        if marked:
            author = marked[-1].get("sys_created_by")
            raise MisconfiguredError(
                f"ServiceNow recorded the connector's journal entry on {ref.key} as written by {author!r}, "
                f"not by {own.id!r}: set ticket.auth.username to the user that the credentials act as, "
                "or the connector cannot tell its own comments from people's"
            )
        own_values = [str(row.get("value") or "") for row in rows if row.get("sys_created_by") == own.id]
        if _cut_at_four_byte_character(text, own_values):
            return None
        raise self._journal_unreadable(f"the entry just written on {ref.key} is not among the entries it returned")

    def _journal_unreadable(self, evidence: str) -> MisconfiguredError:
        own = self._own_account()
        return MisconfiguredError(
            f"the ServiceNow account {own.id} cannot read journal entries from sys_journal_field: {evidence}. "
            "Without that read access no comment or work note reaches MDR. "
            "Give the account's role a read ACL on sys_journal_field and start the connector again"
        )

    # Paging

    async def _table_rows(
        self, operation: str, table: str, conditions: str, time_field: str | None, fields: str, *, since: str | None = None
    ) -> list[dict[str, Any]]:
        """Read every row of `table` that matches `conditions`, ordered by `time_field` (when given) and sys_id."""
        columns = ",".join(dict.fromkeys([*fields.split(","), "sys_id", *([time_field] if time_field else [])]))

        def fetch(query: str, offset: int) -> Awaitable[Page]:
            return self.client.list_rows(operation, table, query=query, fields=columns, limit=PAGE_SIZE, offset=offset)

        return await self._keyset_rows(operation, fetch, conditions, time_field, since)

    async def _keyset_rows(
        self, operation: str, fetch: RowFetcher, conditions: str, time_field: str | None, since: str | None = None
    ) -> list[dict[str, Any]]:
        """Read keyset pages until an empty page at the end, keeping the last version of each row.

        A short page never ends the read, because an instance applies the
        limit before its read ACL removes rows. When the ACL removed a whole
        page, the next page of the same query is read by offset, as long as
        X-Total-Count shows that rows remain.
        NOTE: that X-Total-Count counts the rows the ACL removes is assumed,
        not documented; without the header an empty page ends the read.
        """
        rows: dict[str, dict[str, Any]] = {}
        after: tuple[str, str] | None = None
        offset = 0
        for _page in range(MAX_PAGES):
            page = await fetch(keyset_query(conditions, time_field, since, after), offset)
            if page.rows:
                for row in page.rows:
                    sys_id = _required_text(row, "sys_id", "record")
                    rows.pop(sys_id, None)
                    rows[sys_id] = row
                last = page.rows[-1]
                after = (_required_text(last, time_field, "record") if time_field else "", str(last["sys_id"]))
                offset = 0
                continue
            if page.total is not None and offset + PAGE_SIZE < page.total:
                offset += PAGE_SIZE
                continue
            return list(rows.values())
        raise RemoteUnavailableError(
            f"ServiceNow {operation} returned rows for {MAX_PAGES} pages without reaching the end; it is tried again later"
        )

    # Lookups

    async def _names_of(self, user_names: set[str]) -> dict[str, str]:
        """Return display names by user_name, reading sys_user for the names not cached; an unknown user keeps its user_name."""
        missing = sorted(name for name in user_names - set(self._display_names) if name and "," not in name)
        for start in range(0, len(missing), PAGE_SIZE):
            batch = missing[start : start + PAGE_SIZE]
            page = await self.client.list_rows(
                "read_users", "sys_user", query=f"user_nameIN{in_list(batch, 'user name')}", fields="user_name,name", limit=PAGE_SIZE
            )
            for row in page.rows:
                self._display_names[str(row.get("user_name"))] = str(row.get("name") or row.get("user_name"))
            for name in batch:
                self._display_names.setdefault(name, name)
        return {name: self._display_names.get(name, name) for name in user_names}

    async def _choice_list(self, operation: str, element: str) -> dict[str, str]:
        """Return the active choices of a column as value -> label, in their sequence.

        Choices of the ticket table win. Without any come those of
        `incident`, from which a child table inherits state, category and
        close_code, and then those of `task`, which defines impact and
        urgency on many instances.
        NOTE: a table that extends task directly falls back to incident's choices too.
        """
        cached = self._choices.get(element)
        if cached is not None:
            return cached

        choices: dict[str, str] = {}
        for table in dict.fromkeys([self.table, "incident", "task"]):
            query = f"name={table}^element={query_value(element, 'column')}^ORDERBYsequence"
            page = await self.client.list_rows(
                operation, "sys_choice", query=query, fields="value,label,inactive,language", limit=1000
            )
            choices = _active_choices(page.rows)
            if choices:
                break
        if choices:
            self._choices[element] = choices
        return choices

    async def _state_labels(self, operation: str) -> dict[str, str]:
        # NOTE: the base instance's states are assumed when sys_choice shows none.
        return await self._choice_list(operation, "state") or dict(BASE_STATES)

    async def _hold_reason(self) -> str:
        """Pick the hold reason sent with On Hold: Awaiting Vendor, else any but Awaiting Caller, else 4.

        NOTE: MDR's "On hold" does not state whom the SOC waits for, so
        Awaiting Vendor is a choice, not a fact. Awaiting Caller is avoided
        because a caller's update ends that hold.
        """
        reasons = await self._choice_list("transition_to", "hold_reason")
        by_label = {label: value for value, label in reasons.items()}
        if PREFERRED_HOLD_REASON in by_label:
            return by_label[PREFERRED_HOLD_REASON]
        return next((value for value, label in reasons.items() if label != AVOIDED_HOLD_REASON), BASE_HOLD_REASON)

    async def _group_id(self, operation: str, name: str) -> str | None:
        cached = self._group_ids.get(name)
        if cached is not None:
            return cached
        page = await self.client.list_rows(
            operation, "sys_user_group", query=f"name={query_value(name, 'assignment group')}", fields="sys_id,name", limit=10
        )
        found = next((str(row["sys_id"]) for row in page.rows if row.get("name") == name and row.get("sys_id")), None)
        if found is not None:
            self._group_ids[name] = found
        return found

    async def _required_group(self, operation: str, name: str) -> str:
        group_id = await self._group_id(operation, name)
        if group_id is None:
            raise RejectedError(
                f"ServiceNow has no assignment group {name!r} that the connector's account can read; "
                "create the group or change `project` (or the route) in the mapping"
            )
        return group_id

    async def _attachment_max_mb(self) -> int:
        try:
            page = await self.client.list_rows(
                "attachment_limit", "sys_properties", query=f"name={ATTACHMENT_SIZE_PROPERTY}", fields="name,value", limit=1
            )
            value = str(page.rows[0].get("value") or "").strip() if page.rows else ""
        except RejectedError:
            value = ""
        if value.isdigit():
            return int(value)
        # NOTE: an instance whose property the account cannot read may have a lower limit.
        # The upload of a larger file is then rejected, and the engine names the file in a comment.
        log.info("servicenow.attachment_limit.assumed", extra={"megabytes": DEFAULT_ATTACHMENT_MAX_MB})
        return DEFAULT_ATTACHMENT_MAX_MB

    # Records

    async def _field_values(self, fields: TicketFields, skip: frozenset[str]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        if "summary" not in skip:
            values["short_description"] = _short_description(self._storable_text(fields.summary))
        if "description" not in skip:
            values["description"] = self._storable_text(fields.description)
        if fields.priority and "priority" not in skip:
            impact = await self._impact_value(fields.priority)
            values["impact"] = impact
            values["urgency"] = impact
        return values

    def _extra_values(self, extra: dict[str, Any]) -> dict[str, Any]:
        return {name: value for name, value in extra.items() if name not in OWN_COLUMNS}

    async def _impact_value(self, label: str) -> str:
        impacts = await self._choice_list("priority", "impact")
        value = next((value for value, known in impacts.items() if known == label), None)
        if value is None:
            raise RejectedError(
                f"priority {label!r} is not an impact label of {self.table}.impact; "
                f"available: {', '.join(impacts.values()) or 'none readable in sys_choice'}. Fix `priority` in the mapping"
            )
        return value

    async def _plain_value(self, field_id: str, value: Any) -> Any:
        if value is None:
            return None
        if field_id == "description":
            return await asyncio.to_thread(markup.plain_to_markdown, str(value))
        if field_id == "priority":
            impacts = await self._choice_list("get_state", "impact")
            return impacts.get(str(value), str(value))
        return value

    def _storable_text(self, text: str) -> str:
        """Remove control characters, and replace 4-byte characters with U+FFFD once the instance was seen to cut text at them."""
        text = markup.clean_text(text)
        if self.replaces_four_byte_characters:
            text = FOUR_BYTE_CHARACTER.sub("\ufffd", text)
        return text

    def _journal_body(self, row: dict[str, Any], own: TicketAccount) -> tuple[str, SyncMarker | None]:
        """Return an entry's body as Markdown and its marker, trusted only on the connector's own entries."""
        value = str(row.get("value") or "")
        if row.get("sys_created_by") == own.id:
            return split_marker(value)
        return markup.plain_to_markdown(value), None

    def _attachment_of(self, row: dict[str, Any], names: dict[str, str]) -> TicketAttachment:
        size = _whole_number(row.get("size_bytes"))
        if size is None:
            raise InvalidPayloadError(f"ServiceNow attachment {row.get('sys_id')!r} has no readable size_bytes")
        author = str(row.get("sys_created_by") or "")
        return TicketAttachment(
            id=_required_text(row, "sys_id", "attachment"),
            filename=_required_text(row, "file_name", "attachment"),
            size=size,
            author=TicketAccount(author, names.get(author) or self._display_names.get(author, author)),
            created=parse_time(row.get("sys_created_on")),
            content_type=str(row.get("content_type") or "application/octet-stream"),
        )

    def _ref(self, row: dict[str, Any]) -> TicketRef:
        sys_id = _required_text(row, "sys_id", "ticket")
        number = str(row.get("number") or sys_id)
        return TicketRef(key=number, id=sys_id, url=f"{self.client.base_url}/{self.table}.do?sys_id={sys_id}")

    def _own_account(self) -> TicketAccount:
        if self.account is None:
            raise RuntimeError("await ServiceNowTicketAdapter.open() first")
        return self.account


def _sys_id(ref: TicketRef) -> str:
    if not SYS_ID_PATTERN.fullmatch(ref.id):
        raise InvalidPayloadError(f"ServiceNow ticket {ref.key} has id {ref.id!r}, which is not a sys_id")
    return ref.id


def _journal_element(visibility: CommentVisibility | None) -> str:
    if visibility is None:
        return PUBLIC_ELEMENT
    if visibility.type == "internal":
        return INTERNAL_ELEMENT
    raise ConfigError(
        f"ServiceNow does not support comment visibility type {visibility.type!r}; "
        "use `comments.visibility: {type: internal}` for work notes, or remove it"
    )


def _version_time(row: dict[str, Any]) -> datetime:
    """Return sys_updated_on with sys_mod_count added as microseconds.

    sys_updated_on counts whole seconds, so two updates of one second would
    carry the same time, and a change made in the second that the engine
    last reconciled would look already seen. The update count separates them.
    """
    count = _whole_number(row.get("sys_mod_count")) or 0
    return parse_time(row.get("sys_updated_on")) + timedelta(microseconds=min(count, MAX_MOD_COUNT_MICROSECONDS))


def _read_back_start(written_at: Any) -> str | None:
    """Return where the read-back of a new journal entry starts, or None to read every entry when the reply has no time."""
    try:
        return format_time(parse_time(written_at) - READ_BACK_MARGIN)
    except InvalidPayloadError:
        return None


def _status_category(state: str) -> str:
    if state == NEW_STATE:
        return "new"
    if state in DONE_STATES:
        return "done"
    return "indeterminate"


def _transition_hint(target: str, close_code: str) -> str:
    if target == CLOSED_STATE:
        return (
            "Closing needs the itil_admin or admin role, which the connector's account may lack; "
            "map the MDR status to Resolved, or grant the role. "
        )
    if target in CLOSING_STATES:
        return f"Check that ticket.close_code {close_code!r} is a resolution code of the instance. "
    if target == ON_HOLD_STATE:
        return "On Hold needs a hold reason from the instance's hold_reason choices. "
    return ""


def _too_large(err: RejectedError, upload: AttachmentUpload) -> RejectedError:
    """Report an upload rejected for its size as HTTP 413, for which the engine posts a notice on the ticket."""
    text = str(err).casefold()
    if err.status == 413 or (err.status == 400 and any(word in text for word in ("size", "too large", "exceed"))):
        return RejectedError(f"ServiceNow rejected {upload.filename!r} ({upload.size} bytes) as too large: {err}", 413)
    return err


def _active_choices(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Return value -> label of the active rows, in English where the instance has several languages."""
    active = [row for row in rows if str(row.get("inactive") or "false") != "true" and row.get("value") is not None]
    english = [row for row in active if str(row.get("language") or "en") == "en"]
    return {str(row["value"]): str(row.get("label") or row["value"]) for row in english or active}


def _cut_at_four_byte_character(text: str, values: list[str]) -> bool:
    """Tell whether one of `values` is `text` without everything from its first 4-byte character on."""
    first = FOUR_BYTE_CHARACTER.search(text)
    if first is None:
        return False
    head = text[: first.start()].rstrip()
    return any(value.rstrip() == head for value in values)


def _without_code_tags(text: str) -> str:
    """Replace the `[` of each `[code]` and `[/code]` tag with a look-alike, so the instance shows the text instead of rendering it."""
    return CODE_TAG.sub(lambda match: CODE_TAG_BRACKET + match.group(1), text)


def _short_description(text: str) -> str:
    """Make one line of at most 160 characters, ending with … when cut."""
    line = " ".join(text.split())
    if len(line) <= MAX_SHORT_DESCRIPTION:
        return line
    return line[: MAX_SHORT_DESCRIPTION - 1] + "…"


def _display_text(value: Any) -> str:
    if isinstance(value, dict):
        value = value.get("display_value")
    return str(value or "").strip()


def _whole_number(value: Any) -> int | None:
    text = str(value if value is not None else "").strip()
    return int(text) if text.isdigit() else None


def _required_text(row: dict[str, Any], name: str, what: str) -> str:
    value = row.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidPayloadError(f"ServiceNow returned a {what} without {name}")
    return value
