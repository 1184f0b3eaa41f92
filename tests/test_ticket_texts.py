"""Texts the connector writes on tickets and in MDR, in Russian, against both simulators on loopback.

Each flow checks that the text is in Russian, that its machine-read parts
(markers, the MDR footer, command keywords, ids, file names, status names)
are the same as in English, and that three cycles add nothing more. The
last tests switch the language between runs and check that notes written
in the earlier language are still taken for the connector's own.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from typing import Any

import pytest
from fixtures_mdr import MDR_CLIENT_ID, MDR_CONNECTION_NAME
from fixtures_sync import SyncHarness

from mdr_connector.adapters.jira.adapter import MAX_TEXT_LENGTH, _truncated
from mdr_connector.connector import i18n
from mdr_connector.connector.errors import OutcomeUnknownError
from mdr_connector.connector.mapping import parse_mdr_footer
from mdr_connector.connector.tickets import MDR_ORIGIN, NOTICE_ORIGIN, RESPONSE_ORIGIN

APPROVER_ID = "557058:analyst"
OTHER_ID = "557058:other"
OTHER_NAME = "Пётр Сидоров"
TICKET_SEARCH_DELAY = 31
EDIT_COMMENT = "PUT /rest/api/2/issue/{issue}/comment/{comment}"
ADD_COMMENT = "POST /rest/api/2/issue/{issue}/comment"


@pytest.fixture
def russian() -> Iterator[None]:
    """The connector writes in Russian during the test; English is restored afterwards."""
    i18n.set_language("ru")
    yield
    i18n.set_language("en")


def marker_of(comment: Any) -> dict[str, str]:
    return comment.properties.get("mdr-connector", {})


def with_origin(issue: Any, origin: str) -> list[Any]:
    return [comment for comment in issue.comments if marker_of(comment).get("origin") == origin]


def wiki_text(wiki: str) -> str:
    """Jira wiki markup without the backslash escapes that the Markdown conversion adds."""
    return re.sub(r"\\(.)", r"\1", wiki)


def mdr_text(comment: dict[str, Any]) -> str:
    """The words of an MDR comment, which MDR stores as HTML."""
    return " ".join(html.unescape(re.sub(r"<[^>]*>", " ", comment["text"])).split())


def connector_mdr_comments(harness: SyncHarness, incident_id: str) -> list[dict[str, Any]]:
    return [c for c in harness.mdr_comments(incident_id) if c["author_name"] == MDR_CONNECTION_NAME]


def mdr_response(harness: SyncHarness, incident_id: str, response_id: str) -> dict[str, Any]:
    responses = harness.mdr_sim.incident(MDR_CLIENT_ID, incident_id)["responses"]
    [found] = [response for response in responses if response["response_id"] == response_id]
    return found


def comment_counts(harness: SyncHarness, incident_id: str) -> tuple[int, int]:
    """The number of comments on the incident's issue and in MDR."""
    return len(harness.issue_for(incident_id).comments), len(harness.mdr_comments(incident_id))


async def linked_response(harness: SyncHarness) -> tuple[str, str, Any]:
    """Seed an incident with one response, sync it, and return the incident id, the response id and the engine."""
    incident = harness.seed()
    response = harness.mdr_sim.add_response(MDR_CLIENT_ID, incident["incident_id"])
    sync = await harness.cycles(1)
    return incident["incident_id"], response["response_id"], sync


async def files_kept_back(harness: SyncHarness) -> tuple[str, Any, dict[str, Any], Any]:
    """Add an MDR file and a Jira file that the default filter denies, and run three cycles.

    Returns the incident id, the issue, the MDR attachment and the Jira attachment.
    """
    incident_id = harness.seed()["incident_id"]
    await harness.cycles(1)
    issue = harness.issue_for(incident_id)
    mdr_file = harness.mdr_sim.add_attachment(
        MDR_CLIENT_ID, incident_id, "сборщик.exe", b"MZ" * 1000, author="Анна Кузнецова"
    )
    jira_file = harness.jira.sim.add_attachment(issue.key, "cleanup.ps1", b"Remove-Item")
    harness.advance(TICKET_SEARCH_DELAY)
    await harness.cycles(3)
    return incident_id, issue, mdr_file, jira_file


async def refused_command(harness: SyncHarness) -> tuple[str, str, Any]:
    """Let a person off the allow-list send a confirm command, over three cycles.

    Returns the incident id, the response id and the engine.
    """
    harness.use_mapping(responses={"approvers": [APPROVER_ID]})
    harness.jira.sim.add_user(account_id=OTHER_ID, name="other", display_name=OTHER_NAME)
    incident_id, response_id, sync = await linked_response(harness)
    issue = harness.issue_for(incident_id)
    harness.jira.sim.add_comment(issue.key, f"/mdr confirm {response_id} изолировать хост", author="other")
    harness.advance(TICKET_SEARCH_DELAY)
    await harness.cycles(3, sync)
    return incident_id, response_id, sync


# In Russian


async def test_filtered_attachment_notices(harness: SyncHarness, russian: None) -> None:
    """Files the filter keeps back get one Russian notice on each side, with the marker and footer of English ones."""
    incident_id, issue, mdr_file, jira_file = await files_kept_back(harness)

    [ticket_notice] = with_origin(issue, NOTICE_ORIGIN)
    assert marker_of(ticket_notice)["source_id"] == f"attachment:{mdr_file['attachment_id']}"
    text = wiki_text(ticket_notice.body)
    assert "Вложение" in text
    assert "не скопировано сюда" in text
    assert "файлы с расширением .exe не копируются (attachments.to_ticket.deny_extensions)" in text
    assert "сборщик.exe" in text
    assert "2.0 КиБ (2000 Б)" in text
    assert "автор: Анна Кузнецова" in text
    assert f"https://mdr.kaspersky.com/incidents/{incident_id}" in text

    [mdr_notice] = connector_mdr_comments(harness, incident_id)
    assert parse_mdr_footer(mdr_notice["text"]).source_id == f"attachment:{jira_file.id}"
    text = mdr_text(mdr_notice)
    assert "не скопировано в MDR" in text
    assert "cleanup.ps1" in text
    assert "11 Б" in text
    assert f"mdr-connector: jira comment attachment:{jira_file.id}" in text

    assert issue.attachments == [jira_file]
    assert harness.mdr_sim.call_counts["attachments/upload"] == 0


async def test_response_view(harness: SyncHarness, russian: None) -> None:
    """A response view is in Russian, and its status, ids and command lines stay as they are in English."""
    incident_id, response_id, sync = await linked_response(harness)
    await harness.cycles(2, sync)

    [view] = with_origin(harness.issue_for(incident_id), RESPONSE_ORIGIN)
    assert marker_of(view)["source_id"] == response_id
    text = wiki_text(view.body)
    assert "Ответное действие Kaspersky MDR" in text
    assert "статус *New*" in text
    assert "RUN_SCRIPT" in text
    assert f"/mdr confirm {response_id} REASON" in text
    assert f"/mdr decline {response_id} REASON" in text
    assert "заменив REASON своей причиной" in text
    assert harness.jira.sim.calls[EDIT_COMMENT] == 0


async def test_refused_command_reply(harness: SyncHarness, russian: None) -> None:
    """A refused command gets one Russian reply, nothing goes to MDR, and the audit record stays English."""
    incident_id, response_id, _sync = await refused_command(harness)

    issue = harness.issue_for(incident_id)
    [reply] = with_origin(issue, NOTICE_ORIGIN)
    assert marker_of(reply)["source_id"].startswith("command:")
    text = wiki_text(reply.body)
    assert f"Пользователь {OTHER_NAME}" in text
    assert OTHER_ID in text
    assert "не может подтверждать или отклонять ответные действия MDR" in text
    assert "responses.approvers" in text
    assert "В Kaspersky MDR ничего не отправлено." in text

    assert harness.mdr_sim.call_counts["response/update"] == 0
    assert mdr_response(harness, incident_id, response_id)["status"] == "New"
    [decision] = await harness.store.list_decisions("main", incident_id=incident_id)
    assert decision.outcome == "refused"
    assert "may not confirm or decline MDR responses" in decision.error


async def test_russian_notes_not_echoed(harness: SyncHarness, russian: None) -> None:
    """Three more cycles add nothing: Russian notices, views and replies are never copied to the other side."""
    incident_id, _response_id, _sync = await refused_command(harness)
    harness.mdr_sim.add_attachment(MDR_CLIENT_ID, incident_id, "tool.exe", b"MZ", author="Анна Кузнецова")
    await harness.cycles(1)
    before = comment_counts(harness, incident_id)
    posts, edits = harness.jira.sim.calls[ADD_COMMENT], harness.jira.sim.calls[EDIT_COMMENT]

    harness.advance(TICKET_SEARCH_DELAY)
    await harness.cycles(3)

    assert comment_counts(harness, incident_id) == before
    assert harness.jira.sim.calls[ADD_COMMENT] == posts
    assert harness.jira.sim.calls[EDIT_COMMENT] == edits
    # Only the person's command went to MDR: no reply, view or notice did,
    # and the command's MDR copy did not come back.
    [copied] = harness.mdr_comments(incident_id)
    assert "/mdr confirm" in copied["text"]
    assert with_origin(harness.issue_for(incident_id), MDR_ORIGIN) == []


async def test_edit_note_to_mdr(harness: SyncHarness, russian: None) -> None:
    """An edit of a copied ticket comment reaches MDR as one Russian note with the English footer."""
    incident_id = harness.seed()["incident_id"]
    await harness.cycles(1)
    issue = harness.issue_for(incident_id)
    comment = harness.jira.sim.add_comment(issue.key, "первый вариант")
    harness.advance(TICKET_SEARCH_DELAY)
    await harness.cycles(1)
    harness.jira.sim.edit_comment(comment.id, "исправленный вариант")
    harness.advance(TICKET_SEARCH_DELAY)

    await harness.cycles(3)

    [copy, note] = harness.mdr_comments(incident_id)
    assert "первый вариант" in mdr_text(copy)
    text = mdr_text(note)
    assert "Изменено в Jira. Новый текст:" in text
    assert "исправленный вариант" in text
    assert parse_mdr_footer(note["text"]).source_id.startswith(f"{comment.id}:edited:")
    assert len(harness.issue_for(incident_id).comments) == 1


def test_truncation_note() -> None:
    """A text cut to Jira's limit ends in the note of the current language and still fits."""
    i18n.set_language("ru")
    try:
        cut = _truncated("а" * (MAX_TEXT_LENGTH + 100))
    finally:
        i18n.set_language("en")

    assert cut.endswith("\n\n… (сокращено mdr-connector: полный текст — в Kaspersky MDR)")
    assert len(cut.encode("utf-16-le")) // 2 <= MAX_TEXT_LENGTH


# Across a language switch


async def test_english_notes_recognised_after_switch(harness: SyncHarness) -> None:
    """Notes, views and replies written in English are the connector's own after a switch to Russian.

    Nothing is posted again or copied to the other side, and a status change
    edits the English view into a Russian one instead of posting a second view.
    """
    incident_id, response_id, _sync = await refused_command(harness)
    harness.mdr_sim.add_attachment(MDR_CLIENT_ID, incident_id, "tool.exe", b"MZ", author="Анна Кузнецова")
    issue = harness.issue_for(incident_id)
    harness.jira.sim.add_attachment(issue.key, "cleanup.ps1", b"Remove-Item")
    harness.advance(TICKET_SEARCH_DELAY)
    await harness.cycles(2)
    assert any("was not copied here" in wiki_text(notice.body) for notice in with_origin(issue, NOTICE_ORIGIN))
    before = comment_counts(harness, incident_id)
    edits = harness.jira.sim.calls[EDIT_COMMENT]

    i18n.set_language("ru")
    try:
        harness.advance(TICKET_SEARCH_DELAY)
        restarted = await harness.engine()
        await harness.cycles(3, restarted)
        assert comment_counts(harness, incident_id) == before
        assert harness.jira.sim.calls[EDIT_COMMENT] == edits

        await restarted.mdr.update_response(response_id, "Declined", "declined in the MDR console")
        harness.advance(2)
        await harness.cycles(3, restarted)
    finally:
        i18n.set_language("en")

    [view] = with_origin(issue, RESPONSE_ORIGIN)
    assert "Ответное действие Kaspersky MDR" in wiki_text(view.body)
    assert "статус *Declined*" in wiki_text(view.body)
    assert harness.jira.sim.calls[EDIT_COMMENT] == edits + 1
    assert comment_counts(harness, incident_id) == before


async def test_decision_sent_before_switch_found(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A decision sent in English whose reply was lost is found applied after a switch to Russian, not failed."""
    harness.use_mapping(responses={"approvers": [APPROVER_ID]})
    incident_id, response_id, sync = await linked_response(harness)
    issue = harness.issue_for(incident_id)
    real_update = sync.mdr.update_response

    async def update_then_lose_reply(*args: Any, **kwargs: Any) -> None:
        await real_update(*args, **kwargs)
        raise OutcomeUnknownError("the reply of response/update was lost")

    monkeypatch.setattr(sync.mdr, "update_response", update_then_lose_reply)
    harness.jira.sim.add_comment(issue.key, f"/mdr confirm {response_id} the host may be isolated")
    harness.advance(TICKET_SEARCH_DELAY)
    await harness.cycles(1, sync)
    [decision] = await harness.store.list_decisions("main", incident_id=incident_id)
    assert decision.outcome == "pending"
    assert "(by " in mdr_response(harness, incident_id, response_id)["comment"]

    i18n.set_language("ru")
    try:
        harness.advance(5)
        await harness.cycles(3, await harness.engine())
    finally:
        i18n.set_language("en")

    assert harness.mdr_sim.call_counts["response/update"] == 1
    [decision] = await harness.store.list_decisions("main", incident_id=incident_id)
    assert decision.outcome == "sent"
    [echo] = with_origin(issue, NOTICE_ORIGIN)
    assert "*подтверждено*" in echo.body
    assert "the host may be isolated" in wiki_text(echo.body)
