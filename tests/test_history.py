"""Change detection through incidents/history: paging per entity type, coverage, bad records.

The window logic runs against the MDR simulator's own history, through the
real client, so the per-entity-type paging quirk is the simulator's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from fixtures_mdr import MDR_CLIENT_ID

from mdr_connector.adapters.mdr.client import MdrClient
from mdr_connector.adapters.mdr.simulator import MdrSimulator
from mdr_connector.connector.history import read_history_window

pytestmark = pytest.mark.asyncio

T = TypeVar("T")
FAR_FUTURE = 2**62


async def direct(call: Callable[[], Awaitable[T]]) -> T:
    return await call()


async def window_of(
    client: MdrClient,
    since: int,
    page_size: int,
    max_pages: int = 20,
    horizon: int = FAR_FUTURE,
    free_until: int | None = None,
) -> Any:
    return await read_history_window(
        client,
        direct,
        since=since,
        free_until=since - 1 if free_until is None else free_until,
        page_size=page_size,
        max_pages=max_pages,
        horizon=horizon,
    )


async def test_every_type_is_paged_to_its_end(active_mdr_client: MdrClient, mdr_sim: MdrSimulator) -> None:
    """Three incidents and two comments with a page size of 2: both types are read to the end and all incidents found."""
    start = mdr_sim.now_ms()
    incidents = [mdr_sim.seed_incident(MDR_CLIENT_ID) for _ in range(3)]
    mdr_sim.advance(1)
    mdr_sim.add_soc_comment(MDR_CLIENT_ID, incidents[0]["incident_id"], "<p>one</p>")
    mdr_sim.advance(1)
    mdr_sim.add_soc_comment(MDR_CLIENT_ID, incidents[0]["incident_id"], "<p>two</p>")

    window = await window_of(active_mdr_client, start, page_size=2)

    assert window.complete
    assert set(window.changed) == {incident["incident_id"] for incident in incidents}
    # 5 incident records (3 creates, and an update per comment) and 2
    # comment records, 2 of each type per page: more than one page is read.
    assert window.pages > 1
    assert "incident_details" in window.changed[incidents[0]["incident_id"]].kinds
    assert window.covered_until == max(changed.newest_change for changed in window.changed.values())


async def test_snapshot_is_the_newest_state(active_mdr_client: MdrClient, mdr_sim: MdrSimulator) -> None:
    """After an update the window carries the incident as it is now, so the details need not be read again."""
    start = mdr_sim.now_ms()
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID, summary="before")
    mdr_sim.advance(1)
    mdr_sim.update_incident(MDR_CLIENT_ID, incident["incident_id"], summary="after")

    window = await window_of(active_mdr_client, start, page_size=10)

    snapshot = window.changed[incident["incident_id"]].current_snapshot()
    assert snapshot is not None
    assert snapshot.summary == "after"


async def test_budget_stops_at_what_every_type_covers(active_mdr_client: MdrClient, mdr_sim: MdrSimulator) -> None:
    """With the page budget spent, the window covers only up to the oldest newest time of the types still open."""
    start = mdr_sim.now_ms()
    for _ in range(5):
        mdr_sim.seed_incident(MDR_CLIENT_ID)
        mdr_sim.advance(1)

    window = await window_of(active_mdr_client, start, page_size=2, max_pages=1)

    assert not window.complete
    assert len(window.changed) == 2
    assert window.covered_until is not None
    assert window.covered_until < mdr_sim.now_ms()
    newest_read = max(changed.newest_change for changed in window.changed.values())
    assert window.covered_until == newest_read


async def test_future_record_does_not_move_coverage(active_mdr_client: MdrClient, mdr_sim: MdrSimulator) -> None:
    """A record beyond the horizon is still reported, but coverage stops before it."""
    start = mdr_sim.now_ms()
    mdr_sim.seed_incident(MDR_CLIENT_ID)
    horizon = mdr_sim.now_ms()
    mdr_sim.advance(60)
    late = mdr_sim.seed_incident(MDR_CLIENT_ID)

    window = await window_of(active_mdr_client, start, page_size=10, horizon=horizon)

    assert late["incident_id"] in window.changed
    assert window.covered_until is not None
    assert window.covered_until <= horizon


async def test_empty_history_covers_nothing(active_mdr_client: MdrClient, mdr_sim: MdrSimulator) -> None:
    """No records: complete, no coverage, one call."""
    mdr_sim.reset_counts()

    window = await window_of(active_mdr_client, mdr_sim.now_ms() + 1, page_size=10)

    assert window.complete
    assert window.covered_until is None
    assert window.changed == {}
    assert mdr_sim.call_counts["incidents/history"] == 1


async def test_overlap_pages_are_free(active_mdr_client: MdrClient, mdr_sim: MdrSimulator) -> None:
    """Records older than the stored cursor fill pages that do not count, so a large overlap is passed."""
    start = mdr_sim.now_ms()
    for _ in range(6):
        mdr_sim.seed_incident(MDR_CLIENT_ID)
        mdr_sim.advance(1)
    cursor = mdr_sim.now_ms()
    mdr_sim.advance(1)
    newest = mdr_sim.seed_incident(MDR_CLIENT_ID)

    window = await window_of(active_mdr_client, start, page_size=2, max_pages=1, free_until=cursor)

    assert newest["incident_id"] in window.changed
    assert len(window.changed) == 7


async def test_many_records_in_one_millisecond(active_mdr_client: MdrClient, mdr_sim: MdrSimulator) -> None:
    """More records in one millisecond than fit on a page are read by page number, none skipped."""
    start = mdr_sim.now_ms()
    seeded = [mdr_sim.seed_incident(MDR_CLIENT_ID, update_time=start, creation_time=start) for _ in range(5)]

    window = await window_of(active_mdr_client, start, page_size=2)

    assert window.complete
    assert {incident["incident_id"] for incident in seeded} <= set(window.changed)
