"""The Redmine ticket adapter against the real Redmine from .ci/redmine.py, and its client's error mapping.

Each test gets a project of its own (see fixtures_redmine.create_project)
with one issue by the person in it, because an account that is not an
administrator finds the correlation custom field only on an issue.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

pytest.register_assert_rewrite("redmine_helpers")

import aiohttp  # noqa: E402
from aioresponses import aioresponses  # noqa: E402
from fixtures_redmine import RedmineServer, create_project, delete_project  # noqa: E402
from redmine_helpers import (  # noqa: E402
    block,
    human_attach,
    human_issue,
    human_note,
    human_update,
    read_issue,
    redmine_settings,
    run_relay,
    unique,
)

from mdr_connector.adapters.redmine.adapter import MAX_SUBJECT_LENGTH, RedmineTicketAdapter, settled_time  # noqa: E402
from mdr_connector.adapters.redmine.client import RedmineClient  # noqa: E402
from mdr_connector.adapters.redmine.records import query_time, whole_second  # noqa: E402
from mdr_connector.connector.config import RedmineSettings  # noqa: E402
from mdr_connector.connector.retry import RateGate  # noqa: E402
from mdr_connector.connector.errors import (  # noqa: E402
    ConfigError,
    CredentialsRejectedError,
    MisconfiguredError,
    OutcomeUnknownError,
    RateLimitedError,
    RejectedError,
    RemoteUnavailableError,
)
from mdr_connector.connector.tickets import (  # noqa: E402
    MDR_ORIGIN,
    AttachmentUpload,
    CommentDraft,
    CommentVisibility,
    SyncMarker,
    TicketAdapter,
    TicketDraft,
    TicketFields,
    TicketQuery,
    TicketRef,
)

TEXT = "Хост **ws-01** изолирован 🔒, см. `cmd.exe`."
MakeAdapter = Callable[..., Awaitable[RedmineTicketAdapter]]


@dataclass
class Project:
    """The test's own project: its identifier, numeric id, and the person's seed issue."""

    identifier: str
    id: int
    seed_issue: int


@pytest.fixture
def project(redmine_server: RedmineServer, redmine_project: dict[str, Any]) -> Project:
    seed = human_issue(redmine_server, redmine_project["identifier"])
    return Project(redmine_project["identifier"], redmine_project["id"], seed["id"])


@pytest.fixture
async def make_adapter(
    redmine_server: RedmineServer, project: Project, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[MakeAdapter]:
    """Build and open adapters for the test's project; every one is closed after the test."""
    adapters: list[RedmineTicketAdapter] = []

    async def make(*, project_identifier: str | None = None, open_it: bool = True, **settings: Any) -> RedmineTicketAdapter:
        adapter = RedmineTicketAdapter(
            redmine_settings(redmine_server, monkeypatch, **settings), project=project_identifier or project.identifier
        )
        adapters.append(adapter)
        if open_it:
            await adapter.open()
        return adapter

    yield make
    for adapter in adapters:
        await adapter.close()


@pytest.fixture
async def adapter(make_adapter: MakeAdapter) -> RedmineTicketAdapter:
    return await make_adapter()


def draft(project: Project, incident_id: str | None = None, **fields: Any) -> TicketDraft:
    values: dict[str, Any] = {
        "summary": "[MDR-7] Suspicious PowerShell",
        "description": "Host **ws01** ran an encoded command.",
        "priority": "High",
        "labels": (),
    }
    values.update(fields)
    return TicketDraft(
        incident_id=incident_id or unique("inc").replace(" ", "-"),
        project=project.identifier,
        issue_type="Bug",
        fields=TicketFields(**values),
    )


def note(source_id: str, body: str = "Checked the host.", *, internal: bool = False) -> CommentDraft:
    visibility = CommentVisibility(type="internal") if internal else None
    return CommentDraft(body=body, marker=SyncMarker(origin=MDR_ORIGIN, source_id=source_id), visibility=visibility)


async def after_second_of(moment: str) -> datetime:
    """Wait until the clock is past the whole second of Redmine's time `moment`, and return the time then."""
    deadline = datetime.fromisoformat(moment.replace("Z", "+00:00")) + timedelta(seconds=1)
    while (now := datetime.now(timezone.utc)) < deadline:
        await asyncio.sleep((deadline - now).total_seconds() + 0.01)
    return now


# --- opening ---------------------------------------------------------------------


async def test_adapter_matches_protocol(adapter: RedmineTicketAdapter) -> None:
    """The adapter implements the whole TicketAdapter protocol and describes Redmine's capabilities."""
    assert isinstance(adapter, TicketAdapter)
    assert adapter.system == "redmine"
    assert adapter.capabilities.edit_comments is True
    assert adapter.capabilities.labels is False
    assert adapter.capabilities.components is False
    assert adapter.capabilities.visibility_types == frozenset({"internal"})
    assert adapter.search_delay_seconds() == 0


async def test_open_returns_own_account(adapter: RedmineTicketAdapter, redmine_server: RedmineServer) -> None:
    """open returns the service account by its numeric user id and finds the custom field without admin rights."""
    assert adapter.account is not None
    assert adapter.account.id == str(redmine_server.service_user_id)
    assert adapter.account.display_name == "MDR Connector"
    assert adapter.field_id == redmine_server.custom_field_id


async def test_open_rejects_wrong_key(make_adapter: MakeAdapter) -> None:
    """An unknown API key is CredentialsRejectedError that names the key setting."""
    with pytest.raises(CredentialsRejectedError) as caught:
        await make_adapter(key="f" * 40)

    assert "ticket.api_key" in str(caught.value)


async def test_open_reports_missing_custom_field(make_adapter: MakeAdapter) -> None:
    """A correlation field name that no custom field has stops the connection, naming the field and the fix."""
    with pytest.raises(MisconfiguredError) as caught:
        await make_adapter(correlation_field="No such field")

    assert "'No such field'" in str(caught.value)
    assert "Custom fields" in str(caught.value)


async def test_open_reports_missing_project(make_adapter: MakeAdapter) -> None:
    """A project the account cannot see stops the connection."""
    with pytest.raises(MisconfiguredError) as caught:
        await make_adapter(project_identifier="no-such-project")

    assert "'no-such-project'" in str(caught.value)


async def test_open_uses_admin_list_for_admin(make_adapter: MakeAdapter, redmine_server: RedmineServer) -> None:
    """An administrator's key finds the field in the custom field list too."""
    adapter = await make_adapter(key=redmine_server.admin_key)

    assert adapter.field_id == redmine_server.custom_field_id


# --- tickets -------------------------------------------------------------------


async def test_create_and_find_ticket(adapter: RedmineTicketAdapter, project: Project, redmine_server: RedmineServer) -> None:
    """create_ticket sets tracker, priority, subject, Textile description and the custom field in one request."""
    ticket = draft(project)

    ref = await adapter.create_ticket(ticket)

    issue = read_issue(redmine_server, ref.id)
    assert ref == TicketRef(key=str(issue["id"]), id=str(issue["id"]), url=f"{redmine_server.url}/issues/{issue['id']}")
    assert issue["subject"] == "[MDR-7] Suspicious PowerShell"
    assert issue["description"] == "Host *ws01* ran an encoded command."
    assert issue["tracker"]["name"] == "Bug"
    assert issue["priority"]["name"] == "High"
    assert issue["author"]["id"] == redmine_server.service_user_id
    [value] = [item["value"] for item in issue["custom_fields"] if item["id"] == redmine_server.custom_field_id]
    assert value == ticket.incident_id
    assert await adapter.find_ticket(ticket.incident_id) == ref


async def test_find_ticket_needs_exact_value(adapter: RedmineTicketAdapter, project: Project) -> None:
    """Only the exact incident id matches: no other case, prefix or extension of it."""
    ticket = draft(project, incident_id="Abc-find-1")
    await adapter.create_ticket(ticket)
    await adapter.create_ticket(draft(project, incident_id="Abc-find-10"))

    assert await adapter.find_ticket("abc-find-1") is None
    assert await adapter.find_ticket("Abc-find") is None
    assert (await adapter.find_ticket("Abc-find-1")) is not None
    assert await adapter.find_ticket(unique("missing").replace(" ", "-")) is None


async def test_find_ticket_reads_operator_characters(adapter: RedmineTicketAdapter, project: Project) -> None:
    """An id starting with a filter operator or holding `|` is matched as written."""
    for incident_id in ("!~odd|id", "*"):
        ref = await adapter.create_ticket(draft(project, incident_id=incident_id))

        assert await adapter.find_ticket(incident_id) == ref


async def test_find_ticket_finds_oldest_duplicate(
    adapter: RedmineTicketAdapter, project: Project, redmine_server: RedmineServer
) -> None:
    """Two issues with the same incident id: the older one is returned."""
    ticket = draft(project)
    first = await adapter.create_ticket(ticket)
    human_issue(redmine_server, project.identifier, custom_fields=[{"id": redmine_server.custom_field_id, "value": ticket.incident_id}])

    assert await adapter.find_ticket(ticket.incident_id) == first


async def test_subject_cut_to_limit(adapter: RedmineTicketAdapter, project: Project, redmine_server: RedmineServer) -> None:
    """A summary over 255 characters is cut to 254 and ends with an ellipsis, on one line."""
    ref = await adapter.create_ticket(draft(project, summary="Ж" * 300 + "\nsecond line"))

    subject = read_issue(redmine_server, ref.id)["subject"]
    assert len(subject) == MAX_SUBJECT_LENGTH
    assert subject == "Ж" * 254 + "…"


@pytest.mark.parametrize("formatting", ["textile", "common_mark"])
async def test_text_round_trip(make_adapter: MakeAdapter, project: Project, formatting: str) -> None:
    """Cyrillic, emoji and Markdown survive the way to Redmine and back in subject, description and note."""
    adapter = await make_adapter(text_formatting=formatting)
    ref = await adapter.create_ticket(draft(project, summary="Инцидент 🚨 на ws-01", description=TEXT))
    await adapter.add_comment(ref, note("c-1", TEXT))

    state = await adapter.get_state(ref, ["summary", "description"])
    [comment] = await adapter.list_comments(ref)

    assert state.values["summary"] == "Инцидент 🚨 на ws-01"
    assert state.values["description"] == TEXT
    assert comment.body == TEXT


async def test_textile_by_person_becomes_markdown(
    adapter: RedmineTicketAdapter, project: Project, redmine_server: RedmineServer
) -> None:
    """A person's Textile note is read as the same formatting in Markdown."""
    ref = await adapter.create_ticket(draft(project))
    human_note(redmine_server, ref.id, 'Isolated *ws-01* and ran @whoami@.\n\n* first\n* second\n\n"docs":https://example.com')

    [comment] = await adapter.list_comments(ref)

    assert comment.body == "Isolated **ws-01** and ran `whoami`.\n\n- first\n- second\n\n[docs](https://example.com)"


async def test_update_ticket_skips_fields(adapter: RedmineTicketAdapter, project: Project, redmine_server: RedmineServer) -> None:
    """update_ticket writes subject, description, priority and `fields`, except the skipped ones and the correlation field."""
    ticket = draft(project)
    ref = await adapter.create_ticket(ticket)
    fields = TicketFields(
        summary="New subject",
        description="New *text*",
        priority="Low",
        labels=("ignored",),
        extra={"done_ratio": 30, "estimated_hours": 2, f"cf_{redmine_server.custom_field_id}": "overwritten"},
    )

    await adapter.update_ticket(ref, fields, skip=frozenset({"priority", "estimated_hours"}))

    issue = read_issue(redmine_server, ref.id)
    assert issue["subject"] == "New subject"
    assert issue["description"] == "New _text_"
    assert issue["priority"]["name"] == "High"
    assert issue["done_ratio"] == 30
    assert issue["estimated_hours"] is None
    assert await adapter.find_ticket("overwritten") is None
    assert await adapter.find_ticket(ticket.incident_id) == ref


async def test_update_ticket_sends_nothing_when_all_skipped(
    adapter: RedmineTicketAdapter, project: Project, redmine_server: RedmineServer
) -> None:
    """Skipping every field leaves the issue's updated_on unchanged."""
    ref = await adapter.create_ticket(draft(project))
    before = read_issue(redmine_server, ref.id)["updated_on"]
    await after_second_of(before)

    await adapter.update_ticket(
        ref, TicketFields("x", "y", "Low", ()), skip=frozenset({"summary", "description", "priority"})
    )

    assert read_issue(redmine_server, ref.id)["updated_on"] == before


# --- changes ---------------------------------------------------------------------


async def test_changed_tickets_since_bound(
    adapter: RedmineTicketAdapter, project: Project, redmine_server: RedmineServer
) -> None:
    """Issues updated at or after `since` that carry the field or that the connector wrote; others are left out."""
    field_id = redmine_server.custom_field_id
    old = await adapter.create_ticket(draft(project))
    since = await after_second_of(read_issue(redmine_server, old.id)["updated_on"])

    linked = await adapter.create_ticket(draft(project))
    cleared = await adapter.create_ticket(draft(project))
    human_update(redmine_server, cleared.id, custom_fields=[{"id": field_id, "value": ""}])
    by_person = human_issue(redmine_server, project.identifier, custom_fields=[{"id": field_id, "value": "person-set"}])
    unrelated = human_issue(redmine_server, project.identifier)

    changes = await adapter.changed_tickets(since)

    keys = [change.ref.key for change in changes]
    assert sorted(keys) == sorted([linked.key, cleared.key, str(by_person["id"])])
    assert old.key not in keys
    assert str(unrelated["id"]) not in keys
    assert all(change.updated >= since.replace(microsecond=0) for change in changes)
    assert [change.updated for change in changes] == sorted(change.updated for change in changes)


async def test_changed_tickets_sees_person_note(
    adapter: RedmineTicketAdapter, project: Project, redmine_server: RedmineServer
) -> None:
    """A person's note moves the issue's updated_on, so the issue is found again."""
    ref = await adapter.create_ticket(draft(project))
    since = await after_second_of(read_issue(redmine_server, ref.id)["updated_on"])
    assert await adapter.changed_tickets(since) == []

    human_note(redmine_server, ref.id, "Looking into it.")

    assert [change.ref for change in await adapter.changed_tickets(since)] == [ref]


async def test_changed_tickets_reads_every_page(make_adapter: MakeAdapter, project: Project) -> None:
    """With two issues per page, five issues take three pages and all are returned once."""
    adapter = await make_adapter()
    adapter.page_size = 2
    since = datetime.now(timezone.utc) - timedelta(seconds=1)
    refs = [await adapter.create_ticket(draft(project)) for _ in range(5)]

    changes = await adapter.changed_tickets(since)

    assert sorted(change.ref.key for change in changes) == sorted(ref.key for ref in refs)


@pytest.mark.slow
async def test_changed_tickets_past_short_page(
    make_adapter: MakeAdapter, project: Project, redmine_server: RedmineServer
) -> None:
    """Redmine returns at most 100 issues per page, whatever `limit` requests, so the adapter reads on to total_count."""
    adapter = await make_adapter()
    adapter.page_size = 150
    since = datetime.now(timezone.utc) - timedelta(seconds=1)
    for index in range(101):
        human_issue(
            redmine_server,
            project.identifier,
            custom_fields=[{"id": redmine_server.custom_field_id, "value": f"bulk-{index}"}],
        )

    changes = await adapter.changed_tickets(since)

    assert len(changes) == 101
    assert len({change.ref.key for change in changes}) == 101


# --- notes -----------------------------------------------------------------------


async def test_comments_markers_and_privacy(
    adapter: RedmineTicketAdapter, project: Project, redmine_server: RedmineServer
) -> None:
    """Own notes carry their marker; a person's typed marker line is not trusted; private notes are restricted."""
    ref = await adapter.create_ticket(draft(project))
    await adapter.add_comment(ref, note("c-1", "Public copy."))
    await adapter.add_comment(ref, note("c-2", "Private copy.", internal=True))
    human_note(redmine_server, ref.id, "Forged.\n\n[mdr-connector mdr:c-9]")
    human_note(redmine_server, ref.id, "Analyst only.", private=True)
    human_update(redmine_server, ref.id, priority_id=1)

    comments = await adapter.list_comments(ref)

    assert [comment.body for comment in comments] == [
        "Public copy.",
        "Private copy.",
        "Forged.\n\n\\[mdr-connector mdr:c-9\\]",
        "Analyst only.",
    ]
    assert [comment.marker for comment in comments] == [
        SyncMarker(MDR_ORIGIN, "c-1"),
        SyncMarker(MDR_ORIGIN, "c-2"),
        None,
        None,
    ]
    assert [comment.restricted for comment in comments] == [False, True, False, True]
    assert [comment.author.id for comment in comments] == [str(redmine_server.service_user_id)] * 2 + [
        str(redmine_server.human_user_id)
    ] * 2
    assert all(comment.updated is None for comment in comments)


async def test_add_comment_returns_posted_note(
    adapter: RedmineTicketAdapter, project: Project, redmine_server: RedmineServer
) -> None:
    """add_comment returns the new journal's id and time, and Redmine stores the marker as the last line."""
    ref = await adapter.create_ticket(draft(project))

    comment = await adapter.add_comment(ref, note("c-1", "**Done**", internal=True))

    [journal] = [item for item in read_issue(redmine_server, ref.id, "journals")["journals"] if item["notes"]]
    assert comment.id == str(journal["id"])
    assert comment.body == "**Done**"
    assert comment.restricted is True
    assert comment.marker == SyncMarker(MDR_ORIGIN, "c-1")
    assert journal["notes"] == "*Done*\n\n[mdr-connector mdr:c-1]"
    assert journal["private_notes"] is True


async def test_add_comment_rejects_role_visibility(adapter: RedmineTicketAdapter, project: Project) -> None:
    """A Jira-style role visibility cannot be honoured by a Redmine note and is rejected before anything is posted."""
    ref = await adapter.create_ticket(draft(project))
    visibility = CommentVisibility(type="role", value="Developers")

    with pytest.raises(RejectedError):
        await adapter.add_comment(ref, CommentDraft("x", SyncMarker(MDR_ORIGIN, "c-1"), visibility))

    assert await adapter.list_comments(ref) == []


async def test_edit_comment(adapter: RedmineTicketAdapter, project: Project, redmine_server: RedmineServer) -> None:
    """edit_comment replaces an own note's text and keeps its marker and privacy."""
    ref = await adapter.create_ticket(draft(project))
    posted = await adapter.add_comment(ref, note("c-1", "First.", internal=True))

    edited = await adapter.edit_comment(ref, posted.id, note("c-1", "Second _take_."))

    [comment] = await adapter.list_comments(ref)
    assert edited.id == posted.id
    assert comment.body == "Second *take*."
    assert comment.marker == SyncMarker(MDR_ORIGIN, "c-1")
    assert comment.restricted is True


async def test_edit_comment_of_person_rejected(
    adapter: RedmineTicketAdapter, project: Project, redmine_server: RedmineServer
) -> None:
    """Redmine refuses to let the connector edit a person's note (HTTP 403)."""
    ref = await adapter.create_ticket(draft(project))
    journal_id = human_note(redmine_server, ref.id, "Mine.")

    with pytest.raises(RejectedError) as caught:
        await adapter.edit_comment(ref, str(journal_id), note("c-1", "Overwritten."))

    assert caught.value.status == 403
    [comment] = await adapter.list_comments(ref)
    assert comment.body == "Mine."


# --- attachments -----------------------------------------------------------------


async def test_upload_and_download_multi_mb(adapter: RedmineTicketAdapter, project: Project, tmp_path: Path) -> None:
    """A 3 MB file goes up as a stream and comes back byte for byte."""
    ref = await adapter.create_ticket(draft(project))
    data = os.urandom(3 * 1024 * 1024 + 7)
    source = tmp_path / "dump.bin"
    source.write_bytes(data)

    uploaded = await adapter.upload_attachment(ref, AttachmentUpload("отчёт 📎.bin", source, len(data)))
    [listed] = await adapter.list_attachments(ref)
    written = await adapter.download_attachment(listed, tmp_path / "back.bin")

    assert uploaded == listed
    assert listed.filename == "отчёт 📎.bin"
    assert listed.size == len(data)
    assert listed.author == adapter.account
    assert written == len(data)
    assert (tmp_path / "back.bin").read_bytes() == data
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".redmine-download-")] == []


async def test_download_person_attachment(
    adapter: RedmineTicketAdapter, project: Project, redmine_server: RedmineServer, tmp_path: Path
) -> None:
    """A person's attachment is listed with the person as author and downloads intact."""
    ref = await adapter.create_ticket(draft(project))
    attachment_id = human_attach(redmine_server, ref.id, "evidence.txt", b"hello")

    [listed] = await adapter.list_attachments(ref)
    await adapter.download_attachment(listed, tmp_path / "evidence.txt")

    assert listed.id == str(attachment_id)
    assert listed.author.id == str(redmine_server.human_user_id)
    assert (tmp_path / "evidence.txt").read_bytes() == b"hello"


async def test_upload_over_limit_rejected(
    adapter: RedmineTicketAdapter, project: Project, redmine_server: RedmineServer, tmp_path: Path
) -> None:
    """A file above Redmine's maximum attachment size is RejectedError 422, and nothing is attached."""
    ref = await adapter.create_ticket(draft(project))
    size = redmine_server.attachment_max_size_kb * 1024 + 1
    source = tmp_path / "big.bin"
    source.write_bytes(b"\0" * size)

    with pytest.raises(RejectedError) as caught:
        await adapter.upload_attachment(ref, AttachmentUpload("big.bin", source, size))

    assert caught.value.status == 422
    assert await adapter.list_attachments(ref) == []
    assert await adapter.attachment_limit() == redmine_server.attachment_max_size_kb * 1024


async def test_download_from_other_origin_refused(
    make_adapter: MakeAdapter, project: Project, redmine_server: RedmineServer, tmp_path: Path
) -> None:
    """Behind a relay that keeps Redmine's Host, content_url names another origin, and the download is refused."""
    async with run_relay(redmine_server) as relay:
        adapter = await make_adapter(url=relay.url)
        ref = await adapter.create_ticket(draft(project))
        human_attach(redmine_server, ref.id, "evidence.txt", b"secret")
        [listed] = await adapter.list_attachments(ref)

        with pytest.raises(RejectedError) as caught:
            await adapter.download_attachment(listed, tmp_path / "evidence.txt")

        assert "not the origin of ticket.url" in str(caught.value)
        assert not (tmp_path / "evidence.txt").exists()
        assert not any(path.startswith("GET /attachments/download/") for path in relay.forwarded)


async def test_create_reply_lost_is_outcome_unknown(
    make_adapter: MakeAdapter, project: Project, redmine_server: RedmineServer
) -> None:
    """A create whose reply is lost is OutcomeUnknownError, and find_ticket then finds the issue."""
    async with run_relay(redmine_server) as relay:
        adapter = await make_adapter(url=relay.url)
        relay.drop_after_forward.add("POST /issues.json")
        ticket = draft(project)

        with pytest.raises(OutcomeUnknownError):
            await adapter.create_ticket(ticket)

        assert await adapter.find_ticket(ticket.incident_id) is not None


# --- workflow --------------------------------------------------------------------


async def test_get_state_values_and_categories(
    adapter: RedmineTicketAdapter, project: Project, redmine_server: RedmineServer
) -> None:
    """Status category follows the tracker's default status and is_closed; values are read by several names."""
    ticket = draft(project)
    ref = await adapter.create_ticket(ticket)
    human_update(redmine_server, ref.id, assigned_to_id=redmine_server.human_user_id)
    field_ids = ["summary", "description", "priority", "status", "assigned_to", "tracker", f"cf_{redmine_server.custom_field_id}", "MDR incident id", "nope"]

    new = await adapter.get_state(ref, field_ids)
    await adapter.transition_to(ref, "In Progress")
    started = await adapter.get_state(ref)
    await adapter.transition_to(ref, "closed")
    closed = await adapter.get_state(ref)

    assert (new.status, new.status_category) == ("New", "new")
    assert (started.status, started.status_category) == ("In Progress", "indeterminate")
    assert (closed.status, closed.status_category) == ("Closed", "done")
    assert new.values == {
        "summary": "[MDR-7] Suspicious PowerShell",
        "description": "Host **ws01** ran an encoded command.",
        "priority": "High",
        "status": "New",
        "assigned_to": str(redmine_server.human_user_id),
        "tracker": "Bug",
        f"cf_{redmine_server.custom_field_id}": ticket.incident_id,
        "MDR incident id": ticket.incident_id,
        "nope": None,
    }
    assert closed.updated >= new.updated


async def test_transition_to_unknown_status_rejected(adapter: RedmineTicketAdapter, project: Project) -> None:
    """A status that does not exist is RejectedError listing the allowed statuses."""
    ref = await adapter.create_ticket(draft(project))

    with pytest.raises(RejectedError) as caught:
        await adapter.transition_to(ref, "Parked")

    assert "In Progress" in str(caught.value)
    assert (await adapter.get_state(ref)).status == "New"


async def test_transition_blocked_by_workflow(
    adapter: RedmineTicketAdapter, project: Project, redmine_server: RedmineServer
) -> None:
    """Redmine allows no closed status for an issue blocked by an open one; the error lists what is allowed."""
    ref = await adapter.create_ticket(draft(project))
    blocker = human_issue(redmine_server, project.identifier)
    block(redmine_server, blocker["id"], ref.id)

    with pytest.raises(RejectedError) as caught:
        await adapter.transition_to(ref, "Closed")

    message = str(caught.value)
    assert "'New' to 'Closed'" in message
    assert "In Progress, Resolved, Feedback" in message
    assert "Rejected" not in message
    assert (await adapter.get_state(ref)).status == "New"


async def test_transition_to_current_status_sends_nothing(
    adapter: RedmineTicketAdapter, project: Project, redmine_server: RedmineServer
) -> None:
    """Moving to the status the issue has already leaves it untouched."""
    ref = await adapter.create_ticket(draft(project))
    before = read_issue(redmine_server, ref.id)["updated_on"]
    await after_second_of(before)

    await adapter.transition_to(ref, "new")

    assert read_issue(redmine_server, ref.id)["updated_on"] == before


# --- incident requests, correlation, accounts ------------------------------------


async def test_find_tickets_by_tracker(adapter: RedmineTicketAdapter, project: Project, redmine_server: RedmineServer) -> None:
    """Issues of the tracker created at or after `since`, oldest first; a label query finds nothing."""
    old = human_issue(redmine_server, project.identifier, tracker="Support")
    since = await after_second_of(old["created_on"])
    first = human_issue(redmine_server, project.identifier, tracker="Support")
    human_issue(redmine_server, project.identifier, tracker="Feature")
    second = human_issue(redmine_server, project.identifier, tracker="Support")

    found = await adapter.find_tickets(TicketQuery(project=project.identifier, issue_type="Support"), since)
    labelled = await adapter.find_tickets(TicketQuery(project=project.identifier, label="mdr", issue_type="Support"), since)

    assert [ref.key for ref in found] == [str(first["id"]), str(second["id"])]
    assert labelled == []
    with pytest.raises(ConfigError):
        await adapter.find_tickets(TicketQuery(project=project.identifier), since)


async def test_set_correlation(adapter: RedmineTicketAdapter, project: Project, redmine_server: RedmineServer) -> None:
    """A person's issue gets the incident id; a repeat is harmless; another incident is rejected."""
    issue = human_issue(redmine_server, project.identifier)
    ref = TicketRef(key=str(issue["id"]), id=str(issue["id"]), url="")

    await adapter.set_correlation(ref, "inc-linked")
    await adapter.set_correlation(ref, "inc-linked")
    with pytest.raises(RejectedError) as caught:
        await adapter.set_correlation(ref, "inc-other")

    assert "inc-linked" in str(caught.value)
    assert (await adapter.find_ticket("inc-linked")).key == ref.key
    assert await adapter.find_ticket("inc-other") is None


async def test_set_correlation_searches_issue_project(
    adapter: RedmineTicketAdapter, redmine_server: RedmineServer
) -> None:
    """Linking an issue of a project the mapping does not name adds that project to the searches."""
    other = create_project(redmine_server, "t-other")
    try:
        issue = human_issue(redmine_server, other["identifier"])
        ref = TicketRef(key=str(issue["id"]), id=str(issue["id"]), url="")

        await adapter.set_correlation(ref, "inc-elsewhere")

        assert (await adapter.find_ticket("inc-elsewhere")).key == ref.key
        assert ref.key in [change.ref.key for change in await adapter.changed_tickets(datetime.now(timezone.utc) - timedelta(minutes=1))]
    finally:
        delete_project(redmine_server, other["id"])


async def test_account_groups(adapter: RedmineTicketAdapter, redmine_server: RedmineServer) -> None:
    """The person's groups come from the project's group memberships, without admin rights."""
    assert await adapter.account_groups(str(redmine_server.human_user_id)) == {redmine_server.group_name}
    assert await adapter.account_groups(str(redmine_server.service_user_id)) == set()
    assert await adapter.account_groups("not-a-number") == set()


async def test_get_ticket(adapter: RedmineTicketAdapter, project: Project) -> None:
    """get_ticket accepts "123" and "#123"; other text and unknown numbers are None."""
    ref = await adapter.create_ticket(draft(project))

    assert await adapter.get_ticket(ref.key) == ref
    assert await adapter.get_ticket(f"#{ref.key}") == ref
    assert await adapter.get_ticket("SEC-1") is None
    assert await adapter.get_ticket("999999999") is None


async def test_check_reports_problems(adapter: RedmineTicketAdapter, project: Project) -> None:
    """check passes a good mapping and names a missing tracker, priority and project."""
    assert await adapter.check("Bug", ["Low", "High"]) == []

    problems = await adapter.check("Incident", ["High", "Critical"])
    missing_project = await adapter.check("Bug", [], project="no-such-project")

    assert len(problems) == 2
    assert "tracker 'Incident'" in problems[0]
    assert "priority 'Critical'" in problems[1]
    assert missing_project == ["Redmine project 'no-such-project' does not exist or the connector's account is not a member of it"]


# --- client error mapping (no server) ---------------------------------------------


@dataclass(frozen=True)
class ReplyCase:
    status: int
    write: bool
    error: type[Exception]
    body: str = ""
    headers: dict[str, str] | None = None
    exception: Exception | None = None


REPLY_CASES = {
    "401": ReplyCase(401, False, CredentialsRejectedError),
    "403": ReplyCase(403, False, RejectedError),
    "404": ReplyCase(404, False, RejectedError),
    "422-errors": ReplyCase(422, True, RejectedError, body='{"errors": ["Subject cannot be blank"]}'),
    "429": ReplyCase(429, False, RateLimitedError, headers={"Retry-After": "7"}),
    "503-retry-after": ReplyCase(503, True, RateLimitedError, headers={"Retry-After": "3"}),
    "500-read": ReplyCase(500, False, RemoteUnavailableError),
    "500-write": ReplyCase(500, True, OutcomeUnknownError),
    "302": ReplyCase(302, False, RejectedError, headers={"Location": "https://redmine.example/login"}),
    "html-read": ReplyCase(200, False, RemoteUnavailableError, body="<html>proxy</html>"),
    "html-write": ReplyCase(201, True, OutcomeUnknownError, body="<html>proxy</html>"),
    "dropped-read": ReplyCase(0, False, RemoteUnavailableError, exception=aiohttp.ServerDisconnectedError()),
    "dropped-write": ReplyCase(0, True, OutcomeUnknownError, exception=aiohttp.ServerDisconnectedError()),
    "timeout-write": ReplyCase(0, True, OutcomeUnknownError, exception=TimeoutError()),
}


@pytest.mark.parametrize("case", REPLY_CASES.values(), ids=REPLY_CASES.keys())
async def test_client_maps_replies(case: ReplyCase, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each failed reply becomes the error of the connector's tree that its recovery needs."""
    monkeypatch.setenv("MDR_TEST_REDMINE_KEY", "k" * 40)
    # One send per request, so a mocked 429 reaches the test instead of being sent again.
    client = RedmineClient(
        RedmineSettings(system="redmine", url="https://redmine.example", api_key={"env": "MDR_TEST_REDMINE_KEY"}),
        rate_gate=RateGate("redmine", attempts=1),
    )
    await client.open()
    try:
        with aioresponses() as mock:
            url = "https://redmine.example/issues.json"
            options = {"status": case.status or 200, "body": case.body, "headers": case.headers, "exception": case.exception}
            if case.write:
                mock.post(url, **options)
            else:
                mock.get(url, **options)
            with pytest.raises(case.error) as caught:
                if case.write:
                    await client.send("POST", "/issues.json", {"issue": {}})
                else:
                    await client.get("/issues.json")
    finally:
        await client.close()

    if case.status == 422:
        assert "Subject cannot be blank" in str(caught.value)
    if isinstance(caught.value, RateLimitedError):
        assert caught.value.retry_after == float(case.headers["Retry-After"])
    assert "k" * 40 not in str(caught.value)


def test_query_time_bounds() -> None:
    """Filter bounds are UTC at whole seconds, never later than the time given."""
    moment = datetime(2026, 12, 4, 13, 0, 5, 900_000, tzinfo=timezone(timedelta(hours=3)))

    assert query_time(moment) == "2026-12-04T10:00:05Z"
    assert whole_second(moment) == datetime(2026, 12, 4, 10, 0, 5, tzinfo=timezone.utc)


SECOND = datetime(2026, 12, 4, 10, 0, 5, tzinfo=timezone.utc)
SETTLED_CASES = {
    "second-over": (SECOND - timedelta(minutes=5), SECOND + timedelta(seconds=1), SECOND),
    "second-running": (SECOND - timedelta(minutes=5), SECOND + timedelta(milliseconds=400), SECOND - timedelta(microseconds=1)),
    "bound-in-second": (SECOND, SECOND + timedelta(milliseconds=400), SECOND),
}


@pytest.mark.parametrize(("bound", "searched_at", "expected"), SETTLED_CASES.values(), ids=SETTLED_CASES.keys())
def test_settled_time(bound: datetime, searched_at: datetime, expected: datetime) -> None:
    """A change in a second that had not ended when the search began is reported just before it, never before `bound`."""
    assert settled_time(SECOND, bound, searched_at) == expected
