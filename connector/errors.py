"""Errors of mdr-connector, grouped by what the caller does to recover.

    ConnectorError
    ├── ConfigError                 invalid config or mapping: fix the file, nothing runs
    ├── RetriableError              try the same call again later
    │   ├── RateLimitedError        429; carries the server's Retry-After in seconds
    │   ├── RemoteUnavailableError  timeout, connection error, 5xx
    │   └── OutcomeUnknownError     a write was sent but no reply came back:
    │                               look the write up by its marker before sending it again
    ├── ItemError                   permanent for one item: park it, keep syncing the rest
    │   ├── InvalidPayloadError     an MDR or ticket record fails validation
    │   └── RejectedError           the remote system refused the write (4xx)
    └── ConnectionFatalError        stop this connection, alert, keep the others running
        ├── TokenExpiredError       the MDR refresh token is expired, used or rejected
        ├── CredentialsRejectedError the ticket system refused the credentials
        ├── MisconfiguredError      a setting contradicts what the remote system reports
        └── ConnectionBusyError     another process already works this connection

Clients map library and HTTP errors onto this tree at their boundary and
raise with `from err`, so callers never catch aiohttp or jira exceptions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Self

from sqlalchemy.exc import DBAPIError


def failure_reason(err: BaseException) -> str:
    """Describe a failure for a log line or a parked entry.

    A database error is described by the driver's error alone. SQLAlchemy's
    own text adds the statement and its parameters: incident data such as
    host names and comment text, which `status` and `parked list` would show.
    """
    if isinstance(err, DBAPIError) and err.orig is not None:
        return f"{type(err).__name__}: {err.orig}"
    return f"{type(err).__name__}: {err}"


# The maximum wait a rate limit may impose, one day. A longer Retry-After is cut to this.
MAX_RETRY_AFTER_SECONDS = 86400.0


class ConnectorError(Exception):
    """Base of every error raised on purpose by mdr-connector.

    An error built with `from_template` keeps its English template and its
    values, so the CLI can show it in the user's language while logs and
    `str(error)` stay English.
    """

    template: str | None = None
    values: dict[str, object] | None = None

    @classmethod
    def from_template(cls, template: str, **values: object) -> Self:
        error = cls(template.format(**values))
        error.template = template
        error.values = values
        return error

    def localized(self, translate: Callable[[str], str]) -> str:
        """Render the message with `translate` applied to its template, or as is without one."""
        if self.template is None or self.values is None:
            return str(self)
        return translate(self.template).format(**self.values)


class ConfigError(ConnectorError):
    """An invalid configuration or mapping file."""


class RetriableError(ConnectorError):
    """A failure that may pass if the same call is made again later."""


class RateLimitedError(RetriableError):
    """The remote system replied 429 (or 503 with Retry-After), or its calls are paused after one.

    `status` is the HTTP status of the reply, or None when no request was
    sent because an earlier 429 paused every call to that system.
    """

    def __init__(self, message: str, retry_after: float | None, status: int | None = 429) -> None:
        super().__init__(message)
        # Capped here as well as where Retry-After is read, so that no path
        # can park an item, pause a client or delay a cycle for longer.
        if retry_after is not None and not retry_after <= MAX_RETRY_AFTER_SECONDS:
            retry_after = MAX_RETRY_AFTER_SECONDS
        self.retry_after = retry_after
        self.status = status


class RemoteUnavailableError(RetriableError):
    """A timeout, a connection error or a 5xx reply."""


class OutcomeUnknownError(RetriableError):
    """A write was sent, but whether the remote system applied it is unknown."""


class ItemError(ConnectorError):
    """A failure bound to one item (incident, comment) that retrying now will not fix."""


class InvalidPayloadError(ItemError):
    """A record read from a remote system does not have the expected shape."""


class RejectedError(ItemError):
    """The remote system refused a write with a 4xx reply."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ConnectionFatalError(ConnectorError):
    """A failure that stops one connection until a person acts."""


class TokenExpiredError(ConnectionFatalError):
    """The MDR refresh token is expired, already used, or rejected."""


class CredentialsRejectedError(ConnectionFatalError):
    """The ticket system or MDR refused the configured credentials."""


class MisconfiguredError(ConnectionFatalError):
    """A setting contradicts what the remote system reports, such as the MDR Connection Name."""


class ConnectionBusyError(ConnectionFatalError):
    """Another process holds the lock of this connection."""


class LeaseLostError(ConnectionFatalError):
    """This instance no longer holds the lease of a connection: it stops working it, another instance goes on."""
