"""Reads and writes done once per page or per incident instead of once per item: ticket lookups, parked entries, copies done."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from fixtures_jira import RunningJira
from fixtures_sync import SyncHarness

from fixtures_mdr import MDR_CLIENT_ID

from mdr_connector.adapters.jira.adapter import LOOKUP_BATCH_SIZE, JiraTicketAdapter
from mdr_connector.connector.engine import INCIDENT
from mdr_connector.connector.errors import RemoteUnavailableError
from mdr_connector.connector.store import DONE, MDR_TO_TICKET, Store

pytestmark = pytest.mark.asyncio

SEARCH = "POST /rest/api/2/search/jql"
BASE = {"project": {"key": "SEC"}, "issuetype": {"name": "Task"}, "summary": "made before the ledger"}


def create_marked_issue(sim: Any, incident_id: str, label_id: str | None = None) -> Any:
    """Create an issue that carries the connector's label and property for `incident_id`, as a lost ledger leaves them."""
    labels = ["mdr-connector", f"mdr-{label_id or incident_id}"]
    return sim.create_issue({**BASE, "labels": labels}, properties=[{"key": "mdr-connector", "value": {"incident_id": incident_id}}])


class Calls:
    """Counts of the Jira adapter's lookups; each call still goes to the adapter."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.single: list[str] = []
        self.batches: list[list[str]] = []
        single = JiraTicketAdapter.find_ticket
        batch = JiraTicketAdapter.find_incident_tickets

        async def find_ticket(adapter: JiraTicketAdapter, incident_id: str) -> Any:
            self.single.append(incident_id)
            return await single(adapter, incident_id)

        async def find_incident_tickets(adapter: JiraTicketAdapter, incident_ids: Any) -> Any:
            self.batches.append(list(incident_ids))
            return await batch(adapter, incident_ids)

        monkeypatch.setattr(JiraTicketAdapter, "find_ticket", find_ticket)
        monkeypatch.setattr(JiraTicketAdapter, "find_incident_tickets", find_incident_tickets)


# The adapter


async def test_batch_matches_exact_ids(jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter, caplog: pytest.LogCaptureFixture) -> None:
    """Each incident gets its oldest issue whose property names exactly its id; others are left out."""
    sim = jira_cloud.sim
    create_marked_issue(sim, "abc", label_id="abc")
    sim.create_issue({**BASE, "labels": ["mdr-connector", "mdr-ABC"]})
    exact = create_marked_issue(sim, "ABC")
    oldest = create_marked_issue(sim, "twice")
    newer = create_marked_issue(sim, "twice")
    caplog.set_level(logging.WARNING)

    found = await cloud_adapter.find_incident_tickets(["ABC", "Abc", "twice", "missing"])

    [warning] = [record for record in caplog.records if record.message == "jira.ticket.duplicates"]
    assert {incident_id: ref.key for incident_id, ref in found.items()} == {"ABC": exact.key, "twice": oldest.key}
    assert warning.ticket_keys == [oldest.key, newer.key]
    assert found["twice"] == await cloud_adapter.find_ticket("twice")


async def test_batch_splits_long_lists(jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter) -> None:
    """A list longer than one batch is searched in batches, and a match in the last one is found."""
    incident_ids = [f"inc-{number}" for number in range(2 * LOOKUP_BATCH_SIZE + 1)]
    last = create_marked_issue(jira_cloud.sim, incident_ids[-1])
    before = jira_cloud.sim.calls[SEARCH]

    found = await cloud_adapter.find_incident_tickets(incident_ids)

    assert jira_cloud.sim.calls[SEARCH] - before == 3
    assert {incident_id: ref.key for incident_id, ref in found.items()} == {incident_ids[-1]: last.key}


async def test_batch_on_datacenter(jira_dc: RunningJira, make_adapter: Any) -> None:
    """On Data Center the batch goes through the classic search."""
    adapter = await make_adapter(jira_dc)
    issue = create_marked_issue(jira_dc.sim, "dc-1")

    found = await adapter.find_incident_tickets(["dc-1", "dc-2"])

    assert {incident_id: ref.key for incident_id, ref in found.items()} == {"dc-1": issue.key}
    assert jira_dc.sim.calls["GET /rest/api/2/search"] == 1


async def test_batch_needs_own_label(jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter) -> None:
    """An issue whose property names one incident but whose label is another's is found for neither, as by find_ticket."""
    create_marked_issue(jira_cloud.sim, "named-1", label_id="labelled-2")

    found = await cloud_adapter.find_incident_tickets(["named-1", "labelled-2"])

    assert found == {}
    assert await cloud_adapter.find_ticket("named-1") is None
    assert await cloud_adapter.find_ticket("labelled-2") is None


# The engine


@pytest.mark.parametrize("source", ["history", "list"])
async def test_page_looked_up_once(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch, source: str) -> None:
    """New incidents are looked up in one batch: an issue left by a lost ledger is linked, the others are created."""
    harness.use_sync(change_source=source)
    incidents = [harness.seed()["incident_id"] for _ in range(5)]
    adopted = create_marked_issue(harness.jira.sim, incidents[2])
    harness.advance(60)
    calls = Calls(monkeypatch)

    sync = await harness.cycles(1)

    assert [sorted(batch) for batch in calls.batches] == [sorted(incidents)]
    assert calls.single == []
    assert all(len(harness.issues_for(incident_id)) == 1 for incident_id in incidents)
    assert harness.issue_for(incidents[2]).key == adopted.key
    assert sync.stats.tickets_linked == 1
    assert sync.stats.tickets_created == 4
    assert sync._looked_up == {}


async def test_failed_batch_falls_back(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A batch that fails is logged, and each incident is looked up on its own before its create."""
    incidents = [harness.seed()["incident_id"] for _ in range(3)]
    adopted = create_marked_issue(harness.jira.sim, incidents[0])
    harness.advance(60)
    calls = Calls(monkeypatch)

    async def unavailable(adapter: JiraTicketAdapter, incident_ids: Any) -> Any:
        calls.batches.append(list(incident_ids))
        raise RemoteUnavailableError("Jira answered 503")

    monkeypatch.setattr(JiraTicketAdapter, "find_incident_tickets", unavailable)
    caplog.set_level(logging.INFO)

    sync = await harness.cycles(1)

    assert sorted(calls.single) == sorted(incidents)
    assert all(len(harness.issues_for(incident_id)) == 1 for incident_id in incidents)
    assert harness.issue_for(incidents[0]).key == adopted.key
    assert sync.stats.tickets_created == 2
    assert [record.incidents for record in caplog.records if record.message == "sync.ticket.lookup_batch_failed"] == [3]


async def test_batch_bug_falls_back(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A batch that fails with an unexpected error, such as a reply missing a key, also falls back to single lookups."""
    incidents = [harness.seed()["incident_id"] for _ in range(2)]
    calls = Calls(monkeypatch)

    async def broken(adapter: JiraTicketAdapter, incident_ids: Any) -> Any:
        raise KeyError("key")

    monkeypatch.setattr(JiraTicketAdapter, "find_incident_tickets", broken)
    caplog.set_level(logging.INFO)

    sync = await harness.cycles(1)

    assert sorted(calls.single) == sorted(incidents)
    assert sync.stats.tickets_created == 2
    assert [record.error for record in caplog.records if record.message == "sync.ticket.lookup_batch_failed"] == ["KeyError: 'key'"]


async def test_pending_create_looked_up_alone(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """An incident with a create intent from an earlier run is left out of the batch and searched on its own."""
    incidents = [harness.seed()["incident_id"] for _ in range(3)]
    await harness.store.start_create("main", incidents[0], 1)
    harness.advance(60)
    calls = Calls(monkeypatch)

    await harness.cycles(1)

    assert [sorted(batch) for batch in calls.batches] == [sorted(incidents[1:])]
    assert calls.single == [incidents[0]]
    assert all(len(harness.issues_for(incident_id)) == 1 for incident_id in incidents)


async def test_lone_incident_uses_single_lookup(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """One new incident is looked up by find_ticket, because a batch of one saves nothing."""
    incident_id = harness.seed()["incident_id"]
    calls = Calls(monkeypatch)

    await harness.cycles(1)

    assert calls.batches == []
    assert calls.single == [incident_id]


async def test_page_links_not_read_again(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """The incidents a page found unlinked get their tickets without another read of their links."""
    incidents = [harness.seed()["incident_id"] for _ in range(3)]
    reads: list[str] = []
    get_link = Store.get_link

    async def counted(store: Store, connection: str, incident_id: str) -> Any:
        reads.append(incident_id)
        return await get_link(store, connection, incident_id)

    monkeypatch.setattr(Store, "get_link", counted)

    sync = await harness.cycles(1)

    assert reads == []
    assert all(len(harness.issues_for(incident_id)) == 1 for incident_id in incidents)
    assert sync._unlinked == set()


# Parked entries


async def test_unpark_only_parked_incidents(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A page's reconciliations unpark only the incidents that had a parked entry when the page was read."""
    incidents = [harness.seed()["incident_id"] for _ in range(3)]
    await harness.store.park("main", INCIDENT, incidents[1], "an earlier failure", harness.now())
    unparked: list[str] = []
    unpark = Store.unpark

    async def counted(store: Store, connection: str, kind: str, item_id: str) -> None:
        unparked.append(item_id)
        await unpark(store, connection, kind, item_id)

    monkeypatch.setattr(Store, "unpark", counted)

    await harness.cycles(1)

    assert unparked == [incidents[1]]
    assert await harness.store.get_parked("main", INCIDENT, incidents[1]) is None
    assert all(len(harness.issues_for(incident_id)) == 1 for incident_id in incidents)


async def test_failed_incident_stays_parked(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """An incident that fails in a page is parked, though the page read found it unparked, and the others sync."""
    incidents = [harness.seed()["incident_id"] for _ in range(3)]
    create = JiraTicketAdapter.create_ticket

    async def reject_one(adapter: JiraTicketAdapter, draft: Any) -> Any:
        if draft.incident_id == incidents[0]:
            raise RemoteUnavailableError("Jira answered 503")
        return await create(adapter, draft)

    monkeypatch.setattr(JiraTicketAdapter, "create_ticket", reject_one)

    sync = await harness.cycles(1)

    assert await harness.store.get_parked("main", INCIDENT, incidents[0]) is not None
    assert harness.issues_for(incidents[0]) == []
    assert all(len(harness.issues_for(incident_id)) == 1 for incident_id in incidents[1:])
    assert sync._not_parked == set()


# Copies recorded as done together


def add_comments(harness: SyncHarness, incident_id: str, count: int) -> None:
    for number in range(count):
        harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, f"<p>SOC note {number}</p>", author="SOC Analyst")


async def test_copies_done_in_one_write(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """The copies of an incident's comments are recorded as done with one ledger write, each with its own comment id."""
    incident_id = harness.seed()["incident_id"]
    add_comments(harness, incident_id, 3)
    writes: list[dict[str, str]] = []
    finish_items = Store.finish_items

    async def counted(store: Store, *args: Any) -> None:
        writes.append(dict(args[-1]))
        await finish_items(store, *args)

    monkeypatch.setattr(Store, "finish_items", counted)

    await harness.cycles(1)

    issue = harness.issue_for(incident_id)
    items = await harness.store.get_items("main", incident_id, "comment")
    assert len(writes) == 1
    assert sorted(writes[0].values()) == sorted(str(comment.id) for comment in issue.comments)
    assert {(item.state, item.direction) for item in items} == {(DONE, MDR_TO_TICKET)}
    assert {item.target_id for item in items} == set(writes[0].values())


async def test_crash_before_done_write(harness: SyncHarness) -> None:
    """A crash after the posts but before their done write leaves pending rows; the next run finds the copies by marker."""
    incident_id = harness.seed()["incident_id"]
    add_comments(harness, incident_id, 3)

    class SimulatedCrash(BaseException):
        pass

    async def crash(store: Store, *args: Any) -> None:
        raise SimulatedCrash

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Store, "finish_items", crash)
        with pytest.raises(SimulatedCrash):
            await harness.cycles(1)
    harness.advance(60)

    await harness.cycles(2)

    issue = harness.issue_for(incident_id)
    texts = [comment.body for comment in issue.comments]
    items = await harness.store.get_items("main", incident_id, "comment")
    for number in range(3):
        assert sum(f"SOC note {number}" in text for text in texts) == 1
    assert {item.state for item in items} == {DONE}
    assert {item.target_id for item in items} == {str(comment.id) for comment in issue.comments}


async def test_failed_post_keeps_earlier_copies(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the second of three posts fails, the first copy is still recorded as done in the same reconciliation."""
    incident_id = harness.seed()["incident_id"]
    add_comments(harness, incident_id, 3)
    add = JiraTicketAdapter.add_comment
    posts: list[str] = []

    async def second_fails(adapter: JiraTicketAdapter, ref: Any, draft: Any) -> Any:
        posts.append(draft.marker.source_id)
        if len(posts) == 2:
            raise RemoteUnavailableError("Jira answered 503")
        return await add(adapter, ref, draft)

    monkeypatch.setattr(JiraTicketAdapter, "add_comment", second_fails)

    await harness.cycles(1)

    items = {item.source_id: item for item in await harness.store.get_items("main", incident_id, "comment")}
    [copy] = harness.issue_for(incident_id).comments
    assert items[posts[0]].state == DONE
    assert items[posts[0]].target_id == str(copy.id)
    assert [items[source_id].state for source_id in posts[1:]] == ["pending"]


# The runner's pause


@pytest.mark.parametrize("source", ["history", "list"])
async def test_backlog_remaining_flag(harness: SyncHarness, source: str) -> None:
    """A cycle that stops at its page budget with changes left sets backlog_remaining, and the cycle that drains them clears it."""
    harness.use_sync(page_size=3, max_pages_per_cycle=2, change_source=source)
    for _ in range(12):
        harness.seed()
        harness.advance(0.01)
    sync = await harness.engine()

    await sync.run_cycle()
    first = sync.backlog_remaining
    for _cycle in range(8):
        await sync.run_cycle()

    assert first is True
    assert sync.backlog_remaining is False
