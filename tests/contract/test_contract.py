"""The behaviour every ticket adapter owes the sync engine, run once per ticket system.

The tests branch on `adapter.capabilities` and on what the backend declares,
never on the system's name, so an adapter that passes here works with the
engine. Texts mix Cyrillic and emoji because Russian-speaking analysts
write most of them.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable
from pathlib import Path

import pytest

from contract.backends import ContractBackend
from mdr_connector.adapters.textmarker import with_marker
from mdr_connector.connector.errors import RejectedError
from mdr_connector.connector.tickets import (
    AttachmentUpload,
    CommentDraft,
    SyncMarker,
    TicketAdapter,
    TicketCapabilities,
    TicketComment,
    TicketDraft,
    TicketFields,
    TicketQuery,
    TicketRef,
)

DESCRIPTION = (
    "Хост **изолирован** 🚀\n\n"
    "Шаги:\n\n"
    "- собрать логи\n"
    "- проверить `svc.exe`\n\n"
    "Отчёт: [ссылка](https://example.test/report?id=1)"
)
# Words of DESCRIPTION that survive in a system that stores descriptions as plain text.
DESCRIPTION_WORDS = ("Хост", "изолирован", "🚀", "собрать логи", "svc")
OWN_COMMENT = "Проверено 🔍 **важно**: хост изолирован."
PERSON_COMMENT = "Проверил хост, всё чисто 👍"
# A multi-KB binary with every byte value, runs of NUL bytes and UTF-8 text.
ATTACHMENT_DATA = bytes(range(256)) * 24 + b"\x00" * 1024 + "Журнал событий 🚀".encode() * 40
ATTACHMENT_NAME = "отчёт-хоста.bin"
MISSING_NAME = "nosuchname7f3"


def new_incident_id() -> str:
    return f"contract-{uuid.uuid4().hex[:12]}"


def ticket_draft(backend: ContractBackend, incident_id: str, *, summary: str = "Инцидент 🚨", project: str | None = None) -> TicketDraft:
    fields = TicketFields(summary=summary, description=DESCRIPTION, priority=backend.priorities[0], labels=())
    return TicketDraft(incident_id=incident_id, project=project or backend.project, issue_type=backend.issue_type, fields=fields)


def new_marker(origin: str = "mdr") -> SyncMarker:
    return SyncMarker(origin=origin, source_id=f"c-{uuid.uuid4().hex[:12]}")


def collapsed(text: str | None) -> str:
    """Return `text` with each whitespace run as one space, so tight and loose Markdown lists compare equal."""
    return " ".join((text or "").split())


def same_ticket(found: TicketRef | None, expected: TicketRef) -> bool:
    return found is not None and (found.key, found.id) == (expected.key, expected.id)


def comment_by_id(comments: list[TicketComment], comment_id: str) -> TicketComment:
    matches = [comment for comment in comments if comment.id == comment_id]
    assert len(matches) == 1, f"comment {comment_id} is listed {len(matches)} times in {[c.id for c in comments]}"
    return matches[0]


async def as_person(action: Awaitable[object]) -> None:
    """Run a person's action, skipping the test when the ticket system offers no such action."""
    try:
        await action
    except NotImplementedError as err:
        pytest.skip(f"a person cannot do this here: {err}")


async def create_ticket(backend: ContractBackend, adapter: TicketAdapter, *, summary: str = "Инцидент 🚨") -> TicketRef:
    return await adapter.create_ticket(ticket_draft(backend, new_incident_id(), summary=summary))


# Opening and identity


async def test_open_returns_stable_account(backend: ContractBackend) -> None:
    """Two connections to the same system see the same own account, which is not the person's."""
    await backend.open()
    first = backend.account
    await backend.open()

    assert first.id
    assert first.display_name
    assert backend.account == first
    assert first.id != backend.person.id


async def test_adapter_declares_capabilities(backend: ContractBackend) -> None:
    """The adapter follows the protocol and declares what it can store."""
    adapter = await backend.open()

    assert isinstance(adapter, TicketAdapter)
    assert isinstance(adapter.capabilities, TicketCapabilities)
    assert adapter.search_delay_seconds() >= 0
    if backend.internal_visibility is not None:
        assert backend.internal_visibility.type in adapter.capabilities.visibility_types


# Tickets


async def test_created_ticket_found_by_incident(backend: ContractBackend) -> None:
    """A created ticket is found by its incident id, also by a fresh connection."""
    adapter = await backend.open()
    incident_id = new_incident_id()

    ref = await adapter.create_ticket(ticket_draft(backend, incident_id))
    await backend.make_searchable()

    assert ref.key
    assert ref.id
    assert ref.url
    assert same_ticket(await adapter.find_ticket(incident_id), ref)
    fresh = await backend.open()
    assert same_ticket(await fresh.find_ticket(incident_id), ref)


async def test_tickets_found_together(backend: ContractBackend) -> None:
    """The tickets of several incidents are found in one call, as find_ticket finds each, and a missing one is left out."""
    adapter = await backend.open()
    found_ids = [new_incident_id(), new_incident_id()]
    missing_id = new_incident_id()
    refs = [await adapter.create_ticket(ticket_draft(backend, incident_id)) for incident_id in found_ids]
    await backend.make_searchable()

    found = await adapter.find_incident_tickets([found_ids[0], missing_id, found_ids[1]])

    assert sorted(found) == sorted(found_ids)
    for incident_id, ref in zip(found_ids, refs, strict=True):
        assert same_ticket(found[incident_id], ref)


async def test_unknown_incident_not_found(backend: ContractBackend) -> None:
    """An incident id no ticket carries finds nothing, even with other tickets present."""
    adapter = await backend.open()
    await create_ticket(backend, adapter)
    await backend.make_searchable()

    assert await adapter.find_ticket(new_incident_id()) is None


async def test_get_ticket_by_key_and_id(backend: ContractBackend) -> None:
    """get_ticket accepts the key people see and the API id, and returns None for a missing ticket."""
    adapter = await backend.open()
    ref = await create_ticket(backend, adapter)

    assert same_ticket(await adapter.get_ticket(ref.key), ref)
    assert same_ticket(await adapter.get_ticket(ref.id), ref)
    assert await adapter.get_ticket(f"{ref.key}9999") is None


async def test_created_description_round_trips(backend: ContractBackend) -> None:
    """The description of a new ticket reads back as the Markdown it was written as."""
    adapter = await backend.open()
    ref = await create_ticket(backend, adapter)

    state = await adapter.get_state(ref, [backend.description_field])

    description = state.values[backend.description_field]
    if backend.markdown_description:
        assert collapsed(description) == collapsed(DESCRIPTION)
    for word in DESCRIPTION_WORDS:
        assert word in description


async def test_update_writes_fields(backend: ContractBackend) -> None:
    """update_ticket writes the summary and the description, and accepts another valid priority."""
    adapter = await backend.open()
    ref = await create_ticket(backend, adapter)
    description = f"Обновлено ✅\n\n{DESCRIPTION}"
    fields = TicketFields(summary="Обновлено: хост 🚀", description=description, priority=backend.priorities[1], labels=())

    await adapter.update_ticket(ref, fields)
    state = await adapter.get_state(ref, [backend.summary_field, backend.description_field])

    assert state.values[backend.summary_field] == "Обновлено: хост 🚀"
    if backend.markdown_description:
        assert collapsed(state.values[backend.description_field]) == collapsed(description)
    assert "Обновлено ✅" in state.values[backend.description_field]


async def test_update_honours_skip(backend: ContractBackend) -> None:
    """A field named in `skip` keeps the value a person gave it."""
    adapter = await backend.open()
    ref = await create_ticket(backend, adapter, summary="Первое название")
    await backend.human_edit_summary(ref, "Название от аналитика")
    fields = TicketFields(summary="Название от коннектора", description="Новое описание", priority=None, labels=())

    await adapter.update_ticket(ref, fields, skip=frozenset({"summary"}))
    state = await adapter.get_state(ref, [backend.summary_field, backend.description_field])

    assert state.values[backend.summary_field] == "Название от аналитика"
    assert collapsed(state.values[backend.description_field]) == "Новое описание"


async def test_other_project_ticket_found(backend: ContractBackend) -> None:
    """A ticket created in a second project after `check` names it is found like one in the main project."""
    if backend.other_project is None:
        pytest.skip("the backend has only one project")
    adapter = await backend.open()
    incident_id = new_incident_id()

    assert await adapter.check(backend.issue_type, backend.priorities, project=backend.other_project) == []
    ref = await adapter.create_ticket(ticket_draft(backend, incident_id, project=backend.other_project))
    await backend.make_searchable()

    assert same_ticket(await adapter.find_ticket(incident_id), ref)


# Comments


async def test_own_comment_carries_marker(backend: ContractBackend) -> None:
    """The connector's comment lists with its marker, its own author and its body without the marker."""
    adapter = await backend.open()
    ref = await create_ticket(backend, adapter)
    marker = new_marker()

    added = await adapter.add_comment(ref, CommentDraft(body=OWN_COMMENT, marker=marker))
    listed = comment_by_id(await adapter.list_comments(ref), added.id)

    assert added.marker == marker
    assert added.author.id == backend.account.id
    assert listed.marker == marker
    assert listed.author.id == backend.account.id
    assert collapsed(listed.body) == collapsed(OWN_COMMENT)
    assert listed.restricted is False
    assert listed.created.tzinfo is not None


async def test_person_comment_has_no_marker(backend: ContractBackend) -> None:
    """A person's comment lists with no marker, and with that person's id and display name."""
    adapter = await backend.open()
    ref = await create_ticket(backend, adapter)

    comment_id = await backend.human_comment(ref, PERSON_COMMENT)
    listed = comment_by_id(await adapter.list_comments(ref), comment_id)

    assert listed.marker is None
    assert listed.author.id == backend.person.id
    assert listed.author.display_name == backend.person.display_name
    assert collapsed(listed.body) == collapsed(PERSON_COMMENT)
    assert listed.restricted is False


async def test_typed_marker_not_trusted(backend: ContractBackend) -> None:
    """A marker line a person types into a comment is not read as the connector's marker."""
    adapter = await backend.open()
    ref = await create_ticket(backend, adapter)
    forged = with_marker("Я тоже могу так написать", new_marker())

    comment_id = await backend.human_comment(ref, forged)
    listed = comment_by_id(await adapter.list_comments(ref), comment_id)

    assert listed.marker is None
    assert listed.author.id == backend.person.id
    assert "Я тоже могу так написать" in listed.body


async def test_forged_marker_keeps_author(backend: ContractBackend) -> None:
    """A marker a person forged is dropped or listed with the person as author, so the engine can reject it."""
    adapter = await backend.open()
    ref = await create_ticket(backend, adapter)
    marker = new_marker()

    comment_id = await backend.human_forged_comment(ref, "Подделка маркера 🎭", marker)
    listed = comment_by_id(await adapter.list_comments(ref), comment_id)

    assert listed.author.id == backend.person.id
    assert listed.author.id != backend.account.id
    assert listed.marker in (None, marker)
    assert "Подделка маркера 🎭" in listed.body


async def test_internal_comments_restricted(backend: ContractBackend) -> None:
    """Internal comments of the connector and of a person list as restricted, public ones do not."""
    if backend.internal_visibility is None:
        pytest.skip("the ticket system has no internal comments")
    adapter = await backend.open()
    ref = await create_ticket(backend, adapter)
    marker = new_marker()

    own = await adapter.add_comment(ref, CommentDraft(body=OWN_COMMENT, marker=marker, visibility=backend.internal_visibility))
    internal_id = await backend.human_comment(ref, "Только для своих 🔒", internal=True)
    public_id = await backend.human_comment(ref, PERSON_COMMENT)
    comments = await adapter.list_comments(ref)

    assert own.restricted is True
    assert comment_by_id(comments, own.id).restricted is True
    assert comment_by_id(comments, own.id).marker == marker
    assert comment_by_id(comments, internal_id).restricted is True
    assert comment_by_id(comments, public_id).restricted is False


async def test_comments_listed_oldest_first(backend: ContractBackend) -> None:
    """list_comments returns every comment of both authors in the order written, across pages."""
    adapter = await backend.open()
    ref = await create_ticket(backend, adapter)
    count = 2 * (backend.comment_page_size or 2) + 1

    written: list[str] = []
    for number in range(1, count + 1):
        if number % 2:
            written.append(await backend.human_comment(ref, f"Комментарий аналитика {number}"))
        else:
            draft = CommentDraft(body=f"Комментарий коннектора {number}", marker=new_marker())
            written.append((await adapter.add_comment(ref, draft)).id)
    comments = await adapter.list_comments(ref)

    assert [comment.id for comment in comments] == written
    assert [comment.created for comment in comments] == sorted(comment.created for comment in comments)
    assert collapsed(comments[-1].body) == f"Комментарий аналитика {count}"


async def test_own_comment_edited(backend: ContractBackend) -> None:
    """edit_comment replaces the body of the connector's comment and keeps its marker."""
    adapter = await backend.open()
    if not adapter.capabilities.edit_comments:
        pytest.skip("the ticket system cannot edit comments")
    ref = await create_ticket(backend, adapter)
    marker = new_marker("mdr-response")
    added = await adapter.add_comment(ref, CommentDraft(body=OWN_COMMENT, marker=marker))

    edited = await adapter.edit_comment(ref, added.id, CommentDraft(body="Исправлено ✏️", marker=marker))
    listed = comment_by_id(await adapter.list_comments(ref), added.id)

    assert edited.id == added.id
    assert edited.marker == marker
    assert collapsed(listed.body) == "Исправлено ✏️"
    assert listed.marker == marker
    assert listed.author.id == backend.account.id


async def test_person_comment_edit_seen(backend: ContractBackend) -> None:
    """A person's edit of their comment shows in the next listing."""
    adapter = await backend.open()
    ref = await create_ticket(backend, adapter)
    comment_id = await backend.human_comment(ref, PERSON_COMMENT)

    await as_person(backend.human_edit_comment(ref, comment_id, "Исправил опечатку ✏️"))
    listed = comment_by_id(await adapter.list_comments(ref), comment_id)

    assert collapsed(listed.body) == "Исправил опечатку ✏️"
    assert listed.marker is None


async def test_person_comment_delete_seen(backend: ContractBackend) -> None:
    """A comment a person deleted is no longer listed, and the other comments stay."""
    adapter = await backend.open()
    ref = await create_ticket(backend, adapter)
    kept_id = await backend.human_comment(ref, "Останется")
    deleted_id = await backend.human_comment(ref, "Будет удалён")

    await as_person(backend.human_delete_comment(ref, deleted_id))
    ids = [comment.id for comment in await adapter.list_comments(ref)]

    assert deleted_id not in ids
    assert kept_id in ids


# Change search


async def test_changed_tickets_since(backend: ContractBackend) -> None:
    """changed_tickets returns tickets changed at or after `since`, oldest first, and not older ones."""
    adapter = await backend.open()
    edited_later = await create_ticket(backend, adapter, summary="Изменит аналитик")
    untouched = await create_ticket(backend, adapter, summary="Не изменится")
    since = await backend.next_moment()

    await backend.human_edit_summary(edited_later, "Изменено аналитиком 📝")
    created_later = await create_ticket(backend, adapter, summary="Создан после отметки")
    await backend.make_searchable()
    changes = await adapter.changed_tickets(since)

    keys = [change.ref.key for change in changes]
    assert edited_later.key in keys
    assert created_later.key in keys
    assert untouched.key not in keys
    assert len(keys) == len(set(keys))
    assert all(change.updated >= since for change in changes)
    assert [change.updated for change in changes] == sorted(change.updated for change in changes)
    assert keys.index(edited_later.key) < keys.index(created_later.key)


async def test_changed_tickets_include_comments(backend: ContractBackend) -> None:
    """A person's comment on a connector ticket makes it a changed ticket."""
    adapter = await backend.open()
    ref = await create_ticket(backend, adapter)
    since = await backend.next_moment()

    await backend.human_comment(ref, PERSON_COMMENT)
    await backend.make_searchable()
    changes = await adapter.changed_tickets(since)

    assert ref.key in [change.ref.key for change in changes]


# Attachments


async def test_attachment_round_trip(backend: ContractBackend, tmp_path: Path) -> None:
    """A binary with NUL bytes and a Cyrillic name uploads, lists and downloads byte for byte."""
    adapter = await backend.open()
    ref = await create_ticket(backend, adapter)
    source = tmp_path / "upload.bin"
    source.write_bytes(ATTACHMENT_DATA)
    limit = await adapter.attachment_limit()

    uploaded = await adapter.upload_attachment(ref, AttachmentUpload(ATTACHMENT_NAME, source, len(ATTACHMENT_DATA)))
    [listed] = [item for item in await adapter.list_attachments(ref) if item.id == uploaded.id]
    destination = tmp_path / "download.bin"
    written = await adapter.download_attachment(listed, destination)

    assert limit is not None
    assert limit >= len(ATTACHMENT_DATA)
    assert uploaded.filename == ATTACHMENT_NAME
    assert uploaded.size == len(ATTACHMENT_DATA)
    assert uploaded.author.id == backend.account.id
    assert listed.filename == ATTACHMENT_NAME
    assert listed.size == len(ATTACHMENT_DATA)
    assert written == len(ATTACHMENT_DATA)
    assert destination.read_bytes() == ATTACHMENT_DATA


async def test_person_attachment_listed(backend: ContractBackend, tmp_path: Path) -> None:
    """A file a person attached lists with that person as author and downloads unchanged."""
    adapter = await backend.open()
    ref = await create_ticket(backend, adapter)
    data = "Лог аналитика 🧾\n".encode() * 100

    await backend.human_attach(ref, "журнал.txt", data)
    [attachment] = await adapter.list_attachments(ref)
    destination = tmp_path / "person.txt"
    written = await adapter.download_attachment(attachment, destination)

    assert attachment.filename == "журнал.txt"
    assert attachment.author.id == backend.person.id
    assert attachment.size == len(data)
    assert written == len(data)
    assert destination.read_bytes() == data


# Workflow


async def test_new_ticket_status_category(backend: ContractBackend) -> None:
    """A new ticket is in a status of the `new` category."""
    adapter = await backend.open()
    ref = await create_ticket(backend, adapter)

    state = await adapter.get_state(ref)

    assert state.status
    assert state.status_category == "new"
    assert state.updated.tzinfo is not None


async def test_transitions_reach_statuses(backend: ContractBackend) -> None:
    """transition_to reaches the in-progress and done statuses, and a repeat is no change."""
    adapter = await backend.open()
    ref = await create_ticket(backend, adapter)

    await adapter.transition_to(ref, backend.statuses.in_progress)
    in_progress = await adapter.get_state(ref)
    await adapter.transition_to(ref, backend.statuses.done)
    await adapter.transition_to(ref, backend.statuses.done)
    done = await adapter.get_state(ref)

    assert in_progress.status.casefold() == backend.statuses.in_progress.casefold()
    assert in_progress.status_category == "indeterminate"
    assert done.status.casefold() == backend.statuses.done.casefold()
    assert done.status_category == "done"


async def test_unreachable_status_rejected(backend: ContractBackend) -> None:
    """A status no transition leads to, or no status at all, raises RejectedError and leaves the ticket as it was."""
    adapter = await backend.open()
    ref = await create_ticket(backend, adapter)
    await adapter.transition_to(ref, backend.statuses.in_progress)

    with pytest.raises(RejectedError):
        await adapter.transition_to(ref, "No Such Status 7f3")
    if backend.statuses.unreachable is not None:
        with pytest.raises(RejectedError):
            await adapter.transition_to(ref, backend.statuses.unreachable)
    state = await adapter.get_state(ref)

    assert state.status.casefold() == backend.statuses.in_progress.casefold()


async def test_person_status_change_seen(backend: ContractBackend) -> None:
    """A status a person sets shows in get_state."""
    adapter = await backend.open()
    ref = await create_ticket(backend, adapter)

    await backend.human_set_status(ref, backend.statuses.in_progress)
    state = await adapter.get_state(ref)

    assert state.status.casefold() == backend.statuses.in_progress.casefold()
    assert state.status_category == "indeterminate"


# Tickets people open


async def test_set_correlation_makes_findable(backend: ContractBackend) -> None:
    """A person's ticket stamped with set_correlation is found by the incident id."""
    adapter = await backend.open()
    ref = await backend.human_ticket("Заявка от аналитика 🙋")
    incident_id = new_incident_id()
    await backend.make_searchable()
    assert await adapter.find_ticket(incident_id) is None

    await adapter.set_correlation(ref, incident_id)
    await backend.make_searchable()

    assert same_ticket(await adapter.find_ticket(incident_id), ref)


async def test_find_tickets_by_issue_type(backend: ContractBackend) -> None:
    """find_tickets by issue type returns a person's ticket created after `since`, and not an older one."""
    adapter = await backend.open()
    older = await backend.human_ticket("Старая заявка")
    since = await backend.next_moment()

    newer = await backend.human_ticket("Новая заявка 🆕", issue_type=backend.issue_type)
    await backend.make_searchable()
    found = await adapter.find_tickets(TicketQuery(project=backend.project, issue_type=backend.issue_type), since)

    keys = [ref.key for ref in found]
    assert newer.key in keys
    assert older.key not in keys


async def test_find_tickets_by_label(backend: ContractBackend) -> None:
    """find_tickets by label returns a person's labelled ticket and not an unlabelled one."""
    adapter = await backend.open()
    if not adapter.capabilities.labels:
        pytest.skip("the ticket system has no labels")
    since = await backend.next_moment()

    labelled = await backend.human_ticket("С меткой", label="mdr-request")
    plain = await backend.human_ticket("Без метки")
    await backend.make_searchable()
    found = await adapter.find_tickets(TicketQuery(project=backend.project, label="mdr-request"), since)

    keys = [ref.key for ref in found]
    assert labelled.key in keys
    assert plain.key not in keys


# Checks and accounts


async def test_check_passes_valid_settings(backend: ContractBackend) -> None:
    """check reports nothing for the backend's issue type and priorities."""
    adapter = await backend.open()

    assert await adapter.check(backend.issue_type, backend.priorities) == []


async def test_check_reports_missing_names(backend: ContractBackend) -> None:
    """check names a missing issue type, an unknown priority and a missing project."""
    adapter = await backend.open()

    missing_type = await adapter.check(MISSING_NAME, backend.priorities)
    unknown_priority = await adapter.check(backend.issue_type, [backend.priorities[0], MISSING_NAME])
    missing_project = await adapter.check(backend.issue_type, backend.priorities, project=MISSING_NAME)

    assert any(MISSING_NAME in problem for problem in missing_type), missing_type
    assert any(MISSING_NAME in problem for problem in unknown_priority), unknown_priority
    assert any(MISSING_NAME in problem for problem in missing_project), missing_project


async def test_account_groups_of_person(backend: ContractBackend) -> None:
    """account_groups returns a set with the person's groups."""
    adapter = await backend.open()

    groups = await adapter.account_groups(backend.person.id)

    assert isinstance(groups, set)
    assert backend.person_groups <= groups
