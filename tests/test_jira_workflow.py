"""Ticket status in the Jira adapter and simulator: state, transitions, resolutions."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from jira import JIRA
from jira.exceptions import JIRAError

from fixtures_jira import MakeAdapter, RunningJira, StartJira
from mdr_connector.adapters.jira.adapter import JiraTicketAdapter
from mdr_connector.adapters.jira.simulator import SERVICE_EMAIL, SERVICE_PAT, SERVICE_TOKEN, JiraSimulator, SimError
from mdr_connector.adapters.jira.simulator_workflow import SimTransition, SimWorkflow
from mdr_connector.connector.errors import OutcomeUnknownError, RejectedError
from mdr_connector.connector.tickets import TicketDraft, TicketFields, TicketRef

DEPLOYMENTS = ["cloud", "datacenter"]


def draft(incident_id: str = "wf-1", **fields: Any) -> TicketDraft:
    values: dict[str, Any] = {"summary": "Incident", "description": "**Host** isolated", "priority": "High", "labels": ()}
    values.update(fields)
    return TicketDraft(incident_id, "SEC", "Task", TicketFields(**values))


async def adapter_for(start_jira: StartJira, make_adapter: MakeAdapter, deployment: str) -> tuple[RunningJira, JiraTicketAdapter]:
    running = await start_jira(deployment=deployment)
    return running, await make_adapter(running)


def client_for(running: RunningJira) -> JIRA:
    if running.sim.settings.deployment == "cloud":
        client = JIRA(running.url, basic_auth=(SERVICE_EMAIL, SERVICE_TOKEN), max_retries=0, timeout=10)
    else:
        client = JIRA(running.url, token_auth=SERVICE_PAT, max_retries=0, timeout=10)
    client._session.trust_env = False
    return client


# The adapter


@pytest.mark.parametrize("deployment", DEPLOYMENTS)
async def test_state_of_new_ticket(start_jira: StartJira, make_adapter: MakeAdapter, deployment: str) -> None:
    """A new ticket is in To Do (category new) with no resolution, and values are simplified."""
    running, adapter = await adapter_for(start_jira, make_adapter, deployment)
    ref = await adapter.create_ticket(draft(components=("Endpoint",), extra={"customfield_10010": "link"}))

    state = await adapter.get_state(
        ref, ["resolution", "priority", "components", "customfield_10010", "description", "reporter", "nothing_10"]
    )

    assert state.status == "To Do"
    assert state.status_category == "new"
    assert state.updated == running.sim.issue(ref.key).updated
    assert state.values["resolution"] is None
    assert state.values["priority"] == "High"
    assert state.values["components"] == ["Endpoint"]
    assert state.values["customfield_10010"] == "link"
    assert state.values["description"] == "**Host** isolated"
    expected_reporter = running.sim.service.account_id if deployment == "cloud" else running.sim.service.name
    assert state.values["reporter"] == expected_reporter
    assert state.values["nothing_10"] is None


@pytest.mark.parametrize("deployment", DEPLOYMENTS)
async def test_transition_moves_status(start_jira: StartJira, make_adapter: MakeAdapter, deployment: str) -> None:
    """transition_to posts the transition whose target matches, and `updated` moves."""
    running, adapter = await adapter_for(start_jira, make_adapter, deployment)
    ref = await adapter.create_ticket(draft())
    before = running.sim.issue(ref.key).updated
    running.sim.advance(5)

    await adapter.transition_to(ref, "in progress")
    state = await adapter.get_state(ref)

    assert state.status == "In Progress"
    assert state.status_category == "indeterminate"
    assert state.updated > before
    assert running.sim.calls["POST /rest/api/2/issue/{issue}/transitions"] == 1


async def test_transition_to_done_sets_resolution(jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter) -> None:
    """Entering a done status sets the resolution, and get_state returns it by name."""
    ref = await cloud_adapter.create_ticket(draft())

    await cloud_adapter.transition_to(ref, "Done")
    state = await cloud_adapter.get_state(ref, ["resolution"])

    assert state.status_category == "done"
    assert state.values == {"resolution": "Done"}


async def test_transition_already_there(jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter) -> None:
    """A ticket already in the status gets no transition call."""
    ref = await cloud_adapter.create_ticket(draft())

    await cloud_adapter.transition_to(ref, "TO DO")

    assert jira_cloud.sim.calls["POST /rest/api/2/issue/{issue}/transitions"] == 0
    assert jira_cloud.sim.calls["GET /rest/api/2/issue/{issue}/transitions"] == 0


@pytest.mark.parametrize("deployment", DEPLOYMENTS)
async def test_no_path_names_reachable(start_jira: StartJira, make_adapter: MakeAdapter, deployment: str) -> None:
    """Without a transition to the status, RejectedError names the reachable statuses and nothing moves."""
    running, adapter = await adapter_for(start_jira, make_adapter, deployment)
    ref = await adapter.create_ticket(draft())
    running.sim.transition_as_human(ref.key, "Done")

    with pytest.raises(RejectedError) as caught:
        await adapter.transition_to(ref, "On Hold")

    message = str(caught.value)
    assert f"{ref.key} cannot move from 'Done' to 'On Hold'" in message
    assert "reachable from 'Done': To Do." in message
    assert running.sim.issue(ref.key).fields["status"] == "Done"
    assert running.sim.calls["POST /rest/api/2/issue/{issue}/transitions"] == 0


async def test_unknown_status_rejected(cloud_adapter: JiraTicketAdapter) -> None:
    """A status the workflow does not have is rejected like an unreachable one."""
    ref = await cloud_adapter.create_ticket(draft())

    with pytest.raises(RejectedError, match="'Closed'.*reachable from 'To Do': In Progress, On Hold, Done"):
        await cloud_adapter.transition_to(ref, "Closed")


async def test_transition_reply_lost(jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter) -> None:
    """A transition whose reply is lost is OutcomeUnknownError, and the retry reads the status and makes no call."""
    ref = await cloud_adapter.create_ticket(draft())
    jira_cloud.sim.drop_reply_after_commit("POST", "/rest/api/2/issue/{issue}/transitions")

    with pytest.raises(OutcomeUnknownError):
        await cloud_adapter.transition_to(ref, "On Hold")
    await cloud_adapter.transition_to(ref, "On Hold")

    assert jira_cloud.sim.issue(ref.key).fields["status"] == "On Hold"
    assert jira_cloud.sim.calls["POST /rest/api/2/issue/{issue}/transitions"] == 1


async def test_status_change_is_a_ticket_change(jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter) -> None:
    """A person's transition moves `updated`, so changed_tickets reports the ticket."""
    ref = await cloud_adapter.create_ticket(draft())
    jira_cloud.sim.advance(120)
    since = jira_cloud.sim.now()
    jira_cloud.sim.transition_as_human(ref.key, "Done", resolution="Won't Do")

    changes = await cloud_adapter.changed_tickets(since)
    state = await cloud_adapter.get_state(ref, ["resolution"])

    assert [change.ref for change in changes] == [ref]
    assert state.values["resolution"] == "Won't Do"


async def test_missing_ticket_rejected(cloud_adapter: JiraTicketAdapter) -> None:
    """get_state of an issue that does not exist is RejectedError 404."""
    with pytest.raises(RejectedError) as caught:
        await cloud_adapter.get_state(TicketRef("SEC-99", "99999", "x"))

    assert caught.value.status == 404


# The simulator's workflow


async def test_sim_lists_transitions(jira_cloud: RunningJira) -> None:
    """GET transitions returns those available from the current status, with target and category."""
    issue = jira_cloud.sim.create_issue({"project": {"key": "SEC"}, "issuetype": {"name": "Task"}, "summary": "x"})
    client = await asyncio.to_thread(client_for, jira_cloud)

    reply = await asyncio.to_thread(client._get_json, f"issue/{issue.key}/transitions")

    assert [(item["name"], item["to"]["name"]) for item in reply["transitions"]] == [
        ("Start progress", "In Progress"),
        ("Put on hold", "On Hold"),
        ("Done", "Done"),
    ]
    assert reply["transitions"][2]["to"]["statusCategory"]["key"] == "done"


async def test_sim_rejects_unavailable_transition(jira_cloud: RunningJira) -> None:
    """POST with a transition not available from the status is 400, and nothing changes."""
    issue = jira_cloud.sim.create_issue({"project": {"key": "SEC"}, "issuetype": {"name": "Task"}, "summary": "x"})
    client = await asyncio.to_thread(client_for, jira_cloud)
    url = client._get_url(f"issue/{issue.key}/transitions")

    with pytest.raises(JIRAError) as caught:
        await asyncio.to_thread(client._session.post, url, data='{"transition": {"id": "51"}}')

    assert caught.value.status_code == 400
    assert issue.fields["status"] == "To Do"


async def test_sim_resolution_in_body(jira_cloud: RunningJira) -> None:
    """A transition into Done takes the resolution from its fields, and reopening clears it."""
    sim = jira_cloud.sim
    issue = sim.create_issue({"project": {"key": "SEC"}, "issuetype": {"name": "Task"}, "summary": "x"})
    client = await asyncio.to_thread(client_for, jira_cloud)
    url = client._get_url(f"issue/{issue.key}/transitions")

    body = '{"transition": {"id": "41"}, "fields": {"resolution": {"name": "Duplicate"}}}'
    done = await asyncio.to_thread(client._session.post, url, data=body)
    resolved = issue.fields["resolution"]
    sim.transition_as_human(issue.key, "To Do")

    assert done.status_code == 204
    assert resolved == "Duplicate"
    assert issue.fields["status"] == "To Do"
    assert issue.fields["resolution"] is None


def test_sim_resolution_only_into_done() -> None:
    """A resolution in a transition to a status outside the done category is rejected."""
    sim = JiraSimulator()
    issue = sim.create_issue({"project": {"key": "SEC"}, "issuetype": {"name": "Task"}, "summary": "x"})

    with pytest.raises(SimError) as caught:
        sim.transition(issue.id, "11", {"resolution": {"name": "Done"}})

    assert caught.value.status == 400
    assert "resolution" in caught.value.errors


def test_sim_unknown_resolution() -> None:
    """An unknown resolution name is 400 naming the field."""
    sim = JiraSimulator()
    issue = sim.create_issue({"project": {"key": "SEC"}, "issuetype": {"name": "Task"}, "summary": "x"})

    with pytest.raises(SimError) as caught:
        sim.transition(issue.id, "41", {"resolution": {"name": "Fixed?"}})

    assert caught.value.errors == {"resolution": "Resolution 'Fixed?' is not valid."}


def test_sim_custom_workflow() -> None:
    """A configured workflow replaces the default statuses and transitions."""
    workflow = SimWorkflow(
        statuses={"Open": "new", "Closed": "done"},
        transitions=(SimTransition("1", "Close", "Closed"), SimTransition("2", "Reopen", "Open", ("Closed",))),
        resolutions=("Fixed",),
    )
    sim = JiraSimulator(workflow=workflow)
    issue = sim.create_issue({"project": {"key": "SEC"}, "issuetype": {"name": "Task"}, "summary": "x"})

    sim.transition_as_human(issue.key, "closed")

    assert issue.fields["status"] == "Closed"
    assert issue.fields["resolution"] == "Fixed"
    assert [transition.name for transition in sim.transitions(issue.key)] == ["Reopen"]


def test_sim_workflow_rejects_unknown_status() -> None:
    """A transition to a status the workflow lacks is a ValueError naming it."""
    with pytest.raises(ValueError, match="Gone"):
        SimWorkflow(statuses={"Open": "new"}, transitions=(SimTransition("1", "Go", "Gone"),))


async def test_sim_jql_status_and_type(jira_cloud: RunningJira) -> None:
    """JQL matches `status` and `issuetype` (or `type`) case-insensitively."""
    sim = jira_cloud.sim
    task = sim.create_issue({"project": {"key": "SEC"}, "issuetype": {"name": "Task"}, "summary": "x"})
    incident = sim.create_issue({"project": {"key": "SEC"}, "issuetype": {"name": "Incident"}, "summary": "y"})
    sim.transition_as_human(incident.key, "Done")

    done = sim.search('project = SEC AND status = "done"', sim.service)
    tasks = sim.search("project = SEC AND type = task", sim.service)
    incidents = sim.search('project = SEC AND issuetype in ("Incident")', sim.service)

    assert [found.key for found, _ in done] == [incident.key]
    assert [found.key for found, _ in tasks] == [task.key]
    assert [found.key for found, _ in incidents] == [incident.key]


async def test_sim_control_transition(jira_cloud: RunningJira) -> None:
    """The control API moves an issue as a person, and returns 400 without a transition."""
    issue = jira_cloud.sim.create_issue({"project": {"key": "SEC"}, "issuetype": {"name": "Task"}, "summary": "x"})
    url = f"{jira_cloud.url}/_sim/issues/{issue.key}/transitions"
    async with aiohttp.ClientSession() as session:
        moved = await session.post(url, json={"status": "Done", "resolution": "Won't Do"})
        moved_body = await moved.json()
        stuck = await session.post(url, json={"status": "On Hold"})

    assert moved.status == 200
    assert moved_body == {"key": issue.key, "status": "Done", "resolution": "Won't Do"}
    assert stuck.status == 400
