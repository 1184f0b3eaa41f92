"""The state of a simulated Jira site: users, issues, comments, attachments, workflow and search.

`JiraSimulator` validates writes the way Jira does and keeps time as real
UTC time plus an offset that tests move forward. It records each issue's
searchable state with the moment it becomes visible, so search can lag
behind writes like Jira Cloud's `search/jql`. Attachment bytes live in a
temporary folder that `close()` removes. The HTTP layer in `simulator.py`
serves it.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from mdr_connector.adapters.faults import FaultPlan
from mdr_connector.adapters.jira import jql
from mdr_connector.adapters.jira.simulator_files import (
    DEFAULT_UPLOAD_LIMIT,
    AttachmentFiles,
    SimAttachment,
    generated_chunks,
)
from mdr_connector.adapters.jira.simulator_workflow import SimTransition, SimWorkflow
from mdr_connector.connector.config import is_loopback_host

log = logging.getLogger(__name__)

Deployment = Literal["cloud", "datacenter"]

SERVICE_ACCOUNT_ID = "557058:mdr-connector-service"
SERVICE_NAME = "mdr-connector"
SERVICE_EMAIL = "mdr-connector@example.test"
SERVICE_TOKEN = "simulator-api-token"
SERVICE_PASSWORD = "simulator-password"
SERVICE_PAT = "simulator-personal-access-token"
HUMAN_NAME = "analyst"

UNBOUNDED_JQL_MESSAGE = (
    "Unbounded JQL queries are not allowed here. Please add a search restriction to your query."
)
MAX_TEXT_LENGTH = 32767
MAX_SUMMARY_LENGTH = 255
MAX_PROPERTY_BYTES = 32768
SYSTEM_FIELDS = (
    ("summary", "Summary"),
    ("description", "Description"),
    ("priority", "Priority"),
    ("labels", "Labels"),
    ("issuetype", "Issue Type"),
    ("project", "Project"),
    ("created", "Created"),
    ("updated", "Updated"),
    ("reporter", "Reporter"),
    ("status", "Status"),
    ("resolution", "Resolution"),
    ("components", "Component/s"),
    ("attachment", "Attachment"),
    ("comment", "Comment"),
)
VISIBILITY_TYPES = ("role", "group")
DEFAULT_PRIORITIES = ("Highest", "High", "Medium", "Low", "Lowest")
DEFAULT_PROJECTS = {
    "SEC": ("Security incidents", ("Task", "Incident")),
    "OPS": ("IT operations", ("Task",)),
}
DEFAULT_COMPONENTS = {"SEC": ("Endpoint", "Network", "Identity"), "OPS": ("Servers", "Workstations")}
# The comment property with which Jira Service Management marks a comment internal to its agents.
JSM_PUBLIC_PROPERTY = "sd.public.comment"


class SimError(Exception):
    """A Jira error reply: HTTP status plus `errorMessages` and field `errors`."""

    def __init__(
        self,
        status: int,
        messages: list[str] | None = None,
        errors: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status, messages, errors)
        self.status = status
        self.messages = messages or []
        self.errors = errors or {}


@dataclass
class SimUser:
    """A Jira account, identified by `account_id` on Cloud and by `name` on Data Center."""

    account_id: str
    name: str
    display_name: str
    time_zone: str = "UTC"
    email: str = ""
    # The Data Center password, and the Cloud API token unless `api_token` is set.
    password: str = ""
    # A Data Center personal access token, sent as a Bearer token.
    token: str = ""
    # The Cloud API token, for an account whose Cloud and Data Center secrets differ.
    api_token: str = ""
    groups: list[str] = field(default_factory=list)

    def basic_auth_secret(self, deployment: Deployment) -> str:
        """Return the secret that Basic authentication takes for this account on `deployment`."""
        if deployment == "cloud":
            return self.api_token or self.password
        return self.password


@dataclass
class SimComment:
    id: int
    author: SimUser
    body: str
    created: datetime
    updated: datetime
    properties: dict[str, Any] = field(default_factory=dict)
    # {"type": "role" | "group", "value": name} when only that role or group may read the comment.
    visibility: dict[str, str] | None = None

    @property
    def internal(self) -> bool:
        """Whether Jira Service Management shows the comment to agents only."""
        value = self.properties.get(JSM_PUBLIC_PROPERTY)
        return isinstance(value, dict) and value.get("internal") is True


@dataclass
class IssueView:
    """The searchable state of an issue at one moment."""

    fields: dict[str, Any]
    updated: datetime
    properties: dict[str, Any]


@dataclass
class SimIssue:
    id: int
    key: str
    fields: dict[str, Any]
    reporter: SimUser
    created: datetime
    updated: datetime
    properties: dict[str, Any] = field(default_factory=dict)
    comments: list[SimComment] = field(default_factory=list)
    attachments: list[SimAttachment] = field(default_factory=list)
    index: list[tuple[datetime, IssueView]] = field(default_factory=list)

    def view(self) -> IssueView:
        return IssueView(copy.deepcopy(self.fields), self.updated, copy.deepcopy(self.properties))


@dataclass
class SimSettings:
    """Behaviour switches; change them between calls from a test or `/_sim/settings`."""

    deployment: Deployment = "cloud"
    search_delay_seconds: float = 0.0
    latency_seconds: float = 0.0
    comment_page_cap: int = 100
    search_page_cap: int = 100
    # What GET attachment/meta reports. Uploads above the limit get HTTP 413.
    attachments_enabled: bool = True
    upload_limit_bytes: int = DEFAULT_UPLOAD_LIMIT
    # Above 0, every attachment download is cut off after this many bytes.
    download_cut_bytes: int = 0
    # The origin that Cloud attachment content redirects to, such as
    # `http://localhost:8089`, or empty for the simulator's own origin.
    media_base_url: str = ""
    # The origin that attachment records name as their content URL, to play
    # a hostile or misconfigured server, or empty for the simulator's own origin.
    content_base_url: str = ""


def settings_errors(changes: dict[str, Any]) -> dict[str, str]:
    """Return, per setting name in `changes`, why its value is invalid; empty when every value fits.

    `changes` must name known settings only. A page cap of 0 would make
    search return empty pages that never end, so caps start at 1.
    """
    errors: dict[str, str] = {}
    for name, value in changes.items():
        if name == "deployment":
            fits = value in ("cloud", "datacenter")
            expected = 'the string "cloud" or "datacenter"'
        elif name in ("comment_page_cap", "search_page_cap"):
            fits = isinstance(value, int) and not isinstance(value, bool) and value >= 1
            expected = "an integer of at least 1"
        elif name in ("upload_limit_bytes", "download_cut_bytes"):
            fits = isinstance(value, int) and not isinstance(value, bool) and value >= 0
            expected = "an integer of at least 0"
        elif name == "attachments_enabled":
            fits = isinstance(value, bool)
            expected = "true or false"
        elif name in ("media_base_url", "content_base_url"):
            # Only loopback origins: the simulator must never send a client to another machine.
            fits = isinstance(value, str) and (value == "" or _loopback_origin(value))
            expected = 'an http(s) origin on a loopback host such as "http://localhost:8089", or ""'
        else:
            fits = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            expected = "a finite number of seconds"
        if not fits:
            errors[name] = f"Expected {expected}, got {json.dumps(value)[:80]}."
    return errors


class JiraSimulator:
    """The state of one simulated Jira site and the Python control API over it."""

    def __init__(
        self,
        *,
        deployment: Deployment = "cloud",
        service_time_zone: str = "UTC",
        search_delay_seconds: float = 0.0,
        latency_seconds: float = 0.0,
        projects: dict[str, tuple[str, tuple[str, ...]]] | None = None,
        priorities: tuple[str, ...] = DEFAULT_PRIORITIES,
        custom_fields: dict[str, str] | None = None,
        components: dict[str, tuple[str, ...]] | None = None,
        workflow: SimWorkflow | None = None,
    ) -> None:
        """Build a site. `projects` maps a key to its name and issue types, and `components` a key to component names."""
        self.settings = SimSettings(
            deployment=deployment,
            search_delay_seconds=search_delay_seconds,
            latency_seconds=latency_seconds,
        )
        self.projects = dict(projects or DEFAULT_PROJECTS)
        if components is None:
            components = DEFAULT_COMPONENTS if projects is None else {}
        self.components = {key: tuple(components.get(key, ())) for key in self.projects}
        self.priorities = tuple(priorities)
        self.custom_fields = dict(custom_fields or {"customfield_10010": "MDR incident link"})
        self.workflow = workflow or SimWorkflow()
        self.users: list[SimUser] = []
        self.issues: dict[int, SimIssue] = {}
        # The issue of each comment by comment id, so a comment is found
        # without scanning every issue; `comment` checks each hit.
        self._comment_issues: dict[str, SimIssue] = {}
        self.calls: Counter[str] = Counter()
        # The injected faults; `drop_reply_after_commit` adds to it.
        self.faults = FaultPlan()
        self.faults.on_time_zone = self._set_service_time_zone
        self.clock_offset = timedelta()
        self.files = AttachmentFiles()
        # One entry per request to the media origin: whether it carried an Authorization header.
        self.media_requests: list[dict[str, Any]] = []
        self._next_issue_id = 10000
        self._next_comment_id = 10000
        self._next_attachment_id = 10000
        self._next_issue_number: Counter[str] = Counter()

        self.service = self.add_user(
            account_id=SERVICE_ACCOUNT_ID,
            name=SERVICE_NAME,
            display_name="MDR connector",
            time_zone=service_time_zone,
            email=SERVICE_EMAIL,
            # Both secrets are stored, so a switch of `settings.deployment`
            # later on leaves the account usable on either deployment.
            password=SERVICE_PASSWORD,
            token=SERVICE_PAT,
            api_token=SERVICE_TOKEN,
            groups=["jira-software-users"],
        )
        self.human = self.add_user(
            account_id="557058:analyst",
            name=HUMAN_NAME,
            display_name="SOC Analyst",
            time_zone="Europe/Moscow",
            email="analyst@example.test",
            password="analyst-secret",
            groups=["jira-software-users", "soc-analysts"],
        )

    def close(self) -> None:
        """Remove the attachment files, keeping their records."""
        self.files.close()

    # Users and clock

    def add_user(
        self,
        *,
        account_id: str,
        name: str,
        display_name: str,
        time_zone: str = "UTC",
        email: str = "",
        password: str = "",
        token: str = "",
        api_token: str = "",
        groups: Iterable[str] = (),
    ) -> SimUser:
        """Add an account that belongs to `groups`.

        `password` is the Data Center password, and also the Cloud API token unless `api_token` is given.
        """
        _check_time_zone(time_zone)
        user = SimUser(account_id, name, display_name, time_zone, email, password, token, api_token, list(groups))
        self.users.append(user)
        return user

    def add_project(self, key: str, name: str, issue_types: Iterable[str], components: Iterable[str] = ()) -> None:
        """Add a project, or replace the issue types and components of an existing one."""
        if not re.fullmatch(r"[A-Z][A-Z0-9_]{1,9}", key):
            raise ValueError(f"project key {key!r} must be 2 to 10 capital letters, digits or '_', starting with a letter")
        self.projects[key] = (name, tuple(issue_types))
        self.components[key] = tuple(components)

    def _set_service_time_zone(self, zone: str) -> None:
        """Move the connector's account to `zone`, which its JQL dates are read in; used by the fault plan."""
        _check_time_zone(zone)
        self.service.time_zone = zone

    def user(self, reference: str) -> SimUser:
        """Find a user by account id, name or e-mail."""
        for user in self.users:
            if reference in (user.account_id, user.name, user.email):
                return user
        raise KeyError(f"no simulated user {reference!r}")

    def now(self) -> datetime:
        """Simulator time: real UTC time plus the offset set by `advance`, in milliseconds."""
        moment = datetime.now(timezone.utc) + self.clock_offset
        return moment.replace(microsecond=moment.microsecond // 1000 * 1000)

    def advance(self, seconds: float) -> None:
        """Move simulator time forward; raise ValueError for a negative or non-finite `seconds`."""
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"the simulator clock only moves forward: expected 0 or more seconds, got {seconds}")
        self.clock_offset += timedelta(seconds=seconds)

    def drop_reply_after_commit(self, method: str, path: str, times: int = 1) -> None:
        """Make the next `times` successful `method path` calls apply, then drop the connection.

        `path` is the route pattern, for example `/rest/api/2/issue` or
        `/rest/api/2/issue/{issue}/comment`.
        """
        self.faults.add("drop_after_commit", method=method, path=path, count=times)

    # Issues

    def issue(self, reference: str | int) -> SimIssue:
        """Find an issue by id or key; raises SimError 404 like Jira."""
        text = str(reference)
        if text.isdigit() and int(text) in self.issues:
            return self.issues[int(text)]
        for issue in self.issues.values():
            if issue.key.upper() == text.upper():
                return issue
        raise SimError(404, ["Issue does not exist or you do not have permission to see it."])

    def create_issue(
        self,
        fields: dict[str, Any],
        *,
        reporter: SimUser | None = None,
        properties: list[dict[str, Any]] | None = None,
    ) -> SimIssue:
        """Create an issue from a REST `fields` object, validating it like Jira."""
        values = self._validated_fields(fields, creating=True)
        property_values = _validated_properties(properties or [])

        project = values["project"]
        self._next_issue_number[project] += 1
        now = self.now()
        issue = SimIssue(
            id=self._next_issue_id,
            key=f"{project}-{self._next_issue_number[project]}",
            fields={
                "description": None,
                "priority": "Medium",
                "labels": [],
                "components": [],
                **values,
                "status": self.workflow.initial_status,
                "resolution": None,
            },
            reporter=reporter or self.service,
            created=now,
            updated=now,
            properties=property_values,
        )
        self._next_issue_id += 1
        self.issues[issue.id] = issue
        self.reindex(issue)
        log.info("jira_sim.issue.created", extra={"ticket_key": issue.key})
        return issue

    def edit_issue(
        self,
        reference: str | int,
        fields: dict[str, Any] | None = None,
        update: dict[str, list[dict[str, Any]]] | None = None,
    ) -> SimIssue:
        """Edit an issue with REST `fields` (set) and `update` (add/remove/set operations)."""
        issue = self.issue(reference)
        fields = fields or {}
        update = update or {}
        both = sorted(set(fields) & set(update))
        if both:
            raise SimError(400, errors={name: f"Field '{name}' is set in both 'fields' and 'update'." for name in both})

        changes = self._validated_fields(fields, creating=False, project=issue.fields["project"])
        for name, operations in update.items():
            changes[name] = self._apply_operations(issue, name, operations)

        issue.fields.update(changes)
        self._touch(issue)
        return issue

    def edit_as_human(self, reference: str | int, **fields: Any) -> SimIssue:
        """Edit an issue as a person would: `summary=`, `description=`, `labels=`, `priority=` (a name), `components=` (names)."""
        rest_fields = dict(fields)
        if isinstance(rest_fields.get("priority"), str):
            rest_fields["priority"] = {"name": rest_fields["priority"]}
        if "components" in rest_fields:
            rest_fields["components"] = [{"name": name} for name in rest_fields["components"]]
        return self.edit_issue(reference, rest_fields)

    def add_comment(
        self,
        reference: str | int,
        body: str,
        *,
        author: str | SimUser | None = None,
        properties: list[dict[str, Any]] | None = None,
        visibility: dict[str, Any] | None = None,
        internal: bool = False,
    ) -> SimComment:
        """Add a comment, by default as the human user, as a person would in the web UI.

        `visibility` restricts the comment to a role or a group, for example
        `{"type": "role", "value": "Administrators"}`. `internal` makes it a
        Jira Service Management internal note (property `sd.public.comment`).
        """
        issue = self.issue(reference)
        user = author if isinstance(author, SimUser) else self.user(author or HUMAN_NAME)
        _check_comment_body(body)
        checked_visibility = _validated_visibility(visibility)
        checked_properties = _validated_properties(properties or [])
        if internal:
            checked_properties[JSM_PUBLIC_PROPERTY] = {"internal": True}

        now = self.now()
        comment = SimComment(
            id=self._next_comment_id,
            author=user,
            body=body,
            created=now,
            updated=now,
            properties=checked_properties,
            visibility=checked_visibility,
        )
        self._next_comment_id += 1
        issue.comments.append(comment)
        self._comment_issues[str(comment.id)] = issue
        self._touch(issue)
        return comment

    def edit_comment(
        self,
        comment_id: str | int,
        body: str,
        *,
        editor: str | SimUser | None = None,
        changes: dict[str, Any] | None = None,
    ) -> SimComment:
        """Replace a comment's body as `editor` (by default its author), like PUT issue/{id}/comment/{id}.

        `changes` may hold `visibility` (null removes it) and `properties`
        to set; properties not named stay, as in Jira. Only the author may edit.
        """
        issue, comment = self.comment(comment_id)
        user = comment.author
        if isinstance(editor, SimUser):
            user = editor
        elif editor:
            user = self.user(editor)
        if user is not comment.author:
            raise SimError(403, ["You do not have the permission to edit this comment."])
        _check_comment_body(body)
        changes = changes or {}
        visibility = _validated_visibility(changes["visibility"]) if "visibility" in changes else comment.visibility
        properties = _validated_properties(changes.get("properties") or [])

        comment.body = body
        comment.visibility = visibility
        comment.properties.update(properties)
        comment.updated = max(self.now(), comment.updated)
        self._touch(issue)
        return comment

    def delete_comment(self, comment_id: str | int) -> None:
        """Delete a comment as a person would, which moves the Jira issue's `updated`."""
        issue, comment = self.comment(comment_id)
        issue.comments.remove(comment)
        self._comment_issues.pop(str(comment.id), None)
        self._touch(issue)

    def comment(self, comment_id: str | int) -> tuple[SimIssue, SimComment]:
        issue = self._comment_issues.get(str(comment_id))
        if issue is not None and self.issues.get(issue.id) is issue:
            for comment in issue.comments:
                if str(comment.id) == str(comment_id):
                    return issue, comment
        for issue in self.issues.values():
            for comment in issue.comments:
                if str(comment.id) == str(comment_id):
                    return issue, comment
        raise SimError(404, ["Can not find a comment for the id."])

    def _touch(self, issue: SimIssue) -> None:
        issue.updated = max(self.now(), issue.updated)
        self.reindex(issue)

    def reindex(self, issue: SimIssue) -> None:
        """Record the issue's current state for search, visible once the search delay has passed."""
        visible_from = self.now() + timedelta(seconds=self.faults.lag_seconds(self.settings.search_delay_seconds))
        issue.index.append((visible_from, issue.view()))

    def searchable_view(self, issue: SimIssue, reconcile: set[int]) -> IssueView | None:
        """Return the state a search reads now: the newest indexed one, or the live one if reconciled."""
        if issue.id in reconcile:
            return issue.view()
        now = self.now()
        visible = [view for visible_from, view in issue.index if visible_from <= now]
        return visible[-1] if visible else None

    def _validated_fields(
        self, fields: dict[str, Any], *, creating: bool, project: str | None = None
    ) -> dict[str, Any]:
        errors: dict[str, str] = {}
        values: dict[str, Any] = {}
        if not isinstance(fields, dict):
            raise SimError(400, ["The 'fields' value must be an object."])

        if creating:
            for required, message in (
                ("project", "valid project is required"),
                ("issuetype", "valid issue type is required"),
                ("summary", "You must specify a summary of the issue."),
            ):
                if required not in fields:
                    errors[required] = message

        context = {"project": project, **fields}
        for name, value in fields.items():
            try:
                values[name] = self._validated_field(name, value, context)
            except ValueError as err:
                errors[name] = str(err)

        if errors:
            raise SimError(400, errors=errors)
        return values

    def _validated_field(self, name: str, value: Any, fields: dict[str, Any]) -> Any:
        if name == "project":
            return self.project_key(value)
        if name == "issuetype":
            return self._issue_type(value, fields.get("project"))
        if name == "summary":
            return _validated_summary(value)
        if name == "description":
            return _validated_text(value, allow_none=True)
        if name == "priority":
            return self._priority(value)
        if name == "labels":
            return _validated_labels(value)
        if name == "components":
            return self._components(value, fields.get("project"))
        if name in self.custom_fields:
            return copy.deepcopy(value)
        raise ValueError(f"Field '{name}' cannot be set: it is unknown or not on the screen.")

    def project_key(self, value: Any) -> str:
        """Return the key of a project given as key, id or `{"key"|"id": ...}`; raises ValueError."""
        reference = value.get("key") or value.get("id") if isinstance(value, dict) else value
        for index, key in enumerate(self.projects):
            if str(reference).upper() == key or str(reference) == str(20000 + index):
                return key
        raise ValueError("valid project is required")

    def _issue_type(self, value: Any, project: Any) -> str:
        name = value.get("name") or value.get("id") if isinstance(value, dict) else value
        try:
            project_key = self.project_key(project)
        except ValueError:
            raise ValueError("valid issue type is required") from None
        for type_name in self.projects[project_key][1]:
            if str(name) in (type_name, issue_type_id(type_name)):
                return type_name
        raise ValueError("Specify a valid issue type")

    def _components(self, value: Any, project: Any) -> list[str]:
        if not isinstance(value, list):
            raise ValueError("Components must be a list of {\"name\": ...} or {\"id\": ...} objects.")
        return [self._component(item, project) for item in value]

    def _component(self, item: Any, project: Any) -> str:
        reference = item.get("name") or item.get("id") if isinstance(item, dict) else None
        try:
            key = self.project_key(project)
        except ValueError:
            raise ValueError("valid project is required") from None
        for index, name in enumerate(self.components.get(key, ())):
            if str(reference) in (name, component_id(key, index)):
                return name
        if isinstance(item, dict) and "id" in item and "name" not in item:
            raise ValueError(f"Component id '{reference}' is not valid.")
        raise ValueError(f"Component name '{reference}' is not valid")

    def _priority(self, value: Any) -> str | None:
        if value is None:
            return None
        reference = value.get("name") or value.get("id") if isinstance(value, dict) else None
        for index, name in enumerate(self.priorities):
            if str(reference) in (name, str(index + 1)):
                return name
        raise ValueError(f"Priority name '{reference}' is not valid.")

    def _apply_operations(self, issue: SimIssue, name: str, operations: list[dict[str, Any]]) -> Any:
        if name == "components":
            return self._component_operations(issue, operations)
        if name != "labels":
            sets = [operation["set"] for operation in operations if "set" in operation]
            if len(sets) != 1 or len(operations) != 1:
                raise SimError(400, errors={name: f"Field '{name}' supports only one 'set' operation."})
            return self._validated_fields({name: sets[0]}, creating=False)[name]

        labels = list(issue.fields.get("labels", []))
        for operation in operations:
            if "set" in operation:
                labels = _validated_labels(operation["set"])
            elif "add" in operation:
                label = _validated_labels([operation["add"]])[0]
                if label not in labels:
                    labels.append(label)
            elif "remove" in operation:
                labels = [label for label in labels if label != operation["remove"]]
            else:
                raise SimError(400, errors={"labels": "Use 'add', 'remove' or 'set'."})
        return labels

    def _component_operations(self, issue: SimIssue, operations: list[dict[str, Any]]) -> list[str]:
        project = issue.fields["project"]
        components = list(issue.fields.get("components", []))
        try:
            for operation in operations:
                if "set" in operation:
                    components = self._components(operation["set"], project)
                elif "add" in operation:
                    name = self._component(operation["add"], project)
                    if name not in components:
                        components.append(name)
                elif "remove" in operation:
                    name = self._component(operation["remove"], project)
                    components = [item for item in components if item != name]
                else:
                    raise ValueError("Use 'add', 'remove' or 'set'.")
        except ValueError as err:
            raise SimError(400, errors={"components": str(err)}) from None
        return components

    # Workflow

    def transitions(self, reference: str | int) -> list[SimTransition]:
        """Return the transitions available from the issue's current status."""
        issue = self.issue(reference)
        return self.workflow.available(issue.fields["status"])

    def transition(
        self, reference: str | int, transition_id: Any, fields: dict[str, Any] | None = None
    ) -> SimIssue:
        """Take a transition by id, like POST issue/{id}/transitions, where `fields` may set the resolution."""
        issue = self.issue(reference)
        status = issue.fields["status"]
        chosen = next((item for item in self.workflow.available(status) if item.id == str(transition_id)), None)
        if chosen is None:
            raise SimError(
                400,
                [f"Transition id '{transition_id}' is not valid for this issue in status '{status}'."],
            )

        fields = dict(fields or {})
        resolution = fields.pop("resolution", None)
        if fields:
            raise SimError(
                400,
                errors={name: f"Field '{name}' cannot be set. It is not on the appropriate screen, or unknown." for name in fields},
            )
        entering_done = self.workflow.is_done(chosen.to)
        if resolution is not None and not entering_done:
            raise SimError(400, errors={"resolution": "Field 'resolution' cannot be set. It is not on the appropriate screen, or unknown."})

        issue.fields["status"] = chosen.to
        issue.fields["resolution"] = self._resolution(resolution) if entering_done else None
        self._touch(issue)
        log.info("jira_sim.issue.transitioned", extra={"ticket_key": issue.key, "status": chosen.to})
        return issue

    def transition_as_human(self, reference: str | int, status: str, resolution: str | None = None) -> SimIssue:
        """Move an issue to `status` by an available transition, as a person would, or raise SimError without one."""
        issue = self.issue(reference)
        chosen = next((item for item in self.transitions(issue.id) if item.to.casefold() == status.casefold()), None)
        if chosen is None:
            raise SimError(400, [f"No transition leads from '{issue.fields['status']}' to '{status}'."])
        fields = {"resolution": {"name": resolution}} if resolution is not None else None
        return self.transition(issue.id, chosen.id, fields)

    def _resolution(self, value: Any) -> str:
        if value is None:
            return self.workflow.resolutions[0]
        reference = value.get("name") or value.get("id") if isinstance(value, dict) else None
        for name in self.workflow.resolutions:
            if str(reference) in (name, self.workflow.resolution_id(name)):
                return name
        raise SimError(400, errors={"resolution": f"Resolution '{reference}' is not valid."})

    # Attachments

    def add_attachment(
        self,
        reference: str | int,
        filename: str,
        data: bytes | None = None,
        *,
        size: int | None = None,
        author: str | SimUser | None = None,
        mime_type: str = "application/octet-stream",
    ) -> SimAttachment:
        """Attach `data`, or `size` generated bytes, as a person would (by default the human user)."""
        issue = self.issue(reference)
        user = author if isinstance(author, SimUser) else self.user(author or HUMAN_NAME)
        if (data is None) == (size is None):
            raise ValueError("give the attachment's bytes as data or a generated size, not both")
        attachment_id = self.next_attachment_id()
        path = self.files.path_for(attachment_id)
        with path.open("wb") as file:
            for chunk in [data] if data is not None else generated_chunks(size or 0):
                file.write(chunk)
        return self.register_attachment(issue, attachment_id, filename, path, user, mime_type)

    def next_attachment_id(self) -> int:
        """Reserve the id of a new attachment, whose bytes then go to `files.path_for(id)`."""
        attachment_id = self._next_attachment_id
        self._next_attachment_id += 1
        return attachment_id

    def register_attachment(
        self, issue: SimIssue, attachment_id: int, filename: str, path: Path, author: SimUser, mime_type: str
    ) -> SimAttachment:
        """Record a file already written to `path` as an attachment of `issue`, which moves `updated`."""
        attachment = SimAttachment(
            id=attachment_id,
            issue_id=issue.id,
            filename=filename,
            size=path.stat().st_size,
            mime_type=mime_type,
            author=author,
            created=self.now(),
            path=path,
        )
        issue.attachments.append(attachment)
        self._touch(issue)
        log.info("jira_sim.attachment.added", extra={"ticket_key": issue.key, "attachment_id": attachment_id})
        return attachment

    def attachment(self, attachment_id: str | int) -> tuple[SimIssue, SimAttachment]:
        """Find an attachment by id, or raise SimError 404 like Jira."""
        for issue in self.issues.values():
            for attachment in issue.attachments:
                if str(attachment.id) == str(attachment_id):
                    return issue, attachment
        raise SimError(404, [f"The attachment with id '{attachment_id}' does not exist."])

    def delete_attachment(self, attachment_id: str | int) -> None:
        """Delete an attachment and its file as a person would, which moves the Jira issue's `updated`."""
        issue, attachment = self.attachment(attachment_id)
        issue.attachments.remove(attachment)
        attachment.path.unlink(missing_ok=True)
        self._touch(issue)

    # Search

    def search(
        self,
        jql_text: str,
        requester: SimUser,
        reconcile: set[int] | None = None,
    ) -> list[tuple[SimIssue, IssueView]]:
        """Run a JQL query as `requester`, seeing each issue as search would now."""
        try:
            query = jql.parse(jql_text)
        except jql.JqlError as err:
            raise SimError(400, [str(err)]) from err
        if self.settings.deployment == "cloud" and not query.bounded:
            raise SimError(400, [UNBOUNDED_JQL_MESSAGE])

        try:
            matches = jql.matcher(query, requester.time_zone, self.now())
        except jql.JqlError as err:
            raise SimError(400, [str(err)]) from err

        found: list[tuple[SimIssue, IssueView]] = []
        for issue in self.issues.values():
            view = self.searchable_view(issue, reconcile or set())
            if view is not None and matches(_search_record(issue, view)):
                found.append((issue, view))

        records = [_search_record(issue, view) | {"_pair": (issue, view)} for issue, view in found]
        return [record["_pair"] for record in jql.sort_records(records, query.order)]

    # Inspection

    def state(self) -> dict[str, Any]:
        """Return every issue with its labels, properties and comments, as plain JSON values."""
        return {
            "issues": [
                {
                    "id": str(issue.id),
                    "key": issue.key,
                    "fields": copy.deepcopy(issue.fields),
                    "updated": issue.updated.isoformat(),
                    "properties": copy.deepcopy(issue.properties),
                    "comments": [
                        {
                            "id": str(comment.id),
                            "author": comment.author.name,
                            "body": comment.body,
                            "created": comment.created.isoformat(),
                            "updated": comment.updated.isoformat(),
                            "properties": copy.deepcopy(comment.properties),
                            "visibility": copy.deepcopy(comment.visibility),
                        }
                        for comment in issue.comments
                    ],
                    "attachments": [
                        {
                            "id": str(attachment.id),
                            "filename": attachment.filename,
                            "size": attachment.size,
                            "mime_type": attachment.mime_type,
                            "author": attachment.author.name,
                            "created": attachment.created.isoformat(),
                        }
                        for attachment in issue.attachments
                    ],
                }
                for issue in self.issues.values()
            ],
            "calls": dict(self.calls),
        }


def _loopback_origin(value: str) -> bool:
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and parts.path in ("", "/") and is_loopback_host(parts.hostname or "")


def _check_time_zone(name: str) -> None:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as err:
        raise ValueError(f"unknown time zone {name!r}; use an IANA name such as Europe/Moscow") from err


def issue_type_id(name: str) -> str:
    return str(10000 + sum(name.encode()))


def component_id(project: str, index: int) -> str:
    return str(10100 + sum(project.encode()) * 10 + index)


def _utf16_length(text: str) -> int:
    # Java counts a lone surrogate as one code unit, so it must not raise here.
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def _validated_summary(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("You must specify a summary of the issue.")
    if "\n" in value or "\r" in value:
        raise ValueError("The summary must be one line: it contains a line break.")
    # Jira counts Java characters (UTF-16 code units), so an emoji counts twice.
    if _utf16_length(value) > MAX_SUMMARY_LENGTH:
        raise ValueError(f"Summary must be less than {MAX_SUMMARY_LENGTH + 1} characters.")
    return value


def _validated_text(value: Any, *, allow_none: bool) -> str | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, str):
        raise ValueError("The value must be a string.")
    if _utf16_length(value) > MAX_TEXT_LENGTH:
        raise ValueError(f"The text is longer than {MAX_TEXT_LENGTH} characters.")
    return value


def _validated_labels(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(label, str) for label in value):
        raise ValueError("Labels must be a list of strings.")
    for label in value:
        if not label or re.search(r"\s", label):
            raise ValueError(f"The label '{label}' contains spaces, which is not allowed.")
        if len(label) > 255:
            raise ValueError("A label must be at most 255 characters long.")
    return list(dict.fromkeys(value))


def _check_comment_body(body: Any) -> None:
    if not isinstance(body, str) or not body.strip():
        raise SimError(400, errors={"comment": "Comment body can not be empty!"})
    if _utf16_length(body) > MAX_TEXT_LENGTH:
        raise SimError(400, errors={"comment": f"The comment is longer than {MAX_TEXT_LENGTH} characters."})


def _validated_visibility(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in VISIBILITY_TYPES:
        raise SimError(400, errors={"commentLevel": "Visibility needs a 'type' of 'role' or 'group'."})
    name = value.get("value")
    if not isinstance(name, str) or not name.strip():
        raise SimError(400, errors={"commentLevel": "Visibility needs the role or group name as 'value'."})
    return {"type": value["type"], "value": name}


def _validated_properties(properties: Any) -> dict[str, Any]:
    if not isinstance(properties, list):
        raise SimError(400, ["The 'properties' value must be a list of {key, value} objects."])
    result: dict[str, Any] = {}
    for item in properties:
        if not isinstance(item, dict) or not isinstance(item.get("key"), str) or "value" not in item:
            raise SimError(400, ["Each property needs a string 'key' and a 'value'."])
        check_property(item["key"], item["value"])
        result[item["key"]] = copy.deepcopy(item["value"])
    return result


def check_property(key: str, value: Any) -> None:
    if not key or len(key) > 255:
        raise SimError(400, ["The property key must be 1 to 255 characters long."])
    if len(json.dumps(value).encode()) > MAX_PROPERTY_BYTES:
        raise SimError(400, [f"The property value is larger than {MAX_PROPERTY_BYTES} bytes."])


def _search_record(issue: SimIssue, view: IssueView) -> dict[str, Any]:
    return {
        "id": issue.id,
        "key": issue.key,
        "project": view.fields["project"],
        "labels": view.fields.get("labels", []),
        "issuetype": view.fields["issuetype"],
        "status": view.fields["status"],
        "component": view.fields.get("components", []),
        "updated": view.updated,
        "created": issue.created,
    }


def format_jira_time(moment: datetime, time_zone: str) -> str:
    """Format a time as Jira's REST API does: `2026-12-04T10:00:00.000+0300` in the user's zone."""
    local = moment.astimezone(ZoneInfo(time_zone))
    return local.strftime("%Y-%m-%dT%H:%M:%S.") + f"{local.microsecond // 1000:03d}" + local.strftime("%z")
