"""The MDR token chain: one token file per client and the refresh manager.

The MDR console issues a refresh token that lives 24 hours and works once.
`session/confirm` exchanges a refresh token for an access token and a new
refresh token. A client that loses the newest refresh token loses the chain,
and a person must issue a new one in the console. Hence:

- both tokens live in one JSON file per client (`<token_dir>/<client_id>.json`),
  replaced by one atomic rename, so the pair on disk is always consistent;
- the new pair is on disk before it is used;
- one refresh runs at a time, in a process (asyncio.Lock) and across
  processes (`fcntl.flock` on `<client_id>.lock` beside the token file);
- after taking the file lock, the manager re-reads the file: when the refresh
  token there differs from the one it loaded, another process has already
  refreshed, and the manager adopts that pair instead of calling confirm;
- when MDR rejects the stored refresh token, a whole temp file left by a
  process killed between its write and its rename contains the pair MDR
  issued for it, and the manager adopts that pair;
- when the reply to session/confirm is lost, the manager sends the same
  refresh token once more: a rejection then means the lost request spent it.

No token ever reaches a log line or an exception message.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import fcntl
import json
import math
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Protocol

from mdr_connector.connector.config import MdrSettings
from mdr_connector.connector.i18n import N_
from mdr_connector.connector.errors import ConfigError, OutcomeUnknownError, RemoteUnavailableError, TokenExpiredError
from mdr_connector.connector.fencing import check_current_fence
from mdr_connector.connector.logs import register_secret

log = logging.getLogger(__name__)

TOKEN_FILE_VERSION = 1
LOCK_POLL_SECONDS = 0.05
MAX_TOKEN_FILE_BYTES = 64 * 1024
# Token times must be whole Unix seconds after 1970 and before the year 10000,
# which datetime can represent. Any other value is rejected, not converted.
MAX_UNIX_SECONDS = 253402300800

TokenState = Literal["Pending activation", "Active", "Idle", "Expired"]

# Exchanges a refresh token for (access token, refresh token) via session/confirm.
ConfirmFunction = Callable[[str], Awaitable[tuple[str, str]]]

# A JWT in compact form: three non-empty base64url parts joined by dots.
JWT_FORMAT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


EXPIRED_REFRESH = N_(
    "the MDR refresh token for client {client_id} is expired or was already used: "
    "issue a new token in the MDR console (Settings, API) and run `mdr-connector token activate`"
)
NOT_ACTIVATED = N_(
    "no MDR token for client {client_id} in {token_dir}: "
    "issue a token in the MDR console (Settings, API) and run `mdr-connector token activate`"
)
CONFIRM_REPLY_LOST = N_(
    "MDR session/confirm for client {client_id} got no reply, and MDR now rejects the refresh token, "
    "so the request without a reply spent it: "
    "issue a new token in the MDR console (Settings, API) and run `mdr-connector token activate`"
)
CONSOLE_TOKEN_IS_JSON = N_(
    "the console token given is JSON, not the token itself: "
    "copy only the token value (the long string starting with eyJ)"
)
CONSOLE_TOKEN_MALFORMED = N_(
    "the console token is not a valid MDR token: expected three parts of letters, digits, - and _ "
    "separated by dots; copy the whole token from the MDR console (Settings, API)"
)
CONSOLE_TOKEN_EXPIRED = N_(
    "the console token for client {client_id} expired at {expired_at}: "
    "issue a new token in the MDR console (Settings, API)"
)


def expired_refresh_error(client_id: str) -> TokenExpiredError:
    return TokenExpiredError.from_template(EXPIRED_REFRESH, client_id=client_id)


def check_console_token_format(token: str) -> None:
    """Raise ConfigError unless `token` has the shape of a JWT; the message never contains the token."""
    if token.startswith("{"):
        raise ConfigError.from_template(CONSOLE_TOKEN_IS_JSON)
    if JWT_FORMAT.fullmatch(token) is None:
        raise ConfigError.from_template(CONSOLE_TOKEN_MALFORMED)


def decode_jwt_claims(token: str) -> dict[str, Any]:
    """Decode the payload of a JWT without checking its signature.

    Raises ValueError with a message that never contains the token.
    """
    segments = token.split(".")
    if len(segments) != 3 or not all(segments):
        raise ValueError("a JWT has three non-empty base64url segments separated by dots")

    payload = segments[1]
    padded = payload + "=" * (-len(payload) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    except (UnicodeEncodeError, binascii.Error, ValueError) as err:
        raise ValueError("the JWT payload is not base64url-encoded JSON") from err

    if not isinstance(claims, dict):
        raise ValueError("the JWT payload is not a JSON object")
    return claims


def is_unix_time(value: object) -> bool:
    """Return whether `value` is a whole number of seconds between 1970 and the year 10000."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < MAX_UNIX_SECONDS


def claim_seconds(value: object) -> int | None:
    """Read a JWT time claim as whole Unix seconds, or None when it is not a plausible time.

    A JWT NumericDate may have a fraction (RFC 7519, section 2), so a finite
    float is accepted and rounded down. A boolean is not a number here.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    seconds = int(value)
    return seconds if is_unix_time(seconds) else None


def jwt_expiry(token: str) -> int:
    """Return the `exp` claim of a JWT, in Unix seconds."""
    exp = claim_seconds(decode_jwt_claims(token).get("exp"))
    if exp is None:
        raise ValueError("the JWT 'exp' claim is not a number of seconds between 1970 and the year 10000")
    return exp


def jwt_issued_at(token: str) -> int | None:
    """Return the `iat` claim of a JWT in Unix seconds, or None when it has no usable one."""
    return claim_seconds(decode_jwt_claims(token).get("iat"))


def register_tokens(*tokens: object) -> None:
    """Register each token with the log redaction, which then hides it in log records and printed errors."""
    for token in tokens:
        if isinstance(token, str):
            register_secret(token)


@dataclass(frozen=True)
class TokenPair:
    """An access token and a refresh token with their expiry times in Unix seconds."""

    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    access_expires_at: int
    refresh_expires_at: int
    # Local time when the pair arrived; the access token's `iat`, if it has one.
    obtained_at: int
    access_issued_at: int | None = None
    # When MDR rejected `refresh_token` in session/confirm, in Unix seconds;
    # None while the chain is usable.
    rejected_at: int | None = None

    @classmethod
    def from_tokens(cls, access_token: str, refresh_token: str, obtained_at: float) -> TokenPair:
        """Build a pair from two fresh JWTs, raising RemoteUnavailableError when one has no `exp`."""
        register_tokens(access_token, refresh_token)
        try:
            access_expires_at = jwt_expiry(access_token)
            refresh_expires_at = jwt_expiry(refresh_token)
            access_issued_at = jwt_issued_at(access_token)
        except ValueError as err:
            raise RemoteUnavailableError(
                f"MDR session/confirm returned a token that is not a valid JWT: {err}"
            ) from err
        return cls(
            access_token,
            refresh_token,
            access_expires_at,
            refresh_expires_at,
            int(obtained_at),
            access_issued_at,
        )

    def access_expires_locally(self) -> tuple[float, float]:
        """Return when the access token expires by the local clock, and its lifetime in seconds.

        With an `iat` claim, the lifetime is `exp - iat` counted from `obtained_at`,
        so a local clock that runs ahead of MDR's does not trigger a refresh on
        every call. Without one, `exp` is taken as it is.
        """
        issued_at = self.access_issued_at
        if issued_at is not None and self.access_expires_at > issued_at:
            lifetime = self.access_expires_at - issued_at
            return self.obtained_at + lifetime, lifetime
        return self.access_expires_at, max(self.access_expires_at - self.obtained_at, 0)


@dataclass(frozen=True)
class TokenStatus:
    """State of a token file and both expiry times, as `mdr-connector token status` prints them."""

    state: TokenState
    # The token file; None when the pair is stored in the database.
    path: Path | None
    access_expires_at: datetime | None = None
    refresh_expires_at: datetime | None = None
    # Set when the state is Expired because MDR rejected the refresh token.
    rejected_at: datetime | None = None


def _utc(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, timezone.utc)


def parse_pair(data: bytes, invalid: ConfigError) -> TokenPair:
    """Parse a stored pair from its JSON document, raising `invalid` when it is malformed."""
    if len(data) > MAX_TOKEN_FILE_BYTES:
        raise invalid
    try:
        raw = json.loads(data)
    except ValueError as err:
        raise invalid from err
    if not isinstance(raw, dict):
        raise invalid
    register_tokens(raw.get("access_token"), raw.get("refresh_token"))

    try:
        pair = TokenPair(
            access_token=raw["access_token"],
            refresh_token=raw["refresh_token"],
            access_expires_at=raw["access_expires_at"],
            refresh_expires_at=raw["refresh_expires_at"],
            obtained_at=raw["obtained_at"],
            access_issued_at=raw.get("access_issued_at"),
            rejected_at=raw.get("rejected_at"),
        )
    except (KeyError, TypeError) as err:
        raise invalid from err

    strings_ok = isinstance(pair.access_token, str) and isinstance(pair.refresh_token, str)
    times_ok = all(
        is_unix_time(value)
        for value in (pair.access_expires_at, pair.refresh_expires_at, pair.obtained_at)
    )
    times_ok = times_ok and all(
        value is None or is_unix_time(value) for value in (pair.access_issued_at, pair.rejected_at)
    )
    if not (strings_ok and times_ok):
        raise invalid
    return pair


def pair_document(pair: TokenPair, client_id: str) -> bytes:
    """Serialize a pair as the JSON document that the token file and the database both store."""
    return json.dumps(
        {
            "version": TOKEN_FILE_VERSION,
            "client_id": client_id,
            "access_token": pair.access_token,
            "access_expires_at": pair.access_expires_at,
            "refresh_token": pair.refresh_token,
            "refresh_expires_at": pair.refresh_expires_at,
            "obtained_at": pair.obtained_at,
            "access_issued_at": pair.access_issued_at,
            "rejected_at": pair.rejected_at,
        },
        indent=2,
    ).encode("utf-8")


class TokenFileStore:
    """Read and atomically replace the token file of one MDR client."""

    def __init__(self, token_dir: Path, client_id: str) -> None:
        self.token_dir = token_dir
        self.client_id = client_id
        self.path = token_dir / f"{client_id}.json"
        self.lock_path = token_dir / f"{client_id}.lock"

    def check_folder(self) -> None:
        """Reject a token folder that group or others can write, since they could swap the file."""
        try:
            mode = os.stat(self.token_dir).st_mode
        except FileNotFoundError:
            return
        except OSError as err:
            raise ConfigError(f"cannot read the token folder {self.token_dir}: {err.strerror}") from err

        if not stat.S_ISDIR(mode):
            raise ConfigError(f"the token folder {self.token_dir} is not a folder")
        if mode & 0o022:
            raise ConfigError(
                f"the token folder {self.token_dir} is writable by group or others: "
                f"run `chmod 700 {self.token_dir}`"
            )

    def load(self) -> TokenPair | None:
        """Read the pair, or return None when there is no token file yet.

        Raises ConfigError when the file is a symlink, is not owned by this
        user, can be read or written by group or others, or is malformed.
        """
        self.check_folder()
        try:
            # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as err:
            raise ConfigError(
                f"cannot open the token file {self.path}: {err.strerror}; "
                "it must be a regular file, not a symlink"
            ) from err

        try:
            self._check_file_mode(os.fstat(fd))
            data = os.read(fd, MAX_TOKEN_FILE_BYTES + 1)
        finally:
            os.close(fd)

        return self._parse(data)

    def _check_file_mode(self, info: os.stat_result) -> None:
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"the token file {self.path} is not a regular file")
        if info.st_uid != os.getuid():
            raise ConfigError(
                f"the token file {self.path} belongs to user id {info.st_uid}, "
                f"not to the user running mdr-connector ({os.getuid()}): fix the owner with chown"
            )
        if info.st_mode & 0o077:
            raise ConfigError(
                f"the token file {self.path} can be read or written by group or others: "
                f"run `chmod 400 {self.path}`"
            )

    def _parse(self, data: bytes) -> TokenPair:
        invalid = ConfigError(
            f"the token file {self.path} is malformed: run `mdr-connector token activate` "
            "with a new token from the MDR console"
        )
        return parse_pair(data, invalid)

    def save(self, pair: TokenPair) -> None:
        """Replace the token file with `pair`: temp file 0400, fsync, rename, fsync the folder."""
        register_tokens(pair.access_token, pair.refresh_token)
        self._ensure_folder()
        data = pair_document(pair, self.client_id)

        temp_path = self.token_dir / f".{self.client_id}.{secrets.token_hex(8)}.tmp"
        try:
            self._write_new_file(temp_path, data)
            os.replace(temp_path, self.path)
            self._fsync_folder()
        except OSError as err:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp_path)
            raise ConfigError(f"cannot write the token file {self.path}: {err.strerror}") from err
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp_path)
            raise

    def recover_unrenamed(self, current: TokenPair) -> TokenPair | None:
        """Adopt the newest whole temp token file that a process killed before its rename left behind.

        Such a file contains the pair MDR issued in exchange for the refresh
        token `current` still contains, so it is the only copy of the chain.
        The caller holds the file lock, so no save is in progress, and every
        other temp file is stale and deleted. Returns the adopted pair, or None.
        """
        found: list[tuple[int, Path, TokenPair]] = []
        for temp in self.token_dir.glob(f".{self.client_id}.*.tmp"):
            pair = self._read_temp(temp)
            usable = (
                pair is not None
                and pair.rejected_at is None
                and pair.refresh_token != current.refresh_token
                and pair.obtained_at >= current.obtained_at
            )
            # NOTE: after the local clock stepped back, a newer pair can have
            # an earlier obtained_at and is then deleted as stale here.
            if pair is not None and usable:
                found.append((pair.obtained_at, temp, pair))
            else:
                temp.unlink(missing_ok=True)
        if not found:
            return None

        found.sort(key=lambda item: item[0])
        _obtained_at, newest, pair = found[-1]
        os.replace(newest, self.path)
        self._fsync_folder()
        for _obtained_at, stale, _pair in found[:-1]:
            stale.unlink(missing_ok=True)
        return pair

    def _read_temp(self, temp: Path) -> TokenPair | None:
        """Read a temp token file with the checks of `load`, or return None when it is not a whole pair."""
        try:
            fd = os.open(temp, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            self._check_file_mode(os.fstat(fd))
            data = os.read(fd, MAX_TOKEN_FILE_BYTES + 1)
            return self._parse(data)
        except ConfigError:
            return None
        finally:
            os.close(fd)

    def mark_rejected(self, pair: TokenPair, rejected_at: int) -> None:
        """Record that MDR rejected the refresh token of `pair`, replacing the file as `save` does."""
        self.save(dataclasses.replace(pair, rejected_at=rejected_at))

    def _ensure_folder(self) -> None:
        try:
            self.token_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"cannot create the token folder {self.token_dir}: {err.strerror}") from err
        self.check_folder()

    @staticmethod
    def _write_new_file(path: Path, data: bytes) -> None:
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, 0o400)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)

    def _fsync_folder(self) -> None:
        fd = os.open(self.token_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @contextlib.asynccontextmanager
    async def locked(self) -> AsyncIterator[TokenFileStore]:
        """Hold an exclusive `flock` on the lock file, polling so the event loop never blocks.

        flock(2) locks are released when the holding process exits, crashed or
        not, so a crash leaves no stale lock.
        """
        self._ensure_folder()
        flags = os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.lock_path, flags, 0o600)
        except OSError as err:
            raise ConfigError(f"cannot open the token lock file {self.lock_path}: {err.strerror}") from err

        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(LOCK_POLL_SECONDS)
            yield self
        finally:
            # Closing the descriptor releases the flock.
            os.close(fd)

    def status(self, now: float) -> TokenStatus:
        """Classify the stored pair at time `now` (Unix seconds)."""
        return classify_pair(self.load(), now, self.path)

    # The asynchronous storage interface that TokenManager uses (TokenStorage
    # and LockedTokens). The file store is its own locked handle, because
    # the flock guards the file and the methods below read and write it.

    async def read(self) -> TokenPair | None:
        return await asyncio.to_thread(self.load)

    async def write(self, pair: TokenPair) -> None:
        await asyncio.to_thread(self.save, pair)

    async def write_rejected(self, pair: TokenPair, rejected_at: int) -> None:
        await asyncio.to_thread(self.mark_rejected, pair, rejected_at)

    async def recover(self, current: TokenPair) -> TokenPair | None:
        return await asyncio.to_thread(self.recover_unrenamed, current)

    async def read_status(self, now: float) -> TokenStatus:
        return await asyncio.to_thread(self.status, now)

    def missing_error(self, *, during_refresh: bool) -> ConfigError:
        """Return the error for a pair that is not stored: never activated, or deleted during a refresh."""
        if during_refresh:
            return ConfigError(f"the token file {self.path} disappeared: run `mdr-connector token activate`")
        return ConfigError.from_template(NOT_ACTIVATED, client_id=self.client_id, token_dir=self.token_dir)


def classify_pair(pair: TokenPair | None, now: float, path: Path | None) -> TokenStatus:
    """Classify a stored pair at time `now` (Unix seconds); None is a pair not activated yet."""
    if pair is None:
        return TokenStatus("Pending activation", path)

    access_expires_at, refresh_expires_at = _utc(pair.access_expires_at), _utc(pair.refresh_expires_at)
    if pair.rejected_at is not None:
        # A rejected chain stays Expired until `token activate` replaces the pair.
        return TokenStatus("Expired", path, access_expires_at, refresh_expires_at, _utc(pair.rejected_at))
    if now >= pair.refresh_expires_at:
        state: TokenState = "Expired"
    elif now < pair.access_expires_at:
        state = "Active"
    else:
        state = "Idle"
    return TokenStatus(state, path, access_expires_at, refresh_expires_at)


class LockedTokens(Protocol):
    """The stored pair of one client while its lock is held: no other task or process changes it meanwhile."""

    async def read(self) -> TokenPair | None: ...

    async def write(self, pair: TokenPair) -> None: ...

    async def write_rejected(self, pair: TokenPair, rejected_at: int) -> None: ...

    async def recover(self, current: TokenPair) -> TokenPair | None:
        """Return a pair that a killed save left outside the stored one, or None."""
        ...


class TokenStorage(Protocol):
    """The storage of one MDR client's token pair: a file (TokenFileStore) or the database."""

    client_id: str

    async def read(self) -> TokenPair | None:
        """Read the pair without taking the lock, or return None when none is stored."""
        ...

    def locked(self) -> contextlib.AbstractAsyncContextManager[LockedTokens]:
        """Hold the lock that lets one refresh run at a time across tasks, processes and instances."""
        ...

    async def read_status(self, now: float) -> TokenStatus: ...

    def missing_error(self, *, during_refresh: bool) -> ConfigError: ...


class TokenManager:
    """Hand out a valid MDR access token, refreshing and persisting the pair as needed.

    `confirm` performs the `session/confirm` call; MdrClient passes its own.
    `storage` keeps the pair: the token file by default, the database in
    cluster mode. `clock` returns Unix seconds and exists so tests can
    follow a simulated clock.
    """

    def __init__(
        self,
        settings: MdrSettings,
        confirm: ConfirmFunction,
        *,
        clock: Callable[[], float] = time.time,
        storage: TokenStorage | None = None,
    ) -> None:
        self.client_id = settings.client_id
        self.mdr_connection_name = settings.connection_name
        self.store: TokenStorage = storage or TokenFileStore(settings.token_dir, settings.client_id)
        self._confirm = confirm
        self._clock = clock
        self._margin = settings.refresh_margin_seconds
        self._pair: TokenPair | None = None
        self._lock = asyncio.Lock()

    def status(self) -> TokenStatus:
        """Return the state of the token file, checking its permissions.

        With another storage, such as the database, this is the state of the
        pair this manager last read or saved; `read_status` reads the storage.
        """
        if isinstance(self.store, TokenFileStore):
            return self.store.status(self._clock())
        return classify_pair(self._pair, self._clock(), None)

    async def read_status(self) -> TokenStatus:
        """Read the stored pair and return its state."""
        return await self.store.read_status(self._clock())

    async def access_token(self) -> str:
        """Return an access token, refreshing first when it is within the margin of its expiry."""
        pair = self._pair or await self._load_required()
        if not self._needs_refresh(pair):
            return pair.access_token
        return await self._refresh(rejected_access=None)

    async def refresh_after_rejection(self, rejected_access: str) -> str:
        """Refresh because MDR refused `rejected_access` (401/403), unless another caller already did."""
        return await self._refresh(rejected_access=rejected_access)

    async def activate(self, console_token: str) -> TokenStatus:
        """Exchange a refresh token issued in the MDR console and store the new pair.

        The token's format and expiry are checked before MDR is called, so a
        pasted JSON reply or a cut-off token gets its own message.
        """
        console_token = console_token.strip()
        register_tokens(console_token)
        check_console_token_format(console_token)
        try:
            expires_at = jwt_expiry(console_token)
        except ValueError as err:
            raise ConfigError(
                f"the console token is not a valid MDR token: {err}; copy the whole token "
                "from the MDR console (Settings, API)"
            ) from err
        if self._clock() >= expires_at:
            raise TokenExpiredError.from_template(
                CONSOLE_TOKEN_EXPIRED, client_id=self.client_id, expired_at=_utc(expires_at).isoformat()
            )

        async with self._lock:
            await self._run_shielded(self._exchange_and_save_locked(console_token))

        log.info("mdr.token.activated", extra=self._log_ids())
        return await self.read_status()

    def _log_ids(self) -> dict[str, str]:
        # `connection` in log records is the config's connection name, so the
        # MDR API connection name has a key of its own.
        return {"mdr_connection_name": self.mdr_connection_name, "client_id": self.client_id}

    async def _load_required(self) -> TokenPair:
        pair = await self.store.read()
        if pair is None:
            raise self.store.missing_error(during_refresh=False)
        self._pair = pair
        return pair

    def _needs_refresh(self, pair: TokenPair) -> bool:
        expires_at, lifetime = pair.access_expires_locally()
        # A margin longer than half the token's life would refresh on every
        # call and burn through refresh tokens, so it is capped there.
        margin = min(self._margin, lifetime / 2)
        return self._clock() >= expires_at - margin

    async def _refresh(self, rejected_access: str | None) -> str:
        async with self._lock:
            pair = self._pair or await self._load_required()
            if self._already_fresh(pair, rejected_access):
                return pair.access_token
            return await self._run_shielded(self._refresh_under_lock(rejected_access))

    def _already_fresh(self, pair: TokenPair, rejected_access: str | None) -> bool:
        if rejected_access is not None:
            return pair.access_token != rejected_access
        return not self._needs_refresh(pair)

    async def _refresh_under_lock(self, rejected_access: str | None) -> str:
        async with self.store.locked() as chain:
            pair = await chain.read()
            if pair is None:
                raise self.store.missing_error(during_refresh=True)

            # Another task, process or instance may have refreshed while this
            # one waited for the lock (a cancelled refresh finishes shielded),
            # so a pair that is fresh now is used instead of spending its
            # refresh token again.
            self._pair = pair
            if self._already_fresh(pair, rejected_access):
                log.info("mdr.token.reloaded", extra=self._log_ids())
                return pair.access_token

            if pair.rejected_at is not None or self._clock() >= pair.refresh_expires_at:
                # A process killed before its rename may have left the pair MDR
                # issued for this refresh token, or for a new activation.
                recovered = await chain.recover(pair)
                if recovered is None:
                    raise expired_refresh_error(self.client_id)
                return (await self._continue_recovered(chain, recovered, rejected_access)).access_token

            try:
                new_pair = await self._exchange_and_save(chain, pair.refresh_token)
            except TokenExpiredError:
                recovered = await chain.recover(pair)
                if recovered is None:
                    await self._record_rejection(chain, pair)
                    raise
                new_pair = await self._continue_recovered(chain, recovered, rejected_access)
            except OutcomeUnknownError as err:
                new_pair = await self._exchange_after_lost_reply(chain, pair, err)
            return new_pair.access_token

    async def _continue_recovered(
        self, chain: LockedTokens, recovered: TokenPair, rejected_access: str | None
    ) -> TokenPair:
        """Use a pair recovered from a temp token file, refreshing it first when its access token is due."""
        log.warning("mdr.token.recovered", extra=self._log_ids())
        self._pair = recovered
        if self._already_fresh(recovered, rejected_access):
            return recovered
        try:
            return await self._exchange_and_save(chain, recovered.refresh_token)
        except TokenExpiredError:
            await self._record_rejection(chain, recovered)
            raise

    async def _exchange_after_lost_reply(
        self, chain: LockedTokens, pair: TokenPair, lost: OutcomeUnknownError
    ) -> TokenPair:
        """Send the same refresh token once more after a session/confirm whose reply was lost.

        The token works once, so the second request is safe and separates two
        cases. Either MDR did not apply the first request and replies to this
        one, or it spent the token on the first and rejects this one. Then the
        chain is broken, and TokenExpiredError reports it and stops the connection.
        The caller holds the lock.
        """
        log.warning("mdr.token.confirm_reply_lost", extra={**self._log_ids(), "error": str(lost)})
        try:
            return await self._exchange_and_save(chain, pair.refresh_token)
        except TokenExpiredError as rejected:
            await self._record_rejection(chain, pair)
            raise TokenExpiredError.from_template(CONFIRM_REPLY_LOST, client_id=self.client_id) from rejected

    async def _record_rejection(self, chain: LockedTokens, pair: TokenPair) -> None:
        """Mark the stored pair rejected so `token status` shows Expired; the caller holds the lock."""
        rejected_at = int(self._clock())
        try:
            await chain.write_rejected(pair, rejected_at)
        except ConfigError as err:
            # The rejection is still raised to the caller; only `token status` misses it.
            log.error("mdr.token.rejection_not_saved", extra={**self._log_ids(), "error": str(err)})
            return
        self._pair = dataclasses.replace(pair, rejected_at=rejected_at)
        log.warning("mdr.token.rejected", extra={**self._log_ids(), "rejected_at": rejected_at})

    async def _exchange_and_save_locked(self, refresh_token: str) -> TokenPair:
        async with self.store.locked() as chain:
            return await self._exchange_and_save(chain, refresh_token)

    async def _exchange_and_save(self, chain: LockedTokens, refresh_token: str) -> TokenPair:
        # NOTE: if the reply to session/confirm is lost after MDR rotated the
        # token, the chain is broken and only a new console token can fix it.
        # A refresh detects this (`_exchange_after_lost_reply`); `activate`
        # raises OutcomeUnknownError, and the person running it tries again.
        # Only the lease holder may spend the refresh token. The lease may
        # lapse while session/confirm is in flight, because a lease can be
        # shorter than the request timeout. The storage's lock is held until
        # the new pair is committed, so a new holder waits for it and then
        # reads the new pair. Without a current fence (one instance, or a
        # command) the check passes, and that lock alone keeps refreshes apart.
        check_current_fence()
        access_token, new_refresh_token = await self._confirm(refresh_token)
        new_pair = TokenPair.from_tokens(access_token, new_refresh_token, self._clock())

        await chain.write(new_pair)
        self._pair = new_pair
        log.info(
            "mdr.token.refreshed",
            extra={
                **self._log_ids(),
                "access_expires_at": new_pair.access_expires_at,
                "refresh_expires_at": new_pair.refresh_expires_at,
            },
        )
        return new_pair

    @staticmethod
    async def _run_shielded(coroutine: Awaitable[Any]) -> Any:
        """Finish a confirm-and-save even when the caller is cancelled.

        A cancelled exchange could otherwise spend the single-use refresh
        token and drop the new one before it reaches the disk.
        """
        task = asyncio.ensure_future(coroutine)
        task.add_done_callback(_consume_result)
        return await asyncio.shield(task)


def _consume_result(task: asyncio.Future[Any]) -> None:
    # Retrieve the outcome of a shielded task whose caller went away, so
    # asyncio does not report "exception was never retrieved".
    if not task.cancelled():
        task.exception()
