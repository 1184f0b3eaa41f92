"""Attacks on the backlog throughput changes: batch ticket lookups, paged change searches, Jira times and simulator indexes."""

from __future__ import annotations

import logging
import random
from typing import Any

import pytest
from fixtures_jira import MakeAdapter, RunningJira, StartJira, paged_issues
from fixtures_sync import SyncHarness

from fixtures_mdr import MDR_CLIENT_ID, MDR_CONNECTION_NAME

from mdr_connector.adapters.jira import adapter as jira_adapter
from mdr_connector.adapters.jira.adapter import LOOKUP_BATCH_SIZE, JiraTicketAdapter, _parse_time
from mdr_connector.adapters.jira.simulator_state import SimError
from mdr_connector.adapters.mdr.simulator import MdrSimulator
from mdr_connector.adapters.mdr.simulator.handlers import api_incidents_history
from mdr_connector.adapters.mdr.simulator.protocol import HISTORY_ENTITY_TYPES, in_range
from mdr_connector.adapters.mdr.simulator.state import HistoryRecord
from mdr_connector.connector.errors import InvalidPayloadError
from mdr_connector.connector.tickets import TicketDraft, TicketFields, TicketRef

BASE = {"project": {"key": "SEC"}, "issuetype": {"name": "Task"}, "summary": "made before the ledger"}


def create_marked_issue(sim: Any, incident_id: str) -> Any:
    """Create an issue with the connector's labels and property for `incident_id`, as a lost ledger leaves it."""
    labels = ["mdr-connector", f"mdr-{incident_id}"]
    return sim.create_issue({**BASE, "labels": labels}, properties=[{"key": "mdr-connector", "value": {"incident_id": incident_id}}])


def ticket_draft(incident_id: str) -> TicketDraft:
    return TicketDraft(
        incident_id=incident_id,
        project="SEC",
        issue_type="Task",
        fields=TicketFields(summary=f"incident {incident_id}", description="text", priority="High", labels=()),
        metadata={"incident_number": 7},
    )


# Batch lookup: find_incident_tickets


async def test_batch_case_variants_apart(
    jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter, caplog: pytest.LogCaptureFixture
) -> None:
    """Ids that differ only by case, in two batches, give one ticket and no duplicate warning.

    JQL matches labels case-insensitively, so the issue of "ABC" is returned
    by the batch that contains "abc" and again by the batch that contains "ABC".
    """
    issue = create_marked_issue(jira_cloud.sim, "ABC")
    fillers = [f"filler-{number}" for number in range(LOOKUP_BATCH_SIZE - 1)]
    caplog.set_level(logging.WARNING)

    found = await cloud_adapter.find_incident_tickets(["abc", *fillers, "ABC"])

    assert {incident_id: ref.key for incident_id, ref in found.items()} == {"ABC": issue.key}
    assert found["ABC"] == await cloud_adapter.find_ticket("ABC")
    duplicates = [record.ticket_keys for record in caplog.records if record.message == "jira.ticket.duplicates"]
    assert duplicates == []


async def test_batch_case_variants_together(jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter) -> None:
    """In one batch, ids that differ only by case each get the issue whose property names them exactly."""
    upper = create_marked_issue(jira_cloud.sim, "Case-1")
    lower = create_marked_issue(jira_cloud.sim, "case-1")

    found = await cloud_adapter.find_incident_tickets(["case-1", "Case-1", "CASE-1"])

    assert {incident_id: ref.key for incident_id, ref in found.items()} == {"Case-1": upper.key, "case-1": lower.key}
    for incident_id in ("case-1", "Case-1", "CASE-1"):
        assert found.get(incident_id) == await cloud_adapter.find_ticket(incident_id)


async def test_batch_ignores_other_project(jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter) -> None:
    """An issue with the right label and property in a project the mapping does not search is not found, as by find_ticket."""
    adapter = cloud_adapter
    jira_cloud.sim.create_issue(
        {**BASE, "project": {"key": "OPS"}, "labels": ["mdr-connector", "mdr-elsewhere"]},
        properties=[{"key": "mdr-connector", "value": {"incident_id": "elsewhere"}}],
    )
    jira_cloud.sim.create_issue({**BASE, "labels": ["mdr-connector", "mdr-no-property"]})

    found = await adapter.find_incident_tickets(["elsewhere", "no-property"])

    assert found == {}
    assert await adapter.find_ticket("elsewhere") is None
    assert await adapter.find_ticket("no-property") is None


# Batch lookup: the engine


async def test_engine_case_variant_incidents(harness: SyncHarness) -> None:
    """Two new incidents whose ids differ only by case each get a ticket of their own, linked to the right one."""
    upper = harness.seed(incident_id="Attack-Case")["incident_id"]
    lower = harness.seed(incident_id="attack-case")["incident_id"]
    adopted = create_marked_issue(harness.jira.sim, upper)
    harness.advance(60)

    await harness.cycles(2)

    upper_link = await harness.store.get_link("main", upper)
    lower_link = await harness.store.get_link("main", lower)
    assert upper_link is not None
    assert lower_link is not None
    assert upper_link.ticket_key == adopted.key
    assert lower_link.ticket_key not in (None, adopted.key)
    lower_issue = harness.jira.sim.issues[int(lower_link.ticket_id)]
    assert lower_issue.properties["mdr-connector"]["incident_id"] == lower


async def test_engine_lookup_not_reused_next_cycle(harness: SyncHarness) -> None:
    """The page state is empty after a cycle, and a later cycle adds new comments to the tickets linked before, creating none."""
    incidents = [harness.seed()["incident_id"] for _ in range(3)]
    harness.advance(60)

    sync = await harness.cycles(1)

    assert sync._looked_up == {}
    assert sync._unlinked == set()
    assert sync._not_parked == set()
    keys = {incident_id: harness.issue_for(incident_id).key for incident_id in incidents}
    harness.mdr_sim.advance(1)
    for incident_id in incidents:
        harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>later note</p>", author="SOC Analyst")
    harness.advance(60)

    await harness.cycles(1, sync)

    for incident_id in incidents:
        assert [issue.key for issue in harness.issues_for(incident_id)] == [keys[incident_id]]
        assert any("later note" in comment.body for comment in harness.issue_for(incident_id).comments)


# Paged change search: _shifted_while_paged


def act_after_first_page(monkeypatch: pytest.MonkeyPatch, action: Any) -> list[str]:
    """Run `action` once, right after the first page of the next search is read, and return the search paths sent."""
    real_request = jira_adapter._request
    pages: list[str] = []

    def request(client: Any, method: str, path: str, **kwargs: Any) -> Any:
        reply = real_request(client, method, path, **kwargs)
        if path.startswith("search"):
            pages.append(path)
            if len(pages) == 1:
                action()
        return reply

    monkeypatch.setattr(jira_adapter, "_request", request)
    monkeypatch.setattr(jira_adapter.time, "sleep", lambda seconds: None)
    return pages


@pytest.mark.parametrize("deployment", ["cloud", "datacenter"])
@pytest.mark.parametrize("edited", [1, 2], ids=["last-of-page-1", "first-of-page-2"])
async def test_change_search_edit_at_boundary(
    start_jira: StartJira, make_adapter: MakeAdapter, monkeypatch: pytest.MonkeyPatch, deployment: str, edited: int
) -> None:
    """An issue edited at a page boundary while the search is paged leaves no issue out."""
    running, adapter, since, refs = await paged_issues(start_jira, make_adapter, deployment, ticket_draft)

    def edit() -> None:
        running.sim.advance(1)
        running.sim.edit_as_human(refs[edited].key, summary="edited while the search was paged")

    act_after_first_page(monkeypatch, edit)

    changes = await adapter.changed_tickets(since)

    assert sorted(change.ref.key for change in changes) == sorted(ref.key for ref in refs)
    assert len(changes) == len(refs)


@pytest.mark.parametrize("deployment", ["cloud", "datacenter"])
async def test_change_search_issue_deleted(
    start_jira: StartJira, make_adapter: MakeAdapter, monkeypatch: pytest.MonkeyPatch, deployment: str
) -> None:
    """An issue deleted after its page was read costs no other changed issue its place in the result."""
    running, adapter, since, refs = await paged_issues(start_jira, make_adapter, deployment, ticket_draft)
    # The issues were written 30 s before the search, so only the deletion can cause a second pass.
    running.sim.advance(30)
    act_after_first_page(monkeypatch, lambda: running.sim.issues.pop(int(refs[0].id)))

    changes = await adapter.changed_tickets(since)

    returned = {change.ref.key for change in changes}
    for ref in refs[1:]:
        assert ref.key in returned


# Jira times: _parse_time


@pytest.mark.parametrize("text", ["2026-12-04T10:00:00.000+0060", "2026-12-04T10:00:00.000+1999", "2026-12-04T10:00:00-0075"])
def test_jira_time_bad_offset_minutes(text: str) -> None:
    """An offset with 60 or more minutes is unreadable, as it was before the fromisoformat fast path."""
    with pytest.raises(InvalidPayloadError, match="unreadable time"):
        _parse_time(text)


@pytest.mark.parametrize(
    "text",
    [
        "2026-12-04T24:00:00.000+0000",
        "2026-12-04T23:59:60.000+0000",
        "2026-12-04T10:00:00.000+2400",
        "2026-12-04T10:00:00.000+0300\n",
        "2026-12-04T10:60:00.000+0000",
    ],
)
def test_jira_time_impossible_values(text: str) -> None:
    """Hour 24, second 60, a 24-hour offset and a trailing newline stay unreadable."""
    with pytest.raises(InvalidPayloadError, match="unreadable time"):
        _parse_time(text)


def test_jira_time_unicode_digits() -> None:
    """Non-ASCII digits match the fast path's pattern but read the same as through strptime."""
    text = "\uff12\uff10\uff12\uff16-12-04T10:00:00.000+0300"

    assert _parse_time(text) == _parse_time("2026-12-04T10:00:00.000+0300")


# MDR simulator: incidents/history against the implementation before the sorted index


def history_by_full_sort(
    sim: MdrSimulator,
    connection: Any,
    *,
    minimum: int | None,
    maximum: int | None,
    page: int,
    page_size: int,
    incident_id: str | None,
    ignore_self: bool,
) -> list[dict[str, Any]]:
    """The incidents/history page as the simulator computed it before it kept a sorted index per entity type."""

    def selected(record: HistoryRecord) -> bool:
        incident = sim._incidents.get(record.incident_id)
        return (
            record.client_id == connection.client_id
            and (not incident_id or record.incident_id == incident_id)
            and incident is not None
            and connection.sees_tenant(str(incident.record.get("tenant_name", "")))
            and in_range(record.changed_at, minimum, maximum)
            and not (ignore_self and record.changed_by == connection.connection_name)
        )

    result: list[HistoryRecord] = []
    for entity_type in HISTORY_ENTITY_TYPES:
        of_type = sorted((r for r in sim._history if r.entity_type == entity_type and selected(r)), key=HistoryRecord.order)
        result.extend(of_type[(page - 1) * page_size : page * page_size])
    result.sort(key=HistoryRecord.order)
    return [record.to_wire() for record in result]


async def test_history_pages_match_full_sort(mdr_sim: MdrSimulator) -> None:
    """Random history, records dated back after reads, and random queries give the pages the full sort gave."""
    rng = random.Random(20261205)
    connection = mdr_sim._connection(MDR_CLIENT_ID, MDR_CONNECTION_NAME)
    incidents = [mdr_sim.seed_incident(MDR_CLIENT_ID)["incident_id"] for _ in range(6)]
    base = mdr_sim.now_ms()
    entity_types = [*HISTORY_ENTITY_TYPES, "incident_unknown"]
    authors = [MDR_CONNECTION_NAME, "SOC", "Kaspersky MDR SOC"]

    compared = 0
    for _round in range(25):
        for _ in range(rng.randint(1, 30)):
            mdr_sim._history.append(
                HistoryRecord(
                    client_id=MDR_CLIENT_ID if rng.random() < 0.9 else "another-client",
                    incident_id=rng.choice([*incidents, "missing-incident"]),
                    entity_type=rng.choice(entity_types),
                    changed_at=base + rng.randint(-50, 50),
                    changed_by=rng.choice(authors),
                    operation="update",
                    entity={"marker": rng.random()},
                    sequence=len(mdr_sim._history),
                )
            )
        for _ in range(8):
            minimum = rng.choice([None, base + rng.randint(-60, 60)])
            maximum = rng.choice([None, base + rng.randint(-60, 60)])
            query = {
                "minimum": minimum,
                "maximum": maximum,
                "page": rng.randint(1, 4),
                "page_size": rng.randint(1, 6),
                "incident_id": rng.choice([None, *incidents]),
                "ignore_self": rng.random() < 0.5,
            }
            body: dict[str, Any] = {"page": query["page"], "entity_type_page_size": query["page_size"]}
            if minimum is not None:
                body["min_record_time"] = minimum
            if maximum is not None:
                body["max_record_time"] = maximum
            if query["incident_id"] is not None:
                body["incident_id"] = query["incident_id"]
            if query["ignore_self"]:
                body["ignore_self"] = True

            served = await api_incidents_history(mdr_sim, connection, body, None)  # type: ignore[arg-type]

            assert served == history_by_full_sort(mdr_sim, connection, **query), query
            compared += bool(served)
    assert compared > 20


# MDR simulator: response expiry scans


def test_expiry_skip_settings_backdating(mdr_sim: MdrSimulator) -> None:
    """A shorter timeout, a backdated response and a later clock each decline responses at once, despite the skipped scans."""

    def status(response: dict[str, Any]) -> str:
        mdr_sim.expire_responses()
        [current] = [item for item in mdr_sim.responses(MDR_CLIENT_ID, incident_id) if item["response_id"] == response["response_id"]]
        return str(current["status"])

    mdr_sim.update_settings(response_timeout_seconds=3600)
    incident_id = mdr_sim.seed_incident(MDR_CLIENT_ID)["incident_id"]
    first = mdr_sim.add_response(MDR_CLIENT_ID, incident_id)
    initial = status(first)
    mdr_sim.update_settings(response_timeout_seconds=60)
    assert status(first) == initial
    mdr_sim.advance(61)
    assert status(first) == "Declined"

    backdated = mdr_sim.add_response(MDR_CLIENT_ID, incident_id, creation_time=mdr_sim.now_ms() - 120_000)
    assert status(backdated) == "Declined"

    fresh = mdr_sim.add_response(MDR_CLIENT_ID, incident_id)
    assert status(fresh) == initial
    mdr_sim.advance(59)
    assert status(fresh) == initial
    mdr_sim.advance(2)
    assert status(fresh) == "Declined"


# Jira simulator: the comment index


def test_comment_index_after_deletes(jira_cloud: RunningJira) -> None:
    """A deleted comment, and a comment of a removed issue, are not found through the index."""
    sim = jira_cloud.sim
    first = sim.create_issue({**BASE, "labels": []})
    second = sim.create_issue({**BASE, "labels": []})
    remaining = sim.add_comment(first.key, "remaining")
    deleted = sim.add_comment(first.key, "deleted")
    orphan = sim.add_comment(second.key, "on a removed issue")

    sim.delete_comment(deleted.id)
    sim.issues.pop(second.id)

    assert sim.comment(remaining.id) == (first, remaining)
    assert sim.comment(str(remaining.id)) == (first, remaining)
    for missing in (deleted.id, orphan.id, f"0{remaining.id}"):
        with pytest.raises(SimError):
            sim.comment(missing)



# Comment copies recorded as done together


async def test_crash_between_posts(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash on the second of three posts records the first copy as done, and the next run posts each comment once."""
    incident_id = harness.seed()["incident_id"]
    for number in range(3):
        harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, f"<p>crash note {number}</p>", author="SOC Analyst")

    class SimulatedCrash(BaseException):
        pass

    add = JiraTicketAdapter.add_comment
    posts: list[str] = []

    async def crash_on_second(adapter: JiraTicketAdapter, ref: Any, draft: Any) -> Any:
        posts.append(draft.marker.source_id)
        if len(posts) == 2:
            raise SimulatedCrash
        return await add(adapter, ref, draft)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(JiraTicketAdapter, "add_comment", crash_on_second)
        with pytest.raises(SimulatedCrash):
            await harness.cycles(1)

    items = {item.source_id: item for item in await harness.store.get_items("main", incident_id, "comment")}
    assert items[posts[0]].state == "done"
    assert items[posts[0]].target_id == str(harness.issue_for(incident_id).comments[0].id)
    harness.advance(60)

    await harness.cycles(2)

    issue = harness.issue_for(incident_id)
    texts = [comment.body for comment in issue.comments]
    for number in range(3):
        assert sum(f"crash note {number}" in text for text in texts) == 1
    items_after = await harness.store.get_items("main", incident_id, "comment")
    assert {item.state for item in items_after} == {"done"}
    assert {item.target_id for item in items_after} == {str(comment.id) for comment in issue.comments}
