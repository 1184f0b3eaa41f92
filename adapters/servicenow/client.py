"""The ServiceNow REST client: Table API and Attachment API over aiohttp, with Basic or OAuth authentication.

Replies are mapped onto the connector's error tree here, so no aiohttp
exception reaches the adapter:

    401                 OAuth: fetch a new token once and send again, then CredentialsRejectedError;
                        Basic: CredentialsRejectedError at once
    429                 pause every call to the instance for Retry-After (at least 1 s) and
                        send again, up to 3 sends (`RateGate`); then, or for a pause of
                        more than 60 s, RateLimitedError with the pause in seconds
    503 + Retry-After   as 429, but a write is not sent again
    other 5xx           RemoteUnavailableError; OutcomeUnknownError for a write that is not idempotent
    3xx                 RejectedError: redirects are never followed, so `url` is wrong
    other 4xx           RejectedError with the status and ServiceNow's error message and detail
    timeout, dropped    RemoteUnavailableError before the request was sent,
    connection          OutcomeUnknownError for a write that may have been sent
    reply not JSON      RemoteUnavailableError; OutcomeUnknownError for a write

"Write" means a request that adds something on every call: a POST, or a
PATCH of a journal field. A PATCH that only sets field values can be sent
again safely, so its lost reply is RemoteUnavailableError, like a read's.

OAuth uses the client credentials grant of `/oauth_token.do`. The token is
fetched again 60 s before the expiry that the token reply states (after half
its lifetime when it lives less than 120 s), and once after a 401, because
an instance can revoke a token early.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from multidict import CIMultiDictProxy

from mdr_connector.connector.config import ServiceNowBasicAuth, ServiceNowSettings
from mdr_connector.connector.errors import (
    CredentialsRejectedError,
    InvalidPayloadError,
    OutcomeUnknownError,
    RateLimitedError,
    RejectedError,
    RemoteUnavailableError,
)
from mdr_connector.connector.retry import RateGate
from mdr_connector.connector.http import (
    CONNECT_TIMEOUT_SECONDS,
    TRANSFER_CHUNK_BYTES,
    create_session,
    parse_retry_after,
    transport_errors,
    write_body_to_file,
)

log = logging.getLogger(__name__)

TOKEN_PATH = "/oauth_token.do"
# A token is replaced this long before the expiry its reply states, so no request goes out with a token about to lapse.
# A token that lives less than twice as long is replaced after half its lifetime instead.
TOKEN_REFRESH_MARGIN_SECONDS = 60.0
MAX_ERROR_TEXT = 300
# An error reply is read only up to this size, because ServiceNow's JSON errors are far smaller.
MAX_ERROR_BODY_BYTES = 64 * 1024


@dataclass(frozen=True)
class Page:
    """One page of a Table API or Attachment API list.

    `total` is the `X-Total-Count` header, or None without one. A page can
    hold fewer rows than the limit while more rows follow, because an
    instance applies `sysparm_limit` before its read ACL removes rows.
    """

    rows: list[dict[str, Any]]
    total: int | None


@dataclass(frozen=True)
class _Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


class ServiceNowClient:
    """An async client of one ServiceNow instance; `open()` before the first call, `close()` at the end.

    `clock` (monotonic seconds) exists so tests can move OAuth token expiry
    forward. Every request goes through `rate_gate`, so a 429 pauses all
    calls to the instance.
    """

    def __init__(
        self,
        settings: ServiceNowSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        rate_gate: RateGate | None = None,
    ) -> None:
        self.settings = settings
        self.rate_gate = rate_gate or RateGate("servicenow")
        self.base_url = settings.url.rstrip("/")
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._limit = asyncio.Semaphore(settings.max_concurrency)
        self._basic: aiohttp.BasicAuth | None = None
        self._client_secret: str | None = None
        self._token: str | None = None
        # The monotonic time after which the token is replaced before use.
        self._token_renewal = 0.0
        self._token_lock = asyncio.Lock()

    @property
    def uses_oauth(self) -> bool:
        return not isinstance(self.settings.auth, ServiceNowBasicAuth)

    async def open(self) -> None:
        """Read the secrets, open the HTTP session and, with OAuth, fetch the first access token."""
        auth = self.settings.auth
        if isinstance(auth, ServiceNowBasicAuth):
            self._basic = aiohttp.BasicAuth(auth.username, auth.password.read(), encoding="utf-8")
        else:
            self._client_secret = auth.client_secret.read()
        self._session = await create_session(
            self.settings, self.base_url, service="servicenow", max_connections=self.settings.max_concurrency
        )
        if self.uses_oauth:
            await self._fetch_token(None)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # Table API

    async def list_rows(
        self,
        operation: str,
        table: str,
        *,
        query: str,
        fields: str,
        limit: int,
        offset: int = 0,
        display_value: bool = False,
    ) -> Page:
        """Read one page of `table` rows that match the encoded `query`, with stored values unless `display_value`."""
        params = {
            "sysparm_query": query,
            "sysparm_fields": fields,
            "sysparm_limit": str(limit),
            "sysparm_offset": str(offset),
            "sysparm_display_value": "true" if display_value else "false",
            "sysparm_exclude_reference_link": "true",
        }
        reply = await self._call(operation, "GET", f"/api/now/v2/table/{table}", params=params)
        return Page(_result_list(operation, reply), _total_count(reply))

    async def get_row(self, operation: str, table: str, sys_id: str, fields: str) -> dict[str, Any] | None:
        """Read one record by sys_id; None when it does not exist or the read ACL hides it (HTTP 404)."""
        params = {"sysparm_fields": fields, "sysparm_exclude_reference_link": "true", "sysparm_display_value": "false"}
        try:
            reply = await self._call(operation, "GET", f"/api/now/v2/table/{table}/{sys_id}", params=params)
        except RejectedError as err:
            if err.status == 404:
                return None
            raise
        return _result_object(operation, reply, write=False)

    async def insert_row(self, operation: str, table: str, body: dict[str, Any], fields: str) -> dict[str, Any]:
        """Create one record with POST; a reply lost after sending is OutcomeUnknownError."""
        params = {"sysparm_fields": fields, "sysparm_exclude_reference_link": "true"}
        reply = await self._call(operation, "POST", f"/api/now/v2/table/{table}", params=params, body=body, write=True)
        return _result_object(operation, reply, write=True)

    async def update_row(
        self, operation: str, table: str, sys_id: str, body: dict[str, Any], fields: str, *, write: bool
    ) -> dict[str, Any]:
        """Change one record with PATCH; `write` is True when the body appends a journal entry."""
        params = {"sysparm_fields": fields, "sysparm_exclude_reference_link": "true"}
        path = f"/api/now/v2/table/{table}/{sys_id}"
        reply = await self._call(operation, "PATCH", path, params=params, body=body, write=write)
        return _result_object(operation, reply, write=write)

    # Attachment API

    async def list_attachments(self, operation: str, *, query: str, limit: int, offset: int = 0) -> Page:
        """Read one page of attachment records that match the encoded `query`."""
        params = {"sysparm_query": query, "sysparm_limit": str(limit), "sysparm_offset": str(offset)}
        reply = await self._call(operation, "GET", "/api/now/attachment", params=params)
        return Page(_result_list(operation, reply), _total_count(reply))

    async def attachment_record(self, operation: str, sys_id: str) -> dict[str, Any]:
        """Read the metadata of one attachment."""
        reply = await self._call(operation, "GET", f"/api/now/attachment/{sys_id}")
        return _result_object(operation, reply, write=False)

    async def upload(
        self, operation: str, table: str, sys_id: str, path: Path, filename: str, content_type: str
    ) -> dict[str, Any]:
        """POST the file at `path` as the raw request body to `attachment/file`, read from disk while it is sent."""
        params = {"table_name": table, "table_sys_id": sys_id, "file_name": filename}

        async def send() -> _Reply:
            with contextlib.ExitStack() as open_files:

                def build_request() -> dict[str, Any]:
                    # A second attempt after a refused token or a 429 sends the file again from its start.
                    handle = open_files.enter_context(path.open("rb"))
                    return {"params": params, "data": handle, "headers": {"Content-Type": content_type}}

                reply = await self._request(
                    operation, "POST", "/api/now/attachment/file", build_request, write=True, timeout=self._transfer_timeout()
                )
            if reply.status not in (200, 201):
                raise_for_status(operation, reply, write=True)
            return reply

        reply = await self.rate_gate.send(send, write=True)
        return _result_object(operation, reply, write=True)

    async def download(self, operation: str, url: str, destination: Path, expected: int) -> int:
        """Stream the file at `url`, which must be on the instance's origin, into `destination`.

        The body goes to a temporary file beside `destination`, which is
        renamed over it only when exactly `expected` bytes arrived. On any
        failure the temporary file is removed. A longer body stops at once
        with InvalidPayloadError, and a shorter one is RemoteUnavailableError.
        """
        self.check_origin(url)
        timeout = self._transfer_timeout()

        def build_request() -> dict[str, Any]:
            return {"headers": {"Accept": "*/*"}}

        async def fetch() -> int:
            async with self._exchange(operation, "GET", url, build_request, write=False, timeout=timeout) as response:
                if response.status != 200:
                    await raise_for_response(operation, response)
                announced = response.content_length
                if announced is not None and announced > expected:
                    raise InvalidPayloadError(
                        f"ServiceNow {operation} announced {announced} bytes, but the attachment record lists {expected}"
                    )
                return await write_body_to_file(response, destination, expected, f"ServiceNow {operation}")

        return await self.rate_gate.send(fetch)

    def check_origin(self, url: str) -> None:
        """Raise InvalidPayloadError unless `url` has the scheme, host and port of the configured instance.

        The credentials go with every request, so a link that an attachment
        record names is followed only on the instance itself.
        """
        scheme, host, port = _origin(url)
        if (scheme, host, port) != _origin(self.base_url):
            raise InvalidPayloadError(
                f"ServiceNow named a download link on {scheme}://{host}:{port}, outside {self.base_url}, "
                "so it was not followed: the connector sends its credentials only to the configured instance"
            )

    def check_download_link(self, url: str, attachment_id: str) -> None:
        """Raise InvalidPayloadError unless `url` is the file of attachment `attachment_id` on the configured instance.

        The credentials go with the request, so a link with user info, a
        query, or another path is not followed, even on the instance itself.
        """
        self.check_origin(url)
        parts = urlsplit(url)
        base_path = urlsplit(self.base_url).path.rstrip("/")
        file_path = re.escape(base_path) + r"/api/now(?:/v1)?/attachment/" + re.escape(attachment_id) + "/file"
        if re.fullmatch(file_path, parts.path) is None or "@" in parts.netloc or parts.query or parts.fragment:
            raise InvalidPayloadError(
                f"ServiceNow named a download link with the path {parts.path[:200]!r} for attachment {attachment_id}, "
                "which is not the attachment's own file on the instance, so it was not followed"
            )

    # Transport

    async def _call(
        self,
        operation: str,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
        write: bool = False,
    ) -> _Reply:
        """Send one JSON request and return the reply, raising for every status but 200, 201 and 204."""

        def build_request() -> dict[str, Any]:
            request: dict[str, Any] = {"params": params or {}, "headers": {"Accept": "application/json"}}
            if body is not None:
                request["json"] = body
            return request

        async def send() -> _Reply:
            reply = await self._request(operation, method, path, build_request, write=write)
            if reply.status not in (200, 201, 204):
                raise_for_status(operation, reply, write=write)
            return reply

        return await self.rate_gate.send(send, write=write)

    async def _request(
        self,
        operation: str,
        method: str,
        path: str,
        build_request: Callable[[], dict[str, Any]],
        *,
        write: bool,
        timeout: aiohttp.ClientTimeout | None = None,
    ) -> _Reply:
        """Send one authorised request and read the whole reply, whatever its status."""
        async with self._exchange(operation, method, f"{self.base_url}{path}", build_request, write=write, timeout=timeout) as response:
            data = await response.read()
            log.debug("servicenow.request", extra={"operation": operation, "status": response.status, "bytes": len(data)})
            return _Reply(response.status, response.headers, data)

    @contextlib.asynccontextmanager
    async def _exchange(
        self,
        operation: str,
        method: str,
        url: str,
        build_request: Callable[[], dict[str, Any]],
        *,
        write: bool,
        timeout: aiohttp.ClientTimeout | None = None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Send a request with the configured credentials and yield the response before its body is read.

        With OAuth, a 401 fetches a new token once and `build_request`
        builds the request again. Any other 401 is CredentialsRejectedError.
        """
        authorization = await self._authorization()
        async with self._open(operation, method, url, build_request(), authorization, write=write, timeout=timeout) as response:
            if response.status != 401:
                yield response
                return
        if not self.uses_oauth:
            raise self._rejected(operation)

        log.info("servicenow.request.token_rejected", extra={"operation": operation})
        await self._fetch_token(authorization)
        authorization = await self._authorization()
        async with self._open(operation, method, url, build_request(), authorization, write=write, timeout=timeout) as response:
            if response.status == 401:
                raise self._rejected(operation)
            yield response

    @contextlib.asynccontextmanager
    async def _open(
        self,
        operation: str,
        method: str,
        url: str,
        request: dict[str, Any],
        authorization: str,
        *,
        write: bool,
        timeout: aiohttp.ClientTimeout | None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        if self._session is None:
            raise RuntimeError("ServiceNowClient is not open: await open() first")
        headers = {**request.pop("headers", {}), "Authorization": authorization}
        if timeout is not None:
            request["timeout"] = timeout
        async with self._limit:
            with transport_errors(f"ServiceNow {operation}", write=write):
                async with self._session.request(method, url, headers=headers, allow_redirects=False, **request) as response:
                    yield response

    async def _authorization(self) -> str:
        if self._basic is not None:
            return self._basic.encode()
        if self._token is None or self._clock() >= self._token_renewal:
            await self._fetch_token(None)
        assert self._token is not None
        return f"Bearer {self._token}"

    async def _fetch_token(self, rejected: str | None) -> None:
        """Fetch an access token with the client credentials grant.

        `rejected` is the Authorization value that got a 401. When another
        request has already replaced that token, no second fetch is made.
        """
        async with self._token_lock:
            if rejected is not None and self._token is not None and rejected != f"Bearer {self._token}":
                return
            if rejected is None and self._token is not None and self._clock() < self._token_renewal:
                return
            token, lifetime = await self._token_request()
            self._token = token
            self._token_renewal = self._clock() + lifetime - min(TOKEN_REFRESH_MARGIN_SECONDS, lifetime / 2)
        log.info("servicenow.oauth.token_fetched", extra={"expires_in": lifetime})

    async def _token_request(self) -> tuple[str, float]:
        auth = self.settings.auth
        assert not isinstance(auth, ServiceNowBasicAuth) and self._client_secret is not None
        form = {"grant_type": "client_credentials", "client_id": auth.client_id, "client_secret": self._client_secret}
        if auth.scope:
            form["scope"] = auth.scope
        if self._session is None:
            raise RuntimeError("ServiceNowClient is not open: await open() first")

        operation = "oauth_token"
        session = self._session

        async def send() -> _Reply:
            async with self._limit:
                with transport_errors(f"ServiceNow {operation}", write=False):
                    async with session.post(
                        f"{self.base_url}{TOKEN_PATH}", data=form, headers={"Accept": "application/json"}, allow_redirects=False
                    ) as response:
                        reply = _Reply(response.status, response.headers, await response.read())
            if reply.status in (429, 503):
                raise_for_status(operation, reply, write=False)
            return reply

        reply = await self.rate_gate.send(send)
        if reply.status in (400, 401, 403):
            raise CredentialsRejectedError(
                f"ServiceNow rejected the OAuth client credentials of client {auth.client_id} with HTTP {reply.status}: "
                "check client_id and client_secret, and that the OAuth application on the instance allows the "
                "client_credentials grant and runs as the connector's account"
            )
        if reply.status != 200:
            raise_for_status(operation, reply, write=False)
        data = decode_json(operation, reply, write=False)
        token = data.get("access_token") if isinstance(data, dict) else None
        lifetime = data.get("expires_in") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token:
            raise RemoteUnavailableError(f"ServiceNow {TOKEN_PATH} returned no access_token")
        if isinstance(lifetime, bool) or not isinstance(lifetime, (int, float, str)) or not str(lifetime).isdigit():
            # NOTE: without expires_in the token is used until a 401 replaces it.
            return token, float("inf")
        return token, float(lifetime)

    def _rejected(self, operation: str) -> CredentialsRejectedError:
        auth = self.settings.auth
        what = "user name and password" if isinstance(auth, ServiceNowBasicAuth) else "fresh OAuth access token"
        return CredentialsRejectedError(
            f"ServiceNow rejected the connector's {what} for {operation} with HTTP 401: "
            f"check ticket.auth and that the account {auth.username} is active and may use the REST API"
        )

    def _transfer_timeout(self) -> aiohttp.ClientTimeout:
        """Bound a file transfer by each wait for data, not by its total time, which grows with the file."""
        seconds = self.settings.timeout_seconds
        return aiohttp.ClientTimeout(total=None, sock_connect=min(CONNECT_TIMEOUT_SECONDS, seconds), sock_read=seconds)


def raise_for_status(operation: str, reply: _Reply, *, write: bool) -> None:
    """Raise the error of the connector's tree that matches a reply with an unexpected status."""
    status = reply.status
    detail = error_message(reply.body)
    suffix = f": {detail}" if detail else ""

    if status == 429 or (status == 503 and "Retry-After" in reply.headers):
        retry_after = parse_retry_after(reply.headers.get("Retry-After"), reply.headers.get("Date"))
        raise RateLimitedError(f"ServiceNow {operation} is rate limited (HTTP {status}){suffix}", retry_after, status)
    if status >= 500 and write:
        raise OutcomeUnknownError(f"ServiceNow {operation} failed with HTTP {status}, so the write may have been applied{suffix}")
    if status >= 500:
        raise RemoteUnavailableError(f"ServiceNow {operation} failed with HTTP {status}{suffix}")
    if status == 401:
        raise CredentialsRejectedError(f"ServiceNow {operation} was rejected with HTTP 401{suffix}: check ticket.auth")
    if 300 <= status < 400:
        raise RejectedError(
            f"ServiceNow {operation} returned a redirect (HTTP {status}), which is not followed: "
            "check that ticket.url is the instance's address, such as https://example.service-now.com",
            status,
        )
    raise RejectedError(f"ServiceNow {operation} was rejected with HTTP {status}{suffix}", status)


async def raise_for_response(operation: str, response: aiohttp.ClientResponse) -> None:
    """Raise the error for a streamed reply with another status than 200, reading at most MAX_ERROR_BODY_BYTES of it."""
    body = bytearray()
    async for chunk in response.content.iter_chunked(TRANSFER_CHUNK_BYTES):
        body.extend(chunk[: MAX_ERROR_BODY_BYTES - len(body)])
        if len(body) >= MAX_ERROR_BODY_BYTES:
            break
    raise_for_status(operation, _Reply(response.status, response.headers, bytes(body)), write=False)


def error_message(body: bytes) -> str:
    """Return `error.message` and `error.detail` of a ServiceNow error body, shortened, or "" without them."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return ""
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return ""
    parts = [" ".join(str(error[key]).split()) for key in ("message", "detail") if isinstance(error.get(key), str) and error[key].strip()]
    return " - ".join(parts)[:MAX_ERROR_TEXT]


def decode_json(operation: str, reply: _Reply, *, write: bool) -> Any:
    try:
        return json.loads(reply.body)
    except (ValueError, UnicodeDecodeError) as err:
        if write:
            raise OutcomeUnknownError(
                f"ServiceNow {operation} returned a reply that is not JSON, so the write may have been applied"
            ) from err
        raise RemoteUnavailableError(f"ServiceNow {operation} returned a reply that is not JSON") from err


def _result_list(operation: str, reply: _Reply) -> list[dict[str, Any]]:
    data = decode_json(operation, reply, write=False)
    result = data.get("result") if isinstance(data, dict) else None
    # The reply is JSON, so a wrong shape is not a transport fault that a
    # retry would fix: the item is parked with the reason instead.
    if not isinstance(result, list) or not all(isinstance(row, dict) for row in result):
        raise InvalidPayloadError(f"ServiceNow {operation} returned no list of records in `result`")
    return result


def _result_object(operation: str, reply: _Reply, *, write: bool) -> dict[str, Any]:
    if reply.status == 204 or not reply.body.strip():
        return {}
    data = decode_json(operation, reply, write=write)
    result = data.get("result") if isinstance(data, dict) else None
    if not isinstance(result, dict):
        if write:
            raise OutcomeUnknownError(f"ServiceNow {operation} returned no record in `result`, so the write may have been applied")
        raise RemoteUnavailableError(f"ServiceNow {operation} returned no record in `result`")
    return result


def _total_count(reply: _Reply) -> int | None:
    value = reply.headers.get("X-Total-Count", "").strip()
    return int(value) if value.isdigit() else None


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    default_port = {"http": 80, "https": 443}.get(scheme)
    try:
        port = parts.port or default_port
    except ValueError:
        port = None
    return scheme, (parts.hostname or "").lower(), port


