"""Metrics and health checks on an optional HTTP port: `/metrics`, `/healthz`, `/readyz`.

The runner reports each cycle's end here. Metrics use the Prometheus text
format, written by hand because the set is small and fixed. The server
listens on loopback unless `observability.host` sets another address.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime

from aiohttp import web

from mdr_connector.connector.config import ObservabilitySettings, Settings
from mdr_connector.connector.errors import (
    ConfigError,
    ConnectionFatalError,
    ItemError,
    RateLimitedError,
    RetriableError,
)
from mdr_connector.connector.store import Store
from mdr_connector.connector.sync_common import SyncStats

log = logging.getLogger(__name__)

# Name, type and help text of every metric, in the order they are rendered.
METRICS = {
    "mdr_connector_cycles_total": ("counter", "Sync cycles run, by outcome."),
    "mdr_connector_items_synced_total": ("counter", "Items written to the other side, by kind and direction."),
    "mdr_connector_errors_total": ("counter", "Errors, by recovery class."),
    "mdr_connector_rate_limited_total": ("counter", "Cycles that ended on a 429 answer."),
    "mdr_connector_parked_items": ("gauge", "Items waiting for a retry."),
    "mdr_connector_cursor_lag_seconds": ("gauge", "Seconds between now and the MDR change cursor."),
    "mdr_connector_token_expiry_seconds": ("gauge", "Seconds until the MDR access or refresh token expires."),
    "mdr_connector_last_success_timestamp_seconds": ("gauge", "Unix time of the last cycle that succeeded."),
}

# SyncStats counters and the (kind, direction) they count.
SYNCED_COUNTERS = {
    "tickets_created": ("ticket", "mdr_to_ticket"),
    "tickets_updated": ("ticket_fields", "mdr_to_ticket"),
    "comments_to_ticket": ("comment", "mdr_to_ticket"),
    "comments_to_mdr": ("comment", "ticket_to_mdr"),
    "attachments_to_ticket": ("attachment", "mdr_to_ticket"),
    "attachments_to_mdr": ("attachment", "ticket_to_mdr"),
    "responses_shown": ("response", "mdr_to_ticket"),
    "response_decisions": ("response_decision", "ticket_to_mdr"),
    "statuses_to_ticket": ("status", "mdr_to_ticket"),
    "incidents_closed": ("status", "ticket_to_mdr"),
    "incidents_created": ("incident", "ticket_to_mdr"),
}

Labels = tuple[tuple[str, str], ...]


def error_class(err: BaseException) -> str:
    """Name the recovery class of an error, as the errors metric labels it."""
    if isinstance(err, ConnectionFatalError):
        return "fatal"
    if isinstance(err, ConfigError):
        return "config"
    if isinstance(err, RetriableError):
        return "retriable"
    if isinstance(err, ItemError):
        return "item"
    return "unexpected"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class MetricRegistry:
    """Counters and gauges keyed by metric name and labels."""

    def __init__(self) -> None:
        self._values: dict[str, dict[Labels, float]] = {name: {} for name in METRICS}

    def add(self, name: str, amount: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        series = self._values[name]
        series[key] = series.get(key, 0) + amount

    def set(self, name: str, value: float, **labels: str) -> None:
        self._values[name][tuple(sorted(labels.items()))] = value

    def value(self, name: str, **labels: str) -> float | None:
        return self._values[name].get(tuple(sorted(labels.items())))

    def render(self) -> str:
        lines = []
        for name, (kind, help_text) in METRICS.items():
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in sorted(self._values[name].items()):
                rendered = ",".join(f'{key}="{_escape(text)}"' for key, text in labels)
                lines.append(f"{name}{{{rendered}}} {_number(value)}" if rendered else f"{name} {_number(value)}")
        return "\n".join(lines) + "\n"


@dataclass
class ConnectionHealth:
    """Health of one connection: the inputs of its readiness check and the counters already reported."""

    interval_seconds: float
    running: bool = True
    last_success: float | None = None
    refresh_expires_at: datetime | None = None
    reported: dict[str, int] = field(default_factory=dict)


class Observer:
    """Metrics and readiness state, updated from the outcome of each cycle."""

    def __init__(self, settings: ObservabilitySettings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.metrics = MetricRegistry()
        self.clock = clock
        self.connections: dict[str, ConnectionHealth] = {}
        self.started_at = clock()
        # The base URL of the endpoints while they are served.
        self.url: str | None = None

    def connection(self, name: str, interval_seconds: float) -> ConnectionHealth:
        health = self.connections.get(name)
        if health is None:
            health = self.connections[name] = ConnectionHealth(interval_seconds)
        return health

    def cycle_succeeded(self, name: str, interval_seconds: float, stats: SyncStats) -> None:
        health = self.connection(name, interval_seconds)
        health.last_success = self.clock()
        self.metrics.add("mdr_connector_cycles_total", connection=name, outcome="success")
        self.metrics.set("mdr_connector_last_success_timestamp_seconds", health.last_success, connection=name)
        self._count_items(name, health, stats)

    def cycle_failed(self, name: str, interval_seconds: float, err: BaseException) -> None:
        self.connection(name, interval_seconds)
        self.metrics.add("mdr_connector_cycles_total", connection=name, outcome="failure")
        self.metrics.add("mdr_connector_errors_total", connection=name, **{"class": error_class(err)})
        if isinstance(err, RateLimitedError):
            self.metrics.add("mdr_connector_rate_limited_total", connection=name)

    def connection_stopped(self, name: str) -> None:
        health = self.connections.get(name)
        if health is not None:
            health.running = False

    def record_state(
        self,
        name: str,
        *,
        parked: int,
        cursor_ms: int | None,
        access_expires_at: datetime | None,
        refresh_expires_at: datetime | None,
    ) -> None:
        """Set the gauges read from the ledger and the token file after a cycle."""
        now = self.clock()
        self.metrics.set("mdr_connector_parked_items", parked, connection=name)
        if cursor_ms is not None:
            self.metrics.set("mdr_connector_cursor_lag_seconds", max(now - cursor_ms / 1000, 0), connection=name)
        for token, expires_at in (("access", access_expires_at), ("refresh", refresh_expires_at)):
            if expires_at is not None:
                self.metrics.set(
                    "mdr_connector_token_expiry_seconds", expires_at.timestamp() - now, connection=name, token=token
                )
        health = self.connections.get(name)
        if health is not None:
            health.refresh_expires_at = refresh_expires_at

    def _count_items(self, name: str, health: ConnectionHealth, stats: SyncStats) -> None:
        # SyncStats counters grow across cycles, so the metric adds only the increase since the last report.
        for counter, (kind, direction) in SYNCED_COUNTERS.items():
            total = getattr(stats, counter)
            delta = total - health.reported.get(counter, 0)
            health.reported[counter] = total
            if delta > 0:
                self.metrics.add("mdr_connector_items_synced_total", delta, connection=name, kind=kind, direction=direction)
        failures = stats.failures - health.reported.get("failures", 0)
        health.reported["failures"] = stats.failures
        if failures > 0:
            self.metrics.add("mdr_connector_errors_total", failures, connection=name, **{"class": "item"})

    def not_ready_reasons(self) -> list[str]:
        """Return the reasons the service is not ready, or an empty list when it is ready."""
        now = self.clock()
        reasons = []
        for name, health in sorted(self.connections.items()):
            if not health.running:
                reasons.append(f"connection {name} stopped")
                continue
            limit = self.settings.ready_cycles * health.interval_seconds
            since = now - (health.last_success if health.last_success is not None else self.started_at)
            if health.last_success is None and since > limit:
                reasons.append(f"connection {name} has not finished a cycle in {since:.0f} s")
            elif health.last_success is not None and since > limit:
                reasons.append(f"connection {name} last succeeded {since:.0f} s ago")
            if health.refresh_expires_at is not None and health.refresh_expires_at.timestamp() <= now:
                reasons.append(f"connection {name}: the MDR refresh token has expired")
        return reasons


def make_app(observer: Observer, store: Store) -> web.Application:
    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(text=observer.metrics.render(), content_type="text/plain", charset="utf-8")

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        reasons = list(observer.not_ready_reasons())
        try:
            await store.ping()
        except Exception as err:  # noqa: BLE001 - any database failure means not ready
            reasons.insert(0, f"database unreachable: {type(err).__name__}")
        if reasons:
            return web.json_response({"status": "not ready", "reasons": reasons}, status=503)
        return web.json_response({"status": "ready"})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


@contextlib.asynccontextmanager
async def serve_observability(settings: Settings, observer: Observer, store: Store) -> AsyncIterator[str | None]:
    """Serve the endpoints while the block runs and yield their base URL, or yield None when no port is set."""
    config = settings.observability
    if config.port is None:
        yield None
        return

    runner = web.AppRunner(make_app(observer, store), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    try:
        await site.start()
    except OSError as err:
        await runner.cleanup()
        raise ConfigError(
            f"observability.port {config.port} on {config.host} cannot be opened: {err.strerror or err}; "
            "pick a free port or remove observability.port"
        ) from err
    port = site._server.sockets[0].getsockname()[1] if site._server and site._server.sockets else config.port  # type: ignore[union-attr]
    url = f"http://{config.host}:{port}"
    log.info("observability.listening", extra={"url": url})
    observer.url = url
    try:
        yield url
    finally:
        observer.url = None
        await runner.cleanup()
