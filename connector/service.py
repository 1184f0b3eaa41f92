"""Build a running connection from its settings: MDR client, ticket adapter, engine."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from mdr_connector.adapters.mdr.client import MdrClient
from mdr_connector.adapters.mdr.tokens import TokenStorage
from mdr_connector.connector.config import ConnectionSettings, Settings
from mdr_connector.connector.engine import ConnectionSync
from mdr_connector.connector.fencing import current_fence
from mdr_connector.connector.leases import MDR_WRITES, TICKET_WRITES, FencedClient
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


def token_storage(settings: Settings, connection: ConnectionSettings, store: Store | None) -> TokenStorage | None:
    """Return where the connection's MDR token pair is kept: the database in cluster mode, else None for the token file.

    `store` may be None only outside cluster mode.
    """
    if not settings.cluster.enabled:
        return None
    if store is None:
        raise AssertionError("cluster mode keeps the MDR token pair in the database, so it needs the ledger")
    from mdr_connector.adapters.mdr.token_database import DatabaseTokenStore, cipher_for

    return DatabaseTokenStore(store.engine, connection.mdr, cipher_for(settings.cluster))


def mdr_client(settings: Settings, connection: ConnectionSettings, store: Store | None) -> MdrClient:
    """Create the MDR client of a connection, with its token pair in the database in cluster mode."""
    return MdrClient(connection.mdr, token_storage=token_storage(settings, connection, store))


@contextlib.asynccontextmanager
async def open_mdr_client(
    settings: Settings, connection: ConnectionSettings, store: Store | None = None
) -> AsyncIterator[MdrClient]:
    """Open the MDR client of a connection for a command, and close it afterwards.

    In cluster mode the token pair is in the database: `store` when given,
    else the ledger opened here without migrating it and closed on exit.
    Outside cluster mode the token file is used and `store` is not needed.
    """
    if store is not None or not settings.cluster.enabled:
        async with mdr_client(settings, connection, store) as mdr:
            yield mdr
        return

    opened = await Store.open(settings.resolved_database_url(), upgrade=False)
    try:
        async with mdr_client(settings, connection, opened) as mdr:
            yield mdr
    finally:
        await opened.close()


@contextlib.asynccontextmanager
async def open_connection(
    settings: Settings, connection: ConnectionSettings, store: Store
) -> AsyncIterator[ConnectionSync]:
    """Open the MDR client and the ticket adapter of one connection, and close both afterwards."""
    mapping = load_mapping(connection.mapping)
    async with mdr_client(settings, connection, store) as mdr:
        tickets = build_ticket_adapter(connection, mapping)
        try:
            mdr_side: Any = mdr
            ticket_side: Any = tickets
            if current_fence() is not None:
                mdr_side = FencedClient(mdr, MDR_WRITES)
                ticket_side = FencedClient(tickets, TICKET_WRITES)
            sync = ConnectionSync(
                connection,
                mapping,
                store,
                mdr_side,
                ticket_side,
                spool_dir=settings.data_dir / "spool" / connection.name,
            )
            await sync.open()
            yield sync
        finally:
            await tickets.close()
