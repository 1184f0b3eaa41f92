"""`mdr-connector check`: test both ends of a connection without writing anything."""

from __future__ import annotations

import time

from mdr_connector.adapters.mdr.client import MdrClient
from mdr_connector.connector.config import ConnectionSettings
from mdr_connector.connector.errors import ConnectorError
from mdr_connector.connector.i18n import _
from mdr_connector.connector.mappingfile import load_mapping
from mdr_connector.connector.service import build_ticket_adapter

CheckLine = tuple[str, bool]


async def check_connection(connection: ConnectionSettings) -> list[CheckLine]:
    """Return one line per check with whether it passed; nothing is created or changed."""
    return [*await check_mdr(connection), *await check_tickets(connection)]


async def check_mdr(connection: ConnectionSettings) -> list[CheckLine]:
    settings = connection.mdr
    async with MdrClient(settings) as mdr:
        try:
            status = mdr.tokens.status()
        except ConnectorError as err:
            return [(_("MDR token file: {error}").format(error=err), False)]
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


async def check_tickets(connection: ConnectionSettings) -> list[CheckLine]:
    mapping = load_mapping(connection.mapping)
    adapter = build_ticket_adapter(connection, mapping)
    try:
        account = await adapter.open()
        lines = [(_("{system} at {url} accepts the credentials of {account}").format(
            system=adapter.system.title(), url=connection.ticket.url, account=account.display_name), True)]
        problems = await adapter.check(mapping.issue_type, mapping.priority.values())
    except ConnectorError as err:
        return [(_("{system} at {url}: {error}").format(
            system=connection.ticket.system.title(), url=connection.ticket.url, error=err), False)]
    finally:
        await adapter.close()

    lines += [(problem, False) for problem in problems]
    if not problems:
        lines.append((_("project {project}, issue type {issue_type} and priorities exist").format(
            project=mapping.project, issue_type=mapping.issue_type), True))
    return lines
