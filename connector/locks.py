"""One process per connection: an exclusive file lock in the data folder.

`run` holds the lock of each connection it works for as long as it runs;
`sync --once` takes it for one cycle. The kernel releases a flock when its
process dies, so a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import math
import os
import stat
import time
from pathlib import Path

from mdr_connector.connector.errors import ConfigError, ConnectionBusyError
from mdr_connector.connector.i18n import N_

BUSY = N_(
    "connection {connection} is being synced by another mdr-connector process (pid {pid}); "
    "wait for it to finish, or pass --wait SECONDS"
)
NOT_REGULAR = N_("the lock file {path} is not a regular file: remove it and run the command again")
# Opened without following a symlink and without blocking on a FIFO, since
# the lock file is truncated and written once it is held.
OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
MAX_PID_BYTES = 32


class ConnectionLock:
    """An exclusive, non-blocking flock on `<data_dir>/locks/<connection>.lock`."""

    def __init__(self, data_dir: Path, connection: str) -> None:
        self.path = data_dir / "locks" / f"{connection}.lock"
        self.connection = connection
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = self._open(os.O_RDWR | os.O_CREAT)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConfigError.from_template(NOT_REGULAR, path=self.path)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def _open(self, flags: int) -> int:
        try:
            return os.open(self.path, flags | OPEN_FLAGS, 0o600)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise ConfigError.from_template(NOT_REGULAR, path=self.path) from err
            raise

    async def acquire(self, wait_seconds: float = 0) -> None:
        """Take the lock, waiting up to `wait_seconds`; raise ConnectionBusyError if another process keeps it."""
        if not math.isfinite(wait_seconds) or wait_seconds < 0:
            raise ValueError(f"wait_seconds must be a finite number of seconds >= 0, got {wait_seconds}")
        deadline = time.monotonic() + wait_seconds
        while not self.try_acquire():
            if time.monotonic() >= deadline:
                raise ConnectionBusyError.from_template(
                    BUSY, connection=self.connection, pid=self.holder_pid() or "?"
                )
            await asyncio.sleep(0.5)

    def holder_pid(self) -> int | None:
        try:
            fd = self._open(os.O_RDONLY)
        except (OSError, ConfigError):
            return None
        try:
            return int(os.read(fd, MAX_PID_BYTES).strip() or 0) or None
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._fd is None:
            return
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
