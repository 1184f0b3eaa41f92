"""An SQLite ledger for the inline driver's tests, and a write lock held as another process would hold it."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mdr_connector.connector.store import Store


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(f"sqlite+aiosqlite:///{tmp_path}/ledger.db")
    yield opened
    await opened.close()


@contextmanager
def write_lock(database: Path) -> Iterator[sqlite3.Connection]:
    """Hold the database's write lock, as another process writing would, until the block ends."""
    holder = sqlite3.connect(database, isolation_level=None, timeout=0)
    holder.execute("BEGIN IMMEDIATE")
    try:
        yield holder
    finally:
        if holder.in_transaction:
            holder.execute("COMMIT")
        holder.close()
