"""One process per connection: an exclusive file lock in the data folder.

`run` holds the lock of each connection it works for as long as it runs;
`sync --once` takes it for one cycle. The kernel releases a flock when its
process dies, so a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from pathlib import Path

from mdr_connector.connector.errors import ConnectionBusyError
from mdr_connector.connector.i18n import N_

BUSY = N_(
    "connection {connection} is being synced by another mdr-connector process (pid {pid}); "
    "wait for it to finish, or pass --wait SECONDS"
)


class ConnectionLock:
    """An exclusive, non-blocking flock on `<data_dir>/locks/<connection>.lock`."""

    def __init__(self, data_dir: Path, connection: str) -> None:
        self.path = data_dir / "locks" / f"{connection}.lock"
        self.connection = connection
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    async def acquire(self, wait_seconds: float = 0) -> None:
        """Take the lock, waiting up to `wait_seconds`; raise ConnectionBusyError if another process keeps it."""
        deadline = time.monotonic() + wait_seconds
        while not self.try_acquire():
            if time.monotonic() >= deadline:
                raise ConnectionBusyError.from_template(
                    BUSY, connection=self.connection, pid=self.holder_pid() or "?"
                )
            await asyncio.sleep(0.5)

    def holder_pid(self) -> int | None:
        try:
            return int(self.path.read_text().strip() or 0) or None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self._fd is None:
            return
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
