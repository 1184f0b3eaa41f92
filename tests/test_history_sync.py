"""The engine finding changed incidents through incidents/history, end to end on both simulators."""

from __future__ import annotations

import pytest
from fixtures_mdr import MDR_CLIENT_ID
from fixtures_postgres import LEDGER_BACKENDS
from fixtures_sync import SyncHarness

from mdr_connector.connector.config import FilterSettings
from mdr_connector.connector.engine import HISTORY_CURSOR, MDR_CURSOR


@pytest.fixture(params=LEDGER_BACKENDS)
def ledger_backend(request: pytest.FixtureRequest) -> str:
    """Every harness test here runs with its ledger on SQLite and again on PostgreSQL."""
    return request.param


pytestmark = pytest.mark.asyncio


async def test_comment_only_change_is_found(harness: SyncHarness) -> None:
    """A SOC comment on a linked incident reaches the ticket, and no cycle lists incidents."""
    incident = harness.seed()
    sync = await harness.cycles(1)
    harness.mdr_sim.reset_counts()

    harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident["incident_id"], "<p>Host isolated</p>", author="SOC Analyst")
    await harness.cycles(1, sync)

    issue = harness.issue_for(incident["incident_id"])
    assert sum("Host isolated" in comment.body for comment in issue.comments) == 1
    assert harness.mdr_sim.call_counts["incidents/list"] == 0
    assert harness.mdr_sim.call_counts["incidents/history"] >= 1


async def test_idle_cycle_reads_one_history_page(harness: SyncHarness) -> None:
    """With nothing new, a cycle makes one history call and reads no incident, comment or attachment."""
    for _ in range(3):
        harness.seed()
    sync = await harness.cycles(1)
    harness.advance(600)
    harness.mdr_sim.reset_counts()

    await harness.cycles(1, sync)

    calls = {path: count for path, count in harness.mdr_sim.call_counts.items() if count}
    assert calls == {"incidents/history": 1}


async def test_backlog_drains_over_small_pages(harness: SyncHarness) -> None:
    """Seven incidents with one history page of two records per cycle: every incident gets one ticket."""
    harness.use_sync(page_size=2, max_pages_per_cycle=1)
    incidents = []
    for _ in range(7):
        incidents.append(harness.seed())
        harness.mdr_sim.advance(1)

    sync = await harness.engine()
    for _ in range(8):
        await sync.run_cycle()

    for incident in incidents:
        assert len(harness.issues_for(incident["incident_id"])) == 1


async def test_filters_pick_new_incidents_only(harness: SyncHarness) -> None:
    """A filtered-out incident gets no ticket; a linked one keeps syncing after it leaves the filter."""
    harness.use_sync(filters=FilterSettings(statuses=["Open"]))
    kept = harness.seed(status="Open")
    skipped = harness.seed(status="Closed")
    sync = await harness.cycles(1)
    assert len(harness.issues_for(kept["incident_id"])) == 1
    assert harness.issues_for(skipped["incident_id"]) == []

    harness.mdr_sim.update_incident(MDR_CLIENT_ID, kept["incident_id"], status="Closed", summary="Closed now")
    await harness.cycles(1, sync)

    assert "Closed now" in harness.issue_for(kept["incident_id"]).fields["summary"]
    assert harness.issues_for(skipped["incident_id"]) == []


async def test_history_cursor_continues_the_list_cursor(harness: SyncHarness) -> None:
    """A connection moving from incidents/list to history starts where the list cursor stood."""
    harness.use_sync(change_source="list")
    harness.seed()
    await harness.cycles(1)
    list_cursor = await harness.store.get_cursor("main", MDR_CURSOR)

    harness.use_sync(change_source="history")
    await harness.cycles(1)

    history_cursor = await harness.store.get_cursor("main", HISTORY_CURSOR)
    assert list_cursor is not None and history_cursor is not None
    assert int(history_cursor) >= int(list_cursor)


async def test_malformed_history_snapshot_is_parked(harness: SyncHarness) -> None:
    """An incident whose history snapshot is malformed is parked by id; the others sync."""
    good = harness.seed()
    bad = harness.seed(priority=None, incident_number="seven")

    sync = await harness.cycles(1)

    assert len(harness.issues_for(good["incident_id"])) == 1
    assert await harness.store.get_parked("main", "incident", bad["incident_id"]) is not None
    assert sync.stats.failures >= 1


async def test_malformed_history_page_falls_back_to_list(harness: SyncHarness, caplog: pytest.LogCaptureFixture) -> None:
    """A history record that cannot be read makes the cycle find changes through incidents/list; nothing stalls."""
    from mdr_connector.adapters.mdr.simulator.state import HistoryRecord

    incident = harness.seed()
    harness.mdr_sim._history.append(
        HistoryRecord(
            client_id=MDR_CLIENT_ID,
            incident_id=incident["incident_id"],
            entity_type="incident_comment",
            changed_at=harness.mdr_sim.now_ms(),
            changed_by="SOC",
            operation="create",
            entity="not an object",  # type: ignore[arg-type]
            sequence=len(harness.mdr_sim._history),
        )
    )

    await harness.cycles(1)

    assert len(harness.issues_for(incident["incident_id"])) == 1
    assert "sync.history.unreadable" in [record.getMessage() for record in caplog.records]


@pytest.mark.parametrize("source", ["history", "list"])
async def test_parked_incident_waits_for_its_backoff(harness: SyncHarness, source: str) -> None:
    """A parked incident whose change sits in the overlap is not retried every cycle, only when its next try is due."""
    harness.use_sync(change_source=source, retry_base_seconds=600, retry_max_seconds=3600)
    harness.use_mapping(routes=[{"tenant": "Other tenant", "project": "SEC"}], unrouted="report")
    incident = harness.seed()
    sync = await harness.cycles(1)
    parked = await harness.store.get_parked("main", "incident", incident["incident_id"])
    assert parked is not None and parked.attempts == 1

    for _ in range(4):
        harness.advance(10)
        await sync.run_cycle()

    parked = await harness.store.get_parked("main", "incident", incident["incident_id"])
    assert parked is not None and parked.attempts == 1

    harness.advance(600)
    await sync.run_cycle()

    parked = await harness.store.get_parked("main", "incident", incident["incident_id"])
    assert parked is not None and parked.attempts == 2
