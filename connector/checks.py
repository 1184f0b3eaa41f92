"""`mdr-connector check`: test both ends of a connection without writing anything."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel

from mdr_connector.adapters.mdr.client import MdrClient
from mdr_connector.connector.config import ConnectionSettings, MdrSettings, SecretRef, Settings
from mdr_connector.connector.errors import ConnectorError
from mdr_connector.connector.i18n import N_, _
from mdr_connector.connector.mappingfile import load_mapping
from mdr_connector.connector.routing import check_destinations
from mdr_connector.connector.service import build_ticket_adapter, open_mdr_client
from mdr_connector.connector.tickets import system_title

CheckLine = tuple[str, bool]
TOKEN_FILE_ERROR = N_("MDR token file: {error}")
TOKEN_DATABASE_ERROR = N_("MDR token pair in the database: {error}")
# Permission bits that let group or others read or write a file.
SHARED_BITS = 0o077


def secret_file_warnings(settings: Settings, connections: list[ConnectionSettings]) -> list[str]:
    """Return one warning per secret file that group or others can read or write, each file once.

    The secrets checked are `database_url` and those of the given connections.
    """
    references = list(secret_files(settings.database_url, ("database_url",)))
    for connection in connections:
        references += [(f"{connection.name}: {key}", path) for key, path in secret_files(connection, ())]
    warnings: list[str] = []
    seen: set[Path] = set()
    for key, path in references:
        if path in seen:
            continue
        seen.add(path)
        try:
            mode = os.stat(path).st_mode
        except OSError:
            # A missing or unreadable secret file fails when the secret is read, with its own message.
            continue
        if mode & SHARED_BITS:
            warnings.append(
                _("{key}: secret file {path} can be read or written by group or others: "
                  "run `chmod 600 {path}`").format(key=key, path=path)
            )
    return warnings


def secret_files(value: object, keys: tuple[str, ...]) -> Iterator[tuple[str, Path]]:
    """Yield (key path, file) for each SecretRef with a `file` inside `value`, a settings model or a SecretRef."""
    if isinstance(value, SecretRef):
        if value.file is not None:
            yield ".".join(keys), value.file
        return
    if not isinstance(value, BaseModel):
        return
    for name in type(value).model_fields:
        yield from secret_files(getattr(value, name), (*keys, name))


async def check_connection(settings: Settings, connection: ConnectionSettings) -> list[CheckLine]:
    """Return one line per check with whether it passed; nothing is created or changed.

    In cluster mode the MDR token pair is read from the database, and the
    first read imports a token file left from single-instance mode.
    """
    return [*await check_mdr(settings, connection), *await check_tickets(connection)]


async def check_mdr(settings: Settings, connection: ConnectionSettings) -> list[CheckLine]:
    token_error = TOKEN_DATABASE_ERROR if settings.cluster.enabled else TOKEN_FILE_ERROR
    try:
        async with open_mdr_client(settings, connection) as mdr:
            return await check_mdr_client(mdr, connection.mdr, token_error)
    except ConnectorError as err:
        # Opening the ledger for the token pair failed (an outdated schema, a missing cluster.token_key).
        return [(_(token_error).format(error=err), False)]


async def check_mdr_client(mdr: MdrClient, settings: MdrSettings, token_error: str) -> list[CheckLine]:
    try:
        status = await mdr.tokens.read_status()
    except ConnectorError as err:
        return [(_(token_error).format(error=err), False)]
    if status.state in ("Pending activation", "Expired"):
        return [
            (
                _("MDR token is {state}: issue a token in the MDR console (Settings, API) "
                  "and run `mdr-connector token activate`").format(state=_(status.state)),
                False,
            )
        ]

    lines = [(_("MDR token is {state}").format(state=_(status.state)), True)]
    try:
        await mdr.count_incidents(min_update_time=int(time.time() * 1000))
    except ConnectorError as err:
        lines.append((_("MDR API at {url}: {error}").format(url=settings.base_url, error=err), False))
    else:
        lines.append((_("MDR API at {url} answers for client {client}").format(
            url=settings.base_url, client=settings.client_id), True))
    return lines


# The line `check` prints for a mapping's `project` and `issue_type`, in each ticket system's terms.
DESTINATION_FOUND = {
    "jira": N_("project {project}, issue type {issue_type} and priorities exist"),
    "servicenow": N_("assignment group {project}, category {issue_type} and priorities exist"),
    "redmine": N_("project {project}, tracker {issue_type} and priorities exist"),
}


async def check_tickets(connection: ConnectionSettings) -> list[CheckLine]:
    mapping = load_mapping(connection.mapping)
    adapter = build_ticket_adapter(connection, mapping)
    try:
        account = await adapter.open()
        lines = [(_("{system} at {url} accepts the credentials of {account}").format(
            system=system_title(adapter.system), url=connection.ticket.url, account=account.display_name), True)]
        problems = await check_destinations(mapping, adapter)
    except ConnectorError as err:
        return [(_("{system} at {url}: {error}").format(
            system=system_title(connection.ticket.system), url=connection.ticket.url, error=err), False)]
    finally:
        await adapter.close()

    lines += [(problem, False) for problem in problems]
    if not problems:
        template = DESTINATION_FOUND.get(connection.ticket.system, DESTINATION_FOUND["jira"])
        lines.append((_(template).format(project=mapping.project, issue_type=mapping.issue_type), True))
    return lines
