"""A harness that runs the real engine against the MDR and Jira simulators on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from fixtures_jira import RunningJira, StartJira, jira_settings
from fixtures_mdr import MDR_CLIENT_ID, MDR_CONNECTION_NAME
from fixtures_postgres import scratch_database

from mdr_connector.adapters.mdr.client import MdrClient
from mdr_connector.adapters.mdr.simulator import MdrSimulator
from mdr_connector.connector.config import (
    ConnectionSettings,
    MdrSettings,
    Settings,
    SyncSettings,
)
from mdr_connector.connector.engine import ConnectionSync
from mdr_connector.connector.mappingfile import load_mapping
from mdr_connector.connector.retry import RetryPolicy
from mdr_connector.connector.service import open_connection
from mdr_connector.connector.store import Store


@dataclass
class SyncHarness:
    """Both simulators, one connection's settings, the ledger, and engines built like the service builds them."""

    mdr_sim: MdrSimulator
    jira: RunningJira
    settings: Settings
    store: Store
    stack: AsyncExitStack
    clock_offset: timedelta = field(default_factory=timedelta)

    @property
    def connection(self) -> ConnectionSettings:
        return self.settings.connections[0]

    def now(self) -> datetime:
        return datetime.now(timezone.utc) + self.clock_offset

    def advance(self, seconds: float) -> None:
        """Move the connector's clock and both simulators' clocks forward together."""
        self.clock_offset += timedelta(seconds=seconds)
        self.mdr_sim.advance(seconds)
        self.jira.sim.advance(seconds)

    async def engine(self) -> ConnectionSync:
        """A fresh engine, as after a process restart: nothing kept in memory but the ledger."""
        sync = await self.stack.enter_async_context(open_connection(self.settings, self.connection, self.store))
        sync.clock = self.now
        sync.read_policy = RetryPolicy(attempts=2, base_seconds=0.01, max_seconds=0.05)
        return sync

    async def cycles(self, count: int, sync: ConnectionSync | None = None) -> ConnectionSync:
        sync = sync or await self.engine()
        for _cycle in range(count):
            await sync.run_cycle()
        return sync

    def use_mapping(self, **changes: Any) -> None:
        """Write the built-in Jira mapping with `changes` applied to its top-level keys, and use it from the next engine on."""
        import yaml
        from importlib import resources

        raw = yaml.safe_load(resources.files("mdr_connector.mappings").joinpath("jira.yaml").read_text(encoding="utf-8"))
        raw.update(changes)
        path = self.settings.data_dir / f"mapping-{len(list(self.settings.data_dir.glob('mapping-*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
        connection = self.connection.model_copy(update={"mapping": str(path)})
        self.settings = self.settings.model_copy(update={"connections": [connection]})

    def use_sync(self, **changes: Any) -> None:
        """Change the connection's sync settings from the next engine on."""
        sync = self.connection.sync.model_copy(update=changes)
        connection = self.connection.model_copy(update={"sync": sync})
        self.settings = self.settings.model_copy(update={"connections": [connection]})

    def seed(self, **fields: Any) -> dict[str, Any]:
        return self.mdr_sim.seed_incident(MDR_CLIENT_ID, **fields)

    def issues_for(self, incident_id: str) -> list[Any]:
        return [
            issue for issue in self.jira.sim.issues.values() if f"mdr-{incident_id}" in issue.fields.get("labels", [])
        ]

    def issue_for(self, incident_id: str) -> Any:
        [issue] = self.issues_for(incident_id)
        return issue

    def mdr_comments(self, incident_id: str) -> list[dict[str, Any]]:
        return self.mdr_sim.comments(MDR_CLIENT_ID, incident_id)


def harness_settings(
    tmp_path: Path,
    mdr_url: str,
    jira: RunningJira,
    monkeypatch: pytest.MonkeyPatch,
    database_url: str | None = None,
    **sync: Any,
) -> Settings:
    """Settings of one connection named main; the ledger is `database_url`, else SQLite in `tmp_path`."""
    token_dir = tmp_path / "tokens"
    token_dir.mkdir(mode=0o700, exist_ok=True)
    sync_values = {"interval_seconds": 1, "retry_base_seconds": 1, "retry_max_seconds": 2, **sync}
    return Settings(
        data_dir=tmp_path,
        database_url=database_url,
        connections=[
            ConnectionSettings(
                name="main",
                mdr=MdrSettings(
                    base_url=mdr_url,
                    client_id=MDR_CLIENT_ID,
                    connection_name=MDR_CONNECTION_NAME,
                    token_dir=token_dir,
                    timeout_seconds=10,
                ),
                ticket=jira_settings(jira, monkeypatch, search_delay_seconds=30),
                mapping="builtin:jira",
                sync=SyncSettings(**sync_values),
            )
        ],
    )


@pytest.fixture
def ledger_backend() -> str:
    """The database engine of the harness ledger.

    SQLite by default. A test module that also runs on PostgreSQL overrides
    this fixture with one parametrized over `LEDGER_BACKENDS`.
    """
    return "sqlite"


@pytest.fixture
async def ledger_url(ledger_backend: str) -> AsyncIterator[str | None]:
    """The URL of an empty scratch PostgreSQL ledger, or None for SQLite in the test's data folder."""
    if ledger_backend == "sqlite":
        yield None
        return

    async with scratch_database() as url:
        yield url


@pytest.fixture
async def harness(
    tmp_path: Path,
    mdr_sim: MdrSimulator,
    mdr_url: str,
    start_jira: StartJira,
    monkeypatch: pytest.MonkeyPatch,
    ledger_url: str | None,
) -> AsyncIterator[SyncHarness]:
    """An activated token chain, an empty ledger, and Jira Cloud with a 30-second search delay."""
    async with open_harness(
        tmp_path, mdr_sim, mdr_url, start_jira, monkeypatch, deployment="cloud", database_url=ledger_url
    ) as opened:
        yield opened


@asynccontextmanager
async def open_harness(
    tmp_path: Path,
    mdr_sim: MdrSimulator,
    mdr_url: str,
    start_jira: StartJira,
    monkeypatch: pytest.MonkeyPatch,
    deployment: str,
    database_url: str | None = None,
) -> AsyncIterator[SyncHarness]:
    """Start Jira of `deployment` with a 30-second search delay, activate the token chain and open an empty ledger.

    The ledger is `database_url`, which must name an empty database, else SQLite in `tmp_path`.
    """
    jira = await start_jira(deployment=deployment, search_delay_seconds=30)
    settings = harness_settings(tmp_path, mdr_url, jira, monkeypatch, database_url=database_url)
    async with MdrClient(settings.connections[0].mdr) as client:
        await client.tokens.activate(mdr_sim.issue_console_token(MDR_CLIENT_ID))

    store = await Store.open(settings.resolved_database_url())
    async with AsyncExitStack() as stack:
        yield SyncHarness(mdr_sim, jira, settings, store, stack)
    await store.close()


def mapping() -> Any:
    return load_mapping("builtin:jira")
