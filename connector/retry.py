"""Retries: the rate-limit gate of each remote system, the retry of idempotent reads, and the backoff of parked items.

A 429 belongs to an account, not to one request, so every client sends
through a RateGate. A 429 pauses the gate, every later call to that
system waits the pause out, and the request that met the 429 is sent
again. That resend is safe for writes too, because a 429 means the
request was not applied. A write that got a 503 is never sent again here,
because a gateway may return 503 after the write landed.

Other failed writes are never retried here: a failed write parks its
item, and the next reconciliation looks the write up by its marker before
sending it again.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from mdr_connector.connector.errors import RateLimitedError, RetriableError
from mdr_connector.connector.fencing import check_current_fence

log = logging.getLogger(__name__)

T = TypeVar("T")

# A Retry-After of 0, or a date already past, still pauses this long, so a
# server that keeps replying 429 with Retry-After 0 gets no tight loop of requests.
MIN_PAUSE_SECONDS = 1.0
RATE_LIMIT_ATTEMPTS = 3
# A longer pause is not slept through: the call raises RateLimitedError at
# once, and the engine parks the item until the stated time.
MAX_PAUSE_SECONDS = 60.0
# Backoff after a 429 without a usable Retry-After: full jitter, doubling from this base up to the cap.
BACKOFF_BASE_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 30.0


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry a read before the failure goes up to the caller."""

    attempts: int = 3
    base_seconds: float = 0.5
    max_seconds: float = 10.0


class RateGate:
    """The rate-limit pause of one remote system, shared by every call a client makes to it.

    `system` names the system in logs and messages, such as `jira`.
    `clock` (seconds, monotonic by default) and `sleep` are injectable so
    tests can record the waits on a fake clock.
    NOTE: each client owns its gate, so two connections that use the same
    account in one process pause separately.
    """

    def __init__(
        self,
        system: str,
        *,
        attempts: int = RATE_LIMIT_ATTEMPTS,
        max_pause_seconds: float = MAX_PAUSE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self.system = system
        self.attempts = attempts
        self.max_pause_seconds = max_pause_seconds
        self.clock = clock
        self.sleep = sleep
        self._paused_until = float("-inf")
        self._backoff = wait_random_exponential(multiplier=BACKOFF_BASE_SECONDS, max=BACKOFF_MAX_SECONDS)

    def remaining(self) -> float:
        """Seconds left of the current pause, 0 when calls may go out."""
        return max(0.0, self._paused_until - self.clock())

    def pause(self, seconds: float) -> None:
        """Hold every call for `seconds` from now, unless a longer pause is already running."""
        was_open = self.remaining() <= 0
        until = self.clock() + seconds
        if until <= self._paused_until:
            return
        self._paused_until = until
        if was_open:
            log.warning("http.rate_limited.paused", extra={"system": self.system, "seconds": round(seconds, 3)})

    async def wait(self) -> None:
        """Wait out the current pause; raise RateLimitedError at once when it is longer than `max_pause_seconds`."""
        while (left := self.remaining()) > 0:
            if left > self.max_pause_seconds:
                raise RateLimitedError(
                    f"calls to {self.system} are paused for {left:.0f} s after HTTP 429, "
                    f"longer than the {self.max_pause_seconds:.0f} s the connector waits in place",
                    retry_after=left,
                    status=None,
                )
            await self.sleep(left)

    async def send(self, call: Callable[[], Awaitable[T]], *, write: bool = False) -> T:
        """Run `call` once the gate is open, and again after each 429, at most `attempts` times in all.

        `write` marks a request that must not be sent twice: it is sent
        again only after a 429, never after a 503 with Retry-After. The
        RateLimitedError that gives up carries the pause the gate applied.
        """
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.attempts),
            retry=retry_if_exception(lambda error: self._may_resend(error, write=write)),
            wait=lambda _state: self.remaining(),
            sleep=self.sleep,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                await self.wait()
                # The wait can be long: a lease may have run out meanwhile.
                check_current_fence()
                try:
                    return await call()
                except RateLimitedError as err:
                    self._pause_after(err, attempt.retry_state)
                    raise
        raise AssertionError("unreachable: tenacity re-raises the last error")

    def _pause_after(self, error: RateLimitedError, state: RetryCallState) -> None:
        """Pause the gate for the reply's Retry-After, at least MIN_PAUSE_SECONDS, or for a jittered backoff without one."""
        if error.retry_after is None:
            seconds = self._backoff(state)
        else:
            seconds = error.retry_after
        seconds = max(seconds, MIN_PAUSE_SECONDS)
        # The error carries the pause applied, so a parked item waits at least as long.
        error.retry_after = seconds
        self.pause(seconds)

    def _may_resend(self, error: BaseException, *, write: bool) -> bool:
        if not isinstance(error, RateLimitedError) or error.status is None:
            return False
        if write and error.status != 429:
            return False
        return (error.retry_after or 0) <= self.max_pause_seconds


async def retry_read(policy: RetryPolicy, call: Callable[[], Awaitable[T]]) -> T:
    """Run an idempotent read, retrying retriable failures with jittered exponential backoff.

    RateLimitedError is not retried here: the client's RateGate has
    already waited out the stated pauses and sent the request again.
    """
    retrying = AsyncRetrying(
        stop=stop_after_attempt(policy.attempts),
        wait=wait_random_exponential(multiplier=policy.base_seconds, max=policy.max_seconds),
        retry=retry_if_exception(is_retriable_now),
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            return await call()
    raise AssertionError("unreachable: tenacity re-raises the last error")


def is_retriable_now(error: BaseException) -> bool:
    """Return whether a read that failed with `error` is sent again after backoff."""
    return isinstance(error, RetriableError) and not isinstance(error, RateLimitedError)


def parked_backoff_seconds(attempts: int, base_seconds: float, max_seconds: float) -> float:
    """Delay before the next try of an item that failed `attempts` times, with full jitter above half."""
    ceiling = min(max_seconds, base_seconds * 2 ** max(attempts - 1, 0))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def parked_next_try(
    now: datetime, attempts: int, base_seconds: float, max_seconds: float, error: BaseException | None = None
) -> datetime:
    """Return when a parked item that failed `attempts` times is tried again.

    A rate limit names the time the remote system accepts calls again, so
    the item waits at least that long, even past `max_seconds`.
    """
    next_try = now + timedelta(seconds=parked_backoff_seconds(attempts, base_seconds, max_seconds))
    if isinstance(error, RateLimitedError) and error.retry_after is not None:
        next_try = max(next_try, now + timedelta(seconds=error.retry_after))
    return next_try

