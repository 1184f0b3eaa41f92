"""The in-memory TicketAdapter used by engine tests."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from mdr_connector.adapters.memory.adapter import MemoryTicketAdapter
from mdr_connector.connector.errors import InvalidPayloadError, OutcomeUnknownError, RejectedError
from mdr_connector.connector.tickets import (
    MDR_ORIGIN,
    CommentDraft,
    SyncMarker,
    TicketAccount,
    TicketAdapter,
    TicketDraft,
    TicketFields,
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
