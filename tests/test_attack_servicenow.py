"""Attacks on the ServiceNow adapter: hostile text and ids, faults of the instance, and the engine run end to end.

Every test runs against the ServiceNow simulator on loopback, and the
sync tests against the MDR simulator too. Sync tests count records and
copies on both simulators after the fault.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from fixtures_mdr import MDR_CLIENT_ID
from fixtures_servicenow import (
    CATEGORY,
    GROUP,
    MakeAdapter,
    RunningServiceNow,
    ServiceNowSyncHarness,
    StartServiceNow,
    servicenow_settings,
)

from mdr_connector.adapters.servicenow import adapter as adapter_module
from mdr_connector.adapters.servicenow import simulator_state
from mdr_connector.adapters.servicenow.adapter import ServiceNowTicketAdapter
from mdr_connector.adapters.servicenow.client import ServiceNowClient
from mdr_connector.adapters.servicenow.simulator import SERVICE_USER
from mdr_connector.adapters.textmarker import split_marker
from mdr_connector.connector.engine import INCIDENT
from mdr_connector.connector.errors import (
    InvalidPayloadError,
    MisconfiguredError,
    OutcomeUnknownError,
    RateLimitedError,
    RejectedError,
)
from mdr_connector.connector.tickets import CommentDraft, SyncMarker, TicketDraft, TicketFields

TABLE_ROUTE = "/api/now/{version}/table/{table}"
RECORD_ROUTE = "/api/now/{version}/table/{table}/{sys_id}"
UPLOAD_ROUTE = "/api/now/attachment/file"
# The tag that makes an instance render a journal entry's text as HTML while glide.ui.security.allow_codetag is true, its default.
CODE_TAG = re.compile(r"\[\s*/?\s*code\s*\]", re.IGNORECASE)


def draft(incident_id: str, *, summary: str = "Подозрительный процесс", description: str = "Хост изолирован.") -> TicketDraft:
    fields = TicketFields(summary=summary, description=description, priority="1 - High", labels=())
    return TicketDraft(incident_id=incident_id, project=GROUP, issue_type=CATEGORY, fields=fields)


def marker(source_id: str) -> SyncMarker:
    return SyncMarker(origin="mdr", source_id=source_id)


def journal_values(servicenow: RunningServiceNow, sys_id: str) -> list[str]:
    return [entry["value"] for entry in servicenow.sim.journal if entry["element_id"] == sys_id]


# Hostile text


@pytest.mark.parametrize(
    "body",
    [
        "`[code]<iframe src=//evil.example></iframe>[/code]`",
        "    [CODE]<img src=x onerror=alert(1)>[/CODE]",
        "Quoted: [ code ]<b>bold</b>[ /code ]",
    ],
    ids=["inline-code", "indented-upper", "spaced"],
)
async def test_code_tag_never_reaches_journal(
    servicenow: RunningServiceNow, sn_adapter: ServiceNowTicketAdapter, body: str
) -> None:
    """A `[code]` tag in a comment is broken up, because an instance renders the text between two such tags as HTML."""
    ref = await sn_adapter.create_ticket(draft("inc-code-tag"))

    comment = await sn_adapter.add_comment(ref, CommentDraft(body, marker("c-code")))
    [stored] = journal_values(servicenow, ref.id)
    [listed] = await sn_adapter.list_comments(ref)

    assert not CODE_TAG.search(stored)
    assert "<iframe" in stored or "<img" in stored or "<b>" in stored
    assert split_marker(stored)[1] == marker("c-code")
    assert listed.id == comment.id
    assert listed.marker == marker("c-code")


async def test_long_journal_entry_round_trips(servicenow: RunningServiceNow, sn_adapter: ServiceNowTicketAdapter) -> None:
    """A 70,000-character entry is written whole, read back by its marker and listed with it."""
    ref = await sn_adapter.create_ticket(draft("inc-long-entry"))
    body = ("Строка журнала с деталями. " * 2600)[:70_000]

    comment = await sn_adapter.add_comment(ref, CommentDraft(body, marker("c-long")))
    [listed] = await sn_adapter.list_comments(ref)

    assert len(journal_values(servicenow, ref.id)[0]) > 70_000
    assert listed.id == comment.id
    assert listed.marker == marker("c-long")
    assert listed.body == body.rstrip()


async def test_control_characters_removed(servicenow: RunningServiceNow, sn_adapter: ServiceNowTicketAdapter) -> None:
    """NUL and other C0 characters are removed from every text written, while RTL marks and Cyrillic stay."""
    ref = await sn_adapter.create_ticket(
        draft("inc-control", summary="Alert\x00 \u202egnp.exe\u202c\x07", description="desc\x00\x1bline")
    )

    await sn_adapter.add_comment(ref, CommentDraft("Хост\x00 \u202eисолирован\x08", marker("c-control")))
    row = servicenow.sim.incident(ref.id)
    [stored] = journal_values(servicenow, ref.id)

    for text in (row["short_description"], row["description"], stored):
        assert not re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f]", text)
    assert "\u202e" in row["short_description"]
    assert stored.startswith("Хост \u202eисолирован")


# Incident ids in queries


@pytest.mark.parametrize(
    "incident_id",
    ["a" * 101, "inc^NQsys_id>0", "inc=1", "inc 1", "инцидент", "inc,1", "inc\n1", ""],
    ids=["101-chars", "caret-nq", "equals", "space", "cyrillic", "comma", "newline", "empty"],
)
async def test_unfit_incident_id_creates_nothing(
    servicenow: RunningServiceNow, sn_adapter: ServiceNowTicketAdapter, incident_id: str
) -> None:
    """An id that correlation_id or an encoded query cannot carry raises InvalidPayloadError and writes nothing."""
    before = len(servicenow.sim.incidents)

    with pytest.raises(InvalidPayloadError):
        await sn_adapter.find_ticket(incident_id)
    with pytest.raises(InvalidPayloadError):
        await sn_adapter.create_ticket(draft(incident_id))

    assert len(servicenow.sim.incidents) == before


@pytest.mark.parametrize("incident_id", ["ORDERBYDESCnumber", "NQ", "EQ", "OR", "-MAfspsBq_r24TsN5-jl", "x" * 100])
async def test_keyword_incident_ids_found_exactly(
    servicenow: RunningServiceNow, sn_adapter: ServiceNowTicketAdapter, incident_id: str
) -> None:
    """Ids that spell query keywords, or fill all 100 characters, find exactly their own ticket."""
    other = await sn_adapter.create_ticket(draft("other-incident"))
    ref = await sn_adapter.create_ticket(draft(incident_id))

    found = await sn_adapter.find_ticket(incident_id)

    assert found == ref
    assert found != other
    assert servicenow.sim.incident(ref.id)["correlation_id"] == incident_id


# The engine end to end, after a fault


def copies_in_mdr(harness: ServiceNowSyncHarness, incident_id: str, text: str) -> int:
    return sum(text in comment["text"] for comment in harness.mdr_comments(incident_id))


def copies_in_journal(harness: ServiceNowSyncHarness, incident_id: str, text: str) -> int:
    return sum(text in entry["value"] for entry in harness.journal_of(incident_id))


async def settle(harness: ServiceNowSyncHarness, sync: Any, cycles: int = 3) -> None:
    """Run cycles with the clocks moved past each parked incident's next try, and check that nothing stays parked."""
    for _cycle in range(cycles):
        harness.advance(5)
        await harness.cycles(1, sync)
    parked = []
    for incident in harness.mdr_sim.incidents(MDR_CLIENT_ID):
        item = await harness.store.get_parked(harness.connection.name, INCIDENT, incident["incident_id"])
        if item is not None:
            parked.append(item)
    assert parked == []


async def test_create_reply_dropped_one_record(sn_harness: ServiceNowSyncHarness) -> None:
    """A create applied but unanswered is found by correlation_id, so three cycles leave one record and one copy."""
    incident_id = sn_harness.seed()["incident_id"]
    sn_harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>First analyst note</p>", author="Ivan Petrov")
    sn_harness.sim.drop_reply_after_commit("POST", TABLE_ROUTE)

    sync = await sn_harness.cycles(1)
    await settle(sn_harness, sync)

    assert len(sn_harness.tickets_for(incident_id)) == 1
    assert copies_in_journal(sn_harness, incident_id, "First analyst note") == 1
    assert sn_harness.sim.calls[f"POST {TABLE_ROUTE}"] == 1


async def test_comment_reply_dropped_one_copy(sn_harness: ServiceNowSyncHarness) -> None:
    """A journal write applied but unanswered is found by its marker, so the entry is not written twice."""
    incident_id = sn_harness.seed()["incident_id"]
    sync = await sn_harness.cycles(1)
    sn_harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>Second analyst note</p>", author="Ivan Petrov")
    sn_harness.sim.drop_reply_after_commit("PATCH", RECORD_ROUTE)

    sn_harness.advance(2)
    await sn_harness.cycles(1, sync)
    await settle(sn_harness, sync)

    assert copies_in_journal(sn_harness, incident_id, "Second analyst note") == 1
    assert len(sn_harness.tickets_for(incident_id)) == 1


async def test_upload_reply_dropped_one_file(sn_harness: ServiceNowSyncHarness) -> None:
    """An MDR file whose upload was applied but unanswered ends up attached once."""
    incident_id = sn_harness.seed()["incident_id"]
    sync = await sn_harness.cycles(1)
    sn_harness.mdr_sim.add_attachment(MDR_CLIENT_ID, incident_id, "triage.log", b"line one\nline two\n")
    sn_harness.sim.drop_reply_after_commit("POST", UPLOAD_ROUTE)

    sn_harness.advance(2)
    await sn_harness.cycles(1, sync)
    await settle(sn_harness, sync)

    ticket = sn_harness.ticket_for(incident_id)
    files = [item.record["file_name"] for item in sn_harness.sim.attachments.values() if item.record["table_sys_id"] == ticket["sys_id"]]
    assert files == ["triage.log"]


async def test_rate_limit_mid_cycle_converges(sn_harness: ServiceNowSyncHarness) -> None:
    """429 replies with Retry-After in the middle of a cycle delay the sync but leave one record and one copy per comment."""
    incident_id = sn_harness.seed()["incident_id"]
    sync = await sn_harness.cycles(1)
    number = sn_harness.ticket_for(incident_id)["number"]
    sn_harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>Analyst during the limit</p>", author="Ivan Petrov")
    sn_harness.sim.add_human_comment(number, "Engineer during the limit")
    sn_harness.sim.limit_rate(3, 1)

    sn_harness.advance(2)
    limited = 0
    for _cycle in range(5):
        try:
            await sn_harness.cycles(1, sync)
        except RateLimitedError:
            # The runner ends such a cycle and waits Retry-After before the next one.
            limited += 1
        sn_harness.advance(30)

    # The client waits out a short Retry-After and sends again, so a cycle ends only when the 429s outlast its sends.
    assert sn_harness.sim.rate_limit.remaining == 0
    assert limited <= 1

    assert len(sn_harness.tickets_for(incident_id)) == 1
    assert copies_in_journal(sn_harness, incident_id, "Analyst during the limit") == 1
    assert copies_in_mdr(sn_harness, incident_id, "Engineer during the limit") == 1


async def test_same_second_change_after_write_seen(sn_harness: ServiceNowSyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A person's entry stamped in the second of the connector's own write reaches MDR once over three cycles."""
    frozen = sn_harness.sim.now()
    monkeypatch.setattr(sn_harness.sim, "now", lambda: frozen)
    incident_id = sn_harness.seed()["incident_id"]
    sn_harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>Connector writes first</p>", author="Ivan Petrov")
    sync = await sn_harness.cycles(1)
    number = sn_harness.ticket_for(incident_id)["number"]

    sn_harness.sim.add_human_comment(number, "Person writes in the same second")
    await sn_harness.cycles(3, sync)

    entries = sn_harness.journal_of(incident_id)
    assert {entry["sys_created_on"] for entry in entries} == {frozen.strftime("%Y-%m-%d %H:%M:%S")}
    assert copies_in_mdr(sn_harness, incident_id, "Person writes in the same second") == 1
    assert copies_in_journal(sn_harness, incident_id, "Connector writes first") == 1


async def test_hidden_rows_never_hide_changes(
    sn_harness: ServiceNowSyncHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages emptied by the read ACL, among tickets and journal entries, do not hide a person's new entry."""
    monkeypatch.setattr(adapter_module, "PAGE_SIZE", 2)
    sn_harness.sim.settings.short_pages = True
    incident_id = sn_harness.seed()["incident_id"]
    sync = await sn_harness.cycles(1)
    number = sn_harness.ticket_for(incident_id)["number"]

    sn_harness.advance(2)
    for index in range(5):
        sn_harness.sim.create_incident({"correlation_id": f"hidden-{index}"}, hidden=True)
    for index in range(5):
        hidden_entry = sn_harness.sim.add_human_comment(number, f"Hidden entry {index}")
        sn_harness.sim.hidden.add(hidden_entry["sys_id"])
    sn_harness.sim.add_human_comment(number, "Visible entry after the hidden ones")
    sn_harness.advance(2)
    await sn_harness.cycles(3, sync)

    assert copies_in_mdr(sn_harness, incident_id, "Visible entry after the hidden ones") == 1
    assert copies_in_mdr(sn_harness, incident_id, "Hidden entry") == 0


async def test_cleared_correlation_keeps_ticket(sn_harness: ServiceNowSyncHarness) -> None:
    """A person who clears or changes correlation_id leaves the incident linked: its comments still arrive and no second record appears."""
    incident_id = sn_harness.seed()["incident_id"]
    sync = await sn_harness.cycles(1)
    [ticket] = sn_harness.tickets_for(incident_id)
    sn_harness.sim.update_incident(ticket["number"], {"correlation_id": "", "correlation_display": ""})

    sn_harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>After the edit</p>", author="Ivan Petrov")
    sn_harness.sim.add_human_comment(ticket["number"], "Engineer after the edit")
    sn_harness.advance(2)
    await sn_harness.cycles(3, sync)

    records = [row for row in sn_harness.sim.incidents.values() if row["sys_created_by"] == SERVICE_USER]
    assert len(records) == 1
    assert sum("After the edit" in entry["value"] for entry in sn_harness.sim.journal) == 1
    assert copies_in_mdr(sn_harness, incident_id, "Engineer after the edit") == 1


# OAuth


async def test_short_token_lifetime_reused(servicenow: RunningServiceNow, make_servicenow_adapter: MakeAdapter) -> None:
    """A token that lives less than the 60 s refresh margin is still used for several requests, not fetched anew for each."""
    servicenow.sim.settings.token_lifetime_seconds = 30
    now = [1000.0]
    adapter = await make_servicenow_adapter(servicenow, oauth=True, clock=lambda: now[0])

    for _request in range(5):
        await adapter.get_ticket("INC0000000")
    fetched_while_fresh = servicenow.sim.calls["POST /oauth_token.do"]
    now[0] += 29
    await adapter.get_ticket("INC0000000")

    assert fetched_while_fresh == 1
    assert servicenow.sim.calls["POST /oauth_token.do"] == 2


async def test_token_expiry_mid_sync_converges(sn_harness: ServiceNowSyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """OAuth tokens that expire and are revoked between and within cycles leave one record and one copy of each comment."""
    ticket = servicenow_settings(sn_harness.servicenow, monkeypatch, oauth=True)
    connection = sn_harness.connection.model_copy(update={"ticket": ticket})
    sn_harness.settings = sn_harness.settings.model_copy(update={"connections": [connection]})
    incident_id = sn_harness.seed()["incident_id"]
    sync = await sn_harness.cycles(1)
    number = sn_harness.ticket_for(incident_id)["number"]

    sn_harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>Analyst after expiry</p>", author="Ivan Petrov")
    sn_harness.sim.add_human_comment(number, "Engineer after expiry")
    # The instance's clock passes the token's expiry, while the connector's monotonic clock does not.
    sn_harness.advance(1800)
    await sn_harness.cycles(1, sync)
    sn_harness.sim.tokens.clear()
    await settle(sn_harness, sync, cycles=2)

    assert len(sn_harness.tickets_for(incident_id)) == 1
    assert copies_in_journal(sn_harness, incident_id, "Analyst after expiry") == 1
    assert copies_in_mdr(sn_harness, incident_id, "Engineer after expiry") == 1
    assert sn_harness.sim.calls["POST /oauth_token.do"] >= 3


# Attachments


@pytest.mark.parametrize(
    "link",
    [
        "http://user:secret@127.0.0.1:{port}/api/now/attachment/{sys_id}/file",
        "http://127.0.0.1:{port}/api/now/table/sys_user?sysparm_limit=1",
        "http://127.0.0.1:{port}/api/now/attachment/{other}/file",
        "http://127.0.0.1:{port}/api/now/attachment/{sys_id}/file/../../table/sys_user",
    ],
    ids=["userinfo", "other-path", "other-attachment", "dot-segments"],
)
async def test_download_link_elsewhere_on_instance_refused(
    servicenow: RunningServiceNow,
    sn_adapter: ServiceNowTicketAdapter,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    link: str,
) -> None:
    """A download_link on the instance's origin that is not the attachment's own file is refused before any request."""
    ref = await sn_adapter.create_ticket(draft("inc-link"))
    attachment = servicenow.sim.add_attachment(ref.id, "x.txt", b"secret")
    other = servicenow.sim.add_attachment(ref.id, "y.txt", b"other!")
    port = int(servicenow.url.rsplit(":", 1)[1])
    record_of = sn_adapter.client.attachment_record

    async def odd_link(operation: str, sys_id: str) -> dict[str, Any]:
        record = await record_of(operation, sys_id)
        return {**record, "download_link": link.format(port=port, sys_id=sys_id, other=other.sys_id)}

    monkeypatch.setattr(sn_adapter.client, "attachment_record", odd_link)
    listed = next(item for item in await sn_adapter.list_attachments(ref) if item.id == attachment.sys_id)
    calls_before = servicenow.sim.calls.copy()

    with pytest.raises(InvalidPayloadError, match="not followed"):
        await sn_adapter.download_attachment(listed, tmp_path / "x.txt")

    assert servicenow.sim.calls - calls_before == {"GET /api/now/attachment/{sys_id}": 1}
    assert not (tmp_path / "x.txt").exists()


async def test_oversized_mdr_file_noticed_once(sn_harness: ServiceNowSyncHarness) -> None:
    """An MDR file that the instance rejects as too large gets one notice over three cycles, and no attachment."""
    sn_harness.sim.settings.attachment_max_bytes = 1000
    incident_id = sn_harness.seed()["incident_id"]
    sync = await sn_harness.cycles(1)
    sn_harness.mdr_sim.add_attachment(MDR_CLIENT_ID, incident_id, "memory.dmp", size=5000)

    sn_harness.advance(2)
    await sn_harness.cycles(3, sync)

    assert sn_harness.sim.attachments == {}
    assert copies_in_journal(sn_harness, incident_id, "memory.dmp") == 1


# The journal check at open


async def test_journal_check_survives_acl_short_page(
    servicenow: RunningServiceNow, make_servicenow_adapter: MakeAdapter
) -> None:
    """A probe page that the read ACL emptied is no proof of missing access while the tickets' own entries are readable."""
    servicenow.sim.settings.short_pages = True
    restricted = servicenow.sim.create_incident({"short_description": "restricted team"}, hidden=True)
    for index in range(adapter_module.JOURNAL_PROBE_ROWS):
        entry = servicenow.sim.add_human_comment(restricted["number"], f"Restricted entry {index}")
        servicenow.sim.hidden.add(entry["sys_id"])
    readable = servicenow.sim.create_incident({"short_description": "our team"})
    servicenow.sim.add_human_comment(readable["number"], "Readable entry")

    adapter = await make_servicenow_adapter(servicenow)

    assert adapter.journal_verified is True


async def test_journal_check_still_fails_when_denied(
    servicenow: RunningServiceNow, make_servicenow_adapter: MakeAdapter
) -> None:
    """With short pages on, entries shown on a ticket but hidden in sys_journal_field still stop the connection."""
    servicenow.sim.settings.short_pages = True
    row = servicenow.sim.create_incident({"short_description": "seen"})
    servicenow.sim.add_human_comment(row["number"], "A work note", "work_notes")
    servicenow.sim.settings.journal_read_denied = True

    with pytest.raises(MisconfiguredError, match="sys_journal_field"):
        await make_servicenow_adapter(servicenow)


# A table extended from incident


async def test_child_table_inherits_choices(start_servicenow: StartServiceNow, make_servicenow_adapter: MakeAdapter) -> None:
    """Choices that a child of incident inherits, stored under incident and task, satisfy check, create and transitions."""
    running = await start_servicenow(table="u_mdr_incident")
    for row in running.sim.tables["sys_choice"].rows.values():
        row["name"] = "task" if row["element"] in ("impact", "urgency", "priority") else "incident"
    adapter = await make_servicenow_adapter(running)

    problems = await adapter.check(CATEGORY, ["1 - High", "3 - Low"])
    ref = await adapter.create_ticket(draft("inc-child-table"))
    await adapter.transition_to(ref, "In Progress")
    await adapter.transition_to(ref, "Resolved")
    state = await adapter.get_state(ref, ["priority"])

    assert problems == []
    assert running.sim.incident(ref.id)["impact"] == "1"
    assert running.sim.incident(ref.id)["close_code"] == adapter.settings.close_code
    assert state.status == "Resolved"
    assert state.values["priority"] == "1 - High"


# Characters outside the Basic Multilingual Plane


def cut_at_four_byte_characters(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the simulator store text as an instance on MySQL does: everything from the first 4-byte UTF-8 character on is lost.

    ServiceNow's KB0621602 describes this for String and journal fields, and
    question marks in place of such characters on MariaDB.
    """
    original = simulator_state._text_value

    def cut(name: str, raw: Any) -> str:
        text = original(name, raw)
        return re.split(r"[\U00010000-\U0010ffff]", text, maxsplit=1)[0]

    monkeypatch.setattr(simulator_state, "_text_value", cut)


async def test_cut_emoji_entry_written_again(
    servicenow: RunningServiceNow, sn_adapter: ServiceNowTicketAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An entry cut at an emoji is written again with U+FFFD, and later texts replace such characters from the start."""
    cut_at_four_byte_characters(monkeypatch)
    ref = await sn_adapter.create_ticket(draft("inc-emoji"))

    comment = await sn_adapter.add_comment(ref, CommentDraft("Host isolated 🔥, see 𝐝𝐞𝐭𝐚𝐢𝐥𝐬 below.\n\nDetails.", marker("c-emoji")))
    later = await sn_adapter.create_ticket(
        draft("inc-emoji-later", summary="Alert 🔥 on host", description="Host 🔥 isolated. Link: https://mdr.example")
    )
    listed = await sn_adapter.list_comments(ref)
    marked = [item for item in listed if item.marker == marker("c-emoji")]
    row = servicenow.sim.incident(later.id)

    assert [item.id for item in marked] == [comment.id]
    assert marked[0].body == "Host isolated \ufffd, see \ufffd\ufffd\ufffd\ufffd\ufffd\ufffd\ufffd below.\n\nDetails."
    assert len(listed) == 2
    assert sn_adapter.replaces_four_byte_characters is True
    assert row["description"].endswith("https://mdr.example")
    assert row["short_description"] == "Alert \ufffd on host"


async def test_emoji_kept_where_stored(servicenow: RunningServiceNow, sn_adapter: ServiceNowTicketAdapter) -> None:
    """On an instance that stores 4-byte characters, an emoji is written as it is, in one entry."""
    ref = await sn_adapter.create_ticket(draft("inc-emoji-kept", summary="Alert 🔥"))

    await sn_adapter.add_comment(ref, CommentDraft("Host isolated 🔥", marker("c-emoji-kept")))

    assert journal_values(servicenow, ref.id) == ["Host isolated 🔥\n\n[mdr-connector mdr:c-emoji-kept]"]
    assert servicenow.sim.incident(ref.id)["short_description"] == "Alert 🔥"
    assert sn_adapter.replaces_four_byte_characters is False


async def test_emoji_comment_posted_once(sn_harness: ServiceNowSyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """An MDR comment with an emoji lands whole once over three runs on an instance that cuts text at 4-byte characters."""
    cut_at_four_byte_characters(monkeypatch)
    incident_id = sn_harness.seed()["incident_id"]
    sn_harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>Contained 🔥 the host</p>", author="Ivan Petrov")

    for _run in range(3):
        await sn_harness.cycles(1)
        sn_harness.advance(2)

    assert copies_in_journal(sn_harness, incident_id, "the host") == 1
    assert copies_in_journal(sn_harness, incident_id, "Contained") == 2


async def test_forged_marker_not_taken_for_copy(sn_harness: ServiceNowSyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a lost journal write, a person's entry that types the awaited marker is not taken for the connector's copy."""
    incident_id = sn_harness.seed()["incident_id"]
    sync = await sn_harness.cycles(1)
    number = sn_harness.ticket_for(incident_id)["number"]
    comment = sn_harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>Real analyst note</p>", author="Ivan Petrov")
    sn_harness.sim.add_human_comment(number, f"Forged note\n\n[mdr-connector mdr:{comment['comment_id']}]")
    original = ServiceNowClient.update_row
    lost = [0]

    async def lose_first_entry(self: ServiceNowClient, operation: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if operation == "add_comment" and not lost[0]:
            lost[0] += 1
            raise OutcomeUnknownError("ServiceNow add_comment: no reply, so the write may have been applied")
        return await original(self, operation, *args, **kwargs)

    monkeypatch.setattr(ServiceNowClient, "update_row", lose_first_entry)
    await settle(sn_harness, sync)

    own_copies = [
        entry
        for entry in sn_harness.journal_of(incident_id)
        if entry["sys_created_by"] == SERVICE_USER and "Real analyst note" in entry["value"]
    ]
    assert lost[0] == 1
    assert len(own_copies) == 1
    assert copies_in_mdr(sn_harness, incident_id, "Forged note") == 1


# States


async def test_state_missing_from_choices(servicenow: RunningServiceNow, sn_adapter: ServiceNowTicketAdapter) -> None:
    """A state whose label sys_choice lacks shows as its stored value, and a move to that label names the known states."""
    choices = servicenow.sim.tables["sys_choice"].rows
    for sys_id in [key for key, row in choices.items() if (row["element"], row["value"]) == ("state", "2")]:
        del choices[sys_id]
    ref = await sn_adapter.create_ticket(draft("inc-odd-state"))
    servicenow.sim.set_state(ref.id, "2")

    state = await sn_adapter.get_state(ref)

    assert state.status == "2"
    assert state.status_category == "indeterminate"
    with pytest.raises(RejectedError) as caught:
        await sn_adapter.transition_to(ref, "In Progress")
    assert "New" in str(caught.value)
    assert "Resolved" in str(caught.value)
    assert servicenow.sim.incident(ref.id)["state"] == "2"
