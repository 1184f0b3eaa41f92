"""Token pairs in PostgreSQL (cluster mode): encryption, the row lock, import of a token file, the CLI."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import stat
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import yaml
from fixtures_mdr import MDR_CLIENT_ID, MDR_CONNECTION_NAME, run_token_helper
from fixtures_postgres import POSTGRES_ADMIN_URL, scratch_database
from sqlalchemy import select, text, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncTransaction

from mdr_connector.adapters.mdr.client import MdrClient
from mdr_connector.adapters.mdr.simulator import HOUR, MdrSimulator
from mdr_connector.adapters.mdr.token_database import DatabaseTokenStore, TokenCipher, cipher_for
from mdr_connector.adapters.mdr.tokens import TokenFileStore
from mdr_connector.connector.config import ClusterSettings, MdrSettings
from mdr_connector.connector.errors import ConfigError, LeaseLostError
from mdr_connector.connector.fencing import Fence, reset_fence
from mdr_connector.connector.store import Store, TokenChain

KEY = bytes(range(32))
KEY_VARIABLE = "MDR_TEST_TOKEN_KEY"


@pytest.fixture
async def store() -> AsyncIterator[Store]:
    """The ledger on a scratch PostgreSQL database."""
    async with scratch_database() as url:
        opened = await Store.open(url)
        try:
            yield opened
        finally:
            await opened.close()


def database_storage(store: Store, settings: MdrSettings, key: bytes = KEY, **timeouts: float) -> DatabaseTokenStore:
    return DatabaseTokenStore(store.engine, settings, TokenCipher(key), **timeouts)


@pytest.fixture
async def db_client(store: Store, mdr_settings: MdrSettings) -> AsyncIterator[MdrClient]:
    """An open client whose pair is kept in the database, not activated yet."""
    async with MdrClient(mdr_settings, token_storage=database_storage(store, mdr_settings)) as client:
        yield client


async def raw_row(store: Store, client_id: str = MDR_CLIENT_ID):
    async with store.engine.connect() as connection:
        return (await connection.execute(select(TokenChain).where(TokenChain.client_id == client_id))).first()


async def test_activation_round_trip(
    db_client: MdrClient, mdr_sim: MdrSimulator, store: Store, mdr_settings: MdrSettings
) -> None:
    """An activated pair is stored encrypted in its row, read back by another storage, and no token file is written."""
    status = await db_client.tokens.activate(mdr_sim.issue_console_token(MDR_CLIENT_ID))
    access = await db_client.tokens.access_token()

    assert status.state == "Active"
    assert status.path is None
    pair = await database_storage(store, mdr_settings).read()
    assert pair is not None
    assert pair.access_token == access
    assert not (mdr_settings.token_dir / f"{MDR_CLIENT_ID}.json").exists()

    row = await raw_row(store)
    assert row.version == 1
    assert row.key_id == TokenCipher(KEY).key_id
    assert pair.access_token not in row.ciphertext
    assert pair.refresh_token not in row.ciphertext
    assert pair.refresh_token.split(".")[1] not in base64.b64decode(row.ciphertext).decode("latin-1")


async def test_wrong_key_named(db_client: MdrClient, mdr_sim: MdrSimulator, store: Store, mdr_settings: MdrSettings) -> None:
    """A pair stored with one key read with another raises an error that names both key ids."""
    await db_client.tokens.activate(mdr_sim.issue_console_token(MDR_CLIENT_ID))
    other = database_storage(store, mdr_settings, key=bytes(32))

    with pytest.raises(ConfigError, match="encrypted with another key") as caught:
        await other.read()

    assert TokenCipher(KEY).key_id in str(caught.value)
    assert TokenCipher(bytes(32)).key_id in str(caught.value)


async def test_corrupted_ciphertext_rejected(
    db_client: MdrClient, mdr_sim: MdrSimulator, store: Store, mdr_settings: MdrSettings
) -> None:
    """A ciphertext changed in the database does not decrypt."""
    await db_client.tokens.activate(mdr_sim.issue_console_token(MDR_CLIENT_ID))
    row = await raw_row(store)
    sealed = bytearray(base64.b64decode(row.ciphertext))
    sealed[20] ^= 1
    async with store.engine.begin() as connection:
        await connection.execute(
            update(TokenChain).values(ciphertext=base64.b64encode(bytes(sealed)).decode("ascii"))
        )

    with pytest.raises(ConfigError, match="cannot be decrypted"):
        await database_storage(store, mdr_settings).read()


async def test_row_copied_to_other_client(
    db_client: MdrClient, mdr_sim: MdrSimulator, store: Store, mdr_settings: MdrSettings
) -> None:
    """A row copied under another client id does not decrypt, because the client id is bound to the ciphertext."""
    await db_client.tokens.activate(mdr_sim.issue_console_token(MDR_CLIENT_ID))
    other_id = "0" * len(MDR_CLIENT_ID)
    async with store.engine.begin() as connection:
        await connection.execute(
            text(
                "INSERT INTO token_chains (client_id, key_id, ciphertext, version, updated_at) "
                "SELECT :other, key_id, ciphertext, version, updated_at FROM token_chains WHERE client_id = :client"
            ),
            {"other": other_id, "client": MDR_CLIENT_ID},
        )
    other_settings = mdr_settings.model_copy(update={"client_id": other_id})

    with pytest.raises(ConfigError, match="cannot be decrypted"):
        await database_storage(store, other_settings).read()


def test_bad_key_setting_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """A key that is not 32 bytes of URL-safe base64 is rejected naming the setting, never the value."""
    for value in ("not base64!", base64.urlsafe_b64encode(b"short").decode()):
        monkeypatch.setenv(KEY_VARIABLE, value)
        cluster = ClusterSettings(enabled=True, token_key={"env": KEY_VARIABLE})

        with pytest.raises(ConfigError, match="cluster.token_key is not a valid key") as caught:
            cipher_for(cluster)

        assert value not in str(caught.value)


async def test_concurrent_managers_one_confirm(
    db_client: MdrClient, mdr_sim: MdrSimulator, store: Store, mdr_settings: MdrSettings
) -> None:
    """Two clients with separate storages on one row refresh an expired pair with one session/confirm call."""
    await db_client.tokens.activate(mdr_sim.issue_console_token(MDR_CLIENT_ID))
    mdr_sim.settings.latency_seconds = 0.1
    async with MdrClient(mdr_settings, token_storage=database_storage(store, mdr_settings)) as second:
        await second.tokens.access_token()
        mdr_sim.advance(2 * HOUR)

        await asyncio.gather(db_client.list_incidents(), second.list_incidents())

    assert mdr_sim.confirm_calls == 2
    assert (await raw_row(store)).version == 2


async def test_concurrent_processes_one_confirm(
    db_client: MdrClient,
    mdr_sim: MdrSimulator,
    store: Store,
    mdr_settings: MdrSettings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two processes sharing the database row refresh an expired pair with one session/confirm call."""
    await db_client.tokens.activate(mdr_sim.issue_console_token(MDR_CLIENT_ID))
    mdr_sim.settings.latency_seconds = 0.1
    mdr_sim.advance(2 * HOUR)
    monkeypatch.setenv(KEY_VARIABLE, base64.urlsafe_b64encode(KEY).decode())
    go = tmp_path / "go"
    ready = [tmp_path / "ready-1", tmp_path / "ready-2"]

    helpers = [
        await run_token_helper(
            mdr_settings, "call", "--ready", str(marker), "--go", str(go), "--database-url", store.url
        )
        for marker in ready
    ]
    while not all(marker.exists() for marker in ready):
        await asyncio.sleep(0.01)
    go.touch()
    outputs = [await helper.communicate() for helper in helpers]

    for helper, (stdout, stderr) in zip(helpers, outputs, strict=True):
        assert helper.returncode == 0, stdout.decode() + stderr.decode()
        assert json.loads(stdout) == {"raw_count": 0}
    assert mdr_sim.confirm_calls == 2


async def test_stalled_holder_cut_by_idle_timeout(
    db_client: MdrClient, mdr_sim: MdrSimulator, store: Store, mdr_settings: MdrSettings
) -> None:
    """A holder that keeps the row lock and does nothing is cut by the idle timeout, and a waiter refreshes."""
    await db_client.tokens.activate(mdr_sim.issue_console_token(MDR_CLIENT_ID))
    stalled = database_storage(store, mdr_settings, idle_timeout_seconds=1)
    release = asyncio.Event()
    holding = asyncio.Event()

    async def hold_lock() -> None:
        async with stalled.locked():
            holding.set()
            await release.wait()

    holder = asyncio.create_task(hold_lock())
    await holding.wait()
    mdr_sim.advance(2 * HOUR)
    async with MdrClient(
        mdr_settings, token_storage=database_storage(store, mdr_settings, lock_timeout_seconds=120)
    ) as waiter:
        await waiter.list_incidents()

    release.set()
    await holder
    assert mdr_sim.confirm_calls == 2


async def test_lapsed_fence_stops_confirm(
    db_client: MdrClient, mdr_sim: MdrSimulator, store: Store
) -> None:
    """A refresh in a task whose lease has lapsed raises LeaseLostError and sends no session/confirm."""
    await db_client.tokens.activate(mdr_sim.issue_console_token(MDR_CLIENT_ID))
    rejected = await db_client.tokens.access_token()
    fence = Fence("main", "instance-a", 1, valid_until=0.0, clock=lambda: 100.0)
    token = fence.use()
    try:
        with pytest.raises(LeaseLostError):
            await db_client.tokens.refresh_after_rejection(rejected)
    finally:
        reset_fence(token)

    assert mdr_sim.confirm_calls == 1
    assert (await raw_row(store)).version == 1


async def test_held_fence_lets_confirm_through(db_client: MdrClient, mdr_sim: MdrSimulator) -> None:
    """A lease held for less than one request timeout still lets its holder refresh; the row lock covers the rest."""
    await db_client.tokens.activate(mdr_sim.issue_console_token(MDR_CLIENT_ID))
    rejected = await db_client.tokens.access_token()
    fence = Fence("main", "instance-a", 1, valid_until=105.0, clock=lambda: 100.0)
    token = fence.use()
    try:
        refreshed = await db_client.tokens.refresh_after_rejection(rejected)
    finally:
        reset_fence(token)

    assert refreshed != rejected
    assert mdr_sim.confirm_calls == 2


CommitFailure = Callable[[AsyncTransaction, Callable[[AsyncTransaction], Awaitable[None]]], Awaitable[None]]


async def drop_connection_before_commit(
    transaction: AsyncTransaction, commit: Callable[[AsyncTransaction], Awaitable[None]]
) -> None:
    """Terminate the transaction's server process from another connection, then send the commit on the dead one."""
    import asyncpg

    pid = await transaction.connection.scalar(text("SELECT pg_backend_pid()"))
    admin = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=10)
    try:
        # The timeout (ms) makes the call wait until the process has ended.
        assert await admin.fetchval("SELECT pg_terminate_backend($1, 10000)", pid) is True
    finally:
        await admin.close()
    await commit(transaction)


async def lose_commit_reply(
    transaction: AsyncTransaction, commit: Callable[[AsyncTransaction], Awaitable[None]]
) -> None:
    """Apply the commit, then raise as if the connection dropped before its reply arrived."""
    await commit(transaction)
    raise OperationalError("COMMIT", None, ConnectionResetError("connection reset before the reply"))


@pytest.mark.parametrize(
    "failure", [drop_connection_before_commit, lose_commit_reply], ids=["connection_dropped", "reply_lost"]
)
async def test_failed_save_retried(
    failure: CommitFailure,
    db_client: MdrClient,
    mdr_sim: MdrSimulator,
    store: Store,
    mdr_settings: MdrSettings,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A refresh whose first commit of the new pair fails stores it in a new transaction, and the chain goes on."""
    await db_client.tokens.activate(mdr_sim.issue_console_token(MDR_CLIENT_ID))
    real_commit = AsyncTransaction.commit
    failures: list[AsyncTransaction] = []

    async def commit_failing_once(transaction: AsyncTransaction) -> None:
        if failures:
            await real_commit(transaction)
            return
        failures.append(transaction)
        await failure(transaction, real_commit)

    monkeypatch.setattr(AsyncTransaction, "commit", commit_failing_once)
    mdr_sim.advance(2 * HOUR)

    with caplog.at_level(logging.INFO, logger="mdr_connector.adapters.mdr.token_database"):
        await db_client.list_incidents()

    monkeypatch.undo()
    events = [record.getMessage() for record in caplog.records]
    assert len(failures) == 1
    assert "mdr.token.save_failed" in events
    assert "mdr.token.save_recovered" in events
    assert "mdr.token.save_abandoned" not in events
    assert mdr_sim.confirm_calls == 2
    assert (await raw_row(store)).version == 2

    # A client with a storage of its own refreshes from the stored pair, so
    # that pair must be the one MDR issued last.
    mdr_sim.advance(2 * HOUR)
    async with MdrClient(mdr_settings, token_storage=database_storage(store, mdr_settings)) as fresh:
        await fresh.list_incidents()

    confirms = mdr_sim.confirms()
    assert [confirm["outcome"] for confirm in confirms] == ["rotated", "rotated", "rotated"]
    spent = [confirm["token_id"] for confirm in confirms]
    assert len(set(spent)) == len(spent)
    assert (await raw_row(store)).version == 3


async def test_token_file_imported_once(
    mdr_client: MdrClient, mdr_sim: MdrSimulator, store: Store, mdr_settings: MdrSettings
) -> None:
    """A token file from single-instance mode is imported into an empty row, then renamed owner-only."""
    await mdr_client.tokens.activate(mdr_sim.issue_console_token(MDR_CLIENT_ID))
    file_pair = TokenFileStore(mdr_settings.token_dir, MDR_CLIENT_ID).load()
    storage = database_storage(store, mdr_settings)

    assert await storage.read() == file_pair

    token_file = mdr_settings.token_dir / f"{MDR_CLIENT_ID}.json"
    assert not token_file.exists()
    moved = mdr_settings.token_dir / f"{MDR_CLIENT_ID}.json.moved-to-database"
    assert stat.S_IMODE(moved.stat().st_mode) == 0o400
    assert (await raw_row(store)).version == 1
    async with MdrClient(mdr_settings, token_storage=storage) as client:
        await client.list_incidents()
    assert mdr_sim.confirm_calls == 1


async def test_token_file_beside_stored_pair_retired(
    db_client: MdrClient, mdr_sim: MdrSimulator, store: Store, mdr_settings: MdrSettings
) -> None:
    """A token file that appears beside a stored pair is renamed, and the stored pair is kept."""
    await db_client.tokens.activate(mdr_sim.issue_console_token(MDR_CLIENT_ID))
    stored = await database_storage(store, mdr_settings).read()
    async with MdrClient(mdr_settings) as file_client:
        await file_client.tokens.activate(mdr_sim.issue_console_token(MDR_CLIENT_ID))

    assert await database_storage(store, mdr_settings).read() == stored
    assert not (mdr_settings.token_dir / f"{MDR_CLIENT_ID}.json").exists()


def write_cluster_config(tmp_path: Path, mdr_url: str, database_url: str) -> Path:
    token_dir = tmp_path / "tokens"
    token_dir.mkdir(mode=0o700, exist_ok=True)
    document = {
        "data_dir": str(tmp_path / "data"),
        "database_url": database_url,
        "cluster": {"enabled": True, "token_key": {"env": KEY_VARIABLE}},
        "connections": [
            {
                "name": "main",
                "mdr": {
                    "base_url": mdr_url,
                    "client_id": MDR_CLIENT_ID,
                    "connection_name": MDR_CONNECTION_NAME,
                    "token_dir": str(token_dir),
                },
                "ticket": {
                    "system": "jira",
                    "url": "http://127.0.0.1:9",
                    "auth": {"type": "pat", "token": {"env": "MDR_TEST_UNUSED_TOKEN"}},
                },
            }
        ],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


async def run_cli(*args: str, stdin: bytes = b"", env: dict[str, str]) -> tuple[int, str, str]:
    environment = {**os.environ, "LANG": "C.UTF-8", **env}
    environment.pop("MDR_CONNECTOR_LANG", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mdr_connector.connector.cli", *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=environment,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(stdin), 120)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_cli_cluster_mode_tokens(
    tmp_path: Path, mdr_sim: MdrSimulator, mdr_url: str, store: Store, mdr_settings: MdrSettings
) -> None:
    """`token new-key`, `token activate` and `token status` work with the pair in the database."""
    code, out, err = await run_cli("token", "new-key", env={})
    assert code == 0, err
    key = out.strip()
    assert len(base64.urlsafe_b64decode(key)) == 32
    assert "keep this key secret" in err

    env = {KEY_VARIABLE: key}
    config = write_cluster_config(tmp_path, mdr_url, store.url)
    code, out, _ = await run_cli("--config", str(config), "token", "status", env=env)
    assert code == 1
    assert "main: Pending activation" in out

    token = mdr_sim.issue_console_token(MDR_CLIENT_ID)
    code, out, err = await run_cli("--config", str(config), "token", "activate", stdin=token.encode(), env=env)
    assert code == 0, err
    assert "token activated; state Active" in out
    assert token not in out + err
    assert not (tmp_path / "tokens" / f"{MDR_CLIENT_ID}.json").exists()

    code, out, _ = await run_cli("--config", str(config), "token", "status", env=env)
    assert code == 0
    assert "main: Active" in out
    assert (await raw_row(store)).key_id == TokenCipher(base64.urlsafe_b64decode(key)).key_id

    code, _, err = await run_cli("--config", str(config), "token", "status", env={KEY_VARIABLE: base64.urlsafe_b64encode(KEY).decode()})
    assert code == 1
    assert "encrypted with another key" in err
