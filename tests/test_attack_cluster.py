"""Attacks on cluster mode: leases, fencing and the cluster loop on PostgreSQL, with fake connections."""

from __future__ import annotations

import asyncio
import time
import contextlib
import contextvars
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import select, text
from test_leases import lease_rows, store  # noqa: F401 - the fixture is used by name

from mdr_connector.connector import leases
from mdr_connector.connector.cluster_runner import leased_connection, run_cluster
from mdr_connector.connector.config import ClusterSettings, SecretRef, Settings
from mdr_connector.connector.errors import ConfigError
from mdr_connector.connector.fencing import reset_fence
from mdr_connector.connector.leases import Cluster
from mdr_connector.connector.observability import Observer
from mdr_connector.connector.store import Store
from mdr_connector.connector.sync_common import SyncStats

# Generous: these deadlines only bound a wait for something that should happen much sooner.
DEADLINE_SECONDS = 30.0


def cluster_settings(name: str | None, takeover_seconds: float = 30) -> ClusterSettings:
    return ClusterSettings(
        enabled=True, instance_name=name, takeover_seconds=takeover_seconds, token_key=SecretRef(env="UNUSED")
    )


def settings_for(
    tmp_path: Path, names: list[str], instance: str | None, takeover_seconds: float = 3, interval_seconds: float = 0.05
) -> Settings:
    connection = {
        "mdr": {"client_id": "c1", "connection_name": "n", "token_dir": str(tmp_path / "tokens")},
        "ticket": {
            "system": "jira",
            "url": "https://jira.example.com",
            "auth": {"type": "pat", "token": {"env": "UNUSED"}},
        },
        "sync": {"interval_seconds": interval_seconds},
    }
    return Settings.model_validate(
        {
            "data_dir": str(tmp_path),
            # Only checked for its form: the tests pass their scratch store to run_cluster directly.
            "database_url": "postgresql+asyncpg://postgres@127.0.0.1:5432/unused",
            "cluster": {
                "enabled": True,
                "instance_name": instance,
                "takeover_seconds": takeover_seconds,
                "token_key": {"env": "UNUSED"},
            },
            "connections": [{"name": name, **connection} for name in names],
        }
    )


class CountingSync:
    """A stand-in for ConnectionSync whose cycles only count themselves."""

    def __init__(self, connection: Any, store: Store, cycles: dict[str, int]) -> None:
        self.settings = connection
        self.name = connection.name
        self.stats = SyncStats()
        self.backlog_remaining = False
        self.store = store
        self.mdr = None
        self.cycles = cycles

    async def run_cycle(self) -> SyncStats:
        self.cycles[self.name] = self.cycles.get(self.name, 0) + 1
        return self.stats

    async def mdr_cursor_value(self) -> None:
        return None


def counting_factory(cycles: dict[str, int]) -> Callable[..., Any]:
    @contextlib.asynccontextmanager
    async def factory(settings: Settings, connection: Any, store: Store) -> AsyncIterator[CountingSync]:
        yield CountingSync(connection, store, cycles)

    return factory


async def wait_until(condition: Callable[[], bool], deadline: float = DEADLINE_SECONDS) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while loop.time() < end:
        if condition():
            return True
        await asyncio.sleep(0.05)
    return condition()


# The cluster loop


async def test_acquire_error_orphans_no_lease(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dropped database connection while taking leases leaves no held lease without a task."""
    names = ["alpha", "bravo", "charlie"]
    settings = settings_for(tmp_path, names, "solo")
    original = Cluster._try_acquire
    calls = 0

    async def flaky_try_acquire(self: Cluster, connection: str) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError("connection reset by peer (simulated)")
        return await original(self, connection)

    monkeypatch.setattr(Cluster, "_try_acquire", flaky_try_acquire)
    cycles: dict[str, int] = {}
    stop = asyncio.Event()
    observer = Observer(settings.observability)
    runner = asyncio.create_task(run_cluster(settings, store, counting_factory(cycles), stop, observer))
    try:
        worked = await wait_until(lambda: all(cycles.get(name, 0) > 0 for name in names))
        rows = await lease_rows(store)
    finally:
        stop.set()
        await asyncio.wait_for(runner, DEADLINE_SECONDS)

    assert sorted(row.holder for row in rows.values()) == ["solo", "solo", "solo"]
    assert worked, f"connections held but never worked: {sorted(set(names) - set(cycles))}"


# Taking leases


async def test_acquire_skips_live_leases(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """An instance below its share does not wait for the row locks of leases that other instances hold."""
    connections = ["alpha", "bravo", "charlie"]
    busy = Cluster(store.engine, cluster_settings("busy", takeover_seconds=3), connections)
    await busy.join()
    busy_fences = (await busy.tick()).acquired
    assert len(busy_fences) == 3

    lock_waits: list[str] = []
    original = leases.is_lock_timeout

    def counting_is_lock_timeout(err: Any) -> bool:
        timed_out = original(err)
        if timed_out:
            lock_waits.append(str(err.orig))
        return timed_out

    monkeypatch.setattr(leases, "is_lock_timeout", counting_is_lock_timeout)

    # A second instance joins: its share is 2 of 3, every lease is held and live.
    idle = Cluster(store.engine, cluster_settings("idle", takeover_seconds=3), connections)
    await idle.join()
    fence = busy_fences[0]
    token = fence.use()
    try:
        async with store.engine.begin() as fenced:
            # The holder is inside a ledger transaction of that connection.
            await fenced.execute(select(1))
            taken = await asyncio.create_task(idle.tick(), context=contextvars.Context())
    finally:
        reset_fence(token)

    assert taken.acquired == []
    assert lock_waits == [], "the idle instance waited for the row lock of a live lease"


async def test_expired_lease_still_taken(store: Store) -> None:
    """A lease whose holder stopped renewing is taken over by an instance below its share."""
    connections = ["alpha"]
    old = Cluster(store.engine, cluster_settings("old", takeover_seconds=3), connections)
    await old.join()
    (old_fence,) = (await old.tick()).acquired
    new = Cluster(store.engine, cluster_settings("new", takeover_seconds=3), connections)
    await new.join()

    async with store.engine.begin() as database:
        await database.execute(
            text("UPDATE leases SET expires_at = now() - interval '1 hour' WHERE connection = 'alpha'")
        )
    (new_fence,) = (await new.tick()).acquired
    assert new_fence.epoch == old_fence.epoch + 1


# Names


async def test_longest_instance_name_in_command(store: Store, tmp_path: Path) -> None:
    """A command takes a lease under the longest instance name that the configuration accepts."""
    longest = "n" * 190
    settings = settings_for(tmp_path, ["alpha"], longest)
    async with leased_connection(settings, store, "alpha", 0) as fence:
        assert fence.holder == f"{longest}/command"

    with pytest.raises(ValidationError):
        settings_for(tmp_path, ["alpha"], "n" * 191)


# The database drops every session


class LedgerSync(CountingSync):
    """A CountingSync whose cycles write the ledger, so each one passes the lease check of the `begin` hook."""

    async def run_cycle(self) -> SyncStats:
        await self.store.set_cursor(self.name, "mdr", str(self.cycles.get(self.name, 0)))
        return await super().run_cycle()


def ledger_factory(cycles: dict[str, int]) -> Callable[..., Any]:
    @contextlib.asynccontextmanager
    async def factory(settings: Settings, connection: Any, store: Store) -> AsyncIterator[CountingSync]:
        yield LedgerSync(connection, store, cycles)

    return factory


async def terminate_sessions(store: Store) -> int:
    """End every other session on the scratch database, as a server restart would."""
    import asyncpg

    from fixtures_postgres import POSTGRES_ADMIN_URL

    database = store.engine.url.database
    admin = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=3)
    try:
        return await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            database,
        )
    finally:
        await admin.close()


async def test_cluster_survives_terminated_sessions(store: Store, tmp_path: Path) -> None:
    """After the server ends every session several times, the instance works all connections again and stops cleanly."""
    names = ["alpha", "bravo", "charlie"]
    settings = settings_for(tmp_path, names, "survivor")
    cycles: dict[str, int] = {}
    stop = asyncio.Event()
    observer = Observer(settings.observability)
    runner = asyncio.create_task(run_cluster(settings, store, ledger_factory(cycles), stop, observer))
    try:
        assert await wait_until(lambda: all(cycles.get(name, 0) > 0 for name in names))
        for _ in range(5):
            await terminate_sessions(store)
            await asyncio.sleep(0.7)
        after = dict(cycles)
        assert not runner.done(), "run_cluster ended while the database dropped its sessions"
        worked_again = await wait_until(lambda: all(cycles.get(name, 0) > after.get(name, 0) + 2 for name in names))
    finally:
        stop.set()
        outcomes = await asyncio.wait_for(runner, DEADLINE_SECONDS)

    assert worked_again, f"cycles before {after}, now {cycles}"
    assert set(names) <= {outcome.name for outcome in outcomes}
    rows = await lease_rows(store)
    assert [row.holder for row in rows.values()] == [None, None, None]


# One instance with a wrong token key


async def test_wrong_key_instance_keeps_nothing(store: Store, tmp_path: Path) -> None:
    """An instance whose token key does not decrypt the pairs leaves its connections to one that can work them."""
    names = ["alpha", "bravo", "charlie", "delta"]
    right_settings = settings_for(tmp_path, names, "right")
    wrong_settings = settings_for(tmp_path, names, "wrong")
    cycles: dict[str, int] = {}

    @contextlib.asynccontextmanager
    async def wrong_key_factory(settings: Settings, connection: Any, store: Store) -> AsyncIterator[CountingSync]:
        raise ConfigError(f"the token pair of client {connection.mdr.client_id} was encrypted with another key")
        yield  # pragma: no cover

    stop = asyncio.Event()
    wrong = asyncio.create_task(
        run_cluster(wrong_settings, store, wrong_key_factory, stop, Observer(wrong_settings.observability))
    )
    await asyncio.sleep(0.5)
    right = asyncio.create_task(
        run_cluster(right_settings, store, counting_factory(cycles), stop, Observer(right_settings.observability))
    )
    try:
        worked = await wait_until(lambda: all(cycles.get(name, 0) > 0 for name in names), deadline=20)
        rows = await lease_rows(store)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(wrong, right), DEADLINE_SECONDS)

    held_by_wrong = sorted(name for name, row in rows.items() if row.holder == "wrong")
    assert worked, f"never worked: {sorted(set(names) - set(cycles))}; held by the wrong-key instance: {held_by_wrong}"


# Handing back the surplus


async def test_surplus_handed_back_after_cycle(store: Store, tmp_path: Path) -> None:
    """A second instance gets its share soon after it joins, although the connections sync every 10 minutes."""
    names = ["alpha", "bravo"]
    first_settings = settings_for(tmp_path, names, "first", interval_seconds=600)
    second_settings = settings_for(tmp_path, names, "second", interval_seconds=600)
    first_cycles: dict[str, int] = {}
    second_cycles: dict[str, int] = {}
    stop = asyncio.Event()
    first = asyncio.create_task(
        run_cluster(first_settings, store, counting_factory(first_cycles), stop, Observer(first_settings.observability))
    )
    try:
        assert await wait_until(lambda: len(first_cycles) == 2)
        second = asyncio.create_task(
            run_cluster(
                second_settings, store, counting_factory(second_cycles), stop, Observer(second_settings.observability)
            )
        )
        shared = await wait_until(lambda: len(second_cycles) == 1, deadline=20)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(first, second), DEADLINE_SECONDS)

    assert shared, "the first instance kept both connections until their next interval"


# Reusing a name at start


async def test_join_race_keeps_live_registration(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A live process that registers the name between the pid check and the insert keeps it."""
    import os
    import socket
    from datetime import timedelta

    from sqlalchemy import func
    from sqlalchemy.dialects.postgresql import insert

    from mdr_connector.connector.store import ClusterInstance

    original = Cluster._registered_pids

    async def read_then_other_registers(self: Cluster, host: str) -> list[int]:
        pids = await original(self, host)
        # Another process on this host, still running (this test's parent), registers right after the read.
        async with store.engine.begin() as database:
            await database.execute(
                insert(ClusterInstance).values(
                    name="twin",
                    host=socket.gethostname()[:200],
                    pid=os.getppid(),
                    started_at=func.now(),
                    expires_at=func.now() + timedelta(minutes=1),
                )
            )
        return pids

    monkeypatch.setattr(Cluster, "_registered_pids", read_then_other_registers)
    with pytest.raises(ConfigError, match="another running instance is named 'twin'"):
        await Cluster(store.engine, cluster_settings("twin"), ["alpha"]).join()


@pytest.mark.xfail(
    strict=True,
    reason="two containers with the same host name and pid 1 (host networking) look like one restarted "
    "process, so the second takes the live first one's name; telling them apart needs a liveness probe",
)
async def test_twin_with_same_pid_refused(store: Store) -> None:
    """A live instance that renews its registration keeps its name against a process with the same host and pid."""
    twin = Cluster(store.engine, cluster_settings("node-1", takeover_seconds=3), ["alpha"])
    await twin.join()

    async def keep_renewing() -> None:
        while True:
            await twin.tick(acquire=False)
            await asyncio.sleep(twin.renew_seconds)

    renewer = asyncio.create_task(keep_renewing())
    try:
        await asyncio.sleep(twin.renew_seconds * 2)
        with pytest.raises(ConfigError, match="another running instance is named 'node-1'"):
            await Cluster(store.engine, cluster_settings("node-1", takeover_seconds=3), ["alpha"]).join()
    finally:
        renewer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewer


# A healthy instance beside one that fails every connection


async def test_orphans_not_handed_back_in_loop(store: Store, tmp_path: Path) -> None:
    """Beside an instance that fails every connection, the healthy one keeps the connections it took."""
    names = ["alpha", "bravo"]
    failing_settings = settings_for(tmp_path, names, "failing")
    healthy_settings = settings_for(tmp_path, names, "healthy")
    cycles: dict[str, int] = {}

    @contextlib.asynccontextmanager
    async def failing_factory(settings: Settings, connection: Any, store: Store) -> AsyncIterator[CountingSync]:
        raise ConfigError(f"the token pair of client {connection.mdr.client_id} was encrypted with another key")
        yield  # pragma: no cover

    stop = asyncio.Event()
    failing = asyncio.create_task(
        run_cluster(failing_settings, store, failing_factory, stop, Observer(failing_settings.observability))
    )
    healthy: asyncio.Task[Any] | None = None
    try:
        # The failing instance tried both connections, handed them back, and now avoids them for a minute.
        handed_back = False
        for _ in range(int(DEADLINE_SECONDS / 0.1)):
            rows = await lease_rows(store)
            if len(rows) == 2 and all(row.holder is None for row in rows.values()):
                handed_back = True
                break
            await asyncio.sleep(0.1)
        assert handed_back
        healthy = asyncio.create_task(
            run_cluster(healthy_settings, store, counting_factory(cycles), stop, Observer(healthy_settings.observability))
        )
        assert await wait_until(lambda: len(cycles) == 2)
        await asyncio.sleep(1.5)
        before = {name: row.epoch for name, row in (await lease_rows(store)).items()}
        await asyncio.sleep(8)
        after = {name: row.epoch for name, row in (await lease_rows(store)).items()}
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*(task for task in (failing, healthy) if task)), DEADLINE_SECONDS)

    moves = {name: after[name] - before[name] for name in names}
    assert max(moves.values()) <= 1, f"lease changes of holder in 8 s: {moves}"


async def test_lost_lease_seen_while_balance_waits(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A lease past its local deadline is stopped and logged even while balancing waits on other instances' rows.

    After a stall, renewals and the balance can both wait on lease rows that
    stopped instances lock, and only the local deadline check detects the loss.
    """
    from mdr_connector.connector import cluster_runner

    settings = settings_for(tmp_path, ["alpha"], "solo")
    original_balance = Cluster.balance
    balanced_once = asyncio.Event()
    never = asyncio.Event()

    def stall(cluster: Cluster) -> None:
        # The process was stopped: every held lease's local deadline has passed.
        for fence in cluster.fences.values():
            fence._clock = lambda: time.monotonic() + 1000

    async def balance_then_wait(self: Cluster) -> Any:
        if balanced_once.is_set():
            await never.wait()
        changes = await original_balance(self)
        balanced_once.set()
        # The stall lands while the loop waits for its next round.
        asyncio.get_running_loop().call_later(0.05, stall, self)
        return changes

    async def no_renewals(_cluster: Cluster) -> None:
        await never.wait()

    monkeypatch.setattr(Cluster, "balance", balance_then_wait)
    monkeypatch.setattr(cluster_runner, "keep_renewed", no_renewals)
    caplog.set_level("WARNING", logger="mdr_connector.connector.cluster_runner")
    cycles: dict[str, int] = {}
    stop = asyncio.Event()
    runner = asyncio.create_task(run_cluster(settings, store, counting_factory(cycles), stop, Observer(settings.observability)))
    try:
        lost = await wait_until(lambda: any(record.message == "cluster.lease.lost" for record in caplog.records))
    finally:
        stop.set()
        never.set()
        await asyncio.wait_for(runner, DEADLINE_SECONDS)

    assert cycles.get("alpha", 0) > 0
    assert lost
