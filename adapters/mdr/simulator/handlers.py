"""The MDR API methods, one function each, and the filter, paging and upload helpers they share."""

from __future__ import annotations

import asyncio
import bisect
import copy
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import BodyPartReader, web

from mdr_connector.adapters.faults import download_cut_bytes
from mdr_connector.adapters.mdr.simulator.protocol import (
    API_PREFIX,
    ASSET_FIELDS,
    ASSET_FILTER_KEYS,
    ASSET_SORT_FIELDS,
    ASSET_STATUSES,
    ATTACHMENT_FIELDS,
    COMMENT_FIELDS,
    HISTORY_ENTITY_TYPES,
    INCIDENT_FIELDS,
    INCIDENT_FILTER_KEYS,
    INCIDENT_SORT_FIELDS,
    PAGING_KEYS,
    RESPONSE_DECISIONS,
    RESPONSE_FIELDS,
    Params,
    SimError,
    in_range,
    markdown_to_html,
    parse_sort,
    select_fields,
    sort_key,
)
from mdr_connector.adapters.mdr.simulator.state import HistoryRecord, MdrSimulator, SimConnection

log = logging.getLogger(__name__)

UPLOAD_CHUNK_BYTES = 256 * 1024
MAX_META_BYTES = 64 * 1024


# --- wire API: one function per method ---------------------------------------

ApiMethod = Callable[[MdrSimulator, SimConnection, dict[str, Any], web.Request], Awaitable[Any]]


async def api_incidents_count(
    sim: MdrSimulator, connection: SimConnection, body: dict[str, Any], request: web.Request
) -> Any:
    params = Params(body, INCIDENT_FILTER_KEYS)
    records = [r for r in sim._listed_incidents(connection) if incident_matches(r, params)]
    return {"count": len(records)}


async def api_incidents_list(
    sim: MdrSimulator, connection: SimConnection, body: dict[str, Any], request: web.Request
) -> Any:
    params = Params(body, INCIDENT_FILTER_KEYS | PAGING_KEYS | {"markdown_to_html"})
    wanted = params.strings("fields", choices=INCIDENT_FIELDS)
    as_html = params.boolean("markdown_to_html")
    name, descending = parse_sort(params.string("sort"), INCIDENT_SORT_FIELDS, "creation_time:asc")
    start, end = page_bounds(sim, params)

    records = [r for r in sim._listed_incidents(connection) if incident_matches(r, params)]
    records.sort(key=lambda r: sort_key(r, name, "incident_id"), reverse=descending)
    page = records[start:end]
    return [await render_incident(record, wanted, as_html) for record in page]


async def api_incidents_details(
    sim: MdrSimulator, connection: SimConnection, body: dict[str, Any], request: web.Request
) -> Any:
    params = Params(body, {"incident_id", "fields", "markdown_to_html"})
    incident = sim._visible_incident(connection, params.required_string("incident_id"))
    wanted = params.strings("fields", choices=INCIDENT_FIELDS)
    return await render_incident(incident.snapshot(), wanted, params.boolean("markdown_to_html"))


async def api_incidents_history(
    sim: MdrSimulator, connection: SimConnection, body: dict[str, Any], request: web.Request
) -> Any:
    params = Params(
        body,
        {"incident_id", "min_record_time", "max_record_time", "ignore_self", "page", "entity_type_page_size"},
    )
    incident_id = params.string("incident_id")
    if incident_id:
        sim._visible_incident(connection, incident_id)
    minimum = params.integer("min_record_time")
    maximum = params.integer("max_record_time")
    page = params.integer("page", minimum=1) or 1
    page_size = params.integer("entity_type_page_size", minimum=1) or sim.settings.default_history_page_size
    # NOTE: hiding the caller's own changes under ignore_self is INFERRED.
    ignore_self = params.boolean("ignore_self")

    def wanted(record: HistoryRecord) -> bool:
        incident = sim._incidents.get(record.incident_id)
        return (
            record.client_id == connection.client_id
            and (not incident_id or record.incident_id == incident_id)
            and incident is not None
            and connection.sees_tenant(str(incident.record.get("tenant_name", "")))
            and in_range(record.changed_at, minimum, maximum)
            and not (ignore_self and record.changed_by == connection.connection_name)
        )

    # Paging runs per entity type (one search index each on the real
    # service), so a page holds up to page_size records of every type.
    result: list[HistoryRecord] = []
    for entity_type in HISTORY_ENTITY_TYPES:
        orders, records = sim.history_of_type(entity_type)
        start = 0 if minimum is None else bisect.bisect_left(orders, (minimum, -1))
        skip = (page - 1) * page_size
        on_page = 0
        for record in records[start:]:
            if maximum is not None and record.changed_at > maximum:
                break
            if not wanted(record):
                continue
            if skip:
                skip -= 1
                continue
            result.append(record)
            on_page += 1
            if on_page == page_size:
                break
    result.sort(key=HistoryRecord.order)
    return [record.to_wire() for record in result]


async def api_incidents_create(
    sim: MdrSimulator, connection: SimConnection, body: dict[str, Any], request: web.Request
) -> Any:
    params = Params(
        body,
        {"summary", "client_description", "affected_hosts", "priority", "tenant_id", "no_sla_flag", "markdown_to_html"},
    )
    summary = params.required_string("summary")
    description = params.string("client_description")
    if description is None:
        raise SimError(400, "client_description is required")
    affected_hosts = params.strings("affected_hosts")
    # NOTE: the priority of an incident created without one is INFERRED.
    priority = params.string("priority") or "NORMAL"
    # NOTE: what no_sla_flag changes is not known; it is accepted and ignored.
    params.boolean("no_sla_flag")
    # NOTE: that markdown_to_html converts client_description once, at
    # creation, is INFERRED, as for comments.
    if params.boolean("markdown_to_html"):
        description = await asyncio.to_thread(markdown_to_html, description)
    return sim.create_client_incident(
        connection,
        summary=summary,
        client_description=description,
        affected_hosts=affected_hosts,
        priority=priority,
        tenant_id=params.string("tenant_id") or "",
    )


async def api_incidents_close(
    sim: MdrSimulator, connection: SimConnection, body: dict[str, Any], request: web.Request
) -> Any:
    params = Params(body, {"incident_id", "resolution_status", "summary"})
    # NOTE: that summary is required is INFERRED; the reply (the closed incident) is INFERRED too.
    return sim.close_incident(
        connection,
        params.required_string("incident_id"),
        params.required_string("resolution_status"),
        params.required_string("summary"),
    )


async def api_comments_list(
    sim: MdrSimulator, connection: SimConnection, body: dict[str, Any], request: web.Request
) -> Any:
    params = Params(body, {"incident_id", "fields", "markdown_to_html"})
    incident = sim._visible_incident(connection, params.required_string("incident_id"))
    wanted = params.strings("fields", choices=COMMENT_FIELDS)
    params.boolean("markdown_to_html")
    return [select_fields(copy.deepcopy(c), wanted) for c in incident.comments]


async def api_comments_create(
    sim: MdrSimulator, connection: SimConnection, body: dict[str, Any], request: web.Request
) -> Any:
    params = Params(body, {"incident_id", "text", "markdown_to_html"})
    incident = sim._visible_incident(connection, params.required_string("incident_id"))
    text = params.required_string("text")
    # NOTE: the simulator converts Markdown once, at creation; whether the
    # real service stores Markdown and converts on read is not known.
    if params.boolean("markdown_to_html"):
        text = await asyncio.to_thread(markdown_to_html, text)
    return sim._add_comment(incident, text, author=connection.connection_name, origin="Client")


async def api_comments_delete(
    sim: MdrSimulator, connection: SimConnection, body: dict[str, Any], request: web.Request
) -> Any:
    params = Params(body, {"comment_id"})
    comment_id = params.required_string("comment_id")
    for incident in sim._incidents.values():
        if incident.client_id != connection.client_id:
            continue
        for comment in incident.comments:
            if comment["comment_id"] != comment_id:
                continue
            # NOTE: that only the author may delete a comment, and the 403 for
            # anyone else, are INFERRED.
            if comment["author_name"] != connection.connection_name or comment["origin"] != "Client":
                raise SimError(403, "only the connection that wrote a comment can delete it")
            incident.comments.remove(comment)
            incident.record["update_time"] = sim.now_ms()
            sim._changed(incident, connection.connection_name, "delete", "incident_comment", comment)
            sim._changed(
                incident, connection.connection_name, "update", "incident_details", incident.snapshot()
            )
            # NOTE: the reply body of comments/delete is not known; `{}` is a guess.
            return {}
    raise SimError(404, f"comment {comment_id} not found")


async def api_attachments_list(
    sim: MdrSimulator, connection: SimConnection, body: dict[str, Any], request: web.Request
) -> Any:
    params = Params(body, {"incident_id", "fields", "markdown_to_html"})
    incident = sim._visible_incident(connection, params.required_string("incident_id"))
    wanted = params.strings("fields", choices=ATTACHMENT_FIELDS)
    params.boolean("markdown_to_html")
    return [
        select_fields(attachment_view(a, request, connection.client_id), wanted) for a in incident.attachments
    ]


async def api_attachments_download(
    sim: MdrSimulator, connection: SimConnection, body: dict[str, Any], request: web.Request
) -> Any:
    params = Params(body, {"attachment_id"})
    attachment = visible_attachment(sim, connection, params.required_string("attachment_id"))
    attachment_id = attachment["attachment_id"]
    if not sim.blobs.path(attachment_id).exists():
        # Only an attachment seeded inside an incident record has no file.
        raise SimError(404, f"attachment {attachment_id} has no content")
    size = sim.blobs.size(attachment_id)
    fraction = sim.settings.download_cutoff_fraction
    planned_cut = download_cut_bytes(request, size)
    cut = 0 < fraction < 1 or planned_cut > 0
    sent_bytes = planned_cut or (int(size * fraction) if cut else size)
    # A cut from the fault plan always drops the connection, like the other simulators' cut downloads.
    drop_connection = cut and (planned_cut > 0 or sim.settings.download_cutoff_drops_connection)

    # NOTE: the Content-Type and Content-Disposition of attachments/download are INFERRED.
    response = web.StreamResponse(
        headers={
            "Content-Type": "application/octet-stream",
            "Content-Disposition": content_disposition(str(attachment.get("full_name", ""))),
        }
    )
    response.content_length = size if drop_connection else sent_bytes
    await response.prepare(request)
    chunks = sim.blobs.read_chunks(attachment_id, sent_bytes)
    while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
        await response.write(chunk)
    if drop_connection and request.transport is not None:
        log.info("mdr_sim.download.cut_off", extra={"attachment_id": attachment_id, "sent_bytes": sent_bytes})
        request.transport.close()
        return response
    await response.write_eof()
    return response


async def api_attachments_upload(
    sim: MdrSimulator, connection: SimConnection, body: dict[str, Any], request: web.Request
) -> Any:
    upload = await read_upload(request, sim)
    try:
        params = Params(upload.meta, {"incident_id", "caption"})
        incident = sim._visible_incident(connection, params.required_string("incident_id"))
        attachment = sim.add_attachment(
            connection.client_id,
            incident.incident_id,
            upload.file_name,
            source=upload.path,
            caption=params.string("caption") or "",
            author=connection.connection_name,
            origin="Client",
        )
    finally:
        upload.path.unlink(missing_ok=True)
    # NOTE: the reply shape of attachments/upload is INFERRED: the new attachment.
    return attachment_view(attachment, request, connection.client_id)


async def api_responses_list(
    sim: MdrSimulator, connection: SimConnection, body: dict[str, Any], request: web.Request
) -> Any:
    params = Params(body, {"incident_id", "fields", "page", "page_size"})
    incident = sim._visible_incident(connection, params.required_string("incident_id"))
    wanted = params.strings("fields", choices=RESPONSE_FIELDS)
    start, end = page_bounds(sim, params)
    return [select_fields(copy.deepcopy(r), wanted) for r in incident.responses[start:end]]


async def api_response_update(
    sim: MdrSimulator, connection: SimConnection, body: dict[str, Any], request: web.Request
) -> Any:
    params = Params(body, {"response_id", "status", "comment"})
    response_id = params.required_string("response_id")
    status, comment = decision(params)
    return decide_response(sim, connection, response_id, status, comment)


async def api_responses_update(
    sim: MdrSimulator, connection: SimConnection, body: dict[str, Any], request: web.Request
) -> Any:
    params = Params(body, {"responses_ids", "status", "comment"})
    response_ids = params.strings("responses_ids")
    if not response_ids:
        raise SimError(400, "responses_ids is required")
    status, comment = decision(params)
    # NOTE: the reply of responses/update is INFERRED: the updated responses.
    return [decide_response(sim, connection, response_id, status, comment) for response_id in response_ids]


async def api_assets_count(
    sim: MdrSimulator, connection: SimConnection, body: dict[str, Any], request: web.Request
) -> Any:
    params = Params(body, ASSET_FILTER_KEYS)
    return {"count": len(matching_assets(sim, connection, params))}


async def api_assets_list(
    sim: MdrSimulator, connection: SimConnection, body: dict[str, Any], request: web.Request
) -> Any:
    params = Params(body, ASSET_FILTER_KEYS | PAGING_KEYS)
    wanted = params.strings("fields", choices=ASSET_FIELDS)
    name, descending = parse_sort(params.string("sort"), ASSET_SORT_FIELDS, "first_seen:asc")
    start, end = page_bounds(sim, params)
    version = params.integer("version") or 1

    assets = matching_assets(sim, connection, params)
    assets.sort(key=lambda a: sort_key(a, ASSET_SORT_FIELDS[name], "asset_id"), reverse=descending)
    return [select_fields(asset_view(a, version), wanted) for a in assets[start:end]]


async def api_assets_details(
    sim: MdrSimulator, connection: SimConnection, body: dict[str, Any], request: web.Request
) -> Any:
    params = Params(body, {"asset_id", "fields", "version"})
    asset_id = params.required_string("asset_id")
    wanted = params.strings("fields", choices=ASSET_FIELDS)
    asset = sim._assets.get(asset_id)
    visible = (
        asset is not None
        and sim._asset_clients.get(asset_id) == connection.client_id
        and connection.sees_tenant(str(asset.get("tenant_name", "")))
    )
    if not visible:
        raise SimError(404, f"asset {asset_id} not found")
    assert asset is not None
    return select_fields(asset_view(asset, params.integer("version") or 1), wanted)


API_METHODS: dict[str, ApiMethod] = {
    "incidents/count": api_incidents_count,
    "incidents/list": api_incidents_list,
    "incidents/details": api_incidents_details,
    "incidents/history": api_incidents_history,
    "incidents/create": api_incidents_create,
    "incidents/close": api_incidents_close,
    "comments/list": api_comments_list,
    "comments/create": api_comments_create,
    "comments/delete": api_comments_delete,
    "attachments/list": api_attachments_list,
    "attachments/download": api_attachments_download,
    "attachments/upload": api_attachments_upload,
    "responses/list": api_responses_list,
    "response/update": api_response_update,
    "responses/update": api_responses_update,
    "assets/count": api_assets_count,
    "assets/list": api_assets_list,
    "assets/details": api_assets_details,
}


# --- wire API helpers -------------------------------------------------------


def page_bounds(sim: MdrSimulator, params: Params) -> tuple[int, int]:
    """Slice bounds of a 1-based page, rejecting pages past the result window with 400."""
    page = params.integer("page", minimum=1) or 1
    page_size = params.integer("page_size", minimum=1) or sim.settings.default_page_size
    if page * page_size > sim.settings.result_window:
        raise SimError(
            400,
            f"page * page_size must not exceed the result window of {sim.settings.result_window}; "
            "narrow the filter instead of paging deeper",
        )
    return (page - 1) * page_size, page * page_size


def incident_matches(record: dict[str, Any], params: Params) -> bool:
    """Apply the documented incidents/list and incidents/count filters to one record."""

    def any_of(name: str, values: list[str]) -> bool:
        return not values or bool(set(values) & set(_as_list(record.get(name))))

    def one_of(name: str, values: list[str]) -> bool:
        return not values or record.get(name) in values

    asset_ids = params.strings("asset_ids")
    host_assets = [
        entry.split(":", 1)[-1] for entry in _as_list(record.get("affected_hosts")) if isinstance(entry, str)
    ]
    phrase = (params.string("search_phrase") or "").lower()
    responses = _as_list(record.get("responses"))
    response_statuses = params.strings("response_statuses")
    response_types = params.strings("response_types")

    return all(
        (
            in_range(
                record.get("creation_time"),
                params.integer("min_creation_time"),
                params.integer("max_creation_time"),
            ),
            in_range(
                record.get("update_time"),
                params.integer("min_update_time"),
                params.integer("max_update_time"),
            ),
            one_of("status", params.strings("statuses")),
            one_of("priority", params.strings("priorities")),
            one_of("resolution", params.strings("resolutions")),
            one_of("tenant_name", params.strings("tenants_names")),
            one_of("detection_technology", params.strings("detection_technologies")),
            any_of("affected_hosts", params.strings("affected_hosts")),
            any_of("mitre_tactics", params.strings("mitre_tactics")),
            any_of("mitre_techniques", params.strings("mitre_techniques")),
            not asset_ids or bool(set(asset_ids) & set(host_assets)),
            not response_statuses
            or any(r.get("status") in response_statuses for r in responses if isinstance(r, dict)),
            not response_types
            or any(r.get("type") in response_types for r in responses if isinstance(r, dict)),
            not phrase
            or phrase
            in " ".join(
                str(record.get(key, "")) for key in ("incident_number", "summary", "description")
            ).lower(),
        )
    )


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


async def render_incident(record: dict[str, Any], wanted: list[str], as_html: bool) -> dict[str, Any]:
    rendered = copy.deepcopy(record)
    if as_html and isinstance(rendered.get("description"), str):
        rendered["description"] = await asyncio.to_thread(markdown_to_html, rendered["description"])
    return select_fields(rendered, wanted)


def attachment_view(attachment: dict[str, Any], request: web.Request, client_id: str) -> dict[str, Any]:
    # NOTE: what `link` points to on the real service is not known; here it
    # names this simulator's download method, never a remote host.
    view = copy.deepcopy(attachment)
    view["link"] = (
        f"{request.url.origin()}{API_PREFIX}/{client_id}/attachments/download?attachment_id={attachment['attachment_id']}"
    )
    return view


def asset_view(asset: dict[str, Any], version: int) -> dict[str, Any]:
    # NOTE: that version 2 swaps status_reasons for protection_issues is INFERRED.
    view = copy.deepcopy(asset)
    if version == 2:
        view.pop("status_reasons", None)
    else:
        view.pop("protection_issues", None)
        view.pop("protection_issues_integral", None)
    return view


def matching_assets(sim: MdrSimulator, connection: SimConnection, params: Params) -> list[dict[str, Any]]:
    version = params.integer("version")
    if version not in (None, 1, 2):
        raise SimError(400, "version must be 1 or 2")
    statuses = params.strings("statuses", choices=ASSET_STATUSES)
    host_names = params.strings("host_names")
    tenants = params.strings("tenants_names")
    related = set(params.strings("related_incidents_ids"))
    related_assets = {
        entry.split(":", 1)[-1]
        for incident_id in related
        if incident_id in sim._incidents
        for entry in _as_list(sim._incidents[incident_id].record.get("affected_hosts"))
        if isinstance(entry, str)
    }
    texts = {
        key: (params.string(key) or "").lower()
        for key in ("domain", "os_version", "network_interface", "search_phrase")
    }
    product = params.string("product")
    isolated = params.body.get("is_isolated")

    def matches(asset: dict[str, Any]) -> bool:
        interfaces = json.dumps(asset.get("network_interfaces", [])).lower()
        return all(
            (
                sim._asset_clients.get(asset["asset_id"]) == connection.client_id,
                connection.sees_tenant(str(asset.get("tenant_name", ""))),
                not statuses or asset.get("status") in statuses,
                not host_names or asset.get("host_name") in host_names,
                not tenants or asset.get("tenant_name") in tenants,
                not related or asset["asset_id"] in related_assets,
                isolated is None or asset.get("isolation") is bool(isolated),
                not product or product in (asset.get("product_map") or {}),
                in_range(
                    asset.get("first_seen"),
                    params.integer("min_first_seen"),
                    params.integer("max_first_seen"),
                ),
                in_range(
                    asset.get("last_seen"), params.integer("min_last_seen"), params.integer("max_last_seen")
                ),
                not texts["domain"] or texts["domain"] in str(asset.get("domain", "")).lower(),
                not texts["os_version"] or texts["os_version"] in str(asset.get("os_version", "")).lower(),
                not texts["network_interface"] or texts["network_interface"] in interfaces,
                not texts["search_phrase"]
                or texts["search_phrase"] in f"{asset.get('host_name')} {asset.get('domain')}".lower(),
            )
        )

    return [copy.deepcopy(a) for a in sim._assets.values() if matches(a)]


def decision(params: Params) -> tuple[str, str]:
    status = params.required_string("status")
    if status not in RESPONSE_DECISIONS:
        raise SimError(400, f"status must be one of {', '.join(RESPONSE_DECISIONS)}")
    return status, params.string("comment") or ""


def decide_response(
    sim: MdrSimulator, connection: SimConnection, response_id: str, status: str, comment: str
) -> dict[str, Any]:
    """Confirm or decline one response; only a response in the initial status can change (INFERRED)."""
    for incident in sim._incidents.values():
        if incident.client_id != connection.client_id or not connection.sees_tenant(
            str(incident.record.get("tenant_name", ""))
        ):
            continue
        for response in incident.responses:
            if response["response_id"] != response_id:
                continue
            if response["status"] != sim.settings.response_initial_status:
                raise SimError(
                    400,
                    f"response {response_id} is already {response['status']}; only a response in "
                    f"status {sim.settings.response_initial_status} can be confirmed or declined",
                )
            now = sim.now_ms()
            response.update(status=status, comment=comment, update_time=now)
            sim._next_expiry = None
            incident.record["update_time"] = now
            sim._changed(incident, connection.connection_name, "update", "incident_response", response)
            sim._changed(
                incident, connection.connection_name, "update", "incident_details", incident.snapshot()
            )
            return copy.deepcopy(response)
    raise SimError(404, f"response {response_id} not found")


@dataclass
class Upload:
    """An attachments/upload request read to the end: the meta object, the file name and the file on disk."""

    meta: dict[str, Any]
    file_name: str
    path: Path


async def read_upload(request: web.Request, sim: MdrSimulator) -> Upload:
    """Read the `file` part to a temporary file and the `meta` part (a JSON string) of an attachments/upload request.

    The file streams to disk and the request fails with 413 as soon as it
    passes `max_upload_bytes`, so an upload of any size takes bounded memory.
    """
    if not request.content_type.startswith("multipart/"):
        raise SimError(400, "attachments/upload takes multipart/form-data with the parts file and meta")

    reader = await request.multipart()
    path = sim.blobs.new_temporary()
    meta: dict[str, Any] | None = None
    file_name: str | None = None
    try:
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise SimError(400, "attachments/upload takes a flat multipart/form-data body")
            if part.name == "meta":
                meta = parse_json_object(await read_small_part(part, MAX_META_BYTES))
            elif part.name == "file":
                # NOTE: the name MDR gives a file part without a file name is not known.
                file_name = form_file_name(part.filename) or "attachment.bin"
                await stream_part_to_file(part, path, sim.settings.max_upload_bytes)
    except BaseException:
        path.unlink(missing_ok=True)
        raise

    if meta is None or file_name is None:
        path.unlink(missing_ok=True)
        raise SimError(400, "attachments/upload needs both a file part and a meta part")
    return Upload(meta, file_name, path)


def form_file_name(raw: str | None) -> str:
    """Undo the escapes that browsers and Python's requests apply to a form file name: %22, %0D and %0A."""
    if not raw:
        return ""
    return raw.replace("%22", '"').replace("%0D", "\r").replace("%0A", "\n")


async def stream_part_to_file(part: BodyPartReader, path: Path, max_bytes: int) -> int:
    size = 0
    with path.open("wb") as handle:
        while chunk := await part.read_chunk(UPLOAD_CHUNK_BYTES):
            size += len(chunk)
            if size > max_bytes:
                raise SimError(413, f"the file is larger than the upload limit of {max_bytes} bytes")
            await asyncio.to_thread(handle.write, chunk)
    return size


async def read_small_part(part: BodyPartReader, max_bytes: int) -> bytes:
    data = bytearray()
    while chunk := await part.read_chunk(UPLOAD_CHUNK_BYTES):
        data.extend(chunk)
        if len(data) > max_bytes:
            raise SimError(400, f"the {part.name} part is larger than {max_bytes} bytes")
    return bytes(data)


def content_disposition(file_name: str) -> str:
    """Build an `attachment` Content-Disposition whose `filename*` carries any name, non-ASCII included."""
    fallback = "".join(ch if 32 <= ord(ch) < 127 and ch not in '"\\' else "_" for ch in file_name) or "attachment"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(file_name, safe='')}"


def visible_attachment(sim: MdrSimulator, connection: SimConnection, attachment_id: str) -> dict[str, Any]:
    for incident in sim._incidents.values():
        if incident.client_id != connection.client_id or not connection.sees_tenant(
            str(incident.record.get("tenant_name", ""))
        ):
            continue
        for attachment in incident.attachments:
            if attachment["attachment_id"] == attachment_id:
                return attachment
    raise SimError(404, f"attachment {attachment_id} not found")


def parse_json_object(data: bytes) -> dict[str, Any]:
    if not data.strip():
        return {}
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise SimError(400, "the request body is not valid JSON") from err
    if not isinstance(body, dict):
        raise SimError(400, "the request body must be a JSON object")
    return body
