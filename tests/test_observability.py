"""Metrics, /healthz and /readyz: the registry, readiness rules, and the endpoints of a running service."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import aiohttp
import pytest
from fixtures_mdr import MDR_CLIENT_ID
from fixtures_sync import SyncHarness

from mdr_connector.connector.config import ObservabilitySettings
from mdr_connector.connector.errors import (
    ConfigError,
    InvalidPayloadError,
    RateLimitedError,
    RemoteUnavailableError,
    TokenExpiredError,
)
from mdr_connector.connector.observability import MetricRegistry, Observer, error_class
from mdr_connector.connector.runner import run_forever
from mdr_connector.connector.service import open_connection
from mdr_connector.connector.sync_common import SyncStats


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def test_render_is_prometheus_text() -> None:
    """Every metric has HELP and TYPE lines; labels are quoted and escaped."""
    registry = MetricRegistry()
    registry.add("mdr_connector_cycles_total", connection='a"b', outcome="success")
    registry.add("mdr_connector_cycles_total", connection='a"b', outcome="success")
    registry.set("mdr_connector_parked_items", 3, connection="main")

    text = registry.render()

    assert "# TYPE mdr_connector_cycles_total counter" in text
    assert 'mdr_connector_cycles_total{connection="a\\"b",outcome="success"} 2' in text
    assert 'mdr_connector_parked_items{connection="main"} 3' in text
    assert text.endswith("\n")


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (TokenExpiredError("expired"), "fatal"),
        (ConfigError("bad"), "config"),
        (RemoteUnavailableError("503"), "retriable"),
        (RateLimitedError("429", retry_after=5), "retriable"),
        (InvalidPayloadError("bad record"), "item"),
        (ZeroDivisionError(), "unexpected"),
    ],
)
def test_error_classes(error: BaseException, expected: str) -> None:
    """Errors are counted by their recovery class."""
    assert error_class(error) == expected


def test_items_are_counted_once() -> None:
    """The cumulative stats of a connection become counter increments, never counted twice."""
    observer = Observer(ObservabilitySettings(), Clock())
    stats = SyncStats(comments_to_ticket=2, attachments_to_mdr=1, failures=1)
    observer.cycle_succeeded("main", 60, stats)
    stats.comments_to_ticket = 5
    observer.cycle_succeeded("main", 60, stats)

    metrics = observer.metrics
    assert metrics.value("mdr_connector_items_synced_total", connection="main", kind="comment", direction="mdr_to_ticket") == 5
    assert metrics.value("mdr_connector_items_synced_total", connection="main", kind="attachment", direction="ticket_to_mdr") == 1
    assert metrics.value("mdr_connector_errors_total", connection="main", **{"class": "item"}) == 1
    assert metrics.value("mdr_connector_cycles_total", connection="main", outcome="success") == 2


def test_rate_limit_is_counted() -> None:
    observer = Observer(ObservabilitySettings(), Clock())
    observer.cycle_failed("main", 60, RateLimitedError("429", retry_after=30))

    assert observer.metrics.value("mdr_connector_rate_limited_total", connection="main") == 1
    assert observer.metrics.value("mdr_connector_errors_total", connection="main", **{"class": "retriable"}) == 1


def test_readiness_rules() -> None:
    """Ready after a good cycle; not ready when cycles stop succeeding, the refresh token expires or a connection stops."""
    clock = Clock()
    observer = Observer(ObservabilitySettings(ready_cycles=3), clock)
    observer.connection("main", 60)
    assert observer.not_ready_reasons() == []

    clock.now += 181
    assert observer.not_ready_reasons() == ["connection main has not finished a cycle in 181 s"]

    observer.cycle_succeeded("main", 60, SyncStats())
    assert observer.not_ready_reasons() == []

    expiry = datetime.fromtimestamp(clock.now, timezone.utc) + timedelta(seconds=10)
    observer.record_state("main", parked=0, cursor_ms=None, access_expires_at=None, refresh_expires_at=expiry)
    clock.now += 11
    assert observer.not_ready_reasons() == ["connection main: the MDR refresh token has expired"]

    observer.connection_stopped("main")
    assert observer.not_ready_reasons() == ["connection main stopped"]


def test_state_gauges() -> None:
    clock = Clock()
    observer = Observer(ObservabilitySettings(), clock)
    refresh = datetime.fromtimestamp(clock.now + 3600, timezone.utc)

    observer.record_state(
        "main", parked=2, cursor_ms=int((clock.now - 90) * 1000), access_expires_at=None, refresh_expires_at=refresh
    )

    assert observer.metrics.value("mdr_connector_parked_items", connection="main") == 2
    assert observer.metrics.value("mdr_connector_cursor_lag_seconds", connection="main") == pytest.approx(90)
    assert observer.metrics.value("mdr_connector_token_expiry_seconds", connection="main", token="refresh") == pytest.approx(3600)


async def test_endpoints_of_a_running_service(harness: SyncHarness) -> None:
    """The running service serves metrics with real counts, /healthz, and /readyz that turns ready after a cycle."""
    harness.seed()
    harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, harness.mdr_sim.incidents(MDR_CLIENT_ID)[0]["incident_id"], "<p>hi</p>")
    harness.settings = harness.settings.model_copy(update={"observability": ObservabilitySettings(port=0)})
    observer = Observer(harness.settings.observability)
    stop = asyncio.Event()
    service = asyncio.create_task(run_forever(harness.settings, harness.store, open_connection, stop, observer))
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(500):
                if observer.url and observer.metrics.value("mdr_connector_parked_items", connection="main") is not None:
                    break
                await asyncio.sleep(0.02)
            assert observer.url is not None

            async with session.get(f"{observer.url}/healthz") as reply:
                assert reply.status == 200
            async with session.get(f"{observer.url}/readyz") as reply:
                assert reply.status == 200, await reply.text()
            async with session.get(f"{observer.url}/metrics") as reply:
                text = await reply.text()

        assert 'mdr_connector_items_synced_total{connection="main",direction="mdr_to_ticket",kind="ticket"} 1' in text
        assert 'mdr_connector_items_synced_total{connection="main",direction="mdr_to_ticket",kind="comment"} 1' in text
        assert 'mdr_connector_token_expiry_seconds{connection="main",token="refresh"}' in text
        assert 'mdr_connector_parked_items{connection="main"} 0' in text
    finally:
        stop.set()
        await asyncio.wait_for(service, 30)


async def test_readyz_fails_without_database(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A database that cannot be reached makes /readyz return 503 with the reason."""
    harness.settings = harness.settings.model_copy(update={"observability": ObservabilitySettings(port=0)})
    observer = Observer(harness.settings.observability)

    async def unreachable() -> None:
        raise OSError("connection refused")

    monkeypatch.setattr(harness.store, "ping", unreachable)
    stop = asyncio.Event()
    service = asyncio.create_task(run_forever(harness.settings, harness.store, open_connection, stop, observer))
    try:
        for _ in range(500):
            if observer.url:
                break
            await asyncio.sleep(0.02)
        async with aiohttp.ClientSession() as session, session.get(f"{observer.url}/readyz") as reply:
            body = await reply.json()
        assert reply.status == 503
        assert body["reasons"][0] == "database unreachable: OSError"
    finally:
        stop.set()
        await asyncio.wait_for(service, 30)


async def test_port_in_use_is_a_clear_error(harness: SyncHarness) -> None:
    """A port that cannot be opened stops the start with the key and the fix."""
    blocker = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
    port = blocker.sockets[0].getsockname()[1]
    harness.settings = harness.settings.model_copy(update={"observability": ObservabilitySettings(port=port)})
    try:
        with pytest.raises(ConfigError, match=f"observability.port {port}"):
            await run_forever(harness.settings, harness.store, open_connection, asyncio.Event())
    finally:
        blocker.close()
        await blocker.wait_closed()
