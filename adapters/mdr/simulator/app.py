"""The aiohttp application of the simulator: API dispatch and the `/_sim/` control routes,
plus `run_simulator`, `serve` and the `main` command line."""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import functools
import hashlib
import inspect
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from aiohttp import web

from mdr_connector.adapters.faults import FaultSettings, fault_middleware
from mdr_connector.adapters.loopback import run_until_signal, serve_on_loopback
from mdr_connector.adapters.mdr.simulator.blobs import write_filler
from mdr_connector.adapters.mdr.simulator.handlers import API_METHODS, parse_json_object
from mdr_connector.adapters.mdr.simulator.protocol import API_PREFIX, CONTROL_PREFIX, Params, SimError
from mdr_connector.adapters.mdr.simulator.state import MdrSimulator
from mdr_connector.connector.config import is_loopback_host

log = logging.getLogger(__name__)


# --- HTTP app ------------------------------------------------------------------


def error_response(status: int, message: str) -> web.Response:
    return web.json_response(error_body(status, message), status=status)


SIM_KEY = web.AppKey("mdr_simulator", MdrSimulator)


def dumps_utf8_or_ascii(data: Any) -> str:
    """Encode JSON as UTF-8 text, falling back to \\u escapes when a string cannot be UTF-8.

    A lone surrogate in a record passes json.dumps but fails when aiohttp
    encodes the body, which would turn the reply into a 500.
    """
    text = json.dumps(data, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(data, ensure_ascii=True)
    return text


@web.middleware
async def wire_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Count API calls and add the configured latency; `fault_middleware` injects the faults after it."""
    sim = request.app[SIM_KEY]
    if not request.path.startswith(API_PREFIX + "/"):
        return await handler(request)

    method = request.match_info.get("method", request.path)
    sim.call_counts[method] += 1
    if sim.request_hook is not None:
        sim.request_hook(method, request)
    if sim.settings.latency_seconds > 0:
        await asyncio.sleep(sim.settings.latency_seconds)
    return await handler(request)


def api_endpoint(request: web.Request) -> tuple[str, str] | None:
    """Name an API request by its HTTP method and API method, such as ("POST", "incidents/list")."""
    if not request.path.startswith(API_PREFIX + "/"):
        return None
    return request.method, request.match_info.get("method", request.path)


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"code": status, "message": message}


async def handle_api(request: web.Request) -> web.StreamResponse:
    sim = request.app[SIM_KEY]
    client_id = request.match_info["client_id"]
    method = request.match_info["method"]
    try:
        return await dispatch(sim, request, client_id, method)
    except SimError as err:
        return error_response(err.status, err.message)


async def dispatch(
    sim: MdrSimulator, request: web.Request, client_id: str, method: str
) -> web.StreamResponse:
    if method == "session/confirm":
        body = parse_json_object(await request.read())
        refresh_token = Params(body, {"refresh_token"}).required_string("refresh_token")
        return web.json_response(sim.confirm_session(client_id, refresh_token))

    api_method = API_METHODS.get(method)
    if api_method is None:
        raise SimError(404, f"unknown method {method}")

    connection = sim.authenticate(client_id, request.headers.get("Authorization"))
    # Responses time out on the simulator clock, so each call first declines those past their timeout.
    sim.expire_responses()
    body = {} if method == "attachments/upload" else parse_json_object(await request.read())
    result = await api_method(sim, connection, body, request)
    if isinstance(result, web.StreamResponse):
        return result
    return web.json_response(result, dumps=dumps_utf8_or_ascii)


# --- control API over HTTP -------------------------------------------------------


def control_routes() -> list[web.RouteDef]:
    return [
        web.get(f"{CONTROL_PREFIX}/state", control_state),
        web.get(f"{CONTROL_PREFIX}/session-confirms", control_session_confirms),
        web.get(f"{CONTROL_PREFIX}/settings", control_settings),
        web.patch(f"{CONTROL_PREFIX}/settings", control_settings),
        web.post(f"{CONTROL_PREFIX}/clock/advance", control_advance),
        web.post(f"{CONTROL_PREFIX}/clients", control_create_client),
        web.post(f"{CONTROL_PREFIX}/clients/{{client_id}}/console-token", control_console_token),
        web.get(f"{CONTROL_PREFIX}/clients/{{client_id}}/incidents", control_incidents),
        web.post(f"{CONTROL_PREFIX}/clients/{{client_id}}/incidents", control_seed_incident),
        web.post(f"{CONTROL_PREFIX}/clients/{{client_id}}/demo-incidents", control_seed_demo),
        web.patch(
            f"{CONTROL_PREFIX}/clients/{{client_id}}/incidents/{{incident_id}}", control_update_incident
        ),
        web.get(
            f"{CONTROL_PREFIX}/clients/{{client_id}}/incidents/{{incident_id}}/comments", control_comments
        ),
        web.post(
            f"{CONTROL_PREFIX}/clients/{{client_id}}/incidents/{{incident_id}}/comments", control_add_comment
        ),
        web.get(
            f"{CONTROL_PREFIX}/clients/{{client_id}}/incidents/{{incident_id}}/attachments", control_attachments
        ),
        web.post(
            f"{CONTROL_PREFIX}/clients/{{client_id}}/incidents/{{incident_id}}/attachments",
            control_add_attachment,
        ),
        web.get(
            f"{CONTROL_PREFIX}/clients/{{client_id}}/incidents/{{incident_id}}/responses", control_responses
        ),
        web.post(
            f"{CONTROL_PREFIX}/clients/{{client_id}}/incidents/{{incident_id}}/responses", control_add_response
        ),
        web.post(f"{CONTROL_PREFIX}/clients/{{client_id}}/assets", control_add_asset),
        web.post(f"{CONTROL_PREFIX}/clients/{{client_id}}/tenants", control_add_tenant),
        web.get(f"{CONTROL_PREFIX}/clients/{{client_id}}/history", control_history),
        web.post(f"{CONTROL_PREFIX}/faults/drop-reply", control_drop_reply),
        web.get(f"{CONTROL_PREFIX}/faults", control_faults),
        web.post(f"{CONTROL_PREFIX}/faults", control_faults),
        web.delete(f"{CONTROL_PREFIX}/faults", control_faults),
    ]


def control_handler(
    function: Callable[[MdrSimulator, web.Request, dict[str, Any]], Any],
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """Wrap a control function, plain or async: parse the JSON body, turn KeyError and ValueError into 404 and 400."""

    @functools.wraps(function)
    async def handler(request: web.Request) -> web.Response:
        sim = request.app[SIM_KEY]
        try:
            body = parse_json_object(await request.read()) if request.can_read_body else {}
            result = function(sim, request, body)
            if inspect.isawaitable(result):
                result = await result
            return web.json_response(result, dumps=dumps_utf8_or_ascii)
        except SimError as err:
            return error_response(err.status, err.message)
        except KeyError as err:
            return error_response(404, str(err.args[0]) if err.args else "not found")
        except (TypeError, ValueError) as err:
            return error_response(400, str(err))

    return handler


@control_handler
def control_state(sim: MdrSimulator, request: web.Request, body: dict[str, Any]) -> Any:
    return sim.state()


@control_handler
def control_session_confirms(sim: MdrSimulator, request: web.Request, body: dict[str, Any]) -> Any:
    return sim.confirms()


@control_handler
def control_settings(sim: MdrSimulator, request: web.Request, body: dict[str, Any]) -> Any:
    if request.method == "PATCH":
        sim.update_settings(**body)
    return asdict(sim.settings)


@control_handler
def control_advance(sim: MdrSimulator, request: web.Request, body: dict[str, Any]) -> Any:
    seconds = body.get("seconds", 0)
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        raise ValueError(f"seconds must be a number, got {json.dumps(seconds)[:80]}")
    return {"now_ms": sim.advance(seconds)}


@control_handler
def control_create_client(sim: MdrSimulator, request: web.Request, body: dict[str, Any]) -> Any:
    connection = sim.create_client(
        body.get("client_id"),
        connection_name=body.get("connection_name", "mdr-connector"),
        tenants=body.get("tenants"),
    )
    return {
        **asdict(connection),
        "console_token": sim.issue_console_token(connection.client_id, connection.connection_name),
    }


@control_handler
def control_console_token(sim: MdrSimulator, request: web.Request, body: dict[str, Any]) -> Any:
    client_id = request.match_info["client_id"]
    return {"refresh_token": sim.issue_console_token(client_id, body.get("connection_name"))}


@control_handler
def control_incidents(sim: MdrSimulator, request: web.Request, body: dict[str, Any]) -> Any:
    return sim.incidents(request.match_info["client_id"])


@control_handler
def control_seed_incident(sim: MdrSimulator, request: web.Request, body: dict[str, Any]) -> Any:
    return sim.seed_incident(request.match_info["client_id"], **body)


@control_handler
def control_seed_demo(sim: MdrSimulator, request: web.Request, body: dict[str, Any]) -> Any:
    return sim.seed_demo_incidents(request.match_info["client_id"], int(body.get("count", 12)))


@control_handler
def control_update_incident(sim: MdrSimulator, request: web.Request, body: dict[str, Any]) -> Any:
    return sim.update_incident(request.match_info["client_id"], request.match_info["incident_id"], **body)


@control_handler
def control_comments(sim: MdrSimulator, request: web.Request, body: dict[str, Any]) -> Any:
    return sim.comments(request.match_info["client_id"], request.match_info["incident_id"])


@control_handler
def control_add_comment(sim: MdrSimulator, request: web.Request, body: dict[str, Any]) -> Any:
    if not isinstance(body.get("text"), str):
        raise ValueError("text is required")
    return sim.add_soc_comment(
        request.match_info["client_id"],
        request.match_info["incident_id"],
        body["text"],
        author=body.get("author", "Kaspersky MDR SOC"),
    )


@control_handler
async def control_attachments(sim: MdrSimulator, request: web.Request, body: dict[str, Any]) -> Any:
    attachments = sim.attachments(request.match_info["client_id"], request.match_info["incident_id"])
    checksum = request.query.get("checksum")
    if checksum not in (None, "sha256"):
        raise ValueError(f"checksum must be sha256, got {checksum!r}")
    if checksum:
        for attachment in attachments:
            attachment["sha256"] = await asyncio.to_thread(file_sha256, sim.blobs.path(attachment["attachment_id"]))
    return attachments


@control_handler
async def control_add_attachment(sim: MdrSimulator, request: web.Request, body: dict[str, Any]) -> Any:
    client_id, incident_id = request.match_info["client_id"], request.match_info["incident_id"]
    full_name = body.get("full_name")
    if not isinstance(full_name, str) or not full_name:
        raise ValueError("full_name is required: the attachment's file name")
    content_keys = [key for key in ("text", "content_base64", "size") if key in body]
    if len(content_keys) != 1:
        raise ValueError("give exactly one of text, content_base64 or size (bytes of generated filler)")
    options = {key: body[key] for key in ("caption", "author", "origin") if key in body}
    for key, value in options.items():
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string")
    sim.incident(client_id, incident_id)

    # The bytes are written in a thread, so a large file does not stall the
    # server. The record is added on the event loop like every other change.
    path = sim.blobs.new_temporary()
    try:
        await asyncio.to_thread(write_attachment_source, path, content_keys[0], body[content_keys[0]])
        return sim.add_attachment(client_id, incident_id, full_name, source=path, **options)
    finally:
        path.unlink(missing_ok=True)


def write_attachment_source(path: Path, kind: str, value: Any) -> None:
    """Write the bytes of a control-API attachment: UTF-8 text, base64 content, or a size of filler."""
    if kind == "size":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"size must be an integer of 0 or more bytes, got {json.dumps(value)[:80]}")
        write_filler(path, value)
    elif kind == "text":
        if not isinstance(value, str):
            raise ValueError("text must be a string")
        path.write_bytes(value.encode("utf-8"))
    else:
        if not isinstance(value, str):
            raise ValueError("content_base64 must be a string")
        try:
            path.write_bytes(base64.b64decode(value, validate=True))
        except binascii.Error as err:
            raise ValueError(f"content_base64 is not valid base64: {err}") from err


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


@control_handler
def control_responses(sim: MdrSimulator, request: web.Request, body: dict[str, Any]) -> Any:
    return sim.responses(request.match_info["client_id"], request.match_info["incident_id"])


@control_handler
def control_add_response(sim: MdrSimulator, request: web.Request, body: dict[str, Any]) -> Any:
    return sim.add_response(request.match_info["client_id"], request.match_info["incident_id"], **body)


@control_handler
def control_add_asset(sim: MdrSimulator, request: web.Request, body: dict[str, Any]) -> Any:
    fields = dict(body)
    host_name = fields.pop("host_name", None)
    if not isinstance(host_name, str) or not host_name:
        raise ValueError("host_name is required")
    return sim.add_asset(request.match_info["client_id"], host_name, **fields)


@control_handler
def control_add_tenant(sim: MdrSimulator, request: web.Request, body: dict[str, Any]) -> Any:
    tenant_name = body.get("tenant_name")
    tenant_id = body.get("tenant_id")
    if not isinstance(tenant_name, str):
        raise ValueError("tenant_name is required")
    if tenant_id is not None and not isinstance(tenant_id, str):
        raise ValueError("tenant_id must be a string")
    return sim.add_tenant(request.match_info["client_id"], tenant_name, tenant_id)


@control_handler
def control_history(sim: MdrSimulator, request: web.Request, body: dict[str, Any]) -> Any:
    return sim.history(request.match_info["client_id"])


@control_handler
def control_drop_reply(sim: MdrSimulator, request: web.Request, body: dict[str, Any]) -> Any:
    method = body.get("method")
    times = body.get("times", 1)
    if not isinstance(method, str) or not method:
        raise ValueError("method is required: an API method such as attachments/upload")
    if isinstance(times, bool) or not isinstance(times, int):
        raise ValueError(f"times must be an integer, got {json.dumps(times)[:80]}")
    sim.drop_reply_after_commit(method, times)
    return {"method": method, "remaining": sim.drop_rules[method]}


@control_handler
def control_faults(sim: MdrSimulator, request: web.Request, body: dict[str, Any]) -> Any:
    if request.method == "POST":
        sim.faults.configure(body)
    elif request.method == "DELETE":
        sim.faults.clear()
    return sim.faults.to_json()


def make_app(sim: MdrSimulator) -> web.Application:
    """Build the aiohttp application serving the MDR API and the `/_sim/` control API."""
    app = web.Application(
        middlewares=[
            wire_middleware,
            fault_middleware(
                sim.faults,
                endpoint_of=api_endpoint,
                error_body=error_body,
                clock=sim.now,
                drop_exempt={"session/confirm"},
            ),
        ],
        client_max_size=sim.settings.max_upload_bytes + 1024 * 1024
    )
    app[SIM_KEY] = sim
    app.router.add_post(API_PREFIX + "/{client_id}/{method:.+}", handle_api)
    app.router.add_routes(control_routes())
    return app


@contextlib.asynccontextmanager
async def run_simulator(sim: MdrSimulator, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Serve `sim` on a loopback host:port (0 picks a free port) and yield the API base URL."""
    async with serve_on_loopback(make_app(sim), host, port) as url:
        yield f"{url}{API_PREFIX}"


async def serve(
    host: str = "127.0.0.1",
    port: int = 8480,
    *,
    client_id: str = "sim-client",
    connection_name: str = "mdr-connector",
    demo_incidents: int = 12,
    faults: FaultSettings | None = None,
) -> None:
    """Run a simulator with one client and demo incidents until SIGINT or SIGTERM, with `faults` as its fault plan."""
    sim = MdrSimulator()
    if faults is not None:
        sim.faults.configure(faults)
    sim.create_client(client_id, connection_name=connection_name)
    sim.seed_demo_incidents(client_id, demo_incidents)

    async def serve_until(stop: asyncio.Event) -> None:
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(sim.close)
            base_url = await stack.enter_async_context(run_simulator(sim, host, port))
            origin = base_url.removesuffix(API_PREFIX)
            token_url = f"{origin}{CONTROL_PREFIX}/clients/{client_id}/console-token"
            # The control route replies {"refresh_token": "eyJ..."}, and `token activate` takes only the token.
            extract = """python3 -c 'import json, sys; print(json.load(sys.stdin)["refresh_token"])'"""
            lines = [
                f"MDR simulator running at {base_url}",
                "Settings for the mdr section of a connection in config.yaml:",
                f"  base_url: {base_url}",
                f"  client_id: {client_id}",
                f"  connection_name: {connection_name}",
                "Get a console token (valid 24 hours, works once) and activate it. The reply is JSON,",
                "so keep only the value of refresh_token:",
                f"  curl -s -X POST {token_url} | {extract} > console-token.txt",
                "  mdr-connector token activate --token-file console-token.txt && rm console-token.txt",
                f"Control API under {origin}{CONTROL_PREFIX}/: see docs/simulators.md",
                "Stop with Ctrl-C.",
            ]
            print("\n".join(lines), flush=True)
            log.info("mdr_sim.started", extra={"url": base_url, "client_id": client_id})
            await stop.wait()

    await run_until_signal(serve_until)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mdr-connector simulate mdr", description="Run the MDR API simulator."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8480, help="TCP port to listen on (default 8480)")
    parser.add_argument("--client-id", default="sim-client", help="client id of the simulated customer")
    parser.add_argument("--connection-name", default="mdr-connector", help="connection name of the API token")
    parser.add_argument("--demo-incidents", type=int, default=12, help="number of demo incidents to seed")
    args = parser.parse_args(argv)
    if not is_loopback_host(args.host):
        parser.error(f"--host {args.host}: the simulator serves only loopback addresses; use 127.0.0.1 or ::1")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port}: expected a port number from 0 to 65535")
    asyncio.run(
        serve(
            args.host,
            args.port,
            client_id=args.client_id,
            connection_name=args.connection_name,
            demo_incidents=args.demo_incidents,
        )
    )
    return 0
