"""The ServiceNow simulator, driven over loopback by a plain aiohttp client as the connector would drive a real instance."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mdr_connector.adapters.servicenow import simulator as simulator_module
from mdr_connector.adapters.servicenow import simulator_query
from mdr_connector.adapters.servicenow.simulator import (
    HUMAN_PASSWORD,
    HUMAN_USER,
    OAUTH_CLIENT_ID,
    OAUTH_CLIENT_SECRET,
    SERVICE_PASSWORD,
    SERVICE_USER,
    ServiceNowSimulator,
    run_simulator,
    serve,
)
from mdr_connector.adapters.servicenow.simulator_state import format_time

UNAUTHENTICATED = {"error": {"message": "User Not Authenticated", "detail": "Required to provide Auth information"}, "status": "failure"}
SYS_ID = re.compile(r"[0-9a-f]{32}")
TABLE = "/api/now/table/incident"


@dataclass
class RunningServiceNow:
    """A simulator, the loopback URL it serves and a session signed in as the service user."""

    sim: ServiceNowSimulator
    url: str
    session: aiohttp.ClientSession

    async def call(self, method: str, path: str, **options: Any) -> tuple[int, Any, Any]:
        """Send a request and return the status, the JSON body (None when empty) and the headers."""
        async with self.session.request(method, self.url + path, **options) as response:
            text = await response.text()
            body = await response.json(content_type=None) if text else None
            return response.status, body, response.headers

    async def create(self, **fields: Any) -> dict[str, Any]:
        status, body, _ = await self.call("POST", TABLE, json=fields)
        assert status == 201, body
        return body["result"]


StartServiceNow = Callable[..., Awaitable[RunningServiceNow]]


@pytest.fixture
async def start_servicenow() -> AsyncIterator[StartServiceNow]:
    """Start simulators with custom options; all stop when the test ends."""
    async with AsyncExitStack() as stack:

        async def start(**options: Any) -> RunningServiceNow:
            sim = ServiceNowSimulator(**options)
            url = await stack.enter_async_context(run_simulator(sim))
            auth = aiohttp.BasicAuth(SERVICE_USER, SERVICE_PASSWORD)
            session = await stack.enter_async_context(aiohttp.ClientSession(auth=auth))
            return RunningServiceNow(sim, url, session)

        yield start


@pytest.fixture
async def sn(start_servicenow: StartServiceNow) -> RunningServiceNow:
    """A simulator with the default ticket table `incident`."""
    return await start_servicenow()


async def plain_call(url: str, method: str = "GET", **options: Any) -> tuple[int, Any, Any]:
    """Send a request without the service user's credentials."""
    async with aiohttp.ClientSession() as session, session.request(method, url, **options) as response:
        return response.status, await response.json(content_type=None), response.headers


# Authentication


async def test_basic_auth_accepted(sn: RunningServiceNow) -> None:
    """The service user's Basic credentials read the incident table."""
    status, body, _ = await sn.call("GET", TABLE)

    assert status == 200
    assert body == {"result": []}


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": aiohttp.BasicAuth(SERVICE_USER, "wrong").encode()}, {"Authorization": "Bearer unknown-token"}],
    ids=["none", "wrong-password", "unknown-token"],
)
async def test_bad_credentials_401(sn: RunningServiceNow, headers: dict[str, str]) -> None:
    """Missing or wrong credentials get 401 with ServiceNow's error body."""
    status, body, _ = await plain_call(sn.url + TABLE, headers=headers)

    assert status == 401
    assert body == UNAUTHENTICATED


async def test_oauth_client_credentials(sn: RunningServiceNow) -> None:
    """oauth_token.do grants a Bearer token that acts as the service user until it expires on the simulator clock."""
    form = {"grant_type": "client_credentials", "client_id": OAUTH_CLIENT_ID, "client_secret": OAUTH_CLIENT_SECRET}
    status, token, _ = await plain_call(sn.url + "/oauth_token.do", "POST", data=form)
    assert status == 200
    assert token["token_type"] == "Bearer"
    assert token["expires_in"] == 1799
    assert token["scope"] == "useraccount"

    bearer = {"Authorization": f"Bearer {token['access_token']}"}
    status, created, _ = await plain_call(sn.url + TABLE, "POST", json={"short_description": "via OAuth"}, headers=bearer)
    assert status == 201
    assert created["result"]["sys_created_by"] == SERVICE_USER
    assert created["result"]["opened_by"]["value"] == sn.sim.service.sys_id

    # The simulator clock also follows real time, so the margin absorbs a slow machine.
    sn.sim.advance(1769)
    still, _, _ = await plain_call(sn.url + TABLE, headers=bearer)
    sn.sim.advance(31)
    expired, body, _ = await plain_call(sn.url + TABLE, headers=bearer)
    assert still == 200
    assert expired == 401
    assert body == UNAUTHENTICATED


async def test_oauth_client_in_basic_header(sn: RunningServiceNow) -> None:
    """The client may also authenticate to oauth_token.do with Basic credentials, as OAuth 2.0 allows."""
    auth = aiohttp.BasicAuth(OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET)
    status, token, _ = await plain_call(sn.url + "/oauth_token.do", "POST", data={"grant_type": "client_credentials"}, auth=auth)

    assert status == 200
    assert token["access_token"]


@pytest.mark.parametrize(
    ("form", "status", "body"),
    [
        (
            {"grant_type": "client_credentials", "client_id": OAUTH_CLIENT_ID, "client_secret": "wrong"},
            401,
            {"error_description": "access_denied", "error": "server_error"},
        ),
        ({"grant_type": "password", "client_id": OAUTH_CLIENT_ID, "client_secret": OAUTH_CLIENT_SECRET}, 400, None),
    ],
    ids=["wrong-secret", "unsupported-grant"],
)
async def test_oauth_rejections(sn: RunningServiceNow, form: dict[str, str], status: int, body: Any) -> None:
    """A wrong client secret gets 401 and a grant other than client_credentials gets 400."""
    got_status, got_body, _ = await plain_call(sn.url + "/oauth_token.do", "POST", data=form)

    assert got_status == status
    if body is not None:
        assert got_body == body
    else:
        assert got_body["error"] == "unsupported_grant_type"


async def test_human_user_signs_in(sn: RunningServiceNow) -> None:
    """The human user has Basic credentials too, and reads rows hidden from the service user."""
    incident = sn.sim.create_incident({"short_description": "hidden"}, hidden=True)
    auth = aiohttp.BasicAuth(HUMAN_USER, HUMAN_PASSWORD)

    status, body, _ = await plain_call(f"{sn.url}{TABLE}/{incident['sys_id']}", auth=auth)

    assert status == 200
    assert body["result"]["number"] == incident["number"]


# Table API basics


@pytest.mark.parametrize(
    ("prefix", "status", "body"),
    [
        ("/api/now/table", 200, {"result": []}),
        ("/api/now/v2/table", 200, {"result": []}),
        (
            "/api/now/v1/table",
            404,
            {
                "error": {
                    "message": "No Record found",
                    "detail": "Records matching query not found. Check query parameter or offset parameter",
                },
                "status": "failure",
            },
        ),
    ],
    ids=["unversioned", "v2", "v1"],
)
async def test_empty_result_by_version(sn: RunningServiceNow, prefix: str, status: int, body: Any) -> None:
    """An empty list read is 404 with an error body on v1 and 200 with [] on v2 and unversioned."""
    await sn.create(short_description="exists")

    got_status, got_body, _ = await sn.call("GET", f"{prefix}/incident", params={"sysparm_query": "number=INC9999999"})

    assert got_status == status
    assert got_body == body


async def test_unknown_table_and_path(sn: RunningServiceNow) -> None:
    """An unknown table gets 400 `Invalid table`, and a path outside the API gets 400 as on an instance."""
    table_status, table_body, _ = await sn.call("GET", "/api/now/table/u_nothing")
    path_status, path_body, _ = await sn.call("GET", "/api/now/v3/table/incident")

    assert table_status == 400
    assert table_body["error"]["message"] == "Invalid table u_nothing"
    assert path_status == 400
    assert path_body["error"]["message"] == "Requested URI does not represent any resource"


async def test_create_incident(sn: RunningServiceNow) -> None:
    """POST creates an incident with a sys_id, the next number, defaults and system fields, and returns 201 with Location."""
    status, body, headers = await sn.call(
        "POST", TABLE, json={"short_description": "Suspicious logon", "correlation_id": "MDR-1", "u_unknown": "ignored"}
    )
    record = body["result"]
    first_number = record["number"]
    second = await sn.create(short_description="Second")

    assert status == 201
    assert SYS_ID.fullmatch(record["sys_id"])
    assert headers["Location"] == f"{sn.url}{TABLE}/{record['sys_id']}"
    assert first_number == "INC0010001"
    assert second["number"] == "INC0010002"
    assert (record["state"], record["impact"], record["urgency"], record["priority"]) == ("1", "3", "3", "5")
    assert record["correlation_id"] == "MDR-1"
    assert "u_unknown" not in record
    assert record["sys_created_by"] == SERVICE_USER
    assert record["sys_updated_by"] == SERVICE_USER
    assert record["sys_mod_count"] == "0"
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}", record["sys_updated_on"])
    assert record["sys_updated_on"] <= format_time(sn.sim.now())
    assert record["opened_by"] == {"link": f"{sn.url}/api/now/table/sys_user/{sn.sim.service.sys_id}", "value": sn.sim.service.sys_id}
    assert record["work_notes"] == ""
    assert record["comments"] == ""


async def test_create_without_response_body(sn: RunningServiceNow) -> None:
    """`X-no-response-body: true` on POST still creates the record and returns 201 without a body."""
    status, body, headers = await sn.call("POST", TABLE, json={"short_description": "quiet"}, headers={"X-no-response-body": "true"})

    assert status == 201
    assert body is None
    assert headers["Location"].startswith(f"{sn.url}{TABLE}/")
    assert len(sn.sim.incidents) == 1


@pytest.mark.parametrize(
    ("impact", "urgency", "priority"),
    [("1", "1", "1"), ("1", "2", "2"), ("1", "3", "3"), ("2", "1", "2"), ("2", "2", "3"), ("2", "3", "4"), ("3", "1", "3"), ("3", "2", "4"), ("3", "3", "5")],
)
async def test_priority_lookup(sn: RunningServiceNow, impact: str, urgency: str, priority: str) -> None:
    """Priority follows the base lookup from impact and urgency, and a written priority is ignored."""
    record = await sn.create(short_description="p", impact=impact, urgency=int(urgency), priority="1")

    assert record["priority"] == priority


async def test_correlation_id_truncated(sn: RunningServiceNow) -> None:
    """A correlation_id longer than its 100 characters is cut without an error, as an instance does."""
    record = await sn.create(short_description="long id", correlation_id="x" * 150, correlation_display="y" * 101)

    assert record["correlation_id"] == "x" * 100
    assert record["correlation_display"] == "y" * 100


@pytest.mark.parametrize("field", ["state", "impact", "urgency", "hold_reason", "close_code"])
async def test_invalid_choice_rejected(sn: RunningServiceNow, field: str) -> None:
    """A value outside a field's choice list gets 400 naming the field."""
    status, body, _ = await sn.call("POST", TABLE, json={"short_description": "bad", field: "Bogus"})

    assert status == 400
    assert body["error"]["detail"].startswith(f"{field}: ")
    assert sn.sim.incidents == {}


async def test_input_display_value(sn: RunningServiceNow) -> None:
    """With sysparm_input_display_value=true a choice may be written by its label."""
    status, body, _ = await sn.call(
        "POST", TABLE, params={"sysparm_input_display_value": "true"}, json={"short_description": "labels", "impact": "1 - High", "state": "In Progress"}
    )

    assert status == 201
    assert body["result"]["impact"] == "1"
    assert body["result"]["state"] == "2"


async def test_get_update_delete(sn: RunningServiceNow) -> None:
    """GET by sys_id reads a record, PATCH and PUT change it, and DELETE removes it with 204."""
    record = await sn.create(short_description="before")
    path = f"{TABLE}/{record['sys_id']}"

    got = await sn.call("GET", path)
    patched = await sn.call("PATCH", path, json={"short_description": "after"})
    put = await sn.call("PUT", path, json={"description": "details"})
    deleted = await sn.call("DELETE", path)
    after_delete = await sn.call("GET", path)

    assert got[0] == 200
    assert got[1]["result"]["short_description"] == "before"
    assert patched[0] == 200
    assert patched[1]["result"]["short_description"] == "after"
    assert patched[1]["result"]["sys_mod_count"] == "1"
    assert put[1]["result"]["description"] == "details"
    assert put[1]["result"]["sys_mod_count"] == "2"
    assert deleted[0] == 204
    assert after_delete[0] == 404
    assert after_delete[1]["error"] == {"message": "No Record found", "detail": "Record doesn't exist or ACL restricts the record retrieval"}


async def test_patch_without_response_body(sn: RunningServiceNow) -> None:
    """`X-no-response-body: true` on PATCH applies the change and returns 204."""
    record = await sn.create(short_description="before")

    status, body, _ = await sn.call("PATCH", f"{TABLE}/{record['sys_id']}", json={"short_description": "after"}, headers={"X-no-response-body": "true"})

    assert status == 204
    assert body is None
    assert sn.sim.incidents[record["sys_id"]]["short_description"] == "after"


async def test_unchanged_patch_keeps_mod_count(sn: RunningServiceNow) -> None:
    """A PATCH that changes nothing leaves sys_mod_count and sys_updated_on as they were."""
    record = await sn.create(short_description="same")
    sn.sim.advance(5)

    _, body, _ = await sn.call("PATCH", f"{TABLE}/{record['sys_id']}", json={"short_description": "same"})

    assert body["result"]["sys_mod_count"] == "0"
    assert body["result"]["sys_updated_on"] == record["sys_updated_on"]


# Journal


async def test_journal_write_appends_entry(sn: RunningServiceNow) -> None:
    """A work note or comment in a PATCH adds a sys_journal_field row and moves sys_updated_on and sys_mod_count."""
    record = await sn.create(short_description="notes")
    sn.sim.advance(3)

    _, patched, _ = await sn.call("PATCH", f"{TABLE}/{record['sys_id']}", json={"work_notes": "[mdr:1] isolated", "comments": "We are on it"})
    _, got, _ = await sn.call("GET", f"{TABLE}/{record['sys_id']}")
    query = f"element_id={record['sys_id']}^elementINwork_notes,comments^ORDERBYsys_created_on"
    _, journal, _ = await sn.call("GET", "/api/now/table/sys_journal_field", params={"sysparm_query": query})

    assert patched["result"]["sys_mod_count"] == "1"
    assert patched["result"]["sys_updated_on"] > record["sys_updated_on"]
    assert got["result"]["work_notes"] == ""
    assert got["result"]["comments"] == ""
    entries = journal["result"]
    assert [entry["element"] for entry in entries] == ["work_notes", "comments"]
    assert entries[0]["value"] == "[mdr:1] isolated"
    assert entries[0]["element_id"] == record["sys_id"]
    assert entries[0]["name"] == "incident"
    assert entries[0]["sys_created_by"] == SERVICE_USER
    assert entries[0]["sys_created_on"] == patched["result"]["sys_updated_on"]
    assert SYS_ID.fullmatch(entries[0]["sys_id"])


async def test_journal_retry_adds_second_entry(sn: RunningServiceNow) -> None:
    """A repeated journal PATCH is not idempotent: each one adds an entry."""
    record = await sn.create(short_description="twice")

    for _ in range(2):
        await sn.call("PATCH", f"{TABLE}/{record['sys_id']}", json={"work_notes": "same text"})

    assert [entry["value"] for entry in sn.sim.journal] == ["same text", "same text"]
    assert sn.sim.incidents[record["sys_id"]]["sys_mod_count"] == "2"


@pytest.mark.parametrize(
    ("method", "suffix"),
    [("POST", ""), ("PATCH", "/{entry}"), ("PUT", "/{entry}"), ("DELETE", "/{entry}")],
)
async def test_journal_immutable(sn: RunningServiceNow, method: str, suffix: str) -> None:
    """sys_journal_field rows cannot be created, changed or deleted through the Table API: 403 as under an ACL."""
    record = await sn.create(short_description="notes", work_notes="original")
    entry = sn.sim.journal[0]["sys_id"]

    status, body, _ = await sn.call(method, "/api/now/table/sys_journal_field" + suffix.format(entry=entry), json={"value": "changed"})

    assert status == 403
    assert body["error"]["message"] == "Operation Failed"
    assert [row["value"] for row in sn.sim.journal] == ["original"]


async def test_journal_read_denied(sn: RunningServiceNow) -> None:
    """With journal_read_denied the service user reads 200 and no rows, writes still add entries, and the human still reads them."""
    record = await sn.create(short_description="acl")
    await sn.call("PUT", "/_sim/settings", json={"journal_read_denied": True})

    status, patched, _ = await sn.call("PATCH", f"{TABLE}/{record['sys_id']}", json={"work_notes": "written"})
    read_status, read, headers = await sn.call("GET", "/api/now/table/sys_journal_field", params={"sysparm_query": f"element_id={record['sys_id']}"})
    _, human, _ = await plain_call(sn.url + "/api/now/table/sys_journal_field", auth=aiohttp.BasicAuth(HUMAN_USER, HUMAN_PASSWORD))
    _, display, _ = await sn.call("GET", f"{TABLE}/{record['sys_id']}", params={"sysparm_display_value": "true", "sysparm_fields": "work_notes"})

    assert status == 200
    assert patched["result"]["sys_mod_count"] == "1"
    assert read_status == 200
    assert read == {"result": []}
    assert headers["X-Total-Count"] == "0"
    assert [entry["value"] for entry in sn.sim.journal] == ["written"]
    assert [entry["value"] for entry in human["result"]] == ["written"]
    assert display["result"]["work_notes"].endswith("MDR Connector (Work notes)\nwritten\n\n")


async def test_journal_display_value_newest_first(sn: RunningServiceNow) -> None:
    """With sysparm_display_value=true a journal field reads as its entries, newest first, with time, author and label."""
    record = sn.sim.create_incident({"short_description": "blob"})
    sn.sim.add_human_comment(record["number"], "first")
    sn.sim.advance(61)
    sn.sim.add_human_comment(record["number"], "second")

    _, body, _ = await sn.call("GET", f"{TABLE}/{record['sys_id']}", params={"sysparm_display_value": "true", "sysparm_fields": "comments"})

    text = body["result"]["comments"]
    assert text.index("second") < text.index("first")
    assert re.fullmatch(r"(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} - SOC Analyst \(Additional comments\)\n\w+\n\n){2}", text)


# Display values and references


async def test_display_values(sn: RunningServiceNow) -> None:
    """sysparm_display_value=true gives labels and dates in the user's zone, and `all` gives both values."""
    record = sn.sim.create_incident({"short_description": "labels", "impact": 1, "urgency": 1, "assignment_group": "SOC"}, created_on="2026-01-01 10:00:00")
    await sn.call("PUT", f"/_sim/users/{SERVICE_USER}", json={"time_zone": "Asia/Tokyo"})
    path = f"{TABLE}/{record['sys_id']}"
    fields = "state,impact,urgency,priority,sys_updated_on,assignment_group"

    _, displayed, _ = await sn.call("GET", path, params={"sysparm_display_value": "true", "sysparm_fields": fields})
    _, both, _ = await sn.call("GET", path, params={"sysparm_display_value": "all", "sysparm_fields": fields})

    result = displayed["result"]
    assert (result["state"], result["impact"], result["urgency"], result["priority"]) == ("New", "1 - High", "1 - High", "1 - Critical")
    assert result["sys_updated_on"] == "2026-01-01 19:00:00"
    assert result["assignment_group"]["display_value"] == "SOC"
    assert both["result"]["state"] == {"display_value": "New", "value": "1"}
    assert both["result"]["sys_updated_on"] == {"display_value": "2026-01-01 19:00:00", "value": "2026-01-01 10:00:00"}
    assert set(both["result"]["assignment_group"]) == {"display_value", "link", "value"}


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, "link-and-value"),
        ({"sysparm_exclude_reference_link": "true"}, "sys_id"),
        ({"sysparm_exclude_reference_link": "true", "sysparm_display_value": "true"}, "name"),
    ],
    ids=["default", "exclude-links", "exclude-links-display"],
)
async def test_reference_rendering(sn: RunningServiceNow, params: dict[str, str], expected: str) -> None:
    """A reference is {"link", "value"} by default and a plain sys_id or name with sysparm_exclude_reference_link=true."""
    soc = next(sys_id for sys_id, row in sn.sim.tables["sys_user_group"].rows.items() if row["name"] == "SOC")
    record = await sn.create(short_description="ref", assignment_group=soc)

    _, body, _ = await sn.call("GET", f"{TABLE}/{record['sys_id']}", params={**params, "sysparm_fields": "assignment_group"})

    value = body["result"]["assignment_group"]
    expected_value = {
        "link-and-value": {"link": f"{sn.url}/api/now/table/sys_user_group/{soc}", "value": soc},
        "sys_id": soc,
        "name": "SOC",
    }[expected]
    assert value == expected_value


async def test_reference_by_name_or_unknown(sn: RunningServiceNow) -> None:
    """assignment_group takes a group name or sys_id, an empty string clears it, and an unknown name gets 400."""
    record = await sn.create(short_description="ref", assignment_group="SOC Tier 2")
    path = f"{TABLE}/{record['sys_id']}"

    cleared = await sn.call("PATCH", path, json={"assignment_group": ""}, params={"sysparm_fields": "assignment_group"})
    unknown = await sn.call("PATCH", path, json={"assignment_group": "No such group"})

    assert record["assignment_group"]["value"] == sn.sim.tables["sys_user_group"].rows[record["assignment_group"]["value"]]["sys_id"]
    assert sn.sim.tables["sys_user_group"].rows[record["assignment_group"]["value"]]["name"] == "SOC Tier 2"
    assert cleared[1]["result"] == {"assignment_group": ""}
    assert unknown[0] == 400


async def test_fields_unknown_dropped(sn: RunningServiceNow) -> None:
    """sysparm_fields returns only the named fields and silently leaves out unknown names."""
    await sn.create(short_description="fields")

    _, body, _ = await sn.call("GET", TABLE, params={"sysparm_fields": "number, state,no_such_field"})

    assert body["result"] == [{"number": "INC0010001", "state": "1"}]


# Reference tables


async def test_sys_user_lookup(sn: RunningServiceNow) -> None:
    """sys_user answers a query by user_name and one by sys_id."""
    _, by_name, _ = await sn.call("GET", "/api/now/table/sys_user", params={"sysparm_query": f"user_name={SERVICE_USER}"})
    user = by_name["result"][0]
    _, by_id, _ = await sn.call("GET", "/api/now/table/sys_user", params={"sysparm_query": f"sys_id={user['sys_id']}"})

    assert len(by_name["result"]) == 1
    assert user["name"] == "MDR Connector"
    assert user["time_zone"] == "UTC"
    assert by_id["result"] == [user]


async def test_group_membership(sn: RunningServiceNow) -> None:
    """sys_user_grmember answers user=<sys_id> with the group's name by dot-walk or by display value."""
    human = sn.sim.human.sys_id
    query = {"sysparm_query": f"user={human}^ORDERBYgroup.name"}

    _, walked, _ = await sn.call("GET", "/api/now/table/sys_user_grmember", params={**query, "sysparm_fields": "group.name"})
    _, displayed, _ = await sn.call(
        "GET", "/api/now/table/sys_user_grmember", params={**query, "sysparm_fields": "group", "sysparm_display_value": "true", "sysparm_exclude_reference_link": "true"}
    )

    assert walked["result"] == [{"group.name": "SOC"}, {"group.name": "SOC Tier 2"}]
    assert displayed["result"] == [{"group": "SOC"}, {"group": "SOC Tier 2"}]


@pytest.mark.parametrize(
    ("element", "pairs"),
    [
        ("state", [("1", "New"), ("2", "In Progress"), ("3", "On Hold"), ("6", "Resolved"), ("7", "Closed"), ("8", "Canceled")]),
        ("impact", [("1", "1 - High"), ("2", "2 - Medium"), ("3", "3 - Low")]),
        ("urgency", [("1", "1 - High"), ("2", "2 - Medium"), ("3", "3 - Low")]),
    ],
)
async def test_sys_choice_lists(sn: RunningServiceNow, element: str, pairs: list[tuple[str, str]]) -> None:
    """sys_choice lists the values and labels of the incident's choice fields."""
    query = f"name=incident^element={element}^ORDERBYsequence"

    _, body, _ = await sn.call("GET", "/api/now/table/sys_choice", params={"sysparm_query": query, "sysparm_fields": "value,label"})

    assert [(row["value"], row["label"]) for row in body["result"]] == pairs


async def test_sys_choice_close_codes(sn: RunningServiceNow) -> None:
    """The close_code choices include the value the connector's config uses by default."""
    _, body, _ = await sn.call("GET", "/api/now/table/sys_choice", params={"sysparm_query": "name=incident^element=close_code"})

    assert "Solution provided" in [row["value"] for row in body["result"]]


async def test_custom_table_name(start_servicenow: StartServiceNow) -> None:
    """A simulator built with another ticket table serves it, and its sys_choice rows carry that name."""
    custom = await start_servicenow(table="x_mdr_incident")

    created = await custom.call("POST", "/api/now/table/x_mdr_incident", json={"short_description": "custom"})
    default = await custom.call("GET", TABLE)
    _, choices, _ = await custom.call("GET", "/api/now/table/sys_choice", params={"sysparm_query": "name=x_mdr_incident^element=state"})

    assert created[0] == 201
    assert created[1]["result"]["sys_class_name"] == "x_mdr_incident"
    assert default[0] == 400
    assert len(choices["result"]) == 6


# Encoded queries


@pytest.fixture
async def three_incidents(sn: RunningServiceNow) -> RunningServiceNow:
    """Incidents INC0010001..3 with impacts 1, 2 and 3, the second one without a correlation_id."""
    for impact, correlation in ((1, "MDR-alpha"), (2, ""), (3, "MDR-gamma")):
        await sn.create(short_description=f"Incident impact {impact}", impact=impact, correlation_id=correlation)
    return sn


@pytest.mark.parametrize(
    ("query", "numbers"),
    [
        ("impact=2", [2]),
        ("impact!=2", [1, 3]),
        ("impact>1", [2, 3]),
        ("impact>=2", [2, 3]),
        ("impact<2", [1]),
        ("impact<=2", [1, 2]),
        ("impactIN1,3", [1, 3]),
        ("correlation_idNOT INMDR-alpha", [3]),
        ("correlation_idLIKEgam", [3]),
        ("correlation_idNOT LIKEgam", [1]),
        ("correlation_idSTARTSWITHMDR-", [1, 3]),
        ("correlation_idENDSWITHalpha", [1]),
        ("correlation_idISEMPTY", [2]),
        ("correlation_idISNOTEMPTY", [1, 3]),
        ("impact=1^ORimpact=3", [1, 3]),
        ("impact=1^ORimpact=3^correlation_idLIKEgam", [3]),
        ("impact=1^NQimpact=2", [1, 2]),
        ("correlation_id!=MDR-alpha", [3]),
        ("ORDERBYDESCimpact", [3, 2, 1]),
        ("impact>=1^ORDERBYDESCnumber", [3, 2, 1]),
        ("number=inc0010001", []),
        ("correlation_id=mdr-alpha", []),
        ("", [1, 2, 3]),
        ("impact=2^EQ", [2]),
    ],
)
async def test_query_operators(three_incidents: RunningServiceNow, query: str, numbers: list[int]) -> None:
    """Each supported operator, AND, OR, NQ and ORDERBY selects the expected incidents; names and values are case-sensitive."""
    _, body, _ = await three_incidents.call("GET", TABLE, params={"sysparm_query": query, "sysparm_fields": "number"})

    assert [int(row["number"][-1]) for row in body["result"]] == numbers


@pytest.mark.parametrize(
    ("query", "numbers"),
    [
        ("correlaton_id=MDR-alpha", [1, 2, 3]),
        ("impact=3^no_such_field=1", [3]),
        ("no_such_field=1^ORimpact=2", [2]),
        ("impact>=2^no_such=1^ORimpact=3", [3]),
        ("impact=1^NQbogus=2", [1, 2, 3]),
        ("ORDERBYDESCbogus^ORDERBYDESCimpact", [3, 2, 1]),
    ],
    ids=["typo-widens", "and-dropped", "or-kept", "or-after-dropped", "nq-group-all", "orderby-dropped"],
)
async def test_query_invalid_field_ignored(three_incidents: RunningServiceNow, query: str, numbers: list[int]) -> None:
    """A condition on an unknown field is dropped and the rest of the query runs, which can widen the result."""
    _, body, _ = await three_incidents.call("GET", TABLE, params={"sysparm_query": query, "sysparm_fields": "number"})

    assert [int(row["number"][-1]) for row in body["result"]] == numbers


def test_query_parser_groups() -> None:
    """The parser nests OR inside AND inside NQ groups and records dropped terms."""
    parsed = simulator_query.parse("a=1^ORb=2^c>3^NQd=4^ORDERBYa^ORDERBYDESCb^zz=1", lambda name: name in "abcd")

    condition = simulator_query.Condition
    assert parsed.groups == [
        [[condition("a", "=", "1"), condition("b", "=", "2")], [condition("c", ">", "3")]],
        [[condition("d", "=", "4")]],
    ]
    assert parsed.order == [("a", False), ("b", True)]
    assert parsed.ignored == ["zz=1"]


async def test_query_dates_as_utc(sn: RunningServiceNow) -> None:
    """A plain date in a query is UTC, and gs.dateGenerate is read in the user's time zone."""
    sn.sim.create_incident({"short_description": "old"}, created_on="2026-01-01 10:00:00")
    sn.sim.create_incident({"short_description": "new"}, created_on="2026-01-01 12:00:00")
    await sn.call("PUT", f"/_sim/users/{SERVICE_USER}", json={"time_zone": "Europe/Moscow"})

    _, plain, _ = await sn.call("GET", TABLE, params={"sysparm_query": "sys_updated_on>=2026-01-01 11:00:00", "sysparm_fields": "short_description"})
    generated = "sys_updated_on>=javascript:gs.dateGenerate('2026-01-01','14:00:00')"
    _, local, _ = await sn.call("GET", TABLE, params={"sysparm_query": generated, "sysparm_fields": "short_description"})

    assert plain["result"] == [{"short_description": "new"}]
    assert local["result"] == [{"short_description": "new"}]


# Paging


async def test_limit_offset_headers(sn: RunningServiceNow) -> None:
    """sysparm_limit and sysparm_offset page the rows, with X-Total-Count and Link first, prev, next and last."""
    for index in range(5):
        await sn.create(short_description=f"row {index}")

    _, body, headers = await sn.call("GET", TABLE, params={"sysparm_limit": "2", "sysparm_offset": "2", "sysparm_fields": "number", "sysparm_query": "ORDERBYnumber"})

    assert [row["number"] for row in body["result"]] == ["INC0010003", "INC0010004"]
    assert headers["X-Total-Count"] == "5"
    links = dict((rel, url) for url, rel in re.findall(r'<([^>]+)>;rel="(\w+)"', headers["Link"]))
    assert set(links) == {"first", "prev", "next", "last"}
    assert "sysparm_offset=0" in links["first"]
    assert "sysparm_offset=0" in links["prev"]
    assert "sysparm_offset=4" in links["next"]
    assert "sysparm_offset=4" in links["last"]
    assert "sysparm_query=ORDERBYnumber" in links["next"]
    assert links["next"].startswith(sn.url + TABLE)


async def test_no_count_and_suppressed_links(sn: RunningServiceNow) -> None:
    """sysparm_no_count drops X-Total-Count, and sysparm_suppress_pagination_header drops Link."""
    await sn.create(short_description="one")

    _, _, no_count = await sn.call("GET", TABLE, params={"sysparm_no_count": "true"})
    _, _, no_links = await sn.call("GET", TABLE, params={"sysparm_suppress_pagination_header": "true"})

    assert "X-Total-Count" not in no_count
    assert 'rel="last"' not in no_count["Link"]
    assert "Link" not in no_links
    assert no_links["X-Total-Count"] == "1"


async def test_default_limit_10000(sn: RunningServiceNow) -> None:
    """Without sysparm_limit a read returns up to 10000 rows, as the Link header's limit shows."""
    await sn.create(short_description="one")

    _, _, headers = await sn.call("GET", TABLE)

    assert "sysparm_limit=10000" in headers["Link"]


async def test_keyset_paging_same_second(sn: RunningServiceNow) -> None:
    """Keyset paging on (sys_updated_on, sys_id) reads every row once when many rows share one second."""
    for _ in range(7):
        sn.sim.create_incident({"short_description": "burst"}, created_on="2026-03-01 09:00:00")
    for _ in range(3):
        sn.sim.create_incident({"short_description": "later"}, created_on="2026-03-01 09:00:01")
    order = "^ORDERBYsys_updated_on^ORDERBYsys_id"

    seen: list[str] = []
    query = "sys_updated_on>=2026-03-01 09:00:00" + order
    while True:
        _, body, _ = await sn.call("GET", TABLE, params={"sysparm_query": query, "sysparm_limit": "3", "sysparm_fields": "sys_id,sys_updated_on"})
        page = body["result"]
        if not page:
            break
        seen.extend(row["sys_id"] for row in page)
        last = page[-1]
        moment = last["sys_updated_on"]
        query = f"sys_updated_on>{moment}^NQsys_updated_on={moment}^sys_id>{last['sys_id']}{order}"

    assert len(seen) == 10
    assert sorted(seen) == sorted(sn.sim.incidents)


async def test_short_pages_hide_rows_after_limit(sn: RunningServiceNow) -> None:
    """With short_pages, the limit applies before the read ACL: pages come back short or empty while Link shows that more follow."""
    for index in range(6):
        sn.sim.create_incident({"short_description": f"row {index}"}, hidden=index < 3)
    await sn.call("PUT", "/_sim/settings", json={"short_pages": True})

    params = {"sysparm_limit": "3", "sysparm_query": "ORDERBYnumber", "sysparm_fields": "number"}
    _, first, first_headers = await sn.call("GET", TABLE, params={**params, "sysparm_offset": "0"})
    _, second, second_headers = await sn.call("GET", TABLE, params={**params, "sysparm_offset": "3"})

    assert first["result"] == []
    assert first_headers["X-Total-Count"] == "6"
    assert 'rel="next"' in first_headers["Link"]
    assert [row["number"] for row in second["result"]] == ["INC0010004", "INC0010005", "INC0010006"]
    assert 'rel="next"' not in second_headers["Link"]


async def test_full_pages_without_switch(sn: RunningServiceNow) -> None:
    """Without short_pages, hidden rows are removed before paging, so pages are full and the count excludes them."""
    for index in range(6):
        sn.sim.create_incident({"short_description": f"row {index}"}, hidden=index < 3)

    _, body, headers = await sn.call("GET", TABLE, params={"sysparm_limit": "3", "sysparm_query": "ORDERBYnumber", "sysparm_fields": "number"})

    assert [row["number"] for row in body["result"]] == ["INC0010004", "INC0010005", "INC0010006"]
    assert headers["X-Total-Count"] == "3"


async def test_hidden_record_404(sn: RunningServiceNow) -> None:
    """A row hidden by the read ACL is 404 by sys_id, like a missing one, and cannot be changed."""
    record = sn.sim.create_incident({"short_description": "secret"}, hidden=True)

    got = await sn.call("GET", f"{TABLE}/{record['sys_id']}")
    patched = await sn.call("PATCH", f"{TABLE}/{record['sys_id']}", json={"short_description": "x"})

    assert got[0] == 404
    assert patched[0] == 404


# State rules


async def test_on_hold_needs_reason(sn: RunningServiceNow) -> None:
    """On Hold without hold_reason is rejected by the data policy, with one it works, and leaving On Hold clears it."""
    record = await sn.create(short_description="hold")
    path = f"{TABLE}/{record['sys_id']}"

    rejected = await sn.call("PATCH", path, json={"state": "3"})
    on_hold = await sn.call("PATCH", path, json={"state": "3", "hold_reason": "4"})
    resumed = await sn.call("PATCH", path, json={"state": "2"})

    assert rejected[0] == 403
    assert rejected[1]["error"]["message"] == "Operation Failed"
    assert "Data Policy Exception" in rejected[1]["error"]["detail"]
    assert "On hold reason" in rejected[1]["error"]["detail"]
    assert on_hold[0] == 200
    assert on_hold[1]["result"]["hold_reason"] == "4"
    assert resumed[1]["result"]["hold_reason"] == ""


async def test_resolve_needs_close_fields(sn: RunningServiceNow) -> None:
    """Resolved needs close_code and close_notes while enforce_close_fields is on, and not after it is turned off."""
    record = await sn.create(short_description="resolve")
    path = f"{TABLE}/{record['sys_id']}"

    rejected = await sn.call("PATCH", path, json={"state": "6", "close_code": "Solution provided"})
    resolved = await sn.call("PATCH", path, json={"state": "6", "close_code": "Solution provided", "close_notes": "Fixed in MDR."})
    other = await sn.create(short_description="lenient")
    await sn.call("PUT", "/_sim/settings", json={"enforce_close_fields": False})
    lenient = await sn.call("PATCH", f"{TABLE}/{other['sys_id']}", json={"state": "6"})

    assert rejected[0] == 403
    assert "Resolution notes" in rejected[1]["error"]["detail"]
    assert "Resolution code" not in rejected[1]["error"]["detail"]
    assert resolved[0] == 200
    assert resolved[1]["result"]["state"] == "6"
    assert lenient[0] == 200


async def test_close_needs_role(sn: RunningServiceNow) -> None:
    """Closed needs itil_admin or admin: the service user gets 403 until the role is granted, and a closed record is read only to it."""
    record = await sn.create(short_description="close", close_code="Duplicate", close_notes="Dup.")
    path = f"{TABLE}/{record['sys_id']}"

    rejected = await sn.call("PATCH", path, json={"state": "7"})
    await sn.call("PUT", f"/_sim/users/{SERVICE_USER}", json={"roles": ["itil", "itil_admin"]})
    closed = await sn.call("PATCH", path, json={"state": "7"})
    await sn.call("PUT", f"/_sim/users/{SERVICE_USER}", json={"roles": ["itil"]})
    locked = await sn.call("PATCH", path, json={"comments": "after close"})

    assert rejected[0] == 403
    assert rejected[1]["error"]["detail"] == "ACL Exception Update Failed due to security constraints"
    assert closed[0] == 200
    assert closed[1]["result"]["state"] == "7"
    assert locked[0] == 403
    assert sn.sim.journal == []


async def test_cancel_allowed(sn: RunningServiceNow) -> None:
    """Canceled needs no extra fields or roles."""
    record = await sn.create(short_description="cancel")

    status, body, _ = await sn.call("PATCH", f"{TABLE}/{record['sys_id']}", json={"state": 8})

    assert status == 200
    assert body["result"]["state"] == "8"


# Attachments


async def test_attachment_roundtrip_streamed(sn: RunningServiceNow) -> None:
    """A 3 MiB raw upload is stored on disk with its SHA-256 and read back whole, with X-Attachment-Metadata.

    The server's request size limit is 1 MiB, so the upload only works because the simulator streams it.
    """
    record = await sn.create(short_description="files")
    data = os.urandom(3 * 1024 * 1024 + 17)
    params = {"table_name": "incident", "table_sys_id": record["sys_id"], "file_name": "memory.dmp"}

    status, created, headers = await sn.call("POST", "/api/now/attachment/file", params=params, data=data, headers={"Content-Type": "application/vnd.tcpdump.pcap"})
    meta = created["result"]
    async with sn.session.get(meta["download_link"]) as response:
        downloaded = hashlib.sha256()
        async for chunk in response.content.iter_chunked(65536):
            downloaded.update(chunk)
        header = response.headers["X-Attachment-Metadata"]
        content_type = response.headers["Content-Type"]

    assert status == 201
    assert headers["Location"] == f"{sn.url}/api/now/attachment/{meta['sys_id']}"
    assert meta["size_bytes"] == str(len(data))
    assert meta["hash"] == hashlib.sha256(data).hexdigest()
    assert meta["table_name"] == "incident"
    assert meta["table_sys_id"] == record["sys_id"]
    assert meta["file_name"] == "memory.dmp"
    assert meta["sys_created_by"] == SERVICE_USER
    assert meta["sys_mod_count"] == "0"
    assert meta["download_link"] == f"{sn.url}/api/now/attachment/{meta['sys_id']}/file"
    assert downloaded.hexdigest() == meta["hash"]
    assert content_type == "application/vnd.tcpdump.pcap"
    assert '"file_name": "memory.dmp"' in header
    assert sn.sim.attachments[meta["sys_id"]].path.stat().st_size == len(data)


async def test_attachment_keeps_updated_on(sn: RunningServiceNow) -> None:
    """Adding an attachment does not move the incident's sys_updated_on or sys_mod_count."""
    record = await sn.create(short_description="files")
    sn.sim.advance(10)
    params = {"table_name": "incident", "table_sys_id": record["sys_id"], "file_name": "a.txt"}

    await sn.call("POST", "/api/now/attachment/file", params=params, data=b"abc", headers={"Content-Type": "text/plain"})

    assert sn.sim.incidents[record["sys_id"]]["sys_updated_on"] == record["sys_updated_on"]
    assert sn.sim.incidents[record["sys_id"]]["sys_mod_count"] == "0"


@pytest.mark.parametrize(
    ("params", "headers", "status"),
    [
        ({"table_name": "incident", "file_name": "a.txt"}, {"Content-Type": "text/plain"}, 400),
        ({"table_name": "incident", "table_sys_id": "{sys_id}", "file_name": "a.txt"}, {}, 400),
        ({"table_name": "incident", "table_sys_id": "0" * 32, "file_name": "a.txt"}, {"Content-Type": "text/plain"}, 404),
        ({"table_name": "u_nothing", "table_sys_id": "{sys_id}", "file_name": "a.txt"}, {"Content-Type": "text/plain"}, 400),
    ],
    ids=["missing-sys-id", "missing-content-type", "unknown-record", "unknown-table"],
)
async def test_attachment_upload_rejected(sn: RunningServiceNow, params: dict[str, str], headers: dict[str, str], status: int) -> None:
    """A raw upload without its parameters or Content-Type, or to a missing record, is rejected and stores nothing."""
    record = await sn.create(short_description="files")
    params = {name: value.format(sys_id=record["sys_id"]) for name, value in params.items()}

    got_status, body, _ = await sn.call(
        "POST", "/api/now/attachment/file", params=params, data=b"x" * 200_000, headers=headers, skip_auto_headers=["Content-Type"]
    )

    assert got_status == status
    assert body["status"] == "failure"
    assert sn.sim.attachments == {}


async def test_attachment_max_size(sn: RunningServiceNow) -> None:
    """An upload over attachment_max_bytes gets 400 and leaves no record or file; one at the limit is stored."""
    record = await sn.create(short_description="files")
    await sn.call("PUT", "/_sim/settings", json={"attachment_max_bytes": 1000})
    params = {"table_name": "incident", "table_sys_id": record["sys_id"], "file_name": "big.bin"}
    headers = {"Content-Type": "application/octet-stream"}

    over = await sn.call("POST", "/api/now/attachment/file", params=params, data=b"x" * 1001, headers=headers)
    files_after_over = sorted(sn.sim.files.folder.iterdir()) if sn.sim.files.folder else []
    at_limit = await sn.call("POST", "/api/now/attachment/file", params=params, data=b"x" * 1000, headers=headers)

    assert over[0] == 400
    assert over[1]["error"]["message"].startswith("Failed to create the attachment")
    assert files_after_over == []
    assert at_limit[0] == 201
    assert len(sn.sim.attachments) == 1


async def test_multipart_upload(sn: RunningServiceNow) -> None:
    """attachment/upload takes table_name and table_sys_id first and the file part last, with the part's Content-Type."""
    record = await sn.create(short_description="files")
    form = aiohttp.FormData()
    form.add_field("table_name", "incident")
    form.add_field("table_sys_id", record["sys_id"])
    form.add_field("uploadFile", b"rule,action\n42,deny\n", filename="firewall.csv", content_type="text/csv")

    status, body, headers = await sn.call("POST", "/api/now/attachment/upload", data=form)

    assert status == 201
    assert body["result"]["file_name"] == "firewall.csv"
    assert body["result"]["content_type"] == "text/csv"
    assert body["result"]["size_bytes"] == "20"
    assert headers["Location"].endswith(body["result"]["sys_id"])


async def test_multipart_file_not_last(sn: RunningServiceNow) -> None:
    """A multipart upload with a field after the file part, or without the fields before it, gets 400 and stores nothing."""
    record = await sn.create(short_description="files")
    after = aiohttp.FormData()
    after.add_field("table_name", "incident")
    after.add_field("table_sys_id", record["sys_id"])
    after.add_field("uploadFile", b"data", filename="a.txt", content_type="text/plain")
    after.add_field("extra", "late")
    first = aiohttp.FormData()
    first.add_field("uploadFile", b"data", filename="a.txt", content_type="text/plain")
    first.add_field("table_name", "incident")
    first.add_field("table_sys_id", record["sys_id"])

    late = await sn.call("POST", "/api/now/attachment/upload", data=after)
    early = await sn.call("POST", "/api/now/attachment/upload", data=first)

    assert late[0] == 400
    assert early[0] == 400
    assert sn.sim.attachments == {}


async def test_attachment_list_get_delete(sn: RunningServiceNow) -> None:
    """The attachment list filters by table_name and table_sys_id and pages; metadata and DELETE work by sys_id."""
    first = await sn.create(short_description="one")
    second = await sn.create(short_description="two")
    for index in range(3):
        sn.sim.add_attachment(first["number"], f"f{index}.txt", b"data")
    sn.sim.add_attachment(second["number"], "other.txt", b"data")

    query = f"table_name=incident^table_sys_id={first['sys_id']}^ORDERBYfile_name"
    _, listed, _ = await sn.call("GET", "/api/now/attachment", params={"sysparm_query": query})
    _, paged, _ = await sn.call("GET", "/api/now/attachment", params={"sysparm_query": query, "sysparm_limit": "1", "sysparm_offset": "1"})
    target = listed["result"][0]["sys_id"]
    _, meta, _ = await sn.call("GET", f"/api/now/attachment/{target}")
    deleted = await sn.call("DELETE", f"/api/now/attachment/{target}")
    again = await sn.call("GET", f"/api/now/attachment/{target}")

    assert [item["file_name"] for item in listed["result"]] == ["f0.txt", "f1.txt", "f2.txt"]
    assert [item["file_name"] for item in paged["result"]] == ["f1.txt"]
    assert meta["result"]["sys_created_by"] == HUMAN_USER
    assert deleted[0] == 204
    assert again[0] == 404
    assert len(sn.sim.attachments) == 3


async def test_attachment_folder_removed(start_servicenow: StartServiceNow) -> None:
    """The attachment folder is removed when the simulator stops."""
    sim = ServiceNowSimulator()
    async with run_simulator(sim):
        record = sim.create_incident({"short_description": "files"})
        sim.add_attachment(record["number"], "notes.txt", b"host isolated")
        folder = sim.files.folder
        assert folder is not None and any(folder.iterdir())

    assert not folder.exists()


# Faults


async def test_rate_limit_429(sn: RunningServiceNow) -> None:
    """The rate-limit switch rejects the next N calls with 429, Retry-After, X-RateLimit-* and the error body."""
    await sn.call("POST", "/_sim/rate-limit", json={"calls": 2, "retry_after_seconds": 30})

    first = await sn.call("GET", TABLE)
    second = await sn.call("GET", TABLE)
    third = await sn.call("GET", TABLE)

    status, body, headers = first
    assert status == 429
    assert body["error"]["message"] == "Rate limit exceeded"
    assert body["status"] == "failure"
    assert headers["Retry-After"] == "30"
    assert int(headers["X-RateLimit-Reset"]) >= int(sn.sim.now().timestamp()) + 29
    assert headers["X-RateLimit-Limit"].isdigit()
    assert SYS_ID.fullmatch(headers["X-RateLimit-Rule"])
    assert second[0] == 429
    assert third[0] == 200


async def test_drop_reply_after_commit(sn: RunningServiceNow) -> None:
    """A drop rule applies the create, then closes the connection, so the client sees no reply but the row exists."""
    await sn.call("POST", "/_sim/faults/drop-reply", json={"method": "POST", "path": "/api/now/table/{table}"})

    with pytest.raises(aiohttp.ClientError):
        await sn.call("POST", TABLE, json={"short_description": "lost reply", "correlation_id": "MDR-9"})
    status, body, _ = await sn.call("GET", TABLE, params={"sysparm_query": "correlation_id=MDR-9"})

    assert status == 200
    assert len(body["result"]) == 1


async def test_download_cut(sn: RunningServiceNow) -> None:
    """download_cut_bytes stops a download early, which the client sees as a payload error."""
    record = sn.sim.create_incident({"short_description": "files"})
    attachment = sn.sim.add_attachment(record["number"], "big.bin", size=300_000)
    await sn.call("PUT", "/_sim/settings", json={"download_cut_bytes": 1000})

    with pytest.raises(aiohttp.ClientPayloadError):
        async with sn.session.get(f"{sn.url}/api/now/attachment/{attachment.sys_id}/file") as response:
            await response.read()


# Control API and Python API


async def test_control_seed_and_edit(sn: RunningServiceNow) -> None:
    """The control API seeds incidents, edits them as the human, adds journal entries and files, and shows the state."""
    status, seeded, _ = await sn.call("POST", "/_sim/incidents", json={"short_description": "Seeded", "count": 2, "hidden": True})
    number = seeded["incidents"][0]["number"]
    edited = await sn.call("PATCH", f"/_sim/incidents/{number}", json={"state": "2", "hidden": False})
    journal = await sn.call("POST", f"/_sim/incidents/{number}/journal", json={"element": "work_notes", "value": "Checked."})
    attached = await sn.call("POST", f"/_sim/incidents/{number}/attachments", json={"file_name": "a.txt", "text": "hello"})
    _, state, _ = await sn.call("GET", "/_sim/state")
    _, calls, _ = await sn.call("GET", "/_sim/calls")

    assert status == 201
    assert len(seeded["incidents"]) == 2
    assert seeded["incidents"][0]["sys_created_by"] == HUMAN_USER
    assert edited[1]["state"] == "2"
    assert edited[1]["hidden"] is False
    assert journal[0] == 201
    assert journal[1]["sys_created_by"] == HUMAN_USER
    assert attached[1]["size_bytes"] == "5"
    assert state["hidden"] == [seeded["incidents"][1]["sys_id"]]
    assert [entry["value"] for entry in state["journal"]] == ["Checked."]
    assert calls["POST /_sim/incidents"] == 1


async def test_control_clock_and_reset(sn: RunningServiceNow) -> None:
    """The clock only moves forward and drives sys_updated_on; reset removes the records and restores the settings."""
    before = sn.sim.now()
    _, moved, _ = await sn.call("POST", "/_sim/clock", json={"advance_seconds": 3600})
    backwards = await sn.call("POST", "/_sim/clock", json={"advance_seconds": -1})
    record = await sn.create(short_description="later")
    await sn.call("PUT", "/_sim/settings", json={"short_pages": True})
    reset = await sn.call("POST", "/_sim/reset")

    assert moved["now"] >= format_time(before + timedelta(seconds=3600))
    assert record["sys_updated_on"] >= format_time(before + timedelta(seconds=3600))
    assert backwards[0] == 400
    assert reset[0] == 200
    assert sn.sim.incidents == {}
    assert sn.sim.settings.short_pages is False
    assert (await sn.create(short_description="again"))["number"] == "INC0010001"


@pytest.mark.parametrize(
    ("name", "value"),
    [("short_pages", "yes"), ("attachment_max_bytes", -1), ("latency_seconds", "slow"), ("latency_seconds", float("inf")), ("no_such", 1)],
)
async def test_control_settings_rejected(sn: RunningServiceNow, name: str, value: Any) -> None:
    """An invalid or unknown setting gets 400 and changes nothing."""
    status, body, _ = await sn.call("PUT", "/_sim/settings", json={name: value, "journal_read_denied": True})

    assert status == 400
    assert name in body["error"]["detail"]
    assert sn.sim.settings.journal_read_denied is False


async def test_control_settings_roundtrip(sn: RunningServiceNow) -> None:
    """GET and PUT /_sim/settings read and change the latency and the switches."""
    status, body, _ = await sn.call("PUT", "/_sim/settings", json={"latency_seconds": 0.02, "journal_read_denied": True})
    _, read, _ = await sn.call("GET", "/_sim/settings")

    assert status == 200
    assert read == body
    assert read["latency_seconds"] == 0.02
    assert sn.sim.settings.journal_read_denied is True


async def test_python_api(sn: RunningServiceNow) -> None:
    """The Python API creates, comments, changes state and attaches as the human user."""
    record = sn.sim.create_incident({"short_description": "py", "impact": "2"})
    entry = sn.sim.add_human_comment(record["number"], "Please isolate.", element="work_notes")
    sn.sim.set_state(record["sys_id"], "6", close_code="Solution provided", close_notes="Done.")
    attachment = sn.sim.add_attachment(record["number"], "a.bin", size=70_000)

    assert entry["element"] == "work_notes"
    assert entry["sys_created_by"] == HUMAN_USER
    assert sn.sim.incidents[record["sys_id"]]["state"] == "6"
    assert sn.sim.incidents[record["sys_id"]]["sys_updated_by"] == HUMAN_USER
    assert sn.sim.incidents[record["sys_id"]]["sys_mod_count"] == "2"
    assert attachment.size == 70_000
    assert len(sn.sim.journal) == 1
    with pytest.raises(ValueError):
        sn.sim.add_human_comment(record["number"], "x", element="description")


async def test_loopback_only() -> None:
    """The simulator and `serve` reject a non-loopback address."""
    with pytest.raises(ValueError):
        async with run_simulator(ServiceNowSimulator(), host="0.0.0.0"):
            pass
    with pytest.raises(ValueError):
        await serve(host="0.0.0.0", port=0)


async def test_latency_on_api_only(sn: RunningServiceNow, monkeypatch: pytest.MonkeyPatch) -> None:
    """latency_seconds delays API and token requests, and not the control API."""
    delays: list[float] = []

    class RecordingAsyncio:
        """The asyncio module with a `sleep` that records its delay instead of waiting."""

        def __getattr__(self, name: str) -> Any:
            return getattr(asyncio, name)

        async def sleep(self, seconds: float) -> None:
            delays.append(seconds)

    monkeypatch.setattr(simulator_module, "asyncio", RecordingAsyncio())
    sn.sim.settings.latency_seconds = 0.02

    await sn.call("GET", TABLE)
    await sn.call("GET", "/_sim/state")
    await plain_call(sn.url + "/oauth_token.do", "POST", data={"grant_type": "client_credentials"})

    assert delays == [0.02, 0.02]


async def test_serve_prints_config(capsys: pytest.CaptureFixture[str]) -> None:
    """`serve` prints the URL, the service user and both auth forms, and stops on cancellation."""
    task = asyncio.create_task(serve(port=0))
    output = ""
    for _ in range(200):
        output += capsys.readouterr().out
        if "Stop with Ctrl-C." in output:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    url = re.search(r"running at (http://127\.0\.0\.1:\d+)", output)
    assert url is not None
    assert f"username: {SERVICE_USER}" in output
    assert f"SERVICENOW_PASSWORD={SERVICE_PASSWORD}" in output
    assert f"client_id: {OAUTH_CLIENT_ID}" in output
    assert f"SERVICENOW_CLIENT_SECRET={OAUTH_CLIENT_SECRET}" in output
    assert "table: incident" in output


async def test_cli_stops_on_sigterm(tmp_path: Path) -> None:
    """`simulate servicenow` stops on SIGTERM with exit code 0, logs its stop and removes its attachment folder."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    environment = {**os.environ, "TMPDIR": str(temporary), "LANG": "C.UTF-8"}
    environment.pop("MDR_CONNECTOR_LANG", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mdr_connector.connector.cli", "simulate", "servicenow", "--port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=environment,
    )
    try:
        assert process.stdout is not None
        url = None
        while url is None and (line := await asyncio.wait_for(process.stdout.readline(), 60)):
            found = re.search(r"running at (http://\S+)", line.decode())
            url = found.group(1) if found else None
        assert url is not None, "the simulator exited before it printed its URL"
        async with aiohttp.ClientSession() as session:
            seeded = await session.post(f"{url}/_sim/incidents", json={"short_description": "cli"})
            number = (await seeded.json())["incidents"][0]["number"]
            attached = await session.post(f"{url}/_sim/incidents/{number}/attachments", json={"file_name": "notes.txt", "text": "host isolated"})
            assert attached.status == 201, await attached.text()
        folders = list(temporary.glob("servicenow-sim-attachments-*"))
        assert len(folders) == 1
        assert [path.name for path in folders[0].iterdir()] != []

        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert process.returncode == 0, stderr.decode()
    assert b"servicenow_sim.stopped" in stderr
    assert list(temporary.glob("servicenow-sim-attachments-*")) == []
