"""ServiceNow encoded queries (`sysparm_query`) for the simulator: parse, match and order rows.

A condition is `<field><operator><value>`, with the operators `=`, `!=`,
`>`, `>=`, `<`, `<=`, `IN`, `NOT IN`, `LIKE`, `NOT LIKE`, `STARTSWITH`,
`ENDSWITH`, `ISEMPTY` and `ISNOTEMPTY`. Conditions join with `^` (AND) and
`^OR` (OR with the condition before it), and `^NQ` joins whole queries
with OR. `ORDERBY<field>` and `ORDERBYDESC<field>` sort, and `^EQ` ends a
query. A field name may walk references, such as `group.name`. Names and
values are case-sensitive.

As on an instance where `glide.invalid_query.returns_no_rows` is false (the
default), a condition or an ordering on a field that the table does not
have is dropped and the rest of the query runs, so a typo widens the result.
A group of `^NQ` whose every condition was dropped matches every row.

NOTE: a `^` inside a value, which ServiceNow writes as `^^`, is not supported.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

# The longer operators come first, so `>=` is not read as `>` followed by a value starting with `=`.
OPERATORS = (
    "ISNOTEMPTY",
    "ISEMPTY",
    "STARTSWITH",
    "ENDSWITH",
    "NOT LIKE",
    "NOT IN",
    "LIKE",
    "IN",
    "!=",
    ">=",
    "<=",
    "=",
    ">",
    "<",
)
TERM = re.compile(r"(?P<field>[a-z0-9_.]+?)(?P<operator>" + "|".join(re.escape(op) for op in OPERATORS) + r")(?P<value>.*)", re.DOTALL)
# Operators that never match a row whose value is empty, as SQL comparisons with NULL never do.
SKIP_EMPTY = frozenset({"!=", ">", ">=", "<", "<=", "NOT IN", "NOT LIKE"})

Row = dict[str, Any]
ValueOf = Callable[[Row, str], str]


@dataclass(frozen=True)
class Condition:
    field: str
    operator: str
    value: str


@dataclass
class Query:
    """A parsed encoded query: `groups` are ORed, their slots ANDed, and each slot's conditions ORed."""

    groups: list[list[list[Condition]]] = field(default_factory=list)
    order: list[tuple[str, bool]] = field(default_factory=list)
    # The terms that were dropped, for logs and tests.
    ignored: list[str] = field(default_factory=list)


def parse(
    text: str,
    is_field: Callable[[str], bool],
    convert: Callable[[str, str], str] = lambda name, value: value,
) -> Query:
    """Parse an encoded query, dropping terms whose field `is_field` rejects.

    `convert(field, value)` rewrites a condition's value before matching,
    such as a date given in the user's time zone.
    """
    query = Query()
    for group_text in text.split("^NQ"):
        slots: list[list[Condition]] = []
        current: list[Condition] | None = None
        for term in group_text.split("^"):
            if term in ("", "EQ"):
                continue

            if term.startswith(("ORDERBYDESC", "ORDERBY")):
                descending = term.startswith("ORDERBYDESC")
                name = term.removeprefix("ORDERBYDESC" if descending else "ORDERBY")
                if is_field(name):
                    query.order.append((name, descending))
                else:
                    query.ignored.append(term)
                continue

            is_or = term.startswith("OR")
            condition = _condition(term.removeprefix("OR") if is_or else term, is_field, convert)
            if condition is None:
                query.ignored.append(term)
                if not is_or:
                    # An OR after a dropped condition belongs to that dropped slot, not to the one before it.
                    current = []
                    slots.append(current)
                continue
            if is_or and current is not None:
                current.append(condition)
            else:
                current = [condition]
                slots.append(current)
        query.groups.append([slot for slot in slots if slot])
    return query


def _condition(term: str, is_field: Callable[[str], bool], convert: Callable[[str, str], str]) -> Condition | None:
    match = TERM.fullmatch(term)
    if match is None or not is_field(match["field"]):
        return None
    operator, value = match["operator"], match["value"]
    if operator in ("ISEMPTY", "ISNOTEMPTY") and value:
        return None
    return Condition(match["field"], operator, convert(match["field"], value))


def matches(query: Query, row: Row, value_of: ValueOf, numeric: Callable[[str], bool]) -> bool:
    """Return whether `row` satisfies `query`; a query with no groups matches every row."""
    if not query.groups:
        return True
    return any(
        all(any(_holds(condition, value_of(row, condition.field), numeric(condition.field)) for condition in slot) for slot in group)
        for group in query.groups
    )


def _holds(condition: Condition, actual: str, numeric: bool) -> bool:
    operator, expected = condition.operator, condition.value
    if operator == "ISEMPTY":
        return actual == ""
    if operator == "ISNOTEMPTY":
        return actual != ""
    if actual == "" and operator in SKIP_EMPTY:
        return False

    if operator in ("IN", "NOT IN"):
        found = any(_compare(actual, item, numeric) == 0 for item in expected.split(","))
        return found if operator == "IN" else not found
    if operator == "LIKE":
        return expected in actual
    if operator == "NOT LIKE":
        return expected not in actual
    if operator == "STARTSWITH":
        return actual.startswith(expected)
    if operator == "ENDSWITH":
        return actual.endswith(expected)

    order = _compare(actual, expected, numeric)
    return {
        "=": order == 0,
        "!=": order != 0,
        ">": order > 0,
        ">=": order >= 0,
        "<": order < 0,
        "<=": order <= 0,
    }[operator]


def _compare(actual: str, expected: str, numeric: bool) -> int:
    """Compare as integers on a numeric field when both values are integers, else as strings."""
    left: Any = actual
    right: Any = expected
    if numeric and _is_int(actual) and _is_int(expected):
        left, right = int(actual), int(expected)
    return (left > right) - (left < right)


def _is_int(text: str) -> bool:
    return bool(re.fullmatch(r"-?\d+", text))


def ordered(rows: Iterable[Row], order: list[tuple[str, bool]], value_of: ValueOf, numeric: Callable[[str], bool]) -> list[Row]:
    """Sort rows by the query's ORDERBY fields, keeping the given order among equal rows; empty values come first."""
    result = list(rows)
    for name, descending in reversed(order):
        result.sort(key=lambda row: _sort_key(value_of(row, name), numeric(name)), reverse=descending)
    return result


def _sort_key(value: str, numeric: bool) -> tuple[bool, int, str]:
    number = int(value) if numeric and _is_int(value) else 0
    return (value != "", number, value)
