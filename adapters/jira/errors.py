"""Map `jira` and `requests` exceptions onto the connector's error tree.

The split that matters is whether a request may have reached Jira. A
create or a comment whose reply never came (read timeout, connection
dropped, 5xx from a gateway) may have been applied, so it becomes
OutcomeUnknownError and the engine looks the write up by its marker instead
of sending it again. Only a refused or timed-out connection, or a failed
TLS certificate check, proves that nothing was sent.

Messages carry the HTTP status and Jira's own error text, which names the
field at fault, but never request headers or bodies: `str(JIRAError)`
includes both, so it is never used here.
"""

from __future__ import annotations

import json
import ssl
from urllib.parse import urlsplit

import requests
from jira.exceptions import JIRAError
from urllib3.exceptions import MaxRetryError, NewConnectionError

from mdr_connector.connector.errors import (
    ConnectionFatalError,
    ConnectorError,
    CredentialsRejectedError,
    OutcomeUnknownError,
    RateLimitedError,
    RejectedError,
    RemoteUnavailableError,
)
from mdr_connector.connector.http import certificate_problem, parse_retry_after

MAX_DETAIL_LENGTH = 1000

# The adapter's operation names in the words a message uses after "while".
OPERATION_WORDS = {
    "open": "connecting",
    "check": "checking the project, issue type and priorities",
    "find_ticket": "searching for the ticket of an incident",
    "create_ticket": "creating a ticket",
    "update_ticket": "updating a ticket",
    "changed_tickets": "searching for changed tickets",
    "list_comments": "reading the comments of a ticket",
    "add_comment": "adding a comment to a ticket",
    "edit_comment": "editing a comment of a ticket",
    "list_attachments": "reading the attachments of a ticket",
    "download_attachment": "downloading an attachment",
    "upload_attachment": "uploading an attachment",
    "attachment_limit": "reading the attachment settings",
    "get_state": "reading the status of a ticket",
    "transition_to": "changing the status of a ticket",
    "find_tickets": "searching for tickets that ask for an MDR incident",
    "set_correlation": "marking a ticket with its MDR incident",
    "account_groups": "reading the groups of an account",
}


def map_error(
    err: JIRAError | requests.RequestException,
    operation: str,
    *,
    write: bool = False,
    opening: bool = False,
    url: str | None = None,
) -> ConnectorError:
    """Return the connector error for a failed Jira call.

    `write` marks a non-idempotent request (create issue, add comment);
    `opening` marks the calls made while connecting, where 401 and 403 mean
    the configured credentials are wrong. `url` is the configured Jira URL,
    which connection errors name.
    """
    words = OPERATION_WORDS.get(operation, operation.replace("_", " "))
    if isinstance(err, JIRAError):
        return _from_reply(err, words, write=write, opening=opening, url=url)
    return _from_transport(err, words, write=write, url=url)


def _from_reply(err: JIRAError, words: str, *, write: bool, opening: bool, url: str | None) -> ConnectorError:
    status = err.status_code
    response = err.response if isinstance(err.response, requests.Response) else None
    if status is None:
        message = f"Jira replied without an HTTP status while {words}"
        return OutcomeUnknownError(message) if write else RemoteUnavailableError(message)

    # Without a response, err.text is the library's own message; with one,
    # only a JSON error body is quoted, never an HTML page from a proxy.
    detail = error_detail(response) if response is not None else _shorten(err.text or "")
    suffix = f": {detail}" if detail else ""
    headers = response.headers if response is not None else {}
    retry_after = parse_retry_after(headers.get("Retry-After"), headers.get("Date"))

    if status == 401 or (status == 403 and (opening or "X-Authentication-Denied-Reason" in headers)):
        # Jira's sentence ends with a period, which would clash with the advice after it.
        clause = f": {detail.rstrip('. ')}" if detail else ""
        return CredentialsRejectedError(
            f"Jira{_at(url)} rejected the credentials while {words} (HTTP {status}){clause}; "
            "check the account and the API token or password in ticket.auth"
        )
    if status == 429 or (status == 503 and retry_after is not None):
        return RateLimitedError(f"Jira rate-limited the request while {words} (HTTP {status})", retry_after, status)
    if status == 408:
        return RemoteUnavailableError(f"Jira timed out reading the request while {words} (HTTP 408)")
    if status >= 500:
        message = f"Jira failed while {words} (HTTP {status}){suffix}"
        return OutcomeUnknownError(message) if write else RemoteUnavailableError(message)
    if opening and status == 404:
        return ConnectionFatalError(
            f"no Jira REST API found{_at(url)} while {words} (HTTP 404): check ticket.url"
        )
    if status == 413:
        return RejectedError(
            f"Jira rejected the request as too large while {words} (HTTP 413){suffix}; "
            "a file above Jira's attachment size limit cannot be attached",
            status=status,
        )
    return RejectedError(f"Jira rejected the request while {words} (HTTP {status}){suffix}", status=status)


def _from_transport(err: requests.RequestException, words: str, *, write: bool, url: str | None) -> ConnectorError:
    reason = type(err).__name__
    url = url or _request_origin(err)
    certificate_error = _certificate_error(err)
    if certificate_error is not None:
        # The TLS handshake failed, so the request was not sent, write or not.
        host = urlsplit(url).hostname if url else None
        target = f" to {_without_credentials(url)}" if url else ""
        return RemoteUnavailableError(
            f"Jira connection{target} failed: {certificate_problem(host, certificate_error)}"
        )
    if _never_sent(err):
        return RemoteUnavailableError(
            f"cannot connect to Jira{_at(url)} while {words}: {reason}; check ticket.url and the network"
        )
    if write:
        return OutcomeUnknownError(
            f"Jira{_at(url)} did not reply while {words} ({reason}), so the write may have been applied; "
            "look it up by its marker before sending it again"
        )
    return RemoteUnavailableError(f"Jira{_at(url)} did not reply while {words} ({reason})")


def _at(url: str | None) -> str:
    """Return " at URL" for a message, or "" without a URL."""
    return f" at {_without_credentials(url)}" if url else ""


def _without_credentials(url: str) -> str:
    """Return `url` without a user name or password, which must not reach a message."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def _request_origin(err: requests.RequestException) -> str | None:
    """Return the scheme, host and port of the failed request, or None when requests did not attach it."""
    request_url = err.request.url if err.request is not None else None
    if not request_url:
        return None
    parts = urlsplit(request_url)
    if not parts.scheme or not parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def _never_sent(err: requests.RequestException) -> bool:
    """Return whether the request certainly did not reach Jira, because no connection was made."""
    if isinstance(err, requests.ConnectTimeout):
        return True
    if not isinstance(err, requests.ConnectionError) or isinstance(err, requests.exceptions.ProxyError):
        return False
    cause = err.args[0] if err.args else None
    if isinstance(cause, MaxRetryError):
        cause = cause.reason
    # urllib3 2 raises NewConnectionError (and its NameResolutionError) only
    # when the TCP connection itself failed.
    return isinstance(cause, NewConnectionError)


def _certificate_error(err: requests.RequestException) -> ssl.SSLCertVerificationError | None:
    """Find the certificate check failure that requests wraps as SSLError(MaxRetryError(SSLError(...)))."""
    if not isinstance(err, requests.exceptions.SSLError):
        return None
    pending: list[object] = [err]
    seen: set[int] = set()
    while pending:
        item = pending.pop()
        if isinstance(item, ssl.SSLCertVerificationError):
            return item
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        pending.extend([*item.args, getattr(item, "reason", None), item.__cause__, item.__context__])
    return None


def error_detail(response: requests.Response | None) -> str:
    """Return Jira's `errorMessages` and field `errors` as one line, or "" for a non-JSON body."""
    if response is None:
        return ""
    try:
        body = response.json()
    except (ValueError, json.JSONDecodeError):
        return ""
    if not isinstance(body, dict):
        return ""

    parts: list[str] = []
    messages = body.get("errorMessages")
    if isinstance(messages, list):
        parts.extend(str(message) for message in messages if message)
    errors = body.get("errors")
    if isinstance(errors, dict):
        parts.extend(f"{name}: {message}" for name, message in errors.items())
    for key in ("message", "errorMessage"):
        if not parts and isinstance(body.get(key), str):
            parts.append(body[key])
    return _shorten("; ".join(parts))


def _shorten(text: str) -> str:
    text = " ".join(text.split())
    if len(text) <= MAX_DETAIL_LENGTH:
        return text
    return text[: MAX_DETAIL_LENGTH - 1] + "…"
