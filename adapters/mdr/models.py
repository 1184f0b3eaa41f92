"""Records of the Kaspersky MDR API as the connector reads them.

Field names are the vendor's. Times are Unix epoch milliseconds. Unknown
keys are ignored, because the API adds fields over time; the fields the
connector relies on are required and type-checked, so a malformed record
fails here with its id rather than deep inside a sync step.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from mdr_connector.connector.errors import InvalidPayloadError

PRIORITIES = ("HIGH", "NORMAL", "LOW")
STATUSES = ("Open", "On hold", "Resolved", "Closed")
# Epoch milliseconds of 9999-12-31T23:59:59.999Z, the last moment Python's
# datetime can hold; a larger time cannot be a real MDR timestamp.
MAX_EPOCH_MS = 253_402_300_799_999
# Epoch times from 10**9 up to 10**12 are taken for seconds sent where
# milliseconds are due. Read as milliseconds they fall between 1970-01-12
# and 2001-09-09, long before MDR existed. Read as seconds they are any
# date from 2001 on. Smaller values stay valid, and 0 means "not set".
SECONDS_LIKE_EPOCH = range(10**9, 10**12)


def _reject_epoch_seconds(value: int) -> int:
    if value in SECONDS_LIKE_EPOCH:
        raise ValueError(
            f"{value} looks like epoch seconds, but MDR times are epoch milliseconds; "
            "report the record to Kaspersky"
        )
    return value


EpochMs = Annotated[StrictInt, Field(ge=0, le=MAX_EPOCH_MS), AfterValidator(_reject_epoch_seconds)]
# The ledger keeps ids in 200-character columns. Real MDR ids have about 20
# characters, so a longer one is taken for bad data.
MAX_ID_LENGTH = 200
# Characters of a bad value that an error message shows.
MAX_SHOWN_VALUE = 80


class MdrRecord(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


# MDR ids seen so far are URL-safe base64 (letters, digits, - and _). The
# connector builds ledger keys of comment ids with `/` and `:`, so a comment
# id with any other character is bad data, not a key to guess around.
# NOTE: the id alphabet is INFERRED from observed ids, not documented.
ID_PATTERN = r"^[A-Za-z0-9_-]+$"


class Comment(MdrRecord):
    comment_id: StrictStr = Field(min_length=1, max_length=MAX_ID_LENGTH, pattern=ID_PATTERN)
    author_name: StrictStr
    text: StrictStr
    creation_time: EpochMs
    origin: str = ""


class Attachment(MdrRecord):
    attachment_id: StrictStr = Field(min_length=1, max_length=MAX_ID_LENGTH)
    full_name: StrictStr
    # Bytes. The client treats it as the exact size of the download.
    file_size: Annotated[StrictInt, Field(ge=0)]
    author_name: str = ""
    caption: str = ""
    creation_time: EpochMs = 0
    link: str = ""
    origin: str = ""


class Response(MdrRecord):
    response_id: StrictStr = Field(min_length=1, max_length=MAX_ID_LENGTH)
    status: StrictStr
    type: str = ""
    asset_id: str = ""
    description: str = ""
    comment: str = ""
    parameters: dict[str, Any] | None = None
    details: dict[str, Any] | None = None
    creation_time: EpochMs = 0
    update_time: EpochMs = 0


class NetworkInterface(MdrRecord):
    """One network interface of an asset, whose values are all strings on the wire."""

    ip: str = ""
    mac: str = ""
    # Probably the adapter description, default gateway, DNS domain and
    # address with mask. The meanings of these keys are INFERRED.
    dsc: str = ""
    defg: str = ""
    dnsd: str = ""
    ipcm: str = ""


class Asset(MdrRecord):
    asset_id: StrictStr = Field(min_length=1, max_length=MAX_ID_LENGTH)
    host_name: str = ""
    domain: str = ""
    os_version: str = ""
    installed_product_info: str = ""
    status: str = ""
    isolation: bool = False
    last_seen: EpochMs | None = None
    first_seen: EpochMs | None = None
    tenant_name: str = ""
    network_interfaces: list[NetworkInterface] = Field(default_factory=list)

    def ip_addresses(self) -> list[str]:
        """Return every IP address of the asset, splitting an interface `ip` that joins several with `|`."""
        return [ip for interface in self.network_interfaces for ip in interface.ip.split("|") if ip]


HISTORY_ENTITY_TYPES = ("incident_details", "incident_comment", "incident_attachment", "incident_response")


class HistoryEntry(MdrRecord):
    """One `incidents/history` record: which object of which incident changed, and when."""

    changed_at: EpochMs
    changed_by: str = ""
    operation: str = ""
    # The key under the wire record's `entity`, so far one of
    # HISTORY_ENTITY_TYPES. A new type is passed on, not rejected.
    entity_type: StrictStr = Field(min_length=1)
    # Empty when neither the request, the record nor the changed object names the incident.
    incident_id: str
    # The object after the change, as MDR returned it.
    entity: dict[str, Any] = Field(default_factory=dict)


class Incident(MdrRecord):
    incident_id: StrictStr = Field(min_length=1, max_length=MAX_ID_LENGTH)
    incident_number: StrictInt
    summary: StrictStr
    priority: StrictStr
    status: StrictStr
    creation_time: EpochMs
    update_time: EpochMs
    description: str = ""
    resolution: str = ""
    status_description: str = ""
    affected_hosts: list[str] = Field(default_factory=list)
    tenant_name: str = ""
    origin: str = ""
    detection_technology: str = ""
    attack_stage: str = ""
    mitre_tactics: list[str] = Field(default_factory=list)
    mitre_techniques: list[str] = Field(default_factory=list)
    client_description: str = ""
    recommendations: str = ""
    # The embedded comments, attachments and responses are left unparsed:
    # the engine reads each kind through its own list method, so one
    # malformed embedded comment cannot make the whole incident malformed.
    comments: list[Any] = Field(default_factory=list)
    attachments: list[Any] = Field(default_factory=list)
    responses: list[Any] = Field(default_factory=list)

    def host_names(self) -> list[str]:
        """Host names from `affected_hosts`, whose items are `HOSTNAME:asset_id`."""
        return [entry.split(":", 1)[0] for entry in self.affected_hosts]


def describe_record(raw: Any, id_key: str) -> tuple[str | None, int | None]:
    """Return the id and `update_time` of a raw record, where they can be read at all."""
    if not isinstance(raw, dict):
        return None, None
    record_id = raw.get(id_key)
    update_time = raw.get("update_time")
    readable_id = isinstance(record_id, str) and 0 < len(record_id) <= MAX_ID_LENGTH
    return (
        record_id if readable_id else None,
        update_time if isinstance(update_time, int) and not isinstance(update_time, bool) else None,
    )


def parse_incident(raw: Any) -> Incident:
    """Validate one raw incident, raising InvalidPayloadError that names its id and the bad fields."""
    try:
        return Incident.model_validate(raw)
    except ValidationError as err:
        incident_id, _ = describe_record(raw, "incident_id")
        raise InvalidPayloadError(
            f"MDR incident {incident_id or '<without incident_id>'} is malformed: {describe_problems(err)}"
        ) from err


def parse_comment(raw: Any, incident_id: str) -> Comment:
    """Validate one raw comment of an incident."""
    try:
        return Comment.model_validate(raw)
    except ValidationError as err:
        comment_id, _ = describe_record(raw, "comment_id")
        raise InvalidPayloadError(
            f"MDR comment {comment_id or '<without comment_id>'} of incident {incident_id} "
            f"is malformed: {describe_problems(err)}"
        ) from err


def describe_problems(err: ValidationError) -> str:
    """Join the failed fields of a validation error as `field: message (got value); ...`."""
    return "; ".join(_describe_problem(error) for error in err.errors())


def _describe_problem(error: Any) -> str:
    field = ".".join(str(part) for part in error["loc"]) or "record"
    if error["type"] == "missing":
        # The input of a missing field is the whole record, which names nothing.
        return f"{field}: {error['msg']}"
    value_text = json.dumps(error["input"], ensure_ascii=False, default=repr)
    if len(value_text) > MAX_SHOWN_VALUE:
        value_text = value_text[: MAX_SHOWN_VALUE - 1] + "…"
    return f"{field}: {error['msg']} (got {value_text})"


def parse_attachment(raw: Any, incident_id: str) -> Attachment:
    """Validate one raw attachment of an incident."""
    try:
        return Attachment.model_validate(raw)
    except ValidationError as err:
        attachment_id, _ = describe_record(raw, "attachment_id")
        raise InvalidPayloadError(
            f"MDR attachment {attachment_id or '<without attachment_id>'} of incident {incident_id} "
            f"is malformed: {describe_problems(err)}"
        ) from err


def parse_response(raw: Any, incident_id: str) -> Response:
    """Validate one raw remediation response of an incident."""
    try:
        return Response.model_validate(raw)
    except ValidationError as err:
        response_id, _ = describe_record(raw, "response_id")
        raise InvalidPayloadError(
            f"MDR response {response_id or '<without response_id>'} of incident {incident_id} "
            f"is malformed: {describe_problems(err)}"
        ) from err


def parse_asset(raw: Any, asset_id: str) -> Asset:
    """Validate the `assets/details` record of `asset_id`, treating a record of another asset as malformed."""
    try:
        asset = Asset.model_validate(raw)
    except ValidationError as err:
        raise InvalidPayloadError(f"MDR asset {asset_id} is malformed: {describe_problems(err)}") from err
    if asset.asset_id != asset_id:
        raise InvalidPayloadError(f"MDR returned asset {asset.asset_id} when asked for asset {asset_id}")
    return asset


def parse_history_entry(raw: Any, requested_incident_id: str | None = None) -> HistoryEntry:
    """Validate one `incidents/history` record and flatten its `entity` wrapper.

    The wire record is `{"changed_at", "changed_by", "operation", "entity":
    {<entity type>: <object>}}`. The incident comes from the request's
    `incident_id` when there was one, else from the record, else from the
    changed object.
    """
    changed_at = raw.get("changed_at") if isinstance(raw, dict) else None
    label = f"MDR history record changed at {changed_at}" if changed_at is not None else "MDR history record"
    wrapper = raw.get("entity") if isinstance(raw, dict) else None
    if not isinstance(wrapper, dict) or len(wrapper) != 1:
        raise InvalidPayloadError(f"{label} is malformed: entity must be an object with exactly one key")
    [(entity_type, entity)] = wrapper.items()
    if not isinstance(entity, dict):
        raise InvalidPayloadError(f"{label} is malformed: entity.{entity_type} must be an object")

    # NOTE: a top-level `incident_id` in history records is INFERRED, because
    # no public sample shows one. incident_details objects always carry it.
    # The other types may not, which leaves incident_id empty.
    incident_id = requested_incident_id or raw.get("incident_id") or entity.get("incident_id") or ""
    if not isinstance(incident_id, str):
        incident_id = ""
    try:
        return HistoryEntry.model_validate(
            {
                "changed_at": changed_at,
                "changed_by": raw.get("changed_by") or "",
                "operation": raw.get("operation") or "",
                "entity_type": entity_type,
                "incident_id": incident_id,
                "entity": entity,
            }
        )
    except ValidationError as err:
        subject = f" of incident {incident_id}" if incident_id else ""
        raise InvalidPayloadError(f"{label}{subject} is malformed: {describe_problems(err)}") from err
