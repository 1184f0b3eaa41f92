"""Fixtures that run the ServiceNow simulator on loopback, open adapters on it, and run the engine against it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml
from fixtures_mdr import MDR_CLIENT_ID, MDR_CONNECTION_NAME

from mdr_connector.adapters.mdr.client import MdrClient
from mdr_connector.adapters.mdr.simulator import MdrSimulator
from mdr_connector.adapters.servicenow.adapter import ServiceNowTicketAdapter
from mdr_connector.adapters.servicenow.simulator import (
    OAUTH_CLIENT_ID,
    OAUTH_CLIENT_SECRET,
    SERVICE_PASSWORD,
    SERVICE_USER,
    ServiceNowSimulator,
    run_simulator,
)
from mdr_connector.connector.config import ConnectionSettings, MdrSettings, ServiceNowSettings, Settings, SyncSettings
from mdr_connector.connector.engine import ConnectionSync
from mdr_connector.connector.retry import RetryPolicy
from mdr_connector.connector.service import open_connection
from mdr_connector.connector.store import Store

SECRET_VARIABLE = "MDR_TEST_SERVICENOW_SECRET"
# The assignment group and category of the tickets the adapter tests create; both exist in the simulator.
GROUP = "SOC"
CATEGORY = "software"


@dataclass
class RunningServiceNow:
    """A simulator and the loopback URL it serves."""

    sim: ServiceNowSimulator
    url: str


StartServiceNow = Callable[..., Awaitable[RunningServiceNow]]
MakeAdapter = Callable[..., Awaitable[ServiceNowTicketAdapter]]


@pytest.fixture
async def start_servicenow() -> AsyncIterator[StartServiceNow]:
    """Start simulators with custom options; all stop when the test ends."""
    async with AsyncExitStack() as stack:

        async def start(**options: Any) -> RunningServiceNow:
            sim = ServiceNowSimulator(**options)
            url = await stack.enter_async_context(run_simulator(sim))
            return RunningServiceNow(sim, url)

        yield start


@pytest.fixture
async def servicenow(start_servicenow: StartServiceNow) -> RunningServiceNow:
    """A simulator with the incident table and default settings."""
    return await start_servicenow()


def servicenow_settings(
    running: RunningServiceNow, monkeypatch: pytest.MonkeyPatch, *, oauth: bool = False, **overrides: Any
) -> ServiceNowSettings:
    """Settings for the connector's account on `running`, with Basic or OAuth credentials read from the environment."""
    monkeypatch.setenv(SECRET_VARIABLE, OAUTH_CLIENT_SECRET if oauth else SERVICE_PASSWORD)
    secret = {"env": SECRET_VARIABLE}
    auth: dict[str, Any] = (
        {"type": "oauth_client_credentials", "client_id": OAUTH_CLIENT_ID, "client_secret": secret, "username": SERVICE_USER}
        if oauth
        else {"type": "basic", "username": SERVICE_USER, "password": secret}
    )
    values: dict[str, Any] = {"system": "servicenow", "url": running.url, "auth": auth, "timeout_seconds": 10}
    values["table"] = running.sim.table
    values.update(overrides)
    return ServiceNowSettings.model_validate(values)


@pytest.fixture
async def make_servicenow_adapter(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[MakeAdapter]:
    """Open adapters against a running simulator; all close when the test ends."""
    adapters: list[ServiceNowTicketAdapter] = []

    async def make(
        running: RunningServiceNow, *, oauth: bool = False, clock: Callable[[], float] | None = None, **overrides: Any
    ) -> ServiceNowTicketAdapter:
        settings = servicenow_settings(running, monkeypatch, oauth=oauth, **overrides)
        adapter = ServiceNowTicketAdapter(settings, GROUP, **({"clock": clock} if clock else {}))
        adapters.append(adapter)
        await adapter.open()
        return adapter

    yield make
    for adapter in adapters:
        await adapter.close()


@pytest.fixture
async def sn_adapter(servicenow: RunningServiceNow, make_servicenow_adapter: MakeAdapter) -> ServiceNowTicketAdapter:
    """An opened adapter with Basic credentials on the default simulator."""
    return await make_servicenow_adapter(servicenow)


def servicenow_mapping(path: Path, **changes: Any) -> Path:
    """Write the built-in ServiceNow mapping with `changes` applied to its top-level keys, and return its path.

    Its assignment group SOC and category inquiry exist in the simulator.
    """
    raw = yaml.safe_load(resources.files("mdr_connector.mappings").joinpath("servicenow.yaml").read_text(encoding="utf-8"))
    raw.update(changes)
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return path


@dataclass
class ServiceNowSyncHarness:
    """The MDR and ServiceNow simulators, one connection's settings, the ledger, and engines built as the service builds them."""

    mdr_sim: MdrSimulator
    servicenow: RunningServiceNow
    settings: Settings
    store: Store
    stack: AsyncExitStack
    clock_offset: timedelta = field(default_factory=timedelta)

    @property
    def sim(self) -> ServiceNowSimulator:
        return self.servicenow.sim

    @property
    def connection(self) -> ConnectionSettings:
        return self.settings.connections[0]

    def now(self) -> datetime:
        return datetime.now(timezone.utc) + self.clock_offset

    def advance(self, seconds: float) -> None:
        """Move the connector's clock and both simulators' clocks forward together."""
        self.clock_offset += timedelta(seconds=seconds)
        self.mdr_sim.advance(seconds)
        self.sim.advance(seconds)

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
        """Use a new simulator mapping with `changes` applied to its top-level keys, from the next engine on."""
        path = self.settings.data_dir / f"mapping-{len(list(self.settings.data_dir.glob('mapping-*.yaml')))}.yaml"
        servicenow_mapping(path, **changes)
        connection = self.connection.model_copy(update={"mapping": str(path)})
        self.settings = self.settings.model_copy(update={"connections": [connection]})

    def seed(self, **fields: Any) -> dict[str, Any]:
        return self.mdr_sim.seed_incident(MDR_CLIENT_ID, **fields)

    def tickets_for(self, incident_id: str) -> list[dict[str, Any]]:
        return [row for row in self.sim.incidents.values() if row.get("correlation_id") == incident_id]

    def ticket_for(self, incident_id: str) -> dict[str, Any]:
        [row] = self.tickets_for(incident_id)
        return row

    def journal_of(self, incident_id: str) -> list[dict[str, Any]]:
        sys_id = self.ticket_for(incident_id)["sys_id"]
        return [entry for entry in self.sim.journal if entry["element_id"] == sys_id]

    def mdr_comments(self, incident_id: str) -> list[dict[str, Any]]:
        return self.mdr_sim.comments(MDR_CLIENT_ID, incident_id)


@asynccontextmanager
async def open_servicenow_harness(
    tmp_path: Path,
    mdr_sim: MdrSimulator,
    mdr_url: str,
    start_servicenow: StartServiceNow,
    monkeypatch: pytest.MonkeyPatch,
    database_url: str | None = None,
    **mapping_changes: Any,
) -> AsyncIterator[ServiceNowSyncHarness]:
    """Start ServiceNow, activate the MDR token chain and open an empty ledger.

    The ledger is `database_url`, which must name an empty database, else SQLite in `tmp_path`.
    """
    servicenow = await start_servicenow()
    token_dir = tmp_path / "tokens"
    token_dir.mkdir(mode=0o700, exist_ok=True)
    mapping = servicenow_mapping(tmp_path / "mapping-servicenow.yaml", **mapping_changes)
    settings = Settings(
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
                ticket=servicenow_settings(servicenow, monkeypatch),
                mapping=str(mapping),
                sync=SyncSettings(interval_seconds=1, retry_base_seconds=1, retry_max_seconds=2),
            )
        ],
    )
    async with MdrClient(settings.connections[0].mdr) as client:
        await client.tokens.activate(mdr_sim.issue_console_token(MDR_CLIENT_ID))

    store = await Store.open(settings.resolved_database_url())
    try:
        async with AsyncExitStack() as stack:
            yield ServiceNowSyncHarness(mdr_sim, servicenow, settings, store, stack)
    finally:
        await store.close()


@pytest.fixture
async def sn_harness(
    tmp_path: Path,
    mdr_sim: MdrSimulator,
    mdr_url: str,
    start_servicenow: StartServiceNow,
    monkeypatch: pytest.MonkeyPatch,
    ledger_url: str | None,
) -> AsyncIterator[ServiceNowSyncHarness]:
    """An activated MDR token chain, an empty ledger and a ServiceNow simulator, with the built-in ServiceNow mapping."""
    async with open_servicenow_harness(
        tmp_path, mdr_sim, mdr_url, start_servicenow, monkeypatch, database_url=ledger_url
    ) as opened:
        yield opened
