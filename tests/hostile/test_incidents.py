"""Hostile incident records from incidents/list, all in one sync scenario with good incidents around them."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from fixtures_mdr import MDR_CLIENT_ID
from fixtures_sync import SyncHarness

from hostile.corpus import DEDUPLICATED, INCIDENTS, LOGGED, PARKED, Case, cases
from hostile.scenario import (
    JIRA_MAX_SUMMARY,
    JIRA_MAX_TEXT,
    check_copy,
    check_reason,
    live_wiki,
    parked_reason,
    run_cycles,
    utf16_length,
)
from mdr_connector.connector.engine import ConnectionSync

pytestmark = pytest.mark.asyncio

CREATE_ISSUE = "POST /rest/api/2/issue"
STATUS_RULES = {"to_ticket": {"Open": "To Do", "On hold": "On Hold", "Resolved": "Done", "Closed": "Done"}}


def seed_case(harness: SyncHarness, case: Case) -> str:
    """Seed the incident of one case, then remove or rescale the fields the payload names as MDR would send them."""
    fields = dict(case.payload.get("fields", {}))
    # Without it the simulator copies creation_time into update_time.
    fields.setdefault("update_time", harness.mdr_sim.now_ms())
    incident_id = harness.seed(**fields)["incident_id"]
    dropped = case.payload.get("drop", ())
    in_seconds = case.payload.get("seconds", ())
    if dropped or in_seconds:
        record = harness.mdr_sim._incidents[incident_id].record
        for key in dropped:
            del record[key]
        for key in in_seconds:
            record[key] //= 1000
        # An update lists the record again, as it now is.
        harness.mdr_sim.update_incident(MDR_CLIENT_ID, incident_id)
    return incident_id


def repeat_in_pages(incident_ids: set[str]) -> Any:
    """Make an engine's incidents/list pages hold each incident of `incident_ids` twice."""

    def patch(engine: ConnectionSync) -> None:
        real_list = engine.mdr.list_incidents

        async def repeating_list(**filters: Any) -> Any:
            page = await real_list(**filters)
            page.items.extend([incident for incident in page.items if incident.incident_id in incident_ids])
            return page

        engine.mdr.list_incidents = repeating_list  # type: ignore[method-assign]

    return patch


def issue_text(issue: Any) -> str:
    """Return what the checks read of an issue: summary, description and priority name."""
    return f"{issue.fields['summary']}\n{issue.fields['description']}\npriority={issue.fields.get('priority')}"


def malformed_errors(records: list[logging.LogRecord]) -> list[str]:
    return [getattr(record, "error", "") for record in records if record.getMessage() == "sync.incident.malformed"]


async def test_hostile_incidents_one_scenario(harness: SyncHarness, caplog: pytest.LogCaptureFixture) -> None:
    """Every hostile incident is parked, logged, cleaned or kept as its case says, and the good ones sync once."""
    harness.use_sync(change_source="list")
    harness.use_mapping(status=STATUS_RULES)
    good = [harness.seed(summary=f"good incident {number}", status="Open")["incident_id"] for number in range(2)]
    seeded = {case.name: seed_case(harness, case) for case in cases(INCIDENTS)}
    good.append(harness.seed(summary="good incident after the bad ones", status="Open")["incident_id"])
    repeated = {seeded[case.name] for case in cases(INCIDENTS) if case.payload.get("repeat")}

    with caplog.at_level(logging.ERROR):
        await run_cycles(harness, repeat_in_pages(repeated))

    for incident_id in good:
        assert len(harness.issues_for(incident_id)) == 1, f"good incident {incident_id} has no single issue"
        assert await parked_reason(harness, incident_id) is None
    for case in cases(INCIDENTS):
        incident_id = seeded[case.name]
        issues = harness.issues_for(incident_id) if incident_id else []
        reason = await parked_reason(harness, incident_id)
        if case.outcome == PARKED:
            check_reason(case, reason, incident_id)
            expected_issues = 1 if case.payload.get("ticket_created") else 0
            assert len(issues) == expected_issues, f"{case.name}: {len(issues)} issues"
        elif case.outcome == LOGGED:
            assert issues == [], case.name
            errors = [error for error in malformed_errors(caplog.records) if all(part in error for part in case.reason_has)]
            assert errors, f"{case.name}: no sync.incident.malformed error holds {case.reason_has}"
        else:
            assert reason is None, f"{case.name}: parked with {reason!r}"
            assert len(issues) == 1, f"{case.name}: {len(issues)} issues"
            text = issue_text(issues[0])
            check_copy(case, text, live_wiki(issues[0].fields["description"]))
        if case.outcome == DEDUPLICATED:
            assert len(issues) == 1, case.name

    issues = list(harness.jira.sim.issues.values())
    assert harness.jira.sim.calls[CREATE_ISSUE] == len(issues)
    for issue in issues:
        assert utf16_length(issue.fields["summary"]) <= JIRA_MAX_SUMMARY
        assert utf16_length(issue.fields["description"]) <= JIRA_MAX_TEXT
        # A summary cut inside a surrogate pair could not be encoded.
        issue_text(issue).encode("utf-8")
