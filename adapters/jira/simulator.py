"""A Jira simulator: the REST v2 calls the connector makes, kept in memory.

It behaves as Jira Cloud or Jira Data Center (`deployment`) and checks
Basic and Bearer credentials. It pages comments and searches the way each
product does and reads JQL dates in the requesting user's time zone. It can
also delay search visibility like Cloud's eventually consistent `search/jql`,
and injects the faults of `adapters/faults.py` (`sim.faults`, `/_sim/faults`).
Issues follow a small workflow with transitions and resolutions, users
belong to groups, and attachments are stored on disk with an upload limit.
Cloud serves attachment content by a redirect to a signed media link, Data
Center at `/secure/attachment/{id}/{filename}`.
Tests drive it in-process; `mdr-connector demo` and `simulate jira` run it
with `serve`.

    sim = JiraSimulator(deployment="cloud")
    async with run_simulator(sim) as base_url:
        ...  # point the connector at base_url with SERVICE_EMAIL / SERVICE_TOKEN
        sim.add_comment("SEC-1", "Checked the host.", author="analyst")

The connector's service account signs in with SERVICE_EMAIL and
SERVICE_TOKEN on Cloud, and with SERVICE_NAME and SERVICE_PASSWORD or the
Bearer token SERVICE_PAT on Data Center. A human user, HUMAN_NAME, writes
the comments and edits that the connector must pick up.

Besides `/rest/api/2/...` it serves a control API under `/_sim/` with no
authentication, so it only ever listens on a loopback address.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import hashlib
import hmac
import json
import logging
import math
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import BodyPartReader, web

from mdr_connector.adapters.jira.simulator_state import (
    HUMAN_NAME,
    SERVICE_ACCOUNT_ID,
    SERVICE_EMAIL,
    SERVICE_NAME,
    SERVICE_PASSWORD,
    SERVICE_PAT,
    SERVICE_TOKEN,
    SYSTEM_FIELDS,
    UNBOUNDED_JQL_MESSAGE,
    IssueView,
    JiraSimulator,
    SimComment,
    SimError,
    SimIssue,
    SimUser,
    check_property,
    component_id,
    issue_type_id,
    format_jira_time,
    settings_errors,
)
from mdr_connector.adapters.faults import FaultSettings, download_cut_bytes, fault_middleware
from mdr_connector.adapters.jira.simulator_files import CHUNK_BYTES, SimAttachment
from mdr_connector.adapters.jira.simulator_workflow import CATEGORY_JSON, SimTransition
from mdr_connector.adapters.loopback import run_until_signal, serve_on_loopback, write_file_body

__all__ = [
    "HUMAN_NAME",
    "SERVICE_ACCOUNT_ID",
    "SERVICE_EMAIL",
    "SERVICE_NAME",
    "SERVICE_PASSWORD",
    "SERVICE_PAT",
    "SERVICE_TOKEN",
    "UNBOUNDED_JQL_MESSAGE",
    "JiraSimulator",
    "SimError",
    "format_jira_time",
    "make_app",
    "run_simulator",
    "serve",
]

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

API = "/rest/api/2"
# Signals that stop `serve` cleanly: Ctrl-C, and the stop request of a service manager or container runtime.


def _json_response(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=_json_text)


def _json_text(body: Any) -> str:
    """Encode JSON with characters as they are, like Jira, or with `\\u` escapes when UTF-8 cannot carry them.

    Text with a lone surrogate, stored from a `\\ud800` escape in a request,
    has no UTF-8 form. The escaped JSON is still valid and decodes to the same text.
    """
    text = json.dumps(body, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(body)
    return text


# HTTP layer


class _Api:
    """Request handlers: translate REST calls into simulator operations and JSON replies."""

    def __init__(self, sim: JiraSimulator) -> None:
        self.sim = sim
        # Signs the media links of Cloud attachment content, which need no credentials.
        self.media_key = secrets.token_bytes(32)

    @property
    def cloud(self) -> bool:
        return self.sim.settings.deployment == "cloud"

    def base(self, request: web.Request) -> str:
        return str(request.url.origin())

    def user_json(self, request: web.Request, user: SimUser) -> dict[str, Any]:
        base = self.base(request)
        if self.cloud:
            return {
                "self": f"{base}{API}/user?accountId={user.account_id}",
                "accountId": user.account_id,
                "displayName": user.display_name,
                "active": True,
                "timeZone": user.time_zone,
                "accountType": "atlassian",
            }
        return {
            "self": f"{base}{API}/user?username={user.name}",
            "name": user.name,
            "key": user.name,
            "displayName": user.display_name,
            "emailAddress": user.email,
            "active": True,
            "timeZone": user.time_zone,
        }

    def time(self, request: web.Request, moment: datetime) -> str:
        requester: SimUser | None = request.get("user")
        return format_jira_time(moment, requester.time_zone if requester else "UTC")

    # Server and user

    async def server_info(self, request: web.Request) -> web.Response:
        version = (1001, 0, 0) if self.cloud else (9, 12, 8)
        return _json_response(
            {
                "baseUrl": self.base(request),
                "version": ".".join(map(str, version)),
                "versionNumbers": list(version),
                "deploymentType": "Cloud" if self.cloud else "Server",
                "buildNumber": 100000,
                "serverTime": self.time(request, self.sim.now()),
                "serverTitle": "Jira simulator",
            }
        )

    async def myself(self, request: web.Request) -> web.Response:
        user: SimUser = request["user"]
        body = self.user_json(request, user)
        body["emailAddress"] = user.email
        return _json_response(body)

    async def fields(self, request: web.Request) -> web.Response:
        system = [
            {"id": field_id, "name": name, "custom": False, "clauseNames": [field_id]}
            for field_id, name in SYSTEM_FIELDS
        ]
        custom = [
            {"id": field_id, "name": name, "custom": True, "clauseNames": [f"cf[{field_id.split('_')[-1]}]", name]}
            for field_id, name in self.sim.custom_fields.items()
        ]
        return _json_response(system + custom)

    async def priorities(self, request: web.Request) -> web.Response:
        return _json_response([self.priority_json(request, name) for name in self.sim.priorities])

    def priority_json(self, request: web.Request, name: str) -> dict[str, Any]:
        number = self.sim.priorities.index(name) + 1
        return {"self": f"{self.base(request)}{API}/priority/{number}", "id": str(number), "name": name}

    async def issue_types(self, request: web.Request) -> web.Response:
        names = dict.fromkeys(name for _, types in self.sim.projects.values() for name in types)
        return _json_response([self.issue_type_json(name) for name in names])

    def issue_type_json(self, name: str) -> dict[str, Any]:
        return {"id": issue_type_id(name), "name": name, "subtask": False}

    async def projects(self, request: web.Request) -> web.Response:
        return _json_response([self.project_json(request, key) for key in self.sim.projects])

    async def project(self, request: web.Request) -> web.Response:
        reference = request.match_info["project"]
        try:
            key = self.sim.project_key(reference)
        except ValueError:
            raise SimError(404, [f"No project could be found with key '{reference}'."]) from None
        return _json_response(self.project_json(request, key))

    def project_json(self, request: web.Request, key: str) -> dict[str, Any]:
        name, types = self.sim.projects[key]
        number = 20000 + list(self.sim.projects).index(key)
        return {
            "self": f"{self.base(request)}{API}/project/{number}",
            "id": str(number),
            "key": key,
            "name": name,
            "issueTypes": [self.issue_type_json(type_name) for type_name in types],
            "components": [
                self.component_json(request, key, component) for component in self.sim.components.get(key, ())
            ],
        }

    def component_json(self, request: web.Request, project: str, name: str) -> dict[str, Any]:
        identifier = component_id(project, self.sim.components[project].index(name))
        return {"self": f"{self.base(request)}{API}/component/{identifier}", "id": identifier, "name": name}

    def status_json(self, request: web.Request, name: str) -> dict[str, Any]:
        identifier = self.sim.workflow.status_id(name)
        category = CATEGORY_JSON[self.sim.workflow.statuses[name]]
        return {
            "self": f"{self.base(request)}{API}/status/{identifier}",
            "description": "",
            "name": name,
            "id": identifier,
            "statusCategory": {"self": f"{self.base(request)}{API}/statuscategory/{category['id']}", **category},
        }

    def resolution_json(self, request: web.Request, name: str) -> dict[str, Any]:
        identifier = self.sim.workflow.resolution_id(name)
        return {"self": f"{self.base(request)}{API}/resolution/{identifier}", "id": identifier, "name": name, "description": ""}

    # Issues

    async def create_issue(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        properties = body.get("properties", [])
        issue = self.sim.create_issue(body.get("fields", {}), reporter=request["user"], properties=properties)
        reply = {"id": str(issue.id), "key": issue.key, "self": f"{self.base(request)}{API}/issue/{issue.id}"}
        return _json_response(reply, status=201)

    async def get_issue(self, request: web.Request) -> web.Response:
        issue = self.sim.issue(request.match_info["issue"])
        requested = _list_param(request.query.getall("fields", []))
        properties = _list_param(request.query.getall("properties", []))
        body = self.issue_json(request, issue, issue.view(), requested or ["*all"], properties)
        return _json_response(body)

    async def edit_issue(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        self.sim.edit_issue(request.match_info["issue"], body.get("fields"), body.get("update"))
        return web.Response(status=204)

    def issue_json(
        self,
        request: web.Request,
        issue: SimIssue,
        view: IssueView,
        requested: list[str],
        properties: list[str],
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "expand": "renderedFields,names,schema,operations,editmeta,changelog,versionedRepresentations",
            "id": str(issue.id),
            "self": f"{self.base(request)}{API}/issue/{issue.id}",
            "key": issue.key,
        }
        all_fields = self.fields_json(request, issue, view)
        body["fields"] = {name: value for name, value in all_fields.items() if _field_requested(name, requested)}
        if properties:
            body["properties"] = {
                key: copy.deepcopy(view.properties[key]) for key in properties if key in view.properties
            }
        return body

    def fields_json(self, request: web.Request, issue: SimIssue, view: IssueView) -> dict[str, Any]:
        fields = view.fields
        priority = fields.get("priority")
        result: dict[str, Any] = {
            "summary": fields["summary"],
            "description": fields.get("description"),
            "priority": self.priority_json(request, priority) if priority else None,
            "labels": list(fields.get("labels", [])),
            "issuetype": self.issue_type_json(fields["issuetype"]),
            "project": {key: value for key, value in self.project_json(request, fields["project"]).items() if key != "issueTypes"},
            "created": self.time(request, issue.created),
            "updated": self.time(request, view.updated),
            "reporter": self.user_json(request, issue.reporter),
            "status": self.status_json(request, fields["status"]),
            "resolution": self.resolution_json(request, fields["resolution"]) if fields.get("resolution") else None,
            "components": [
                self.component_json(request, fields["project"], name) for name in fields.get("components", [])
            ],
            # Attachments are read live: the index keeps no copy of them.
            "attachment": [self.attachment_json(request, attachment) for attachment in issue.attachments],
        }
        for field_id in self.sim.custom_fields:
            result[field_id] = copy.deepcopy(fields.get(field_id))
        return result

    # Comments

    async def list_comments(self, request: web.Request) -> web.Response:
        issue = self.sim.issue(request.match_info["issue"])
        start_at = _int_param(request, "startAt", 0)
        cap = self.sim.settings.comment_page_cap
        max_results = min(_int_param(request, "maxResults", cap), cap)
        expand = _list_param(request.query.getall("expand", []))

        order = request.query.get("orderBy", "created")
        if order.lstrip("+-") != "created":
            raise SimError(400, [f"Ordering by {order!r} is not supported. Use created or -created."])
        comments = sorted(issue.comments, key=lambda comment: (comment.created, comment.id))
        if order.startswith("-"):
            comments.reverse()

        page = comments[start_at : start_at + max_results] if max_results > 0 else []
        body = {
            "comments": [self.comment_json(request, issue, comment, "properties" in expand) for comment in page],
            "maxResults": max_results,
            "total": len(comments),
            "startAt": start_at,
        }
        return _json_response(body)

    async def get_comment(self, request: web.Request) -> web.Response:
        issue = self.sim.issue(request.match_info["issue"])
        expand = _list_param(request.query.getall("expand", []))
        for comment in issue.comments:
            if str(comment.id) == request.match_info["comment"]:
                return _json_response(self.comment_json(request, issue, comment, "properties" in expand))
        raise SimError(404, ["Can not find a comment for the id."])

    async def add_comment(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        comment = self.sim.add_comment(
            request.match_info["issue"],
            body.get("body"),
            author=request["user"],
            properties=body.get("properties", []),
            visibility=body.get("visibility"),
        )
        issue, _ = self.sim.comment(comment.id)
        return _json_response(self.comment_json(request, issue, comment, with_properties=False), status=201)

    def comment_json(
        self, request: web.Request, issue: SimIssue, comment: SimComment, with_properties: bool
    ) -> dict[str, Any]:
        author = self.user_json(request, comment.author)
        body: dict[str, Any] = {
            "self": f"{self.base(request)}{API}/issue/{issue.id}/comment/{comment.id}",
            "id": str(comment.id),
            "author": author,
            "body": comment.body,
            "updateAuthor": author,
            "created": self.time(request, comment.created),
            "updated": self.time(request, comment.updated),
            "jsdPublic": not comment.internal,
        }
        if comment.visibility is not None:
            body["visibility"] = dict(comment.visibility)
        if with_properties:
            body["properties"] = [{"key": key, "value": value} for key, value in comment.properties.items()]
        return body

    async def edit_comment(self, request: web.Request) -> web.Response:
        issue = self.sim.issue(request.match_info["issue"])
        body = await _json_body(request)
        _, comment = self.sim.comment(request.match_info["comment"])
        if comment not in issue.comments:
            raise SimError(404, ["Can not find a comment for the id."])
        changes = {name: body[name] for name in ("visibility", "properties") if name in body}
        self.sim.edit_comment(comment.id, body.get("body"), editor=request["user"], changes=changes)
        expand = _list_param(request.query.getall("expand", []))
        return _json_response(self.comment_json(request, issue, comment, "properties" in expand))

    # Workflow

    async def transitions(self, request: web.Request) -> web.Response:
        issue = self.sim.issue(request.match_info["issue"])
        transitions = self.sim.transitions(issue.id)
        return _json_response(
            {"expand": "transitions", "transitions": [self.transition_json(request, item) for item in transitions]}
        )

    def transition_json(self, request: web.Request, transition: SimTransition) -> dict[str, Any]:
        return {
            "id": transition.id,
            "name": transition.name,
            "to": self.status_json(request, transition.to),
            "hasScreen": False,
            "isGlobal": not transition.sources,
            "isInitial": False,
            "isAvailable": True,
            "isConditional": False,
            "isLooped": False,
        }

    async def do_transition(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        unsupported = sorted(set(body) - {"transition", "fields"})
        if unsupported:
            raise SimError(400, [f"The simulator does not support {', '.join(unsupported)} in a transition."])
        transition = body.get("transition")
        transition_id = transition.get("id") if isinstance(transition, dict) else None
        if transition_id is None:
            raise SimError(400, ["Missing 'transition' identifier"])
        fields = body.get("fields") or {}
        if not isinstance(fields, dict):
            raise SimError(400, ["The 'fields' value must be an object."])
        self.sim.transition(request.match_info["issue"], transition_id, fields)
        return web.Response(status=204)

    # Attachments

    def attachment_json(self, request: web.Request, attachment: SimAttachment) -> dict[str, Any]:
        base = self.base(request)
        content_base = self.sim.settings.content_base_url.rstrip("/") or base
        if self.cloud:
            content = f"{content_base}{API}/attachment/content/{attachment.id}"
        else:
            content = f"{content_base}/secure/attachment/{attachment.id}/{quote(attachment.filename, safe='')}"
        return {
            "self": f"{base}{API}/attachment/{attachment.id}",
            "id": str(attachment.id),
            "filename": attachment.filename,
            "author": self.user_json(request, attachment.author),
            "created": self.time(request, attachment.created),
            "size": attachment.size,
            "mimeType": attachment.mime_type,
            "content": content,
        }

    async def attachment_meta(self, request: web.Request) -> web.Response:
        settings = self.sim.settings
        return _json_response({"enabled": settings.attachments_enabled, "uploadLimit": settings.upload_limit_bytes})

    async def get_attachment(self, request: web.Request) -> web.Response:
        _, attachment = self.sim.attachment(request.match_info["attachment"])
        return _json_response(self.attachment_json(request, attachment))

    async def attachment_content(self, request: web.Request) -> web.StreamResponse:
        """Cloud: redirect to a signed media link, as Jira Cloud does, unless `redirect=false`."""
        _, attachment = self.sim.attachment(request.match_info["attachment"])
        origin = self.sim.settings.media_base_url.rstrip("/") or self.base(request)
        location = f"{origin}/media/file/{attachment.id}/binary?token={self.media_token(attachment.id)}"
        if request.query.get("redirect") == "false":
            return _json_response(location)
        raise web.HTTPSeeOther(location)

    async def media_content(self, request: web.Request) -> web.StreamResponse:
        """Serve a download of the media host, which takes the token from the redirect instead of credentials."""
        attachment_id = request.match_info["attachment"]
        self.sim.media_requests.append(
            {"attachment_id": attachment_id, "authorization": "Authorization" in request.headers}
        )
        expected = self.media_token(int(attachment_id)) if attachment_id.isdigit() else ""
        if not hmac.compare_digest(request.query.get("token", ""), expected):
            raise SimError(401, ["The media token is missing or wrong."])
        _, attachment = self.sim.attachment(attachment_id)
        return await self.stream_file(request, attachment)

    def media_token(self, attachment_id: int) -> str:
        return hmac.new(self.media_key, str(attachment_id).encode(), hashlib.sha256).hexdigest()

    async def secure_attachment(self, request: web.Request) -> web.StreamResponse:
        """Data Center: the content URL `/secure/attachment/{id}/{filename}`, behind the usual credentials."""
        _, attachment = self.sim.attachment(request.match_info["attachment"])
        return await self.stream_file(request, attachment)

    async def stream_file(self, request: web.Request, attachment: SimAttachment) -> web.StreamResponse:
        """Send the file in chunks, cut off after `download_cut_bytes` when that setting is above 0."""
        # The length of the file itself: a test may set the record's size to something else.
        response = web.StreamResponse(
            headers={
                "Content-Type": attachment.mime_type,
                "Content-Length": str(attachment.path.stat().st_size),
                "Content-Disposition": f"attachment; filename*=UTF-8''{quote(attachment.filename, safe='')}",
            }
        )
        await response.prepare(request)
        cut = download_cut_bytes(request, attachment.path.stat().st_size) or self.sim.settings.download_cut_bytes
        if await write_file_body(request, response, attachment.path, cut, CHUNK_BYTES):
            log.info("jira_sim.download.cut", extra={"attachment_id": attachment.id, "bytes": cut})
        return response

    async def add_attachments(self, request: web.Request) -> web.Response:
        """Store each multipart `file` part on disk as it arrives, or read the rest and reply 413 when one exceeds the limit."""
        if request.headers.get("X-Atlassian-Token", "").lower() != "no-check":
            raise SimError(403, ["XSRF check failed: send the header X-Atlassian-Token: no-check."])
        issue = self.sim.issue(request.match_info["issue"])
        if not self.sim.settings.attachments_enabled:
            raise SimError(403, ["Attachments are disabled on this Jira site."])
        if request.content_type != "multipart/form-data":
            raise SimError(415, [f"Expected multipart/form-data, got {request.content_type!r}."])

        written: list[tuple[int, str, Path, str]] = []
        too_large: list[str] = []
        try:
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader) or part.name != "file":
                    await part.release()
                    continue
                if not part.filename:
                    raise SimError(400, ["The 'file' part has no file name."])
                attachment_id = self.sim.next_attachment_id()
                path = self.sim.files.path_for(attachment_id)
                written.append((attachment_id, part.filename, path, part.headers.get("Content-Type", "application/octet-stream")))
                if not await self.receive_part(part, path):
                    too_large.append(part.filename)
        except BaseException:
            _remove_files(path for _, _, path, _ in written)
            raise

        if too_large or not written:
            _remove_files(path for _, _, path, _ in written)
        if too_large:
            limit = self.sim.settings.upload_limit_bytes
            raise SimError(413, [f"The file '{too_large[0]}' is larger than the attachment size limit of {limit} bytes."])
        if not written:
            raise SimError(400, ["The request has no multipart part named 'file'."])

        user: SimUser = request["user"]
        attachments = [
            self.sim.register_attachment(issue, attachment_id, filename, path, user, mime_type)
            for attachment_id, filename, path, mime_type in written
        ]
        return _json_response([self.attachment_json(request, attachment) for attachment in attachments])

    async def receive_part(self, part: BodyPartReader, path: Path) -> bool:
        """Write a part to `path` in chunks and return whether it fits the limit; a part over it is read to its end."""
        limit = self.sim.settings.upload_limit_bytes
        size = 0
        with path.open("wb") as file:
            while chunk := await part.read_chunk(CHUNK_BYTES):
                size += len(chunk)
                if size <= limit:
                    file.write(chunk)
        # The client reads no reply before its whole body is sent, so an
        # over-limit part is read to its end and dropped: closing the
        # connection early would look like a lost reply instead of a 413.
        return size <= limit

    # Users and groups

    async def get_user(self, request: web.Request) -> web.Response:
        user = self.requested_user(request)
        body = self.user_json(request, user)
        if "groups" in _list_param(request.query.getall("expand", [])):
            body["groups"] = {"size": len(user.groups), "items": [self.group_json(request, name) for name in user.groups]}
        return _json_response(body)

    async def user_groups(self, request: web.Request) -> web.Response:
        if not self.cloud:
            raise SimError(404, ["This endpoint exists only on Jira Cloud. Use user?username=...&expand=groups."])
        user = self.requested_user(request)
        return _json_response([self.group_json(request, name) for name in user.groups])

    def requested_user(self, request: web.Request) -> SimUser:
        if self.cloud:
            reference = request.query.get("accountId")
            matches = [user for user in self.sim.users if user.account_id == reference]
        else:
            reference = request.query.get("username") or request.query.get("key")
            matches = [user for user in self.sim.users if user.name == reference]
        if not reference:
            parameter = "accountId" if self.cloud else "username"
            raise SimError(400, [f"The '{parameter}' query parameter is required."])
        if not matches:
            raise SimError(404, [f"The user '{reference}' does not exist."])
        return matches[0]

    def group_json(self, request: web.Request, name: str) -> dict[str, Any]:
        body = {"name": name, "self": f"{self.base(request)}{API}/group?groupname={quote(name, safe='')}"}
        if self.cloud:
            body["groupId"] = hashlib.sha256(name.encode()).hexdigest()[:32]
        return body

    # Entity properties

    def property_owner(self, request: web.Request) -> tuple[dict[str, Any], SimIssue]:
        if "comment" in request.match_info:
            issue, comment = self.sim.comment(request.match_info["comment"])
            return comment.properties, issue
        issue = self.sim.issue(request.match_info["issue"])
        return issue.properties, issue

    async def property_keys(self, request: web.Request) -> web.Response:
        properties, _ = self.property_owner(request)
        keys = [{"self": f"{request.url}/{key}", "key": key} for key in properties]
        return _json_response({"keys": keys})

    async def get_property(self, request: web.Request) -> web.Response:
        properties, _ = self.property_owner(request)
        key = request.match_info["key"]
        if key not in properties:
            raise SimError(404, [f"The property with key '{key}' does not exist."])
        return _json_response({"key": key, "value": properties[key]})

    async def put_property(self, request: web.Request) -> web.Response:
        properties, issue = self.property_owner(request)
        key = request.match_info["key"]
        value = await _json_body(request, expect_object=False)
        check_property(key, value)
        existed = key in properties
        properties[key] = value
        if "comment" not in request.match_info:
            # A property write does not move `updated`, but search reads the new value only after the delay.
            self.sim.reindex(issue)
        return web.Response(status=200 if existed else 201)

    async def delete_property(self, request: web.Request) -> web.Response:
        properties, _ = self.property_owner(request)
        key = request.match_info["key"]
        if properties.pop(key, None) is None:
            raise SimError(404, [f"The property with key '{key}' does not exist."])
        return web.Response(status=204)

    # Search

    async def search_jql(self, request: web.Request) -> web.Response:
        if not self.cloud:
            raise SimError(404, ["This endpoint exists only on Jira Cloud. Use /rest/api/2/search."])
        params = await _search_params(request)
        offset = _decode_page_token(params.get("nextPageToken"))
        cap = self.sim.settings.search_page_cap
        max_results = min(int(params.get("maxResults") or 50), cap)
        reconcile = {int(value) for value in _list_param(params.get("reconcileIssues")) if str(value).isdigit()}

        found = self.sim.search(str(params.get("jql", "")), request["user"], reconcile)
        page = found[offset : offset + max_results]
        requested = _list_param(params.get("fields"))
        properties = _list_param(params.get("properties"))
        body: dict[str, Any] = {
            "issues": [self.search_item(request, issue, view, requested, properties) for issue, view in page],
            "isLast": offset + len(page) >= len(found),
        }
        if not body["isLast"]:
            body["nextPageToken"] = _encode_page_token(offset + len(page))
        return _json_response(body)

    async def search_classic(self, request: web.Request) -> web.Response:
        if self.cloud:
            raise SimError(
                410,
                ["This search API was removed from Jira Cloud. Use /rest/api/2/search/jql instead."],
            )
        params = await _search_params(request)
        start_at = int(params.get("startAt") or 0)
        cap = self.sim.settings.search_page_cap
        max_results = min(int(params.get("maxResults") or 50), cap)

        found = self.sim.search(str(params.get("jql", "")), request["user"])
        page = found[start_at : start_at + max_results]
        requested = _list_param(params.get("fields")) or ["*navigable"]
        properties = _list_param(params.get("properties"))
        body = {
            "expand": "schema,names",
            "startAt": start_at,
            "maxResults": max_results,
            "total": len(found),
            "issues": [self.search_item(request, issue, view, requested, properties) for issue, view in page],
        }
        return _json_response(body)

    def search_item(
        self,
        request: web.Request,
        issue: SimIssue,
        view: IssueView,
        requested: list[str],
        properties: list[str],
    ) -> dict[str, Any]:
        if not requested and not properties:
            return {"id": str(issue.id)}
        return self.issue_json(request, issue, view, [name for name in requested if name != "comment"], properties)


def _field_requested(name: str, requested: list[str]) -> bool:
    if f"-{name}" in requested:
        return False
    return name in requested or "*all" in requested or "*navigable" in requested


def _remove_files(paths: Any) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _list_param(values: Any) -> list[str]:
    """Read a list parameter given repeated, comma-separated or as a JSON list."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    result: list[str] = []
    for value in values:
        result.extend(part.strip() for part in str(value).split(",") if part.strip())
    return result


def _int_param(request: web.Request, name: str, default: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        return max(0, int(raw))
    except ValueError:
        raise SimError(400, [f"The '{name}' parameter must be a whole number."]) from None


async def _json_body(request: web.Request, *, expect_object: bool = True) -> Any:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise SimError(400, ["The request body is not valid JSON."]) from None
    if expect_object and not isinstance(body, dict):
        raise SimError(400, ["The request body must be a JSON object."])
    return body


async def _search_params(request: web.Request) -> dict[str, Any]:
    if request.method == "POST":
        return await _json_body(request)
    params: dict[str, Any] = {}
    for name in ("jql", "nextPageToken", "maxResults", "startAt"):
        if name in request.query:
            params[name] = request.query[name]
    for name in ("fields", "properties", "reconcileIssues", "expand"):
        if name in request.query:
            params[name] = request.query.getall(name)
    return params


def _encode_page_token(offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"offset": offset}).encode()).decode()


def _decode_page_token(token: Any) -> int:
    if not token:
        return 0
    try:
        return int(json.loads(base64.urlsafe_b64decode(str(token)))["offset"])
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise SimError(400, ["The nextPageToken is invalid."]) from None


# Middlewares, outermost first: count, latency, faults, errors, authentication.


def _count_calls(sim: JiraSimulator) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.resource
        path = route.canonical if route is not None else "<unmatched>"
        sim.calls[f"{request.method} {path}"] += 1
        response = await handler(request)
        # The Date header follows the simulator's clock, as a real server's
        # Date and its `updated` times come from one clock.
        response.headers.setdefault("Date", format_datetime(sim.now(), usegmt=True))
        return response

    return middleware


def _latency(sim: JiraSimulator) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if sim.settings.latency_seconds > 0 and request.path.startswith(("/rest/", "/secure/", "/media/")):
            await asyncio.sleep(sim.settings.latency_seconds)
        return await handler(request)

    return middleware


def _api_endpoint(request: web.Request) -> tuple[str, str] | None:
    """Name an API or download request by its method and route pattern, for the fault plan."""
    if not request.path.startswith(("/rest/", "/secure/", "/media/")):
        return None
    route = request.match_info.route.resource
    return request.method, route.canonical if route is not None else request.path


def _error_body(status: int, message: str) -> dict[str, Any]:
    return {"errorMessages": [message], "errors": {}}


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except SimError as err:
        log.info("jira_sim.request.rejected", extra={"method": request.method, "path": request.path, "status": err.status})
        body = {"errorMessages": err.messages, "errors": err.errors}
        return _json_response(body, status=err.status)


def _authenticate(sim: JiraSimulator) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith(("/rest/", "/secure/")):
            return await handler(request)

        header = request.headers.get("Authorization")
        anonymous_allowed = request.path == f"{API}/serverInfo"
        if header is None and anonymous_allowed:
            return await handler(request)

        user = _user_for(sim, header)
        if user is None:
            raise SimError(401, ["You are not authenticated: the credentials are missing or wrong."])
        request["user"] = user
        return await handler(request)

    return middleware


def _user_for(sim: JiraSimulator, header: str | None) -> SimUser | None:
    if not header:
        return None
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() == "bearer" and sim.settings.deployment == "datacenter":
        return next((user for user in sim.users if user.token and user.token == credentials), None)
    if scheme.lower() != "basic":
        return None

    try:
        login, _, secret = base64.b64decode(credentials).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    deployment = sim.settings.deployment
    for user in sim.users:
        identity = user.email if deployment == "cloud" else user.name
        expected = user.basic_auth_secret(deployment)
        if identity and login == identity and expected and secret == expected:
            return user
    return None


# Control API


class _Control:
    """`/_sim/...`: drive and inspect the simulator over HTTP."""

    def __init__(self, sim: JiraSimulator) -> None:
        self.sim = sim

    async def state(self, request: web.Request) -> web.Response:
        return _json_response(self.sim.state())

    async def calls(self, request: web.Request) -> web.Response:
        return _json_response(dict(self.sim.calls))

    async def add_user(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        try:
            user = self.sim.add_user(
                account_id=str(body["account_id"]),
                name=str(body["name"]),
                display_name=str(body.get("display_name", body["name"])),
                time_zone=str(body.get("time_zone", "UTC")),
                email=str(body.get("email", "")),
                password=str(body.get("password", "")),
                token=str(body.get("token", "")),
                api_token=str(body.get("api_token", "")),
                groups=[str(group) for group in body.get("groups", [])],
            )
        except KeyError as err:
            raise SimError(400, [f"Missing key {err.args[0]!r}."]) from None
        except ValueError as err:
            raise SimError(400, [str(err)]) from None
        return _json_response({"account_id": user.account_id, "name": user.name}, status=201)

    async def add_comment(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        try:
            comment = self.sim.add_comment(
                request.match_info["issue"],
                body.get("body"),
                author=body.get("author"),
                visibility=body.get("visibility"),
                internal=body.get("internal") is True,
            )
        except KeyError as err:
            raise SimError(400, [str(err)]) from None
        return _json_response({"id": str(comment.id)}, status=201)

    async def edit_comment(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        changes = {name: body[name] for name in ("visibility",) if name in body}
        comment = self.sim.edit_comment(request.match_info["comment"], body.get("body"), changes=changes)
        return _json_response({"id": str(comment.id), "updated": comment.updated.isoformat()})

    async def delete_comment(self, request: web.Request) -> web.Response:
        self.sim.delete_comment(request.match_info["comment"])
        return web.Response(status=204)

    async def add_attachment(self, request: web.Request) -> web.Response:
        """Attach `text` (UTF-8), `content_base64`, or `size` generated bytes under `filename`."""
        body = await _json_body(request)
        filename = body.get("filename")
        if not isinstance(filename, str) or not filename:
            raise SimError(400, [], {"filename": "Expected the file name as a non-empty string."})
        data: bytes | None = None
        if isinstance(body.get("text"), str):
            data = body["text"].encode()
        elif isinstance(body.get("content_base64"), str):
            try:
                data = base64.b64decode(body["content_base64"], validate=True)
            except binascii.Error:
                raise SimError(400, [], {"content_base64": "Expected base64 text."}) from None
        size = body.get("size")
        if data is None and not (isinstance(size, int) and not isinstance(size, bool) and size >= 0):
            raise SimError(400, ["Give the file as text, content_base64 or a size in bytes (0 or more)."])
        try:
            attachment = await asyncio.to_thread(
                self.sim.add_attachment,
                request.match_info["issue"],
                filename,
                data,
                size=None if data is not None else size,
                author=body.get("author"),
                mime_type=str(body.get("mime_type", "application/octet-stream")),
            )
        except KeyError as err:
            raise SimError(400, [str(err)]) from None
        return _json_response({"id": str(attachment.id), "size": attachment.size}, status=201)

    async def delete_attachment(self, request: web.Request) -> web.Response:
        self.sim.delete_attachment(request.match_info["attachment"])
        return web.Response(status=204)

    async def transition(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        status = body.get("status")
        if not isinstance(status, str) or not status:
            raise SimError(400, [], {"status": "Expected the target status name as a string."})
        resolution = body.get("resolution")
        issue = self.sim.transition_as_human(request.match_info["issue"], status, resolution)
        return _json_response({"key": issue.key, "status": issue.fields["status"], "resolution": issue.fields["resolution"]})

    async def edit_issue(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        issue = self.sim.edit_issue(request.match_info["issue"], body.get("fields"), body.get("update"))
        return _json_response({"key": issue.key, "updated": issue.updated.isoformat()})

    async def clock(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        seconds = body.get("advance_seconds", 0)
        is_number = isinstance(seconds, (int, float)) and not isinstance(seconds, bool)
        if not is_number or not math.isfinite(seconds) or seconds < 0:
            got = json.dumps(seconds)[:80]
            problem = f"Expected a number of seconds, 0 or more, got {got}: the clock only moves forward."
            raise SimError(400, [], {"advance_seconds": problem})
        self.sim.advance(seconds)
        return _json_response({"now": self.sim.now().isoformat()})

    async def get_settings(self, request: web.Request) -> web.Response:
        return _json_response(vars(self.sim.settings))

    async def put_settings(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        known = vars(self.sim.settings)
        unknown = sorted(set(body) - set(known))
        if unknown:
            raise SimError(400, [f"Unknown settings: {', '.join(unknown)}. Known settings: {', '.join(known)}."])
        errors = settings_errors(body)
        if errors:
            # Nothing is changed, so a request with one bad value has no effect at all.
            raise SimError(400, ["Invalid settings, nothing was changed."], errors)
        for name, value in body.items():
            setattr(self.sim.settings, name, value)
        return _json_response(vars(self.sim.settings))


    async def faults(self, request: web.Request) -> web.Response:
        """GET shows the fault plan, POST replaces it, DELETE ends every fault."""
        if request.method == "POST":
            try:
                self.sim.faults.configure(await _json_body(request))
            except ValueError as err:
                raise SimError(400, [str(err)]) from None
        elif request.method == "DELETE":
            self.sim.faults.clear()
        return _json_response(self.sim.faults.to_json())


def make_app(sim: JiraSimulator) -> web.Application:
    """Build the aiohttp application serving `sim`."""
    app = web.Application(
        middlewares=[
            _count_calls(sim),
            _latency(sim),
            fault_middleware(
                sim.faults, endpoint_of=_api_endpoint, error_body=_error_body, clock=lambda: sim.now().timestamp()
            ),
            _errors,
            _authenticate(sim),
        ]
    )
    api = _Api(sim)
    routes = [
        ("GET", "/serverInfo", api.server_info),
        ("GET", "/myself", api.myself),
        ("GET", "/field", api.fields),
        ("GET", "/priority", api.priorities),
        ("GET", "/issuetype", api.issue_types),
        ("GET", "/project", api.projects),
        ("GET", "/project/{project}", api.project),
        ("POST", "/issue", api.create_issue),
        ("GET", "/issue/{issue}", api.get_issue),
        ("PUT", "/issue/{issue}", api.edit_issue),
        ("GET", "/issue/{issue}/comment", api.list_comments),
        ("POST", "/issue/{issue}/comment", api.add_comment),
        ("GET", "/issue/{issue}/comment/{comment}", api.get_comment),
        ("PUT", "/issue/{issue}/comment/{comment}", api.edit_comment),
        ("GET", "/issue/{issue}/transitions", api.transitions),
        ("POST", "/issue/{issue}/transitions", api.do_transition),
        ("POST", "/issue/{issue}/attachments", api.add_attachments),
        ("GET", "/attachment/meta", api.attachment_meta),
        ("GET", "/attachment/content/{attachment}", api.attachment_content),
        ("GET", "/attachment/{attachment}", api.get_attachment),
        ("GET", "/user", api.get_user),
        ("GET", "/user/groups", api.user_groups),
        ("GET", "/issue/{issue}/properties", api.property_keys),
        ("GET", "/issue/{issue}/properties/{key}", api.get_property),
        ("PUT", "/issue/{issue}/properties/{key}", api.put_property),
        ("DELETE", "/issue/{issue}/properties/{key}", api.delete_property),
        ("GET", "/comment/{comment}/properties", api.property_keys),
        ("GET", "/comment/{comment}/properties/{key}", api.get_property),
        ("PUT", "/comment/{comment}/properties/{key}", api.put_property),
        ("DELETE", "/comment/{comment}/properties/{key}", api.delete_property),
        ("GET", "/search/jql", api.search_jql),
        ("POST", "/search/jql", api.search_jql),
        ("GET", "/search", api.search_classic),
        ("POST", "/search", api.search_classic),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, API + path, handler)
    app.router.add_get("/secure/attachment/{attachment}/{filename}", api.secure_attachment)
    app.router.add_get("/media/file/{attachment}/binary", api.media_content)

    control = _Control(sim)
    app.router.add_get("/_sim/state", control.state)
    app.router.add_get("/_sim/calls", control.calls)
    app.router.add_post("/_sim/users", control.add_user)
    app.router.add_post("/_sim/issues/{issue}/comments", control.add_comment)
    app.router.add_put("/_sim/comments/{comment}", control.edit_comment)
    app.router.add_delete("/_sim/comments/{comment}", control.delete_comment)
    app.router.add_post("/_sim/issues/{issue}/attachments", control.add_attachment)
    app.router.add_delete("/_sim/attachments/{attachment}", control.delete_attachment)
    app.router.add_post("/_sim/issues/{issue}/transitions", control.transition)
    app.router.add_put("/_sim/issues/{issue}", control.edit_issue)
    app.router.add_post("/_sim/clock", control.clock)
    app.router.add_get("/_sim/settings", control.get_settings)
    app.router.add_put("/_sim/settings", control.put_settings)
    app.router.add_get("/_sim/faults", control.faults)
    app.router.add_post("/_sim/faults", control.faults)
    app.router.add_delete("/_sim/faults", control.faults)
    return app


@asynccontextmanager
async def run_simulator(sim: JiraSimulator, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Serve `sim` on a loopback address and yield its base URL, where port 0 picks a free port.

    When the server stops, the simulator's attachment files are removed.
    """
    try:
        async with serve_on_loopback(make_app(sim), host, port) as url:
            yield url
    finally:
        sim.close()


async def serve(
    host: str = "127.0.0.1", port: int = 8089, sim: JiraSimulator | None = None, faults: FaultSettings | None = None
) -> None:
    """Run a simulator until SIGINT, SIGTERM or cancellation; used by `mdr-connector simulate jira`.

    `faults` becomes the fault plan. On each stop the simulator logs it and removes its attachment folder.
    """
    running = sim or JiraSimulator()
    if faults is not None:
        running.faults.configure(faults)
    await run_until_signal(lambda stop: _serve_until(running, host, port, stop))


async def _serve_until(sim: JiraSimulator, host: str, port: int, stop: asyncio.Event) -> None:
    async with run_simulator(sim, host, port) as url:
        if sim.settings.deployment == "cloud":
            auth = [
                "  auth: {type: api_token, email: " + SERVICE_EMAIL + ", token: {env: JIRA_API_TOKEN}}",
                f"  and set JIRA_API_TOKEN={SERVICE_TOKEN}",
                "  After a switch to Data Center (PUT /_sim/settings with {\"deployment\": \"datacenter\"}):",
                f"  auth: {{type: pat, token: {{env: JIRA_PAT}}}} and set JIRA_PAT={SERVICE_PAT}",
                f"  (or basic auth: user name {SERVICE_NAME}, password {SERVICE_PASSWORD})",
            ]
        else:
            auth = [
                "  auth: {type: pat, token: {env: JIRA_PAT}}",
                f"  and set JIRA_PAT={SERVICE_PAT}",
                f"  (or basic auth: user name {SERVICE_NAME}, password {SERVICE_PASSWORD})",
            ]
        projects = [
            f"Project key {key} ({name}), issue types {', '.join(issue_types)}"
            for key, (name, issue_types) in sim.projects.items()
        ]
        example_key = next(iter(sim.projects), "SEC")
        lines = [
            f"Jira simulator ({'Cloud' if sim.settings.deployment == 'cloud' else 'Data Center'}) running at {url}",
            "Settings for the ticket section of a connection in config.yaml:",
            "  system: jira",
            f"  url: {url}",
            *auth,
            *projects,
            f"Priorities: {', '.join(sim.priorities)}",
            f"The human user {HUMAN_NAME} writes the comments that the connector copies to MDR, for example:",
            f"  curl -s -X POST {url}/_sim/issues/{example_key}-1/comments -H 'Content-Type: application/json' "
            f"""-d '{{"body": "Checked the host.", "author": "{HUMAN_NAME}"}}'""",
            f"Control API under {url}/_sim/: see docs/simulators.md",
            "Stop with Ctrl-C.",
        ]
        print("\n".join(lines), flush=True)
        log.info(
            "jira_sim.started",
            extra={"url": url, "deployment": sim.settings.deployment, "service_login": SERVICE_EMAIL},
        )
        try:
            await stop.wait()
        finally:
            log.info("jira_sim.stopped", extra={"url": url})
