"""The contract backend for Redmine: the adapter against the real Redmine from .ci/redmine.py.

Each backend creates two projects of its own and deletes them at the end,
so contract tests share nothing. The person is the `soc-analyst` account,
acting through the REST API with its own key. Redmine keeps real time at
whole seconds, so `next_moment` waits for the next second instead of moving
a clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

pytest.register_assert_rewrite("fixtures_redmine", "redmine_helpers")

from fixtures_redmine import RedmineServer, create_project, delete_project, load_server  # noqa: E402
from redmine_helpers import human_attach, human_issue, human_note, human_update, redmine_settings  # noqa: E402

from contract.backends import ContractBackend, StatusNames  # noqa: E402
from mdr_connector.adapters.redmine.adapter import RedmineTicketAdapter  # noqa: E402
from mdr_connector.connector.tickets import CommentVisibility, TicketAccount, TicketAdapter, TicketRef  # noqa: E402

TRACKER = "Bug"


class RedmineBackend(ContractBackend):
    """Two fresh projects on the real Redmine; every `open()` builds a new adapter with the connector's key."""

    def __init__(self, server: RedmineServer, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__()
        self.server = server
        self.monkeypatch = monkeypatch
        self.projects: list[dict[str, Any]] = []
        for prefix in ("contract", "contract-other"):
            project = create_project(server, prefix)
            self.projects.append(project)
            # An account that is not an administrator finds the correlation field only on an issue.
            human_issue(server, project["identifier"], tracker=TRACKER)
        self.system = "redmine"
        self.project = self.projects[0]["identifier"]
        self.other_project = self.projects[1]["identifier"]
        self.issue_type = TRACKER
        self.priorities = ("High", "Normal", "Low")
        # .ci/redmine.py lets the role move between any two statuses, so no status is unreachable.
        self.statuses = StatusNames(in_progress="In Progress", done="Closed", unreachable=None)
        self.internal_visibility = CommentVisibility(type="internal")
        self.person = TicketAccount(id=str(server.human_user_id), display_name="SOC Analyst")
        self.person_groups = frozenset({server.group_name})
        self.summary_field = "summary"
        self.description_field = "description"

    async def build_adapter(self) -> TicketAdapter:
        return RedmineTicketAdapter(redmine_settings(self.server, self.monkeypatch), self.project)

    async def release(self) -> None:
        for project in self.projects:
            await asyncio.to_thread(delete_project, self.server, project["id"])

    async def make_searchable(self) -> None:
        """Do nothing: Redmine's issue queries read the database, which has every write."""

    async def next_moment(self) -> datetime:
        """Wait for the next whole second and return it: Redmine reports times at whole seconds."""
        moment = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=1)
        while (now := datetime.now(timezone.utc)) < moment:
            await asyncio.sleep((moment - now).total_seconds() + 0.01)
        return moment

    async def human_ticket(self, summary: str, *, issue_type: str | None = None, label: str | None = None) -> TicketRef:
        issue = await asyncio.to_thread(
            human_issue, self.server, self.project, tracker=issue_type or self.issue_type, subject=summary
        )
        return self._ref(issue["id"])

    async def human_comment(self, ref: TicketRef, text: str, *, internal: bool = False) -> str:
        journal_id = await asyncio.to_thread(human_note, self.server, ref.id, text, private=internal)
        return str(journal_id)

    async def human_edit_comment(self, ref: TicketRef, comment_id: str, text: str) -> None:
        await asyncio.to_thread(self._edit_journal, comment_id, text)

    async def human_delete_comment(self, ref: TicketRef, comment_id: str) -> None:
        # Redmine deletes a note whose text is emptied when the journal records nothing else.
        await asyncio.to_thread(self._edit_journal, comment_id, "")

    async def human_set_status(self, ref: TicketRef, status: str) -> None:
        await asyncio.to_thread(human_update, self.server, ref.id, status_id=self.server.statuses[status]["id"])

    async def human_edit_summary(self, ref: TicketRef, summary: str) -> None:
        await asyncio.to_thread(human_update, self.server, ref.id, subject=summary)

    async def human_attach(self, ref: TicketRef, filename: str, data: bytes) -> None:
        await asyncio.to_thread(human_attach, self.server, ref.id, filename, data)

    def _edit_journal(self, journal_id: str, text: str) -> None:
        response = self.server.request(
            "PUT", f"/journals/{journal_id}.json", self.server.human_key, json={"journal": {"notes": text}}
        )
        assert response.status_code == 204, response.text

    def _ref(self, issue_id: int) -> TicketRef:
        return TicketRef(key=str(issue_id), id=str(issue_id), url=f"{self.server.url}/issues/{issue_id}")


@asynccontextmanager
async def contract_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ContractBackend]:
    server = load_server()
    backend = await asyncio.to_thread(RedmineBackend, server, monkeypatch)
    try:
        yield backend
    finally:
        await backend.close()
