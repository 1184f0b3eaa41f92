"""The contract backend for the in-memory fake: the reference every real adapter is held to."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path

import pytest

from contract.backends import ContractBackend, StatusNames
from mdr_connector.adapters.memory.adapter import DEFAULT_HUMAN, MemoryProject, MemoryTicketAdapter
from mdr_connector.connector.tickets import CommentVisibility, TicketAdapter, TicketRef

SEARCH_DELAY_SECONDS = 30.0
PRIORITIES = ("High", "Medium", "Low")
PROJECTS = {
    "SEC": MemoryProject(issue_types=("Task", "Incident"), components=("Endpoint", "Network")),
    "OPS": MemoryProject(issue_types=("Task", "Incident")),
}


class MemoryBackend(ContractBackend):
    """One MemoryTicketAdapter shared by every `open()`, as one ticket site is shared by several connections."""

    def __init__(self) -> None:
        super().__init__()
        self.system = "memory"
        self.project = "SEC"
        self.issue_type = "Incident"
        self.priorities = PRIORITIES
        self.other_project = "OPS"
        self.statuses = StatusNames(in_progress="In Progress", done="Done", unreachable="To Do")
        self.internal_visibility = CommentVisibility(type="role", value="Administrators")
        self.person = DEFAULT_HUMAN
        self.person_groups = frozenset({"soc-analysts"})
        self.fake = MemoryTicketAdapter(
            project=self.project,
            search_delay_seconds=SEARCH_DELAY_SECONDS,
            projects=PROJECTS,
            priorities=PRIORITIES,
            groups={DEFAULT_HUMAN.id: ["soc-analysts"]},
        )

    async def build_adapter(self) -> TicketAdapter:
        return self.fake

    async def make_searchable(self) -> None:
        self.fake.advance(SEARCH_DELAY_SECONDS)

    async def next_moment(self) -> datetime:
        # The fake's clock is real time plus an offset, so later writes are stamped at or after this.
        self.fake.advance(1)
        return self.fake.now()

    async def human_ticket(self, summary: str, *, issue_type: str | None = None, label: str | None = None) -> TicketRef:
        labels = [label] if label else []
        return self.fake.add_human_ticket(summary=summary, issue_type=issue_type or self.issue_type, labels=labels)

    async def human_comment(self, ref: TicketRef, text: str, *, internal: bool = False) -> str:
        return self.fake.add_human_comment(ref.key, text, internal=internal).id

    async def human_edit_comment(self, ref: TicketRef, comment_id: str, text: str) -> None:
        self.fake.edit_human_comment(ref.key, comment_id, text)

    async def human_delete_comment(self, ref: TicketRef, comment_id: str) -> None:
        self.fake.delete_human_comment(ref.key, comment_id)

    async def human_set_status(self, ref: TicketRef, status: str) -> None:
        self.fake.transition_as_human(ref.key, status)

    async def human_edit_summary(self, ref: TicketRef, summary: str) -> None:
        self.fake.edit_ticket(ref.key, summary=summary)

    async def human_attach(self, ref: TicketRef, filename: str, data: bytes) -> None:
        self.fake.add_human_attachment(ref.key, filename, data)


@asynccontextmanager
async def contract_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ContractBackend]:
    backend = MemoryBackend()
    try:
        yield backend
    finally:
        await backend.close()
