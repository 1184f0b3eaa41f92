"""The contract backend for ServiceNow: the adapter against the ServiceNow simulator on loopback.

The person is the simulator's human user, acting through its Python API.
sys_created_on and sys_updated_on count whole seconds, so the simulator
clock moves one second before and after each of the person's actions:
two writes in one second have no order that a ServiceNow client can read.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from fixtures_servicenow import CATEGORY, GROUP, RunningServiceNow, servicenow_settings

from contract.backends import ContractBackend, StatusNames
from mdr_connector.adapters.servicenow import adapter as adapter_module
from mdr_connector.adapters.servicenow.adapter import ServiceNowTicketAdapter
from mdr_connector.adapters.servicenow.simulator import HUMAN_USER, ServiceNowSimulator, run_simulator
from mdr_connector.adapters.servicenow.simulator_schema import STATE_CHOICES
from mdr_connector.connector.tickets import CommentVisibility, TicketAccount, TicketAdapter, TicketRef

# A small page, so the paging of comments, tickets and users is exercised by a handful of records.
PAGE_SIZE = 3
# Fields a person fills in the form to reach a state under the simulator's data policies.
STATE_FIELDS: dict[str, dict[str, str]] = {
    "3": {"hold_reason": "4"},
    "6": {"close_code": "Solution provided", "close_notes": "Fixed by the analyst."},
    "7": {"close_code": "Solution provided", "close_notes": "Fixed by the analyst."},
}


class ServiceNowBackend(ContractBackend):
    """One simulated instance; every `open()` builds a new adapter on it with Basic credentials."""

    def __init__(self, running: RunningServiceNow, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__()
        self.running = running
        self.sim: ServiceNowSimulator = running.sim
        self.monkeypatch = monkeypatch
        self.system = "servicenow"
        self.project = GROUP
        self.issue_type = CATEGORY
        self.priorities = ("1 - High", "2 - Medium", "3 - Low")
        self.other_project = "SOC Tier 2"
        # Closing needs itil_admin, which the simulator's service account lacks.
        self.statuses = StatusNames(in_progress="In Progress", done="Resolved", unreachable="Closed")
        self.internal_visibility = CommentVisibility(type="internal")
        human = self.sim.user(HUMAN_USER)
        self.person = TicketAccount(id=human.user_name, display_name=human.name)
        self.person_groups = frozenset({"SOC", "SOC Tier 2"})
        self.comment_page_size = PAGE_SIZE
        self.markdown_description = False

    async def build_adapter(self) -> TicketAdapter:
        return ServiceNowTicketAdapter(servicenow_settings(self.running, self.monkeypatch), self.project)

    async def make_searchable(self) -> None:
        """Do nothing, because a Table API query returns every record as soon as its write returns."""

    async def next_moment(self) -> datetime:
        self.sim.advance(1)
        return self.sim.now()

    async def human_ticket(self, summary: str, *, issue_type: str | None = None, label: str | None = None) -> TicketRef:
        fields = {"short_description": summary, "category": issue_type or self.issue_type, "assignment_group": self.project}
        row = self._as_person(lambda: self.sim.create_incident(fields))
        return self._ref(row)

    async def human_comment(self, ref: TicketRef, text: str, *, internal: bool = False) -> str:
        element = "work_notes" if internal else "comments"
        entry = self._as_person(lambda: self.sim.add_human_comment(ref.id, text, element))
        return str(entry["sys_id"])

    async def human_edit_comment(self, ref: TicketRef, comment_id: str, text: str) -> None:
        raise NotImplementedError("ServiceNow journal entries cannot be edited")

    async def human_delete_comment(self, ref: TicketRef, comment_id: str) -> None:
        raise NotImplementedError("ServiceNow keeps every journal entry")

    async def human_set_status(self, ref: TicketRef, status: str) -> None:
        value = next(value for value, label in STATE_CHOICES if label.casefold() == status.casefold())
        self._as_person(lambda: self.sim.set_state(ref.id, value, **STATE_FIELDS.get(value, {})))

    async def human_edit_summary(self, ref: TicketRef, summary: str) -> None:
        self._as_person(lambda: self.sim.update_incident(ref.id, {"short_description": summary}))

    async def human_attach(self, ref: TicketRef, filename: str, data: bytes) -> None:
        self._as_person(lambda: self.sim.add_attachment(ref.id, filename, data))

    def _as_person(self, action: Any) -> Any:
        self.sim.advance(1)
        result = action()
        self.sim.advance(1)
        return result

    def _ref(self, row: dict[str, Any]) -> TicketRef:
        return TicketRef(key=row["number"], id=row["sys_id"], url=f"{self.running.url}/incident.do?sys_id={row['sys_id']}")


@asynccontextmanager
async def contract_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ContractBackend]:
    monkeypatch.setattr(adapter_module, "PAGE_SIZE", PAGE_SIZE)
    async with AsyncExitStack() as stack:
        sim = ServiceNowSimulator()
        url = await stack.enter_async_context(run_simulator(sim))
        backend = ServiceNowBackend(RunningServiceNow(sim, url), monkeypatch)
        try:
            yield backend
        finally:
            await backend.close()
