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
import string
from dataclasses import asdict
from datetime import datetime, timezone

from mdr_connector.adapters.mdr.models import Incident
from mdr_connector.connector.i18n import _
from mdr_connector.connector.mappingfile import Mapping, Route
from mdr_connector.connector.routing import Destination
from mdr_connector.connector.tickets import (
    TICKET_ORIGIN,
    CommentVisibility,
    SyncMarker,
    TicketDraft,
    TicketFields,
    system_title,
)

CONNECTOR_LABEL = "mdr-connector"
# The TicketFields attributes that `field_owner` and `skip` name directly.
CORE_FIELD_NAMES = frozenset({"summary", "description", "priority", "labels", "components"})

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


def incident_values(incident: Incident, console_url: str, assets: str | None = None) -> dict[str, object]:
    """Return the values a mapping template can use, all rendered as text.

    `assets` is the rendered asset table. Without it, `{assets}` shows the
    same host list as `{affected_hosts}`.
    """
    hosts = [entry.split(":", 1) for entry in incident.affected_hosts]
    host_lines = [
        "- " + _("{host} (asset {asset_id})").format(host=code_span(parts[0]), asset_id=code_span(parts[1]))
        if len(parts) == 2
        else f"- {code_span(parts[0])}"
        for parts in hosts
    ]
    affected_hosts = "\n".join(host_lines) or "-"
    return {
        "incident_id": incident.incident_id,
        "incident_number": incident.incident_number,
        "summary": incident.summary,
        "description": incident.description,
        "priority": incident.priority,
        "status": incident.status,
        "resolution": incident.resolution,
        "tenant_name": incident.tenant_name,
        "affected_hosts": affected_hosts,
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
        "assets": affected_hosts if assets is None else assets,
    }


def template_placeholders(template: str) -> set[str]:
    """Return the placeholder names a template uses."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def render_fields(
    mapping: Mapping,
    incident: Incident,
    console_url: str,
    *,
    route: Route | None = None,
    assets: str | None = None,
) -> TicketFields:
    """Render the mapped ticket fields of an incident, with the labels and components of its route, if any."""
    values = incident_values(incident, console_url, assets)
    summary = mapping.summary.format_map(values).replace("\n", " ").strip()
    label_templates = [*mapping.labels, *(route.labels if route else [])]
    labels = [template.format_map(values).strip() for template in label_templates]
    labels += [CONNECTOR_LABEL, correlation_label(incident.incident_id)]
    components = [*mapping.components, *(route.components if route else [])]

    return TicketFields(
        summary=summary,
        description=mapping.description.format_map(values).strip(),
        priority=mapping.priority[incident.priority] if incident.priority in mapping.priority else None,
        labels=tuple(dict.fromkeys(label for label in labels if label)),
        extra=dict(mapping.fields),
        components=tuple(dict.fromkeys(name.strip() for name in components)),
    )


def render_draft(
    mapping: Mapping,
    incident: Incident,
    console_url: str,
    client_id: str,
    *,
    destination: Destination | None = None,
    assets: str | None = None,
) -> TicketDraft:
    """Render the ticket to create, in the top-level project and issue type unless routing gives a `destination`."""
    route = destination.route if destination else None
    return TicketDraft(
        incident_id=incident.incident_id,
        project=destination.project if destination else mapping.project,
        issue_type=destination.issue_type if destination else mapping.issue_type,
        fields=render_fields(mapping, incident, console_url, route=route, assets=assets),
        metadata={
            "incident_id": incident.incident_id,
            "incident_number": incident.incident_number,
            "client_id": client_id,
            "tenant_name": incident.tenant_name,
        },
    )


def fields_hash(fields: TicketFields, skip: frozenset[str] = frozenset()) -> str:
    """Return a digest of the mapped fields, to tell whether a ticket needs an update.

    `skip` names the fields the ticket owns (core names or keys of `extra`).
    They are left out, so a change of one of them alone needs no update.
    """
    values = asdict(fields)
    for name in skip & CORE_FIELD_NAMES:
        values.pop(name)
    values["extra"] = {key: value for key, value in values["extra"].items() if key not in skip}
    encoded = json.dumps(values, sort_keys=True, ensure_ascii=False, default=str)
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
    header = _ticket_comment_header(mapping, author, created, system, ticket_key)
    return f"{header}\n\n{body}\n\n{mdr_footer(system, comment_id)}"


def render_edit_note_for_mdr(
    mapping: Mapping,
    *,
    author: str,
    edited: datetime,
    body: str,
    system: str,
    ticket_key: str,
    note_id: str,
) -> str:
    """Render the MDR note that carries the new text of a ticket comment edited after it was copied."""
    header = _ticket_comment_header(mapping, author, edited, system, ticket_key)
    edited_in = _("_Edited in {system}. The new text:_").format(system=system_title(system))
    return f"{header}\n\n{edited_in}\n\n{body}\n\n{mdr_footer(system, note_id)}"


def render_deletion_note_for_mdr(*, system: str, ticket_key: str, comment_id: str, note_id: str) -> str:
    """Render the MDR note saying that a ticket comment copied to the incident was deleted on the ticket."""
    text = _(
        "_{system} comment {comment_id} of {ticket_key}, copied to this incident earlier, was deleted in {system}._"
    ).format(system=system_title(system), comment_id=comment_id, ticket_key=ticket_key)
    return f"{text}\n\n{mdr_footer(system, note_id)}"


def render_deleted_copy_for_ticket() -> str:
    """Render the text that replaces the ticket copy of an MDR comment deleted in MDR."""
    return _("_This Kaspersky MDR comment was deleted in MDR, so the connector removed the copied text._")


def render_deletion_note_for_ticket(copied: datetime | None) -> str:
    """Render the ticket note saying that an MDR comment copied to the ticket was deleted in MDR."""
    if copied is None:
        return _("_A Kaspersky MDR comment copied to this ticket was deleted in MDR._")
    return _("_The Kaspersky MDR comment copied to this ticket on {copied} was deleted in MDR._").format(
        copied=format_time(copied)
    )


def mdr_footer(system: str, source_id: str) -> str:
    """Return the footer that ends every comment the connector writes to MDR; `parse_mdr_footer` reads it."""
    return f"_mdr-connector: {system} comment {source_id}_"


def _ticket_comment_header(mapping: Mapping, author: str, created: datetime, system: str, ticket_key: str) -> str:
    return mapping.comments.ticket_to_mdr_header.format_map(
        {
            "author": escape_markdown(author),
            "created": format_time(created),
            "ticket_key": ticket_key,
            "system": system_title(system),
        }
    )


def comment_visibility(mapping: Mapping) -> CommentVisibility | None:
    """Return who may read the comments the connector posts on the ticket; None lets everyone read them."""
    rule = mapping.comments.visibility
    if rule is None:
        return None
    return CommentVisibility(type=rule.type, value=rule.value)


FENCED_BLOCK = re.compile(r"\A\s*(`{3,})\n(.*)\n\1\s*\Z", re.DOTALL)


def strip_comment_marker(body: str, marker: str) -> str | None:
    """Return a comment body without its leading marker, or None when the body does not start with it.

    The match ignores case and leading whitespace, and it accepts the
    backslash escapes that the Jira-to-Markdown conversion adds, because
    `#mdr` typed in Jira reads as `\\#mdr`. The marker must end at a word
    boundary, so `#mdr` does not match `#mdrx`.
    """
    escaped = "".join(r"\\?" + re.escape(character) for character in marker)
    # A comment whose markup could not be converted arrives as a fenced code
    # block of its Jira text; the marker then starts the block's content.
    fenced = FENCED_BLOCK.match(body)
    if fenced is not None:
        inner = re.match(rf"\s*{escaped}(?!\w)", fenced.group(2), re.IGNORECASE)
        if inner is None:
            return None
        fence = fenced.group(1)
        return f"{fence}\n{fenced.group(2)[inner.end():].strip()}\n{fence}"

    match = re.match(rf"\s*{escaped}(?!\w)", body, re.IGNORECASE)
    if match is None:
        return None
    return body[match.end():].strip()


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
