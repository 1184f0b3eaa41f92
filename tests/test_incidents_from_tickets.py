"""Tickets that ask for an MDR incident, end to end against the MDR and Jira simulators."""

from __future__ import annotations

from typing import Any

import pytest
from fixtures_mdr import MDR_CLIENT_ID
from fixtures_postgres import LEDGER_BACKENDS
from fixtures_sync import SyncHarness

from mdr_connector.adapters.jira.simulator_state import HUMAN_NAME
from mdr_connector.connector.errors import ConfigError, OutcomeUnknownError, RejectedError
from mdr_connector.connector.store import DONE, LINKED
from mdr_connector.connector.ticket_requests import (
    PARKED_REQUEST,
    REQUEST,
    REQUEST_CURSOR,
    TicketIncidentRequests,
    parse_hosts,
    request_scope,
)
from mdr_connector.connector.tickets import NOTICE_ORIGIN, TicketRef


@pytest.fixture(params=LEDGER_BACKENDS)
def ledger_backend(request: pytest.FixtureRequest) -> str:
    """Every harness test here runs with its ledger on SQLite and again on PostgreSQL."""
    return request.param


pytestmark = pytest.mark.asyncio

HOSTS_FIELD = "customfield_10020"
CREATE_ISSUE = "POST /rest/api/2/issue"
CREATE_CALL = "incidents/create"
REQUESTS = {"enabled": True, "label": "mdr-create", "hosts_field": HOSTS_FIELD}


def enable_requests(harness: SyncHarness, **rules: Any) -> None:
    harness.jira.sim.custom_fields[HOSTS_FIELD] = "Affected hosts"
    harness.use_mapping(create_incidents={**REQUESTS, **rules})


def request_issue(harness: SyncHarness, hosts: str | None, **fields: Any) -> Any:
    """Create an issue as a person would, labelled as a request for an MDR incident."""
    values: dict[str, Any] = {
        "project": {"key": "SEC"},
        "issuetype": {"name": "Task"},
        "summary": "Странный процесс на WS-01",
        "description": "Пользователь заметил всплывающие окна.",
        "priority": {"name": "High"},
        "labels": ["mdr-create"],
        **fields,
    }
    if hosts is not None:
        values[HOSTS_FIELD] = hosts
    return harness.jira.sim.create_issue(values, reporter=harness.jira.sim.user(HUMAN_NAME))


def created_incidents(harness: SyncHarness) -> list[dict[str, Any]]:
    incidents = harness.mdr_sim.incidents(MDR_CLIENT_ID)
    return [incident for incident in incidents if "mdr-connector request" in incident.get("client_description", "")]


def ref_of(issue: Any) -> TicketRef:
    return TicketRef(key=issue.key, id=str(issue.id), url="")


def notices(issue: Any) -> list[Any]:
    return [c for c in issue.comments if c.properties.get("mdr-connector", {}).get("origin") == NOTICE_ORIGIN]


async def later_cycles(harness: SyncHarness, sync: Any, count: int = 3) -> None:
    """Run cycles after the Jira search delay, so tickets created or changed meanwhile are found."""
    for _cycle in range(count):
        harness.advance(31)
        await sync.run_cycle()


class SimulatedCrash(BaseException):
    """The process stopping at once, which no `except Exception` in the engine catches."""


async def request_then_crash(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch, host: str) -> Any:
    """Request an incident for `host`, then crash the cycle right after MDR creates it. Return the request's issue."""
    enable_requests(harness)
    asset = harness.mdr_sim.add_asset(MDR_CLIENT_ID, host)
    sync = await harness.cycles(1)
    real_create = sync.mdr.create_incident

    async def create_then_crash(**kwargs: Any) -> Any:
        await real_create(**kwargs)
        raise SimulatedCrash

    monkeypatch.setattr(sync.mdr, "create_incident", create_then_crash)
    issue = request_issue(harness, f"{host}:{asset['asset_id']}")
    harness.advance(31)
    with pytest.raises(SimulatedCrash):
        await sync.run_cycle()
    return issue


async def test_labelled_ticket_creates_one_incident(harness: SyncHarness) -> None:
    """A labelled ticket with hosts creates one incident over three cycles, is linked, and then syncs comments."""
    enable_requests(harness)
    asset = harness.mdr_sim.add_asset(MDR_CLIENT_ID, "WS-01")
    sync = await harness.cycles(1)
    issue = request_issue(harness, f"WS-01:{asset['asset_id']}")

    await later_cycles(harness, sync)

    [incident] = created_incidents(harness)
    assert harness.mdr_sim.call_counts.get(CREATE_CALL, 0) == 1
    assert incident["affected_hosts"] == [f"WS-01:{asset['asset_id']}"]
    assert incident["priority"] == "HIGH"
    assert incident["summary"] == "Странный процесс на WS-01"
    assert "всплывающие окна" in incident["client_description"]
    assert f"main/{issue.id}" in incident["client_description"]
    link = await harness.store.get_link("main", incident["incident_id"])
    assert link.state == LINKED
    assert link.ticket_id == str(issue.id)
    assert f"mdr-{incident['incident_id']}" in issue.fields["labels"]
    assert harness.jira.sim.calls.get(CREATE_ISSUE, 0) == 0
    assert sync.stats.incidents_created == 1

    harness.jira.sim.add_comment(issue.key, "Пользователь перезагрузил ПК")
    harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident["incident_id"], "<p>Проверяем</p>", author="SOC Analyst")
    await later_cycles(harness, sync)

    mdr_texts = [c["text"] for c in harness.mdr_comments(incident["incident_id"])]
    assert sum("перезагрузил" in text for text in mdr_texts) == 1
    assert sum("Проверяем" in c.body for c in issue.comments) == 1
    assert len(created_incidents(harness)) == 1
    assert harness.jira.sim.calls.get(CREATE_ISSUE, 0) == 0
    # The requester's own text stays on the ticket.
    assert issue.fields["summary"] == "Странный процесс на WS-01"
    assert issue.fields["description"] == "Пользователь заметил всплывающие окна."


async def test_ticket_without_hosts_gets_one_reply(harness: SyncHarness) -> None:
    """A request without hosts gets one reply over three cycles, and creates its incident once hosts are filled in."""
    enable_requests(harness)
    asset = harness.mdr_sim.add_asset(MDR_CLIENT_ID, "WS-02")
    sync = await harness.cycles(1)
    issue = request_issue(harness, None)

    await later_cycles(harness, sync)

    [reply] = notices(issue)
    assert HOSTS_FIELD in reply.body
    assert "HOSTNAME:asset_id" in reply.body
    assert created_incidents(harness) == []
    assert harness.mdr_sim.call_counts.get(CREATE_CALL, 0) == 0

    harness.jira.sim.edit_issue(issue.key, {HOSTS_FIELD: f"WS-02:{asset['asset_id']}"})
    await later_cycles(harness, sync)

    [incident] = created_incidents(harness)
    assert incident["affected_hosts"] == [f"WS-02:{asset['asset_id']}"]
    assert len(notices(issue)) == 1
    assert (await harness.store.get_link("main", incident["incident_id"])).ticket_id == str(issue.id)


async def test_invalid_hosts_named_in_reply(harness: SyncHarness) -> None:
    """Entries that are not HOSTNAME:asset_id are listed in the reply, and nothing is created."""
    enable_requests(harness)
    sync = await harness.cycles(1)
    issue = request_issue(harness, "WS-03\nWS-04:abc")

    await later_cycles(harness, sync)

    [reply] = notices(issue)
    assert "WS-03" in reply.body
    assert harness.mdr_sim.call_counts.get(CREATE_CALL, 0) == 0

    harness.jira.sim.edit_issue(issue.key, {HOSTS_FIELD: "WS-99"})
    await later_cycles(harness, sync)

    replies = notices(issue)
    assert len(replies) == 2
    assert "WS-99" in replies[1].body
    assert harness.mdr_sim.call_counts.get(CREATE_CALL, 0) == 0


async def test_waiting_request_holds_cursor(harness: SyncHarness) -> None:
    """The request cursor stays while a request waits, and moves once every request is linked."""
    enable_requests(harness)
    asset = harness.mdr_sim.add_asset(MDR_CLIENT_ID, "WS-05")
    sync = await harness.cycles(1)
    first_cursor = await harness.store.get_cursor("main", REQUEST_CURSOR)
    issue = request_issue(harness, None)

    await later_cycles(harness, sync)
    assert await harness.store.get_cursor("main", REQUEST_CURSOR) == first_cursor

    harness.jira.sim.edit_issue(issue.key, {HOSTS_FIELD: f"WS-05:{asset['asset_id']}"})
    await later_cycles(harness, sync, count=1)
    assert await harness.store.get_cursor("main", REQUEST_CURSOR) > first_cursor


async def test_lost_create_reply_not_created_twice(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A create whose reply is lost after MDR committed it is found by its marker, and the ticket is linked to it."""
    enable_requests(harness)
    asset = harness.mdr_sim.add_asset(MDR_CLIENT_ID, "WS-06")
    sync = await harness.cycles(1)
    real_create = sync.mdr.create_incident

    async def create_then_lose_reply(**kwargs: Any) -> Any:
        await real_create(**kwargs)
        raise OutcomeUnknownError("reply lost")

    monkeypatch.setattr(sync.mdr, "create_incident", create_then_lose_reply)
    issue = request_issue(harness, f"WS-06:{asset['asset_id']}")
    await later_cycles(harness, sync)

    [incident] = created_incidents(harness)
    assert harness.mdr_sim.call_counts.get(CREATE_CALL, 0) == 1
    assert (await harness.store.get_link("main", incident["incident_id"])).ticket_id == str(issue.id)
    assert harness.jira.sim.calls.get(CREATE_ISSUE, 0) == 0


async def test_crash_after_create_resumes(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a crash between the create and its record, the restarted step finds the incident instead of creating it."""
    issue = await request_then_crash(harness, monkeypatch, "WS-07")
    [intent] = await harness.store.get_items("main", request_scope(ref_of(issue)), REQUEST)
    assert intent.state != DONE

    restarted = await harness.engine()
    [step] = [step for step in restarted.cycle_steps if isinstance(step, TicketIncidentRequests)]
    await step.run()

    [incident] = created_incidents(harness)
    assert harness.mdr_sim.call_counts.get(CREATE_CALL, 0) == 1
    assert (await harness.store.get_link("main", incident["incident_id"])).ticket_id == str(issue.id)
    await later_cycles(harness, restarted)
    assert len(created_incidents(harness)) == 1
    assert harness.jira.sim.calls.get(CREATE_ISSUE, 0) == 0


async def test_rejected_request_waits_for_edit(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request MDR rejects gets one reply with the reason and is sent again only after the ticket changes."""
    enable_requests(harness)
    asset = harness.mdr_sim.add_asset(MDR_CLIENT_ID, "WS-08")
    sync = await harness.cycles(1)
    real_create = sync.mdr.create_incident
    attempts: list[list[str]] = []

    async def reject_unknown_asset(**kwargs: Any) -> Any:
        attempts.append(list(kwargs["affected_hosts"]))
        if list(kwargs["affected_hosts"]) == ["WS-08:no-such-asset"]:
            raise RejectedError("MDR incidents/create returned 400: unknown asset no-such-asset", status=400)
        return await real_create(**kwargs)

    monkeypatch.setattr(sync.mdr, "create_incident", reject_unknown_asset)
    issue = request_issue(harness, "WS-08:no-such-asset")
    await later_cycles(harness, sync)

    assert attempts == [["WS-08:no-such-asset"]]
    [reply] = notices(issue)
    assert "MDR rejected" in reply.body
    assert "no-such-asset" in reply.body
    assert await harness.store.get_parked("main", PARKED_REQUEST, str(issue.id)) is None

    harness.jira.sim.edit_issue(issue.key, {HOSTS_FIELD: f"WS-08:{asset['asset_id']}"})
    await later_cycles(harness, sync)

    assert len(attempts) == 2
    [incident] = created_incidents(harness)
    assert (await harness.store.get_link("main", incident["incident_id"])).ticket_id == str(issue.id)


async def test_requests_off_by_default(harness: SyncHarness) -> None:
    """Without the setting, a labelled ticket creates nothing and gets no reply."""
    harness.jira.sim.custom_fields[HOSTS_FIELD] = "Affected hosts"
    asset = harness.mdr_sim.add_asset(MDR_CLIENT_ID, "WS-09")
    sync = await harness.cycles(1)
    issue = request_issue(harness, f"WS-09:{asset['asset_id']}")

    await later_cycles(harness, sync)

    assert harness.mdr_sim.call_counts.get(CREATE_CALL, 0) == 0
    assert notices(issue) == []


async def test_connector_label_is_config_error(harness: SyncHarness) -> None:
    """A request label that the connector puts on its own tickets stops the connection."""
    harness.use_mapping(create_incidents={**REQUESTS, "label": "kaspersky-mdr"})

    with pytest.raises(ConfigError) as raised:
        await harness.engine()

    assert "kaspersky-mdr" in str(raised.value)


async def test_missing_hosts_field_is_config_error(harness: SyncHarness) -> None:
    """Enabling requests without a hosts field stops the connection with the key to set."""
    harness.use_mapping(create_incidents={"enabled": True})

    with pytest.raises(ConfigError) as raised:
        await harness.engine()

    assert "hosts_field" in str(raised.value)


@pytest.mark.parametrize(
    ("value", "valid", "invalid"),
    [
        ("WS-01:abc", ["WS-01:abc"], []),
        ("WS-01:abc\nWS-02:def, WS-03:ghi", ["WS-01:abc", "WS-02:def", "WS-03:ghi"], []),
        (["WS-01:abc", "WS-01:abc"], ["WS-01:abc"], []),
        ("WS-01\n:abc\nWS 02:x", [], ["WS-01", ":abc", "WS 02:x"]),
        (None, [], []),
        ("  \n ", [], []),
    ],
    ids=["one", "lines-and-commas", "duplicates", "invalid", "none", "blank"],
)
async def test_parse_hosts(value: Any, valid: list[str], invalid: list[str]) -> None:
    """Hosts split on lines and commas; entries without a host and an asset id are invalid."""
    assert parse_hosts(value) == (valid, invalid)


async def test_crash_then_mdr_search_first(
    harness: SyncHarness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The MDR search meeting an unfinished request's incident first: no second incident, no second ticket."""
    issue = await request_then_crash(harness, monkeypatch, "WS-10")

    restarted = await harness.engine()
    await later_cycles(harness, restarted)

    [incident] = created_incidents(harness)
    assert harness.mdr_sim.call_counts.get(CREATE_CALL, 0) == 1
    [linked] = harness.issues_for(incident["incident_id"])
    assert linked.key == issue.key
    assert (await harness.store.get_link("main", incident["incident_id"])).ticket_key == issue.key
    assert "sync.request.linked_elsewhere" not in [r.message for r in caplog.records]
