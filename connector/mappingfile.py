"""The field-mapping files: which incident values fill which ticket fields, and how mirrored comments start.

A mapping is YAML, validated like the configuration file, and is read from a
path or from the package (`builtin:<name>`).
"""

from __future__ import annotations

import json
import re
import string
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from mdr_connector.connector.errors import ConfigError
from mdr_connector.connector.yamlfiles import (
    MAX_DOCUMENT_NODES,
    StrictModel,
    check_document_size,
    format_validation_error,
    read_yaml,
    within_budget,
)

BUILTIN_MAPPING_PREFIX = "builtin:"
MAX_FIELDS_CHARACTERS = 64 * 1024
# Ticket fields the mapping sets through its own keys, never through `fields`.
CORE_TICKET_FIELDS = frozenset({"project", "issuetype", "issue_type", "summary", "description", "priority", "labels"})

# Placeholders a mapping template may use; each is filled from the incident.
TEMPLATE_FIELDS = {
    "incident_id": "MDR incident id",
    "incident_number": "human-readable incident number",
    "summary": "incident title",
    "description": "incident description (Markdown)",
    "priority": "HIGH, NORMAL or LOW",
    "status": "Open, On hold, Resolved or Closed",
    "resolution": "resolution, empty until the incident is closed",
    "tenant_name": "tenant, empty for the root tenant",
    "affected_hosts": "Markdown list of affected hosts with their asset ids",
    "host_names": "comma-separated affected host names",
    "console_link": "link to the incident in the MDR web console",
    "creation_time": "creation time, UTC",
    "update_time": "last update time, UTC",
    "detection_technology": "detection technology",
    "attack_stage": "attack stage",
    "mitre_tactics": "comma-separated MITRE ATT&CK tactics",
    "mitre_techniques": "comma-separated MITRE ATT&CK techniques",
    "client_description": "text the customer gave when creating the incident",
    "recommendations": "SOC recommendations",
}

COMMENT_TEMPLATE_FIELDS = {
    "author": "name of the comment's author",
    "created": "comment creation time, UTC",
    "ticket_key": "ticket key, for example SEC-12",
    "system": "ticket system name, for example Jira",
}


class CommentFormat(StrictModel):
    """The comment mirroring rules: header lines naming the original author, and which comments go."""

    mdr_to_ticket_header: str = "**{author}** (Kaspersky MDR, {created})"
    ticket_to_mdr_header: str = "**{author}** ({system} {ticket_key}, {created})"
    # A ticket comment restricted to a role or group is internal to the SOC
    # team; it goes to MDR only when this is true.
    mirror_restricted: bool = False

    @field_validator("mdr_to_ticket_header", "ticket_to_mdr_header")
    @classmethod
    def _known_placeholders(cls, value: str) -> str:
        check_template(value, COMMENT_TEMPLATE_FIELDS)
        return value


class Mapping(StrictModel):
    """The mapping of an MDR incident to a ticket."""

    project: str = Field(min_length=1)
    issue_type: str = Field(min_length=1)
    summary: str = "[MDR-{incident_number}] {summary}"
    description: str
    priority: dict[Literal["HIGH", "NORMAL", "LOW"], str]
    labels: list[str] = Field(default_factory=list)
    fields: dict[str, Any] = Field(default_factory=dict)
    comments: CommentFormat = Field(default_factory=CommentFormat)

    @field_validator("summary", "description")
    @classmethod
    def _known_placeholders(cls, value: str) -> str:
        check_template(value, TEMPLATE_FIELDS)
        return value

    @field_validator("labels")
    @classmethod
    def _label_templates(cls, value: list[str]) -> list[str]:
        for label in value:
            check_template(label, TEMPLATE_FIELDS)
        return value

    @field_validator("fields")
    @classmethod
    def _no_core_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        core = sorted(set(value) & CORE_TICKET_FIELDS)
        if core:
            raise ValueError(
                f"{', '.join(core)} cannot be set under 'fields'; use the top-level keys "
                "project, issue_type, summary, description, priority and labels"
            )
        return value

    @field_validator("fields")
    @classmethod
    def _small_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        too_large = ValueError(
            f"the custom fields are too large: at most {MAX_DOCUMENT_NODES} values and "
            f"{MAX_FIELDS_CHARACTERS} characters of JSON, with YAML aliases counted each time they are used; "
            "write the values out instead of repeating anchors"
        )
        if not within_budget(value, MAX_DOCUMENT_NODES, MAX_FIELDS_CHARACTERS):
            raise too_large
        if len(json.dumps(value, ensure_ascii=False, default=str)) > MAX_FIELDS_CHARACTERS:
            raise too_large
        return value

    @field_validator("priority")
    @classmethod
    def _every_priority(cls, value: dict[str, str]) -> dict[str, str]:
        missing = [name for name in ("HIGH", "NORMAL", "LOW") if name not in value]
        if missing:
            raise ValueError(f"map every MDR priority; missing: {', '.join(missing)}")
        return value


def check_template(template: str, allowed: dict[str, str]) -> None:
    """Reject a template that uses an unknown placeholder, attribute/index access or a format spec.

    Every format spec is rejected, because a width can make one render take
    gigabytes, a nested field lets incident data choose the spec, and a
    type code such as `d` fails on every incident.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ValueError(f"invalid template {template!r}: {err}; write a literal brace as {{{{ or }}}}") from err

    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not re.fullmatch(r"[a-z_]+", name):
            raise ValueError(f"placeholder {{{name}}} is not allowed; use a plain name such as {{summary}}")
        if name not in allowed:
            raise ValueError(f"unknown placeholder {{{name}}}; allowed: {', '.join(sorted(allowed))}")
        if conversion not in (None, "s"):
            raise ValueError(f"conversion !{conversion} in {{{name}}} is not allowed")
        if spec:
            raise ValueError(f"placeholder {{{name}}} has a format spec, and format specs are not supported; "
                             f"write {{{name}}}")


def load_mapping(reference: str) -> Mapping:
    """Load a mapping from a path or from `builtin:<name>` (the defaults shipped in the package)."""
    if reference.startswith(BUILTIN_MAPPING_PREFIX):
        name = reference[len(BUILTIN_MAPPING_PREFIX):]
        if not re.fullmatch(r"[a-z0-9_-]+", name):
            raise ConfigError(f"invalid built-in mapping name {name!r}")
        resource = resources.files("mdr_connector.mappings").joinpath(f"{name}.yaml")
        if not resource.is_file():
            raise ConfigError(f"no built-in mapping named {name!r}")
        source, raw = reference, yaml.safe_load(resource.read_text(encoding="utf-8"))
        check_document_size(source, raw)
    else:
        source, raw = reference, read_yaml(Path(reference))

    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level")
    try:
        return Mapping.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(source, err, raw, Mapping)) from err
