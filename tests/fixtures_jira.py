"""Fixtures that run the Jira simulator on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import pytest

from mdr_connector.adapters.jira.adapter import JiraTicketAdapter
from mdr_connector.adapters.jira.simulator import (
    SERVICE_EMAIL,
    SERVICE_PAT,
    SERVICE_TOKEN,
    JiraSimulator,
    run_simulator,
)
from mdr_connector.connector.config import JiraSettings

SECRET_VARIABLE = "MDR_TEST_JIRA_SECRET"


@dataclass
class RunningJira:
    """A simulator and the loopback URL it serves."""

    sim: JiraSimulator
    url: str


StartJira = Callable[..., Awaitable[RunningJira]]
MakeAdapter = Callable[..., Awaitable[JiraTicketAdapter]]


@pytest.fixture
async def start_jira() -> AsyncIterator[StartJira]:
    """Start simulators with custom options; all stop when the test ends."""
    async with AsyncExitStack() as stack:

        async def start(**options: Any) -> RunningJira:
            sim = JiraSimulator(**options)
            url = await stack.enter_async_context(run_simulator(sim))
            return RunningJira(sim, url)

        yield start


@pytest.fixture
async def jira_cloud(start_jira: StartJira) -> RunningJira:
    """A Jira Cloud simulator with no search delay."""
    return await start_jira(deployment="cloud")


@pytest.fixture
async def jira_dc(start_jira: StartJira) -> RunningJira:
    """A Jira Data Center simulator."""
    return await start_jira(deployment="datacenter")


def jira_settings(running: RunningJira, monkeypatch: pytest.MonkeyPatch, **overrides: Any) -> JiraSettings:
    """Settings for the connector's service account on `running`, secret read from the environment."""
    cloud = running.sim.settings.deployment == "cloud"
    monkeypatch.setenv(SECRET_VARIABLE, SERVICE_TOKEN if cloud else SERVICE_PAT)
    auth: dict[str, Any] = (
        {"type": "api_token", "email": SERVICE_EMAIL, "token": {"env": SECRET_VARIABLE}}
        if cloud
        else {"type": "pat", "token": {"env": SECRET_VARIABLE}}
    )
    values: dict[str, Any] = {"system": "jira", "url": running.url, "auth": auth, "timeout_seconds": 10}
    values.update(overrides)
    return JiraSettings.model_validate(values)


@pytest.fixture
async def make_adapter(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[MakeAdapter]:
    """Open Jira adapters against a running simulator; all close when the test ends."""
    adapters: list[JiraTicketAdapter] = []

    async def make(running: RunningJira, project: str = "SEC", **overrides: Any) -> JiraTicketAdapter:
        adapter = JiraTicketAdapter(jira_settings(running, monkeypatch, **overrides), project)
        adapters.append(adapter)
        await adapter.open()
        return adapter

    yield make
    for adapter in adapters:
        await adapter.close()


@pytest.fixture
async def cloud_adapter(jira_cloud: RunningJira, make_adapter: MakeAdapter) -> JiraTicketAdapter:
    """An opened adapter on the Cloud simulator."""
    return await make_adapter(jira_cloud)


async def paged_issues(
    start_jira: StartJira, make_adapter: MakeAdapter, deployment: str, draft: Callable[[str], Any], step: float = 1
) -> tuple[RunningJira, JiraTicketAdapter, Any, list[Any]]:
    """Five issues made from `draft`, `step` seconds apart, on a Jira that pages searches by two; also the time before them."""
    running = await start_jira(deployment=deployment)
    running.sim.settings.search_page_cap = 2
    adapter = await make_adapter(running)
    since = running.sim.now()
    refs = []
    for number in range(5):
        refs.append(await adapter.create_ticket(draft(f"paged-{number}")))
        running.sim.advance(step)
    return running, adapter, since, refs
