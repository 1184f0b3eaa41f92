"""The ServiceNow adapter against the ServiceNow simulator on loopback, and its client's error mapping with aioresponses."""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aioresponses import aioresponses
from fixtures_servicenow import (
    CATEGORY,
    GROUP,
    SECRET_VARIABLE,
    MakeAdapter,
    RunningServiceNow,
    StartServiceNow,
    servicenow_settings,
)

from mdr_connector.adapters.servicenow import adapter as adapter_module
from mdr_connector.adapters.servicenow.adapter import ServiceNowTicketAdapter
from mdr_connector.adapters.servicenow.client import ServiceNowClient
from mdr_connector.adapters.servicenow.query import keyset_query
from mdr_connector.adapters.servicenow.simulator import HUMAN_USER, SERVICE_USER
from mdr_connector.adapters.textmarker import with_marker
from mdr_connector.connector.config import ServiceNowSettings
from mdr_connector.connector.retry import RateGate
from mdr_connector.connector.errors import (
    ConfigError,
    CredentialsRejectedError,
    InvalidPayloadError,
    MisconfiguredError,
    OutcomeUnknownError,
    RateLimitedError,
    RejectedError,
    RemoteUnavailableError,
)
from mdr_connector.connector.tickets import (
    AttachmentUpload,
    CommentDraft,
    CommentVisibility,
    SyncMarker,
    TicketDraft,
    TicketFields,
    TicketQuery,
    TicketRef,
)


TABLE_ROUTE = "/api/now/{version}/table/{table}"
RECORD_ROUTE = "/api/now/{version}/table/{table}/{sys_id}"
# Nothing listens here: aioresponses replies to every request of the mocked tests.
MOCK_URL = "http://127.0.0.1:9"
TABLE_URL = re.compile(r"^http://127\.0\.0\.1:9/api/now/v2/table/incident(\?.*)?$")
RECORD_URL = re.compile(r"^http://127\.0\.0\.1:9/api/now/v2/table/incident/[0-9a-f]{32}(\?.*)?$")
TOKEN_URL = f"{MOCK_URL}/oauth_token.do"
SYS_ID = "0" * 31 + "1"


def draft(incident_id: str, *, summary: str = "Подозрительный процесс", priority: str | None = "1 - High", **extra: Any) -> TicketDraft:
    fields = TicketFields(summary=summary, description="**Хост** изолирован.\n\n- шаг 1", priority=priority, labels=(), extra=extra)
    return TicketDraft(incident_id=incident_id, project=GROUP, issue_type=CATEGORY, fields=fields)


def marker(source_id: str) -> SyncMarker:
    return SyncMarker(origin="mdr", source_id=source_id)


def seed_tickets(servicenow: RunningServiceNow, count: int, created_on: str, *, hidden: bool = False) -> list[dict[str, Any]]:
    """Create `count` correlated tickets as the person, all stamped `created_on` (UTC, whole seconds)."""
    return [
        servicenow.sim.create_incident(
            {"short_description": f"seeded {index}", "correlation_id": f"seed-{created_on[-2:]}-{index}-{hidden}"},
            hidden=hidden,
            created_on=created_on,
        )
        for index in range(count)
    ]


def stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S")


# Opening, credentials and the journal check


async def test_open_basic_reads_own_account(sn_adapter: ServiceNowTicketAdapter) -> None:
    """Basic credentials open the adapter and return the service account by user name and display name."""
    assert sn_adapter.account is not None
    assert sn_adapter.account.id == SERVICE_USER
    assert sn_adapter.account.display_name == "MDR Connector"


async def test_open_oauth_reads_own_account(servicenow: RunningServiceNow, make_servicenow_adapter: MakeAdapter) -> None:
    """OAuth client credentials open the adapter with one token request, and calls then carry the token."""
    adapter = await make_servicenow_adapter(servicenow, oauth=True)
    ref = await adapter.create_ticket(draft("oauth-1"))

    assert adapter.account is not None
    assert adapter.account.id == SERVICE_USER
    assert ref.key.startswith("INC")
    assert servicenow.sim.calls["POST /oauth_token.do"] == 1


async def test_oauth_token_refreshed_before_expiry(servicenow: RunningServiceNow, make_servicenow_adapter: MakeAdapter) -> None:
    """A token within 60 s of the expiry its reply states is replaced before the next request."""
    now = [1000.0]
    adapter = await make_servicenow_adapter(servicenow, oauth=True, clock=lambda: now[0])
    await adapter.get_ticket("INC0000000")
    now[0] += 1799 - 59

    await adapter.get_ticket("INC0000000")

    assert servicenow.sim.calls["POST /oauth_token.do"] == 2


async def test_oauth_401_refreshes_once(servicenow: RunningServiceNow, make_servicenow_adapter: MakeAdapter) -> None:
    """A token that the instance no longer accepts is replaced once after the 401, and the call succeeds."""
    adapter = await make_servicenow_adapter(servicenow, oauth=True)
    ref = await adapter.create_ticket(draft("oauth-401"))
    servicenow.sim.advance(1800)

    found = await adapter.get_ticket(ref.key)

    assert found == ref
    assert servicenow.sim.calls["POST /oauth_token.do"] == 2


@pytest.mark.parametrize("oauth", [False, True], ids=["basic", "oauth"])
async def test_wrong_secret_rejected(
    servicenow: RunningServiceNow, monkeypatch: pytest.MonkeyPatch, oauth: bool
) -> None:
    """A wrong password or client secret is CredentialsRejectedError at open."""
    settings = servicenow_settings(servicenow, monkeypatch, oauth=oauth)
    monkeypatch.setenv(SECRET_VARIABLE, "wrong-secret")
    adapter = ServiceNowTicketAdapter(settings, GROUP)
    try:
        with pytest.raises(CredentialsRejectedError):
            await adapter.open()
    finally:
        await adapter.close()


async def test_unknown_username_misconfigured(servicenow: RunningServiceNow, monkeypatch: pytest.MonkeyPatch) -> None:
    """An OAuth user name with no sys_user record stops the connection with the setting to fix."""
    settings = servicenow_settings(servicenow, monkeypatch, oauth=True)
    settings = settings.model_copy(update={"auth": settings.auth.model_copy(update={"username": "nobody.here"})})
    adapter = ServiceNowTicketAdapter(settings, GROUP)
    try:
        with pytest.raises(MisconfiguredError, match="ticket.auth.username"):
            await adapter.open()
    finally:
        await adapter.close()


async def test_journal_readable_verified_at_open(servicenow: RunningServiceNow, make_servicenow_adapter: MakeAdapter) -> None:
    """With a readable journal entry on the instance, open proves read access at once."""
    row = servicenow.sim.create_incident({"short_description": "seen"})
    servicenow.sim.add_human_comment(row["number"], "A person's comment")

    adapter = await make_servicenow_adapter(servicenow)

    assert adapter.journal_verified is True


async def test_journal_denied_fails_open(servicenow: RunningServiceNow, make_servicenow_adapter: MakeAdapter) -> None:
    """Entries that a ticket shows but sys_journal_field hides stop the connection at open, naming the fix."""
    row = servicenow.sim.create_incident({"short_description": "seen"})
    servicenow.sim.add_human_comment(row["number"], "A work note", "work_notes")
    servicenow.sim.settings.journal_read_denied = True

    with pytest.raises(MisconfiguredError) as caught:
        await make_servicenow_adapter(servicenow)

    assert "sys_journal_field" in str(caught.value)
    assert row["number"] in str(caught.value)
    assert SERVICE_USER in str(caught.value)


async def test_journal_denied_fails_first_comment(servicenow: RunningServiceNow, make_servicenow_adapter: MakeAdapter) -> None:
    """On an instance without any entry the check waits for the first comment, whose read-back then fails."""
    servicenow.sim.settings.journal_read_denied = True
    adapter = await make_servicenow_adapter(servicenow)
    ref = await adapter.create_ticket(draft("journal-denied"))

    assert adapter.journal_verified is False
    with pytest.raises(MisconfiguredError, match="sys_journal_field"):
        await adapter.add_comment(ref, CommentDraft("Первый комментарий", marker("c-1")))


async def test_wrong_account_name_detected(servicenow: RunningServiceNow, monkeypatch: pytest.MonkeyPatch) -> None:
    """An OAuth client acting as another user than `username` is found by the first read-back."""
    settings = servicenow_settings(servicenow, monkeypatch, oauth=True)
    settings = settings.model_copy(update={"auth": settings.auth.model_copy(update={"username": HUMAN_USER})})
    adapter = ServiceNowTicketAdapter(settings, GROUP)
    try:
        await adapter.open()
        ref = await adapter.create_ticket(draft("wrong-user"))
        with pytest.raises(MisconfiguredError, match="ticket.auth.username"):
            await adapter.add_comment(ref, CommentDraft("Текст", marker("c-2")))
    finally:
        await adapter.close()


# Tickets


async def test_create_sets_fields(servicenow: RunningServiceNow, sn_adapter: ServiceNowTicketAdapter) -> None:
    """A new ticket carries the summary, description, impact and urgency, category, group and correlation fields."""
    ref = await sn_adapter.create_ticket(
        draft("inc-fields", priority="2 - Medium", close_notes="from extra", correlation_id="overridden")
    )
    row = servicenow.sim.incident(ref.id)
    group = servicenow.sim.tables["sys_user_group"].rows[row["assignment_group"]]

    assert ref.key == row["number"]
    assert ref.url == f"{servicenow.url}/incident.do?sys_id={ref.id}"
    assert row["short_description"] == "Подозрительный процесс"
    assert row["description"] == "**Хост** изолирован.\n\n- шаг 1"
    assert (row["impact"], row["urgency"], row["priority"]) == ("2", "2", "3")
    assert row["category"] == CATEGORY
    assert group["name"] == GROUP
    assert row["correlation_id"] == "inc-fields"
    assert row["correlation_display"] == "mdr-connector"
    assert row["close_notes"] == "from extra"


async def test_create_cuts_long_summary(servicenow: RunningServiceNow, sn_adapter: ServiceNowTicketAdapter) -> None:
    """A summary longer than short_description allows is cut to 160 characters ending with …, on one line."""
    ref = await sn_adapter.create_ticket(draft("inc-long", summary="строка\n" + "я" * 300))
    summary = servicenow.sim.incident(ref.id)["short_description"]

    assert len(summary) == 160
    assert summary.endswith("…")
    assert "\n" not in summary


async def test_create_rejects_unfit_incident_id(sn_adapter: ServiceNowTicketAdapter) -> None:
    """An incident id that correlation_id or a query cannot carry is rejected before any request."""
    with pytest.raises(InvalidPayloadError):
        await sn_adapter.create_ticket(draft("bad^id"))
    with pytest.raises(InvalidPayloadError):
        await sn_adapter.create_ticket(draft("x" * 101))


async def test_create_unknown_priority_rejected(sn_adapter: ServiceNowTicketAdapter) -> None:
    """A priority that is no impact label is RejectedError naming the labels."""
    with pytest.raises(RejectedError, match="1 - High"):
        await sn_adapter.create_ticket(draft("inc-priority", priority="High"))


async def test_create_reply_lost_then_found(servicenow: RunningServiceNow, sn_adapter: ServiceNowTicketAdapter) -> None:
    """A create whose reply is lost is OutcomeUnknownError, and find_ticket finds the record at once."""
    servicenow.sim.drop_reply_after_commit("POST", TABLE_ROUTE)

    with pytest.raises(OutcomeUnknownError):
        await sn_adapter.create_ticket(draft("inc-lost"))
    found = await sn_adapter.find_ticket("inc-lost")

    assert sn_adapter.search_delay_seconds() == 0
    assert found is not None
    assert servicenow.sim.incident(found.id)["correlation_id"] == "inc-lost"


async def test_find_ticket_exact_and_own(servicenow: RunningServiceNow, sn_adapter: ServiceNowTicketAdapter) -> None:
    """find_ticket matches the exact id on the connector's tickets, not another integration's record."""
    ref = await sn_adapter.create_ticket(draft("inc-exact"))
    servicenow.sim.create_incident({"short_description": "other tool", "correlation_id": "inc-other", "correlation_display": "SIEM"})

    assert await sn_adapter.find_ticket("inc-exact") == ref
    assert await sn_adapter.find_ticket("INC-EXACT") is None
    assert await sn_adapter.find_ticket("inc-other") is None
    assert await sn_adapter.find_ticket("inc-missing") is None


async def test_find_ticket_reports_duplicates(
    sn_adapter: ServiceNowTicketAdapter, caplog: pytest.LogCaptureFixture
) -> None:
    """Two tickets of one incident return the older one and log both keys."""
    first = await sn_adapter.create_ticket(draft("inc-twice"))
    second = await sn_adapter.create_ticket(draft("inc-twice"))

    found = await sn_adapter.find_ticket("inc-twice")

    assert found == first
    [record] = [record for record in caplog.records if record.msg == "servicenow.ticket.duplicates"]
    assert record.ticket_keys == [first.key, second.key]


async def test_update_honours_skip(servicenow: RunningServiceNow, sn_adapter: ServiceNowTicketAdapter) -> None:
    """update_ticket writes every mapped field except those in `skip`, and sends nothing when all are skipped."""
    ref = await sn_adapter.create_ticket(draft("inc-update"))
    fields = TicketFields(summary="Новое", description="Новое описание", priority="3 - Low", labels=(), extra={"close_notes": "n"})

    await sn_adapter.update_ticket(ref, fields, skip=frozenset({"summary", "close_notes"}))
    row = dict(servicenow.sim.incident(ref.id))
    patches = servicenow.sim.calls[f"PATCH {RECORD_ROUTE}"]
    await sn_adapter.update_ticket(ref, fields, skip=frozenset({"summary", "description", "priority", "close_notes"}))

    assert row["short_description"] == "Подозрительный процесс"
    assert row["description"] == "Новое описание"
    assert (row["impact"], row["urgency"]) == ("3", "3")
    assert row["close_notes"] == ""
    assert servicenow.sim.calls[f"PATCH {RECORD_ROUTE}"] == patches


async def test_get_ticket_by_number_and_sys_id(sn_adapter: ServiceNowTicketAdapter) -> None:
    """get_ticket finds a ticket by number in any case and by sys_id, and returns None for the rest."""
    ref = await sn_adapter.create_ticket(draft("inc-get"))

    assert await sn_adapter.get_ticket(ref.key) == ref
    assert await sn_adapter.get_ticket(ref.key.lower()) == ref
    assert await sn_adapter.get_ticket(ref.id) == ref
    assert await sn_adapter.get_ticket("INC9999999") is None
    assert await sn_adapter.get_ticket("f" * 32) is None
    assert await sn_adapter.get_ticket("number=1^ORnumber=2") is None


async def test_set_correlation(servicenow: RunningServiceNow, sn_adapter: ServiceNowTicketAdapter) -> None:
    """set_correlation stamps a person's ticket, and refuses one that carries another integration's id."""
    mine = servicenow.sim.create_incident({"short_description": "request"})
    taken = servicenow.sim.create_incident({"short_description": "taken", "correlation_id": "EV-7", "correlation_display": "SIEM"})
    mine_ref = TicketRef(mine["number"], mine["sys_id"], "")

    await sn_adapter.set_correlation(mine_ref, "inc-linked")
    await sn_adapter.set_correlation(mine_ref, "inc-linked")

    assert (await sn_adapter.find_ticket("inc-linked")).id == mine["sys_id"]
    with pytest.raises(RejectedError, match="SIEM"):
        await sn_adapter.set_correlation(TicketRef(taken["number"], taken["sys_id"], ""), "inc-other")


async def test_custom_table(
    start_servicenow: StartServiceNow, make_servicenow_adapter: MakeAdapter, tmp_path: Path
) -> None:
    """A table other than incident carries tickets, journal entries and attachments in the same way."""
    running = await start_servicenow(table="u_security_incident")
    adapter = await make_servicenow_adapter(running)
    source = tmp_path / "note.txt"
    source.write_bytes(b"evidence")

    ref = await adapter.create_ticket(draft("inc-custom-table"))
    comment = await adapter.add_comment(ref, CommentDraft("Текст", marker("c-table")))
    await adapter.upload_attachment(ref, AttachmentUpload("note.txt", source, 8, "text/plain"))

    assert ref.url.endswith(f"/u_security_incident.do?sys_id={ref.id}")
    assert await adapter.find_ticket("inc-custom-table") == ref
    assert [item.id for item in await adapter.list_comments(ref)] == [comment.id]
    assert [item.filename for item in await adapter.list_attachments(ref)] == ["note.txt"]
    assert running.sim.journal[0]["name"] == "u_security_incident"
    assert await adapter.check(CATEGORY, ["1 - High"]) == []


# Change search


async def test_changed_tickets_scope_and_order(servicenow: RunningServiceNow, sn_adapter: ServiceNowTicketAdapter) -> None:
    """The connector's tickets changed at or after `since` come oldest first, also after correlation_id is cleared."""
    old = await sn_adapter.create_ticket(draft("inc-old"))
    servicenow.sim.advance(5)
    since = servicenow.sim.now()
    cleared = await sn_adapter.create_ticket(draft("inc-cleared"))
    servicenow.sim.advance(1)
    servicenow.sim.update_incident(cleared.id, {"correlation_id": ""})
    servicenow.sim.advance(1)
    commented = await sn_adapter.create_ticket(draft("inc-commented"))
    servicenow.sim.advance(1)
    servicenow.sim.add_human_comment(commented.id, "Посмотрел")
    servicenow.sim.create_incident({"short_description": "a person's own ticket"})

    changes = await sn_adapter.changed_tickets(since)

    assert [change.ref.key for change in changes] == [cleared.key, commented.key]
    assert old.key not in [change.ref.key for change in changes]
    assert changes[1].updated.replace(microsecond=0) == since + timedelta(seconds=3)
    assert changes[1].updated.microsecond == int(servicenow.sim.incident(commented.id)["sys_mod_count"])


async def test_same_second_updates_differ(
    servicenow: RunningServiceNow, sn_adapter: ServiceNowTicketAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two updates in one second give two different change times, so the later one is not taken as seen."""
    since = servicenow.sim.now()
    monkeypatch.setattr(servicenow.sim, "now", lambda: since)
    ref = await sn_adapter.create_ticket(draft("inc-same-second"))
    [before] = await sn_adapter.changed_tickets(since)

    servicenow.sim.add_human_comment(ref.id, "В ту же секунду")
    [after] = await sn_adapter.changed_tickets(since)

    assert before.updated.replace(microsecond=0) == after.updated.replace(microsecond=0) == since
    assert after.updated > before.updated


async def test_short_pages_never_stop_paging(
    servicenow: RunningServiceNow, sn_adapter: ServiceNowTicketAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages that the read ACL shortens or empties after the limit do not end the change search early."""
    monkeypatch.setattr(adapter_module, "PAGE_SIZE", 4)
    servicenow.sim.settings.short_pages = True
    base = servicenow.sim.now() - timedelta(hours=1)
    visible = []
    for second, (count, hidden) in enumerate([(3, False), (6, True), (3, False), (1, True), (2, False)]):
        rows = seed_tickets(servicenow, count, stamp(base + timedelta(seconds=second)), hidden=hidden)
        visible += [] if hidden else [row["sys_id"] for row in rows]

    changes = await sn_adapter.changed_tickets(base)

    assert sorted(change.ref.id for change in changes) == sorted(visible)
    assert len(changes) == 8


async def test_keyset_paging_same_second(
    servicenow: RunningServiceNow, sn_adapter: ServiceNowTicketAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thirty tickets updated in one second come back once each across pages of four."""
    monkeypatch.setattr(adapter_module, "PAGE_SIZE", 4)
    base = servicenow.sim.now() - timedelta(hours=1)
    rows = seed_tickets(servicenow, 30, stamp(base))
    reads = servicenow.sim.calls[f"GET {TABLE_ROUTE}"]

    changes = await sn_adapter.changed_tickets(base)

    assert sorted(change.ref.id for change in changes) == sorted(row["sys_id"] for row in rows)
    assert servicenow.sim.calls[f"GET {TABLE_ROUTE}"] - reads >= 8


async def test_change_during_paging_listed_once(
    servicenow: RunningServiceNow, sn_adapter: ServiceNowTicketAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ticket updated while the search pages moves to the end and is listed once with its new time."""
    monkeypatch.setattr(adapter_module, "PAGE_SIZE", 4)
    base = servicenow.sim.now() - timedelta(hours=1)
    rows = seed_tickets(servicenow, 10, stamp(base))
    first = min(rows, key=lambda row: row["sys_id"])
    list_rows = sn_adapter.client.list_rows
    pages = 0

    async def list_and_edit(*args: Any, **kwargs: Any) -> Any:
        nonlocal pages
        pages += 1
        page = await list_rows(*args, **kwargs)
        if pages == 1:
            servicenow.sim.update_incident(first["sys_id"], {"short_description": "edited while paged"})
        return page

    monkeypatch.setattr(sn_adapter.client, "list_rows", list_and_edit)
    changes = await sn_adapter.changed_tickets(base)

    ids = [change.ref.id for change in changes]
    assert sorted(ids) == sorted(row["sys_id"] for row in rows)
    assert ids[-1] == first["sys_id"]
    assert changes[-1].updated > base


def test_keyset_query_repeats_conditions() -> None:
    """A later keyset page repeats every condition in both parts of the ^NQ query."""
    query = keyset_query("aISNOTEMPTY^ORb=c", "sys_updated_on", "2026-01-01 00:00:00", ("2026-01-02 03:04:05", "ab12"))

    assert query == (
        "sys_updated_on>2026-01-02 03:04:05^aISNOTEMPTY^ORb=c"
        "^NQsys_updated_on=2026-01-02 03:04:05^sys_id>ab12^aISNOTEMPTY^ORb=c"
        "^ORDERBYsys_updated_on^ORDERBYsys_id"
    )


# Comments


async def test_comments_and_work_notes(servicenow: RunningServiceNow, sn_adapter: ServiceNowTicketAdapter) -> None:
    """Comments and work notes of both authors list oldest first, work notes restricted, markers only on own entries."""
    ref = await sn_adapter.create_ticket(draft("inc-comments"))
    public = await sn_adapter.add_comment(ref, CommentDraft("Из MDR: **важно**", marker("c-public")))
    servicenow.sim.advance(1)
    internal = await sn_adapter.add_comment(
        ref, CommentDraft("Заметка", marker("c-internal"), CommentVisibility(type="internal"))
    )
    servicenow.sim.advance(1)
    forged = servicenow.sim.add_human_comment(ref.id, with_marker("Я не коннектор", marker("c-forged")))
    servicenow.sim.advance(1)
    note = servicenow.sim.add_human_comment(ref.id, "Внутреннее *мнение*", "work_notes")

    comments = await sn_adapter.list_comments(ref)
    stored = {entry["sys_id"]: entry for entry in servicenow.sim.journal}

    assert [comment.id for comment in comments] == [public.id, internal.id, forged["sys_id"], note["sys_id"]]
    assert stored[public.id]["element"] == "comments"
    assert stored[public.id]["value"] == "Из MDR: **важно**\n\n[mdr-connector mdr:c-public]"
    assert stored[internal.id]["element"] == "work_notes"
    assert [comment.restricted for comment in comments] == [False, True, False, True]
    assert [comment.marker for comment in comments] == [marker("c-public"), marker("c-internal"), None, None]
    assert comments[0].body == "Из MDR: **важно**"
    assert comments[0].author == sn_adapter.account
    assert comments[2].author.id == HUMAN_USER
    assert comments[2].author.display_name == "SOC Analyst"
    assert "Я не коннектор" in comments[2].body
    assert comments[3].body == "Внутреннее \\*мнение\\*"


async def test_comments_read_across_pages(
    servicenow: RunningServiceNow, sn_adapter: ServiceNowTicketAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eleven entries, several in one second, all come back across pages of three."""
    monkeypatch.setattr(adapter_module, "PAGE_SIZE", 3)
    ref = await sn_adapter.create_ticket(draft("inc-pages"))
    written = []
    for number in range(11):
        written.append(servicenow.sim.add_human_comment(ref.id, f"Комментарий {number}")["sys_id"])
        if number % 4 == 3:
            servicenow.sim.advance(1)

    comments = await sn_adapter.list_comments(ref)

    assert sorted(comment.id for comment in comments) == sorted(written)
    assert [comment.created for comment in comments] == sorted(comment.created for comment in comments)


async def test_add_comment_role_visibility_refused(sn_adapter: ServiceNowTicketAdapter) -> None:
    """A Jira role visibility cannot be written to ServiceNow and is a configuration error."""
    ref = await sn_adapter.create_ticket(draft("inc-role"))

    with pytest.raises(ConfigError, match="internal"):
        await sn_adapter.add_comment(ref, CommentDraft("x", marker("c-role"), CommentVisibility(type="role", value="Dev")))


async def test_add_comment_reply_lost(servicenow: RunningServiceNow, sn_adapter: ServiceNowTicketAdapter) -> None:
    """A journal write whose reply is lost is OutcomeUnknownError, and the entry lists with its marker."""
    ref = await sn_adapter.create_ticket(draft("inc-comment-lost"))
    servicenow.sim.drop_reply_after_commit("PATCH", RECORD_ROUTE)

    with pytest.raises(OutcomeUnknownError):
        await sn_adapter.add_comment(ref, CommentDraft("Текст", marker("c-lost")))
    comments = await sn_adapter.list_comments(ref)

    assert [comment.marker for comment in comments] == [marker("c-lost")]


async def test_read_back_failure_is_unknown_outcome(
    servicenow: RunningServiceNow, sn_adapter: ServiceNowTicketAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A journal write whose read-back fails is OutcomeUnknownError, so the engine looks for it before writing again."""
    ref = await sn_adapter.create_ticket(draft("inc-read-back"))
    list_rows = sn_adapter.client.list_rows

    async def journal_unavailable(operation: str, table: str, **kwargs: Any) -> Any:
        if table == "sys_journal_field":
            raise RemoteUnavailableError("ServiceNow list_rows failed with HTTP 503")
        return await list_rows(operation, table, **kwargs)

    monkeypatch.setattr(sn_adapter.client, "list_rows", journal_unavailable)

    with pytest.raises(OutcomeUnknownError, match="reading it back failed"):
        await sn_adapter.add_comment(ref, CommentDraft("Текст", marker("c-read-back")))
    assert [entry["element_id"] for entry in servicenow.sim.journal] == [ref.id]


async def test_edit_comment_rejected(sn_adapter: ServiceNowTicketAdapter) -> None:
    """Journal entries cannot be edited, which the adapter declares and enforces."""
    ref = await sn_adapter.create_ticket(draft("inc-edit"))
    added = await sn_adapter.add_comment(ref, CommentDraft("Текст", marker("c-edit")))

    assert sn_adapter.capabilities.edit_comments is False
    with pytest.raises(RejectedError, match="cannot be edited"):
        await sn_adapter.edit_comment(ref, added.id, CommentDraft("Новый", marker("c-edit")))


# Attachments


async def test_attachment_round_trip_multi_mb(
    servicenow: RunningServiceNow, sn_adapter: ServiceNowTicketAdapter, tmp_path: Path
) -> None:
    """A 3 MB binary uploads as a raw body with its Content-Type, lists, and downloads byte for byte."""
    ref = await sn_adapter.create_ticket(draft("inc-files"))
    data = os.urandom(3 * 1024 * 1024 + 17)
    source = tmp_path / "dump.bin"
    source.write_bytes(data)

    uploaded = await sn_adapter.upload_attachment(ref, AttachmentUpload("дамп памяти.bin", source, len(data), "application/x-binary"))
    [listed] = await sn_adapter.list_attachments(ref)
    destination = tmp_path / "copy.bin"
    written = await sn_adapter.download_attachment(listed, destination)
    record = servicenow.sim.attachments[uploaded.id].record

    assert listed == uploaded
    assert uploaded.author == sn_adapter.account
    assert uploaded.content_type == "application/x-binary"
    assert record["content_type"] == "application/x-binary"
    assert record["table_sys_id"] == ref.id
    assert written == len(data)
    assert destination.read_bytes() == data
    assert list(tmp_path.glob(".servicenow-download-*")) == []


async def test_attachments_listed_across_pages(
    servicenow: RunningServiceNow, sn_adapter: ServiceNowTicketAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seven files of a person list across pages of three, oldest first, with the person as author."""
    monkeypatch.setattr(adapter_module, "PAGE_SIZE", 3)
    ref = await sn_adapter.create_ticket(draft("inc-many-files"))
    for number in range(7):
        servicenow.sim.add_attachment(ref.id, f"log-{number}.txt", f"строка {number}".encode())

    attachments = await sn_adapter.list_attachments(ref)

    assert sorted(item.filename for item in attachments) == [f"log-{number}.txt" for number in range(7)]
    assert {item.author.id for item in attachments} == {HUMAN_USER}
    assert {item.author.display_name for item in attachments} == {"SOC Analyst"}


@pytest.mark.parametrize(
    "origin",
    ["http://127.0.0.2:{port}", "https://127.0.0.1:{port}", "http://127.0.0.1:{other}", "http://evil.example"],
    ids=["host", "scheme", "port", "domain"],
)
async def test_download_from_other_origin_refused(
    servicenow: RunningServiceNow,
    sn_adapter: ServiceNowTicketAdapter,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    origin: str,
) -> None:
    """A download_link on another scheme, host or port is refused before any request goes there."""
    ref = await sn_adapter.create_ticket(draft("inc-origin"))
    attachment = servicenow.sim.add_attachment(ref.id, "x.txt", b"secret")
    port = int(servicenow.url.rsplit(":", 1)[1])
    foreign = origin.format(port=port, other=port + 1)
    record_of = sn_adapter.client.attachment_record

    async def foreign_link(operation: str, sys_id: str) -> dict[str, Any]:
        record = await record_of(operation, sys_id)
        return {**record, "download_link": f"{foreign}/api/now/attachment/{sys_id}/file"}

    monkeypatch.setattr(sn_adapter.client, "attachment_record", foreign_link)
    [listed] = await sn_adapter.list_attachments(ref)
    destination = tmp_path / "x.txt"

    with pytest.raises(InvalidPayloadError, match="not followed"):
        await sn_adapter.download_attachment(listed, destination)
    assert not destination.exists()
    assert servicenow.sim.calls["GET /api/now/attachment/{sys_id}/file"] == 0
    assert attachment.sys_id == listed.id


async def test_download_cut_short_removed(
    servicenow: RunningServiceNow, sn_adapter: ServiceNowTicketAdapter, tmp_path: Path
) -> None:
    """A download that breaks off is RemoteUnavailableError and leaves no file behind."""
    ref = await sn_adapter.create_ticket(draft("inc-cut"))
    servicenow.sim.add_attachment(ref.id, "big.bin", size=512 * 1024)
    servicenow.sim.settings.download_cut_bytes = 100 * 1024
    [listed] = await sn_adapter.list_attachments(ref)

    with pytest.raises(RemoteUnavailableError):
        await sn_adapter.download_attachment(listed, tmp_path / "big.bin")
    assert list(tmp_path.iterdir()) == []


async def test_upload_too_large_is_413(
    servicenow: RunningServiceNow, sn_adapter: ServiceNowTicketAdapter, tmp_path: Path
) -> None:
    """A file over the instance's limit is RejectedError 413, which the engine turns into a notice."""
    ref = await sn_adapter.create_ticket(draft("inc-too-large"))
    servicenow.sim.settings.attachment_max_bytes = 1000
    source = tmp_path / "big.bin"
    source.write_bytes(b"x" * 2000)

    with pytest.raises(RejectedError) as caught:
        await sn_adapter.upload_attachment(ref, AttachmentUpload("big.bin", source, 2000))

    assert caught.value.status == 413
    assert servicenow.sim.attachments == {}


async def test_attachment_limit_assumed(sn_adapter: ServiceNowTicketAdapter) -> None:
    """Without a readable com.glide.attachment.max_size the documented 1024 MB is assumed."""
    assert await sn_adapter.attachment_limit() == 1024 * 1024 * 1024


# Workflow


async def test_get_state_labels_and_values(servicenow: RunningServiceNow, sn_adapter: ServiceNowTicketAdapter) -> None:
    """get_state reads the state label, its category, and summary, priority, description and raw columns."""
    ref = await sn_adapter.create_ticket(draft("inc-state"))

    state = await sn_adapter.get_state(ref, ["summary", "priority", "description", "close_code", "u_missing"])

    assert state.status == "New"
    assert state.status_category == "new"
    assert stamp(state.updated) == servicenow.sim.incident(ref.id)["sys_updated_on"]
    assert state.updated.tzinfo == timezone.utc
    assert state.values["summary"] == "Подозрительный процесс"
    assert state.values["priority"] == "1 - High"
    assert state.values["description"] == "\\*\\*Хост\\*\\* изолирован\\.\n\n\\- шаг 1"
    assert state.values["close_code"] == ""
    assert state.values["u_missing"] is None


async def test_transitions_send_required_fields(servicenow: RunningServiceNow, sn_adapter: ServiceNowTicketAdapter) -> None:
    """On Hold carries a hold reason other than Awaiting Caller, and Resolved the configured close code and notes."""
    ref = await sn_adapter.create_ticket(draft("inc-flow"))

    await sn_adapter.transition_to(ref, "on hold")
    held = dict(servicenow.sim.incident(ref.id))
    await sn_adapter.transition_to(ref, "Resolved")
    patches = servicenow.sim.calls[f"PATCH {RECORD_ROUTE}"]
    await sn_adapter.transition_to(ref, "Resolved")
    resolved = servicenow.sim.incident(ref.id)
    state = await sn_adapter.get_state(ref)

    assert (held["state"], held["hold_reason"]) == ("3", "4")
    assert (resolved["state"], resolved["close_code"], resolved["close_notes"]) == ("6", "Solution provided", "Resolved in Kaspersky MDR.")
    assert (state.status, state.status_category) == ("Resolved", "done")
    assert servicenow.sim.calls[f"PATCH {RECORD_ROUTE}"] == patches


async def test_transition_refused_names_states(servicenow: RunningServiceNow, sn_adapter: ServiceNowTicketAdapter) -> None:
    """Closing without itil_admin and an unknown state are RejectedError with the reason and the states."""
    ref = await sn_adapter.create_ticket(draft("inc-close"))

    with pytest.raises(RejectedError) as closing:
        await sn_adapter.transition_to(ref, "Closed")
    with pytest.raises(RejectedError) as unknown:
        await sn_adapter.transition_to(ref, "Done")

    assert closing.value.status == 403
    assert "itil_admin" in str(closing.value)
    assert "In Progress" in str(closing.value)
    assert "Resolved" in str(unknown.value)
    assert servicenow.sim.incident(ref.id)["state"] == "1"


async def test_find_tickets_by_category(servicenow: RunningServiceNow, sn_adapter: ServiceNowTicketAdapter) -> None:
    """find_tickets returns the group's tickets of a category created at or after `since`; a label finds nothing."""
    servicenow.sim.create_incident({"short_description": "older", "category": "network", "assignment_group": GROUP})
    servicenow.sim.advance(5)
    since = servicenow.sim.now()
    wanted = servicenow.sim.create_incident({"short_description": "request", "category": "network", "assignment_group": GROUP})
    servicenow.sim.create_incident({"short_description": "other group", "category": "network", "assignment_group": "Service Desk"})
    servicenow.sim.create_incident({"short_description": "other category", "category": "hardware", "assignment_group": GROUP})

    found = await sn_adapter.find_tickets(TicketQuery(GROUP, issue_type="network"), since)

    assert [ref.id for ref in found] == [wanted["sys_id"]]
    assert await sn_adapter.find_tickets(TicketQuery(GROUP, label="mdr-create", issue_type="network"), since) == []
    assert await sn_adapter.find_tickets(TicketQuery("No Such Group", issue_type="network"), since) == []
    with pytest.raises(ConfigError):
        await sn_adapter.find_tickets(TicketQuery(GROUP), since)


# Accounts and checks


async def test_account_groups(sn_adapter: ServiceNowTicketAdapter) -> None:
    """account_groups reads the group names of a user by user name, and an empty set for an unknown user."""
    assert await sn_adapter.account_groups(HUMAN_USER) == {"SOC", "SOC Tier 2"}
    assert await sn_adapter.account_groups(SERVICE_USER) == {"MDR Integrations"}
    assert await sn_adapter.account_groups("nobody") == set()
    assert await sn_adapter.account_groups("") == set()


async def test_check_passes_valid_settings(sn_adapter: ServiceNowTicketAdapter) -> None:
    assert await sn_adapter.check(CATEGORY, ["1 - High", "2 - Medium", "3 - Low"]) == []
    assert await sn_adapter.check(CATEGORY, ["1 - High"], project="SOC Tier 2") == []


async def test_check_reports_each_problem(servicenow: RunningServiceNow, make_servicenow_adapter: MakeAdapter) -> None:
    """check names an unknown category, impact label, assignment group and close code, with the valid values."""
    adapter = await make_servicenow_adapter(servicenow, close_code="Fixed")

    problems = await adapter.check("Security", ["1 - High", "High"], project="Blue Team")

    assert len(problems) == 4
    assert "category 'Security'" in problems[0]
    assert "software" in problems[0]
    assert "priority 'High'" in problems[1]
    assert "1 - High" in problems[1]
    assert "assignment group 'Blue Team'" in problems[2]
    assert "close_code 'Fixed'" in problems[3]
    assert "Solution provided" in problems[3]


async def test_rate_limit_from_instance(servicenow: RunningServiceNow, sn_adapter: ServiceNowTicketAdapter) -> None:
    """A 429 of an inbound rate limit rule is RateLimitedError with its Retry-After."""
    servicenow.sim.limit_rate(1, 1200)

    with pytest.raises(RateLimitedError) as caught:
        await sn_adapter.get_ticket("INC0010001")

    assert caught.value.retry_after == 1200
    assert "Rate limit exceeded" in str(caught.value)


# The client's error handling, with aioresponses


@pytest.fixture
async def mocked_client(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A Basic-auth client of MOCK_URL that sends each request once, so a mocked 429 reaches the test."""
    client = ServiceNowClient(mock_settings(monkeypatch, oauth=False), rate_gate=RateGate("servicenow", attempts=1))
    await client.open()
    yield client
    await client.close()


def mock_settings(monkeypatch: pytest.MonkeyPatch, *, oauth: bool) -> ServiceNowSettings:
    monkeypatch.setenv(SECRET_VARIABLE, "secret")
    secret = {"env": SECRET_VARIABLE}
    auth = (
        {"type": "oauth_client_credentials", "client_id": "client", "client_secret": secret, "username": "svc"}
        if oauth
        else {"type": "basic", "username": "svc", "password": secret}
    )
    return ServiceNowSettings.model_validate({"system": "servicenow", "url": MOCK_URL, "auth": auth})


@dataclass(frozen=True)
class Case:
    status: int | None
    error: type[Exception]
    write: bool = False
    body: str = '{"error": {"message": "Invalid", "detail": "state: bad"}, "status": "failure"}'
    headers: dict[str, str] | None = None
    exception: BaseException | None = None


CONNECTION_KEY = aiohttp.client_reqrep.ConnectionKey("127.0.0.1", 9, False, True, None, None, None)
CASES = {
    "429 retry-after": Case(429, RateLimitedError, headers={"Retry-After": "120"}),
    "503 retry-after": Case(503, RateLimitedError, headers={"Retry-After": "5"}),
    "500 read": Case(500, RemoteUnavailableError),
    "500 write": Case(500, OutcomeUnknownError, write=True),
    "400": Case(400, RejectedError),
    "403 write": Case(403, RejectedError, write=True),
    "302": Case(302, RejectedError, headers={"Location": "https://login.example/"}),
    "401 basic": Case(401, CredentialsRejectedError),
    "html read": Case(200, RemoteUnavailableError, body="<html>proxy</html>"),
    "html write": Case(201, OutcomeUnknownError, write=True, body="<html>proxy</html>"),
    "timeout read": Case(None, RemoteUnavailableError, exception=asyncio.TimeoutError()),
    "timeout write": Case(None, OutcomeUnknownError, write=True, exception=asyncio.TimeoutError()),
    "dropped write": Case(None, OutcomeUnknownError, write=True, exception=aiohttp.ServerDisconnectedError()),
    "refused write": Case(
        None,
        RemoteUnavailableError,
        write=True,
        exception=aiohttp.ClientConnectorError(CONNECTION_KEY, OSError(111, "refused")),
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_client_error_mapping(mocked_client: ServiceNowClient, case: Case) -> None:
    """Each status, body or transport failure maps to the documented connector error."""
    with aioresponses() as mock:
        if case.write:
            mock.post(TABLE_URL, status=case.status or 200, body=case.body, headers=case.headers, exception=case.exception)
        else:
            mock.get(TABLE_URL, status=case.status or 200, body=case.body, headers=case.headers, exception=case.exception)
        with pytest.raises(case.error) as caught:
            if case.write:
                await mocked_client.insert_row("create_ticket", "incident", {"short_description": "x"}, "sys_id")
            else:
                await mocked_client.list_rows("changed_tickets", "incident", query="", fields="sys_id", limit=1)

    if case.status == 429:
        assert caught.value.retry_after == 120
    if case.status == 400:
        assert caught.value.status == 400
        assert "Invalid - state: bad" in str(caught.value)


async def test_oauth_401_refreshes_once_mocked(monkeypatch: pytest.MonkeyPatch) -> None:
    """With OAuth a 401 fetches one new token and repeats the request with it; a second 401 is fatal."""
    client = ServiceNowClient(mock_settings(monkeypatch, oauth=True))
    with aioresponses() as mock:
        mock.post(TOKEN_URL, payload={"access_token": "first", "expires_in": 1799})
        mock.post(TOKEN_URL, payload={"access_token": "second", "expires_in": 1799})
        mock.post(TOKEN_URL, payload={"access_token": "third", "expires_in": 1799})
        mock.get(RECORD_URL, status=401)
        mock.get(RECORD_URL, payload={"result": {"sys_id": SYS_ID}})
        mock.get(RECORD_URL, status=401)
        mock.get(RECORD_URL, status=401)
        try:
            await client.open()
            row = await client.get_row("get_ticket", "incident", SYS_ID, "sys_id")
            with pytest.raises(CredentialsRejectedError):
                await client.get_row("get_ticket", "incident", SYS_ID, "sys_id")
        finally:
            await client.close()

        sent = [call.kwargs["headers"]["Authorization"] for key, calls in mock.requests.items() if key[0] == "GET" for call in calls]
        token_calls = sum(len(calls) for key, calls in mock.requests.items() if key[0] == "POST")

    assert row == {"sys_id": SYS_ID}
    assert sent == ["Bearer first", "Bearer second", "Bearer second", "Bearer third"]
    assert token_calls == 3


async def test_oauth_token_refused_mocked(monkeypatch: pytest.MonkeyPatch) -> None:
    """A token endpoint that refuses the client is CredentialsRejectedError naming the client id."""
    client = ServiceNowClient(mock_settings(monkeypatch, oauth=True))
    with aioresponses() as mock:
        mock.post(TOKEN_URL, status=401, payload={"error": "access_denied"})
        try:
            with pytest.raises(CredentialsRejectedError, match="client"):
                await client.open()
        finally:
            await client.close()


async def test_download_longer_than_listed(mocked_client: ServiceNowClient, tmp_path: Path) -> None:
    """A body longer than the listed size stops with InvalidPayloadError and leaves no file."""
    url = f"{MOCK_URL}/api/now/attachment/{SYS_ID}/file"
    with aioresponses() as mock:
        mock.get(url, body=b"x" * 50)
        with pytest.raises(InvalidPayloadError):
            await mocked_client.download("download_attachment", url, tmp_path / "f.bin", 10)

    assert list(tmp_path.iterdir()) == []

