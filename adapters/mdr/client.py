"""The Kaspersky MDR API client.

Every method is a POST of a JSON body to `{base_url}/{client_id}/{path}`,
reads included. Replies are mapped onto the connector's error tree here,
so callers never see aiohttp exceptions:

    401, 403            refresh the token once and retry once, then CredentialsRejectedError
                        (TokenExpiredError when the refresh itself is refused)
    429                 RateLimitedError with Retry-After in seconds
    503 + Retry-After   RateLimitedError
    other 5xx           RemoteUnavailableError; OutcomeUnknownError for a write
    404                 RejectedError that names mdr.base_url and mdr.client_id to check
    3xx, other 4xx      RejectedError with the status (redirects are never followed)
    timeout, dropped    RemoteUnavailableError before the request was sent,
    connection          OutcomeUnknownError for a write that may have been sent
    TLS certificate     RemoteUnavailableError naming the reason and the fix (`ca_bundle`)
    not verified
    non-JSON reply      RemoteUnavailableError; OutcomeUnknownError for a write
    malformed record    InvalidPayloadError; in a list, one bad record is returned
                        in IncidentPage.malformed and the rest of the page is kept

The client does not retry anything else: the engine owns retries.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timezone
from types import TracebackType
from typing import Any

import aiohttp
from mdr_connector.adapters.mdr.models import (
    Comment,
    Incident,
    describe_record,
    parse_comment,
    parse_incident,
)
from mdr_connector.adapters.mdr.tokens import TokenManager, expired_refresh_error
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
from mdr_connector.connector.http import certificate_problem, create_session, post_options
from multidict import CIMultiDictProxy

log = logging.getLogger(__name__)

CONFIRM_PATH = "session/confirm"
AUTH_STATUSES = (401, 403)
MAX_ERROR_TEXT = 200


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
    tests can follow a simulated clock.
    """

    def __init__(self, settings: MdrSettings, *, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.tokens = TokenManager(settings, self.confirm_session, clock=clock)
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

    # --- token exchange ---

    async def confirm_session(self, refresh_token: str) -> tuple[str, str]:
        """Call `session/confirm` (no Authorization header) and return (access_token, refresh_token)."""
        try:
            reply = await self._post(CONFIRM_PATH, {"refresh_token": refresh_token}, access_token=None)
        except (aiohttp.ClientError, TimeoutError) as err:
            raise RemoteUnavailableError(f"MDR {CONFIRM_PATH} failed: {describe_error(err)}") from err

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

    async def _call(self, path: str, body: dict[str, Any], *, write: bool = False) -> Any:
        """POST `body` with a Bearer token, refreshing once after 401/403, and decode the JSON reply."""
        access_token = await self.tokens.access_token()
        reply = await self._send(path, body, access_token, write=write)

        if reply.status in AUTH_STATUSES:
            log.info(
                "mdr.request.token_rejected",
                extra={
                    "mdr_connection_name": self.settings.connection_name,
                    "client_id": self.settings.client_id,
                    "path": path,
                    "status": reply.status,
                },
            )
            access_token = await self.tokens.refresh_after_rejection(access_token)
            reply = await self._send(path, body, access_token, write=write)
            if reply.status in AUTH_STATUSES:
                raise CredentialsRejectedError(
                    f"MDR rejected a fresh access token for {path} of client {self.settings.client_id} "
                    f"with HTTP {reply.status}: check the connection's access rights in the MDR console"
                )

        if reply.status != 200:
            raise_for_status(path, reply, write=write, include_message=True)
        return decode_json(path, reply, write=write)

    async def _send(self, path: str, body: dict[str, Any], access_token: str, *, write: bool) -> _Reply:
        try:
            return await self._post(path, body, access_token=access_token)
        except aiohttp.ClientConnectorError as err:
            raise RemoteUnavailableError(f"MDR {path}: cannot connect: {describe_error(err)}") from err
        except aiohttp.ConnectionTimeoutError as err:
            raise RemoteUnavailableError(f"MDR {path}: connecting timed out") from err
        except (aiohttp.ClientError, TimeoutError) as err:
            # The request may have reached MDR before the failure.
            if write:
                raise OutcomeUnknownError(
                    f"MDR {path}: no reply, the write may have been applied: {describe_error(err)}"
                ) from err
            raise RemoteUnavailableError(f"MDR {path} failed: {describe_error(err)}") from err

    async def _post(self, path: str, body: dict[str, Any], *, access_token: str | None) -> _Reply:
        if self._session is None:
            raise RuntimeError("MdrClient is not open: use `async with MdrClient(settings) as client`")

        headers = {"Accept": "application/json"}
        if access_token is not None:
            headers["Authorization"] = f"Bearer {access_token}"

        async with self._limit:
            try:
                async with self._session.post(
                    f"{self._base}/{path}", json=body, headers=headers, **post_options()
                ) as response:
                    data = await response.read()
                    log.debug("mdr.request", extra={"path": path, "status": response.status, "bytes": len(data)})
                    return _Reply(response.status, response.headers, data)
            except aiohttp.ClientConnectorCertificateError as err:
                # The handshake failed, so the request was not sent, write or not.
                raise RemoteUnavailableError(
                    f"MDR {path} failed: {certificate_problem(err.host, err.certificate_error)}"
                ) from err


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
        raise RateLimitedError(f"MDR {path} is rate limited (HTTP {status}){suffix}", retry_after)
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
    if 300 <= status < 400:
        raise RejectedError(
            f"MDR {path} returned a redirect (HTTP {status}), which is not followed: check mdr.base_url",
            status,
        )
    raise RejectedError(f"MDR {path} rejected the request with HTTP {status}{suffix}", status)


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


def parse_retry_after(value: str | None, date_header: str | None, now: float | None = None) -> float | None:
    """Turn Retry-After (delay in seconds or an HTTP-date) into seconds to wait.

    An HTTP-date is measured against the reply's `Date` header, so a skewed
    local clock does not change the delay; without `Date`, against `now`.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)

    target = parse_http_date(text)
    if target is None:
        return None
    reference = parse_http_date(date_header) if date_header else None
    if reference is None:
        reference = now if now is not None else time.time()
    return max(0.0, target - reference)


def parse_http_date(text: str) -> float | None:
    """Parse an HTTP-date into Unix seconds; HTTP-dates are always GMT."""
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def describe_error(err: BaseException) -> str:
    """Describe a transport error by its type and message."""
    text = str(err)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
