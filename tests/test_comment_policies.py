"""Comment policies: which ticket comments go to MDR, the visibility of posted comments, edits and deletions.

The first part drives CommentSync directly with the memory ticket adapter
and an in-memory MDR. The second part runs the engine end to end against
the MDR and Jira simulators over HTTP on loopback.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from fixtures_mdr import MDR_CLIENT_ID, MDR_CONNECTION_NAME
from fixtures_sync import SyncHarness

from mdr_connector.adapters.mdr.client import CommentPage, MalformedRecord
from mdr_connector.adapters.mdr.models import Comment, Incident
from mdr_connector.adapters.memory.adapter import MemoryTicketAdapter
from mdr_connector.connector.comments import COMMENT, COMMENT_CHANGE, CommentSync, comment_version
from mdr_connector.connector.config import ConnectionSettings, JiraBasicAuth, JiraSettings, MdrSettings, SecretRef
from mdr_connector.connector.errors import ItemError, OutcomeUnknownError, RejectedError
from mdr_connector.connector.mapping import comment_visibility, parse_mdr_footer, strip_comment_marker
from mdr_connector.connector.mappingfile import CommentFormat, load_mapping
from mdr_connector.connector.store import DONE, MDR_TO_TICKET, TICKET_TO_MDR, Store
from mdr_connector.connector.sync_common import SyncStats
from mdr_connector.connector.tickets import (
    NOTICE_ORIGIN,
    TicketCapabilities,
    CommentDraft,
    CommentVisibility,
    TicketAccount,
    TicketComment,
    TicketDraft,
    TicketFields,
    TicketRef,
)

START = datetime(2026, 12, 4, 10, 0, tzinfo=timezone.utc)
INCIDENT_ID = "2NJMGXkBNGNeZ5iut24S"
CONNECTION_NAME = "SOC Jira sync"
ENGINEER = TicketAccount(id="engineer", display_name="Jira Engineer")


# Helpers for the part with fakes


class FakeMdr:
    """The comment calls of MdrApi on one in-memory incident, counting each write."""

    def __init__(self, connection_name: str = CONNECTION_NAME) -> None:
        self.connection_name = connection_name
        self.comments: list[Comment] = []
        self.malformed: list[MalformedRecord] = []
        self.writes: Counter[str] = Counter()
        self.hide_once: set[str] = set()
        self.fail_after_create: OutcomeUnknownError | None = None
        self._next_id = 1

    def add_soc_comment(self, text: str, author: str = "SOC Analyst") -> Comment:
        """Add a comment as an MDR analyst."""
        return self._append(text, author, "Service")

    def delete_soc_comment(self, comment_id: str) -> None:
        """Delete a comment as an MDR analyst."""
        self.comments = [comment for comment in self.comments if comment.comment_id != comment_id]

    def texts(self) -> list[str]:
        return [comment.text for comment in self.comments]

    async def list_comments(self, incident_id: str) -> CommentPage:
        items = [comment for comment in self.comments if comment.comment_id not in self.hide_once]
        self.hide_once = set()
        return CommentPage(items=items, malformed=list(self.malformed))

    async def create_comment(self, incident_id: str, text: str, markdown_to_html: bool = True) -> Comment:
        self.writes["create_comment"] += 1
        comment = self._append(text, self.connection_name, "Client")
        if self.fail_after_create is not None:
            error, self.fail_after_create = self.fail_after_create, None
            raise error
        return comment

    async def delete_comment(self, comment_id: str) -> None:
        self.writes["delete_comment"] += 1
        if not any(comment.comment_id == comment_id for comment in self.comments):
            raise RejectedError(f"comment {comment_id} not found", status=404)
        self.delete_soc_comment(comment_id)

    def _append(self, text: str, author: str, origin: str) -> Comment:
        comment = Comment(
            comment_id=f"mdr-{self._next_id}",
            author_name=author,
            text=text,
            creation_time=int(START.timestamp() * 1000) + self._next_id,
            origin=origin,
        )
        self._next_id += 1
        self.comments.append(comment)
        return comment


class PeopleTickets(MemoryTicketAdapter):
    """The memory adapter, plus what people do to comments in a ticket system: restrict, edit, delete."""

    def __init__(self) -> None:
        super().__init__(clock=lambda: START)
        self.hide_once: set[str] = set()
        self.drafts: list[CommentDraft] = []
        self.edits: list[str] = []

    def add_comment_as_person(self, key: str, body: str, *, restricted: bool = False) -> TicketComment:
        comment = self.add_human_comment(key, body, author=ENGINEER)
        if not restricted:
            return comment
        return self._replace(key, comment.id, restricted=True)

    def edit_as_person(self, key: str, comment_id: str, body: str, **changes: Any) -> TicketComment:
        self.advance(60)
        return self._replace(key, comment_id, body=body, updated=self.now(), **changes)

    def delete_as_person(self, key: str, comment_id: str) -> None:
        ticket = self.ticket(key)
        ticket.comments = [comment for comment in ticket.comments if comment.id != comment_id]
        self._touch(ticket)

    async def add_comment(self, ref: TicketRef, draft: CommentDraft) -> TicketComment:
        self.drafts.append(draft)
        return await super().add_comment(ref, draft)

    async def edit_comment(self, ref: TicketRef, comment_id: str, draft: CommentDraft) -> TicketComment:
        self.edits.append(comment_id)
        return await super().edit_comment(ref, comment_id, draft)

    async def list_comments(self, ref: TicketRef) -> list[TicketComment]:
        comments = await super().list_comments(ref)
        hidden, self.hide_once = self.hide_once, set()
        return [comment for comment in comments if comment.id not in hidden]

    def _replace(self, key: str, comment_id: str, **changes: Any) -> TicketComment:
        ticket = self.ticket(key)
        [index] = [number for number, comment in enumerate(ticket.comments) if comment.id == comment_id]
        ticket.comments[index] = replace(ticket.comments[index], **changes)
        self._touch(ticket)
        return ticket.comments[index]


class Fakes:
    """CommentSync for one incident and its ticket, on the fakes and a SQLite ledger."""

    def __init__(self, store: Store, mdr: FakeMdr, tickets: PeopleTickets, ref: TicketRef, settings: ConnectionSettings) -> None:
        self.store = store
        self.mdr = mdr
        self.tickets = tickets
        self.ref = ref
        self.settings = settings
        self.stats = SyncStats()
        self.incident = Incident.model_validate(
            {
                "incident_id": INCIDENT_ID,
                "incident_number": 7,
                "summary": "Suspicious PowerShell",
                "priority": "HIGH",
                "status": "Open",
                "creation_time": int(START.timestamp() * 1000),
                "update_time": int(START.timestamp() * 1000),
            }
        )

    def comment_sync(self, **comments: Any) -> CommentSync:
        mapping = load_mapping("builtin:jira")
        mapping = mapping.model_copy(update={"comments": CommentFormat.model_validate(comments)})
        sync = CommentSync(self.settings, mapping, self.store, self.mdr, self.tickets, self.stats, read_now)
        sync.own_account = self.tickets.account
        return sync

    async def run(self, times: int = 1, **comments: Any) -> CommentSync:
        sync = self.comment_sync(**comments)
        for _ in range(times):
            await sync.sync_comments(self.incident, self.ref)
        return sync

    def ticket_bodies(self) -> list[str]:
        return [comment.body for comment in self.tickets.comments(self.ref.key)]

    async def rows(self, kind: str) -> list[Any]:
        return await self.store.get_items(self.settings.name, INCIDENT_ID, kind)


async def read_now(call: Any) -> Any:
    return await call()


def offline_settings(tmp_path: Path) -> ConnectionSettings:
    """Return a connection whose MDR and Jira are never contacted, for tests that use in-memory fakes of both."""
    return ConnectionSettings(
        name="main",
        mdr=MdrSettings(client_id="c0ffee", connection_name=CONNECTION_NAME, token_dir=tmp_path / "tokens"),
        ticket=JiraSettings(
            system="jira",
            url="https://jira.invalid",
            auth=JiraBasicAuth(type="basic", username="svc", password=SecretRef(env="UNUSED_PASSWORD")),
        ),
    )


@pytest.fixture
async def fakes(tmp_path: Path) -> Any:
    settings = offline_settings(tmp_path)
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}")
    tickets = PeopleTickets()
    await tickets.open()
    ref = await tickets.create_ticket(
        TicketDraft(INCIDENT_ID, "SEC", "Task", TicketFields("Incident", "text", "High", ()), {})
    )
    yield Fakes(store, FakeMdr(), tickets, ref, settings)
    await store.close()


# Rendering helpers


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("#mdr please isolate the host", "please isolate the host"),
        ("\\#mdr escaped by the Jira conversion", "escaped by the Jira conversion"),
        ("  #MDR\nsecond line", "second line"),
        ("#mdr", ""),
        ("#mdrx is another word", None),
        ("please read #mdr", None),
        ("plain comment", None),
    ],
    ids=["plain", "escaped", "case-and-space", "marker-only", "longer-word", "not-at-start", "unmarked"],
)
def test_strip_marker_cases(body: str, expected: str | None) -> None:
    """The marker counts only at the start of a comment, ignoring case, spaces and Markdown escapes."""
    assert strip_comment_marker(body, "#mdr") == expected


def test_visibility_from_mapping() -> None:
    """The mapping's visibility becomes the draft's, and no visibility means everyone may read."""
    mapping = load_mapping("builtin:jira")
    restricted = mapping.model_copy(
        update={"comments": CommentFormat.model_validate({"visibility": {"type": "group", "value": "soc"}})}
    )

    assert comment_visibility(mapping) is None
    assert comment_visibility(restricted) == CommentVisibility(type="group", value="soc")


def test_mirror_allowed_for_mdr_delete() -> None:
    """`on_mdr_delete` takes `mirror`, its default, as well as `note` and `ignore`."""
    assert CommentFormat().on_mdr_delete == "mirror"
    assert CommentFormat.model_validate({"on_mdr_delete": "note"}).on_mdr_delete == "note"


# Which ticket comments go to MDR


async def test_default_sends_public_only(fakes: Fakes) -> None:
    """By default a restricted ticket comment stays on the ticket, and is logged once."""
    fakes.tickets.add_comment_as_person(fakes.ref.key, "public note")
    fakes.tickets.add_comment_as_person(fakes.ref.key, "internal note", restricted=True)

    await fakes.run(times=3)

    assert sum("public note" in text for text in fakes.mdr.texts()) == 1
    assert not any("internal note" in text for text in fakes.mdr.texts())
    assert len(fakes.stats.restricted_skipped) == 1


async def test_all_sends_restricted(fakes: Fakes) -> None:
    """`to_mdr: all` sends restricted comments too, once each."""
    fakes.tickets.add_comment_as_person(fakes.ref.key, "public note")
    fakes.tickets.add_comment_as_person(fakes.ref.key, "internal note", restricted=True)

    await fakes.run(times=3, to_mdr="all")

    assert sum("public note" in text for text in fakes.mdr.texts()) == 1
    assert sum("internal note" in text for text in fakes.mdr.texts()) == 1


async def test_deprecated_mirror_restricted(fakes: Fakes) -> None:
    """The deprecated `mirror_restricted: true` still sends restricted comments."""
    fakes.tickets.add_comment_as_person(fakes.ref.key, "internal note", restricted=True)

    await fakes.run(mirror_restricted=True)

    assert sum("internal note" in text for text in fakes.mdr.texts()) == 1


async def test_marked_strips_marker(fakes: Fakes) -> None:
    """`to_mdr: marked` sends only marked comments, restricted ones included, without the marker."""
    fakes.tickets.add_comment_as_person(fakes.ref.key, "#mdr please isolate WS-17")
    fakes.tickets.add_comment_as_person(fakes.ref.key, "#mdr internal question", restricted=True)
    fakes.tickets.add_comment_as_person(fakes.ref.key, "talk among ourselves")

    await fakes.run(times=3, to_mdr="marked")

    texts = fakes.mdr.texts()
    assert sum("please isolate WS-17" in text for text in texts) == 1
    assert sum("internal question" in text for text in texts) == 1
    assert not any("#mdr" in text for text in texts)
    assert not any("talk among ourselves" in text for text in texts)


async def test_marked_after_edit_is_sent(fakes: Fakes) -> None:
    """A skipped comment edited into scope is sent once, with the text it has then."""
    comment = fakes.tickets.add_comment_as_person(fakes.ref.key, "forgot the marker")
    await fakes.run(to_mdr="marked")
    assert fakes.mdr.texts() == []

    fakes.tickets.edit_as_person(fakes.ref.key, comment.id, "#mdr remembered the marker")
    await fakes.run(times=3, to_mdr="marked")

    texts = fakes.mdr.texts()
    assert len(texts) == 1
    assert "remembered the marker" in texts[0]
    assert "Edited" not in texts[0]


async def test_visibility_on_posted_comments(fakes: Fakes) -> None:
    """Copies and notes that the connector posts on the ticket carry the mapping's visibility."""
    soc = fakes.mdr.add_soc_comment("<p>from the SOC</p>")
    rules = {"visibility": {"type": "role", "value": "Developers"}, "on_mdr_delete": "note"}
    await fakes.run(**rules)
    fakes.mdr.delete_soc_comment(soc.comment_id)
    await fakes.run(**rules)

    expected = CommentVisibility(type="role", value="Developers")
    assert len(fakes.tickets.drafts) == 2
    assert [draft.visibility for draft in fakes.tickets.drafts] == [expected, expected]


# Edits of ticket comments


async def test_edit_gives_one_note(fakes: Fakes) -> None:
    """An edit of a copied ticket comment reaches MDR as one note with the new text, over three runs."""
    comment = fakes.tickets.add_comment_as_person(fakes.ref.key, "first text")
    await fakes.run()
    edited = fakes.tickets.edit_as_person(fakes.ref.key, comment.id, "second text")

    await fakes.run(times=3)

    texts = fakes.mdr.texts()
    assert len(texts) == 2
    assert "second text" in texts[1]
    assert "Edited in Memory" in texts[1]
    [copy] = [row for row in await fakes.rows(COMMENT) if row.direction == TICKET_TO_MDR]
    assert copy.source_version == comment_version(edited)
    assert fakes.stats.comment_notes == 1


async def test_each_edit_noted_once(fakes: Fakes) -> None:
    """Two edits noticed at two runs give two notes, and nothing more later."""
    comment = fakes.tickets.add_comment_as_person(fakes.ref.key, "version one")
    await fakes.run()
    fakes.tickets.edit_as_person(fakes.ref.key, comment.id, "version two")
    await fakes.run()
    fakes.tickets.edit_as_person(fakes.ref.key, comment.id, "version three")
    await fakes.run(times=2)

    texts = fakes.mdr.texts()
    assert len(texts) == 3
    assert sum("version two" in text for text in texts) == 1
    assert sum("version three" in text for text in texts) == 1


async def test_edit_ignored_when_set(fakes: Fakes) -> None:
    """`on_ticket_edit: ignore` sends nothing for an edit."""
    comment = fakes.tickets.add_comment_as_person(fakes.ref.key, "first text")
    await fakes.run(on_ticket_edit="ignore")
    fakes.tickets.edit_as_person(fakes.ref.key, comment.id, "second text")

    await fakes.run(times=2, on_ticket_edit="ignore")

    assert len(fakes.mdr.texts()) == 1


async def test_edit_into_restriction_not_sent(fakes: Fakes) -> None:
    """An edit that also restricts the comment sends no note under the default rule."""
    comment = fakes.tickets.add_comment_as_person(fakes.ref.key, "first text")
    await fakes.run()
    fakes.tickets.edit_as_person(fakes.ref.key, comment.id, "now secret", restricted=True)

    await fakes.run(times=2)

    assert not any("now secret" in text for text in fakes.mdr.texts())


async def test_marked_edit_note_strips_marker(fakes: Fakes) -> None:
    """In `marked` mode the edit note has no marker, and an edit that drops the marker sends nothing."""
    comment = fakes.tickets.add_comment_as_person(fakes.ref.key, "#mdr first")
    await fakes.run(to_mdr="marked")
    fakes.tickets.edit_as_person(fakes.ref.key, comment.id, "#mdr second")
    await fakes.run(to_mdr="marked")
    fakes.tickets.edit_as_person(fakes.ref.key, comment.id, "third, kept here")
    await fakes.run(times=2, to_mdr="marked")

    texts = fakes.mdr.texts()
    assert len(texts) == 2
    assert "second" in texts[1]
    assert not any("#mdr" in text for text in texts)
    assert not any("kept here" in text for text in texts)


async def test_edit_note_lost_reply(fakes: Fakes) -> None:
    """An edit note whose reply was lost is found by its footer on the next run, not posted twice."""
    comment = fakes.tickets.add_comment_as_person(fakes.ref.key, "first text")
    await fakes.run()
    fakes.tickets.edit_as_person(fakes.ref.key, comment.id, "second text")
    fakes.mdr.fail_after_create = OutcomeUnknownError("reply lost")

    with pytest.raises(OutcomeUnknownError):
        await fakes.run()
    await fakes.run(times=2)

    assert sum("second text" in text for text in fakes.mdr.texts()) == 1
    assert fakes.mdr.writes["create_comment"] == 2
    [note] = [row for row in await fakes.rows(COMMENT_CHANGE)]
    assert note.state == DONE


async def test_copy_without_version_is_baseline(fakes: Fakes) -> None:
    """A copy recorded without a version takes the current one, and no note is sent for it."""
    comment = fakes.tickets.add_comment_as_person(fakes.ref.key, "old copy")
    await fakes.run()
    [copy] = await fakes.rows(COMMENT)
    await fakes.store.finish_item("main", INCIDENT_ID, COMMENT, TICKET_TO_MDR, comment.id, copy.target_id)
    fakes.tickets.edit_as_person(fakes.ref.key, comment.id, "edited before the upgrade")

    await fakes.run(times=2)

    assert len(fakes.mdr.texts()) == 1
    [copy] = await fakes.rows(COMMENT)
    assert copy.source_version is not None


# Deletions of ticket comments


async def test_delete_note_once(fakes: Fakes) -> None:
    """By default a deleted ticket comment gives one note in MDR, and the copy stays."""
    comment = fakes.tickets.add_comment_as_person(fakes.ref.key, "soon deleted")
    await fakes.run()
    fakes.tickets.delete_as_person(fakes.ref.key, comment.id)

    await fakes.run(times=3)

    texts = fakes.mdr.texts()
    assert len(texts) == 2
    assert "soon deleted" in texts[0]
    assert f"comment {comment.id} of {fakes.ref.key}" in texts[1]
    assert "was deleted" in texts[1]
    assert fakes.mdr.writes["delete_comment"] == 0


async def test_delete_mirror_once(fakes: Fakes) -> None:
    """`on_ticket_delete: mirror` deletes the MDR copy once, and posts nothing."""
    comment = fakes.tickets.add_comment_as_person(fakes.ref.key, "soon deleted")
    fakes.tickets.add_comment_as_person(fakes.ref.key, "stays")
    await fakes.run(on_ticket_delete="mirror")
    fakes.tickets.delete_as_person(fakes.ref.key, comment.id)

    await fakes.run(times=3, on_ticket_delete="mirror")

    texts = fakes.mdr.texts()
    assert len(texts) == 1
    assert "stays" in texts[0]
    assert fakes.mdr.writes["delete_comment"] == 1
    assert fakes.mdr.writes["create_comment"] == 2


async def test_delete_mirror_after_lost_reply(fakes: Fakes) -> None:
    """A copy already gone from MDR (a delete whose reply was lost) is recorded without a second delete."""
    comment = fakes.tickets.add_comment_as_person(fakes.ref.key, "soon deleted")
    await fakes.run(on_ticket_delete="mirror")
    [copy] = await fakes.rows(COMMENT)
    fakes.tickets.delete_as_person(fakes.ref.key, comment.id)
    fakes.mdr.delete_soc_comment(copy.target_id)

    await fakes.run(times=2, on_ticket_delete="mirror")

    assert fakes.mdr.writes["delete_comment"] == 0
    [change] = await fakes.rows(COMMENT_CHANGE)
    assert change.state == DONE
    assert change.target_id == copy.target_id


async def test_delete_mirror_other_author_notes(fakes: Fakes) -> None:
    """A copy written under another Connection Name cannot be deleted, so a note is added instead."""
    comment = fakes.tickets.add_comment_as_person(fakes.ref.key, "soon deleted")
    await fakes.run(on_ticket_delete="mirror")
    fakes.mdr.comments = [replace_author(item, "Old connection name") for item in fakes.mdr.comments]
    fakes.tickets.delete_as_person(fakes.ref.key, comment.id)

    await fakes.run(times=2, on_ticket_delete="mirror")

    assert fakes.mdr.writes["delete_comment"] == 0
    assert len(fakes.mdr.texts()) == 2


async def test_delete_ignored_when_set(fakes: Fakes) -> None:
    """`on_ticket_delete: ignore` changes nothing in MDR."""
    comment = fakes.tickets.add_comment_as_person(fakes.ref.key, "soon deleted")
    await fakes.run(on_ticket_delete="ignore")
    fakes.tickets.delete_as_person(fakes.ref.key, comment.id)

    await fakes.run(times=2, on_ticket_delete="ignore")

    assert len(fakes.mdr.texts()) == 1
    assert fakes.mdr.writes["delete_comment"] == 0


async def test_partial_ticket_read_not_deletion(fakes: Fakes) -> None:
    """A comment missing from one read only, as after a paging race, is not taken for deleted."""
    comment = fakes.tickets.add_comment_as_person(fakes.ref.key, "still here")
    await fakes.run(on_ticket_delete="mirror")
    fakes.tickets.hide_once = {comment.id}

    await fakes.run(on_ticket_delete="mirror")

    assert fakes.mdr.writes["delete_comment"] == 0
    assert await fakes.rows(COMMENT_CHANGE) == []


async def test_malformed_mdr_list_decides_nothing(fakes: Fakes) -> None:
    """With a malformed MDR record in the list, no deletion is acted on and the incident is parked."""
    comment = fakes.tickets.add_comment_as_person(fakes.ref.key, "soon deleted")
    soc = fakes.mdr.add_soc_comment("<p>soc</p>")
    await fakes.run(on_ticket_delete="mirror", on_mdr_delete="note")
    fakes.tickets.delete_as_person(fakes.ref.key, comment.id)
    fakes.mdr.delete_soc_comment(soc.comment_id)
    fakes.mdr.malformed = [MalformedRecord(soc.comment_id, None, "creation_time is not a number")]

    with pytest.raises(ItemError):
        await fakes.run(on_ticket_delete="mirror", on_mdr_delete="note")

    assert fakes.mdr.writes["delete_comment"] == 0
    assert len(fakes.ticket_bodies()) == 1
    assert await fakes.rows(COMMENT_CHANGE) == []


# Deletions of MDR comments


async def test_mdr_delete_note_once(fakes: Fakes) -> None:
    """`on_mdr_delete: note` adds one note to the ticket, marked as the connector's notice."""
    soc = fakes.mdr.add_soc_comment("<p>wrong incident</p>")
    await fakes.run(on_mdr_delete="note")
    fakes.mdr.delete_soc_comment(soc.comment_id)

    await fakes.run(times=3, on_mdr_delete="note")

    comments = fakes.tickets.comments(fakes.ref.key)
    assert len(comments) == 2
    assert "wrong incident" in comments[0].body
    assert "was deleted in MDR" in comments[1].body
    assert comments[1].marker is not None
    assert comments[1].marker.origin == NOTICE_ORIGIN


async def test_mdr_delete_mirror_once(fakes: Fakes) -> None:
    """By default the ticket copy of a comment deleted in MDR loses its text in one edit, and keeps its marker."""
    soc = fakes.mdr.add_soc_comment("<p>wrong incident</p>")
    await fakes.run()
    fakes.mdr.delete_soc_comment(soc.comment_id)

    await fakes.run(times=3)

    [copy] = fakes.tickets.comments(fakes.ref.key)
    assert "wrong incident" not in copy.body
    assert "was deleted in MDR" in copy.body
    assert copy.marker is not None
    assert copy.marker.source_id == soc.comment_id
    assert fakes.tickets.edits == [copy.id]


async def test_mdr_delete_mirror_without_edits(fakes: Fakes) -> None:
    """Where comments cannot be edited (ServiceNow journal entries), `mirror` adds one note and edits nothing."""
    fakes.tickets.capabilities = TicketCapabilities(edit_comments=False)
    soc = fakes.mdr.add_soc_comment("<p>wrong incident</p>")
    await fakes.run()
    fakes.mdr.delete_soc_comment(soc.comment_id)

    await fakes.run(times=3)

    comments = fakes.tickets.comments(fakes.ref.key)
    assert len(comments) == 2
    assert "wrong incident" in comments[0].body
    assert "was deleted in MDR" in comments[1].body
    assert fakes.tickets.edits == []


async def test_mdr_delete_mirror_copy_gone(fakes: Fakes) -> None:
    """A ticket copy that a person already deleted is tried once, then the deletion counts as handled."""
    soc = fakes.mdr.add_soc_comment("<p>wrong incident</p>")
    await fakes.run()
    [copy] = fakes.tickets.comments(fakes.ref.key)
    fakes.tickets.delete_as_person(fakes.ref.key, copy.id)
    fakes.mdr.delete_soc_comment(soc.comment_id)

    await fakes.run(times=3)

    assert fakes.tickets.comments(fakes.ref.key) == []
    assert fakes.tickets.edits == [copy.id]
    [change] = await fakes.rows(COMMENT_CHANGE)
    assert change.direction == MDR_TO_TICKET
    assert change.state == DONE


async def test_mdr_partial_read_not_deletion(fakes: Fakes) -> None:
    """An MDR comment missing from one read only is not taken for deleted."""
    soc = fakes.mdr.add_soc_comment("<p>still here</p>")
    await fakes.run(on_mdr_delete="note")
    fakes.mdr.hide_once = {soc.comment_id}

    await fakes.run(on_mdr_delete="note")

    assert len(fakes.ticket_bodies()) == 1
    assert await fakes.rows(COMMENT_CHANGE) == []


async def test_notes_not_copied_back(fakes: Fakes) -> None:
    """Notes on either side are echoes: three more runs copy none of them."""
    comment = fakes.tickets.add_comment_as_person(fakes.ref.key, "jira text")
    soc = fakes.mdr.add_soc_comment("<p>soc text</p>")
    rules = {"on_mdr_delete": "note"}
    await fakes.run(**rules)
    fakes.tickets.edit_as_person(fakes.ref.key, comment.id, "jira text, edited")
    await fakes.run(**rules)
    fakes.tickets.delete_as_person(fakes.ref.key, comment.id)
    fakes.mdr.delete_soc_comment(soc.comment_id)
    await fakes.run(**rules)
    mdr_before, ticket_before = list(fakes.mdr.texts()), list(fakes.ticket_bodies())

    await fakes.run(times=3, **rules)

    assert fakes.mdr.texts() == mdr_before
    assert fakes.ticket_bodies() == ticket_before
    assert len(mdr_before) == 3
    assert len(ticket_before) == 2
    assert all(parse_mdr_footer(text) is not None for text in mdr_before)


def replace_author(comment: Comment, author: str) -> Comment:
    return comment.model_copy(update={"author_name": author})


# End to end against both simulators

EDIT_COMMENT = "PUT /rest/api/2/issue/{issue}/comment/{comment}"


async def linked_issue(harness: SyncHarness, **comments: Any) -> tuple[str, Any, Any]:
    """Use a mapping with these comment rules, seed an incident and run the cycle that creates its issue."""
    if comments:
        harness.use_mapping(comments=comments)
    incident_id = harness.seed()["incident_id"]
    sync = await harness.cycles(1)
    return incident_id, harness.issue_for(incident_id), sync


async def settle(harness: SyncHarness, sync: Any, cycles: int = 3) -> None:
    """Let Jira search see the latest changes, then run `cycles` cycles."""
    harness.advance(31)
    await harness.cycles(cycles, sync)


def connector_comments_in_mdr(harness: SyncHarness, incident_id: str) -> list[str]:
    return [c["text"] for c in harness.mdr_comments(incident_id) if c["author_name"] == MDR_CONNECTION_NAME]


def delete_in_mdr(harness: SyncHarness, incident_id: str, comment_id: str) -> None:
    """Delete a comment as an MDR analyst would; the incident's update_time moves."""
    stored = harness.mdr_sim._incidents[incident_id]
    stored.comments[:] = [comment for comment in stored.comments if comment["comment_id"] != comment_id]
    harness.mdr_sim.update_incident(MDR_CLIENT_ID, incident_id)


async def test_e2e_default_keeps_internal(harness: SyncHarness) -> None:
    """By default comments restricted to a role or group and JSM internal notes stay in Jira."""
    incident_id, issue, sync = await linked_issue(harness)
    harness.jira.sim.add_comment(issue.key, "role only", visibility={"type": "role", "value": "Developers"})
    harness.jira.sim.add_comment(issue.key, "group only", visibility={"type": "group", "value": "soc-team"})
    harness.jira.sim.add_comment(issue.key, "internal note", internal=True)
    harness.jira.sim.add_comment(issue.key, "for the SOC")

    await settle(harness, sync)

    texts = connector_comments_in_mdr(harness, incident_id)
    assert len(texts) == 1
    assert "for the SOC" in texts[0]
    assert len(sync.stats.restricted_skipped) == 3


async def test_e2e_all_sends_every_comment(harness: SyncHarness) -> None:
    """`to_mdr: all` sends restricted comments and JSM internal notes, each once over three cycles."""
    incident_id, issue, sync = await linked_issue(harness, to_mdr="all")
    harness.jira.sim.add_comment(issue.key, "role only", visibility={"type": "role", "value": "Developers"})
    harness.jira.sim.add_comment(issue.key, "internal note", internal=True)
    harness.jira.sim.add_comment(issue.key, "for the SOC")

    await settle(harness, sync)

    texts = connector_comments_in_mdr(harness, incident_id)
    assert len(texts) == 3
    for words in ("role only", "internal note", "for the SOC"):
        assert sum(words in text for text in texts) == 1


async def test_e2e_marked_strips_marker(harness: SyncHarness) -> None:
    """`to_mdr: marked` sends only comments that start with the marker, without it."""
    incident_id, issue, sync = await linked_issue(harness, to_mdr="marked", marker="#mdr")
    harness.jira.sim.add_comment(issue.key, "#mdr please isolate WS-17")
    harness.jira.sim.add_comment(issue.key, "#mdr internal question", internal=True)
    harness.jira.sim.add_comment(issue.key, "talk among ourselves")

    await settle(harness, sync)

    texts = connector_comments_in_mdr(harness, incident_id)
    assert len(texts) == 2
    assert sum("please isolate WS-17" in text for text in texts) == 1
    assert sum("internal question" in text for text in texts) == 1
    assert not any("#mdr" in text for text in texts)


def test_marker_inside_fallback_block() -> None:
    """A comment whose markup could not be converted arrives fenced; the marker at the block's start still counts."""
    assert strip_comment_marker("```\n#mdr {code}x{code}\n```", "#mdr") == "```\n{code}x{code}\n```"
    assert strip_comment_marker("```\nplease #mdr\n```", "#mdr") is None


async def test_e2e_marked_unconvertible_comment(harness: SyncHarness) -> None:
    """A marked comment whose Jira markup falls back to a code block still reaches MDR, once."""
    incident_id, issue, sync = await linked_issue(harness, to_mdr="marked", marker="#mdr")
    harness.jira.sim.add_comment(issue.key, "#mdr {code}x{code} then {color:red}text")

    await settle(harness, sync)

    texts = connector_comments_in_mdr(harness, incident_id)
    assert len(texts) == 1
    assert "#mdr" not in texts[0]


async def test_e2e_visibility_on_jira_comments(harness: SyncHarness) -> None:
    """Copies and deletion notes posted into Jira carry the mapping's visibility."""
    visibility = {"type": "role", "value": "Developers"}
    incident_id, issue, sync = await linked_issue(harness, visibility=visibility, on_mdr_delete="note")
    soc = harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>from the SOC</p>", author="Analyst")
    await settle(harness, sync, cycles=1)
    delete_in_mdr(harness, incident_id, soc["comment_id"])

    await settle(harness, sync)

    posted = [comment for comment in issue.comments if comment.author is harness.jira.sim.service]
    assert len(posted) == 2
    assert [comment.visibility for comment in posted] == [visibility, visibility]


async def test_e2e_jira_edit_one_note(harness: SyncHarness) -> None:
    """A Jira comment edited after it was copied gives one note in MDR over three cycles."""
    incident_id, issue, sync = await linked_issue(harness)
    comment = harness.jira.sim.add_comment(issue.key, "first text")
    await settle(harness, sync, cycles=1)
    harness.jira.sim.edit_comment(comment.id, "second text")

    await settle(harness, sync)

    texts = connector_comments_in_mdr(harness, incident_id)
    assert len(texts) == 2
    assert "first text" in texts[0]
    assert "second text" in texts[1]
    assert "Edited in Jira" in texts[1]
    assert not any("second text" in other.body for other in issue.comments if other is not comment)


async def test_e2e_jira_delete_mirror(harness: SyncHarness) -> None:
    """`on_ticket_delete: mirror` deletes the MDR copy of a deleted Jira comment once."""
    incident_id, issue, sync = await linked_issue(harness, on_ticket_delete="mirror")
    comment = harness.jira.sim.add_comment(issue.key, "soon deleted")
    harness.jira.sim.add_comment(issue.key, "stays")
    await settle(harness, sync, cycles=1)
    assert len(connector_comments_in_mdr(harness, incident_id)) == 2
    harness.jira.sim.delete_comment(comment.id)

    await settle(harness, sync)

    texts = connector_comments_in_mdr(harness, incident_id)
    assert len(texts) == 1
    assert "stays" in texts[0]
    assert harness.mdr_sim.call_counts["comments/delete"] == 1


async def test_e2e_jira_delete_note(harness: SyncHarness) -> None:
    """By default a deleted Jira comment gives one note in MDR, and the copy stays."""
    incident_id, issue, sync = await linked_issue(harness)
    comment = harness.jira.sim.add_comment(issue.key, "soon deleted")
    await settle(harness, sync, cycles=1)
    harness.jira.sim.delete_comment(comment.id)

    await settle(harness, sync)

    texts = connector_comments_in_mdr(harness, incident_id)
    assert len(texts) == 2
    assert "soon deleted" in texts[0]
    assert f"comment {comment.id} of {issue.key}" in texts[1]
    assert harness.mdr_sim.call_counts.get("comments/delete", 0) == 0
    assert not any("was deleted in Jira" in other.body for other in issue.comments)


async def test_e2e_mdr_delete_mirror(harness: SyncHarness) -> None:
    """By default the Jira copy of a comment deleted in MDR loses its text, in one edit."""
    incident_id, issue, sync = await linked_issue(harness)
    soc = harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>wrong incident</p>", author="Analyst")
    await settle(harness, sync, cycles=1)
    [copy] = issue.comments
    delete_in_mdr(harness, incident_id, soc["comment_id"])

    await settle(harness, sync)

    assert issue.comments == [copy]
    assert "wrong incident" not in copy.body
    assert "was deleted in MDR" in copy.body
    assert copy.properties["mdr-connector"]["source_id"] == soc["comment_id"]
    assert harness.jira.sim.calls[EDIT_COMMENT] == 1
    assert connector_comments_in_mdr(harness, incident_id) == []


async def test_e2e_mdr_delete_note(harness: SyncHarness) -> None:
    """`on_mdr_delete: note` adds one note to the issue and keeps the copy."""
    incident_id, issue, sync = await linked_issue(harness, on_mdr_delete="note")
    soc = harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>wrong incident</p>", author="Analyst")
    await settle(harness, sync, cycles=1)
    delete_in_mdr(harness, incident_id, soc["comment_id"])

    await settle(harness, sync)

    assert len(issue.comments) == 2
    assert "wrong incident" in issue.comments[0].body
    assert "was deleted in MDR" in issue.comments[1].body
    assert harness.jira.sim.calls[EDIT_COMMENT] == 0
    assert connector_comments_in_mdr(harness, incident_id) == []
