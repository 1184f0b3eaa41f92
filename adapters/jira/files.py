"""Attachment transfer for the Jira adapter: a streamed multipart upload and a streamed download.

Both run in the adapter's worker threads and move a file in chunks of
CHUNK_BYTES, so memory use does not grow with the file. requests builds a
multipart body from `files=` in memory, so the upload body here is a
file-like object of known length that requests sends as it reads it.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import requests
from jira import JIRA
from jira.exceptions import JIRAError

from mdr_connector.connector.errors import (
    InvalidPayloadError,
    RateLimitedError,
    RejectedError,
    RemoteUnavailableError,
)

CHUNK_BYTES = 64 * 1024
MAX_REDIRECTS = 3
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_MEDIA_TYPE = re.compile(r"^[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+$")
DEFAULT_PORTS = {"http": 80, "https": 443}


class MultipartFileBody:
    """A multipart/form-data body with one `file` part, read from disk while requests sends it.

    requests sets Content-Length from `len()` and sends the body by calling
    `read()`; `__iter__` is what makes requests treat it as a stream.
    """

    def __init__(self, path: Path, filename: str, content_type: str) -> None:
        self.boundary = f"mdr-connector-{secrets.token_hex(16)}"
        media_type = content_type if _MEDIA_TYPE.fullmatch(content_type) else "application/octet-stream"
        head = (
            f"--{self.boundary}\r\n"
            f'Content-Disposition: form-data; name="file"; filename="{quote_filename(filename)}"\r\n'
            f"Content-Type: {media_type}\r\n\r\n"
        ).encode("utf-8")
        tail = f"\r\n--{self.boundary}--\r\n".encode("ascii")

        self._path = path
        self._file = path.open("rb")
        self._file_size = os.fstat(self._file.fileno()).st_size
        self._length = len(head) + self._file_size + len(tail)
        self._chunks = self._generate(head, tail)
        self._buffer = b""

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks

    def read(self, size: int = -1) -> bytes:
        """Return up to `size` bytes of the body, all that is left when `size` is negative, and b"" at its end."""
        while size < 0 or len(self._buffer) < size:
            chunk = next(self._chunks, b"")
            if not chunk:
                break
            self._buffer += chunk
        if size < 0:
            data, self._buffer = self._buffer, b""
        else:
            data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def close(self) -> None:
        self._file.close()

    def _generate(self, head: bytes, tail: bytes) -> Iterator[bytes]:
        yield head
        remaining = self._file_size
        while remaining > 0:
            chunk = self._file.read(min(CHUNK_BYTES, remaining))
            if not chunk:
                # Content-Length promised more bytes, and sending fewer would leave Jira waiting.
                raise InvalidPayloadError(
                    f"the spooled file {self._path} became shorter while it was uploaded; it is sent again next cycle"
                )
            remaining -= len(chunk)
            yield chunk
        yield tail


def quote_filename(filename: str) -> str:
    """Quote a file name for Content-Disposition as browsers do (WHATWG HTML): `"`, CR and LF percent-encoded, UTF-8 kept."""
    # NOTE: Jira keeps the name as received, so a name with `"` is stored
    # with `%22`, and a lookup by the original name does not find it.
    return filename.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


def origin_of(url: str) -> tuple[str, str, int]:
    """Return (scheme, host, port) with the default port filled in, for comparing origins."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or DEFAULT_PORTS.get(scheme, 0)


StreamGet = Callable[[str], requests.Response]


def open_content(url: str, jira_url: str, jira_get: StreamGet, media_get: StreamGet) -> requests.Response:
    """Open a streamed GET of attachment content, following at most MAX_REDIRECTS redirects.

    The content URL comes from Jira and must be on the configured Jira
    origin. Jira Cloud replies to it with a redirect to a signed link on its
    media host. A redirect to another origin is followed without the
    connector's credentials (`media_get`), and never from https down to
    http. Both getters return the reply without following redirects.
    """
    jira_origin = origin_of(jira_url)
    if origin_of(url) != jira_origin:
        raise InvalidPayloadError(
            f"Jira listed attachment content at {_origin_text(url)}, which is not the configured Jira URL "
            f"{_origin_text(jira_url)}; the connector downloads attachments only from the configured origin"
        )

    current = url
    for _hop in range(MAX_REDIRECTS + 1):
        if origin_of(current) == jira_origin:
            response = jira_get(current)
        else:
            response = media_get(current)
            _raise_for_media_status(response, current)
        if response.status_code not in REDIRECT_STATUSES:
            return response

        location = response.headers.get("Location", "")
        response.close()
        target = urljoin(current, location)
        if not location or origin_of(target)[0] not in ("http", "https"):
            raise RemoteUnavailableError(f"Jira redirected an attachment download to an unusable location {location!r}")
        if origin_of(current)[0] == "https" and origin_of(target)[0] != "https":
            raise RemoteUnavailableError(
                f"Jira redirected an attachment download from https to {_origin_text(target)}, which was rejected "
                "because the file would travel unencrypted; check the Jira site's base URL"
            )
        current = target
    raise RemoteUnavailableError(f"Jira redirected an attachment download more than {MAX_REDIRECTS} times")


def write_stream(response: requests.Response, destination: Path, expected_size: int) -> int:
    """Write the body to a temporary file next to `destination`, rename it, and return the bytes written.

    The partial file is removed on any failure. A body longer than
    `expected_size` is InvalidPayloadError; a shorter one was cut off and
    is RemoteUnavailableError, so the download is tried again.
    """
    temporary = destination.with_name(f".{destination.name}.{secrets.token_hex(6)}.part")
    written = 0
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            for chunk in response.iter_content(CHUNK_BYTES):
                written += len(chunk)
                if written > expected_size:
                    raise InvalidPayloadError(
                        f"Jira sent more than the {expected_size} bytes it lists for the attachment, so the download was stopped"
                    )
                file.write(chunk)
        if written != expected_size:
            raise RemoteUnavailableError(
                f"the attachment download ended after {written} of {expected_size} bytes; it is tried again"
            )
        os.replace(temporary, destination)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    finally:
        response.close()
    return written


def jira_stream(client: JIRA, url: str) -> requests.Response:
    """Open a streamed GET with the client's credentials and settings, raising JIRAError on an error status.

    It bypasses the `jira` package's session wrapper, whose check of every
    successful reply reads the whole body into memory.
    """
    session = client._session
    response = requests.Session.request(
        session, "GET", url, stream=True, allow_redirects=False, timeout=getattr(session, "timeout", None)
    )
    if response.status_code >= 400:
        raise JIRAError(status_code=response.status_code, url=url, response=response)
    return response


def _raise_for_media_status(response: requests.Response, url: str) -> None:
    status = response.status_code
    if status < 400:
        return
    response.close()
    where = _origin_text(url)
    if status == 429:
        raise RateLimitedError(f"the Jira media host {where} rate-limited an attachment download (HTTP 429)", None)
    if status >= 500:
        raise RemoteUnavailableError(f"the Jira media host {where} failed an attachment download (HTTP {status})")
    raise RejectedError(f"the Jira media host {where} rejected an attachment download (HTTP {status})", status=status)


def _origin_text(url: str) -> str:
    scheme, host, port = origin_of(url)
    return f"{scheme}://{host}:{port}"
