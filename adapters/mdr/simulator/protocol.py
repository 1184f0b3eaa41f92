"""Constants and helpers of the MDR wire format: paths, field names, filter keys,
the error reply, JWTs, Markdown rendering and request parameters."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
from collections.abc import Iterable
from typing import Any

import pypandoc

API_PREFIX = "/api/v1"
CONTROL_PREFIX = "/_sim"

HOUR = 3600
DAY = 24 * HOUR

PRIORITIES = ("HIGH", "NORMAL", "LOW")
STATUSES = ("Open", "On hold", "Resolved", "Closed")
RESPONSE_DECISIONS = ("Confirmed", "Declined")
ASSET_STATUSES = ("OK", "WARNING", "CRITICAL", "OFFLINE", "ABSENT")
HISTORY_ENTITY_TYPES = ("incident_details", "incident_comment", "incident_attachment", "incident_response")

INCIDENT_FIELDS = (
    "incident_id",
    "incident_number",
    "summary",
    "description",
    "priority",
    "status",
    "resolution",
    "status_description",
    "affected_hosts",
    "affected_hosts_mappings",
    "host_based_iocs",
    "network_based_iocs",
    "iocs",
    "detection_technology",
    "attack_stage",
    "mitre_tactics",
    "mitre_techniques",
    "creation_time",
    "update_time",
    "client_description",
    "client_comment",
    "recommendations",
    "origin",
    "tenant_name",
    "was_read",
    "attachments",
    "comments",
    "responses",
)
COMMENT_FIELDS = ("author_name", "comment_id", "creation_time", "origin", "text", "was_read")
ATTACHMENT_FIELDS = (
    "attachment_id",
    "author_name",
    "caption",
    "creation_time",
    "file_size",
    "full_name",
    "link",
    "origin",
    "was_read",
)
RESPONSE_FIELDS = (
    "response_id",
    "type",
    "details",
    "parameters",
    "asset_id",
    "status",
    "comment",
    "description",
    "creation_time",
    "update_time",
    "was_read",
)
ASSET_FIELDS = (
    "asset_id",
    "domain",
    "first_seen",
    "host_name",
    "installed_product_info",
    "isolation",
    "isolation_task_id",
    "ksc_host_id",
    "last_seen",
    "network_interfaces",
    "os_version",
    "product_map",
    "protection_issues",
    "protection_issues_integral",
    "status",
    "status_reasons",
    "tenant_name",
)

INCIDENT_FILTER_KEYS = frozenset(
    {
        "affected_hosts",
        "asset_ids",
        "detection_technologies",
        "min_creation_time",
        "max_creation_time",
        "min_update_time",
        "max_update_time",
        "mitre_tactics",
        "mitre_techniques",
        "priorities",
        "resolutions",
        "response_statuses",
        "response_types",
        "search_phrase",
        "statuses",
        "tenants_names",
    }
)
ASSET_FILTER_KEYS = frozenset(
    {
        "domain",
        "host_names",
        "is_isolated",
        "min_first_seen",
        "max_first_seen",
        "min_last_seen",
        "max_last_seen",
        "network_interface",
        "os_version",
        "product",
        "related_incidents_ids",
        "search_phrase",
        "statuses",
        "tenants_names",
        "version",
    }
)
PAGING_KEYS = frozenset({"page", "page_size", "sort", "fields"})
INCIDENT_SORT_FIELDS = ("creation_time", "update_time", "incident_number")
# `computer_name_hostname` is the wire's sort key for the `host_name` field.
ASSET_SORT_FIELDS = {
    "first_seen": "first_seen",
    "last_seen": "last_seen",
    "computer_name_hostname": "host_name",
}


class SimError(Exception):
    """An error reply of the simulated API: `{"code": status, "message": message}`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --- JWT -----------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode_jwt(claims: dict[str, Any], key: bytes) -> str:
    """Sign `claims` as an HS256 JWT."""
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    payload = _b64url(json.dumps(claims, separators=(",", ":")).encode())
    signature = hmac.new(key, f"{header}.{payload}".encode("ascii"), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64url(signature)}"


def verify_jwt(token: str, key: bytes) -> dict[str, Any] | None:
    """Return the claims of an HS256 JWT signed with `key`, or None when it is not one."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    expected = hmac.new(key, f"{parts[0]}.{parts[1]}".encode("ascii", "replace"), hashlib.sha256).digest()
    try:
        valid = hmac.compare_digest(_b64url_decode(parts[2]), expected)
        claims = json.loads(_b64url_decode(parts[1])) if valid else None
    except (ValueError, UnicodeDecodeError):
        return None
    return claims if isinstance(claims, dict) else None


@functools.lru_cache(maxsize=2048)
def markdown_to_html(text: str) -> str:
    """Render GitHub-flavoured Markdown as HTML, as MDR does for `markdown_to_html: true`."""
    return pypandoc.convert_text(text, "html", format="gfm")


# --- request parameters ----------------------------------------------------


class Params:
    """Typed access to a request body that rejects unknown keys and wrong types with 400."""

    def __init__(self, body: dict[str, Any], allowed: Iterable[str]) -> None:
        unknown = sorted(set(body) - set(allowed))
        if unknown:
            raise SimError(400, f"unknown request fields: {', '.join(unknown)}")
        self.body = body

    def string(self, name: str, *, required: bool = False) -> str | None:
        value = self._get(name, required)
        if value is not None and not isinstance(value, str):
            raise SimError(400, f"{name} must be a string")
        return value

    def required_string(self, name: str) -> str:
        value = self.string(name, required=True)
        assert value is not None
        return value

    def integer(self, name: str, *, minimum: int | None = None) -> int | None:
        value = self._get(name, False)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise SimError(400, f"{name} must be an integer")
        if minimum is not None and value < minimum:
            raise SimError(400, f"{name} must be at least {minimum}")
        return value

    def boolean(self, name: str) -> bool:
        value = self._get(name, False)
        if value is not None and not isinstance(value, bool):
            raise SimError(400, f"{name} must be a boolean")
        return bool(value)

    def strings(self, name: str, *, choices: Iterable[str] | None = None) -> list[str]:
        value = self._get(name, False)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise SimError(400, f"{name} must be an array of strings")
        if choices is not None:
            invalid = sorted(set(value) - set(choices))
            if invalid:
                raise SimError(400, f"invalid {name}: {', '.join(invalid)}")
        return value

    def _get(self, name: str, required: bool) -> Any:
        value = self.body.get(name)
        if required and value in (None, ""):
            raise SimError(400, f"{name} is required")
        return value


def parse_sort(value: str | None, allowed: Iterable[str], default: str) -> tuple[str, bool]:
    """Split `"<field>:asc"` or `"<field>:desc"` into the field and whether it is descending."""
    spec = value or default
    name, _, direction = spec.partition(":")
    direction = direction or "asc"
    if name not in allowed or direction not in ("asc", "desc"):
        raise SimError(
            400, f"invalid sort {spec!r}: use <field>:asc or <field>:desc with one of {', '.join(allowed)}"
        )
    return name, direction == "desc"


def sort_key(record: dict[str, Any], name: str, tie_key: str) -> tuple[Any, ...]:
    value = record.get(name)
    # Records seeded with a wrong type sort first instead of breaking the sort.
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return (0, "", str(record.get(tie_key, "")))
    return (1, value, str(record.get(tie_key, "")))


def select_fields(record: dict[str, Any], names: list[str]) -> dict[str, Any]:
    if not names:
        return record
    return {name: record[name] for name in names if name in record}


def in_range(value: Any, minimum: int | None, maximum: int | None) -> bool:
    """Check `minimum <= value <= maximum`; both bounds are inclusive and optional."""
    if minimum is None and maximum is None:
        return True
    if isinstance(value, bool) or not isinstance(value, int):
        return False
    return (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
