"""Pytest fixtures for testing an mdr-connector setup in CI, with no ticket server and no MDR account.

Load them in a `conftest.py`:

    pytest_plugins = ["mdr_connector.connector.testing"]

They need the `test` extra (pytest and pytest-asyncio). All of them are
function-scoped and listen on loopback only:

- `mdr_simulator`: the MDR simulator on a free loopback port, with one
  client and an activated token chain whose token file lies in the test's
  temporary folder (a `RunningMdr`);
- `memory_tickets`: an opened `MemoryTicketAdapter` whose project is the
  mapping's project and whose search finds every write at once;
- `sync_connection`: the sync engine (`ConnectionSync`) of one connection
  between the two, built as the service builds it and opened, so a test
  calls `await sync_connection.run_cycle()` and inspects both sides;
- `mdr_connector_mapping`: the mapping the engine uses, `builtin:jira`
  unless a test module or conftest overrides this fixture with a path.

`open_sync_connection` builds the same engine with other sync settings.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from mdr_connector.adapters.mdr.client import MdrClient
from mdr_connector.adapters.mdr.simulator import MdrSimulator, run_simulator
from mdr_connector.adapters.memory.adapter import MemoryTicketAdapter
from mdr_connector.connector.config import (
    ConnectionSettings,
    JiraApiTokenAuth,
    JiraSettings,
    MdrSettings,
    SecretRef,
    Settings,
    SyncSettings,
)
from mdr_connector.connector.engine import ConnectionSync
from mdr_connector.connector.mappingfile import load_mapping
from mdr_connector.connector.store import Store
from mdr_connector.connector.tickets import TicketCapabilities

__all__ = [
    "CLIENT_ID",
    "CONNECTION_NAME",
    "RunningMdr",
    "memory_tickets",
    "mdr_connector_mapping",
    "mdr_simulator",
    "open_sync_connection",
    "sync_connection",
]

CLIENT_ID = "c1ca11ab1e0c144a4b9a3af0c1ca11ab1e"
CONNECTION_NAME = "mdr-connector tests"
# The simulator's random data, fixed so that every run seeds the same incidents.
SIMULATOR_SEED = 2026
# The engine reads nothing from these ticket settings, because the memory
# adapter takes the place of the adapter they describe. Nothing listens on
# port 9 (discard), and the secret is never read.
UNUSED_TICKET_SETTINGS = JiraSettings(
    system="jira",
    url="http://127.0.0.1:9",
    auth=JiraApiTokenAuth(
        type="api_token", email="memory-tickets@example.test", token=SecretRef(env="MDR_CONNECTOR_TESTING_UNUSED")
    ),
)


@dataclass
class RunningMdr:
    """The MDR simulator on loopback, its client and the settings the connector reaches it with."""

    sim: MdrSimulator
    url: str
    settings: MdrSettings

    @property
    def client_id(self) -> str:
        return self.settings.client_id

    def seed_incident(self, **fields: Any) -> dict[str, Any]:
        """Create an incident as the SOC would; `fields` override the realistic defaults. Returns its record."""
        return self.sim.seed_incident(self.client_id, **fields)

    def add_soc_comment(self, incident_id: str, text: str) -> dict[str, Any]:
        """Add a SOC analyst's comment (HTML text) to an incident."""
        return self.sim.add_soc_comment(self.client_id, incident_id, text)

    def incident(self, incident_id: str) -> dict[str, Any]:
        """Return an incident's current record."""
        return self.sim.incident(self.client_id, incident_id)

    def comments(self, incident_id: str) -> list[dict[str, Any]]:
        """Return an incident's comments, oldest first, each with `author_name` and `origin`."""
        return self.sim.comments(self.client_id, incident_id)


@pytest.fixture
def mdr_connector_mapping() -> str:
    """The mapping of the tested connection: a `builtin:` name or a path. Override it to test your own file."""
    return "builtin:jira"


@pytest_asyncio.fixture(loop_scope="function")
async def mdr_simulator(tmp_path: Path) -> AsyncIterator[RunningMdr]:
    """The MDR simulator on a free loopback port with one client and an activated token chain."""
    sim = MdrSimulator(seed=SIMULATOR_SEED)
    sim.create_client(CLIENT_ID, connection_name=CONNECTION_NAME)
    token_dir = tmp_path / "mdr-tokens"
    token_dir.mkdir(mode=0o700)

    try:
        async with run_simulator(sim) as url:
            settings = MdrSettings(base_url=url, client_id=CLIENT_ID, connection_name=CONNECTION_NAME, token_dir=token_dir)
            async with MdrClient(settings) as client:
                await client.tokens.activate(sim.issue_console_token(CLIENT_ID))
            yield RunningMdr(sim, url, settings)
    finally:
        sim.close()


@pytest_asyncio.fixture(loop_scope="function")
async def memory_tickets(mdr_connector_mapping: str) -> AsyncIterator[MemoryTicketAdapter]:
    """An opened in-memory ticket system whose project is the mapping's project, with no search delay."""
    # The fake replaces any ticket system, so it accepts each system's comment visibility.
    capabilities = TicketCapabilities(visibility_types=frozenset({"role", "group", "internal"}))
    adapter = MemoryTicketAdapter(project=load_mapping(mdr_connector_mapping).project, capabilities=capabilities)
    await adapter.open()
    try:
        yield adapter
    finally:
        await adapter.close()


@pytest_asyncio.fixture(loop_scope="function")
async def sync_connection(
    tmp_path: Path, mdr_simulator: RunningMdr, memory_tickets: MemoryTicketAdapter, mdr_connector_mapping: str
) -> AsyncIterator[ConnectionSync]:
    """The opened sync engine of one connection between `mdr_simulator` and `memory_tickets`."""
    async with open_sync_connection(tmp_path / "connector", mdr_simulator, memory_tickets, mdr_connector_mapping) as sync:
        yield sync


@contextlib.asynccontextmanager
async def open_sync_connection(
    data_dir: Path,
    mdr: RunningMdr,
    tickets: MemoryTicketAdapter,
    mapping: str = "builtin:jira",
    **sync_settings: Any,
) -> AsyncIterator[ConnectionSync]:
    """Open the engine as the service does, with a SQLite ledger in `data_dir` and `sync_settings` applied.

    The engine uses the real clock. It closes its MDR client and the ledger
    on exit; `tickets` stays open.
    """
    settings = _settings(data_dir, mdr.settings, mapping, SyncSettings(**sync_settings))
    connection = settings.connections[0]
    store = await Store.open(settings.resolved_database_url())
    try:
        async with MdrClient(connection.mdr) as client:
            sync = ConnectionSync(
                connection,
                load_mapping(mapping),
                store,
                client,
                tickets,
                spool_dir=data_dir / "spool" / connection.name,
            )
            await sync.open()
            yield sync
    finally:
        await store.close()


def _settings(data_dir: Path, mdr: MdrSettings, mapping: str, sync: SyncSettings) -> Settings:
    data_dir.mkdir(parents=True, exist_ok=True)
    connection = ConnectionSettings(name="tests", mdr=mdr, ticket=UNUSED_TICKET_SETTINGS, mapping=mapping, sync=sync)
    return Settings(data_dir=data_dir, connections=[connection])
