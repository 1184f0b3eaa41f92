"""Read Redmine's JSON records into the connector's ticket records, and build issue queries.

Redmine 5.0 writes times as UTC at whole seconds (`2026-12-04T10:00:00Z`)
and names people as `{"id": 5, "name": "MDR Connector"}`. A record
without a field the connector needs raises InvalidPayloadError.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from mdr_connector.connector.errors import InvalidPayloadError
from mdr_connector.connector.tickets import TicketAccount, TicketAttachment

# Issue attributes that `get_state` reads under the contract's names.
FIELD_ALIASES = {"summary": "subject", "issue_type": "tracker", "issuetype": "tracker"}
# Attributes that name a user; `get_state` returns the user's id, the id approvers are listed by.
USER_ATTRIBUTES = frozenset({"author", "assigned_to"})


def parse_time(text: Any) -> datetime:
    """Read Redmine's `2026-12-04T10:00:00Z` as an aware UTC datetime."""
    if not isinstance(text, str):
        raise InvalidPayloadError(f"Redmine returned {text!r} where a time was expected")
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as err:
        raise InvalidPayloadError(f"Redmine returned an unreadable time {text!r}") from err
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def optional_time(text: Any) -> datetime | None:
    if text is None:
        return None
    try:
        return parse_time(text)
    except InvalidPayloadError:
        return None


def query_time(moment: datetime) -> str:
    """Format a filter bound for `updated_on` and `created_on`: UTC, cut to the whole second.

    Redmine 5.0 matches `>=` as "later than one second before the bound",
    so the bound is never later than `moment`.
    """
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def whole_second(moment: datetime) -> datetime:
    """Cut a time to the second, the precision of Redmine's replies."""
    return moment.astimezone(timezone.utc).replace(microsecond=0)


def account_of(user: Any) -> TicketAccount:
    """Read `{"id": 5, "name": "..."}` as an account whose id is the user id as text."""
    if not isinstance(user, dict) or user.get("id") is None:
        return TicketAccount(id="", display_name="")
    return TicketAccount(id=str(user["id"]), display_name=str(user.get("name") or ""))


def item_id(record: Any, kind: str) -> int:
    """Return the numeric `id` of a record, raising InvalidPayloadError when it has none."""
    value = record.get("id") if isinstance(record, dict) else None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidPayloadError(f"Redmine returned {kind} without a numeric id: {value!r}")
    return value


def attachment_of(record: Any) -> TicketAttachment:
    """Read one entry of an issue's `attachments` or `GET /attachments/{id}.json`."""
    attachment_id = item_id(record, "an attachment")
    size = record.get("filesize")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InvalidPayloadError(f"Redmine attachment {attachment_id} has no readable filesize: {size!r}")
    filename = record.get("filename")
    if not isinstance(filename, str) or not filename:
        raise InvalidPayloadError(f"Redmine attachment {attachment_id} has no filename")
    return TicketAttachment(
        id=str(attachment_id),
        filename=filename,
        size=size,
        author=account_of(record.get("author")),
        created=parse_time(record.get("created_on")),
        content_type=str(record.get("content_type") or "application/octet-stream"),
    )


def custom_value(issue: dict[str, Any], field_id: int) -> Any:
    """Return the value of custom field `field_id` on an issue, or None when the issue does not show it."""
    for item in issue.get("custom_fields") or []:
        if isinstance(item, dict) and item.get("id") == field_id:
            return item.get("value")
    return None


def has_custom_field(issue: dict[str, Any], field_id: int) -> bool:
    """Tell whether the issue lists custom field `field_id`, which Redmine does when the field is enabled for its tracker and project."""
    return any(isinstance(item, dict) and item.get("id") == field_id for item in issue.get("custom_fields") or [])


def custom_field_id_by_name(issues: list[dict[str, Any]], name: str) -> int | None:
    """Return the id of the custom field called `name` that any of the issues shows, or None."""
    for issue in issues:
        for item in issue.get("custom_fields") or []:
            if isinstance(item, dict) and item.get("name") == name and isinstance(item.get("id"), int):
                return item["id"]
    return None


def plain_value(issue: dict[str, Any], field_id: str) -> Any:
    """Return one field of an issue as the status mapping compares it.

    `field_id` is an attribute (`status`, `priority`, `tracker`,
    `assigned_to`, `subject` or its alias `summary`), `cf_<id>`, or the name
    of a custom field. A named record becomes its name, a user the user's id
    as text. A field the issue lacks is None. The description is returned as
    stored; the adapter converts it.
    """
    if field_id.startswith("cf_") and field_id[3:].isdigit():
        return custom_value(issue, int(field_id[3:]))

    attribute = FIELD_ALIASES.get(field_id, field_id)
    if attribute in issue:
        value = issue[attribute]
        if isinstance(value, dict) and attribute in USER_ATTRIBUTES:
            return account_of(value).id
        if isinstance(value, dict):
            return value.get("name", value.get("id"))
        return value

    for item in issue.get("custom_fields") or []:
        if isinstance(item, dict) and item.get("name") == field_id:
            return item.get("value")
    return None


def filter_params(name: str, operator: str, *values: str) -> list[tuple[str, str]]:
    """Build one issue filter in the explicit `f[]`, `op[]`, `v[][]` form.

    The short form (`cf_1=value`) reads a leading operator such as `!` or
    `~` out of the value and splits the value at `|`. This form passes
    values as they are. Once any `f[]` is given, Redmine drops its default
    "open issues" filter, so closed issues are included.
    """
    params = [("f[]", name), (f"op[{name}]", operator)]
    params.extend((f"v[{name}][]", value) for value in values)
    return params
