"""The throughput shortcuts keep every change: own writes confirmed by a read, own comment texts kept by the Jira adapter.

After a reconciliation writes to a ticket, the ticket change search brings
the ticket back. The engine then reads the ticket once more instead of
reconciling it again, and reconciles in full whenever that read shows
anything besides the reconciliation's own writes. These tests put a
person's change into each gap of that sequence and check that it still
reaches MDR. They run the engine against the MDR and Jira simulators.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from fixtures_jira import RunningJira
from fixtures_mdr import MDR_CLIENT_ID
from fixtures_postgres import LEDGER_BACKENDS
from fixtures_sync import SyncHarness

from mdr_connector.adapters.jira.adapter import MAX_TEXT_LENGTH, JiraTicketAdapter, WrittenTexts
from mdr_connector.connector import markup
from mdr_connector.connector.engine import ConnectionSync
from mdr_connector.connector.sync_common import TicketWatch
from mdr_connector.connector.tickets import (
    MDR_ORIGIN,
    CommentDraft,
    SyncMarker,
    TicketAccount,
    TicketAttachment,
    TicketComment,
    TicketDraft,
    TicketFields,
    TicketState,
)


@pytest.fixture(params=LEDGER_BACKENDS)
def ledger_backend(request: pytest.FixtureRequest) -> str:
    """Every harness test here runs with its ledger on SQLite and again on PostgreSQL."""
    return request.param


COMMENT_LIST = "GET /rest/api/2/issue/{issue}/comment"
PERSON_NOTE = "Person note written while the connector was busy"


def seed_with_comments(harness: SyncHarness, count: int = 2) -> str:
    incident_id = harness.seed()["incident_id"]
    for number in range(count):
        harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, f"<p>SOC note {number}</p>", author="SOC Analyst")
    return incident_id


def mdr_texts(harness: SyncHarness, incident_id: str) -> list[str]:
    return [comment["text"] for comment in harness.mdr_comments(incident_id)]


def person_during_first_copy(harness: SyncHarness, sync: ConnectionSync, monkeypatch: pytest.MonkeyPatch, act: Any) -> None:
    """Run `act(issue_key)` once, right after the connector's first comment lands on the issue."""
    real_add = sync.tickets.add_comment
    done: list[bool] = []

    async def add_then_act(ref: Any, draft: CommentDraft) -> TicketComment:
        posted = await real_add(ref, draft)
        if not done:
            done.append(True)
            act(ref.key)
        return posted

    monkeypatch.setattr(sync.tickets, "add_comment", add_then_act)


# The engine: a ticket change made of own writes only


async def test_own_writes_need_no_reconciliation(harness: SyncHarness) -> None:
    """The ticket change of a first sync is confirmed by one read, and the next cycle finds nothing to do."""
    incident_id = seed_with_comments(harness)
    sync = await harness.cycles(1)
    issue = harness.issue_for(incident_id)
    link = await harness.store.get_link("main", incident_id)

    assert sync.stats.own_writes_confirmed == 1
    assert harness.mdr_sim.call_counts["incidents/details"] == 0
    # The issue was created in this cycle, so only the check reads its comments.
    assert harness.jira.sim.calls[COMMENT_LIST] == 1
    assert link.ticket_updated == issue.updated
    assert len(issue.comments) == 2

    await harness.cycles(1, sync)

    assert harness.jira.sim.calls[COMMENT_LIST] == 1
    assert sync.stats.own_writes_confirmed == 1


async def test_restart_reconciles_own_writes(harness: SyncHarness) -> None:
    """A process that did not make the writes keeps no record of them, so it reconciles their ticket change in full."""
    incident_id = seed_with_comments(harness)
    sync = await harness.engine()
    await sync.open()
    await sync.sync_mdr_changes()
    # The Jira search shows a change to a process that did not write it only after the search delay.
    harness.advance(31)

    restarted = await harness.cycles(1)

    assert restarted.stats.own_writes_confirmed == 0
    assert harness.mdr_sim.call_counts["incidents/details"] == 1
    assert len(harness.issue_for(incident_id).comments) == 2


# The engine: a person's change in each gap


@pytest.mark.parametrize("gap", ["after the create", "between own writes"])
async def test_person_comment_in_gap(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch, gap: str) -> None:
    """A comment a person adds right after the create, or between the connector's writes, reaches MDR in the same cycle, once."""
    incident_id = seed_with_comments(harness)
    sync = await harness.engine()
    hook = person_after_create if gap == "after the create" else person_during_first_copy
    hook(harness, sync, monkeypatch, lambda key: harness.jira.sim.add_comment(key, PERSON_NOTE))

    await harness.cycles(1, sync)

    assert sync.stats.own_writes_confirmed == 0
    assert sum(PERSON_NOTE in text for text in mdr_texts(harness, incident_id)) == 1
    assert len(harness.issue_for(incident_id).comments) == 3
    await harness.cycles(2, sync)
    assert sum(PERSON_NOTE in text for text in mdr_texts(harness, incident_id)) == 1


async def test_person_comment_before_change_search(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A comment a person adds after the connector's last write, before the change search, reaches MDR in the same cycle."""
    incident_id = seed_with_comments(harness)
    sync = await harness.engine()
    real_search = sync.sync_ticket_changes

    async def person_then_search() -> None:
        harness.jira.sim.add_comment(harness.issue_for(incident_id).key, PERSON_NOTE)
        await real_search()

    monkeypatch.setattr(sync, "sync_ticket_changes", person_then_search)
    await harness.cycles(1, sync)

    assert sync.stats.own_writes_confirmed == 0
    assert sum(PERSON_NOTE in text for text in mdr_texts(harness, incident_id)) == 1


async def test_person_edit_between_own_writes(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """An edit of a copied person comment made during the connector's writes is noted in MDR in the same cycle."""
    incident_id = seed_with_comments(harness, count=0)
    sync = await harness.cycles(1)
    issue = harness.issue_for(incident_id)
    person = harness.jira.sim.add_comment(issue.key, "First words")
    harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>SOC reply</p>", author="SOC Analyst")
    harness.advance(1)
    await harness.cycles(1, sync)
    assert sum("First words" in text for text in mdr_texts(harness, incident_id)) == 1

    harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>Another SOC reply</p>", author="SOC Analyst")
    harness.advance(1)
    person_during_first_copy(
        harness, sync, monkeypatch, lambda key: harness.jira.sim.edit_comment(person.id, "Second words")
    )
    confirmed = sync.stats.own_writes_confirmed
    await harness.cycles(1, sync)

    assert sync.stats.own_writes_confirmed == confirmed
    assert sum("Second words" in text for text in mdr_texts(harness, incident_id)) == 1


async def test_person_attachment_after_read(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file a person attaches after the connector read the attachments of an existing issue reaches MDR in the same cycle."""
    incident_id = seed_with_comments(harness)
    sync = await harness.cycles(1)
    harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>A later SOC note</p>", author="SOC Analyst")
    harness.advance(1)
    confirmed = sync.stats.own_writes_confirmed
    real_list = sync.tickets.list_attachments

    async def list_then_attach(ref: Any) -> list[TicketAttachment]:
        listed = await real_list(ref)
        monkeypatch.setattr(sync.tickets, "list_attachments", real_list)
        harness.jira.sim.add_attachment(ref.key, "evidence.txt", b"found it")
        return listed

    monkeypatch.setattr(sync.tickets, "list_attachments", list_then_attach)
    await harness.cycles(1, sync)

    assert sync.stats.own_writes_confirmed == confirmed
    names = [attachment["full_name"] for attachment in harness.mdr_sim.attachments(MDR_CLIENT_ID, incident_id)]
    assert names == ["evidence.txt"]


def person_after_create(harness: SyncHarness, sync: ConnectionSync, monkeypatch: pytest.MonkeyPatch, act: Any) -> None:
    """Run `act(issue_key)` right after the connector creates the issue, which it then does not read back."""
    real_create = sync.tickets.create_ticket

    async def create_then_act(draft: TicketDraft) -> Any:
        ref = await real_create(draft)
        act(ref.key)
        return ref

    monkeypatch.setattr(sync.tickets, "create_ticket", create_then_act)


async def test_person_attachment_after_create(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file attached to a new issue before the connector's first write there reaches MDR in the same cycle."""
    incident_id = seed_with_comments(harness)
    sync = await harness.engine()
    person_after_create(
        harness, sync, monkeypatch, lambda key: harness.jira.sim.add_attachment(key, "evidence.txt", b"found it")
    )

    await harness.cycles(1, sync)

    assert sync.stats.own_writes_confirmed == 0
    names = [attachment["full_name"] for attachment in harness.mdr_sim.attachments(MDR_CLIENT_ID, incident_id)]
    assert names == ["evidence.txt"]


async def test_person_deletes_own_copy_between_writes(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy that a person deletes during the connector's writes fails the check, so the change is reconciled in full."""
    incident_id = seed_with_comments(harness)
    sync = await harness.engine()

    def delete_first_copy(key: str) -> None:
        [first] = harness.jira.sim.issue(key).comments
        harness.jira.sim.delete_comment(first.id)

    person_during_first_copy(harness, sync, monkeypatch, delete_first_copy)
    await harness.cycles(1, sync)

    assert sync.stats.own_writes_confirmed == 0
    assert harness.mdr_sim.call_counts["incidents/details"] == 1


# The watch: what counts as a change by someone else


def account(account_id: str) -> TicketAccount:
    return TicketAccount(id=account_id, display_name=account_id)


def ticket_comment(comment_id: str, body: str = "text", *, author: str = "person", **changes: Any) -> TicketComment:
    created = datetime(2026, 12, 1, tzinfo=timezone.utc) + timedelta(minutes=int(comment_id))
    comment = TicketComment(id=comment_id, author=account(author), created=created, body=body, updated=created)
    return replace(comment, **changes)


def own_comment(comment_id: str) -> TicketComment:
    return ticket_comment(comment_id, "copy", author="connector", marker=SyncMarker(MDR_ORIGIN, f"c-{comment_id}"))


def attachment(attachment_id: str) -> TicketAttachment:
    created = datetime(2026, 12, 1, tzinfo=timezone.utc)
    return TicketAttachment(id=attachment_id, filename=f"{attachment_id}.txt", size=3, author=account("person"), created=created)


def state(status: str = "In Progress", **values: Any) -> TicketState:
    return TicketState(status=status, status_category="indeterminate", updated=datetime.now(timezone.utc), values=values)


def watch_of(*first_read: TicketComment, written: tuple[TicketComment, ...] = ()) -> TicketWatch:
    watch = TicketWatch("incident-1", ticket_id="10001", wrote=True)
    watch.saw_comments(list(first_read))
    for comment in written:
        watch.written_comments[comment.id] = comment
    return watch


def test_watch_accepts_own_writes() -> None:
    """The first read plus the connector's own new comment is no change by anyone else."""
    watch = watch_of(ticket_comment("1"), written=(own_comment("2"),))

    assert watch.shows_only_own_writes([ticket_comment("1"), own_comment("2")], None, None)


def test_watch_ignores_text_of_own_writes() -> None:
    """The text of the connector's comment is not compared, because its write returns the draft's Markdown."""
    watch = watch_of(written=(own_comment("2"),))

    assert watch.shows_only_own_writes([replace(own_comment("2"), body="converted back")], None, None)


@pytest.mark.parametrize(
    "current",
    [
        pytest.param([ticket_comment("1"), own_comment("2"), ticket_comment("3")], id="comment-added"),
        pytest.param([own_comment("2")], id="comment-deleted"),
        pytest.param([ticket_comment("1")], id="own-comment-deleted"),
        pytest.param([ticket_comment("1", "new text"), own_comment("2")], id="text-edited"),
        pytest.param(
            [ticket_comment("1", updated=datetime(2026, 12, 2, tzinfo=timezone.utc)), own_comment("2")], id="edit-time"
        ),
        pytest.param([ticket_comment("1", restricted=True), own_comment("2")], id="restricted"),
        pytest.param(
            [ticket_comment("1"), replace(own_comment("2"), updated=datetime(2026, 12, 2, tzinfo=timezone.utc))],
            id="own-comment-edited",
        ),
    ],
)
def test_watch_sees_other_changes(current: list[TicketComment]) -> None:
    """Any comment added, deleted, edited or restricted by someone else fails the check."""
    watch = watch_of(ticket_comment("1"), written=(own_comment("2"),))

    assert not watch.shows_only_own_writes(current, None, None)


def test_watch_checks_read_attachments() -> None:
    """Attachments that the reconciliation read must be as read plus its uploads."""
    watch = watch_of()
    watch.saw_attachments([attachment("1")])
    watch.written_attachments["2"] = attachment("2")

    assert watch.shows_only_own_writes([], [attachment("1"), attachment("2")], None)
    assert not watch.shows_only_own_writes([], [attachment("1"), attachment("2"), attachment("3")], None)
    assert not watch.shows_only_own_writes([], [attachment("2")], None)
    assert not watch.shows_only_own_writes([], None, None)


def test_watch_checks_read_state() -> None:
    """A state that the reconciliation read must be unchanged; a transition of its own makes the ticket unpredictable."""
    watch = watch_of()
    watch.saw_state(state(resolution=None), ("resolution",))

    assert watch.shows_only_own_writes([], None, state(resolution=None))
    assert not watch.shows_only_own_writes([], None, state("Done", resolution=None))
    assert not watch.shows_only_own_writes([], None, state(resolution="Fixed"))

    watch.unpredictable = True
    assert not watch.shows_only_own_writes([], None, state(resolution=None))


def test_watch_without_comment_read_fails() -> None:
    """A watch whose reconciliation never read the comments proves nothing."""
    watch = TicketWatch("incident-1", ticket_id="10001", wrote=True)

    assert not watch.shows_only_own_writes([], None, None)


# The Jira adapter: texts it wrote are not converted again


def ticket_draft() -> TicketDraft:
    fields = TicketFields(summary="[MDR-7] Suspicious PowerShell", description="Host ran a command.", priority="High", labels=())
    return TicketDraft(incident_id="incident-1", project="SEC", issue_type="Task", fields=fields)


def count_pandoc(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    runs: list[str] = []
    real = markup._run_pandoc

    def counting(text: str, reader: str, writer: str, deadline: float) -> str:
        runs.append(reader)
        return real(text, reader, writer, deadline)

    monkeypatch.setattr(markup, "_run_pandoc", counting)
    return runs


async def test_own_comment_read_without_pandoc(cloud_adapter: JiraTicketAdapter, monkeypatch: pytest.MonkeyPatch) -> None:
    """The connector's own comment reads back as the Markdown it was written from, with no conversion."""
    ref = await cloud_adapter.create_ticket(ticket_draft())
    body = "Host **ws-07** isolated at 10:15 😀"
    await cloud_adapter.add_comment(ref, CommentDraft(body=body, marker=SyncMarker(MDR_ORIGIN, "c-1")))
    runs = count_pandoc(monkeypatch)

    [listed] = await cloud_adapter.list_comments(ref)

    assert listed.body == body
    assert runs == []


async def test_person_copy_of_own_text_converted(
    jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A person's comment with the same wiki text as the connector's is converted by pandoc, never taken from the written texts."""
    ref = await cloud_adapter.create_ticket(ticket_draft())
    body = "Check `C:\\\\Temp` and <b>this</b> 🙂"
    await cloud_adapter.add_comment(ref, CommentDraft(body=body, marker=SyncMarker(MDR_ORIGIN, "c-1")))
    [own] = jira_cloud.sim.issue(ref.key).comments
    jira_cloud.sim.add_comment(ref.key, own.body)
    markup._convert_cached.cache_clear()
    runs = count_pandoc(monkeypatch)

    own_listed, person_listed = await cloud_adapter.list_comments(ref)

    assert own_listed.body == body
    assert person_listed.body == markup.jira_to_markdown(own.body)
    assert runs[0] == "jira"


async def test_marker_from_person_converted(jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter) -> None:
    """A person's comment that carries the connector's marker is still converted, because only the connector's account counts."""
    ref = await cloud_adapter.create_ticket(ticket_draft())
    await cloud_adapter.add_comment(ref, CommentDraft(body="Original **text**", marker=SyncMarker(MDR_ORIGIN, "c-1")))
    [own] = jira_cloud.sim.issue(ref.key).comments
    marker = {"key": "mdr-connector", "value": {"origin": MDR_ORIGIN, "source_id": "c-2"}}
    jira_cloud.sim.add_comment(ref.key, own.body + " ", properties=[marker])

    _, forged = await cloud_adapter.list_comments(ref)

    assert forged.marker == SyncMarker(MDR_ORIGIN, "c-2")
    assert forged.body == markup.jira_to_markdown(own.body + " ")


async def test_cut_text_not_kept(cloud_adapter: JiraTicketAdapter, monkeypatch: pytest.MonkeyPatch) -> None:
    """A text cut to Jira's limit reads back as what Jira stored, not as the longer Markdown it came from."""
    ref = await cloud_adapter.create_ticket(ticket_draft())
    body = "word " * (MAX_TEXT_LENGTH // 4)
    await cloud_adapter.add_comment(ref, CommentDraft(body=body, marker=SyncMarker(MDR_ORIGIN, "c-1")))
    runs = count_pandoc(monkeypatch)
    markup._convert_cached.cache_clear()

    [listed] = await cloud_adapter.list_comments(ref)

    assert listed.body != body
    assert "truncated by mdr-connector" in listed.body
    assert runs != []


def test_written_texts_forget_oldest() -> None:
    """The written texts stay within their character budget by forgetting the least recently used."""
    texts = WrittenTexts(max_characters=20)
    texts.remember("aaaa", "AAAA")
    texts.remember("bbbb", "BBBB")
    assert texts.get("aaaa") == "AAAA"

    texts.remember("cccc", "CCCC")

    assert texts.get("bbbb") is None
    assert texts.get("aaaa") == "AAAA"
    assert texts.get("cccc") == "CCCC"
    texts.remember("x" * 15, "y" * 15)
    assert texts.get("x" * 15) is None
