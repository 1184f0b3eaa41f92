"""MDR responses on the ticket: the view comment, and confirm or decline commands, against both simulators."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fixtures_jira import StartJira
from fixtures_mdr import MDR_CLIENT_ID
from fixtures_postgres import LEDGER_BACKENDS
from fixtures_sync import SyncHarness, open_harness

from mdr_connector.adapters.jira.adapter import JiraTicketAdapter
from mdr_connector.adapters.jira.simulator_state import HUMAN_NAME
from mdr_connector.adapters.mdr.models import Response
from mdr_connector.adapters.mdr.simulator import MdrSimulator
from mdr_connector.connector.engine import INCIDENT
from mdr_connector.connector.errors import ConfigError, OutcomeUnknownError
from mdr_connector.connector.responses import (
    COMMAND,
    RESPONSE,
    CommandSyntaxError,
    looks_like_command,
    parse_command,
    render_response,
)
from mdr_connector.connector.tickets import NOTICE_ORIGIN, RESPONSE_ORIGIN, TicketCapabilities

ANALYST_ID = "557058:analyst"
ANALYST_NAME = "SOC Analyst"
OTHER_ID = "557058:other"
TICKET_SEARCH_DELAY = 31


@pytest.fixture(params=LEDGER_BACKENDS)
def ledger_backend(request: pytest.FixtureRequest) -> str:
    """Every harness test here runs with its ledger on SQLite and again on PostgreSQL, for the decision audit."""
    return request.param


# Parsing and rendering


@pytest.mark.parametrize(
    ("body", "decision", "response_id", "reason"),
    [
        ("/mdr confirm MDR_1 isolate it", "confirm", "MDR_1", "isolate it"),
        ("/mdr Decline MDR_1 not now", "decline", "MDR_1", "not now"),
        ("  /mdr   confirm   MDR_1   spaced   out  ", "confirm", "MDR_1", "spaced out"),
        ("`/mdr confirm MDR_1 in a code span`", "confirm", "MDR_1", "in a code span"),
        ("/mdr confirm MDR\\_a\\_b escaped underscores", "confirm", "MDR_a_b", "escaped underscores"),
        ("/mdr confirm MDR_1 first line\\\nsecond line", "confirm", "MDR_1", "first line second line"),
    ],
    ids=["plain", "verb-case", "spaces", "code-span", "escapes", "hard-break"],
)
def test_parse_command_accepts(body: str, decision: str, response_id: str, reason: str) -> None:
    """A command is read whatever markup the ticket system added around its words."""
    command = parse_command(body, "/mdr")

    assert command.decision == decision
    assert command.response_id == response_id
    assert command.reason == reason


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("/mdr", "confirm or decline"),
        ("/mdr approve MDR_1 fine", "confirm or decline"),
        ("/mdr confirm", "response id is missing"),
        ("/mdr confirm MDR_1", "reason is missing"),
        ("/mdr confirm MDR_1 " + "x" * 2001, "longer than 2000"),
    ],
    ids=["bare", "unknown-verb", "no-id", "no-reason", "long-reason"],
)
def test_parse_command_rejects(body: str, problem: str) -> None:
    """A malformed command names what is missing."""
    with pytest.raises(CommandSyntaxError) as caught:
        parse_command(body, "/mdr")

    assert problem in str(caught.value)


def test_command_word_must_lead() -> None:
    """Only a comment that starts with the command word is a command."""
    assert looks_like_command("/mdr confirm MDR_1 ok", "/mdr")
    assert looks_like_command("/MDR", "/mdr")
    assert not looks_like_command("please /mdr confirm MDR_1 ok", "/mdr")
    assert not looks_like_command("/mdrx confirm MDR_1 ok", "/mdr")
    assert not looks_like_command("", "/mdr")


def test_view_escapes_mdr_values() -> None:
    """Values from MDR cannot inject links or markup into the view."""
    response = Response(
        response_id="MDR_1",
        type="RUN_SCRIPT",
        status="New",
        asset_id="0xabc",
        description="see [here](https://evil.example) <b>now</b>",
        parameters={"interpreter": "powershell`", "args": ["-c", "x"]},
    )

    body = render_response(response, {"0xabc": "HOST*1"}, "/mdr")

    assert "[here](https" not in body
    assert "\\[here\\]" in body
    assert "<b>" not in body
    assert "`` powershell` ``" in body
    assert '`["-c", "x"]`' in body
    assert "`HOST*1` (asset `0xabc`)" in body
    assert "`/mdr confirm MDR_1 REASON`" in body


def test_view_of_decided_response_has_no_commands() -> None:
    """A response that left its initial status shows no command lines."""
    response = Response(response_id="MDR_1", status="Declined", comment="Automatically rejected")

    body = render_response(response, {}, "/mdr")

    assert "confirm MDR_1" not in body
    assert "Automatically rejected" in body
    assert "can no longer be decided" in body


# End to end


def marker_of(comment: Any) -> dict[str, str]:
    return comment.properties.get("mdr-connector", {})


def comments_with_origin(issue: Any, origin: str) -> list[Any]:
    return [comment for comment in issue.comments if marker_of(comment).get("origin") == origin]


EDIT_COMMENT = "PUT /rest/api/2/issue/{issue}/comment/{comment}"


def comment_edits(harness: SyncHarness) -> int:
    """Count the comment body edits the Jira simulator served."""
    return harness.jira.sim.calls[EDIT_COMMENT]


def mdr_response(harness: SyncHarness, incident_id: str, response_id: str) -> dict[str, Any]:
    responses = harness.mdr_sim.incident(MDR_CLIENT_ID, incident_id)["responses"]
    [found] = [response for response in responses if response["response_id"] == response_id]
    return found


async def linked_response(harness: SyncHarness) -> tuple[str, str, Any]:
    """Seed an incident with one response on its first host, and sync it.

    Returns the incident id, the response id and the engine.
    """
    incident = harness.seed()
    response = harness.mdr_sim.add_response(MDR_CLIENT_ID, incident["incident_id"])
    sync = await harness.cycles(1)
    return incident["incident_id"], response["response_id"], sync


async def command_cycles(harness: SyncHarness, sync: Any, issue_key: str, body: str, author: str = HUMAN_NAME) -> Any:
    """Write a comment on the issue as `author`, then run three cycles once ticket search can see it."""
    comment = harness.jira.sim.add_comment(issue_key, body, author=author)
    harness.advance(TICKET_SEARCH_DELAY)
    await harness.cycles(3, sync)
    return comment


def allow(harness: SyncHarness, **rules: Any) -> None:
    harness.use_mapping(responses=rules)


async def test_response_shown_once(harness: SyncHarness) -> None:
    """A new response becomes one comment with its type, host, parameters and commands, and stays one."""
    incident_id, response_id, sync = await linked_response(harness)
    await harness.cycles(2, sync)

    issue = harness.issue_for(incident_id)
    host_name, asset_id = harness.mdr_sim.incident(MDR_CLIENT_ID, incident_id)["affected_hosts"][0].split(":")
    [view] = comments_with_origin(issue, RESPONSE_ORIGIN)
    assert marker_of(view)["source_id"] == response_id
    assert "RUN_SCRIPT" in view.body
    assert host_name in view.body
    assert asset_id in view.body
    assert "powershell" in view.body
    assert "Collect the autorun entries" in view.body
    assert f"/mdr confirm {response_id} REASON" in view.body
    assert comment_edits(harness) == 0
    assert sync.stats.responses_shown == 1

    [item] = await harness.store.get_items("main", incident_id, RESPONSE)
    assert item.target_id == str(view.id)
    assert item.source_version.startswith("New@")


async def test_status_change_edits_view_once(harness: SyncHarness) -> None:
    """A status change made in MDR edits the same comment once, over three cycles."""
    incident_id, response_id, sync = await linked_response(harness)
    await sync.mdr.update_response(response_id, "Declined", "declined in the MDR console")

    harness.advance(2)
    await harness.cycles(3, sync)

    issue = harness.issue_for(incident_id)
    [view] = comments_with_origin(issue, RESPONSE_ORIGIN)
    assert "status *Declined*" in view.body
    assert "declined in the MDR console" in view.body
    assert f"/mdr confirm {response_id}" not in view.body
    assert comment_edits(harness) == 1
    assert sync.stats.responses_shown == 2


async def test_auto_decline_edits_view_once(harness: SyncHarness) -> None:
    """The automatic decline on timeout edits the view once."""
    harness.mdr_sim.update_settings(response_timeout_seconds=900)
    incident_id, response_id, sync = await linked_response(harness)
    harness.advance(899)
    await harness.cycles(1, sync)
    assert comment_edits(harness) == 0

    harness.advance(2)
    await harness.cycles(3, sync)

    assert mdr_response(harness, incident_id, response_id)["status"] == "Declined"
    [view] = comments_with_origin(harness.issue_for(incident_id), RESPONSE_ORIGIN)
    assert "status *Declined*" in view.body
    assert "Automatically rejected" in view.body
    assert comment_edits(harness) == 1


async def test_view_found_after_crash(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A view that landed before its ledger row was finished is found by its marker, not posted again."""
    incident = harness.seed()
    harness.mdr_sim.add_response(MDR_CLIENT_ID, incident["incident_id"])
    sync = await harness.engine()

    class SimulatedCrash(BaseException):
        pass

    real_finish = harness.store.finish_item

    async def crash_on_response(connection, incident_id, kind, *args, **kwargs):
        if kind == RESPONSE:
            raise SimulatedCrash
        return await real_finish(connection, incident_id, kind, *args, **kwargs)

    monkeypatch.setattr(harness.store, "finish_item", crash_on_response)
    with pytest.raises(SimulatedCrash):
        await sync.run_cycle()
    monkeypatch.setattr(harness.store, "finish_item", real_finish)

    harness.advance(5)
    restarted = await harness.engine()
    await restarted.retry_parked()
    await harness.cycles(2, restarted)

    assert len(comments_with_origin(harness.issue_for(incident["incident_id"]), RESPONSE_ORIGIN)) == 1
    [item] = await harness.store.get_items("main", incident["incident_id"], RESPONSE)
    assert item.state == "done"


async def test_view_per_version_without_edits(
    harness: SyncHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where comments cannot be edited, each status gets one new view, found again by its marker after a crash."""
    monkeypatch.setattr(JiraTicketAdapter, "capabilities", TicketCapabilities(edit_comments=False))
    incident_id, response_id, sync = await linked_response(harness)
    await sync.mdr.update_response(response_id, "Declined", "declined in the MDR console")
    harness.advance(2)

    real_finish = harness.store.finish_item
    crashed: list[str] = []

    class SimulatedCrash(BaseException):
        pass

    async def crash_once(connection, incident_id, kind, *args, **kwargs):
        if kind == RESPONSE and not crashed:
            crashed.append(kind)
            raise SimulatedCrash
        return await real_finish(connection, incident_id, kind, *args, **kwargs)

    monkeypatch.setattr(harness.store, "finish_item", crash_once)
    with pytest.raises(SimulatedCrash):
        await harness.cycles(1, await harness.engine())
    monkeypatch.setattr(harness.store, "finish_item", real_finish)
    await harness.cycles(3, await harness.engine())

    views = comments_with_origin(harness.issue_for(incident_id), RESPONSE_ORIGIN)
    assert len(views) == 2
    assert all(marker_of(view)["source_id"].startswith(f"{response_id}.") for view in views)
    assert "status *Declined*" in views[1].body
    assert comment_edits(harness) == 0
    [item] = await harness.store.get_items("main", incident_id, RESPONSE)
    assert item.target_id == str(views[1].id)
    assert item.source_version.startswith("Declined@")


async def test_confirm_by_approver_reaches_mdr_once(harness: SyncHarness) -> None:
    """An approver named by account id confirms once; three cycles send one response/update."""
    allow(harness, approvers=[ANALYST_ID])
    incident_id, response_id, sync = await linked_response(harness)
    issue = harness.issue_for(incident_id)

    command = await command_cycles(harness, sync, issue.key, f"/mdr confirm {response_id} the host may be scanned")

    assert harness.mdr_sim.call_counts["response/update"] == 1
    decided = mdr_response(harness, incident_id, response_id)
    assert decided["status"] == "Confirmed"
    assert decided["comment"] == f"the host may be scanned (by {ANALYST_NAME} {ANALYST_ID} in Jira {issue.key})"

    [decision] = await harness.store.list_decisions("main", incident_id=incident_id)
    assert (decision.decision, decision.outcome) == ("confirm", "sent")
    assert (decision.actor_id, decision.actor_name) == (ANALYST_ID, ANALYST_NAME)
    assert (decision.source, decision.source_id) == ("ticket", str(command.id))
    assert decision.reason == "the host may be scanned"
    assert decision.sent_at is not None

    [echo] = comments_with_origin(issue, NOTICE_ORIGIN)
    assert "confirmed" in echo.body
    assert "the host may be scanned" in echo.body
    [view] = comments_with_origin(issue, RESPONSE_ORIGIN)
    assert "status *Confirmed*" in view.body
    assert comment_edits(harness) == 1
    assert sync.stats.response_decisions == 1
    assert sync.stats.commands_refused == 0


async def test_connector_comments_stay_out_of_mdr(harness: SyncHarness) -> None:
    """The view, the echo and the replies never become MDR comments."""
    allow(harness, approvers=[ANALYST_ID])
    incident_id, response_id, sync = await linked_response(harness)
    issue = harness.issue_for(incident_id)
    await command_cycles(harness, sync, issue.key, f"/mdr confirm {response_id} go ahead")
    await command_cycles(harness, sync, issue.key, f"/mdr decline {response_id} too late")

    assert len(comments_with_origin(issue, RESPONSE_ORIGIN)) == 1
    assert len(comments_with_origin(issue, NOTICE_ORIGIN)) == 2
    # Only the two commands, public comments of a person, are copied to MDR.
    mdr_texts = [comment["text"] for comment in harness.mdr_comments(incident_id)]
    assert len(mdr_texts) == 2
    assert all("/mdr" in text for text in mdr_texts)


async def test_other_user_changes_nothing(harness: SyncHarness) -> None:
    """A command of an account not on the allow-list gets a reply, an audit record and no MDR call."""
    allow(harness, approvers=[ANALYST_ID])
    harness.jira.sim.add_user(account_id=OTHER_ID, name="other", display_name="Other Person")
    incident_id, response_id, sync = await linked_response(harness)
    issue = harness.issue_for(incident_id)

    await command_cycles(harness, sync, issue.key, f"/mdr confirm {response_id} trust me", author="other")

    assert harness.mdr_sim.call_counts["response/update"] == 0
    assert mdr_response(harness, incident_id, response_id)["status"] == "New"
    [reply] = comments_with_origin(issue, NOTICE_ORIGIN)
    assert "Other Person" in reply.body
    assert OTHER_ID in reply.body
    assert "Nothing was sent" in reply.body
    [decision] = await harness.store.list_decisions("main", incident_id=incident_id)
    assert (decision.actor_id, decision.outcome) == (OTHER_ID, "refused")
    assert sync.stats.commands_refused == 1
    assert sync.stats.response_decisions == 0


async def test_display_name_does_not_authorise(harness: SyncHarness) -> None:
    """An allow-list entry that is a display name is rejected when the mapping loads, so it cannot authorise anyone."""
    allow(harness, approvers=[ANALYST_NAME])

    with pytest.raises(ConfigError, match="never by display name"):
        await harness.engine()


async def test_empty_allow_list_authorises_nobody(harness: SyncHarness) -> None:
    """With the default mapping nobody may decide."""
    incident_id, response_id, sync = await linked_response(harness)
    issue = harness.issue_for(incident_id)

    await command_cycles(harness, sync, issue.key, f"/mdr decline {response_id} no")

    assert harness.mdr_sim.call_counts["response/update"] == 0
    assert mdr_response(harness, incident_id, response_id)["status"] == "New"
    [reply] = comments_with_origin(issue, NOTICE_ORIGIN)
    assert "responses.approvers" in reply.body


async def test_group_allow_list(harness: SyncHarness) -> None:
    """A member of an allowed group may decline."""
    allow(harness, approver_groups=["soc-analysts"])
    incident_id, response_id, sync = await linked_response(harness)
    issue = harness.issue_for(incident_id)

    await command_cycles(harness, sync, issue.key, f"/mdr decline {response_id} false positive")

    assert harness.mdr_sim.call_counts["response/update"] == 1
    assert mdr_response(harness, incident_id, response_id)["status"] == "Declined"
    [decision] = await harness.store.list_decisions("main", incident_id=incident_id)
    assert (decision.decision, decision.outcome) == ("decline", "sent")


async def test_group_outsider_refused(harness: SyncHarness) -> None:
    """An account outside the allowed groups is refused."""
    allow(harness, approver_groups=["soc-analysts"])
    harness.jira.sim.add_user(
        account_id=OTHER_ID, name="other", display_name="Other Person", groups=["jira-software-users"]
    )
    incident_id, response_id, sync = await linked_response(harness)
    issue = harness.issue_for(incident_id)

    await command_cycles(harness, sync, issue.key, f"/mdr decline {response_id} false positive", author="other")

    assert harness.mdr_sim.call_counts["response/update"] == 0
    assert len(comments_with_origin(issue, NOTICE_ORIGIN)) == 1


async def test_edit_after_handling_does_nothing(harness: SyncHarness) -> None:
    """Editing a handled command, even into another decision, sends and writes nothing more."""
    allow(harness, approvers=[ANALYST_ID])
    incident_id, response_id, sync = await linked_response(harness)
    second = harness.mdr_sim.add_response(MDR_CLIENT_ID, incident_id)["response_id"]
    harness.advance(2)
    issue = harness.issue_for(incident_id)
    command = await command_cycles(harness, sync, issue.key, f"/mdr confirm {response_id} approved")
    comments_before = len(issue.comments)

    harness.jira.sim.edit_comment(command.id, f"/mdr confirm {second} approved as well")
    harness.advance(TICKET_SEARCH_DELAY)
    await harness.cycles(3, sync)

    assert harness.mdr_sim.call_counts["response/update"] == 1
    assert mdr_response(harness, incident_id, second)["status"] == "New"
    assert len(issue.comments) == comments_before
    assert len(await harness.store.list_decisions("main", incident_id=incident_id)) == 1


async def test_edited_before_read_is_refused(harness: SyncHarness) -> None:
    """A command edited before the connector first read it is refused with a reply asking for a new comment."""
    allow(harness, approvers=[ANALYST_ID])
    incident_id, response_id, sync = await linked_response(harness)
    issue = harness.issue_for(incident_id)

    comment = harness.jira.sim.add_comment(issue.key, f"/mdr decline {response_id} first thought")
    harness.advance(2)
    harness.jira.sim.edit_comment(comment.id, f"/mdr confirm {response_id} second thought")
    harness.advance(TICKET_SEARCH_DELAY)
    await harness.cycles(3, sync)

    assert harness.mdr_sim.call_counts["response/update"] == 0
    assert mdr_response(harness, incident_id, response_id)["status"] == "New"
    [reply] = comments_with_origin(issue, NOTICE_ORIGIN)
    assert "new comment" in reply.body
    [item] = await harness.store.get_items("main", incident_id, COMMAND)
    assert (item.source_id, item.source_version) == (str(comment.id), "refused")
    assert await harness.store.list_decisions("main", incident_id=incident_id) == []


async def test_decided_response_cannot_be_decided_again(harness: SyncHarness) -> None:
    """A second command on a decided response gets a reply naming its status."""
    allow(harness, approvers=[ANALYST_ID])
    incident_id, response_id, sync = await linked_response(harness)
    issue = harness.issue_for(incident_id)
    await command_cycles(harness, sync, issue.key, f"/mdr confirm {response_id} yes")

    await command_cycles(harness, sync, issue.key, f"/mdr decline {response_id} changed my mind")

    assert harness.mdr_sim.call_counts["response/update"] == 1
    assert mdr_response(harness, incident_id, response_id)["status"] == "Confirmed"
    replies = [comment.body for comment in comments_with_origin(issue, NOTICE_ORIGIN)]
    assert len(replies) == 2
    assert "already Confirmed" in replies[1]


async def test_response_of_other_incident_refused(harness: SyncHarness) -> None:
    """A response id of another incident is refused on this ticket."""
    allow(harness, approvers=[ANALYST_ID])
    incident_id, _, sync = await linked_response(harness)
    other = harness.seed()
    foreign = harness.mdr_sim.add_response(MDR_CLIENT_ID, other["incident_id"])["response_id"]
    issue = harness.issue_for(incident_id)

    await command_cycles(harness, sync, issue.key, f"/mdr confirm {foreign} wrong ticket")

    assert harness.mdr_sim.call_counts["response/update"] == 0
    [reply] = comments_with_origin(issue, NOTICE_ORIGIN)
    assert "is not a response of MDR incident" in reply.body


async def test_malformed_command_gets_usage(harness: SyncHarness) -> None:
    """A command without a reason gets a reply with the usage and sends nothing."""
    allow(harness, approvers=[ANALYST_ID])
    incident_id, response_id, sync = await linked_response(harness)
    issue = harness.issue_for(incident_id)

    await command_cycles(harness, sync, issue.key, f"/mdr confirm {response_id}")

    assert harness.mdr_sim.call_counts["response/update"] == 0
    [reply] = comments_with_origin(issue, NOTICE_ORIGIN)
    assert "reason is missing" in reply.body
    assert "/mdr confirm RESPONSE_ID REASON" in reply.body


async def test_custom_command_word(harness: SyncHarness) -> None:
    """The mapping's command word replaces /mdr in the view and in commands."""
    allow(harness, approvers=[ANALYST_ID], command="/soc")
    incident_id, response_id, sync = await linked_response(harness)
    issue = harness.issue_for(incident_id)
    [view] = comments_with_origin(issue, RESPONSE_ORIGIN)
    assert f"/soc confirm {response_id} REASON" in view.body

    await command_cycles(harness, sync, issue.key, f"/mdr confirm {response_id} old word")
    await command_cycles(harness, sync, issue.key, f"/soc confirm {response_id} fine")

    assert harness.mdr_sim.call_counts["response/update"] == 1
    assert mdr_response(harness, incident_id, response_id)["comment"].startswith("fine (by")
    assert len(comments_with_origin(issue, NOTICE_ORIGIN)) == 1


async def test_unknown_outcome_not_sent_twice(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A decision whose reply was lost is found applied on the retry and not sent again."""
    allow(harness, approvers=[ANALYST_ID])
    incident_id, response_id, sync = await linked_response(harness)
    issue = harness.issue_for(incident_id)
    real_update = sync.mdr.update_response

    async def update_then_lose_reply(*args: Any, **kwargs: Any) -> None:
        await real_update(*args, **kwargs)
        raise OutcomeUnknownError("the reply of response/update was lost")

    monkeypatch.setattr(sync.mdr, "update_response", update_then_lose_reply)
    harness.jira.sim.add_comment(issue.key, f"/mdr confirm {response_id} go")
    harness.advance(TICKET_SEARCH_DELAY)
    await harness.cycles(1, sync)

    [decision] = await harness.store.list_decisions("main", incident_id=incident_id)
    assert decision.outcome == "pending"
    assert await harness.store.get_parked("main", INCIDENT, incident_id) is not None

    harness.advance(5)
    await harness.cycles(3, sync)

    assert harness.mdr_sim.call_counts["response/update"] == 1
    [decision] = await harness.store.list_decisions("main", incident_id=incident_id)
    assert decision.outcome == "sent"
    assert len(comments_with_origin(issue, NOTICE_ORIGIN)) == 1
    assert await harness.store.get_parked("main", INCIDENT, incident_id) is None


async def test_disabled_rules_show_nothing(harness: SyncHarness) -> None:
    """With `responses.enabled: false` no view is posted and commands are not read."""
    allow(harness, enabled=False, approvers=[ANALYST_ID])
    incident_id, response_id, sync = await linked_response(harness)
    issue = harness.issue_for(incident_id)

    await command_cycles(harness, sync, issue.key, f"/mdr confirm {response_id} go")

    assert harness.mdr_sim.call_counts["response/update"] == 0
    origins = Counter(marker_of(comment).get("origin") for comment in issue.comments)
    assert origins[RESPONSE_ORIGIN] == 0
    assert origins[NOTICE_ORIGIN] == 0


@pytest.fixture
async def dc_harness(
    tmp_path: Path,
    mdr_sim: MdrSimulator,
    mdr_url: str,
    start_jira: StartJira,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[SyncHarness]:
    """The `harness` set-up with Jira Data Center, where accounts are named by user name."""
    async with open_harness(tmp_path, mdr_sim, mdr_url, start_jira, monkeypatch, deployment="datacenter") as opened:
        yield opened


async def test_data_center_user_name_authorises(dc_harness: SyncHarness) -> None:
    """On Data Center the allow-list names accounts by user name, and the Cloud account id does not match."""
    allow(dc_harness, approvers=[HUMAN_NAME])
    incident_id, response_id, sync = await linked_response(dc_harness)
    issue = dc_harness.issue_for(incident_id)

    await command_cycles(dc_harness, sync, issue.key, f"/mdr confirm {response_id} approved on Data Center")

    assert dc_harness.mdr_sim.call_counts["response/update"] == 1
    decided = mdr_response(dc_harness, incident_id, response_id)
    assert decided["comment"] == f"approved on Data Center (by {ANALYST_NAME} {HUMAN_NAME} in Jira {issue.key})"
    [decision] = await dc_harness.store.list_decisions("main", incident_id=incident_id)
    assert decision.actor_id == HUMAN_NAME


async def test_data_center_ignores_account_id(dc_harness: SyncHarness) -> None:
    """On Data Center an allow-list of Cloud account ids authorises nobody."""
    allow(dc_harness, approvers=[ANALYST_ID])
    incident_id, response_id, sync = await linked_response(dc_harness)
    issue = dc_harness.issue_for(incident_id)

    await command_cycles(dc_harness, sync, issue.key, f"/mdr confirm {response_id} approved")

    assert dc_harness.mdr_sim.call_counts["response/update"] == 0
    [reply] = comments_with_origin(issue, NOTICE_ORIGIN)
    assert HUMAN_NAME in reply.body


async def test_data_center_group_allow_list(dc_harness: SyncHarness) -> None:
    """On Data Center a member of an allowed group may confirm."""
    allow(dc_harness, approver_groups=["soc-analysts"])
    incident_id, response_id, sync = await linked_response(dc_harness)
    issue = dc_harness.issue_for(incident_id)

    await command_cycles(dc_harness, sync, issue.key, f"/mdr confirm {response_id} group member")

    assert dc_harness.mdr_sim.call_counts["response/update"] == 1
    assert mdr_response(dc_harness, incident_id, response_id)["status"] == "Confirmed"
