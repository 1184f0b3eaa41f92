"""A ServiceNow simulator: the Table, Attachment and OAuth calls of a real instance, kept in memory.

It serves `/api/now/table/{table}` (also under `/api/now/v1/` and
`/api/now/v2/`, where an empty list read is 404 on v1 and 200 with `[]`
otherwise), `/api/now/attachment/...` and `/oauth_token.do`, with JSON
wrapped in `{"result": ...}` and ServiceNow's error bodies. It checks Basic
credentials and Bearer tokens from the client credentials grant. The ticket
table is named at creation (`incident` by default), and the tables
sys_journal_field, sys_user, sys_user_group, sys_user_grmember, sys_choice
and sys_attachment can be read. Tests drive it in-process, and `serve`
runs it on its own.

    sim = ServiceNowSimulator()
    async with run_simulator(sim) as base_url:
        ...  # point the connector at base_url with SERVICE_USER / SERVICE_PASSWORD
        sim.add_human_comment("INC0010001", "Checked the host.")

Besides the REST API it serves a control API under `/_sim/` with no
authentication, so it only ever listens on a loopback address.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from email.utils import format_datetime
from typing import Any

from aiohttp import BodyPartReader, web

from mdr_connector.adapters.faults import FaultSettings, download_cut_bytes, fault_middleware
from mdr_connector.adapters.loopback import run_until_signal, serve_on_loopback, write_file_body
from mdr_connector.adapters.servicenow.simulator_files import CHUNK_BYTES, SimAttachment, SpoolWriter
from mdr_connector.adapters.servicenow.simulator_schema import ATTACHMENT_TABLE, Row, SimTable
from mdr_connector.adapters.servicenow.simulator_state import (
    HUMAN_PASSWORD,
    HUMAN_USER,
    OAUTH_CLIENT_ID,
    OAUTH_CLIENT_SECRET,
    SERVICE_PASSWORD,
    SERVICE_USER,
    ServiceNowSimulator,
    SimError,
    SimUser,
    parse_time,
    settings_errors,
)

__all__ = [
    "HUMAN_PASSWORD",
    "HUMAN_USER",
    "OAUTH_CLIENT_ID",
    "OAUTH_CLIENT_SECRET",
    "SERVICE_PASSWORD",
    "SERVICE_USER",
    "ServiceNowSimulator",
    "SimError",
    "make_app",
    "run_simulator",
    "serve",
]

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

API = "/api/now"
TOKEN_PATH = "/oauth_token.do"
DEFAULT_TABLE_LIMIT = 10000
DEFAULT_ATTACHMENT_LIMIT = 1000
# Signals that stop `serve` cleanly: Ctrl-C, and the stop request of a service manager or container runtime.


def _json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(body, status=status, headers=headers, dumps=_json_text)


def _json_text(body: Any) -> str:
    """Encode JSON with characters as they are, or with `\\u` escapes when UTF-8 cannot carry them (a lone surrogate)."""
    text = json.dumps(body, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(body)
    return text


@dataclass(frozen=True)
class ReadOptions:
    """Rendering options of a read: `sysparm_fields`, `sysparm_display_value` and `sysparm_exclude_reference_link`."""

    fields: tuple[str, ...] | None
    display: str
    exclude_links: bool

    @classmethod
    def of(cls, request: web.Request) -> ReadOptions:
        names = [name.strip() for name in request.query.get("sysparm_fields", "").split(",") if name.strip()]
        display = request.query.get("sysparm_display_value", "false").lower()
        return cls(
            fields=tuple(names) if names else None,
            display=display if display in ("true", "all") else "false",
            exclude_links=_flag(request, "sysparm_exclude_reference_link"),
        )


# HTTP layer


class _Api:
    """Request handlers: translate REST calls into simulator operations and JSON replies."""

    def __init__(self, sim: ServiceNowSimulator) -> None:
        self.sim = sim

    def base(self, request: web.Request) -> str:
        return str(request.url.origin())

    # Records

    def render(self, request: web.Request, table: SimTable, row: Row, options: ReadOptions) -> dict[str, Any]:
        """Render a row as the Table API does; names in `sysparm_fields` that the table lacks are left out."""
        user: SimUser = request["user"]
        names = options.fields if options.fields is not None else tuple(table.fields)
        result: dict[str, Any] = {}
        for name in names:
            spec = self.sim.spec(table, name)
            if spec is None:
                continue
            value = self.sim.value_of(table, row, name)
            display = self.sim.display_value(table, row, name, user) if options.display != "false" else ""
            if spec.kind == "reference" and "." not in name:
                result[name] = self.reference_json(request, spec.reference, value, display, options)
            elif options.display == "all":
                result[name] = {"display_value": display, "value": value}
            else:
                result[name] = display if options.display == "true" else value
        return result

    def reference_json(self, request: web.Request, target: str, value: str, display: str, options: ReadOptions) -> Any:
        """Render a reference: `{"link", "value"}` by default, without the link when excluded or empty."""
        if options.exclude_links or not value:
            if options.display == "all":
                return {"display_value": display, "value": value}
            return display if options.display == "true" else value
        link = f"{self.base(request)}{API}/table/{target}/{value}"
        if options.display == "all":
            return {"display_value": display, "link": link, "value": value}
        if options.display == "true":
            return {"display_value": display, "link": link}
        return {"link": link, "value": value}

    async def list_records(self, request: web.Request) -> web.Response:
        table = self.sim.table_of(request.match_info["table"])
        limit = _int_param(request, "sysparm_limit", DEFAULT_TABLE_LIMIT)
        offset = _int_param(request, "sysparm_offset", 0)
        options = ReadOptions.of(request)

        result = self.sim.select(table, request["user"], request.query.get("sysparm_query", ""), limit, offset)
        if not result.rows and request.match_info.get("version") == "v1":
            raise SimError(404, "No Record found", "Records matching query not found. Check query parameter or offset parameter")

        headers: dict[str, str] = {}
        count_known = not _flag(request, "sysparm_no_count")
        if count_known:
            headers["X-Total-Count"] = str(result.total)
        if not _flag(request, "sysparm_suppress_pagination_header"):
            if count_known:
                has_next = offset + result.fetched < result.total
            else:
                # Without a count, a full page is the only sign that more rows may follow.
                has_next = limit > 0 and result.fetched == limit
            headers["Link"] = _page_links(request, offset, limit, result.total if count_known else None, has_next)
        body = {"result": [self.render(request, table, row, options) for row in result.rows]}
        return _json_response(body, headers=headers)

    async def get_record(self, request: web.Request) -> web.Response:
        table = self.sim.table_of(request.match_info["table"])
        row = self.sim.record(table, request.match_info["sys_id"], request["user"])
        return _json_response({"result": self.render(request, table, row, ReadOptions.of(request))})

    async def create_record(self, request: web.Request) -> web.Response:
        table = self.sim.table_of(request.match_info["table"])
        body = await _json_body(request)
        row = self.sim.insert(table, body, request["user"], input_display=_flag(request, "sysparm_input_display_value"))
        headers = {"Location": f"{self.base(request)}{API}/table/{table.name}/{row['sys_id']}"}
        if _no_response_body(request):
            return web.Response(status=201, headers=headers)
        return _json_response({"result": self.render(request, table, row, ReadOptions.of(request))}, status=201, headers=headers)

    async def update_record(self, request: web.Request) -> web.Response:
        table = self.sim.table_of(request.match_info["table"])
        body = await _json_body(request)
        row = self.sim.update(
            table, request.match_info["sys_id"], body, request["user"], input_display=_flag(request, "sysparm_input_display_value")
        )
        if _no_response_body(request):
            return web.Response(status=204)
        return _json_response({"result": self.render(request, table, row, ReadOptions.of(request))})

    async def delete_record(self, request: web.Request) -> web.Response:
        table = self.sim.table_of(request.match_info["table"])
        self.sim.delete(table, request.match_info["sys_id"], request["user"])
        return web.Response(status=204)

    # Attachments

    def attachment_json(self, request: web.Request, attachment: SimAttachment) -> dict[str, Any]:
        return {**attachment.record, "download_link": f"{self.base(request)}{API}/attachment/{attachment.sys_id}/file"}

    async def list_attachments(self, request: web.Request) -> web.Response:
        table = self.sim.tables[ATTACHMENT_TABLE]
        limit = _int_param(request, "sysparm_limit", DEFAULT_ATTACHMENT_LIMIT)
        offset = _int_param(request, "sysparm_offset", 0)
        result = self.sim.select(table, request["user"], request.query.get("sysparm_query", ""), limit, offset)
        attachments = [self.sim.attachment(row["sys_id"]) for row in result.rows]
        return _json_response({"result": [self.attachment_json(request, item) for item in attachments]})

    async def get_attachment(self, request: web.Request) -> web.Response:
        attachment = self.sim.attachment(request.match_info["sys_id"], request["user"])
        return _json_response({"result": self.attachment_json(request, attachment)})

    async def delete_attachment(self, request: web.Request) -> web.Response:
        attachment = self.sim.attachment(request.match_info["sys_id"], request["user"])
        self.sim.delete_attachment(attachment.sys_id)
        return web.Response(status=204)

    async def attachment_file(self, request: web.Request) -> web.StreamResponse:
        """Stream the bytes with their metadata in `X-Attachment-Metadata`, cut off after `download_cut_bytes` when above 0."""
        attachment = self.sim.attachment(request.match_info["sys_id"], request["user"])
        response = web.StreamResponse(
            headers={
                "Content-Type": attachment.record["content_type"] or "application/octet-stream",
                "Content-Length": str(attachment.path.stat().st_size),
                "X-Attachment-Metadata": json.dumps(self.attachment_json(request, attachment)),
            }
        )
        await response.prepare(request)
        cut = download_cut_bytes(request, attachment.path.stat().st_size) or self.sim.settings.download_cut_bytes
        if await write_file_body(request, response, attachment.path, cut, CHUNK_BYTES):
            log.info("servicenow_sim.download.cut", extra={"attachment_id": attachment.sys_id, "bytes": cut})
        return response

    async def upload_file(self, request: web.Request) -> web.Response:
        """POST attachment/file: the request body is the file, its Content-Type is the file's media type."""
        user: SimUser = request["user"]
        try:
            missing = [name for name in ("table_name", "table_sys_id", "file_name") if not request.query.get(name)]
            if missing:
                raise SimError(400, "Invalid request", f"Missing required query parameters: {', '.join(missing)}")
            if "Content-Type" not in request.headers:
                raise SimError(400, "Invalid request", "The Content-Type header is mandatory: send the file's media type")
            table = self.sim.attachment_target(request.query["table_name"], request.query["table_sys_id"], user)
        except SimError:
            await _drain(request.content)
            raise

        writer = SpoolWriter(self.sim.new_attachment_path(), self.sim.settings.attachment_max_bytes)
        try:
            async for chunk in request.content.iter_chunked(CHUNK_BYTES):
                writer.write(chunk)
        except BaseException:
            writer.discard()
            raise
        attachment = self.finish_upload(
            writer, table, request.query["table_sys_id"], request.query["file_name"], request.headers["Content-Type"], user
        )
        headers = {"Location": f"{self.base(request)}{API}/attachment/{attachment.sys_id}"}
        return _json_response({"result": self.attachment_json(request, attachment)}, status=201, headers=headers)

    async def upload_multipart(self, request: web.Request) -> web.Response:
        """POST attachment/upload: form fields `table_name` and `table_sys_id` first, the file part last."""
        user: SimUser = request["user"]
        if request.content_type != "multipart/form-data":
            await _drain(request.content)
            raise SimError(400, "Invalid request", f"Expected multipart/form-data, got {request.content_type!r}")

        reader = await request.multipart()
        form: dict[str, str] = {}
        attachment: SimAttachment | None = None
        try:
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    raise SimError(400, "Invalid request", "Nested multipart bodies are not supported")
                if attachment is not None:
                    # NOTE: the documentation requires the file part last, but not what a real instance does with more parts.
                    raise SimError(400, "Invalid request", "The file part must be the last part of the form")
                if part.filename is None:
                    form[part.name or ""] = await part.text()
                    continue
                attachment = await self.receive_part(part, form, user)
            if attachment is None:
                raise SimError(400, "Invalid request", "The form has no file part")
        except SimError:
            if attachment is not None:
                self.sim.delete_attachment(attachment.sys_id)
            await _drain(request.content)
            raise
        headers = {"Location": f"{self.base(request)}{API}/attachment/{attachment.sys_id}"}
        return _json_response({"result": self.attachment_json(request, attachment)}, status=201, headers=headers)

    async def receive_part(self, part: BodyPartReader, form: dict[str, str], user: SimUser) -> SimAttachment:
        """Store the file part of a multipart upload after checking the form fields sent before it."""
        missing = [name for name in ("table_name", "table_sys_id") if not form.get(name)]
        content_type = part.headers.get("Content-Type")
        if missing:
            raise SimError(400, "Invalid request", f"Missing form fields before the file part: {', '.join(missing)}")
        if not content_type:
            raise SimError(400, "Invalid request", "The file part needs its own Content-Type header")
        table = self.sim.attachment_target(form["table_name"], form["table_sys_id"], user)

        writer = SpoolWriter(self.sim.new_attachment_path(), self.sim.settings.attachment_max_bytes)
        try:
            while chunk := await part.read_chunk(CHUNK_BYTES):
                writer.write(chunk)
        except BaseException:
            writer.discard()
            raise
        return self.finish_upload(writer, table, form["table_sys_id"], part.filename or "", content_type, user)

    def finish_upload(
        self, writer: SpoolWriter, table: SimTable, table_sys_id: str, file_name: str, content_type: str, user: SimUser
    ) -> SimAttachment:
        """Register a received file, or reject it when it is over com.glide.attachment.max_size."""
        if writer.too_large:
            writer.discard()
            log.info("servicenow_sim.attachment.too_large", extra={"bytes": writer.size, "limit": writer.max_bytes})
            # NOTE: the status and wording of a real instance's rejection of an oversized file are not documented.
            raise SimError(400, "Failed to create the attachment. File part might be too large.", f"The file has {writer.size} bytes, more than the limit of {writer.max_bytes}")
        writer.close()
        return self.sim.register_attachment(table, table_sys_id, file_name, content_type, writer.path, writer.size, writer.sha256, user)

    # OAuth

    async def token(self, request: web.Request) -> web.Response:
        """POST oauth_token.do: the client credentials grant, with the client in the form or in Basic credentials."""
        form = await request.post()
        grant_type = str(form.get("grant_type", ""))
        client_id, client_secret = str(form.get("client_id", "")), str(form.get("client_secret", ""))
        if not client_id:
            client_id, client_secret = _basic_credentials(request.headers.get("Authorization")) or ("", "")
        if grant_type != "client_credentials":
            log.info("servicenow_sim.token.rejected", extra={"client_id": client_id, "grant_type": grant_type})
            body = {"error": "unsupported_grant_type", "error_description": f"The simulator grants client_credentials only, got {grant_type!r}"}
            return _json_response(body, status=400)
        try:
            token, lifetime = self.sim.issue_token(client_id, client_secret)
        except SimError:
            log.info("servicenow_sim.token.rejected", extra={"client_id": client_id})
            return _json_response({"error_description": "access_denied", "error": "server_error"}, status=401)
        scope = str(form.get("scope", "")) or "useraccount"
        return _json_response({"access_token": token, "scope": scope, "token_type": "Bearer", "expires_in": lifetime})


def _page_links(request: web.Request, offset: int, limit: int, total: int | None, has_next: bool) -> str:
    """Build the Link header: first, prev, next and last pages, as URLs with the request's other parameters."""

    def url(page_offset: int) -> str:
        query = {**request.query, "sysparm_offset": str(page_offset), "sysparm_limit": str(limit)}
        return str(request.url.with_query(query))

    links = [(0, "first")]
    if offset > 0 and limit > 0:
        links.append((max(offset - limit, 0), "prev"))
    if has_next:
        links.append((offset + limit, "next"))
    if total is not None:
        links.append((((total - 1) // limit) * limit if total > 0 and limit > 0 else 0, "last"))
    return ",".join(f'<{url(page_offset)}>;rel="{rel}"' for page_offset, rel in links)


def _flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "").lower() == "true"


def _no_response_body(request: web.Request) -> bool:
    return request.headers.get("X-no-response-body", "").lower() == "true"


def _int_param(request: web.Request, name: str, default: int) -> int:
    raw = request.query.get(name, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SimError(400, "Invalid value", f"{name} must be a whole number, got {raw[:40]!r}") from None
    if value < 0:
        raise SimError(400, "Invalid value", f"{name} must not be negative, got {value}")
    return value


async def _json_body(request: web.Request) -> Any:
    text = await request.text()
    if not text.strip():
        return {}
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise SimError(400, "Exception while reading request", "The payload is not valid JSON.") from None


async def _drain(stream: Any) -> None:
    """Read the rest of a request body and drop it, so the client gets the error reply instead of a reset connection."""
    while await stream.read(CHUNK_BYTES):
        pass


def _basic_credentials(header: str | None) -> tuple[str, str] | None:
    scheme, _, credentials = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        login, _, secret = base64.b64decode(credentials, validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return login, secret


# Middlewares, outermost first: count, latency, errors, authentication, rate limit, the fault plan.


def _count_calls(sim: ServiceNowSimulator) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.resource
        path = route.canonical if route is not None else "<unmatched>"
        sim.calls[f"{request.method} {path}"] += 1
        response = await handler(request)
        # The Date header follows the simulator's clock, as a real server's Date and sys_updated_on come from one clock.
        response.headers.setdefault("Date", format_datetime(sim.now(), usegmt=True))
        return response

    return middleware


def _latency(sim: ServiceNowSimulator) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if sim.settings.latency_seconds > 0 and _is_api(request):
            await asyncio.sleep(sim.settings.latency_seconds)
        return await handler(request)

    return middleware


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except SimError as err:
        log.info("servicenow_sim.request.rejected", extra={"method": request.method, "path": request.path, "status": err.status})
        return _json_response(err.body(), status=err.status, headers=err.headers)
    except web.HTTPNotFound:
        if not request.path.startswith("/api/"):
            raise
        log.info("servicenow_sim.request.unknown_path", extra={"method": request.method, "path": request.path})
        error = SimError(400, "Requested URI does not represent any resource")
        return _json_response(error.body(), status=error.status)
    except web.HTTPMethodNotAllowed:
        if not request.path.startswith("/api/"):
            raise
        log.info("servicenow_sim.request.unknown_method", extra={"method": request.method, "path": request.path})
        error = SimError(405, "Method not Supported", f"{request.method} is not supported for {request.path}")
        return _json_response(error.body(), status=error.status)


def _authenticate(sim: ServiceNowSimulator) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/api/"):
            return await handler(request)
        user = _user_for(sim, request.headers.get("Authorization"))
        if user is None:
            raise SimError(401, "User Not Authenticated", "Required to provide Auth information")
        request["user"] = user
        return await handler(request)

    return middleware


def _user_for(sim: ServiceNowSimulator, header: str | None) -> SimUser | None:
    scheme, _, credentials = (header or "").partition(" ")
    if scheme.lower() == "bearer":
        return sim.user_for_token(credentials.strip())
    basic = _basic_credentials(header)
    return sim.user_for_basic(*basic) if basic else None


def _rate_limit(sim: ServiceNowSimulator) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Reject authenticated API calls with 429 while `limit_rate` has calls left, as an inbound rate limit rule does."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        limit = sim.rate_limit
        if limit.remaining <= 0 or not request.path.startswith("/api/"):
            return await handler(request)
        limit.remaining -= 1
        reset = int(sim.now().timestamp()) + limit.retry_after_seconds
        headers = {
            "Retry-After": str(limit.retry_after_seconds),
            "X-RateLimit-Limit": "1000",
            "X-RateLimit-Reset": str(reset),
            "X-RateLimit-Rule": limit.rule_sys_id,
        }
        user: SimUser = request["user"]
        detail = f"The inbound REST rate limit for {user.user_name} is exhausted; retry after {limit.retry_after_seconds} seconds"
        raise SimError(429, "Rate limit exceeded", detail, headers)

    return middleware


def _api_endpoint(request: web.Request) -> tuple[str, str] | None:
    """Name an API request by its method and route pattern, for the fault plan."""
    if not _is_api(request):
        return None
    route = request.match_info.route.resource
    return request.method, route.canonical if route is not None else request.path


def _error_body(status: int, message: str) -> dict[str, Any]:
    return SimError(status, message).body()


def _is_api(request: web.Request) -> bool:
    return request.path.startswith("/api/") or request.path == TOKEN_PATH


# Control API


class _Control:
    """`/_sim/...`: drive and inspect the simulator over HTTP, acting as the human user unless a body names another."""

    def __init__(self, sim: ServiceNowSimulator) -> None:
        self.sim = sim

    async def state(self, request: web.Request) -> web.Response:
        return _json_response(self.sim.state())

    async def calls(self, request: web.Request) -> web.Response:
        return _json_response(dict(self.sim.calls))

    async def seed_incidents(self, request: web.Request) -> web.Response:
        """Create `count` incidents (default 1) from the body's fields; `hidden`, `author` and `sys_created_on` are options."""
        body = await _control_body(request)
        count = body.pop("count", 1)
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 1000:
            raise SimError(400, "Invalid value", f"count must be an integer from 1 to 1000, got {json.dumps(count)[:40]}")
        hidden = _bool_option(body, "hidden")
        author = self.author(body)
        created_on = body.pop("sys_created_on", None)
        if created_on is not None:
            try:
                parse_time(str(created_on))
            except ValueError:
                raise SimError(400, "Invalid value", f"sys_created_on must be YYYY-MM-DD HH:MM:SS in UTC, got {created_on!r}") from None

        rows = [
            self.sim.create_incident(body, author=author, hidden=hidden, created_on=created_on)
            for _ in range(count)
        ]
        return _json_response({"incidents": [dict(row) for row in rows]}, status=201)

    async def edit_incident(self, request: web.Request) -> web.Response:
        """Change an incident as a person would; `hidden` shows or hides it behind the service user's read ACL."""
        body = await _control_body(request)
        row = self.sim.incident(request.match_info["incident"])
        if "hidden" in body:
            self.sim.set_hidden(row["sys_id"], _bool_option(body, "hidden"))
        author = self.author(body)
        if body:
            row = self.sim.update_incident(row["sys_id"], body, author=author)
        return _json_response({**row, "hidden": row["sys_id"] in self.sim.hidden})

    async def add_journal(self, request: web.Request) -> web.Response:
        body = await _control_body(request)
        element = body.get("element", "comments")
        value = body.get("value")
        if element not in ("comments", "work_notes"):
            raise SimError(400, "Invalid value", f"element must be comments or work_notes, got {json.dumps(element)[:40]}")
        if not isinstance(value, str) or not value:
            raise SimError(400, "Invalid value", "value must be the entry's text, a non-empty string")
        entry = self.sim.add_human_comment(request.match_info["incident"], value, element, author=self.author(body))
        return _json_response(entry, status=201)

    async def add_attachment(self, request: web.Request) -> web.Response:
        """Attach `text` (UTF-8), `content_base64`, or `size` generated bytes under `file_name`."""
        body = await _control_body(request)
        file_name = body.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            raise SimError(400, "Invalid value", "file_name must be a non-empty string")
        data: bytes | None = None
        if isinstance(body.get("text"), str):
            data = body["text"].encode()
        elif isinstance(body.get("content_base64"), str):
            try:
                data = base64.b64decode(body["content_base64"], validate=True)
            except binascii.Error:
                raise SimError(400, "Invalid value", "content_base64 is not base64 text") from None
        size = body.get("size")
        if data is None and not (isinstance(size, int) and not isinstance(size, bool) and size >= 0):
            raise SimError(400, "Invalid value", "Give the file as text, content_base64 or a size in bytes (0 or more)")
        attachment = await asyncio.to_thread(
            self.sim.add_attachment,
            request.match_info["incident"],
            file_name,
            data,
            size=None if data is not None else size,
            content_type=str(body.get("content_type", "application/octet-stream")),
            author=self.author(body),
        )
        return _json_response(dict(attachment.record), status=201)

    async def delete_attachment(self, request: web.Request) -> web.Response:
        self.sim.delete_attachment(request.match_info["attachment"])
        return web.Response(status=204)

    async def edit_user(self, request: web.Request) -> web.Response:
        body = await _control_body(request)
        try:
            user = self.sim.user(request.match_info["user"])
        except KeyError as err:
            raise SimError(404, "No Record found", str(err)) from None
        roles = body.get("roles")
        if roles is not None and not (isinstance(roles, list) and all(isinstance(role, str) for role in roles)):
            raise SimError(400, "Invalid value", "roles must be a list of role names")
        for name in ("time_zone", "password"):
            if body.get(name) is not None and not isinstance(body[name], str):
                raise SimError(400, "Invalid value", f"{name} must be a string")
        try:
            self.sim.update_user(user, roles=roles, time_zone=body.get("time_zone"), password=body.get("password"))
        except ValueError as err:
            raise SimError(400, "Invalid value", str(err)) from None
        return _json_response({**user.row(), "roles": list(user.roles)})

    async def clock(self, request: web.Request) -> web.Response:
        body = await _control_body(request)
        seconds = body.get("advance_seconds", 0)
        if not _is_number(seconds) or seconds < 0:
            raise SimError(400, "Invalid value", f"advance_seconds must be a number, 0 or more, got {json.dumps(seconds)[:80]}: the clock only moves forward")
        self.sim.advance(seconds)
        return _json_response({"now": self.sim.now_text()})

    async def rate_limit(self, request: web.Request) -> web.Response:
        body = await _control_body(request)
        calls, retry_after = body.get("calls"), body.get("retry_after_seconds", 60)
        for name, value in (("calls", calls), ("retry_after_seconds", retry_after)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise SimError(400, "Invalid value", f"{name} must be an integer, 0 or more, got {json.dumps(value)[:40]}")
        self.sim.limit_rate(calls, retry_after)
        return _json_response({"remaining": calls, "retry_after_seconds": retry_after})

    async def drop_reply(self, request: web.Request) -> web.Response:
        body = await _control_body(request)
        method, path, times = body.get("method"), body.get("path"), body.get("times", 1)
        if not isinstance(method, str) or not isinstance(path, str) or not path.startswith("/"):
            raise SimError(400, "Invalid value", "method and path (a route pattern such as /api/now/table/{table}) are required")
        if not isinstance(times, int) or isinstance(times, bool) or times < 1:
            raise SimError(400, "Invalid value", f"times must be an integer of at least 1, got {json.dumps(times)[:40]}")
        self.sim.drop_reply_after_commit(method, path, times)
        return _json_response({"method": method.upper(), "path": path, "remaining": times})

    async def faults(self, request: web.Request) -> web.Response:
        """GET shows the fault plan, POST replaces it, DELETE ends every fault."""
        if request.method == "POST":
            try:
                self.sim.faults.configure(await _control_body(request))
            except ValueError as err:
                raise SimError(400, "Invalid value", str(err)) from None
        elif request.method == "DELETE":
            self.sim.faults.clear()
        return _json_response(self.sim.faults.to_json())

    async def reset(self, request: web.Request) -> web.Response:
        self.sim.reset()
        return _json_response({"now": self.sim.now_text()})

    async def get_settings(self, request: web.Request) -> web.Response:
        return _json_response(vars(self.sim.settings))

    async def put_settings(self, request: web.Request) -> web.Response:
        body = await _control_body(request)
        errors = settings_errors(body)
        if errors:
            # Nothing is changed, so a request with one bad value has no effect at all.
            detail = "; ".join(f"{name}: {problem}" for name, problem in errors.items())
            raise SimError(400, "Invalid settings, nothing was changed", detail)
        for name, value in body.items():
            setattr(self.sim.settings, name, value)
        return _json_response(vars(self.sim.settings))

    def author(self, body: dict[str, Any]) -> str:
        author = body.pop("author", HUMAN_USER)
        try:
            return self.sim.user(str(author)).user_name
        except KeyError:
            raise SimError(400, "Invalid value", f"author {author!r} is not a simulated user") from None


async def _control_body(request: web.Request) -> dict[str, Any]:
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise SimError(400, "Exception while reading request", "The request body must be a JSON object.")
    return body


def _bool_option(body: dict[str, Any], name: str) -> bool:
    value = body.pop(name, False)
    if not isinstance(value, bool):
        raise SimError(400, "Invalid value", f"{name} must be true or false, got {json.dumps(value)[:40]}")
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def make_app(sim: ServiceNowSimulator) -> web.Application:
    """Build the aiohttp application serving `sim`."""
    app = web.Application(
        middlewares=[
            _count_calls(sim),
            _latency(sim),
            _errors,
            _authenticate(sim),
            _rate_limit(sim),
            fault_middleware(
                sim.faults, endpoint_of=_api_endpoint, error_body=_error_body, clock=lambda: sim.now().timestamp()
            ),
        ]
    )
    api = _Api(sim)
    for prefix in (API, API + "/{version:v1|v2}"):
        app.router.add_get(prefix + "/table/{table}", api.list_records)
        app.router.add_post(prefix + "/table/{table}", api.create_record)
        app.router.add_get(prefix + "/table/{table}/{sys_id}", api.get_record)
        app.router.add_patch(prefix + "/table/{table}/{sys_id}", api.update_record)
        app.router.add_put(prefix + "/table/{table}/{sys_id}", api.update_record)
        app.router.add_delete(prefix + "/table/{table}/{sys_id}", api.delete_record)
    for prefix in (API, API + "/v1"):
        app.router.add_get(prefix + "/attachment", api.list_attachments)
        app.router.add_post(prefix + "/attachment/file", api.upload_file)
        app.router.add_post(prefix + "/attachment/upload", api.upload_multipart)
        app.router.add_get(prefix + "/attachment/{sys_id}", api.get_attachment)
        app.router.add_delete(prefix + "/attachment/{sys_id}", api.delete_attachment)
        app.router.add_get(prefix + "/attachment/{sys_id}/file", api.attachment_file)
    app.router.add_post(TOKEN_PATH, api.token)

    control = _Control(sim)
    app.router.add_get("/_sim/state", control.state)
    app.router.add_get("/_sim/calls", control.calls)
    app.router.add_post("/_sim/incidents", control.seed_incidents)
    app.router.add_patch("/_sim/incidents/{incident}", control.edit_incident)
    app.router.add_post("/_sim/incidents/{incident}/journal", control.add_journal)
    app.router.add_post("/_sim/incidents/{incident}/attachments", control.add_attachment)
    app.router.add_delete("/_sim/attachments/{attachment}", control.delete_attachment)
    app.router.add_put("/_sim/users/{user}", control.edit_user)
    app.router.add_post("/_sim/clock", control.clock)
    app.router.add_post("/_sim/rate-limit", control.rate_limit)
    app.router.add_post("/_sim/faults/drop-reply", control.drop_reply)
    app.router.add_post("/_sim/reset", control.reset)
    app.router.add_get("/_sim/settings", control.get_settings)
    app.router.add_put("/_sim/settings", control.put_settings)
    app.router.add_get("/_sim/faults", control.faults)
    app.router.add_post("/_sim/faults", control.faults)
    app.router.add_delete("/_sim/faults", control.faults)
    return app


@asynccontextmanager
async def run_simulator(sim: ServiceNowSimulator, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Serve `sim` on a loopback address and yield its base URL, where port 0 picks a free port.

    When the server stops, the simulator's attachment files are removed.
    """
    try:
        async with serve_on_loopback(make_app(sim), host, port) as url:
            yield url
    finally:
        sim.close()


async def serve(
    host: str = "127.0.0.1", port: int = 8090, sim: ServiceNowSimulator | None = None, faults: FaultSettings | None = None
) -> None:
    """Run a simulator until SIGINT, SIGTERM or cancellation; for `mdr-connector simulate servicenow`.

    `faults` becomes the fault plan. On each stop the simulator logs it and removes its attachment folder.
    """
    running = sim or ServiceNowSimulator()
    if faults is not None:
        running.faults.configure(faults)
    await run_until_signal(lambda stop: _serve_until(running, host, port, stop))


async def _serve_until(sim: ServiceNowSimulator, host: str, port: int, stop: asyncio.Event) -> None:
    async with run_simulator(sim, host, port) as url:
        lines = [
            f"ServiceNow simulator running at {url}",
            "Settings for the ticket section of a connection in config.yaml:",
            "  system: servicenow",
            f"  url: {url}",
            f"  table: {sim.table}",
            f"  auth: {{type: basic, username: {SERVICE_USER}, password: {{env: SERVICENOW_PASSWORD}}}}",
            f"  and set SERVICENOW_PASSWORD={SERVICE_PASSWORD}",
            f"  or OAuth: auth: {{type: oauth_client_credentials, client_id: {OAUTH_CLIENT_ID}, "
            f"client_secret: {{env: SERVICENOW_CLIENT_SECRET}}, username: {SERVICE_USER}}}",
            f"  and set SERVICENOW_CLIENT_SECRET={OAUTH_CLIENT_SECRET}",
            f"The human user {HUMAN_USER} (password {HUMAN_PASSWORD}) writes the comments that the connector copies to MDR, for example:",
            f"  curl -s -X POST {url}/_sim/incidents/INC0010001/journal -H 'Content-Type: application/json' "
            """-d '{"element": "comments", "value": "Checked the host."}'""",
            f"Control API under {url}/_sim/: see docs/simulators.md",
            "Stop with Ctrl-C.",
        ]
        print("\n".join(lines), flush=True)
        log.info("servicenow_sim.started", extra={"url": url, "table": sim.table, "service_login": SERVICE_USER})
        try:
            await stop.wait()
        finally:
            log.info("servicenow_sim.stopped", extra={"url": url})
