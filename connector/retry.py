"""Retry policy for idempotent reads, and the backoff of parked items.

Writes are never retried here: a failed write parks its item, and the next
reconciliation looks the write up by its marker before sending it again.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)
from tenacity.wait import wait_base

from mdr_connector.connector.errors import RateLimitedError, RetriableError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry a read before the failure goes up to the caller."""

    attempts: int = 3
    base_seconds: float = 0.5
    max_seconds: float = 10.0


class wait_retry_after(wait_base):
    """Wait what a 429 reply asked for; fall back to jittered exponential backoff."""

    def __init__(self, fallback: wait_base) -> None:
        self.fallback = fallback

    def __call__(self, retry_state) -> float:  # noqa: ANN001
        error = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(error, RateLimitedError) and error.retry_after is not None:
            return max(error.retry_after, 0.0)
        return self.fallback(retry_state)


def is_retriable_now(policy: RetryPolicy) -> Callable[[BaseException], bool]:
    """Retry retriable errors, except a Retry-After longer than the policy's cap."""

    def check(error: BaseException) -> bool:
        if not isinstance(error, RetriableError):
            return False
        if isinstance(error, RateLimitedError) and (error.retry_after or 0) > policy.max_seconds:
            return False
        return True

    return check


async def retry_read(policy: RetryPolicy, call: Callable[[], Awaitable[T]]) -> T:
    """Run an idempotent read, retrying retriable failures with backoff."""
    retrying = AsyncRetrying(
        stop=stop_after_attempt(policy.attempts),
        wait=wait_retry_after(wait_random_exponential(multiplier=policy.base_seconds, max=policy.max_seconds)),
        retry=retry_if_exception(is_retriable_now(policy)),
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            return await call()
    raise AssertionError("unreachable: tenacity re-raises the last error")


def parked_backoff_seconds(attempts: int, base_seconds: float, max_seconds: float) -> float:
    """Delay before the next try of an item that failed `attempts` times, with full jitter above half."""
    ceiling = min(max_seconds, base_seconds * 2 ** max(attempts - 1, 0))
    return ceiling / 2 + random.uniform(0, ceiling / 2)
