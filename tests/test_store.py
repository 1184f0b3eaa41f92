"""The ledger: migrations, links, synced items, cursors and parked items."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from fixtures_postgres import scratch_database
from sqlalchemy import text

from mdr_connector.connector import store as store_module
from mdr_connector.connector.errors import ConfigError
from mdr_connector.connector.store import DONE, LINKED, MDR_TO_TICKET, PENDING, TICKET_TO_MDR, Store


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path):
    """The store on SQLite, and on PostgreSQL when a server is reachable (required under CI=true)."""
    if request.param == "sqlite":
        opened = await Store.open(f"sqlite+aiosqlite:///{tmp_path}/db/ledger.db")
        yield opened
        await opened.close()
        return

    async with scratch_database() as url:
        opened = await Store.open(url)
        try:
            yield opened
        finally:
            await opened.close()


async def test_open_creates_schema(store: Store) -> None:
    """Opening a new database applies the migrations up to the newest revision."""
    assert await store.current_revision() == "0003"


async def test_newer_schema_is_refused(store: Store) -> None:
    """A database migrated by a newer version is refused with the fix named."""
    async with store.engine.begin() as connection:
        await connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))

    with pytest.raises(ConfigError, match="newer than this mdr-connector knows"):
        await store.check_schema(upgrade=True)


async def test_create_intent_then_link(store: Store) -> None:
    """A create intent is pending until the ticket is recorded, then linked."""
    await store.start_create("main", "inc-1", 42)
    pending = await store.get_link("main", "inc-1")
    assert pending is not None
    assert pending.state == PENDING
    assert pending.create_started_at is not None

    await store.record_link(
        "main", "inc-1", 42, ticket_key="SEC-1", ticket_id="10001", ticket_url="https://j/SEC-1", fields_hash="abc"
    )
    linked = await store.get_link("main", "inc-1")
    assert linked.state == LINKED
    assert linked.ticket_key == "SEC-1"
    assert (await store.get_links_by_ticket_ids("main", ["10001"]))["10001"].incident_id == "inc-1"


async def test_failed_create_intent_is_dropped(store: Store) -> None:
    """A pending intent can be dropped, but a linked row is never dropped that way."""
    await store.start_create("main", "inc-1", 1)
    await store.drop_pending_create("main", "inc-1")
    assert await store.get_link("main", "inc-1") is None

    await store.record_link("main", "inc-2", 2, ticket_key="SEC-2", ticket_id="2", ticket_url="u", fields_hash=None)
    await store.drop_pending_create("main", "inc-2")
    assert (await store.get_link("main", "inc-2")).state == LINKED


@pytest.mark.parametrize("upsert", [True, False], ids=["on-conflict", "reading-first"])
async def test_link_rewrites_keep_origin(store: Store, monkeypatch: pytest.MonkeyPatch, upsert: bool) -> None:
    """A second create intent and a relink keep the link's row, number and creation time, and update the rest."""
    if not upsert:
        monkeypatch.setattr(store_module, "_UPSERT_DIALECTS", frozenset())
    await store.start_create("main", "inc-1", 42)
    first = await store.get_link("main", "inc-1")
    await store.start_create("main", "inc-1", 99)
    again = await store.get_link("main", "inc-1")
    assert again.id == first.id
    assert again.incident_number == 42
    assert again.created_at == first.created_at
    assert again.create_started_at > first.create_started_at

    linked = await store.record_link(
        "main", "inc-1", 43, ticket_key="SEC-1", ticket_id="1", ticket_url="u1", fields_hash="h1"
    )
    assert (linked.id, linked.created_at) == (first.id, first.created_at)
    assert (linked.state, linked.incident_number, linked.ticket_key, linked.fields_hash) == (LINKED, 43, "SEC-1", "h1")

    relinked = await store.record_link(
        "main", "inc-1", 43, ticket_key="SEC-2", ticket_id="2", ticket_url="u2", fields_hash=None
    )
    assert relinked.id == first.id
    assert (relinked.ticket_key, relinked.ticket_id, relinked.fields_hash) == ("SEC-2", "2", None)
    assert relinked.updated_at >= linked.updated_at
    assert (await store.get_link("main", "inc-1")).ticket_url == "u2"

    fresh = await store.record_link("main", "inc-2", 7, ticket_key="SEC-3", ticket_id="3", ticket_url="u3", fields_hash=None)
    assert fresh.id != first.id
    assert (fresh.state, fresh.incident_number, fresh.created_at) == (LINKED, 7, fresh.updated_at)


async def test_item_pending_then_done(store: Store) -> None:
    """A synced item moves from pending to done with its target id, once per source id."""
    await store.start_item("main", "inc-1", "comment", MDR_TO_TICKET, "c1")
    await store.start_item("main", "inc-1", "comment", MDR_TO_TICKET, "c1")
    [item] = await store.get_items("main", "inc-1", "comment")
    assert item.state == PENDING

    await store.finish_item("main", "inc-1", "comment", MDR_TO_TICKET, "c1", "10100")
    [item] = await store.get_items("main", "inc-1", "comment")
    assert (item.state, item.target_id) == (DONE, "10100")


async def test_items_started_together(store: Store) -> None:
    """Several intents are recorded in one call, each as its own pending row, and a second call changes no row count."""
    await store.start_items("main", "inc-1", "comment", MDR_TO_TICKET, ["c1", "c2", "c3"])
    await store.finish_item("main", "inc-1", "comment", MDR_TO_TICKET, "c1", "10100")
    await store.start_items("main", "inc-1", "comment", MDR_TO_TICKET, ["c2", "c3"])

    items = {item.source_id: item for item in await store.get_items("main", "inc-1", "comment")}
    assert sorted(items) == ["c1", "c2", "c3"]
    assert items["c1"].state == DONE
    assert (items["c2"].state, items["c3"].state) == (PENDING, PENDING)
    assert items["c2"].attempt_started_at == items["c3"].attempt_started_at


async def test_items_finished_together(store: Store) -> None:
    """Several copies are recorded as done in one call, each with its own target, with or without a recorded intent."""
    await store.start_items("main", "inc-1", "comment", MDR_TO_TICKET, ["c1", "c2"])
    [started, _] = await store.get_items("main", "inc-1", "comment")

    await store.finish_items("main", "inc-1", "comment", MDR_TO_TICKET, {"c2": "10200", "c1": "10100", "c3": "10300"})

    items = {item.source_id: item for item in await store.get_items("main", "inc-1", "comment")}
    assert {source_id: (item.state, item.target_id) for source_id, item in items.items()} == {
        "c1": (DONE, "10100"),
        "c2": (DONE, "10200"),
        "c3": (DONE, "10300"),
    }
    assert items[started.source_id].attempt_started_at == started.attempt_started_at
    assert items["c3"].attempt_started_at is not None
    assert items["c3"].done_at == items["c1"].done_at


async def test_item_upsert_keeps_other_columns(store: Store) -> None:
    """Each item write sets only its own columns of the existing row and leaves the others as they were."""
    await store.start_item("main", "inc-1", "comment", MDR_TO_TICKET, "c1")
    [started] = await store.get_items("main", "inc-1", "comment")

    await store.finish_item("main", "inc-1", "comment", MDR_TO_TICKET, "c1", "10100", source_version="v1")
    [done] = await store.get_items("main", "inc-1", "comment")
    assert done.id == started.id
    assert done.attempt_started_at == started.attempt_started_at
    assert done.done_at is not None
    assert done.source_version == "v1"

    # A new attempt on a copied item, as an edit makes, keeps the copy's target and version.
    await store.start_item("main", "inc-1", "comment", MDR_TO_TICKET, "c1")
    [again] = await store.get_items("main", "inc-1", "comment")
    assert again.state == PENDING
    assert (again.target_id, again.source_version, again.done_at) == ("10100", "v1", done.done_at)
    assert again.attempt_started_at >= done.attempt_started_at


async def test_item_upsert_reading_first(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a database without ON CONFLICT, item writes read the row first and set the same columns."""
    monkeypatch.setattr(store_module, "_UPSERT_DIALECTS", frozenset())
    await store.start_item("main", "inc-1", "comment", MDR_TO_TICKET, "c1")
    [started] = await store.get_items("main", "inc-1", "comment")
    assert started.state == PENDING

    await store.finish_item("main", "inc-1", "comment", MDR_TO_TICKET, "c1", "10100", source_version="v1")
    [done] = await store.get_items("main", "inc-1", "comment")
    assert (done.state, done.target_id) == (DONE, "10100")
    assert done.attempt_started_at == started.attempt_started_at

    await store.start_item("main", "inc-1", "comment", MDR_TO_TICKET, "c1")
    [again] = await store.get_items("main", "inc-1", "comment")
    assert again.id == started.id
    assert again.state == PENDING
    assert (again.target_id, again.source_version) == ("10100", "v1")

    await store.finish_item("main", "inc-1", "comment", MDR_TO_TICKET, "c2", "10101")
    [new] = [item for item in await store.get_items("main", "inc-1", "comment") if item.source_id == "c2"]
    assert (new.state, new.attempt_started_at) == (DONE, new.done_at)


async def test_item_finished_without_intent(store: Store) -> None:
    """An item recorded as done with no intent before gets a row whose attempt starts at its finish."""
    await store.finish_item("main", "inc-1", "comment", MDR_TO_TICKET, "c1", "10100")
    [item] = await store.get_items("main", "inc-1", "comment")
    assert (item.state, item.target_id) == (DONE, "10100")
    assert item.attempt_started_at == item.done_at


async def test_items_of_kinds_in_one_read(store: Store) -> None:
    """Rows of several kinds come back by kind, each asked kind present, other kinds and incidents left out."""
    await store.finish_item("main", "inc-1", "comment", MDR_TO_TICKET, "c1", "t1")
    await store.finish_item("main", "inc-1", "comment", TICKET_TO_MDR, "c2", "t2")
    await store.finish_item("main", "inc-1", "attachment", MDR_TO_TICKET, "a1", "t3")
    await store.finish_item("main", "inc-2", "comment", MDR_TO_TICKET, "c3", "t4")

    rows = await store.get_items_of_kinds("main", "inc-1", ("comment", "comment_change"))
    assert sorted(rows) == ["comment", "comment_change"]
    assert sorted(row.source_id for row in rows["comment"]) == ["c1", "c2"]
    assert rows["comment_change"] == []


async def test_link_update_sets_only_given_columns(store: Store) -> None:
    """Recording a reconciled version changes that column and the update time, and a missing link stays missing."""
    await store.record_link("main", "inc-1", 1, ticket_key="SEC-1", ticket_id="1", ticket_url="u", fields_hash="abc")
    before = await store.get_link("main", "inc-1")

    await store.record_mdr_reconciled("main", "inc-1", 1700000000000, mdr_status="Closed")
    after = await store.get_link("main", "inc-1")
    assert (after.mdr_update_time, after.mdr_status) == (1700000000000, "Closed")
    assert (after.fields_hash, after.ticket_key, after.state) == ("abc", "SEC-1", LINKED)
    assert after.updated_at >= before.updated_at
    assert after.updated_at.tzinfo is not None

    await store.record_mdr_reconciled("main", "inc-missing", 1)
    assert await store.get_link("main", "inc-missing") is None


async def test_cached_asset_is_replaced(store: Store) -> None:
    """A second read of an asset replaces the cached data and its read time."""
    old = datetime.now(timezone.utc) - timedelta(seconds=1)
    await store.put_cached_asset("main", "asset-1", '{"v": 1}')
    await store.put_cached_asset("main", "asset-1", '{"v": 2}')
    assert await store.get_cached_assets("main", ["asset-1"], fresh_after=old) == {"asset-1": '{"v": 2}'}


async def test_cursor_round_trip(store: Store) -> None:
    """Cursors are stored per connection and side."""
    assert await store.get_cursor("main", "mdr") is None
    await store.set_cursor("main", "mdr", "1768219992478")
    await store.set_cursor("other", "mdr", "1")
    assert await store.get_cursor("main", "mdr") == "1768219992478"


async def test_parked_item_backoff(store: Store) -> None:
    """A parked item counts its attempts and is due only from its next try."""
    now = datetime.now(timezone.utc)
    await store.park("main", "incident", "inc-1", "boom", now + timedelta(minutes=5))
    await store.park("main", "incident", "inc-1", "boom again", now - timedelta(seconds=1))

    [due] = await store.due_parked("main", "incident", now, limit=10)
    assert (due.item_id, due.attempts, due.reason) == ("inc-1", 2, "boom again")

    await store.unpark("main", "incident", "inc-1")
    assert await store.due_parked("main", "incident", now, limit=10) == []
    assert (await store.counts("main")).parked_items == 0


async def test_naive_datetime_is_rejected(store: Store) -> None:
    """Times must be timezone-aware, so no local time slips into the ledger."""
    with pytest.raises(Exception, match="naive datetime"):
        await store.park("main", "incident", "inc-1", "x", datetime(2026, 1, 1))


async def test_lookups_take_many_ids(store: Store) -> None:
    """Link and parked lookups accept more ids than one statement may carry on PostgreSQL."""
    await store.record_link("main", "inc-1", 1, ticket_key="SEC-1", ticket_id="39999", ticket_url="u", fields_hash=None)
    ids = [str(number) for number in range(40_000)]

    found = await store.get_links_by_ticket_ids("main", ids)
    parked = await store.parked_item_ids("main", "incident", ids, not_before=datetime.now(timezone.utc))

    assert list(found) == ["39999"]
    assert parked == set()
