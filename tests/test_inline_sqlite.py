"""The inline SQLite driver: statements on the loop's thread, lock waits in a worker thread."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from fixtures_sqlite import store, write_lock  # noqa: F401 - store is a fixture
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from mdr_connector.connector import inline_sqlite
from mdr_connector.connector.errors import ConfigError
from mdr_connector.connector.store import Store


async def ticks_while(task: asyncio.Task[object], seconds: float) -> int:
    """Count the loop's turns over `seconds` while `task` runs, so a blocked loop shows as few ticks."""
    ticks = 0
    deadline = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
        ticks += 1
    assert not task.done()
    return ticks


async def test_store_uses_inline_driver(store: Store) -> None:
    """An aiosqlite URL connects through the inline driver, with no busy timeout on the loop's side."""
    async with store.engine.connect() as connection:
        raw = await connection.get_raw_connection()
        assert isinstance(raw.driver_connection, inline_sqlite.InlineConnection)
        assert (await connection.execute(text("PRAGMA busy_timeout"))).scalar() == 0
        assert (await connection.execute(text("PRAGMA journal_mode"))).scalar() == "wal"


async def test_locked_write_waits_off_loop(store: Store, tmp_path: Path) -> None:
    """A write meeting another process's lock waits in a thread while the loop runs, then lands."""
    with write_lock(tmp_path / "ledger.db"):
        write = asyncio.create_task(store.set_cursor("main", "mdr", "42"))
        ticks = await ticks_while(write, 0.5)

    await write
    assert ticks >= 20
    assert await store.get_cursor("main", "mdr") == "42"


async def test_lock_wait_has_limit(tmp_path: Path) -> None:
    """A lock held past the URL's timeout fails the write with "database is locked"."""
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path}/ledger.db?timeout=0.3")
    try:
        with write_lock(tmp_path / "ledger.db"):
            with pytest.raises(OperationalError, match="database is locked"):
                await store.set_cursor("main", "mdr", "42")

        await store.set_cursor("main", "mdr", "43")
        assert await store.get_cursor("main", "mdr") == "43"
    finally:
        await store.close()


async def test_cancelled_wait_ends_with_thread(store: Store, tmp_path: Path) -> None:
    """A cancelled lock wait returns only after its thread let go of the connection, which stays usable."""
    with write_lock(tmp_path / "ledger.db"):
        write = asyncio.create_task(store.set_cursor("main", "mdr", "42"))
        await ticks_while(write, 0.2)
        write.cancel()
        await ticks_while(write, 0.2)

    with pytest.raises(asyncio.CancelledError):
        await write
    await store.set_cursor("main", "mdr", "43")
    assert await store.get_cursor("main", "mdr") == "43"


async def test_partial_change_is_not_rerun(tmp_path: Path) -> None:
    """A call that changed rows before the lock error is raised, not run a second time."""
    connection = await inline_sqlite.connect(str(tmp_path / "plain.db"))
    calls = []
    connection._conn.execute("CREATE TABLE t (x INTEGER)")

    def insert_then_fail() -> None:
        calls.append(1)
        connection._conn.execute("INSERT INTO t VALUES (1)")
        raise sqlite3.OperationalError("database is locked")

    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            await connection.run(insert_then_fail)
        assert len(calls) == 1
    finally:
        connection.stop()


async def test_other_errors_raise_at_once(tmp_path: Path) -> None:
    """An error other than a lock is raised from the loop's call, with no second attempt."""
    connection = await inline_sqlite.connect(str(tmp_path / "plain.db"))
    try:
        cursor = await connection.cursor()
        with pytest.raises(sqlite3.OperationalError, match="no such table"):
            await cursor.execute("SELECT * FROM missing")
    finally:
        connection.stop()
        connection.stop()


async def test_isolation_level_setting(store: Store) -> None:
    """The dialect's isolation-level switch works on an inline connection."""
    async with store.engine.connect() as connection:
        autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
        await autocommit.execute(text("INSERT INTO cursors (connection, side, value, updated_at) "
                                      "VALUES ('main', 'mdr', '7', '2026-01-01 00:00:00')"))

    assert await store.get_cursor("main", "mdr") == "7"


async def test_closed_connection_rejects_calls(tmp_path: Path) -> None:
    """After close, a call fails with the error the dialect maps to "no active connection"."""
    connection = await inline_sqlite.connect(str(tmp_path / "plain.db"))
    await connection.close()

    with pytest.raises(ValueError, match="no active connection"):
        await connection.cursor()


async def test_invalid_timeout_stops_open(tmp_path: Path) -> None:
    """A store URL whose timeout is not a number of seconds fails to open with the value and the fix named."""
    with pytest.raises(ConfigError) as caught:
        await Store.open(f"sqlite+aiosqlite:///{tmp_path}/ledger.db?timeout=abc")
    assert "timeout=abc is not a number of seconds" in str(caught.value)
    assert "?timeout=SECONDS" in str(caught.value)


async def test_pool_waits_as_long_as_locks(tmp_path: Path) -> None:
    """A lock wait longer than SQLAlchemy's 30-second pool wait lengthens the pool wait, so a waiting statement's connection is not missed."""
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path}/ledger.db?timeout=90")
    try:
        assert store.engine.pool.timeout() == 90
    finally:
        await store.close()
