"""Tables, fields and choice lists of the simulated ServiceNow instance.

The values follow a base instance. Incident states are 1 New, 2 In
Progress, 3 On Hold, 6 Resolved, 7 Closed and 8 Canceled. Impact and
urgency run from 1 to 3, and the priority comes from them by the base
lookup. The close codes are those of recent releases, where each value
equals its label. Real instances often change the close codes, which is
why clients read them from sys_choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

FieldKind = Literal["string", "integer", "choice", "datetime", "reference", "journal", "boolean"]
Row = dict[str, Any]

NEW, IN_PROGRESS, ON_HOLD, RESOLVED, CLOSED, CANCELED = "1", "2", "3", "6", "7", "8"

STATE_CHOICES = (
    (NEW, "New"),
    (IN_PROGRESS, "In Progress"),
    (ON_HOLD, "On Hold"),
    (RESOLVED, "Resolved"),
    (CLOSED, "Closed"),
    (CANCELED, "Canceled"),
)
IMPACT_CHOICES = (("1", "1 - High"), ("2", "2 - Medium"), ("3", "3 - Low"))
URGENCY_CHOICES = IMPACT_CHOICES
PRIORITY_CHOICES = (("1", "1 - Critical"), ("2", "2 - High"), ("3", "3 - Moderate"), ("4", "4 - Low"), ("5", "5 - Planning"))
HOLD_REASON_CHOICES = (("1", "Awaiting Caller"), ("5", "Awaiting Change"), ("3", "Awaiting Problem"), ("4", "Awaiting Vendor"))
CLOSE_CODE_CHOICES = tuple(
    (name, name)
    for name in (
        "Duplicate",
        "Known error",
        "No resolution provided",
        "Resolved by caller",
        "Resolved by change",
        "Resolved by problem",
        "Resolved by request",
        "Solution provided",
        "Workaround provided",
        "User error",
    )
)
CATEGORY_CHOICES = (
    ("inquiry", "Inquiry / Help"),
    ("software", "Software"),
    ("hardware", "Hardware"),
    ("network", "Network"),
    ("database", "Database"),
)
# The base priority lookup: (impact, urgency) -> priority.
PRIORITY_LOOKUP = {
    ("1", "1"): "1",
    ("1", "2"): "2",
    ("1", "3"): "3",
    ("2", "1"): "2",
    ("2", "2"): "3",
    ("2", "3"): "4",
    ("3", "1"): "3",
    ("3", "2"): "4",
    ("3", "3"): "5",
}
# Choice fields that a record must always have a value for.
REQUIRED_CHOICES = frozenset({"state", "impact", "urgency"})
# Labels that data policy errors name the mandatory fields by.
FIELD_LABELS = {
    "close_code": "Resolution code",
    "close_notes": "Resolution notes",
    "hold_reason": "On hold reason",
    "comments": "Additional comments",
    "work_notes": "Work notes",
}
JOURNAL_TABLE = "sys_journal_field"
ATTACHMENT_TABLE = "sys_attachment"


@dataclass(frozen=True)
class FieldSpec:
    """One column: its type, maximum length (0 for none), referenced table and choices."""

    kind: FieldKind = "string"
    max_length: int = 0
    reference: str = ""
    choices: tuple[tuple[str, str], ...] = ()
    # Whether the Table API writes it; system fields such as sys_updated_on are ignored in a request body.
    writable: bool = True

    @property
    def numeric(self) -> bool:
        """Whether the column stores integers, so queries compare and sort it as numbers."""
        return self.kind == "integer" or (self.kind == "choice" and all(value.isdigit() for value, _ in self.choices))

    def label(self, value: str) -> str:
        return next((label for choice, label in self.choices if choice == value), value)


@dataclass
class SimTable:
    """A table: its columns, the column shown as a reference's display value, and its rows by sys_id."""

    name: str
    fields: dict[str, FieldSpec]
    display_field: str
    # Whether the Table API may insert, update and delete rows; the others are read only.
    writable: bool = False
    rows: dict[str, Row] = field(default_factory=dict)


def _system(kind: FieldKind = "string", max_length: int = 0) -> FieldSpec:
    return FieldSpec(kind, max_length=max_length, writable=False)


SYSTEM_FIELDS = {
    "sys_id": _system(max_length=32),
    "sys_created_on": _system("datetime"),
    "sys_created_by": _system(max_length=40),
    "sys_updated_on": _system("datetime"),
    "sys_updated_by": _system(max_length=40),
    "sys_mod_count": _system("integer"),
}


def incident_table(name: str) -> SimTable:
    """Build the ticket table, named `name` because an instance may keep its incidents in a table of its own."""
    fields = {
        **SYSTEM_FIELDS,
        "number": _system(max_length=40),
        "short_description": FieldSpec(max_length=160),
        "description": FieldSpec(max_length=4000),
        "state": FieldSpec("choice", choices=STATE_CHOICES),
        "impact": FieldSpec("choice", choices=IMPACT_CHOICES),
        "urgency": FieldSpec("choice", choices=URGENCY_CHOICES),
        # Computed from impact and urgency, so a written priority is ignored.
        "priority": FieldSpec("choice", choices=PRIORITY_CHOICES, writable=False),
        "correlation_id": FieldSpec(max_length=100),
        "correlation_display": FieldSpec(max_length=100),
        "close_code": FieldSpec("choice", max_length=40, choices=CLOSE_CODE_CHOICES),
        "close_notes": FieldSpec(max_length=4000),
        "hold_reason": FieldSpec("choice", choices=HOLD_REASON_CHOICES),
        "assignment_group": FieldSpec("reference", reference="sys_user_group"),
        "category": FieldSpec("choice", max_length=40, choices=CATEGORY_CHOICES),
        "opened_by": FieldSpec("reference", reference="sys_user"),
        "opened_at": _system("datetime"),
        "sys_class_name": _system(max_length=80),
        "work_notes": FieldSpec("journal"),
        "comments": FieldSpec("journal"),
    }
    return SimTable(name, fields, display_field="number", writable=True)


def reference_tables() -> list[SimTable]:
    """Build the read-only tables: users, groups, memberships, choices, journal entries and attachment records."""
    return [
        SimTable(
            "sys_user",
            {
                **SYSTEM_FIELDS,
                "user_name": FieldSpec(max_length=40),
                "name": FieldSpec(max_length=151),
                "first_name": FieldSpec(max_length=50),
                "last_name": FieldSpec(max_length=50),
                "email": FieldSpec(max_length=100),
                "time_zone": FieldSpec(max_length=40),
                "active": FieldSpec("boolean"),
            },
            display_field="name",
        ),
        SimTable(
            "sys_user_group",
            {**SYSTEM_FIELDS, "name": FieldSpec(max_length=80), "description": FieldSpec(max_length=1000), "active": FieldSpec("boolean")},
            display_field="name",
        ),
        SimTable(
            "sys_user_grmember",
            {
                **SYSTEM_FIELDS,
                "user": FieldSpec("reference", reference="sys_user"),
                "group": FieldSpec("reference", reference="sys_user_group"),
            },
            display_field="sys_id",
        ),
        SimTable(
            "sys_choice",
            {
                **SYSTEM_FIELDS,
                "name": FieldSpec(max_length=80),
                "element": FieldSpec(max_length=80),
                "value": FieldSpec(max_length=40),
                "label": FieldSpec(max_length=100),
                "sequence": FieldSpec("integer"),
                "inactive": FieldSpec("boolean"),
                "language": FieldSpec(max_length=40),
            },
            display_field="label",
        ),
        SimTable(
            JOURNAL_TABLE,
            {
                "sys_id": _system(max_length=32),
                "element": FieldSpec(max_length=40),
                "element_id": FieldSpec(max_length=32),
                "name": FieldSpec(max_length=80),
                "value": FieldSpec(),
                "sys_created_on": _system("datetime"),
                "sys_created_by": _system(max_length=40),
            },
            display_field="value",
        ),
        SimTable(
            ATTACHMENT_TABLE,
            {
                **SYSTEM_FIELDS,
                "file_name": FieldSpec(max_length=100),
                "content_type": FieldSpec(max_length=100),
                "size_bytes": FieldSpec("integer"),
                "size_compressed": FieldSpec("integer"),
                "compressed": FieldSpec("boolean"),
                "table_name": FieldSpec(max_length=80),
                "table_sys_id": FieldSpec(max_length=32),
                "hash": FieldSpec(max_length=64),
                "average_image_color": FieldSpec(),
                "image_height": FieldSpec("integer"),
                "image_width": FieldSpec("integer"),
                "sys_tags": FieldSpec(),
            },
            display_field="file_name",
        ),
    ]


def choice_rows(table: SimTable) -> list[Row]:
    """Build the sys_choice rows of every choice field of `table`, without their sys_id."""
    rows = []
    for element, spec in table.fields.items():
        for sequence, (value, label) in enumerate(spec.choices):
            rows.append(
                {
                    "name": table.name,
                    "element": element,
                    "value": value,
                    "label": label,
                    "sequence": str(sequence),
                    "inactive": "false",
                    "language": "en",
                }
            )
    return rows
