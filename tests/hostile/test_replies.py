"""API replies spoiled once by the simulators' fault layer, all in one sync scenario."""

from __future__ import annotations

import logging

import pytest
from fixtures_mdr import MDR_CLIENT_ID
from fixtures_sync import SyncHarness

from hostile.corpus import REPLIES, cases
from hostile.scenario import marker_of, parked_reason, run_cycles
from mdr_connector.connector.tickets import MDR_ORIGIN

pytestmark = pytest.mark.asyncio

SOC_ANALYST = "Ivan Petrov"
FAILURE_EVENTS = ("sync.incident.failed", "sync.history.unreadable")
# Each incident has a comment and a file, so a spoiled comment or attachment
# list always carries a record, whichever incident the fault meets first.
INCIDENTS = 2


async def test_spoiled_replies_one_scenario(harness: SyncHarness, caplog: pytest.LogCaptureFixture) -> None:
    """Each reply spoiled once is logged or retried as its case states, and every comment and file still syncs once."""
    sim = harness.mdr_sim
    items = []
    for number in range(INCIDENTS):
        incident_id = harness.seed()["incident_id"]
        comment_id = sim.add_soc_comment(MDR_CLIENT_ID, incident_id, f"<p>note {number}</p>", author=SOC_ANALYST)["comment_id"]
        sim.add_attachment(MDR_CLIENT_ID, incident_id, f"file-{number}.txt", b"data", author=SOC_ANALYST)
        items.append((incident_id, comment_id, f"file-{number}.txt"))
    rules = {}
    for case in cases(REPLIES):
        payload = dict(case.payload)
        plan = sim.faults if payload.pop("system") == "mdr" else harness.jira.sim.faults
        rules[case.name] = plan.add(payload.pop("kind"), count=1, **payload)

    with caplog.at_level(logging.ERROR):
        await run_cycles(harness)

    failures = [getattr(record, "error", "") for record in caplog.records if record.getMessage() in FAILURE_EVENTS]
    for case in cases(REPLIES):
        assert rules[case.name].count == 0, f"{case.name}: the fault never fired"
        for expected in case.reason_has:
            assert any(expected in failure for failure in failures), f"{case.name}: no failure names {expected!r}"
    for incident_id, comment_id, file_name in items:
        issue = harness.issue_for(incident_id)
        copies = [comment for comment in issue.comments if marker_of(comment).get("source_id") == comment_id]
        assert len(copies) == 1
        assert marker_of(copies[0])["origin"] == MDR_ORIGIN
        assert [attachment.filename for attachment in issue.attachments] == [file_name]
        assert await parked_reason(harness, incident_id) is None
