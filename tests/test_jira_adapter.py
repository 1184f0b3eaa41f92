"""The Jira ticket adapter against the simulator, and its error mapping."""

from __future__ import annotations

import json
import logging
import socket
import ssl
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import requests
from jira.exceptions import JIRAError
from urllib3.exceptions import MaxRetryError, NewConnectionError, ProtocolError

from fixtures_jira import MakeAdapter, RunningJira, StartJira, jira_settings, paged_issues
from mdr_connector.adapters.jira.adapter import (
    MAX_TEXT_LENGTH,
    TRUNCATION_NOTE,
    JiraTicketAdapter,
    _parse_time,
    _truncated,
    jql_minute,
)
from mdr_connector.adapters.jira.errors import map_error
from mdr_connector.connector import markup
from mdr_connector.connector.errors import (
    ConfigError,
    ConnectionFatalError,
    CredentialsRejectedError,
    InvalidPayloadError,
    OutcomeUnknownError,
    RateLimitedError,
    RejectedError,
    RemoteUnavailableError,
)
from mdr_connector.connector.tickets import (
    MDR_ORIGIN,
    CommentDraft,
    CommentVisibility,
    SyncMarker,
    TicketAdapter,
    TicketDraft,
    TicketFields,
    TicketQuery,
    TicketRef,
)

INCIDENT_ID = "-MAfspsBq_r24TsN5-jl"


def draft(incident_id: str = INCIDENT_ID, **fields: Any) -> TicketDraft:
    values: dict[str, Any] = {
        "summary": "[MDR-7] Suspicious PowerShell",
        "description": "Host **ws-01** ran an encoded command.",
        "priority": "High",
        "labels": ("mdr high",),
    }
    values.update(fields)
    return TicketDraft(
        incident_id=incident_id,
        project="SEC",
        issue_type="Task",
        fields=TicketFields(**values),
        metadata={"incident_number": 7},
    )


def comment(source_id: str, body: str = "Checked the host.") -> CommentDraft:
    return CommentDraft(body=body, marker=SyncMarker(origin=MDR_ORIGIN, source_id=source_id))


@pytest.mark.parametrize("deployment", ["cloud", "datacenter"])
async def test_open_returns_own_account(start_jira: StartJira, make_adapter: MakeAdapter, deployment: str) -> None:
    """open returns the service account: accountId on Cloud, user name on Data Center."""
    running = await start_jira(deployment=deployment)
    adapter = await make_adapter(running)
    expected = running.sim.service.account_id if deployment == "cloud" else running.sim.service.name

    assert isinstance(adapter, TicketAdapter)
    assert adapter.account is not None
    assert adapter.account.id == expected
    assert adapter.account.display_name == "MDR connector"
    assert adapter.deployment == deployment


async def test_open_wrong_secret(jira_cloud: RunningJira, monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong API token stops the connection with CredentialsRejectedError."""
    adapter = JiraTicketAdapter(jira_settings(jira_cloud, monkeypatch), "SEC")
    monkeypatch.setenv("MDR_TEST_JIRA_SECRET", "not-the-token")

    with pytest.raises(CredentialsRejectedError) as caught:
        await adapter.open()
    await adapter.close()

    message = str(caught.value)
    assert "not-the-token" not in message
    assert message.startswith(f"Jira at {jira_cloud.url} rejected the credentials while connecting (HTTP 401): ")
    assert ".." not in message
    assert ".;" not in message
    assert message.endswith("; check the account and the API token or password in ticket.auth")


async def test_open_unreachable(jira_cloud: RunningJira, monkeypatch: pytest.MonkeyPatch) -> None:
    """A closed loopback port is RemoteUnavailableError, not a crash."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    settings = jira_settings(jira_cloud, monkeypatch, url=f"http://127.0.0.1:{closed_port}")
    adapter = JiraTicketAdapter(settings, "SEC")

    with pytest.raises(RemoteUnavailableError) as caught:
        await adapter.open()
    await adapter.close()

    assert str(caught.value) == (
        f"cannot connect to Jira at http://127.0.0.1:{closed_port} while connecting: ConnectionError; "
        "check ticket.url and the network"
    )


async def test_call_before_open(jira_cloud: RunningJira, monkeypatch: pytest.MonkeyPatch) -> None:
    """Using the adapter before open fails with a clear message."""
    adapter = JiraTicketAdapter(jira_settings(jira_cloud, monkeypatch), "SEC")

    with pytest.raises(RuntimeError, match="open"):
        await adapter.find_ticket(INCIDENT_ID)
    await adapter.close()


async def test_create_marks_ticket(jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter) -> None:
    """A created issue carries both labels, the property and the converted fields."""
    ref = await cloud_adapter.create_ticket(draft())
    issue = jira_cloud.sim.issue(ref.key)

    assert ref.url == f"{jira_cloud.url}/browse/{ref.key}"
    assert issue.fields["labels"] == ["mdr-connector", f"mdr-{INCIDENT_ID}", "mdr_high"]
    assert issue.properties["mdr-connector"] == {"incident_number": 7, "incident_id": INCIDENT_ID}
    assert issue.fields["description"] == "Host *ws-01* ran an encoded command."
    assert issue.fields["priority"] == "High"
    assert jira_cloud.sim.calls["POST /rest/api/2/issue"] == 1


async def test_create_cuts_summary(jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter) -> None:
    """A long multi-line summary with emoji is cut to what Jira accepts."""
    summary = "Alert 😀\n" + "x" * 300
    ref = await cloud_adapter.create_ticket(draft(summary=summary))
    stored = jira_cloud.sim.issue(ref.key).fields["summary"]

    assert stored.startswith("Alert 😀 xxx")
    assert stored.endswith("…")
    assert len(stored.encode("utf-16-le")) // 2 == 255


async def test_create_then_find_after_delay(start_jira: StartJira, make_adapter: MakeAdapter) -> None:
    """find_ticket finds a new ticket only after Cloud's search delay."""
    running = await start_jira(search_delay_seconds=60)
    adapter = await make_adapter(running)
    ref = await adapter.create_ticket(draft())
    # A new adapter has no recent writes to reconcile, like a restarted connector.
    fresh = await make_adapter(running)

    assert adapter.search_delay_seconds() == 60
    assert await fresh.find_ticket(INCIDENT_ID) is None
    running.sim.advance(adapter.search_delay_seconds() + 1)
    assert await fresh.find_ticket(INCIDENT_ID) == ref


async def test_find_needs_exact_id(jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter) -> None:
    """A label that matches only case-insensitively, or lacks the property, is not a match."""
    sim = jira_cloud.sim
    base = {"project": {"key": "SEC"}, "issuetype": {"name": "Task"}, "summary": "other"}
    sim.create_issue({**base, "labels": ["mdr-connector", "mdr-abc"]}, properties=[{"key": "mdr-connector", "value": {"incident_id": "abc"}}])
    sim.create_issue({**base, "labels": ["mdr-connector", "mdr-ABC"]})
    expected_issue = sim.create_issue({**base, "labels": ["mdr-connector", "mdr-ABC"]}, properties=[{"key": "mdr-connector", "value": {"incident_id": "ABC"}}])

    found = await cloud_adapter.find_ticket("ABC")

    assert found is not None
    assert found.key == expected_issue.key
    assert await cloud_adapter.find_ticket("Abc") is None


async def test_find_datacenter(jira_dc: RunningJira, make_adapter: MakeAdapter) -> None:
    """On Data Center the lookup uses the classic search."""
    adapter = await make_adapter(jira_dc)
    ref = await adapter.create_ticket(draft())

    assert await adapter.find_ticket(INCIDENT_ID) == ref
    assert jira_dc.sim.calls["GET /rest/api/2/search"] == 1
    assert adapter.search_delay_seconds() == 0


async def test_create_reply_lost(jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter) -> None:
    """A create whose reply is lost is OutcomeUnknownError, and the marker lookup finds the issue."""
    jira_cloud.sim.drop_reply_after_commit("POST", "/rest/api/2/issue")

    with pytest.raises(OutcomeUnknownError):
        await cloud_adapter.create_ticket(draft())
    found = await cloud_adapter.find_ticket(INCIDENT_ID)

    assert len(jira_cloud.sim.issues) == 1
    assert found is not None
    assert found.key == "SEC-1"


async def test_comment_reply_lost(jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter) -> None:
    """A comment whose reply is lost is OutcomeUnknownError, and it is listed with its marker."""
    ref = await cloud_adapter.create_ticket(draft())
    jira_cloud.sim.drop_reply_after_commit("POST", "/rest/api/2/issue/{issue}/comment")

    with pytest.raises(OutcomeUnknownError):
        await cloud_adapter.add_comment(ref, comment("c-1"))
    comments = await cloud_adapter.list_comments(ref)

    assert [item.marker for item in comments] == [SyncMarker(MDR_ORIGIN, "c-1")]


async def test_lists_150_comments(jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter) -> None:
    """Every one of 150 comments is listed once, oldest first, across pages of 100."""
    ref = await cloud_adapter.create_ticket(draft())
    for number in range(150):
        jira_cloud.sim.add_comment(ref.key, f"note {number}")

    comments = await cloud_adapter.list_comments(ref)

    assert [item.body for item in comments] == [f"note {number}" for number in range(150)]
    assert len({item.id for item in comments}) == 150
    assert jira_cloud.sim.calls["GET /rest/api/2/issue/{issue}/comment"] == 2


async def test_marker_round_trip(jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter) -> None:
    """The connector's comment comes back with its marker and account; a person's has none."""
    ref = await cloud_adapter.create_ticket(draft())
    added = await cloud_adapter.add_comment(ref, comment("mdr-comment-1"))
    jira_cloud.sim.add_comment(ref.key, "Confirmed by SOC.")

    mine, human = await cloud_adapter.list_comments(ref)

    assert mine.id == added.id
    assert mine.marker == SyncMarker(MDR_ORIGIN, "mdr-comment-1")
    assert mine.author == cloud_adapter.account
    assert mine.created.tzinfo == timezone.utc
    assert human.marker is None
    assert human.author.id == jira_cloud.sim.human.account_id
    assert jira_cloud.sim.calls["POST /rest/api/2/issue/{issue}/comment"] == 1


async def test_marker_round_trip_datacenter(jira_dc: RunningJira, make_adapter: MakeAdapter) -> None:
    """On Data Center comment authors are user names."""
    adapter = await make_adapter(jira_dc)
    ref = await adapter.create_ticket(draft())
    await adapter.add_comment(ref, comment("c-9"))
    jira_dc.sim.add_comment(ref.key, "ok")

    mine, human = await adapter.list_comments(ref)

    assert mine.author.id == "mdr-connector"
    assert mine.marker == SyncMarker(MDR_ORIGIN, "c-9")
    assert human.author.id == "analyst"


async def test_text_round_trip(cloud_adapter: JiraTicketAdapter) -> None:
    """MDR HTML with Cyrillic, emoji and literal tags survives MDR → Markdown → Jira → Markdown."""
    html = "<p>Хост <b>ws-01</b> изолирован 😀 👍🏽</p><p>Команда: &lt;script&gt;alert(1)&lt;/script&gt; &amp; +7 ~/bin</p>"
    markdown = markup.html_to_markdown(html)
    ref = await cloud_adapter.create_ticket(draft())

    await cloud_adapter.add_comment(ref, comment("c-2", markdown))
    (stored,) = await cloud_adapter.list_comments(ref)

    assert stored.body == markdown
    assert "Хост **ws-01** изолирован 😀 👍🏽" in stored.body
    assert "\\<script\\>alert(1)\\</script\\>" in stored.body
    assert "+7 ~/bin" in stored.body


@pytest.mark.parametrize("zone", ["America/Los_Angeles", "Asia/Vladivostok"])
async def test_changed_tickets_zones(start_jira: StartJira, make_adapter: MakeAdapter, zone: str) -> None:
    """A change after `since` is found, and one before it is not, west and east of UTC."""
    running = await start_jira(service_time_zone=zone)
    adapter = await make_adapter(running)
    old = await adapter.create_ticket(draft("old-incident"))
    changed = await adapter.create_ticket(draft("changed-incident"))
    running.sim.advance(3 * 3600)
    running.sim.add_comment(changed.key, "new evidence")
    updated = running.sim.issue(changed.key).updated

    found = await adapter.changed_tickets(updated - timedelta(minutes=10))
    exact = await adapter.changed_tickets(updated)
    later = await adapter.changed_tickets(updated + timedelta(milliseconds=1))

    assert [change.ref for change in found] == [changed]
    assert found[0].updated == updated
    assert found[0].updated.tzinfo == timezone.utc
    assert [change.ref for change in exact] == [changed]
    assert later == []
    assert old not in [change.ref for change in found]


async def test_changed_tickets_pages(start_jira: StartJira, make_adapter: MakeAdapter) -> None:
    """changed_tickets follows every page on Cloud and on Data Center."""
    for deployment in ("cloud", "datacenter"):
        running = await start_jira(deployment=deployment)
        running.sim.settings.search_page_cap = 2
        adapter = await make_adapter(running)
        since = running.sim.now()
        refs = [await adapter.create_ticket(draft(f"incident-{number}")) for number in range(5)]

        changes = await adapter.changed_tickets(since)

        assert [change.ref for change in changes] == refs


async def paged_search_setup(
    start_jira: StartJira, make_adapter: MakeAdapter, monkeypatch: pytest.MonkeyPatch, deployment: str, step: float
) -> tuple[RunningJira, JiraTicketAdapter, datetime, list[TicketRef], list[float]]:
    """Five new issues `step` seconds apart on a Jira that pages searches by two, and a list that records the adapter's pauses."""
    from mdr_connector.adapters.jira import adapter as jira_adapter

    running, adapter, since, refs = await paged_issues(start_jira, make_adapter, deployment, draft, step)
    pauses: list[float] = []
    monkeypatch.setattr(jira_adapter.time, "sleep", pauses.append)
    return running, adapter, since, refs, pauses


@pytest.mark.parametrize("deployment", ["cloud", "datacenter"])
async def test_change_search_recent_writes(
    start_jira: StartJira, make_adapter: MakeAdapter, monkeypatch: pytest.MonkeyPatch, deployment: str
) -> None:
    """Issues written just before a paged change search are read in one pass, without a pause."""
    _, adapter, since, refs, pauses = await paged_search_setup(start_jira, make_adapter, monkeypatch, deployment, 0)

    changes = await adapter.changed_tickets(since)

    assert [change.ref for change in changes] == refs
    assert pauses == []


@pytest.mark.parametrize("deployment", ["cloud", "datacenter"])
async def test_change_search_issue_moved(
    start_jira: StartJira, make_adapter: MakeAdapter, monkeypatch: pytest.MonkeyPatch, deployment: str
) -> None:
    """An issue edited after its page was read is returned twice, so the search is read again and skips no issue."""
    from mdr_connector.adapters.jira import adapter as jira_adapter

    running, adapter, since, refs, pauses = await paged_search_setup(start_jira, make_adapter, monkeypatch, deployment, 1)
    real_request = jira_adapter._request
    pages: list[str] = []

    def edit_after_first_page(client, method, path, **kwargs):
        reply = real_request(client, method, path, **kwargs)
        if path.startswith("search"):
            pages.append(path)
            if len(pages) == 1:
                running.sim.advance(1)
                running.sim.edit_as_human(refs[0].key, summary="edited while the search was paged")
        return reply

    monkeypatch.setattr(jira_adapter, "_request", edit_after_first_page)

    changes = await adapter.changed_tickets(since)

    assert [change.ref for change in changes] == [*refs[1:], refs[0]]
    assert pauses == [jira_adapter.REORDER_PAUSE_SECONDS]
    # Cloud: three pages with the issue twice, then two clean passes of
    # three. Data Center: two pages until the overlap shows the shift, then
    # four overlapping pages of two.
    assert len(pages) == (9 if deployment == "cloud" else 6)


async def test_changed_tickets_needs_zone(cloud_adapter: JiraTicketAdapter) -> None:
    """A naive `since` is a programming error."""
    adapter = cloud_adapter

    with pytest.raises(ValueError):
        await adapter.changed_tickets(datetime(2026, 1, 1))


@pytest.mark.parametrize(
    ("since", "zone", "literal"),
    [
        (datetime(2026, 12, 4, 10, 0, 59, tzinfo=timezone.utc), "America/Los_Angeles", "2026/12/04 02:00"),
        (datetime(2026, 12, 4, 10, 0, 59, tzinfo=timezone.utc), "Asia/Vladivostok", "2026/12/04 20:00"),
        (datetime(2026, 11, 1, 8, 30, tzinfo=timezone.utc), "America/Los_Angeles", "2026/11/01 00:30"),
        (datetime(2026, 11, 1, 9, 30, tzinfo=timezone.utc), "America/Los_Angeles", "2026/11/01 01:30"),
        (datetime(2026, 12, 4, 10, 0, tzinfo=timezone.utc), None, "2026/12/03 20:00"),
    ],
    ids=["west", "east", "dst-first-pass", "dst-second-pass", "unknown-zone"],
)
def test_jql_minute(since: datetime, zone: str | None, literal: str) -> None:
    """The JQL bound is `since` in the account's zone, floored, and never later than `since`."""
    assert jql_minute(since, ZoneInfo(zone) if zone else None) == literal


async def test_update_keeps_labels(jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter) -> None:
    """update_ticket writes the fields and adds labels without removing any."""
    ref = await cloud_adapter.create_ticket(draft())
    jira_cloud.sim.edit_as_human(ref.key, labels=[*jira_cloud.sim.issue(ref.key).fields["labels"], "triaged"])

    fields = TicketFields(summary="Updated", description="*new*", priority="Low", labels=("closed",))
    await cloud_adapter.update_ticket(ref, fields)
    issue = jira_cloud.sim.issue(ref.key)

    assert issue.fields["labels"] == ["mdr-connector", f"mdr-{INCIDENT_ID}", "mdr_high", "triaged", "closed"]
    assert issue.fields["summary"] == "Updated"
    assert issue.fields["description"] == "_new_"
    assert issue.fields["priority"] == "Low"


async def test_rejected_names_field(cloud_adapter: JiraTicketAdapter) -> None:
    """An unknown priority is RejectedError with status 400 naming the field."""
    with pytest.raises(RejectedError) as caught:
        await cloud_adapter.create_ticket(draft(priority="Urgent"))

    assert caught.value.status == 400
    assert "priority: Priority name 'Urgent' is not valid." in str(caught.value)


async def test_routed_project(jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter) -> None:
    """A ticket in another project, with components, is created, found and reported as changed."""
    since = jira_cloud.sim.now()
    fields = TicketFields("Routed", "text", "High", ("retail",), components=("Servers", "Servers"))
    ref = await cloud_adapter.create_ticket(TicketDraft(INCIDENT_ID, "OPS", "Task", fields))
    issue = jira_cloud.sim.issue(ref.key)

    assert ref.key == "OPS-1"
    assert issue.fields["components"] == ["Servers"]
    assert await cloud_adapter.find_ticket(INCIDENT_ID) == ref
    assert [change.ref for change in await cloud_adapter.changed_tickets(since)] == [ref]


async def test_checked_project_searched(jira_cloud: RunningJira, make_adapter: MakeAdapter) -> None:
    """A project named in check is searched from then on, as after a restart with routes."""
    sim = jira_cloud.sim
    sim.create_issue(
        {"project": {"key": "OPS"}, "issuetype": {"name": "Task"}, "summary": "x", "labels": ["mdr-connector", "mdr-routed"]},
        properties=[{"key": "mdr-connector", "value": {"incident_id": "routed"}}],
    )
    adapter = await make_adapter(jira_cloud)

    before = await adapter.find_ticket("routed")
    problems = await adapter.check("Task", ["High"], project="OPS")
    after = await adapter.find_ticket("routed")

    assert before is None
    assert problems == []
    assert after is not None
    assert after.key == "OPS-1"


async def test_other_projects_setting(jira_cloud: RunningJira, monkeypatch: pytest.MonkeyPatch) -> None:
    """Projects given to the constructor are searched from the start."""
    adapter = JiraTicketAdapter(jira_settings(jira_cloud, monkeypatch), "SEC", other_projects=["OPS"])
    await adapter.open()
    try:
        since = jira_cloud.sim.now()
        issue = jira_cloud.sim.create_issue({"project": {"key": "OPS"}, "issuetype": {"name": "Task"}, "summary": "x"})
        changes = await adapter.changed_tickets(since)
    finally:
        await adapter.close()

    assert [change.ref.key for change in changes] == [issue.key]


async def test_unknown_component_rejected(cloud_adapter: JiraTicketAdapter) -> None:
    """A component the project lacks is RejectedError 400 naming it, in Jira's error form."""
    with pytest.raises(RejectedError) as caught:
        await cloud_adapter.create_ticket(draft(components=("Mainframe",)))

    assert caught.value.status == 400
    assert "components: Component name 'Mainframe' is not valid" in str(caught.value)


async def test_invalid_project_key(cloud_adapter: JiraTicketAdapter) -> None:
    """A project key that could not be one is a ConfigError before any request."""
    with pytest.raises(ConfigError, match="project key"):
        await cloud_adapter.create_ticket(TicketDraft(INCIDENT_ID, 'SEC" OR x', "Task", draft().fields))


async def test_update_skips_owned_fields(jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter) -> None:
    """Fields in `skip` keep a person's values, the others are written, and components are only added."""
    ref = await cloud_adapter.create_ticket(draft(components=("Endpoint",), extra={"customfield_10010": "a"}))
    jira_cloud.sim.edit_as_human(ref.key, priority="Lowest", summary="Analyst title", components=["Endpoint", "Identity"])

    fields = TicketFields(
        "MDR title", "new text", "Highest", ("later",), extra={"customfield_10010": "b"}, components=("Network",)
    )
    await cloud_adapter.update_ticket(ref, fields, skip=frozenset({"priority", "summary", "customfield_10010"}))
    issue = jira_cloud.sim.issue(ref.key)

    assert issue.fields["priority"] == "Lowest"
    assert issue.fields["summary"] == "Analyst title"
    assert issue.fields["customfield_10010"] == "a"
    assert issue.fields["description"] == "new text"
    assert issue.fields["components"] == ["Endpoint", "Identity", "Network"]
    assert issue.fields["labels"][-1] == "later"


async def test_update_all_skipped(jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter) -> None:
    """With every field skipped, no request is sent."""
    ref = await cloud_adapter.create_ticket(draft())
    skip = frozenset({"summary", "description", "priority", "labels", "components"})

    await cloud_adapter.update_ticket(ref, TicketFields("x", "y", "Low", ("z",), components=("Network",)), skip=skip)

    assert jira_cloud.sim.calls["PUT /rest/api/2/issue/{issue}"] == 0


async def test_check_other_project(cloud_adapter: JiraTicketAdapter) -> None:
    """check looks at the named project and reports its own issue types."""
    problems = await cloud_adapter.check("Incident", ["High"], project="OPS")
    missing = await cloud_adapter.check("Task", [], project="NOPE")

    assert problems == ["issue type 'Incident' is not available in project OPS; available: Task"]
    assert missing == ["project 'NOPE' does not exist or the connector's account cannot see it"]
    assert list(cloud_adapter.searched_projects) == ["SEC", "OPS"]


async def test_invalid_incident_id(cloud_adapter: JiraTicketAdapter) -> None:
    """An incident id that cannot be a label is InvalidPayloadError."""
    with pytest.raises(InvalidPayloadError):
        await cloud_adapter.find_ticket("bad id")


async def test_check_reports_problems(cloud_adapter: JiraTicketAdapter) -> None:
    """check names a missing issue type and priority, and accepts good ones."""
    problems = await cloud_adapter.check("Bug", ["High", "Urgent"])

    assert len(problems) == 2
    assert "issue type 'Bug'" in problems[0]
    assert "priority 'Urgent'" in problems[1]
    assert await cloud_adapter.check("Incident", ["High", "Low"]) == []


async def test_check_missing_project(jira_cloud: RunningJira, make_adapter: MakeAdapter) -> None:
    """check reports a project the account cannot see."""
    adapter = await make_adapter(jira_cloud, project="NOPE")

    problems = await adapter.check("Task", [])

    assert problems == ["project 'NOPE' does not exist or the connector's account cannot see it"]


async def test_search_delay_setting(jira_cloud: RunningJira, make_adapter: MakeAdapter) -> None:
    """A configured search delay wins over the Cloud default."""
    adapter = await make_adapter(jira_cloud, search_delay_seconds=5)

    assert adapter.search_delay_seconds() == 5


async def test_deployment_override(jira_dc: RunningJira, make_adapter: MakeAdapter) -> None:
    """A configured deployment wins over serverInfo's deploymentType."""
    adapter = await make_adapter(jira_dc, deployment="datacenter")
    await adapter.changed_tickets(datetime.now(timezone.utc))

    assert adapter.deployment == "datacenter"
    assert jira_dc.sim.calls["GET /rest/api/2/search"] == 1


# Hostile and oversized input


def utf16_length(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


async def test_reports_restricted_comments(jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter) -> None:
    """A comment limited to a role or a group is reported as restricted, and other comments are not."""
    ref = await cloud_adapter.create_ticket(draft())
    sim = jira_cloud.sim
    sim.add_comment(ref.key, "role only", visibility={"type": "role", "value": "Administrators"})
    sim.add_comment(ref.key, "group only", visibility={"type": "group", "value": "soc-team"})
    sim.add_comment(ref.key, "for everyone")
    added = await cloud_adapter.add_comment(ref, comment("c-3"))

    listed = await cloud_adapter.list_comments(ref)

    assert [(item.body, item.restricted) for item in listed] == [
        ("role only", True),
        ("group only", True),
        ("for everyone", False),
        ("Checked the host.", False),
    ]
    assert added.restricted is False


async def test_restricted_datacenter(jira_dc: RunningJira, make_adapter: MakeAdapter) -> None:
    """Data Center comments with a visibility are restricted too."""
    adapter = await make_adapter(jira_dc)
    ref = await adapter.create_ticket(draft())
    jira_dc.sim.add_comment(ref.key, "internal", visibility={"type": "role", "value": "Developers"})

    (listed,) = await adapter.list_comments(ref)

    assert listed.restricted is True


async def test_comment_visibility_sent(jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter) -> None:
    """A draft's visibility reaches Jira, and the comment is reported as restricted."""
    ref = await cloud_adapter.create_ticket(draft())
    visibility = CommentVisibility("group", "soc-analysts")

    added = await cloud_adapter.add_comment(ref, CommentDraft("internal", SyncMarker(MDR_ORIGIN, "c-5"), visibility))

    assert jira_cloud.sim.issue(ref.key).comments[0].visibility == {"type": "group", "value": "soc-analysts"}
    assert added.restricted is True


@pytest.mark.parametrize("deployment", ["cloud", "datacenter"])
async def test_service_desk_internal(start_jira: StartJira, make_adapter: MakeAdapter, deployment: str) -> None:
    """A Jira Service Management internal note is restricted, but an explicit public one is not."""
    running = await start_jira(deployment=deployment)
    adapter = await make_adapter(running)
    ref = await adapter.create_ticket(draft())
    running.sim.add_comment(ref.key, "agents only", internal=True)
    public = {"key": "sd.public.comment", "value": {"internal": False}}
    running.sim.add_comment(ref.key, "for the customer", properties=[public])

    internal, shared = await adapter.list_comments(ref)

    assert internal.restricted is True
    assert shared.restricted is False


async def test_comment_updated_time(jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter) -> None:
    """Comments carry their `updated` time, which moves when a person edits one."""
    ref = await cloud_adapter.create_ticket(draft())
    added = jira_cloud.sim.add_comment(ref.key, "first")
    jira_cloud.sim.advance(90)
    jira_cloud.sim.edit_comment(added.id, "second")

    (listed,) = await cloud_adapter.list_comments(ref)

    assert listed.body == "second"
    assert listed.updated == added.updated
    assert listed.updated is not None
    assert listed.updated - listed.created >= timedelta(seconds=90)


@pytest.mark.parametrize("deployment", ["cloud", "datacenter"])
async def test_edit_comment(start_jira: StartJira, make_adapter: MakeAdapter, deployment: str) -> None:
    """edit_comment replaces the body, keeps the marker and moves `updated`."""
    running = await start_jira(deployment=deployment)
    adapter = await make_adapter(running)
    ref = await adapter.create_ticket(draft())
    added = await adapter.add_comment(ref, comment("resp-1", "Status: **New**"))
    running.sim.advance(30)

    edited = await adapter.edit_comment(ref, added.id, comment("resp-1", "Status: **Confirmed**"))
    (listed,) = await adapter.list_comments(ref)

    assert edited.id == added.id
    assert edited.body == "Status: **Confirmed**"
    assert listed.body == "Status: **Confirmed**"
    assert listed.marker == SyncMarker(MDR_ORIGIN, "resp-1")
    assert listed.updated is not None
    assert added.updated is not None
    assert listed.updated > added.updated
    assert running.sim.issue(ref.key).comments[0].body == "Status: *Confirmed*"


async def test_edit_restores_marker(jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter) -> None:
    """An edit writes the marker property again when someone removed it."""
    ref = await cloud_adapter.create_ticket(draft())
    added = await cloud_adapter.add_comment(ref, comment("resp-2"))
    jira_cloud.sim.issue(ref.key).comments[0].properties.clear()

    await cloud_adapter.edit_comment(ref, added.id, comment("resp-2", "again"))
    (listed,) = await cloud_adapter.list_comments(ref)

    assert listed.marker == SyncMarker(MDR_ORIGIN, "resp-2")


async def test_edit_others_comment_rejected(jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter) -> None:
    """Jira lets only the author edit a comment, so a person's comment is RejectedError 403."""
    ref = await cloud_adapter.create_ticket(draft())
    human = jira_cloud.sim.add_comment(ref.key, "mine")

    with pytest.raises(RejectedError) as caught:
        await cloud_adapter.edit_comment(ref, str(human.id), comment("x"))

    assert caught.value.status == 403
    assert human.body == "mine"


# Tickets that ask for an MDR incident, correlation, groups


@pytest.mark.parametrize("deployment", ["cloud", "datacenter"])
async def test_find_tickets(start_jira: StartJira, make_adapter: MakeAdapter, deployment: str) -> None:
    """find_tickets returns labelled tickets of the issue type created since the bound, oldest first, across pages."""
    running = await start_jira(deployment=deployment, service_time_zone="America/Los_Angeles")
    running.sim.settings.search_page_cap = 2
    sim = running.sim
    adapter = await make_adapter(running)

    def person_creates(summary: str, issue_type: str = "Incident", labels: tuple[str, ...] = ("mdr-create",)) -> str:
        fields = {"project": {"key": "SEC"}, "issuetype": {"name": issue_type}, "summary": summary, "labels": list(labels)}
        return sim.create_issue(fields, reporter=sim.human).key

    old = person_creates("before the bound")
    sim.advance(600)
    since = sim.now()
    wanted = [person_creates(f"request {number}") for number in range(4)]
    sim.advance(1)
    other_type = person_creates("task", issue_type="Task")
    unlabelled = person_creates("no label", labels=())

    by_label = await adapter.find_tickets(TicketQuery("SEC", label="mdr-create"), since)
    by_both = await adapter.find_tickets(TicketQuery("SEC", label="mdr-create", issue_type="Incident"), since)
    by_type = await adapter.find_tickets(TicketQuery("SEC", issue_type="Task"), since)

    assert [ref.key for ref in by_label] == [*wanted, other_type]
    assert [ref.key for ref in by_both] == wanted
    assert [ref.key for ref in by_type] == [other_type]
    assert old not in [ref.key for ref in by_label]
    assert unlabelled not in [ref.key for ref in by_label]


async def test_find_tickets_needs_filter(cloud_adapter: JiraTicketAdapter) -> None:
    """A query without label or issue type would match every ticket, so it is a ConfigError."""
    with pytest.raises(ConfigError):
        await cloud_adapter.find_tickets(TicketQuery("SEC"), datetime.now(timezone.utc))


@pytest.mark.parametrize("deployment", ["cloud", "datacenter"])
async def test_set_correlation(start_jira: StartJira, make_adapter: MakeAdapter, deployment: str) -> None:
    """set_correlation stamps a person's ticket like a created one, so find_ticket finds it, and a repeat changes nothing."""
    running = await start_jira(deployment=deployment)
    adapter = await make_adapter(running)
    issue = running.sim.create_issue(
        {"project": {"key": "SEC"}, "issuetype": {"name": "Incident"}, "summary": "x", "labels": ["mdr-create"]},
        reporter=running.sim.human,
    )
    ref = TicketRef(issue.key, str(issue.id), f"{running.url}/browse/{issue.key}")

    await adapter.set_correlation(ref, INCIDENT_ID)
    await adapter.set_correlation(ref, INCIDENT_ID)

    assert issue.fields["labels"] == ["mdr-create", "mdr-connector", f"mdr-{INCIDENT_ID}"]
    assert issue.properties["mdr-connector"] == {"incident_id": INCIDENT_ID}
    assert await adapter.find_ticket(INCIDENT_ID) == ref


async def test_set_correlation_conflict(jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter) -> None:
    """A ticket of another incident keeps its marker, and the call is RejectedError naming both ids."""
    ref = await cloud_adapter.create_ticket(draft())

    with pytest.raises(RejectedError, match=f"already linked to MDR incident {INCIDENT_ID}"):
        await cloud_adapter.set_correlation(ref, "another-incident")

    assert jira_cloud.sim.issue(ref.key).properties["mdr-connector"]["incident_id"] == INCIDENT_ID
    assert "mdr-another-incident" not in jira_cloud.sim.issue(ref.key).fields["labels"]


@pytest.mark.parametrize("deployment", ["cloud", "datacenter"])
async def test_account_groups(start_jira: StartJira, make_adapter: MakeAdapter, deployment: str) -> None:
    """Groups come by accountId on Cloud and by user name on Data Center, and an unknown account has none."""
    running = await start_jira(deployment=deployment)
    adapter = await make_adapter(running)
    human = running.sim.human
    account_id = human.account_id if deployment == "cloud" else human.name

    assert await adapter.account_groups(account_id) == {"jira-software-users", "soc-analysts"}
    assert await adapter.account_groups("nobody") == set()
    assert await adapter.account_groups("") == set()
    path = "GET /rest/api/2/user/groups" if deployment == "cloud" else "GET /rest/api/2/user"
    assert running.sim.calls[path] == 2


async def test_cleans_outgoing_text(jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter) -> None:
    """Lone surrogates and control characters in summary, description, labels and comments never reach Jira."""
    fields = {"summary": "Alert\ud800\x00 on host", "description": "Bad \udc00 text\x07", "labels": ("tag\ud800\x01",)}
    ref = await cloud_adapter.create_ticket(draft(**fields))
    await cloud_adapter.add_comment(ref, comment("c-4", "note \ud800\x1b end"))
    issue = jira_cloud.sim.issue(ref.key)

    assert issue.fields["summary"] == "Alert\ufffd on host"
    assert issue.fields["description"] == "Bad \ufffd text"
    assert issue.fields["labels"][-1] == "tag\ufffd"
    assert issue.comments[0].body == "note \ufffd end"


async def test_reads_lone_surrogate(jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter) -> None:
    """A comment stored with a lone surrogate is read with U+FFFD in its place."""
    ref = await cloud_adapter.create_ticket(draft())
    jira_cloud.sim.add_comment(ref.key, "odd \ud800 text")

    (listed,) = await cloud_adapter.list_comments(ref)

    assert listed.body == "odd \ufffd text"


async def test_long_description_cut(
    jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter, caplog: pytest.LogCaptureFixture
) -> None:
    """A description over Jira's limit is cut with a note instead of being rejected."""
    with caplog.at_level(logging.WARNING, logger="mdr_connector.adapters.jira.adapter"):
        ref = await cloud_adapter.create_ticket(draft(description="word " * 10000))
    stored = jira_cloud.sim.issue(ref.key).fields["description"]

    assert utf16_length(stored) <= MAX_TEXT_LENGTH
    assert stored.startswith("word word")
    assert stored.endswith(TRUNCATION_NOTE)
    assert [record.message for record in caplog.records] == ["jira.text.truncated"]
    assert caplog.records[0].incident_id == INCIDENT_ID


async def test_long_update_and_comment_cut(jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter) -> None:
    """update_ticket and add_comment cut long text of emoji without leaving half a surrogate pair."""
    ref = await cloud_adapter.create_ticket(draft())
    text = "😀" * 20000
    fields = TicketFields(summary="s", description=text, priority=None, labels=())

    await cloud_adapter.update_ticket(ref, fields)
    await cloud_adapter.add_comment(ref, comment("c-5", text))
    issue = jira_cloud.sim.issue(ref.key)

    for stored in (issue.fields["description"], issue.comments[0].body):
        assert utf16_length(stored) <= MAX_TEXT_LENGTH
        assert stored.endswith(TRUNCATION_NOTE)
        assert stored.removesuffix(TRUNCATION_NOTE).strip("😀") == ""
        stored.encode("utf-8")


async def test_huge_description(jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter) -> None:
    """A 5 MB description skips pandoc, and its `{noformat}` block is closed before the note."""
    ref = await cloud_adapter.create_ticket(draft(description="<b>" + "x" * 5_000_000))
    stored = jira_cloud.sim.issue(ref.key).fields["description"]

    assert utf16_length(stored) <= MAX_TEXT_LENGTH
    assert stored.startswith("{noformat}\n<b>xxx")
    assert stored.endswith("xxx\n{noformat}" + TRUNCATION_NOTE)


@pytest.mark.parametrize(
    ("markdown", "closer"),
    [
        ("```python\n" + "print(1)\n" * 5000 + "```", "{code}"),
        ("```\n" + "line\n" * 8000 + "```", "{noformat}"),
    ],
    ids=["code", "noformat"],
)
async def test_cut_block_closed(
    jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter, markdown: str, closer: str
) -> None:
    """A cut inside a code block closes the block before the note."""
    ref = await cloud_adapter.create_ticket(draft())

    await cloud_adapter.add_comment(ref, comment("c-6", markdown))
    stored = jira_cloud.sim.issue(ref.key).comments[0].body

    assert utf16_length(stored) <= MAX_TEXT_LENGTH
    assert stored.endswith(f"\n{closer}{TRUNCATION_NOTE}")


@pytest.mark.parametrize(
    ("wiki", "ending"),
    [
        ("a" * (MAX_TEXT_LENGTH - 80) + "😀" * 100, "😀"),
        ("{code}x{code}" + "b" * MAX_TEXT_LENGTH, "b"),
        ("\\{code} " + "c" * MAX_TEXT_LENGTH, "c"),
        ("{noformat}{code}" + "d" * MAX_TEXT_LENGTH, "d\n{noformat}"),
        ("{code:java}{noformat}" + "e" * MAX_TEXT_LENGTH, "e\n{code}"),
    ],
    ids=["surrogate-pair", "closed-block", "escaped-macro", "code-inside-noformat", "noformat-inside-code"],
)
def test_truncated(wiki: str, ending: str) -> None:
    """Cut text fits Jira's limit, keeps whole characters and closes only a block left open."""
    cut = _truncated(wiki)

    assert utf16_length(cut) <= MAX_TEXT_LENGTH
    assert cut.endswith(ending + TRUNCATION_NOTE)
    cut.encode("utf-8")


async def test_text_at_limit_kept(jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter) -> None:
    """A description exactly at Jira's limit is sent whole."""
    text = "😀" * (MAX_TEXT_LENGTH // 2) + "a"

    ref = await cloud_adapter.create_ticket(draft(description=text))

    assert utf16_length(text) == MAX_TEXT_LENGTH
    assert jira_cloud.sim.issue(ref.key).fields["description"] == text


def reply_error(status: int, body: Any = None, headers: dict[str, str] | None = None) -> JIRAError:
    """Build the JIRAError the jira package raises for an HTTP error reply."""
    response = requests.Response()
    response.status_code = status
    response.headers.update(headers or {})
    if body is None:
        response._content = b""
    elif isinstance(body, bytes):
        response._content = body
    else:
        response._content = json.dumps(body).encode()
    request_headers = {"Authorization": "Basic c2VjcmV0LXRva2Vu"}
    return JIRAError("from jira", status_code=status, url="http://127.0.0.1/x", response=response, headers=request_headers)


def connection_refused() -> requests.ConnectionError:
    reason = NewConnectionError(None, "Connection refused")
    return requests.ConnectionError(MaxRetryError(None, "/rest/api/2/issue", reason))


def aborted() -> requests.ConnectionError:
    return requests.ConnectionError(ProtocolError("Connection aborted.", ConnectionResetError()))


FIELD_ERRORS = {"errorMessages": [], "errors": {"priority": "Priority name 'Urgent' is not valid."}}


@pytest.mark.parametrize(
    ("error", "flags", "expected", "retry_after", "text"),
    [
        (reply_error(401), {"opening": True}, CredentialsRejectedError, None, "credentials"),
        (reply_error(401), {}, CredentialsRejectedError, None, "HTTP 401"),
        (reply_error(403), {"opening": True}, CredentialsRejectedError, None, "HTTP 403"),
        (reply_error(403, headers={"X-Authentication-Denied-Reason": "CAPTCHA_CHALLENGE"}), {}, CredentialsRejectedError, None, "HTTP 403"),
        (reply_error(403, {"errorMessages": ["No permission"]}), {}, RejectedError, None, "No permission"),
        (reply_error(429, headers={"Retry-After": "30"}), {"write": True}, RateLimitedError, 30.0, "HTTP 429"),
        (reply_error(429), {}, RateLimitedError, None, "HTTP 429"),
        (reply_error(503, headers={"Retry-After": "12"}), {}, RateLimitedError, 12.0, "HTTP 503"),
        (reply_error(503), {}, RemoteUnavailableError, None, "HTTP 503"),
        (reply_error(502, b"<html>gateway</html>"), {}, RemoteUnavailableError, None, "HTTP 502"),
        (reply_error(500), {"write": True}, OutcomeUnknownError, None, "HTTP 500"),
        (reply_error(400, FIELD_ERRORS), {"write": True}, RejectedError, None, "priority: Priority name"),
        (reply_error(404), {"opening": True}, ConnectionFatalError, None, "url"),
        (reply_error(404, {"errorMessages": ["Issue does not exist"]}), {}, RejectedError, None, "Issue does not exist"),
        (reply_error(408), {"write": True}, RemoteUnavailableError, None, "HTTP 408"),
        (reply_error(413), {"write": True}, RejectedError, None, "too large"),
        (requests.ReadTimeout("read timed out"), {"write": True}, OutcomeUnknownError, None, "ReadTimeout"),
        (requests.ReadTimeout("read timed out"), {}, RemoteUnavailableError, None, "ReadTimeout"),
        (aborted(), {"write": True}, OutcomeUnknownError, None, "marker"),
        (aborted(), {}, RemoteUnavailableError, None, "ConnectionError"),
        (connection_refused(), {"write": True}, RemoteUnavailableError, None, "cannot connect"),
        (requests.ConnectTimeout("connect timed out"), {"write": True}, RemoteUnavailableError, None, "cannot connect"),
        (JIRAError("Empty Response!"), {"write": True}, OutcomeUnknownError, None, "without an HTTP status"),
    ],
    ids=[
        "401-open", "401-later", "403-open", "403-denied-reason", "403-permission", "429-retry-after",
        "429-no-header", "503-retry-after", "503-plain", "502-html", "500-write", "400-field",
        "404-open", "404-read", "408-write", "413-write", "read-timeout-write", "read-timeout-read",
        "aborted-write", "aborted-read", "refused-write", "connect-timeout-write", "no-status-write",
    ],
)
def test_error_mapping(
    error: Exception, flags: dict[str, bool], expected: type[Exception], retry_after: float | None, text: str
) -> None:
    """Each library failure maps to the connector error its recovery needs."""
    mapped = map_error(error, "create_ticket", **flags)  # type: ignore[arg-type]

    assert type(mapped) is expected
    assert text in str(mapped)
    assert "c2VjcmV0" not in str(mapped)
    assert "<html>" not in str(mapped)
    if isinstance(mapped, RateLimitedError):
        assert mapped.retry_after == retry_after


@pytest.mark.parametrize(
    ("operation", "words"),
    [
        ("open", "while connecting"),
        ("check", "while checking the project, issue type and priorities"),
        ("find_ticket", "while searching for the ticket of an incident"),
        ("changed_tickets", "while searching for changed tickets"),
        ("update_ticket", "while updating a ticket"),
        ("list_comments", "while reading the comments of a ticket"),
        ("add_comment", "while adding a comment to a ticket"),
        ("edit_comment", "while editing a comment of a ticket"),
        ("upload_attachment", "while uploading an attachment"),
        ("transition_to", "while changing the status of a ticket"),
        ("account_groups", "while reading the groups of an account"),
    ],
)
def test_error_names_operation_plainly(operation: str, words: str) -> None:
    """Messages describe the operation in plain words, not by the adapter's method name."""
    mapped = map_error(reply_error(400, {"errorMessages": ["Bad request."]}), operation)

    assert str(mapped) == f"Jira rejected the request {words} (HTTP 400): Bad request."


def test_connect_error_names_url() -> None:
    """A connection failure names the configured Jira URL, without user name or password, and the fix."""
    mapped = map_error(connection_refused(), "list_comments", url="https://bot:hunter2@jira.example.com/jira")

    assert str(mapped) == (
        "cannot connect to Jira at https://jira.example.com/jira while reading the comments of a ticket: "
        "ConnectionError; check ticket.url and the network"
    )


def test_connect_error_url_from_request() -> None:
    """Without a configured URL, the message names the host that requests tried."""
    error = connection_refused()
    error.request = requests.Request("GET", "https://jira.example.com:8443/rest/api/2/myself").prepare()

    mapped = map_error(error, "open")

    assert str(mapped).startswith("cannot connect to Jira at https://jira.example.com:8443 while connecting: ")


def test_certificate_error_names_url() -> None:
    """A failed certificate check names the Jira URL, the host, the reason and the fix."""
    reason = ssl.SSLCertVerificationError(1, "certificate verify failed")
    reason.verify_message = "unable to get local issuer certificate"
    error = requests.exceptions.SSLError(MaxRetryError(None, "/rest/api/2/myself", reason))

    mapped = map_error(error, "open", url="https://jira.example.com")

    assert isinstance(mapped, RemoteUnavailableError)
    assert str(mapped) == (
        "Jira connection to https://jira.example.com failed: the TLS certificate of jira.example.com could not "
        "be verified (unable to get local issuer certificate): set ca_bundle to the PEM file of the CA that "
        "issued it, or add that CA to the system store"
    )


def test_credentials_error_single_period() -> None:
    """Jira's sentence-ending period does not run into the advice that follows it."""
    body = {"errorMessages": ["You are not authenticated: the credentials are missing or wrong."]}

    mapped = map_error(reply_error(401, body), "open", opening=True, url="https://jira.example.com")

    assert str(mapped) == (
        "Jira at https://jira.example.com rejected the credentials while connecting (HTTP 401): "
        "You are not authenticated: the credentials are missing or wrong; "
        "check the account and the API token or password in ticket.auth"
    )


def test_retry_after_http_date() -> None:
    """A Retry-After HTTP date becomes seconds from now."""
    moment = datetime.now(timezone.utc) + timedelta(seconds=120)
    header = moment.strftime("%a, %d %b %Y %H:%M:%S GMT")

    mapped = map_error(reply_error(429, headers={"Retry-After": header}), "list_comments")

    assert isinstance(mapped, RateLimitedError)
    assert mapped.retry_after is not None
    assert 60 < mapped.retry_after <= 120


@pytest.mark.parametrize("deployment", ["cloud", "datacenter"])
async def test_get_ticket_by_key_or_id(start_jira: StartJira, make_adapter: MakeAdapter, deployment: str) -> None:
    """get_ticket reads an issue by key or by numeric id and returns None for an unknown one or a malformed text."""
    adapter = await make_adapter(await start_jira(deployment=deployment))
    ref = await adapter.create_ticket(draft())

    assert await adapter.get_ticket(ref.key) == ref
    assert await adapter.get_ticket(ref.id) == ref
    assert await adapter.get_ticket("999999") is None
    assert await adapter.get_ticket("../myself") is None


@pytest.mark.parametrize(
    "text",
    [
        "2026-12-04T10:00:00.000+0300",
        "2026-12-04T10:00:00.123-0530",
        "2026-12-04T10:00:00+0000",
        "2026-12-04T10:00:00.000Z",
        "2026-12-04T10:00:00.000+03:00",
        "2026-12-04T23:59:59.999-1200",
    ],
)
def test_jira_time_read_as_strptime(text: str) -> None:
    """Jira times read by the fast path equal what strptime reads, in UTC."""
    pattern = "%Y-%m-%dT%H:%M:%S.%f%z" if "." in text else "%Y-%m-%dT%H:%M:%S%z"
    expected = datetime.strptime(text, pattern).astimezone(timezone.utc)

    assert _parse_time(text) == expected
    assert _parse_time(text).tzinfo == timezone.utc


@pytest.mark.parametrize(
    "text", ["2026-02-30T10:00:00.000+0300", "2026-12-04T10:00:00.000+9900", "2026-12-04T10:00:00.000", "2026-12-04"]
)
def test_jira_time_invalid(text: str) -> None:
    """An impossible date, an offset of a day or more, or a time without an offset is invalid."""
    with pytest.raises(InvalidPayloadError, match="unreadable time"):
        _parse_time(text)
