"""Rendering tickets and mirrored comments from MDR incidents through a mapping."""

from __future__ import annotations

from datetime import datetime, timezone

from mdr_connector.adapters.mdr.models import Incident
from mdr_connector.connector.config import load_mapping
from mdr_connector.connector.mapping import (
    fields_hash,
    parse_mdr_footer,
    render_comment_for_mdr,
    render_draft,
    render_fields,
)

INCIDENT = Incident(
    incident_id="-MAfspsBq_r24TsN5-jl",
    incident_number=1336654,
    summary="Подозрительный PowerShell на WS-FIN-017",
    description="Обнаружен *encoded* PowerShell. 🚨",
    priority="HIGH",
    status="Open",
    creation_time=1768219992478,
    update_time=1768379938029,
    affected_hosts=["WS-FIN-017:0xe5afd1145ed019ed14e695a4ab8811dd", "DC-01:0xEFBB3CE475B9AF2DDD4F73C48531234F"],
    tenant_name="Acme Bank",
    mitre_tactics=["Execution", "Defense evasion"],
)
CONSOLE = "https://mdr.kaspersky.com"


def test_default_mapping_renders_fields() -> None:
    """The default mapping fills summary, description, priority and labels."""
    fields = render_fields(load_mapping("builtin:jira"), INCIDENT, CONSOLE)

    assert fields.summary == "[MDR-1336654] Подозрительный PowerShell на WS-FIN-017"
    assert fields.priority == "High"
    assert "Обнаружен *encoded* PowerShell. 🚨" in fields.description
    assert "- `WS-FIN-017` (asset 0xe5afd1145ed019ed14e695a4ab8811dd)" in fields.description
    assert "https://mdr.kaspersky.com/incidents/-MAfspsBq_r24TsN5-jl" in fields.description
    assert "Execution, Defense evasion" in fields.description
    assert fields.labels == ("kaspersky-mdr", "mdr-connector", "mdr--MAfspsBq_r24TsN5-jl")


def test_summary_is_cut_to_jira_limit() -> None:
    """A long title is cut to the 255 characters Jira accepts."""
    long_incident = INCIDENT.model_copy(update={"summary": "x" * 400})

    assert len(render_fields(load_mapping("builtin:jira"), long_incident, CONSOLE).summary) == 255


def test_labels_lose_whitespace() -> None:
    """Templated labels get underscores for spaces, since Jira labels cannot hold them."""
    mapping = load_mapping("builtin:jira").model_copy(update={"labels": ["tenant-{tenant_name}"]})

    assert "tenant-Acme_Bank" in render_fields(mapping, INCIDENT, CONSOLE).labels


def test_fields_hash_tracks_changes() -> None:
    """The digest changes when a mapped value changes, and only then."""
    mapping = load_mapping("builtin:jira")
    first = fields_hash(render_fields(mapping, INCIDENT, CONSOLE))
    same = fields_hash(render_fields(mapping, INCIDENT.model_copy(update={"update_time": 1}), CONSOLE))
    changed = fields_hash(render_fields(mapping, INCIDENT.model_copy(update={"priority": "LOW"}), CONSOLE))

    assert first == same
    assert first != changed


def test_draft_carries_metadata() -> None:
    """A draft names the incident and the MDR client for the ticket's property."""
    draft = render_draft(load_mapping("builtin:jira"), INCIDENT, CONSOLE, "client-1")

    assert draft.incident_id == INCIDENT.incident_id
    assert draft.metadata["incident_number"] == 1336654
    assert draft.metadata["client_id"] == "client-1"


def test_mdr_footer_round_trip() -> None:
    """The footer written to MDR is found again, also after MDR renders it as HTML."""
    text = render_comment_for_mdr(
        load_mapping("builtin:jira"),
        author="Анна Смирнова",
        created=datetime(2026, 12, 4, 10, 0, tzinfo=timezone.utc),
        body="Хост изолирован.",
        system="jira",
        ticket_key="SEC-7",
        comment_id="10023",
    )

    assert text.startswith("**Анна Смирнова** (Jira SEC-7, 2026-12-04 10:00 UTC)")
    assert parse_mdr_footer(text).source_id == "10023"
    assert parse_mdr_footer("<p><em>mdr-connector: jira comment 10023</em></p>").source_id == "10023"
    assert parse_mdr_footer("<p>plain analyst text</p>") is None


def test_summary_limit_counts_utf16_units() -> None:
    """Emoji count twice toward Jira's limit, and none is cut in half."""
    emoji_incident = INCIDENT.model_copy(update={"summary": "🚨" * 200})

    summary = render_fields(load_mapping("builtin:jira"), emoji_incident, CONSOLE).summary

    assert len(summary.encode("utf-16-le")) <= 255 * 2
    assert summary.endswith("🚨")
