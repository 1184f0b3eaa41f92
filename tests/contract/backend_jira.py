"""The contract backend for Jira: the Jira Cloud simulator on loopback and the real Jira adapter."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path

import pytest
from fixtures_jira import RunningJira, jira_settings

from contract.backends import ContractBackend, StatusNames
from mdr_connector.adapters.jira.adapter import PROPERTY_KEY, JiraTicketAdapter
from mdr_connector.adapters.jira.simulator import JiraSimulator, run_simulator
from mdr_connector.connector.tickets import CommentVisibility, SyncMarker, TicketAccount, TicketAdapter, TicketRef

# Cloud search lags behind writes, and the simulator plays that lag on its own clock.
SEARCH_DELAY_SECONDS = 30.0
# Both projects offer the backend's issue type, so a route to OPS can create incidents too.
PROJECTS = {
    "SEC": ("Security incidents", ("Task", "Incident")),
    "OPS": ("IT operations", ("Task", "Incident")),
}
# Small comment pages, so three comments already span two pages.
COMMENT_PAGE_SIZE = 2


class JiraBackend(ContractBackend):
    """A Jira Cloud simulator whose human user plays the person."""

    def __init__(self, running: RunningJira, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__()
        self.running = running
        self.sim = running.sim
        self.monkeypatch = monkeypatch
        self.system = "jira"
        self.project = "SEC"
        self.issue_type = "Incident"
        self.priorities = self.sim.priorities
        self.other_project = "OPS"
        self.statuses = StatusNames(in_progress="In Progress", done="Done", unreachable="To Do")
        self.internal_visibility = CommentVisibility(type="role", value="Administrators")
        self.person = TicketAccount(id=self.sim.human.account_id, display_name=self.sim.human.display_name)
        self.person_groups = frozenset({"soc-analysts"})
        self.comment_page_size = COMMENT_PAGE_SIZE
        self.sim.settings.comment_page_cap = COMMENT_PAGE_SIZE

    async def build_adapter(self) -> TicketAdapter:
        settings = jira_settings(self.running, self.monkeypatch)
        return JiraTicketAdapter(settings, self.project)

    async def make_searchable(self) -> None:
        self.sim.advance(SEARCH_DELAY_SECONDS + 1)

    async def next_moment(self) -> datetime:
        self.sim.advance(1)
        return self.sim.now()

    async def human_ticket(self, summary: str, *, issue_type: str | None = None, label: str | None = None) -> TicketRef:
        fields = {
            "project": {"key": self.project},
            "issuetype": {"name": issue_type or self.issue_type},
            "summary": summary,
            "labels": [label] if label else [],
        }
        issue = self.sim.create_issue(fields, reporter=self.sim.human)
        return TicketRef(key=issue.key, id=str(issue.id), url=f"{self.running.url}/browse/{issue.key}")

    async def human_comment(self, ref: TicketRef, text: str, *, internal: bool = False) -> str:
        visibility = {"type": "role", "value": "Administrators"} if internal else None
        return str(self.sim.add_comment(ref.id, text, author=self.sim.human, visibility=visibility).id)

    async def human_forged_comment(self, ref: TicketRef, text: str, marker: SyncMarker) -> str:
        # Any account that may comment can also write the connector's comment property.
        value = {"origin": marker.origin, "source_id": marker.source_id}
        properties = [{"key": PROPERTY_KEY, "value": value}]
        return str(self.sim.add_comment(ref.id, text, author=self.sim.human, properties=properties).id)

    async def human_edit_comment(self, ref: TicketRef, comment_id: str, text: str) -> None:
        self.sim.edit_comment(comment_id, text, editor=self.sim.human)

    async def human_delete_comment(self, ref: TicketRef, comment_id: str) -> None:
        self.sim.delete_comment(comment_id)

    async def human_set_status(self, ref: TicketRef, status: str) -> None:
        self.sim.transition_as_human(ref.id, status)

    async def human_edit_summary(self, ref: TicketRef, summary: str) -> None:
        self.sim.edit_as_human(ref.id, summary=summary)

    async def human_attach(self, ref: TicketRef, filename: str, data: bytes) -> None:
        # The simulator writes the file to disk, so it runs off the event loop like its HTTP handler does.
        await asyncio.to_thread(self.sim.add_attachment, ref.id, filename, data, author=self.sim.human)


@asynccontextmanager
async def contract_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ContractBackend]:
    sim = JiraSimulator(deployment="cloud", search_delay_seconds=SEARCH_DELAY_SECONDS, projects=PROJECTS)
    async with run_simulator(sim) as url:
        backend = JiraBackend(RunningJira(sim, url), monkeypatch)
        try:
            yield backend
        finally:
            await backend.close()
