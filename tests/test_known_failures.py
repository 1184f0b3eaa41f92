"""Cases that other connectors got wrong, each run with the real engine against the simulators on loopback.

The 429 case (Retry-After 0, then 5) is tested with the rate limit handling.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from fixtures_mdr import MDR_CLIENT_ID, MDR_CONNECTION_NAME
from fixtures_sync import SyncHarness

from mdr_connector.connector.engine import INCIDENT
from mdr_connector.connector.store import LINKED

CREATE_ISSUE = "POST /rest/api/2/issue"
# Longer than the harness's retry backoff and the Jira Cloud search delay (30 s).
PAST_BACKOFF_SECONDS = 31


async def later_cycles(harness: SyncHarness, sync: Any, count: int) -> None:
    """Run cycles with the clocks moved past the Jira search delay and the retry backoff before each."""
    for _cycle in range(count):
        harness.advance(PAST_BACKOFF_SECONDS)
        await sync.run_cycle()
        await sync.retry_parked()


def copies(texts: list[str], needle: str) -> int:
    return sum(needle in text for text in texts)


async def test_comments_once_after_priority_changes(harness: SyncHarness) -> None:
    """Three cycles with only the priority changed between them leave one copy of each comment on each side."""
    incident_id = harness.seed(priority="LOW")["incident_id"]
    sync = await harness.cycles(1)
    issue = harness.issue_for(incident_id)
    harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>note from the MDR analyst</p>", author="Analyst")
    harness.jira.sim.add_comment(issue.key, "note from the Jira engineer")
    await later_cycles(harness, sync, 1)

    # Only the priority changes between the next three cycles, on one side, then the other.
    harness.mdr_sim.update_incident(MDR_CLIENT_ID, incident_id, priority="HIGH")
    await later_cycles(harness, sync, 1)
    harness.jira.sim.edit_as_human(issue.key, priority="Low")
    await later_cycles(harness, sync, 1)
    harness.mdr_sim.update_incident(MDR_CLIENT_ID, incident_id, priority="NORMAL")
    await later_cycles(harness, sync, 1)

    mdr_texts = [comment["text"] for comment in harness.mdr_comments(incident_id)]
    jira_bodies = [comment.body for comment in harness.issue_for(incident_id).comments]
    assert copies(mdr_texts, "note from the MDR analyst") == 1
    assert copies(mdr_texts, "note from the Jira engineer") == 1
    assert copies(jira_bodies, "note from the MDR analyst") == 1
    assert copies(jira_bodies, "note from the Jira engineer") == 1
    assert [comment["author_name"] for comment in harness.mdr_comments(incident_id)].count(MDR_CONNECTION_NAME) == 1
    assert harness.issue_for(incident_id).fields["priority"] != "Low", "the last MDR priority did not reach Jira"


@pytest.mark.parametrize("fault", ["drop_after_commit", "hang"])
async def test_create_timeout_after_store_one_issue(harness: SyncHarness, fault: str) -> None:
    """A Jira create that gets no reply yields one issue: the connector looks the issue up before creating again.

    drop_after_commit: Jira stores the issue and closes the connection.
    hang: Jira replies only after the client's timeout. The client is gone by
    then, so the simulator does not store the issue, and a second create is right.
    """
    if fault == "hang":
        ticket = harness.connection.ticket.model_copy(update={"timeout_seconds": 1})
        harness.settings = harness.settings.model_copy(
            update={"connections": [harness.connection.model_copy(update={"ticket": ticket})]}
        )
        harness.jira.sim.faults.add("hang", method="POST", path="/rest/api/2/issue", count=1, hang_seconds=3)
    else:
        harness.jira.sim.drop_reply_after_commit("POST", "/rest/api/2/issue")
    incident_id = harness.seed()["incident_id"]

    sync = await harness.cycles(1)
    first_cycle_creates = harness.jira.sim.calls[CREATE_ISSUE]
    await later_cycles(harness, sync, 3)

    assert first_cycle_creates == 1
    assert len(harness.issues_for(incident_id)) == 1
    assert (await harness.store.get_link("main", incident_id)).state == LINKED
    assert await harness.store.get_parked("main", INCIDENT, incident_id) is None


async def test_unreachable_done_status_never_synced(harness: SyncHarness) -> None:
    """A mapped status the Jira workflow cannot reach is parked with the reachable ones named, retried, never recorded."""
    harness.use_mapping(status={"to_ticket": {"Open": "To Do", "On hold": "On Hold"}})
    incident_id = harness.seed()["incident_id"]
    sync = await harness.cycles(1)
    key = harness.issue_for(incident_id).key
    harness.jira.sim.transition_as_human(key, "Done")
    await later_cycles(harness, sync, 1)

    harness.mdr_sim.update_incident(MDR_CLIENT_ID, incident_id, status="On hold")
    await later_cycles(harness, sync, 1)
    parked = await harness.store.get_parked("main", INCIDENT, incident_id)

    assert parked is not None
    assert "'On Hold'" in parked.reason
    assert "Statuses reachable from 'Done'" in parked.reason
    assert harness.issue_for(incident_id).fields["status"] == "Done"
    assert (await harness.store.get_link("main", incident_id)).ticket_status != "On Hold"

    await later_cycles(harness, sync, 2)
    retried = await harness.store.get_parked("main", INCIDENT, incident_id)
    assert retried is not None
    assert retried.attempts > parked.attempts
    assert (await harness.store.get_link("main", incident_id)).ticket_status != "On Hold"

    # Once a person reopens the issue, the path exists and the next retry records the status.
    harness.jira.sim.transition_as_human(key, "To Do")
    await later_cycles(harness, sync, 2)
    assert harness.issue_for(incident_id).fields["status"] == "On Hold"
    assert (await harness.store.get_link("main", incident_id)).ticket_status == "On Hold"
    assert await harness.store.get_parked("main", INCIDENT, incident_id) is None


@pytest.mark.parametrize("source", ["history", "list"])
async def test_eleven_changes_page_of_ten(harness: SyncHarness, source: str) -> None:
    """Eleven incidents changed in one window, read ten per page, all get one issue each."""
    harness.use_sync(page_size=10, change_source=source)
    incidents = [harness.seed()["incident_id"] for _ in range(11)]

    sync = await harness.cycles(1)
    await later_cycles(harness, sync, 1)

    per_incident = Counter({incident_id: len(harness.issues_for(incident_id)) for incident_id in incidents})
    assert per_incident == Counter({incident_id: 1 for incident_id in incidents})
    assert len(harness.jira.sim.issues) == 11
