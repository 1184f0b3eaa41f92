"""The workflow of the simulated Jira site: statuses, their categories, transitions and resolutions.

Every issue of the simulator follows one workflow. The default one is
small and deliberately not fully connected, so a test can ask for a status
that the current one cannot reach:

    Start progress   To Do -> In Progress
    Put on hold      To Do, In Progress -> On Hold
    Resume           On Hold -> In Progress
    Done             To Do, In Progress, On Hold -> Done
    Reopen           Done -> To Do

Entering a status of the `done` category sets the issue's resolution to the
transition's `fields.resolution`, else to the first resolution. Leaving it
clears the resolution.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

StatusCategory = Literal["new", "indeterminate", "done"]

# The ids, names and colours Jira gives its three status categories.
CATEGORY_JSON: dict[str, dict[str, Any]] = {
    "new": {"id": 2, "key": "new", "colorName": "blue-gray", "name": "To Do"},
    "indeterminate": {"id": 4, "key": "indeterminate", "colorName": "yellow", "name": "In Progress"},
    "done": {"id": 3, "key": "done", "colorName": "green", "name": "Done"},
}
DEFAULT_STATUSES: dict[str, StatusCategory] = {
    "To Do": "new",
    "In Progress": "indeterminate",
    "On Hold": "indeterminate",
    "Done": "done",
}
DEFAULT_RESOLUTIONS = ("Done", "Won't Do", "Duplicate", "Cannot Reproduce")


@dataclass(frozen=True)
class SimTransition:
    """A workflow transition, available from every status (a global transition) when `sources` is empty."""

    id: str
    name: str
    to: str
    sources: tuple[str, ...] = ()

    def available_from(self, status: str) -> bool:
        return (not self.sources or status in self.sources) and status != self.to


DEFAULT_TRANSITIONS = (
    SimTransition("11", "Start progress", "In Progress", ("To Do",)),
    SimTransition("21", "Put on hold", "On Hold", ("To Do", "In Progress")),
    SimTransition("31", "Resume", "In Progress", ("On Hold",)),
    SimTransition("41", "Done", "Done", ("To Do", "In Progress", "On Hold")),
    SimTransition("51", "Reopen", "To Do", ("Done",)),
)


@dataclass
class SimWorkflow:
    """Statuses by name with their category, the transitions between them, and the resolutions."""

    statuses: dict[str, StatusCategory] = field(default_factory=lambda: dict(DEFAULT_STATUSES))
    transitions: tuple[SimTransition, ...] = DEFAULT_TRANSITIONS
    resolutions: tuple[str, ...] = DEFAULT_RESOLUTIONS
    # The status of a new issue, or the first status when empty.
    initial: str = ""

    def __post_init__(self) -> None:
        if not self.statuses:
            raise ValueError("a workflow needs at least one status")
        for name, category in self.statuses.items():
            if category not in CATEGORY_JSON:
                raise ValueError(f"status {name!r} has category {category!r}; use new, indeterminate or done")
        for transition in self.transitions:
            unknown = [name for name in (transition.to, *transition.sources) if name not in self.statuses]
            if unknown:
                raise ValueError(f"transition {transition.name!r} names unknown statuses: {', '.join(unknown)}")
        if self.initial and self.initial not in self.statuses:
            raise ValueError(f"initial status {self.initial!r} is not one of the workflow's statuses")
        if not self.resolutions:
            raise ValueError("a workflow needs at least one resolution for its done statuses")

    @property
    def initial_status(self) -> str:
        return self.initial or next(iter(self.statuses))

    def status_id(self, name: str) -> str:
        return str(10000 + list(self.statuses).index(name))

    def resolution_id(self, name: str) -> str:
        return str(10000 + self.resolutions.index(name))

    def available(self, status: str) -> list[SimTransition]:
        """Return the transitions a person could take from `status`, in workflow order."""
        return [transition for transition in self.transitions if transition.available_from(status)]

    def is_done(self, status: str) -> bool:
        return self.statuses.get(status) == "done"
