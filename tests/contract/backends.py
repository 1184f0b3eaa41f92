"""The interface between the ticket adapter contract suite and one ticket system.

`test_contract.py` runs the same behaviour tests against every adapter. A
backend gives the suite an opened adapter and lets it act as a person in
the ticket system: comment, edit, attach, change a status, open a ticket.
It also controls time where the system allows it, so a search delay or a
`since` boundary needs no sleeping against a simulator.

Each system has one module, `backend_<name>.py`, next to this file. The
module defines one function, which `conftest.py` imports by name:

    @asynccontextmanager
    async def contract_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ContractBackend]:
        ...  # start the server or simulator, build the backend
        try:
            yield backend
        finally:
            await backend.close()

The function calls `pytest.skip` when its system is not available (or,
for Redmine under CI=true, `pytest.fail`). When the module itself or an
adapter module it imports at the top does not exist yet, `conftest.py`
skips the backend.

The tests branch on `adapter.capabilities` and on the attributes below,
never on `system`, so a new adapter passes by describing itself in its backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime

from mdr_connector.adapters.textmarker import with_marker
from mdr_connector.connector.tickets import CommentVisibility, SyncMarker, TicketAccount, TicketAdapter, TicketRef

# The ids of the backend modules that `conftest.py` loads, in test order.
BACKEND_IDS = ("memory", "jira", "servicenow", "redmine")


@dataclass(frozen=True)
class StatusNames:
    """Status names of the backend's workflow that the transition tests use.

    A new ticket must be able to reach `in_progress` by one transition, and
    a ticket in `in_progress` must be able to reach `done` by one.
    `unreachable` is a status that exists but that no transition leads to
    from `in_progress`, or None when the workflow has no such status.
    """

    in_progress: str
    done: str
    unreachable: str | None = None


class ContractBackend(ABC):
    """One ticket system for the contract suite: an adapter, a person who acts in it, and a clock.

    Subclasses call `super().__init__()`, set the attributes in their
    `__init__` and implement every abstract method. A person's action that
    the system cannot perform raises NotImplementedError with the reason,
    and the test that needs it is skipped with that reason.
    """

    # The adapter's `system` value, such as "jira". For test ids and messages only.
    system: str
    # The project, assignment group or project identifier that tickets are created in.
    project: str
    # An issue type (Jira), category (ServiceNow) or tracker (Redmine) of `project`.
    issue_type: str
    # Valid priority names for `TicketFields.priority`, at least two.
    priorities: tuple[str, ...]
    # A second project where the connector's account may create tickets of `issue_type`,
    # or None when the backend has only one.
    other_project: str | None = None
    statuses: StatusNames
    # The visibility that makes a comment the connector posts readable by a limited audience
    # (a Jira role, a ServiceNow work note, a Redmine private note), or None when the system has none.
    internal_visibility: CommentVisibility | None = None
    # The account `human_*` methods act as, with the id and display name the adapter must report.
    person: TicketAccount
    # Groups that `account_groups(person.id)` must contain; the result may hold more.
    person_groups: frozenset[str] = frozenset()
    # The number of comments the server returns per page when the backend made pages small,
    # so the paging test posts more than that; None when the backend cannot set the page size.
    comment_page_size: int | None = None
    # The field ids that `get_state` reads the summary and description by.
    summary_field: str = "summary"
    description_field: str = "description"
    # False for a system that stores descriptions as plain text: the round-trip test then
    # checks that the text survives, not that the Markdown comes back unchanged.
    markdown_description: bool = True

    account: TicketAccount
    """The connector's own account, as the last `open()` returned it."""

    def __init__(self) -> None:
        self._adapters: list[TicketAdapter] = []

    @abstractmethod
    async def build_adapter(self) -> TicketAdapter:
        """Build a new adapter for the connector's account, not yet opened."""

    async def open(self) -> TicketAdapter:
        """Build an adapter, open it, store its account in `account`, and return it.

        Each call returns a new adapter; `close()` closes all of them.
        """
        adapter = await self.build_adapter()
        # Listed before opening, so `close()` also releases an adapter whose `open()` failed half-way.
        self._adapters.append(adapter)
        self.account = await adapter.open()
        return adapter

    async def close(self) -> None:
        """Close every adapter that `open()` returned, then call `release()`. Runs after failed tests too."""
        try:
            for adapter in self._adapters:
                await adapter.close()
        finally:
            self._adapters.clear()
            await self.release()

    async def release(self) -> None:
        """Release what the backend started besides adapters. Does nothing unless a subclass overrides it."""

    # Time and search

    @abstractmethod
    async def make_searchable(self) -> None:
        """Let the adapter's searches see every write made so far.

        A simulator moves its clock past the search delay; a system whose
        search is consistent does nothing.
        """

    @abstractmethod
    async def next_moment(self) -> datetime:
        """Return a UTC time later than every change made so far and not later than any change made afterwards.

        A simulator moves its clock forward; a real server waits until its
        clock has passed the resolution of its `updated` timestamps. The
        `changed_tickets` and `find_tickets` tests pass this as `since`.
        """

    # A person's actions

    @abstractmethod
    async def human_ticket(self, summary: str, *, issue_type: str | None = None, label: str | None = None) -> TicketRef:
        """Create a ticket in `project` as the person, with no connector marker.

        `issue_type` defaults to the backend's `issue_type`; `label` is only
        passed when `adapter.capabilities.labels` is True.
        """

    @abstractmethod
    async def human_comment(self, ref: TicketRef, text: str, *, internal: bool = False) -> str:
        """Add a comment as the person and return its id as `list_comments` reports it.

        `text` is plain text, posted as typed. `internal` makes it a comment
        that the system shows to a limited audience, such as a Jira role
        comment, a work note or a private note. The tests pass it only when
        `internal_visibility` is set.
        """

    async def human_forged_comment(self, ref: TicketRef, text: str, marker: SyncMarker) -> str:
        """Add a comment as the person that carries `marker` wherever the system lets a person put it, and return its id.

        By default the marker is typed as the text's last line. A system
        whose markers are data a person can also write, such as Jira's
        comment properties, overrides this to write that data.
        """
        return await self.human_comment(ref, with_marker(text, marker))

    @abstractmethod
    async def human_edit_comment(self, ref: TicketRef, comment_id: str, text: str) -> None:
        """Replace the text of the person's own comment, or raise NotImplementedError."""

    @abstractmethod
    async def human_delete_comment(self, ref: TicketRef, comment_id: str) -> None:
        """Delete the person's comment, or raise NotImplementedError where the system keeps every comment."""

    @abstractmethod
    async def human_set_status(self, ref: TicketRef, status: str) -> None:
        """Move the ticket to `status` as the person would in the web UI."""

    @abstractmethod
    async def human_edit_summary(self, ref: TicketRef, summary: str) -> None:
        """Change the ticket's summary (short description, subject) as the person."""

    @abstractmethod
    async def human_attach(self, ref: TicketRef, filename: str, data: bytes) -> None:
        """Attach `data` to the ticket as the person under `filename`."""
