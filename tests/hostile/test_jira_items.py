"""Hostile Jira comments and attachments on a linked issue, one sync scenario per group, with good items beside them."""

from __future__ import annotations

import re
from typing import Any

import pytest
from fixtures_mdr import MDR_CLIENT_ID, MDR_CONNECTION_NAME
from fixtures_sync import SyncHarness

from hostile.corpus import JIRA_COMMENTS, JIRA_FILES, JIRA_ISSUES, NOTICE, PARKED, cases
from hostile.scenario import (
    MAX_NAME_BYTES,
    SECONDS_BETWEEN_CYCLES,
    check_copy,
    marker_of,
    parked_reason,
    run_cycles,
)
from mdr_connector.adapters.jira.simulator import HUMAN_NAME
from mdr_connector.connector.attachments import ATTACHMENT
from mdr_connector.connector.store import DONE, TICKET_TO_MDR
from mdr_connector.connector.tickets import NOTICE_ORIGIN

pytestmark = pytest.mark.asyncio

FILE_LIMIT = {"max_bytes": 1000}
HOSTS_FIELD = "customfield_10020"
REQUEST_LABEL = "mdr-create"


async def linked_issue(harness: SyncHarness) -> tuple[str, Any]:
    """Seed an incident, sync it once, and return its id and Jira issue, with the clock past the search delay."""
    incident_id = harness.seed()["incident_id"]
    await harness.cycles(1)
    harness.advance(SECONDS_BETWEEN_CYCLES)
    return incident_id, harness.issue_for(incident_id)


def copies_of(harness: SyncHarness, incident_id: str, comment_id: int) -> list[str]:
    """Return the texts of the MDR comments the connector wrote for one Jira comment, found by their footer."""
    footer = re.compile(rf"mdr-connector: jira comment {comment_id}\b")
    return [
        comment["text"]
        for comment in harness.mdr_comments(incident_id)
        if comment["author_name"] == MDR_CONNECTION_NAME and footer.search(comment["text"])
    ]


async def test_hostile_jira_comments_one_scenario(harness: SyncHarness) -> None:
    """Each hostile Jira comment reaches MDR once, made inert or kept as its case states; good comments too."""
    incident_id, issue = await linked_issue(harness)
    jira = harness.jira.sim
    good = [jira.add_comment(issue.key, "good engineer note before").id]
    seeded = {case.name: jira.add_comment(issue.key, case.payload["body"]).id for case in cases(JIRA_COMMENTS)}
    good.append(jira.add_comment(issue.key, "good engineer note after").id)

    await run_cycles(harness)

    for comment_id in good:
        assert len(copies_of(harness, incident_id, comment_id)) == 1
    for case in cases(JIRA_COMMENTS):
        copies = copies_of(harness, incident_id, seeded[case.name])
        assert len(copies) == 1, f"{case.name}: {len(copies)} copies in MDR"
        check_copy(case, copies[0])
    assert await parked_reason(harness, incident_id) is None


async def test_hostile_jira_files_one_scenario(harness: SyncHarness) -> None:
    """Each hostile Jira attachment reaches MDR cleaned once, or is kept back with one notice; good files copy once."""
    harness.use_mapping(attachments={"to_mdr": FILE_LIMIT})
    incident_id, issue = await linked_issue(harness)
    jira = harness.jira.sim
    good = [jira.add_attachment(issue.key, "good-before.txt", b"good").id]
    seeded: dict[str, str] = {}
    for case in cases(JIRA_FILES):
        payload = case.payload
        if "size" in payload:
            attachment = jira.add_attachment(issue.key, payload["name"], size=payload["size"])
        else:
            attachment = jira.add_attachment(issue.key, payload["name"], payload.get("content", case.name.encode()))
        seeded[case.name] = str(attachment.id)
    good.append(jira.add_attachment(issue.key, "good-after.txt", b"good").id)

    await run_cycles(harness)

    in_mdr = {item["attachment_id"]: item for item in harness.mdr_sim.attachments(MDR_CLIENT_ID, incident_id)}
    ledger = await harness.store.get_items(harness.connection.name, incident_id, ATTACHMENT)
    copied = {item.source_id: item.target_id for item in ledger if item.direction == TICKET_TO_MDR and item.state == DONE}
    notices = [
        comment["text"] for comment in harness.mdr_comments(incident_id) if comment["author_name"] == MDR_CONNECTION_NAME
    ]
    for attachment_id in good:
        assert in_mdr[copied[str(attachment_id)]]["file_size"] == len(b"good")
    for case in cases(JIRA_FILES):
        attachment_id = seeded[case.name]
        assert case.outcome != PARKED, f"{case.name}: Jira files are not parked in this corpus"
        if case.outcome == NOTICE:
            assert attachment_id not in copied, case.name
            [notice] = [text for text in notices if case.copy_has[0] in text]
            check_copy(case, notice)
            continue
        copy = in_mdr[copied[attachment_id]]
        check_copy(case, f"{copy['full_name']}\n{copy['caption']}")
        assert copy["file_size"] == len(case.payload.get("content", case.name.encode())), case.name
    copies = [item for item in in_mdr.values() if item["author_name"] == MDR_CONNECTION_NAME]
    assert len(copies) == len(copied) == harness.mdr_sim.call_counts["attachments/upload"]
    for copy in copies:
        name = copy["full_name"]
        assert len(name.encode("utf-8")) <= MAX_NAME_BYTES
        assert not any(separator in name for separator in "/\\")
        assert all(character.isprintable() for character in name)
    assert await parked_reason(harness, incident_id) is None


def request_issue(harness: SyncHarness, hosts: object, fields: dict[str, Any]) -> Any:
    """Create a Jira issue as a person would, labelled as a request for an MDR incident."""
    values: dict[str, Any] = {
        "project": {"key": "SEC"},
        "issuetype": {"name": "Task"},
        "summary": "request for an incident",
        "description": "seen on the host",
        "priority": {"name": "High"},
        "labels": [REQUEST_LABEL],
        HOSTS_FIELD: hosts,
        **fields,
    }
    return harness.jira.sim.create_issue(values, reporter=harness.jira.sim.user(HUMAN_NAME))


def requested_incidents(harness: SyncHarness, issue: Any) -> list[dict[str, Any]]:
    """Return the MDR incidents whose client description carries the request marker of one issue."""
    marker = f"mdr-connector request {harness.connection.name}/{issue.id}"
    return [incident for incident in harness.mdr_sim.incidents(MDR_CLIENT_ID) if marker in incident.get("client_description", "")]


async def test_hostile_jira_requests_one_scenario(harness: SyncHarness) -> None:
    """Each hostile incident request gets one reply or creates one incident as its case states; a good request creates one."""
    harness.jira.sim.custom_fields[HOSTS_FIELD] = "Affected hosts"
    harness.use_mapping(create_incidents={"enabled": True, "label": REQUEST_LABEL, "hosts_field": HOSTS_FIELD})
    asset = harness.mdr_sim.add_asset(MDR_CLIENT_ID, "WS-01")
    good_hosts = f"WS-01:{asset['asset_id']}"
    await harness.cycles(1)
    good = request_issue(harness, good_hosts, {})
    seeded = {
        case.name: request_issue(harness, case.payload.get("hosts", good_hosts), dict(case.payload.get("fields", {})))
        for case in cases(JIRA_ISSUES)
    }

    await run_cycles(harness)

    assert len(requested_incidents(harness, good)) == 1
    for case in cases(JIRA_ISSUES):
        issue = seeded[case.name]
        incidents = requested_incidents(harness, issue)
        replies = [comment.body for comment in issue.comments if marker_of(comment).get("origin") == NOTICE_ORIGIN]
        if case.outcome == NOTICE:
            assert incidents == [], case.name
            assert len(replies) == 1, f"{case.name}: {len(replies)} replies"
            check_copy(case, replies[0])
            continue
        assert len(incidents) == 1, f"{case.name}: {len(incidents)} incidents"
        incident = incidents[0]
        check_copy(case, f"{incident['summary']}\n{incident['client_description']}\npriority={incident['priority']}")
    creating = [case for case in cases(JIRA_ISSUES) if case.outcome != NOTICE]
    assert harness.mdr_sim.call_counts["incidents/create"] == len(creating) + 1
