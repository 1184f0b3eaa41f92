"""A small JQL subset: quoting for the adapter, parsing and matching for the simulator.

Supported: clauses joined by `AND` on `project`, `key` (or `issuekey`),
`labels`, `issuetype` (or `type`), `status`, `component`, `updated` and `created`. They take `=`, `!=`, `in` and `not in`,
and dates also `>=`, `>`, `<=` and `<`. `ORDER BY` sorts on `updated`,
`created`, `key` or `id`. `OR`, `NOT` and parentheses around clauses are rejected,
so a query the simulator cannot read fails loudly instead of matching
the wrong issues.

Date literals follow Jira: `"yyyy/MM/dd HH:mm"`, `"yyyy-MM-dd HH:mm"`,
the same without the time, epoch milliseconds, or a relative period such
as `-5m`. A literal without zone is read in the time zone of the user who
runs the search, at minute precision.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

JQL_MINUTE_FORMAT = "%Y/%m/%d %H:%M"
DATE_FORMATS = ("%Y/%m/%d %H:%M", "%Y-%m-%d %H:%M", "%Y/%m/%d", "%Y-%m-%d")
TEXT_FIELDS = {"project", "key", "issuekey", "labels", "issuetype", "type", "status", "component"}
FIELD_ALIASES = {"issuekey": "key", "type": "issuetype"}
DATE_FIELDS = {"updated", "created"}
ORDER_FIELDS = {"updated", "created", "key", "id"}
RELATIVE_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 604800}

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
      | (?P<operator>>=|<=|!=|=|>|<|~|,|\(|\))
      | (?P<word>[^\s=!<>~,()"']+)
    )""",
    re.VERBOSE,
)


class JqlError(ValueError):
    """A query outside the supported subset, or a malformed one."""


def quote(value: str) -> str:
    """Return `value` as a double-quoted JQL string literal."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


@dataclass(frozen=True)
class Token:
    kind: str
    text: str
    quoted: bool = False


@dataclass(frozen=True)
class Clause:
    field: str
    operator: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class OrderItem:
    field: str
    descending: bool


@dataclass(frozen=True)
class Query:
    clauses: tuple[Clause, ...]
    order: tuple[OrderItem, ...]

    @property
    def bounded(self) -> bool:
        """Whether the query restricts the search at all (Jira Cloud rejects it otherwise)."""
        return bool(self.clauses)


def tokenize(jql: str) -> list[Token]:
    tokens: list[Token] = []
    position = 0
    text = jql.strip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            raise JqlError(f"Error in the JQL query: unexpected character at position {position}")
        position = match.end()
        if match.group("string") is not None:
            raw = match.group("string")[1:-1]
            tokens.append(Token("value", re.sub(r"\\(.)", r"\1", raw), quoted=True))
        elif match.group("operator") is not None:
            tokens.append(Token("operator", match.group("operator")))
        else:
            tokens.append(Token("word", match.group("word")))
    return tokens


def parse(jql: str) -> Query:
    """Parse a JQL string of the supported subset into clauses and an order."""
    parser = _Parser(tokenize(jql))
    return parser.query()


class _Parser:
    def __init__(self, tokens: Sequence[Token]) -> None:
        self.tokens = list(tokens)
        self.position = 0

    def peek(self) -> Token | None:
        if self.position < len(self.tokens):
            return self.tokens[self.position]
        return None

    def take(self) -> Token:
        token = self.peek()
        if token is None:
            raise JqlError("Error in the JQL query: the query ends too early")
        self.position += 1
        return token

    def peek_keyword(self, *words: str) -> bool:
        token = self.peek()
        return token is not None and token.kind == "word" and token.text.lower() in words

    def query(self) -> Query:
        clauses: list[Clause] = []
        if self.peek() is not None and not self.peek_keyword("order"):
            clauses.append(self.clause())
            while self.peek_keyword("and"):
                self.take()
                clauses.append(self.clause())

        order: list[OrderItem] = []
        if self.peek_keyword("order"):
            self.take()
            if not self.peek_keyword("by"):
                raise JqlError("Error in the JQL query: expected BY after ORDER")
            self.take()
            order.append(self.order_item())
            while self.peek() == Token("operator", ","):
                self.take()
                order.append(self.order_item())

        leftover = self.peek()
        if leftover is not None:
            raise JqlError(
                f"Error in the JQL query: {leftover.text!r} is not supported by the simulator "
                "(only AND-joined clauses and ORDER BY)"
            )
        return Query(tuple(clauses), tuple(order))

    def clause(self) -> Clause:
        field_token = self.take()
        field = field_token.text.lower()
        if field_token.kind != "word" or field not in TEXT_FIELDS | DATE_FIELDS:
            raise JqlError(f"Error in the JQL query: field {field_token.text!r} is not supported")

        operator = self.operator()
        if operator in (">=", ">", "<=", "<") and field not in DATE_FIELDS:
            raise JqlError(f"Error in the JQL query: operator {operator} does not apply to {field}")
        if operator in ("in", "not in"):
            return Clause(field, operator, self.value_list())
        return Clause(field, operator, (self.value(),))

    def operator(self) -> str:
        token = self.take()
        if token.kind == "operator" and token.text in ("=", "!=", ">=", ">", "<=", "<"):
            return token.text
        if token.kind == "word" and token.text.lower() == "in":
            return "in"
        if token.kind == "word" and token.text.lower() == "not" and self.peek_keyword("in"):
            self.take()
            return "not in"
        raise JqlError(f"Error in the JQL query: operator {token.text!r} is not supported")

    def value(self) -> str:
        token = self.take()
        if token.kind not in ("value", "word"):
            raise JqlError(f"Error in the JQL query: expected a value, found {token.text!r}")
        return token.text

    def value_list(self) -> tuple[str, ...]:
        if self.take() != Token("operator", "("):
            raise JqlError("Error in the JQL query: expected ( after IN")
        values = [self.value()]
        while self.peek() == Token("operator", ","):
            self.take()
            values.append(self.value())
        if self.take() != Token("operator", ")"):
            raise JqlError("Error in the JQL query: expected ) to close the IN list")
        return tuple(values)

    def order_item(self) -> OrderItem:
        token = self.take()
        field = token.text.lower()
        if token.kind != "word" or field not in ORDER_FIELDS:
            raise JqlError(f"Error in the JQL query: cannot order by {token.text!r}")
        descending = False
        if self.peek_keyword("asc", "desc"):
            descending = self.take().text.lower() == "desc"
        return OrderItem(field, descending)


def parse_date(literal: str, time_zone: str, now: datetime) -> datetime:
    """Read a JQL date literal in `time_zone` and return it as an aware UTC datetime."""
    text = literal.strip()
    if re.fullmatch(r"\d{10,}", text):
        return datetime.fromtimestamp(int(text) / 1000, tz=timezone.utc)

    relative = re.fullmatch(r"([-+]?)(\d+)([mhdw])", text)
    if relative:
        sign = -1 if relative.group(1) == "-" else 1
        seconds = int(relative.group(2)) * RELATIVE_UNITS[relative.group(3)]
        return now + sign * timedelta(seconds=seconds)

    for date_format in DATE_FORMATS:
        try:
            naive = datetime.strptime(text, date_format)
        except ValueError:
            continue
        return naive.replace(tzinfo=ZoneInfo(time_zone)).astimezone(timezone.utc)
    raise JqlError(
        f"Date value {literal!r} is invalid: use 'yyyy/MM/dd HH:mm', 'yyyy-MM-dd HH:mm', "
        "'yyyy/MM/dd', 'yyyy-MM-dd', epoch milliseconds or a period such as '-5m'"
    )


def matcher(query: Query, time_zone: str, now: datetime) -> Callable[[dict[str, Any]], bool]:
    """Build a predicate over issue records with keys project, key, labels, issuetype, status, component, updated, created."""
    checks = [_clause_check(clause, time_zone, now) for clause in query.clauses]
    return lambda record: all(check(record) for check in checks)


def _clause_check(clause: Clause, time_zone: str, now: datetime) -> Callable[[dict[str, Any]], bool]:
    if clause.field in DATE_FIELDS:
        bound = parse_date(clause.values[0], time_zone, now)
        compare = _DATE_OPERATORS.get(clause.operator)
        if compare is None:
            raise JqlError(f"Error in the JQL query: operator {clause.operator} does not apply to dates")
        return lambda record: compare(record[clause.field], bound)

    field = FIELD_ALIASES.get(clause.field, clause.field)
    wanted = {value.casefold() for value in clause.values}
    negate = clause.operator in ("!=", "not in")

    def check(record: dict[str, Any]) -> bool:
        present = record[field]
        values = present if isinstance(present, list) else [present]
        found = any(str(value).casefold() in wanted for value in values)
        return found != negate

    return check


_DATE_OPERATORS: dict[str, Callable[[datetime, datetime], bool]] = {
    "=": lambda value, bound: value == bound,
    "!=": lambda value, bound: value != bound,
    ">=": lambda value, bound: value >= bound,
    ">": lambda value, bound: value > bound,
    "<=": lambda value, bound: value <= bound,
    "<": lambda value, bound: value < bound,
}


def sort_records(records: list[dict[str, Any]], order: Sequence[OrderItem]) -> list[dict[str, Any]]:
    """Sort issue records by the ORDER BY items, by id when there are none."""
    result = sorted(records, key=lambda record: record["id"])
    for item in reversed(order):
        result.sort(key=lambda record, name=item.field: _order_value(record, name), reverse=item.descending)
    return result


def _order_value(record: dict[str, Any], field: str) -> Any:
    if field != "key":
        return record[field]
    # Keys sort by project, then by number: SEC-9 before SEC-10.
    project, _, number = str(record["key"]).rpartition("-")
    return (project, int(number) if number.isdigit() else 0)
