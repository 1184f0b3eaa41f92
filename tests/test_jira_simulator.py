"""The Jira simulator, driven by the real `jira` package over loopback."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import pytest
import requests
from jira import JIRA
from jira.exceptions import JIRAError

from fixtures_jira import RunningJira, StartJira
from mdr_connector.adapters.jira.simulator import (
    SERVICE_EMAIL,
    SERVICE_NAME,
    SERVICE_PASSWORD,
    SERVICE_PAT,
    SERVICE_TOKEN,
    UNBOUNDED_JQL_MESSAGE,
    JiraSimulator,
    SimError,
    format_jira_time,
    run_simulator,
)


def connect(running: RunningJira, **options: Any) -> JIRA:
    """Build a real JIRA client for the simulator's service account."""
    if running.sim.settings.deployment == "cloud":
        options.setdefault("basic_auth", (SERVICE_EMAIL, SERVICE_TOKEN))
    else:
        options.setdefault("token_auth", SERVICE_PAT)
    client = JIRA(running.url, max_retries=0, timeout=10, **options)
    client._session.trust_env = False
    return client


async def jira(running: RunningJira, **options: Any) -> JIRA:
    return await asyncio.to_thread(connect, running, **options)


def post_issue(client: JIRA, body: dict[str, Any]) -> dict[str, Any]:
    response = client._session.post(client._get_url("issue"), data=json.dumps(body))
    return response.json()


def issue_body(summary: str = "Suspicious logon", labels: tuple[str, ...] = ("mdr-connector",)) -> dict[str, Any]:
    return {
        "fields": {
            "project": {"key": "SEC"},
            "issuetype": {"name": "Task"},
            "summary": summary,
            "labels": list(labels),
        },
        "properties": [{"key": "mdr-connector", "value": {"incident_id": "2NJMGXkBNGNeZ5iut24S"}}],
    }


async def test_connects_cloud(jira_cloud: RunningJira) -> None:
    """The jira package reads Cloud serverInfo and the service account's accountId."""
    client = await jira(jira_cloud)
    myself = await asyncio.to_thread(client.myself)

    assert client.deploymentType == "Cloud"
    assert client._is_cloud
    assert myself["accountId"] == jira_cloud.sim.service.account_id
    assert myself["timeZone"] == "UTC"


async def test_connects_datacenter_pat(jira_dc: RunningJira) -> None:
    """A Data Center personal access token authenticates and `myself` names the user."""
    client = await jira(jira_dc)
    myself = await asyncio.to_thread(client.myself)

    assert client.deploymentType == "Server"
    assert myself["name"] == jira_dc.sim.service.name
    assert "accountId" not in myself


async def test_datacenter_basic_auth(jira_dc: RunningJira) -> None:
    """Data Center also accepts user name and password."""
    client = await jira(jira_dc, basic_auth=("mdr-connector", "simulator-password"), token_auth=None)
    myself = await asyncio.to_thread(client.myself)

    assert myself["name"] == "mdr-connector"


async def test_wrong_token_401(jira_cloud: RunningJira) -> None:
    """Wrong credentials fail the constructor's serverInfo call with 401."""
    with pytest.raises(JIRAError) as caught:
        await jira(jira_cloud, basic_auth=(SERVICE_EMAIL, "wrong"))

    assert caught.value.status_code == 401


async def test_bearer_rejected_on_cloud(jira_cloud: RunningJira) -> None:
    """Cloud does not take a personal access token."""
    with pytest.raises(JIRAError) as caught:
        await jira(jira_cloud, basic_auth=None, token_auth=SERVICE_PAT)

    assert caught.value.status_code == 401


async def test_create_with_property(jira_cloud: RunningJira) -> None:
    """POST issue stores the `properties` of its body and returns key and id."""
    client = await jira(jira_cloud)
    created = await asyncio.to_thread(post_issue, client, issue_body())
    prop = await asyncio.to_thread(client.issue_property, created["key"], "mdr-connector")

    assert created["key"] == "SEC-1"
    assert created["id"].isdigit()
    assert prop.value.incident_id == "2NJMGXkBNGNeZ5iut24S"


async def test_create_rejects_bad_fields(jira_cloud: RunningJira) -> None:
    """Invalid fields come back as 400 with the field names in `errors`."""
    client = await jira(jira_cloud)
    body = issue_body(labels=("has space",))
    body["fields"]["priority"] = {"name": "Urgent"}

    with pytest.raises(JIRAError) as caught:
        await asyncio.to_thread(post_issue, client, body)

    errors = caught.value.response.json()["errors"]
    assert caught.value.status_code == 400
    assert set(errors) == {"labels", "priority"}


async def test_issue_fields_param(jira_cloud: RunningJira) -> None:
    """GET issue returns only the requested fields and properties."""
    client = await jira(jira_cloud)
    created = await asyncio.to_thread(post_issue, client, issue_body())
    issue = await asyncio.to_thread(client.issue, created["key"], "summary,labels", None, "mdr-connector")

    assert set(issue.raw["fields"]) == {"summary", "labels"}
    assert issue.raw["properties"]["mdr-connector"]["incident_id"] == "2NJMGXkBNGNeZ5iut24S"


async def test_comments_paged(jira_cloud: RunningJira) -> None:
    """150 comments come in pages of at most 100 with a total, each with its properties."""
    client = await jira(jira_cloud)
    created = await asyncio.to_thread(post_issue, client, issue_body())
    for number in range(150):
        jira_cloud.sim.add_comment(
            created["key"], f"comment {number}", properties=[{"key": "mdr-connector", "value": {"n": number}}]
        )

    first = await asyncio.to_thread(client.comments, created["key"], "properties", 0, 500)
    page = await asyncio.to_thread(
        client._get_json, f"issue/{created['key']}/comment", {"startAt": 100, "maxResults": 100, "expand": "properties"}
    )

    assert len(first) == 100
    assert page["total"] == 150
    assert len(page["comments"]) == 50
    assert page["comments"][-1]["body"] == "comment 149"
    assert page["comments"][-1]["properties"] == [{"key": "mdr-connector", "value": {"n": 149}}]


async def test_comment_with_property(jira_cloud: RunningJira) -> None:
    """POST comment keeps its `properties`, readable through the comment property endpoint."""
    client = await jira(jira_cloud)
    created = await asyncio.to_thread(post_issue, client, issue_body())
    body = {"body": "Host isolated", "properties": [{"key": "mdr-connector", "value": {"origin": "mdr"}}]}
    url = client._get_url(f"issue/{created['id']}/comment")
    comment = (await asyncio.to_thread(client._session.post, url, data=json.dumps(body))).json()
    prop = await asyncio.to_thread(client._get_json, f"comment/{comment['id']}/properties/mdr-connector")

    assert comment["author"]["accountId"] == jira_cloud.sim.service.account_id
    assert prop == {"key": "mdr-connector", "value": {"origin": "mdr"}}


async def test_comment_visibility(jira_cloud: RunningJira) -> None:
    """POST comment keeps a role `visibility` and returns it in the reply and the comment list."""
    client = await jira(jira_cloud)
    created = await asyncio.to_thread(post_issue, client, issue_body())
    visibility = {"type": "role", "value": "Administrators"}
    url = client._get_url(f"issue/{created['id']}/comment")
    reply = await asyncio.to_thread(
        client._session.post, url, data=json.dumps({"body": "internal", "visibility": visibility})
    )
    jira_cloud.sim.add_comment(created["key"], "public")
    listed = await asyncio.to_thread(client._get_json, f"issue/{created['key']}/comment")

    assert reply.json()["visibility"] == visibility
    assert listed["comments"][0]["visibility"] == visibility
    assert "visibility" not in listed["comments"][1]
    assert jira_cloud.sim.state()["issues"][0]["comments"][0]["visibility"] == visibility


@pytest.mark.parametrize(
    "visibility",
    [{"type": "user", "value": "x"}, {"type": "group"}, {"type": "role", "value": " "}, "role"],
    ids=["unknown-type", "no-value", "blank-value", "not-object"],
)
async def test_comment_visibility_invalid(jira_cloud: RunningJira, visibility: Any) -> None:
    """A malformed `visibility` is rejected with 400 naming the comment level."""
    client = await jira(jira_cloud)
    created = await asyncio.to_thread(post_issue, client, issue_body())
    url = client._get_url(f"issue/{created['id']}/comment")

    with pytest.raises(JIRAError) as caught:
        await asyncio.to_thread(
            client._session.post, url, data=json.dumps({"body": "x", "visibility": visibility})
        )

    assert caught.value.status_code == 400
    assert "commentLevel" in caught.value.response.json()["errors"]
    assert jira_cloud.sim.issue(created["key"]).comments == []


async def test_control_comment_visibility(jira_cloud: RunningJira) -> None:
    """The control API adds a comment restricted to a group."""
    issue = jira_cloud.sim.create_issue({"project": {"key": "SEC"}, "issuetype": {"name": "Task"}, "summary": "x"})
    visibility = {"type": "group", "value": "soc-team"}
    async with aiohttp.ClientSession() as session:
        reply = await session.post(
            f"{jira_cloud.url}/_sim/issues/{issue.key}/comments", json={"body": "hi", "visibility": visibility}
        )

    assert reply.status == 201
    assert issue.comments[0].visibility == visibility


async def test_lone_surrogate_json(jira_cloud: RunningJira) -> None:
    """Text with a lone surrogate is served as valid JSON with a `\\ud800` escape, not a 500."""
    client = await jira(jira_cloud)
    created = await asyncio.to_thread(post_issue, client, issue_body())
    jira_cloud.sim.add_comment(created["key"], "odd \ud800 text")
    url = client._get_url(f"issue/{created['key']}/comment")

    response = await asyncio.to_thread(client._session.get, url)

    assert response.status_code == 200
    assert b"odd \\ud800 text" in response.content
    assert response.json()["comments"][0]["body"] == "odd \ud800 text"


async def test_lone_surrogate_write(jira_cloud: RunningJira) -> None:
    """A request with a `\\ud800` escape is stored and counted like Jira, not answered with 500."""
    client = await jira(jira_cloud)
    body = issue_body()
    body["fields"]["description"] = "bad \ud800 text"

    created = await asyncio.to_thread(post_issue, client, body)

    assert jira_cloud.sim.issue(created["key"]).fields["description"] == "bad \ud800 text"


async def test_comment_length_utf16(jira_cloud: RunningJira) -> None:
    """A comment is limited to 32,767 UTF-16 code units, so each emoji counts twice."""
    issue = jira_cloud.sim.create_issue({"project": {"key": "SEC"}, "issuetype": {"name": "Task"}, "summary": "x"})

    jira_cloud.sim.add_comment(issue.key, "😀" * 16383)
    with pytest.raises(SimError) as caught:
        jira_cloud.sim.add_comment(issue.key, "😀" * 16384)

    assert caught.value.status == 400


async def test_search_cloud_pages(start_jira: StartJira) -> None:
    """enhanced_search_issues follows nextPageToken through every page."""
    running = await start_jira()
    running.sim.settings.search_page_cap = 2
    client = await jira(running)
    for number in range(5):
        await asyncio.to_thread(post_issue, client, issue_body(f"issue {number}"))

    found = await asyncio.to_thread(
        client.enhanced_search_issues, 'project = SEC ORDER BY key ASC', None, 0, "summary"
    )

    assert [issue.key for issue in found] == [f"SEC-{number}" for number in range(1, 6)]


async def test_search_server_pages(jira_dc: RunningJira) -> None:
    """Data Center's classic search pages with startAt and reports the total."""
    jira_dc.sim.settings.search_page_cap = 2
    client = await jira(jira_dc)
    for number in range(5):
        await asyncio.to_thread(post_issue, client, issue_body(f"issue {number}"))

    found = await asyncio.to_thread(client.search_issues, "project = SEC ORDER BY key DESC", 0, False)

    assert found.total == 5
    assert [issue.key for issue in found] == [f"SEC-{number}" for number in range(5, 0, -1)]


async def test_search_removed_on_cloud(jira_cloud: RunningJira) -> None:
    """The classic /search returns 410 in Cloud mode."""
    client = await jira(jira_cloud)

    with pytest.raises(JIRAError) as caught:
        await asyncio.to_thread(client._get_json, "search", {"jql": "project = SEC"})

    assert caught.value.status_code == 410


async def test_unbounded_jql_400(jira_cloud: RunningJira) -> None:
    """Cloud rejects a query without a restriction, with Atlassian's message."""
    client = await jira(jira_cloud)

    with pytest.raises(JIRAError) as caught:
        await asyncio.to_thread(client.enhanced_search_issues, "ORDER BY updated DESC")

    assert caught.value.status_code == 400
    assert caught.value.text == UNBOUNDED_JQL_MESSAGE


async def test_unsupported_jql_400(jira_cloud: RunningJira) -> None:
    """A query outside the subset fails loudly instead of matching wrongly."""
    client = await jira(jira_cloud)

    with pytest.raises(JIRAError) as caught:
        await asyncio.to_thread(client.enhanced_search_issues, "project = SEC OR labels = x")

    assert caught.value.status_code == 400


async def test_labels_match_any_case(jira_cloud: RunningJira) -> None:
    """Label clauses match case-insensitively, like Jira's."""
    client = await jira(jira_cloud)
    await asyncio.to_thread(post_issue, client, issue_body(labels=("mdr-AbC",)))

    found = await asyncio.to_thread(client.enhanced_search_issues, 'project = SEC AND labels = "mdr-abc"')

    assert len(found) == 1


@pytest.mark.parametrize("zone", ["America/Los_Angeles", "Asia/Vladivostok"])
async def test_jql_dates_in_user_zone(start_jira: StartJira, zone: str) -> None:
    """`updated >=` literals are read in the searching user's zone at minute precision."""
    running = await start_jira(service_time_zone=zone)
    client = await jira(running)
    created = await asyncio.to_thread(post_issue, client, issue_body())
    updated = running.sim.issue(created["key"]).updated

    local_minute = updated.astimezone(ZoneInfo(zone))
    at_minute = local_minute.strftime("%Y/%m/%d %H:%M")
    next_minute = (local_minute + timedelta(minutes=1)).strftime("%Y-%m-%d %H:%M")
    utc_literal = updated.strftime("%Y/%m/%d %H:%M")

    def count(literal: str) -> int:
        return len(client.enhanced_search_issues(f'project = SEC AND updated >= "{literal}"'))

    assert await asyncio.to_thread(count, at_minute) == 1
    assert await asyncio.to_thread(count, next_minute) == 0
    expected_with_utc_literal = 0 if zone == "America/Los_Angeles" else 1
    assert await asyncio.to_thread(count, utc_literal) == expected_with_utc_literal


async def test_times_in_user_zone(start_jira: StartJira) -> None:
    """Timestamps carry the requesting user's offset, in Jira's format."""
    running = await start_jira(service_time_zone="Asia/Vladivostok")
    client = await jira(running)
    created = await asyncio.to_thread(post_issue, client, issue_body())
    issue = await asyncio.to_thread(client.issue, created["key"], "created")

    assert issue.raw["fields"]["created"].endswith("+1000")
    assert issue.raw["fields"]["created"] == format_jira_time(running.sim.issue("SEC-1").created, "Asia/Vladivostok")


async def test_search_delay(start_jira: StartJira) -> None:
    """A new issue is hidden from search until the delay passes, unless reconciled."""
    running = await start_jira(search_delay_seconds=30)
    client = await jira(running)
    created = await asyncio.to_thread(post_issue, client, issue_body())

    def search(reconcile: list[int] | None = None) -> int:
        return len(client.enhanced_search_issues("project = SEC", reconcileIssues=reconcile, fields="summary"))

    assert await asyncio.to_thread(search) == 0
    assert await asyncio.to_thread(search, [int(created["id"])]) == 1
    running.sim.advance(31)
    assert await asyncio.to_thread(search) == 1


async def test_search_sees_old_state(start_jira: StartJira) -> None:
    """An edited issue is found by its old labels until the delay passes."""
    running = await start_jira()
    client = await jira(running)
    created = await asyncio.to_thread(post_issue, client, issue_body(labels=("old",)))
    running.sim.settings.search_delay_seconds = 30
    running.sim.edit_as_human(created["key"], labels=["new"])

    def count(label: str) -> int:
        return len(client.enhanced_search_issues(f"project = SEC AND labels = {label}"))

    assert await asyncio.to_thread(count, "old") == 1
    assert await asyncio.to_thread(count, "new") == 0
    running.sim.advance(31)
    assert await asyncio.to_thread(count, "old") == 0
    assert await asyncio.to_thread(count, "new") == 1


async def test_updated_moves(jira_cloud: RunningJira) -> None:
    """A comment and an edit both move the issue's `updated`."""
    sim = jira_cloud.sim
    issue = sim.create_issue({"project": {"key": "SEC"}, "issuetype": {"name": "Task"}, "summary": "x"})
    created = issue.updated

    sim.advance(60)
    sim.add_comment(issue.key, "seen")
    after_comment = issue.updated
    sim.advance(60)
    sim.edit_as_human(issue.key, summary="y")

    assert after_comment > created
    assert issue.updated > after_comment


async def test_edit_adds_labels(jira_cloud: RunningJira) -> None:
    """PUT issue with `update.labels` adds without removing other labels."""
    client = await jira(jira_cloud)
    created = await asyncio.to_thread(post_issue, client, issue_body(labels=("mdr-connector", "human")))
    body = {"fields": {"summary": "renamed"}, "update": {"labels": [{"add": "mapped"}]}}
    url = client._get_url(f"issue/{created['id']}")
    response = await asyncio.to_thread(client._session.put, url, data=json.dumps(body))

    issue = jira_cloud.sim.issue(created["key"])
    assert response.status_code == 204
    assert issue.fields["labels"] == ["mdr-connector", "human", "mapped"]
    assert issue.fields["summary"] == "renamed"


async def test_drop_reply_after_commit(jira_cloud: RunningJira) -> None:
    """A drop rule applies the write, then closes the connection without a reply."""
    client = await jira(jira_cloud)
    jira_cloud.sim.drop_reply_after_commit("POST", "/rest/api/2/issue")

    with pytest.raises(requests.ConnectionError):
        await asyncio.to_thread(post_issue, client, issue_body())
    again = await asyncio.to_thread(post_issue, client, issue_body())

    assert [issue.key for issue in jira_cloud.sim.issues.values()] == ["SEC-1", "SEC-2"]
    assert again["key"] == "SEC-2"


async def test_counts_calls(jira_cloud: RunningJira) -> None:
    """Calls are counted per method and route pattern."""
    client = await jira(jira_cloud)
    await asyncio.to_thread(client.myself)
    await asyncio.to_thread(client.myself)

    assert jira_cloud.sim.calls["GET /rest/api/2/myself"] == 2
    assert jira_cloud.sim.calls["GET /rest/api/2/serverInfo"] == 1


async def test_control_api(jira_cloud: RunningJira) -> None:
    """The /_sim/ API adds comments, edits issues, moves the clock and returns state."""
    issue = jira_cloud.sim.create_issue({"project": {"key": "SEC"}, "issuetype": {"name": "Task"}, "summary": "x"})
    base = jira_cloud.url
    async with aiohttp.ClientSession() as session:
        comment = await session.post(f"{base}/_sim/issues/{issue.key}/comments", json={"author": "analyst", "body": "hi"})
        edit = await session.put(f"{base}/_sim/issues/{issue.key}", json={"fields": {"labels": ["triaged"]}})
        clock = await session.post(f"{base}/_sim/clock", json={"advance_seconds": 120})
        settings = await session.put(f"{base}/_sim/settings", json={"search_delay_seconds": 5})
        state = await (await session.get(f"{base}/_sim/state")).json()

    assert comment.status == 201
    assert edit.status == 200
    assert clock.status == 200
    assert settings.status == 200
    assert jira_cloud.sim.settings.search_delay_seconds == 5
    assert state["issues"][0]["fields"]["labels"] == ["triaged"]
    assert state["issues"][0]["comments"][0]["author"] == "analyst"


async def test_loopback_only() -> None:
    """The simulator rejects a non-loopback address."""
    with pytest.raises(ValueError):
        async with run_simulator(JiraSimulator(), host="0.0.0.0"):
            pass


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("latency_seconds", "slow", "a finite number of seconds"),
        ("search_delay_seconds", True, "a finite number of seconds"),
        ("latency_seconds", float("nan"), "a finite number of seconds"),
        ("comment_page_cap", 1.5, "an integer of at least 1"),
        ("search_page_cap", 0, "an integer of at least 1"),
        ("deployment", "server", '"cloud" or "datacenter"'),
        ("deployment", ["cloud"], '"cloud" or "datacenter"'),
        ("upload_limit_bytes", -1, "an integer of at least 0"),
        ("download_cut_bytes", 2.5, "an integer of at least 0"),
        ("attachments_enabled", "yes", "true or false"),
        ("media_base_url", "ftp://localhost", "loopback host"),
        ("content_base_url", "http://jira.example.com", "loopback host"),
    ],
)
async def test_settings_wrong_type_400(jira_cloud: RunningJira, name: str, value: Any, expected: str) -> None:
    """A setting of the wrong type gets 400 naming the key and the type, and the simulator keeps serving."""
    before = dict(vars(jira_cloud.sim.settings))
    async with aiohttp.ClientSession() as session:
        reply = await session.put(f"{jira_cloud.url}/_sim/settings", json={name: value})
        body = await reply.json()

    assert reply.status == 400
    assert list(body["errors"]) == [name]
    assert expected in body["errors"][name]
    assert vars(jira_cloud.sim.settings) == before
    client = await jira(jira_cloud)
    assert (await asyncio.to_thread(client.myself))["accountId"] == jira_cloud.sim.service.account_id


async def test_settings_bad_value_changes_nothing(jira_cloud: RunningJira) -> None:
    """A request with one valid and one invalid setting applies neither."""
    async with aiohttp.ClientSession() as session:
        reply = await session.put(
            f"{jira_cloud.url}/_sim/settings", json={"search_delay_seconds": 5, "comment_page_cap": "10"}
        )
        body = await reply.json()

    assert reply.status == 400
    assert body["errorMessages"] == ["Invalid settings, nothing was changed."]
    assert jira_cloud.sim.settings.search_delay_seconds == 0
    assert jira_cloud.sim.settings.comment_page_cap == 100


async def test_settings_unknown_name_400(jira_cloud: RunningJira) -> None:
    """An unknown setting name gets 400 that lists the known ones."""
    async with aiohttp.ClientSession() as session:
        reply = await session.put(f"{jira_cloud.url}/_sim/settings", json={"latency": 1})
        body = await reply.json()

    assert reply.status == 400
    assert body["errorMessages"][0].startswith("Unknown settings: latency. Known settings: deployment,")


@pytest.mark.parametrize("seconds", [-5, "60", None, float("inf")], ids=["negative", "string", "null", "infinite"])
async def test_clock_rejects_bad_advance(jira_cloud: RunningJira, seconds: Any) -> None:
    """`/_sim/clock` rejects an advance that is negative or not a finite number, and the clock stays."""
    before = jira_cloud.sim.clock_offset
    async with aiohttp.ClientSession() as session:
        reply = await session.post(f"{jira_cloud.url}/_sim/clock", json={"advance_seconds": seconds})
        body = await reply.json()

    assert reply.status == 400
    assert "the clock only moves forward" in body["errors"]["advance_seconds"]
    assert jira_cloud.sim.clock_offset == before


def test_advance_rejects_negative() -> None:
    """The Python control API rejects a negative advance as well."""
    sim = JiraSimulator()

    with pytest.raises(ValueError, match="only moves forward"):
        sim.advance(-1)

    assert sim.clock_offset == timedelta()


async def test_switch_to_datacenter_takes_password(jira_cloud: RunningJira) -> None:
    """After a switch to Data Center the service account signs in with its Data Center password."""
    async with aiohttp.ClientSession() as session:
        reply = await session.put(f"{jira_cloud.url}/_sim/settings", json={"deployment": "datacenter"})
    assert reply.status == 200

    client = await jira(jira_cloud, basic_auth=(SERVICE_NAME, SERVICE_PASSWORD), token_auth=None)
    myself = await asyncio.to_thread(client.myself)

    assert myself["name"] == SERVICE_NAME


async def test_switch_to_datacenter_rejects_api_token(jira_cloud: RunningJira) -> None:
    """On Data Center the Cloud API token is not a password, as on a real Data Center site."""
    jira_cloud.sim.settings.deployment = "datacenter"

    with pytest.raises(JIRAError) as caught:
        await jira(jira_cloud, basic_auth=(SERVICE_NAME, SERVICE_TOKEN), token_auth=None)

    assert caught.value.status_code == 401


@pytest.mark.parametrize("start", ["cloud", "datacenter"])
async def test_cloud_takes_api_token(start_jira: StartJira, start: str) -> None:
    """On Cloud the service account signs in with the API token, whichever deployment the simulator started as."""
    running = await start_jira(deployment=start)
    running.sim.settings.deployment = "datacenter"
    running.sim.settings.deployment = "cloud"

    client = await jira(running, basic_auth=(SERVICE_EMAIL, SERVICE_TOKEN))
    myself = await asyncio.to_thread(client.myself)

    assert myself["accountId"] == running.sim.service.account_id
    with pytest.raises(JIRAError) as caught:
        await jira(running, basic_auth=(SERVICE_EMAIL, SERVICE_PASSWORD))
    assert caught.value.status_code == 401


async def test_added_user_api_token(jira_cloud: RunningJira) -> None:
    """A user added with `api_token` signs in with it on Cloud and with `password` on Data Center."""
    async with aiohttp.ClientSession() as session:
        reply = await session.post(
            f"{jira_cloud.url}/_sim/users",
            json={
                "account_id": "557058:engineer",
                "name": "engineer",
                "email": "engineer@example.test",
                "password": "engineer-password",
                "api_token": "engineer-api-token",
            },
        )
    assert reply.status == 201

    cloud = await jira(jira_cloud, basic_auth=("engineer@example.test", "engineer-api-token"))
    assert (await asyncio.to_thread(cloud.myself))["accountId"] == "557058:engineer"
    jira_cloud.sim.settings.deployment = "datacenter"
    datacenter = await jira(jira_cloud, basic_auth=("engineer", "engineer-password"), token_auth=None)
    assert (await asyncio.to_thread(datacenter.myself))["name"] == "engineer"


# Components, comment edits, service desk notes, groups


def test_components_validated() -> None:
    """Components are checked against the project's list by name or id, and unknown names get Jira's 400."""
    sim = JiraSimulator()
    base = {"project": {"key": "SEC"}, "issuetype": {"name": "Task"}, "summary": "x"}
    issue = sim.create_issue({**base, "components": [{"name": "Network"}]})

    with pytest.raises(SimError) as caught:
        sim.create_issue({**base, "components": [{"name": "Mainframe"}]})
    sim.edit_issue(issue.key, update={"components": [{"add": {"name": "Identity"}}, {"remove": {"name": "Network"}}]})

    assert caught.value.status == 400
    assert caught.value.errors == {"components": "Component name 'Mainframe' is not valid"}
    assert issue.fields["components"] == ["Identity"]


def test_components_per_project() -> None:
    """A component of one project is unknown in another."""
    sim = JiraSimulator()

    with pytest.raises(SimError) as caught:
        sim.create_issue(
            {"project": {"key": "OPS"}, "issuetype": {"name": "Task"}, "summary": "x", "components": [{"name": "Network"}]}
        )

    assert "components" in caught.value.errors


async def test_project_lists_components(jira_cloud: RunningJira) -> None:
    """GET project/{key} lists the project's components, and an added project is served."""
    jira_cloud.sim.add_project("SOC", "SOC desk", ["Task"], ["Triage"])
    client = await jira(jira_cloud)

    project = await asyncio.to_thread(client._get_json, "project/SOC")

    assert [item["name"] for item in project["components"]] == ["Triage"]
    assert [item["name"] for item in project["issueTypes"]] == ["Task"]


def test_add_project_rejects_bad_key() -> None:
    """A project key Jira would not accept is a ValueError."""
    with pytest.raises(ValueError, match="project key"):
        JiraSimulator().add_project("sec ops", "x", ["Task"])


async def test_edit_comment_rest(jira_cloud: RunningJira) -> None:
    """PUT comment replaces the body, keeps properties and visibility, and moves `updated`."""
    client = await jira(jira_cloud)
    created = await asyncio.to_thread(post_issue, client, issue_body())
    url = client._get_url(f"issue/{created['id']}/comment")
    body = {
        "body": "first",
        "properties": [{"key": "mdr-connector", "value": {"origin": "mdr"}}],
        "visibility": {"type": "role", "value": "Administrators"},
    }
    added = (await asyncio.to_thread(client._session.post, url, data=json.dumps(body))).json()
    jira_cloud.sim.advance(10)

    reply = await asyncio.to_thread(client._session.put, f"{url}/{added['id']}", data=json.dumps({"body": "second"}))
    _, stored = jira_cloud.sim.comment(added["id"])

    assert reply.json()["body"] == "second"
    assert reply.json()["updated"] != added["updated"]
    assert stored.properties == {"mdr-connector": {"origin": "mdr"}}
    assert stored.visibility == {"type": "role", "value": "Administrators"}


async def test_edit_comment_author_only(jira_cloud: RunningJira) -> None:
    """Only a comment's author may edit it, as in Jira without admin rights."""
    client = await jira(jira_cloud)
    created = await asyncio.to_thread(post_issue, client, issue_body())
    comment = jira_cloud.sim.add_comment(created["key"], "a person's note")
    url = client._get_url(f"issue/{created['id']}/comment/{comment.id}")

    with pytest.raises(JIRAError) as caught:
        await asyncio.to_thread(client._session.put, url, data=json.dumps({"body": "changed"}))

    assert caught.value.status_code == 403
    assert comment.body == "a person's note"


async def test_internal_comment(jira_cloud: RunningJira) -> None:
    """An internal service desk note carries `sd.public.comment` and `jsdPublic: false`."""
    client = await jira(jira_cloud)
    created = await asyncio.to_thread(post_issue, client, issue_body())
    jira_cloud.sim.add_comment(created["key"], "agents only", internal=True)
    jira_cloud.sim.add_comment(created["key"], "everyone")

    listed = await asyncio.to_thread(
        client._get_json, f"issue/{created['key']}/comment", {"expand": "properties"}
    )

    internal, public = listed["comments"]
    assert internal["jsdPublic"] is False
    assert internal["properties"] == [{"key": "sd.public.comment", "value": {"internal": True}}]
    assert public["jsdPublic"] is True


async def test_control_comment_edit_delete(jira_cloud: RunningJira) -> None:
    """The control API adds an internal note, edits a comment as its author and deletes one."""
    issue = jira_cloud.sim.create_issue({"project": {"key": "SEC"}, "issuetype": {"name": "Task"}, "summary": "x"})
    base = jira_cloud.url
    async with aiohttp.ClientSession() as session:
        added = await session.post(f"{base}/_sim/issues/{issue.key}/comments", json={"body": "one", "internal": True})
        comment_id = (await added.json())["id"]
        edited = await session.put(f"{base}/_sim/comments/{comment_id}", json={"body": "one, edited"})
        second = await session.post(f"{base}/_sim/issues/{issue.key}/comments", json={"body": "two"})
        deleted = await session.delete(f"{base}/_sim/comments/{(await second.json())['id']}")

    assert edited.status == 200
    assert deleted.status == 204
    assert [(comment.body, comment.internal) for comment in issue.comments] == [("one, edited", True)]


async def test_groups_cloud(jira_cloud: RunningJira) -> None:
    """Cloud serves user/groups by accountId, and an unknown account is 404."""
    client = await jira(jira_cloud)

    groups = await asyncio.to_thread(client._get_json, "user/groups", {"accountId": jira_cloud.sim.human.account_id})
    with pytest.raises(JIRAError) as caught:
        await asyncio.to_thread(client._get_json, "user/groups", {"accountId": "557058:nobody"})

    assert [group["name"] for group in groups] == ["jira-software-users", "soc-analysts"]
    assert caught.value.status_code == 404


async def test_groups_datacenter(jira_dc: RunningJira) -> None:
    """Data Center lists groups with user?username=...&expand=groups and has no user/groups."""
    client = await jira(jira_dc)

    user = await asyncio.to_thread(client._get_json, "user", {"username": "analyst", "expand": "groups"})
    with pytest.raises(JIRAError) as caught:
        await asyncio.to_thread(client._get_json, "user/groups", {"accountId": "x"})

    assert user["groups"]["size"] == 2
    assert [group["name"] for group in user["groups"]["items"]] == ["jira-software-users", "soc-analysts"]
    assert caught.value.status_code == 404


async def test_control_user_groups(jira_cloud: RunningJira) -> None:
    """A user added through the control API gets its groups."""
    async with aiohttp.ClientSession() as session:
        reply = await session.post(
            f"{jira_cloud.url}/_sim/users", json={"account_id": "557058:lead", "name": "lead", "groups": ["soc-leads"]}
        )

    assert reply.status == 201
    assert jira_cloud.sim.user("lead").groups == ["soc-leads"]


async def test_issue_fields_status(jira_cloud: RunningJira) -> None:
    """An issue shows its workflow status with category, its resolution and components."""
    client = await jira(jira_cloud)
    body = issue_body()
    body["fields"]["components"] = [{"name": "Endpoint"}]
    created = await asyncio.to_thread(post_issue, client, body)

    issue = await asyncio.to_thread(client._get_json, f"issue/{created['key']}", {"fields": "status,resolution,components"})

    assert issue["fields"]["status"]["name"] == "To Do"
    assert issue["fields"]["status"]["statusCategory"]["key"] == "new"
    assert issue["fields"]["resolution"] is None
    assert [item["name"] for item in issue["fields"]["components"]] == ["Endpoint"]


async def read_simulator_url(process: asyncio.subprocess.Process) -> str:
    """Read the simulator's start-up text until the line with its URL, and return the URL."""
    assert process.stdout is not None
    while line := await asyncio.wait_for(process.stdout.readline(), 60):
        found = re.search(r"running at (http://\S+)", line.decode())
        if found:
            return found.group(1)
    raise AssertionError("the simulator exited before it printed its URL")


async def test_serve_stops_on_sigterm(tmp_path: Path) -> None:
    """`simulate jira` stops on SIGTERM with exit code 0, logs its stop and removes its attachment folder."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    environment = {**os.environ, "TMPDIR": str(temporary), "LANG": "C.UTF-8"}
    environment.pop("MDR_CONNECTOR_LANG", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mdr_connector.connector.cli", "simulate", "jira", "--port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=environment,
    )
    try:
        url = await read_simulator_url(process)
        async with aiohttp.ClientSession(auth=aiohttp.BasicAuth(SERVICE_EMAIL, SERVICE_TOKEN)) as session:
            created = await session.post(f"{url}/rest/api/2/issue", json=issue_body())
            key = (await created.json())["key"]
            attached = await session.post(
                f"{url}/_sim/issues/{key}/attachments", json={"filename": "notes.txt", "text": "host isolated"}
            )
            assert attached.status == 201, await attached.text()
        folders = list(temporary.glob("jira-sim-attachments-*"))
        assert len(folders) == 1
        assert [path.name for path in folders[0].iterdir()] != []

        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert process.returncode == 0, stderr.decode()
    assert b"jira_sim.stopped" in stderr
    assert list(temporary.glob("jira-sim-attachments-*")) == []


def test_comment_found_after_changes() -> None:
    """A comment is found by id on its own issue, and a deleted one is 404, among many issues."""
    sim = JiraSimulator()
    base = {"project": {"key": "SEC"}, "issuetype": {"name": "Task"}}
    issues = [sim.create_issue({**base, "summary": f"issue {number}"}) for number in range(20)]
    comments = [sim.add_comment(issue.key, f"note on {issue.key}") for issue in issues]

    sim.delete_comment(comments[3].id)
    found_issue, found_comment = sim.comment(str(comments[7].id))

    assert (found_issue.key, found_comment.body) == (issues[7].key, f"note on {issues[7].key}")
    with pytest.raises(SimError):
        sim.comment(comments[3].id)
