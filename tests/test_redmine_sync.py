"""The engine end to end with Redmine: MDR simulator, the real Redmine from .ci/redmine.py, SQLite ledger.

Each test works in a project of its own, created for it, so nothing is shared
between tests. Redmine keeps real time, so the clocks are never moved.
"""

from __future__ import annotations

import asyncio
import html
import re
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.register_assert_rewrite("redmine_helpers")

from fixtures_mdr import MDR_CLIENT_ID, MDR_CONNECTION_NAME  # noqa: E402
from fixtures_redmine import RedmineServer  # noqa: E402
from redmine_helpers import human_attach, human_issue, human_note, read_issue, redmine_settings  # noqa: E402

from mdr_connector.adapters.mdr.client import MdrClient  # noqa: E402
from mdr_connector.adapters.mdr.simulator import MdrSimulator  # noqa: E402
from mdr_connector.connector.config import ConnectionSettings, MdrSettings, Settings, SyncSettings  # noqa: E402
from mdr_connector.connector.engine import ConnectionSync  # noqa: E402
from mdr_connector.connector.retry import RetryPolicy  # noqa: E402
from mdr_connector.connector.service import open_connection  # noqa: E402
from mdr_connector.connector.store import Store  # noqa: E402

SOC_ANALYST = "Ivan Petrov"
STATUS_RULES = {"to_ticket": {"Open": "New", "On hold": "Feedback", "Resolved": "Resolved", "Closed": "Closed"}}


@dataclass
class RedmineHarness:
    """The MDR simulator, the Redmine server and project, one connection's settings and the ledger."""

    mdr_sim: MdrSimulator
    server: RedmineServer
    project: dict[str, Any]
    settings: Settings
    store: Store
    stack: AsyncExitStack

    async def engine(self) -> ConnectionSync:
        """A fresh engine, as after a process restart: nothing kept in memory but the ledger."""
        connection = self.settings.connections[0]
        sync = await self.stack.enter_async_context(open_connection(self.settings, connection, self.store))
        sync.read_policy = RetryPolicy(attempts=2, base_seconds=0.01, max_seconds=0.05)
        return sync

    async def cycles(self, count: int, sync: ConnectionSync | None = None) -> ConnectionSync:
        sync = sync or await self.engine()
        for _cycle in range(count):
            await sync.run_cycle()
        return sync

    async def next_second(self) -> None:
        """Wait until the current whole second has ended.

        Redmine's times count whole seconds, so the connector sees a person's
        change made in the same second as its own last write only in a
        search that begins after that second.
        """
        end = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=1)
        while (now := datetime.now(timezone.utc)) < end:
            await asyncio.sleep((end - now).total_seconds() + 0.01)

    def seed(self, **fields: Any) -> dict[str, Any]:
        return self.mdr_sim.seed_incident(MDR_CLIENT_ID, **fields)

    def issues_for(self, incident_id: str) -> list[dict[str, Any]]:
        """The project's issues whose correlation field contains `incident_id`, read with the admin key."""
        field = self.server.custom_field_id
        params = {
            "project_id": self.project["identifier"],
            "status_id": "*",
            f"cf_{field}": incident_id,
            "include": "journals,attachments",
            "limit": "100",
        }
        response = self.server.request("GET", "/issues.json", self.server.admin_key, params=params)
        assert response.status_code == 200, response.text
        issues = response.json()["issues"]
        return [
            read_issue(self.server, issue["id"], "journals,attachments")
            for issue in issues
            if any(item["id"] == field and item["value"] == incident_id for item in issue["custom_fields"])
        ]

    def issue_for(self, incident_id: str) -> dict[str, Any]:
        [issue] = self.issues_for(incident_id)
        return issue

    def notes(self, issue_id: int) -> list[dict[str, Any]]:
        return [journal for journal in read_issue(self.server, issue_id, "journals")["journals"] if journal["notes"]]

    def mdr_texts(self, incident_id: str) -> list[str]:
        """The words of the incident's MDR comments, which MDR stores as HTML."""
        return [
            " ".join(html.unescape(re.sub(r"<[^>]*>", " ", comment["text"])).split())
            for comment in self.mdr_sim.comments(MDR_CLIENT_ID, incident_id)
        ]


def write_mapping(folder: Path, project: str, **changes: Any) -> Path:
    """Write the built-in Redmine mapping for `project` with `changes` applied to its top-level keys."""
    raw = yaml.safe_load(resources.files("mdr_connector.mappings").joinpath("redmine.yaml").read_text(encoding="utf-8"))
    raw.update({"project": project, **changes})
    path = folder / f"mapping-{project}.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return path


@pytest.fixture
async def redmine_harness(
    tmp_path: Path,
    mdr_sim: MdrSimulator,
    mdr_url: str,
    redmine_server: RedmineServer,
    redmine_project: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[RedmineHarness]:
    """An activated MDR token chain, an empty ledger and a fresh Redmine project mapped with status sync."""
    # An account that is not an administrator finds the custom field only on an issue.
    human_issue(redmine_server, redmine_project["identifier"])
    token_dir = tmp_path / "tokens"
    token_dir.mkdir(mode=0o700)
    mapping = write_mapping(tmp_path, redmine_project["identifier"], status=STATUS_RULES)
    settings = Settings(
        data_dir=tmp_path,
        connections=[
            ConnectionSettings(
                name="main",
                mdr=MdrSettings(
                    base_url=mdr_url,
                    client_id=MDR_CLIENT_ID,
                    connection_name=MDR_CONNECTION_NAME,
                    token_dir=token_dir,
                    timeout_seconds=10,
                ),
                ticket=redmine_settings(redmine_server, monkeypatch),
                mapping=str(mapping),
                sync=SyncSettings(interval_seconds=1, retry_base_seconds=1, retry_max_seconds=2),
            )
        ],
    )
    async with MdrClient(settings.connections[0].mdr) as client:
        await client.tokens.activate(mdr_sim.issue_console_token(MDR_CLIENT_ID))

    store = await Store.open(settings.resolved_database_url())
    async with AsyncExitStack() as stack:
        yield RedmineHarness(mdr_sim, redmine_server, redmine_project, settings, store, stack)
    await store.close()


async def test_incident_becomes_one_issue(redmine_harness: RedmineHarness) -> None:
    """A new incident gets one issue with the custom field, mapped fields and the SOC comment, over three cycles."""
    harness = redmine_harness
    incident = harness.seed(summary="Подозрительный PowerShell 🚨", priority="HIGH")
    incident_id = incident["incident_id"]
    harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>Проверьте хост</p>", author=SOC_ANALYST)

    sync = await harness.cycles(3)

    issue = harness.issue_for(incident_id)
    assert issue["subject"] == f"[MDR-{incident['incident_number']}] Подозрительный PowerShell 🚨"
    assert issue["priority"]["name"] == "High"
    assert issue["tracker"]["name"] == "Bug"
    assert issue["author"]["id"] == harness.server.service_user_id
    [soc_note] = harness.notes(issue["id"])
    assert "Проверьте хост" in soc_note["notes"]
    assert SOC_ANALYST in soc_note["notes"]
    assert soc_note["notes"].endswith(f"[mdr-connector mdr:{harness.mdr_sim.comments(MDR_CLIENT_ID, incident_id)[0]['comment_id']}]")
    assert sync.stats.tickets_created == 1
    link = await harness.store.get_link("main", incident_id)
    assert link.ticket_key == str(issue["id"])


async def test_comments_both_ways_once(redmine_harness: RedmineHarness) -> None:
    """One MDR comment and one Redmine note, three cycles: exactly one copy of each on each side."""
    harness = redmine_harness
    incident_id = harness.seed()["incident_id"]
    sync = await harness.cycles(1)
    issue = harness.issue_for(incident_id)

    harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>MDR analyst note</p>", author=SOC_ANALYST)
    human_note(harness.server, issue["id"], "Redmine engineer *note* ✅")
    await harness.next_second()
    await harness.cycles(3, sync)

    mdr_texts = harness.mdr_texts(incident_id)
    notes = [journal["notes"] for journal in harness.notes(issue["id"])]
    assert sum("MDR analyst note" in text for text in mdr_texts) == 1
    assert sum("Redmine engineer note ✅" in text for text in mdr_texts) == 1
    assert sum("MDR analyst note" in text for text in notes) == 1
    assert sum("Redmine engineer" in text for text in notes) == 1
    assert [comment["author_name"] for comment in harness.mdr_sim.comments(MDR_CLIENT_ID, incident_id)].count(
        MDR_CONNECTION_NAME
    ) == 1


async def test_private_note_stays_internal(redmine_harness: RedmineHarness) -> None:
    """With `to_mdr: public` a private note is not copied to MDR, while a public one is."""
    harness = redmine_harness
    incident_id = harness.seed()["incident_id"]
    sync = await harness.cycles(1)
    issue = harness.issue_for(incident_id)

    human_note(harness.server, issue["id"], "Internal: the CFO laptop.", private=True)
    human_note(harness.server, issue["id"], "Public: host isolated.")
    await harness.next_second()
    await harness.cycles(2, sync)

    mdr_texts = harness.mdr_texts(incident_id)
    assert not any("CFO laptop" in text for text in mdr_texts)
    assert sum("host isolated" in text for text in mdr_texts) == 1


async def test_attachment_each_way(redmine_harness: RedmineHarness) -> None:
    """An MDR file reaches the issue as the connector's attachment, and a person's file reaches MDR, once each."""
    harness = redmine_harness
    incident_id = harness.seed()["incident_id"]
    report = "Отчёт о проверке 📄.txt"
    content = "Содержимое отчёта\n".encode() * 500
    harness.mdr_sim.add_attachment(MDR_CLIENT_ID, incident_id, report, content, author=SOC_ANALYST)
    sync = await harness.cycles(1)
    issue = harness.issue_for(incident_id)

    log_content = "строка журнала\n".encode() * 300
    human_attach(harness.server, issue["id"], "журнал.txt", log_content)
    await harness.next_second()
    await harness.cycles(2, sync)

    attachments = read_issue(harness.server, issue["id"], "attachments")["attachments"]
    [copy] = [item for item in attachments if item["author"]["id"] == harness.server.service_user_id]
    assert copy["filename"] == report
    download = harness.server.request("GET", f"/attachments/download/{copy['id']}", harness.server.admin_key)
    assert download.content == content
    mdr_copies = [
        item
        for item in harness.mdr_sim.attachments(MDR_CLIENT_ID, incident_id)
        if item["author_name"] == MDR_CONNECTION_NAME
    ]
    [mdr_copy] = mdr_copies
    assert mdr_copy["full_name"] == "журнал.txt"
    assert harness.mdr_sim.attachment_content(mdr_copy["attachment_id"]) == log_content


async def test_status_follows_mdr(redmine_harness: RedmineHarness) -> None:
    """Each MDR status change moves the issue to the mapped Redmine status, once per change."""
    harness = redmine_harness
    incident_id = harness.seed(status="Open")["incident_id"]
    sync = await harness.cycles(1)
    issue_id = harness.issue_for(incident_id)["id"]

    harness.mdr_sim.update_incident(MDR_CLIENT_ID, incident_id, status="On hold")
    await harness.cycles(1, sync)
    on_hold = read_issue(harness.server, issue_id)["status"]["name"]
    harness.mdr_sim.update_incident(MDR_CLIENT_ID, incident_id, status="Closed", resolution="True positive")
    await harness.cycles(2, sync)

    assert on_hold == "Feedback"
    assert read_issue(harness.server, issue_id)["status"]["name"] == "Closed"
    assert sync.stats.statuses_to_ticket == 2
