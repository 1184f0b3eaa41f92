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
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, ValidationError, field_validator, model_validator

from mdr_connector.connector.errors import ConfigError
from mdr_connector.connector.yamlfiles import (
    MAX_DOCUMENT_NODES,
    StrictModel,
    format_validation_error,
    parse_yaml,
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
    "assets": "Markdown table of the affected assets from MDR: host name, IPs, OS, product, status, isolation, last seen",
}

COMMENT_TEMPLATE_FIELDS = {
    "author": "name of the comment's author",
    "created": "comment creation time, UTC",
    "ticket_key": "ticket key, for example SEC-12",
    "system": "ticket system name, for example Jira",
}


class Visibility(StrictModel):
    """The readers of a comment: a Jira role or group by name, or `internal` for a ServiceNow work note or a Redmine private note."""

    type: Literal["role", "group", "internal"]
    value: str = ""

    @model_validator(mode="after")
    def _value_when_named(self) -> Visibility:
        if self.type == "internal" and self.value:
            raise ValueError(f"visibility type internal takes no value; remove value {self.value!r}")
        if self.type != "internal" and not self.value:
            raise ValueError(f"visibility type {self.type} needs the {self.type} name as value, for example value: Developers")
        return self


class CommentFormat(StrictModel):
    """The comment mirroring rules: header lines naming the original author, and which comments go."""

    mdr_to_ticket_header: str = "**{author}** (Kaspersky MDR, {created})"
    ticket_to_mdr_header: str = "**{author}** ({system} {ticket_key}, {created})"
    # Which ticket comments go to MDR: all, only public ones (not restricted
    # to a role or group, not internal in Jira Service Management), or only
    # those whose text starts with `marker`.
    to_mdr: Literal["all", "public", "marked"] = "public"
    marker: str = Field(default="#mdr", min_length=1, max_length=64)
    # Deprecated spelling of `to_mdr: all`, kept for mappings written for 0.1.
    mirror_restricted: bool = False
    # Role or group that may read the comments the connector posts on the ticket.
    # When unset, everyone may read them.
    visibility: Visibility | None = None
    # Action on the other side when a copied comment is edited or deleted.
    # MDR has no comment edit, so a ticket comment edit can only be sent as a
    # note. A ticket comment delete can remove the MDR copy (`mirror`) because
    # the connector wrote it. On the ticket, `mirror` replaces the text of the
    # copy of a comment deleted in MDR, because the connector may edit its own
    # comments there.
    on_ticket_edit: Literal["note", "ignore"] = "note"
    on_ticket_delete: Literal["mirror", "note", "ignore"] = "note"
    on_mdr_delete: Literal["mirror", "note", "ignore"] = "mirror"

    @field_validator("mdr_to_ticket_header", "ticket_to_mdr_header")
    @classmethod
    def _known_placeholders(cls, value: str) -> str:
        check_template(value, COMMENT_TEMPLATE_FIELDS)
        return value

    def mirrors_to_mdr(self) -> str:
        """Return the effective `to_mdr` rule, applying the deprecated `mirror_restricted`."""
        if self.mirror_restricted and self.to_mdr == "public":
            return "all"
        return self.to_mdr


class FileFilter(StrictModel):
    """Attachment filter for one direction: a size cap and extension lists (without the dot, any case)."""

    max_bytes: int = Field(default=10 * 1024 * 1024, ge=0)
    allow_extensions: list[str] = Field(default_factory=list)
    deny_extensions: list[str] = Field(
        default_factory=lambda: ["exe", "dll", "scr", "com", "bat", "cmd", "ps1", "vbs", "js", "jar", "msi"]
    )

    @field_validator("allow_extensions", "deny_extensions")
    @classmethod
    def _plain_extensions(cls, value: list[str]) -> list[str]:
        cleaned = []
        for extension in value:
            bare = extension.strip().lstrip(".").lower()
            if not bare or not re.fullmatch(r"[a-z0-9_+-]{1,16}", bare):
                raise ValueError(f"{extension!r} is not a file extension; write the last part without the dot, such as pdf, or gz for .tar.gz")
            cleaned.append(bare)
        return cleaned


class AttachmentRules(StrictModel):
    """Attachment sync settings, with one filter per direction."""

    enabled: bool = True
    to_ticket: FileFilter = Field(default_factory=FileFilter)
    to_mdr: FileFilter = Field(default_factory=FileFilter)


def check_account_id(approver: str) -> str:
    """Reject an approver that cannot be an account id, such as a display name.

    A display name matches no command author, so every command would be
    refused without a hint. Neither a Jira Cloud accountId nor a Jira Data
    Center user name contains whitespace. A Data Center user name may be an
    e-mail address, so `@` is allowed.
    """
    fix = "name each approver by accountId on Jira Cloud or by user name on Jira Data Center, never by display name"
    if not approver:
        raise ValueError(f"an approver is empty; {fix}")
    if any(character.isspace() for character in approver):
        quoted = json.dumps(approver, ensure_ascii=False)
        raise ValueError(f"{quoted} contains whitespace, so it is not an account id; {fix}")
    return approver


class ResponseRules(StrictModel):
    """Accounts and groups that may confirm or decline MDR responses from the ticket.

    Accounts are named by stable account id: accountId on Jira Cloud, user name
    on Jira Data Center. Both lists are empty by default, so nobody may decide
    from the ticket.
    """

    enabled: bool = True
    command: str = Field(default="/mdr", pattern=r"^/[a-z][a-z0-9-]{0,31}$")
    approvers: list[Annotated[str, AfterValidator(check_account_id)]] = Field(default_factory=list)
    approver_groups: list[str] = Field(default_factory=list)


class CloseRules(StrictModel):
    """Rules for closing the MDR incident when its ticket reaches a done status, off by default."""

    enabled: bool = False
    done_statuses: list[str] = Field(default_factory=list)
    # The ticket field whose value picks the resolution, by field id (Jira: `resolution`).
    resolution_field: str = "resolution"
    resolutions: dict[str, Literal["TRUE_POSITIVE", "FALSE_POSITIVE"]] = Field(default_factory=dict)
    default_resolution: Literal["TRUE_POSITIVE", "FALSE_POSITIVE"] | None = None
    summary: str = "Closed in {system} {ticket_key}"

    @field_validator("summary")
    @classmethod
    def _known_placeholders(cls, value: str) -> str:
        check_template(value, {"system": "ticket system name", "ticket_key": "ticket key", "status": "ticket status"})
        return value


class StatusRules(StrictModel):
    """Status sync: MDR status to ticket status name, and the opt-in close of MDR incidents."""

    to_ticket: dict[Literal["Open", "On hold", "Resolved", "Closed"], str] = Field(default_factory=dict)
    close_mdr: CloseRules = Field(default_factory=CloseRules)


class AssetRules(StrictModel):
    """Enrichment of tickets with the affected assets from `assets/details`."""

    enabled: bool = True
    cache_seconds: int = Field(default=3600, ge=0)
    # Maximum number of assets read per incident. The rest are listed by name only.
    max_assets: int = Field(default=20, ge=0, le=200)


class Route(StrictModel):
    """A rule that sends the incidents of a tenant to a project. The first matching route wins.

    `tenant` is matched exactly against the incident's `tenant_name`, and
    "" is the root tenant. Without `priorities` the route takes every priority.
    """

    tenant: str
    priorities: list[Literal["HIGH", "NORMAL", "LOW"]] = Field(default_factory=list)
    project: str = Field(min_length=1)
    issue_type: str | None = Field(default=None, min_length=1)
    labels: list[str] = Field(default_factory=list)
    components: list[str] = Field(default_factory=list)

    @field_validator("labels")
    @classmethod
    def _label_templates(cls, value: list[str]) -> list[str]:
        for label in value:
            check_template(label, TEMPLATE_FIELDS)
        return value

    @field_validator("components")
    @classmethod
    def _named_components(cls, value: list[str]) -> list[str]:
        check_component_names(value)
        return value

    def shadows(self, later: Route) -> bool:
        """Return whether this route matches every incident that `later` matches, so `later` is never used."""
        if self.tenant != later.tenant:
            return False
        if not self.priorities:
            return True
        return bool(later.priorities) and set(later.priorities) <= set(self.priorities)


class IncidentCreation(StrictModel):
    """Opt-in creation of MDR incidents (`incidents/create`) from tickets with the label or issue type."""

    enabled: bool = False
    label: str | None = "mdr-create"
    issue_type: str | None = None
    # The ticket field that lists the affected hosts as `HOSTNAME:asset_id`,
    # separated by newlines, commas or semicolons.
    hosts_field: str | None = None
    tenant_id: str = ""


class Mapping(StrictModel):
    """The mapping of an MDR incident to a ticket."""

    project: str = Field(min_length=1)
    issue_type: str = Field(min_length=1)
    summary: str = "[MDR-{incident_number}] {summary}"
    description: str
    priority: dict[Literal["HIGH", "NORMAL", "LOW"], str]
    labels: list[str] = Field(default_factory=list)
    components: list[str] = Field(default_factory=list)
    fields: dict[str, Any] = Field(default_factory=dict)
    # Owner of each field after creation. `mdr` overwrites it on every MDR
    # update, and `ticket` sets it only at creation so an analyst's edit stays.
    # Keys: summary, description, priority, labels, components, or a key of `fields`.
    field_owner: dict[str, Literal["mdr", "ticket"]] = Field(default_factory=dict)
    comments: CommentFormat = Field(default_factory=CommentFormat)
    attachments: AttachmentRules = Field(default_factory=AttachmentRules)
    responses: ResponseRules = Field(default_factory=ResponseRules)
    status: StatusRules = Field(default_factory=StatusRules)
    assets: AssetRules = Field(default_factory=AssetRules)
    routes: list[Route] = Field(default_factory=list)
    # Handling of an incident that no route matches: the top-level project and
    # issue type take it (`default`), or it is parked with an error (`report`).
    unrouted: Literal["default", "report"] = "default"
    create_incidents: IncidentCreation = Field(default_factory=IncidentCreation)

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

    @field_validator("components")
    @classmethod
    def _named_components(cls, value: list[str]) -> list[str]:
        check_component_names(value)
        return value

    @model_validator(mode="after")
    def _routes_for_report(self) -> Mapping:
        if self.unrouted == "report" and not self.routes:
            raise ValueError(
                "unrouted is report but there are no routes, so every incident would be parked; "
                "add routes or set unrouted: default"
            )
        return self

    @field_validator("routes")
    @classmethod
    def _reachable_routes(cls, value: list[Route]) -> list[Route]:
        for later_index, later in enumerate(value):
            for index, earlier in enumerate(value[:later_index]):
                if earlier.shadows(later):
                    raise ValueError(
                        f"route {later_index + 1} (tenant {later.tenant!r}) is never used, because route "
                        f"{index + 1} before it matches the same incidents; move it up or remove it"
                    )
        return value

    @field_validator("field_owner")
    @classmethod
    def _known_owned_fields(cls, value: dict[str, str], info: Any) -> dict[str, str]:
        known = {"summary", "description", "priority", "labels", "components", *info.data.get("fields", {})}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(
                f"field_owner names {', '.join(unknown)}, which this mapping does not set; "
                f"use one of: {', '.join(sorted(known))}"
            )
        return value

    def owned_by_ticket(self) -> frozenset[str]:
        """Return the fields an MDR update must not overwrite."""
        return frozenset(name for name, owner in self.field_owner.items() if owner == "ticket")

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


def check_component_names(names: list[str]) -> None:
    if any(not name.strip() for name in names):
        raise ValueError("a component name is empty; write the name of a Jira component of the project")


def load_mapping(reference: str) -> Mapping:
    """Load a mapping from a path or from `builtin:<name>` (the defaults shipped in the package)."""
    if reference.startswith(BUILTIN_MAPPING_PREFIX):
        name = reference[len(BUILTIN_MAPPING_PREFIX):]
        if not re.fullmatch(r"[a-z0-9_-]+", name):
            raise ConfigError(f"invalid built-in mapping name {name!r}")
        resource = resources.files("mdr_connector.mappings").joinpath(f"{name}.yaml")
        if not resource.is_file():
            raise ConfigError(f"no built-in mapping named {name!r}")
        source, raw = reference, parse_yaml(reference, resource.read_text(encoding="utf-8"))
    else:
        source, raw = reference, read_yaml(Path(reference))

    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level")
    try:
        return Mapping.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(source, err, raw, Mapping)) from err
