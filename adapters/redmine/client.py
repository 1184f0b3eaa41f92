"""An aiohttp client of Redmine's REST API, with every reply mapped onto the connector's error tree.

Requests carry the API key in the `X-Redmine-API-Key` header and never
follow a redirect. Replies map like this:

    401                         CredentialsRejectedError: the key is wrong, its account locked, or the REST API off
    400, 403, 404, 422, 413     RejectedError with the status and Redmine's `errors` list
    3xx                         RejectedError: a redirect means `ticket.url` is not the API's URL
    429                         pause every call to the server for Retry-After (at least 1 s) and send
                                again, up to 3 sends (`RateGate`); then, or for a pause of more than
                                60 s, RateLimitedError with the pause in seconds
    503 with Retry-After        as 429, but a write is not sent again
    other 5xx                   RemoteUnavailableError; OutcomeUnknownError for a write
    timeout, dropped            RemoteUnavailableError before the request was sent,
    connection                  OutcomeUnknownError for a write that may have been sent
    non-JSON reply              RemoteUnavailableError; OutcomeUnknownError for a write

Files move as streams: an upload is read from disk while it is sent, and a
download is written to disk in chunks, so memory use does not grow with the
file. A transfer has no total time limit, because its duration grows with
the file. `timeout_seconds` bounds each wait for data instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from multidict import CIMultiDictProxy

from mdr_connector.connector.config import RedmineSettings
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

API_KEY_HEADER = "X-Redmine-API-Key"
# An error reply is read only up to this size, because Redmine's JSON errors are far smaller.
MAX_ERROR_BODY_BYTES = 64 * 1024
MAX_ERROR_TEXT = 500
DEFAULT_PORTS = {"http": 80, "https": 443}

Params = Sequence[tuple[str, str]] | dict[str, str]


@dataclass(frozen=True)
class _Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


class RedmineClient:
    """An async client of one Redmine server. Call `open()` first and `close()` at the end.

    Every request goes through `rate_gate`, so a 429 pauses all calls to the server.
    """

    def __init__(self, settings: RedmineSettings, *, rate_gate: RateGate | None = None) -> None:
        self.settings = settings
        self.rate_gate = rate_gate or RateGate("redmine")
        self.base_url = settings.url
        self._session: aiohttp.ClientSession | None = None
        self._api_key: str | None = None
        self._limit = asyncio.Semaphore(settings.max_concurrency)

    async def open(self) -> None:
        """Read the API key and start the HTTP session."""
        self._api_key = self.settings.api_key.read()
        self._session = await create_session(
            self.settings, self.base_url, service="redmine", max_connections=self.settings.max_concurrency
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def get(self, path: str, params: Params | None = None) -> Any:
        """GET a JSON resource such as `/issues/12.json` and return the decoded reply."""

        async def send() -> _Reply:
            reply = await self._request("GET", path, params=params, write=False)
            if reply.status != 200:
                raise_for_status("GET", path, reply, write=False)
            return reply

        reply = await self.rate_gate.send(send)
        return decode_json("GET", path, reply, write=False)

    async def send(self, method: str, path: str, body: dict[str, Any], *, write: bool = True) -> Any:
        """Send a JSON body with POST, PUT or DELETE, and return the decoded reply, or None for 204.

        `write` marks a request that must not be sent twice, such as a new
        issue or note: without a reply it raises OutcomeUnknownError. A
        request that only sets values passes `write=False`, and a lost reply
        is then retriable like a read.
        """

        async def send() -> _Reply:
            reply = await self._request(method, path, json_body=body, write=write)
            if reply.status not in (200, 201, 204):
                raise_for_status(method, path, reply, write=write)
            return reply

        reply = await self.rate_gate.send(send, write=write)
        if reply.status == 204 or not reply.body.strip():
            return None
        return decode_json(method, path, reply, write=write)

    async def upload(self, source: Path, filename: str) -> dict[str, Any]:
        """POST a file to `/uploads.json` as the raw body, read from disk while it is sent.

        Returns the `upload` object, whose `token` attaches the file to an
        issue. A file above Redmine's "Maximum attachment size" is
        RejectedError 422.
        """
        path = "/uploads.json"
        headers = {"Content-Type": "application/octet-stream"}

        async def send() -> _Reply:
            # Each send after a 429 reads the file from its start through a handle of its own.
            with source.open("rb") as handle:
                reply = await self._request(
                    "POST",
                    path,
                    params={"filename": filename},
                    data=handle,
                    headers=headers,
                    write=True,
                    timeout=self._transfer_timeout(),
                )
            if reply.status != 201:
                raise_for_status("POST", path, reply, write=True)
            return reply

        reply = await self.rate_gate.send(send, write=True)
        upload = decode_json("POST", path, reply, write=True)
        if not isinstance(upload, dict) or not isinstance(upload.get("upload"), dict):
            raise OutcomeUnknownError(f"Redmine POST {path} returned no upload object")
        return upload["upload"]

    async def download(self, url: str, destination: Path, expected: int) -> int:
        """Stream the file at `url` into `destination` and return the bytes written.

        `url` must be on the origin of `ticket.url`, so the API key never goes
        to another host. The body is written to a temporary file beside
        `destination` and renamed only when exactly `expected` bytes arrived.
        """
        if not self.same_origin(url):
            raise RejectedError(
                f"Redmine lists the attachment content at {_origin(url)}, which is not the origin of "
                f"ticket.url {_origin(self.base_url)}, so the download was refused; set ticket.url to the "
                "address Redmine reports, or fix the host and protocol headers of the proxy in front of Redmine"
            )

        path = urlsplit(url).path

        async def fetch() -> int:
            async with self._exchange("GET", url, {}, write=False, timeout=self._transfer_timeout()) as response:
                if response.status != 200:
                    raise_for_status("GET", path, await read_error_reply(response), write=False)
                announced = response.content_length
                if announced is not None and announced != expected:
                    raise InvalidPayloadError(
                        f"Redmine GET {path} announced {announced} bytes for a file listed with {expected} bytes"
                    )
                return await write_body_to_file(response, destination, expected, f"Redmine GET {path}")

        return await self.rate_gate.send(fetch)

    def same_origin(self, url: str) -> bool:
        """Tell whether `url` has the scheme, host and port of `ticket.url`."""
        return _origin(url) == _origin(self.base_url)

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Params | None = None,
        json_body: Any = None,
        data: Any = None,
        headers: dict[str, str] | None = None,
        write: bool,
        timeout: aiohttp.ClientTimeout | None = None,
    ) -> _Reply:
        """Send one request to `ticket.url` + `path` and read the whole reply, whatever its status."""
        options: dict[str, Any] = {}
        if params is not None:
            options["params"] = params
        if json_body is not None:
            options["json"] = json_body
        if data is not None:
            options["data"] = data
        if headers:
            options["headers"] = headers

        async with self._exchange(method, f"{self.base_url}{path}", options, write=write, timeout=timeout) as response:
            body = await response.read()
            log.debug("redmine.request", extra={"method": method, "path": path, "status": response.status})
            return _Reply(response.status, response.headers, body)

    @contextlib.asynccontextmanager
    async def _exchange(
        self,
        method: str,
        url: str,
        options: dict[str, Any],
        *,
        write: bool,
        timeout: aiohttp.ClientTimeout | None = None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Send a request with the API key and yield the response before its body is read."""
        if self._session is None or self._api_key is None:
            raise RuntimeError("RedmineClient is not open: call open() first")

        headers = {"Accept": "application/json", **options.pop("headers", {}), API_KEY_HEADER: self._api_key}
        if timeout is not None:
            options["timeout"] = timeout
        path = urlsplit(url).path

        async with self._limit:
            with transport_errors(f"Redmine {method} {path}", write=write):
                async with self._session.request(
                    method, url, headers=headers, allow_redirects=False, **options
                ) as response:
                    yield response

    def _transfer_timeout(self) -> aiohttp.ClientTimeout:
        seconds = self.settings.timeout_seconds
        return aiohttp.ClientTimeout(total=None, sock_connect=min(CONNECT_TIMEOUT_SECONDS, seconds), sock_read=seconds)


def raise_for_status(method: str, path: str, reply: _Reply, *, write: bool) -> None:
    """Raise the error of the connector's tree that matches a reply Redmine did not accept."""
    status = reply.status
    detail = error_text(reply)
    suffix = f": {detail}" if detail else ""
    request = f"Redmine {method} {path}"

    if status == 401:
        raise CredentialsRejectedError(
            f"{request} returned HTTP 401: Redmine rejected the API key in ticket.api_key. Check the key "
            "(My account → API access key of the connector's account), that an administrator has not locked "
            "the account (Administration → Users), and that the REST API is enabled (Administration → Settings → API)"
        )
    if status == 429 or (status == 503 and "Retry-After" in reply.headers):
        retry_after = parse_retry_after(reply.headers.get("Retry-After"), reply.headers.get("Date"))
        raise RateLimitedError(f"{request} is rate limited (HTTP {status}){suffix}", retry_after, status)
    if status >= 500 and write:
        raise OutcomeUnknownError(f"{request} failed with HTTP {status}; the write may have been applied{suffix}")
    if status >= 500:
        raise RemoteUnavailableError(f"{request} failed with HTTP {status}{suffix}")
    if 300 <= status < 400:
        raise RejectedError(
            f"{request} returned a redirect (HTTP {status}) to {reply.headers.get('Location', 'nowhere')}, "
            "which is not followed: set ticket.url to the address Redmine answers on, such as https:// instead of http://",
            status,
        )
    if status == 403:
        raise RejectedError(
            f"{request} was rejected with HTTP 403{suffix}: the connector's account lacks a permission for this, "
            "or the project or issue is not visible to it",
            status,
        )
    if status == 404:
        raise RejectedError(f"{request} returned HTTP 404: not found, or not visible to the connector's account", status)
    if status == 413:
        raise RejectedError(f"{request} was rejected as too large (HTTP 413){suffix}", status)
    raise RejectedError(f"{request} was rejected with HTTP {status}{suffix}", status)


def error_text(reply: _Reply) -> str:
    """Return Redmine's `errors` list as one line, shortened, or "" when the body has none."""
    try:
        body = json.loads(reply.body)
    except (ValueError, UnicodeDecodeError):
        return ""
    errors = body.get("errors") if isinstance(body, dict) else None
    if not isinstance(errors, list):
        return ""
    return "; ".join(str(item) for item in errors)[:MAX_ERROR_TEXT]


def decode_json(method: str, path: str, reply: _Reply, *, write: bool) -> Any:
    try:
        return json.loads(reply.body)
    except (ValueError, UnicodeDecodeError) as err:
        if write:
            raise OutcomeUnknownError(
                f"Redmine {method} {path} returned a reply that is not JSON; the write may have been applied"
            ) from err
        raise RemoteUnavailableError(
            f"Redmine {method} {path} returned a reply that is not JSON: check that ticket.url points to Redmine"
        ) from err


async def read_error_reply(response: aiohttp.ClientResponse) -> _Reply:
    """Read at most MAX_ERROR_BODY_BYTES of a streamed reply that failed."""
    body = bytearray()
    async for chunk in response.content.iter_chunked(TRANSFER_CHUNK_BYTES):
        body.extend(chunk[: MAX_ERROR_BODY_BYTES - len(body)])
        if len(body) >= MAX_ERROR_BODY_BYTES:
            break
    return _Reply(response.status, response.headers, bytes(body))


def _origin(url: str) -> str:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or DEFAULT_PORTS.get(scheme)
    except ValueError:
        port = None
    return f"{scheme}://{(parts.hostname or '').lower()}:{port}"
