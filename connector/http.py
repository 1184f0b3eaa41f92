"""HTTP clients built the same way for every remote system: aiohttp sessions, and requests settings for Jira.

TLS verification uses the operating system's certificate store (aiohttp's
default; requests is pointed at the same store), or `ca_bundle` when one is
configured. `tls_verify: false` is allowed but logs a WARNING every time a
session starts. A configured `proxy` is used for every request. Without
one, the standard proxy variables (`HTTPS_PROXY`, `NO_PROXY`, ...) apply,
but requests to loopback hosts never go through a proxy from the environment.

Authenticated calls must pass `allow_redirects=False` (see `post_options`):
aiohttp strips `Authorization` only on cross-origin redirects, and a
redirect from an API endpoint is a misconfiguration worth failing on.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import os
import ssl
import tempfile
import time
from collections.abc import Iterator
from datetime import timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import requests
from mdr_connector.connector.config import TransportSettings, is_loopback_host
from mdr_connector.connector.errors import (
    MAX_RETRY_AFTER_SECONDS,
    ConfigError,
    InvalidPayloadError,
    OutcomeUnknownError,
    RemoteUnavailableError,
)

log = logging.getLogger(__name__)

TRANSFER_CHUNK_BYTES = 256 * 1024

CONNECT_TIMEOUT_SECONDS = 10.0
# OpenSSL verify codes X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH
# (openssl/x509_vfy.h): the certificate names hosts other than the one connected to.
HOST_MISMATCH_CODES = frozenset({62, 64})


def build_ssl_context(settings: TransportSettings) -> ssl.SSLContext | bool:
    """Build the TLS setting for aiohttp: a verifying context, or False when verification is off.

    Loading a certificate store reads files, so call this off the event loop.
    """
    if not settings.tls_verify:
        return False

    try:
        return ssl.create_default_context(cafile=str(settings.ca_bundle) if settings.ca_bundle else None)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(
            f"cannot load the CA bundle {settings.ca_bundle}: {err}; point ca_bundle at a readable PEM file"
        ) from err


def build_timeout(settings: TransportSettings) -> aiohttp.ClientTimeout:
    """Bound the whole request by `timeout_seconds` and the TCP connect by at most 10 s."""
    return aiohttp.ClientTimeout(
        total=settings.timeout_seconds,
        sock_connect=min(CONNECT_TIMEOUT_SECONDS, settings.timeout_seconds),
    )


async def create_session(
    settings: TransportSettings,
    base_url: str,
    *,
    service: str,
    max_connections: int = 100,
) -> aiohttp.ClientSession:
    """Open a ClientSession for `base_url` with the TLS, proxy and timeout settings applied.

    `service` names the remote system in log events, for example `mdr`.
    """
    host = urlsplit(base_url).hostname or ""
    loopback = is_loopback_host(host)
    uses_tls = urlsplit(base_url).scheme == "https"

    ssl_setting: ssl.SSLContext | bool = True
    if uses_tls:
        ssl_setting = await asyncio.to_thread(build_ssl_context, settings)
        warn_if_unverified(settings, base_url, service)

    connector = aiohttp.TCPConnector(ssl=ssl_setting, limit=max_connections)
    proxy = settings.proxy_url()

    # trust_env also makes aiohttp read ~/.netrc; it is off whenever a proxy
    # is configured explicitly or the target is loopback (the simulators).
    return aiohttp.ClientSession(
        connector=connector,
        timeout=build_timeout(settings),
        proxy=proxy,
        trust_env=proxy is None and not loopback,
        raise_for_status=False,
    )


def warn_if_unverified(settings: TransportSettings, url: str, service: str) -> None:
    """Log a WARNING at every start of a client whose TLS verification is turned off."""
    if settings.tls_verify or urlsplit(url).scheme != "https":
        return
    log.warning(
        "http.tls_verification_disabled",
        extra={"service": service, "host": urlsplit(url).hostname or ""},
    )


def requests_verify(settings: TransportSettings) -> bool | str:
    """Return the `verify` value for a requests session, chosen as for aiohttp.

    That is `ca_bundle` when set, else the operating system's store (requests
    would otherwise use certifi's bundle and miss a corporate CA installed
    in the system), or False when verification is off.
    """
    if not settings.tls_verify:
        return False
    if settings.ca_bundle is not None:
        return str(settings.ca_bundle)
    paths = ssl.get_default_verify_paths()
    return paths.cafile or paths.capath or True


def requests_proxies(settings: TransportSettings, url: str) -> dict[str, str] | None:
    """Return the proxies for a requests session: the configured one, else the environment's, never for loopback."""
    proxy = settings.proxy_url()
    if proxy:
        return {"http": proxy, "https": proxy}
    if is_loopback_host(urlsplit(url).hostname or ""):
        return None
    return requests.utils.get_environ_proxies(url) or None


def certificate_problem(host: str | None, err: BaseException) -> str:
    """Describe a failed TLS certificate check in one line, with the fix for the operator.

    `err` is the `ssl.SSLCertVerificationError` raised during the TLS
    handshake, before any request was sent.
    """
    reason = getattr(err, "verify_message", None) or getattr(err, "reason", None) or "certificate verify failed"
    reason = " ".join(str(reason).split()).rstrip(".")
    if getattr(err, "verify_code", None) in HOST_MISMATCH_CODES:
        fix = "use a url with a host name that the certificate lists, or have the certificate reissued for that host"
    else:
        fix = "set ca_bundle to the PEM file of the CA that issued it, or add that CA to the system store"
    return f"the TLS certificate of {host or 'the server'} could not be verified ({reason}): {fix}"


def post_options() -> dict[str, Any]:
    """Keyword arguments every authenticated POST passes to `ClientSession.post`."""
    return {"allow_redirects": False}


def describe_error(err: BaseException) -> str:
    """Describe a transport error by its type and message."""
    text = str(err)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


@contextlib.contextmanager
def transport_errors(request: str, *, write: bool) -> Iterator[None]:
    """Turn aiohttp and timeout errors of one request into the connector's errors.

    `request` names the call in messages, such as `MDR comments/list` or
    `Redmine GET /issues.json`. A write that fails after it may have been
    sent raises OutcomeUnknownError, so the caller looks it up before sending it again.
    """
    try:
        yield
    except aiohttp.ClientConnectorCertificateError as err:
        # The handshake failed, so the request was not sent, write or not.
        raise RemoteUnavailableError(f"{request} failed: {certificate_problem(err.host, err.certificate_error)}") from err
    except aiohttp.ClientConnectorError as err:
        raise RemoteUnavailableError(f"{request}: cannot connect: {describe_error(err)}") from err
    except aiohttp.ConnectionTimeoutError as err:
        raise RemoteUnavailableError(f"{request}: connecting timed out") from err
    except (aiohttp.ClientError, TimeoutError) as err:
        if write:
            raise OutcomeUnknownError(
                f"{request}: no reply, so the write may have been applied: {describe_error(err)}"
            ) from err
        raise RemoteUnavailableError(f"{request} failed: {describe_error(err)}") from err


async def write_body_to_file(response: aiohttp.ClientResponse, destination: Path, expected: int, request: str) -> int:
    """Stream a download body to a temporary file beside `destination`, rename it, and return the byte count.

    The temporary file is removed on any failure. A body longer than
    `expected` stops at once with InvalidPayloadError, and a shorter one
    raises RemoteUnavailableError, which is retriable. `request` names the
    download in messages.
    """
    descriptor, temporary_name = tempfile.mkstemp(dir=destination.parent, prefix=".download-", suffix=".part")
    temporary = Path(temporary_name)
    written = 0
    try:
        with os.fdopen(descriptor, "wb") as handle:
            try:
                async for chunk in response.content.iter_chunked(TRANSFER_CHUNK_BYTES):
                    written += len(chunk)
                    if written > expected:
                        raise InvalidPayloadError(f"{request} sent more than the {expected} bytes the attachment is listed with")
                    await asyncio.to_thread(handle.write, chunk)
            except aiohttp.ClientPayloadError as err:
                raise RemoteUnavailableError(
                    f"{request} broke off after {written} of {expected} bytes: {describe_error(err)}"
                ) from err
        if written < expected:
            raise RemoteUnavailableError(f"{request} ended after {written} of {expected} bytes")
        os.replace(temporary, destination)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return written


def parse_retry_after(value: str | None, date_header: str | None, now: float | None = None) -> float | None:
    """Turn Retry-After (delay in seconds or an HTTP-date) into seconds to wait, or None when it is missing or invalid.

    An HTTP-date is measured against the reply's `Date` header, so a skewed
    local clock does not change the delay. Without a readable `Date`, it is
    measured against `now` (Unix seconds, the local clock by default). A
    date in the past gives 0. A delay longer than MAX_RETRY_AFTER_SECONDS
    is cut to it, so a hostile or broken server cannot stop a connection
    for years.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    # RFC 9110 allows ASCII digits only; str.isdigit() also accepts "²" and "٣".
    if text.isascii() and text.isdigit():
        return min(float(text), MAX_RETRY_AFTER_SECONDS)

    target = parse_http_date(text)
    if target is None:
        return None
    reference = parse_http_date(date_header) if date_header else None
    if reference is None:
        reference = now if now is not None else time.time()
    return min(max(0.0, target - reference), MAX_RETRY_AFTER_SECONDS)


def parse_http_date(text: str) -> float | None:
    """Parse an HTTP-date into Unix seconds; HTTP-dates are always GMT."""
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()
