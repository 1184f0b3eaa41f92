"""Records of the Kaspersky MDR API as the connector reads them.

Field names are the vendor's. Times are Unix epoch milliseconds. Unknown
keys are ignored, because the API adds fields over time; the fields the
connector relies on are required and type-checked, so a malformed record
fails here with its id rather than deep inside a sync step.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from mdr_connector.connector.errors import InvalidPayloadError

PRIORITIES = ("HIGH", "NORMAL", "LOW")
STATUSES = ("Open", "On hold", "Resolved", "Closed")
# Epoch milliseconds of 9999-12-31T23:59:59.999Z, the last moment Python's
# datetime can hold; a larger time cannot be a real MDR timestamp.
MAX_EPOCH_MS = 253_402_300_799_999
EpochMs = Annotated[StrictInt, Field(ge=0, le=MAX_EPOCH_MS)]
# The ledger keeps ids in 200-character columns. Real MDR ids have about 20
# characters, so a longer one is taken for bad data.
MAX_ID_LENGTH = 200


class MdrRecord(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Comment(MdrRecord):
    comment_id: StrictStr = Field(min_length=1, max_length=MAX_ID_LENGTH)
    author_name: StrictStr
    text: StrictStr
    creation_time: EpochMs
    origin: str = ""


class Attachment(MdrRecord):
    attachment_id: StrictStr
    author_name: str = ""
    caption: str = ""
    creation_time: int = 0
    file_size: int = 0
    full_name: str = ""
    link: str = ""


class Response(MdrRecord):
    response_id: StrictStr
    type: str = ""
    status: str = ""
    asset_id: str = ""
    description: str = ""
    comment: str = ""
    parameters: dict[str, Any] | None = None
    details: dict[str, Any] | None = None
    creation_time: int = 0
    update_time: int = 0


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
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'record'}: {error['msg']}"
            for error in err.errors()
        )
        raise InvalidPayloadError(
            f"MDR incident {incident_id or '<without incident_id>'} is malformed: {problems}"
        ) from err


def parse_comment(raw: Any, incident_id: str) -> Comment:
    """Validate one raw comment of an incident."""
    try:
        return Comment.model_validate(raw)
    except ValidationError as err:
        comment_id, _ = describe_record(raw, "comment_id")
        raise InvalidPayloadError(
            f"MDR comment {comment_id or '<without comment_id>'} of incident {incident_id} "
            f"is malformed: {err.errors()[0]['msg']} at {err.errors()[0]['loc']}"
        ) from err
