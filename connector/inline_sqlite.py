"""An SQLite driver for SQLAlchemy's asyncio engine that runs statements on the event loop's thread.

aiosqlite hands every call (cursor, execute, fetch, commit) to a thread of
its own and wakes the event loop with the result. A ledger transaction makes
about five such calls, and in a backlog sync the hand-offs cost more CPU
time than the statements. In a 1,000-incident run of bench/backlog_throughput.py
on a 2-core Intel Xeon, `getrusage` counted about 660 voluntary context
switches per incident in the connector's process with aiosqlite, and about 290
with this driver (docs/benchmarks.md, step 14). A ledger statement
on a local file takes tens of microseconds, so this driver runs it inline.

A statement that finds the database locked by another process (a CLI
command writing while `run` syncs) does not block the loop: it runs again
in a worker thread that waits for the lock up to the lock wait. Only the
statement that failed is run again, and only when it changed nothing.

NOTE: a long statement blocks the loop for its whole run. The ledger counts
that `run` reads after each cycle took about 0.3 s with 1,000,000 links
(bench/store_scale.py), and no HTTP reply or timer is served meanwhile.

The connection object offers the calls SQLAlchemy's aiosqlite dialect
makes (SQLAlchemy 2.0, `sqlalchemy.dialects.sqlite.aiosqlite`), so the
dialect, its pool and its type handling stay as they are.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long a statement waits for another process's lock before it fails with "database is locked".
LOCK_WAIT_SECONDS = 30.0
LOCK_WAIT_THREADS = 4
# SQLite's busy timeout is a C int of milliseconds. PRAGMA busy_timeout sets a larger value to 0, which disables waiting.
MAX_BUSY_TIMEOUT_MS = 2**31 - 1

_lock_waiters: ThreadPoolExecutor | None = None


def use_inline_driver(_dialect: object, _record: object, _args: list[Any], options: dict[str, Any]) -> None:
    """Make the aiosqlite dialect connect through `connect`: a listener for the engine's `do_connect` event."""
    options["async_creator_fn"] = connect


def lock_wait_of(options: Mapping[str, Any]) -> float:
    """Return the lock wait in seconds that the URL's `timeout` option sets, or the default.

    Raises ValueError for a value that is not a finite number of seconds from 0 up.
    """
    value = options.get("timeout", LOCK_WAIT_SECONDS)
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"timeout={value!r} is not a number of seconds") from None
    if not (seconds >= 0 and math.isfinite(seconds)):
        raise ValueError(f"timeout={value!r} is not a number of seconds from 0 up")
    return seconds


async def connect(database: str, **options: Any) -> InlineConnection:
    """Open `database` with the sqlite3 module and the dialect's options, for use on this thread and lock waits."""
    lock_wait = lock_wait_of(options)
    options.pop("timeout", None)
    # With no busy timeout, a locked statement fails at once on the loop's thread, and `run` repeats it in a thread that waits.
    options["timeout"] = 0
    options["check_same_thread"] = False
    return InlineConnection(sqlite3.connect(database, **options), lock_wait)


def _is_locked(error: sqlite3.OperationalError) -> bool:
    code = getattr(error, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(error)


def _lock_wait_executor() -> ThreadPoolExecutor:
    global _lock_waiters
    if _lock_waiters is None:
        _lock_waiters = ThreadPoolExecutor(max_workers=LOCK_WAIT_THREADS, thread_name_prefix="sqlite-lock-wait")
    return _lock_waiters


class _RunNow:
    """The dialect's isolation-level setter queues a function with a future; this runs it at once."""

    def put_nowait(self, item: tuple[asyncio.Future[Any], Callable[[], Any]]) -> None:
        future, function = item
        try:
            result = function()
        except Exception as err:
            future.set_exception(err)
            return
        future.set_result(result)


class InlineConnection:
    """A sqlite3 connection with the awaitable methods of an aiosqlite connection."""

    def __init__(self, connection: sqlite3.Connection, lock_wait_seconds: float) -> None:
        self._connection: sqlite3.Connection | None = connection
        self.lock_wait_seconds = lock_wait_seconds
        self._tx = _RunNow()

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._connection is None:
            raise ValueError("no active connection")
        return self._connection

    @property
    def isolation_level(self) -> str | None:
        return self._conn.isolation_level

    @property
    def in_transaction(self) -> bool:
        return self._conn.in_transaction

    @property
    def total_changes(self) -> int:
        return self._conn.total_changes

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """Call `function` now; if the database is locked and nothing changed, call it again in a thread that waits for the lock."""
        connection = self._conn
        changes_before = connection.total_changes
        try:
            return function(*args)
        except sqlite3.OperationalError as err:
            if not _is_locked(err) or connection.total_changes != changes_before:
                raise

        log.debug("store.sqlite.lock_wait", extra={"wait_seconds": self.lock_wait_seconds})
        return await self._run_waiting(connection, function, *args)

    async def _run_waiting(self, connection: sqlite3.Connection, function: Callable[..., T], *args: Any) -> T:
        # The pool has more connections than there are lock-wait threads, so a
        # wait can queue behind others. The time it spends queued counts toward the lock wait.
        deadline = time.monotonic() + self.lock_wait_seconds

        def waiting() -> T:
            remaining = max(0.0, deadline - time.monotonic())
            wait_ms = int(min(remaining * 1000, MAX_BUSY_TIMEOUT_MS))
            connection.execute(f"PRAGMA busy_timeout={wait_ms}")
            try:
                return function(*args)
            finally:
                connection.execute("PRAGMA busy_timeout=0")

        job = _lock_wait_executor().submit(waiting)
        future = asyncio.wrap_future(job)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # A wait still queued behind other waits has not touched the
            # connection, so dropping it ends the cancel at once.
            if job.cancel():
                raise
            # The thread still uses the connection, and the caller's rollback
            # or close must not run beside it, so the cancel waits for it.
            while not future.done():
                try:
                    await asyncio.wait([future])
                except asyncio.CancelledError:
                    continue
            # The cancel wins over the thread's outcome. Reading the thread's error marks
            # it retrieved, so asyncio does not log it when the future is collected.
            if not future.cancelled():
                future.exception()
            raise

    async def cursor(self) -> InlineCursor:
        return InlineCursor(self, self._conn.cursor())

    async def execute(self, sql: str, parameters: Iterable[Any] | None = None) -> InlineCursor:
        cursor = await self.cursor()
        return await cursor.execute(sql, parameters)

    async def executemany(self, sql: str, parameters: Iterable[Iterable[Any]]) -> InlineCursor:
        cursor = await self.cursor()
        return await cursor.executemany(sql, parameters)

    async def commit(self) -> None:
        await self.run(self._conn.commit)

    async def rollback(self) -> None:
        await self.run(self._conn.rollback)

    async def create_function(self, *args: Any, **kwargs: Any) -> None:
        self._conn.create_function(*args, **kwargs)

    async def close(self) -> None:
        self.stop()

    def stop(self) -> None:
        """Roll back an open transaction, then close the sqlite3 connection. A second call does nothing.

        The dialect closes a connection without a rollback when it invalidates
        it, as after a cancel. sqlite3 finishes a close only once no cursor
        references the connection's statements, and the cursor of a failed
        statement lives on in the exception's traceback. Until then the
        transaction, and with it the write lock, would stay open.

        NOTE: a read left part-way (a stream) is not in a transaction, so
        its snapshot stays until its cursor is collected, and the WAL cannot
        be checkpointed past it until then.
        """
        connection, self._connection = self._connection, None
        if connection is None:
            return
        try:
            if connection.in_transaction:
                connection.rollback()
        finally:
            connection.close()


class InlineCursor:
    """A sqlite3 cursor with the awaitable methods of an aiosqlite cursor."""

    def __init__(self, connection: InlineConnection, cursor: sqlite3.Cursor) -> None:
        self._connection = connection
        self._cursor = cursor

    async def execute(self, sql: str, parameters: Iterable[Any] | None = None) -> InlineCursor:
        await self._connection.run(self._cursor.execute, sql, [] if parameters is None else parameters)
        return self

    async def executemany(self, sql: str, parameters: Iterable[Iterable[Any]]) -> InlineCursor:
        # A statement that meets a lock runs a second time, so an iterator
        # would start it again without the rows the first try consumed.
        rows = parameters if isinstance(parameters, Sequence) else list(parameters)
        await self._connection.run(self._cursor.executemany, sql, rows)
        return self

    # NOTE: a fetch is not run again when the database is locked, because the
    # rows it had read would be lost. In WAL mode a read does not wait for a
    # writer, so a fetch meets a lock only while another process recovers the WAL.
    async def fetchone(self) -> Any:
        return self._cursor.fetchone()

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        return self._cursor.fetchmany(self._cursor.arraysize if size is None else size)

    async def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()

    async def close(self) -> None:
        self._cursor.close()

    @property
    def description(self) -> Sequence[Any] | None:
        return self._cursor.description

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._cursor.lastrowid

    @property
    def arraysize(self) -> int:
        return self._cursor.arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._cursor.arraysize = value
