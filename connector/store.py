"""The ledger: links, synced items, cursors and parked items, in SQL.

SQLite by default, through the aiosqlite dialect with statements run on
the event loop's thread (connector/inline_sqlite.py); any SQLAlchemy async URL works
(`postgresql+asyncpg://...` in production). The schema belongs to the
alembic migrations in `migrations/`; `Store.upgrade()` applies them.

Every method is one short transaction that commits before it returns, so
what a method recorded survives a crash right after it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from importlib import resources

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    BigInteger,
    DateTime,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    Table,
    TextClause,
    and_,
    bindparam,
    delete,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.compiler import IdentifierPreparer
from sqlalchemy.sql.dml import Update
from sqlalchemy.types import TypeDecorator

from mdr_connector.connector import inline_sqlite
from mdr_connector.connector.errors import ConfigError
from mdr_connector.connector.i18n import N_

log = logging.getLogger(__name__)

LINKED = "linked"
PENDING = "pending"
DONE = "done"

MDR_TO_TICKET = "mdr_to_ticket"
TICKET_TO_MDR = "ticket_to_mdr"

# The SQLSTATE of a statement cancelled by lock_timeout (lock_not_available).
LOCK_NOT_AVAILABLE = "55P03"
# Serializes the alembic commands that Store.upgrade runs on worker threads.
_ALEMBIC_COMMAND_LOCK = threading.Lock()


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; pass an aware UTC datetime")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    pass


class Link(Base):
    """One MDR incident paired with one ticket, per connection.

    `state` is `pending` from the moment a create is about to be sent until
    the ticket's id is recorded. A pending link whose create outcome is
    unknown is resolved by looking the correlation marker up on the ticket
    system, never by creating again.
    """

    __tablename__ = "links"
    __table_args__ = (
        UniqueConstraint("connection", "incident_id", name="uq_links_incident"),
        Index("ix_links_ticket_id", "connection", "ticket_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    connection: Mapped[str] = mapped_column(String(64))
    incident_id: Mapped[str] = mapped_column(String(200))
    incident_number: Mapped[int | None] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16))
    ticket_key: Mapped[str | None] = mapped_column(String(200))
    ticket_id: Mapped[str | None] = mapped_column(String(200))
    ticket_url: Mapped[str | None] = mapped_column(Text)
    create_started_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    mdr_update_time: Mapped[int | None] = mapped_column(BigInteger)
    ticket_updated: Mapped[datetime | None] = mapped_column(UtcDateTime)
    fields_hash: Mapped[str | None] = mapped_column(String(64))
    # The status each side was last seen in or moved to by the connector.
    ticket_status: Mapped[str | None] = mapped_column(String(200))
    mdr_status: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class SyncedItem(Base):
    """A comment, attachment, response view or handled command, copied or acted on once."""

    __tablename__ = "synced_items"
    __table_args__ = (
        UniqueConstraint("connection", "incident_id", "kind", "direction", "source_id", name="uq_synced_items_source"),
        Index("ix_synced_items_incident", "connection", "incident_id"),
        Index("ix_synced_items_target", "connection", "kind", "target_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    connection: Mapped[str] = mapped_column(String(64))
    incident_id: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(32))
    direction: Mapped[str] = mapped_column(String(16))
    source_id: Mapped[str] = mapped_column(String(200))
    target_id: Mapped[str | None] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(16))
    attempt_started_at: Mapped[datetime] = mapped_column(UtcDateTime)
    done_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # The version of the source when it was copied: an edit time, a status.
    source_version: Mapped[str | None] = mapped_column(String(64))


class Cursor(Base):
    """A watermark per connection and side, below which every change is reconciled."""

    __tablename__ = "cursors"

    connection: Mapped[str] = mapped_column(String(64), primary_key=True)
    side: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class ParkedItem(Base):
    """An item whose sync failed; it is tried again from `next_try_at` on."""

    __tablename__ = "parked_items"
    __table_args__ = (UniqueConstraint("connection", "kind", "item_id", name="uq_parked_items_item"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    connection: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(32))
    item_id: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer)
    first_failed_at: Mapped[datetime] = mapped_column(UtcDateTime)
    last_failed_at: Mapped[datetime] = mapped_column(UtcDateTime)
    next_try_at: Mapped[datetime] = mapped_column(UtcDateTime)


class ResponseDecision(Base):
    """The audit record of one confirm or decline of an MDR response: who, when, what, and the outcome."""

    __tablename__ = "response_decisions"
    __table_args__ = (
        Index("ix_response_decisions_response", "connection", "response_id"),
        Index("ix_response_decisions_incident", "connection", "incident_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    connection: Mapped[str] = mapped_column(String(64))
    incident_id: Mapped[str] = mapped_column(String(200))
    response_id: Mapped[str] = mapped_column(String(200))
    decision: Mapped[str] = mapped_column(String(16))
    actor_id: Mapped[str] = mapped_column(String(200))
    actor_name: Mapped[str] = mapped_column(String(200))
    # `ticket` for a comment command, whose comment id is in `source_id`, or `cli`.
    source: Mapped[str] = mapped_column(String(32))
    source_id: Mapped[str | None] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text)
    # `pending` until MDR replies, then `sent`, `refused` (not allowed) or `failed`.
    outcome: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    decided_at: Mapped[datetime] = mapped_column(UtcDateTime)
    sent_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class Lease(Base):
    """The lease of one connection: the instance working it, until when, and an epoch that grows with every new holder."""

    __tablename__ = "leases"

    connection: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(200))
    epoch: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    acquired_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class ClusterInstance(Base):
    """One running instance in cluster mode, alive until `expires_at` unless it renews."""

    __tablename__ = "cluster_instances"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)


class TokenChain(Base):
    """The MDR token pair of one client, encrypted; `version` grows with every save."""

    __tablename__ = "token_chains"

    client_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    # A fingerprint of the key that encrypted the pair, so a wrong key gets its own message.
    key_id: Mapped[str] = mapped_column(String(64))
    ciphertext: Mapped[str] = mapped_column(Text)
    version: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class CachedAsset(Base):
    """Asset details as read from `assets/details`, kept for the configured time."""

    __tablename__ = "asset_cache"

    connection: Mapped[str] = mapped_column(String(64), primary_key=True)
    asset_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    data: Mapped[str] = mapped_column(Text)
    fetched_at: Mapped[datetime] = mapped_column(UtcDateTime)


# Statements of the per-incident paths, built once with bound parameters.
# SQLAlchemy memoizes a statement's cache key on the statement object, so
# reusing one skips building the expression and its key again. In a loop of
# one-row reads and updates on SQLite (SQLAlchemy 2.0.58) that took 40 to 55%
# less CPU time per call.
_LINK_OF_INCIDENT = select(Link).where(
    Link.connection == bindparam("connection"), Link.incident_id == bindparam("incident_id")
)
_LINKS_OF_INCIDENTS = select(Link).where(
    Link.connection == bindparam("connection"), Link.incident_id.in_(bindparam("incident_ids", expanding=True))
)
_ITEMS_OF_KINDS = select(SyncedItem).where(
    SyncedItem.connection == bindparam("connection"),
    SyncedItem.incident_id == bindparam("incident_id"),
    SyncedItem.kind.in_(bindparam("kinds", expanding=True)),
)
_FRESH_ASSETS = select(CachedAsset).where(
    CachedAsset.connection == bindparam("connection"),
    CachedAsset.asset_id.in_(bindparam("asset_ids", expanding=True)),
    CachedAsset.fetched_at > bindparam("fresh_after"),
)
_PARKED_ITEM = select(ParkedItem).where(
    ParkedItem.connection == bindparam("connection"),
    ParkedItem.kind == bindparam("kind"),
    ParkedItem.item_id == bindparam("item_id"),
)
_UNPARK = delete(ParkedItem).where(
    ParkedItem.connection == bindparam("connection"),
    ParkedItem.kind == bindparam("kind"),
    ParkedItem.item_id == bindparam("item_id"),
)


@lru_cache(maxsize=32)
def _link_update(columns: tuple[str, ...]) -> Update:
    """Build the UPDATE of one link that sets `columns` from the parameters `set_<column>`, once per column set."""
    table = Link.__table__
    return (
        update(table)
        .where(table.c.connection == bindparam("match_connection"), table.c.incident_id == bindparam("match_incident_id"))
        .values({name: bindparam(f"set_{name}", type_=table.c[name].type) for name in columns})
    )


@dataclass(frozen=True)
class StoreCounts:
    links: int
    pending_links: int
    synced_items: int
    parked_items: int


# SQLAlchemy's default wait for a pooled connection.
DEFAULT_POOL_TIMEOUT_SECONDS = 30.0

# Ids per `IN (...)` query: asyncpg accepts at most 32,767 parameters per
# statement and SQLite before 3.32 only 999, so long id lists go in chunks.
IN_CHUNK_SIZE = 500


def chunked(values: Iterable[str], size: int = IN_CHUNK_SIZE) -> Iterator[list[str]]:
    """Split ids into lists of at most `size`, skipping nothing."""
    batch: list[str] = []
    for value in values:
        batch.append(value)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _sorted_rows(
    keys: list[dict[str, object]], per_row: list[dict[str, object]] | None
) -> list[tuple[dict[str, object], dict[str, object]]]:
    """Pair each key with its own values, in key order.

    Two transactions that lock the same rows in different orders deadlock
    on PostgreSQL, so every writer takes the rows in the order of their keys.
    """
    rows = list(zip(keys, per_row or [{} for _ in keys], strict=True))
    rows.sort(key=lambda row: tuple(str(value) for value in row[0].values()))
    return rows


async def _upsert_by_reading(
    session: AsyncSession,
    model: type[Base],
    keys: list[dict[str, object]],
    *,
    inserted: dict[str, object],
    updated: dict[str, object],
    per_row: list[dict[str, object]] | None,
) -> None:
    """Upsert by reading each row first, for databases without INSERT ... ON CONFLICT."""
    for key, own in _sorted_rows(keys, per_row):
        row = await session.scalar(select(model).filter_by(**key))
        if row is None:
            session.add(model(**key, **inserted, **own))
            continue
        for name, value in {**updated, **own}.items():
            setattr(row, name, value)


def _item_key(connection: str, incident_id: str, kind: str, direction: str, source_id: str) -> dict[str, object]:
    """Return the columns of `uq_synced_items_source`, which name one synced item."""
    return {
        "connection": connection,
        "incident_id": incident_id,
        "kind": kind,
        "direction": direction,
        "source_id": source_id,
    }


# The dialects whose INSERT can end in ON CONFLICT ... DO UPDATE.
_UPSERT_DIALECTS = frozenset({"sqlite", "postgresql"})


@lru_cache(maxsize=64)
def _upsert_statement(
    preparer: IdentifierPreparer, table: Table, key: tuple[str, ...], inserted: tuple[str, ...], updated: tuple[str, ...]
) -> TextClause:
    """Build `INSERT ... ON CONFLICT (key) DO UPDATE` as text with typed parameters, once per shape.

    SQLAlchemy 2.0.58 does not cache the compiled form of the SQLite and
    PostgreSQL `insert()` constructs, so each call compiled them again,
    about 5% of the connector's CPU time in a backlog sync. Text with the
    columns' types keeps their bind processing (UtcDateTime) and is cached.
    The values to set take the parameter names `set_<column>`.
    """
    columns = [*key, *inserted]
    assignments = ", ".join(f"{preparer.quote(name)} = :set_{name}" for name in updated)
    sql = (
        f"INSERT INTO {preparer.format_table(table)} ({', '.join(preparer.quote(name) for name in columns)}) "
        f"VALUES ({', '.join(f':{name}' for name in columns)}) "
        f"ON CONFLICT ({', '.join(preparer.quote(name) for name in key)}) DO UPDATE SET {assignments}"
    )
    parameters = [bindparam(name, type_=table.c[name].type) for name in columns]
    parameters += [bindparam(f"set_{name}", type_=table.c[name].type) for name in updated]
    return text(sql).bindparams(*parameters)


def _enable_sqlite_pragmas(dbapi_connection: object, _record: object) -> None:
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    # WAL lets a `status` command read while `run` writes; busy_timeout makes
    # a second writer wait instead of failing at once with "database is locked".
    # The inline driver waits for locks in a thread of its own instead.
    cursor.execute("PRAGMA journal_mode=WAL")
    if not isinstance(dbapi_connection.driver_connection, inline_sqlite.InlineConnection):  # type: ignore[attr-defined]
        cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def alembic_config(url: str) -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(resources.files("mdr_connector.migrations")))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["configure_logger"] = False
    return config


class Store:
    """Async access to the ledger tables."""

    def __init__(self, url: str) -> None:
        self.url = url
        # A server such as PostgreSQL can close a pooled connection (restart,
        # idle timeout), so a checkout pings it first. An SQLite file cannot
        # go stale, and the ping would add a query to every transaction.
        parsed = make_url(url)
        on_sqlite = parsed.get_backend_name() == "sqlite"
        options: dict[str, object] = {"pool_pre_ping": not on_sqlite}
        if on_sqlite:
            try:
                lock_wait = inline_sqlite.lock_wait_of(parsed.query)
            except ValueError as err:
                raise ConfigError.from_template(
                    N_(
                        "invalid database URL: timeout={value} is not a number of seconds from 0 up; "
                        "set ?timeout=SECONDS, how long a statement waits for another process's lock, for example ?timeout=30"
                    ),
                    value=parsed.query.get("timeout"),
                ) from err
            # A statement waiting for another process's lock keeps its pooled
            # connection, so others may wait for a connection as long.
            options["pool_timeout"] = max(DEFAULT_POOL_TIMEOUT_SECONDS, lock_wait)
        self.engine: AsyncEngine = create_async_engine(url, **options)
        if self.engine.dialect.driver == "aiosqlite":
            event.listen(self.engine.sync_engine, "do_connect", inline_sqlite.use_inline_driver)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine.sync_engine, "connect", _enable_sqlite_pragmas)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    @classmethod
    async def open(cls, url: str, *, upgrade: bool = True) -> Store:
        """Open the database, creating the SQLite folder, and bring the schema to the newest revision."""
        try:
            parsed = make_url(url)
        except Exception as err:
            raise ConfigError(f"invalid database URL: {err}") from err
        if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
            from pathlib import Path

            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)

        store = cls(url)
        await store.check_schema(upgrade=upgrade)
        return store

    async def close(self) -> None:
        await self.engine.dispose()

    async def current_revision(self) -> str | None:
        async with self.engine.connect() as connection:
            return await connection.run_sync(
                lambda sync: MigrationContext.configure(sync).get_current_revision()
            )

    async def check_schema(self, *, upgrade: bool) -> None:
        """Reject a schema newer than this version supports; apply missing migrations when allowed."""
        script = ScriptDirectory.from_config(alembic_config(self.url))
        head = script.get_current_head()
        current = await self.current_revision()
        if current == head:
            return
        known = {revision.revision for revision in script.walk_revisions()}
        if current is not None and current not in known:
            raise ConfigError.from_template(
                N_(
                    "the database schema is at revision {current}, newer than this mdr-connector "
                    "knows ({head}); upgrade mdr-connector before running it against this database"
                ),
                current=current,
                head=head,
            )
        if not upgrade:
            raise ConfigError.from_template(
                N_("the database schema is at revision {current}, expected {head}; run `mdr-connector db upgrade`"),
                current=current or "none",
                head=head,
            )
        await self.upgrade()

    async def upgrade(
        self,
        *,
        lock_timeout_seconds: float = 5.0,
        attempts: int = 3,
        retry_pause_seconds: float = 5.0,
    ) -> None:
        """Apply every alembic migration up to the newest one.

        On PostgreSQL the run waits for any other run on the database to end
        first. A statement of the run that waits longer than
        `lock_timeout_seconds` for a table lock rolls the whole run back, so
        the queries of running instances do not queue behind it. The run is
        tried `attempts` times, `retry_pause_seconds` apart, and then raises
        ConfigError naming the fix.
        """
        config = alembic_config(self.url)
        config.attributes["lock_timeout_seconds"] = lock_timeout_seconds

        def upgrade_to_head() -> None:
            # alembic.context is one global per process, so two alembic
            # commands on threads of one process would use each other's
            # migration context. Other processes wait on PostgreSQL's lock.
            with _ALEMBIC_COMMAND_LOCK:
                command.upgrade(config, "head")

        for attempt in range(1, attempts + 1):
            try:
                # Alembic's command API is synchronous and its env.py runs its
                # own event loop, so it gets a thread of its own.
                await asyncio.to_thread(upgrade_to_head)
                break
            except DBAPIError as err:
                if getattr(err.orig, "sqlstate", None) != LOCK_NOT_AVAILABLE:
                    raise
                log.warning(
                    "store.schema.lock_timeout",
                    extra={"attempt": attempt, "attempts": attempts, "lock_timeout_seconds": lock_timeout_seconds},
                )
                if attempt == attempts:
                    raise ConfigError.from_template(
                        N_(
                            "the database upgrade waited more than {seconds} s for a table lock, {attempts} times; "
                            "a long transaction holds a lock on a table the migration changes. Find it in "
                            "pg_stat_activity, let it finish or end it, then run `mdr-connector db upgrade` again"
                        ),
                        seconds=lock_timeout_seconds,
                        attempts=attempts,
                    ) from err
                await asyncio.sleep(retry_pause_seconds)

        log.info("store.schema.upgraded", extra={"revision": await self.current_revision()})

    # Links

    async def get_link(self, connection: str, incident_id: str) -> Link | None:
        async with self.sessions() as session:
            return await session.scalar(_LINK_OF_INCIDENT, {"connection": connection, "incident_id": incident_id})

    async def get_links(self, connection: str, incident_ids: Iterable[str]) -> dict[str, Link]:
        links: dict[str, Link] = {}
        async with self.sessions() as session:
            for chunk in chunked(incident_ids):
                rows = await session.scalars(_LINKS_OF_INCIDENTS, {"connection": connection, "incident_ids": chunk})
                links.update((row.incident_id, row) for row in rows)
        return links

    async def get_links_by_ticket_ids(self, connection: str, ticket_ids: Iterable[str]) -> dict[str, Link]:
        links: dict[str, Link] = {}
        async with self.sessions() as session:
            for chunk in chunked(ticket_ids):
                rows = await session.scalars(
                    select(Link).where(Link.connection == connection, Link.ticket_id.in_(chunk))
                )
                links.update((row.ticket_id, row) for row in rows if row.ticket_id is not None)
        return links

    async def list_links(self, connection: str) -> list[Link]:
        """Return every link of a connection, pending ones included, oldest first."""
        async with self.sessions() as session:
            rows = await session.scalars(select(Link).where(Link.connection == connection).order_by(Link.id))
            return list(rows)

    async def start_create(self, connection: str, incident_id: str, incident_number: int) -> None:
        """Record the intent to create a ticket, before the create is sent.

        A link that exists keeps its incident number and creation time.
        """
        now = utc_now()
        intent = {"state": PENDING, "create_started_at": now, "updated_at": now}
        await self._upsert_rows(
            Link,
            [{"connection": connection, "incident_id": incident_id}],
            inserted={**intent, "incident_number": incident_number, "created_at": now},
            updated=intent,
        )

    async def drop_pending_create(self, connection: str, incident_id: str) -> None:
        """Forget a create intent that is known to have failed without creating anything."""
        async with self.sessions() as session, session.begin():
            await session.execute(
                delete(Link).where(
                    Link.connection == connection,
                    Link.incident_id == incident_id,
                    Link.state == PENDING,
                )
            )

    async def record_link(
        self,
        connection: str,
        incident_id: str,
        incident_number: int | None,
        *,
        ticket_key: str,
        ticket_id: str,
        ticket_url: str,
        fields_hash: str | None,
    ) -> Link:
        """Pair an incident with its ticket; called after the create, or after finding the ticket."""
        now = utc_now()
        key = {"connection": connection, "incident_id": incident_id}
        values = {
            "incident_number": incident_number,
            "state": LINKED,
            "ticket_key": ticket_key,
            "ticket_id": ticket_id,
            "ticket_url": ticket_url,
            "fields_hash": fields_hash,
            "updated_at": now,
        }
        async with self.sessions() as session, session.begin():
            await self._upsert_in(session, Link, [key], inserted={**values, "created_at": now}, updated=values)
            link = await session.scalar(_LINK_OF_INCIDENT, key)
        assert link is not None
        return link

    async def record_fields_written(self, connection: str, incident_id: str, fields_hash: str) -> None:
        await self._update_link(connection, incident_id, fields_hash=fields_hash)

    async def record_mdr_reconciled(
        self, connection: str, incident_id: str, update_time: int, mdr_status: str | None = None
    ) -> None:
        """Remember the incident version whose every change is now on the ticket, and its status when given."""
        values: dict[str, object] = {"mdr_update_time": update_time}
        if mdr_status is not None:
            values["mdr_status"] = mdr_status
        await self._update_link(connection, incident_id, **values)

    async def record_ticket_reconciled(self, connection: str, incident_id: str, updated: datetime) -> None:
        """Remember the ticket version whose every change is now in MDR."""
        await self._update_link(connection, incident_id, ticket_updated=updated)

    async def _update_link(self, connection: str, incident_id: str, **values: object) -> None:
        """Set columns of one link with one UPDATE statement. A missing link stays missing."""
        values = {**values, "updated_at": utc_now()}
        statement = _link_update(tuple(values))
        parameters = {f"set_{name}": value for name, value in values.items()}
        async with self.engine.begin() as database:
            await database.execute(
                statement, {**parameters, "match_connection": connection, "match_incident_id": incident_id}
            )

    # Synced items

    async def get_items(self, connection: str, incident_id: str, kind: str) -> list[SyncedItem]:
        async with self.sessions() as session:
            rows = await session.scalars(
                select(SyncedItem).where(
                    SyncedItem.connection == connection,
                    SyncedItem.incident_id == incident_id,
                    SyncedItem.kind == kind,
                )
            )
            return list(rows)

    async def get_items_of_kinds(
        self, connection: str, incident_id: str, kinds: Iterable[str]
    ) -> dict[str, list[SyncedItem]]:
        """Return the ledger rows of several kinds of one incident, read with one query, by kind.

        Every kind asked for is a key, with an empty list when it has no rows.
        """
        found: dict[str, list[SyncedItem]] = {kind: [] for kind in kinds}
        async with self.sessions() as session:
            rows = await session.scalars(
                _ITEMS_OF_KINDS, {"connection": connection, "incident_id": incident_id, "kinds": list(found)}
            )
            for row in rows:
                found[row.kind].append(row)
        return found

    async def start_item(
        self, connection: str, incident_id: str, kind: str, direction: str, source_id: str
    ) -> None:
        """Record the intent to copy one item, before the write is sent."""
        await self.start_items(connection, incident_id, kind, direction, [source_id])

    async def start_items(
        self, connection: str, incident_id: str, kind: str, direction: str, source_ids: Iterable[str]
    ) -> None:
        """Record the intents to copy several items of one incident in one transaction, before the first write is sent."""
        values = {"state": PENDING, "attempt_started_at": utc_now()}
        keys = [_item_key(connection, incident_id, kind, direction, source_id) for source_id in source_ids]
        await self._upsert_rows(SyncedItem, keys, inserted=values, updated=values)

    async def finish_item(
        self,
        connection: str,
        incident_id: str,
        kind: str,
        direction: str,
        source_id: str,
        target_id: str,
        source_version: str | None = None,
    ) -> None:
        """Record that an item exists on the other side as `target_id`, copied from `source_version`."""
        now = utc_now()
        values = {"state": DONE, "target_id": target_id, "done_at": now, "source_version": source_version}
        key = _item_key(connection, incident_id, kind, direction, source_id)
        # A row inserted here had no recorded intent, so its attempt starts now.
        await self._upsert(SyncedItem, key, inserted={**values, "attempt_started_at": now}, updated=values)

    async def finish_items(
        self, connection: str, incident_id: str, kind: str, direction: str, targets: dict[str, str]
    ) -> None:
        """Record in one transaction that several items of one incident exist on the other side: `targets` maps source id to target id."""
        now = utc_now()
        values = {"state": DONE, "done_at": now, "source_version": None}
        keys = [_item_key(connection, incident_id, kind, direction, source_id) for source_id in targets]
        per_row = [{"target_id": target_id} for target_id in targets.values()]
        await self._upsert_rows(
            SyncedItem, keys, inserted={**values, "attempt_started_at": now}, updated=values, per_row=per_row
        )

    async def find_item_by_target(self, connection: str, kind: str, target_id: str) -> SyncedItem | None:
        """Return the ledger row whose copy is `target_id`, if any."""
        async with self.sessions() as session:
            return await session.scalar(
                select(SyncedItem).where(
                    SyncedItem.connection == connection,
                    SyncedItem.kind == kind,
                    SyncedItem.target_id == target_id,
                )
            )

    async def _upsert(
        self, model: type[Base], key: dict[str, object], *, inserted: dict[str, object], updated: dict[str, object]
    ) -> None:
        """Insert a row with `key` and `inserted`, or set `updated` on the row that has `key`, in one transaction."""
        await self._upsert_rows(model, [key], inserted=inserted, updated=updated)

    async def _upsert_rows(
        self,
        model: type[Base],
        keys: list[dict[str, object]],
        *,
        inserted: dict[str, object],
        updated: dict[str, object],
        per_row: list[dict[str, object]] | None = None,
    ) -> None:
        """Upsert one row per key, all with the same `inserted` and `updated` values, in one transaction.

        Each key must be the columns of a unique constraint or the primary key.
        `per_row`, aligned with `keys`, adds values of each row's own to both
        its insert and its update; every entry names the same columns.
        SQLite and PostgreSQL do it with INSERT ... ON CONFLICT statements.
        Other databases read each row first.
        """
        if not keys:
            return
        upsert = self._upsert_plan(model, keys, inserted=inserted, updated=updated, per_row=per_row)
        if upsert is not None:
            async with self.engine.begin() as connection:
                await connection.execute(*upsert)
            return

        async with self.sessions() as session, session.begin():
            await _upsert_by_reading(session, model, keys, inserted=inserted, updated=updated, per_row=per_row)

    async def _upsert_in(
        self,
        session: AsyncSession,
        model: type[Base],
        keys: list[dict[str, object]],
        *,
        inserted: dict[str, object],
        updated: dict[str, object],
        per_row: list[dict[str, object]] | None = None,
    ) -> None:
        """Upsert as `_upsert_rows` does, inside the caller's transaction."""
        upsert = self._upsert_plan(model, keys, inserted=inserted, updated=updated, per_row=per_row)
        if upsert is not None:
            await session.execute(*upsert)
            return

        await _upsert_by_reading(session, model, keys, inserted=inserted, updated=updated, per_row=per_row)

    def _upsert_plan(
        self,
        model: type[Base],
        keys: list[dict[str, object]],
        *,
        inserted: dict[str, object],
        updated: dict[str, object],
        per_row: list[dict[str, object]] | None,
    ) -> tuple[TextClause, list[dict[str, object]]] | None:
        """Return the INSERT ... ON CONFLICT statement and its parameters, or None where the dialect has none."""
        dialect = self.engine.dialect
        if dialect.name not in _UPSERT_DIALECTS or not updated:
            return None

        rows = _sorted_rows(keys, per_row)
        own_columns = tuple(rows[0][1])
        statement = _upsert_statement(
            dialect.identifier_preparer,
            model.__table__,
            tuple(rows[0][0]),
            (*inserted, *own_columns),
            (*updated, *own_columns),
        )
        values = {**inserted, **{f"set_{name}": value for name, value in updated.items()}}
        parameters = [
            {**key, **values, **own, **{f"set_{name}": value for name, value in own.items()}} for key, own in rows
        ]
        return statement, parameters

    # Cursors

    async def get_cursor(self, connection: str, side: str) -> str | None:
        async with self.sessions() as session:
            row = await session.get(Cursor, (connection, side))
            return row.value if row else None

    async def set_cursor(self, connection: str, side: str, value: str) -> None:
        async with self.sessions() as session, session.begin():
            row = await session.get(Cursor, (connection, side))
            if row is None:
                row = Cursor(connection=connection, side=side)
                session.add(row)
            row.value = value
            row.updated_at = utc_now()

    # Parked items

    async def park(
        self, connection: str, kind: str, item_id: str, reason: str, next_try_at: datetime
    ) -> ParkedItem:
        """Record a failed item, or one more failure of it, with when to try it next."""
        now = utc_now()
        async with self.sessions() as session, session.begin():
            item = await session.scalar(_PARKED_ITEM, {"connection": connection, "kind": kind, "item_id": item_id})
            if item is None:
                item = ParkedItem(
                    connection=connection,
                    kind=kind,
                    item_id=item_id,
                    attempts=0,
                    first_failed_at=now,
                )
                session.add(item)
            item.attempts += 1
            item.reason = reason
            item.last_failed_at = now
            item.next_try_at = next_try_at
        return item

    async def get_parked(self, connection: str, kind: str, item_id: str) -> ParkedItem | None:
        async with self.sessions() as session:
            return await session.scalar(_PARKED_ITEM, {"connection": connection, "kind": kind, "item_id": item_id})

    async def unpark(self, connection: str, kind: str, item_id: str) -> None:
        async with self.engine.begin() as database:
            await database.execute(_UNPARK, {"connection": connection, "kind": kind, "item_id": item_id})

    async def due_parked(self, connection: str, kind: str, now: datetime, limit: int) -> list[ParkedItem]:
        async with self.sessions() as session:
            rows = await session.scalars(
                select(ParkedItem)
                .where(
                    ParkedItem.connection == connection,
                    ParkedItem.kind == kind,
                    ParkedItem.next_try_at <= now,
                )
                .order_by(ParkedItem.next_try_at)
                .limit(limit)
            )
            return list(rows)

    async def parked_item_ids(
        self, connection: str, kind: str, item_ids: Iterable[str], *, not_before: datetime | None
    ) -> set[str]:
        """Return which of `item_ids` are parked with their next try after `not_before`, or parked at all when it is None."""
        found: set[str] = set()
        async with self.sessions() as session:
            for chunk in chunked(item_ids):
                conditions = [ParkedItem.connection == connection, ParkedItem.kind == kind, ParkedItem.item_id.in_(chunk)]
                if not_before is not None:
                    conditions.append(ParkedItem.next_try_at > not_before)
                rows = await session.scalars(select(ParkedItem.item_id).where(*conditions))
                found.update(rows)
        return found

    async def list_parked(self, connection: str | None = None) -> list[ParkedItem]:
        async with self.sessions() as session:
            query = select(ParkedItem).order_by(ParkedItem.connection, ParkedItem.next_try_at)
            if connection is not None:
                query = query.where(ParkedItem.connection == connection)
            return list(await session.scalars(query))

    # Response decisions

    async def record_decision(
        self,
        connection: str,
        incident_id: str,
        response_id: str,
        decision: str,
        *,
        actor_id: str,
        actor_name: str,
        source: str,
        source_id: str | None,
        reason: str,
        outcome: str,
        error: str | None = None,
    ) -> ResponseDecision:
        """Record a decision before it is sent (outcome `pending`) or a refused one."""
        async with self.sessions() as session, session.begin():
            row = ResponseDecision(
                connection=connection,
                incident_id=incident_id,
                response_id=response_id,
                decision=decision,
                actor_id=actor_id,
                actor_name=actor_name,
                source=source,
                source_id=source_id,
                reason=reason,
                outcome=outcome,
                error=error,
                decided_at=utc_now(),
            )
            session.add(row)
        return row

    async def finish_decision(self, decision_id: int, outcome: str, error: str | None = None) -> None:
        """Record the outcome of sending a decision to MDR, with its error and send time."""
        async with self.sessions() as session, session.begin():
            row = await session.get(ResponseDecision, decision_id)
            if row is None:
                return
            row.outcome = outcome
            row.error = error
            row.sent_at = utc_now()

    async def list_decisions(
        self, connection: str, *, incident_id: str | None = None, response_id: str | None = None
    ) -> list[ResponseDecision]:
        async with self.sessions() as session:
            query = select(ResponseDecision).where(ResponseDecision.connection == connection)
            if incident_id is not None:
                query = query.where(ResponseDecision.incident_id == incident_id)
            if response_id is not None:
                query = query.where(ResponseDecision.response_id == response_id)
            return list(await session.scalars(query.order_by(ResponseDecision.id)))

    # Asset cache

    async def get_cached_assets(
        self, connection: str, asset_ids: Iterable[str], *, fresh_after: datetime
    ) -> dict[str, str]:
        """Return the cached JSON of the assets read after `fresh_after`, by asset id."""
        found: dict[str, str] = {}
        async with self.sessions() as session:
            for chunk in chunked(asset_ids):
                rows = await session.scalars(
                    _FRESH_ASSETS, {"connection": connection, "asset_ids": chunk, "fresh_after": fresh_after}
                )
                found.update((row.asset_id, row.data) for row in rows)
        return found

    async def put_cached_asset(self, connection: str, asset_id: str, data: str) -> None:
        values = {"data": data, "fetched_at": utc_now()}
        await self._upsert(CachedAsset, {"connection": connection, "asset_id": asset_id}, inserted=values, updated=values)

    # Status

    async def record_statuses(
        self, connection: str, incident_id: str, *, ticket_status: str | None = None, mdr_status: str | None = None
    ) -> None:
        """Record the status a side is now in, as seen or as set by the connector."""
        values: dict[str, object] = {}
        if ticket_status is not None:
            values["ticket_status"] = ticket_status
        if mdr_status is not None:
            values["mdr_status"] = mdr_status
        if values:
            await self._update_link(connection, incident_id, **values)

    # Reports

    async def count_parked(self, connection: str) -> int:
        """Count the parked items of a connection with one query that reads no other table."""
        async with self.sessions() as session:
            query = select(func.count()).select_from(ParkedItem).where(ParkedItem.connection == connection)
            return int(await session.scalar(query) or 0)

    async def ping(self) -> None:
        """Run a trivial query, which raises when the database cannot be reached."""
        async with self.engine.connect() as connection:
            await connection.execute(select(1))

    async def counts(self, connection: str) -> StoreCounts:
        async with self.sessions() as session:

            async def count(model: type[Base], *conditions: object) -> int:
                query = select(func.count()).select_from(model).where(
                    model.connection == connection, *conditions  # type: ignore[attr-defined]
                )
                return int(await session.scalar(query) or 0)

            return StoreCounts(
                links=await count(Link, Link.state == LINKED),
                pending_links=await count(Link, Link.state == PENDING),
                synced_items=await count(SyncedItem, SyncedItem.state == DONE),
                parked_items=await count(ParkedItem),
            )

    # Operator commands and retention

    async def list_cursors(self, connection: str) -> list[Cursor]:
        """Return every cursor of a connection, ordered by side."""
        async with self.sessions() as session:
            rows = await session.scalars(select(Cursor).where(Cursor.connection == connection).order_by(Cursor.side))
            return list(rows)

    async def list_incident_items(self, connection: str, incident_id: str) -> list[SyncedItem]:
        """Return the ledger rows of one incident, every kind, in the order their attempts started."""
        async with self.sessions() as session:
            rows = await session.scalars(
                select(SyncedItem)
                .where(SyncedItem.connection == connection, SyncedItem.incident_id == incident_id)
                .order_by(SyncedItem.attempt_started_at, SyncedItem.id)
            )
            return list(rows)

    async def closed_links(
        self, connection: str, *, mdr_status: str, updated_before: datetime, reconciled_before: int, limit: int
    ) -> list[Link]:
        """Return up to `limit` links in `mdr_status`, oldest first.

        A link qualifies when it last changed before `updated_before` and the
        MDR version reconciled into it is older than `reconciled_before`
        (epoch milliseconds).
        """
        async with self.sessions() as session:
            rows = await session.scalars(
                select(Link)
                .where(
                    Link.connection == connection,
                    Link.mdr_status == mdr_status,
                    Link.updated_at < updated_before,
                    Link.mdr_update_time < reconciled_before,
                )
                .order_by(Link.updated_at, Link.id)
                .limit(limit)
            )
            return list(rows)

    async def delete_incidents(
        self,
        connection: str,
        incident_ids: Iterable[str],
        *,
        parked: Iterable[tuple[str, str]] = (),
        item_scopes: Iterable[str] = (),
        with_decisions: bool = False,
    ) -> DeletedRows:
        """Delete the links and synced items of some incidents in one transaction, and return the deleted rows.

        `parked` names the parked entries to delete as (kind, item id) pairs.
        `item_scopes` adds synced items filed under another scope than an
        incident id. Response decisions go too when `with_decisions` is set.
        """
        incident_ids = list(dict.fromkeys(incident_ids))
        scopes = list(dict.fromkeys([*incident_ids, *item_scopes]))
        parked_by_kind: dict[str, list[str]] = {}
        for kind, item_id in parked:
            parked_by_kind.setdefault(kind, []).append(item_id)

        deleted = DeletedRows()
        async with self.sessions() as session, session.begin():
            for chunk in chunked(incident_ids):
                condition = and_(Link.connection == connection, Link.incident_id.in_(chunk))
                deleted.links += list(await session.scalars(select(Link).where(condition).order_by(Link.id)))
                await session.execute(delete(Link).where(condition))
                if with_decisions:
                    decision_condition = and_(
                        ResponseDecision.connection == connection, ResponseDecision.incident_id.in_(chunk)
                    )
                    deleted.decisions += list(
                        await session.scalars(
                            select(ResponseDecision).where(decision_condition).order_by(ResponseDecision.id)
                        )
                    )
                    await session.execute(delete(ResponseDecision).where(decision_condition))
            for chunk in chunked(scopes):
                condition = and_(SyncedItem.connection == connection, SyncedItem.incident_id.in_(chunk))
                deleted.items += list(
                    await session.scalars(
                        select(SyncedItem).where(condition).order_by(SyncedItem.attempt_started_at, SyncedItem.id)
                    )
                )
                await session.execute(delete(SyncedItem).where(condition))
            for kind, item_ids in parked_by_kind.items():
                for chunk in chunked(item_ids):
                    condition = and_(
                        ParkedItem.connection == connection, ParkedItem.kind == kind, ParkedItem.item_id.in_(chunk)
                    )
                    deleted.parked += list(await session.scalars(select(ParkedItem).where(condition)))
                    await session.execute(delete(ParkedItem).where(condition))
        return deleted

    async def copy_connection(self, target: Store, connection: str, batch_size: int = 1000) -> dict[str, int]:
        """Copy every ledger row of one connection into `target`, an empty ledger, and return the rows copied per table.

        Nothing is written to this ledger. Each table is read by one query
        and inserted in batches of `batch_size`, so while another process
        writes, the copied tables can show slightly different moments.
        """
        copied: dict[str, int] = {}
        async with self.engine.connect() as source:
            for model in (Link, SyncedItem, Cursor, ParkedItem, ResponseDecision, CachedAsset):
                table = model.__table__
                copied[table.name] = 0
                result = await source.stream(select(table).where(table.c.connection == connection))
                async for batch in result.mappings().partitions(batch_size):
                    async with target.engine.begin() as sink:
                        await sink.execute(insert(table), [dict(row) for row in batch])
                    copied[table.name] += len(batch)
        return copied

    # Parked items chosen by an operator (`mdr-connector parked`)

    async def find_parked(
        self, connections: Iterable[str], *, kind: str | None = None, item_ids: Iterable[str] | None = None
    ) -> list[ParkedItem]:
        """Return the parked items of `connections`, ordered by connection and next try.

        `kind` and `item_ids` narrow the result when given. An item id
        matches in every kind and connection that has it.
        """
        names = list(dict.fromkeys(connections))
        requested_ids = None if item_ids is None else list(dict.fromkeys(item_ids))
        conditions = [ParkedItem.connection.in_(names)]
        if kind is not None:
            conditions.append(ParkedItem.kind == kind)

        rows: list[ParkedItem] = []
        async with self.sessions() as session:
            if requested_ids is None:
                rows += await session.scalars(select(ParkedItem).where(*conditions))
            else:
                for chunk in chunked(requested_ids):
                    rows += await session.scalars(select(ParkedItem).where(*conditions, ParkedItem.item_id.in_(chunk)))
        return sorted(rows, key=lambda row: (row.connection, row.next_try_at, row.kind, row.item_id))

    async def make_parked_due(self, row_ids: Iterable[int], now: datetime) -> list[ParkedItem]:
        """Set the next try of the parked items with these row ids to `now`, and return the rows changed.

        The attempts and the reason stay, so a retry that fails again
        continues the backoff where it was.
        """
        changed: list[ParkedItem] = []
        async with self.sessions() as session, session.begin():
            for chunk in _id_chunks(row_ids):
                rows = list(await session.scalars(select(ParkedItem).where(ParkedItem.id.in_(chunk))))
                for row in rows:
                    row.next_try_at = now
                changed += rows
        return sorted(changed, key=lambda row: (row.connection, row.kind, row.item_id))

    async def drop_parked(self, row_ids: Iterable[int]) -> list[ParkedItem]:
        """Delete the parked items with these row ids in one transaction, and return the rows deleted.

        A row id that is gone, because a cycle synced the item meanwhile,
        is skipped.
        """
        dropped: list[ParkedItem] = []
        async with self.sessions() as session, session.begin():
            for chunk in _id_chunks(row_ids):
                dropped += list(await session.scalars(select(ParkedItem).where(ParkedItem.id.in_(chunk))))
                await session.execute(delete(ParkedItem).where(ParkedItem.id.in_(chunk)))
        return sorted(dropped, key=lambda row: (row.connection, row.kind, row.item_id))


def _id_chunks(row_ids: Iterable[int]) -> Iterator[list[int]]:
    """Split row ids into lists of at most IN_CHUNK_SIZE, as `chunked` does for string ids."""
    ids = list(dict.fromkeys(row_ids))
    for start in range(0, len(ids), IN_CHUNK_SIZE):
        yield ids[start : start + IN_CHUNK_SIZE]


@dataclass
class DeletedRows:
    """The ledger rows that `Store.delete_incidents` deleted."""

    links: list[Link] = field(default_factory=list)
    items: list[SyncedItem] = field(default_factory=list)
    parked: list[ParkedItem] = field(default_factory=list)
    decisions: list[ResponseDecision] = field(default_factory=list)
