"""The in-memory TicketAdapter used by engine tests."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from mdr_connector.adapters.memory.adapter import DEFAULT_HUMAN, MemoryProject, MemoryTicketAdapter
from mdr_connector.connector.errors import ConfigError, InvalidPayloadError, OutcomeUnknownError, RejectedError
from mdr_connector.connector.tickets import (
    MDR_ORIGIN,
    AttachmentUpload,
    CommentDraft,
    CommentVisibility,
    SyncMarker,
    TicketAccount,
    TicketAdapter,
    TicketDraft,
    TicketFields,
    TicketQuery,
    TicketRef,
)

START = datetime(2026, 12, 4, 10, 0, tzinfo=timezone.utc)


def draft(incident_id: str = "2NJMGXkBNGNeZ5iut24S") -> TicketDraft:
    fields = TicketFields(summary="Incident", description="text", priority="High", labels=("mdr high",))
    return TicketDraft(incident_id, "SEC", "Task", fields, {"incident_number": 3})


def marker(source_id: str) -> SyncMarker:
    return SyncMarker(MDR_ORIGIN, source_id)


@pytest.fixture
def adapter() -> MemoryTicketAdapter:
    """A memory adapter on a fixed clock, no search delay."""
    return MemoryTicketAdapter(clock=lambda: START)


async def test_is_ticket_adapter(adapter: MemoryTicketAdapter) -> None:
    """The fake satisfies the TicketAdapter protocol and returns its configured account."""
    custom = MemoryTicketAdapter(account=TicketAccount("svc", "Service"))

    assert isinstance(adapter, TicketAdapter)
    assert await custom.open() == TicketAccount("svc", "Service")


async def test_create_marks_ticket(adapter: MemoryTicketAdapter) -> None:
    """A created ticket has both labels, cleaned mapping labels and the incident id."""
    ref = await adapter.create_ticket(draft())
    ticket = adapter.ticket(ref.key)

    assert ticket.fields.labels == ("mdr-connector", "mdr-2NJMGXkBNGNeZ5iut24S", "mdr_high")
    assert ticket.metadata == {"incident_number": 3, "incident_id": "2NJMGXkBNGNeZ5iut24S"}
    assert adapter.writes["create_ticket"] == 1


async def test_find_after_delay() -> None:
    """find_ticket finds a ticket only after the search delay."""
    adapter = MemoryTicketAdapter(search_delay_seconds=60, clock=lambda: START)
    ref = await adapter.create_ticket(draft())

    assert await adapter.find_ticket("2NJMGXkBNGNeZ5iut24S") is None
    adapter.advance(60)
    assert await adapter.find_ticket("2NJMGXkBNGNeZ5iut24S") == ref


async def test_find_exact_id(adapter: MemoryTicketAdapter) -> None:
    """Incident ids match exactly, case included."""
    ref = await adapter.create_ticket(draft("AbC"))

    assert await adapter.find_ticket("abc") is None
    assert await adapter.find_ticket("AbC") == ref


async def test_invalid_incident_id(adapter: MemoryTicketAdapter) -> None:
    """An id that cannot be a label is rejected, as by the Jira adapter."""
    with pytest.raises(InvalidPayloadError):
        await adapter.create_ticket(draft("bad id"))


async def test_comment_markers(adapter: MemoryTicketAdapter) -> None:
    """The connector's comments carry their marker and account; a person's do not."""
    ref = await adapter.create_ticket(draft())
    adapter.advance(1)
    mine = await adapter.add_comment(ref, CommentDraft("from MDR", marker("c-1")))
    adapter.advance(1)
    human = adapter.add_human_comment(ref.key, "from SOC")

    listed = await adapter.list_comments(ref)

    assert listed == [mine, human]
    assert mine.marker == marker("c-1")
    assert mine.author == adapter.account
    assert human.marker is None
    assert human.author.id == "analyst"
    assert adapter.writes["add_comment"] == 1


async def test_update_adds_labels(adapter: MemoryTicketAdapter) -> None:
    """update_ticket keeps existing labels, like the Jira adapter."""
    ref = await adapter.create_ticket(draft())
    adapter.edit_ticket(ref.key, labels=[*adapter.ticket(ref.key).fields.labels, "triaged"])

    await adapter.update_ticket(ref, TicketFields("New", "d", None, ("closed",)))

    assert adapter.ticket(ref.key).fields.labels[-2:] == ("triaged", "closed")
    assert adapter.ticket(ref.key).fields.summary == "New"
    assert adapter.writes["update_ticket"] == 1


async def test_changed_tickets(adapter: MemoryTicketAdapter) -> None:
    """Tickets changed at or after `since` are returned, oldest first."""
    quiet = await adapter.create_ticket(draft("quiet"))
    busy = await adapter.create_ticket(draft("busy"))
    adapter.advance(600)
    adapter.add_human_comment(busy.key, "update")

    changes = await adapter.changed_tickets(START + timedelta(seconds=300))

    assert [change.ref for change in changes] == [busy]
    assert quiet not in [change.ref for change in changes]
    assert changes[0].updated == START + timedelta(seconds=600)


async def test_changes_hidden_during_delay() -> None:
    """A change is invisible to changed_tickets until the delay passes."""
    adapter = MemoryTicketAdapter(search_delay_seconds=30, clock=lambda: START)
    ref = await adapter.create_ticket(draft())
    adapter.advance(30)
    adapter.add_human_comment(ref.key, "late")
    since = adapter.now()

    assert await adapter.changed_tickets(since) == []
    adapter.advance(30)
    assert [change.ref for change in await adapter.changed_tickets(since)] == [ref]


async def test_write_then_fail(adapter: MemoryTicketAdapter) -> None:
    """An injected failure after the write leaves the ticket in place for the marker lookup."""
    adapter.fail_next("create_ticket", OutcomeUnknownError("reply lost"), after_write=True)

    with pytest.raises(OutcomeUnknownError):
        await adapter.create_ticket(draft())

    assert len(adapter.tickets) == 1
    assert await adapter.find_ticket("2NJMGXkBNGNeZ5iut24S") is not None


async def test_fail_before_write(adapter: MemoryTicketAdapter) -> None:
    """An injected failure before the write leaves nothing behind and is used once."""
    adapter.fail_next("create_ticket", OutcomeUnknownError("refused"))

    with pytest.raises(OutcomeUnknownError):
        await adapter.create_ticket(draft())
    await adapter.create_ticket(draft())

    assert list(adapter.tickets) == ["SEC-1"]
    assert adapter.writes["create_ticket"] == 1


async def test_unknown_ticket(adapter: MemoryTicketAdapter) -> None:
    """A reference to a missing ticket is RejectedError 404."""
    with pytest.raises(RejectedError) as caught:
        await adapter.list_comments(TicketRef("SEC-9", "10009", "memory://tickets/SEC-9"))

    assert caught.value.status == 404


# Projects, components and field ownership


def strict() -> MemoryTicketAdapter:
    """A fake with configured projects and priorities, like the Jira simulator's defaults."""
    projects = {
        "SEC": MemoryProject(("Task", "Incident"), ("Endpoint", "Network")),
        "OPS": MemoryProject(("Task",), ("Servers",)),
    }
    return MemoryTicketAdapter(clock=lambda: START, projects=projects, priorities=("High", "Medium", "Low"))


async def test_check_configured() -> None:
    """With projects and priorities configured, check names what is missing, per project."""
    adapter = strict()

    assert await adapter.check("Incident", ["High"]) == []
    assert await adapter.check("Incident", ["Urgent"], project="OPS") == [
        "issue type 'Incident' is not available in project OPS; available: Task",
        "priority 'Urgent' does not exist; available: High, Medium, Low",
    ]
    assert await adapter.check("Task", [], project="NOPE") == [
        "project 'NOPE' does not exist or the connector's account cannot see it"
    ]


async def test_check_permissive(adapter: MemoryTicketAdapter) -> None:
    """Without configuration any project, issue type and priority passes."""
    assert await adapter.check("Anything", ["Whatever"], project="ANY") == []


async def test_create_rejects_unknown_component() -> None:
    """An unknown component is RejectedError 400 naming it, and nothing is created."""
    adapter = strict()
    fields = TicketFields("x", "y", "High", (), components=("Mainframe",))

    with pytest.raises(RejectedError) as caught:
        await adapter.create_ticket(TicketDraft("inc", "SEC", "Task", fields))

    assert caught.value.status == 400
    assert "Component name 'Mainframe' is not valid" in str(caught.value)
    assert adapter.tickets == {}


async def test_routed_project_found() -> None:
    """A ticket in another project is found and reported as changed, like in Jira."""
    adapter = strict()
    fields = TicketFields("x", "y", "High", (), components=("Servers",))

    ref = await adapter.create_ticket(TicketDraft("routed", "OPS", "Task", fields))

    assert ref.key == "OPS-1"
    assert await adapter.find_ticket("routed") == ref
    assert [change.ref for change in await adapter.changed_tickets(START)] == [ref]


async def test_update_skip(adapter: MemoryTicketAdapter) -> None:
    """Skipped fields keep a person's values, components are only added, and extra fields merge."""
    ref = await adapter.create_ticket(
        TicketDraft("inc", "SEC", "Task", TicketFields("t", "d", "High", (), {"cf_1": "a", "cf_2": "b"}, ("Endpoint",)))
    )
    adapter.edit_ticket(ref.key, priority="Low", summary="Analyst title")

    fields = TicketFields("MDR title", "new", "High", (), {"cf_1": "z"}, ("Network",))
    await adapter.update_ticket(ref, fields, skip=frozenset({"priority", "summary"}))
    stored = adapter.ticket(ref.key).fields

    assert stored.priority == "Low"
    assert stored.summary == "Analyst title"
    assert stored.description == "new"
    assert stored.components == ("Endpoint", "Network")
    assert stored.extra == {"cf_1": "z", "cf_2": "b"}


async def test_update_skip_extra(adapter: MemoryTicketAdapter) -> None:
    """A skipped extra field keeps its value."""
    ref = await adapter.create_ticket(TicketDraft("inc", "SEC", "Task", TicketFields("t", "d", None, (), {"cf_1": "a"})))

    await adapter.update_ticket(ref, TicketFields("t", "d", None, (), {"cf_1": "b"}), skip=frozenset({"cf_1"}))

    assert adapter.ticket(ref.key).fields.extra == {"cf_1": "a"}


# Comments


async def test_restricted_comments(adapter: MemoryTicketAdapter) -> None:
    """A visibility or a service desk internal note makes a comment restricted, as in Jira."""
    ref = await adapter.create_ticket(draft())
    posted = await adapter.add_comment(ref, CommentDraft("x", marker("c-1"), CommentVisibility("role", "Admins")))
    internal = adapter.add_human_comment(ref.key, "agents only", internal=True)
    grouped = adapter.add_human_comment(ref.key, "team", visibility=CommentVisibility("group", "soc"))
    public = adapter.add_human_comment(ref.key, "everyone")

    assert [posted.restricted, internal.restricted, grouped.restricted, public.restricted] == [True, True, True, False]


async def test_edit_comment(adapter: MemoryTicketAdapter) -> None:
    """edit_comment replaces the connector's comment body, keeps its marker and moves `updated`."""
    ref = await adapter.create_ticket(draft())
    added = await adapter.add_comment(ref, CommentDraft("old", marker("r-1")))
    adapter.advance(30)

    edited = await adapter.edit_comment(ref, added.id, CommentDraft("new", marker("r-1")))
    (listed,) = await adapter.list_comments(ref)

    assert listed == edited
    assert listed.body == "new"
    assert listed.marker == marker("r-1")
    assert listed.updated == START + timedelta(seconds=30)
    assert listed.created == added.created
    assert adapter.writes["edit_comment"] == 1


async def test_edit_others_comment(adapter: MemoryTicketAdapter) -> None:
    """Only the author may edit a comment, as in Jira: RejectedError 403."""
    ref = await adapter.create_ticket(draft())
    human = adapter.add_human_comment(ref.key, "mine")

    with pytest.raises(RejectedError) as caught:
        await adapter.edit_comment(ref, human.id, CommentDraft("x", marker("r-1")))

    assert caught.value.status == 403


async def test_human_edit_and_delete(adapter: MemoryTicketAdapter) -> None:
    """A person's edit moves the comment's `updated`, a delete removes it, and both move the ticket."""
    ref = await adapter.create_ticket(draft())
    first = adapter.add_human_comment(ref.key, "one")
    second = adapter.add_human_comment(ref.key, "two")
    adapter.advance(60)

    edited = adapter.edit_human_comment(ref.key, first.id, "one, edited")
    adapter.delete_human_comment(ref.key, second.id)

    assert [comment.body for comment in await adapter.list_comments(ref)] == ["one, edited"]
    assert edited.updated == START + timedelta(seconds=60)
    assert adapter.ticket(ref.key).updated == START + timedelta(seconds=60)


# Attachments


def spool(folder: Path, name: str, data: bytes) -> AttachmentUpload:
    path = folder / f"spool-{len(list(folder.iterdir()))}"
    path.write_bytes(data)
    return AttachmentUpload(name, path, len(data))


async def test_attachment_round_trip(adapter: MemoryTicketAdapter, tmp_path: Path) -> None:
    """An uploaded file is listed with the connector as author and downloads byte for byte."""
    ref = await adapter.create_ticket(draft())
    uploaded = await adapter.upload_attachment(ref, spool(tmp_path, "Отчёт 😀.txt", b"report"))
    human = adapter.add_human_attachment(ref.key, "trace.pcap", b"\x00" * 10)

    listed = await adapter.list_attachments(ref)
    written = await adapter.download_attachment(human, tmp_path / "trace.pcap")

    assert listed == [uploaded, human]
    assert uploaded.filename == "Отчёт 😀.txt"
    assert uploaded.author == adapter.account
    assert human.author == DEFAULT_HUMAN
    assert written == 10
    assert (tmp_path / "trace.pcap").read_bytes() == b"\x00" * 10
    assert not [path for path in tmp_path.iterdir() if path.name.endswith(".part")]


async def test_attachment_limit(tmp_path: Path) -> None:
    """Above the limit an upload is RejectedError 413, and with attachments off the limit is None."""
    limited = MemoryTicketAdapter(clock=lambda: START, upload_limit=5)
    disabled = MemoryTicketAdapter(clock=lambda: START, upload_limit=None)
    ref = await limited.create_ticket(draft())
    other = await disabled.create_ticket(draft())

    with pytest.raises(RejectedError) as too_large:
        await limited.upload_attachment(ref, spool(tmp_path, "a.bin", b"123456"))
    with pytest.raises(RejectedError) as off:
        await disabled.upload_attachment(other, spool(tmp_path, "a.bin", b"1"))

    assert too_large.value.status == 413
    assert off.value.status == 403
    assert await limited.attachment_limit() == 5
    assert await disabled.attachment_limit() is None
    assert await limited.list_attachments(ref) == []


async def test_upload_lost_reply(adapter: MemoryTicketAdapter, tmp_path: Path) -> None:
    """A failure after the write leaves the file for the lookup by name and size."""
    ref = await adapter.create_ticket(draft())
    adapter.fail_next("upload_attachment", OutcomeUnknownError("reply lost"), after_write=True)

    with pytest.raises(OutcomeUnknownError):
        await adapter.upload_attachment(ref, spool(tmp_path, "a.txt", b"abc"))

    assert [(item.filename, item.size) for item in await adapter.list_attachments(ref)] == [("a.txt", 3)]


async def test_download_failure_leaves_nothing(adapter: MemoryTicketAdapter, tmp_path: Path) -> None:
    """An injected download failure writes no file."""
    ref = await adapter.create_ticket(draft())
    human = adapter.add_human_attachment(ref.key, "a.txt", b"abc")
    adapter.fail_next("download_attachment", OutcomeUnknownError("cut off"))

    with pytest.raises(OutcomeUnknownError):
        await adapter.download_attachment(human, tmp_path / "a.txt")

    assert list(tmp_path.iterdir()) == []


# Workflow


async def test_state_and_transitions(adapter: MemoryTicketAdapter) -> None:
    """A ticket starts in To Do, transition_to moves it, Done sets the resolution, and a repeat writes nothing."""
    ref = await adapter.create_ticket(draft())
    start = await adapter.get_state(ref, ["resolution", "priority"])
    adapter.advance(5)

    await adapter.transition_to(ref, "done")
    await adapter.transition_to(ref, "Done")
    done = await adapter.get_state(ref, ["resolution"])

    assert (start.status, start.status_category, start.values) == ("To Do", "new", {"resolution": None, "priority": "High"})
    assert (done.status, done.status_category, done.values) == ("Done", "done", {"resolution": "Done"})
    assert done.updated == START + timedelta(seconds=5)
    assert adapter.writes["transition_to"] == 1


async def test_no_path(adapter: MemoryTicketAdapter) -> None:
    """Without a transition, RejectedError names the statuses that can be reached."""
    ref = await adapter.create_ticket(draft())
    adapter.transition_as_human(ref.key, "Done", resolution="Won't Do")

    with pytest.raises(RejectedError, match="reachable from 'Done': To Do"):
        await adapter.transition_to(ref, "In Progress")

    assert (await adapter.get_state(ref, ["resolution"])).values == {"resolution": "Won't Do"}


async def test_transition_lost_reply(adapter: MemoryTicketAdapter) -> None:
    """A transition whose reply is lost has landed, so the retry needs no write."""
    ref = await adapter.create_ticket(draft())
    adapter.fail_next("transition_to", OutcomeUnknownError("reply lost"), after_write=True)

    with pytest.raises(OutcomeUnknownError):
        await adapter.transition_to(ref, "On Hold")
    await adapter.transition_to(ref, "On Hold")

    assert adapter.ticket(ref.key).status == "On Hold"
    assert adapter.writes["transition_to"] == 1


# Tickets that ask for an MDR incident, correlation, groups


async def test_find_tickets() -> None:
    """Tickets with the label and issue type created since the bound are found once indexed, oldest first."""
    adapter = MemoryTicketAdapter(clock=lambda: START, search_delay_seconds=30)
    adapter.add_human_ticket(summary="old", labels=["mdr-create"])
    adapter.advance(60)
    since = adapter.now()
    first = adapter.add_human_ticket(summary="one", labels=["MDR-Create"], issue_type="Incident")
    second = adapter.add_human_ticket(summary="two", labels=["mdr-create"])
    adapter.add_human_ticket(summary="three")

    hidden = await adapter.find_tickets(TicketQuery("SEC", label="mdr-create"), since)
    adapter.advance(30)
    by_label = await adapter.find_tickets(TicketQuery("SEC", label="mdr-create"), since)
    by_type = await adapter.find_tickets(TicketQuery("SEC", issue_type="incident"), since)

    assert hidden == []
    assert by_label == [first, second]
    assert by_type == [first]


async def test_find_tickets_needs_filter(adapter: MemoryTicketAdapter) -> None:
    """A query without label and issue type is a ConfigError."""
    with pytest.raises(ConfigError):
        await adapter.find_tickets(TicketQuery("SEC"), START)


async def test_set_correlation() -> None:
    """A person's ticket gets the connector's labels and is found after the search delay."""
    adapter = MemoryTicketAdapter(clock=lambda: START, search_delay_seconds=30)
    ref = adapter.add_human_ticket(summary="please", labels=["mdr-create"])

    await adapter.set_correlation(ref, "new-incident")
    hidden = await adapter.find_ticket("new-incident")
    adapter.advance(30)

    assert hidden is None
    assert await adapter.find_ticket("new-incident") == ref
    assert adapter.ticket(ref.key).fields.labels == ("mdr-create", "mdr-connector", "mdr-new-incident")


async def test_set_correlation_conflict(adapter: MemoryTicketAdapter) -> None:
    """A ticket of another incident is RejectedError and keeps its incident."""
    ref = await adapter.create_ticket(draft("first"))

    with pytest.raises(RejectedError, match="already linked to MDR incident first"):
        await adapter.set_correlation(ref, "second")

    assert adapter.ticket(ref.key).incident_id == "first"


async def test_account_groups() -> None:
    """Groups are configured per account id, and an unknown account has none."""
    adapter = MemoryTicketAdapter(groups={"analyst": ["soc-analysts"]})

    assert await adapter.account_groups("analyst") == {"soc-analysts"}
    assert await adapter.account_groups("nobody") == set()


async def test_get_ticket_by_id() -> None:
    """The memory fake finds a ticket by its numeric id as well as by key."""
    adapter = MemoryTicketAdapter()
    ref = adapter.add_human_ticket(summary="A person's ticket")

    assert await adapter.get_ticket(ref.id) == ref
    assert await adapter.get_ticket("999999") is None
