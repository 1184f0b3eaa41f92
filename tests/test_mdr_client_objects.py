"""The MDR client's methods for attachments, responses, assets, history, close and create, against the simulator."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aioresponses import aioresponses
from fixtures_mdr import MDR_CLIENT_ID, MDR_CONNECTION_NAME, MOCK_PREFIX
from mdr_connector.adapters.mdr.client import MdrClient
from mdr_connector.adapters.mdr.models import Attachment
from mdr_connector.adapters.mdr.simulator import MdrSimulator
from mdr_connector.connector.errors import (
    InvalidPayloadError,
    OutcomeUnknownError,
    RejectedError,
    RemoteUnavailableError,
)

CYRILLIC_EMOJI_NAME = "Отчёт по инциденту 🔥 «итог».log"


def leftovers(folder: Path) -> list[str]:
    """Names of temporary download files left in a folder."""
    return sorted(path.name for path in folder.iterdir() if path.name.startswith(".mdr-download-"))


async def listed_attachment(client: MdrClient, incident_id: str) -> Attachment:
    [attachment] = (await client.list_attachments(incident_id)).items
    return attachment


# --- comments ---


async def test_delete_comment_removes_it(active_mdr_client: MdrClient, mdr_sim: MdrSimulator) -> None:
    """delete_comment removes the connection's own comment and leaves the SOC's."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    soc = mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident["incident_id"], "<p>SOC</p>")
    own = await active_mdr_client.create_comment(incident["incident_id"], "to be deleted")

    await active_mdr_client.delete_comment(own.comment_id)

    remaining = (await active_mdr_client.list_comments(incident["incident_id"])).items
    assert [comment.comment_id for comment in remaining] == [soc["comment_id"]]


# --- attachments ---


async def test_list_attachments_isolates_malformed(active_mdr_client: MdrClient, mdr_sim: MdrSimulator) -> None:
    """A malformed attachment record goes to `malformed`, named by its id, and the others are kept."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    good = mdr_sim.add_attachment(MDR_CLIENT_ID, incident["incident_id"], "triage.log", b"log")
    bad = mdr_sim.add_attachment(MDR_CLIENT_ID, incident["incident_id"], "dump.bin", b"x", file_size="big")

    page = await active_mdr_client.list_attachments(incident["incident_id"])

    assert [a.attachment_id for a in page.items] == [good["attachment_id"]]
    assert page.items[0].file_size == 3
    assert page.items[0].origin == "Service"
    assert [m.record_id for m in page.malformed] == [bad["attachment_id"]]
    assert "file_size" in page.malformed[0].error
    assert incident["incident_id"] in page.malformed[0].error


async def test_download_streams_to_file(
    active_mdr_client: MdrClient, mdr_sim: MdrSimulator, tmp_path: Path
) -> None:
    """A multi-chunk file arrives byte for byte, replaces an older file, and leaves no temporary file."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    added = mdr_sim.add_attachment(MDR_CLIENT_ID, incident["incident_id"], "memory.dmp", size=3_000_001)
    attachment = await listed_attachment(active_mdr_client, incident["incident_id"])
    destination = tmp_path / "memory.dmp"
    destination.write_bytes(b"older content")

    written = await active_mdr_client.download_attachment(attachment, destination, max_bytes=3_000_001)

    assert written == 3_000_001
    assert destination.stat().st_size == 3_000_001
    assert destination.read_bytes() == mdr_sim.attachment_content(added["attachment_id"])
    assert leftovers(tmp_path) == []


async def test_download_ignores_link(active_mdr_client: MdrClient, mdr_sim: MdrSimulator, tmp_path: Path) -> None:
    """The record's `link` is never followed: the bytes come from the configured MDR URL by attachment id."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    mdr_sim.add_attachment(MDR_CLIENT_ID, incident["incident_id"], "note.txt", b"from MDR")
    attachment = await listed_attachment(active_mdr_client, incident["incident_id"])
    elsewhere = attachment.model_copy(update={"link": "http://127.0.0.2:9/files/note.txt"})

    written = await active_mdr_client.download_attachment(elsewhere, tmp_path / "note.txt")

    assert written == 8
    assert (tmp_path / "note.txt").read_bytes() == b"from MDR"
    assert mdr_sim.call_counts["attachments/download"] == 1


async def test_download_over_max_bytes(active_mdr_client: MdrClient, mdr_sim: MdrSimulator, tmp_path: Path) -> None:
    """A file listed above max_bytes raises InvalidPayloadError before any request, and nothing is written."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    mdr_sim.add_attachment(MDR_CLIENT_ID, incident["incident_id"], "big.bin", size=2048)
    attachment = await listed_attachment(active_mdr_client, incident["incident_id"])

    with pytest.raises(InvalidPayloadError, match="2048 bytes, more than the limit of 1024 bytes"):
        await active_mdr_client.download_attachment(attachment, tmp_path / "big.bin", max_bytes=1024)

    assert mdr_sim.call_counts["attachments/download"] == 0
    assert not (tmp_path / "big.bin").exists()


async def test_download_longer_than_listed(
    active_mdr_client: MdrClient, mdr_sim: MdrSimulator, tmp_path: Path
) -> None:
    """A body longer than the listed file_size raises InvalidPayloadError, and nothing is left on disk."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    mdr_sim.add_attachment(MDR_CLIENT_ID, incident["incident_id"], "grows.log", size=500_000, file_size=1000)
    attachment = await listed_attachment(active_mdr_client, incident["incident_id"])

    with pytest.raises(InvalidPayloadError, match="file_size 1000"):
        await active_mdr_client.download_attachment(attachment, tmp_path / "grows.log")

    assert not (tmp_path / "grows.log").exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "drops_connection, message",
    [(True, r"broke off after \d+ of 2000000 bytes"), (False, "ended after 1000000 of 2000000 bytes")],
    ids=["short-of-content-length", "short-of-file-size"],
)
async def test_download_cut_off(
    active_mdr_client: MdrClient, mdr_sim: MdrSimulator, tmp_path: Path, drops_connection: bool, message: str
) -> None:
    """A body cut off half-way raises the retriable RemoteUnavailableError and keeps the older file."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    mdr_sim.add_attachment(MDR_CLIENT_ID, incident["incident_id"], "half.bin", size=2_000_000)
    attachment = await listed_attachment(active_mdr_client, incident["incident_id"])
    mdr_sim.update_settings(download_cutoff_fraction=0.5, download_cutoff_drops_connection=drops_connection)
    destination = tmp_path / "half.bin"
    destination.write_bytes(b"kept")

    with pytest.raises(RemoteUnavailableError, match=message):
        await active_mdr_client.download_attachment(attachment, destination)

    assert destination.read_bytes() == b"kept"
    assert leftovers(tmp_path) == []


async def test_download_redirect_refused(mocked_client: MdrClient, tmp_path: Path) -> None:
    """A redirect from attachments/download is not followed, and no file is written."""
    attachment = Attachment(attachment_id="att-1", full_name="a.txt", file_size=3)
    with aioresponses() as mock:
        mock.post(
            f"{MOCK_PREFIX}/attachments/download",
            status=302,
            headers={"Location": "http://127.0.0.2:9/a.txt"},
        )
        with pytest.raises(RejectedError) as caught:
            await mocked_client.download_attachment(attachment, tmp_path / "a.txt")
        requested = [str(url) for _, url in mock.requests]

    assert caught.value.status == 302
    assert requested == [f"{MOCK_PREFIX}/attachments/download"]
    assert list(tmp_path.glob("a.txt*")) == []
    assert leftovers(tmp_path) == []


async def test_upload_keeps_non_ascii_name(
    active_mdr_client: MdrClient, mdr_sim: MdrSimulator, tmp_path: Path
) -> None:
    """A Cyrillic and emoji file name, a caption and a multi-chunk body reach MDR unchanged."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    source = tmp_path / "spooled.bin"
    content = bytes(range(256)) * 4000
    source.write_bytes(content)

    uploaded = await active_mdr_client.upload_attachment(
        incident["incident_id"], source, CYRILLIC_EMOJI_NAME, caption="Журнал 📎"
    )

    [stored] = mdr_sim.attachments(MDR_CLIENT_ID, incident["incident_id"])
    assert uploaded.full_name == CYRILLIC_EMOJI_NAME
    assert uploaded.file_size == len(content)
    assert uploaded.author_name == MDR_CONNECTION_NAME
    assert stored["full_name"] == CYRILLIC_EMOJI_NAME
    assert stored["caption"] == "Журнал 📎"
    assert stored["origin"] == "Client"
    assert mdr_sim.attachment_content(stored["attachment_id"]) == content


async def test_upload_name_with_quote(active_mdr_client: MdrClient, mdr_sim: MdrSimulator, tmp_path: Path) -> None:
    """A double quote in the file name is escaped on the wire and arrives as a quote."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    source = tmp_path / "x.txt"
    source.write_bytes(b"x")

    uploaded = await active_mdr_client.upload_attachment(incident["incident_id"], source, 'say "hi".txt')

    assert uploaded.full_name == 'say "hi".txt'


async def test_upload_too_large_is_rejected(
    active_mdr_client: MdrClient, mdr_sim: MdrSimulator, tmp_path: Path
) -> None:
    """HTTP 413 maps to RejectedError, nothing is attached, and the simulator keeps no partial file."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    mdr_sim.update_settings(max_upload_bytes=100_000)
    source = tmp_path / "huge.bin"
    source.write_bytes(b"\0" * 3_000_000)

    with pytest.raises(RejectedError) as caught:
        await active_mdr_client.upload_attachment(incident["incident_id"], source, "huge.bin")

    assert caught.value.status == 413
    assert "too large" in str(caught.value)
    assert mdr_sim.attachments(MDR_CLIENT_ID, incident["incident_id"]) == []
    assert list(mdr_sim.blobs.folder().iterdir()) == []


async def test_upload_resent_after_token_refusal(
    active_mdr_client: MdrClient, mdr_sim: MdrSimulator, tmp_path: Path
) -> None:
    """After a 403 for an expired token, the refreshed request sends the whole file again from the start."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    source = tmp_path / "report.txt"
    source.write_bytes(b"0123456789" * 50_000)
    # The client's clock still trusts its token, but by the simulator's clock it has expired.
    mdr_sim.advance(2 * 3600)

    uploaded = await active_mdr_client.upload_attachment(incident["incident_id"], source, "report.txt")

    assert mdr_sim.call_counts["attachments/upload"] == 2
    assert mdr_sim.confirm_calls == 2
    assert mdr_sim.attachment_content(uploaded.attachment_id) == source.read_bytes()
    assert len(mdr_sim.attachments(MDR_CLIENT_ID, incident["incident_id"])) == 1


# --- writes whose reply is lost ---


async def _upload(client: MdrClient, sim: MdrSimulator, incident_id: str, folder: Path) -> None:
    source = folder / "lost-reply.txt"
    source.write_bytes(b"landed")
    await client.upload_attachment(incident_id, source, "lost-reply.txt")


async def _close(client: MdrClient, sim: MdrSimulator, incident_id: str, folder: Path) -> None:
    await client.close_incident(incident_id, "TRUE_POSITIVE", "Confirmed by the SOC team")


async def _create(client: MdrClient, sim: MdrSimulator, incident_id: str, folder: Path) -> None:
    await client.create_incident(
        summary="Phishing report", client_description="From a ticket", affected_hosts=["WS-1:0xabc"], priority="LOW"
    )


async def _decide(client: MdrClient, sim: MdrSimulator, incident_id: str, folder: Path) -> None:
    response = sim.add_response(MDR_CLIENT_ID, incident_id)
    await client.update_response(response["response_id"], "Confirmed", "approved")


async def _decide_many(client: MdrClient, sim: MdrSimulator, incident_id: str, folder: Path) -> None:
    response = sim.add_response(MDR_CLIENT_ID, incident_id)
    await client.update_responses([response["response_id"]], "Declined", "not now")


async def _delete(client: MdrClient, sim: MdrSimulator, incident_id: str, folder: Path) -> None:
    comment = await client.create_comment(incident_id, "short-lived")
    await client.delete_comment(comment.comment_id)


Write = Callable[[MdrClient, MdrSimulator, str, Path], Awaitable[None]]
LOST_REPLY_CASES: dict[str, tuple[str, Write]] = {
    "upload": ("attachments/upload", _upload),
    "close": ("incidents/close", _close),
    "create": ("incidents/create", _create),
    "response": ("response/update", _decide),
    "responses": ("responses/update", _decide_many),
    "delete comment": ("comments/delete", _delete),
}


@pytest.mark.parametrize("method, write", LOST_REPLY_CASES.values(), ids=LOST_REPLY_CASES.keys())
async def test_lost_write_reply_is_outcome_unknown(
    active_mdr_client: MdrClient, mdr_sim: MdrSimulator, tmp_path: Path, method: str, write: Write
) -> None:
    """A write that MDR applied but whose reply was lost raises OutcomeUnknownError, not a plain failure."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    mdr_sim.drop_reply_after_commit(method)

    with pytest.raises(OutcomeUnknownError):
        await write(active_mdr_client, mdr_sim, incident["incident_id"], tmp_path)

    # The simulator uses up a drop rule only on a reply of a change it applied.
    assert mdr_sim.drop_rules[method] == 0
    assert mdr_sim.call_counts[method] == 1


async def test_lost_upload_landed_once(active_mdr_client: MdrClient, mdr_sim: MdrSimulator, tmp_path: Path) -> None:
    """After a lost upload reply, the attachment is in MDR once, so a lookup by name and size finds it."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    mdr_sim.drop_reply_after_commit("attachments/upload")

    with pytest.raises(OutcomeUnknownError):
        await _upload(active_mdr_client, mdr_sim, incident["incident_id"], tmp_path)
    listed = (await active_mdr_client.list_attachments(incident["incident_id"])).items

    assert [(a.full_name, a.file_size) for a in listed] == [("lost-reply.txt", 6)]


# --- responses ---


async def test_list_responses_reads_all_pages(active_mdr_client: MdrClient, mdr_sim: MdrSimulator) -> None:
    """Responses are read with page and page_size until a short page, and a malformed one is isolated."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    added = [mdr_sim.add_response(MDR_CLIENT_ID, incident["incident_id"]) for _ in range(230)]
    broken = mdr_sim.add_response(MDR_CLIENT_ID, incident["incident_id"], status=None)

    page = await active_mdr_client.list_responses(incident["incident_id"])

    assert [r.response_id for r in page.items] == [r["response_id"] for r in added]
    assert [m.record_id for m in page.malformed] == [broken["response_id"]]
    assert mdr_sim.call_counts["responses/list"] == 3


async def test_update_response_decisions(active_mdr_client: MdrClient, mdr_sim: MdrSimulator) -> None:
    """update_response and update_responses reach MDR with status and comment; no ids means no call."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    first = mdr_sim.add_response(MDR_CLIENT_ID, incident["incident_id"])
    second = mdr_sim.add_response(MDR_CLIENT_ID, incident["incident_id"])
    third = mdr_sim.add_response(MDR_CLIENT_ID, incident["incident_id"])

    await active_mdr_client.update_response(first["response_id"], "Confirmed", "approved by j.doe")
    await active_mdr_client.update_responses([second["response_id"], third["response_id"]], "Declined", "no")
    await active_mdr_client.update_responses([], "Declined", "nothing")

    statuses = [(r.status, r.comment) for r in (await active_mdr_client.list_responses(incident["incident_id"])).items]
    assert statuses == [("Confirmed", "approved by j.doe"), ("Declined", "no"), ("Declined", "no")]
    assert mdr_sim.call_counts["responses/update"] == 1


async def test_decided_response_rejected(active_mdr_client: MdrClient, mdr_sim: MdrSimulator) -> None:
    """A second decision on a response maps MDR's 400 to RejectedError."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    response = mdr_sim.add_response(MDR_CLIENT_ID, incident["incident_id"])
    await active_mdr_client.update_response(response["response_id"], "Confirmed", "ok")

    with pytest.raises(RejectedError) as caught:
        await active_mdr_client.update_response(response["response_id"], "Declined", "changed my mind")

    assert caught.value.status == 400


async def test_response_auto_decline_seen(active_mdr_client: MdrClient, mdr_sim: MdrSimulator) -> None:
    """A response left New past its timeout reads as Declined with the timeout comment."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    response = mdr_sim.add_response(MDR_CLIENT_ID, incident["incident_id"])
    mdr_sim.advance(mdr_sim.settings.response_timeout_seconds + 1)

    [seen] = (await active_mdr_client.list_responses(incident["incident_id"])).items

    assert seen.response_id == response["response_id"]
    assert seen.status == "Declined"
    assert seen.comment == "Automatically rejected, because the task timeout has expired"
    assert seen.update_time == response["creation_time"] + int(mdr_sim.settings.response_timeout_seconds * 1000)


# --- assets ---


async def test_get_asset_details(active_mdr_client: MdrClient, mdr_sim: MdrSimulator) -> None:
    """get_asset returns the parsed asset, with every address of an interface that lists several."""
    asset = mdr_sim.add_asset(
        MDR_CLIENT_ID,
        "SRV-DC-01",
        isolation=True,
        status="WARNING",
        network_interfaces=[{"ip": "10.0.0.5|fe80::1", "mac": "00:11:22:33:44:55"}, {"ip": "192.168.1.9"}],
    )

    found = await active_mdr_client.get_asset(asset["asset_id"])

    assert found.host_name == "SRV-DC-01"
    assert found.isolation is True
    assert found.status == "WARNING"
    assert found.os_version == asset["os_version"]
    assert found.last_seen == asset["last_seen"]
    assert found.ip_addresses() == ["10.0.0.5", "fe80::1", "192.168.1.9"]


async def test_get_asset_errors(active_mdr_client: MdrClient, mdr_sim: MdrSimulator) -> None:
    """An unknown asset is RejectedError 404; a malformed one is InvalidPayloadError naming its id."""
    broken = mdr_sim.add_asset(MDR_CLIENT_ID, "WS-HR-004", last_seen="yesterday")

    with pytest.raises(RejectedError) as missing:
        await active_mdr_client.get_asset("0xdeadbeef")
    with pytest.raises(InvalidPayloadError, match=broken["asset_id"]) as malformed:
        await active_mdr_client.get_asset(broken["asset_id"])

    assert missing.value.status == 404
    assert "last_seen" in str(malformed.value)


# --- history ---


async def test_list_history_pages_per_entity_type(active_mdr_client: MdrClient, mdr_sim: MdrSimulator) -> None:
    """One call is one page; each entity type fills its own share, so page 2 holds only the longer type."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    incident_id = incident["incident_id"]
    mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>first</p>")
    mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>second</p>")

    first = await active_mdr_client.list_history(min_record_time=0, entity_type_page_size=2)
    second = await active_mdr_client.list_history(min_record_time=0, page=2, entity_type_page_size=2)

    assert sorted(entry.entity_type for entry in first) == [
        "incident_comment",
        "incident_comment",
        "incident_details",
        "incident_details",
    ]
    assert [entry.changed_at for entry in first] == sorted(entry.changed_at for entry in first)
    assert [entry.entity_type for entry in second] == ["incident_details"]
    details = [entry for entry in first + second if entry.entity_type == "incident_details"]
    assert {entry.incident_id for entry in details} == {incident_id}
    assert [entry.operation for entry in details] == ["create", "update", "update"]
    assert details[0].entity["summary"] == incident["summary"]


async def test_list_history_incident_from_request(active_mdr_client: MdrClient, mdr_sim: MdrSimulator) -> None:
    """Without incident_id a comment record names no incident; with it, every record gets that id."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    mdr_sim.seed_incident(MDR_CLIENT_ID)
    comment = mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident["incident_id"], "<p>note</p>")

    everything = await active_mdr_client.list_history(min_record_time=0)
    filtered = await active_mdr_client.list_history(min_record_time=0, incident_id=incident["incident_id"])
    window = await active_mdr_client.list_history(
        min_record_time=comment["creation_time"], max_record_time=comment["creation_time"]
    )

    [unnamed] = [entry for entry in everything if entry.entity_type == "incident_comment"]
    assert unnamed.incident_id == ""
    assert unnamed.entity["comment_id"] == comment["comment_id"]
    assert len(filtered) == 3
    assert {entry.incident_id for entry in filtered} == {incident["incident_id"]}
    assert {entry.changed_at for entry in window} == {comment["creation_time"]}


async def test_list_history_malformed_fails_page(mocked_client: MdrClient) -> None:
    """A record without a one-key entity fails the page, naming the page and the record's time."""
    records = [
        {"changed_at": 1, "changed_by": "SOC", "operation": "create", "entity": {"incident_details": {"incident_id": "i"}}},
        {"changed_at": 2, "changed_by": "SOC", "operation": "update", "entity": {}},
    ]
    with aioresponses() as mock:
        mock.post(f"{MOCK_PREFIX}/incidents/history", payload=records)
        with pytest.raises(InvalidPayloadError, match="page 3: MDR history record changed at 2 is malformed"):
            await mocked_client.list_history(min_record_time=0, page=3)


# --- close and create ---


async def test_close_incident(active_mdr_client: MdrClient, mdr_sim: MdrSimulator) -> None:
    """close_incident closes with the resolution's display form and the summary; a second close is rejected."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)

    await active_mdr_client.close_incident(incident["incident_id"], "FALSE_POSITIVE", "Planned admin activity")
    closed = await active_mdr_client.get_incident(incident["incident_id"])
    with pytest.raises(RejectedError) as again:
        await active_mdr_client.close_incident(incident["incident_id"], "FALSE_POSITIVE", "Planned admin activity")

    assert closed.status == "Closed"
    assert closed.resolution == "False positive"
    assert closed.status_description == "Planned admin activity"
    assert again.value.status == 400
    assert mdr_sim.call_counts["incidents/close"] == 2


async def test_create_incident(active_mdr_client: MdrClient, mdr_sim: MdrSimulator) -> None:
    """create_incident returns the parsed new incident, created by the connection with origin Client."""
    asset = mdr_sim.add_asset(MDR_CLIENT_ID, "WS-FIN-017")
    tenant = mdr_sim.add_tenant(MDR_CLIENT_ID, "Retail EU")

    created = await active_mdr_client.create_incident(
        summary="Ransom note found on a file share",
        client_description="Reported by the help desk in ticket SEC-42",
        affected_hosts=(f"WS-FIN-017:{asset['asset_id']}",),
        priority="HIGH",
        tenant_id=tenant["tenant_id"],
    )

    assert created.summary == "Ransom note found on a file share"
    assert created.client_description == "Reported by the help desk in ticket SEC-42"
    assert created.priority == "HIGH"
    assert created.status == "Open"
    assert created.origin == "Client"
    assert created.tenant_name == "Retail EU"
    assert created.host_names() == ["WS-FIN-017"]
    stored = mdr_sim.incident(MDR_CLIENT_ID, created.incident_id)
    assert stored["incident_number"] == created.incident_number
    [record] = mdr_sim.history(MDR_CLIENT_ID)
    assert (record["operation"], record["changed_by"]) == ("create", MDR_CONNECTION_NAME)


async def test_create_incident_bad_host(active_mdr_client: MdrClient, mdr_sim: MdrSimulator) -> None:
    """A host entry that is not HOSTNAME:asset_id maps MDR's 400 to RejectedError, and nothing is created."""
    with pytest.raises(RejectedError) as caught:
        await active_mdr_client.create_incident(
            summary="s", client_description="d", affected_hosts=["WS-FIN-017"], priority="LOW"
        )

    assert caught.value.status == 400
    assert "HOSTNAME:asset_id" in str(caught.value)
    assert mdr_sim.incidents(MDR_CLIENT_ID) == []


async def test_create_reply_dropped_creates_once(active_mdr_client: MdrClient, mdr_sim: MdrSimulator) -> None:
    """A create whose reply is lost raises OutcomeUnknownError, and exactly one incident exists."""
    mdr_sim.drop_reply_after_commit("incidents/create")

    with pytest.raises(OutcomeUnknownError):
        await active_mdr_client.create_incident(
            summary="Lost reply", client_description="d", affected_hosts=["WS-1:0x01"], priority="NORMAL"
        )

    assert [incident["summary"] for incident in mdr_sim.incidents(MDR_CLIENT_ID)] == ["Lost reply"]
