"""The fence of the running connection task: this instance's local view of its lease.

A connection task in cluster mode makes its fence current (a context
variable, inherited by the tasks and threads it starts through asyncio).
Every request to MDR or a ticket system checks it right before it is sent
(`check_current_fence`, called by each client's rate gate), so a process
that resumes after its lease ran out sends nothing. The lease itself lives
in PostgreSQL; see connector/leases.py.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

from mdr_connector.connector.errors import LeaseLostError

_current_fence: contextvars.ContextVar[Fence | None] = contextvars.ContextVar("mdr_connector_fence", default=None)


def current_fence() -> Fence | None:
    """Return the fence of the connection whose task runs now: None in commands without a lease and without cluster mode."""
    return _current_fence.get()


class Fence:
    """This instance's hold on one connection's lease, as this process tracks it without a database query."""

    def __init__(self, connection: str, holder: str, epoch: int, valid_until: float, clock: Callable[[], float]) -> None:
        self.connection = connection
        self.holder = holder
        self.epoch = epoch
        self.valid_until = valid_until
        self.lost = False
        # Set when the instance holds more than its share: the connection's
        # task finishes its cycle and hands the lease back.
        self.release_requested = False
        # After a fatal error: how long this instance leaves the connection to the others.
        self.avoid_seconds = 0.0
        self._clock = clock

    def remaining(self) -> float:
        if self.lost:
            return 0.0
        return max(0.0, self.valid_until - self._clock())

    def check_remote(self, min_remaining: float = 0.0) -> None:
        """Raise LeaseLostError unless the lease is known held for `min_remaining` more seconds."""
        if self.lost or self._clock() + min_remaining >= self.valid_until:
            raise LeaseLostError(
                f"connection {self.connection}: this instance ({self.holder}) no longer holds its lease "
                f"(epoch {self.epoch}); another instance works it now"
            )

    def use(self) -> contextvars.Token[Fence | None]:
        """Make this the current fence of the running task and the tasks it starts."""
        return _current_fence.set(self)


def reset_fence(token: contextvars.Token[Fence | None]) -> None:
    _current_fence.reset(token)


def check_current_fence() -> None:
    """Raise LeaseLostError when the running task has a fence whose lease is no longer known held."""
    fence = _current_fence.get()
    if fence is not None:
        fence.check_remote()


@contextlib.contextmanager
def without_fence() -> Iterator[None]:
    """Run a block with no current fence, so its ledger transactions skip the lease check."""
    token = _current_fence.set(None)
    try:
        yield
    finally:
        _current_fence.reset(token)
