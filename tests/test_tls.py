"""TLS verification of the MDR client and the Jira adapter, against both simulators served over TLS on loopback."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
import requests
from fixtures_jira import RunningJira, jira_settings
from fixtures_mdr import MDR_CLIENT_ID, MDR_CONNECTION_NAME
from fixtures_tls import SKIP_WITHOUT_OPENSSL, KeyPair, ServeTls, TlsFiles

from mdr_connector.adapters.jira.adapter import JiraTicketAdapter
from mdr_connector.adapters.jira.errors import map_error
from mdr_connector.adapters.jira.simulator import JiraSimulator
from mdr_connector.adapters.jira.simulator import make_app as make_jira_app
from mdr_connector.adapters.mdr.client import MdrClient
from mdr_connector.adapters.mdr.simulator import API_PREFIX, MdrSimulator
from mdr_connector.adapters.mdr.simulator import make_app as make_mdr_app
from mdr_connector.connector.config import MdrSettings
from mdr_connector.connector.errors import OutcomeUnknownError, RemoteUnavailableError

pytestmark = SKIP_WITHOUT_OPENSSL

TLS_DISABLED_EVENT = "http.tls_verification_disabled"


class MdrTarget:
    """The MDR simulator served over TLS. Each `connect` activates a console token and lists incidents."""

    system = "MDR"

    def __init__(self, serve_tls: ServeTls, sim: MdrSimulator, token_dir: Path) -> None:
        self.serve_tls = serve_tls
        self.sim = sim
        self.token_dir = token_dir
        self.url = ""

    async def serve(self, certificate: KeyPair) -> None:
        self.url = await self.serve_tls(make_mdr_app(self.sim), certificate) + API_PREFIX

    def settings(self, **transport: Any) -> MdrSettings:
        return MdrSettings(
            base_url=self.url,
            client_id=MDR_CLIENT_ID,
            connection_name=MDR_CONNECTION_NAME,
            token_dir=self.token_dir,
            timeout_seconds=10,
            **transport,
        )

    async def connect(self, **transport: Any) -> None:
        async with MdrClient(self.settings(**transport)) as client:
            await client.tokens.activate(self.sim.issue_console_token(MDR_CLIENT_ID))
            await client.list_incidents()

    def served(self) -> int:
        """Count the API requests the simulator received."""
        return sum(self.sim.call_counts.values())


class JiraTarget:
    """The Jira Cloud simulator served over TLS. Each `connect` opens the adapter, which reads serverInfo and myself."""

    system = "Jira"

    def __init__(self, serve_tls: ServeTls, monkeypatch: pytest.MonkeyPatch) -> None:
        self.serve_tls = serve_tls
        self.monkeypatch = monkeypatch
        self.sim = JiraSimulator(deployment="cloud")
        self.url = ""

    async def serve(self, certificate: KeyPair) -> None:
        self.url = await self.serve_tls(make_jira_app(self.sim), certificate)

    async def connect(self, **transport: Any) -> None:
        settings = jira_settings(RunningJira(self.sim, self.url), self.monkeypatch, **transport)
        adapter = JiraTicketAdapter(settings, "SEC")
        try:
            await adapter.open()
        finally:
            await adapter.close()

    def served(self) -> int:
        """Count the requests the simulator received."""
        return sum(self.sim.calls.values())


@pytest.fixture(params=["mdr", "jira"])
def target(
    request: pytest.FixtureRequest,
    serve_tls: ServeTls,
    mdr_sim: MdrSimulator,
    token_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> MdrTarget | JiraTarget:
    """Each side of a connection, served over TLS once the test calls `serve`."""
    if request.param == "mdr":
        return MdrTarget(serve_tls, mdr_sim, token_dir)
    return JiraTarget(serve_tls, monkeypatch)


def assert_unverified(error: BaseException, system: str, reason: str, fix: str) -> None:
    """Check that a certificate failure is one readable line naming the system, host, reason and fix."""
    message = str(error)
    assert isinstance(error, RemoteUnavailableError)
    assert message.startswith(f"{system} ")
    assert "the TLS certificate of 127.0.0.1 could not be verified" in message
    assert reason in message
    assert fix in message
    assert "\n" not in message


async def test_system_store_rejects_test_ca(target: MdrTarget | JiraTarget, tls_files: TlsFiles) -> None:
    """With default settings, a certificate from a CA outside the system store fails before any request."""
    await target.serve(tls_files.loopback)

    with pytest.raises(RemoteUnavailableError) as caught:
        await target.connect()

    assert_unverified(caught.value, target.system, "unable to get local issuer certificate", "set ca_bundle")
    assert target.served() == 0


async def test_ca_bundle_trusts_test_ca(target: MdrTarget | JiraTarget, tls_files: TlsFiles) -> None:
    """`ca_bundle` naming the CA that issued the server certificate lets the calls through."""
    await target.serve(tls_files.loopback)

    await target.connect(ca_bundle=tls_files.ca)

    assert target.served() >= 2


async def test_unrelated_ca_bundle_rejected(target: MdrTarget | JiraTarget, tls_files: TlsFiles) -> None:
    """`ca_bundle` naming a CA that did not issue the server certificate fails before any request."""
    await target.serve(tls_files.loopback)

    with pytest.raises(RemoteUnavailableError) as caught:
        await target.connect(ca_bundle=tls_files.unrelated_ca)

    assert_unverified(caught.value, target.system, "unable to get local issuer certificate", "set ca_bundle")
    assert target.served() == 0


async def test_wrong_host_rejected(target: MdrTarget | JiraTarget, tls_files: TlsFiles) -> None:
    """A certificate from the trusted CA but for another host name fails the host check."""
    await target.serve(tls_files.wrong_host)

    with pytest.raises(RemoteUnavailableError) as caught:
        await target.connect(ca_bundle=tls_files.ca)

    assert_unverified(
        caught.value, target.system, "IP address mismatch", "use a url with a host name that the certificate lists"
    )
    assert target.served() == 0


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
async def test_verify_off_warns_each_start(
    target: MdrTarget | JiraTarget, tls_files: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    """`tls_verify: false` reaches an untrusted server and logs one WARNING at each client start."""
    caplog.set_level(logging.WARNING)
    await target.serve(tls_files.wrong_host)

    await target.connect(tls_verify=False)
    first = [record for record in caplog.records if record.getMessage() == TLS_DISABLED_EVENT]
    await target.connect(tls_verify=False)
    both = [record for record in caplog.records if record.getMessage() == TLS_DISABLED_EVENT]

    assert target.served() >= 4
    assert len(first) == 1
    assert len(both) == 2
    assert [record.levelno for record in both] == [logging.WARNING, logging.WARNING]
    assert [getattr(record, "host", None) for record in both] == ["127.0.0.1", "127.0.0.1"]


async def test_mdr_api_call_rejects_test_ca(
    serve_tls: ServeTls, mdr_sim: MdrSimulator, token_dir: Path, tls_files: TlsFiles
) -> None:
    """An MDR API call with a stored token fails on an untrusted certificate just as session/confirm does."""
    target = MdrTarget(serve_tls, mdr_sim, token_dir)
    await target.serve(tls_files.loopback)
    await target.connect(ca_bundle=tls_files.ca)
    served = target.served()

    async with MdrClient(target.settings()) as client:
        with pytest.raises(RemoteUnavailableError) as caught:
            await client.list_incidents()

    assert_unverified(caught.value, "MDR", "unable to get local issuer certificate", "set ca_bundle")
    assert str(caught.value).startswith("MDR incidents/list failed: ")
    assert target.served() == served


async def test_jira_write_certificate_error(serve_tls: ServeTls, tls_files: TlsFiles) -> None:
    """A Jira write that fails the certificate check was never sent, so its outcome is known."""
    sim = JiraSimulator(deployment="cloud")
    url = await serve_tls(make_jira_app(sim), tls_files.loopback)

    def post_issue() -> requests.RequestException:
        with requests.Session() as session:
            session.trust_env = False
            try:
                session.post(f"{url}/rest/api/2/issue", json={}, verify=str(tls_files.unrelated_ca), timeout=10)
            except requests.RequestException as err:
                return err
        raise AssertionError("the request passed the certificate check")

    transport_error = await asyncio.to_thread(post_issue)
    error = map_error(transport_error, "create_ticket", write=True)

    assert_unverified(error, "Jira", "unable to get local issuer certificate", "set ca_bundle")
    assert not isinstance(error, OutcomeUnknownError)
    assert sum(sim.calls.values()) == 0
