"""Attachments both ways, end to end: MDR simulator, Jira simulator, SQLite ledger, real HTTP on loopback."""

from __future__ import annotations

import html
import logging
import re
from pathlib import Path
from typing import Any

import pytest
from fixtures_mdr import MDR_CLIENT_ID, MDR_CONNECTION_NAME
from fixtures_postgres import LEDGER_BACKENDS
from fixtures_sync import SyncHarness

from mdr_connector.connector.attachments import ATTACHMENT, ATTACHMENT_NOTICE
from mdr_connector.connector.engine import INCIDENT
from mdr_connector.connector.errors import RemoteUnavailableError
from mdr_connector.connector.store import DONE, MDR_TO_TICKET, PENDING, TICKET_TO_MDR
from mdr_connector.connector.tickets import NOTICE_ORIGIN


@pytest.fixture(params=LEDGER_BACKENDS)
def ledger_backend(request: pytest.FixtureRequest) -> str:
    """Every harness test here runs with its ledger on SQLite and again on PostgreSQL."""
    return request.param


pytestmark = pytest.mark.asyncio

UPLOAD_TO_JIRA = "POST /rest/api/2/issue/{issue}/attachments"
ADD_JIRA_COMMENT = "POST /rest/api/2/issue/{issue}/comment"
MDR_REPORT = "Отчёт о проверке WS-FIN-017.pdf"
JIRA_LOG = "журнал событий 🔥.txt"
SOC_ANALYST = "Ivan Petrov"


def spool_dir(harness: SyncHarness) -> Path:
    return harness.settings.data_dir / "spool" / harness.connection.name


def spool_files(harness: SyncHarness) -> list[Path]:
    folder = spool_dir(harness)
    return sorted(folder.iterdir()) if folder.exists() else []


def connector_copies(harness: SyncHarness, issue: Any) -> list[Any]:
    """The attachments the connector's account uploaded to an issue."""
    return [attachment for attachment in issue.attachments if attachment.author is harness.jira.sim.service]


def mdr_copies(harness: SyncHarness, incident_id: str) -> list[dict[str, Any]]:
    """The attachments the connector's token uploaded to an incident."""
    return [
        attachment
        for attachment in harness.mdr_sim.attachments(MDR_CLIENT_ID, incident_id)
        if attachment["author_name"] == MDR_CONNECTION_NAME
    ]


def visible_text(wiki: str) -> str:
    """Jira wiki markup without the backslash escapes the Markdown conversion adds, such as `\\(`."""
    return re.sub(r"\\(.)", r"\1", wiki)


def mdr_visible_text(html_text: str) -> str:
    """The words of an MDR comment, which MDR stores as HTML wrapped at any space."""
    return " ".join(html.unescape(re.sub(r"<[^>]*>", " ", html_text)).split())


def notices_on_issue(issue: Any) -> list[Any]:
    return [
        comment
        for comment in issue.comments
        if comment.properties.get("mdr-connector", {}).get("origin") == NOTICE_ORIGIN
    ]


def mdr_comments_naming(harness: SyncHarness, incident_id: str, text: str) -> list[dict[str, Any]]:
    return [comment for comment in harness.mdr_comments(incident_id) if text in comment["text"]]


def add_mdr_file(harness: SyncHarness, incident_id: str, name: str, content: bytes, **fields: Any) -> dict[str, Any]:
    return harness.mdr_sim.add_attachment(MDR_CLIENT_ID, incident_id, name, content, author=SOC_ANALYST, **fields)


async def linked_issue(harness: SyncHarness) -> tuple[str, Any]:
    """Seed an incident, run one cycle so it has its issue, and return both."""
    incident_id = harness.seed()["incident_id"]
    await harness.cycles(1)
    return incident_id, harness.issue_for(incident_id)


async def test_mdr_file_reaches_ticket(harness: SyncHarness) -> None:
    """An MDR attachment with a Cyrillic name arrives on the issue once, byte for byte, as the connector."""
    incident_id = harness.seed()["incident_id"]
    content = "Содержимое отчёта\n".encode() * 500
    add_mdr_file(harness, incident_id, MDR_REPORT, content)

    sync = await harness.cycles(1)

    issue = harness.issue_for(incident_id)
    [copy] = issue.attachments
    assert copy.filename == MDR_REPORT
    assert copy.author is harness.jira.sim.service
    assert copy.path.read_bytes() == content
    assert sync.stats.attachments_to_ticket == 1
    assert spool_files(harness) == []


async def test_ticket_file_reaches_mdr(harness: SyncHarness) -> None:
    """A Jira attachment with a Cyrillic and emoji name arrives in MDR once, with its author in the caption."""
    incident_id, issue = await linked_issue(harness)
    content = "строка журнала\n".encode() * 300
    harness.jira.sim.add_attachment(issue.key, JIRA_LOG, content)
    harness.advance(31)

    sync = await harness.cycles(1)

    [copy] = mdr_copies(harness, incident_id)
    assert copy["full_name"] == JIRA_LOG
    assert copy["file_size"] == len(content)
    assert harness.mdr_sim.attachment_content(copy["attachment_id"]) == content
    assert harness.jira.sim.human.display_name in copy["caption"]
    assert issue.key in copy["caption"]
    assert "original name" not in copy["caption"]
    assert sync.stats.attachments_to_mdr == 1
    assert spool_files(harness) == []


async def test_unsafe_names_cleaned_both_ways(harness: SyncHarness) -> None:
    """Path parts and control characters are cut from names; MDR keeps the original name in the caption."""
    incident_id, issue = await linked_issue(harness)
    add_mdr_file(harness, incident_id, "../../etc/passwd", b"root:x:0:0")
    harness.jira.sim.add_attachment(issue.key, "C:\\temp\\отчёт\x07\u202e.txt", b"report")
    harness.advance(31)

    await harness.cycles(1)

    assert [copy.filename for copy in connector_copies(harness, issue)] == ["passwd"]
    [copy] = mdr_copies(harness, incident_id)
    assert copy["full_name"] == "отчёт.txt"
    assert "original name: C:\\temp\\отчёт\\x07\\u202e.txt" in copy["caption"]


@pytest.mark.parametrize(
    ("limit_setting", "expected_reason"),
    [
        ({"upload_limit_bytes": 4096}, "larger than the attachment limit of Jira, which is 4.0 KiB (4096 bytes)"),
        ({"attachments_enabled": False}, "attachments are turned off in Jira"),
    ],
    ids=["jira-upload-limit", "jira-attachments-off"],
)
async def test_mdr_file_over_jira_limit(
    harness: SyncHarness, limit_setting: dict[str, Any], expected_reason: str
) -> None:
    """A file Jira cannot take is not uploaded: one notice names it, its size, author and console link."""
    for name, value in limit_setting.items():
        setattr(harness.jira.sim.settings, name, value)
    incident_id = harness.seed()["incident_id"]
    add_mdr_file(harness, incident_id, "capture.pcap", b"\x00" * 5000)

    sync = await harness.cycles(1)
    await harness.cycles(3)

    issue = harness.issue_for(incident_id)
    assert issue.attachments == []
    assert harness.jira.sim.calls[UPLOAD_TO_JIRA] == 0
    [notice] = notices_on_issue(issue)
    text = visible_text(notice.body)
    assert "capture.pcap" in text
    assert "4.9 KiB (5000 bytes)" in text
    assert SOC_ANALYST in text
    assert expected_reason in text
    assert f"https://mdr.kaspersky.com/incidents/{incident_id}" in text
    assert sync.stats.attachments_filtered == 1
    assert mdr_comments_naming(harness, incident_id, "capture.pcap") == []


async def test_mdr_file_over_mapping_limit(harness: SyncHarness) -> None:
    """The mapping's max_bytes for files to the ticket keeps a larger file back with a notice."""
    harness.use_mapping(attachments={"to_ticket": {"max_bytes": 1000}})
    incident_id = harness.seed()["incident_id"]
    add_mdr_file(harness, incident_id, "memory.dmp", b"\x01" * 1001)
    add_mdr_file(harness, incident_id, "small.txt", b"\x01" * 1000)

    await harness.cycles(1)

    issue = harness.issue_for(incident_id)
    assert [copy.filename for copy in issue.attachments] == ["small.txt"]
    [notice] = notices_on_issue(issue)
    assert "memory.dmp" in notice.body
    assert "attachments.to_ticket.max_bytes" in notice.body


async def test_ticket_file_over_mapping_limit(harness: SyncHarness) -> None:
    """A Jira file above max_bytes for MDR gets one MDR notice with the ticket link, never copied back to Jira."""
    harness.use_mapping(attachments={"to_mdr": {"max_bytes": 1000}})
    incident_id, issue = await linked_issue(harness)
    harness.jira.sim.add_attachment(issue.key, "dump.bin", b"\x02" * 2000)
    harness.advance(31)

    sync = await harness.cycles(1)
    await harness.cycles(3)

    assert mdr_copies(harness, incident_id) == []
    assert harness.mdr_sim.call_counts["attachments/upload"] == 0
    [notice] = mdr_comments_naming(harness, incident_id, "dump.bin")
    assert notice["author_name"] == MDR_CONNECTION_NAME
    text = mdr_visible_text(notice["text"])
    assert "2.0 KiB (2000 bytes)" in text
    assert harness.jira.sim.human.display_name in text
    assert f"{harness.jira.url}/browse/{issue.key}" in text
    assert "attachments.to_mdr.max_bytes" in text
    assert sync.stats.attachments_filtered == 1
    assert [comment for comment in issue.comments if "dump.bin" in comment.body] == []


async def test_mdr_rejects_too_large(harness: SyncHarness) -> None:
    """A file MDR rejects with 413 gets one notice, and the upload is not tried again."""
    incident_id, issue = await linked_issue(harness)
    harness.mdr_sim.update_settings(max_upload_bytes=1000)
    harness.jira.sim.add_attachment(issue.key, "evidence.zip", b"\x03" * 2000)
    harness.advance(31)

    await harness.cycles(3)

    assert mdr_copies(harness, incident_id) == []
    assert harness.mdr_sim.call_counts["attachments/upload"] == 1
    [notice] = mdr_comments_naming(harness, incident_id, "evidence.zip")
    assert "MDR rejected it as too large (HTTP 413)" in mdr_visible_text(notice["text"])
    assert await harness.store.get_parked(harness.connection.name, INCIDENT, incident_id) is None
    assert spool_files(harness) == []


async def test_jira_rejects_too_large(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file Jira rejects with 413 despite the limit it reported earlier gets one notice instead."""
    harness.jira.sim.settings.upload_limit_bytes = 1000
    incident_id = harness.seed()["incident_id"]
    add_mdr_file(harness, incident_id, "evidence.zip", b"\x03" * 2000)
    sync = await harness.engine()

    async def stale_limit() -> int:
        return 10 * 1024 * 1024

    monkeypatch.setattr(sync.tickets, "attachment_limit", stale_limit)

    await harness.cycles(3, sync)

    issue = harness.issue_for(incident_id)
    assert issue.attachments == []
    assert harness.jira.sim.calls[UPLOAD_TO_JIRA] == 1
    [notice] = notices_on_issue(issue)
    assert "Jira rejected it as too large (HTTP 413)" in visible_text(notice.body)
    assert spool_files(harness) == []


async def test_denied_extension_both_ways(harness: SyncHarness) -> None:
    """Denied extensions (any case, behind a bidi override or trailing dots) get notices and are not copied."""
    incident_id, issue = await linked_issue(harness)
    add_mdr_file(harness, incident_id, "invoice\u202efdp.exe", b"MZ")
    harness.jira.sim.add_attachment(issue.key, "cleanup.PS1. ", b"Remove-Item")
    harness.advance(31)

    await harness.cycles(3)

    assert connector_copies(harness, issue) == []
    assert mdr_copies(harness, incident_id) == []
    [ticket_notice] = notices_on_issue(issue)
    assert "invoicefdp.exe" in ticket_notice.body
    assert "attachments.to_ticket.deny_extensions" in ticket_notice.body
    [mdr_notice] = mdr_comments_naming(harness, incident_id, "cleanup.PS1")
    assert "extension .ps1" in mdr_visible_text(mdr_notice["text"])


async def test_allow_list(harness: SyncHarness) -> None:
    """With allow_extensions set, only those extensions go; a name without one gets a notice."""
    harness.use_mapping(attachments={"to_ticket": {"allow_extensions": ["pdf", "TXT"]}})
    incident_id = harness.seed()["incident_id"]
    add_mdr_file(harness, incident_id, "report.PDF", b"%PDF")
    add_mdr_file(harness, incident_id, "notes.txt", b"notes")
    add_mdr_file(harness, incident_id, "image.png", b"\x89PNG")
    add_mdr_file(harness, incident_id, "README", b"readme")

    await harness.cycles(1)

    issue = harness.issue_for(incident_id)
    assert sorted(copy.filename for copy in issue.attachments) == ["notes.txt", "report.PDF"]
    bodies = sorted(notice.body for notice in notices_on_issue(issue))
    assert len(bodies) == 2
    assert "has no extension" in bodies[0]
    assert "image.png" in bodies[1]


async def test_three_cycles_no_duplicates(harness: SyncHarness) -> None:
    """Files both ways, three cycles each on a fresh engine: one copy each way, nothing echoed back."""
    incident_id, issue = await linked_issue(harness)
    add_mdr_file(harness, incident_id, MDR_REPORT, b"report")
    add_mdr_file(harness, incident_id, "tool.exe", b"MZ")
    harness.jira.sim.add_attachment(issue.key, JIRA_LOG, b"log")
    harness.jira.sim.add_attachment(issue.key, JIRA_LOG, b"log")
    harness.advance(31)

    for _restart in range(3):
        await harness.cycles(1)
        harness.advance(31)

    assert [copy.filename for copy in connector_copies(harness, issue)] == [MDR_REPORT]
    assert [copy["full_name"] for copy in mdr_copies(harness, incident_id)] == [JIRA_LOG, JIRA_LOG]
    assert len(issue.attachments) == 3
    assert len(harness.mdr_sim.attachments(MDR_CLIENT_ID, incident_id)) == 4
    assert len(notices_on_issue(issue)) == 1
    assert await harness.store.get_parked(harness.connection.name, INCIDENT, incident_id) is None
    items = await harness.store.get_items(harness.connection.name, incident_id, ATTACHMENT)
    assert sorted((item.direction, item.state) for item in items) == [
        (MDR_TO_TICKET, DONE),
        (TICKET_TO_MDR, DONE),
        (TICKET_TO_MDR, DONE),
    ]


async def test_lost_jira_upload_reply(harness: SyncHarness) -> None:
    """An upload to Jira whose reply is lost is found by name and size on the retry, not uploaded twice."""
    harness.jira.sim.drop_reply_after_commit("POST", "/rest/api/2/issue/{issue}/attachments")
    incident_id = harness.seed()["incident_id"]
    add_mdr_file(harness, incident_id, MDR_REPORT, b"report body")

    await harness.cycles(1)

    issue = harness.issue_for(incident_id)
    assert len(issue.attachments) == 1
    [item] = await harness.store.get_items(harness.connection.name, incident_id, ATTACHMENT)
    assert item.state == PENDING
    assert await harness.store.get_parked(harness.connection.name, INCIDENT, incident_id) is not None

    harness.advance(5)
    await harness.cycles(2)

    assert len(issue.attachments) == 1
    assert harness.jira.sim.calls[UPLOAD_TO_JIRA] == 1
    [item] = await harness.store.get_items(harness.connection.name, incident_id, ATTACHMENT)
    assert (item.state, item.target_id) == (DONE, str(issue.attachments[0].id))
    assert spool_files(harness) == []


async def test_lost_mdr_upload_reply(harness: SyncHarness) -> None:
    """An upload to MDR whose reply is lost is found by name and size on the retry, not uploaded twice."""
    incident_id, issue = await linked_issue(harness)
    harness.mdr_sim.drop_reply_after_commit("attachments/upload")
    harness.jira.sim.add_attachment(issue.key, JIRA_LOG, b"log line")
    harness.advance(31)

    await harness.cycles(1)

    assert len(mdr_copies(harness, incident_id)) == 1
    [item] = await harness.store.get_items(harness.connection.name, incident_id, ATTACHMENT)
    assert item.state == PENDING

    harness.advance(5)
    await harness.cycles(2)

    [copy] = mdr_copies(harness, incident_id)
    assert harness.mdr_sim.call_counts["attachments/upload"] == 1
    [item] = await harness.store.get_items(harness.connection.name, incident_id, ATTACHMENT)
    assert (item.state, item.target_id) == (DONE, copy["attachment_id"])


async def test_lost_notice_reply(harness: SyncHarness) -> None:
    """A notice whose reply is lost is found by its marker on the retry, not posted twice."""
    incident_id = harness.seed()["incident_id"]
    add_mdr_file(harness, incident_id, "tool.exe", b"MZ")
    harness.jira.sim.drop_reply_after_commit("POST", "/rest/api/2/issue/{issue}/comment")

    await harness.cycles(1)
    harness.advance(5)
    await harness.cycles(2)

    issue = harness.issue_for(incident_id)
    assert len(notices_on_issue(issue)) == 1
    assert harness.jira.sim.calls[ADD_JIRA_COMMENT] == 1
    [item] = await harness.store.get_items(harness.connection.name, incident_id, ATTACHMENT_NOTICE)
    assert (item.state, item.target_id) == (DONE, str(notices_on_issue(issue)[0].id))


async def test_lost_mdr_notice_reply(harness: SyncHarness) -> None:
    """An MDR notice whose reply is lost is found by its footer on the retry, not posted twice."""
    incident_id, issue = await linked_issue(harness)
    harness.jira.sim.add_attachment(issue.key, "setup.msi", b"msi")
    harness.mdr_sim.drop_reply_after_commit("comments/create")
    harness.advance(31)

    await harness.cycles(1)
    harness.advance(5)
    await harness.cycles(2)

    [notice] = mdr_comments_naming(harness, incident_id, "setup.msi")
    assert harness.mdr_sim.call_counts["comments/create"] == 1
    [item] = await harness.store.get_items(harness.connection.name, incident_id, ATTACHMENT_NOTICE)
    assert (item.state, item.target_id) == (DONE, notice["comment_id"])


async def test_identical_files_each_copied(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two MDR files with the same name and size both arrive, though the first upload failed before landing."""
    incident_id = harness.seed()["incident_id"]
    add_mdr_file(harness, incident_id, "same.txt", b"same")
    add_mdr_file(harness, incident_id, "same.txt", b"same")
    sync = await harness.engine()
    real_upload = sync.tickets.upload_attachment
    calls = 0

    async def fail_first_upload(ref: Any, upload: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RemoteUnavailableError("connection reset before the request reached Jira")
        return await real_upload(ref, upload)

    monkeypatch.setattr(sync.tickets, "upload_attachment", fail_first_upload)

    await harness.cycles(1, sync)
    issue = harness.issue_for(incident_id)
    assert len(issue.attachments) == 1
    harness.advance(5)
    await harness.cycles(2, sync)

    assert [copy.filename for copy in issue.attachments] == ["same.txt", "same.txt"]
    items = await harness.store.get_items(harness.connection.name, incident_id, ATTACHMENT)
    assert {item.state for item in items} == {DONE}
    assert len({item.target_id for item in items}) == 2


async def test_cut_download_leaves_spool_empty(harness: SyncHarness) -> None:
    """A download cut short on either side uploads nothing, leaves the spool empty, and succeeds on a later try."""
    incident_id, issue = await linked_issue(harness)
    harness.mdr_sim.update_settings(download_cutoff_fraction=0.5)
    harness.jira.sim.settings.download_cut_bytes = 100
    add_mdr_file(harness, incident_id, MDR_REPORT, b"m" * 1000)
    harness.jira.sim.add_attachment(issue.key, JIRA_LOG, b"j" * 1000)
    harness.advance(31)

    sync = await harness.cycles(1)

    assert connector_copies(harness, issue) == []
    assert mdr_copies(harness, incident_id) == []
    parked = await harness.store.get_parked(harness.connection.name, INCIDENT, incident_id)
    assert parked is not None
    assert "2 attachment(s)" in parked.reason
    assert spool_files(harness) == []

    harness.mdr_sim.update_settings(download_cutoff_fraction=0.0)
    harness.jira.sim.settings.download_cut_bytes = 0
    harness.advance(5)
    await harness.cycles(1, sync)

    assert [copy.filename for copy in connector_copies(harness, issue)] == [MDR_REPORT]
    assert [copy["full_name"] for copy in mdr_copies(harness, incident_id)] == [JIRA_LOG]
    assert spool_files(harness) == []


async def test_bad_file_does_not_stop_others(harness: SyncHarness) -> None:
    """An MDR file whose listed size is wrong fails alone; the next one is still copied."""
    incident_id = harness.seed()["incident_id"]
    add_mdr_file(harness, incident_id, "wrong-size.txt", b"x" * 100, file_size=50)
    add_mdr_file(harness, incident_id, "fine.txt", b"fine")

    await harness.cycles(1)

    issue = harness.issue_for(incident_id)
    assert [copy.filename for copy in issue.attachments] == ["fine.txt"]
    parked = await harness.store.get_parked(harness.connection.name, INCIDENT, incident_id)
    assert parked is not None
    assert "wrong-size" not in parked.reason
    wrong = harness.mdr_sim.attachments(MDR_CLIENT_ID, incident_id)[0]["attachment_id"]
    assert f"MDR attachment {wrong}" in parked.reason
    assert spool_files(harness) == []


async def test_spool_leftovers_removed(harness: SyncHarness) -> None:
    """Files an earlier process left in the spool folder are removed; the folder is owner-only."""
    folder = spool_dir(harness)
    folder.mkdir(parents=True)
    (folder / "attachment-0123456789abcdef").write_bytes(b"partial")
    (folder / ".mdr-download-x.part").write_bytes(b"partial")
    incident_id = harness.seed()["incident_id"]
    add_mdr_file(harness, incident_id, MDR_REPORT, b"report")

    await harness.cycles(1)

    assert spool_files(harness) == []
    assert folder.stat().st_mode & 0o777 == 0o700
    assert len(harness.issue_for(incident_id).attachments) == 1


async def test_disabled_copies_nothing(harness: SyncHarness) -> None:
    """With attachments off in the mapping, neither side is listed or written."""
    harness.use_mapping(attachments={"enabled": False})
    incident_id = harness.seed()["incident_id"]
    add_mdr_file(harness, incident_id, MDR_REPORT, b"report")

    await harness.cycles(2)

    issue = harness.issue_for(incident_id)
    assert issue.attachments == []
    assert notices_on_issue(issue) == []
    assert harness.mdr_sim.call_counts["attachments/list"] == 0


async def test_own_uploads_never_copied(harness: SyncHarness) -> None:
    """Files the connector's MDR token or Jira account uploaded, outside the ledger, stay where they are."""
    incident_id, issue = await linked_issue(harness)
    harness.mdr_sim.add_attachment(MDR_CLIENT_ID, incident_id, "from-old-install.txt", b"old", author=MDR_CONNECTION_NAME)
    harness.jira.sim.add_attachment(issue.key, "uploaded-by-service.txt", b"svc", author=harness.jira.sim.service)
    harness.advance(31)

    sync = await harness.cycles(2)

    assert [copy.filename for copy in issue.attachments] == ["uploaded-by-service.txt"]
    assert [copy["full_name"] for copy in mdr_copies(harness, incident_id)] == ["from-old-install.txt"]
    assert sync.stats.attachments_to_ticket == sync.stats.attachments_to_mdr == 0
    assert await harness.store.get_items(harness.connection.name, incident_id, ATTACHMENT) == []


async def test_log_events(harness: SyncHarness, caplog: pytest.LogCaptureFixture) -> None:
    """Each copy and each filtered file logs one event with ids, and a changed name with its original."""
    incident_id = harness.seed()["incident_id"]
    copied = add_mdr_file(harness, incident_id, "..\\evil\nname.txt", b"text")
    filtered = add_mdr_file(harness, incident_id, "tool.exe", b"MZ")
    caplog.set_level(logging.INFO, logger="mdr_connector.connector.attachments")

    await harness.cycles(1)

    issue = harness.issue_for(incident_id)
    events = {record.message: record for record in caplog.records if record.name.endswith(".attachments")}
    mirrored = events["sync.attachment.mirrored"]
    assert mirrored.incident_id == incident_id
    assert mirrored.ticket_key == issue.key
    assert mirrored.direction == MDR_TO_TICKET
    assert mirrored.attachment_id == copied["attachment_id"]
    assert mirrored.target_attachment_id == str(issue.attachments[0].id)
    assert mirrored.file_name == "evilname.txt"
    assert mirrored.original_file_name == "..\\evil\\nname.txt"
    assert mirrored.bytes == 4
    skipped = events["sync.attachment.filtered"]
    assert skipped.attachment_id == filtered["attachment_id"]
    assert skipped.notice_comment_id == str(notices_on_issue(issue)[0].id)
