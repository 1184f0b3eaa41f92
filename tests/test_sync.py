"""The engine end to end: MDR simulator, Jira simulator, SQLite ledger, real HTTP on loopback."""

from __future__ import annotations

import logging
import sqlite3
from collections import Counter

import pytest
from sqlalchemy.exc import OperationalError
from fixtures_mdr import MDR_CLIENT_ID, MDR_CONNECTION_NAME
from fixtures_postgres import LEDGER_BACKENDS
from fixtures_sync import SyncHarness

from mdr_connector.connector.config import FilterSettings
from mdr_connector.connector.engine import INCIDENT
from mdr_connector.connector.store import LINKED, PENDING


@pytest.fixture(params=LEDGER_BACKENDS)
def ledger_backend(request: pytest.FixtureRequest) -> str:
    """Every harness test here runs with its ledger on SQLite and again on PostgreSQL."""
    return request.param


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
    harness.use_sync(change_source="list")
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
    harness.use_sync(change_source="list")
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


def break_comment(harness: SyncHarness, incident_id: str, comment_id: str, **fields) -> None:
    """Overwrite fields of a stored MDR comment, as a buggy or hostile source would send it."""
    stored = harness.mdr_sim._incidents[incident_id]
    [comment] = [c for c in stored.comments if c["comment_id"] == comment_id]
    comment.update(fields)


async def test_future_update_time_is_parked(harness: SyncHarness) -> None:
    """An incident dated in year 9999 is parked and cannot move the cursor past later incidents."""
    future = harness.seed(update_time=253402300799000)["incident_id"]
    sync = await harness.cycles(1)

    cursor = await harness.store.get_cursor("main", "mdr")
    assert cursor is None or int(cursor) < 253402300799000
    parked = await harness.store.get_parked("main", INCIDENT, future)
    assert parked is not None and "ahead of this machine's clock" in parked.reason
    assert harness.issues_for(future) == []

    harness.advance(1)
    later = harness.seed()["incident_id"]
    await harness.cycles(1, sync)
    assert harness.issues_for(later)


async def test_malformed_comment_does_not_block_others(harness: SyncHarness) -> None:
    """A malformed MDR comment is reported and retried, while the other comments and fields still sync."""
    incident_id = harness.seed()["incident_id"]
    bad = harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>bad</p>", author="Analyst")
    harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>good one</p>", author="Analyst")
    break_comment(harness, incident_id, bad["comment_id"], creation_time="yesterday")

    await harness.cycles(1)

    issue = harness.issue_for(incident_id)
    assert sum("good one" in c.body for c in issue.comments) == 1
    parked = await harness.store.get_parked("main", INCIDENT, incident_id)
    assert parked is not None and bad["comment_id"] in parked.reason


async def test_forged_footer_hides_nothing(harness: SyncHarness) -> None:
    """A Jira comment quoting the connector's footer with the next comment id does not hide that comment."""
    incident_id = harness.seed()["incident_id"]
    sync = await harness.cycles(1)
    issue = harness.issue_for(incident_id)
    next_id = harness.jira.sim._next_comment_id + 1

    harness.jira.sim.add_comment(issue.key, f"see mdr-connector: jira comment {next_id}")
    harness.jira.sim.add_comment(issue.key, "the real second comment")
    await harness.cycles(2, sync)

    texts = [c["text"] for c in harness.mdr_comments(incident_id)]
    assert sum("the real second comment" in text for text in texts) == 1
    assert sum("see mdr-connector" in text for text in texts) == 1


async def test_hostile_display_name_is_escaped(harness: SyncHarness) -> None:
    """A Jira display name carrying HTML reaches MDR as text, not as markup."""
    incident_id = harness.seed()["incident_id"]
    sync = await harness.cycles(1)
    issue = harness.issue_for(incident_id)
    harness.jira.sim.human.display_name = '<img src=x onerror="alert(1)">'

    harness.jira.sim.add_comment(issue.key, "plain note")
    await harness.cycles(1, sync)

    [mirrored] = [c["text"] for c in harness.mdr_comments(incident_id) if "plain note" in c["text"]]
    assert "<img" not in mirrored
    assert "&lt;img" in mirrored


@pytest.mark.parametrize(("source", "cursor_name"), [("list", "mdr"), ("history", "mdr_history")])
async def test_crash_mid_page_keeps_mdr_cursor(
    harness: SyncHarness, monkeypatch: pytest.MonkeyPatch, source: str, cursor_name: str
) -> None:
    """A crash while the first incident of a page is being created leaves the cursor before it."""
    harness.use_sync(change_source=source)
    first = harness.seed()["incident_id"]
    harness.advance(600)
    second = harness.seed()["incident_id"]
    sync = await harness.engine()

    class SimulatedCrash(BaseException):
        pass

    real_create = sync.tickets.create_ticket

    async def crash_on_first(draft):
        if draft.incident_id == first:
            raise SimulatedCrash
        return await real_create(draft)

    monkeypatch.setattr(sync.tickets, "create_ticket", crash_on_first)
    with pytest.raises(SimulatedCrash):
        await sync.run_cycle()

    stored = await harness.store.get_cursor("main", cursor_name)
    assert stored is None or int(stored) < harness.mdr_sim.incident(MDR_CLIENT_ID, first)["update_time"]
    harness.advance(31)
    await harness.cycles(2)
    assert len(harness.issues_for(first)) == 1
    assert len(harness.issues_for(second)) == 1


async def test_crash_in_comment_sync_resyncs(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash while a comment is being posted leaves the incident to be reconciled again, once."""
    incident_id = harness.seed()["incident_id"]
    harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>after the crash</p>", author="Analyst")
    sync = await harness.engine()

    class SimulatedCrash(BaseException):
        pass

    async def crash(ref, draft):
        raise SimulatedCrash

    monkeypatch.setattr(sync.tickets, "add_comment", crash)
    with pytest.raises(SimulatedCrash):
        await sync.run_cycle()
    assert (await harness.store.get_link("main", incident_id)).mdr_update_time is None

    await harness.cycles(1)
    assert sum("after the crash" in c.body for c in harness.issue_for(incident_id).comments) == 1


async def test_crash_in_ticket_change_keeps_ticket_cursor(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash while a Jira comment is copied to MDR leaves the ticket cursor before that change."""
    incident_id = harness.seed()["incident_id"]
    await harness.cycles(1)
    issue = harness.issue_for(incident_id)
    harness.jira.sim.add_comment(issue.key, "engineer note before crash")
    harness.advance(31)
    sync = await harness.engine()

    class SimulatedCrash(BaseException):
        pass

    async def crash(*args, **kwargs):
        raise SimulatedCrash

    monkeypatch.setattr(sync.mdr, "create_comment", crash)
    with pytest.raises(SimulatedCrash):
        await sync.run_cycle()

    harness.advance(600)
    await harness.cycles(1)
    assert sum("engineer note before crash" in c["text"] for c in harness.mdr_comments(incident_id)) == 1


async def test_lost_mdr_comment_reply_is_not_reposted(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """An MDR comment whose reply was lost is found by its footer on the next cycle, not posted twice."""
    incident_id = harness.seed()["incident_id"]
    sync = await harness.cycles(1)
    harness.jira.sim.add_comment(harness.issue_for(incident_id).key, "note whose reply is lost")

    from mdr_connector.connector.errors import OutcomeUnknownError

    real_create = sync.mdr.create_comment

    async def create_then_lose_reply(*args, **kwargs):
        await real_create(*args, **kwargs)
        raise OutcomeUnknownError("connection dropped after the request was sent")

    monkeypatch.setattr(sync.mdr, "create_comment", create_then_lose_reply)
    await harness.cycles(1, sync)
    monkeypatch.undo()
    harness.advance(5)
    await harness.cycles(2, sync)

    assert sum("note whose reply is lost" in c["text"] for c in harness.mdr_comments(incident_id)) == 1
    assert await harness.store.get_parked("main", INCIDENT, incident_id) is None


async def test_copies_after_failed_post_once_each(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Intents recorded together before the posts: a post that fails midway leaves the rest to the next cycle, each copied once."""
    from mdr_connector.connector.errors import OutcomeUnknownError

    incident_id = harness.seed()["incident_id"]
    for number in range(3):
        harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, f"<p>SOC note {number}</p>", author="SOC Analyst")
    sync = await harness.engine()
    real_add = sync.tickets.add_comment
    posts: list[int] = []

    async def second_post_lost(ref, draft):
        posts.append(1)
        posted = await real_add(ref, draft)
        if len(posts) == 2:
            raise OutcomeUnknownError("connection dropped after the request was sent")
        return posted

    monkeypatch.setattr(sync.tickets, "add_comment", second_post_lost)
    await harness.cycles(1, sync)
    monkeypatch.undo()
    harness.advance(60)
    await harness.cycles(2, sync)

    texts = [comment.body for comment in harness.issue_for(incident_id).comments]
    for number in range(3):
        assert sum(f"SOC note {number}" in text for text in texts) == 1
    assert await harness.store.get_parked("main", INCIDENT, incident_id) is None


async def test_no_lookup_inside_consistency_window(harness: SyncHarness) -> None:
    """Before the search delay has passed, a lost create is neither searched for nor sent again."""
    incident_id = harness.seed()["incident_id"]
    harness.jira.sim.drop_reply_after_commit("POST", "/rest/api/2/issue")
    sync = await harness.cycles(1)
    searches = harness.jira.sim.calls["POST /rest/api/2/search/jql"]

    for step in (5, 15):
        harness.advance(step)
        await sync.retry_parked()
    assert harness.jira.sim.calls[CREATE_ISSUE] == 1
    assert harness.jira.sim.calls["POST /rest/api/2/search/jql"] == searches

    harness.advance(11)
    await sync.retry_parked()
    assert (await harness.store.get_link("main", incident_id)).state == LINKED
    assert harness.jira.sim.calls[CREATE_ISSUE] == 1


async def test_ticket_change_behind_search_delay(harness: SyncHarness) -> None:
    """A Jira change that search shows only after its delay is still copied, thanks to the ticket overlap."""
    first = harness.seed()["incident_id"]
    second = harness.seed()["incident_id"]
    await harness.cycles(1)
    sync = await harness.engine()

    harness.jira.sim.add_comment(harness.issue_for(second).key, "late indexed note")
    harness.advance(5)
    harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, first, "<p>moves the other ticket</p>", author="Analyst")
    await harness.cycles(1, sync)
    harness.advance(31)
    await harness.cycles(1, sync)

    assert sum("late indexed note" in c["text"] for c in harness.mdr_comments(second)) == 1


async def test_echo_layer_author(harness: SyncHarness) -> None:
    """Comments written by the connector's own accounts are not copied back, even without marker or ledger row."""
    incident_id = harness.seed()["incident_id"]
    sync = await harness.cycles(1)
    issue = harness.issue_for(incident_id)

    harness.jira.sim.add_comment(issue.key, "written by the service account", author=harness.jira.sim.service)
    harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>written by the API token</p>", author=MDR_CONNECTION_NAME)
    await harness.cycles(2, sync)

    assert not any("written by the service account" in c["text"] for c in harness.mdr_comments(incident_id))
    assert not any("written by the API token" in c.body for c in issue.comments)


async def test_echo_layer_ledger(harness: SyncHarness) -> None:
    """A mirrored comment that lost its marker and changed author is still known as a copy by the ledger."""
    incident_id = harness.seed()["incident_id"]
    harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>SOC original</p>", author="Analyst")
    sync = await harness.cycles(1)
    issue = harness.issue_for(incident_id)
    [copy] = [c for c in issue.comments if "SOC original" in c.body]
    copy.properties.clear()
    copy.author = harness.jira.sim.human

    harness.jira.sim.add_comment(issue.key, "Jira original")
    harness.advance(31)
    await harness.cycles(1, sync)
    stored = harness.mdr_sim._incidents[incident_id]
    [mdr_copy] = [c for c in stored.comments if "Jira original" in c["text"]]
    mdr_copy.update(author_name="Renamed connection", text="<p>Jira original</p>")

    harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>touch</p>", author="Analyst")
    harness.advance(31)
    await harness.cycles(2, sync)

    assert sum("SOC original" in c["text"] for c in harness.mdr_comments(incident_id)) == 1
    assert sum("Jira original" in c.body for c in issue.comments) == 1


async def test_echo_layer_marker(harness: SyncHarness) -> None:
    """Comments carrying the connector's marker are not copied, even from another author and with an empty ledger."""
    incident_id = harness.seed()["incident_id"]
    sync = await harness.cycles(1)
    issue = harness.issue_for(incident_id)

    harness.jira.sim.add_comment(
        issue.key,
        "marked by an earlier service account",
        properties=[{"key": "mdr-connector", "value": {"origin": "mdr", "source_id": "gone-comment"}}],
    )
    harness.mdr_sim.add_soc_comment(
        MDR_CLIENT_ID, incident_id, "<p>copied earlier</p><p><em>mdr-connector: jira comment 99999</em></p>", author="Old name"
    )
    await harness.cycles(2, sync)

    assert not any("marked by an earlier service account" in c["text"] for c in harness.mdr_comments(incident_id))
    assert not any("copied earlier" in c.body for c in issue.comments)


async def test_restricted_comment_stays_internal(harness: SyncHarness) -> None:
    """A Jira comment visible only to a role is not sent to MDR unless the mapping allows it."""
    incident_id = harness.seed()["incident_id"]
    sync = await harness.cycles(1)
    issue = harness.issue_for(incident_id)

    harness.jira.sim.add_comment(issue.key, "internal only", visibility={"type": "role", "value": "Developers"})
    harness.jira.sim.add_comment(issue.key, "for the SOC")
    harness.advance(31)
    await harness.cycles(2, sync)

    texts = [c["text"] for c in harness.mdr_comments(incident_id)]
    assert not any("internal only" in text for text in texts)
    assert sum("for the SOC" in text for text in texts) == 1
    assert len(sync.stats.restricted_skipped) == 1


async def test_removed_label_keeps_sync(harness: SyncHarness) -> None:
    """A person removing the connector's labels does not cut the ticket off from MDR."""
    incident_id = harness.seed()["incident_id"]
    sync = await harness.cycles(1)
    issue = harness.issue_for(incident_id)

    harness.jira.sim.edit_as_human(issue.key, labels=[])
    harness.jira.sim.add_comment(issue.key, "after the labels were removed")
    harness.advance(31)
    await harness.cycles(1, sync)

    assert sum("after the labels were removed" in c["text"] for c in harness.mdr_comments(incident_id)) == 1


@pytest.mark.parametrize("source", ["list", "history"])
async def test_burst_larger_than_overlap_budget_drains(harness: SyncHarness, source: str) -> None:
    """A burst that fills more pages than one cycle may read still drains over cycles, though it sits in the overlap."""
    harness.use_sync(page_size=3, max_pages_per_cycle=2, change_source=source)
    burst = []
    for _ in range(20):
        burst.append(harness.seed()["incident_id"])
        harness.advance(0.01)
    sync = await harness.engine()

    for _cycle in range(6):
        await sync.run_cycle()

    assert all(len(harness.issues_for(incident_id)) == 1 for incident_id in burst)


async def test_wrong_project_stops_connection(harness: SyncHarness) -> None:
    """A mapping whose project Jira does not have stops the connection at once, naming the project."""
    from mdr_connector.connector.errors import ConfigError

    harness.seed()
    sync = await harness.engine()
    sync.mapping = sync.mapping.model_copy(update={"project": "SECOPS"})
    sync.tickets.project = "SECOPS"
    sync.own_account = None

    with pytest.raises(ConfigError, match="project 'SECOPS' does not exist"):
        await sync.run_cycle()
    assert harness.jira.sim.calls[CREATE_ISSUE] == 0


async def test_rejected_field_does_not_block_comments(harness: SyncHarness) -> None:
    """A mapped field Jira rejects parks the incident once, while its comments still go both ways."""
    incident_id = harness.seed()["incident_id"]
    sync = await harness.cycles(1)
    issue = harness.issue_for(incident_id)
    bad_mapping = sync.mapping.model_copy(update={"fields": {"customfield_99999": "SOC"}})
    sync.mapping = bad_mapping
    sync.comments.mapping = bad_mapping

    harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>analyst after the change</p>", author="Analyst")
    harness.jira.sim.add_comment(issue.key, "engineer after the change")
    harness.advance(31)
    failures_before = sync.stats.failures
    await harness.cycles(1, sync)

    assert sum("analyst after the change" in c.body for c in issue.comments) == 1
    assert sum("engineer after the change" in c["text"] for c in harness.mdr_comments(incident_id)) == 1
    parked = await harness.store.get_parked("main", INCIDENT, incident_id)
    assert parked is not None and parked.reason.count("customfield_99999") >= 1
    assert sync.stats.failures == failures_before + 1


async def test_wrong_connection_name_stops_connection(harness: SyncHarness) -> None:
    """When MDR names the token's comments differently from connection_name, the connection stops after one comment."""
    from mdr_connector.connector.errors import MisconfiguredError

    mdr = harness.connection.mdr.model_copy(update={"connection_name": "Not the real name"})
    harness.settings = harness.settings.model_copy(
        update={"connections": [harness.connection.model_copy(update={"mdr": mdr})]}
    )
    incident_id = harness.seed()["incident_id"]
    sync = await harness.cycles(1)
    harness.jira.sim.add_comment(harness.issue_for(incident_id).key, "first engineer note")
    harness.advance(31)

    with pytest.raises(MisconfiguredError, match="set mdr.connection_name: 'SOC Jira sync'"):
        await sync.run_cycle()
    assert sum("first engineer note" in c["text"] for c in harness.mdr_comments(incident_id)) == 1


async def test_footer_from_old_name_counts_as_landed(harness: SyncHarness) -> None:
    """With a rebuilt ledger, a connector comment under an old Connection Name is not posted again."""
    incident_id = harness.seed()["incident_id"]
    sync = await harness.cycles(1)
    issue = harness.issue_for(incident_id)
    note = harness.jira.sim.add_comment(issue.key, "note copied under the old name")
    harness.mdr_sim.add_soc_comment(
        MDR_CLIENT_ID,
        incident_id,
        f"<p>note copied under the old name</p><p><em>mdr-connector: jira comment {note.id}</em></p>",
        author="Old connection name",
    )
    harness.advance(31)
    await harness.cycles(1, sync)

    assert sum("note copied under the old name" in c["text"] for c in harness.mdr_comments(incident_id)) == 1


async def test_incident_locks_do_not_accumulate(harness: SyncHarness) -> None:
    """Per-incident locks are dropped once no reconciliation uses them."""
    import gc

    for _ in range(5):
        harness.seed()
    sync = await harness.cycles(1)
    gc.collect()

    assert len(sync._incident_locks) == 0


@pytest.fixture
async def datacenter_harness(tmp_path, mdr_sim, mdr_url, start_jira, monkeypatch):
    """The harness on a Jira Data Center simulator, whose search pages by offset."""
    from contextlib import AsyncExitStack

    from fixtures_sync import harness_settings

    from mdr_connector.adapters.mdr.client import MdrClient
    from mdr_connector.connector.store import Store

    jira = await start_jira(deployment="datacenter")
    settings = harness_settings(tmp_path, mdr_url, jira, monkeypatch)
    async with MdrClient(settings.connections[0].mdr) as client:
        await client.tokens.activate(mdr_sim.issue_console_token(MDR_CLIENT_ID))
    store = await Store.open(settings.resolved_database_url())
    async with AsyncExitStack() as stack:
        yield SyncHarness(mdr_sim, jira, settings, store, stack)
    await store.close()


async def test_edit_while_search_pages_loses_nothing(datacenter_harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """An issue edited between two pages of the change search does not push another changed issue out of it."""
    from mdr_connector.adapters.jira import adapter as jira_adapter

    harness = datacenter_harness
    incident_id = harness.seed()["incident_id"]
    sync = await harness.cycles(1)
    linked = harness.issue_for(incident_id)
    others = [
        harness.jira.sim.create_issue(
            {"project": {"key": "SEC"}, "issuetype": {"name": "Task"}, "summary": f"unrelated {number}"}
        )
        for number in range(100)
    ]
    harness.advance(1)
    harness.jira.sim.add_comment(linked.key, "engineer note that must reach MDR")
    harness.advance(400)

    real_request = jira_adapter._request
    edited = []

    def edit_after_first_page(client, method, path, **kwargs):
        reply = real_request(client, method, path, **kwargs)
        params = kwargs.get("params") or {}
        if path == "search" and params.get("startAt") == 0 and "updated >=" in params.get("jql", "") and not edited:
            harness.jira.sim.edit_as_human(others[0].key, summary="edited meanwhile")
            edited.append(True)
        return reply

    monkeypatch.setattr(jira_adapter, "_request", edit_after_first_page)
    await sync.run_cycle()
    monkeypatch.undo()
    for _cycle in range(2):
        harness.advance(60)
        await sync.run_cycle()

    assert edited
    assert sum("engineer note that must reach MDR" in c["text"] for c in harness.mdr_comments(incident_id)) == 1


async def test_overlong_incident_id_is_skipped(harness: SyncHarness, caplog: pytest.LogCaptureFixture) -> None:
    """An incident id longer than the ledger's columns is logged and skipped; the page still syncs."""
    good = harness.seed()["incident_id"]
    harness.seed(incident_id="x" * 300)

    with caplog.at_level(logging.ERROR):
        await harness.cycles(1)

    assert harness.issues_for(good)
    assert any(record.getMessage() == "sync.incident.malformed" for record in caplog.records)
    assert await harness.store.list_parked("main") == []


async def test_rate_limited_create_keeps_intent(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A create that Jira applied but rejected with 503 and Retry-After is looked up, not sent again."""
    from mdr_connector.connector.errors import RateLimitedError

    incident_id = harness.seed()["incident_id"]
    sync = await harness.engine()
    real_create = sync.tickets.create_ticket

    async def create_then_throttle(draft):
        await real_create(draft)
        raise RateLimitedError("Jira answered 503 with Retry-After", retry_after=1)

    monkeypatch.setattr(sync.tickets, "create_ticket", create_then_throttle)
    await sync.run_cycle()
    monkeypatch.undo()
    assert (await harness.store.get_link("main", incident_id)).state == PENDING

    harness.advance(31)
    await harness.cycles(1, sync)
    assert len(harness.issues_for(incident_id)) == 1
    assert (await harness.store.get_link("main", incident_id)).state == LINKED


async def test_ticket_comments_read_once_per_reconciliation(harness: SyncHarness) -> None:
    """The comment sync and the response part share one read of the ticket's comments in each reconciliation."""
    incident_id = harness.seed()["incident_id"]
    sync = await harness.cycles(1)
    harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>A later SOC note</p>", author="SOC Analyst")
    harness.advance(1)
    harness.jira.sim.calls.clear()

    await harness.cycles(1, sync)

    # One read for the reconciliation of the MDR change, one for the check of the ticket change it caused.
    assert harness.jira.sim.calls["GET /rest/api/2/issue/{issue}/comment"] == 2
    assert sync.context.comment_snapshots == {}


async def test_new_ticket_not_read_back(harness: SyncHarness) -> None:
    """The reconciliation that creates an issue does not read its comments or attachments, which are known to be empty."""
    harness.seed()
    harness.jira.sim.calls.clear()

    sync = await harness.cycles(1)

    # Only the check of the ticket change that the create caused reads the issue.
    assert harness.jira.sim.calls["GET /rest/api/2/issue/{issue}/comment"] == 1
    assert harness.jira.sim.calls["GET /rest/api/2/issue/{issue}"] == 1
    assert sync.stats.own_writes_confirmed == 1


async def test_database_error_parks_short_reason(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ledger error parks the incident with the driver's error, not the statement and its incident data."""
    incident_id = harness.seed()["incident_id"]
    sync = await harness.engine()

    async def locked(*_args: object, **_kwargs: object) -> None:
        raise OperationalError(
            "UPDATE links SET mdr_status=? WHERE incident_id=?",
            ("host-finance-17", incident_id),
            sqlite3.OperationalError("database is locked"),
        )

    monkeypatch.setattr(harness.store, "record_mdr_reconciled", locked)
    await sync.run_cycle()

    parked = await harness.store.get_parked("main", INCIDENT, incident_id)
    assert parked is not None
    assert parked.reason == "OperationalError: database is locked"

