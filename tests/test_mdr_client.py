"""The MDR client: error mapping (mocked transport) and behaviour against the simulator."""

from __future__ import annotations

import logging
import ssl
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aioresponses import aioresponses
from fixtures_mdr import MDR_CLIENT_ID, MDR_CONNECTION_NAME, MOCK_PREFIX, make_jwt
from mdr_connector.adapters.mdr.client import MdrClient, parse_retry_after
from mdr_connector.adapters.mdr.simulator import MdrSimulator
from mdr_connector.adapters.mdr.tokens import TokenFileStore, TokenPair
from mdr_connector.connector.config import MdrSettings
from mdr_connector.connector.errors import (
    ConfigError,
    CredentialsRejectedError,
    InvalidPayloadError,
    OutcomeUnknownError,
    RateLimitedError,
    RejectedError,
    RemoteUnavailableError,
    TokenExpiredError,
)
from mdr_connector.connector.http import create_session

@dataclass(frozen=True)
class Case:
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: str = '{"code": 500, "message": "internal error"}'
    exception: BaseException | None = None
    write: bool = False
    error: type[Exception] = RemoteUnavailableError
    status_attr: int | None = None
    retry_after: float | None = None


def connector_error() -> aiohttp.ClientConnectorError:
    key = aiohttp.client_reqrep.ConnectionKey("127.0.0.1", 9, False, True, None, None, None)
    return aiohttp.ClientConnectorError(key, ConnectionRefusedError(111, "Connection refused"))


ERROR_CASES = {
    "500 read": Case(status=500),
    "502 write": Case(status=502, write=True, error=OutcomeUnknownError),
    "503 retry-after": Case(status=503, headers={"Retry-After": "7"}, error=RateLimitedError, retry_after=7),
    "429 seconds": Case(status=429, headers={"Retry-After": "30"}, error=RateLimitedError, retry_after=30),
    "429 write": Case(status=429, write=True, error=RateLimitedError),
    "429 no header": Case(status=429, error=RateLimitedError),
    "400 read": Case(
        status=400, body='{"code": 400, "message": "bad"}', error=RejectedError, status_attr=400
    ),
    "404 write": Case(status=404, write=True, error=RejectedError, status_attr=404),
    "302 redirect": Case(
        status=302, headers={"Location": "http://127.0.0.1:9/elsewhere"}, error=RejectedError, status_attr=302
    ),
    "html read": Case(status=200, body="<html>proxy login</html>"),
    "html write": Case(status=200, body="<html>proxy login</html>", write=True, error=OutcomeUnknownError),
    "wrong shape write": Case(status=200, body='{"comment_id": 5}', write=True, error=OutcomeUnknownError),
    "wrong shape read": Case(status=200, body='{"incident_id": "x"}', error=InvalidPayloadError),
    "refused write": Case(exception=connector_error(), write=True),
    "disconnect read": Case(exception=aiohttp.ServerDisconnectedError()),
    "disconnect write": Case(
        exception=aiohttp.ServerDisconnectedError(), write=True, error=OutcomeUnknownError
    ),
    "timeout read": Case(exception=TimeoutError()),
    "timeout write": Case(exception=TimeoutError(), write=True, error=OutcomeUnknownError),
    "connect timeout write": Case(exception=aiohttp.ConnectionTimeoutError(), write=True),
}


@pytest.mark.parametrize("case", ERROR_CASES.values(), ids=ERROR_CASES.keys())
async def test_error_mapping(mocked_client: MdrClient, case: Case) -> None:
    """Each HTTP status, body or transport failure maps to the documented connector error."""
    path = "comments/create" if case.write else "incidents/details"
    with aioresponses() as mock:
        mock.post(
            f"{MOCK_PREFIX}/{path}",
            status=case.status or 200,
            body=case.body,
            headers=case.headers,
            exception=case.exception,
        )
        with pytest.raises(case.error) as caught:
            if case.write:
                await mocked_client.create_comment("inc-1", "text")
            else:
                await mocked_client.get_incident("inc-1")

    assert type(caught.value) is case.error
    if case.status_attr is not None:
        assert caught.value.status == case.status_attr
    if case.retry_after is not None:
        assert caught.value.retry_after == case.retry_after


AUTH_CASES = {
    "403 then 403": ([403, 403], 200, CredentialsRejectedError),
    "401 then 401": ([401, 401], 200, CredentialsRejectedError),
    "403 then refresh refused": ([403], 401, TokenExpiredError),
}


@pytest.mark.parametrize("statuses, confirm_status, error", AUTH_CASES.values(), ids=AUTH_CASES.keys())
async def test_auth_error_mapping(
    mocked_client: MdrClient, statuses: list[int], confirm_status: int, error: type[Exception]
) -> None:
    """A refused token is refreshed once; a second refusal or a refused refresh is fatal."""
    new_pair = {"access_token": make_jwt(3600, "access"), "refresh_token": make_jwt(86400, "refresh")}
    with aioresponses() as mock:
        for status in statuses:
            mock.post(
                f"{MOCK_PREFIX}/incidents/count", status=status, payload={"code": status, "message": "denied"}
            )
        mock.post(
            f"{MOCK_PREFIX}/session/confirm",
            status=confirm_status,
            payload=new_pair if confirm_status == 200 else {},
        )
        with pytest.raises(error):
            await mocked_client.count_incidents()

        sent = [key for key, calls in mock.requests.items() for _ in calls]

    assert [str(url).rsplit("/", 2)[-2:] for _, url in sent].count(["session", "confirm"]) == 1


async def test_auth_retry_succeeds(mocked_client: MdrClient) -> None:
    """A 403 followed by a refresh and a 200 returns the result of the retried call."""
    new_pair = {"access_token": make_jwt(3600, "access"), "refresh_token": make_jwt(86400, "refresh")}
    with aioresponses() as mock:
        mock.post(f"{MOCK_PREFIX}/incidents/count", status=403, payload={"code": 403, "message": "expired"})
        mock.post(f"{MOCK_PREFIX}/session/confirm", payload=new_pair)
        mock.post(f"{MOCK_PREFIX}/incidents/count", payload={"count": 4})

        count = await mocked_client.count_incidents()

    assert count == 4
    assert mocked_client.tokens.store.load().access_token == new_pair["access_token"]


async def test_retry_after_http_date(mocked_client: MdrClient) -> None:
    """A Retry-After HTTP-date is measured against the reply's Date header, not the local clock."""
    server_now = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(minutes=10)
    headers = {
        "Date": format_datetime(server_now, usegmt=True),
        "Retry-After": format_datetime(server_now + timedelta(seconds=90), usegmt=True),
    }
    with aioresponses() as mock:
        mock.post(
            f"{MOCK_PREFIX}/incidents/count",
            status=429,
            headers=headers,
            payload={"code": 429, "message": "slow down"},
        )
        with pytest.raises(RateLimitedError) as caught:
            await mocked_client.count_incidents()

    assert caught.value.retry_after == 90


@pytest.mark.parametrize(
    "value, date, expected",
    [
        ("120", None, 120.0),
        ("0", None, 0.0),
        ("Wed, 21 Oct 2026 07:28:00 GMT", "Wed, 21 Oct 2026 07:27:00 GMT", 60.0),
        ("Wed, 21 Oct 2026 07:28:00 GMT", "Wed, 21 Oct 2026 07:30:00 GMT", 0.0),
        ("Wed, 21 Oct 2026 07:28:00 GMT", None, 30.0),
        ("soon", None, None),
        ("-5", None, None),
        (None, None, None),
    ],
)
def test_parse_retry_after(value: str | None, date: str | None, expected: float | None) -> None:
    """Retry-After accepts delay-seconds and HTTP-dates, and yields None for junk."""
    local_now = datetime(2026, 10, 21, 7, 27, 30, tzinfo=timezone.utc).timestamp()

    assert parse_retry_after(value, date, now=local_now) == expected


async def test_malformed_incident_isolated(active_mdr_client: MdrClient, mdr_sim: MdrSimulator) -> None:
    """One malformed incident is reported in `malformed` while the rest of the page is kept."""
    good = mdr_sim.seed_incident(MDR_CLIENT_ID)
    bad = mdr_sim.seed_incident(MDR_CLIENT_ID, incident_number="K-17", summary=None)
    also_good = mdr_sim.seed_incident(MDR_CLIENT_ID)

    page = await active_mdr_client.list_incidents(sort="creation_time:asc")

    assert page.raw_count == 3
    assert [i.incident_id for i in page.items] == [good["incident_id"], also_good["incident_id"]]
    assert len(page.malformed) == 1
    assert page.malformed[0].record_id == bad["incident_id"]
    assert page.malformed[0].update_time == bad["update_time"]
    assert "incident_number" in page.malformed[0].error


async def test_get_incident_malformed(active_mdr_client: MdrClient, mdr_sim: MdrSimulator) -> None:
    """get_incident raises InvalidPayloadError naming the incident for a malformed record."""
    bad = mdr_sim.seed_incident(MDR_CLIENT_ID, update_time="yesterday")

    with pytest.raises(InvalidPayloadError, match=bad["incident_id"]):
        await active_mdr_client.get_incident(bad["incident_id"])


async def test_list_incidents_filters(active_mdr_client: MdrClient, mdr_sim: MdrSimulator) -> None:
    """Filters and paging arguments reach MDR under their wire names."""
    old = mdr_sim.seed_incident(MDR_CLIENT_ID, priority="HIGH", tenant_name="Retail EU")
    mdr_sim.advance(60)
    wanted = mdr_sim.seed_incident(MDR_CLIENT_ID, priority="HIGH", tenant_name="Retail EU")
    mdr_sim.seed_incident(MDR_CLIENT_ID, priority="LOW", tenant_name="Retail EU")
    mdr_sim.seed_incident(MDR_CLIENT_ID, priority="HIGH", status="Closed", tenant_name="Retail EU")

    page = await active_mdr_client.list_incidents(
        min_update_time=old["update_time"] + 1,
        statuses=["Open"],
        priorities=["HIGH"],
        tenants=["Retail EU"],
    )
    count = await active_mdr_client.count_incidents(statuses=["Open"], priorities=["HIGH"])
    second_page = await active_mdr_client.list_incidents(page=2, page_size=3)

    assert [i.incident_id for i in page.items] == [wanted["incident_id"]]
    assert count == 2
    assert second_page.raw_count == 1


async def test_comment_round_trip(active_mdr_client: MdrClient, mdr_sim: MdrSimulator) -> None:
    """create_comment converts Markdown and list_comments returns it with the connection as author."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
    mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident["incident_id"], "<p>Host isolated</p>", author="MDR SOC")

    created = await active_mdr_client.create_comment(incident["incident_id"], "Ticket **SEC-12** opened")
    comments = (await active_mdr_client.list_comments(incident["incident_id"])).items

    assert created.author_name == MDR_CONNECTION_NAME
    assert "<strong>SEC-12</strong>" in created.text
    assert [(c.author_name, c.origin) for c in comments] == [
        ("MDR SOC", "Service"),
        (MDR_CONNECTION_NAME, "Client"),
    ]
    assert comments[1].comment_id == created.comment_id


async def test_get_incident_unknown_id(active_mdr_client: MdrClient) -> None:
    """An unknown incident id maps to RejectedError with status 404."""
    with pytest.raises(RejectedError) as caught:
        await active_mdr_client.get_incident("no-such-incident-id0")

    assert caught.value.status == 404


async def test_refused_connection_is_unavailable(
    mdr_sim: MdrSimulator, tmp_path: Path, unused_tcp_port: int
) -> None:
    """A closed loopback port raises RemoteUnavailableError, for writes too."""
    settings = MdrSettings(
        base_url=f"http://127.0.0.1:{unused_tcp_port}/api/v1",
        client_id=MDR_CLIENT_ID,
        connection_name=MDR_CONNECTION_NAME,
        token_dir=tmp_path / "tokens",
    )
    TokenFileStore(settings.token_dir, MDR_CLIENT_ID).save(
        TokenPair.from_tokens(make_jwt(3600, "access"), make_jwt(86400, "refresh"), time.time())
    )

    async with MdrClient(settings) as client:
        with pytest.raises(RemoteUnavailableError):
            await client.create_comment("inc-1", "text")


async def test_tls_verify_off_warns(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    """A session with tls_verify false logs a WARNING each time it starts."""
    settings = MdrSettings(
        base_url="https://127.0.0.1:9/api/v1",
        client_id=MDR_CLIENT_ID,
        connection_name=MDR_CONNECTION_NAME,
        token_dir=tmp_path,
        tls_verify=False,
    )
    caplog.set_level(logging.WARNING)

    for _ in range(2):
        session = await create_session(settings, settings.base_url, service="mdr")
        await session.close()

    warnings = [r for r in caplog.records if r.getMessage() == "http.tls_verification_disabled"]
    assert len(warnings) == 2


async def test_missing_ca_bundle_is_config_error(tmp_path: Path) -> None:
    """An unreadable ca_bundle raises ConfigError naming the file."""
    bundle = tmp_path / "missing-ca.pem"
    settings = MdrSettings(
        base_url="https://127.0.0.1:9/api/v1",
        client_id=MDR_CLIENT_ID,
        connection_name=MDR_CONNECTION_NAME,
        token_dir=tmp_path,
        ca_bundle=bundle,
    )

    with pytest.raises(ConfigError, match=str(bundle)):
        await create_session(settings, settings.base_url, service="mdr")


async def test_session_verifies_tls_by_default(tmp_path: Path) -> None:
    """An https session verifies certificates and host names unless tls_verify is false."""
    settings = MdrSettings(
        base_url="https://127.0.0.1:9/api/v1",
        client_id=MDR_CLIENT_ID,
        connection_name=MDR_CONNECTION_NAME,
        token_dir=tmp_path,
    )

    session = await create_session(settings, settings.base_url, service="mdr")
    context: Any = session.connector._ssl  # type: ignore[union-attr]
    await session.close()

    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True


@pytest.mark.parametrize(
    "base_url, proxy, trust_env",
    [
        ("https://mdr.example.test/api/v1", None, True),
        ("https://mdr.example.test/api/v1", "http://127.0.0.1:3128", False),
        ("http://127.0.0.1:9/api/v1", None, False),
    ],
)
async def test_session_proxy_from_environment(
    tmp_path: Path, base_url: str, proxy: str | None, trust_env: bool
) -> None:
    """Proxy variables apply only without an explicit proxy and never to loopback hosts."""
    settings = MdrSettings(
        base_url=base_url,
        client_id=MDR_CLIENT_ID,
        connection_name=MDR_CONNECTION_NAME,
        token_dir=tmp_path,
        proxy=proxy,
    )

    session = await create_session(settings, settings.base_url, service="mdr")
    await session.close()

    assert session.trust_env is trust_env


@pytest.mark.parametrize("path", ["incidents/list", "incidents/details", "comments/create", "session/confirm"])
async def test_404_names_settings_to_check(mocked_client: MdrClient, path: str) -> None:
    """HTTP 404 on any path points at mdr.base_url and mdr.client_id, which are part of every URL."""
    with aioresponses() as mock:
        mock.post(f"{MOCK_PREFIX}/{path}", status=404, body="Not Found")
        with pytest.raises(RejectedError) as caught:
            if path == "incidents/list":
                await mocked_client.list_incidents()
            elif path == "incidents/details":
                await mocked_client.get_incident("inc-1")
            elif path == "comments/create":
                await mocked_client.create_comment("inc-1", "text")
            else:
                await mocked_client.confirm_session("refresh")

    message = str(caught.value)
    assert caught.value.status == 404
    assert message.startswith(f"MDR {path} returned HTTP 404 (not found)")
    assert message.endswith("a wrong mdr.base_url or mdr.client_id also gives 404, so check both")
    assert "\n" not in message


async def test_404_keeps_mdr_message(active_mdr_client: MdrClient) -> None:
    """A 404 from MDR keeps MDR's own text before the hint."""
    with pytest.raises(RejectedError) as caught:
        await active_mdr_client.get_incident("no-such-incident-id0")

    assert "incident no-such-incident-id0 not found; a wrong mdr.base_url" in str(caught.value)


async def test_rejected_token_log_fields(mocked_client: MdrClient, caplog: pytest.LogCaptureFixture) -> None:
    """Token log records carry the MDR connection name as mdr_connection_name, never as `connection`."""
    caplog.set_level(logging.INFO)
    new_pair = {"access_token": make_jwt(3600, "access"), "refresh_token": make_jwt(86400, "refresh")}
    with aioresponses() as mock:
        mock.post(f"{MOCK_PREFIX}/incidents/count", status=403, payload={"code": 403, "message": "expired"})
        mock.post(f"{MOCK_PREFIX}/session/confirm", payload=new_pair)
        mock.post(f"{MOCK_PREFIX}/incidents/count", payload={"count": 4})

        await mocked_client.count_incidents()

    records = {record.getMessage(): record for record in caplog.records}
    for event in ("mdr.request.token_rejected", "mdr.token.refreshed"):
        assert records[event].mdr_connection_name == MDR_CONNECTION_NAME
        assert records[event].client_id == MDR_CLIENT_ID
        assert not hasattr(records[event], "connection")


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ('{"code": 401, "message": "invalid refresh token"}', TokenExpiredError),
        ("", TokenExpiredError),
        ("<html><body>Access denied by the corporate proxy</body></html>", RemoteUnavailableError),
    ],
    ids=["json", "empty", "proxy-html"],
)
async def test_confirm_refusal_needs_mdr_reply(mocked_client: MdrClient, body: str, error: type[Exception]) -> None:
    """A 403 to session/confirm counts as a rejected token only when MDR itself sent it, not a proxy page."""
    with aioresponses() as mocked:
        mocked.post(f"{MOCK_PREFIX}/session/confirm", status=403, body=body)
        with pytest.raises(error):
            await mocked_client.confirm_session("eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjF9.c2ln")
