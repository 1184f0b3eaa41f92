"""Tenant routing: matching, drafts, the mapping checks, and the engine end to end."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml
from fixtures_sync import SyncHarness
from pydantic import ValidationError

from mdr_connector.adapters.mdr.models import Incident
from mdr_connector.connector.engine import INCIDENT
from mdr_connector.connector.errors import ConfigError, ItemError
from mdr_connector.connector.mapping import render_draft
from mdr_connector.connector.mappingfile import Mapping, load_mapping
from mdr_connector.connector.routing import (
    check_destinations,
    destination_for,
    mapping_projects,
    match_route,
    unsupported_by,
)
from mdr_connector.connector.tickets import TicketCapabilities
from mdr_connector.connector.store import LINKED

ROOT = Path(__file__).resolve().parent.parent
CONSOLE = "https://mdr.kaspersky.com"
CREATE_ISSUE = "POST /rest/api/2/issue"
ROUTES = [
    {"tenant": "Acme Bank", "priorities": ["HIGH"], "project": "OPS", "issue_type": "Incident", "labels": ["urgent"]},
    {"tenant": "Acme Bank", "project": "OPS", "labels": ["acme", "tenant-{tenant_name}"], "components": ["Workstations"]},
    {"tenant": "", "project": "SEC", "labels": ["root"], "components": ["Endpoint"]},
]


def mapping_with(**changes: Any) -> Mapping:
    raw = yaml.safe_load((ROOT / "mappings" / "jira.yaml").read_text(encoding="utf-8"))
    raw.update(changes)
    return Mapping.model_validate(raw)


def incident(tenant: str, priority: str = "NORMAL") -> Incident:
    return Incident(
        incident_id="inc-7",
        incident_number=1336700,
        summary="Lateral movement",
        priority=priority,
        status="Open",
        creation_time=1768219992478,
        update_time=1768219992478,
        tenant_name=tenant,
        affected_hosts=["WS-1:0xa"],
    )


# Matching


def test_first_matching_route_wins() -> None:
    """Routes are tried in order: a HIGH incident takes the priority route, others the tenant route."""
    mapping = mapping_with(routes=ROUTES)

    assert match_route(mapping, incident("Acme Bank", "HIGH")) is mapping.routes[0]
    assert match_route(mapping, incident("Acme Bank", "LOW")) is mapping.routes[1]
    assert match_route(mapping, incident("")) is mapping.routes[2]


def test_tenant_matches_exactly() -> None:
    """A tenant name matches only when it is equal: no case folding, no prefix."""
    mapping = mapping_with(routes=ROUTES)

    assert match_route(mapping, incident("acme bank")) is None
    assert match_route(mapping, incident("Acme")) is None


def test_unrouted_default_goes_to_top_level() -> None:
    """With `unrouted: default` an unmatched incident gets the top-level project and issue type."""
    destination = destination_for(mapping_with(routes=ROUTES), incident("Other Corp"))

    assert (destination.project, destination.issue_type, destination.route) == ("SEC", "Task", None)


def test_unrouted_report_names_tenant_and_priority() -> None:
    """With `unrouted: report` an unmatched incident raises ItemError saying which tenant and how to route it."""
    mapping = mapping_with(routes=ROUTES, unrouted="report")

    with pytest.raises(ItemError) as caught:
        destination_for(mapping, incident("Other Corp", "LOW"))

    message = str(caught.value)
    assert "tenant 'Other Corp'" in message
    assert "priority LOW" in message
    assert "tenant: 'Other Corp'" in message
    assert "unrouted: default" in message


def test_route_without_issue_type_uses_top_level() -> None:
    destination = destination_for(mapping_with(routes=ROUTES), incident("Acme Bank"))

    assert (destination.project, destination.issue_type) == ("OPS", "Task")


def test_mapping_projects_lists_each_once() -> None:
    assert mapping_projects(mapping_with(routes=ROUTES)) == ["SEC", "OPS"]


# Drafts


def test_draft_takes_route_values() -> None:
    """The draft gets the route's project and issue type, its labels after the mapping's, and both component lists."""
    mapping = mapping_with(routes=ROUTES, components=["SOC"])
    acme = incident("Acme Bank")

    draft = render_draft(mapping, acme, CONSOLE, "client-1", destination=destination_for(mapping, acme))

    assert (draft.project, draft.issue_type) == ("OPS", "Task")
    assert draft.fields.labels == ("kaspersky-mdr", "acme", "tenant-Acme Bank", "mdr-connector", "mdr-inc-7")
    assert draft.fields.components == ("SOC", "Workstations")


def test_draft_without_route_keeps_mapping_values() -> None:
    mapping = mapping_with(components=["SOC"])

    draft = render_draft(mapping, incident("Acme Bank"), CONSOLE, "client-1")

    assert (draft.project, draft.issue_type) == ("SEC", "Task")
    assert draft.fields.components == ("SOC",)
    assert draft.fields.labels == ("kaspersky-mdr", "mdr-connector", "mdr-inc-7")


# Validation


@pytest.mark.parametrize(
    ("routes", "unrouted", "message"),
    [
        ([{"tenant": "A", "project": "X"}, {"tenant": "A", "priorities": ["HIGH"], "project": "Y"}], "default", "route 2"),
        (
            [{"tenant": "A", "priorities": ["HIGH", "LOW"], "project": "X"}, {"tenant": "A", "priorities": ["LOW"], "project": "Y"}],
            "default",
            "never used",
        ),
        ([{"tenant": "A", "project": "X", "labels": ["{nope}"]}], "default", "unknown placeholder"),
        ([{"tenant": "A", "project": "X", "components": [" "]}], "default", "component name is empty"),
        ([{"tenant": "A", "project": ""}], "default", "at least 1 character"),
        ([{"tenant": "A", "project": "X", "issue_type": ""}], "default", "at least 1 character"),
        ([], "report", "no routes"),
    ],
    ids=["shadowed-by-any-priority", "shadowed-by-wider-priorities", "label-placeholder", "empty-component",
         "empty-project", "empty-issue-type", "report-without-routes"],
)
def test_invalid_routes_are_rejected(routes: list[dict[str, Any]], unrouted: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        mapping_with(routes=routes, unrouted=unrouted)


def test_narrower_route_first_is_valid() -> None:
    """A priority route before a catch-all route of the same tenant is the intended order and loads."""
    mapping = mapping_with(
        routes=[{"tenant": "A", "priorities": ["HIGH"], "project": "X"}, {"tenant": "A", "project": "Y"}]
    )

    assert [route.project for route in mapping.routes] == ["X", "Y"]


# The check when a connection opens


class CheckingTickets:
    """A ticket adapter's `check` over fixed projects and issue types, recording its calls."""

    system = "jira"
    capabilities = TicketCapabilities()

    def __init__(self, projects: dict[str, list[str]], priorities: list[str]) -> None:
        self.projects = projects
        self.priorities = priorities
        self.calls: list[tuple[str, str | None]] = []

    async def check(self, issue_type: str, priorities: Iterable[str], project: str | None = None) -> list[str]:
        self.calls.append((issue_type, project))
        key = project or "SEC"
        if key not in self.projects:
            return [f"project {key!r} does not exist or the connector's account cannot see it"]
        problems = []
        if issue_type not in self.projects[key]:
            problems.append(f"issue type {issue_type!r} is not available in project {key}")
        problems += [f"priority {name!r} does not exist" for name in priorities if name not in self.priorities]
        return problems


async def test_check_reports_every_route_problem() -> None:
    """Every route is checked and all problems come back together. A missing priority is named once."""
    mapping = mapping_with(
        routes=[
            {"tenant": "A", "project": "NOPE"},
            {"tenant": "B", "project": "OPS", "issue_type": "Bug"},
            {"tenant": "C", "project": "OPS", "issue_type": "Bug"},
            {"tenant": "D", "project": "SEC"},
        ],
    )
    tickets = CheckingTickets({"SEC": ["Task"], "OPS": ["Task"]}, ["High", "Medium"])

    problems = await check_destinations(mapping, tickets)  # type: ignore[arg-type]

    assert tickets.calls == [("Task", None), ("Task", "NOPE"), ("Bug", "OPS")]
    assert problems == [
        "priority 'Low' does not exist",
        "route 1 (tenant 'A'): project 'NOPE' does not exist or the connector's account cannot see it",
        "route 2 (tenant 'B'): issue type 'Bug' is not available in project OPS",
    ]


# End to end: MDR and Jira simulators


def add_ops_project(harness: SyncHarness) -> None:
    """Give the simulator's OPS project the issue types and components the routes above use."""
    harness.jira.sim.add_project("OPS", "IT operations", ("Task", "Incident"), ("Servers", "Workstations"))


async def test_routes_to_two_projects(harness: SyncHarness) -> None:
    """Incidents of two tenants land in two projects with their routes' labels and components."""
    add_ops_project(harness)
    harness.use_mapping(routes=ROUTES[1:], components=[])
    acme = harness.seed(tenant_name="Acme Bank")["incident_id"]
    root = harness.seed(tenant_name="")["incident_id"]

    sync = await harness.cycles(1)

    acme_issue, root_issue = harness.issue_for(acme), harness.issue_for(root)
    assert acme_issue.key.startswith("OPS-")
    assert root_issue.key.startswith("SEC-")
    assert {"acme", "tenant-Acme_Bank", "kaspersky-mdr"} <= set(acme_issue.fields["labels"])
    assert "root" not in acme_issue.fields["labels"]
    assert "root" in root_issue.fields["labels"]
    assert acme_issue.fields["components"] == ["Workstations"]
    assert root_issue.fields["components"] == ["Endpoint"]
    assert sync.stats.failures == 0


async def test_routed_ticket_keeps_syncing(harness: SyncHarness) -> None:
    """A ticket in a route's project is watched like one in the top-level project: its comments reach MDR."""
    add_ops_project(harness)
    harness.use_mapping(routes=[{"tenant": "Acme Bank", "project": "OPS"}])
    incident_id = harness.seed(tenant_name="Acme Bank")["incident_id"]
    sync = await harness.cycles(1)
    issue = harness.issue_for(incident_id)

    harness.jira.sim.add_comment(issue.key, "Checked in OPS")
    await harness.cycles(2, sync)

    assert sum("Checked in OPS" in comment["text"] for comment in harness.mdr_comments(incident_id)) == 1


async def test_route_by_priority(harness: SyncHarness) -> None:
    """A route with priorities takes only those; the tenant's other incidents fall through to the next route."""
    add_ops_project(harness)
    harness.use_mapping(routes=ROUTES[:2], components=[])
    high = harness.seed(tenant_name="Acme Bank", priority="HIGH")["incident_id"]
    low = harness.seed(tenant_name="Acme Bank", priority="LOW")["incident_id"]

    await harness.cycles(1)

    high_issue, low_issue = harness.issue_for(high), harness.issue_for(low)
    assert high_issue.fields["issuetype"] == "Incident"
    assert "urgent" in high_issue.fields["labels"]
    assert low_issue.fields["issuetype"] == "Task"
    assert "urgent" not in low_issue.fields["labels"]


async def test_unrouted_default_end_to_end(harness: SyncHarness) -> None:
    """An incident no route matches gets an issue in the top-level project."""
    add_ops_project(harness)
    harness.use_mapping(routes=[{"tenant": "Acme Bank", "project": "OPS"}])
    other = harness.seed(tenant_name="Other Corp")["incident_id"]

    await harness.cycles(1)

    issue = harness.issue_for(other)
    assert issue.key.startswith("SEC-")
    assert issue.fields["issuetype"] == "Task"


async def test_unrouted_report_parks(harness: SyncHarness) -> None:
    """With `unrouted: report` an unmatched incident is parked with a clear reason and nothing is created."""
    add_ops_project(harness)
    harness.use_mapping(routes=[{"tenant": "Acme Bank", "project": "OPS"}], unrouted="report")
    other = harness.seed(tenant_name="Other Corp", priority="HIGH")["incident_id"]
    routed = harness.seed(tenant_name="Acme Bank")["incident_id"]

    await harness.cycles(1)

    parked = await harness.store.get_parked("main", INCIDENT, other)
    assert parked is not None
    assert "tenant 'Other Corp'" in parked.reason
    assert "priority HIGH" in parked.reason
    assert harness.issues_for(other) == []
    assert harness.jira.sim.calls[CREATE_ISSUE] == 1
    assert (await harness.store.get_link("main", routed)).state == LINKED
    assert await harness.store.get_link("main", other) is None


async def test_check_mapping_reports_route_project(harness: SyncHarness) -> None:
    """A route to a missing project stops the connection at open, with every problem in one error."""
    harness.use_mapping(
        routes=[
            {"tenant": "Acme Bank", "project": "NOPE"},
            {"tenant": "Beta", "project": "OPS", "issue_type": "Incident"},
        ]
    )

    with pytest.raises(ConfigError) as caught:
        await harness.engine()

    message = str(caught.value)
    assert "route 1 (tenant 'Acme Bank')" in message
    assert "'NOPE'" in message
    assert "route 2 (tenant 'Beta')" in message
    assert "'Incident'" in message
    assert harness.jira.sim.calls[CREATE_ISSUE] == 0


def test_builtin_mapping_has_no_routes() -> None:
    """The shipped mapping routes nothing, so every incident goes to its project as before."""
    mapping = load_mapping("builtin:jira")

    assert mapping.routes == []
    assert mapping.unrouted == "default"


def test_unsupported_by_names_each_setting_the_system_lacks() -> None:
    mapping = mapping_with(
        labels=["soc"],
        components=["SOC"],
        comments={"visibility": {"type": "role", "value": "Developers"}},
        create_incidents={"enabled": True, "label": "mdr-create"},
    )
    bare = TicketCapabilities(labels=False, components=False, visibility_types=frozenset({"internal"}))

    problems = unsupported_by(mapping, "servicenow", bare)

    assert len(problems) == 4
    assert problems[0].startswith("ServiceNow tickets have no labels")
    assert "create_incidents" in problems[1]
    assert "'mdr-create'" in problems[1]
    assert "components" in problems[2]
    assert "'role'" in problems[3]
    assert "internal" in problems[3]
    assert unsupported_by(mapping, "jira", TicketCapabilities()) == []


def test_visibility_value_rules() -> None:
    internal = mapping_with(comments={"visibility": {"type": "internal"}})

    assert internal.comments.visibility is not None and internal.comments.visibility.type == "internal"
    with pytest.raises(ValidationError, match="takes no value"):
        mapping_with(comments={"visibility": {"type": "internal", "value": "x"}})
    with pytest.raises(ValidationError, match="needs the group name"):
        mapping_with(comments={"visibility": {"type": "group"}})
