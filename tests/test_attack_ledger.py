"""Attacks on the ledger upserts written as text statements and on the comment intents recorded in one transaction."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from fixtures_mdr import MDR_CLIENT_ID, MDR_CONNECTION_NAME
from fixtures_postgres import LEDGER_BACKENDS, scratch_database
from fixtures_sync import SyncHarness
from sqlalchemy import text
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from mdr_connector.connector import store as store_module
from mdr_connector.connector.engine import INCIDENT
from mdr_connector.connector.errors import ItemError, OutcomeUnknownError
from mdr_connector.connector.store import DONE, MDR_TO_TICKET, PENDING, Store

pytestmark = pytest.mark.asyncio

FIXED_NOW = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc)
# Quotes, a bind-parameter look-alike, a percent sign, a control character and non-ASCII text, within String(200).
ODD_ID = ("id:with 'quote' \"double\" %s :name $1 ; -- é中\x01 " + "x" * 300)[:200]


@pytest.fixture(params=LEDGER_BACKENDS)
def ledger_backend(request: pytest.FixtureRequest) -> str:
    return request.param


async def open_ledger(backend: str, tmp_path: Path, name: str, contexts: list[Any]) -> Store:
    if backend == "sqlite":
        return await Store.open(f"sqlite+aiosqlite:///{tmp_path / name}.db")
    context = scratch_database()
    url = await context.__aenter__()
    contexts.append(context)
    return await Store.open(url)


async def upsert_with_insert_construct(
    self: Store, model: Any, keys: list[dict[str, object]], *, inserted: dict[str, object], updated: dict[str, object]
) -> None:
    """Upsert as the code did before the text statements, through SQLAlchemy's dialect insert()."""
    insert_for_dialect = {"sqlite": sqlite_insert, "postgresql": postgresql_insert}[self.engine.dialect.name]
    async with self.engine.begin() as connection:
        for key in keys:
            statement = (
                insert_for_dialect(model).values(**key, **inserted).on_conflict_do_update(index_elements=list(key), set_=updated)
            )
            await connection.execute(statement)


async def write_and_read_raw(store: Store) -> list[tuple[Any, ...]]:
    """Write items and cached assets through every upsert caller, then read the stored values as the database keeps them."""
    await store.start_item("c", "inc", "comment", MDR_TO_TICKET, ODD_ID)
    await store.start_items("c", "inc", "comment", MDR_TO_TICKET, ["b", "a", ODD_ID])
    await store.finish_item("c", "inc", "comment", MDR_TO_TICKET, "a", "T1", None)
    await store.finish_item("c", "inc", "comment", MDR_TO_TICKET, "new", "T2", "v" * 64)
    await store.put_cached_asset("c", "asset-1", "{}")
    await store.put_cached_asset("c", "asset-1", "y" * 200_000)
    await store.put_cached_asset("c", ODD_ID, "")

    if store.engine.dialect.name == "sqlite":
        items = (
            "SELECT connection, incident_id, kind, direction, source_id, target_id, state, attempt_started_at,"
            " typeof(attempt_started_at), done_at, typeof(done_at), source_version FROM synced_items ORDER BY source_id"
        )
        assets = "SELECT connection, asset_id, data, fetched_at, typeof(fetched_at) FROM asset_cache ORDER BY asset_id"
    else:
        items = (
            "SELECT connection, incident_id, kind, direction, source_id, target_id, state, attempt_started_at::text,"
            " done_at::text, source_version FROM synced_items ORDER BY source_id"
        )
        assets = "SELECT connection, asset_id, data, fetched_at::text FROM asset_cache ORDER BY asset_id"
    async with store.engine.connect() as connection:
        rows = [tuple(row) for row in (await connection.execute(text(items))).all()]
        rows += [tuple(row) for row in (await connection.execute(text(assets))).all()]
    return rows


async def test_upsert_text_matches_insert_construct(
    ledger_backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The text statements store the same values, time formats and NULLs as SQLAlchemy's insert() did."""
    monkeypatch.setattr(store_module, "utc_now", lambda: FIXED_NOW)
    contexts: list[Any] = []
    try:
        current = await open_ledger(ledger_backend, tmp_path, "current", contexts)
        reference = await open_ledger(ledger_backend, tmp_path, "reference", contexts)
        try:
            stored = await write_and_read_raw(current)
            with monkeypatch.context() as patch:
                patch.setattr(Store, "_upsert_rows", upsert_with_insert_construct)
                expected = await write_and_read_raw(reference)

            assert len(stored) == 6
            assert stored == expected
            fresh = await current.get_cached_assets("c", ["asset-1", ODD_ID], fresh_after=datetime(2026, 1, 2, tzinfo=timezone.utc))
            assert fresh == {"asset-1": "y" * 200_000, ODD_ID: ""}
            stale = await current.get_cached_assets("c", ["asset-1"], fresh_after=FIXED_NOW)
            assert stale == {}
        finally:
            await current.close()
            await reference.close()
    finally:
        for context in contexts:
            await context.__aexit__(None, None, None)


async def test_start_items_reading_first_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ON CONFLICT, start_items inserts new rows, repeats an id harmlessly and leaves done rows' targets alone."""
    monkeypatch.setattr(store_module, "_UPSERT_DIALECTS", frozenset())
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}")
    try:
        await check_reading_first(store)
    finally:
        await store.close()


async def check_reading_first(store: Store) -> None:
    await store.finish_item("main", "inc-1", "comment", MDR_TO_TICKET, "c1", "10100")

    await store.start_items("main", "inc-1", "comment", MDR_TO_TICKET, ["c2", "c1", "c2"])

    items = {item.source_id: item for item in await store.get_items("main", "inc-1", "comment")}
    assert sorted(items) == ["c1", "c2"]
    assert items["c2"].state == PENDING
    assert items["c2"].target_id is None
    assert items["c1"].state == PENDING
    assert items["c1"].target_id == "10100"


async def test_start_items_opposite_orders_postgresql() -> None:
    """Two writers that record the same intents in opposite orders both commit on PostgreSQL instead of deadlocking."""
    async with scratch_database() as url:
        first = await Store.open(url)
        second = await Store.open(url)
        try:
            source_ids = [f"c{number:03d}" for number in range(200)]
            for round_number in range(3):
                incident_id = f"inc-{round_number}"
                results = await asyncio.gather(
                    first.start_items("main", incident_id, "comment", MDR_TO_TICKET, source_ids),
                    second.start_items("main", incident_id, "comment", MDR_TO_TICKET, source_ids[::-1]),
                    return_exceptions=True,
                )
                assert results == [None, None]
                items = await first.get_items("main", incident_id, "comment")
                assert len(items) == 200
        finally:
            await first.close()
            await second.close()


# Comment copies through the engine, the MDR simulator and Jira


def marker_counts(issue: Any) -> Counter:
    counts = Counter(comment.properties.get("mdr-connector", {}).get("source_id") for comment in issue.comments)
    counts.pop(None, None)
    return counts


def add_soc_comments(harness: SyncHarness, incident_id: str, count: int) -> list[str]:
    return [
        harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, f"<p>SOC note {number}</p>", author="SOC Analyst")[
            "comment_id"
        ]
        for number in range(count)
    ]


async def comment_rows(harness: SyncHarness, incident_id: str) -> dict[str, tuple[str, str | None]]:
    rows = await harness.store.get_items(harness.connection.name, incident_id, "comment")
    return {row.source_id: (row.state, row.target_id) for row in rows if row.direction == MDR_TO_TICKET}


async def test_crash_before_first_post(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Intents recorded, then the process dies before the first post: later cycles post each comment once."""
    incident_id = harness.seed()["incident_id"]
    comment_ids = add_soc_comments(harness, incident_id, 3)
    sync = await harness.engine()

    async def crash(ref: Any, draft: Any) -> Any:
        raise OutcomeUnknownError("process killed before the request was sent")

    monkeypatch.setattr(sync.tickets, "add_comment", crash)
    await harness.cycles(1, sync)
    monkeypatch.undo()
    assert set((await comment_rows(harness, incident_id)).values()) == {(PENDING, None)}

    harness.advance(60)
    await harness.cycles(2, sync)

    assert marker_counts(harness.issue_for(incident_id)) == Counter({comment_id: 1 for comment_id in comment_ids})
    rows = await comment_rows(harness, incident_id)
    assert {source_id: state for source_id, (state, _) in rows.items()} == {comment_id: DONE for comment_id in comment_ids}
    assert await harness.store.get_parked("main", INCIDENT, incident_id) is None


async def test_last_reply_lost_before_finish(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last of three posts lands but its reply is lost: the next cycle records it from its marker, posting nothing."""
    incident_id = harness.seed()["incident_id"]
    comment_ids = add_soc_comments(harness, incident_id, 3)
    sync = await harness.engine()
    real_add = sync.tickets.add_comment
    posts: list[str] = []

    async def last_reply_lost(ref: Any, draft: Any) -> Any:
        posted = await real_add(ref, draft)
        posts.append(draft.marker.source_id)
        if len(posts) == 3:
            raise OutcomeUnknownError("connection dropped after the request was sent")
        return posted

    monkeypatch.setattr(sync.tickets, "add_comment", last_reply_lost)
    await harness.cycles(1, sync)
    monkeypatch.undo()
    harness.advance(60)
    await harness.cycles(2, sync)

    assert posts == comment_ids
    assert marker_counts(harness.issue_for(incident_id)) == Counter({comment_id: 1 for comment_id in comment_ids})
    assert {state for state, _ in (await comment_rows(harness, incident_id)).values()} == {DONE}


async def test_rejected_copy_between_others(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Jira rejects the middle copy once: the others land, the incident is parked, and the retry posts it once."""
    incident_id = harness.seed()["incident_id"]
    comment_ids = add_soc_comments(harness, incident_id, 3)
    sync = await harness.engine()
    real_add = sync.tickets.add_comment

    async def reject_middle(ref: Any, draft: Any) -> Any:
        if draft.marker.source_id == comment_ids[1]:
            raise ItemError("comment body rejected")
        return await real_add(ref, draft)

    monkeypatch.setattr(sync.tickets, "add_comment", reject_middle)
    await harness.cycles(1, sync)
    monkeypatch.undo()

    assert marker_counts(harness.issue_for(incident_id)) == Counter({comment_ids[0]: 1, comment_ids[2]: 1})
    assert (await comment_rows(harness, incident_id))[comment_ids[1]] == (PENDING, None)
    assert await harness.store.get_parked("main", INCIDENT, incident_id) is not None

    harness.advance(3600)
    await harness.cycles(2, sync)

    assert marker_counts(harness.issue_for(incident_id)) == Counter({comment_id: 1 for comment_id in comment_ids})
    assert await harness.store.get_parked("main", INCIDENT, incident_id) is None


async def test_undraftable_copy_gets_no_row(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A comment that cannot be drafted (too long to split) gets no pending row, and the others are copied once."""
    incident_id = harness.seed()["incident_id"]
    comment_ids = add_soc_comments(harness, incident_id, 3)
    sync = await harness.engine()
    real_drafts = sync.comments._ticket_drafts

    async def middle_too_long(comment: Any) -> Any:
        if comment.comment_id == comment_ids[1]:
            raise ItemError("the comment has more characters than 10 ticket comments can hold")
        return await real_drafts(comment)

    monkeypatch.setattr(sync.comments, "_ticket_drafts", middle_too_long)
    await harness.cycles(1, sync)

    assert marker_counts(harness.issue_for(incident_id)) == Counter({comment_ids[0]: 1, comment_ids[2]: 1})
    rows = await comment_rows(harness, incident_id)
    assert comment_ids[1] not in rows
    assert rows[comment_ids[0]][0] == DONE
    assert rows[comment_ids[2]][0] == DONE
    assert await harness.store.get_parked("main", INCIDENT, incident_id) is not None


async def test_landed_copy_and_echo_mixed_in(harness: SyncHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy landed by a lost reply, an echo and new comments: each SOC comment gets one copy and the echo none."""
    incident_id = harness.seed()["incident_id"]
    first_ids = add_soc_comments(harness, incident_id, 1)
    sync = await harness.engine()
    real_add = sync.tickets.add_comment

    async def reply_lost(ref: Any, draft: Any) -> Any:
        await real_add(ref, draft)
        raise OutcomeUnknownError("connection dropped after the request was sent")

    monkeypatch.setattr(sync.tickets, "add_comment", reply_lost)
    await harness.cycles(1, sync)
    monkeypatch.undo()
    later_ids = [
        harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, f"<p>later {number}</p>", author="SOC Analyst")[
            "comment_id"
        ]
        for number in range(2)
    ]
    echo_id = harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, "<p>echo</p>", author=MDR_CONNECTION_NAME)[
        "comment_id"
    ]
    harness.advance(60)
    await harness.cycles(2, sync)

    expected = Counter({comment_id: 1 for comment_id in [*first_ids, *later_ids]})
    assert marker_counts(harness.issue_for(incident_id)) == expected
    assert echo_id not in await comment_rows(harness, incident_id)
    assert {state for state, _ in (await comment_rows(harness, incident_id)).values()} == {DONE}
