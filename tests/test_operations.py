"""Operator commands (dry run, resync, link, unlink, trace) and ledger retention, against the simulators on loopback."""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fixtures_jira import RunningJira
from fixtures_mdr import MDR_CLIENT_ID
from fixtures_sync import SyncHarness
from sqlalchemy import func, select, update
from test_cli import activated_config, jira, run_cli  # noqa: F401 - fixtures used by name

from mdr_connector.adapters.jira.simulator_state import HUMAN_NAME
from mdr_connector.adapters.mdr.simulator import MdrSimulator
from mdr_connector.adapters.memory.adapter import MemoryTicketAdapter
from mdr_connector.connector.cli import main
from mdr_connector.connector.config import load_settings
from mdr_connector.connector.engine import INCIDENT
from mdr_connector.connector.cli_operations import ticket_key_text
from mdr_connector.connector.errors import ConnectionBusyError, ItemError
from mdr_connector.connector.locks import ConnectionLock
from mdr_connector.connector.operations import (
    RETENTION_CURSOR,
    build_trace,
    dry_run_cycle,
    link_incident,
    read_live_incident,
    reconcile_now,
    resync_incident,
    trace_document,
    unlink_incident,
)
from mdr_connector.connector.store import (
    LINKED,
    CachedAsset,
    Cursor,
    Link,
    ParkedItem,
    ResponseDecision,
    Store,
    SyncedItem,
    utc_now,
)

CREATE_ISSUE = "POST /rest/api/2/issue"
ADD_COMMENT = "POST /rest/api/2/issue/{issue}/comment"
LEDGER_TABLES = (Link, SyncedItem, Cursor, ParkedItem, ResponseDecision, CachedAsset)


async def ledger_snapshot(store: Store) -> dict[str, Any]:
    """Row counts of every ledger table and the cursor values, to compare before and after."""
    snapshot: dict[str, Any] = {}
    async with store.sessions() as session:
        for model in LEDGER_TABLES:
            snapshot[model.__tablename__] = await session.scalar(select(func.count()).select_from(model))
        cursors = await session.scalars(select(Cursor))
        snapshot["cursor values"] = sorted((cursor.side, cursor.value) for cursor in cursors)
        items = await session.scalars(select(SyncedItem))
        snapshot["item states"] = sorted((item.source_id, item.state, item.target_id or "") for item in items)
    return snapshot


def jira_comment_count(harness: SyncHarness) -> int:
    return sum(len(issue.comments) for issue in harness.jira.sim.issues.values())


def human_issue(jira: RunningJira, summary: str = "Laptop of the CFO behaves oddly") -> Any:
    values = {"project": {"key": "SEC"}, "issuetype": {"name": "Task"}, "summary": summary}
    return jira.sim.create_issue(values, reporter=jira.sim.user(HUMAN_NAME))


async def age_link(store: Store, incident_id: str, days: float) -> None:
    """Make the link of an incident look last changed `days` ago."""
    async with store.sessions() as session, session.begin():
        await session.execute(
            update(Link).where(Link.incident_id == incident_id).values(updated_at=utc_now() - timedelta(days=days))
        )


# Dry run


async def test_dry_run_writes_nothing(harness: SyncHarness) -> None:
    """A dry run reports the ticket, comments and MDR comment it would write, and changes no side and no ledger row."""
    linked = harness.seed()["incident_id"]
    await harness.cycles(1)
    issue = harness.issue_for(linked)
    harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, linked, "<p>Isolate the host</p>", author="SOC Analyst")
    harness.jira.sim.add_comment(issue.key, "Host isolated by the night shift")
    new = harness.seed(summary="Mimikatz on DC-02")["incident_id"]
    harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, new, "<p>Credential dumping seen</p>", author="SOC Analyst")

    ledger_before = await ledger_snapshot(harness.store)
    issues_before = len(harness.jira.sim.issues)
    comments_before = jira_comment_count(harness)
    mdr_before = {incident_id: len(harness.mdr_comments(incident_id)) for incident_id in (linked, new)}
    jira_calls_before = dict(harness.jira.sim.calls)
    reported: list[Any] = []

    result = await dry_run_cycle(harness.settings, harness.connection, harness.store, reported.append)

    assert await ledger_snapshot(harness.store) == ledger_before
    assert len(harness.jira.sim.issues) == issues_before
    assert jira_comment_count(harness) == comments_before
    assert {incident_id: len(harness.mdr_comments(incident_id)) for incident_id in (linked, new)} == mdr_before
    assert harness.mdr_sim.call_counts["comments/create"] == 0
    for write in (CREATE_ISSUE, ADD_COMMENT, "PUT /rest/api/2/issue/{issue}"):
        assert harness.jira.sim.calls[write] == jira_calls_before.get(write, 0)

    operations = [(write.side, write.operation) for write in reported]
    assert operations.count(("ticket", "create_ticket")) == 1
    [create] = [write for write in reported if write.operation == "create_ticket"]
    assert create.detail["incident_id"] == new
    assert create.detail["ticket_key"] == "SEC-NEW1"
    copies = [write for write in reported if write.operation == "add_comment" and write.detail["origin"] == "mdr"]
    assert {write.detail["ticket_key"] for write in copies} == {"SEC-NEW1", issue.key}
    assert any("Credential dumping seen" in write.detail["excerpt"] for write in copies)
    [to_mdr] = [write for write in reported if write.operation == "create_comment"]
    assert to_mdr.detail["incident_id"] == linked
    assert "Host isolated by the night shift" in to_mdr.detail["excerpt"]
    assert result.writes == reported
    assert result.copied_rows["links"] == 1


async def test_dry_run_then_real_sync(harness: SyncHarness) -> None:
    """After a dry run the real cycle still does every write the dry run listed, once."""
    incident_id = harness.seed()["incident_id"]
    harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>First note</p>", author="SOC Analyst")

    await dry_run_cycle(harness.settings, harness.connection, harness.store, lambda write: None)
    await harness.cycles(1)

    issue = harness.issue_for(incident_id)
    assert sum("First note" in comment.body for comment in issue.comments) == 1
    assert harness.jira.sim.calls[CREATE_ISSUE] == 1


async def test_dry_run_cli_prints_writes(activated_config: Path, mdr_sim: MdrSimulator, jira: RunningJira) -> None:
    """`sync --dry-run` prints each write with the connection name and a summary, and creates no ledger."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID, summary="Beacon to a known C2")
    mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident["incident_id"], "<p>Block the domain</p>", author="SOC Analyst")
    database = load_settings(activated_config).data_dir / "mdr-connector.db"

    code, out, err = await run_cli("--config", str(activated_config), "sync", "--dry-run")

    assert code == 0, err
    lines = out.splitlines()
    assert (
        f"main: would create Jira ticket SEC-NEW1 in SEC (Task) for MDR incident {incident['incident_id']}: "
        f"[MDR-{incident['incident_number']}] Beacon to a known C2"
    ) in lines
    assert any(line.startswith("main: would add a comment to SEC-NEW1 (marker mdr ") for line in lines)
    assert any("Block the domain" in line for line in lines)
    assert lines[-1].startswith("main: dry run: ")
    assert "writes listed and none sent; 1 incidents seen, 0 failures" in lines[-1]
    assert jira.sim.issues == {}
    assert len(mdr_sim.comments(MDR_CLIENT_ID, incident["incident_id"])) == 1
    assert not database.exists()
    assert [path.name for path in database.parent.iterdir() if path.name.startswith(".dry-run-")] == []

    code, out, err = await run_cli("--config", str(activated_config), "sync", "--once")

    assert code == 0, err
    assert "1 tickets created" in out


# Resync


async def test_resync_fixes_parked_incident(harness: SyncHarness) -> None:
    """A parked incident that MDR now returns whole is reconciled at once and unparked."""
    incident_id = harness.seed(priority=None)["incident_id"]
    await harness.cycles(1)
    parked = await harness.store.get_parked("main", INCIDENT, incident_id)
    assert parked is not None
    harness.mdr_sim.update_incident(MDR_CLIENT_ID, incident_id, priority="LOW")

    result = await resync_incident(harness.settings, harness.connection, harness.store, incident_id)

    assert result.done
    assert result.parked_before is not None
    assert result.parked_after is None
    assert result.counts["tickets_created"] == 1
    assert result.link is not None and result.link.state == LINKED
    assert result.link.ticket_key == harness.issue_for(incident_id).key
    assert await harness.store.get_parked("main", INCIDENT, incident_id) is None


async def test_resync_failure_keeps_parked_entry(harness: SyncHarness) -> None:
    """A resync that fails raises and leaves the parked entry as it was."""
    incident_id = harness.seed(priority=None)["incident_id"]
    sync = await harness.cycles(1)
    before = await harness.store.get_parked("main", INCIDENT, incident_id)

    with pytest.raises(ItemError):
        await reconcile_now(sync, incident_id)

    after = await harness.store.get_parked("main", INCIDENT, incident_id)
    assert (after.attempts, after.reason, after.next_try_at) == (before.attempts, before.reason, before.next_try_at)


async def test_resync_waits_for_lock(harness: SyncHarness) -> None:
    """resync takes the connection's lock, so it stops while another process holds it."""
    incident_id = harness.seed()["incident_id"]
    lock = ConnectionLock(harness.settings.data_dir, "main")
    assert lock.try_acquire()
    try:
        with pytest.raises(ConnectionBusyError):
            await resync_incident(harness.settings, harness.connection, harness.store, incident_id)
    finally:
        lock.release()

    assert harness.issues_for(incident_id) == []


async def test_resync_cli_unparks(activated_config: Path, mdr_sim: MdrSimulator, jira: RunningJira) -> None:
    """`resync` prints the earlier parked reason, what it synced, and that the incident is no longer parked."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID, priority=None)
    incident_id = incident["incident_id"]
    code, _, err = await run_cli("--config", str(activated_config), "sync", "--once")
    assert code == 0, err
    mdr_sim.update_incident(MDR_CLIENT_ID, incident_id, priority="HIGH")

    code, out, err = await run_cli("--config", str(activated_config), "resync", "--", incident_id)

    assert code == 0, err
    [issue] = jira.sim.issues.values()
    lines = out.splitlines()
    assert lines[0].startswith(f"{incident_id} was parked after 1 failed attempts: ")
    assert lines[1].startswith(f"{incident_id} is in line with {issue.key}: 1 tickets created, ")
    assert lines[2] == f"{incident_id} is no longer parked"


async def test_resync_cli_busy(activated_config: Path, mdr_sim: MdrSimulator) -> None:
    """`resync` exits 75 while another process works the connection."""
    incident_id = mdr_sim.seed_incident(MDR_CLIENT_ID)["incident_id"]
    lock = ConnectionLock(load_settings(activated_config).data_dir, "main")
    assert lock.try_acquire()
    try:
        code, _, err = await run_cli("--config", str(activated_config), "resync", "--", incident_id)
    finally:
        lock.release()

    assert code == 75
    assert "connection main is being synced by another mdr-connector process" in err


# Link and unlink


async def test_link_then_sync_mirrors_comments(harness: SyncHarness) -> None:
    """An incident linked by hand to a person's ticket syncs into it, and no second ticket is created."""
    issue = human_issue(harness.jira)
    incident = harness.seed(summary="Suspicious RDP logon")
    incident_id = incident["incident_id"]
    harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>Who logged on at 03:00?</p>", author="SOC Analyst")

    result = await link_incident(harness.settings, harness.connection, harness.store, incident_id, issue.key)

    assert result.changed
    assert (result.link.state, result.link.ticket_key, result.link.ticket_id) == (LINKED, issue.key, str(issue.id))
    assert issue.properties["mdr-connector"]["incident_id"] == incident_id
    assert f"mdr-{incident_id}" in issue.fields["labels"]

    sync = await harness.cycles(1)

    assert harness.jira.sim.calls[CREATE_ISSUE] == 0
    assert len(harness.jira.sim.issues) == 1
    assert sum("Who logged on at 03:00?" in comment.body for comment in issue.comments) == 1
    assert issue.fields["summary"] == f"[MDR-{incident['incident_number']}] Suspicious RDP logon"
    harness.jira.sim.add_comment(issue.key, "It was the backup job")
    await harness.cycles(1, sync)
    assert sum("It was the backup job" in comment["text"] for comment in harness.mdr_comments(incident_id)) == 1


async def test_link_refuses_conflicts(harness: SyncHarness) -> None:
    """An incident or a ticket linked elsewhere is refused, naming both sides; the same pairing changes nothing."""
    first = harness.seed()["incident_id"]
    second = harness.seed()["incident_id"]
    await harness.cycles(1)
    first_key = harness.issue_for(first).key
    spare = human_issue(harness.jira)
    third = harness.seed()["incident_id"]

    with pytest.raises(ItemError) as caught:
        await link_incident(harness.settings, harness.connection, harness.store, first, spare.key)
    assert str(caught.value).startswith(f"MDR incident {first} is already linked to {first_key}, not {spare.key}")

    with pytest.raises(ItemError) as caught:
        await link_incident(harness.settings, harness.connection, harness.store, third, first_key)
    assert str(caught.value).startswith(f"{first_key} is already linked to MDR incident {first}, not {third}")

    with pytest.raises(ItemError) as caught:
        await link_incident(harness.settings, harness.connection, harness.store, third, "SEC-999")
    assert str(caught.value) == "Jira has no ticket SEC-999, or the connector's account cannot see it"

    same = await link_incident(harness.settings, harness.connection, harness.store, second, harness.issue_for(second).key)
    assert not same.changed
    assert "mdr-connector" not in spare.properties
    assert await harness.store.get_link("main", third) is None


async def test_unlink_then_sync_links_same_ticket(harness: SyncHarness) -> None:
    """After unlink the next reconciliation links the same ticket again, without copying old comments twice."""
    incident_id = harness.seed()["incident_id"]
    harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>Before unlink</p>", author="SOC Analyst")
    await harness.cycles(1)
    issue = harness.issue_for(incident_id)
    await harness.store.park("main", INCIDENT, incident_id, "test: an old failure", utc_now() + timedelta(hours=1))

    deleted = await unlink_incident(harness.settings, harness.connection, harness.store, incident_id)

    assert [link.ticket_key for link in deleted.links] == [issue.key]
    assert {item.kind for item in deleted.items} == {"comment"}
    assert [entry.reason for entry in deleted.parked] == ["test: an old failure"]
    assert await harness.store.get_link("main", incident_id) is None
    assert await harness.store.list_incident_items("main", incident_id) == []
    assert issue.properties["mdr-connector"]["incident_id"] == incident_id

    harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>After unlink</p>", author="SOC Analyst")
    harness.advance(31)
    await harness.cycles(1)

    link = await harness.store.get_link("main", incident_id)
    assert (link.state, link.ticket_key) == (LINKED, issue.key)
    assert harness.jira.sim.calls[CREATE_ISSUE] == 1
    assert sum("Before unlink" in comment.body for comment in issue.comments) == 1
    assert sum("After unlink" in comment.body for comment in issue.comments) == 1


async def test_unlink_pending_needs_force(harness: SyncHarness) -> None:
    """A pending link is removed only with force; an incident without a link is an error."""
    incident = harness.seed()
    await harness.store.start_create("main", incident["incident_id"], incident["incident_number"])

    with pytest.raises(ItemError) as caught:
        await unlink_incident(harness.settings, harness.connection, harness.store, incident["incident_id"])
    assert "pass --force" in str(caught.value)
    assert await harness.store.get_link("main", incident["incident_id"]) is not None

    deleted = await unlink_incident(harness.settings, harness.connection, harness.store, incident["incident_id"], force=True)
    assert [link.state for link in deleted.links] == ["pending"]

    with pytest.raises(ItemError) as caught:
        await unlink_incident(harness.settings, harness.connection, harness.store, incident["incident_id"])
    assert str(caught.value) == f"MDR incident {incident['incident_id']} has no link in connection main; nothing to unlink"


async def test_link_unlink_cli(activated_config: Path, mdr_sim: MdrSimulator, jira: RunningJira) -> None:
    """`link` and `unlink` print exactly what changed and exit 0, a conflict exits 1 naming both sides."""
    incident_id = mdr_sim.seed_incident(MDR_CLIENT_ID)["incident_id"]
    issue = human_issue(jira)
    other = human_issue(jira, "Another ticket")

    code, out, err = await run_cli("--config", str(activated_config), "link", "--", incident_id, issue.key.lower())

    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"linked MDR incident {incident_id} (number ")
    assert f" to {issue.key} {jira.url}/browse/{issue.key}" in lines[0]
    assert lines[1] == f"{issue.key} now carries the correlation marker of MDR incident {incident_id}"

    code, _, err = await run_cli("--config", str(activated_config), "link", "--", incident_id, other.key)

    assert code == 1
    assert f"MDR incident {incident_id} is already linked to {issue.key}, not {other.key}" in err

    code, out, err = await run_cli("--config", str(activated_config), "unlink", "--", incident_id)

    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"removed the link of MDR incident {incident_id} to {issue.key} (state linked)"
    assert lines[-1].startswith(f"MDR and {issue.key} are unchanged.")


async def test_unlink_cli_russian(activated_config: Path, mdr_sim: MdrSimulator) -> None:
    """With --lang ru an unlink without a link exits 1 with the Russian message."""
    incident_id = mdr_sim.seed_incident(MDR_CLIENT_ID)["incident_id"]

    code, out, err = await run_cli("--config", str(activated_config), "--lang", "ru", "unlink", "--", incident_id)

    assert code == 1
    assert out == ""
    assert f"mdr-connector: ошибка: у инцидента MDR {incident_id} нет связи в подключении main; удалять нечего" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["link", "INC1", "SEC 12"], "expected a ticket key such as SEC-12, INC0010001 or 123"),
        (["link", "INC1", "SEC-12/../x"], "expected a ticket key such as SEC-12, INC0010001 or 123"),
        (["resync", "two words"], "expected an MDR incident id"),
        (["link", "INC1"], "TICKET"),
    ],
    ids=["space-in-key", "path", "space", "missing"],
)
def test_operation_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    """An invalid argument exits 2 and names what was expected."""
    with pytest.raises(SystemExit) as caught:
        main(argv)

    assert caught.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", ["resync", "link", "unlink", "trace"])
def test_operation_commands_have_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Each operator command prints its help and exits 0."""
    with pytest.raises(SystemExit) as caught:
        main([command, "--help"])

    assert caught.value.code == 0
    assert f"usage: mdr-connector {command}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("text", "key"),
    [("sec-12", "SEC-12"), ("INC0010001", "INC0010001"), ("#123", "123"), ("123", "123"), ("9d385017c611228701d22104cc95c371", "9d385017c611228701d22104cc95c371")],
)
def test_ticket_key_forms_of_every_system(text: str, key: str) -> None:
    """Jira keys are written in capitals; ServiceNow numbers and sys_ids and Redmine numbers are kept as typed."""
    assert ticket_key_text(text) == key


async def test_memory_adapter_gets_ticket_by_key() -> None:
    """The memory fake looks tickets up by key, in any case, and returns None for an unknown key."""
    adapter = MemoryTicketAdapter()
    ref = adapter.add_human_ticket(summary="A person's ticket")

    assert await adapter.get_ticket(ref.key) == ref
    assert await adapter.get_ticket(ref.key.lower()) == ref
    assert await adapter.get_ticket("SEC-999") is None


# Trace


async def test_trace_shows_parked_reason(harness: SyncHarness) -> None:
    """The trace of a parked incident without a link shows the reason and an unknown cursor position."""
    incident_id = harness.seed(priority=None)["incident_id"]
    await harness.cycles(1)

    trace = await build_trace(harness.store, harness.connection, incident_id)

    assert trace.link is None
    [entry] = trace.parked
    assert entry.kind == INCIDENT
    assert "priority" in entry.reason
    assert trace.cursor_position.position == "unknown"
    assert {cursor.side for cursor in trace.cursors} >= {"mdr", "mdr_history", "ticket"}


async def test_trace_of_synced_incident(harness: SyncHarness) -> None:
    """The trace lists the link and each comment copy with ids, and --live finds a newer MDR version behind the cursor."""
    harness.use_sync(mdr_overlap_seconds=0)
    incident_id = harness.seed()["incident_id"]
    comment = harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>Note</p>", author="SOC Analyst")
    sync = await harness.cycles(1)
    issue = harness.issue_for(incident_id)

    document = trace_document(await build_trace(harness.store, harness.connection, incident_id))

    assert document["link"]["ticket_key"] == issue.key
    assert document["link"]["state"] == LINKED
    [item] = document["items"]
    assert (item["kind"], item["direction"], item["source_id"]) == ("comment", "mdr_to_ticket", comment["comment_id"])
    assert item["target_id"] == str(issue.comments[0].id)
    assert item["state"] == "done"
    assert document["cursor_position"]["cursor"] == "mdr_history"
    assert document["cursor_position"]["position"] == "behind"
    assert json.loads(json.dumps(document)) == document

    # Another incident moves the cursor a minute ahead. A change dated before
    # that is missed by the cycles, and the live trace reports it.
    reconciled = document["link"]["mdr_update_time"]
    harness.seed(creation_time=reconciled + 60_000, update_time=reconciled + 60_000)
    await harness.cycles(1, sync)
    harness.mdr_sim.update_incident(MDR_CLIENT_ID, incident_id, priority="LOW", update_time=reconciled + 30_000)
    live = await read_live_incident(harness.settings, harness.connection, incident_id)
    trace = await build_trace(harness.store, harness.connection, incident_id, live)

    assert trace.live is not None and trace.live.newer_than_reconciled is True
    assert trace.cursor_position.change_source == "live"
    assert trace.cursor_position.position == "behind"
    assert sync.stats.failures == 0


async def test_trace_cli_text_and_json(activated_config: Path, mdr_sim: MdrSimulator) -> None:
    """`trace` prints the parked reason in text, and the same facts as JSON with --json."""
    incident_id = mdr_sim.seed_incident(MDR_CLIENT_ID, priority=None)["incident_id"]
    code, _, err = await run_cli("--config", str(activated_config), "sync", "--once")
    assert code == 0, err

    code, out, err = await run_cli("--config", str(activated_config), "trace", "--", incident_id)

    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"MDR incident {incident_id}, connection main"
    assert "link: none; the connector has not created or found a ticket for this incident" in lines
    [parked] = [line for line in lines if line.startswith(f"  incident {incident_id}: 1 failed attempts since ")]
    assert "priority" in parked
    assert lines[-1].startswith("the time of the incident's last MDR change is not known here")

    code, out, err = await run_cli("--config", str(activated_config), "trace", "--json", "--", incident_id)

    assert code == 0, err
    document = json.loads(out)
    assert document["incident_id"] == incident_id
    assert document["link"] is None
    assert "priority" in document["parked"][0]["reason"]
    assert document["cursor_position"]["position"] == "unknown"

    code, out, err = await run_cli("--config", str(activated_config), "trace", "--live", "--", incident_id)

    assert code == 1
    assert f"  incident {incident_id}: 1 failed attempts since " in out
    assert f"mdr-connector: error: reading the incident from MDR failed: MDR incident {incident_id} is malformed" in err


async def test_trace_cli_live_filters(activated_config: Path, mdr_sim: MdrSimulator) -> None:
    """`trace --live` reads MDR and names the filter that keeps an unlinked incident from a ticket."""
    import yaml

    document = yaml.safe_load(activated_config.read_text(encoding="utf-8"))
    document["connections"][0]["sync"]["filters"] = {"priorities": ["HIGH"]}
    activated_config.write_text(yaml.safe_dump(document), encoding="utf-8")
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID, priority="LOW")

    code, out, err = await run_cli("--config", str(activated_config), "trace", "--live", "--", incident["incident_id"])

    assert code == 0, err
    assert f"in MDR now: status {incident['status']}, update_time {incident['update_time']} (" in out
    assert "the connection's filters skip this incident (priority), so it gets no ticket unless it is linked" in out


# Retention


async def add_ledger_rows(store: Store, incident_id: str) -> None:
    """Give an incident a comment copy, a parked entry and a response decision in the ledger."""
    await store.start_item("main", incident_id, "comment", "mdr_to_ticket", f"{incident_id}-c1")
    await store.finish_item("main", incident_id, "comment", "mdr_to_ticket", f"{incident_id}-c1", "10999")
    await store.park("main", INCIDENT, incident_id, "test: old failure", utc_now() + timedelta(days=10))
    await store.record_decision(
        "main", incident_id, "MDR_r1", "confirm", actor_id="cli:ops", actor_name="ops", source="cli",
        source_id=None, reason="ok", outcome="sent",
    )


async def test_retention_prunes_old_closed_incidents_once_a_day(
    harness: SyncHarness, caplog: pytest.LogCaptureFixture
) -> None:
    """Only incidents closed in MDR, with an old link and a change behind the cursor, lose their rows, once a day."""
    hour_ago = harness.mdr_sim.now_ms() - 3_600_000
    old_closed, old_open, new_closed, later = (
        harness.seed(creation_time=hour_ago, update_time=hour_ago)["incident_id"] for _ in range(4)
    )
    recent_change = harness.seed()["incident_id"]
    await harness.cycles(1)
    everyone = (old_closed, old_open, new_closed, later, recent_change)
    for incident_id in everyone:
        await add_ledger_rows(harness.store, incident_id)
    for incident_id in (old_closed, new_closed, later, recent_change):
        await harness.store.record_statuses("main", incident_id, mdr_status="Closed")
    for incident_id in (old_closed, old_open, recent_change):
        await age_link(harness.store, incident_id, days=40)
    await harness.cycles(1)
    assert await harness.store.get_link("main", old_closed) is not None

    harness.use_sync(retention_days=30)
    with caplog.at_level(logging.INFO, logger="mdr_connector.connector.operations"):
        sync = await harness.cycles(1)

    assert await harness.store.get_link("main", old_closed) is None
    assert await harness.store.list_incident_items("main", old_closed) == []
    assert await harness.store.get_parked("main", INCIDENT, old_closed) is None
    assert await harness.store.list_decisions("main", incident_id=old_closed) == []
    for incident_id in (old_open, new_closed, later, recent_change):
        assert await harness.store.get_link("main", incident_id) is not None
        assert len(await harness.store.list_incident_items("main", incident_id)) == 1
        assert await harness.store.get_parked("main", INCIDENT, incident_id) is not None
        assert len(await harness.store.list_decisions("main", incident_id=incident_id)) == 1
    [record] = [record for record in caplog.records if record.getMessage() == "sync.retention.pruned"]
    assert (record.incidents, record.synced_items, record.parked_items, record.response_decisions) == (1, 1, 1, 1)
    assert await harness.store.get_cursor("main", RETENTION_CURSOR) is not None

    await age_link(harness.store, later, days=40)
    await harness.cycles(1, sync)
    assert await harness.store.get_link("main", later) is not None

    harness.clock_offset += timedelta(days=1, minutes=1)
    await harness.cycles(1, sync)
    assert await harness.store.get_link("main", later) is None
    assert await harness.store.get_link("main", old_closed) is None
    assert await harness.store.get_link("main", recent_change) is not None
    assert len(harness.jira.sim.issues) == 5


async def test_retention_off_by_default(harness: SyncHarness) -> None:
    """Without retention_days nothing is pruned and no retention cursor is written."""
    incident_id = harness.seed()["incident_id"]
    await harness.cycles(1)
    await harness.store.record_statuses("main", incident_id, mdr_status="Closed")
    await age_link(harness.store, incident_id, days=4000)

    await harness.cycles(1)

    assert await harness.store.get_link("main", incident_id) is not None
    assert await harness.store.get_cursor("main", RETENTION_CURSOR) is None
    assert harness.connection.sync.retention_days is None
