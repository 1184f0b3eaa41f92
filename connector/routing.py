"""Tenant routing: which project, issue type, labels and components an incident's ticket gets.

The mapping's `routes` are tried in order and the first whose tenant (and
priorities, when given) match wins. An incident no route matches goes to
the mapping's top-level project and issue type (`unrouted: default`), or
is parked with an error that names the route to add (`unrouted: report`).
"""

from __future__ import annotations

from dataclasses import dataclass

from mdr_connector.adapters.mdr.models import Incident
from mdr_connector.connector.errors import ItemError
from mdr_connector.connector.mappingfile import Mapping, Route
from mdr_connector.connector.tickets import TicketAdapter, TicketCapabilities, system_title


@dataclass(frozen=True)
class Destination:
    """The project and issue type of a new ticket, and the route that chose them (None for the top-level ones)."""

    project: str
    issue_type: str
    route: Route | None = None


def route_matches(route: Route, incident: Incident) -> bool:
    """Tell whether a route takes an incident: same tenant, and one of its priorities when it names any."""
    if route.tenant != incident.tenant_name:
        return False
    return not route.priorities or incident.priority in route.priorities


def match_route(mapping: Mapping, incident: Incident) -> Route | None:
    """Return the first route that matches the incident, or None."""
    return next((route for route in mapping.routes if route_matches(route, incident)), None)


def destination_for(mapping: Mapping, incident: Incident) -> Destination:
    """Return the destination of the incident's new ticket.

    Raises ItemError when no route matches and `unrouted` is `report`.
    """
    route = match_route(mapping, incident)
    if route is not None:
        return Destination(project=route.project, issue_type=route.issue_type or mapping.issue_type, route=route)
    if mapping.unrouted == "report":
        raise ItemError(unrouted_message(incident))
    return Destination(project=mapping.project, issue_type=mapping.issue_type)


def unrouted_message(incident: Incident) -> str:
    tenant = f"tenant {incident.tenant_name!r}" if incident.tenant_name else 'the root tenant ("")'
    return (
        f"MDR incident {incident.incident_number} ({incident.incident_id}) of {tenant} with priority "
        f"{incident.priority} matches no route and the mapping has `unrouted: report`; add a route with "
        f"`tenant: {incident.tenant_name!r}` and a `project` under `routes`, or set `unrouted: default` "
        "to send such incidents to the top-level project"
    )


def mapping_projects(mapping: Mapping) -> list[str]:
    """Return every project a mapping can create tickets in: the top-level one first, then the routes' ones."""
    return list(dict.fromkeys([mapping.project, *(route.project for route in mapping.routes)]))


async def check_destinations(mapping: Mapping, tickets: TicketAdapter) -> list[str]:
    """Return what would stop ticket creation in any project and issue type the mapping can use.

    The top-level project and issue type are checked even when every
    incident is routed, because the connection's searches run in that project.
    """
    priorities = list(mapping.priority.values())
    top_level = await tickets.check(mapping.issue_type, priorities)
    problems = unsupported_by(mapping, tickets.system, tickets.capabilities) + list(top_level)

    checked = {(mapping.project, mapping.issue_type)}
    for index, route in enumerate(mapping.routes, start=1):
        target = (route.project, route.issue_type or mapping.issue_type)
        if target in checked:
            continue
        checked.add(target)
        found = await tickets.check(target[1], priorities, project=target[0])
        # A missing priority is usually missing site-wide, so it is reported
        # once for the top-level project, not again for each route.
        problems += [f"route {index} (tenant {route.tenant!r}): {problem}" for problem in found if problem not in top_level]
    return list(dict.fromkeys(problems))


def unsupported_by(mapping: Mapping, system: str, capabilities: TicketCapabilities) -> list[str]:
    """Return the mapping settings that request something the ticket system cannot store."""
    name = system_title(system)
    problems: list[str] = []
    route_labels = any(route.labels for route in mapping.routes)
    if not capabilities.labels and (mapping.labels or route_labels):
        problems.append(f"{name} tickets have no labels; remove `labels` from the mapping and its routes")
    requests = mapping.create_incidents
    if not capabilities.labels and requests.enabled and requests.label:
        problems.append(
            f"{name} tickets have no labels, so create_incidents cannot find requests by label "
            f"{requests.label!r}; set `create_incidents.label: null` and name an `issue_type`"
        )
    route_components = any(route.components for route in mapping.routes)
    if not capabilities.components and (mapping.components or route_components):
        problems.append(f"{name} tickets have no components; remove `components` from the mapping and its routes")
    visibility = mapping.comments.visibility
    if visibility is not None and visibility.type not in capabilities.visibility_types:
        known = ", ".join(sorted(capabilities.visibility_types)) or "none"
        problems.append(
            f"{name} does not support comment visibility type {visibility.type!r}; use one of: {known}, "
            "or remove `comments.visibility`"
        )
    return problems
