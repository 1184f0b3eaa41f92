"""The Redmine ticket adapter: Redmine 5.0 through its REST API, with an API key.

An issue carries the MDR incident id in an issue custom field that an
administrator creates once (the REST API cannot create custom fields), and
which the adapter finds by the name in `ticket.correlation_field`. The
value travels in the create request itself, so no issue exists without it
unless the field is not enabled for the issue's tracker, which the create
reply shows. A note the connector writes ends with a text marker line
(adapters/textmarker.py), trusted only on notes by the connector's account.

A ticket's key and id are both the issue number as text ("123"), because
Redmine has no other key; `get_ticket` also accepts "#123".

Searches cover the mapping's project and every project a ticket went to,
as in the Jira adapter. Redmine's issue queries read from the database, so
a write is searchable at once.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from mdr_connector.adapters.redmine import formatting
from mdr_connector.adapters.redmine.client import Params, RedmineClient
from mdr_connector.adapters.redmine.records import (
    account_of,
    attachment_of,
    custom_field_id_by_name,
    custom_value,
    filter_params,
    has_custom_field,
    item_id,
    optional_time,
    parse_time,
    plain_value,
    query_time,
    whole_second,
)
from mdr_connector.adapters.textmarker import split_marker, with_marker
from mdr_connector.connector import markup
from mdr_connector.connector.config import RedmineSettings
from mdr_connector.connector.errors import (
    ConfigError,
    InvalidPayloadError,
    ItemError,
    MisconfiguredError,
    OutcomeUnknownError,
    RejectedError,
)
from mdr_connector.connector.tickets import (
    AttachmentUpload,
    CommentDraft,
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

# Redmine caps `limit` at 100 per page (ApplicationController#api_offset_and_limit in 5.0).
PAGE_SIZE = 100
MAX_SUBJECT_LENGTH = 255
MAX_INCIDENT_ID_LENGTH = 255
# Project identifiers are lowercase letters, digits, `-` and `_`. Numeric project ids are accepted too.
PROJECT_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,100}$")
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")
# Issue attributes the mapping sets through its own keys, never through `fields`.
CORE_FIELDS = frozenset({"project_id", "tracker_id", "subject", "description", "priority_id", "custom_fields"})
# Permissions the connector's role needs in every project it creates issues in.
REQUIRED_PERMISSIONS = ("view_issues", "add_issues", "edit_issues", "add_issue_notes")
SETUP_GUIDE = "docs/redmine.md"


class RedmineTicketAdapter:
    """TicketAdapter for Redmine; `project` is the identifier of the mapping's project."""

    system = "redmine"
    # PUT /journals/{id}.json edits a note in Redmine 5.0 (JournalsController#update accepts API keys).
    capabilities = TicketCapabilities(
        edit_comments=True,
        labels=False,
        components=False,
        visibility_types=frozenset({"internal"}),
    )

    def __init__(self, settings: RedmineSettings, project: str, other_projects: Iterable[str] = ()) -> None:
        """`other_projects` are further projects that tickets go to, such as the projects of the mapping's routes."""
        self.settings = settings
        self.project = project
        # Every project searched for the connector's tickets, the mapping's own first.
        self.searched_projects: dict[str, None] = dict.fromkeys([project, *other_projects])
        # Issues per page; tests make it small to cover paging.
        self.page_size = PAGE_SIZE
        self.client = RedmineClient(settings)
        self.account: TicketAccount | None = None
        self.field_id: int | None = None
        self._admin = False
        # Tracker name to {"id", "default_status_id"}, and priority name to id.
        self._trackers: dict[str, dict[str, int | None]] = {}
        self._priorities: dict[str, int] = {}
        # The account's permissions by project id, read from its memberships and roles by _permissions.
        self._project_permissions: dict[int, frozenset[str]] | None = None
        # Numeric ids of the projects read so far, by the identifier they were read with.
        self._project_ids: dict[str, int] = {}
        # Ticket query labels already logged as unsupported, so each is logged once, not every cycle.
        self._reported_labels: set[str] = set()

    # Lifecycle

    async def open(self) -> TicketAccount:
        """Check the API key, read trackers and priorities, and find the correlation custom field.

        Raises MisconfiguredError when the mapping's project is missing or the
        custom field cannot be found or used as a filter there.
        """
        await self.client.open()
        reply = await self.client.get("/users/current.json")
        user = (reply or {}).get("user") if isinstance(reply, dict) else None
        if not isinstance(user, dict) or user.get("id") is None:
            raise InvalidPayloadError("Redmine GET /users/current.json returned no user: check that ticket.url points to Redmine")
        name = " ".join(str(user.get(part) or "") for part in ("firstname", "lastname")).strip()
        self.account = TicketAccount(id=str(user["id"]), display_name=name or str(user.get("login") or ""))
        self._admin = user.get("admin") is True

        await self._load_trackers()
        await self._load_priorities()
        project = await self._read_project(self.project)
        if project is None:
            raise MisconfiguredError(
                f"Redmine project {self.project!r} does not exist or the connector's account is not a member of it; "
                "fix `project` in the mapping or add the account to the project"
            )
        self.field_id = await self._find_correlation_field(project)
        try:
            usable = await self._filters_by_field(self.project)
        except RejectedError as err:
            raise MisconfiguredError(
                f"the connector's account cannot search the issues of Redmine project {self.project}: {err}; "
                f"give its role the permission \"View Issues\", see {SETUP_GUIDE}"
            ) from err
        if not usable:
            raise MisconfiguredError(self._field_not_filter_message(self.project))

        log.info(
            "redmine.opened",
            extra={"account_id": self.account.id, "project": self.project, "custom_field_id": self.field_id},
        )
        return self.account

    async def close(self) -> None:
        await self.client.close()

    async def check(self, issue_type: str, priorities: Iterable[str], project: str | None = None) -> list[str]:
        """Return what would stop ticket creation: project, tracker, priorities, custom field, permissions.

        `project` defaults to the mapping's project; a project checked here
        joins the projects that searches cover.
        """
        identifier = project or self.project
        found = await self._read_project(identifier)
        if found is None:
            return [f"Redmine project {identifier!r} does not exist or the connector's account is not a member of it"]
        self._add_project(identifier)
        await self._load_trackers()
        await self._load_priorities()

        problems: list[str] = []
        trackers = [str(item.get("name")) for item in found.get("trackers") or [] if isinstance(item, dict)]
        if issue_type not in trackers:
            problems.append(
                f"tracker {issue_type!r} is not enabled in Redmine project {identifier}; "
                f"enabled: {', '.join(trackers) or 'none'}"
            )
        for name in dict.fromkeys(priorities):
            if name not in self._priorities:
                problems.append(
                    f"issue priority {name!r} does not exist in Redmine; available: {', '.join(self._priorities) or 'none'}"
                )

        try:
            if not await self._filters_by_field(identifier):
                problems.append(self._field_not_filter_message(identifier))
            elif issue_type in trackers and not await self._tracker_has_field(identifier, issue_type):
                problems.append(self._field_not_on_tracker_message(identifier, issue_type))
        except RejectedError as err:
            problems.append(f"the connector's account cannot search the issues of Redmine project {identifier}: {err}")

        self._project_permissions = None
        permissions = await self._permissions(item_id(found, "a project"))
        if permissions is not None:
            missing = [name for name in REQUIRED_PERMISSIONS if name not in permissions]
            if missing:
                problems.append(
                    f"the connector's role in Redmine project {identifier} lacks the permissions {', '.join(missing)}; "
                    f"add them to the role (Administration → Roles and permissions), see {SETUP_GUIDE}"
                )
        return problems

    def search_delay_seconds(self) -> float:
        """Redmine searches the database, so a write is found at once."""
        return 0.0

    # Tickets

    async def find_ticket(self, incident_id: str) -> TicketRef | None:
        """Find the issue whose correlation field contains exactly `incident_id`, the oldest if several do."""
        _check_incident_id(incident_id)
        field = self._field_name()
        issues: dict[int, dict[str, Any]] = {}
        for project in self.searched_projects:
            params = [("project_id", project), *filter_params(field, "=", incident_id), ("sort", "id")]
            for issue in await self._all_issues(params):
                issues.setdefault(item_id(issue, "an issue"), issue)

        # The database decides how `=` compares (MySQL ignores case), so only an exact value counts.
        matches = [issues[key] for key in sorted(issues) if custom_value(issues[key], self._field()) == incident_id]
        if not matches:
            return None
        if len(matches) > 1:
            log.warning(
                "redmine.ticket.duplicates",
                extra={"incident_id": incident_id, "ticket_keys": [str(issue["id"]) for issue in matches]},
            )
        return self._ref(matches[0])

    async def find_incident_tickets(self, incident_ids: Sequence[str]) -> dict[str, TicketRef]:
        return await find_each_ticket(self, incident_ids)

    async def create_ticket(self, draft: TicketDraft) -> TicketRef:
        """Create an issue with the correlation field set in the same request.

        Redmine drops a custom field that is not enabled for the tracker
        without an error, so the reply is checked for the value, and its
        absence stops the connection with MisconfiguredError. A tracker that
        is not enabled in the project is RejectedError before anything is
        sent, because Redmine would use the project's first tracker instead.
        """
        _check_incident_id(draft.incident_id)
        self._add_project(_checked_project(draft.project))
        await self._check_tracker_enabled(draft.project, draft.issue_type)
        issue: dict[str, Any] = {
            "project_id": draft.project,
            "tracker_id": await self._tracker_id(draft.issue_type),
            **await self._field_values(draft.fields, frozenset()),
        }
        issue["custom_fields"] = [*issue.get("custom_fields", []), {"id": self._field(), "value": draft.incident_id}]

        reply = await self.client.send("POST", "/issues.json", {"issue": issue})
        created = reply.get("issue") if isinstance(reply, dict) else None
        try:
            ref = self._ref(created)
        except (InvalidPayloadError, TypeError) as err:
            raise OutcomeUnknownError("Redmine accepted create_ticket but its reply has no issue id") from err

        if custom_value(created, self._field()) != draft.incident_id:
            raise MisconfiguredError(
                f"Redmine created issue #{ref.key} without the custom field {self.settings.correlation_field!r}, "
                f"because the field is not enabled for tracker {draft.issue_type!r} in project {draft.project}. "
                "Enable it (Administration → Custom fields → the field → Trackers and Projects); "
                f"until then the connector cannot find the issue again, see {SETUP_GUIDE}"
            )
        log.info("redmine.ticket.created", extra={"ticket_key": ref.key, "incident_id": draft.incident_id})
        return ref

    async def update_ticket(self, ref: TicketRef, fields: TicketFields, skip: frozenset[str] = frozenset()) -> None:
        """Write the mapped fields except those in `skip`; nothing is sent when every field is skipped.

        Labels and components do not exist in Redmine and are ignored.
        """
        values = await self._field_values(fields, skip)
        if not values:
            log.debug("redmine.ticket.update_skipped", extra={"ticket_key": ref.key})
            return
        # The update sets values, so repeating it is harmless: it is retried like a read.
        await self.client.send("PUT", f"/issues/{_numeric_id(ref.id)}.json", {"issue": values}, write=False)
        log.info("redmine.ticket.updated", extra={"ticket_key": ref.key, "skipped": sorted(skip)})

    async def changed_tickets(self, since: datetime) -> list[TicketChange]:
        """Return issues updated at or after `since` that carry the correlation field or that the connector wrote.

        The queries are merged: per searched project, issues with any value
        in the field, and in every project the account sees, issues whose
        author is the connector's account. So an issue whose field a person
        cleared, or that a person moved to another project, is still found.
        Editing a note does not change an issue's `updated_on` in Redmine
        5.0, so such an edit is found only with the issue's next change. The
        reported times follow `settled_time`.
        """
        if since.tzinfo is None:
            raise ValueError("since must be timezone-aware")
        bound = whole_second(since)
        updated = filter_params("updated_on", ">=", query_time(bound))
        account = self._own_account()
        searched_at = datetime.now(timezone.utc)

        queries = [
            [("project_id", project), *filter_params(self._field_name(), "*")] for project in self.searched_projects
        ]
        # No project: a person may move an issue to any project, and the field filter may not exist there.
        queries.append(filter_params("author_id", "=", account.id))
        issues: dict[int, dict[str, Any]] = {}
        for condition in queries:
            for issue in await self._all_issues([*condition, *updated, ("sort", "id")]):
                issues.setdefault(item_id(issue, "an issue"), issue)

        changes = [self._change_of(issue) for issue in issues.values()]
        changes = [
            TicketChange(change.ref, settled_time(change.updated, bound, searched_at))
            for change in changes
            if change.updated >= bound
        ]
        return sorted(changes, key=lambda change: (change.updated, int(change.ref.id)))

    # Comments

    async def list_comments(self, ref: TicketRef) -> list[TicketComment]:
        """Return the issue's notes (journals with text), oldest first, with bodies converted to Markdown."""
        issue = await self._issue(ref, include="journals")
        journals = [item for item in issue.get("journals") or [] if isinstance(item, dict) and item.get("notes")]
        comments = await asyncio.to_thread(lambda: [self._comment_of(item, ref) for item in journals])
        return sorted(comments, key=lambda comment: (comment.created, int(comment.id)))

    async def add_comment(self, ref: TicketRef, draft: CommentDraft) -> TicketComment:
        """Add a note that ends with the draft's marker line, private when the visibility is `internal`.

        Redmine replies 204 without the note, so the note is read back from
        the journals by its marker. The returned body is the draft's Markdown.
        """
        private = await self._private_requested(ref, draft)
        notes = with_marker(await self._to_redmine(draft.body), draft.marker)
        body: dict[str, Any] = {"notes": notes}
        if private:
            body["private_notes"] = True

        await self.client.send("PUT", f"/issues/{_numeric_id(ref.id)}.json", {"issue": body})
        journal = await self._own_journal(ref, draft)
        if journal is None:
            raise OutcomeUnknownError(
                f"Redmine accepted a note on issue #{ref.key}, but no note with marker "
                f"{draft.marker.origin}:{draft.marker.source_id} by the connector's account is in its journals"
            )
        if private and journal.get("private_notes") is not True:
            log.error("redmine.comment.not_private", extra={"ticket_key": ref.key, "comment_id": journal.get("id")})

        comment = self._posted_comment(journal, draft, ref)
        log.info(
            "redmine.comment.created",
            extra={"ticket_key": ref.key, "comment_id": comment.id, "source_id": draft.marker.source_id},
        )
        return comment

    async def comment_length(self, body: str) -> int:
        """Return the Markdown length of a body: no comment limit is known here, so `max_comment_chars` is None."""
        return len(body)

    async def edit_comment(self, ref: TicketRef, comment_id: str, draft: CommentDraft) -> TicketComment:
        """Replace a note's text with PUT /journals/{id}.json, keeping its marker line.

        The note's privacy changes only when the draft names a visibility.
        Redmine allows the edit only on notes by the connector's account,
        with the permission "Edit own notes".
        """
        journal_id = _numeric_id(comment_id)
        private = await self._private_requested(ref, draft)
        body: dict[str, Any] = {"notes": with_marker(await self._to_redmine(draft.body), draft.marker)}
        if draft.visibility is not None:
            body["private_notes"] = private

        await self.client.send("PUT", f"/journals/{journal_id}.json", {"journal": body}, write=False)
        journal = await self._own_journal(ref, draft, journal_id=journal_id)
        if journal is None:
            raise InvalidPayloadError(f"Redmine accepted the edit of note {comment_id} on issue #{ref.key}, but the note is gone")

        comment = self._posted_comment(journal, draft, ref)
        log.info(
            "redmine.comment.edited",
            extra={"ticket_key": ref.key, "comment_id": comment.id, "source_id": draft.marker.source_id},
        )
        return comment

    # Attachments

    async def list_attachments(self, ref: TicketRef) -> list[TicketAttachment]:
        """Return the issue's attachments, oldest first."""
        issue = await self._issue(ref, include="attachments")
        attachments = [attachment_of(item) for item in issue.get("attachments") or []]
        return sorted(attachments, key=lambda item: (item.created, int(item.id)))

    async def download_attachment(self, attachment: TicketAttachment, destination: Path) -> int:
        """Stream an attachment into `destination` from the `content_url` Redmine lists for it.

        The URL must be on the origin of `ticket.url`, otherwise RejectedError.
        The file must have exactly the listed size.
        """
        reply = await self.client.get(f"/attachments/{_numeric_id(attachment.id)}.json")
        record = reply.get("attachment") if isinstance(reply, dict) else None
        listed = attachment_of(record)
        url = record.get("content_url") if isinstance(record, dict) else None
        if not isinstance(url, str) or not url:
            raise InvalidPayloadError(f"Redmine attachment {attachment.id} has no content_url")

        try:
            written = await self.client.download(url, destination, listed.size)
        except OSError as err:
            raise ItemError(
                f"cannot write Redmine attachment {attachment.id} to {destination}: {err.strerror or err}; "
                "check the free space and permissions of the connector's data folder"
            ) from err
        log.info("redmine.attachment.downloaded", extra={"attachment_id": attachment.id, "bytes": written})
        return written

    async def upload_attachment(self, ref: TicketRef, upload: AttachmentUpload) -> TicketAttachment:
        """Upload the spooled file to /uploads.json, then attach its token to the issue.

        A file above Redmine's "Maximum attachment size" is RejectedError 422.
        """
        try:
            uploaded = await self.client.upload(upload.path, upload.filename)
        except OSError as err:
            raise ItemError(f"cannot read the spooled file {upload.path}: {err.strerror or err}") from err
        token = uploaded.get("token")
        if not isinstance(token, str) or not token:
            raise OutcomeUnknownError(f"Redmine accepted the upload of {upload.filename!r} but returned no token")

        attach = {"token": token, "filename": upload.filename, "content_type": upload.content_type}
        await self.client.send("PUT", f"/issues/{_numeric_id(ref.id)}.json", {"issue": {"uploads": [attach]}})

        attachment = await self._uploaded_attachment(ref, uploaded, upload)
        log.info(
            "redmine.attachment.uploaded",
            extra={"ticket_key": ref.key, "attachment_id": attachment.id, "bytes": attachment.size},
        )
        return attachment

    async def attachment_limit(self) -> int | None:
        """Return `ticket.attachment_max_kb` in bytes: only administrators can read Redmine's own setting."""
        return self.settings.attachment_max_kb * 1024

    # Workflow

    async def get_state(self, ref: TicketRef, field_ids: Iterable[str] = ()) -> TicketState:
        """Read the status, its category, `updated_on` and the named fields.

        The category is `done` for a closed status, `new` for the tracker's
        default status, and `indeterminate` otherwise. Fields are named as
        `plain_value` reads them; the description becomes Markdown.
        """
        issue = await self._issue(ref)
        status = issue.get("status")
        if not isinstance(status, dict) or not status.get("name"):
            raise InvalidPayloadError(f"Redmine returned issue #{ref.key} without a status")
        state = TicketState(
            status=str(status["name"]),
            status_category=await self._category(issue, status),
            updated=parse_time(issue.get("updated_on")),
            values={},
        )
        for field_id in dict.fromkeys(field_ids):
            value = plain_value(issue, field_id)
            if field_id == "description" and isinstance(value, str):
                value = await self._to_markdown(value)
            state.values[field_id] = value
        return state

    async def transition_to(self, ref: TicketRef, status: str) -> None:
        """Set the issue's status to the one named `status`, compared case-insensitively.

        Redmine ignores a status that the workflow does not allow for the
        connector's role, so the allowed statuses are read first and the
        result is read back. RejectedError names the allowed statuses.
        """
        issue = await self._issue(ref, include="allowed_statuses")
        current = str((issue.get("status") or {}).get("name") or "")
        if current.casefold() == status.casefold():
            log.debug("redmine.transition.not_needed", extra={"ticket_key": ref.key, "status": current})
            return

        allowed = [item for item in issue.get("allowed_statuses") or [] if isinstance(item, dict)]
        target = next((item for item in allowed if str(item.get("name", "")).casefold() == status.casefold()), None)
        if target is None:
            raise RejectedError(self._unreachable_message(ref, current, status, allowed))

        body = {"issue": {"status_id": item_id(target, "a status")}}
        await self.client.send("PUT", f"/issues/{_numeric_id(ref.id)}.json", body, write=False)
        moved = await self._issue(ref, include="allowed_statuses")
        reached = str((moved.get("status") or {}).get("name") or "")
        if reached.casefold() != status.casefold():
            allowed = [item for item in moved.get("allowed_statuses") or [] if isinstance(item, dict)]
            raise RejectedError(self._unreachable_message(ref, reached, status, allowed))
        log.info("redmine.ticket.transitioned", extra={"ticket_key": ref.key, "from_status": current, "status": reached})

    # Tickets that ask for an MDR incident

    async def find_tickets(self, query: TicketQuery, since: datetime) -> list[TicketRef]:
        """Return the project's issues of the tracker created at or after `since`, oldest first.

        Redmine has no labels, so a query with a label finds nothing (`check`
        reports such a mapping).
        """
        if since.tzinfo is None:
            raise ValueError("since must be timezone-aware")
        if query.label is None and query.issue_type is None:
            raise ConfigError(
                f"a ticket query on project {query.project} needs a tracker (issue_type), "
                "otherwise every issue of the project would create an MDR incident"
            )
        if query.label is not None:
            if query.label not in self._reported_labels:
                self._reported_labels.add(query.label)
                log.warning("redmine.query.label_unsupported", extra={"project": query.project, "label": query.label})
            return []
        assert query.issue_type is not None
        project = await self._read_project(_checked_project(query.project))
        if project is None:
            raise RejectedError(f"Redmine project {query.project!r} does not exist or is not visible to the connector's account")
        self._add_project(query.project)

        bound = whole_second(since)
        params = [
            ("project_id", query.project),
            *filter_params("tracker_id", "=", str(await self._tracker_id(query.issue_type))),
            *filter_params("created_on", ">=", query_time(bound)),
            ("sort", "id"),
        ]
        project_id = item_id(project, "a project")
        found: list[tuple[datetime, TicketRef]] = []
        for issue in await self._all_issues(params):
            created = parse_time(issue.get("created_on"))
            # `project_id` includes subprojects; only the project itself counts.
            if created >= bound and (issue.get("project") or {}).get("id") == project_id:
                found.append((created, self._ref(issue)))
        found.sort(key=lambda item: (item[0], int(item[1].id)))
        return [ref for _, ref in found]

    async def set_correlation(self, ref: TicketRef, incident_id: str) -> None:
        """Set the correlation field of an existing issue; an issue that carries another incident is RejectedError."""
        _check_incident_id(incident_id)
        issue = await self._issue(ref)
        project = (issue.get("project") or {}).get("id")
        if isinstance(project, int) and project not in self._project_ids.values():
            self._add_project(str(project))
        existing = custom_value(issue, self._field())
        if existing == incident_id:
            return
        if existing:
            raise RejectedError(
                f"Redmine issue #{ref.key} is already linked to MDR incident {existing}, so it cannot carry "
                f"{incident_id} too; clear its field {self.settings.correlation_field!r} to relink it"
            )
        if not has_custom_field(issue, self._field()):
            raise RejectedError(self._field_not_on_tracker_message(str(project), str((issue.get("tracker") or {}).get("name"))))

        body = {"issue": {"custom_fields": [{"id": self._field(), "value": incident_id}]}}
        await self.client.send("PUT", f"/issues/{_numeric_id(ref.id)}.json", body, write=False)
        log.info("redmine.ticket.correlated", extra={"ticket_key": ref.key, "incident_id": incident_id})

    async def get_ticket(self, key: str) -> TicketRef | None:
        """Return the issue numbered `key` ("123" or "#123"), or None when Redmine has none."""
        number = key.strip().removeprefix("#")
        if not (number.isascii() and number.isdigit()) or number.startswith("0"):
            return None
        try:
            issue = await self.client.get(f"/issues/{number}.json")
        except RejectedError as err:
            if err.status != 404:
                raise
            return None
        return self._ref((issue or {}).get("issue") if isinstance(issue, dict) else None)

    # Accounts

    async def account_groups(self, account_id: str) -> set[str]:
        """Return the names of the account's groups that are members of a searched project.

        Redmine shows a user's groups only to administrators, so the groups
        are read from the searched projects' memberships and each group's
        users. A group that is a member of none of these projects is missed.
        """
        if not (account_id.isascii() and account_id.isdigit()):
            return set()
        user_id = int(account_id)
        groups: dict[int, str] = {}
        for project in self.searched_projects:
            for membership in await self._all_pages(f"/projects/{project}/memberships.json", [], "memberships"):
                group = membership.get("group")
                if isinstance(group, dict) and isinstance(group.get("id"), int):
                    groups[group["id"]] = str(group.get("name") or "")

        names: set[str] = set()
        for group_id, name in groups.items():
            try:
                reply = await self.client.get(f"/groups/{group_id}.json", {"include": "users"})
            except RejectedError as err:
                if err.status not in (403, 404):
                    raise
                continue
            users = ((reply or {}).get("group") or {}).get("users") or []
            if any(isinstance(user, dict) and user.get("id") == user_id for user in users):
                names.add(name)
        return names

    # Helpers: issues

    async def _issue(self, ref: TicketRef, include: str = "") -> dict[str, Any]:
        params = {"include": include} if include else None
        reply = await self.client.get(f"/issues/{_numeric_id(ref.id)}.json", params)
        issue = reply.get("issue") if isinstance(reply, dict) else None
        if not isinstance(issue, dict):
            raise InvalidPayloadError(f"Redmine returned no issue for #{ref.key}")
        return issue

    async def _all_issues(self, params: list[tuple[str, str]]) -> list[dict[str, Any]]:
        return await self._all_pages("/issues.json", params, "issues")

    async def _all_pages(self, path: str, params: list[tuple[str, str]], key: str) -> list[dict[str, Any]]:
        """Read every page of a list by `offset` until `total_count` items arrived or a page is empty.

        A page shorter than `limit` does not end the paging: Redmine caps
        `limit` at 100, whatever was asked.
        """
        # NOTE: sorted by id, an item that stops matching while pages are read
        # (a deleted issue, a cleared field) shifts later items back by one,
        # so one can be missed until the next search.
        items: list[dict[str, Any]] = []
        offset = 0
        while True:
            page_params: Params = [*params, ("offset", str(offset)), ("limit", str(self.page_size))]
            page = await self.client.get(path, page_params)
            batch = page.get(key) if isinstance(page, dict) else None
            total = page.get("total_count") if isinstance(page, dict) else None
            if not isinstance(batch, list) or isinstance(total, bool) or not isinstance(total, int):
                raise InvalidPayloadError(f"Redmine GET {path} returned no {key} list with a total_count")
            items.extend(item for item in batch if isinstance(item, dict))
            offset += len(batch)
            if not batch or offset >= total:
                return items

    def _ref(self, issue: Any) -> TicketRef:
        number = str(item_id(issue, "an issue"))
        return TicketRef(key=number, id=number, url=f"{self.settings.url}/issues/{number}")

    def _change_of(self, issue: dict[str, Any]) -> TicketChange:
        return TicketChange(self._ref(issue), parse_time(issue.get("updated_on")))

    async def _field_values(self, fields: TicketFields, skip: frozenset[str]) -> dict[str, Any]:
        """Build the issue attributes of the mapped fields: subject, description, priority and `fields`.

        A `fields` key `cf_<id>` sets that custom field; any other key is
        sent as an issue attribute, such as `assigned_to_id`.
        """
        values: dict[str, Any] = {}
        custom_fields: list[dict[str, Any]] = []
        for name, value in fields.extra.items():
            # The correlation field belongs to the connector, so `fields` cannot overwrite it.
            if name in skip or name in CORE_FIELDS or name == self._field_name():
                continue
            if name.startswith("cf_") and name[3:].isdigit():
                custom_fields.append({"id": int(name[3:]), "value": value})
            else:
                values[name] = value
        if custom_fields:
            values["custom_fields"] = custom_fields
        if "summary" not in skip:
            values["subject"] = _subject(fields.summary)
        if "description" not in skip:
            values["description"] = await self._to_redmine(fields.description)
        if fields.priority and "priority" not in skip:
            values["priority_id"] = await self._priority_id(fields.priority)
        return values

    async def _check_tracker_enabled(self, project: str, tracker: str) -> None:
        found = await self._read_project(project)
        if found is None:
            raise RejectedError(f"Redmine project {project!r} does not exist or is not visible to the connector's account")
        enabled = [str(item.get("name")) for item in found.get("trackers") or [] if isinstance(item, dict)]
        if tracker not in enabled:
            raise RejectedError(
                f"tracker {tracker!r} is not enabled in Redmine project {project} (enabled: {', '.join(enabled) or 'none'}), "
                "and Redmine would create the issue with another tracker. Enable it in the project's settings "
                "(Settings → Issue tracking) or map the incident to an enabled tracker"
            )

    def _add_project(self, identifier: str) -> None:
        if identifier not in self.searched_projects:
            self.searched_projects[identifier] = None
            log.info("redmine.project.searched", extra={"project": identifier, "projects": list(self.searched_projects)})

    async def _read_project(self, identifier: str) -> dict[str, Any] | None:
        """Read a project with its trackers and explicitly assigned issue custom fields; None when it is not visible."""
        try:
            reply = await self.client.get(
                f"/projects/{_checked_project(identifier)}.json", {"include": "trackers,issue_custom_fields"}
            )
        except RejectedError as err:
            if err.status not in (403, 404):
                raise
            return None
        project = reply.get("project") if isinstance(reply, dict) else None
        if not isinstance(project, dict):
            return None
        if isinstance(project.get("id"), int):
            self._project_ids[identifier] = project["id"]
        return project

    # Helpers: trackers, priorities, statuses

    async def _load_trackers(self) -> None:
        reply = await self.client.get("/trackers.json")
        trackers: dict[str, dict[str, int | None]] = {}
        for item in (reply or {}).get("trackers") or []:
            if isinstance(item, dict) and isinstance(item.get("id"), int) and item.get("name"):
                default = (item.get("default_status") or {}).get("id")
                trackers[str(item["name"])] = {"id": item["id"], "default_status_id": default}
        self._trackers = trackers

    async def _load_priorities(self) -> None:
        reply = await self.client.get("/enumerations/issue_priorities.json")
        self._priorities = {
            str(item["name"]): item["id"]
            for item in (reply or {}).get("issue_priorities") or []
            if isinstance(item, dict) and isinstance(item.get("id"), int) and item.get("name") and item.get("active", True)
        }

    async def _tracker_id(self, name: str) -> int:
        if name not in self._trackers:
            await self._load_trackers()
        tracker = self._trackers.get(name)
        if tracker is None:
            raise RejectedError(f"Redmine has no tracker {name!r}; available: {', '.join(self._trackers) or 'none'}")
        return int(tracker["id"] or 0)

    async def _priority_id(self, name: str) -> int:
        if name not in self._priorities:
            await self._load_priorities()
        if name not in self._priorities:
            raise RejectedError(
                f"Redmine has no issue priority {name!r}; available: {', '.join(self._priorities) or 'none'}"
            )
        return self._priorities[name]

    async def _category(self, issue: dict[str, Any], status: dict[str, Any]) -> str:
        if status.get("is_closed") is True:
            return "done"
        tracker_name = str((issue.get("tracker") or {}).get("name") or "")
        if tracker_name not in self._trackers:
            await self._load_trackers()
        default_status = (self._trackers.get(tracker_name) or {}).get("default_status_id")
        return "new" if default_status is not None and status.get("id") == default_status else "indeterminate"

    def _unreachable_message(self, ref: TicketRef, current: str, status: str, allowed: list[dict[str, Any]]) -> str:
        reachable = [str(item.get("name")) for item in allowed if str(item.get("name", "")).casefold() != current.casefold()]
        return (
            f"Redmine issue #{ref.key} cannot move from {current!r} to {status!r}: the workflow does not allow it "
            f"for the connector's role. Statuses allowed from {current!r}: {', '.join(reachable) or 'none'}. "
            "Map the MDR status to one of them or allow the move in Administration → Workflow"
        )

    # Helpers: the correlation custom field

    def _field(self) -> int:
        if self.field_id is None:
            raise RuntimeError("await RedmineTicketAdapter.open() before using the adapter")
        return self.field_id

    def _field_name(self) -> str:
        return f"cf_{self._field()}"

    async def _find_correlation_field(self, project: dict[str, Any]) -> int:
        """Find the id of the custom field named `ticket.correlation_field`.

        Redmine lists custom fields only to administrators, so an ordinary
        account finds the field on its project (when the field is assigned to
        projects one by one) or on any issue it can see (when the field is
        "For all projects").
        """
        name = self.settings.correlation_field
        field_id = custom_field_id_by_name([{"custom_fields": project.get("issue_custom_fields") or []}], name)
        source = "project"
        if field_id is None and self._admin:
            field_id = await self._field_from_admin_list(name)
            source = "custom_fields"
        if field_id is None:
            reply = await self.client.get("/issues.json", {"status_id": "*", "sort": "id:desc", "limit": str(PAGE_SIZE)})
            field_id = custom_field_id_by_name([item for item in (reply or {}).get("issues") or [] if isinstance(item, dict)], name)
            source = "issues"
        if field_id is None:
            raise MisconfiguredError(
                f"the Redmine issue custom field {name!r} (ticket.correlation_field) was not found. "
                "Create it once as an administrator (Administration → Custom fields → New custom field → Issues, "
                f"format Text, \"Used as a filter\" on, enabled for the trackers used in project {self.project}). "
                "An account that is not an administrator sees the field only on issues: when the field is "
                f"\"For all projects\", at least one issue of project {self.project} must exist; see {SETUP_GUIDE}"
            )
        log.info("redmine.custom_field.found", extra={"custom_field_id": field_id, "source": source})
        return field_id

    async def _field_from_admin_list(self, name: str) -> int | None:
        reply = await self.client.get("/custom_fields.json")
        for item in (reply or {}).get("custom_fields") or []:
            if not isinstance(item, dict) or item.get("customized_type") != "issue" or item.get("name") != name:
                continue
            if item.get("field_format") not in ("string", "text"):
                raise MisconfiguredError(
                    f"the Redmine custom field {name!r} has the format {item.get('field_format')!r}; "
                    "the MDR incident id needs the format Text, so create the field again with it"
                )
            return item_id(item, "a custom field")
        return None

    async def _filters_by_field(self, project: str) -> bool:
        """Tell whether issue queries of `project` accept the correlation field as a filter.

        Redmine skips a filter it does not offer without an error, which
        would make `find_ticket` read every issue. An empty filter value
        shows the difference: an offered filter is rejected as blank (422).
        """
        params = [("project_id", project), *filter_params(self._field_name(), "=", ""), ("limit", "1")]
        try:
            await self.client.get("/issues.json", params)
        except RejectedError as err:
            if err.status == 422:
                return True
            raise
        return False

    async def _tracker_has_field(self, project: str, tracker: str) -> bool:
        """Tell whether issues of the tracker show the correlation field; True when the project has none to look at."""
        params = [("project_id", project), ("status_id", "*"), ("tracker_id", str(await self._tracker_id(tracker))), ("limit", "1")]
        reply = await self.client.get("/issues.json", params)
        issues = [item for item in (reply or {}).get("issues") or [] if isinstance(item, dict)]
        # NOTE: without an issue of this tracker the field cannot be checked
        # here, and `create_ticket` detects a missing field instead.
        return not issues or has_custom_field(issues[0], self._field())

    def _field_not_filter_message(self, project: str) -> str:
        return (
            f"the Redmine custom field {self.settings.correlation_field!r} cannot be used to search issues of project "
            f"{project}: turn on \"Used as a filter\" in the field's settings and enable the field for this project "
            f"(Administration → Custom fields), see {SETUP_GUIDE}"
        )

    def _field_not_on_tracker_message(self, project: str, tracker: str) -> str:
        return (
            f"the Redmine custom field {self.settings.correlation_field!r} is not enabled for tracker {tracker!r} "
            f"in project {project}, so issues of that tracker cannot carry the MDR incident id; tick the tracker "
            f"in the field's settings (Administration → Custom fields), see {SETUP_GUIDE}"
        )

    # Helpers: notes

    async def _own_journal(
        self, ref: TicketRef, draft: CommentDraft, *, journal_id: int | None = None
    ) -> dict[str, Any] | None:
        """Return the newest note by the connector's account with the draft's marker, or the note `journal_id`."""
        issue = await self._issue(ref, include="journals")
        own = self._own_account().id
        candidates = []
        for journal in issue.get("journals") or []:
            if not isinstance(journal, dict) or account_of(journal.get("user")).id != own:
                continue
            if journal_id is not None:
                if journal.get("id") == journal_id:
                    return journal
                continue
            if split_marker(str(journal.get("notes") or ""))[1] == draft.marker:
                candidates.append(journal)
        return max(candidates, key=lambda journal: item_id(journal, "a journal"), default=None)

    def _posted_comment(self, journal: dict[str, Any], draft: CommentDraft, ref: TicketRef) -> TicketComment:
        try:
            return TicketComment(
                id=str(item_id(journal, "a journal")),
                author=account_of(journal.get("user")),
                created=parse_time(journal.get("created_on")),
                body=draft.body,
                marker=draft.marker,
                restricted=journal.get("private_notes") is True,
                updated=optional_time(journal.get("updated_on")),
            )
        except InvalidPayloadError as err:
            raise InvalidPayloadError(f"Redmine returned a note of issue #{ref.key} without id or created_on: {err}") from err

    def _comment_of(self, journal: dict[str, Any], ref: TicketRef) -> TicketComment:
        """Build a comment from a journal; runs in a worker thread because the conversion may start pandoc."""
        author = account_of(journal.get("user"))
        text = str(journal.get("notes") or "")
        marker = None
        if author.id == self._own_account().id:
            text, marker = split_marker(text)
        try:
            return TicketComment(
                id=str(item_id(journal, "a journal")),
                author=author,
                created=parse_time(journal.get("created_on")),
                body=self._markdown_of(text),
                marker=marker,
                restricted=journal.get("private_notes") is True,
                # Redmine 5.0 does not report when a note was edited; later versions may.
                updated=optional_time(journal.get("updated_on")),
            )
        except InvalidPayloadError as err:
            raise InvalidPayloadError(f"Redmine returned a note of issue #{ref.key} without id or created_on: {err}") from err

    async def _private_requested(self, ref: TicketRef, draft: CommentDraft) -> bool:
        """Return whether the draft requests a private note, after checking that Redmine will keep it private.

        Redmine drops `private_notes` without an error when the role lacks
        "Set notes as private", and the note would then be public.
        """
        if draft.visibility is None:
            return False
        if draft.visibility.type != "internal":
            raise RejectedError(
                f"Redmine notes cannot be limited to a {draft.visibility.type}; use comments.visibility "
                "{type: internal} for private notes, or remove it"
            )
        issue = await self._issue(ref)
        project_id = (issue.get("project") or {}).get("id")
        if isinstance(project_id, int) and not await self._may(project_id, "set_notes_private"):
            raise RejectedError(
                f"the connector's role in the project of Redmine issue #{ref.key} lacks the permission "
                "\"Set notes as private\" (set_notes_private), so a private note would be posted as public; "
                "add the permission to the role"
            )
        return True

    async def _may(self, project_id: int, permission: str) -> bool:
        """Tell whether the account has `permission` in a project, or True when its permissions cannot be read."""
        permissions = await self._permissions(project_id)
        if permissions is None or permission in permissions:
            return True
        # Read again once, in case an administrator has just granted it.
        self._project_permissions = None
        permissions = await self._permissions(project_id)
        return permissions is None or permission in permissions

    async def _permissions(self, project_id: int) -> frozenset[str] | None:
        """Return the account's permissions in a project from its memberships' roles.

        None means unknown: an administrator, who may do everything, or a
        project the account reaches without a membership (a public project).
        """
        if self._admin:
            return None
        if self._project_permissions is None:
            self._project_permissions = await self._read_permissions()
        return self._project_permissions.get(project_id)

    async def _read_permissions(self) -> dict[int, frozenset[str]]:
        reply = await self.client.get("/users/current.json", {"include": "memberships"})
        memberships = ((reply or {}).get("user") or {}).get("memberships") or []
        role_permissions: dict[int, frozenset[str]] = {}
        by_project: dict[int, frozenset[str]] = {}
        for membership in memberships:
            project_id = ((membership or {}).get("project") or {}).get("id")
            if not isinstance(project_id, int):
                continue
            permissions: set[str] = set(by_project.get(project_id, frozenset()))
            for role in membership.get("roles") or []:
                role_id = (role or {}).get("id")
                if not isinstance(role_id, int):
                    continue
                if role_id not in role_permissions:
                    role_reply = await self.client.get(f"/roles/{role_id}.json")
                    names = ((role_reply or {}).get("role") or {}).get("permissions") or []
                    role_permissions[role_id] = frozenset(str(name) for name in names)
                permissions |= role_permissions[role_id]
            by_project[project_id] = frozenset(permissions)
        return by_project

    # Helpers: attachments

    async def _uploaded_attachment(
        self, ref: TicketRef, uploaded: dict[str, Any], upload: AttachmentUpload
    ) -> TicketAttachment:
        """Read the attachment that the upload became, by the upload's id."""
        attachment_id = uploaded.get("id")
        if isinstance(attachment_id, int) and not isinstance(attachment_id, bool):
            reply = await self.client.get(f"/attachments/{attachment_id}.json")
            return attachment_of((reply or {}).get("attachment") if isinstance(reply, dict) else None)

        # Older servers return only the token: take the newest file of that name and size by the connector.
        own = self._own_account().id
        matches = [
            item
            for item in await self.list_attachments(ref)
            if item.filename == upload.filename and item.size == upload.size and item.author.id == own
        ]
        if not matches:
            raise OutcomeUnknownError(f"Redmine accepted {upload.filename!r} for issue #{ref.key} but does not list it")
        return matches[-1]

    # Helpers: markup

    async def _to_redmine(self, markdown: str) -> str:
        """Convert a Markdown body to the configured text formatting, with nothing in it that Redmine runs or loads."""
        if self.settings.text_formatting == "common_mark":
            return await asyncio.to_thread(formatting.markdown_to_commonmark, markdown)
        return await asyncio.to_thread(formatting.markdown_to_textile, markdown)

    async def _to_markdown(self, text: str) -> str:
        return await asyncio.to_thread(self._markdown_of, text)

    def _markdown_of(self, text: str) -> str:
        if self.settings.text_formatting == "common_mark":
            return markup.commonmark_to_markdown(text)
        return markup.textile_to_markdown(formatting.textile_for_reading(text))

    def _own_account(self) -> TicketAccount:
        if self.account is None:
            raise RuntimeError("await RedmineTicketAdapter.open() before using the adapter")
        return self.account


def _subject(text: str) -> str:
    """Make a subject Redmine accepts: one line of at most 255 characters."""
    line = " ".join(markup.clean_text(text).split())
    if len(line) <= MAX_SUBJECT_LENGTH:
        return line
    return line[: MAX_SUBJECT_LENGTH - 1] + "…"


def settled_time(updated: datetime, bound: datetime, searched_at: datetime) -> datetime:
    """Return the change time to report for an issue updated at `updated`, found by a search begun at `searched_at`.

    Redmine keeps whole seconds, so a change later in the same second leaves
    `updated_on` as it was. The engine reconciles a ticket only when its
    time grows, and would miss that change. So while the second had not
    ended when the search began, the time is reported one microsecond
    earlier, but not before `bound`, and the next search reconciles the
    issue once more.
    """
    # NOTE: this compares the connector's clock with Redmine's; a Redmine
    # clock behind by more than a second can still hide such a change.
    if searched_at >= updated + timedelta(seconds=1):
        return updated
    return max(bound, updated - timedelta(microseconds=1))


def _check_incident_id(incident_id: str) -> None:
    if not incident_id or len(incident_id) > MAX_INCIDENT_ID_LENGTH or CONTROL_CHARACTERS.search(incident_id):
        raise InvalidPayloadError(
            f"MDR incident id {incident_id!r} is empty, longer than {MAX_INCIDENT_ID_LENGTH} characters "
            "or contains control characters, so a Redmine custom field cannot carry it"
        )


def _checked_project(identifier: str) -> str:
    if not PROJECT_PATTERN.fullmatch(identifier):
        raise ConfigError(
            f"Redmine project identifier {identifier!r} is invalid: use the identifier shown in the project's "
            "settings (letters, digits, '-' and '_')"
        )
    return identifier


def _numeric_id(value: str | int) -> int:
    text = str(value)
    if not (text.isascii() and text.isdigit()):
        raise InvalidPayloadError(f"Redmine id {text!r} is not a number")
    return int(text)
