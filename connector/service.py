"""Build a running connection from its settings: MDR client, ticket adapter, engine."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from mdr_connector.adapters.mdr.client import MdrClient
from mdr_connector.connector.config import ConnectionSettings, Settings
from mdr_connector.connector.engine import ConnectionSync
from mdr_connector.connector.mappingfile import Mapping, load_mapping
from mdr_connector.connector.routing import mapping_projects
from mdr_connector.connector.store import Store
from mdr_connector.connector.tickets import TicketAdapter


def ticket_adapter_class(system: str) -> type[TicketAdapter]:
    """Return the adapter class of a ticket system, imported only when a connection uses it."""
    if system == "jira":
        from mdr_connector.adapters.jira.adapter import JiraTicketAdapter

        return JiraTicketAdapter
    if system == "servicenow":
        from mdr_connector.adapters.servicenow.adapter import ServiceNowTicketAdapter

        return ServiceNowTicketAdapter
    if system == "redmine":
        from mdr_connector.adapters.redmine.adapter import RedmineTicketAdapter

        return RedmineTicketAdapter
    raise AssertionError(f"unknown ticket system {system!r} passed config validation")


def build_ticket_adapter(connection: ConnectionSettings, mapping: Mapping) -> TicketAdapter:
    """Create the adapter of the connection's ticket system."""
    adapter_class: Any = ticket_adapter_class(connection.ticket.system)
    return adapter_class(connection.ticket, project=mapping.project, other_projects=mapping_projects(mapping)[1:])


@contextlib.asynccontextmanager
async def open_connection(
    settings: Settings, connection: ConnectionSettings, store: Store
) -> AsyncIterator[ConnectionSync]:
    """Open the MDR client and the ticket adapter of one connection, and close both afterwards."""
    mapping = load_mapping(connection.mapping)
    async with MdrClient(connection.mdr) as mdr:
        tickets = build_ticket_adapter(connection, mapping)
        try:
            sync = ConnectionSync(
                connection, mapping, store, mdr, tickets, spool_dir=settings.data_dir / "spool" / connection.name
            )
            await sync.open()
            yield sync
        finally:
            await tickets.close()
