"""Attacks on responses, status sync, incidents from tickets and comment policies, against both simulators.

Each test drives the real engine over loopback and tries one way to lose,
duplicate, bounce or leak an item: a crash between two writes, a lost
reply, a race between the two sides, or a hostile value.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from fixtures_mdr import MDR_CLIENT_ID, MDR_CONNECTION_NAME
from fixtures_sync import SyncHarness

from mdr_connector.adapters.jira.simulator_state import HUMAN_NAME
from mdr_connector.adapters.jira.simulator_workflow import DEFAULT_STATUSES, DEFAULT_TRANSITIONS, SimTransition, SimWorkflow
from mdr_connector.connector.engine import INCIDENT
from mdr_connector.connector.errors import OutcomeUnknownError, RejectedError
from mdr_connector.connector.responses import TerminalActor, decide_from_terminal
from mdr_connector.connector.tickets import NOTICE_ORIGIN, RESPONSE_ORIGIN

pytestmark = pytest.mark.asyncio

ANALYST_ID = "557058:analyst"
OTHER_ID = "557058:other"
TICKET_SEARCH_DELAY = 31
TRANSITION = "POST /rest/api/2/issue/{issue}/transitions"
CLOSE_CALL = "incidents/close"
UPDATE_CALL = "response/update"
CLOSE_ON_DONE = {
    "to_ticket": {"Open": "To Do", "On hold": "On Hold", "Resolved": "Done", "Closed": "Done"},
    "close_mdr": {
        "enabled": True,
        "done_statuses": ["Done"],
        "resolutions": {"Done": "TRUE_POSITIVE", "Won't Do": "FALSE_POSITIVE"},
    },
}


class SimulatedCrash(BaseException):
    """The process dies here: nothing after this point runs, and no handler catches it."""


def marker_of(comment: Any) -> dict[str, str]:
    return comment.properties.get("mdr-connector", {})


def with_origin(issue: Any, origin: str) -> list[Any]:
    return [comment for comment in issue.comments if marker_of(comment).get("origin") == origin]


def connector_mdr_comments(harness: SyncHarness, incident_id: str) -> list[dict[str, Any]]:
    return [c for c in harness.mdr_comments(incident_id) if c["author_name"] == MDR_CONNECTION_NAME]


def mdr_response(harness: SyncHarness, incident_id: str, response_id: str) -> dict[str, Any]:
    [found] = [r for r in harness.mdr_sim.responses(MDR_CLIENT_ID, incident_id) if r["response_id"] == response_id]
    return found


async def later_cycles(harness: SyncHarness, sync: Any, count: int = 3) -> None:
    """Run cycles after the Jira search delay, so changes made meanwhile are found."""
    for _cycle in range(count):
        harness.advance(TICKET_SEARCH_DELAY)
        await sync.run_cycle()


async def restart(harness: SyncHarness, count: int = 3) -> Any:
    """A fresh engine, as after the process was killed: retry what was parked, then run cycles."""
    harness.advance(5)
    sync = await harness.engine()
    await sync.retry_parked()
    await later_cycles(harness, sync, count)
    return sync


async def linked_response(harness: SyncHarness, **response: Any) -> tuple[str, str, Any]:
    """Seed an incident with one response and sync it; return the incident id, the response id and the engine."""
    incident_id = harness.seed()["incident_id"]
    response_id = harness.mdr_sim.add_response(MDR_CLIENT_ID, incident_id, **response)["response_id"]
    sync = await harness.cycles(1)
    return incident_id, response_id, sync


# Status: crash windows and races


async def test_own_move_crash_keeps_mdr_open(
    harness: SyncHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connector moves the issue to Done for MDR `Resolved` and dies before recording it.

    The next engine reads a done issue that the ledger does not show. That
    is the connector's own move, so it must not close the MDR incident.
    """
    harness.use_mapping(status=CLOSE_ON_DONE)
    incident_id = harness.seed()["incident_id"]
    sync = await harness.cycles(1)
    issue = harness.issue_for(incident_id)
    harness.mdr_sim.update_incident(MDR_CLIENT_ID, incident_id, status="Resolved")

    real_record = harness.store.record_statuses

    async def crash_after_move(connection: str, incident: str, **statuses: Any) -> None:
        if statuses.get("mdr_status") == "Resolved":
            raise SimulatedCrash
        await real_record(connection, incident, **statuses)

    monkeypatch.setattr(harness.store, "record_statuses", crash_after_move)
    harness.advance(TICKET_SEARCH_DELAY)
    with pytest.raises(SimulatedCrash):
        await sync.run_cycle()
    monkeypatch.setattr(harness.store, "record_statuses", real_record)
    assert issue.fields["status"] == "Done"

    await restart(harness)

    assert harness.mdr_sim.call_counts.get(CLOSE_CALL, 0) == 0
    assert harness.mdr_sim.incident(MDR_CLIENT_ID, incident_id)["status"] == "Resolved"
    assert harness.jira.sim.calls.get(TRANSITION, 0) == 1
    link = await harness.store.get_link("main", incident_id)
    assert (link.ticket_status, link.mdr_status) == ("Done", "Resolved")


async def test_lost_transition_reply_does_not_close_mdr(harness: SyncHarness) -> None:
    """Jira applies the connector's transition to Done but the reply is lost; MDR stays Resolved."""
    harness.use_mapping(status=CLOSE_ON_DONE)
    incident_id = harness.seed()["incident_id"]
    sync = await harness.cycles(1)
    issue = harness.issue_for(incident_id)
    harness.mdr_sim.update_incident(MDR_CLIENT_ID, incident_id, status="Resolved")
    harness.jira.sim.drop_reply_after_commit("POST", "/rest/api/2/issue/{issue}/transitions")

    await later_cycles(harness, sync, count=1)
    assert issue.fields["status"] == "Done"
    await restart(harness)

    assert harness.mdr_sim.call_counts.get(CLOSE_CALL, 0) == 0
    assert harness.mdr_sim.incident(MDR_CLIENT_ID, incident_id)["status"] == "Resolved"


async def test_crash_after_reopen_note_sends_one_note(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reopen note lands and its ledger row is finished, then the process dies before the status is recorded."""
    harness.use_mapping(status=CLOSE_ON_DONE)
    incident_id = harness.seed()["incident_id"]
    sync = await harness.cycles(1)
    issue = harness.issue_for(incident_id)
    harness.mdr_sim.update_incident(MDR_CLIENT_ID, incident_id, status="Closed", resolution="True positive")
    await later_cycles(harness, sync)
    assert issue.fields["status"] == "Done"

    real_record = harness.store.record_statuses

    async def crash_on_reopen(connection: str, incident: str, **statuses: Any) -> None:
        if statuses.get("ticket_status") == "To Do":
            raise SimulatedCrash
        await real_record(connection, incident, **statuses)

    monkeypatch.setattr(harness.store, "record_statuses", crash_on_reopen)
    harness.jira.sim.transition_as_human(issue.key, "To Do")
    harness.advance(TICKET_SEARCH_DELAY)
    with pytest.raises(SimulatedCrash):
        await sync.run_cycle()
    monkeypatch.setattr(harness.store, "record_statuses", real_record)

    await restart(harness)

    notes = connector_mdr_comments(harness, incident_id)
    assert len(notes) == 1
    assert "reopened" in notes[0]["text"]
    link = await harness.store.get_link("main", incident_id)
    assert link.ticket_status == "To Do"


async def test_status_flapping_moves_once_per_change(harness: SyncHarness) -> None:
    """On hold, Open, On hold, Open across cycles: one transition per change, no close, nothing sent back."""
    flapping = {**CLOSE_ON_DONE, "to_ticket": {"Open": "In Progress", "On hold": "On Hold", "Closed": "Done"}}
    harness.use_mapping(status=flapping)
    incident_id = harness.seed()["incident_id"]
    sync = await harness.cycles(1)
    issue = harness.issue_for(incident_id)
    assert issue.fields["status"] == "In Progress"

    for status, expected in (("On hold", "On Hold"), ("Open", "In Progress"), ("On hold", "On Hold"), ("Open", "In Progress")):
        harness.mdr_sim.update_incident(MDR_CLIENT_ID, incident_id, status=status)
        await later_cycles(harness, sync)
        assert issue.fields["status"] == expected
    await restart(harness)

    assert harness.jira.sim.calls.get(TRANSITION, 0) == 5
    assert harness.mdr_sim.call_counts.get(CLOSE_CALL, 0) == 0
    assert connector_mdr_comments(harness, incident_id) == []
    assert await harness.store.get_parked("main", INCIDENT, incident_id) is None


async def test_unmapped_then_mapped_resolution_closes_once(harness: SyncHarness) -> None:
    """A close held back by an unmapped resolution goes out once, with the new mapping, from a fresh engine."""
    rules = {**CLOSE_ON_DONE, "close_mdr": {**CLOSE_ON_DONE["close_mdr"], "resolutions": {"Done": "TRUE_POSITIVE"}}}
    harness.use_mapping(status=rules)
    incident_id = harness.seed()["incident_id"]
    sync = await harness.cycles(1)
    issue = harness.issue_for(incident_id)
    harness.jira.sim.transition_as_human(issue.key, "Done", resolution="Duplicate")
    await later_cycles(harness, sync)
    assert harness.mdr_sim.call_counts.get(CLOSE_CALL, 0) == 0

    harness.use_mapping(status={**rules, "close_mdr": {**rules["close_mdr"], "resolutions": {"Duplicate": "FALSE_POSITIVE"}}})
    await restart(harness)
    await restart(harness)

    incident = harness.mdr_sim.incident(MDR_CLIENT_ID, incident_id)
    assert incident["status"] == "Closed"
    assert incident["resolution"] == "False positive"
    assert harness.mdr_sim.call_counts.get(CLOSE_CALL, 0) == 1
    assert issue.fields["status"] == "Done"
    assert harness.jira.sim.calls.get(TRANSITION, 0) == 0


async def test_close_on_both_sides_at_once(harness: SyncHarness) -> None:
    """MDR closes the incident while a person closes the issue: no close call, no transition, no note."""
    harness.use_mapping(status=CLOSE_ON_DONE)
    incident_id = harness.seed()["incident_id"]
    sync = await harness.cycles(1)
    issue = harness.issue_for(incident_id)

    harness.mdr_sim.update_incident(MDR_CLIENT_ID, incident_id, status="Closed", resolution="True positive")
    harness.jira.sim.transition_as_human(issue.key, "Done", resolution="Won't Do")
    await later_cycles(harness, sync)
    await restart(harness)

    assert harness.mdr_sim.call_counts.get(CLOSE_CALL, 0) == 0
    assert harness.jira.sim.calls.get(TRANSITION, 0) == 0
    assert issue.fields["resolution"] == "Won't Do"
    assert connector_mdr_comments(harness, incident_id) == []


async def test_close_on_both_sides_keeps_persons_done_status(harness: SyncHarness) -> None:
    """With two done statuses, MDR closing while a person cancels the issue leaves it Cancelled."""
    harness.jira.sim.workflow = SimWorkflow(
        statuses={**DEFAULT_STATUSES, "Cancelled": "done"},
        transitions=(*DEFAULT_TRANSITIONS, SimTransition("61", "Cancel", "Cancelled", ("To Do", "In Progress"))),
    )
    rules = {**CLOSE_ON_DONE, "close_mdr": {**CLOSE_ON_DONE["close_mdr"], "done_statuses": ["Done", "Cancelled"]}}
    harness.use_mapping(status=rules)
    incident_id = harness.seed()["incident_id"]
    sync = await harness.cycles(1)
    issue = harness.issue_for(incident_id)

    harness.mdr_sim.update_incident(MDR_CLIENT_ID, incident_id, status="Closed", resolution="True positive")
    harness.jira.sim.transition_as_human(issue.key, "Cancelled", resolution="Won't Do")
    await later_cycles(harness, sync)
    await restart(harness)

    assert issue.fields["status"] == "Cancelled"
    assert harness.jira.sim.calls.get(TRANSITION, 0) == 0
    assert harness.mdr_sim.call_counts.get(CLOSE_CALL, 0) == 0
    assert connector_mdr_comments(harness, incident_id) == []
    link = await harness.store.get_link("main", incident_id)
    assert (link.ticket_status, link.mdr_status) == ("Cancelled", "Closed")


# Responses: who may decide, and what the replies reveal


def allow(harness: SyncHarness, **rules: Any) -> None:
    harness.use_mapping(responses=rules)


async def command_cycles(harness: SyncHarness, sync: Any, issue_key: str, body: str, **comment: Any) -> Any:
    """Write a comment on the issue (by default as the analyst), then run three cycles once search can find it."""
    written = harness.jira.sim.add_comment(issue_key, body, **comment)
    await later_cycles(harness, sync)
    return written


async def test_restricted_command_reason_not_echoed_in_public(harness: SyncHarness) -> None:
    """A command in a JSM internal note is carried out, but its reason does not reach a public echo."""
    allow(harness, approvers=[ANALYST_ID])
    incident_id, response_id, sync = await linked_response(harness)
    issue = harness.issue_for(incident_id)

    await command_cycles(
        harness, sync, issue.key, f"/mdr decline {response_id} VIP laptop of the CFO, keep quiet", internal=True
    )

    assert mdr_response(harness, incident_id, response_id)["status"] == "Declined"
    [echo] = with_origin(issue, NOTICE_ORIGIN)
    assert echo.visibility is None
    assert "declined" in echo.body
    assert "CFO" not in echo.body
    [view] = with_origin(issue, RESPONSE_ORIGIN)
    assert "CFO" not in view.body
    assert "CFO" not in mdr_response(harness, incident_id, response_id)["comment"]
    [decision] = await harness.store.list_decisions("main", incident_id=incident_id)
    assert decision.reason == "VIP laptop of the CFO, keep quiet"
    assert decision.outcome == "sent"
    assert not any("CFO" in c["text"] for c in harness.mdr_comments(incident_id))


async def test_display_name_equal_to_approver_id_refused(harness: SyncHarness) -> None:
    """An account whose display name is an approver's account id is refused."""
    allow(harness, approvers=[ANALYST_ID])
    harness.jira.sim.add_user(account_id=OTHER_ID, name="other", display_name=ANALYST_ID)
    incident_id, response_id, sync = await linked_response(harness)
    issue = harness.issue_for(incident_id)

    await command_cycles(harness, sync, issue.key, f"/mdr confirm {response_id} it is me", author="other")

    assert harness.mdr_sim.call_counts.get(UPDATE_CALL, 0) == 0
    assert mdr_response(harness, incident_id, response_id)["status"] == "New"
    [decision] = await harness.store.list_decisions("main", incident_id=incident_id)
    assert (decision.actor_id, decision.outcome) == (OTHER_ID, "refused")


async def test_command_by_connector_account_ignored(harness: SyncHarness) -> None:
    """A command written with the connector's own account, even when that account is allowed, is never read."""
    service = harness.jira.sim.service
    allow(harness, approvers=[service.account_id, ANALYST_ID])
    incident_id, response_id, sync = await linked_response(harness)
    issue = harness.issue_for(incident_id)

    await command_cycles(harness, sync, issue.key, f"/mdr confirm {response_id} self approval", author=service)

    assert harness.mdr_sim.call_counts.get(UPDATE_CALL, 0) == 0
    assert with_origin(issue, NOTICE_ORIGIN) == []
    assert await harness.store.list_decisions("main", incident_id=incident_id) == []


async def test_markup_in_display_name_stays_literal(harness: SyncHarness) -> None:
    """A display name with Jira link markup shows as text in the refusal, not as a link."""
    allow(harness, approvers=[ANALYST_ID])
    harness.jira.sim.add_user(account_id=OTHER_ID, name="other", display_name="[Approve here|https://evil.example]")
    incident_id, response_id, sync = await linked_response(harness)
    issue = harness.issue_for(incident_id)

    await command_cycles(harness, sync, issue.key, f"/mdr confirm {response_id} ok", author="other")

    [reply] = with_origin(issue, NOTICE_ORIGIN)
    assert "[Approve here|https://evil.example]" not in reply.body
    assert "Approve here" in reply.body


@pytest.mark.parametrize(
    "word",
    ["\uff0fmdr", "/m\u0434r", "/mdr\u200b", "\u2215mdr"],
    ids=["fullwidth-solidus", "cyrillic-de", "zero-width-space", "division-slash"],
)
async def test_lookalike_command_word_is_no_command(harness: SyncHarness, word: str) -> None:
    """A lookalike of /mdr decides nothing, records no decision and gets no reply."""
    allow(harness, approvers=[ANALYST_ID])
    incident_id, response_id, sync = await linked_response(harness)
    issue = harness.issue_for(incident_id)

    await command_cycles(harness, sync, issue.key, f"{word} confirm {response_id} lookalike")

    assert harness.mdr_sim.call_counts.get(UPDATE_CALL, 0) == 0
    assert with_origin(issue, NOTICE_ORIGIN) == []
    assert await harness.store.list_decisions("main", incident_id=incident_id) == []


async def test_two_commands_in_one_comment_send_one_decision(harness: SyncHarness) -> None:
    """Only the first line of a comment is a command; a second one in the same comment is part of the reason."""
    allow(harness, approvers=[ANALYST_ID])
    incident_id, response_id, sync = await linked_response(harness)
    second = harness.mdr_sim.add_response(MDR_CLIENT_ID, incident_id)["response_id"]
    issue = harness.issue_for(incident_id)

    await command_cycles(
        harness, sync, issue.key, f"/mdr confirm {response_id} first\n\n/mdr decline {second} second"
    )
    await restart(harness)

    assert harness.mdr_sim.call_counts.get(UPDATE_CALL, 0) == 1
    assert mdr_response(harness, incident_id, response_id)["status"] == "Confirmed"
    assert mdr_response(harness, incident_id, second)["status"] == "New"
    assert len(with_origin(issue, NOTICE_ORIGIN)) == 1


async def test_timeout_decline_during_confirm_is_reported(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """The response times out while the confirm is on its way: MDR rejects it, and one reply on the ticket reports it."""
    harness.mdr_sim.update_settings(response_timeout_seconds=900)
    allow(harness, approvers=[ANALYST_ID])
    incident_id, response_id, sync = await linked_response(harness)
    issue = harness.issue_for(incident_id)
    real_update = sync.mdr.update_response

    async def late_update(*args: Any, **kwargs: Any) -> None:
        harness.advance(900)
        await real_update(*args, **kwargs)

    monkeypatch.setattr(sync.mdr, "update_response", late_update)
    await command_cycles(harness, sync, issue.key, f"/mdr confirm {response_id} quick")
    monkeypatch.setattr(sync.mdr, "update_response", real_update)
    await restart(harness)

    response = mdr_response(harness, incident_id, response_id)
    assert response["status"] == "Declined"
    [reply] = with_origin(issue, NOTICE_ORIGIN)
    assert "Nothing was sent" in reply.body or "rejected" in reply.body
    [decision] = await harness.store.list_decisions("main", incident_id=incident_id)
    assert decision.outcome == "failed"
    [view] = with_origin(issue, RESPONSE_ORIGIN)
    assert "status *Declined*" in view.body


async def test_pending_decline_overtaken_by_timeout_not_claimed(
    harness: SyncHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decline recorded, then cut off before it was sent; MDR declines the response on timeout meanwhile.

    The resumed command must not report the person's decline as sent,
    because MDR never received it.
    """
    harness.mdr_sim.update_settings(response_timeout_seconds=900)
    allow(harness, approvers=[ANALYST_ID])
    incident_id, response_id, sync = await linked_response(harness)
    issue = harness.issue_for(incident_id)

    real_update = sync.mdr.update_response

    async def crash(*args: Any, **kwargs: Any) -> None:
        raise SimulatedCrash

    monkeypatch.setattr(sync.mdr, "update_response", crash)
    harness.jira.sim.add_comment(issue.key, f"/mdr decline {response_id} not on this host")
    harness.advance(TICKET_SEARCH_DELAY)
    with pytest.raises(SimulatedCrash):
        await sync.run_cycle()
    monkeypatch.setattr(sync.mdr, "update_response", real_update)
    [decision] = await harness.store.list_decisions("main", incident_id=incident_id)
    assert decision.outcome == "pending"

    harness.advance(900)
    await restart(harness)

    assert harness.mdr_sim.call_counts.get(UPDATE_CALL, 0) == 0
    assert mdr_response(harness, incident_id, response_id)["comment"] != "not on this host"
    [decision] = await harness.store.list_decisions("main", incident_id=incident_id)
    assert decision.outcome == "failed"
    [reply] = with_origin(issue, NOTICE_ORIGIN)
    assert "Nothing was sent" in reply.body


async def test_deleted_view_posted_again_once(harness: SyncHarness) -> None:
    """A person deletes the response's view; the next status change posts one new view, never two."""
    incident_id, response_id, sync = await linked_response(harness)
    issue = harness.issue_for(incident_id)
    [view] = with_origin(issue, RESPONSE_ORIGIN)
    harness.jira.sim.delete_comment(view.id)
    await later_cycles(harness, sync)

    await sync.mdr.update_response(response_id, "Declined", "declined in the console")
    await later_cycles(harness, sync)
    await restart(harness)

    [view] = with_origin(issue, RESPONSE_ORIGIN)
    assert "status *Declined*" in view.body
    [item] = await harness.store.get_items("main", incident_id, "response")
    assert item.target_id == str(view.id)


async def test_restricted_command_lost_reply_resumed_once(
    harness: SyncHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decision from a restricted comment whose reply was lost is found applied, sent once, and still quotes nothing."""
    allow(harness, approvers=[ANALYST_ID])
    incident_id, response_id, sync = await linked_response(harness)
    issue = harness.issue_for(incident_id)
    real_update = sync.mdr.update_response

    async def update_then_crash(*args: Any, **kwargs: Any) -> None:
        await real_update(*args, **kwargs)
        raise SimulatedCrash

    monkeypatch.setattr(sync.mdr, "update_response", update_then_crash)
    harness.jira.sim.add_comment(
        issue.key, f"/mdr confirm {response_id} the CFO agreed", visibility={"type": "role", "value": "Developers"}
    )
    harness.advance(TICKET_SEARCH_DELAY)
    with pytest.raises(SimulatedCrash):
        await sync.run_cycle()
    monkeypatch.setattr(sync.mdr, "update_response", real_update)

    await restart(harness)

    assert harness.mdr_sim.call_counts.get(UPDATE_CALL, 0) == 1
    [decision] = await harness.store.list_decisions("main", incident_id=incident_id)
    assert decision.outcome == "sent"
    [echo] = with_origin(issue, NOTICE_ORIGIN)
    assert "confirmed" in echo.body
    assert not any("CFO" in c.body for c in issue.comments if c.author.account_id != ANALYST_ID)


# Incidents from tickets

HOSTS_FIELD = "customfield_10020"
REQUESTS = {"enabled": True, "label": "mdr-create", "hosts_field": HOSTS_FIELD}


def enable_requests(harness: SyncHarness) -> None:
    harness.jira.sim.custom_fields[HOSTS_FIELD] = "Affected hosts"
    harness.use_mapping(create_incidents=REQUESTS)


def request_issue(harness: SyncHarness, hosts: str, **fields: Any) -> Any:
    values: dict[str, Any] = {
        "project": {"key": "SEC"},
        "issuetype": {"name": "Task"},
        "summary": "Suspicious process",
        "priority": {"name": "High"},
        "labels": ["mdr-create"],
        HOSTS_FIELD: hosts,
        **fields,
    }
    return harness.jira.sim.create_issue(values, reporter=harness.jira.sim.user(HUMAN_NAME))


async def test_mdr_rejection_text_cannot_inject_markup(harness: SyncHarness) -> None:
    """MDR's rejection echoes the hosts field; its Markdown must not become a link in the connector's reply."""
    enable_requests(harness)
    harness.mdr_sim.update_settings(create_requires_known_assets=True)
    sync = await harness.cycles(1)
    issue = request_issue(harness, "WS-09:[approve](https://evil.example/login)")

    await later_cycles(harness, sync)

    [reply] = with_origin(issue, NOTICE_ORIGIN)
    assert "MDR rejected" in reply.body
    assert "|https://evil.example/login]" not in reply.body
    assert harness.mdr_sim.call_counts.get("incidents/create", 0) == 1


async def test_forged_request_marker_does_not_capture_other_ticket(
    harness: SyncHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ticket whose description quotes another ticket's request marker cannot take over that ticket's incident.

    The forger's description names the victim's marker. The victim's create
    loses its reply, so its incident is looked up by marker: the lookup must
    find the victim's own incident, not the forger's.
    """
    enable_requests(harness)
    asset = harness.mdr_sim.add_asset(MDR_CLIENT_ID, "WS-10")
    sync = await harness.cycles(1)
    victim = request_issue(harness, f"WS-10:{asset['asset_id']}", summary="victim")
    forger = request_issue(
        harness,
        f"WS-10:{asset['asset_id']}",
        summary="forger",
        description=f"see also\n\nmdr-connector request main/{victim.id}",
    )
    # The forger's request is handled first, so its incident exists when the victim's lookup runs.
    harness.jira.sim.issues[forger.id].created = victim.created - timedelta(seconds=1)
    real_create = sync.mdr.create_incident
    creates: list[str] = []

    async def create_and_lose_victim_reply(**kwargs: Any) -> Any:
        creates.append(kwargs["summary"])
        incident = await real_create(**kwargs)
        if kwargs["summary"] == "victim":
            raise OutcomeUnknownError("reply lost")
        return incident

    monkeypatch.setattr(sync.mdr, "create_incident", create_and_lose_victim_reply)
    await later_cycles(harness, sync)
    monkeypatch.setattr(sync.mdr, "create_incident", real_create)
    await restart(harness)

    by_summary = {i["summary"]: i for i in harness.mdr_sim.incidents(MDR_CLIENT_ID)}
    victim_link = await harness.store.get_link("main", by_summary["victim"]["incident_id"])
    forger_link = await harness.store.get_link("main", by_summary["forger"]["incident_id"])
    assert victim_link is not None and victim_link.ticket_id == str(victim.id)
    assert forger_link is not None and forger_link.ticket_id == str(forger.id)
    assert sorted(creates) == ["forger", "victim"]


# Comment policies: edits, deletions, restriction changes


def connector_texts(harness: SyncHarness, incident_id: str) -> list[str]:
    return [c["text"] for c in connector_mdr_comments(harness, incident_id)]


async def test_restriction_flips_send_no_repeated_notes(harness: SyncHarness) -> None:
    """A copied comment made restricted and public again, twice, without a text change, sends no edit note."""
    incident_id = harness.seed()["incident_id"]
    sync = await harness.cycles(1)
    issue = harness.issue_for(incident_id)
    comment = harness.jira.sim.add_comment(issue.key, "the user clicked the link")
    await later_cycles(harness, sync)
    assert len(connector_texts(harness, incident_id)) == 1

    for _round in range(2):
        harness.advance(1)
        harness.jira.sim.edit_comment(
            comment.id, comment.body, changes={"visibility": {"type": "role", "value": "Developers"}}
        )
        await later_cycles(harness, sync)
        harness.advance(1)
        harness.jira.sim.edit_comment(comment.id, comment.body, changes={"visibility": None})
        await later_cycles(harness, sync)
    await restart(harness)

    texts = connector_texts(harness, incident_id)
    assert len(texts) == 1
    assert sync.stats.comment_notes == 0


async def test_text_edited_while_restricted_noted_once_when_public(harness: SyncHarness) -> None:
    """A text edited while the comment was restricted goes to MDR once, when the comment is public again."""
    incident_id = harness.seed()["incident_id"]
    sync = await harness.cycles(1)
    issue = harness.issue_for(incident_id)
    comment = harness.jira.sim.add_comment(issue.key, "first text")
    await later_cycles(harness, sync)

    harness.advance(1)
    harness.jira.sim.edit_comment(
        comment.id, "secret text", changes={"visibility": {"type": "role", "value": "Developers"}}
    )
    await later_cycles(harness, sync)
    assert not any("secret text" in text for text in connector_texts(harness, incident_id))

    harness.advance(1)
    harness.jira.sim.edit_comment(comment.id, "public text", changes={"visibility": None})
    await later_cycles(harness, sync)
    await restart(harness)

    texts = connector_texts(harness, incident_id)
    assert len(texts) == 2
    assert sum("public text" in text for text in texts) == 1
    assert not any("secret text" in text for text in texts)


async def test_edit_note_after_crash_sent_once(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """The edit note lands in MDR and the process dies before its ledger row is finished: one note in the end."""
    incident_id = harness.seed()["incident_id"]
    sync = await harness.cycles(1)
    issue = harness.issue_for(incident_id)
    comment = harness.jira.sim.add_comment(issue.key, "before")
    await later_cycles(harness, sync)

    real_create = sync.mdr.create_comment

    async def create_then_crash(*args: Any, **kwargs: Any) -> Any:
        await real_create(*args, **kwargs)
        raise SimulatedCrash

    monkeypatch.setattr(sync.mdr, "create_comment", create_then_crash)
    harness.advance(1)
    harness.jira.sim.edit_comment(comment.id, "after")
    harness.advance(TICKET_SEARCH_DELAY)
    with pytest.raises(SimulatedCrash):
        await sync.run_cycle()
    monkeypatch.setattr(sync.mdr, "create_comment", real_create)

    await restart(harness)
    await restart(harness)

    texts = connector_texts(harness, incident_id)
    assert len(texts) == 2
    assert sum("after" in text for text in texts) == 1


async def test_ticket_delete_mirrored_once_after_crash(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """`on_ticket_delete: mirror`: the copy is deleted in MDR, the process dies before the record; nothing more happens."""
    harness.use_mapping(comments={"on_ticket_delete": "mirror"})
    incident_id = harness.seed()["incident_id"]
    sync = await harness.cycles(1)
    issue = harness.issue_for(incident_id)
    comment = harness.jira.sim.add_comment(issue.key, "to be deleted")
    await later_cycles(harness, sync)
    assert len(connector_texts(harness, incident_id)) == 1

    real_delete = sync.mdr.delete_comment

    async def delete_then_crash(*args: Any, **kwargs: Any) -> None:
        await real_delete(*args, **kwargs)
        raise SimulatedCrash

    monkeypatch.setattr(sync.mdr, "delete_comment", delete_then_crash)
    harness.jira.sim.delete_comment(comment.id)
    harness.advance(TICKET_SEARCH_DELAY)
    with pytest.raises(SimulatedCrash):
        await sync.run_cycle()
    monkeypatch.setattr(sync.mdr, "delete_comment", real_delete)

    await restart(harness)

    assert connector_texts(harness, incident_id) == []
    assert harness.mdr_sim.call_counts.get("comments/delete", 0) == 1
    assert await harness.store.get_parked("main", INCIDENT, incident_id) is None


async def test_command_comment_deleted_after_decision_notes_once(harness: SyncHarness) -> None:
    """A command comment copied to MDR and deleted after its decision: one deletion note, and no second decision."""
    allow(harness, approvers=[ANALYST_ID])
    incident_id, response_id, sync = await linked_response(harness)
    issue = harness.issue_for(incident_id)
    command = await command_cycles(harness, sync, issue.key, f"/mdr confirm {response_id} go")

    harness.jira.sim.delete_comment(command.id)
    await later_cycles(harness, sync)
    await restart(harness)

    assert harness.mdr_sim.call_counts.get(UPDATE_CALL, 0) == 1
    texts = [" ".join(text.split()) for text in connector_texts(harness, incident_id)]
    assert len(texts) == 2
    assert sum("was deleted" in text for text in texts) == 1


async def test_copies_recorded_without_digest_send_no_note(harness: SyncHarness) -> None:
    """A copy recorded with the edit time alone, as before text digests, is not taken for an edited comment."""
    incident_id = harness.seed()["incident_id"]
    sync = await harness.cycles(1)
    issue = harness.issue_for(incident_id)
    harness.jira.sim.add_comment(issue.key, "copied by an older version")
    await later_cycles(harness, sync)
    [copy] = [item for item in await harness.store.get_items("main", incident_id, "comment") if item.direction == "ticket_to_mdr"]
    time_only = copy.source_version.partition(" #")[0]
    await harness.store.finish_item(
        "main", incident_id, "comment", "ticket_to_mdr", copy.source_id, copy.target_id, source_version=time_only
    )

    harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>any change</p>", author="SOC Analyst")
    await restart(harness)

    assert len(connector_texts(harness, incident_id)) == 1


async def test_lost_close_reply_then_reopen_keeps_ticket_open(harness: SyncHarness) -> None:
    """The close reaches MDR but its reply is lost, and a person reopens the issue before the next cycle.

    MDR's Closed status is the connector's own change: it must not move
    the reopened issue back to Done.
    """
    harness.use_mapping(status=CLOSE_ON_DONE)
    incident_id = harness.seed()["incident_id"]
    sync = await harness.cycles(1)
    issue = harness.issue_for(incident_id)
    harness.mdr_sim.drop_reply_after_commit("incidents/close")

    harness.jira.sim.transition_as_human(issue.key, "Done", resolution="Done")
    await later_cycles(harness, sync, count=1)
    assert harness.mdr_sim.incident(MDR_CLIENT_ID, incident_id)["status"] == "Closed"
    harness.jira.sim.transition_as_human(issue.key, "To Do")
    await restart(harness)

    assert issue.fields["status"] == "To Do"
    assert harness.jira.sim.calls.get(TRANSITION, 0) == 0
    assert harness.mdr_sim.call_counts.get(CLOSE_CALL, 0) == 1
    notes = connector_mdr_comments(harness, incident_id)
    assert len(notes) == 1
    assert "reopened" in notes[0]["text"]


async def test_hostile_response_values_shown_once(harness: SyncHarness) -> None:
    """Markup, a huge description and odd parameters from MDR make one escaped view, kept over three cycles."""
    incident_id = harness.seed()["incident_id"]
    response_id = harness.mdr_sim.add_response(
        MDR_CLIENT_ID,
        incident_id,
        type="[run|https://evil.example] {color:red}x{color}",
        description="![img](https://evil.example/a.png) " + "A" * 2_000,
        parameters={"a|b": ["[x|https://evil.example]"], "n": None, "nested": {"deep": ["\u0000\u202e"]}},
    )["response_id"]
    huge_id = harness.mdr_sim.add_response(MDR_CLIENT_ID, incident_id, description="B" * 200_000)["response_id"]
    sync = await harness.cycles(1)
    await later_cycles(harness, sync)
    await restart(harness)

    issue = harness.issue_for(incident_id)
    views = {marker_of(view)["source_id"]: view for view in with_origin(issue, RESPONSE_ORIGIN)}
    assert len(with_origin(issue, RESPONSE_ORIGIN)) == 2
    assert set(views) == {response_id, huge_id}
    view = views[response_id]
    # Jira renders nothing inside a {noformat} block, and the converter falls back to one for odd input.
    live = view.body if not view.body.startswith("{noformat}") else ""
    assert re.search(r"(?<![{\\])\[run\|https://evil\.example\]", live) is None
    assert "!https://evil.example/a.png!" not in live
    assert "\u0000" not in view.body
    assert await harness.store.get_parked("main", INCIDENT, incident_id) is None


async def test_command_for_unreadable_response_not_refused_for_good(harness: SyncHarness) -> None:
    """While MDR returns the response malformed, a command for it waits instead of being refused as unknown."""
    allow(harness, approvers=[ANALYST_ID])
    incident_id, response_id, sync = await linked_response(harness)
    issue = harness.issue_for(incident_id)
    stored = next(r for r in harness.mdr_sim._incidents[incident_id].responses if r["response_id"] == response_id)
    stored["status"] = 7
    harness.mdr_sim.update_incident(MDR_CLIENT_ID, incident_id)

    await command_cycles(harness, sync, issue.key, f"/mdr confirm {response_id} isolate now")
    assert harness.mdr_sim.call_counts.get(UPDATE_CALL, 0) == 0

    stored["status"] = "New"
    harness.mdr_sim.update_incident(MDR_CLIENT_ID, incident_id)
    await restart(harness)

    assert mdr_response(harness, incident_id, response_id)["status"] == "Confirmed"
    assert harness.mdr_sim.call_counts.get(UPDATE_CALL, 0) == 1
    replies = with_origin(issue, NOTICE_ORIGIN)
    assert len(replies) == 1
    assert "confirmed" in replies[0].body


async def test_request_withdrawn_after_create_crash_not_lost(
    harness: SyncHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The incident is created, the process dies before the link, and a person removes the request label.

    The incident exists in MDR, so it must end up on a ticket: the
    requesting one, or a new one. It must not be left with none.
    """
    enable_requests(harness)
    asset = harness.mdr_sim.add_asset(MDR_CLIENT_ID, "WS-11")
    sync = await harness.cycles(1)
    real_create = sync.mdr.create_incident

    async def create_then_crash(**kwargs: Any) -> Any:
        await real_create(**kwargs)
        raise SimulatedCrash

    monkeypatch.setattr(sync.mdr, "create_incident", create_then_crash)
    issue = request_issue(harness, f"WS-11:{asset['asset_id']}")
    harness.advance(TICKET_SEARCH_DELAY)
    with pytest.raises(SimulatedCrash):
        await sync.run_cycle()
    monkeypatch.setattr(sync.mdr, "create_incident", real_create)
    harness.jira.sim.edit_issue(issue.key, {"labels": []})

    await restart(harness)
    await restart(harness)

    [incident] = [i for i in harness.mdr_sim.incidents(MDR_CLIENT_ID) if i["summary"] == "Suspicious process"]
    link = await harness.store.get_link("main", incident["incident_id"])
    assert link is not None and link.state == "linked"
    assert harness.mdr_sim.call_counts.get("incidents/create", 0) == 1


# The command line's decisions


async def test_terminal_batch_partly_applied_audited_per_response(harness: SyncHarness) -> None:
    """`responses decline A B`: B is declined in the MDR console meanwhile, so MDR applies A and rejects the call.

    The audit records what happened to each response: A sent, B failed.
    """
    incident_id = harness.seed()["incident_id"]
    first, second = (harness.mdr_sim.add_response(MDR_CLIENT_ID, incident_id)["response_id"] for _ in range(2))
    sync = await harness.engine()
    mdr = sync.mdr
    real_update_responses = mdr.update_responses

    async def console_declines_second_first(response_ids: Any, status: str, comment: str) -> None:
        stored = next(r for r in harness.mdr_sim._incidents[incident_id].responses if r["response_id"] == second)
        stored.update(status="Declined", comment="declined in the console")
        await real_update_responses(response_ids, status, comment)

    mdr.update_responses = console_declines_second_first  # type: ignore[method-assign]
    try:
        with pytest.raises(RejectedError):
            await decide_from_terminal(
                mapping=sync.mapping,
                store=harness.store,
                mdr=mdr,
                tickets=None,
                connection="main",
                incident_id=incident_id,
                response_ids=[first, second],
                decision="decline",
                reason="maintenance window",
                actor=TerminalActor.from_user_name("admin"),
            )
    finally:
        mdr.update_responses = real_update_responses  # type: ignore[method-assign]

    assert mdr_response(harness, incident_id, first)["status"] == "Declined"
    outcomes = {row.response_id: row.outcome for row in await harness.store.list_decisions("main", incident_id=incident_id)}
    assert outcomes == {first: "sent", second: "failed"}


async def test_paged_delete_race_mirrors_one(harness: SyncHarness) -> None:
    """A person deletes one comment while the connector pages through the list, so the first read skips another.

    Only the comment really deleted has its MDR copy deleted, once.
    """
    harness.use_mapping(comments={"on_ticket_delete": "mirror"})
    harness.jira.sim.settings.comment_page_cap = 1
    incident_id = harness.seed()["incident_id"]
    sync = await harness.cycles(1)
    issue = harness.issue_for(incident_id)
    written = [harness.jira.sim.add_comment(issue.key, f"note {number}") for number in range(4)]
    await later_cycles(harness, sync)
    assert len(connector_texts(harness, incident_id)) == 4

    real_list = sync.tickets.list_comments
    reads = 0

    async def list_during_delete(ref: Any) -> Any:
        nonlocal reads
        reads += 1
        comments = await real_list(ref)
        if reads == 1:
            # The delete shifts the later pages back by one, so this read misses the comment after it.
            harness.jira.sim.delete_comment(written[1].id)
            return [comment for comment in comments if comment.id != str(written[2].id)]
        return comments

    sync.tickets.list_comments = list_during_delete  # type: ignore[method-assign]
    harness.jira.sim.add_comment(issue.key, "a new comment starts the reconciliation")
    try:
        await later_cycles(harness, sync)
    finally:
        sync.tickets.list_comments = real_list  # type: ignore[method-assign]
    await restart(harness)

    texts = connector_texts(harness, incident_id)
    assert reads > 2
    assert harness.mdr_sim.call_counts.get("comments/delete", 0) == 1
    assert len(texts) == 4
    assert not any("note 1" in text for text in texts)
    assert sum("note 2" in text for text in texts) == 1
