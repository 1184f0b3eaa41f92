"""The status sync: MDR status to the ticket, and the opt-in close of MDR incidents from the ticket.

The end-to-end tests run the engine against the MDR and Jira simulators.
The unit tests at the end drive StatusSync alone with small fakes, to
reach the crash windows between a remote write and its ledger record.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from fixtures_mdr import MDR_CLIENT_ID, MDR_CONNECTION_NAME
from fixtures_postgres import LEDGER_BACKENDS
from fixtures_sync import SyncHarness, mapping

from mdr_connector.adapters.mdr.models import Comment, Incident
from mdr_connector.connector.config import ConnectionSettings, SyncSettings
from mdr_connector.connector.engine import INCIDENT
from mdr_connector.connector.errors import ConfigError, ItemError, OutcomeUnknownError, RejectedError
from mdr_connector.connector.mapping import parse_mdr_footer
from mdr_connector.connector.status import CLOSE, REOPEN_NOTE, StatusSync, mdr_footer
from mdr_connector.connector.store import DONE, Store
from mdr_connector.connector.sync_common import SyncContext, SyncStats
from mdr_connector.connector.tickets import TicketRef, TicketState


@pytest.fixture(params=LEDGER_BACKENDS)
def ledger_backend(request: pytest.FixtureRequest) -> str:
    """Every harness test here runs with its ledger on SQLite and again on PostgreSQL."""
    return request.param


pytestmark = pytest.mark.asyncio

TRANSITION = "POST /rest/api/2/issue/{issue}/transitions"
CLOSE_CALL = "incidents/close"

CLOSE_ON_DONE = {
    "to_ticket": {"Open": "To Do", "On hold": "On Hold", "Resolved": "Done", "Closed": "Done"},
    "close_mdr": {
        "enabled": True,
        "done_statuses": ["Done"],
        "resolutions": {"Done": "TRUE_POSITIVE", "Won't Do": "FALSE_POSITIVE"},
    },
}


async def linked_incident(harness: SyncHarness, **fields: Any) -> tuple[str, Any, Any]:
    """Seed one incident, run one cycle, and return its id, the engine and its Jira issue."""
    incident_id = harness.seed(**fields)["incident_id"]
    sync = await harness.cycles(1)
    return incident_id, sync, harness.issue_for(incident_id)


async def later_cycles(harness: SyncHarness, sync: Any, count: int = 3) -> None:
    """Run cycles after the Jira search delay, so changes made meanwhile are found."""
    for _cycle in range(count):
        harness.advance(31)
        await sync.run_cycle()


def connector_comments(harness: SyncHarness, incident_id: str) -> list[dict[str, Any]]:
    return [c for c in harness.mdr_comments(incident_id) if c["author_name"] == MDR_CONNECTION_NAME]


# End to end


async def test_jira_close_closes_mdr_once(harness: SyncHarness) -> None:
    """A person closing the issue as Won't Do closes the incident once as a false positive."""
    harness.use_mapping(status=CLOSE_ON_DONE)
    incident_id, sync, issue = await linked_incident(harness)

    harness.jira.sim.transition_as_human(issue.key, "Done", resolution="Won't Do")
    await later_cycles(harness, sync)

    incident = harness.mdr_sim.incident(MDR_CLIENT_ID, incident_id)
    assert incident["status"] == "Closed"
    assert incident["resolution"] == "False positive"
    assert incident["status_description"] == f"Closed in Jira {issue.key}"
    assert harness.mdr_sim.call_counts.get(CLOSE_CALL, 0) == 1
    assert issue.fields["status"] == "Done"
    assert harness.jira.sim.calls.get(TRANSITION, 0) == 0
    assert connector_comments(harness, incident_id) == []
    assert sync.stats.incidents_closed == 1
    link = await harness.store.get_link("main", incident_id)
    assert (link.ticket_status, link.mdr_status) == ("Done", "Closed")


async def test_unmapped_resolution_parks(harness: SyncHarness) -> None:
    """A resolution the mapping does not know parks the incident with the value to map, and MDR stays open."""
    rules = {**CLOSE_ON_DONE, "close_mdr": {**CLOSE_ON_DONE["close_mdr"], "resolutions": {"Done": "TRUE_POSITIVE"}}}
    harness.use_mapping(status=rules)
    incident_id, sync, issue = await linked_incident(harness)

    harness.jira.sim.transition_as_human(issue.key, "Done", resolution="Duplicate")
    await later_cycles(harness, sync)

    parked = await harness.store.get_parked("main", INCIDENT, incident_id)
    assert parked is not None
    assert "'Duplicate'" in parked.reason
    assert "status.close_mdr.resolutions" in parked.reason
    assert harness.mdr_sim.incident(MDR_CLIENT_ID, incident_id)["status"] == "Open"
    assert harness.mdr_sim.call_counts.get(CLOSE_CALL, 0) == 0


async def test_default_resolution_applies(harness: SyncHarness) -> None:
    """A resolution missing from `resolutions` falls back to default_resolution."""
    rules = {
        "close_mdr": {"enabled": True, "done_statuses": ["done"], "default_resolution": "TRUE_POSITIVE"},
    }
    harness.use_mapping(status=rules)
    incident_id, sync, issue = await linked_incident(harness)

    harness.jira.sim.transition_as_human(issue.key, "Done", resolution="Cannot Reproduce")
    await later_cycles(harness, sync)

    incident = harness.mdr_sim.incident(MDR_CLIENT_ID, incident_id)
    assert incident["status"] == "Closed"
    assert incident["resolution"] == "True positive"
    assert harness.mdr_sim.call_counts.get(CLOSE_CALL, 0) == 1


async def test_mdr_close_moves_ticket_once(harness: SyncHarness) -> None:
    """An incident closed in MDR moves the issue to Done once; no close call and no comment go back."""
    harness.use_mapping(status=CLOSE_ON_DONE)
    incident_id, sync, issue = await linked_incident(harness)

    harness.mdr_sim.update_incident(MDR_CLIENT_ID, incident_id, status="Closed", resolution="True positive")
    await later_cycles(harness, sync)

    assert issue.fields["status"] == "Done"
    assert harness.jira.sim.calls.get(TRANSITION, 0) == 1
    assert harness.mdr_sim.call_counts.get(CLOSE_CALL, 0) == 0
    assert connector_comments(harness, incident_id) == []
    assert sync.stats.statuses_to_ticket == 1
    assert await harness.store.get_parked("main", INCIDENT, incident_id) is None


async def test_mdr_status_follows_mapping(harness: SyncHarness) -> None:
    """Each MDR status change moves the issue along the mapping, once per change."""
    harness.use_mapping(status={"to_ticket": {"Open": "To Do", "On hold": "On Hold", "Resolved": "Done"}})
    incident_id, sync, issue = await linked_incident(harness)

    harness.mdr_sim.update_incident(MDR_CLIENT_ID, incident_id, status="On hold")
    await later_cycles(harness, sync)
    assert issue.fields["status"] == "On Hold"

    harness.mdr_sim.update_incident(MDR_CLIENT_ID, incident_id, status="Resolved")
    await later_cycles(harness, sync)
    assert issue.fields["status"] == "Done"
    assert harness.jira.sim.calls.get(TRANSITION, 0) == 2


async def test_person_move_is_not_undone(harness: SyncHarness) -> None:
    """A person's move of the issue stays until MDR changes its status again."""
    harness.use_mapping(status={"to_ticket": {"Open": "To Do", "On hold": "On Hold"}})
    incident_id, sync, issue = await linked_incident(harness)

    harness.jira.sim.transition_as_human(issue.key, "In Progress")
    harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>looking</p>", author="SOC Analyst")
    await later_cycles(harness, sync)

    assert issue.fields["status"] == "In Progress"
    assert harness.jira.sim.calls.get(TRANSITION, 0) == 0


async def test_unmapped_mdr_status_parks_one(harness: SyncHarness) -> None:
    """An MDR status missing from to_ticket parks that incident with the fix; another incident still syncs."""
    harness.use_mapping(status={"to_ticket": {"Open": "To Do"}})
    broken = harness.seed()["incident_id"]
    healthy = harness.seed()["incident_id"]
    sync = await harness.cycles(1)

    harness.mdr_sim.update_incident(MDR_CLIENT_ID, broken, status="On hold")
    harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, healthy, "<p>still syncing</p>", author="SOC Analyst")
    await later_cycles(harness, sync)

    parked = await harness.store.get_parked("main", INCIDENT, broken)
    assert parked is not None
    assert "'On hold'" in parked.reason
    assert "status.to_ticket" in parked.reason
    assert harness.issue_for(broken).fields["status"] == "To Do"
    assert await harness.store.get_parked("main", INCIDENT, healthy) is None
    assert sum("still syncing" in c.body for c in harness.issue_for(healthy).comments) == 1
    assert harness.jira.sim.calls.get(TRANSITION, 0) == 0


async def test_no_workflow_path_parks_one(harness: SyncHarness) -> None:
    """A mapped status the workflow cannot reach parks that incident; the connector tries no other path."""
    harness.use_mapping(status={"to_ticket": {"Open": "To Do", "On hold": "On Hold"}})
    stuck = harness.seed()["incident_id"]
    healthy = harness.seed()["incident_id"]
    sync = await harness.cycles(1)
    harness.jira.sim.transition_as_human(harness.issue_for(stuck).key, "Done")

    harness.mdr_sim.update_incident(MDR_CLIENT_ID, stuck, status="On hold")
    harness.mdr_sim.update_incident(MDR_CLIENT_ID, healthy, status="On hold")
    await later_cycles(harness, sync)

    parked = await harness.store.get_parked("main", INCIDENT, stuck)
    assert parked is not None
    assert "'On Hold'" in parked.reason
    assert "workflow" in parked.reason
    assert harness.issue_for(stuck).fields["status"] == "Done"
    assert harness.issue_for(healthy).fields["status"] == "On Hold"
    assert harness.jira.sim.calls.get(TRANSITION, 0) == 1
    assert await harness.store.get_parked("main", INCIDENT, healthy) is None


async def test_reopen_adds_one_comment_each(harness: SyncHarness) -> None:
    """Each reopen of an issue whose incident is closed adds one MDR comment and changes nothing else."""
    harness.use_mapping(status=CLOSE_ON_DONE)
    incident_id, sync, issue = await linked_incident(harness)
    harness.mdr_sim.update_incident(MDR_CLIENT_ID, incident_id, status="Closed", resolution="True positive")
    await later_cycles(harness, sync)
    assert issue.fields["status"] == "Done"

    harness.jira.sim.transition_as_human(issue.key, "To Do")
    await later_cycles(harness, sync)

    notes = connector_comments(harness, incident_id)
    assert len(notes) == 1
    assert "reopened" in notes[0]["text"]
    assert issue.key in notes[0]["text"]
    assert harness.mdr_sim.incident(MDR_CLIENT_ID, incident_id)["status"] == "Closed"
    assert harness.mdr_sim.call_counts.get(CLOSE_CALL, 0) == 0
    assert issue.fields["status"] == "To Do"
    assert not any("reopened" in c.body for c in issue.comments)

    harness.jira.sim.transition_as_human(issue.key, "Done")
    await later_cycles(harness, sync)
    harness.jira.sim.transition_as_human(issue.key, "To Do")
    await later_cycles(harness, sync)

    assert len(connector_comments(harness, incident_id)) == 2
    assert harness.mdr_sim.call_counts.get(CLOSE_CALL, 0) == 0
    assert harness.jira.sim.calls.get(TRANSITION, 0) == 1


async def test_close_off_by_default(harness: SyncHarness) -> None:
    """With the built-in mapping, a done issue leaves the incident open and nothing is written to MDR."""
    incident_id, sync, issue = await linked_incident(harness)

    harness.jira.sim.transition_as_human(issue.key, "Done", resolution="Done")
    await later_cycles(harness, sync)

    assert mapping().status.close_mdr.enabled is False
    assert harness.mdr_sim.incident(MDR_CLIENT_ID, incident_id)["status"] == "Open"
    assert harness.mdr_sim.call_counts.get(CLOSE_CALL, 0) == 0
    assert connector_comments(harness, incident_id) == []


async def test_lost_close_reply_not_resent(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A close whose reply is lost after MDR applied it is recorded on the next try, not sent again."""
    harness.use_mapping(status=CLOSE_ON_DONE)
    incident_id, sync, issue = await linked_incident(harness)
    real_close = sync.mdr.close_incident

    async def close_then_lose_reply(*args: Any, **kwargs: Any) -> None:
        await real_close(*args, **kwargs)
        raise OutcomeUnknownError("reply lost")

    monkeypatch.setattr(sync.mdr, "close_incident", close_then_lose_reply)
    harness.jira.sim.transition_as_human(issue.key, "Done", resolution="Done")
    await later_cycles(harness, sync, count=1)
    assert await harness.store.get_parked("main", INCIDENT, incident_id) is not None

    await later_cycles(harness, sync)

    assert harness.mdr_sim.call_counts.get(CLOSE_CALL, 0) == 1
    [row] = await harness.store.get_items("main", incident_id, CLOSE)
    assert row.state == DONE
    assert await harness.store.get_parked("main", INCIDENT, incident_id) is None


# Unit tests with fakes


class FakeTickets:
    """A ticket system with one workflow, recording the transitions it was asked for."""

    system = "jira"

    def __init__(self, status: str = "To Do", reachable: dict[str, set[str]] | None = None) -> None:
        self.status = status
        self.values: dict[str, Any] = {}
        self.reachable = reachable or {
            "To Do": {"In Progress", "Done"},
            "In Progress": {"Done"},
            "Done": {"To Do"},
        }
        self.transitions: list[str] = []

    async def get_state(self, ref: TicketRef, field_ids: Any = ()) -> TicketState:
        return TicketState(
            status=self.status,
            status_category="done" if self.status == "Done" else "new",
            updated=datetime.now(timezone.utc),
            values={name: self.values.get(name) for name in field_ids},
        )

    async def transition_to(self, ref: TicketRef, status: str) -> None:
        if status not in self.reachable.get(self.status, set()):
            reachable = sorted(self.reachable.get(self.status, ()))
            raise RejectedError(f"no transition from {self.status} to {status}; reachable: {reachable}")
        self.transitions.append(status)
        self.status = status


class FakeMdr:
    """One MDR incident with its comments; `lose_reply` names calls whose reply is lost after they apply."""

    def __init__(self, incident: Incident) -> None:
        self.incident = incident
        self.comments: list[Comment] = []
        self.calls: Counter[str] = Counter()
        self.lose_reply: set[str] = set()

    async def get_incident(self, incident_id: str) -> Incident:
        return self.incident

    async def close_incident(self, incident_id: str, resolution_status: str, summary: str) -> None:
        self.calls["close_incident"] += 1
        self.incident = self.incident.model_copy(update={"status": "Closed", "resolution": resolution_status})
        if "close_incident" in self.lose_reply:
            raise OutcomeUnknownError("reply lost")

    async def list_comments(self, incident_id: str) -> Any:
        return type("Page", (), {"items": list(self.comments), "malformed": []})()

    async def create_comment(self, incident_id: str, text: str, markdown_to_html: bool = True) -> Comment:
        self.calls["create_comment"] += 1
        comment = Comment(
            comment_id=f"c{len(self.comments) + 1}", author_name=MDR_CONNECTION_NAME, text=text, creation_time=1
        )
        self.comments.append(comment)
        if "create_comment" in self.lose_reply:
            raise OutcomeUnknownError("reply lost")
        return comment


def fake_incident(status: str = "Open") -> Incident:
    return Incident(
        incident_id="inc1",
        incident_number=1,
        summary="s",
        priority="HIGH",
        status=status,
        creation_time=1,
        update_time=2,
    )


@pytest.fixture
async def store(tmp_path: Path) -> Any:
    opened = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}")
    yield opened
    await opened.close()


def fake_context(store: Store, mdr: FakeMdr, tickets: FakeTickets, **status: Any) -> SyncContext:
    async def read(call: Any) -> Any:
        return await call()

    settings = ConnectionSettings.model_construct(name="main", mapping="test-mapping.yaml", sync=SyncSettings())
    return SyncContext(
        settings=settings,
        mapping=mapping().model_copy(update={"status": mapping().status.model_validate(status)}),
        store=store,
        mdr=mdr,  # type: ignore[arg-type]
        tickets=tickets,  # type: ignore[arg-type]
        stats=SyncStats(),
        read=read,
        clock=lambda: datetime.now(timezone.utc),
        spool_dir=Path("spool"),
    )


REF = TicketRef(key="SEC-1", id="10001", url="https://jira.example/browse/SEC-1")


async def linked_store(store: Store, ticket_status: str | None = "To Do", mdr_status: str | None = "Open") -> None:
    await store.record_link(
        "main", "inc1", 1, ticket_key=REF.key, ticket_id=REF.id, ticket_url=REF.url, fields_hash=None
    )
    await store.record_statuses("main", "inc1", ticket_status=ticket_status, mdr_status=mdr_status)


async def sync_once(store: Store, part: StatusSync, mdr: FakeMdr) -> None:
    await part.sync(mdr.incident, await store.get_link("main", "inc1"), REF)


async def test_close_found_after_lost_reply(store: Store) -> None:
    """After a close whose reply was lost, the next sync reads the incident closed and records it without a call."""
    mdr, tickets = FakeMdr(fake_incident()), FakeTickets(status="Done")
    tickets.values["resolution"] = "Done"
    part = StatusSync(fake_context(store, mdr, tickets, **CLOSE_ON_DONE))
    await linked_store(store)
    mdr.lose_reply.add("close_incident")

    with pytest.raises(OutcomeUnknownError):
        await sync_once(store, part, mdr)
    await sync_once(store, part, mdr)
    await sync_once(store, part, mdr)

    assert mdr.calls["close_incident"] == 1
    [row] = await store.get_items("main", "inc1", CLOSE)
    assert row.state == DONE
    assert tickets.transitions == []


async def test_close_resent_when_not_applied(store: Store) -> None:
    """A pending close that MDR never applied is sent again, once."""
    mdr, tickets = FakeMdr(fake_incident()), FakeTickets(status="Done")
    tickets.values["resolution"] = {"name": "Won't Do"}
    part = StatusSync(fake_context(store, mdr, tickets, **CLOSE_ON_DONE))
    await linked_store(store)
    await store.start_item("main", "inc1", CLOSE, "ticket_to_mdr", REF.id)

    await sync_once(store, part, mdr)
    await sync_once(store, part, mdr)

    assert mdr.calls["close_incident"] == 1
    assert mdr.incident.resolution == "FALSE_POSITIVE"


async def test_empty_resolution_names_fix(store: Store) -> None:
    """A done ticket without a resolution raises ItemError naming the field and default_resolution."""
    mdr, tickets = FakeMdr(fake_incident()), FakeTickets(status="Done")
    part = StatusSync(fake_context(store, mdr, tickets, **CLOSE_ON_DONE))
    await linked_store(store)

    with pytest.raises(ItemError) as raised:
        await sync_once(store, part, mdr)

    assert "'resolution' is empty" in str(raised.value)
    assert "default_resolution" in str(raised.value)
    assert mdr.calls["close_incident"] == 0


async def test_reopen_note_found_after_lost_reply(store: Store) -> None:
    """A reopen comment whose reply was lost is found by its footer and not posted twice."""
    mdr, tickets = FakeMdr(fake_incident("Closed")), FakeTickets(status="To Do")
    part = StatusSync(fake_context(store, mdr, tickets, **CLOSE_ON_DONE))
    await linked_store(store, ticket_status="Done", mdr_status="Closed")
    mdr.lose_reply.add("create_comment")

    with pytest.raises(OutcomeUnknownError):
        await sync_once(store, part, mdr)
    mdr.lose_reply.clear()
    await sync_once(store, part, mdr)
    await sync_once(store, part, mdr)

    assert mdr.calls["create_comment"] == 1
    [row] = await store.get_items("main", "inc1", REOPEN_NOTE)
    assert row.state == DONE
    assert (await store.get_link("main", "inc1")).ticket_status == "To Do"


async def test_first_status_is_baseline(store: Store) -> None:
    """A ticket already done when its status is first read does not close the incident."""
    mdr, tickets = FakeMdr(fake_incident()), FakeTickets(status="Done")
    tickets.values["resolution"] = "Done"
    part = StatusSync(fake_context(store, mdr, tickets, close_mdr=CLOSE_ON_DONE["close_mdr"]))
    await linked_store(store, ticket_status=None, mdr_status=None)

    await sync_once(store, part, mdr)

    assert mdr.calls["close_incident"] == 0
    assert tickets.transitions == []
    assert (await store.get_link("main", "inc1")).ticket_status == "Done"


async def test_connector_move_does_not_close(store: Store) -> None:
    """A done status the connector set for MDR Resolved does not close the incident."""
    mdr, tickets = FakeMdr(fake_incident("Resolved")), FakeTickets(status="To Do")
    tickets.values["resolution"] = "Done"
    part = StatusSync(fake_context(store, mdr, tickets, **CLOSE_ON_DONE))
    await linked_store(store)

    await sync_once(store, part, mdr)
    await sync_once(store, part, mdr)

    assert tickets.transitions == ["Done"]
    assert mdr.calls["close_incident"] == 0


async def test_failed_close_keeps_ticket(store: Store) -> None:
    """A close that fails on its resolution keeps the ticket done even though MDR changed status meanwhile."""
    mdr = FakeMdr(fake_incident("On hold"))
    tickets = FakeTickets(status="Done", reachable={"Done": {"To Do", "In Progress"}})
    tickets.values["resolution"] = "Duplicate"
    rules = {**CLOSE_ON_DONE, "to_ticket": {"Open": "To Do", "On hold": "In Progress"}}
    part = StatusSync(fake_context(store, mdr, tickets, **rules))
    await linked_store(store)

    with pytest.raises(ItemError) as raised:
        await sync_once(store, part, mdr)

    assert "'Duplicate'" in str(raised.value)
    assert tickets.transitions == []
    assert mdr.calls["close_incident"] == 0
    assert (await store.get_link("main", "inc1")).mdr_status == "Open"


async def test_unknown_mdr_status_is_item_error(store: Store) -> None:
    """A status outside the four MDR statuses is an ItemError, and no transition is tried."""
    mdr, tickets = FakeMdr(fake_incident("Investigating")), FakeTickets()
    part = StatusSync(fake_context(store, mdr, tickets, to_ticket={"Open": "To Do"}))
    await linked_store(store)

    with pytest.raises(ItemError) as raised:
        await sync_once(store, part, mdr)

    assert "'Investigating'" in str(raised.value)
    assert tickets.transitions == []


async def test_close_without_done_statuses_is_config_error(tmp_path: Path) -> None:
    """Enabling the close without done statuses stops the connection with a ConfigError."""
    no_store: Any = None
    context = fake_context(no_store, FakeMdr(fake_incident()), FakeTickets(), close_mdr={"enabled": True})

    with pytest.raises(ConfigError) as raised:
        StatusSync(context)

    assert "done_statuses" in str(raised.value)


async def test_footer_is_read_back() -> None:
    """The reopen comment's footer is the one the comment sync takes for the connector's own."""
    marker = parse_mdr_footer(f"Ticket reopened.\n\n{mdr_footer('jira', 'reopen:10001:2')}")

    assert marker is not None
    assert marker.source_id == "reopen:10001:2"


# A crash between the create of a ticket and its first status record


async def created_store(store: Store) -> None:
    """Leave the ledger as a crash right after the create leaves it: linked, created by the connector, no status."""
    await store.start_create("main", "inc1", 1)
    await store.record_link(
        "main", "inc1", 1, ticket_key=REF.key, ticket_id=REF.id, ticket_url=REF.url, fields_hash=None
    )


async def test_crash_then_person_done_closes(store: Store) -> None:
    """A person's Done on a ticket whose creating run crashed closes the incident once and is not undone."""
    mdr, tickets = FakeMdr(fake_incident()), FakeTickets(status="Done")
    tickets.values["resolution"] = "Done"
    part = StatusSync(fake_context(store, mdr, tickets, **CLOSE_ON_DONE))
    await created_store(store)

    await sync_once(store, part, mdr)
    await sync_once(store, part, mdr)

    assert mdr.calls["close_incident"] == 1
    assert tickets.transitions == []
    link = await store.get_link("main", "inc1")
    assert (link.ticket_status, link.mdr_status) == ("Done", "Closed")


async def test_crash_then_person_move_kept(store: Store) -> None:
    """A person's move of a ticket whose creating run crashed stays where no transition leads to the mapped status."""
    mdr, tickets = FakeMdr(fake_incident()), FakeTickets(status="In Progress")
    part = StatusSync(fake_context(store, mdr, tickets, **CLOSE_ON_DONE))
    await created_store(store)

    await sync_once(store, part, mdr)
    await sync_once(store, part, mdr)

    assert tickets.transitions == []
    assert mdr.calls["close_incident"] == 0
    link = await store.get_link("main", "inc1")
    assert (link.ticket_status, link.mdr_status) == ("In Progress", "Open")


async def test_crash_then_first_move_made(store: Store) -> None:
    """A ticket whose creating run crashed still gets the first move where a transition leads there."""
    mdr, tickets = FakeMdr(fake_incident("On hold")), FakeTickets(reachable={"To Do": {"On Hold"}})
    part = StatusSync(fake_context(store, mdr, tickets, **CLOSE_ON_DONE))
    await created_store(store)

    await sync_once(store, part, mdr)
    await sync_once(store, part, mdr)

    assert tickets.transitions == ["On Hold"]
    link = await store.get_link("main", "inc1")
    assert (link.ticket_status, link.mdr_status) == ("On Hold", "On hold")


async def test_created_now_gets_first_move(store: Store) -> None:
    """A ticket created in this run still gets its first move to the mapped status."""
    mdr, tickets = FakeMdr(fake_incident("On hold")), FakeTickets(reachable={"To Do": {"On Hold"}})
    context = fake_context(store, mdr, tickets, **CLOSE_ON_DONE)
    part = StatusSync(context)
    await created_store(store)
    context.created_tickets.add(REF.id)

    await sync_once(store, part, mdr)

    assert tickets.transitions == ["On Hold"]
    assert REF.id not in context.created_tickets


async def test_crash_after_own_done_no_close(store: Store) -> None:
    """The connector's own first move to Done, cut off before its record, does not close the incident."""
    mdr, tickets = FakeMdr(fake_incident("Resolved")), FakeTickets(status="Done")
    tickets.values["resolution"] = "Done"
    part = StatusSync(fake_context(store, mdr, tickets, **CLOSE_ON_DONE))
    await created_store(store)

    await sync_once(store, part, mdr)

    assert mdr.calls["close_incident"] == 0
    assert tickets.transitions == []


async def test_crash_after_ticket_side_keeps_move(store: Store) -> None:
    """A crash after the ticket side recorded its status, before the first move, does not park the incident for good."""
    mdr, tickets = FakeMdr(fake_incident()), FakeTickets(status="In Progress")
    part = StatusSync(fake_context(store, mdr, tickets, **CLOSE_ON_DONE))
    await created_store(store)
    await store.record_statuses("main", "inc1", ticket_status="In Progress")

    await sync_once(store, part, mdr)
    await sync_once(store, part, mdr)

    assert tickets.transitions == []
    link = await store.get_link("main", "inc1")
    assert (link.ticket_status, link.mdr_status) == ("In Progress", "Open")
