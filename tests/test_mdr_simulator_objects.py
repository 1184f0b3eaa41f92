"""The MDR simulator's incidents/create and incidents/close, response lifecycle, attachment files and control routes."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import aiohttp
import pytest
from fixtures_mdr import MDR_CLIENT_ID, MDR_CONNECTION_NAME, wire_call
from mdr_connector.adapters.mdr.simulator import MdrSimulator, run_simulator
from mdr_connector.adapters.mdr.simulator.blobs import generated_chunks

TIMEOUT_COMMENT = "Automatically rejected, because the task timeout has expired"


def entity_types(records: list[dict[str, Any]]) -> list[str]:
    return [next(iter(record["entity"])) for record in records]


async def control(origin: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """Call a `/_sim/` route and return the status and the decoded JSON reply."""
    async with aiohttp.ClientSession() as session:
        async with session.request(method, f"{origin}/_sim{path}", json=body) as reply:
            return reply.status, await reply.json(content_type=None)


# --- incidents/create ---


async def test_create_incident_fields(mdr_sim: MdrSimulator, mdr_url: str, wire_token: dict) -> None:
    """incidents/create stores the customer's fields with origin Client, a new number and one history record."""
    asset = mdr_sim.add_asset(MDR_CLIENT_ID, "WS-FIN-017")
    tenant = mdr_sim.add_tenant(MDR_CLIENT_ID, "Филиал Казань")
    before = mdr_sim.seed_incident(MDR_CLIENT_ID)
    body = {
        "summary": "Suspicious e-mail attachment",
        "client_description": "The user opened `invoice.docm`.",
        "affected_hosts": [f"WS-FIN-017:{asset['asset_id']}"],
        "priority": "LOW",
        "tenant_id": tenant["tenant_id"],
        "no_sla_flag": True,
    }

    status, created = await wire_call(mdr_url, "incidents/create", body, wire_token["access_token"])
    _, details = await wire_call(
        mdr_url, "incidents/details", {"incident_id": created["incident_id"]}, wire_token["access_token"]
    )
    _, history = await wire_call(
        mdr_url, "incidents/history", {"incident_id": created["incident_id"]}, wire_token["access_token"]
    )

    assert status == 200
    assert created["summary"] == body["summary"]
    assert created["client_description"] == body["client_description"]
    assert created["priority"] == "LOW"
    assert created["status"] == "Open"
    assert created["origin"] == "Client"
    assert created["tenant_name"] == "Филиал Казань"
    assert created["affected_hosts_mappings"] == [{"host_id": asset["asset_id"], "host_name": "WS-FIN-017"}]
    assert created["incident_number"] == before["incident_number"] + 1
    assert details["incident_id"] == created["incident_id"]
    assert [(r["operation"], r["changed_by"]) for r in history] == [("create", MDR_CONNECTION_NAME)]
    assert entity_types(history) == ["incident_details"]


async def test_create_markdown_description(mdr_sim: MdrSimulator, mdr_url: str, wire_token: dict) -> None:
    """With markdown_to_html, the client description is stored as HTML; the priority defaults to NORMAL."""
    body = {
        "summary": "s",
        "client_description": "Host **WS-1** is slow",
        "affected_hosts": ["WS-1:0x01"],
        "markdown_to_html": True,
    }

    _, created = await wire_call(mdr_url, "incidents/create", body, wire_token["access_token"])

    assert "<strong>WS-1</strong>" in created["client_description"]
    assert created["priority"] == "NORMAL"


CREATE_ERRORS = {
    "no summary": ({"summary": ""}, "summary is required"),
    "no description": ({"client_description": None}, "client_description is required"),
    "no hosts": ({"affected_hosts": []}, "at least one HOSTNAME:asset_id"),
    "host without asset": ({"affected_hosts": ["WS-1"]}, "'WS-1' is not HOSTNAME:asset_id"),
    "empty asset id": ({"affected_hosts": ["WS-1:"]}, "'WS-1:' is not HOSTNAME:asset_id"),
    "MEDIUM priority": ({"priority": "MEDIUM"}, "priority must be one of HIGH, NORMAL, LOW"),
    "unknown tenant": ({"tenant_id": "no-such-tenant"}, "tenant no-such-tenant not found"),
    "unknown field": ({"severity": "HIGH"}, "unknown request fields: severity"),
}


@pytest.mark.parametrize("change, message", CREATE_ERRORS.values(), ids=CREATE_ERRORS.keys())
async def test_create_incident_rejects(
    mdr_sim: MdrSimulator, mdr_url: str, wire_token: dict, change: dict, message: str
) -> None:
    """incidents/create rejects missing or invalid fields with 400 and creates nothing."""
    body = {"summary": "s", "client_description": "d", "affected_hosts": ["WS-1:0x01"], "priority": "HIGH"}
    body.update(change)
    body = {key: value for key, value in body.items() if value is not None}

    status, reply = await wire_call(mdr_url, "incidents/create", body, wire_token["access_token"])

    assert status == 400
    assert message in reply["message"]
    assert mdr_sim.incidents(MDR_CLIENT_ID) == []


async def test_create_known_assets_setting(mdr_sim: MdrSimulator, mdr_url: str, wire_token: dict) -> None:
    """With create_requires_known_assets, an asset id the client does not have gets 400."""
    mdr_sim.update_settings(create_requires_known_assets=True)
    body = {"summary": "s", "client_description": "d", "affected_hosts": ["WS-1:0x01"], "priority": "HIGH"}

    status, reply = await wire_call(mdr_url, "incidents/create", body, wire_token["access_token"])

    assert status == 400
    assert reply["message"] == "asset 0x01 of affected_hosts entry 'WS-1:0x01' not found"


async def test_create_in_hidden_tenant_forbidden(mdr_sim: MdrSimulator, mdr_url: str) -> None:
    """A connection restricted to some tenants cannot create an incident in another one."""
    mdr_sim.create_client("limited", connection_name="EU only", tenants=["Retail EU"])
    hidden = mdr_sim.add_tenant("limited", "Retail US")
    async with aiohttp.ClientSession() as session:
        confirm = await session.post(
            f"{mdr_url}/limited/session/confirm", json={"refresh_token": mdr_sim.issue_console_token("limited")}
        )
        token = (await confirm.json())["access_token"]
        reply = await session.post(
            f"{mdr_url}/limited/incidents/create",
            json={"summary": "s", "client_description": "d", "affected_hosts": ["H:0x1"], "tenant_id": hidden["tenant_id"]},
            headers={"Authorization": f"Bearer {token}"},
        )

    assert reply.status == 403
    assert mdr_sim.incidents("limited") == []


# --- incidents/close ---


async def test_close_incident_effect(mdr_sim: MdrSimulator, mdr_url: str, wire_token: dict) -> None:
    """incidents/close sets Closed, the display form of the resolution, the summary, update_time and history."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    mdr_sim.advance(60)
    body = {"incident_id": incident["incident_id"], "resolution_status": "TRUE_POSITIVE", "summary": "Contained"}

    status, closed = await wire_call(mdr_url, "incidents/close", body, wire_token["access_token"])
    _, history = await wire_call(
        mdr_url, "incidents/history", {"incident_id": incident["incident_id"]}, wire_token["access_token"]
    )
    _, listed = await wire_call(mdr_url, "incidents/list", {"statuses": ["Closed"]}, wire_token["access_token"])

    assert status == 200
    assert closed["status"] == "Closed"
    assert closed["resolution"] == "True positive"
    assert closed["status_description"] == "Contained"
    assert closed["update_time"] >= incident["update_time"] + 60_000
    assert [(r["operation"], r["changed_by"]) for r in history] == [
        ("create", "Kaspersky MDR SOC"),
        ("update", MDR_CONNECTION_NAME),
    ]
    assert history[1]["entity"]["incident_details"]["resolution"] == "True positive"
    assert [r["incident_id"] for r in listed] == [incident["incident_id"]]


async def test_close_closed_incident(mdr_sim: MdrSimulator, mdr_url: str, wire_token: dict) -> None:
    """Closing a closed incident gets 400 by default; with reclose_rejected off it succeeds and changes nothing."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID, status="Closed", resolution="False positive")
    body = {"incident_id": incident["incident_id"], "resolution_status": "TRUE_POSITIVE", "summary": "again"}

    rejected, reply = await wire_call(mdr_url, "incidents/close", body, wire_token["access_token"])
    mdr_sim.update_settings(reclose_rejected=False)
    accepted, unchanged = await wire_call(mdr_url, "incidents/close", body, wire_token["access_token"])

    assert rejected == 400
    assert reply["message"] == f"incident {incident['incident_id']} is already closed"
    assert accepted == 200
    assert unchanged["resolution"] == "False positive"
    assert len(mdr_sim.history(MDR_CLIENT_ID)) == 1


CLOSE_ERRORS = {
    "OTHER": ({"resolution_status": "OTHER"}, 400),
    "display form": ({"resolution_status": "True positive"}, 400),
    "no summary": ({"summary": ""}, 400),
    "unknown incident": ({"incident_id": "no-such-incident-000"}, 404),
}


@pytest.mark.parametrize("change, expected", CLOSE_ERRORS.values(), ids=CLOSE_ERRORS.keys())
async def test_close_incident_rejects(
    mdr_sim: MdrSimulator, mdr_url: str, wire_token: dict, change: dict, expected: int
) -> None:
    """incidents/close refuses an unknown resolution, an empty summary and an unknown incident."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    body = {"incident_id": incident["incident_id"], "resolution_status": "FALSE_POSITIVE", "summary": "s", **change}

    status, _ = await wire_call(mdr_url, "incidents/close", body, wire_token["access_token"])

    assert status == expected
    assert mdr_sim.incident(MDR_CLIENT_ID, incident["incident_id"])["status"] == "Open"


async def test_close_accepts_other_setting(mdr_sim: MdrSimulator, mdr_url: str, wire_token: dict) -> None:
    """With close_accepts_other, OTHER closes the incident with the resolution Other."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    mdr_sim.update_settings(close_accepts_other=True)
    body = {"incident_id": incident["incident_id"], "resolution_status": "OTHER", "summary": "Test alert"}

    status, closed = await wire_call(mdr_url, "incidents/close", body, wire_token["access_token"])

    assert status == 200
    assert closed["resolution"] == "Other"


# --- the response lifecycle ---


async def test_response_declined_after_timeout(mdr_sim: MdrSimulator, mdr_url: str, wire_token: dict) -> None:
    """A New response is declined once its timeout passes, dated at the timeout, with history records."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    response = mdr_sim.add_response(MDR_CLIENT_ID, incident["incident_id"])
    timeout_ms = int(mdr_sim.settings.response_timeout_seconds * 1000)
    token = wire_token["access_token"]

    mdr_sim.advance(mdr_sim.settings.response_timeout_seconds - 1)
    _, early = await wire_call(mdr_url, "responses/list", {"incident_id": incident["incident_id"]}, token)
    mdr_sim.advance(2)
    _, late = await wire_call(mdr_url, "responses/list", {"incident_id": incident["incident_id"]}, token)
    _, history = await wire_call(mdr_url, "incidents/history", {"incident_id": incident["incident_id"]}, token)
    _, details = await wire_call(mdr_url, "incidents/details", {"incident_id": incident["incident_id"]}, token)

    expired_at = response["creation_time"] + timeout_ms
    assert [r["status"] for r in early] == ["New"]
    assert [(r["status"], r["comment"], r["update_time"]) for r in late] == [("Declined", TIMEOUT_COMMENT, expired_at)]
    assert [(r["operation"], next(iter(r["entity"])), r["changed_at"]) for r in history[-2:]] == [
        ("update", "incident_response", expired_at),
        ("update", "incident_details", expired_at),
    ]
    assert details["update_time"] == expired_at


async def test_timed_out_response_cannot_be_confirmed(
    mdr_sim: MdrSimulator, mdr_url: str, wire_token: dict
) -> None:
    """A confirm that arrives after the timeout finds the response declined and gets 400."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    response = mdr_sim.add_response(MDR_CLIENT_ID, incident["incident_id"])
    mdr_sim.advance(mdr_sim.settings.response_timeout_seconds)
    body = {"response_id": response["response_id"], "status": "Confirmed", "comment": "late"}

    status, reply = await wire_call(mdr_url, "response/update", body, wire_token["access_token"])

    assert status == 400
    assert "already Declined" in reply["message"]


async def test_timeout_applies_without_advance(mdr_sim: MdrSimulator, mdr_url: str, wire_token: dict) -> None:
    """The decline is applied lazily on the next read, also when only real time has passed."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    created = mdr_sim.now_ms() - 5_000
    mdr_sim.update_settings(response_timeout_seconds=1.0)
    response = mdr_sim.add_response(MDR_CLIENT_ID, incident["incident_id"], creation_time=created, update_time=created)

    _, listed = await wire_call(
        mdr_url, "responses/list", {"incident_id": incident["incident_id"]}, wire_token["access_token"]
    )

    assert [(r["response_id"], r["status"], r["update_time"]) for r in listed] == [
        (response["response_id"], "Declined", created + 1000)
    ]


async def test_timeout_zero_never_declines(mdr_sim: MdrSimulator) -> None:
    """response_timeout_seconds 0 keeps a response New however far the clock moves."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    mdr_sim.update_settings(response_timeout_seconds=0.0)
    mdr_sim.add_response(MDR_CLIENT_ID, incident["incident_id"])

    mdr_sim.advance(30 * 86400)

    assert [r["status"] for r in mdr_sim.responses(MDR_CLIENT_ID, incident["incident_id"])] == ["New"]


async def test_initial_status_setting(mdr_sim: MdrSimulator) -> None:
    """A new response takes response_initial_status, and that status is the one that times out."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    mdr_sim.update_settings(response_initial_status="Waiting")
    mdr_sim.add_response(MDR_CLIENT_ID, incident["incident_id"])

    fresh = mdr_sim.responses(MDR_CLIENT_ID, incident["incident_id"])
    mdr_sim.advance(mdr_sim.settings.response_timeout_seconds)
    expired = mdr_sim.responses(MDR_CLIENT_ID, incident["incident_id"])

    assert [r["status"] for r in fresh] == ["Waiting"]
    assert [r["status"] for r in expired] == ["Declined"]


# --- attachment files ---


async def test_attachments_kept_on_disk(mdr_sim: MdrSimulator) -> None:
    """Attachment bytes live in files of the simulator's folder, which close() removes."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    added = mdr_sim.add_attachment(MDR_CLIENT_ID, incident["incident_id"], "a.bin", size=300_000)
    path = mdr_sim.blobs.path(added["attachment_id"])
    folder = mdr_sim.blobs.folder()

    assert path.parent == folder
    assert path.stat().st_size == 300_000
    assert added["file_size"] == 300_000
    assert path.read_bytes() == b"".join(generated_chunks(300_000))

    mdr_sim.close()

    assert not folder.exists()


async def test_upload_limit_keeps_no_file(mdr_sim: MdrSimulator, mdr_url: str, wire_token: dict) -> None:
    """An upload over max_upload_bytes gets 413 and leaves no partial file behind."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    mdr_sim.update_settings(max_upload_bytes=1000)
    form = aiohttp.FormData()
    form.add_field("meta", json.dumps({"incident_id": incident["incident_id"]}))
    form.add_field("file", b"\0" * 1001, filename="big.bin", content_type="application/octet-stream")

    status, reply = await wire_call(mdr_url, "attachments/upload", None, wire_token["access_token"], data=form)

    assert status == 413
    assert reply["message"] == "the file is larger than the upload limit of 1000 bytes"
    assert list(mdr_sim.blobs.folder().iterdir()) == []
    assert mdr_sim.attachments(MDR_CLIENT_ID, incident["incident_id"]) == []


async def test_upload_unknown_incident_keeps_no_file(mdr_sim: MdrSimulator, mdr_url: str, wire_token: dict) -> None:
    """An upload for an unknown incident gets 404 and its file is removed."""
    form = aiohttp.FormData()
    form.add_field("file", b"data", filename="a.txt", content_type="application/octet-stream")
    form.add_field("meta", json.dumps({"incident_id": "no-such-incident-000"}))

    status, _ = await wire_call(mdr_url, "attachments/upload", None, wire_token["access_token"], data=form)

    assert status == 404
    assert list(mdr_sim.blobs.folder().iterdir()) == []


async def test_download_headers(mdr_sim: MdrSimulator, mdr_url: str, wire_token: dict) -> None:
    """A download carries Content-Length and a Content-Disposition that keeps a non-ASCII name."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    added = mdr_sim.add_attachment(MDR_CLIENT_ID, incident["incident_id"], 'Отчёт "1".txt', b"hello")
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{mdr_url}/{MDR_CLIENT_ID}/attachments/download",
            json={"attachment_id": added["attachment_id"]},
            headers={"Authorization": f"Bearer {wire_token['access_token']}"},
        ) as reply:
            content = await reply.read()

    assert content == b"hello"
    assert reply.headers["Content-Length"] == "5"
    assert reply.headers["Content-Type"] == "application/octet-stream"
    assert reply.headers["Content-Disposition"] == (
        "attachment; filename=\"_____ _1_.txt\"; filename*=UTF-8''%D0%9E%D1%82%D1%87%D1%91%D1%82%20%221%22.txt"
    )


async def test_download_cut_off_wire(mdr_sim: MdrSimulator, mdr_url: str, wire_token: dict) -> None:
    """With download_cutoff_fraction, the reply announces the full size and the connection closes half-way."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    added = mdr_sim.add_attachment(MDR_CLIENT_ID, incident["incident_id"], "a.bin", size=1_000_000)
    mdr_sim.update_settings(download_cutoff_fraction=0.5)
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{mdr_url}/{MDR_CLIENT_ID}/attachments/download",
            json={"attachment_id": added["attachment_id"]},
            headers={"Authorization": f"Bearer {wire_token['access_token']}"},
        ) as reply:
            announced = reply.headers["Content-Length"]
            with pytest.raises(aiohttp.ClientPayloadError):
                await reply.read()

    assert announced == "1000000"


async def test_dropped_upload_reply_applies(mdr_sim: MdrSimulator, mdr_url: str, wire_token: dict) -> None:
    """drop_reply_after_commit stores the upload, then closes the connection without a reply."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    mdr_sim.drop_reply_after_commit("attachments/upload")
    form = aiohttp.FormData()
    form.add_field("meta", json.dumps({"incident_id": incident["incident_id"]}))
    form.add_field("file", b"data", filename="a.txt", content_type="application/octet-stream")

    with pytest.raises(aiohttp.ClientConnectionError):
        await wire_call(mdr_url, "attachments/upload", None, wire_token["access_token"], data=form)

    assert [a["full_name"] for a in mdr_sim.attachments(MDR_CLIENT_ID, incident["incident_id"])] == ["a.txt"]
    assert mdr_sim.drop_rules["attachments/upload"] == 0


# --- history ---


async def test_history_pages_each_type(mdr_sim: MdrSimulator, mdr_url: str, wire_token: dict) -> None:
    """Attachment and response records page on their own too: each type fills its share of a page."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    for index in range(3):
        mdr_sim.add_attachment(MDR_CLIENT_ID, incident["incident_id"], f"{index}.txt", b"x")
    mdr_sim.add_response(MDR_CLIENT_ID, incident["incident_id"])
    token = wire_token["access_token"]

    _, first = await wire_call(mdr_url, "incidents/history", {"entity_type_page_size": 2}, token)
    _, second = await wire_call(mdr_url, "incidents/history", {"page": 2, "entity_type_page_size": 2}, token)
    _, third = await wire_call(mdr_url, "incidents/history", {"page": 3, "entity_type_page_size": 2}, token)

    assert sorted(entity_types(first)) == [
        "incident_attachment",
        "incident_attachment",
        "incident_details",
        "incident_details",
        "incident_response",
    ]
    assert sorted(entity_types(second)) == ["incident_attachment", "incident_details", "incident_details"]
    assert entity_types(third) == ["incident_details"]
    assert [r["changed_at"] for r in first] == sorted(r["changed_at"] for r in first)


# --- control routes ---


async def test_control_attachments(mdr_sim: MdrSimulator) -> None:
    """The control API adds attachments from text, base64 or a size, and lists them with sha256 on request."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    path = f"/clients/{MDR_CLIENT_ID}/incidents/{incident['incident_id']}/attachments"
    async with run_simulator(mdr_sim) as url:
        origin = url.removesuffix("/api/v1")
        text_status, from_text = await control(origin, "POST", path, {"full_name": "note.txt", "text": "Привет"})
        _, from_base64 = await control(
            origin,
            "POST",
            path,
            {"full_name": "raw.bin", "content_base64": base64.b64encode(b"\0\1\2").decode(), "caption": "raw"},
        )
        _, generated = await control(origin, "POST", path, {"full_name": "big.bin", "size": 600_000, "author": "Anna"})
        both_status, both = await control(origin, "POST", path, {"full_name": "x", "text": "a", "size": 1})
        missing_status, _ = await control(
            origin, "POST", f"/clients/{MDR_CLIENT_ID}/incidents/no-such/attachments", {"full_name": "x", "size": 1}
        )
        _, listed = await control(origin, "GET", f"{path}?checksum=sha256")

    assert text_status == 200
    assert from_text["file_size"] == len("Привет".encode())
    assert from_base64["caption"] == "raw"
    assert generated["author_name"] == "Anna"
    assert generated["file_size"] == 600_000
    assert both_status == 400
    assert "exactly one of text, content_base64 or size" in both["message"]
    assert missing_status == 404
    assert [a["sha256"] for a in listed] == [
        hashlib.sha256("Привет".encode()).hexdigest(),
        hashlib.sha256(b"\0\1\2").hexdigest(),
        hashlib.sha256(b"".join(generated_chunks(600_000))).hexdigest(),
    ]
    assert list(mdr_sim.blobs.folder().glob("incoming-*")) == []


async def test_control_responses_assets_tenants(mdr_sim: MdrSimulator) -> None:
    """The control API adds responses, assets and tenants, reads responses and history, and sets drop rules."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    responses = f"/clients/{MDR_CLIENT_ID}/incidents/{incident['incident_id']}/responses"
    async with run_simulator(mdr_sim) as url:
        origin = url.removesuffix("/api/v1")
        _, added = await control(origin, "POST", responses, {"type": "NETWORK_ISOLATION", "parameters": {"period": 60}})
        _, listed = await control(origin, "GET", responses)
        _, asset = await control(origin, "POST", f"/clients/{MDR_CLIENT_ID}/assets", {"host_name": "SRV-SQL-02"})
        no_name, _ = await control(origin, "POST", f"/clients/{MDR_CLIENT_ID}/assets", {"status": "OK"})
        _, tenant = await control(origin, "POST", f"/clients/{MDR_CLIENT_ID}/tenants", {"tenant_name": "Retail EU"})
        _, history = await control(origin, "GET", f"/clients/{MDR_CLIENT_ID}/history")
        _, rule = await control(origin, "POST", "/faults/drop-reply", {"method": "incidents/close", "times": 2})
        bad_times, _ = await control(origin, "POST", "/faults/drop-reply", {"method": "incidents/close", "times": 0})

    assert added["status"] == "New"
    assert [r["response_id"] for r in listed] == [added["response_id"]]
    assert listed[0]["parameters"] == {"period": 60}
    assert mdr_sim._assets[asset["asset_id"]]["host_name"] == "SRV-SQL-02"
    assert no_name == 400
    assert tenant["tenant_name"] == "Retail EU"
    assert entity_types(history) == ["incident_details", "incident_response", "incident_details"]
    assert rule == {"method": "incidents/close", "remaining": 2}
    assert bad_times == 400


def test_response_expiry_after_skipped_scans(mdr_sim: MdrSimulator) -> None:
    """Skipping scans until the earliest expiry misses no response: neither an added one already past its timeout nor one a shorter timeout expires."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    incident_id = incident["incident_id"]
    timeout = mdr_sim.settings.response_timeout_seconds
    first = mdr_sim.add_response(MDR_CLIENT_ID, incident_id)
    assert mdr_sim.expire_responses() == 0

    old = mdr_sim.add_response(MDR_CLIENT_ID, incident_id, creation_time=first["creation_time"] - int(timeout * 1000))
    assert mdr_sim.expire_responses() == 1

    mdr_sim.advance(timeout / 2)
    mdr_sim.settings.response_timeout_seconds = timeout / 4
    assert mdr_sim.expire_responses() == 1

    statuses = {response["response_id"]: response["status"] for response in mdr_sim.responses(MDR_CLIENT_ID, incident_id)}
    assert statuses == {first["response_id"]: "Declined", old["response_id"]: "Declined"}


async def test_backdated_comment_history(mdr_sim: MdrSimulator) -> None:
    """A comment added with `at_ms` carries that time in its record, its history records and the incident's update_time."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID, creation_time=1_700_000_000_000, update_time=1_700_000_000_000)
    incident_id = incident["incident_id"]

    comment = mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>old note</p>", at_ms=1_700_000_600_000)

    records = [record for record in mdr_sim._history if record.incident_id == incident_id]
    assert comment["creation_time"] == 1_700_000_600_000
    assert [(record.entity_type, record.changed_at) for record in records[1:]] == [
        ("incident_comment", 1_700_000_600_000),
        ("incident_details", 1_700_000_600_000),
    ]
    assert mdr_sim.incident(MDR_CLIENT_ID, incident_id)["update_time"] == 1_700_000_600_000
