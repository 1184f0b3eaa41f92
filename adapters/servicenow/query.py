"""Encoded queries (`sysparm_query`) and the stored time format of the ServiceNow Table API.

Stored date-times are UTC strings such as `2026-01-31 10:00:00`, at second
precision. A query compares a plain date-time literal as UTC, so the
connector's UTC cursor goes into queries unchanged.

Lists are read in keyset pages ordered by a time field and then sys_id:
the next page starts after the last row read, which an offset cannot do
while rows change under it.

    time>T^<conditions>^NQtime=T^sys_id>ID^<conditions>^ORDERBYtime^ORDERBYsys_id

`^NQ` starts a new query whose rows are added, so the other conditions
are repeated in each part.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone

from mdr_connector.connector.errors import InvalidPayloadError

TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
# `^` separates conditions and `,` separates the items of IN, so neither may appear in a value.
_UNSAFE_VALUE = re.compile(r"[\^\r\n]")


def format_time(moment: datetime) -> str:
    """Format an aware time as a stored UTC value, cut down to the whole second."""
    if moment.tzinfo is None:
        raise ValueError("the time must be timezone-aware")
    return moment.astimezone(timezone.utc).strftime(TIME_FORMAT)


def parse_time(text: object) -> datetime:
    """Read a stored `YYYY-MM-DD HH:MM:SS` value as an aware UTC time; raise InvalidPayloadError for anything else."""
    try:
        return datetime.strptime(str(text), TIME_FORMAT).replace(tzinfo=timezone.utc)
    except ValueError as err:
        raise InvalidPayloadError(f"ServiceNow returned an unreadable time {text!r}") from err


def query_value(value: str, what: str) -> str:
    """Return `value` for use in an encoded query, or raise InvalidPayloadError when it contains `^` or a line break."""
    if _UNSAFE_VALUE.search(value):
        raise InvalidPayloadError(
            f"{what} {value!r} contains '^' or a line break, which a ServiceNow encoded query cannot carry"
        )
    return value


def in_list(values: list[str], what: str) -> str:
    """Join values for an `IN` condition; a value with a comma cannot be listed and raises InvalidPayloadError."""
    for value in values:
        if "," in value:
            raise InvalidPayloadError(f"{what} {value!r} contains a comma, which an IN condition cannot carry")
        query_value(value, what)
    return ",".join(values)


def keyset_query(conditions: str, time_field: str | None, since: str | None, after: tuple[str, str] | None) -> str:
    """Build the query of one keyset page, ordered by `time_field` (when given) and sys_id.

    The first page (`after` is None) starts at `since`, inclusive, or at the
    first row. A later page starts after the (time, sys_id) of the last row
    read; without a time field the time in `after` is not used.
    """
    if time_field is None:
        start = [f"sys_id>{after[1]}"] if after is not None else []
        return _joined(*start, conditions, "ORDERBYsys_id")

    order = f"ORDERBY{time_field}^ORDERBYsys_id"
    if after is None:
        first = [f"{time_field}>={since}"] if since is not None else []
        return _joined(*first, conditions, order)

    time_value, sys_id = after
    later = _joined(f"{time_field}>{time_value}", conditions)
    same_second = _joined(f"{time_field}={time_value}", f"sys_id>{sys_id}", conditions)
    return f"{later}^NQ{same_second}^{order}"


def _joined(*parts: str) -> str:
    return "^".join(part for part in parts if part)
