"""The MDR token chain in the database, for several instances (cluster mode).

One row of `token_chains` per client holds the token pair, encrypted with
AES-256-GCM under `cluster.token_key`, a key that is never stored in the
database. The client id is the associated data, so a row copied to another
client does not decrypt. `key_id` is a fingerprint of the key, so a wrong
key gets its own message.

A refresh holds `SELECT ... FOR UPDATE` on the client's row from before it
reads the pair until the new pair is committed, so two instances or tasks
never send one refresh token twice: the second waits, reads the new pair
and uses it. `idle_in_transaction_session_timeout` ends the transaction of a
holder that stopped (SIGSTOP, a hung host), and `lock_timeout` bounds the
wait of the others.

A token file left from single-instance mode is imported once, when the
database has no pair for its client, and then renamed to
`<client_id>.json.moved-to-database` so that nothing uses it again.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import hashlib
import logging
import os
import secrets
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.engine import Row
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncTransaction

from mdr_connector.adapters.mdr.tokens import (
    TokenFileStore,
    TokenPair,
    TokenStatus,
    classify_pair,
    pair_document,
    parse_pair,
    register_tokens,
)
from mdr_connector.connector.config import ClusterSettings, MdrSettings, SecretRef
from mdr_connector.connector.errors import ConfigError, ConnectionFatalError, RetriableError
from mdr_connector.connector.fencing import without_fence
from mdr_connector.connector.i18n import N_
from mdr_connector.connector.retry import MAX_PAUSE_SECONDS, RATE_LIMIT_ATTEMPTS
from mdr_connector.connector.store import TokenChain

log = logging.getLogger(__name__)

KEY_BYTES = 32
NONCE_BYTES = 12
KEY_ID_PREFIX = b"mdr-connector token key id v1\x00"
ASSOCIATED_DATA_PREFIX = b"mdr-connector token pair v1\x00"
MOVED_SUFFIX = ".moved-to-database"
# Extra time beyond the longest session/confirm exchange (every attempt the
# rate gate allows, each after its longest pause) before PostgreSQL ends the
# transaction of a holder that stopped, and before a waiter gives up.
LOCK_MARGIN_SECONDS = 30.0
# Pauses before each new transaction that stores a pair whose first commit failed.
SAVE_RETRY_DELAYS = (0.5, 2.0, 5.0)
# SQLSTATE of lock_not_available, raised when lock_timeout expires.
LOCK_NOT_AVAILABLE = "55P03"

BAD_KEY = N_(
    "cluster.token_key is not a valid key: expected {size} random bytes in URL-safe base64; "
    "`mdr-connector token new-key` prints a new one"
)
WRONG_KEY = N_(
    "the token pair of client {client_id} in the database was encrypted with another key "
    "(key id {stored_key_id}, this instance has {own_key_id}); set cluster.token_key to the key "
    "used by the other instances, or run `mdr-connector token activate`"
)
UNREADABLE_PAIR = N_(
    "the token pair of client {client_id} in the database cannot be decrypted: it was changed "
    "or copied from another client; run `mdr-connector token activate`"
)
NOT_ACTIVATED_DATABASE = N_(
    "no MDR token for client {client_id} in the database: "
    "issue a token in the MDR console (Settings, API) and run `mdr-connector token activate`"
)
LOCK_TIMED_OUT = N_(
    "timed out after {seconds} s waiting for the token lock of client {client_id}, "
    "which another instance or command holds; the refresh is tried again later"
)
PAIR_REPLACED = N_(
    "the token pair of client {client_id} was replaced in the database while this refresh "
    "stored its own, so the stored pair is used from now on"
)
PAIR_NOT_SAVED = N_(
    "the new MDR token pair of client {client_id} could not be stored in the database ({error}), "
    "so the token chain may be broken: run `mdr-connector token status`, and if it is not Active, "
    "issue a new token in the MDR console (Settings, API) and run `mdr-connector token activate`"
)
NOT_POSTGRESQL = (
    "cluster.enabled needs a PostgreSQL database_url (postgresql+asyncpg://...) for the token "
    "pairs; the configured database is {dialect}"
)


class PairReplacedError(RetriableError):
    """Another pair replaced the one a refresh spent; the refresh gives way and the stored pair is used."""


def new_token_key() -> str:
    """Return a new random key for cluster.token_key, in URL-safe base64."""
    return base64.urlsafe_b64encode(secrets.token_bytes(KEY_BYTES)).decode("ascii")


class TokenCipher:
    """AES-256-GCM encryption of token pairs under one key."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ConfigError.from_template(BAD_KEY, size=KEY_BYTES)
        self._aead = AESGCM(key)
        # A fingerprint, not the key: SHA-256 over a fixed prefix and the key, cut to 64 bits.
        self.key_id = "sha256:" + hashlib.sha256(KEY_ID_PREFIX + key).hexdigest()[:16]

    @classmethod
    def from_setting(cls, secret: SecretRef) -> TokenCipher:
        """Read and decode the key of cluster.token_key; errors name the setting, never the value."""
        value = secret.read().strip()
        try:
            key = base64.b64decode(value.encode("ascii"), altchars=b"-_", validate=True)
        except (UnicodeEncodeError, binascii.Error) as err:
            raise ConfigError.from_template(BAD_KEY, size=KEY_BYTES) from err
        return cls(key)

    def encrypt(self, client_id: str, pair: TokenPair) -> str:
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, pair_document(pair, client_id), _associated_data(client_id))
        return base64.b64encode(nonce + sealed).decode("ascii")

    def decrypt(self, client_id: str, key_id: str, ciphertext: str) -> TokenPair:
        """Decrypt a stored pair, raising ConfigError for another key, a changed text or another client's row."""
        if key_id != self.key_id:
            raise ConfigError.from_template(
                WRONG_KEY, client_id=client_id, stored_key_id=key_id, own_key_id=self.key_id
            )
        unreadable = ConfigError.from_template(UNREADABLE_PAIR, client_id=client_id)
        try:
            sealed = base64.b64decode(ciphertext.encode("ascii"), validate=True)
            document = self._aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], _associated_data(client_id))
        except (UnicodeEncodeError, binascii.Error, ValueError, InvalidTag) as err:
            raise unreadable from err
        return parse_pair(document, unreadable)


def _associated_data(client_id: str) -> bytes:
    return ASSOCIATED_DATA_PREFIX + client_id.encode("utf-8")


def cipher_for(cluster: ClusterSettings) -> TokenCipher:
    """Build the cipher of cluster.token_key, raising ConfigError when the key is missing or invalid."""
    if cluster.token_key is None:
        raise ConfigError("cluster.enabled needs cluster.token_key; `mdr-connector token new-key` prints a new one")
    return TokenCipher.from_setting(cluster.token_key)


@dataclasses.dataclass
class _LockHold:
    connection: AsyncConnection
    transaction: AsyncTransaction
    key_id: str
    ciphertext: str
    version: int


class DatabaseTokenStore:
    """The token pair of one MDR client in `token_chains`; implements TokenStorage."""

    def __init__(
        self,
        engine: AsyncEngine,
        settings: MdrSettings,
        cipher: TokenCipher,
        *,
        lock_timeout_seconds: float | None = None,
        idle_timeout_seconds: float | None = None,
    ) -> None:
        if engine.dialect.name != "postgresql":
            raise ConfigError(NOT_POSTGRESQL.format(dialect=engine.dialect.name))
        self.client_id = settings.client_id
        self._engine = engine
        self._cipher = cipher
        self._file = TokenFileStore(settings.token_dir, settings.client_id)
        exchange_seconds = RATE_LIMIT_ATTEMPTS * (settings.timeout_seconds + MAX_PAUSE_SECONDS)
        self.idle_timeout_seconds = idle_timeout_seconds or exchange_seconds + LOCK_MARGIN_SECONDS
        self.lock_timeout_seconds = lock_timeout_seconds or self.idle_timeout_seconds + LOCK_MARGIN_SECONDS

    @property
    def moved_file_path(self) -> Path:
        return self._file.path.with_name(self._file.path.name + MOVED_SUFFIX)

    # TokenStorage

    async def read(self) -> TokenPair | None:
        await self.import_file()
        async with self._engine.connect() as connection:
            row = (
                await connection.execute(
                    select(TokenChain.key_id, TokenChain.ciphertext).where(TokenChain.client_id == self.client_id)
                )
            ).first()
        if row is None:
            return None
        return self._decrypt(row.key_id, row.ciphertext)

    @contextlib.asynccontextmanager
    async def locked(self) -> AsyncIterator[LockedDatabaseChain]:
        await self.import_file()
        chain = LockedDatabaseChain(self, await self._lock_row())
        try:
            yield chain
        finally:
            await self._end(chain.hold)

    async def read_status(self, now: float) -> TokenStatus:
        return classify_pair(await self.read(), now, None)

    def missing_error(self, *, during_refresh: bool) -> ConfigError:
        return ConfigError.from_template(NOT_ACTIVATED_DATABASE, client_id=self.client_id)

    # The row lock

    async def _lock_row(self) -> _LockHold:
        """Begin a transaction that holds the client's row `FOR UPDATE`, inserting an empty row first if there is none."""
        connection = await self._engine.connect()
        try:
            # The lease check would keep the lease row locked while this
            # transaction waits for session/confirm, and a takeover would wait
            # as long. The lease is checked right before session/confirm instead.
            with without_fence():
                transaction = await connection.begin()
            await connection.execute(
                select(
                    func.set_config("lock_timeout", _milliseconds(self.lock_timeout_seconds), True),
                    func.set_config(
                        "idle_in_transaction_session_timeout", _milliseconds(self.idle_timeout_seconds), True
                    ),
                )
            )
            await connection.execute(
                postgresql_insert(TokenChain)
                .values(client_id=self.client_id, key_id="", ciphertext="", version=0, updated_at=func.now())
                .on_conflict_do_nothing(index_elements=[TokenChain.client_id])
            )
            row = (
                await connection.execute(
                    select(TokenChain.key_id, TokenChain.ciphertext, TokenChain.version)
                    .where(TokenChain.client_id == self.client_id)
                    .with_for_update()
                )
            ).one()
        except DBAPIError as err:
            await connection.close()
            if _sqlstate(err) == LOCK_NOT_AVAILABLE:
                log.warning(
                    "mdr.token.lock_timed_out",
                    extra={"client_id": self.client_id, "seconds": self.lock_timeout_seconds},
                )
                raise RetriableError.from_template(
                    LOCK_TIMED_OUT, client_id=self.client_id, seconds=round(self.lock_timeout_seconds)
                ) from err
            raise
        except BaseException:
            await connection.close()
            raise
        return _LockHold(connection, transaction, row.key_id, row.ciphertext, row.version)

    async def _end(self, hold: _LockHold) -> None:
        """Roll back what is still open of a lock hold and return its connection; a dropped connection is not an error here."""
        try:
            if hold.transaction.is_active:
                await hold.transaction.rollback()
        except (SQLAlchemyError, OSError) as err:
            log.info("mdr.token.lock_release_failed", extra={"client_id": self.client_id, "error": str(err)})
        finally:
            with contextlib.suppress(SQLAlchemyError, OSError):
                await hold.connection.close()

    async def _store(self, hold: _LockHold, pair: TokenPair) -> None:
        """Replace the pair held under `hold` and commit, compare-and-swap on the version read under the lock."""
        result = await hold.connection.execute(
            update(TokenChain)
            .where(TokenChain.client_id == self.client_id, TokenChain.version == hold.version)
            .values(
                key_id=self._cipher.key_id,
                ciphertext=self._cipher.encrypt(self.client_id, pair),
                version=hold.version + 1,
                updated_at=func.now(),
            )
        )
        if result.rowcount != 1:
            # The row lock makes this impossible unless the lock was lost,
            # such as after a server restart that ended the transaction.
            raise PairReplacedError.from_template(PAIR_REPLACED, client_id=self.client_id)
        await hold.transaction.commit()
        hold.version += 1
        hold.key_id = self._cipher.key_id

    def _decrypt(self, key_id: str, ciphertext: str) -> TokenPair | None:
        if not ciphertext:
            return None
        pair = self._cipher.decrypt(self.client_id, key_id, ciphertext)
        register_tokens(pair.access_token, pair.refresh_token)
        return pair

    # Saves after a failed commit

    async def save(self, hold: _LockHold, spent: TokenPair | None, pair: TokenPair) -> None:
        """Store `pair` under `hold`; when that fails, store it again in new transactions.

        `spent` is the pair read under the lock, whose refresh token MDR has
        just exchanged for `pair`. After a dropped connection, the commit may
        or may not have been applied, and the lock may have passed to another
        holder (which then found the same old pair). Each new transaction
        stores `pair` unless it is there already or a different chain replaced
        `spent` meanwhile (a `token activate`).
        """
        expected_version = hold.version
        try:
            await self._store(hold, pair)
            return
        except (SQLAlchemyError, OSError) as err:
            last_error: Exception = err
            log.warning("mdr.token.save_failed", extra={"client_id": self.client_id, "error": str(err)})
        await self._end(hold)

        for attempt, delay in enumerate(SAVE_RETRY_DELAYS, start=1):
            await asyncio.sleep(delay)
            try:
                if await self._store_again(expected_version, spent, pair):
                    log.info("mdr.token.save_recovered", extra={"client_id": self.client_id, "attempt": attempt})
                    return
            except PairReplacedError:
                raise
            except (SQLAlchemyError, OSError, RetriableError) as err:
                last_error = err
                log.warning(
                    "mdr.token.save_failed",
                    extra={"client_id": self.client_id, "attempt": attempt, "error": str(err)},
                )
        log.error("mdr.token.save_abandoned", extra={"client_id": self.client_id, "error": str(last_error)})
        raise ConnectionFatalError.from_template(PAIR_NOT_SAVED, client_id=self.client_id, error=str(last_error))

    async def _store_again(self, expected_version: int, spent: TokenPair | None, pair: TokenPair) -> bool:
        hold = await self._lock_row()
        try:
            current = self._decrypt(hold.key_id, hold.ciphertext)
            if current is not None and current.refresh_token == pair.refresh_token:
                # The first commit was applied; only its reply was lost.
                return True
            spent_is_stored = current is not None and spent is not None and current.refresh_token == spent.refresh_token
            if hold.version != expected_version and not spent_is_stored:
                log.warning("mdr.token.pair_replaced", extra={"client_id": self.client_id})
                raise PairReplacedError.from_template(PAIR_REPLACED, client_id=self.client_id)
            await self._store(hold, pair)
            return True
        finally:
            await self._end(hold)

    # Import of a token file

    async def import_file(self) -> None:
        """Import the token file of single-instance mode once, then rename it so that nothing uses it again.

        The pair is imported only when the database has none for the client.
        A token file beside a stored pair is renamed as well, because its
        refresh token is older than the stored chain or spent.
        """
        if not os.path.lexists(self._file.path):
            return
        async with self._file.locked():
            if not os.path.lexists(self._file.path):
                return
            hold = await self._lock_row()
            try:
                imported = False
                if not hold.ciphertext:
                    pair = await self._file.read()
                    if pair is not None:
                        await self._store(hold, pair)
                        imported = True
            finally:
                await self._end(hold)
            await asyncio.to_thread(self._retire_file)

        extra: dict[str, Any] = {"client_id": self.client_id, "path": str(self.moved_file_path)}
        if imported:
            log.info("mdr.token.imported", extra=extra)
        else:
            log.warning("mdr.token.file_retired", extra=extra)

    def _retire_file(self) -> None:
        target = self.moved_file_path
        os.replace(self._file.path, target)
        info = os.lstat(target)
        if stat.S_ISREG(info.st_mode):
            os.chmod(target, 0o400)


class LockedDatabaseChain:
    """The client's pair while its row is locked; implements LockedTokens."""

    def __init__(self, store: DatabaseTokenStore, hold: _LockHold) -> None:
        self._store = store
        self.hold = hold
        self._pair = store._decrypt(hold.key_id, hold.ciphertext)

    async def read(self) -> TokenPair | None:
        return self._pair

    async def write(self, pair: TokenPair) -> None:
        """Store and commit `pair`; the commit also ends the row lock."""
        register_tokens(pair.access_token, pair.refresh_token)
        if not self.hold.transaction.is_active:
            # A second write in one hold, after the first commit ended the
            # lock: lock the row again, so the version check still holds.
            await self._store._end(self.hold)
            self.hold = await self._store._lock_row()
        await self._store.save(self.hold, self._pair, pair)
        self._pair = pair

    async def write_rejected(self, pair: TokenPair, rejected_at: int) -> None:
        await self.write(dataclasses.replace(pair, rejected_at=rejected_at))

    async def recover(self, current: TokenPair) -> TokenPair | None:
        # A commit is atomic, so no half-saved pair can be left behind.
        return None


def _milliseconds(seconds: float) -> str:
    return str(max(1, round(seconds * 1000)))


def _sqlstate(error: DBAPIError) -> str | None:
    original: Any = error.orig
    return getattr(original, "sqlstate", None) or getattr(original, "pgcode", None)


def token_storage_for(cluster: ClusterSettings, settings: MdrSettings, engine: AsyncEngine) -> DatabaseTokenStore | None:
    """Return the database storage in cluster mode, or None, which means the token file."""
    if not cluster.enabled:
        return None
    return DatabaseTokenStore(engine, settings, cipher_for(cluster))
