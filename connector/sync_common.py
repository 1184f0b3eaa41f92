"""Shared parts of the connection cycle (engine.py) and the comment sync (comments.py).

These are the MDR calls both make, the counters of their work, and a gather
that cancels the remaining tasks when one of them fails.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from mdr_connector.adapters.mdr.models import Comment, Incident

T = TypeVar("T")


class MalformedLike(Protocol):
    record_id: str | None
    update_time: int | None
    error: str


class CommentPageLike(Protocol):
    items: list[Comment]
    malformed: list[MalformedLike]


class IncidentPageLike(Protocol):
    items: list[Incident]
    malformed: list[MalformedLike]
    raw_count: int


class MdrApi(Protocol):
    """The calls the engine makes to MDR (adapters/mdr/client.py implements them)."""

    async def list_incidents(self, **filters: object) -> IncidentPageLike: ...

    async def get_incident(self, incident_id: str) -> Incident: ...

    async def list_comments(self, incident_id: str) -> CommentPageLike: ...

    async def create_comment(self, incident_id: str, text: str, markdown_to_html: bool = True) -> Comment: ...


async def gather_or_cancel(*awaitables: Awaitable[T]) -> list[T]:
    """Run awaitables concurrently; when one raises, cancel the rest before the error goes up.

    Plain `asyncio.gather` leaves the other tasks running after the first
    error, so they would keep writing after the caller gave up on the cycle.
    """
    tasks = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


@dataclass
class SyncStats:
    """Counters of the engine's work across cycles; the sets count each item once."""

    cycles: int = 0
    incidents_seen: set[str] = field(default_factory=set)
    tickets_created: int = 0
    tickets_linked: int = 0
    tickets_updated: int = 0
    comments_to_ticket: int = 0
    comments_to_mdr: int = 0
    echoes_suppressed: set[str] = field(default_factory=set)
    restricted_skipped: set[str] = field(default_factory=set)
    failures: int = 0
