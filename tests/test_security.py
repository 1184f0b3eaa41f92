"""Security properties, each exercised end to end against the simulators and servers on loopback.

- secrets never reach logs, error messages or `check` output at DEBUG level;
- the MDR token file is owner-only, and a readable one is refused;
- TLS verification is on by default for every client, a custom CA bundle works,
  and an unknown CA fails before any request;
- no redirect carries credentials to another origin;
- attachment downloads go only to the configured MDR origin;
- YAML python tags are rejected in config and mapping files.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import stat
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from fixtures_mdr import MDR_CLIENT_ID, MDR_CONNECTION_NAME, make_jwt
from fixtures_redmine import RedmineServer
from fixtures_sync import SyncHarness
from fixtures_tls import KeyPair, ServeTls, TlsFiles

from mdr_connector.adapters.jira.adapter import JiraTicketAdapter
from mdr_connector.adapters.jira.simulator import SERVICE_EMAIL, JiraSimulator
from mdr_connector.adapters.jira.simulator import make_app as make_jira_app
from mdr_connector.adapters.mdr import client as mdr_client_module
from mdr_connector.adapters.mdr.client import MdrClient
from mdr_connector.adapters.mdr.simulator import API_PREFIX, MdrSimulator
from mdr_connector.adapters.mdr.simulator import make_app as make_mdr_app
from mdr_connector.adapters.mdr.tokens import TokenFileStore, TokenPair
from mdr_connector.adapters.redmine.client import RedmineClient
from mdr_connector.adapters.servicenow.client import ServiceNowClient
from mdr_connector.adapters.servicenow.simulator import (
    OAUTH_CLIENT_ID,
    OAUTH_CLIENT_SECRET,
    SERVICE_PASSWORD,
    SERVICE_USER,
    ServiceNowSimulator,
)
from mdr_connector.adapters.servicenow.simulator import make_app as make_servicenow_app
from mdr_connector.connector.config import (
    JiraSettings,
    MdrSettings,
    RedmineSettings,
    ServiceNowSettings,
    load_settings,
)
from mdr_connector.connector.errors import ConfigError, ConnectorError, RemoteUnavailableError
from mdr_connector.connector.mappingfile import load_mapping

SECRET_VARIABLE = "MDR_TEST_SECURITY_SECRET"
CREDENTIAL_HEADERS = ("authorization", "cookie", "x-redmine-api-key", "proxy-authorization")
REDMINE_USER = {"user": {"id": 7, "login": "mdr-connector", "firstname": "MDR", "lastname": "Connector"}}

ServePlain = Callable[[web.Application], Awaitable[str]]


@pytest.fixture
async def serve_plain() -> AsyncIterator[ServePlain]:
    """A function that serves an aiohttp app over plain HTTP on 127.0.0.1 and returns its base URL."""
    async with AsyncExitStack() as stack:

        async def serve(app: web.Application) -> str:
            runner = web.AppRunner(app, handle_signals=False, access_log=None)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            return f"http://127.0.0.1:{runner.addresses[0][1]}"

        yield serve


def recorder_app(requests: list[dict[str, str]], reply: Any = None) -> web.Application:
    """An app that records the headers of every request and returns `reply` as JSON (an empty object by default)."""

    async def record(request: web.Request) -> web.Response:
        requests.append({key.lower(): value for key, value in request.headers.items()})
        return web.json_response({} if reply is None else reply)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    return app


def echo_app(received: list[str]) -> web.Application:
    """An app that refuses every request with 401 and quotes the request's Authorization header in a Jira-style error."""

    async def reject(request: web.Request) -> web.Response:
        authorization = request.headers.get("Authorization", "")
        received.append(authorization)
        return web.json_response({"errorMessages": [f"the credentials {authorization} are not valid"]}, status=401)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", reject)
    return app


def redirect_app(target: str, status: int) -> web.Application:
    """An app that redirects every request to the same path on `target` and sets a session cookie."""

    async def redirect(request: web.Request) -> web.Response:
        response = web.Response(status=status, headers={"Location": f"{target}{request.path_qs}"})
        response.set_cookie("JSESSIONID", "canary-session-cookie")
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", redirect)
    return app


def secret_ref(monkeypatch: pytest.MonkeyPatch, value: str) -> dict[str, str]:
    monkeypatch.setenv(SECRET_VARIABLE, value)
    return {"env": SECRET_VARIABLE}


def saved_token_dir(folder: Path) -> Path:
    """A token folder with a valid pair stored for MDR_CLIENT_ID, so calls need no session/confirm first."""
    folder.mkdir(mode=0o700, exist_ok=True)
    pair = TokenPair.from_tokens(make_jwt(3600, "access"), make_jwt(7 * 86400, "refresh"), time.time())
    TokenFileStore(folder, MDR_CLIENT_ID).save(pair)
    return folder


# --- one call per client, for the TLS and redirect tests ---


async def call_mdr(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, console_token: str | None = None, **transport: Any
) -> None:
    """List incidents with a stored token pair, or first activate `console_token` when one is given."""
    settings = MdrSettings(
        base_url=url + API_PREFIX,
        client_id=MDR_CLIENT_ID,
        connection_name=MDR_CONNECTION_NAME,
        token_dir=saved_token_dir(tmp_path / "tokens"),
        timeout_seconds=10,
        **transport,
    )
    async with MdrClient(settings) as client:
        if console_token is not None:
            await client.tokens.activate(console_token)
        await client.list_incidents()


async def call_jira(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **transport: Any) -> None:
    from mdr_connector.adapters.jira.simulator import SERVICE_TOKEN

    auth = {"type": "api_token", "email": SERVICE_EMAIL, "token": secret_ref(monkeypatch, SERVICE_TOKEN)}
    settings = JiraSettings.model_validate(
        {"system": "jira", "url": url, "auth": auth, "deployment": "cloud", "timeout_seconds": 10, **transport}
    )
    adapter = JiraTicketAdapter(settings, "SEC")
    try:
        await adapter.open()
    finally:
        await adapter.close()


async def call_servicenow(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, oauth: bool = False, **transport: Any
) -> None:
    if oauth:
        secret = secret_ref(monkeypatch, OAUTH_CLIENT_SECRET)
        auth: dict[str, Any] = {
            "type": "oauth_client_credentials", "client_id": OAUTH_CLIENT_ID, "client_secret": secret, "username": SERVICE_USER,
        }
    else:
        auth = {"type": "basic", "username": SERVICE_USER, "password": secret_ref(monkeypatch, SERVICE_PASSWORD)}
    settings = ServiceNowSettings.model_validate(
        {"system": "servicenow", "url": url, "auth": auth, "timeout_seconds": 10, **transport}
    )
    client = ServiceNowClient(settings)
    try:
        await client.open()
        await client.get_row("security test", "incident", "0" * 32, "sys_id")
    finally:
        await client.close()


async def call_servicenow_oauth(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **transport: Any) -> None:
    await call_servicenow(url, tmp_path, monkeypatch, oauth=True, **transport)


async def call_redmine(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **transport: Any) -> None:
    settings = RedmineSettings.model_validate(
        {"system": "redmine", "url": url, "api_key": secret_ref(monkeypatch, "redmine-key-" + "7" * 24),
         "timeout_seconds": 10, **transport}
    )
    client = RedmineClient(settings)
    try:
        await client.open()
        await client.get("/users/current.json")
    finally:
        await client.close()


ClientCall = Callable[..., Awaitable[None]]
CLIENT_CALLS: dict[str, ClientCall] = {
    "mdr": call_mdr,
    "jira": call_jira,
    "servicenow": call_servicenow,
    "servicenow-oauth": call_servicenow_oauth,
    "redmine": call_redmine,
}


class TlsServer:
    """The real simulator of one system (a minimal fake for Redmine) served over TLS, with a request count."""

    def __init__(self, system: str) -> None:
        self.system = system
        self.redmine_requests: list[dict[str, str]] = []
        self.mdr = MdrSimulator(seed=3)
        self.mdr.create_client(MDR_CLIENT_ID, connection_name=MDR_CONNECTION_NAME)
        self.jira = JiraSimulator(deployment="cloud")
        self.servicenow = ServiceNowSimulator()

    def app(self) -> web.Application:
        if self.system == "mdr":
            return make_mdr_app(self.mdr)
        if self.system == "jira":
            return make_jira_app(self.jira)
        if self.system.startswith("servicenow"):
            return make_servicenow_app(self.servicenow)
        return recorder_app(self.redmine_requests, REDMINE_USER)

    async def call(self, url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **transport: Any) -> None:
        """Make this system's client call on `url`; the MDR client first activates a token this simulator issued."""
        if self.system == "mdr":
            transport["console_token"] = self.mdr.issue_console_token(MDR_CLIENT_ID)
        await CLIENT_CALLS[self.system](url, tmp_path, monkeypatch, **transport)

    def served(self) -> int:
        if self.system == "mdr":
            return sum(self.mdr.call_counts.values())
        if self.system == "jira":
            return sum(self.jira.calls.values())
        if self.system.startswith("servicenow"):
            return sum(self.servicenow.calls.values())
        return len(self.redmine_requests)

    def close(self) -> None:
        self.mdr.close()


@pytest.fixture(params=list(CLIENT_CALLS))
def tls_server(request: pytest.FixtureRequest) -> Iterator[TlsServer]:
    server = TlsServer(request.param)
    yield server
    server.close()


# --- canary secrets ---


async def run_cli(config: Path, *args: str, env: dict[str, str]) -> str:
    """Run the real CLI at DEBUG level and return its exit code, stdout and stderr as one text."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mdr_connector.connector.cli", "--config", str(config), "--log-level", "DEBUG", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "LANG": "C.UTF-8", **env},
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    return f"exit {process.returncode}\n{stdout.decode()}\n{stderr.decode()}"


def token_file_secrets(token_dir: Path) -> list[str]:
    path = token_dir / f"{MDR_CLIENT_ID}.json"
    if not path.exists():
        return []
    stored = json.loads(path.read_text(encoding="utf-8"))
    return [stored["access_token"], stored["refresh_token"]]


def canary_variants(secret: str) -> list[str]:
    """The secret and, for a JWT, its signature alone, so a token cut short in a text is caught too."""
    variants = [secret]
    if secret.count(".") == 2:
        variants.append(secret.rsplit(".", 1)[1])
    return variants


def ticket_document(system: str, url: str, secret: dict[str, str], redmine: RedmineServer | None) -> dict[str, Any]:
    if system == "jira":
        return {"system": "jira", "url": url, "auth": {"type": "api_token", "email": SERVICE_EMAIL, "token": secret},
                "search_delay_seconds": 0}
    if system == "jira-echo":
        return {"system": "jira", "url": url, "auth": {"type": "pat", "token": secret}, "deployment": "datacenter",
                "search_delay_seconds": 0}
    if system == "servicenow-oauth":
        return {"system": "servicenow", "url": url, "auth": {
            "type": "oauth_client_credentials", "client_id": OAUTH_CLIENT_ID, "client_secret": secret, "username": SERVICE_USER}}
    if system == "servicenow":
        return {"system": "servicenow", "url": url, "auth": {"type": "basic", "username": SERVICE_USER, "password": secret}}
    assert redmine is not None
    return {"system": "redmine", "url": redmine.url, "api_key": secret, "correlation_field": redmine.custom_field_name}


def write_cli_config(
    tmp_path: Path, mdr_url: str, ticket: dict[str, Any], *, level: str = "DEBUG"
) -> tuple[Path, Path]:
    """Write a config with one connection and return its path and the token folder."""
    token_dir = tmp_path / "tokens"
    token_dir.mkdir(mode=0o700, exist_ok=True)
    document = {
        "data_dir": str(tmp_path / "data"),
        "log": {"level": level, "format": "json"},
        "connections": [{
            "name": "main",
            "mdr": {"base_url": mdr_url, "client_id": MDR_CLIENT_ID, "connection_name": MDR_CONNECTION_NAME,
                    "token_dir": str(token_dir)},
            "ticket": ticket,
        }],
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(document), encoding="utf-8")
    return config, token_dir


def console_token_file(tmp_path: Path, mdr_sim: MdrSimulator) -> tuple[Path, str]:
    token = mdr_sim.issue_console_token(MDR_CLIENT_ID)
    path = tmp_path / "console-token"
    path.write_text(token, encoding="utf-8")
    os.chmod(path, 0o600)
    return path, token


def assert_no_canary(output: str, canaries: list[str]) -> None:
    assert '"level": "debug"' in output, "the CLI did not log at DEBUG"
    for canary in canaries:
        for variant in canary_variants(canary):
            assert variant not in output, f"a secret of {len(variant)} characters leaked"


async def test_mdr_tokens_absent_at_debug(
    tmp_path: Path, mdr_sim: MdrSimulator, mdr_url: str, serve_plain: ServePlain
) -> None:
    """No console, access or refresh token appears in CLI output at DEBUG, across several MDR failures."""
    jira_url = await serve_plain(make_jira_app(JiraSimulator(deployment="cloud")))
    ticket = ticket_document("jira", jira_url, {"env": SECRET_VARIABLE}, None)
    config, token_dir = write_cli_config(tmp_path, mdr_url, ticket)
    console_file, console_token = console_token_file(tmp_path, mdr_sim)
    env = {SECRET_VARIABLE: f"canary-jira-{secrets.token_hex(16)}"}

    canaries = [console_token]
    outputs = [await run_cli(config, "token", "activate", "--token-file", str(console_file), env=env)]
    canaries += token_file_secrets(token_dir)
    # MDR applies a call and drops the connection before replying.
    mdr_sim.drop_reply_after_commit("incidents/count")
    outputs.append(await run_cli(config, "check", env=env))
    # The access token expired, so the check refreshes the pair.
    mdr_sim.advance(2 * 3600)
    outputs.append(await run_cli(config, "check", env=env))
    canaries += token_file_secrets(token_dir)
    # The refresh token expired, and the console token was already used.
    mdr_sim.advance(8 * 86400)
    outputs.append(await run_cli(config, "sync", "--once", env=env))
    outputs.append(await run_cli(config, "token", "activate", "--token-file", str(console_file), env=env))

    everything = "\n".join(outputs)
    assert "is expired or was already used" in everything
    assert len(set(canaries)) == 5, "the test needs the console token and both pairs"
    assert_no_canary(everything, canaries)


@pytest.mark.parametrize("system", ["jira", "jira-echo", "servicenow", "servicenow-oauth", "redmine"])
async def test_ticket_secret_absent_at_debug(
    system: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    mdr_sim: MdrSimulator,
    mdr_url: str,
    serve_plain: ServePlain,
) -> None:
    """A ticket system secret that the system refuses appears in no `check` or `sync` output at DEBUG.

    "jira-echo" is a server that quotes the Bearer token in its error reply,
    so the CLI output shows the token unless the redaction removes it.
    """
    redmine = request.getfixturevalue("redmine_server") if system == "redmine" else None
    echoed: list[str] = []
    ticket_url = ""
    if system == "jira-echo":
        ticket_url = await serve_plain(echo_app(echoed))
    elif system == "jira":
        ticket_url = await serve_plain(make_jira_app(JiraSimulator(deployment="cloud")))
    elif system.startswith("servicenow"):
        ticket_url = await serve_plain(make_servicenow_app(ServiceNowSimulator()))
    ticket = ticket_document(system, ticket_url, {"env": SECRET_VARIABLE}, redmine)
    config, token_dir = write_cli_config(tmp_path, mdr_url, ticket)
    console_file, _console_token = console_token_file(tmp_path, mdr_sim)
    ticket_secret = f"canary-{system}-{secrets.token_hex(16)}"
    env = {SECRET_VARIABLE: ticket_secret}

    activated = await run_cli(config, "token", "activate", "--token-file", str(console_file), env=env)
    checked = await run_cli(config, "check", env=env)
    synced = await run_cli(config, "sync", "--once", env=env)

    assert activated.startswith("exit 0"), activated
    assert "[FAILED]" in checked
    assert not synced.startswith("exit 0"), synced
    if system == "jira-echo":
        assert f"Bearer {ticket_secret}" in echoed
        assert "the credentials Bearer [REDACTED] are not valid" in checked + synced
    assert_no_canary("\n".join([activated, checked, synced]), [ticket_secret, *token_file_secrets(token_dir)])


# --- token file permissions ---


async def test_readable_token_file_refused(tmp_path: Path, mdr_sim: MdrSimulator, mdr_url: str, serve_plain: ServePlain) -> None:
    """`token activate` writes a 0400 file, and `check` refuses one that group or others can read, naming the fix."""
    jira_url = await serve_plain(make_jira_app(JiraSimulator(deployment="cloud")))
    config, token_dir = write_cli_config(
        tmp_path, mdr_url, ticket_document("jira", jira_url, {"env": SECRET_VARIABLE}, None), level="INFO"
    )
    console_file, _console_token = console_token_file(tmp_path, mdr_sim)
    env = {SECRET_VARIABLE: "jira-secret-not-used-here"}
    token_file = token_dir / f"{MDR_CLIENT_ID}.json"

    activated = await run_cli(config, "token", "activate", "--token-file", str(console_file), env=env)
    assert activated.startswith("exit 0"), activated
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o400

    for mode in (0o440, 0o604):
        os.chmod(token_file, mode)
        checked = await run_cli(config, "check", env=env)
        assert not checked.startswith("exit 0"), checked
        assert f"the token file {token_file} can be read or written by group or others" in checked
        assert f"chmod 400 {token_file}" in checked
    assert mdr_sim.call_counts["incidents/count"] == 0

    os.chmod(token_file, 0o600)
    checked = await run_cli(config, "check", env=env)
    assert "[ok] MDR token is Active" in checked


# --- TLS ---


async def test_tls_default_store_fails_closed(
    tls_server: TlsServer, serve_tls: ServeTls, tls_files: TlsFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With default settings, a server certificate from an unknown CA fails before any request reaches it."""
    url = await serve_tls(tls_server.app(), tls_files.loopback)

    with pytest.raises(RemoteUnavailableError) as caught:
        await tls_server.call(url, tmp_path, monkeypatch)

    assert "the TLS certificate of 127.0.0.1 could not be verified" in str(caught.value)
    assert "set ca_bundle" in str(caught.value)
    assert tls_server.served() == 0


async def test_tls_unrelated_ca_fails_closed(
    tls_server: TlsServer, serve_tls: ServeTls, tls_files: TlsFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `ca_bundle` with a CA that did not sign the server certificate fails before any request."""
    url = await serve_tls(tls_server.app(), tls_files.loopback)

    with pytest.raises(RemoteUnavailableError) as caught:
        await tls_server.call(url, tmp_path, monkeypatch, ca_bundle=tls_files.unrelated_ca)

    assert "unable to get local issuer certificate" in str(caught.value)
    assert tls_server.served() == 0


async def test_tls_custom_ca_bundle_works(
    tls_server: TlsServer, serve_tls: ServeTls, tls_files: TlsFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `ca_bundle` with the throwaway CA that signed the server certificate lets the call through."""
    url = await serve_tls(tls_server.app(), tls_files.loopback)

    await tls_server.call(url, tmp_path, monkeypatch, ca_bundle=tls_files.ca)

    assert tls_server.served() >= 1


# --- redirects ---


@pytest.mark.parametrize("status", [302, 307, 308])
@pytest.mark.parametrize("other_origin", ["port", "host", "scheme"])
@pytest.mark.parametrize("system", list(CLIENT_CALLS))
async def test_redirect_carries_no_credentials(
    system: str,
    other_origin: str,
    status: int,
    serve_plain: ServePlain,
    serve_tls: ServeTls,
    tls_files: TlsFiles,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server that redirects every call to another origin gets the call refused, and that origin no credentials.

    "port" keeps the host 127.0.0.1 and changes the port. "host" names the
    second server as localhost, so host and port both differ. "scheme"
    serves the first server over TLS and redirects to plain http.
    """
    received: list[dict[str, str]] = []
    recorder_url = await serve_plain(recorder_app(received))
    if other_origin == "host":
        recorder_url = recorder_url.replace("127.0.0.1", "localhost")
    transport: dict[str, Any] = {}
    if other_origin == "scheme":
        origin_url = await serve_tls(redirect_app(recorder_url, status), tls_files.loopback)
        transport["ca_bundle"] = tls_files.ca
    else:
        origin_url = await serve_plain(redirect_app(recorder_url, status))

    with pytest.raises(ConnectorError):
        await CLIENT_CALLS[system](origin_url, tmp_path, monkeypatch, **transport)

    leaked = [
        sorted(name for name in headers if name in CREDENTIAL_HEADERS)
        for headers in received
        if any(name in CREDENTIAL_HEADERS for name in headers)
    ]
    assert leaked == []
    assert received == []


# --- attachment downloads ---


HOSTILE_LINKS = [
    "http://10.0.0.5/files/{name}",
    "http://192.168.1.20:8080/files/{name}",
    "http://169.254.169.254/latest/meta-data/{name}",
    "http://127.0.0.1:{listener}/files/{name}",
    "http://[::1]:{listener}/files/{name}",
    "https://localhost:{listener}/files/{name}",
]


async def test_attachment_links_never_contacted(
    harness: SyncHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attachments whose `link` names private, loopback and link-local addresses are fetched from the MDR origin only.

    The client downloads by attachment id from the configured base URL and
    never reads `link`. Every socket connect in the process is recorded, so
    the test sees that no address named in a link is dialled, and a listener
    on another loopback port accepts nothing.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    listener_port = listener.getsockname()[1]
    dialled: list[tuple[str, int]] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def record_connect(self: socket.socket, address: Any) -> Any:
        dialled.append((str(address[0]), int(address[1])) if isinstance(address, tuple) else (str(address), 0))
        return real_connect(self, address)

    def record_connect_ex(self: socket.socket, address: Any) -> Any:
        dialled.append((str(address[0]), int(address[1])) if isinstance(address, tuple) else (str(address), 0))
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", record_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", record_connect_ex)

    # The simulator names its own download URL in `link`, so the hostile
    # links are put into the attachments/list payload as the client parses it.
    hostile = {
        f"evidence-{index}.txt": link.format(name=f"evidence-{index}.txt", listener=listener_port)
        for index, link in enumerate(HOSTILE_LINKS)
    }
    real_parse = mdr_client_module.parse_attachment_page

    def parse_with_hostile_links(raw: list[Any], incident_id: str) -> Any:
        for record in raw:
            record["link"] = hostile[record["full_name"]]
        return real_parse(raw, incident_id)

    monkeypatch.setattr(mdr_client_module, "parse_attachment_page", parse_with_hostile_links)
    incident = harness.seed()
    for name in hostile:
        harness.mdr_sim.add_attachment(MDR_CLIENT_ID, incident["incident_id"], name, f"bytes of {name}".encode())

    try:
        await harness.cycles(2)
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()

    mdr_port = int(harness.connection.mdr.base_url.split(":")[2].split("/")[0])
    jira_port = int(harness.jira.url.rsplit(":", 1)[1])
    assert harness.mdr_sim.call_counts["attachments/download"] == len(HOSTILE_LINKS)
    issue = harness.issue_for(incident["incident_id"])
    copied = sorted(attachment.filename for attachment in issue.attachments)
    assert copied == sorted(hostile)
    assert dialled, "the test recorded no connect at all"
    assert {port for _host, port in dialled} <= {mdr_port, jira_port}
    assert {host for host, _port in dialled} <= {"127.0.0.1"}


# --- YAML tags ---


PYTHON_TAGS = [
    "!!python/object/apply:os.system ['touch {marker}']",
    "!!python/object/new:os.system ['touch {marker}']",
    "!!python/object:pathlib.Path {{}}",
    "!!python/name:os.system",
    "!!python/module:os",
    "!python/object/apply:os.system ['touch {marker}']",
]


@pytest.mark.parametrize("tag", PYTHON_TAGS)
def test_python_tag_in_config_rejected(tag: str, tmp_path: Path) -> None:
    """A config file with a python tag fails to load as invalid YAML, and the tagged call never runs."""
    marker = tmp_path / "marker"
    config = tmp_path / "config.yaml"
    config.write_text(f"data_dir: {tag.format(marker=marker)}\nconnections: []\n", encoding="utf-8")

    with pytest.raises(ConfigError) as caught:
        load_settings(config)

    assert str(config) in str(caught.value)
    assert "not valid YAML" in str(caught.value)
    assert not marker.exists()


@pytest.mark.parametrize("tag", PYTHON_TAGS)
def test_python_tag_in_mapping_rejected(tag: str, tmp_path: Path) -> None:
    """A mapping file with a python tag fails to load as invalid YAML, and the tagged call never runs."""
    marker = tmp_path / "marker"
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text(f"summary: {tag.format(marker=marker)}\n", encoding="utf-8")

    with pytest.raises(ConfigError) as caught:
        load_mapping(str(mapping))

    assert str(mapping) in str(caught.value)
    assert "not valid YAML" in str(caught.value)
    assert not marker.exists()
