"""Schema upgrades on PostgreSQL while other upgrades and running instances use the same database."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml
from alembic import command
from alembic.script import ScriptDirectory
from fixtures_postgres import scratch_database
from sqlalchemy import text

from mdr_connector.connector.errors import ConfigError
from mdr_connector.connector.store import MDR_TO_TICKET, Store, alembic_config

# Generous bounds for waits that end within a second when the code works.
DEADLINE_SECONDS = 60
WRITER = "upgrade-writer"


@pytest.fixture
async def database_url() -> AsyncIterator[str]:
    """An empty scratch PostgreSQL database."""
    async with scratch_database() as url:
        yield url


def head_revision(url: str) -> str:
    return ScriptDirectory.from_config(alembic_config(url)).get_current_head()


async def migrate_to(url: str, revision: str) -> None:
    """Bring the schema to `revision`, as an older mdr-connector left it."""
    # env.py starts an event loop of its own, so alembic runs in a thread.
    await asyncio.to_thread(command.upgrade, alembic_config(url), revision)


async def version_rows(url: str) -> list[str]:
    store = Store(url)
    try:
        async with store.engine.connect() as connection:
            return list((await connection.execute(text("SELECT version_num FROM alembic_version"))).scalars())
    finally:
        await store.close()


async def wait_for_count(counter: list[int], minimum: int) -> None:
    """Poll until counter[0] reaches `minimum`."""
    async with asyncio.timeout(DEADLINE_SECONDS):
        while counter[0] < minimum:
            await asyncio.sleep(0.01)


def write_cli_config(tmp_path: Path, database_url: str) -> Path:
    """A config whose ledger is `database_url`; its MDR and Jira addresses are never contacted by these tests."""
    token_dir = tmp_path / "tokens"
    token_dir.mkdir(mode=0o700, exist_ok=True)
    document = {
        "data_dir": str(tmp_path / "data"),
        "database_url": database_url,
        "connections": [
            {
                "name": "main",
                "mdr": {
                    "base_url": "http://127.0.0.1:9",
                    "client_id": "upgrade-client",
                    "connection_name": "upgrade",
                    "token_dir": str(token_dir),
                },
                "ticket": {
                    "system": "jira",
                    "url": "http://127.0.0.1:9",
                    "auth": {"type": "api_token", "email": "bot@example.com", "token": {"env": "MDR_UPGRADE_TEST_UNSET"}},
                },
            }
        ],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


async def run_cli(*args: str) -> tuple[int, str, str]:
    """Run `python -m mdr_connector.connector.cli ARGS` in English and return (exit code, stdout, stderr)."""
    environment = {**os.environ, "LANG": "C.UTF-8"}
    environment.pop("MDR_CONNECTOR_LANG", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mdr_connector.connector.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=environment,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), DEADLINE_SECONDS)
    return process.returncode, stdout.decode(), stderr.decode()


async def test_concurrent_upgrades_apply_once(database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Four upgrades started at once on an empty database all succeed and run each migration once."""
    caplog.set_level(logging.INFO, logger="alembic.runtime.migration")
    stores = [Store(database_url) for _ in range(4)]
    try:
        await asyncio.wait_for(asyncio.gather(*(store.upgrade() for store in stores)), DEADLINE_SECONDS)
    finally:
        for store in stores:
            await store.close()

    applied = [record.getMessage() for record in caplog.records if record.getMessage().startswith("Running upgrade")]
    revisions = list(ScriptDirectory.from_config(alembic_config(database_url)).walk_revisions())
    assert len(applied) == len(revisions), applied
    assert await version_rows(database_url) == [head_revision(database_url)]


async def test_concurrent_cli_upgrades(database_url: str, tmp_path: Path) -> None:
    """Four `db upgrade` processes started at once on an empty database all exit 0 at the newest revision."""
    config = write_cli_config(tmp_path, database_url)
    head = head_revision(database_url)

    results = await asyncio.gather(*(run_cli("--config", str(config), "db", "upgrade") for _ in range(4)))

    for code, out, err in results:
        assert code == 0, err
        assert f"database schema is at revision {head}" in out
    assert await version_rows(database_url) == [head]


async def test_upgrade_beside_running_writer(database_url: str) -> None:
    """An upgrade from 0002 to the newest revision runs while a store keeps writing, and no write fails."""
    await migrate_to(database_url, "0002")
    # Store() skips the schema check of Store.open, as an instance of the 0002 version would.
    writer_store = Store(database_url)
    writes = [0]
    errors: list[BaseException] = []
    stop = asyncio.Event()

    async def write_loop() -> None:
        while not stop.is_set():
            number = writes[0]
            incident_id = f"inc-{number}"
            try:
                await writer_store.start_create(WRITER, incident_id, number)
                await writer_store.record_link(
                    WRITER, incident_id, number,
                    ticket_key=f"SEC-{number}", ticket_id=str(number), ticket_url=f"https://jira/SEC-{number}",
                    fields_hash="hash",
                )
                await writer_store.start_item(WRITER, incident_id, "comment", MDR_TO_TICKET, f"c-{number}")
                await writer_store.finish_item(WRITER, incident_id, "comment", MDR_TO_TICKET, f"c-{number}", f"t-{number}")
                await writer_store.set_cursor(WRITER, "mdr", str(number))
            except Exception as err:  # noqa: BLE001 - every failed write is a finding of this test
                errors.append(err)
                return
            writes[0] += 1

    writer = asyncio.create_task(write_loop())
    upgrader = Store(database_url)
    try:
        await wait_for_count(writes, 3)
        await asyncio.wait_for(upgrader.upgrade(), DEADLINE_SECONDS)
        after_upgrade = writes[0]
        await wait_for_count(writes, after_upgrade + 3)
    finally:
        stop.set()
        await asyncio.wait_for(writer, DEADLINE_SECONDS)
        await upgrader.close()

    try:
        assert errors == []
        link = await writer_store.get_link(WRITER, f"inc-{writes[0] - 1}")
        assert link is not None
        assert link.ticket_key == f"SEC-{writes[0] - 1}"
        assert await writer_store.get_cursor(WRITER, "mdr") == str(writes[0] - 1)
    finally:
        await writer_store.close()
    assert await version_rows(database_url) == [head_revision(database_url)]


async def test_locked_table_fails_upgrade(database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """A long transaction on a table the upgrade alters makes it fail with the fix named, without blocking readers.

    0002 adds columns to synced_items, so its ALTER TABLE waits for the
    transaction that read the table. Without the lock timeout the upgrade
    would wait until that transaction ends, and the readers queued behind
    the ALTER TABLE with it: the test would then fail on its deadline.
    """
    caplog.set_level(logging.WARNING, logger="mdr_connector.connector.store")
    await migrate_to(database_url, "0001")
    holder_store = Store(database_url)
    reader_store = Store(database_url)
    upgrader = Store(database_url)
    reads = [0]
    reader_errors: list[BaseException] = []
    stop = asyncio.Event()

    async def read_loop() -> None:
        while not stop.is_set():
            try:
                async with reader_store.engine.connect() as connection:
                    await connection.execute(text("SELECT count(*) FROM synced_items"))
            except Exception as err:  # noqa: BLE001 - every failed read is a finding of this test
                reader_errors.append(err)
                return
            reads[0] += 1
            await asyncio.sleep(0.01)

    reader = None
    try:
        async with holder_store.engine.connect() as holder:
            # The read takes a lock on synced_items that lasts until the transaction ends.
            await holder.execute(text("SELECT count(*) FROM synced_items"))
            reader = asyncio.create_task(read_loop())
            await wait_for_count(reads, 1)

            with pytest.raises(ConfigError, match="waited more than 0.2 s for a table lock, 3 times") as raised:
                await asyncio.wait_for(
                    upgrader.upgrade(lock_timeout_seconds=0.2, attempts=3, retry_pause_seconds=0.1),
                    DEADLINE_SECONDS,
                )

            after_failure = reads[0]
            await wait_for_count(reads, after_failure + 3)
            await holder.rollback()

        assert "pg_stat_activity" in str(raised.value)
        assert "mdr-connector db upgrade" in str(raised.value)
        assert [record.attempt for record in caplog.records if record.msg == "store.schema.lock_timeout"] == [1, 2, 3]
        assert reader_errors == []
        # The failed run rolled back as a whole, 0002's new tables included.
        assert await version_rows(database_url) == ["0001"]

        await asyncio.wait_for(upgrader.upgrade(lock_timeout_seconds=0.2), DEADLINE_SECONDS)
        assert await version_rows(database_url) == [head_revision(database_url)]
    finally:
        stop.set()
        if reader is not None:
            await asyncio.wait_for(reader, DEADLINE_SECONDS)
        for store in (holder_store, reader_store, upgrader):
            await store.close()


@pytest.mark.parametrize("command_args", [["run"], ["sync", "--once"]], ids=["run", "sync-once"])
async def test_cli_refuses_newer_schema(database_url: str, tmp_path: Path, command_args: list[str]) -> None:
    """`run` and `sync --once` exit 1 with the fix named when the schema is newer than this version."""
    config = write_cli_config(tmp_path, database_url)
    store = await Store.open(database_url)
    try:
        async with store.engine.begin() as connection:
            await connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    finally:
        await store.close()

    code, _, err = await run_cli("--config", str(config), *command_args)

    assert code == 1, err
    assert "the database schema is at revision 9999, newer than this mdr-connector knows" in err
    assert "upgrade mdr-connector before running it against this database" in err
    assert await version_rows(database_url) == ["9999"]
