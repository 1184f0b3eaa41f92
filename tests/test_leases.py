"""Leases and fencing on PostgreSQL: fair shares, takeover, and a stalled holder writing nothing."""

from __future__ import annotations

import asyncio
import os
import contextvars
from datetime import timedelta
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fixtures_postgres import scratch_database
from sqlalchemy import Interval, literal, select, update
from sqlalchemy.exc import DBAPIError

from mdr_connector.connector.cluster_runner import enable_fencing, prepare_store
from mdr_connector.connector.config import ClusterSettings, SecretRef
from mdr_connector.connector.errors import ConfigError, LeaseLostError
from mdr_connector.connector.fencing import Fence, current_fence, reset_fence
from mdr_connector.connector.leases import MDR_WRITES, Cluster, FencedClient
from mdr_connector.connector.retry import RateGate
from mdr_connector.connector.store import ClusterInstance, Lease, Store

CONNECTIONS = ["alpha", "bravo", "charlie", "delta"]
LONG_AGO = literal(timedelta(hours=1), Interval())


def cluster_settings(name: str, takeover_seconds: float = 30) -> ClusterSettings:
    return ClusterSettings(
        enabled=True, instance_name=name, takeover_seconds=takeover_seconds, token_key=SecretRef(env="UNUSED")
    )


@pytest.fixture
async def store() -> AsyncIterator[Store]:
    async with scratch_database() as url:
        opened = await Store.open(url)
        enable_fencing(opened)
        try:
            yield opened
        finally:
            await opened.close()


async def lease_rows(store: Store) -> dict[str, Lease]:
    async with store.sessions() as session:
        return {row.connection: row for row in await session.scalars(select(Lease))}


async def expire_lease(store: Store, connection: str) -> None:
    """Move a lease's expiry into the past, as if its holder had stopped renewing long ago."""
    async with store.engine.begin() as database:
        await database.execute(
            update(Lease).where(Lease.connection == connection).values(expires_at=Lease.expires_at - LONG_AGO)
        )




async def test_one_instance_takes_every_lease_then_shares(store: Store) -> None:
    """Alone, an instance holds all connections; when a second joins, the first hands back the surplus."""
    first = Cluster(store.engine, cluster_settings("first"), CONNECTIONS)
    await first.join()
    changes = await first.tick()
    assert sorted(fence.connection for fence in changes.acquired) == CONNECTIONS

    second = Cluster(store.engine, cluster_settings("second"), CONNECTIONS)
    await second.join()
    assert (await second.tick()).acquired == []

    await first.tick()
    handing_back = [fence for fence in first.fences.values() if fence.release_requested]
    assert len(handing_back) == 2
    for fence in handing_back:
        await first.release(fence)

    taken = await second.tick()
    assert sorted(fence.connection for fence in taken.acquired) == sorted(f.connection for f in handing_back)
    rows = await lease_rows(store)
    assert sorted(row.holder for row in rows.values()) == ["first", "first", "second", "second"]


async def test_expired_lease_taken_over(store: Store) -> None:
    """A lease left to expire goes to another instance, its epoch one higher; the old holder learns it lost it."""
    old = Cluster(store.engine, cluster_settings("old"), ["alpha"])
    await old.join()
    (old_fence,) = (await old.tick()).acquired

    new = Cluster(store.engine, cluster_settings("new"), ["alpha"])
    await new.join()
    assert (await new.tick()).acquired == []

    await expire_lease(store, "alpha")
    (new_fence,) = (await new.tick()).acquired
    assert new_fence.epoch == old_fence.epoch + 1

    lost = await old.tick(acquire=False)
    assert lost.lost == ["alpha"]
    with pytest.raises(LeaseLostError, match="no longer holds its lease"):
        old_fence.check_remote()


async def test_stalled_holder_cannot_write_the_ledger(store: Store) -> None:
    """A transaction run under a fence whose lease was taken over fails before it writes."""
    old = Cluster(store.engine, cluster_settings("old"), ["alpha"])
    await old.join()
    (old_fence,) = (await old.tick()).acquired

    token = old_fence.use()
    try:
        await store.set_cursor("alpha", "mdr", "1")
    finally:
        reset_fence(token)

    await expire_lease(store, "alpha")
    new = Cluster(store.engine, cluster_settings("new"), ["alpha"])
    await new.join()
    (new_fence,) = (await new.tick()).acquired

    async def write_as(fence: Fence, value: str) -> None:
        token = fence.use()
        try:
            await store.set_cursor("alpha", "mdr", value)
        finally:
            reset_fence(token)

    # The old holder's local deadline has not passed: only the database check stops it.
    assert old_fence.remaining() > 0
    with pytest.raises(LeaseLostError):
        await write_as(old_fence, "stale")
    await write_as(new_fence, "2")
    assert await store.get_cursor("alpha", "mdr") == "2"


async def test_takeover_waits_for_a_fenced_transaction(store: Store) -> None:
    """A takeover cannot slip in between a holder's lease check and its commit."""
    holder = Cluster(store.engine, cluster_settings("holder", takeover_seconds=3), ["alpha"])
    await holder.join()
    (fence,) = (await holder.tick()).acquired
    taker = Cluster(store.engine, cluster_settings("taker", takeover_seconds=3), ["alpha"])
    await taker.join()

    token = fence.use()
    try:
        async with store.engine.begin() as fenced:
            await fenced.execute(select(1))
            # The lease (1.8 s) runs out while this transaction is open.
            await asyncio.sleep(fence.remaining() + 1.0)
            takeover = asyncio.create_task(taker.tick(), context=contextvars.Context())
            await asyncio.sleep(0.5)
            assert not takeover.done(), "the takeover must wait for the holder's transaction"
    finally:
        reset_fence(token)
    taken = await takeover
    assert [f.connection for f in taken.acquired] == ["alpha"]


async def test_stopped_holder_cut_off(store: Store) -> None:
    """A holder that stops with its lease row locked is ended by the server, so the takeover goes through."""
    holder = Cluster(store.engine, cluster_settings("holder", takeover_seconds=3), ["alpha"])
    await prepare_store(store, holder.lease_seconds)
    await holder.join()
    (fence,) = (await holder.tick()).acquired
    taker = Cluster(store.engine, cluster_settings("taker", takeover_seconds=3), ["alpha"])
    await taker.join()

    async def take_over() -> list[Fence]:
        while True:
            acquired = (await taker.tick()).acquired
            if acquired:
                return acquired
            await asyncio.sleep(0.3)

    token = fence.use()
    try:
        with pytest.raises(DBAPIError):
            async with store.engine.begin() as stalled:
                await stalled.execute(select(1))
                # This task now behaves like a stopped process: it holds the
                # row and sends nothing until the takeover has happened.
                taken = await asyncio.wait_for(
                    asyncio.create_task(take_over(), context=contextvars.Context()), timeout=60
                )
                await stalled.execute(select(1))
    finally:
        reset_fence(token)
    assert [f.connection for f in taken] == ["alpha"]
    assert taken[0].epoch == fence.epoch + 1


async def test_live_instance_name_refused(store: Store) -> None:
    first = Cluster(store.engine, cluster_settings("same"), CONNECTIONS)
    await first.join()
    async with store.engine.begin() as database:
        # The registration of a process that still runs: this test's parent.
        await database.execute(update(ClusterInstance).values(pid=os.getppid()))
    with pytest.raises(ConfigError, match="another running instance is named 'same'"):
        await Cluster(store.engine, cluster_settings("same"), CONNECTIONS).join()


async def test_cluster_needs_postgresql(tmp_path: Any) -> None:
    sqlite = await Store.open(f"sqlite+aiosqlite:///{tmp_path}/ledger.db")
    try:
        with pytest.raises(ConfigError, match="needs a PostgreSQL database_url"):
            Cluster(sqlite.engine, cluster_settings("x"), CONNECTIONS)
    finally:
        await sqlite.close()


def test_local_deadline_and_fenced_writes() -> None:
    """check_remote needs the wanted time left; a fenced client checks before writes only."""
    now = [100.0]
    fence = Fence("alpha", "me", 3, valid_until=110.0, clock=lambda: now[0])
    fence.check_remote(min_remaining=5)
    with pytest.raises(LeaseLostError):
        fence.check_remote(min_remaining=15)

    calls = []

    class Client:
        async def create_comment(self, incident_id: str, text: str) -> str:
            calls.append(("write", incident_id))
            return "c-1"

        async def list_comments(self, incident_id: str) -> list[str]:
            calls.append(("read", incident_id))
            return []

    client = FencedClient(Client(), MDR_WRITES)

    async def scenario() -> None:
        token = fence.use()
        try:
            assert current_fence() is fence
            assert await client.create_comment("i-1", "x") == "c-1"
            now[0] = 111.0
            assert await client.list_comments("i-1") == []
            with pytest.raises(LeaseLostError):
                await client.create_comment("i-1", "y")
        finally:
            reset_fence(token)

    asyncio.run(scenario())
    assert calls == [("write", "i-1"), ("read", "i-1")]


def test_rate_gate_checks_fence_before_sending() -> None:
    """A request that waited at the rate gate past the lease is not sent."""
    now = [100.0]
    fence = Fence("alpha", "me", 1, valid_until=110.0, clock=lambda: now[0])
    gate = RateGate("test")
    sent = []

    async def send() -> str:
        sent.append(now[0])
        return "ok"

    async def scenario() -> None:
        token = fence.use()
        try:
            assert await gate.send(send) == "ok"
            now[0] = 120.0
            with pytest.raises(LeaseLostError):
                await gate.send(send, write=True)
        finally:
            reset_fence(token)

    asyncio.run(scenario())
    assert sent == [100.0]


async def test_restart_after_crash_keeps_name(store: Store) -> None:
    """An instance restarted on the same host under its name joins at once when the old process is gone."""
    crashed = Cluster(store.engine, cluster_settings("node-1"), CONNECTIONS)
    await crashed.join()
    async with store.engine.begin() as database:
        # A process id that no process has: the crashed instance's.
        await database.execute(update(ClusterInstance).values(pid=2**22 + 12345))

    await Cluster(store.engine, cluster_settings("node-1"), CONNECTIONS).join()

    async with store.engine.begin() as database:
        await database.execute(update(ClusterInstance).values(host="other-host"))
    with pytest.raises(ConfigError, match="another running instance is named 'node-1'"):
        await Cluster(store.engine, cluster_settings("node-1"), CONNECTIONS).join()


async def test_stop_lost_logs_expired_lease(caplog: pytest.LogCaptureFixture) -> None:
    """A lease past its local deadline stops its task and is logged as lost once, also when no renewal saw it first."""
    from mdr_connector.connector.cluster_runner import _stop_lost

    expired = Fence("conn00", "vm-1", 2, valid_until=50.0, clock=lambda: 100.0)
    current = Fence("conn01", "vm-1", 3, valid_until=150.0, clock=lambda: 100.0)
    tasks = {fence.connection: (asyncio.create_task(asyncio.sleep(60)), fence) for fence in (expired, current)}
    caplog.set_level("WARNING", logger="mdr_connector.connector.cluster_runner")

    _stop_lost(tasks)
    _stop_lost(tasks)
    await asyncio.gather(tasks["conn00"][0], return_exceptions=True)
    current_running = not tasks["conn01"][0].done()
    tasks["conn01"][0].cancel()

    lost = [record for record in caplog.records if record.message == "cluster.lease.lost"]
    assert [(record.connection, record.instance, record.epoch) for record in lost] == [("conn00", "vm-1", 2)]
    assert expired.lost is True
    assert tasks["conn00"][0].cancelled()
    assert current.lost is False
    assert current_running
