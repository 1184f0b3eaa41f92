"""Attacks on the inline SQLite driver: cancels during lock waits, closes inside a transaction, statements run again."""

from __future__ import annotations

import asyncio
import gc
import logging
import sqlite3
import threading
from pathlib import Path

import pytest
from fixtures_sqlite import store, write_lock  # noqa: F401 - store is a fixture
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from mdr_connector.connector import inline_sqlite
from mdr_connector.connector.store import Store

WAIT_LOGGER = "mdr_connector.connector.inline_sqlite"


def can_write(database: Path) -> bool:
    """Return whether another process could take the write lock now, without waiting."""
    other = sqlite3.connect(database, isolation_level=None, timeout=0)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("COMMIT")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        other.close()


def ticket_cursors(database: Path) -> int:
    """Count the ledger's cursor rows of the ticket side."""
    reader = sqlite3.connect(database)
    try:
        return reader.execute("SELECT count(*) FROM cursors WHERE side = 'ticket'").fetchone()[0]
    finally:
        reader.close()


async def until_lock_wait(caplog: pytest.LogCaptureFixture, count: int = 1) -> None:
    """Run the loop until `count` statements were sent to wait for the lock in a worker thread."""
    for _turn in range(2000):
        if sum(record.getMessage() == "store.sqlite.lock_wait" for record in caplog.records) >= count:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"expected {count} lock waits in the log, found fewer after 2000 loop turns")


def plain_ledger(tmp_path: Path) -> Path:
    """Create a WAL database with one table `t` of unique integers, with the row 0."""
    database = tmp_path / "plain.db"
    setup = sqlite3.connect(database)
    setup.execute("PRAGMA journal_mode=WAL")
    setup.execute("CREATE TABLE t (x INTEGER UNIQUE)")
    setup.execute("INSERT INTO t VALUES (0)")
    setup.commit()
    setup.close()
    return database


async def test_close_in_transaction_frees_lock(tmp_path: Path) -> None:
    """A connection closed inside a write transaction releases the write lock, even while a failed cursor lives.

    sqlite3 defers the close of a connection whose statement a live cursor
    references, and until then its transaction keeps the write lock.
    """
    database = plain_ledger(tmp_path)
    connection = await inline_sqlite.connect(str(database))
    # The failed cursor stays referenced until the test ends, as a kept exception's traceback keeps it.
    failed = await connection.cursor()
    with pytest.raises(sqlite3.IntegrityError):
        await failed.execute("INSERT INTO t VALUES (?)", (0,))
    await connection.rollback()
    writer = await connection.cursor()
    await writer.execute("UPDATE t SET x = ?", (1,))
    assert connection.in_transaction

    await connection.close()

    assert can_write(database)


async def test_cancelled_wait_frees_lock(store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A write cancelled in its lock wait, whose statement then succeeds in the thread, leaves no lock behind."""
    caplog.set_level(logging.DEBUG, logger=WAIT_LOGGER)
    database = tmp_path / "ledger.db"
    await store.set_cursor("main", "mdr", "1")
    saved_errors: list[IntegrityError] = []
    async with store.engine.connect() as connection:
        try:
            await connection.execute(
                text("INSERT INTO cursors (connection, side, value, updated_at) "
                     "VALUES ('main', 'mdr', '2', '2026-01-01 00:00:00')")
            )
        except IntegrityError as err:
            # A caller may keep an error, and with it the failed cursor, for a while (a log handler, a cycle's error).
            saved_errors.append(err)

    with write_lock(database):
        write = asyncio.create_task(store.set_cursor("main", "mdr", "3"))
        await until_lock_wait(caplog)
        write.cancel()
        await asyncio.sleep(0.05)
    with pytest.raises(asyncio.CancelledError):
        await write

    assert saved_errors
    assert can_write(database)


async def test_cancelled_failure_is_retrieved(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A cancel whose lock wait then fails marks the thread's error retrieved.

    Otherwise asyncio logs "Future exception was never retrieved", with a
    traceback, when it collects the future.
    """
    caplog.set_level(logging.DEBUG, logger=WAIT_LOGGER)
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path}/ledger.db?timeout=0.2")
    try:
        with write_lock(tmp_path / "ledger.db"):
            write = asyncio.create_task(store.set_cursor("main", "mdr", "1"))
            await until_lock_wait(caplog)
            write.cancel()
            with pytest.raises(asyncio.CancelledError):
                await write
    finally:
        await store.close()

    gc.collect()
    unretrieved = [
        item for item in gc.get_objects() if isinstance(item, asyncio.Future) and getattr(item, "_log_traceback", False)
    ]
    assert not unretrieved


async def test_executemany_iterator_rerun(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """executemany with a generator that meets a lock writes every row once, as aiosqlite's executemany does."""
    caplog.set_level(logging.DEBUG, logger=WAIT_LOGGER)
    database = plain_ledger(tmp_path)
    connection = await inline_sqlite.connect(str(database))
    try:
        cursor = await connection.cursor()
        with write_lock(database):
            insert = asyncio.create_task(
                cursor.executemany("INSERT INTO t VALUES (?)", ((value,) for value in (1, 2, 3)))
            )
            await until_lock_wait(caplog)
        await insert
        await connection.commit()
        rows = [value for (value,) in connection._conn.execute("SELECT x FROM t ORDER BY x")]
    finally:
        connection.stop()

    assert rows == [0, 1, 2, 3]


async def test_queued_wait_cancels_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancelled write whose lock wait has not started in a thread ends while the lock is still held.

    The lock-wait threads are fewer than the pool's connections, so a wait
    can queue behind others, and no thread uses its connection yet.
    """
    caplog.set_level(logging.DEBUG, logger=WAIT_LOGGER)
    monkeypatch.setattr(inline_sqlite, "LOCK_WAIT_THREADS", 1)
    monkeypatch.setattr(inline_sqlite, "_lock_waiters", None)
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path}/ledger.db?timeout=30")
    try:
        with write_lock(tmp_path / "ledger.db"):
            first = asyncio.create_task(store.set_cursor("main", "mdr", "1"))
            await until_lock_wait(caplog, 1)
            queued = asyncio.create_task(store.set_cursor("main", "ticket", "1"))
            await until_lock_wait(caplog, 2)
            queued.cancel()
            for _turn in range(200):
                if queued.done():
                    break
                await asyncio.sleep(0)
            ended_under_lock = queued.done()
        await first
        with pytest.raises(asyncio.CancelledError):
            await queued
    finally:
        executor = inline_sqlite._lock_waiters
        await store.close()
        if executor is not None:
            executor.shutdown(wait=True)

    assert ended_under_lock
    assert ticket_cursors(tmp_path / "ledger.db") == 0


async def test_huge_timeout_still_waits(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A lock wait longer than SQLite's busy timeout range (2**31 - 1 ms, about 24.8 days) waits instead of failing at once."""
    caplog.set_level(logging.DEBUG, logger=WAIT_LOGGER)
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path}/ledger.db?timeout=10000000")
    try:
        with write_lock(tmp_path / "ledger.db"):
            write = asyncio.create_task(store.set_cursor("main", "mdr", "42"))
            await until_lock_wait(caplog)
            # This gives the thread time to meet the lock, because a wait of 0 fails here.
            await asyncio.sleep(0.1)
        await write
        assert await store.get_cursor("main", "mdr") == "42"
    finally:
        await store.close()


async def test_queued_wait_keeps_deadline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The time a lock wait spends queued behind other waits counts toward its limit ("30 seconds at most" in the docs)."""
    monkeypatch.setattr(inline_sqlite, "LOCK_WAIT_THREADS", 1)
    monkeypatch.setattr(inline_sqlite, "_lock_waiters", None)
    connection = await inline_sqlite.connect(str(plain_ledger(tmp_path)), timeout=30)
    release = threading.Event()
    blocker = inline_sqlite._lock_wait_executor().submit(release.wait)
    busy_timeouts: list[int] = []
    calls = 0

    def locked_once() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise sqlite3.OperationalError("database is locked")
        busy_timeouts.append(connection._conn.execute("PRAGMA busy_timeout").fetchone()[0])

    try:
        queued = asyncio.create_task(connection.run(locked_once))
        await asyncio.sleep(0.05)
        release.set()
        await queued
    finally:
        release.set()
        blocker.result()
        inline_sqlite._lock_waiters.shutdown(wait=True)
        connection.stop()

    assert busy_timeouts
    assert busy_timeouts[0] < 30000
