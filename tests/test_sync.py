"""The engine end to end: MDR simulator, Jira simulator, SQLite ledger, real HTTP on loopback."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
from fixtures_mdr import MDR_CLIENT_ID, MDR_CONNECTION_NAME
from fixtures_sync import SyncHarness

from mdr_connector.connector.config import FilterSettings
from mdr_connector.connector.engine import INCIDENT
from mdr_connector.connector.store import LINKED, PENDING

pytestmark = pytest.mark.asyncio

CREATE_ISSUE = "POST /rest/api/2/issue"


def marker_sources(issue) -> Counter:
    """Count the MDR comment ids that the connector's comments on an issue carry."""
    sources = Counter(comment.properties.get("mdr-connector", {}).get("source_id") for comment in issue.comments)
    sources.pop(None, None)
    return sources


async def test_new_incident_becomes_ticket(harness: SyncHarness) -> None:
    """A new incident gets one issue with the mapped fields, labels, property and comments."""
    incident = harness.seed(summary="Подозрительный PowerShell", priority="HIGH")
    harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident["incident_id"], "<p>Проверьте хост</p>", author="SOC Analyst")

    sync = await harness.cycles(1)

    issue = harness.issue_for(incident["incident_id"])
    assert issue.fields["summary"] == f"[MDR-{incident['incident_number']}] Подозрительный PowerShell"
    assert issue.fields["priority"] == "High"
    assert "mdr-connector" in issue.fields["labels"]
    assert issue.properties["mdr-connector"]["incident_id"] == incident["incident_id"]
    assert f"https://mdr.kaspersky.com/incidents/{incident['incident_id']}" in issue.fields["description"]
    assert marker_sources(issue) == Counter({harness.mdr_comments(incident["incident_id"])[0]["comment_id"]: 1})
    assert "SOC Analyst" in issue.comments[0].body
    assert sync.stats.tickets_created == 1


async def test_echo_three_cycles(harness: SyncHarness) -> None:
    """One MDR comment and one Jira comment, three full cycles: exactly one copy of each on each side."""
    incident = harness.seed()
    incident_id = incident["incident_id"]
    sync = await harness.cycles(1)
    issue = harness.issue_for(incident_id)

    harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>MDR analyst note</p>", author="Ivan Petrov")
    harness.jira.sim.add_comment(issue.key, "Jira engineer note")
    await harness.cycles(3, sync)

    mdr_texts = [comment["text"] for comment in harness.mdr_comments(incident_id)]
    jira_bodies = [comment.body for comment in issue.comments]
    assert sum("MDR analyst note" in text for text in mdr_texts) == 1
    assert sum("Jira engineer note" in text for text in mdr_texts) == 1
    assert sum("MDR analyst note" in body for body in jira_bodies) == 1
    assert sum("Jira engineer note" in body for body in jira_bodies) == 1
    assert [c["author_name"] for c in harness.mdr_comments(incident_id)].count(MDR_CONNECTION_NAME) == 1
    assert len(sync.stats.echoes_suppressed) == 2


async def test_crash_between_create_and_link(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a crash between the Jira create and the link commit, the issue is found by its label, not created again."""
    incident_id = harness.seed()["incident_id"]
    sync = await harness.engine()

    class SimulatedCrash(BaseException):
        pass

    real_create = sync.tickets.create_ticket

    async def create_then_crash(draft):
        await real_create(draft)
        raise SimulatedCrash

    monkeypatch.setattr(sync.tickets, "create_ticket", create_then_crash)
    with pytest.raises(SimulatedCrash):
        await sync.run_cycle()
    assert (await harness.store.get_link("main", incident_id)).state == PENDING

    restarted = await harness.cycles(1)
    assert harness.jira.sim.calls[CREATE_ISSUE] == 1
    assert (await harness.store.get_link("main", incident_id)).state == PENDING

    harness.advance(31)
    await harness.cycles(1, restarted)
    await restarted.retry_parked()

    link = await harness.store.get_link("main", incident_id)
    assert link.state == LINKED
    assert link.ticket_key == harness.issue_for(incident_id).key
    assert harness.jira.sim.calls[CREATE_ISSUE] == 1


async def test_lost_create_reply_is_looked_up(harness: SyncHarness) -> None:
    """A create whose reply was lost is resolved by a label lookup after the search delay."""
    incident_id = harness.seed()["incident_id"]
    harness.jira.sim.drop_reply_after_commit("POST", "/rest/api/2/issue")

    sync = await harness.cycles(1)
    assert (await harness.store.get_parked("main", INCIDENT, incident_id)) is not None

    harness.advance(31)
    await harness.cycles(1, sync)

    assert len(harness.issues_for(incident_id)) == 1
    assert harness.jira.sim.calls[CREATE_ISSUE] == 1
    assert (await harness.store.get_link("main", incident_id)).state == LINKED
    assert await harness.store.get_parked("main", INCIDENT, incident_id) is None


async def test_lost_comment_reply_is_not_reposted(harness: SyncHarness) -> None:
    """A Jira comment whose reply was lost is found by its marker on the next cycle, not posted twice."""
    incident_id = harness.seed()["incident_id"]
    sync = await harness.cycles(1)
    harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>one</p>", author="Analyst")
    harness.jira.sim.drop_reply_after_commit("POST", "/rest/api/2/issue/{issue}/comment")

    await harness.cycles(1, sync)
    harness.advance(5)
    await harness.cycles(2, sync)

    assert list(marker_sources(harness.issue_for(incident_id)).values()) == [1]


async def test_late_update_is_still_synced(harness: SyncHarness) -> None:
    """An incident whose update_time is older than the cursor but shows one cycle late is still synced."""
    late = harness.seed()["incident_id"]
    sync = await harness.cycles(1)

    harness.mdr_sim.update_settings(visibility_delay_seconds=60)
    harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, late, "<p>late comment</p>", author="Analyst")
    harness.mdr_sim.update_settings(visibility_delay_seconds=0)
    harness.advance(1)
    newer = harness.seed()["incident_id"]
    await harness.cycles(1, sync)

    assert harness.issues_for(newer)
    assert not any("late comment" in c.body for c in harness.issue_for(late).comments)
    assert int(await harness.store.get_cursor("main", "mdr")) > harness.mdr_sim.incident(MDR_CLIENT_ID, late)["update_time"]

    harness.advance(61)
    await harness.cycles(1, sync)
    assert sum("late comment" in c.body for c in harness.issue_for(late).comments) == 1


async def test_issue_with_150_comments(harness: SyncHarness) -> None:
    """A Jira issue with 150 comments: all reach MDR once, and later cycles post nothing more."""
    incident_id = harness.seed()["incident_id"]
    sync = await harness.cycles(1)
    issue = harness.issue_for(incident_id)
    for number in range(150):
        harness.jira.sim.add_comment(issue.key, f"engineer note {number:03d}")

    await harness.cycles(2, sync)
    harness.mdr_sim.reset_counts()
    await harness.cycles(2, sync)

    texts = [comment["text"] for comment in harness.mdr_comments(incident_id)]
    for number in range(150):
        assert sum(f"engineer note {number:03d}" in text for text in texts) == 1
    assert len(texts) == 150
    assert harness.mdr_sim.call_counts.get("comments/create", 0) == 0


async def test_text_survives_round_trip(harness: SyncHarness) -> None:
    """Cyrillic, emoji and HTML formatting arrive readable on both sides."""
    incident_id = harness.seed()["incident_id"]
    harness.mdr_sim.add_soc_comment(
        MDR_CLIENT_ID,
        incident_id,
        '<p>Хост <b>WS-FIN-017</b> заражён 🦠, см. <a href="https://example.com/ioc">IOC</a></p>'
        "<ul><li>процесс <code>powershell.exe</code></li><li>второй пункт</li></ul>",
        author="Анна",
    )
    sync = await harness.cycles(1)
    issue = harness.issue_for(incident_id)
    harness.jira.sim.add_comment(issue.key, "Изолировали *WS-FIN-017* ✅, подробности в [отчёте|https://example.com/r]")
    await harness.cycles(1, sync)

    jira_body = next(c.body for c in issue.comments if "заражён" in c.body)
    assert "*WS-FIN-017*" in jira_body
    assert "🦠" in jira_body
    assert "[IOC|https://example.com/ioc]" in jira_body
    assert "{{powershell.exe}}" in jira_body
    assert "<b>" not in jira_body

    mdr_text = next(c["text"] for c in harness.mdr_comments(incident_id) if "Изолировали" in c["text"])
    assert "<strong>WS-FIN-017</strong>" in mdr_text
    assert "✅" in mdr_text
    assert '<a href="https://example.com/r">отчёте</a>' in " ".join(mdr_text.split())


async def test_malformed_incident_is_parked(harness: SyncHarness, caplog: pytest.LogCaptureFixture) -> None:
    """A malformed incident is logged with its id and parked; the others sync."""
    good = harness.seed()["incident_id"]
    bad = harness.seed(priority=None, incident_number="seven")["incident_id"]

    with caplog.at_level(logging.ERROR):
        await harness.cycles(1)

    assert harness.issues_for(good)
    assert harness.issues_for(bad) == []
    parked = await harness.store.get_parked("main", INCIDENT, bad)
    assert parked is not None and "incident_number" in parked.reason
    assert any(getattr(record, "incident_id", None) == bad for record in caplog.records)


async def test_repaired_incident_syncs_on_retry(harness: SyncHarness) -> None:
    """A parked malformed incident syncs once MDR returns it whole again."""
    bad = harness.seed(priority=None)["incident_id"]
    sync = await harness.cycles(1)
    harness.mdr_sim.update_incident(MDR_CLIENT_ID, bad, priority="LOW")

    harness.advance(5)
    await harness.cycles(1, sync)

    assert harness.issue_for(bad).fields["priority"] == "Low"
    assert await harness.store.get_parked("main", INCIDENT, bad) is None


async def test_changed_incident_updates_fields(harness: SyncHarness) -> None:
    """A priority change in MDR updates the issue; an unchanged incident is not edited."""
    incident_id = harness.seed(priority="LOW")["incident_id"]
    sync = await harness.cycles(1)
    harness.mdr_sim.update_incident(MDR_CLIENT_ID, incident_id, priority="HIGH", summary="Escalated")
    await harness.cycles(1, sync)

    issue = harness.issue_for(incident_id)
    assert issue.fields["priority"] == "High"
    assert issue.fields["summary"].endswith("Escalated")
    edits = harness.jira.sim.calls["PUT /rest/api/2/issue/{issue}"]

    await harness.cycles(2, sync)
    assert harness.jira.sim.calls["PUT /rest/api/2/issue/{issue}"] == edits


async def test_idle_cycle_is_cheap(harness: SyncHarness) -> None:
    """With nothing changed, a cycle makes one MDR list call and reads no incident or comments."""
    for _ in range(5):
        harness.seed()
    sync = await harness.cycles(2)
    harness.mdr_sim.reset_counts()

    await harness.cycles(1, sync)

    counts = harness.mdr_sim.call_counts
    assert counts.get("incidents/list") == 1
    assert counts.get("comments/list", 0) == 0
    assert counts.get("incidents/details", 0) == 0


async def test_filters_go_to_the_api(harness: SyncHarness) -> None:
    """Incidents outside the configured statuses never become tickets."""
    sync_settings = harness.connection.sync.model_copy(update={"filters": FilterSettings(statuses=["Open"])})
    connection = harness.connection.model_copy(update={"sync": sync_settings})
    harness.settings = harness.settings.model_copy(update={"connections": [connection]})
    open_incident = harness.seed(status="Open")["incident_id"]
    closed_incident = harness.seed(status="Closed")["incident_id"]

    await harness.cycles(1)

    assert harness.issues_for(open_incident)
    assert harness.issues_for(closed_incident) == []


async def test_new_only_mode_skips_older_incidents(harness: SyncHarness) -> None:
    """In new_only mode, incidents created before the first run are ignored, even when updated later."""
    old = harness.seed()["incident_id"]
    sync_settings = harness.connection.sync.model_copy(update={"mode": "new_only"})
    harness.settings = harness.settings.model_copy(
        update={"connections": [harness.connection.model_copy(update={"sync": sync_settings})]}
    )
    harness.advance(2)
    sync = await harness.cycles(1)

    harness.advance(2)
    new = harness.seed()["incident_id"]
    harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, old, "<p>update of an old incident</p>", author="Analyst")
    await harness.cycles(1, sync)

    assert harness.issues_for(new)
    assert harness.issues_for(old) == []
