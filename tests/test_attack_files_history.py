"""Hostile inputs, crash windows and races for attachments, history, assets and routing, end to end.

Each test drives the real engine against the MDR and Jira simulators over
loopback, usually for several cycles on fresh engines, and checks that
nothing is lost, copied twice, echoed back or written where it must not be.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

import pytest
from fixtures_mdr import MDR_CLIENT_ID, MDR_CONNECTION_NAME
from fixtures_sync import SyncHarness

from mdr_connector.adapters.mdr.models import HistoryEntry
from mdr_connector.adapters.mdr.simulator.state import HistoryRecord
from mdr_connector.connector.attachments import ATTACHMENT, ATTACHMENT_NOTICE
from mdr_connector.connector.config import FilterSettings
from mdr_connector.connector.engine import HISTORY_CURSOR, INCIDENT
from mdr_connector.connector.errors import ConnectionFatalError, RemoteUnavailableError
from mdr_connector.connector.filenames import MAX_NAME_BYTES
from mdr_connector.connector.store import DONE, LINKED, MDR_TO_TICKET, PENDING, TICKET_TO_MDR
from mdr_connector.connector.tickets import NOTICE_ORIGIN

pytestmark = pytest.mark.asyncio

SOC_ANALYST = "Ivan Petrov"
UPLOAD_TO_JIRA = "POST /rest/api/2/issue/{issue}/attachments"
CREATE_ISSUE = "POST /rest/api/2/issue"
PROPERTY_KEY = "mdr-connector"


# Helpers


class ProcessKilled(BaseException):
    """Stands for the process dying at a given point: no `except Exception` in the engine stops it."""


def spool_files(harness: SyncHarness) -> list[Path]:
    folder = harness.settings.data_dir / "spool" / harness.connection.name
    return sorted(folder.iterdir()) if folder.is_dir() and not folder.is_symlink() else []


def connector_copies(harness: SyncHarness, issue: Any) -> list[Any]:
    return [attachment for attachment in issue.attachments if attachment.author is harness.jira.sim.service]


def mdr_files(harness: SyncHarness, incident_id: str) -> list[dict[str, Any]]:
    return harness.mdr_sim.attachments(MDR_CLIENT_ID, incident_id)


def mdr_copies(harness: SyncHarness, incident_id: str) -> list[dict[str, Any]]:
    return [item for item in mdr_files(harness, incident_id) if item["author_name"] == MDR_CONNECTION_NAME]


def mdr_notices_by_connector(harness: SyncHarness, incident_id: str) -> list[dict[str, Any]]:
    return [comment for comment in harness.mdr_comments(incident_id) if comment["author_name"] == MDR_CONNECTION_NAME]


def notices_on_issue(issue: Any) -> list[Any]:
    return [
        comment for comment in issue.comments if comment.properties.get(PROPERTY_KEY, {}).get("origin") == NOTICE_ORIGIN
    ]


def mdr_visible_text(text: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]*>", " ", text)).split())


def add_mdr_file(harness: SyncHarness, incident_id: str, name: str, content: bytes, **fields: Any) -> dict[str, Any]:
    return harness.mdr_sim.add_attachment(MDR_CLIENT_ID, incident_id, name, content, author=SOC_ANALYST, **fields)


async def linked_issue(harness: SyncHarness) -> tuple[str, Any]:
    incident_id = harness.seed()["incident_id"]
    await harness.cycles(1)
    return incident_id, harness.issue_for(incident_id)


async def restarts(harness: SyncHarness, count: int, seconds: float = 31) -> None:
    """Run one cycle on each of `count` fresh engines, moving both clocks past the search delay in between."""
    for _restart in range(count):
        await harness.cycles(1)
        harness.advance(seconds)


async def parked_reason(harness: SyncHarness, incident_id: str) -> str | None:
    parked = await harness.store.get_parked(harness.connection.name, INCIDENT, incident_id)
    return parked.reason if parked is not None else None


# Attachments: hostile names


HOSTILE_MDR_NAMES = {
    "..": "attachment",
    "CON.txt": "_CON.txt",
    "a/../../b": "b",
    "invoice\u202etxt.pdf": "invoicetxt.pdf",
    "..\\..\\boot.ini": "boot.ini",
    "Отчёт 🔥.txt": "Отчёт 🔥.txt",
}


async def test_hostile_mdr_names_reach_ticket_cleaned(harness: SyncHarness) -> None:
    """Names with path parts, device names, bidi overrides and a 300-byte name arrive cleaned, once each."""
    incident_id, issue = await linked_issue(harness)
    long_name = "я" * 150 + ".log"
    for index, name in enumerate(HOSTILE_MDR_NAMES):
        add_mdr_file(harness, incident_id, name, f"file {index}".encode())
    add_mdr_file(harness, incident_id, long_name, b"long")

    await restarts(harness, 3)

    names = [copy.filename for copy in connector_copies(harness, issue)]
    assert sorted(names[:-1]) == sorted(HOSTILE_MDR_NAMES.values())
    assert len(names[-1].encode("utf-8")) <= MAX_NAME_BYTES
    assert names[-1].endswith(".log")
    assert await parked_reason(harness, incident_id) is None
    assert spool_files(harness) == []


async def test_hostile_ticket_names_reach_mdr_cleaned(harness: SyncHarness) -> None:
    """Jira names with NUL, path parts and a device name arrive in MDR cleaned, with the original in the caption."""
    incident_id, issue = await linked_issue(harness)
    harness.jira.sim.add_attachment(issue.key, "../../../etc/shadow", b"x")
    harness.jira.sim.add_attachment(issue.key, "nul.tar.gz", b"y")
    harness.jira.sim.add_attachment(issue.key, "evil\x00.txt", b"z")
    harness.advance(31)

    await restarts(harness, 3)

    copies = {copy["full_name"]: copy for copy in mdr_copies(harness, incident_id)}
    assert sorted(copies) == ["_nul.tar.gz", "evil.txt", "shadow"]
    assert "original name: ../../../etc/shadow" in copies["shadow"]["caption"]
    assert "original name: evil\\x00.txt" in copies["evil.txt"]["caption"]
    assert "\x00" not in copies["evil.txt"]["caption"]


async def test_same_cleaned_name_lost_replies(harness: SyncHarness) -> None:
    """Two Jira files that clean to the same name and size, both upload replies lost: each gets its own MDR copy."""
    incident_id, issue = await linked_issue(harness)
    harness.jira.sim.add_attachment(issue.key, "a/x.txt", b"same")
    harness.jira.sim.add_attachment(issue.key, "b\\x.txt", b"same")
    harness.mdr_sim.drop_reply_after_commit("attachments/upload", times=2)
    harness.advance(31)

    await restarts(harness, 3, seconds=5)

    copies = mdr_copies(harness, incident_id)
    assert [copy["full_name"] for copy in copies] == ["x.txt", "x.txt"]
    assert harness.mdr_sim.call_counts["attachments/upload"] == 2
    items = await harness.store.get_items(harness.connection.name, incident_id, ATTACHMENT)
    assert {item.state for item in items} == {DONE}
    assert sorted(item.target_id for item in items) == sorted(copy["attachment_id"] for copy in copies)


# Attachments: lists that repeat themselves, files that change or vanish


async def test_mdr_list_repeating_a_file(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """An attachments/list reply that names the same file twice still gives one copy on the ticket."""
    incident_id = harness.seed()["incident_id"]
    add_mdr_file(harness, incident_id, "report.pdf", b"%PDF-1.7")
    sync = await harness.engine()
    real_list = sync.mdr.list_attachments

    async def repeating_list(incident: str) -> Any:
        page = await real_list(incident)
        page.items.extend(list(page.items))
        return page

    monkeypatch.setattr(sync.mdr, "list_attachments", repeating_list)

    await harness.cycles(3, sync)

    issue = harness.issue_for(incident_id)
    assert [copy.filename for copy in connector_copies(harness, issue)] == ["report.pdf"]
    assert harness.jira.sim.calls[UPLOAD_TO_JIRA] == 1
    [item] = await harness.store.get_items(harness.connection.name, incident_id, ATTACHMENT)
    assert (item.state, item.target_id) == (DONE, str(issue.attachments[0].id))


async def test_ticket_list_repeating_a_file(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ticket attachment list that names the same file twice still gives one copy in MDR."""
    incident_id, issue = await linked_issue(harness)
    harness.jira.sim.add_attachment(issue.key, "log.txt", b"line")
    harness.advance(31)
    sync = await harness.engine()
    real_list = sync.tickets.list_attachments

    async def repeating_list(ref: Any) -> Any:
        files = await real_list(ref)
        return files + files

    monkeypatch.setattr(sync.tickets, "list_attachments", repeating_list)

    await harness.cycles(3, sync)

    assert [copy["full_name"] for copy in mdr_copies(harness, incident_id)] == ["log.txt"]
    assert harness.mdr_sim.call_counts["attachments/upload"] == 1


async def test_ticket_file_deleted_before_download(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Jira file deleted between the list and the download uploads nothing and stops blocking once gone."""
    incident_id, issue = await linked_issue(harness)
    doomed = harness.jira.sim.add_attachment(issue.key, "doomed.txt", b"soon gone")
    harness.advance(31)
    sync = await harness.engine()
    real_download = sync.tickets.download_attachment

    async def delete_then_download(attachment: Any, path: Path) -> int:
        harness.jira.sim.delete_attachment(doomed.id)
        return await real_download(attachment, path)

    monkeypatch.setattr(sync.tickets, "download_attachment", delete_then_download)
    await harness.cycles(1, sync)

    assert mdr_copies(harness, incident_id) == []
    assert await parked_reason(harness, incident_id) is not None
    assert spool_files(harness) == []

    harness.advance(5)
    await restarts(harness, 2)

    assert mdr_copies(harness, incident_id) == []
    assert await parked_reason(harness, incident_id) is None


async def test_mdr_file_grows_after_listing(harness: SyncHarness) -> None:
    """An MDR file whose bytes change after it was listed is not uploaded cut or padded; the listed size wins."""
    incident_id, issue = await linked_issue(harness)
    listed = add_mdr_file(harness, incident_id, "grows.bin", b"a" * 100)
    harness.mdr_sim.blobs.path(listed["attachment_id"]).write_bytes(b"b" * 5000)
    harness.advance(31)

    await harness.cycles(1)

    assert connector_copies(harness, issue) == []
    assert await parked_reason(harness, incident_id) is not None
    assert spool_files(harness) == []

    harness.mdr_sim.blobs.path(listed["attachment_id"]).write_bytes(b"c" * 100)
    harness.advance(5)
    await restarts(harness, 2)

    [copy] = connector_copies(harness, issue)
    assert copy.path.read_bytes() == b"c" * 100


# Attachments: notices


async def test_lost_notice_reply_then_limit_raised(harness: SyncHarness) -> None:
    """A notice whose reply was lost keeps its file back after the limit is raised: never a notice and the file."""
    harness.use_mapping(attachments={"to_ticket": {"max_bytes": 1000}})
    incident_id = harness.seed()["incident_id"]
    add_mdr_file(harness, incident_id, "capture.pcap", b"\x00" * 2000)
    harness.jira.sim.drop_reply_after_commit("POST", "/rest/api/2/issue/{issue}/comment")
    await harness.cycles(1)
    issue = harness.issue_for(incident_id)
    assert len(notices_on_issue(issue)) == 1

    harness.use_mapping(attachments={"to_ticket": {"max_bytes": 10_000}})
    harness.advance(5)
    await restarts(harness, 3)

    assert len(notices_on_issue(issue)) == 1
    assert connector_copies(harness, issue) == []
    [notice_item] = await harness.store.get_items(harness.connection.name, incident_id, ATTACHMENT_NOTICE)
    assert (notice_item.state, notice_item.target_id) == (DONE, str(notices_on_issue(issue)[0].id))


async def test_lost_mdr_notice_reply_then_limit_raised(harness: SyncHarness) -> None:
    """The same for a ticket file: an MDR notice that landed without a reply keeps the file out of MDR."""
    harness.use_mapping(attachments={"to_mdr": {"max_bytes": 1000}})
    incident_id, issue = await linked_issue(harness)
    harness.jira.sim.add_attachment(issue.key, "dump.bin", b"\x02" * 2000)
    harness.mdr_sim.drop_reply_after_commit("comments/create")
    harness.advance(31)
    await harness.cycles(1)

    harness.use_mapping(attachments={"to_mdr": {"max_bytes": 10_000}})
    harness.advance(5)
    await restarts(harness, 3)

    assert mdr_copies(harness, incident_id) == []
    assert len([c for c in harness.mdr_comments(incident_id) if "dump.bin" in c["text"]]) == 1


async def test_forged_notice_marker_not_taken(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A person's comment carrying the notice marker is not taken for the connector's notice after a failed post."""
    incident_id = harness.seed()["incident_id"]
    tool = add_mdr_file(harness, incident_id, "tool.exe", b"MZ")
    sync = await harness.engine()
    real_add = sync.tickets.add_comment
    failed = False

    async def fail_first_notice(ref: Any, draft: Any) -> Any:
        nonlocal failed
        if draft.marker.origin == NOTICE_ORIGIN and not failed:
            failed = True
            raise RemoteUnavailableError("connection reset before the request reached Jira")
        return await real_add(ref, draft)

    monkeypatch.setattr(sync.tickets, "add_comment", fail_first_notice)
    await harness.cycles(1, sync)
    issue = harness.issue_for(incident_id)
    marker = {"origin": NOTICE_ORIGIN, "source_id": f"attachment:{tool['attachment_id']}"}
    harness.jira.sim.add_comment(issue.key, "nothing to see", properties=[{"key": PROPERTY_KEY, "value": marker}])

    harness.advance(5)
    await restarts(harness, 2)

    own_notices = [notice for notice in notices_on_issue(issue) if notice.author is harness.jira.sim.service]
    assert len(own_notices) == 1
    assert "tool.exe" in own_notices[0].body


async def test_notices_not_mirrored_with_all_policy(harness: SyncHarness) -> None:
    """With every ticket comment going to MDR, notices still stay on their side, over several restarts."""
    harness.use_mapping(comments={"to_mdr": "all", "on_mdr_delete": "mirror"})
    incident_id, issue = await linked_issue(harness)
    add_mdr_file(harness, incident_id, "tool.exe", b"MZ")
    harness.jira.sim.add_attachment(issue.key, "cleanup.ps1", b"Remove-Item")
    harness.advance(31)

    await restarts(harness, 3)

    assert len(notices_on_issue(issue)) == 1
    assert [c for c in harness.mdr_comments(incident_id) if "tool.exe" in c["text"]] == []
    assert len([c for c in harness.mdr_comments(incident_id) if "cleanup.ps1" in c["text"]]) == 1
    assert [c for c in issue.comments if "cleanup.ps1" in c.body] == []


async def test_notice_author_markup_stays_text(harness: SyncHarness) -> None:
    """An MDR author name full of Markdown and Jira markup shows as text in the notice: no link, image or mention."""
    incident_id = harness.seed()["incident_id"]
    harness.mdr_sim.add_attachment(
        MDR_CLIENT_ID,
        incident_id,
        "tool.exe",
        b"MZ",
        author="[click](https://evil.example) *bold* [~accountid:1] !https://evil.example/a.png! |cell|",
    )

    await harness.cycles(1)

    [notice] = notices_on_issue(harness.issue_for(incident_id))
    assert not notice.body.startswith("{noformat}")
    assert "[click|https://evil.example]" not in notice.body
    assert "!https://evil.example/a.png!" not in notice.body
    assert "[~accountid:1]" not in notice.body
    assert "\\*bold\\*" in notice.body
    assert "\\|cell\\|" in notice.body


async def test_jira_author_forged_footer(harness: SyncHarness) -> None:
    """A Jira display name that forges the connector's MDR footer cannot name another source in the notice."""
    incident_id, issue = await linked_issue(harness)
    harness.jira.sim.human.display_name = "Eve\n\n_mdr-connector: jira comment 1_\n\n"
    harness.jira.sim.add_attachment(issue.key, "setup.msi", b"msi")
    harness.advance(31)

    await restarts(harness, 3)

    [notice] = [c for c in harness.mdr_comments(incident_id) if "setup.msi" in c["text"]]
    assert mdr_visible_text(notice["text"]).endswith(f"jira comment attachment:{issue.attachments[0].id}")
    assert [c for c in issue.comments if "setup.msi" in c.body] == []


# Attachments: the spool folder


async def test_spool_symlink_not_followed(harness: SyncHarness, tmp_path: Path) -> None:
    """A spool folder replaced by a symlink is refused: the files where it points stay, nothing is uploaded."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "attachment-keep").write_bytes(b"precious")
    spool_parent = harness.settings.data_dir / "spool"
    spool_parent.mkdir()
    (spool_parent / harness.connection.name).symlink_to(elsewhere, target_is_directory=True)
    incident_id = harness.seed()["incident_id"]
    add_mdr_file(harness, incident_id, "report.pdf", b"%PDF")

    await harness.cycles(1)

    assert (elsewhere / "attachment-keep").read_bytes() == b"precious"
    assert harness.issue_for(incident_id).attachments == []
    reason = await parked_reason(harness, incident_id)
    assert reason is not None
    assert "not a folder" in reason


async def test_both_sides_same_file_one_cycle(harness: SyncHarness) -> None:
    """The same name and size added on both sides in one cycle, replies lost both ways: one copy each way."""
    incident_id, issue = await linked_issue(harness)
    add_mdr_file(harness, incident_id, "evidence.txt", b"same")
    harness.jira.sim.add_attachment(issue.key, "evidence.txt", b"same")
    harness.mdr_sim.drop_reply_after_commit("attachments/upload")
    harness.jira.sim.drop_reply_after_commit("POST", "/rest/api/2/issue/{issue}/attachments")
    harness.advance(31)

    await restarts(harness, 4, seconds=5)

    assert len(connector_copies(harness, issue)) == 1
    assert len(mdr_copies(harness, incident_id)) == 1
    assert len(issue.attachments) == 2
    assert len(mdr_files(harness, incident_id)) == 2
    items = await harness.store.get_items(harness.connection.name, incident_id, ATTACHMENT)
    assert sorted((item.direction, item.state) for item in items) == [(MDR_TO_TICKET, DONE), (TICKET_TO_MDR, DONE)]


async def test_forged_mdr_footer_not_taken(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SOC comment quoting the notice footer is not taken for the connector's MDR notice after a failed post."""
    incident_id, issue = await linked_issue(harness)
    setup = harness.jira.sim.add_attachment(issue.key, "setup.msi", b"msi")
    harness.advance(31)
    sync = await harness.engine()
    real_create = sync.mdr.create_comment
    failed = False

    async def fail_first_notice(incident: str, text: str, **options: Any) -> Any:
        nonlocal failed
        if "setup.msi" in text and not failed:
            failed = True
            raise RemoteUnavailableError("connection reset before the request reached MDR")
        return await real_create(incident, text, **options)

    monkeypatch.setattr(sync.mdr, "create_comment", fail_first_notice)
    await harness.cycles(1, sync)
    harness.mdr_sim.add_soc_comment(
        MDR_CLIENT_ID, incident_id, f"<p>quoted</p><p><em>mdr-connector: jira comment attachment:{setup.id}</em></p>"
    )

    harness.advance(5)
    await restarts(harness, 2)

    own = [c for c in mdr_notices_by_connector(harness, incident_id) if "setup.msi" in c["text"]]
    assert len(own) == 1
    [item] = await harness.store.get_items(harness.connection.name, incident_id, ATTACHMENT_NOTICE)
    assert (item.state, item.target_id) == (DONE, own[0]["comment_id"])


# History


def history_entry(incident_id: str, entity_type: str, changed_at: int, entity: dict[str, Any]) -> HistoryEntry:
    return HistoryEntry(
        changed_at=changed_at,
        changed_by="SOC",
        operation="update",
        entity_type=entity_type,
        incident_id=incident_id,
        entity=entity,
    )


async def test_history_pages_repeated_and_reversed(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """History pages that repeat every record and list them newest first still give one ticket and one comment each."""
    incidents = [harness.seed()["incident_id"] for _ in range(3)]
    harness.mdr_sim.advance(1)
    harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incidents[0], "<p>Isolated the host</p>", author=SOC_ANALYST)
    sync = await harness.engine()
    real_history = sync.mdr.list_history

    async def messy_history(**request: Any) -> list[HistoryEntry]:
        entries = await real_history(**request)
        return list(reversed(entries + entries))

    monkeypatch.setattr(sync.mdr, "list_history", messy_history)

    await harness.cycles(3, sync)

    for incident_id in incidents:
        assert len(harness.issues_for(incident_id)) == 1
    issue = harness.issue_for(incidents[0])
    assert sum("Isolated the host" in comment.body for comment in issue.comments) == 1


async def test_history_names_foreign_incident(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A comment record naming another client's incident creates nothing for it and stops nothing else."""
    harness.mdr_sim.create_client("other-client")
    foreign = harness.mdr_sim.seed_incident("other-client", summary="Other client's secret")["incident_id"]
    own = harness.seed()["incident_id"]
    sync = await harness.engine()
    real_history = sync.mdr.list_history

    async def history_with_foreign_record(**request: Any) -> list[HistoryEntry]:
        entries = await real_history(**request)
        comment = {"comment_id": "c1", "incident_id": foreign, "text": "x", "author_name": "SOC", "creation_time": 1}
        return [*entries, history_entry(foreign, "incident_comment", harness.mdr_sim.now_ms(), comment)]

    monkeypatch.setattr(sync.mdr, "list_history", history_with_foreign_record)

    await harness.cycles(2, sync)

    assert len(harness.issues_for(own)) == 1
    assert harness.issues_for(foreign) == []
    assert all("secret" not in issue.fields["summary"] for issue in harness.jira.sim.issues.values())
    assert await harness.store.get_link(harness.connection.name, foreign) is None


async def test_tenant_moves_into_and_out_of_filter(harness: SyncHarness) -> None:
    """An incident moved into the tenant filter gets its ticket; a linked one moved out keeps syncing."""
    harness.use_sync(filters=FilterSettings(tenants=["Acme Bank"]))
    inside = harness.seed(tenant_name="Acme Bank")["incident_id"]
    outside = harness.seed(tenant_name="Other Corp")["incident_id"]
    sync = await harness.cycles(1)
    assert harness.issues_for(outside) == []

    harness.mdr_sim.update_incident(MDR_CLIENT_ID, outside, tenant_name="Acme Bank")
    harness.mdr_sim.update_incident(MDR_CLIENT_ID, inside, tenant_name="Other Corp", summary="Moved away")
    await harness.cycles(2, sync)

    assert len(harness.issues_for(outside)) == 1
    assert "Moved away" in harness.issue_for(inside).fields["summary"]


async def test_one_millisecond_holds_more_than_pages(harness: SyncHarness) -> None:
    """Seven incidents changed in one millisecond with history pages of two records all get one ticket."""
    harness.use_sync(page_size=2, max_pages_per_cycle=2)
    moment = harness.mdr_sim.now_ms()
    incidents = [harness.seed(creation_time=moment, update_time=moment)["incident_id"] for _ in range(7)]

    await restarts(harness, 5, seconds=1)

    for incident_id in incidents:
        assert len(harness.issues_for(incident_id)) == 1


async def test_future_records_do_not_stall_history(harness: SyncHarness) -> None:
    """Comment records dated far ahead fill whole pages, yet later incidents are still found and the cursor moves."""
    harness.use_sync(page_size=2, max_pages_per_cycle=2)
    bogus = harness.seed()["incident_id"]
    far_ahead = harness.mdr_sim.now_ms() + 30 * 24 * 3600 * 1000
    for index in range(6):
        harness.mdr_sim._history.append(
            HistoryRecord(
                client_id=MDR_CLIENT_ID,
                incident_id=bogus,
                entity_type="incident_comment",
                changed_at=far_ahead + index,
                changed_by="SOC",
                operation="create",
                entity={"comment_id": f"future-{index}", "incident_id": bogus, "text": "x", "author_name": "SOC"},
                sequence=len(harness.mdr_sim._history),
            )
        )
    await harness.cycles(1)
    later = []
    for _ in range(6):
        harness.mdr_sim.advance(1)
        later.append(harness.seed()["incident_id"])

    await restarts(harness, 6, seconds=1)

    for incident_id in later:
        assert len(harness.issues_for(incident_id)) == 1
    cursor = await harness.store.get_cursor(harness.connection.name, HISTORY_CURSOR)
    assert cursor is not None and int(cursor) < far_ahead


async def test_history_crash_mid_cycle(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cycle stopped by a fatal error after one ticket create leaves nothing lost or doubled on fresh engines."""
    incidents = [harness.seed()["incident_id"] for _ in range(3)]
    sync = await harness.engine()
    real_create = sync.tickets.create_ticket
    creates = 0

    async def fatal_second_create(draft: Any) -> Any:
        nonlocal creates
        creates += 1
        if creates == 2:
            raise ConnectionFatalError("the Jira token was revoked")
        return await real_create(draft)

    monkeypatch.setattr(sync.tickets, "create_ticket", fatal_second_create)
    with pytest.raises(ConnectionFatalError):
        await sync.run_cycle()
    # Incidents reconcile concurrently, so the third create can begin before the second fails.
    assert creates >= 2

    await restarts(harness, 3)

    for incident_id in incidents:
        assert len(harness.issues_for(incident_id)) == 1
        link = await harness.store.get_link(harness.connection.name, incident_id)
        assert link is not None and link.state == LINKED


# Routing and field ownership


async def test_extra_field_owned_by_ticket(harness: SyncHarness) -> None:
    """A custom field the ticket owns keeps the analyst's value after an MDR update; the summary still follows MDR."""
    harness.use_mapping(fields={"customfield_10010": "SOC queue"}, field_owner={"customfield_10010": "ticket"})
    incident_id = harness.seed()["incident_id"]
    sync = await harness.cycles(1)
    issue = harness.issue_for(incident_id)
    assert issue.fields["customfield_10010"] == "SOC queue"

    harness.jira.sim.edit_issue(issue.key, {"customfield_10010": "Analyst queue"})
    harness.mdr_sim.update_incident(MDR_CLIENT_ID, incident_id, summary="Escalated by SOC")
    harness.advance(31)
    await harness.cycles(2, sync)

    assert issue.fields["customfield_10010"] == "Analyst queue"
    assert "Escalated by SOC" in issue.fields["summary"]


async def test_extra_field_owned_by_mdr(harness: SyncHarness) -> None:
    """A custom field MDR owns is written again on the next MDR update."""
    harness.use_mapping(fields={"customfield_10010": "SOC queue"}, field_owner={"customfield_10010": "mdr"})
    incident_id = harness.seed()["incident_id"]
    sync = await harness.cycles(1)
    issue = harness.issue_for(incident_id)

    harness.jira.sim.edit_issue(issue.key, {"customfield_10010": "Analyst queue"})
    harness.mdr_sim.update_incident(MDR_CLIENT_ID, incident_id, summary="Escalated by SOC")
    harness.advance(31)
    await harness.cycles(2, sync)

    assert issue.fields["customfield_10010"] == "SOC queue"


async def test_routed_create_reply_lost(harness: SyncHarness) -> None:
    """A create in a route's project whose reply is lost is found there after the search delay, not made twice."""
    harness.jira.sim.add_project("OPS", "IT operations", ("Task",))
    harness.use_mapping(routes=[{"tenant": "Acme Bank", "project": "OPS"}])
    harness.jira.sim.drop_reply_after_commit("POST", "/rest/api/2/issue")
    incident_id = harness.seed(tenant_name="Acme Bank")["incident_id"]

    await restarts(harness, 3)

    [issue] = harness.issues_for(incident_id)
    assert issue.key.startswith("OPS-")
    assert harness.jira.sim.calls[CREATE_ISSUE] == 1
    link = await harness.store.get_link(harness.connection.name, incident_id)
    assert link is not None and (link.state, link.ticket_key) == (LINKED, issue.key)


async def test_tenant_change_keeps_ticket_in_place(harness: SyncHarness) -> None:
    """An incident moving to a tenant with another route keeps its one ticket and gains the new route's labels."""
    harness.jira.sim.add_project("OPS", "IT operations", ("Task",))
    harness.use_mapping(
        routes=[
            {"tenant": "Acme Bank", "project": "OPS", "labels": ["acme"]},
            {"tenant": "", "project": "SEC", "labels": ["root"]},
        ],
        unrouted="report",
    )
    incident_id = harness.seed(tenant_name="")["incident_id"]
    sync = await harness.cycles(1)

    harness.mdr_sim.update_incident(MDR_CLIENT_ID, incident_id, tenant_name="Acme Bank")
    await harness.cycles(2, sync)

    [issue] = harness.issues_for(incident_id)
    assert issue.key.startswith("SEC-")
    assert {"root", "acme"} <= set(issue.fields["labels"])
    assert await parked_reason(harness, incident_id) is None


@pytest.mark.xfail(
    strict=True,
    reason="the Jira adapter searches only the projects the current mapping names, not those of linked tickets",
)
async def test_dropped_route_project_still_synced(harness: SyncHarness) -> None:
    """A ticket in a project that the routes no longer name still sends its comments to MDR."""
    harness.jira.sim.add_project("OPS", "IT operations", ("Task",))
    harness.use_mapping(routes=[{"tenant": "Acme Bank", "project": "OPS"}])
    incident_id = harness.seed(tenant_name="Acme Bank")["incident_id"]
    await harness.cycles(1)
    issue = harness.issue_for(incident_id)

    harness.use_mapping(routes=[])
    harness.jira.sim.add_comment(issue.key, "Contained in OPS")
    harness.advance(31)
    await restarts(harness, 2)

    assert sum("Contained in OPS" in comment["text"] for comment in harness.mdr_comments(incident_id)) == 1


# Assets


def seed_with_asset(harness: SyncHarness, host_name: str, **asset_fields: Any) -> str:
    asset = harness.mdr_sim.add_asset(MDR_CLIENT_ID, host_name, **asset_fields)
    return harness.seed(affected_hosts=[f"{host_name}:{asset['asset_id']}"])["incident_id"]


async def test_asset_markup_stays_in_its_cell(harness: SyncHarness) -> None:
    """Asset values with Markdown and Jira table markup stay text inside their cells: no link, no extra column."""
    incident_id = seed_with_asset(
        harness,
        "WS-01",
        os_version="[click](https://evil.example) || injected || cell |",
        installed_product_info="*bold* !https://evil.example/a.png! [~accountid:1]",
        status="x\n\n|| Forged || header ||",
    )

    await harness.cycles(1)

    description = harness.issue_for(incident_id).fields["description"]
    assert not description.startswith("{noformat}")
    assert "|| Host || IP addresses || OS || Product || Status || Isolated || Last seen ||" in description
    [row] = [line for line in description.splitlines() if "WS" in line and "01" in line]
    assert row.count(" | ") == 6
    assert "[click|https://evil.example]" not in description
    assert "!https://evil.example/a.png!" not in description
    assert "[~accountid:1]" not in description
    assert "|| Forged" not in description


async def test_huge_asset_values_are_cut(harness: SyncHarness) -> None:
    """A megabyte-long asset value is cut to one short cell, so the description stays within Jira's limits."""
    incident_id = seed_with_asset(harness, "WS-02", os_version="Windows " * 130_000)

    await harness.cycles(1)

    description = harness.issue_for(incident_id).fields["description"]
    assert len(description) < 5000
    assert "Windows Windows" in description


async def test_asset_macro_text_keeps_table(harness: SyncHarness) -> None:
    """An asset value that looks like a Jira macro (`{color:red}`) shows as text and the table stays a table."""
    incident_id = seed_with_asset(harness, "WS-03", os_version="{color:red}Windows{color}")

    await harness.cycles(1)

    description = harness.issue_for(incident_id).fields["description"]
    assert not description.startswith("{noformat}")
    assert "|| Host ||" in description


# Attachments: crash windows and deletions after the copy


@pytest.mark.parametrize("direction", [MDR_TO_TICKET, TICKET_TO_MDR])
async def test_killed_after_upload_before_ledger(
    harness: SyncHarness, monkeypatch: pytest.MonkeyPatch, direction: str
) -> None:
    """A process killed after the upload landed but before the ledger recorded it: the next engine finds the copy."""
    incident_id, issue = await linked_issue(harness)
    if direction == MDR_TO_TICKET:
        add_mdr_file(harness, incident_id, "report.pdf", b"%PDF-1.7 body")
    else:
        harness.jira.sim.add_attachment(issue.key, "report.pdf", b"%PDF-1.7 body")
    harness.advance(31)
    real_finish = harness.store.finish_item

    async def killed_at_finish(connection: str, incident: str, kind: str, *args: Any, **kwargs: Any) -> None:
        if kind == ATTACHMENT:
            raise ProcessKilled("killed between the upload and the ledger write")
        await real_finish(connection, incident, kind, *args, **kwargs)

    monkeypatch.setattr(harness.store, "finish_item", killed_at_finish)
    with pytest.raises(ProcessKilled):
        await harness.cycles(1)
    monkeypatch.setattr(harness.store, "finish_item", real_finish)
    [item] = await harness.store.get_items(harness.connection.name, incident_id, ATTACHMENT)
    assert item.state == PENDING

    await restarts(harness, 3)

    copies = connector_copies(harness, issue) if direction == MDR_TO_TICKET else mdr_copies(harness, incident_id)
    assert len(copies) == 1
    [item] = await harness.store.get_items(harness.connection.name, incident_id, ATTACHMENT)
    assert item.state == DONE
    assert spool_files(harness) == []


async def test_deleted_copy_not_uploaded_again(harness: SyncHarness) -> None:
    """An analyst deleting the connector's copy on the ticket does not make the connector upload it again."""
    incident_id = harness.seed()["incident_id"]
    add_mdr_file(harness, incident_id, "report.pdf", b"%PDF")
    await harness.cycles(1)
    issue = harness.issue_for(incident_id)
    [copy] = issue.attachments

    harness.jira.sim.delete_attachment(copy.id)
    harness.advance(31)
    await restarts(harness, 3)

    assert issue.attachments == []
    assert harness.jira.sim.calls[UPLOAD_TO_JIRA] == 1
    assert len(mdr_files(harness, incident_id)) == 1


async def test_encoded_and_header_names_kept_literal(harness: SyncHarness) -> None:
    """Percent escapes and Content-Disposition syntax in names arrive as literal text, never decoded into paths."""
    incident_id, issue = await linked_issue(harness)
    add_mdr_file(harness, incident_id, "..%2f..%2fpasswd.txt", b"one")
    add_mdr_file(harness, incident_id, 'a"; filename="b.txt', b"two")
    harness.jira.sim.add_attachment(issue.key, "%2e%2e%5cboot.txt", b"three")
    harness.jira.sim.add_attachment(issue.key, "c.txt\r\nX-Injected: 1", b"four")
    harness.advance(31)

    await restarts(harness, 3)

    assert sorted(copy.filename for copy in connector_copies(harness, issue)) == [
        "%2f..%2fpasswd.txt",
        "a_; filename=_b.txt",
    ]
    assert sorted(copy["full_name"] for copy in mdr_copies(harness, incident_id)) == [
        "%2e%2e%5cboot.txt",
        "c.txtX-Injected: 1",
    ]


async def test_spool_folder_removed_while_running(harness: SyncHarness) -> None:
    """A spool folder removed between cycles of one running engine is made again for the next copy."""
    incident_id = harness.seed()["incident_id"]
    add_mdr_file(harness, incident_id, "first.txt", b"one")
    sync = await harness.cycles(1)
    issue = harness.issue_for(incident_id)
    spool = harness.settings.data_dir / "spool" / harness.connection.name
    spool.rmdir()

    add_mdr_file(harness, incident_id, "second.txt", b"two")
    harness.jira.sim.add_attachment(issue.key, "third.txt", b"three")
    harness.advance(31)
    await harness.cycles(2, sync)

    assert sorted(copy.filename for copy in connector_copies(harness, issue)) == ["first.txt", "second.txt"]
    assert [copy["full_name"] for copy in mdr_copies(harness, incident_id)] == ["third.txt"]
    assert await parked_reason(harness, incident_id) is None


async def test_spool_swapped_for_symlink_while_running(harness: SyncHarness, tmp_path: Path) -> None:
    """A spool folder swapped for a symlink between cycles is refused: nothing is written where it points."""
    incident_id = harness.seed()["incident_id"]
    add_mdr_file(harness, incident_id, "first.txt", b"one")
    sync = await harness.cycles(1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    spool = harness.settings.data_dir / "spool" / harness.connection.name
    spool.rmdir()
    spool.symlink_to(elsewhere, target_is_directory=True)
    written: list[str] = []
    real_upload = sync.tickets.upload_attachment

    async def note_spool_path(ref: Any, upload: Any) -> Any:
        written.append(str(upload.path))
        return await real_upload(ref, upload)

    sync.tickets.upload_attachment = note_spool_path  # type: ignore[method-assign]

    add_mdr_file(harness, incident_id, "second.txt", b"two")
    await harness.cycles(1, sync)

    assert written == []
    assert list(elsewhere.iterdir()) == []
    reason = await parked_reason(harness, incident_id)
    assert reason is not None
    assert "not a folder" in reason


async def test_mdr_attachment_wrong_types(harness: SyncHarness) -> None:
    """MDR attachment records with wrong types are named in the parked reason; the good file is still copied once."""
    incident_id = harness.seed()["incident_id"]
    bad_size = add_mdr_file(harness, incident_id, "bad-size.txt", b"x", file_size="1 KB")
    harness.mdr_sim.add_attachment(MDR_CLIENT_ID, incident_id, ["not", "a", "name"], b"y")  # type: ignore[arg-type]
    add_mdr_file(harness, incident_id, "good.txt", b"good")

    await restarts(harness, 3, seconds=5)

    issue = harness.issue_for(incident_id)
    assert [copy.filename for copy in issue.attachments] == ["good.txt"]
    reason = await parked_reason(harness, incident_id)
    assert reason is not None
    assert bad_size["attachment_id"] in reason
    assert spool_files(harness) == []
