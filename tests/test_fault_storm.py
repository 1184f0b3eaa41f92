"""Fault storms: a fixed scenario synced under 20% 5xx, 5% dropped-after-commit and 10% 429 ends as it does fault-free.

Each variant plays one scenario twice, on fresh simulators: once with the
storm on every endpoint of MDR and of the ticket system, until the ledger has
no parked items, and once with no faults. After a final clean cycle the two
end states must be equal: one ticket per incident, every comment and
attachment on both sides once, the same statuses.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fixtures_jira import StartJira
from fixtures_mdr import MDR_CLIENT_ID, MDR_CONNECTION_NAME
from fixtures_servicenow import ServiceNowSyncHarness, StartServiceNow, open_servicenow_harness
from fixtures_sync import SyncHarness, open_harness

from mdr_connector.adapters.faults import FaultPlan
from mdr_connector.adapters.mdr.simulator import MdrSimulator, run_simulator
from mdr_connector.adapters.servicenow.simulator_schema import IN_PROGRESS, ON_HOLD
from mdr_connector.connector import retry
from mdr_connector.connector.engine import ConnectionSync
from mdr_connector.connector.errors import ConnectionFatalError, ConnectorError

pytestmark = pytest.mark.asyncio

INCIDENTS = 30
# The storm on every API endpoint of both simulators: 20% 5xx, 5% dropped after commit, 10% 429.
STORM = (
    {"kind": "server_error", "probability": 0.20},
    {"kind": "drop_after_commit", "probability": 0.05},
    {"kind": "rate_limit", "probability": 0.10, "retry_after_seconds": 0},
)
# Each cycle moves every clock past Jira's search delay (30 s) and the parked backoff, so a cycle reads what the last one wrote.
CYCLE_SECONDS = 31
MAX_STORM_CYCLES = 40
# Cycles in a row without a parked item before a stage counts as settled.
SETTLED_CYCLES = 2
MARKER = re.compile(r"\b(?:mdr|ticket) note \d+[ab]?\b")
# Jira's status mapping for the scenario: MDR Resolved moves the issue to Done, and Done closes the incident.
JIRA_STATUS = {
    "to_ticket": {"Open": "To Do", "On hold": "On Hold", "Resolved": "Done", "Closed": "Done"},
    "close_mdr": {"enabled": True, "done_statuses": ["Done"], "resolutions": {"Done": "TRUE_POSITIVE"}},
}
# Open maps to a status other than New, the one a ServiceNow incident is created in, so every new ticket has a first move,
# which a failure between the create and the status step must not lose.
SERVICENOW_STATUS = {"to_ticket": {"Open": "In Progress", "On hold": "On Hold"}}


def storm(plan: FaultPlan, seed: int) -> None:
    plan.configure({"seed": seed, "rules": list(STORM)})


@dataclass
class Ledger:
    """What a run went through: cycles per stage, the most parked items at once, and errors per class."""

    cycles: list[int] = field(default_factory=list)
    parked_peak: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    fired: Counter[str] = field(default_factory=Counter)


async def settle(harness: Any, sync: ConnectionSync, ledger: Ledger, *, limit: int = MAX_STORM_CYCLES) -> None:
    """Run cycles, as the service does, until the ledger has had no parked item for SETTLED_CYCLES cycles.

    A retriable or per-item error ends a cycle early and the next cycle goes
    on; a fatal error or any other exception ends the test.
    """
    quiet = 0
    for cycle in range(1, limit + 1):
        harness.advance(CYCLE_SECONDS)
        try:
            await sync.run_cycle()
        except ConnectionFatalError:
            raise
        except ConnectorError as err:
            ledger.errors[type(err).__name__] += 1
            quiet = 0
            continue
        parked = await harness.store.count_parked("main")
        ledger.parked_peak = max(ledger.parked_peak, parked)
        quiet = quiet + 1 if parked == 0 else 0
        if quiet >= SETTLED_CYCLES:
            ledger.cycles.append(cycle)
            return
    reasons = [item.reason[:120] for item in await harness.store.list_parked("main")]
    raise AssertionError(f"still {len(reasons)} parked items after {limit} cycles: {reasons[:5]}")


def markers(texts: list[str]) -> Counter[str]:
    return Counter(found for text in texts for found in MARKER.findall(text))


def mdr_state(sim: MdrSimulator, incident_ids: list[str]) -> list[dict[str, Any]]:
    """The MDR side of the scenario per incident, without ids or times, which differ between runs."""
    state = []
    for incident_id in incident_ids:
        incident = sim.incident(MDR_CLIENT_ID, incident_id)
        state.append(
            {
                "comments": markers([comment["text"] for comment in sim.comments(MDR_CLIENT_ID, incident_id)]),
                "attachments": sorted(item["full_name"] for item in sim.attachments(MDR_CLIENT_ID, incident_id)),
                "status": incident["status"],
                "resolution": incident.get("resolution"),
            }
        )
    return state


def seed_mdr(mdr_sim: MdrSimulator, count: int) -> list[str]:
    """Stage one on MDR: incidents with a SOC comment and an attachment each."""
    incident_ids = []
    for number in range(count):
        incident_id = mdr_sim.seed_incident(MDR_CLIENT_ID, summary=f"Storm incident {number}")["incident_id"]
        mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, f"<p>mdr note {number}a</p>", author="SOC Analyst")
        mdr_sim.add_attachment(MDR_CLIENT_ID, incident_id, f"mdr-{number}.txt", f"evidence {number}".encode())
        incident_ids.append(incident_id)
    return incident_ids


def change_mdr(mdr_sim: MdrSimulator, incident_ids: list[str], status: str) -> None:
    """Stage two on MDR: a second comment everywhere, and a status change on every third incident."""
    for number, incident_id in enumerate(incident_ids):
        mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, f"<p>mdr note {number}b</p>", author="SOC Analyst")
        if number % 3 == 0:
            mdr_sim.update_incident(MDR_CLIENT_ID, incident_id, status=status)


# --- Jira ------------------------------------------------------------------------


@asynccontextmanager
async def jira_run(
    tmp_path: Path, start_jira: StartJira, monkeypatch: pytest.MonkeyPatch, name: str
) -> AsyncIterator[SyncHarness]:
    """A fresh MDR simulator, Jira Cloud and ledger, with the scenario's status mapping."""
    mdr_sim = MdrSimulator(seed=7)
    mdr_sim.create_client(MDR_CLIENT_ID, connection_name=MDR_CONNECTION_NAME)
    folder = tmp_path / name
    folder.mkdir()
    try:
        async with run_simulator(mdr_sim) as mdr_url:
            async with open_harness(folder, mdr_sim, mdr_url, start_jira, monkeypatch, deployment="cloud") as harness:
                harness.use_mapping(status=JIRA_STATUS)
                harness.use_sync(retry_base_seconds=1, retry_max_seconds=2)
                yield harness
    finally:
        mdr_sim.close()


def jira_state(harness: SyncHarness, incident_ids: list[str]) -> list[dict[str, Any]]:
    state = []
    for incident_id in incident_ids:
        issues = harness.issues_for(incident_id)
        issue = issues[0] if issues else None
        state.append(
            {
                "tickets": len(issues),
                "comments": markers([comment.body for comment in issue.comments]) if issue else Counter(),
                "attachments": sorted(item.filename for item in issue.attachments) if issue else [],
                "status": issue.fields["status"] if issue else None,
            }
        )
    return state


async def play_jira(
    harness: SyncHarness, faults: Callable[[], None], ledger: Ledger, count: int = INCIDENTS
) -> list[dict[str, Any]]:
    """Play the scenario with `faults` switched on once the engine is open, and return both end states."""
    incident_ids = seed_mdr(harness.mdr_sim, count)
    sync = await harness.engine()
    faults()
    await settle(harness, sync, ledger)

    jira = harness.jira.sim
    for number, incident_id in enumerate(incident_ids):
        [issue] = harness.issues_for(incident_id)
        jira.add_comment(issue.key, f"ticket note {number}")
        jira.add_attachment(issue.key, f"jira-{number}.txt", f"log {number}".encode())
        if number % 3 == 1:
            jira.transition_as_human(issue.key, "Done", resolution="Done")
    change_mdr(harness.mdr_sim, incident_ids, "Resolved")
    await settle(harness, sync, ledger)

    ledger.fired = harness.mdr_sim.faults.fired + jira.faults.fired
    harness.mdr_sim.faults.clear()
    jira.faults.clear()
    await settle(harness, sync, ledger)
    return [*mdr_state(harness.mdr_sim, incident_ids), *jira_state(harness, incident_ids)]


@pytest.fixture
def quick_rate_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the clients resend after `Retry-After: 0` at once instead of waiting their 1-second minimum."""
    monkeypatch.setattr(retry, "MIN_PAUSE_SECONDS", 0.0, raising=False)


@pytest.mark.usefixtures("quick_rate_limits")
async def test_jira_storm_ends_like_a_calm_run(tmp_path: Path, start_jira: StartJira, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under the storm on MDR and Jira, the scenario converges to the fault-free end state: nothing lost, nothing twice."""
    calm_ledger, storm_ledger = Ledger(), Ledger()
    async with jira_run(tmp_path, start_jira, monkeypatch, "calm") as calm:
        expected = await play_jira(calm, lambda: None, calm_ledger)
    async with jira_run(tmp_path, start_jira, monkeypatch, "storm") as stormy:

        def start_storm() -> None:
            storm(stormy.mdr_sim.faults, seed=11)
            storm(stormy.jira.sim.faults, seed=12)

        actual = await play_jira(stormy, start_storm, storm_ledger)
    fired = storm_ledger.fired

    assert_scenario_complete(expected, "jira-{number}.txt", jira_status)
    assert actual == expected
    assert fired["server_error"] > 0
    assert fired["drop_after_commit"] > 0
    assert fired["rate_limit"] > 0


def assert_scenario_complete(expected: list[dict[str, Any]], ticket_file: str, statuses: Callable[[int], str]) -> None:
    """Guard against a vacuous pass: the calm run contains every comment, file and status change of the scenario once."""
    mdr, tickets = expected[: len(expected) // 2], expected[len(expected) // 2 :]
    for number, (incident, ticket) in enumerate(zip(mdr, tickets, strict=True)):
        notes = Counter({f"mdr note {number}a": 1, f"mdr note {number}b": 1, f"ticket note {number}": 1})
        files = sorted([f"mdr-{number}.txt", ticket_file.format(number=number)])
        assert (incident["comments"], incident["attachments"]) == (notes, files)
        assert (ticket["tickets"], ticket["comments"], ticket["attachments"]) == (1, notes, files)
        assert ticket["status"] == statuses(number)


def jira_status(number: int) -> str:
    """Every third incident is resolved in MDR and every third issue done in Jira; both end as Done."""
    return "Done" if number % 3 in (0, 1) else "To Do"


# --- ServiceNow ------------------------------------------------------------------


@asynccontextmanager
async def servicenow_run(
    tmp_path: Path,
    start_servicenow: StartServiceNow,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
) -> AsyncIterator[ServiceNowSyncHarness]:
    """A fresh MDR simulator, ServiceNow and ledger, with the scenario's status mapping."""
    mdr_sim = MdrSimulator(seed=7)
    mdr_sim.create_client(MDR_CLIENT_ID, connection_name=MDR_CONNECTION_NAME)
    folder = tmp_path / name
    folder.mkdir()
    try:
        async with run_simulator(mdr_sim) as mdr_url:
            async with open_servicenow_harness(
                folder, mdr_sim, mdr_url, start_servicenow, monkeypatch, status=SERVICENOW_STATUS
            ) as harness:
                yield harness
    finally:
        mdr_sim.close()


def servicenow_state(harness: ServiceNowSyncHarness, incident_ids: list[str]) -> list[dict[str, Any]]:
    state = []
    for incident_id in incident_ids:
        tickets = harness.tickets_for(incident_id)
        ticket = tickets[0] if tickets else None
        journal = harness.journal_of(incident_id) if ticket else []
        files = [item.record["file_name"] for item in harness.sim.attachments.values() if ticket and item.record["table_sys_id"] == ticket["sys_id"]]
        state.append(
            {
                "tickets": len(tickets),
                "comments": markers([entry["value"] for entry in journal]),
                "attachments": sorted(files),
                "status": ticket["state"] if ticket else None,
            }
        )
    return state


async def play_servicenow(
    harness: ServiceNowSyncHarness, faults: Callable[[], None], ledger: Ledger, count: int = INCIDENTS
) -> list[dict[str, Any]]:
    """Play the scenario on ServiceNow with `faults` switched on once the engine is open, and return both end states."""
    incident_ids = seed_mdr(harness.mdr_sim, count)
    sync = await harness.engine()
    faults()
    await settle(harness, sync, ledger)

    for number, incident_id in enumerate(incident_ids):
        number_text = harness.ticket_for(incident_id)["number"]
        harness.sim.add_human_comment(number_text, f"ticket note {number}")
        harness.sim.add_attachment(number_text, f"ticket-{number}.txt", f"log {number}".encode())
    change_mdr(harness.mdr_sim, incident_ids, "On hold")
    await settle(harness, sync, ledger)

    ledger.fired = harness.mdr_sim.faults.fired + harness.sim.faults.fired
    harness.mdr_sim.faults.clear()
    harness.sim.faults.clear()
    await settle(harness, sync, ledger)
    return [*mdr_state(harness.mdr_sim, incident_ids), *servicenow_state(harness, incident_ids)]


@pytest.mark.usefixtures("quick_rate_limits")
async def test_servicenow_storm_ends_like_a_calm_run(
    tmp_path: Path, start_servicenow: StartServiceNow, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under the storm on MDR and ServiceNow, the scenario converges to the fault-free end state."""
    storm_ledger = Ledger()
    async with servicenow_run(tmp_path, start_servicenow, monkeypatch, "calm") as calm:
        expected = await play_servicenow(calm, lambda: None, Ledger())
    async with servicenow_run(tmp_path, start_servicenow, monkeypatch, "storm") as stormy:

        def start_storm() -> None:
            storm(stormy.mdr_sim.faults, seed=21)
            storm(stormy.sim.faults, seed=22)

        actual = await play_servicenow(stormy, start_storm, storm_ledger)
    fired = storm_ledger.fired

    assert_scenario_complete(expected, "ticket-{number}.txt", lambda number: ON_HOLD if number % 3 == 0 else IN_PROGRESS)
    assert actual == expected
    assert fired["server_error"] > 0
    assert fired["drop_after_commit"] > 0
    assert fired["rate_limit"] > 0

