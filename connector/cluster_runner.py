"""Cluster mode of `run` and of the commands that take a connection's lease.

The main task renews this instance's leases every `renew_seconds`. It
starts a task for each lease it acquires and cancels the task of each
lease it loses. A lease whose task ended (surplus beyond the share, or a
stopped connection) is handed back. Each connection task runs with its
fence as the current one, so its ledger transactions and remote writes
are checked against the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from sqlalchemy import event
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from mdr_connector.connector.config import ConnectionSettings, Settings
from mdr_connector.connector.errors import (
    ConfigError,
    ConnectionBusyError,
    ConnectionFatalError,
    ConnectorError,
    LeaseLostError,
)
from mdr_connector.connector.fencing import reset_fence
from mdr_connector.connector.i18n import N_
from mdr_connector.connector.leases import (
    Cluster,
    Fence,
    LeaseChanges,
    check_lease_in_transaction,
    default_instance_name,
    idle_timeout_seconds,
)
from mdr_connector.connector.observability import Observer
from mdr_connector.connector.runner import (
    ConnectionFactory,
    ConnectionOutcome,
    FailureStreak,
    run_cycle_until_stopped,
    wait_unless_stopped,
)
from mdr_connector.connector.store import Store

log = logging.getLogger(__name__)

# A connection stopped by a fatal error (expired token, refused
# credentials, a wrong token key) is handed back, and this instance does
# not take it again for this long: a person may fix it meanwhile.
FATAL_RETRY_SECONDS = 60.0
# How often a waiting connection task looks whether it is to hand its lease back.
RELEASE_POLL_SECONDS = 0.5
# Lease statements are single short UPDATEs; their sessions may idle inside a transaction this long.
LEASE_IDLE_TIMEOUT_SECONDS = 2
# How long a reacquired connection waits for the cancelled task of its lost lease.
PREVIOUS_TASK_WAIT_SECONDS = 5.0
# How often a command waiting with --wait tries again to take a lease that another instance holds.
COMMAND_POLL_SECONDS = 1.0
BUSY_IN_CLUSTER = N_(
    "connection {connection} is being synced by the mdr-connector instance {instance}; "
    "in cluster mode this command needs the connection's lease, so run it while no instance works "
    "the connection, or pass --wait SECONDS to wait for the lease"
)
DATABASE_ERRORS = (SQLAlchemyError, OSError, asyncio.TimeoutError)

# The task working each held connection, with its fence.
LeaseTasks = dict[str, tuple[asyncio.Task[ConnectionOutcome], Fence]]


def enable_fencing(store: Store) -> None:
    """Make every transaction of a connection task check its lease first."""
    if not event.contains(store.engine.sync_engine, "begin", check_lease_in_transaction):
        event.listen(store.engine.sync_engine, "begin", check_lease_in_transaction)


def lease_engine(store: Store) -> AsyncEngine:
    """Create a small engine of its own for lease statements.

    Under load every connection of the store's pool can be busy with ledger
    transactions, and a renewal queued behind them would let its lease run out.
    """
    # A stopped process must not keep a lease row locked by an unfinished renewal either.
    idle = {"idle_in_transaction_session_timeout": f"{LEASE_IDLE_TIMEOUT_SECONDS}s"}
    return create_async_engine(
        store.engine.url,
        pool_size=2,
        max_overflow=2,
        pool_pre_ping=True,
        connect_args={"server_settings": idle},
    )


async def join_cluster(settings: Settings, store: Store) -> Cluster:
    cluster = Cluster(
        lease_engine(store), settings.cluster, [connection.name for connection in settings.connections], owns_engine=True
    )
    await prepare_store(store, cluster.lease_seconds)
    await cluster.join()
    return cluster


async def prepare_store(store: Store, lease_seconds: float) -> None:
    """Fence the store's transactions, and let the server end a transaction left idle by a stalled process."""
    enable_fencing(store)
    timeout = idle_timeout_seconds(lease_seconds)

    def limit_idle_transactions(dbapi_connection: Any, _record: object) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"SET idle_in_transaction_session_timeout = '{timeout}s'")
        cursor.close()
        # The driver ran the SET in a transaction of its own; without the
        # commit, a first use that rolls back would undo it.
        dbapi_connection.commit()

    if not event.contains(store.engine.sync_engine, "connect", limit_idle_transactions):
        event.listen(store.engine.sync_engine, "connect", limit_idle_transactions)
    # Pooled connections opened before the listener have no limit yet.
    await store.engine.dispose()


async def run_cluster(
    settings: Settings, store: Store, factory: ConnectionFactory, stop: asyncio.Event, observer: Observer
) -> list[ConnectionOutcome]:
    """Take a fair share of the connections and work them until stopped."""
    cluster = await join_cluster(settings, store)
    await _renew(cluster)
    # Renewals run in a task of their own, so a slow acquisition or hand-back
    # never delays them past the leases' local deadlines.
    renewer = asyncio.create_task(keep_renewed(cluster))
    by_name = {connection.name: connection for connection in settings.connections}
    tasks: LeaseTasks = {}
    outcomes: list[ConnectionOutcome] = []
    try:
        while not stop.is_set():
            # After a stall, balancing can wait on rows that other instances
            # lock, so the local deadlines are checked before it as well.
            _stop_lost(tasks)
            changes = await _balance(cluster)
            _stop_lost(tasks)
            for fence in changes.acquired:
                previous = tasks.pop(fence.connection, None)
                work = work_leased(settings, by_name[fence.connection], store, factory, stop, observer, fence)
                task = asyncio.create_task(_after_previous(previous, work), name=fence.connection)
                tasks[fence.connection] = (task, fence)
            outcomes += await _hand_back_finished(cluster, tasks)
            await wait_unless_stopped(stop, cluster.renew_seconds)

        # The renewer keeps the leases while the cycles in progress finish.
        while tasks:
            _stop_lost(tasks)
            outcomes += await _hand_back_finished(cluster, tasks)
            if tasks:
                await asyncio.wait([task for task, _ in tasks.values()], timeout=cluster.renew_seconds)
    finally:
        for task, _ in tasks.values():
            task.cancel()
        await asyncio.gather(*(task for task, _ in tasks.values()), return_exceptions=True)
        renewer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewer
        with contextlib.suppress(*DATABASE_ERRORS):
            await cluster.leave()
        await cluster.close()
    return outcomes


async def _after_previous(
    previous: tuple[asyncio.Task[ConnectionOutcome], Fence] | None, work: Coroutine[Any, Any, ConnectionOutcome]
) -> ConnectionOutcome:
    """Let the cancelled task of a lost lease end, then work the reacquired lease."""
    if previous is not None:
        task, fence = previous
        fence.lost = True
        task.cancel()
        # Cancellation ends at the next await. A token refresh in flight
        # finishes shielded, and it locks the token row, not the ledger.
        try:
            await asyncio.wait([task], timeout=PREVIOUS_TASK_WAIT_SECONDS)
        except BaseException:
            work.close()
            raise
    return await work


async def _balance(cluster: Cluster) -> LeaseChanges:
    try:
        return await cluster.balance()
    except DATABASE_ERRORS as err:
        log.error("cluster.renewal.failed", extra={"instance": cluster.name, "error": f"{type(err).__name__}: {err}"})
        return LeaseChanges()


async def _renew(cluster: Cluster) -> None:
    try:
        await cluster.renew()
    except DATABASE_ERRORS as err:
        # Unrenewed leases lapse on their own, and _stop_lost stops their tasks.
        log.error("cluster.renewal.failed", extra={"instance": cluster.name, "error": f"{type(err).__name__}: {err}"})


def _stop_lost(tasks: LeaseTasks) -> None:
    for task, fence in tasks.values():
        if fence.remaining() <= 0:
            if not fence.lost:
                # After a stall this check can run before any renewal, which would log the loss otherwise.
                log.warning(
                    "cluster.lease.lost",
                    extra={"connection": fence.connection, "instance": fence.holder, "epoch": fence.epoch},
                )
            fence.lost = True
            task.cancel()


async def _hand_back_finished(cluster: Cluster, tasks: LeaseTasks) -> list[ConnectionOutcome]:
    outcomes = []
    for connection, (task, fence) in list(tasks.items()):
        if not task.done():
            continue

        del tasks[connection]
        if task.cancelled():
            outcomes.append(ConnectionOutcome(connection, None))
        else:
            outcomes.append(task.result())
        if fence.lost:
            cluster.forget(fence)
            continue
        if fence.avoid_seconds:
            cluster.avoid(connection, fence.avoid_seconds)
        try:
            await cluster.release(fence)
        except DATABASE_ERRORS as err:
            # The lease lapses on its own after lease_seconds.
            log.error("cluster.release.failed", extra={"connection": connection, "error": str(err)})
    return outcomes


async def work_leased(
    settings: Settings,
    connection: ConnectionSettings,
    store: Store,
    factory: ConnectionFactory,
    stop: asyncio.Event,
    observer: Observer,
    fence: Fence,
) -> ConnectionOutcome:
    """Cycle one connection while this instance holds its lease and is not asked to hand it back."""
    fence.use()
    streak = FailureStreak(connection.name)
    interval = connection.sync.interval_seconds
    observer.connection(connection.name, interval)

    def go_on() -> bool:
        return not stop.is_set() and not fence.release_requested

    try:
        while go_on():
            try:
                async with factory(settings, connection, store) as sync:
                    log.info("sync.connection.started", extra={"connection": connection.name, "epoch": fence.epoch})
                    while go_on():
                        delay = await run_cycle_until_stopped(sync, stop, streak, observer)
                        await wait_unless_released(stop, fence, delay)
                    log.info("sync.connection.stopped", extra={"connection": connection.name})
                    return ConnectionOutcome(connection.name, sync.stats)
            except LeaseLostError:
                raise
            except (ConnectionFatalError, ConfigError) as err:
                # The cause may be this instance's own (a wrong token key, a
                # missing secret file), so the lease goes back for another
                # instance to try, and this one stays away from it a while.
                log.error("sync.connection.fatal", extra={"connection": connection.name, "error": str(err)})
                observer.cycle_failed(connection.name, interval, err)
                fence.release_requested = True
                fence.avoid_seconds = max(FATAL_RETRY_SECONDS, interval)
                return ConnectionOutcome(connection.name, None)
            except ConnectorError as err:
                streak.failed(err)
                observer.cycle_failed(connection.name, interval, err)
                await wait_unless_released(stop, fence, interval)
        return ConnectionOutcome(connection.name, None)
    except LeaseLostError:
        # Not a failure of the instance: another instance works the connection now.
        fence.lost = True
        log.warning(
            "cluster.connection.lease_lost",
            extra={"connection": connection.name, "instance": fence.holder, "epoch": fence.epoch},
        )
        return ConnectionOutcome(connection.name, None)
    finally:
        observer.connection_stopped(connection.name)


async def wait_unless_released(stop: asyncio.Event, fence: Fence, seconds: float) -> None:
    """Wait `seconds`, ending early when the service stops or the lease is to be handed back."""
    deadline = time.monotonic() + seconds
    while not stop.is_set() and not fence.release_requested:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        await wait_unless_stopped(stop, min(remaining, RELEASE_POLL_SECONDS))


@contextlib.asynccontextmanager
async def leased_connection(
    settings: Settings, store: Store, connection: str, wait_seconds: float
) -> AsyncIterator[Fence]:
    """Hold one connection's lease for a command (`sync --once`, `resync`, `link`, `unlink`).

    The command does not join the cluster, so the running instances do not
    count it when they compute their shares. It waits up to `wait_seconds`
    for a lease that another instance holds, renews the lease while it
    runs, and hands it back at the end.
    """
    if not math.isfinite(wait_seconds) or wait_seconds < 0:
        raise ValueError(f"wait_seconds must be a finite number of seconds >= 0, got {wait_seconds}")
    name = f"{settings.cluster.instance_name or default_instance_name()}/command"
    cluster = Cluster(lease_engine(store), settings.cluster, [connection], name=name, owns_engine=True)
    await prepare_store(store, cluster.lease_seconds)

    deadline = time.monotonic() + wait_seconds
    while (fence := await cluster.acquire_one(connection)) is None:
        if time.monotonic() >= deadline:
            holder = await cluster.holder_of(connection)
            raise ConnectionBusyError.from_template(BUSY_IN_CLUSTER, connection=connection, instance=holder or "?")
        await asyncio.sleep(COMMAND_POLL_SECONDS)

    renewer = asyncio.create_task(keep_renewed(cluster))
    token = fence.use()
    try:
        yield fence
    finally:
        reset_fence(token)
        renewer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewer
        if not fence.lost:
            with contextlib.suppress(*DATABASE_ERRORS):
                await cluster.release(fence)
        await cluster.close()


async def keep_renewed(cluster: Cluster) -> None:
    """Renew the held leases every `renew_seconds` until cancelled."""
    while True:
        await asyncio.sleep(cluster.renew_seconds)
        await _renew(cluster)
