"""Rendering tickets and mirrored comments from MDR incidents through a mapping."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml
from fixtures_mdr import MDR_CLIENT_ID
from fixtures_sync import SyncHarness
from pydantic import ValidationError

from mdr_connector.adapters.mdr.models import Incident
from mdr_connector.connector.errors import ConfigError
from mdr_connector.connector.mappingfile import Mapping, load_mapping
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
ROOT = Path(__file__).resolve().parent.parent
EDIT_ISSUE = "PUT /rest/api/2/issue/{issue}"


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



def test_assets_placeholder_without_details() -> None:
    """Without a rendered table, `{assets}` shows the same host list as `{affected_hosts}`."""
    mapping = load_mapping("builtin:jira").model_copy(update={"description": "{affected_hosts}\n---\n{assets}"})

    plain = render_fields(mapping, INCIDENT, CONSOLE).description
    with_table = render_fields(mapping, INCIDENT, CONSOLE, assets="| table |").description

    hosts, assets_value = plain.split("\n---\n")
    assert assets_value == hosts
    assert with_table.endswith("\n---\n| table |")


def test_default_mapping_uses_assets() -> None:
    """The default description shows the `{assets}` table under the affected hosts heading."""
    mapping = load_mapping("builtin:jira")

    assert "**Affected hosts:**\n\n{assets}" in mapping.description
    assert mapping.assets.enabled


def test_commented_examples_load() -> None:
    """Every commented example in mappings/jira.yaml loads once uncommented."""
    text = (ROOT / "mappings" / "jira.yaml").read_text(encoding="utf-8")
    uncommented = "\n".join(re.sub(r"^# (?=( *)([a-z_]+:( |$)|- ))", "", line) for line in text.splitlines())

    mapping = Mapping.model_validate(yaml.safe_load(uncommented))

    assert [route.project for route in mapping.routes] == ["ACMESOC", "ACME", "SEC"]
    assert mapping.field_owner == {"priority": "ticket", "description": "mdr"}
    assert mapping.components == ["SOC"]
    assert mapping.unrouted == "default"


def test_fields_hash_leaves_out_ticket_owned() -> None:
    """A change of a ticket-owned field alone keeps the digest, but a change of an MDR-owned field does not."""
    mapping = load_mapping("builtin:jira").model_copy(update={"fields": {"customfield_10010": "SOC"}})
    base = render_fields(mapping, INCIDENT, CONSOLE)
    owned = frozenset({"priority", "customfield_10010"})

    new_priority = replace(base, priority="Low")
    new_extra = replace(base, extra={"customfield_10010": "NOC"})
    new_summary = replace(base, summary="another title")

    assert fields_hash(new_priority, owned) == fields_hash(base, owned)
    assert fields_hash(new_extra, owned) == fields_hash(base, owned)
    assert fields_hash(new_summary, owned) != fields_hash(base, owned)
    assert fields_hash(new_priority) != fields_hash(base)


def test_fields_hash_without_skip_is_unchanged() -> None:
    """With no ticket-owned field, the digest is the one earlier versions stored, so upgrades rewrite nothing."""
    fields = render_fields(load_mapping("builtin:jira"), INCIDENT, CONSOLE)
    encoded = json.dumps(asdict(fields), sort_keys=True, ensure_ascii=False, default=str)

    assert fields_hash(fields) == hashlib.sha256(encoded.encode("utf-8")).hexdigest()


def test_field_owner_names_known_fields() -> None:
    """field_owner accepts core fields and keys of `fields`, and rejects others with the allowed names."""
    raw = yaml.safe_load((ROOT / "mappings" / "jira.yaml").read_text(encoding="utf-8"))
    raw["fields"] = {"customfield_10010": "SOC"}
    raw["field_owner"] = {"priority": "ticket", "customfield_10010": "ticket", "components": "mdr"}

    mapping = Mapping.model_validate(raw)

    assert mapping.owned_by_ticket() == frozenset({"priority", "customfield_10010"})
    raw["field_owner"] = {"assignee": "ticket"}
    with pytest.raises(ValidationError, match="field_owner names assignee"):
        Mapping.model_validate(raw)


async def test_ticket_owned_priority_survives(harness: SyncHarness) -> None:
    """A priority the ticket owns keeps an analyst's edit when MDR changes it, while the summary still updates."""
    # The default description shows the priority too, so it would change with it.
    harness.use_mapping(field_owner={"priority": "ticket"}, description="{description}\n\n{assets}")
    incident_id = harness.seed(priority="HIGH", summary="First title")["incident_id"]
    sync = await harness.cycles(1)
    issue = harness.issue_for(incident_id)
    assert issue.fields["priority"] == "High"

    harness.jira.sim.edit_as_human(issue.key, priority="Lowest")
    harness.mdr_sim.update_incident(MDR_CLIENT_ID, incident_id, priority="LOW")
    edits = harness.jira.sim.calls[EDIT_ISSUE]
    await harness.cycles(2, sync)

    assert harness.jira.sim.calls[EDIT_ISSUE] == edits
    assert issue.fields["priority"] == "Lowest"

    harness.mdr_sim.update_incident(MDR_CLIENT_ID, incident_id, priority="NORMAL", summary="Second title")
    await harness.cycles(2, sync)

    assert issue.fields["summary"].endswith("Second title")
    assert issue.fields["priority"] == "Lowest"
    assert harness.jira.sim.calls[EDIT_ISSUE] == edits + 1


async def test_mdr_owned_priority_is_written(harness: SyncHarness) -> None:
    """Without field_owner, an MDR priority change overwrites an analyst's edit, as before."""
    incident_id = harness.seed(priority="HIGH")["incident_id"]
    sync = await harness.cycles(1)
    issue = harness.issue_for(incident_id)

    harness.jira.sim.edit_as_human(issue.key, priority="Lowest")
    harness.mdr_sim.update_incident(MDR_CLIENT_ID, incident_id, priority="LOW")
    await harness.cycles(2, sync)

    assert issue.fields["priority"] == "Low"


APPROVER_FIX = "name each approver by accountId on Jira Cloud or by user name on Jira Data Center, never by display name"


def mapping_with_approvers(tmp_path: Path, approvers: list[str]) -> Path:
    """Write the built-in Jira mapping with `responses.approvers` set, and return its path."""
    raw = yaml.safe_load((ROOT / "mappings" / "jira.yaml").read_text(encoding="utf-8"))
    raw["responses"] = {"approvers": approvers}
    path = tmp_path / "mapping.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("approver", "shown"),
    [("Анна Смирнова", '"Анна Смирнова"'), ("SOC Lead <lead@example.com>", '"SOC Lead <lead@example.com>"'),
     ("jsmith\t", '"jsmith\\t"'), (" 557058:0f4a3b2c", '" 557058:0f4a3b2c"')],
    ids=["display-name", "name-and-address", "trailing-tab", "leading-space"],
)
def test_approver_with_whitespace_rejected(tmp_path: Path, approver: str, shown: str) -> None:
    """An approver with whitespace cannot be an account id, so the mapping is rejected with the fix."""
    path = mapping_with_approvers(tmp_path, ["557058:0f4a3b2c-5d6e-4f70-8a9b-0c1d2e3f4a5b", approver])

    with pytest.raises(ConfigError) as caught:
        load_mapping(str(path))

    expected = f"{path}: responses.approvers[1]: {shown} contains whitespace, so it is not an account id; {APPROVER_FIX}"
    assert str(caught.value) == expected


def test_empty_approver_rejected(tmp_path: Path) -> None:
    """An empty approver matches no account, so it is rejected too."""
    path = mapping_with_approvers(tmp_path, [""])

    with pytest.raises(ConfigError) as caught:
        load_mapping(str(path))

    assert str(caught.value) == f"{path}: responses.approvers[0]: an approver is empty; {APPROVER_FIX}"


def test_approver_ids_and_user_names_load(tmp_path: Path) -> None:
    """A Cloud accountId, a Data Center user name and a Data Center user name that is an e-mail address load."""
    approvers = ["557058:0f4a3b2c-5d6e-4f70-8a9b-0c1d2e3f4a5b", "jsmith", "j.smith@example.com"]

    mapping = load_mapping(str(mapping_with_approvers(tmp_path, approvers)))

    assert mapping.responses.approvers == approvers
