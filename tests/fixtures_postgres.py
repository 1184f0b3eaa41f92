"""Scratch PostgreSQL databases for the tests that run the ledger on PostgreSQL as well as SQLite.

The server is MDR_TEST_POSTGRES_URL, by default the user postgres at
127.0.0.1:5432 with trust authentication, as .ci/run sets it up. Each test
gets a database of its own with a random name, dropped when the test ends,
so pytest-xdist workers never share one. When no server accepts
connections, those tests skip, except under CI=true, where they fail:
.ci/run starts the server, so a missing one there is a broken CI machine,
not a reason to test less.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import NoReturn

import pytest

POSTGRES_ADMIN_URL = os.environ.get("MDR_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")

# The ids of the `ledger_backend` parameter of the tests that run on both engines.
LEDGER_BACKENDS = ("sqlite", "postgresql")


async def postgres_database() -> str | None:
    """Create a scratch database and return its async URL, or None when asyncpg is missing or no server is reachable."""
    try:
        import asyncpg
    except ImportError:
        return None
    name = f"mdr_store_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=3)
    except (OSError, asyncpg.PostgresError, asyncio.TimeoutError):
        return None
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return POSTGRES_ADMIN_URL.replace("postgresql://", "postgresql+asyncpg://").rsplit("/", 1)[0] + f"/{name}"


async def drop_postgres_database(url: str) -> None:
    import asyncpg

    name = url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=3)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def postgres_unavailable() -> NoReturn:
    """Skip the test, or fail it when CI=true, because no PostgreSQL server can be used."""
    message = (
        f"no PostgreSQL server answers at {POSTGRES_ADMIN_URL}, or asyncpg is not installed; "
        "start the server or set MDR_TEST_POSTGRES_URL"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI=true requires PostgreSQL)", pytrace=False)
    pytest.skip(message)


@asynccontextmanager
async def scratch_database() -> AsyncIterator[str]:
    """Yield the async URL of a new empty database, dropped on exit; skip or fail the test when none can be made."""
    url = await postgres_database()
    if url is None:
        postgres_unavailable()
    try:
        yield url
    finally:
        await drop_postgres_database(url)
