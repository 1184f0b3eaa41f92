"""Run connections: forever as a service, or one cycle for cron.

Each connection runs in its own task, holding its process lock. A fatal
error (expired refresh token, refused credentials) stops that connection
with one clear log line and leaves the others running. A failure streak is
logged when it starts and when it ends, not on every cycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from mdr_connector.connector.config import ConnectionSettings, Settings
from mdr_connector.connector.engine import ConnectionSync
from mdr_connector.connector.errors import (
    ConfigError,
    ConnectionBusyError,
    ConnectionFatalError,
    ConnectorError,
    RateLimitedError,
    failure_reason,
)
from mdr_connector.connector.locks import ConnectionLock
from mdr_connector.connector.observability import Observer, serve_observability
from mdr_connector.connector.store import Store
from mdr_connector.connector.sync_common import SyncStats

log = logging.getLogger(__name__)

# How long a cycle in progress may run on after SIGTERM before it is cancelled.
# Cancelling mid-write is safe: every write has a recorded intent.
SHUTDOWN_GRACE_SECONDS = 20.0
# The pause between cycles while an MDR backlog remains.
BACKLOG_PAUSE_SECONDS = 1.0

ConnectionFactory = Callable[[Settings, ConnectionSettings, Store], AbstractAsyncContextManager[ConnectionSync]]


@dataclass
class ConnectionOutcome:
    """The end of one connection's run: its stats, or the error that stopped it."""

    name: str
    stats: SyncStats | None
    failure: ConnectorError | None = None

    @property
    def error(self) -> str | None:
        return str(self.failure) if self.failure is not None else None

    @property
    def busy(self) -> bool:
        return isinstance(self.failure, ConnectionBusyError)


class FailureStreak:
    """Log the first failure of a streak and the recovery, not every failure in between."""

    def __init__(self, connection: str) -> None:
        self.connection = connection
        self.failures = 0

    def failed(self, err: BaseException) -> None:
        self.failures += 1
        if self.failures == 1:
            log.error(
                "sync.cycle.failing",
                extra={"connection": self.connection, "error": failure_reason(err)},
            )

    def succeeded(self) -> None:
        if self.failures:
            log.info("sync.cycle.recovered", extra={"connection": self.connection, "failed_cycles": self.failures})
        self.failures = 0


@contextlib.asynccontextmanager
async def held_lock(
    settings: Settings, connection: str, wait_seconds: float, store: Store | None = None
) -> AsyncIterator[None]:
    """Hold the connection for one command: its file lock, or in cluster mode its lease in the database."""
    if settings.cluster.enabled:
        from mdr_connector.connector.cluster_runner import leased_connection

        if store is None:
            raise ValueError("cluster mode needs the store to take a connection's lease")
        async with leased_connection(settings, store, connection, wait_seconds):
            yield
        return

    lock = ConnectionLock(settings.data_dir, connection)
    await lock.acquire(wait_seconds)
    try:
        yield
    finally:
        lock.release()


async def sync_once(
    settings: Settings,
    connections: list[ConnectionSettings],
    store: Store,
    factory: ConnectionFactory,
    *,
    wait_seconds: float = 0,
) -> list[ConnectionOutcome]:
    """Run one cycle of each connection, one after another."""
    outcomes = []
    for connection in connections:
        try:
            async with held_lock(settings, connection.name, wait_seconds, store), factory(
                settings, connection, store
            ) as sync:
                stats = await sync.run_cycle()
            outcomes.append(ConnectionOutcome(connection.name, stats))
        except ConnectionBusyError as err:
            log.warning("sync.connection.busy", extra={"connection": connection.name})
            outcomes.append(ConnectionOutcome(connection.name, None, err))
        except ConnectorError as err:
            log.error("sync.connection.failed", extra={"connection": connection.name, "error": str(err)})
            outcomes.append(ConnectionOutcome(connection.name, None, err))
    return outcomes


async def run_forever(
    settings: Settings,
    store: Store,
    factory: ConnectionFactory,
    stop: asyncio.Event | None = None,
    observer: Observer | None = None,
) -> list[ConnectionOutcome]:
    """Run every connection until SIGTERM/SIGINT, or until all of them stopped on fatal errors.

    With `observability.port` set, /metrics, /healthz and /readyz are served meanwhile.
    """
    stop = stop or asyncio.Event()
    observer = observer or Observer(settings.observability)
    async with serve_observability(settings, observer, store):
        if settings.cluster.enabled:
            from mdr_connector.connector.cluster_runner import run_cluster

            return await _with_signals(stop, run_cluster(settings, store, factory, stop, observer))
        return await _with_signals(stop, _run_connections(settings, store, factory, stop, observer))


async def _with_signals(stop: asyncio.Event, work: Awaitable[list[ConnectionOutcome]]) -> list[ConnectionOutcome]:
    """Await `work` with SIGTERM and SIGINT setting `stop`."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    try:
        return await work
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signum)


async def _run_connections(
    settings: Settings, store: Store, factory: ConnectionFactory, stop: asyncio.Event, observer: Observer
) -> list[ConnectionOutcome]:
    tasks = [
        asyncio.create_task(
            work_connection(settings, connection, store, factory, stop, observer), name=connection.name
        )
        for connection in settings.connections
    ]
    return list(await asyncio.gather(*tasks))


async def work_connection(
    settings: Settings,
    connection: ConnectionSettings,
    store: Store,
    factory: ConnectionFactory,
    stop: asyncio.Event,
    observer: Observer | None = None,
) -> ConnectionOutcome:
    """Cycle one connection every interval until stopped; retry opening it while either side is unreachable."""
    observer = observer or Observer(settings.observability)
    streak = FailureStreak(connection.name)
    interval = connection.sync.interval_seconds
    observer.connection(connection.name, interval)
    try:
        return await _work_connection(settings, connection, store, factory, stop, observer, streak)
    finally:
        observer.connection_stopped(connection.name)


async def _work_connection(
    settings: Settings,
    connection: ConnectionSettings,
    store: Store,
    factory: ConnectionFactory,
    stop: asyncio.Event,
    observer: Observer,
    streak: FailureStreak,
) -> ConnectionOutcome:
    interval = connection.sync.interval_seconds
    try:
        async with held_lock(settings, connection.name, 0):
            while not stop.is_set():
                try:
                    async with factory(settings, connection, store) as sync:
                        log.info("sync.connection.started", extra={"connection": connection.name})
                        while not stop.is_set():
                            delay = await run_cycle_until_stopped(sync, stop, streak, observer)
                            await wait_unless_stopped(stop, delay)
                        log.info("sync.connection.stopped", extra={"connection": connection.name})
                        return ConnectionOutcome(connection.name, sync.stats)
                except (ConnectionFatalError, ConfigError):
                    raise
                except ConnectorError as err:
                    # Opening failed (MDR or the ticket system unreachable, a
                    # 5xx on the first call): try again after one interval.
                    streak.failed(err)
                    observer.cycle_failed(connection.name, interval, err)
                    await wait_unless_stopped(stop, interval)
            log.info("sync.connection.stopped", extra={"connection": connection.name})
            return ConnectionOutcome(connection.name, None)
    except (ConnectionFatalError, ConfigError) as err:
        # A config problem (a missing secret, an unreadable file) does not go
        # away by waiting, so it stops the connection like a fatal error.
        log.error("sync.connection.fatal", extra={"connection": connection.name, "error": str(err)})
        return ConnectionOutcome(connection.name, None, err)


async def wait_unless_stopped(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


async def run_cycle_until_stopped(
    sync: ConnectionSync, stop: asyncio.Event, streak: FailureStreak, observer: Observer | None = None
) -> float:
    """Run one cycle; on stop, give it a grace period, then cancel it. Return the delay before the next one."""
    interval = sync.settings.sync.interval_seconds
    cycle = asyncio.create_task(sync.run_cycle())
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({cycle, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not cycle.done():
            log.info("sync.cycle.finishing", extra={"connection": sync.name, "grace_seconds": SHUTDOWN_GRACE_SECONDS})
            await asyncio.wait({cycle}, timeout=SHUTDOWN_GRACE_SECONDS)
        if not cycle.done():
            cycle.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await cycle
            return 0
        cycle.result()
    except ConnectionFatalError as err:
        if observer is not None:
            observer.cycle_failed(sync.name, interval, err)
        raise
    except RateLimitedError as err:
        streak.failed(err)
        if observer is not None:
            observer.cycle_failed(sync.name, interval, err)
        return max(interval, err.retry_after or 0)
    except ConnectorError as err:
        streak.failed(err)
        if observer is not None:
            observer.cycle_failed(sync.name, interval, err)
        return interval
    except Exception as err:  # noqa: BLE001 - a bug in one cycle must not end the service
        log.exception("sync.cycle.crashed", extra={"connection": sync.name})
        streak.failed(err)
        if observer is not None:
            observer.cycle_failed(sync.name, interval, err)
        return interval
    finally:
        stopping.cancel()
        # Cancelled from outside (its lease lost in cluster mode): the cycle stops too.
        if not cycle.done():
            cycle.cancel()
        elif not cycle.cancelled():
            # A cycle that failed just as this wait was cancelled counts as seen,
            # so asyncio logs no "Task exception was never retrieved" for it.
            cycle.exception()

    streak.succeeded()
    if observer is not None:
        observer.cycle_succeeded(sync.name, interval, sync.stats)
        await report_state(sync, observer)
    if sync.backlog_remaining:
        # A first sync or a burst left MDR changes unread: the next cycle
        # starts almost at once, and the pause keeps a bug from spinning.
        return min(interval, BACKLOG_PAUSE_SECONDS)
    return interval


async def report_state(sync: ConnectionSync, observer: Observer) -> None:
    """Read the gauges a cycle leaves behind: parked items, the cursor, the token expiry times."""
    try:
        parked = await sync.store.count_parked(sync.name)
        cursor = await sync.mdr_cursor_value()
    except Exception:  # noqa: BLE001 - metrics must never fail the connection
        log.warning("observability.state_unreadable", extra={"connection": sync.name}, exc_info=True)
        return
    tokens = getattr(sync.mdr, "tokens", None)
    try:
        status = await tokens.read_status() if tokens is not None else None
    except Exception:  # noqa: BLE001 - metrics must never fail the connection
        log.warning("observability.token_unreadable", extra={"connection": sync.name}, exc_info=True)
        status = None
    observer.record_state(
        sync.name,
        parked=parked,
        cursor_ms=cursor,
        access_expires_at=status.access_expires_at if status else None,
        refresh_expires_at=status.refresh_expires_at if status else None,
    )
