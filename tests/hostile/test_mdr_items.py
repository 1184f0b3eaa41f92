"""Hostile MDR comments, attachments and responses, one sync scenario per group, each with good items beside them."""

from __future__ import annotations

from typing import Any

import pytest
from fixtures_mdr import MDR_CLIENT_ID
from fixtures_sync import SyncHarness

from hostile.corpus import (
    DEDUPLICATED,
    HUGE_TEXT_LENGTH,
    MDR_COMMENTS,
    MDR_FILES,
    MDR_RESPONSES,
    NOTICE,
    PARKED,
    Case,
    cases,
)
from hostile.scenario import (
    JIRA_MAX_TEXT,
    MAX_NAME_BYTES,
    check_copy,
    check_reason,
    live_wiki,
    marker_of,
    parked_reason,
    run_cycles,
    utf16_length,
)
from mdr_connector.connector.attachments import ATTACHMENT
from mdr_connector.connector.engine import ConnectionSync
from mdr_connector.connector.store import DONE, MDR_TO_TICKET
from mdr_connector.connector.tickets import MDR_ORIGIN, NOTICE_ORIGIN, RESPONSE_ORIGIN

pytestmark = pytest.mark.asyncio

SOC_ANALYST = "Ivan Petrov"
UPLOAD_TO_JIRA = "POST /rest/api/2/issue/{issue}/attachments"
FILE_LIMIT = {"max_bytes": 1000}


def tamper(record: dict[str, Any], case: Case) -> None:
    """Change a stored MDR record as the case's payload sets: override fields, drop keys, turn times into seconds."""
    record.update(case.payload.get("fields", {}))
    for key in case.payload.get("drop", ()):
        del record[key]
    for key in case.payload.get("seconds", ()):
        record[key] //= 1000


def stored(records: list[dict[str, Any]], id_key: str, record_id: str) -> dict[str, Any]:
    [record] = [record for record in records if record[id_key] == record_id]
    return record


def copies_by_marker(issue: Any, origin: str) -> dict[str, list[Any]]:
    """Group the issue's comments that carry the connector's marker of `origin` by their source id."""
    found: dict[str, list[Any]] = {}
    for comment in issue.comments:
        marker = marker_of(comment)
        if marker.get("origin") == origin:
            found.setdefault(marker["source_id"], []).append(comment)
    return found


def repeat_comments(comment_ids: set[str]) -> Any:
    """Make an engine's comments/list replies hold each comment of `comment_ids` twice."""

    def patch(engine: ConnectionSync) -> None:
        real_list = engine.mdr.list_comments

        async def repeating_list(incident_id: str) -> Any:
            page = await real_list(incident_id)
            page.items.extend([comment for comment in page.items if comment.comment_id in comment_ids])
            return page

        engine.mdr.list_comments = repeating_list  # type: ignore[method-assign]

    return patch


async def test_hostile_mdr_comments_one_scenario(harness: SyncHarness) -> None:
    """Each hostile MDR comment is parked with its reason or copied once as its case states; good comments copy once."""
    sim = harness.mdr_sim
    incident_id = harness.seed()["incident_id"]
    other_incident = harness.seed()["incident_id"]
    good = [sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>good before</p>", author=SOC_ANALYST)["comment_id"]]
    seeded: dict[str, str] = {}
    for case in cases(MDR_COMMENTS):
        text = case.payload.get("text", f"<p>{case.name}</p>")
        comment_id = sim.add_soc_comment(MDR_CLIENT_ID, incident_id, text, author=SOC_ANALYST)["comment_id"]
        tamper(stored(sim._incidents[incident_id].comments, "comment_id", comment_id), case)
        seeded[case.name] = comment_id
    good.append(sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>good after</p>", author=SOC_ANALYST)["comment_id"])
    other_good = sim.add_soc_comment(MDR_CLIENT_ID, other_incident, "<p>good elsewhere</p>", author=SOC_ANALYST)["comment_id"]
    repeated = {seeded[case.name] for case in cases(MDR_COMMENTS) if case.payload.get("repeat")}

    await run_cycles(harness, repeat_comments(repeated))

    copies = copies_by_marker(harness.issue_for(incident_id), MDR_ORIGIN)
    for comment_id in good:
        assert len(copies.get(comment_id, [])) == 1, f"good comment {comment_id} is not copied once"
    assert len(copies_by_marker(harness.issue_for(other_incident), MDR_ORIGIN).get(other_good, [])) == 1
    assert await parked_reason(harness, other_incident) is None
    reason = await parked_reason(harness, incident_id)
    for case in cases(MDR_COMMENTS):
        comment_id = seeded[case.name]
        if case.outcome == PARKED:
            check_reason(case, reason, comment_id)
            assert comment_id not in copies, f"{case.name}: copied although malformed"
            continue
        assert len(copies.get(comment_id, [])) == 1, f"{case.name}: {len(copies.get(comment_id, []))} copies"
        body = copies[comment_id][0].body
        check_copy(case, body, live_wiki(body))
        if case.outcome == DEDUPLICATED:
            assert sum(case.copy_has[0] in comment.body for comment in harness.issue_for(incident_id).comments) == 1
    for comment in harness.issue_for(incident_id).comments:
        assert utf16_length(comment.body) <= JIRA_MAX_TEXT


async def test_long_comment_arrives_whole(harness: SyncHarness) -> None:
    """All 70,000 characters of an MDR comment reach the Jira issue, in comments or an attached file."""
    incident_id = harness.seed()["incident_id"]
    harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>" + "y" * HUGE_TEXT_LENGTH + "</p>", author=SOC_ANALYST)

    await run_cycles(harness)

    issue = harness.issue_for(incident_id)
    in_comments = sum(comment.body.count("y") for comment in issue.comments)
    in_files = sum(attachment.size for attachment in issue.attachments)
    assert in_comments + in_files >= HUGE_TEXT_LENGTH


async def test_hostile_mdr_files_one_scenario(harness: SyncHarness) -> None:
    """Each hostile MDR attachment is cleaned, kept back with a notice, or parked as its case states; good files copy once."""
    harness.use_mapping(attachments={"to_ticket": FILE_LIMIT})
    sim = harness.mdr_sim
    incident_id = harness.seed()["incident_id"]
    good = [sim.add_attachment(MDR_CLIENT_ID, incident_id, "good-before.txt", b"good", author=SOC_ANALYST)["attachment_id"]]
    seeded: dict[str, str] = {}
    for case in cases(MDR_FILES):
        payload = case.payload
        content = payload.get("content", case.name.encode()) if "size" not in payload else None
        attachment = sim.add_attachment(
            MDR_CLIENT_ID, incident_id, payload["name"], content, size=payload.get("size"), author=SOC_ANALYST
        )
        tamper(stored(sim._incidents[incident_id].attachments, "attachment_id", attachment["attachment_id"]), case)
        seeded[case.name] = attachment["attachment_id"]
    good.append(sim.add_attachment(MDR_CLIENT_ID, incident_id, "good-after.txt", b"good", author=SOC_ANALYST)["attachment_id"])

    await run_cycles(harness)

    issue = harness.issue_for(incident_id)
    on_issue = {str(attachment.id): attachment for attachment in issue.attachments}
    ledger = await harness.store.get_items(harness.connection.name, incident_id, ATTACHMENT)
    copied = {item.source_id: item.target_id for item in ledger if item.direction == MDR_TO_TICKET and item.state == DONE}
    notices = copies_by_marker(issue, NOTICE_ORIGIN)
    reason = await parked_reason(harness, incident_id)
    for attachment_id in good:
        assert on_issue[copied[attachment_id]].size == len(b"good")
    for case in cases(MDR_FILES):
        attachment_id = seeded[case.name]
        if case.outcome == PARKED:
            check_reason(case, reason, attachment_id)
            assert attachment_id not in copied, case.name
        elif case.outcome == NOTICE:
            assert attachment_id not in copied, case.name
            [notice] = notices[f"attachment:{attachment_id}"]
            check_copy(case, notice.body)
        else:
            copy = on_issue[copied[attachment_id]]
            check_copy(case, copy.filename)
            assert copy.size == len(case.payload.get("content", case.name.encode())), case.name
    assert len(on_issue) == len(copied) == harness.jira.sim.calls[UPLOAD_TO_JIRA]
    for attachment in on_issue.values():
        assert len(attachment.filename.encode("utf-8")) <= MAX_NAME_BYTES
        assert not any(separator in attachment.filename for separator in "/\\")
        assert attachment.filename == attachment.filename.strip(". ")
        assert all(character.isprintable() for character in attachment.filename)


async def test_hostile_mdr_responses_one_scenario(harness: SyncHarness) -> None:
    """Each hostile MDR response is shown escaped or parked as its case states; a good response is shown once."""
    sim = harness.mdr_sim
    incident_id = harness.seed()["incident_id"]
    good = sim.add_response(MDR_CLIENT_ID, incident_id)["response_id"]
    seeded: dict[str, str] = {}
    for case in cases(MDR_RESPONSES):
        response_id = sim.add_response(MDR_CLIENT_ID, incident_id, **case.payload.get("fields", {}))["response_id"]
        tamper(stored(sim._incidents[incident_id].responses, "response_id", response_id), case)
        seeded[case.name] = response_id

    await run_cycles(harness)

    views = copies_by_marker(harness.issue_for(incident_id), RESPONSE_ORIGIN)
    assert len(views[good]) == 1
    reason = await parked_reason(harness, incident_id)
    for case in cases(MDR_RESPONSES):
        response_id = seeded[case.name]
        if case.outcome == PARKED:
            check_reason(case, reason, response_id)
            assert response_id not in views, case.name
            continue
        assert len(views.get(response_id, [])) == 1, case.name
        body = views[response_id][0].body
        check_copy(case, body, live_wiki(body))
