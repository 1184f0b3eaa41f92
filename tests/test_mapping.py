"""Rendering tickets and mirrored comments from MDR incidents through a mapping."""

from __future__ import annotations

from datetime import datetime, timezone

from mdr_connector.adapters.mdr.models import Incident
from mdr_connector.connector.mappingfile import load_mapping
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
    assert "- `WS-FIN-017` (asset `0xe5afd1145ed019ed14e695a4ab8811dd`)" in fields.description
    assert "https://mdr.kaspersky.com/incidents/-MAfspsBq_r24TsN5-jl" in fields.description
    assert "Execution, Defense evasion" in fields.description
    assert fields.labels == ("kaspersky-mdr", "mdr-connector", "mdr--MAfspsBq_r24TsN5-jl")


def test_labels_are_templates() -> None:
    """Label templates are filled from the incident, and an empty one is dropped."""
    mapping = load_mapping("builtin:jira").model_copy(update={"labels": ["tenant-{tenant_name}", "{resolution}"]})

    labels = render_fields(mapping, INCIDENT, CONSOLE).labels

    assert "tenant-Acme Bank" in labels
    assert "" not in labels


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

