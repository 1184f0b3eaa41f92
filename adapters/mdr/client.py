"""The Kaspersky MDR API client.

Every method is a POST of a JSON body to `{base_url}/{client_id}/{path}`,
reads included. Replies are mapped onto the connector's error tree here,
so callers never see aiohttp exceptions:

    401, 403            refresh the token once and retry once, then CredentialsRejectedError
                        (TokenExpiredError when the refresh itself is refused)
    429                 pause every call of this client for Retry-After (at least 1 s) and
                        send again, up to 3 sends (`RateGate`); then, or for a pause of
                        more than 60 s, RateLimitedError with the pause in seconds
    503 + Retry-After   as 429, but a write is not sent again
    other 5xx           RemoteUnavailableError; OutcomeUnknownError for a write
    404                 RejectedError that names mdr.base_url and mdr.client_id to check
    413                 RejectedError: the uploaded file is larger than MDR accepts
    3xx, other 4xx      RejectedError with the status (redirects are never followed)
    timeout, dropped    RemoteUnavailableError before the request was sent,
    connection          OutcomeUnknownError for a write that may have been sent
    TLS certificate     RemoteUnavailableError naming the reason and the fix (`ca_bundle`)
    not verified
    non-JSON reply      RemoteUnavailableError; OutcomeUnknownError for a write
    malformed record    InvalidPayloadError; in a list, one bad record is returned
                        in IncidentPage.malformed and the rest of the page is kept

The client does not retry anything else: the engine owns the other retries.

Attachments move as streams in both directions, so a file is never held
whole in memory: `download_attachment` writes the reply body to disk in
chunks and `upload_attachment` sends the file from disk as multipart/form-data.
A transfer has no total time limit, because its duration grows with the
file. `timeout_seconds` bounds each wait for data instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import aiohttp
from mdr_connector.adapters.mdr.models import (
    Asset,
    Attachment,
    Comment,
    HistoryEntry,
    Incident,
    Response,
    describe_record,
    parse_asset,
    parse_attachment,
    parse_comment,
    parse_history_entry,
    parse_incident,
    parse_response,
)
from mdr_connector.adapters.mdr.tokens import (
    TokenManager,
    TokenStorage,
    expired_refresh_error,
)
from mdr_connector.connector.config import MdrSettings
from mdr_connector.connector.errors import (
    CredentialsRejectedError,
    InvalidPayloadError,
    OutcomeUnknownError,
    RateLimitedError,
    RejectedError,
    RemoteUnavailableError,
    TokenExpiredError,
)
from mdr_connector.connector.retry import RateGate
from mdr_connector.connector.http import (
    CONNECT_TIMEOUT_SECONDS,
    TRANSFER_CHUNK_BYTES,
    create_session,
    parse_retry_after,
    post_options,
    transport_errors,
    write_body_to_file,
)
from multidict import CIMultiDictProxy

log = logging.getLogger(__name__)

CONFIRM_PATH = "session/confirm"
AUTH_STATUSES = (401, 403)
MAX_ERROR_TEXT = 200
# An error reply is read only up to this size, because MDR's JSON errors are far smaller.
MAX_ERROR_BODY_BYTES = 64 * 1024
RESPONSES_PAGE_SIZE = 100
# The service caps deep paging at page * page_size <= 10 000 (INFERRED), so
# more pages than this cannot be read at RESPONSES_PAGE_SIZE anyway.
MAX_RESPONSE_PAGES = 10_000 // RESPONSES_PAGE_SIZE


@dataclass(frozen=True)
class MalformedRecord:
    """A record of a list reply that failed validation, with what could be read of it."""

    record_id: str | None
    update_time: int | None
    error: str


@dataclass(frozen=True)
class IncidentPage:
    """One page of `incidents/list`.

    `raw_count` is the length of the array MDR returned, valid records or
    not; compare it with the page size to decide whether another page exists.
    """

    items: list[Incident] = field(default_factory=list)
    malformed: list[MalformedRecord] = field(default_factory=list)
    raw_count: int = 0


@dataclass(frozen=True)
class CommentPage:
    """The comments of one incident: the valid ones, and the records that failed validation."""

    items: list[Comment] = field(default_factory=list)
    malformed: list[MalformedRecord] = field(default_factory=list)


@dataclass(frozen=True)
class AttachmentPage:
    """The attachments of one incident: the valid ones, and the records that failed validation."""

    items: list[Attachment] = field(default_factory=list)
    malformed: list[MalformedRecord] = field(default_factory=list)


@dataclass(frozen=True)
class ResponsePage:
    """Every remediation response of one incident, all pages read: the valid ones and the malformed records."""

    items: list[Response] = field(default_factory=list)
    malformed: list[MalformedRecord] = field(default_factory=list)


@dataclass(frozen=True)
class IncidentFilter:
    """The `incidents/list` and `incidents/count` filters the connector uses; times in epoch ms."""

    min_update_time: int | None = None
    max_update_time: int | None = None
    min_creation_time: int | None = None
    max_creation_time: int | None = None
    statuses: tuple[str, ...] = ()
    priorities: tuple[str, ...] = ()
    tenants: tuple[str, ...] = ()

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {}
        for name in ("min_update_time", "max_update_time", "min_creation_time", "max_creation_time"):
            value = getattr(self, name)
            if value is not None:
                body[name] = value
        if self.statuses:
            body["statuses"] = list(self.statuses)
        if self.priorities:
            body["priorities"] = list(self.priorities)
        if self.tenants:
            body["tenants_names"] = list(self.tenants)
        return body


@dataclass(frozen=True)
class _Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


class MdrClient:
    """An async client of one MDR client id; use it as `async with MdrClient(settings) as mdr:`.

    The client owns its TokenManager (`client.tokens`), which calls
    `session/confirm` through this client. `clock` (Unix seconds) exists so
    tests can follow a simulated clock. Every request goes through
    `rate_gate`, so a 429 pauses all calls of this client id.
    `token_storage` keeps the token pair; None means the token file.
    """

    def __init__(
        self,
        settings: MdrSettings,
        *,
        clock: Callable[[], float] = time.time,
        rate_gate: RateGate | None = None,
        token_storage: TokenStorage | None = None,
    ) -> None:
        self.settings = settings
        self.rate_gate = rate_gate or RateGate("mdr")
        self.tokens = TokenManager(settings, self.confirm_session, clock=clock, storage=token_storage)
        self._base = f"{settings.base_url}/{settings.client_id}"
        self._session: aiohttp.ClientSession | None = None
        self._limit = asyncio.Semaphore(settings.max_concurrency)

    async def __aenter__(self) -> MdrClient:
        self._session = await create_session(
            self.settings,
            self.settings.base_url,
            service="mdr",
            max_connections=self.settings.max_concurrency,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- incidents ---

    async def list_incidents(
        self,
        *,
        min_update_time: int | None = None,
        max_update_time: int | None = None,
        min_creation_time: int | None = None,
        max_creation_time: int | None = None,
        statuses: Iterable[str] = (),
        priorities: Iterable[str] = (),
        tenants: Iterable[str] = (),
        page: int = 1,
        page_size: int = 100,
        sort: str = "update_time:asc",
    ) -> IncidentPage:
        """Read one page of incidents; a malformed record goes to `malformed` instead of failing the page."""
        filters = IncidentFilter(
            min_update_time,
            max_update_time,
            min_creation_time,
            max_creation_time,
            tuple(statuses),
            tuple(priorities),
            tuple(tenants),
        )
        body = {**filters.to_body(), "page": page, "page_size": page_size, "sort": sort}
        return parse_incident_page(await self._call_array("incidents/list", body))

    async def count_incidents(
        self,
        *,
        min_update_time: int | None = None,
        max_update_time: int | None = None,
        min_creation_time: int | None = None,
        max_creation_time: int | None = None,
        statuses: Iterable[str] = (),
        priorities: Iterable[str] = (),
        tenants: Iterable[str] = (),
    ) -> int:
        """Count the incidents that match the same filters as `list_incidents`."""
        filters = IncidentFilter(
            min_update_time,
            max_update_time,
            min_creation_time,
            max_creation_time,
            tuple(statuses),
            tuple(priorities),
            tuple(tenants),
        )
        raw = await self._call("incidents/count", filters.to_body())
        count = raw.get("count") if isinstance(raw, dict) else None
        if isinstance(count, bool) or not isinstance(count, int):
            raise RemoteUnavailableError('MDR incidents/count returned no integer "count"')
        return count

    async def get_incident(self, incident_id: str) -> Incident:
        """Read one incident; raises InvalidPayloadError when the record is malformed."""
        raw = await self._call("incidents/details", {"incident_id": incident_id})
        return parse_incident(raw)

    # --- comments ---

    async def list_comments(self, incident_id: str) -> CommentPage:
        """Read the comments of an incident; a malformed comment goes to `malformed` instead of failing the rest."""
        raw = await self._call_array("comments/list", {"incident_id": incident_id})
        return parse_comment_page(raw, incident_id)

    async def create_comment(self, incident_id: str, text: str, markdown_to_html: bool = True) -> Comment:
        """Add a comment to an incident.

        Raises OutcomeUnknownError when the request may have reached MDR but no
        usable reply came back: look the comment up before sending it again.
        """
        body = {"incident_id": incident_id, "text": text, "markdown_to_html": markdown_to_html}
        raw = await self._call("comments/create", body, write=True)
        try:
            return parse_comment(raw, incident_id)
        except InvalidPayloadError as err:
            raise OutcomeUnknownError(
                f"MDR comments/create for incident {incident_id} returned a malformed comment: {err}"
            ) from err

    async def delete_comment(self, comment_id: str) -> None:
        """Delete a comment that this connection wrote.

        Raises OutcomeUnknownError when no usable reply came back: list the
        comments to learn whether it is gone before sending the delete again.
        """
        # NOTE: the reply body of comments/delete is INFERRED, so nothing is read from it.
        await self._call("comments/delete", {"comment_id": comment_id}, write=True, empty_reply_ok=True)

    # --- attachments ---

    async def list_attachments(self, incident_id: str) -> AttachmentPage:
        """Read the attachments of an incident, putting a malformed record in `malformed` instead of failing the rest."""
        raw = await self._call_array("attachments/list", {"incident_id": incident_id})
        return parse_attachment_page(raw, incident_id)

    async def download_attachment(
        self, attachment: Attachment, destination: Path, *, max_bytes: int | None = None
    ) -> int:
        """Stream an attachment's bytes into `destination` and return how many were written.

        The body is written in chunks to a temporary file in the folder of
        `destination` and renamed over it only when exactly `file_size` bytes
        arrived. On any failure, cancellation included, the temporary file is
        removed and `destination` stays as it was. The listed `file_size`
        bounds the download even when `max_bytes` is None, because a longer
        body is rejected as soon as it passes that size.

        Raises InvalidPayloadError when `file_size` is above `max_bytes`
        (before any request), when MDR announces or sends more bytes than
        `file_size`, and RemoteUnavailableError, which is retriable, when the
        body ends before `file_size` or its Content-Length.
        """
        path = "attachments/download"
        attachment_id = attachment.attachment_id
        expected = attachment.file_size
        if max_bytes is not None and expected > max_bytes:
            raise InvalidPayloadError(
                f"MDR attachment {attachment_id} ({attachment.full_name!r}) has {expected} bytes, "
                f"more than the limit of {max_bytes} bytes; raise the limit to copy it"
            )

        # The request goes to the configured base URL by the attachment id; the
        # record's `link` is never followed, so no other origin is contacted.
        request = {"json": {"attachment_id": attachment_id}, "headers": {"Accept": "*/*"}}

        async def download() -> int:
            async with self._exchange(path, lambda: request, write=False, timeout=self._transfer_timeout()) as response:
                if response.status != 200:
                    await raise_for_response(path, response, write=False)
                announced = response.content_length
                if announced is not None and announced > expected:
                    raise InvalidPayloadError(
                        f"MDR {path} announced {announced} bytes for attachment {attachment_id}, "
                        f"which is listed with file_size {expected}"
                    )
                return await write_body_to_file(
                    response, destination, expected, f"MDR attachments/download of attachment {attachment_id}"
                )

        written = await self.rate_gate.send(download)

        log.debug(
            "mdr.attachment.downloaded",
            extra={"attachment_id": attachment_id, "bytes": written, "client_id": self.settings.client_id},
        )
        return written

    async def upload_attachment(self, incident_id: str, path: Path, filename: str, caption: str = "") -> Attachment:
        """Upload the file at `path` to an incident as `filename`, streamed from disk.

        The request is multipart/form-data with a `file` part and a `meta`
        field holding `{"incident_id": ..., "caption": ...}` as a JSON string.
        Raises RejectedError for HTTP 413 (the file is larger than MDR
        accepts), and OutcomeUnknownError when the upload may have landed but
        no usable reply came back: look the attachment up by name and size
        before sending it again.
        """
        meta = json.dumps({"incident_id": incident_id, "caption": caption})

        async def upload() -> _Reply:
            with contextlib.ExitStack() as open_files:

                def build_request() -> dict[str, Any]:
                    # A retry after a refused token or a 429 sends the file again, so
                    # each attempt reads it from the start through a handle of its own.
                    handle = open_files.enter_context(path.open("rb"))
                    return {"data": multipart_upload(handle, filename, meta)}

                reply = await self._request(
                    "attachments/upload", build_request, write=True, timeout=self._transfer_timeout()
                )
            if reply.status != 200:
                raise_for_status("attachments/upload", reply, write=True, include_message=True)
            return reply

        reply = await self.rate_gate.send(upload, write=True)
        raw = decode_json("attachments/upload", reply, write=True)
        # NOTE: that attachments/upload replies with the new attachment is INFERRED.
        try:
            return parse_attachment(raw, incident_id)
        except InvalidPayloadError as err:
            raise OutcomeUnknownError(
                f"MDR attachments/upload for incident {incident_id} returned a malformed attachment: {err}"
            ) from err

    # --- responses ---

    async def list_responses(self, incident_id: str) -> ResponsePage:
        """Read every remediation response of an incident, page by page until a short page."""
        items: list[Response] = []
        malformed: list[MalformedRecord] = []
        seen: set[str] = set()
        for page in range(1, MAX_RESPONSE_PAGES + 1):
            body = {"incident_id": incident_id, "page": page, "page_size": RESPONSES_PAGE_SIZE}
            raw = await self._call_array("responses/list", body)
            batch = parse_response_page(raw, incident_id)
            new_items = [response for response in batch.items if response.response_id not in seen]
            if batch.items and not new_items:
                # A page of nothing but known responses means the service
                # ignores `page`, so further pages would repeat the first.
                log.warning(
                    "mdr.responses.paging_ignored",
                    extra={"incident_id": incident_id, "page": page, "client_id": self.settings.client_id},
                )
                break
            items.extend(new_items)
            seen.update(response.response_id for response in new_items)
            malformed.extend(batch.malformed)
            if len(raw) < RESPONSES_PAGE_SIZE:
                break
        else:
            log.warning(
                "mdr.responses.truncated",
                extra={"incident_id": incident_id, "read": len(items), "client_id": self.settings.client_id},
            )
        return ResponsePage(items, malformed)

    async def update_response(self, response_id: str, status: str, comment: str) -> None:
        """Confirm or decline one response through `response/update`, with `status` `Confirmed` or `Declined`.

        Raises OutcomeUnknownError when no usable reply came back: read the
        response's status before sending the decision again.
        """
        body = {"response_id": response_id, "status": status, "comment": comment}
        # NOTE: the reply body of response/update is INFERRED, so nothing is read from it.
        await self._call("response/update", body, write=True, empty_reply_ok=True)

    async def update_responses(self, response_ids: Iterable[str], status: str, comment: str) -> None:
        """Confirm or decline several responses in one `responses/update` call; no ids means no call."""
        ids = list(response_ids)
        if not ids:
            return
        body = {"responses_ids": ids, "status": status, "comment": comment}
        # NOTE: the reply body of responses/update is INFERRED, so nothing is read from it.
        await self._call("responses/update", body, write=True, empty_reply_ok=True)

    # --- assets ---

    async def get_asset(self, asset_id: str) -> Asset:
        """Read one asset through `assets/details`, raising InvalidPayloadError when the record is malformed."""
        raw = await self._call("assets/details", {"asset_id": asset_id})
        return parse_asset(raw, asset_id)

    # --- history ---

    async def list_history(
        self,
        *,
        min_record_time: int,
        max_record_time: int | None = None,
        incident_id: str | None = None,
        page: int = 1,
        entity_type_page_size: int = 100,
    ) -> list[HistoryEntry]:
        """Read one page of `incidents/history`, oldest record first, between inclusive times in epoch ms.

        MDR pages each entity type separately: page N holds up to
        `entity_type_page_size` records of every type, so a type has more
        pages only while it fills its share. One malformed record fails the
        whole page with InvalidPayloadError, because leaving it out would make
        its type look exhausted and end the paging early.
        """
        body: dict[str, Any] = {
            "min_record_time": min_record_time,
            "page": page,
            "entity_type_page_size": entity_type_page_size,
        }
        if max_record_time is not None:
            body["max_record_time"] = max_record_time
        if incident_id:
            body["incident_id"] = incident_id

        raw = await self._call_array("incidents/history", body)
        entries = []
        for record in raw:
            try:
                entries.append(parse_history_entry(record, incident_id))
            except InvalidPayloadError as err:
                raise InvalidPayloadError(f"MDR incidents/history page {page}: {err}") from err
        return entries

    # --- incident writes ---

    async def close_incident(self, incident_id: str, resolution_status: str, summary: str) -> None:
        """Close an incident with `TRUE_POSITIVE` or `FALSE_POSITIVE` and a closing summary.

        Raises OutcomeUnknownError when no usable reply came back: read the
        incident's status before closing it again.
        """
        body = {"incident_id": incident_id, "resolution_status": resolution_status, "summary": summary}
        # NOTE: the reply body of incidents/close is INFERRED, so nothing is read from it.
        await self._call("incidents/close", body, write=True, empty_reply_ok=True)

    async def create_incident(
        self,
        *,
        summary: str,
        client_description: str,
        affected_hosts: Iterable[str],
        priority: str,
        tenant_id: str = "",
    ) -> Incident:
        """Create a customer incident on `affected_hosts`, given as `HOSTNAME:asset_id` items.

        Raises OutcomeUnknownError when the incident may have been created but
        no usable reply came back: look it up before creating it again.
        """
        body: dict[str, Any] = {
            "summary": summary,
            "client_description": client_description,
            "affected_hosts": list(affected_hosts),
            "priority": priority,
        }
        if tenant_id:
            body["tenant_id"] = tenant_id
        raw = await self._call("incidents/create", body, write=True)
        try:
            return parse_incident(raw)
        except InvalidPayloadError as err:
            raise OutcomeUnknownError(f"MDR incidents/create returned a malformed incident: {err}") from err

    # --- token exchange ---

    async def confirm_session(self, refresh_token: str) -> tuple[str, str]:
        """Call `session/confirm` (no Authorization header) and return (access_token, refresh_token)."""

        async def confirm() -> _Reply:
            # write=True: a reply lost after sending raises OutcomeUnknownError,
            # because MDR may have spent the refresh token on it.
            async with self._open(CONFIRM_PATH, {"json": {"refresh_token": refresh_token}}, None, write=True) as response:
                reply = _Reply(response.status, response.headers, await response.read())
            if reply.status in (429, 503):
                raise_for_status(CONFIRM_PATH, reply, write=False, include_message=False)
            return reply

        # A 429 means MDR did not spend the refresh token, so sending it again is safe.
        reply = await self.rate_gate.send(confirm)

        if reply.status in (400, 401, 403):
            if not is_json_or_empty(reply.body):
                # MDR sends its errors as JSON, so an HTML page comes from a proxy
                # or firewall in between, and the token itself may be fine.
                raise RemoteUnavailableError(
                    f"MDR {CONFIRM_PATH} returned {reply.status} with a page that is not JSON, so a proxy or "
                    "firewall in between refused the request; check the proxy settings (mdr.proxy, HTTPS_PROXY)"
                )
            raise expired_refresh_error(self.settings.client_id)
        if reply.status != 200:
            raise_for_status(CONFIRM_PATH, reply, write=False, include_message=False)

        tokens = decode_json(CONFIRM_PATH, reply, write=False)
        access = tokens.get("access_token") if isinstance(tokens, dict) else None
        refresh = tokens.get("refresh_token") if isinstance(tokens, dict) else None
        if not (isinstance(access, str) and isinstance(refresh, str) and access and refresh):
            raise RemoteUnavailableError(
                f"MDR {CONFIRM_PATH} returned no access_token and refresh_token strings"
            )
        return access, refresh

    # --- transport ---

    async def _call_array(self, path: str, body: dict[str, Any]) -> list[Any]:
        """POST like `_call` to a list method, whose reply must be a bare JSON array."""
        raw = await self._call(path, body)
        if not isinstance(raw, list):
            raise RemoteUnavailableError(f"MDR {path} returned {type(raw).__name__}, expected an array")
        return raw

    async def _call(
        self, path: str, body: dict[str, Any], *, write: bool = False, empty_reply_ok: bool = False
    ) -> Any:
        """POST `body` as JSON and decode the JSON reply, or return None for an empty 200 body when `empty_reply_ok`."""

        async def post() -> _Reply:
            reply = await self._request(path, lambda: {"json": body}, write=write)
            if reply.status != 200:
                raise_for_status(path, reply, write=write, include_message=True)
            return reply

        reply = await self.rate_gate.send(post, write=write)
        if empty_reply_ok and not reply.body.strip():
            return None
        return decode_json(path, reply, write=write)

    async def _request(
        self,
        path: str,
        build_request: Callable[[], dict[str, Any]],
        *,
        write: bool,
        timeout: aiohttp.ClientTimeout | None = None,
    ) -> _Reply:
        """Send one authorised request and read the whole reply, whatever its status."""
        async with self._exchange(path, build_request, write=write, timeout=timeout) as response:
            data = await response.read()
            log.debug("mdr.request", extra={"path": path, "status": response.status, "bytes": len(data)})
            return _Reply(response.status, response.headers, data)

    @contextlib.asynccontextmanager
    async def _exchange(
        self,
        path: str,
        build_request: Callable[[], dict[str, Any]],
        *,
        write: bool,
        timeout: aiohttp.ClientTimeout | None = None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Send a request with a Bearer token and yield the response before its body is read.

        After a 401 or 403 the token is refreshed once, and `build_request`
        builds the request again for the second attempt. A second refusal
        raises CredentialsRejectedError. aiohttp errors become connector
        errors, also those raised while the caller reads the body.
        """
        access_token = await self.tokens.access_token()
        async with self._open(path, build_request(), access_token, write=write, timeout=timeout) as response:
            if response.status not in AUTH_STATUSES:
                yield response
                return
            rejected_status = response.status

        log.info(
            "mdr.request.token_rejected",
            extra={
                "mdr_connection_name": self.settings.connection_name,
                "client_id": self.settings.client_id,
                "path": path,
                "status": rejected_status,
            },
        )
        access_token = await self.tokens.refresh_after_rejection(access_token)
        async with self._open(path, build_request(), access_token, write=write, timeout=timeout) as response:
            if response.status in AUTH_STATUSES:
                raise CredentialsRejectedError(
                    f"MDR rejected a fresh access token for {path} of client {self.settings.client_id} "
                    f"with HTTP {response.status}: check the connection's access rights in the MDR console"
                )
            yield response

    @contextlib.asynccontextmanager
    async def _open(
        self,
        path: str,
        request: dict[str, Any],
        access_token: str | None,
        *,
        write: bool,
        timeout: aiohttp.ClientTimeout | None = None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """POST to one MDR method and yield the unread response; `request` contains `json` or `data`, and `headers` to add."""
        if self._session is None:
            raise RuntimeError("MdrClient is not open: use `async with MdrClient(settings) as client`")

        headers = {"Accept": "application/json", **request.get("headers", {})}
        if access_token is not None:
            headers["Authorization"] = f"Bearer {access_token}"
        options = {key: value for key, value in request.items() if key != "headers"}
        if timeout is not None:
            options["timeout"] = timeout

        async with self._limit:
            with transport_errors(f"MDR {path}", write=write):
                async with self._session.post(
                    f"{self._base}/{path}", headers=headers, **options, **post_options()
                ) as response:
                    yield response

    def _transfer_timeout(self) -> aiohttp.ClientTimeout:
        """Bound a file transfer by each wait for data, not by its total time, which grows with the file."""
        seconds = self.settings.timeout_seconds
        return aiohttp.ClientTimeout(
            total=None, sock_connect=min(CONNECT_TIMEOUT_SECONDS, seconds), sock_read=seconds
        )


def multipart_upload(handle: IO[bytes], filename: str, meta: str) -> aiohttp.MultipartWriter:
    """Build the attachments/upload body: a `meta` field with the JSON string, then the `file` part read from `handle`.

    The file name is sent as UTF-8 in the quoted `filename` parameter, as
    browsers and Python's requests do, with `"`, CR and LF percent-encoded
    so the name cannot end the header early.
    """
    writer = aiohttp.MultipartWriter("form-data")

    meta_part = aiohttp.payload.StringPayload(meta)
    meta_part.headers[aiohttp.hdrs.CONTENT_DISPOSITION] = 'form-data; name="meta"'
    writer.append_payload(meta_part)

    file_part = aiohttp.payload.get_payload(handle, content_type="application/octet-stream")
    quoted = filename.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")
    file_part.headers[aiohttp.hdrs.CONTENT_DISPOSITION] = f'form-data; name="file"; filename="{quoted}"'
    writer.append_payload(file_part)
    return writer


def parse_comment_page(raw: list[Any], incident_id: str) -> CommentPage:
    items: list[Comment] = []
    malformed: list[MalformedRecord] = []
    for record in raw:
        try:
            items.append(parse_comment(record, incident_id))
        except InvalidPayloadError as err:
            record_id, _ = describe_record(record, "comment_id")
            malformed.append(MalformedRecord(record_id, None, str(err)))
    return CommentPage(items, malformed)


def parse_attachment_page(raw: list[Any], incident_id: str) -> AttachmentPage:
    items: list[Attachment] = []
    malformed: list[MalformedRecord] = []
    for record in raw:
        try:
            items.append(parse_attachment(record, incident_id))
        except InvalidPayloadError as err:
            record_id, _ = describe_record(record, "attachment_id")
            malformed.append(MalformedRecord(record_id, None, str(err)))
    return AttachmentPage(items, malformed)


def parse_response_page(raw: list[Any], incident_id: str) -> ResponsePage:
    items: list[Response] = []
    malformed: list[MalformedRecord] = []
    for record in raw:
        try:
            items.append(parse_response(record, incident_id))
        except InvalidPayloadError as err:
            record_id, update_time = describe_record(record, "response_id")
            malformed.append(MalformedRecord(record_id, update_time, str(err)))
    return ResponsePage(items, malformed)


def is_json_or_empty(body: bytes) -> bool:
    if not body.strip():
        return True
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


def parse_incident_page(raw: list[Any]) -> IncidentPage:
    """Validate each record of an `incidents/list` reply on its own."""
    items: list[Incident] = []
    malformed: list[MalformedRecord] = []
    for record in raw:
        try:
            items.append(parse_incident(record))
        except InvalidPayloadError as err:
            record_id, update_time = describe_record(record, "incident_id")
            malformed.append(MalformedRecord(record_id, update_time, str(err)))
    return IncidentPage(items=items, malformed=malformed, raw_count=len(raw))


def raise_for_status(path: str, reply: _Reply, *, write: bool, include_message: bool) -> None:
    """Raise the error of the connector's tree that matches a non-200 reply."""
    status = reply.status
    detail = error_message(reply) if include_message else ""
    suffix = f": {detail}" if detail else ""

    if status == 429 or (status == 503 and "Retry-After" in reply.headers):
        retry_after = parse_retry_after(reply.headers.get("Retry-After"), reply.headers.get("Date"))
        raise RateLimitedError(f"MDR {path} is rate limited (HTTP {status}){suffix}", retry_after, status)
    if status >= 500 and write:
        raise OutcomeUnknownError(
            f"MDR {path} failed with HTTP {status}; the write may have been applied{suffix}"
        )
    if status >= 500:
        raise RemoteUnavailableError(f"MDR {path} failed with HTTP {status}{suffix}")
    if status == 404:
        # The client id is part of every request path, so a wrong one gives 404 too.
        raise RejectedError(
            f"MDR {path} returned HTTP 404 (not found){suffix}; "
            "a wrong mdr.base_url or mdr.client_id also gives 404, so check both",
            status,
        )
    if status == 413:
        raise RejectedError(
            f"MDR {path} rejected the request as too large (HTTP 413){suffix}; "
            "a file of this size cannot be attached to an MDR incident",
            status,
        )
    if 300 <= status < 400:
        raise RejectedError(
            f"MDR {path} returned a redirect (HTTP {status}), which is not followed: check mdr.base_url",
            status,
        )
    raise RejectedError(f"MDR {path} rejected the request with HTTP {status}{suffix}", status)


async def raise_for_response(path: str, response: aiohttp.ClientResponse, *, write: bool) -> None:
    """Raise the error for a non-200 streamed reply, reading at most MAX_ERROR_BODY_BYTES of its body."""
    body = bytearray()
    async for chunk in response.content.iter_chunked(TRANSFER_CHUNK_BYTES):
        body.extend(chunk[: MAX_ERROR_BODY_BYTES - len(body)])
        if len(body) >= MAX_ERROR_BODY_BYTES:
            break
    raise_for_status(path, _Reply(response.status, response.headers, bytes(body)), write=write, include_message=True)


def decode_json(path: str, reply: _Reply, *, write: bool) -> Any:
    try:
        return json.loads(reply.body)
    except (ValueError, UnicodeDecodeError) as err:
        if write:
            raise OutcomeUnknownError(
                f"MDR {path} returned a reply that is not JSON; the write may have been applied"
            ) from err
        raise RemoteUnavailableError(f"MDR {path} returned a reply that is not JSON") from err


def error_message(reply: _Reply) -> str:
    """Return the `message` of an MDR error body, shortened, or "" when the body has none."""
    try:
        body = json.loads(reply.body)
    except (ValueError, UnicodeDecodeError):
        return ""
    message = body.get("message") if isinstance(body, dict) else None
    if not isinstance(message, str):
        return ""
    return message[:MAX_ERROR_TEXT]
