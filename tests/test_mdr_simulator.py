"""The MDR simulator's wire protocol, tested with raw HTTP calls on loopback."""

from __future__ import annotations

import base64
import json

import aiohttp
import pytest
from fixtures_mdr import MDR_CLIENT_ID, MDR_CONNECTION_NAME, wire_call
from mdr_connector.adapters.mdr.simulator import DAY, HOUR, MdrSimulator, run_simulator
from mdr_connector.adapters.mdr.simulator import main as simulator_main


def seed_timeline(sim: MdrSimulator, count: int) -> list[dict]:
    """Seed `count` incidents created one minute apart, the newest updated last."""
    base = sim.now_ms() - count * 60_000
    return [
        sim.seed_incident(
            MDR_CLIENT_ID, creation_time=base + i * 60_000, update_time=base + i * 60_000 + 1000
        )
        for i in range(count)
    ]


async def test_list_returns_bare_array_in_ms(mdr_sim: MdrSimulator, mdr_url: str, wire_token: dict) -> None:
    """incidents/list returns a bare array of full records with 13-digit millisecond times."""
    mdr_sim.seed_incident(MDR_CLIENT_ID)

    status, body = await wire_call(mdr_url, "incidents/list", {}, wire_token["access_token"])

    assert status == 200
    assert isinstance(body, list)
    record = body[0]
    assert len(str(record["creation_time"])) == 13
    assert abs(record["update_time"] - mdr_sim.now_ms()) < 60_000
    assert len(record["incident_id"]) == 20
    assert record["affected_hosts"][0].split(":", 1)[1].startswith("0x")
    for name in (
        "summary",
        "description",
        "priority",
        "status",
        "resolution",
        "tenant_name",
        "comments",
        "attachments",
        "responses",
        "mitre_tactics",
        "was_read",
    ):
        assert name in record


async def test_count_returns_count_object(mdr_sim: MdrSimulator, mdr_url: str, wire_token: dict) -> None:
    """incidents/count returns {"count": n} for the filter."""
    seed_timeline(mdr_sim, 3)
    mdr_sim.seed_incident(MDR_CLIENT_ID, status="Closed")

    status, body = await wire_call(
        mdr_url, "incidents/count", {"statuses": ["Open"]}, wire_token["access_token"]
    )

    assert status == 200
    assert body == {"count": 3}


async def test_list_paging_past_end_is_empty(mdr_sim: MdrSimulator, mdr_url: str, wire_token: dict) -> None:
    """Pages are 1-based, hold page_size records, and a page past the end is []."""
    seeded = seed_timeline(mdr_sim, 5)
    token = wire_token["access_token"]

    pages = [
        (
            await wire_call(
                mdr_url, "incidents/list", {"page": page, "page_size": 2, "sort": "creation_time:asc"}, token
            )
        )[1]
        for page in (1, 2, 3, 4)
    ]

    assert [len(page) for page in pages] == [2, 2, 1, 0]
    assert [r["incident_id"] for page in pages for r in page] == [r["incident_id"] for r in seeded]


@pytest.mark.parametrize("sort", ["creation_time", "update_time"])
async def test_list_sort_both_directions(
    mdr_sim: MdrSimulator, mdr_url: str, wire_token: dict, sort: str
) -> None:
    """Sorting by creation_time and update_time works ascending and descending."""
    seeded = seed_timeline(mdr_sim, 4)
    mdr_sim.update_incident(MDR_CLIENT_ID, seeded[0]["incident_id"], priority="HIGH")
    token = wire_token["access_token"]

    _, ascending = await wire_call(mdr_url, "incidents/list", {"sort": f"{sort}:asc"}, token)
    _, descending = await wire_call(mdr_url, "incidents/list", {"sort": f"{sort}:desc"}, token)

    values = [r[sort] for r in ascending]
    assert values == sorted(values)
    assert [r["incident_id"] for r in descending] == [r["incident_id"] for r in reversed(ascending)]
    if sort == "update_time":
        assert ascending[-1]["incident_id"] == seeded[0]["incident_id"]


async def test_list_invalid_sort_rejected(mdr_sim: MdrSimulator, mdr_url: str, wire_token: dict) -> None:
    """An unknown sort field gets 400 with a JSON error body."""
    status, body = await wire_call(
        mdr_url, "incidents/list", {"sort": "summary:up"}, wire_token["access_token"]
    )

    assert status == 400
    assert body["code"] == 400


async def test_list_time_filters_inclusive(mdr_sim: MdrSimulator, mdr_url: str, wire_token: dict) -> None:
    """min/max update and creation time bounds include records exactly on the bound."""
    seeded = seed_timeline(mdr_sim, 4)
    token = wire_token["access_token"]

    _, by_update = await wire_call(
        mdr_url,
        "incidents/list",
        {
            "min_update_time": seeded[1]["update_time"],
            "max_update_time": seeded[2]["update_time"],
        },
        token,
    )
    _, by_creation = await wire_call(
        mdr_url,
        "incidents/list",
        {
            "min_creation_time": seeded[2]["creation_time"],
            "max_creation_time": seeded[3]["creation_time"],
        },
        token,
    )

    assert [r["incident_id"] for r in by_update] == [seeded[1]["incident_id"], seeded[2]["incident_id"]]
    assert [r["incident_id"] for r in by_creation] == [seeded[2]["incident_id"], seeded[3]["incident_id"]]


async def test_list_enum_filters(mdr_sim: MdrSimulator, mdr_url: str, wire_token: dict) -> None:
    """statuses, priorities and tenants_names select matching incidents only."""
    wanted = mdr_sim.seed_incident(MDR_CLIENT_ID, status="On hold", priority="HIGH", tenant_name="Retail EU")
    mdr_sim.seed_incident(MDR_CLIENT_ID, status="On hold", priority="LOW", tenant_name="Retail EU")
    mdr_sim.seed_incident(MDR_CLIENT_ID, status="Open", priority="HIGH", tenant_name="Retail EU")
    mdr_sim.seed_incident(MDR_CLIENT_ID, status="On hold", priority="HIGH", tenant_name="")

    _, body = await wire_call(
        mdr_url,
        "incidents/list",
        {
            "statuses": ["On hold"],
            "priorities": ["HIGH"],
            "tenants_names": ["Retail EU"],
        },
        wire_token["access_token"],
    )

    assert [r["incident_id"] for r in body] == [wanted["incident_id"]]


async def test_list_unknown_filter_rejected(mdr_sim: MdrSimulator, mdr_url: str, wire_token: dict) -> None:
    """An undocumented request field such as incident_ids gets 400."""
    status, body = await wire_call(
        mdr_url, "incidents/list", {"incident_ids": ["x"]}, wire_token["access_token"]
    )

    assert status == 400
    assert "incident_ids" in body["message"]


async def test_result_window_cap(mdr_sim: MdrSimulator, mdr_url: str, wire_token: dict) -> None:
    """page * page_size above the result window gets 400 with {"code", "message"}."""
    token = wire_token["access_token"]

    at_cap, _ = await wire_call(mdr_url, "incidents/list", {"page": 100, "page_size": 100}, token)
    status, body = await wire_call(mdr_url, "incidents/list", {"page": 101, "page_size": 100}, token)

    assert at_cap == 200
    assert status == 400
    assert body["code"] == 400
    assert "10000" in body["message"]


async def test_fields_limit_keys(mdr_sim: MdrSimulator, mdr_url: str, wire_token: dict) -> None:
    """`fields` limits each record to the named keys."""
    mdr_sim.seed_incident(MDR_CLIENT_ID)

    _, body = await wire_call(
        mdr_url, "incidents/list", {"fields": ["incident_id", "update_time"]}, wire_token["access_token"]
    )

    assert set(body[0]) == {"incident_id", "update_time"}


async def test_markdown_to_html_description(mdr_sim: MdrSimulator, mdr_url: str, wire_token: dict) -> None:
    """markdown_to_html renders the Markdown description as HTML."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID, description="Host **WS-FIN-017** isolated")
    token = wire_token["access_token"]

    _, plain = await wire_call(mdr_url, "incidents/details", {"incident_id": incident["incident_id"]}, token)
    _, html = await wire_call(
        mdr_url,
        "incidents/details",
        {"incident_id": incident["incident_id"], "markdown_to_html": True},
        token,
    )

    assert plain["description"] == "Host **WS-FIN-017** isolated"
    assert html["description"].strip() == "<p>Host <strong>WS-FIN-017</strong> isolated</p>"


async def test_body_parsed_whatever_content_type(
    mdr_sim: MdrSimulator, mdr_url: str, wire_token: dict
) -> None:
    """A JSON body sent as form-urlencoded is still read as JSON."""
    mdr_sim.seed_incident(MDR_CLIENT_ID, status="Closed")
    headers = {
        "Authorization": f"Bearer {wire_token['access_token']}",
        "Content-Type": "application/x-www-form-urlencoded",
    }

    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{mdr_url}/{MDR_CLIENT_ID}/incidents/count",
            data=json.dumps({"statuses": ["Open"]}),
            headers=headers,
        ) as reply:
            body = await reply.json(content_type=None)

    assert body == {"count": 0}


async def test_history_comment_adds_two_records(
    mdr_sim: MdrSimulator, mdr_url: str, wire_token: dict
) -> None:
    """A new comment adds a comment record and an incident update record, in time order."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    token = wire_token["access_token"]

    await wire_call(
        mdr_url, "comments/create", {"incident_id": incident["incident_id"], "text": "Checked"}, token
    )
    _, records = await wire_call(
        mdr_url, "incidents/history", {"incident_id": incident["incident_id"]}, token
    )

    assert [(r["operation"], next(iter(r["entity"]))) for r in records] == [
        ("create", "incident_details"),
        ("create", "incident_comment"),
        ("update", "incident_details"),
    ]
    assert records[2]["changed_by"] == MDR_CONNECTION_NAME
    assert [r["changed_at"] for r in records] == sorted(r["changed_at"] for r in records)


async def test_history_pages_per_entity_type(mdr_sim: MdrSimulator, mdr_url: str, wire_token: dict) -> None:
    """With 3 incident and 2 comment records, page size 2 gives 4 records and page 2 gives 1."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident["incident_id"], "<p>first</p>")
    mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident["incident_id"], "<p>second</p>")
    token = wire_token["access_token"]

    _, first = await wire_call(mdr_url, "incidents/history", {"entity_type_page_size": 2}, token)
    _, second = await wire_call(mdr_url, "incidents/history", {"page": 2, "entity_type_page_size": 2}, token)

    assert [next(iter(r["entity"])) for r in first].count("incident_details") == 2
    assert [next(iter(r["entity"])) for r in first].count("incident_comment") == 2
    assert [next(iter(r["entity"])) for r in second] == ["incident_details"]


async def test_visibility_delay(mdr_sim: MdrSimulator, mdr_url: str, wire_token: dict) -> None:
    """A change shows in incidents/list only after the delay, still with its own update_time."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    mdr_sim.settings.visibility_delay_seconds = 120
    mdr_sim.advance(10)
    changed = mdr_sim.update_incident(MDR_CLIENT_ID, incident["incident_id"], status="On hold")
    token = wire_token["access_token"]
    since = {"min_update_time": changed["update_time"]}

    _, early = await wire_call(mdr_url, "incidents/list", since, token)
    _, early_all = await wire_call(mdr_url, "incidents/list", {}, token)
    _, details = await wire_call(
        mdr_url, "incidents/details", {"incident_id": incident["incident_id"]}, token
    )
    mdr_sim.advance(121)
    _, late = await wire_call(mdr_url, "incidents/list", since, token)

    assert early == []
    assert early_all[0]["status"] == "Open"
    assert details["status"] == "On hold"
    assert [r["status"] for r in late] == ["On hold"]
    assert late[0]["update_time"] == changed["update_time"]


async def test_api_comment_author_is_connection(
    mdr_sim: MdrSimulator, mdr_url: str, wire_token: dict
) -> None:
    """Comments written through the API carry the connection name and origin Client."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    mdr_sim.add_soc_comment(
        MDR_CLIENT_ID, incident["incident_id"], "<p>SOC note</p>", author="Анна (MDR SOC)"
    )
    token = wire_token["access_token"]

    status, created = await wire_call(
        mdr_url,
        "comments/create",
        {
            "incident_id": incident["incident_id"],
            "text": "See **SEC-12**",
            "markdown_to_html": True,
        },
        token,
    )
    _, listed = await wire_call(mdr_url, "comments/list", {"incident_id": incident["incident_id"]}, token)

    assert status == 200
    assert created["author_name"] == MDR_CONNECTION_NAME
    assert created["origin"] == "Client"
    assert created["text"].strip() == "<p>See <strong>SEC-12</strong></p>"
    assert [(c["author_name"], c["origin"]) for c in listed] == [
        ("Анна (MDR SOC)", "Service"),
        (MDR_CONNECTION_NAME, "Client"),
    ]
    assert mdr_sim.incident(MDR_CLIENT_ID, incident["incident_id"])["update_time"] == created["creation_time"]


async def test_comment_delete_own_only(mdr_sim: MdrSimulator, mdr_url: str, wire_token: dict) -> None:
    """comments/delete removes the connection's own comment and refuses a SOC comment."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    soc = mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident["incident_id"], "<p>SOC</p>")
    token = wire_token["access_token"]
    _, own = await wire_call(
        mdr_url, "comments/create", {"incident_id": incident["incident_id"], "text": "mine"}, token
    )

    deleted, _ = await wire_call(mdr_url, "comments/delete", {"comment_id": own["comment_id"]}, token)
    refused, _ = await wire_call(mdr_url, "comments/delete", {"comment_id": soc["comment_id"]}, token)

    assert deleted == 200
    assert refused == 403
    assert [c["comment_id"] for c in mdr_sim.comments(MDR_CLIENT_ID, incident["incident_id"])] == [
        soc["comment_id"]
    ]


async def test_attachment_upload_download(mdr_sim: MdrSimulator, mdr_url: str, wire_token: dict) -> None:
    """An uploaded file is listed with the connection as author and downloads byte for byte."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    token = wire_token["access_token"]
    form = aiohttp.FormData()
    form.add_field("file", b"\x00log line\n", filename="triage.log", content_type="application/octet-stream")
    form.add_field("meta", json.dumps({"incident_id": incident["incident_id"], "caption": "triage"}))

    status, uploaded = await wire_call(mdr_url, "attachments/upload", None, token, data=form)
    _, listed = await wire_call(mdr_url, "attachments/list", {"incident_id": incident["incident_id"]}, token)
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{mdr_url}/{MDR_CLIENT_ID}/attachments/download",
            json={"attachment_id": uploaded["attachment_id"]},
            headers={"Authorization": f"Bearer {token}"},
        ) as reply:
            content = await reply.read()

    assert status == 200
    assert uploaded["author_name"] == MDR_CONNECTION_NAME
    assert uploaded["file_size"] == 10
    assert [a["caption"] for a in listed] == ["triage"]
    assert content == b"\x00log line\n"


async def test_response_decisions(mdr_sim: MdrSimulator, mdr_url: str, wire_token: dict) -> None:
    """response/update and responses/update confirm or decline New responses only."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    first = mdr_sim.add_response(MDR_CLIENT_ID, incident["incident_id"])
    second = mdr_sim.add_response(MDR_CLIENT_ID, incident["incident_id"], type="NETWORK_ISOLATION")
    token = wire_token["access_token"]

    status, one = await wire_call(
        mdr_url,
        "response/update",
        {"response_id": first["response_id"], "status": "Confirmed", "comment": "ok"},
        token,
    )
    again, _ = await wire_call(
        mdr_url,
        "response/update",
        {"response_id": first["response_id"], "status": "Declined", "comment": "no"},
        token,
    )
    _, many = await wire_call(
        mdr_url,
        "responses/update",
        {"responses_ids": [second["response_id"]], "status": "Declined", "comment": "no"},
        token,
    )
    _, listed = await wire_call(mdr_url, "responses/list", {"incident_id": incident["incident_id"]}, token)

    assert status == 200
    assert one["status"] == "Confirmed"
    assert again == 400
    assert [r["status"] for r in many] == ["Declined"]
    assert [r["status"] for r in listed] == ["Confirmed", "Declined"]


async def test_assets_list_count_details(mdr_sim: MdrSimulator, mdr_url: str, wire_token: dict) -> None:
    """assets/list pages and sorts, assets/count counts, assets/details honours fields."""
    for name in ("SRV-DC-01", "WS-FIN-017", "LT-DEV-112"):
        mdr_sim.add_asset(MDR_CLIENT_ID, name)
    mdr_sim.add_asset(MDR_CLIENT_ID, "WS-HR-004", status="OFFLINE")
    token = wire_token["access_token"]

    _, listed = await wire_call(
        mdr_url, "assets/list", {"sort": "computer_name_hostname:asc", "page_size": 3}, token
    )
    _, count = await wire_call(mdr_url, "assets/count", {"statuses": ["OFFLINE"]}, token)
    _, details = await wire_call(
        mdr_url, "assets/details", {"asset_id": listed[0]["asset_id"], "fields": ["asset_id"]}, token
    )

    assert [a["host_name"] for a in listed] == ["LT-DEV-112", "SRV-DC-01", "WS-FIN-017"]
    assert count == {"count": 1}
    assert details == {"asset_id": listed[0]["asset_id"]}


@pytest.mark.parametrize("status", [403, 401])
async def test_expired_access_token_refused(
    mdr_sim: MdrSimulator, mdr_url: str, wire_token: dict, status: int
) -> None:
    """An expired access token gets 403 by default, or the configured status."""
    mdr_sim.settings.expired_access_status = status
    token = wire_token["access_token"]

    fresh, _ = await wire_call(mdr_url, "incidents/count", {}, token)
    mdr_sim.advance(HOUR + 1)
    expired, body = await wire_call(mdr_url, "incidents/count", {}, token)

    assert fresh == 200
    assert expired == status
    assert body["code"] == status


async def test_missing_or_forged_token_refused(mdr_sim: MdrSimulator, mdr_url: str, wire_token: dict) -> None:
    """No Authorization header or a token with a forged signature gets 403."""
    header, payload, _ = wire_token["access_token"].split(".")
    forged = f"{header}.{payload}.{base64.urlsafe_b64encode(b'x' * 32).decode().rstrip('=')}"

    missing, _ = await wire_call(mdr_url, "incidents/count", {}, None)
    wrong, _ = await wire_call(mdr_url, "incidents/count", {}, forged)

    assert missing == 403
    assert wrong == 403


async def test_tokens_are_jwts_with_lifetimes(mdr_sim: MdrSimulator, wire_token: dict) -> None:
    """Issued tokens are three-segment JWTs whose exp (seconds) gives 1 h and 7 d lifetimes."""

    def claims(token: str) -> dict:
        payload = token.split(".")[1]
        return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))

    access, refresh = claims(wire_token["access_token"]), claims(wire_token["refresh_token"])

    assert len(wire_token["access_token"].split(".")) == 3
    assert access["exp"] - access["iat"] == HOUR
    assert refresh["exp"] - refresh["iat"] == 7 * DAY
    assert abs(access["exp"] - (mdr_sim.now() + HOUR)) < 5


async def test_console_token_single_use(mdr_sim: MdrSimulator, mdr_url: str) -> None:
    """A console token works once; the second confirm gets 401."""
    console_token = mdr_sim.issue_console_token(MDR_CLIENT_ID)

    first, _ = await wire_call(mdr_url, "session/confirm", {"refresh_token": console_token}, None)
    second, body = await wire_call(mdr_url, "session/confirm", {"refresh_token": console_token}, None)

    assert first == 200
    assert second == 401
    assert body["code"] == 401
    assert mdr_sim.confirm_calls == 2


async def test_console_token_expires_after_a_day(mdr_sim: MdrSimulator, mdr_url: str) -> None:
    """A console token is refused once the simulator clock passes its 24 hours."""
    console_token = mdr_sim.issue_console_token(MDR_CLIENT_ID)
    mdr_sim.advance(DAY)

    status, _ = await wire_call(mdr_url, "session/confirm", {"refresh_token": console_token}, None)

    assert status == 401


@pytest.mark.parametrize("single_use", [True, False])
async def test_rotated_refresh_token_reuse(
    mdr_sim: MdrSimulator, mdr_url: str, wire_token: dict, single_use: bool
) -> None:
    """Every confirm rotates; an API-issued refresh token dies after use only when single-use is on."""
    mdr_sim.settings.single_use_refresh_tokens = single_use
    refresh_token = wire_token["refresh_token"]

    first, pair = await wire_call(mdr_url, "session/confirm", {"refresh_token": refresh_token}, None)
    second, _ = await wire_call(mdr_url, "session/confirm", {"refresh_token": refresh_token}, None)

    assert first == 200
    assert pair["refresh_token"] != refresh_token
    assert second == (401 if single_use else 200)


async def test_session_confirms_logged(mdr_sim: MdrSimulator, mdr_url: str) -> None:
    """Each session/confirm is logged with its refresh token's id and outcome, and served on the control API."""
    console_token = mdr_sim.issue_console_token(MDR_CLIENT_ID)

    _, pair = await wire_call(mdr_url, "session/confirm", {"refresh_token": console_token}, None)
    await wire_call(mdr_url, "session/confirm", {"refresh_token": console_token}, None)
    await wire_call(mdr_url, "session/confirm", {"refresh_token": "not-a-token"}, None)
    async with aiohttp.ClientSession() as http:
        async with http.get(mdr_url.split("/api/", 1)[0] + "/_sim/session-confirms") as reply:
            served = await reply.json()

    outcomes = [(record["client_id"], record["outcome"]) for record in served]
    assert outcomes == [(MDR_CLIENT_ID, "rotated"), (MDR_CLIENT_ID, "used"), (MDR_CLIENT_ID, "invalid")]
    assert served[0]["token_id"] == served[1]["token_id"]
    assert served[0]["token_id"] is not None
    assert served[2]["token_id"] is None
    assert pair["refresh_token"] != console_token


async def test_tenant_restricted_connection(mdr_sim: MdrSimulator, mdr_url: str) -> None:
    """A connection limited to a tenant can read only that tenant's incidents."""
    mdr_sim.create_client(MDR_CLIENT_ID, connection_name="Retail only", tenants=["Retail EU"])
    retail = mdr_sim.seed_incident(MDR_CLIENT_ID, tenant_name="Retail EU")
    root = mdr_sim.seed_incident(MDR_CLIENT_ID, tenant_name="")
    _, pair = await wire_call(
        mdr_url,
        "session/confirm",
        {"refresh_token": mdr_sim.issue_console_token(MDR_CLIENT_ID, "Retail only")},
        None,
    )

    _, listed = await wire_call(mdr_url, "incidents/list", {}, pair["access_token"])
    hidden, _ = await wire_call(
        mdr_url, "incidents/details", {"incident_id": root["incident_id"]}, pair["access_token"]
    )

    assert [r["incident_id"] for r in listed] == [retail["incident_id"]]
    assert hidden == 404


async def test_demo_seed_is_realistic(mdr_sim: MdrSimulator) -> None:
    """Demo incidents mix Russian and English text, HTML comments, hosts with asset ids and tenants."""
    seeded = mdr_sim.seed_demo_incidents(MDR_CLIENT_ID, 12)

    summaries = " ".join(r["summary"] for r in seeded)
    assert len(seeded) == 12
    assert len({r["incident_number"] for r in seeded}) == 12
    assert [r["incident_number"] for r in seeded] == sorted(r["incident_number"] for r in seeded)
    assert any("\u0400" <= ch <= "\u04ff" for ch in summaries)
    assert "attempt" in summaries
    assert any(r["comments"] and r["comments"][0]["text"].startswith("<p>") for r in seeded)
    assert all(r["affected_hosts"][0].split(":")[1].startswith("0x") for r in seeded)
    assert len({r["tenant_name"] for r in seeded}) > 1


async def test_control_api_over_http(mdr_sim: MdrSimulator) -> None:
    """The /_sim/ control API creates a client, seeds incidents, moves the clock and reports state."""
    async with run_simulator(mdr_sim) as url:
        origin = url.removesuffix("/api/v1")
        async with aiohttp.ClientSession() as session:
            created = await (
                await session.post(
                    f"{origin}/_sim/clients", json={"client_id": "other", "connection_name": "Demo"}
                )
            ).json()
            await session.post(f"{origin}/_sim/clients/other/demo-incidents", json={"count": 3})
            before = mdr_sim.now_ms()
            advanced = await (
                await session.post(f"{origin}/_sim/clock/advance", json={"seconds": 3600})
            ).json()
            state = await (await session.get(f"{origin}/_sim/state")).json()
            confirm = await session.post(
                f"{url}/other/session/confirm", json={"refresh_token": created["console_token"]}
            )

    assert created["connection_name"] == "Demo"
    assert state["incident_counts"]["other"] == 3
    assert advanced["now_ms"] - before >= 3_600_000
    assert confirm.status == 200


async def test_simulator_rejects_non_loopback_host(mdr_sim: MdrSimulator) -> None:
    """The control API has no authentication, so the simulator rejects hosts beyond loopback.

    192.0.2.1 is a documentation address: should the check ever go, binding
    it fails on this machine without a packet leaving it.
    """
    with pytest.raises(ValueError, match="the simulator serves only loopback addresses, not '192.0.2.1'"):
        async with run_simulator(mdr_sim, "192.0.2.1"):
            pass


def test_simulator_command_rejects_non_loopback_host(capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m ...simulator --host 192.0.2.1` is a usage error, before anything listens."""
    with pytest.raises(SystemExit) as caught:
        simulator_main(["--host", "192.0.2.1"])

    assert caught.value.code == 2
    assert "the simulator serves only loopback addresses" in capsys.readouterr().err


async def test_simulator_serves_ipv6_loopback(mdr_sim: MdrSimulator) -> None:
    """On ::1 the base URL brackets the address, so clients can use it as it is."""
    try:
        async with run_simulator(mdr_sim, "::1") as url:
            assert url.startswith("http://[::1]:")
    except OSError as err:
        pytest.skip(f"no IPv6 loopback here: {err}")


async def test_lone_surrogate_answers_ascii_json(mdr_sim: MdrSimulator, mdr_url: str, wire_token: dict) -> None:
    """A record that cannot be UTF-8 (a lone surrogate) is sent as escaped ASCII JSON, not as a 500."""
    mdr_sim.seed_incident(MDR_CLIENT_ID, summary="broken \ud800 title")

    status, body = await wire_call(mdr_url, "incidents/list", {}, wire_token["access_token"])

    assert status == 200
    assert body[0]["summary"] == "broken \ud800 title"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("latency_seconds", "slow", "latency_seconds must be a finite number, got \"slow\""),
        ("visibility_delay_seconds", float("nan"), "visibility_delay_seconds must be a finite number, got NaN"),
        ("access_token_seconds", 3600.5, "access_token_seconds must be an integer, got 3600.5"),
        ("result_window", True, "result_window must be an integer, got true"),
        ("single_use_refresh_tokens", 0, "single_use_refresh_tokens must be true or false, got 0"),
        ("response_initial_status", None, "response_initial_status must be a string, got null"),
    ],
)
async def test_settings_wrong_type_400(
    mdr_sim: MdrSimulator, name: str, value: object, expected: str
) -> None:
    """PATCH /_sim/settings rejects a value of the wrong type with 400 naming the key and type, and keeps serving."""
    before = dict(vars(mdr_sim.settings))
    async with run_simulator(mdr_sim) as url:
        origin = url.removesuffix("/api/v1")
        async with aiohttp.ClientSession() as session:
            reply = await session.patch(f"{origin}/_sim/settings", json={name: value})
            body = await reply.json()
        console_token = mdr_sim.issue_console_token(MDR_CLIENT_ID)
        confirm_status, _ = await wire_call(url, "session/confirm", {"refresh_token": console_token}, None)

    assert reply.status == 400
    assert body == {"code": 400, "message": f"invalid settings, nothing was changed: {expected}"}
    assert vars(mdr_sim.settings) == before
    assert confirm_status == 200


async def test_settings_bad_value_changes_nothing(mdr_sim: MdrSimulator) -> None:
    """A PATCH with one valid and one invalid setting applies neither."""
    async with run_simulator(mdr_sim) as url:
        origin = url.removesuffix("/api/v1")
        async with aiohttp.ClientSession() as session:
            reply = await session.patch(
                f"{origin}/_sim/settings", json={"latency_seconds": 0.5, "default_page_size": "50"}
            )

    assert reply.status == 400
    assert mdr_sim.settings.latency_seconds == 0
    assert mdr_sim.settings.default_page_size == 100


async def test_settings_unknown_name_400(mdr_sim: MdrSimulator) -> None:
    """An unknown setting name gets 400, not 404, and the message lists the known names."""
    async with run_simulator(mdr_sim) as url:
        origin = url.removesuffix("/api/v1")
        async with aiohttp.ClientSession() as session:
            reply = await session.patch(f"{origin}/_sim/settings", json={"latency": 1})
            body = await reply.json()

    assert reply.status == 400
    assert body["message"].startswith("unknown simulator settings: latency; known: access_token_seconds,")


async def test_settings_accept_valid_values(mdr_sim: MdrSimulator) -> None:
    """Valid values of each type are applied, and an integer is accepted for a float setting."""
    changes = {
        "latency_seconds": 0,
        "visibility_delay_seconds": 1.5,
        "result_window": 500,
        "revoke_access_on_refresh": True,
        "response_initial_status": "Pending",
    }
    async with run_simulator(mdr_sim) as url:
        origin = url.removesuffix("/api/v1")
        async with aiohttp.ClientSession() as session:
            reply = await session.patch(f"{origin}/_sim/settings", json=changes)
            body = await reply.json()

    assert reply.status == 200
    for name, value in changes.items():
        assert body[name] == value
        assert getattr(mdr_sim.settings, name) == value


@pytest.mark.parametrize("seconds", [-1, "60", True, float("inf")], ids=["negative", "string", "boolean", "infinite"])
async def test_clock_rejects_bad_advance(mdr_sim: MdrSimulator, seconds: object) -> None:
    """`/_sim/clock/advance` rejects a negative or non-numeric advance with 400, and the clock stays."""
    async with run_simulator(mdr_sim) as url:
        origin = url.removesuffix("/api/v1")
        before = mdr_sim.now_ms()
        async with aiohttp.ClientSession() as session:
            reply = await session.post(f"{origin}/_sim/clock/advance", json={"seconds": seconds})

    assert reply.status == 400
    assert mdr_sim.now_ms() - before < 60_000
