"""Alembic environment: runs the migrations through the async engine of the configured URL.

On PostgreSQL every migration run is one transaction that first takes a
transaction-level advisory lock, so instances that start at once, or
`mdr-connector db upgrade` run beside them, apply each migration once: the
second run waits for the first to commit and then finds nothing to do.
`Store.upgrade` passes a `lock_timeout_seconds` attribute in the alembic
config. It bounds how long one DDL statement waits for a table lock, because
while it waits, every query of the running instances on that table queues
behind it.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import pool, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import create_async_engine

from mdr_connector.connector.inline_sqlite import LOCK_WAIT_SECONDS
from mdr_connector.connector.store import Base

target_metadata = Base.metadata

# The key of the advisory lock that serializes migration runs on one
# database: any fixed bigint that no other application on the database uses.
MIGRATION_LOCK_KEY = 0x6D6472_6D696772  # "mdr" "migr" in ASCII


def lock_for_migrations(connection: Connection) -> None:
    """Wait for any other migration run on this PostgreSQL database, then bound table-lock waits.

    Both settings end with the transaction. The advisory lock is taken
    before lock_timeout is set, because lock_timeout also covers advisory
    locks, and a run waiting for another run should wait until it ends.
    """
    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})

    timeout = context.config.attributes.get("lock_timeout_seconds")
    if timeout is None:
        # Plain `alembic upgrade` sets no attribute and waits as long as
        # the server's own lock_timeout allows (none by default).
        return
    milliseconds = max(1, round(timeout * 1000))
    connection.execute(text("SELECT set_config('lock_timeout', :value, true)"), {"value": f"{milliseconds}ms"})


def run_migrations(connection: Connection) -> None:
    # render_as_batch lets ALTER-style migrations run on SQLite, which
    # cannot alter most column properties in place.
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            lock_for_migrations(connection)
        # run_migrations reads the current revision only now, after the
        # lock, so a run that waited sees what the run before it committed.
        # NOTE: SQLite gets no such lock. Two processes that upgrade one
        # SQLite file at the same moment can still collide.
        context.run_migrations()


async def run_async_migrations() -> None:
    url = context.config.get_main_option("sqlalchemy.url")
    connect_args: dict[str, object] = {}
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and "timeout" not in parsed.query:
        # The ledger's own connections wait this long for another process's write lock, so a migration waits as long.
        connect_args["timeout"] = LOCK_WAIT_SECONDS
    engine = create_async_engine(url, poolclass=pool.NullPool, connect_args=connect_args)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(run_migrations)
            await connection.commit()
    finally:
        await engine.dispose()


def run_migrations_offline() -> None:
    context.configure(
        url=context.config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_async_migrations())
