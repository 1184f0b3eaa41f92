"""Render tickets and mirrored comments from MDR records through a mapping.

Templates were checked when the mapping loaded (only known placeholders,
no attribute or index access), so rendering here cannot run arbitrary
lookups on the values.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from dataclasses import asdict
from datetime import datetime, timezone

from mdr_connector.adapters.mdr.models import Incident
from mdr_connector.connector.mappingfile import Mapping
from mdr_connector.connector.tickets import SyncMarker, TicketDraft, TicketFields, TICKET_ORIGIN

CONNECTOR_LABEL = "mdr-connector"

# The footer of a comment the connector wrote to MDR. It is how a comment
# whose create reply was lost is found again before it is sent twice. Only
# a footer that ends the comment counts, so the same words quoted inside a
# comment body or a display name cannot pass for it.
MDR_FOOTER_PATTERN = re.compile(r"mdr-connector: ([a-z]+) comment ([A-Za-z0-9:.-]*[A-Za-z0-9])[\W_]*$")
HTML_TAG = re.compile(r"<[^>]*>")
# Characters that can start emphasis, code, links, images, HTML or tables
# inside a line of Markdown.
MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()!|<>&~])")


def correlation_label(incident_id: str) -> str:
    """Return the label that ties a ticket to its MDR incident."""
    return f"mdr-{incident_id}"


def format_ms(epoch_ms: int) -> str:
    return format_time(datetime.fromtimestamp(epoch_ms / 1000, tz=timezone.utc))


def format_time(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def console_link(console_url: str, incident_id: str) -> str:
    return f"{console_url.rstrip('/')}/incidents/{incident_id}"


def incident_values(incident: Incident, console_url: str) -> dict[str, object]:
    """Return the values a mapping template can use, all rendered as text."""
    hosts = [entry.split(":", 1) for entry in incident.affected_hosts]
    host_lines = [
        f"- {code_span(parts[0])} (asset {code_span(parts[1])})" if len(parts) == 2 else f"- {code_span(parts[0])}"
        for parts in hosts
    ]
    return {
        "incident_id": incident.incident_id,
        "incident_number": incident.incident_number,
        "summary": incident.summary,
        "description": incident.description,
        "priority": incident.priority,
        "status": incident.status,
        "resolution": incident.resolution,
        "tenant_name": incident.tenant_name,
        "affected_hosts": "\n".join(host_lines) or "-",
        "host_names": ", ".join(escape_markdown(name) for name in incident.host_names()),
        "console_link": console_link(console_url, incident.incident_id),
        "creation_time": format_ms(incident.creation_time),
        "update_time": format_ms(incident.update_time),
        "detection_technology": incident.detection_technology,
        "attack_stage": incident.attack_stage,
        "mitre_tactics": ", ".join(incident.mitre_tactics),
        "mitre_techniques": ", ".join(incident.mitre_techniques),
        "client_description": incident.client_description,
        "recommendations": incident.recommendations,
    }


def render_fields(mapping: Mapping, incident: Incident, console_url: str) -> TicketFields:
    """Render the mapped ticket fields of an incident."""
    values = incident_values(incident, console_url)
    summary = mapping.summary.format_map(values).replace("\n", " ").strip()
    labels = [template.format_map(values).strip() for template in mapping.labels]
    labels += [CONNECTOR_LABEL, correlation_label(incident.incident_id)]

    return TicketFields(
        summary=summary,
        description=mapping.description.format_map(values).strip(),
        priority=mapping.priority[incident.priority] if incident.priority in mapping.priority else None,
        labels=tuple(dict.fromkeys(label for label in labels if label)),
        extra=dict(mapping.fields),
    )


def render_draft(mapping: Mapping, incident: Incident, console_url: str, client_id: str) -> TicketDraft:
    return TicketDraft(
        incident_id=incident.incident_id,
        project=mapping.project,
        issue_type=mapping.issue_type,
        fields=render_fields(mapping, incident, console_url),
        metadata={
            "incident_id": incident.incident_id,
            "incident_number": incident.incident_number,
            "client_id": client_id,
            "tenant_name": incident.tenant_name,
        },
    )


def fields_hash(fields: TicketFields) -> str:
    """Return a digest of the mapped fields, to tell whether a ticket needs an update."""
    encoded = json.dumps(asdict(fields), sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(encoded.encode("utf-8")).hexdigest()


def render_comment_for_ticket(mapping: Mapping, author: str, created: datetime, body: str) -> str:
    """Render a Markdown comment for the ticket, headed by the MDR author and time."""
    header = mapping.comments.mdr_to_ticket_header.format_map(
        {"author": escape_markdown(author), "created": format_time(created), "ticket_key": "", "system": "Kaspersky MDR"}
    )
    return f"{header}\n\n{body}".strip()


def render_comment_for_mdr(
    mapping: Mapping,
    *,
    author: str,
    created: datetime,
    body: str,
    system: str,
    ticket_key: str,
    comment_id: str,
) -> str:
    """Render a Markdown comment for MDR, headed by the ticket author and ending in the connector's footer."""
    header = mapping.comments.ticket_to_mdr_header.format_map(
        {
            "author": escape_markdown(author),
            "created": format_time(created),
            "ticket_key": ticket_key,
            "system": system.title(),
        }
    )
    footer = f"_mdr-connector: {system} comment {comment_id}_"
    return f"{header}\n\n{body}\n\n{footer}"


def parse_mdr_footer(text: str) -> SyncMarker | None:
    """Read the connector's footer at the end of an MDR comment (plain, Markdown or HTML)."""
    visible = " ".join(html.unescape(HTML_TAG.sub(" ", text)).split())
    match = MDR_FOOTER_PATTERN.search(visible)
    if match is None:
        return None
    return SyncMarker(origin=TICKET_ORIGIN, source_id=match.group(2))


def escape_markdown(text: str) -> str:
    """Escape text taken from outside (a name, a host) so Markdown shows it literally, with no HTML or links."""
    return MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(text.split()))


def code_span(text: str) -> str:
    """Wrap text in a Markdown code span that shows it literally, backticks included."""
    text = " ".join(text.split())
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    padding = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{padding}{text}{padding}{fence}"
