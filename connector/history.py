"""Change detection through `incidents/history`: which incidents changed since the cursor.

`incidents/history` pages each entity type separately (one search index per
type on the service). Page N holds up to `entity_type_page_size` records of
every type, so a type with fewer records than that on a page has no more.
A read of several pages therefore covers each type up to a different time.
All types are covered up to the oldest of the newest times of the types
that still have pages, and the cursor moves no further than that.

Only the incidents found here are reconciled, and each reconciliation reads
the incident's full state, so an object whose change the history omits is
still compared and copied.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from mdr_connector.adapters.mdr.models import MAX_ID_LENGTH, HistoryEntry, Incident, parse_incident
from mdr_connector.connector.errors import InvalidPayloadError
from mdr_connector.connector.sync_common import MdrApi

log = logging.getLogger(__name__)

INCIDENT_DETAILS = "incident_details"

T = TypeVar("T")


@dataclass
class ChangedIncident:
    """One incident that has history records in the window, with its newest snapshot when one was seen."""

    incident_id: str
    newest_change: int
    snapshot: Incident | None = None
    snapshot_time: int = -1
    kinds: set[str] = field(default_factory=set)

    def current_snapshot(self) -> Incident | None:
        """Return the snapshot when no record of another object is newer than it, else None so the details are read."""
        if self.snapshot is not None and self.snapshot_time >= self.newest_change:
            return self.snapshot
        return None


@dataclass
class HistoryWindow:
    """Result of one history read: the changed incidents, how far the read is complete, and malformed records."""

    changed: dict[str, ChangedIncident] = field(default_factory=dict)
    # The newest record time up to which every entity type was read, or None when nothing was read.
    covered_until: int | None = None
    complete: bool = False
    # Incidents whose newest snapshot in the window is malformed, with the error.
    malformed: dict[str, tuple[int, str]] = field(default_factory=dict)
    pages: int = 0


async def read_history_window(
    mdr: MdrApi,
    read: Callable[[Callable[[], Awaitable[T]]], Awaitable[T]],
    *,
    since: int,
    free_until: int,
    page_size: int,
    max_pages: int,
    horizon: int,
) -> HistoryWindow:
    """Read history records from `since` (inclusive) until every type is exhausted or the page budget ends.

    The window moves like a keyset: after each page the next request starts
    at the time every type is covered to, from page 1, so no request goes
    deep into the API's result window. Page numbers grow only while a page
    stays inside one millisecond. Pages that hold nothing newer than
    `free_until` (the overlap re-read before the stored cursor) do not count
    against `max_pages`. If they counted, an overlap holding more records
    than the budget would be re-read every cycle and never passed.

    A record newer than `horizon` (epoch ms) is bad data. Its incident is
    still returned, so its reconciliation parks it. Its time never counts
    towards `covered_until`, it never makes a page count against
    `max_pages`, and its type is not paged further.
    """
    window = HistoryWindow()
    start, page, counted = since, 1, 0
    newest_seen: int | None = None

    while counted < max_pages:
        entries: list[HistoryEntry] = await read(  # type: ignore[arg-type]
            lambda start=start, page=page: mdr.list_history(
                min_record_time=start, page=page, entity_type_page_size=page_size
            )
        )
        window.pages += 1
        counts: dict[str, int] = {}
        newest_by_type: dict[str, int] = {}
        beyond_horizon: set[str] = set()
        for entry in entries:
            counts[entry.entity_type] = counts.get(entry.entity_type, 0) + 1
            if entry.changed_at <= horizon:
                newest_by_type[entry.entity_type] = max(newest_by_type.get(entry.entity_type, start), entry.changed_at)
                newest_seen = max(newest_seen or entry.changed_at, entry.changed_at)
            else:
                beyond_horizon.add(entry.entity_type)
            _note_entry(window, entry)
        if any(free_until < entry.changed_at <= horizon for entry in entries):
            counted += 1

        # A type with a short page has no more records from `start` on. An
        # unknown type counts like the known ones, so a new kind is not lost.
        # Records come back oldest first, so a type that reached a record
        # beyond the horizon has only such records left. Paging on through
        # them would hold the window at `start` until the budget ran out.
        open_types = [
            entity_type
            for entity_type, count in counts.items()
            if count >= page_size and entity_type not in beyond_horizon
        ]
        if not open_types:
            window.complete = True
            window.covered_until = newest_seen
            break

        covered = min(newest_by_type.get(entity_type, start) for entity_type in open_types)
        window.covered_until = covered if newest_seen is not None else None
        if covered > start:
            start, page = covered, 1
        else:
            page += 1

    _drop_seen_malformed(window, free_until)
    return window


def _note_entry(window: HistoryWindow, entry: HistoryEntry) -> None:
    snapshot: Incident | None = None
    incident_id = entry.incident_id
    if entry.entity_type == INCIDENT_DETAILS:
        try:
            snapshot = parse_incident(entry.entity)
        except InvalidPayloadError as err:
            # An id the ledger cannot hold is logged, not parked.
            if 0 < len(incident_id) <= MAX_ID_LENGTH:
                known = window.malformed.get(incident_id)
                if known is None or known[0] <= entry.changed_at:
                    window.malformed[incident_id] = (entry.changed_at, str(err))
            else:
                log.error("sync.incident.malformed", extra={"error": str(err)})
            return
        incident_id = snapshot.incident_id

    if not incident_id or len(incident_id) > MAX_ID_LENGTH:
        # NOTE: whether comment, attachment and response records name their
        # incident is INFERRED. Every such change also adds an
        # incident_details record (CONFIRMED for comments), which finds it.
        return

    changed = window.changed.get(incident_id)
    if changed is None:
        changed = window.changed[incident_id] = ChangedIncident(incident_id, entry.changed_at)
    changed.newest_change = max(changed.newest_change, entry.changed_at)
    changed.kinds.add(entry.entity_type)
    if snapshot is not None and entry.changed_at >= changed.snapshot_time:
        changed.snapshot, changed.snapshot_time = snapshot, entry.changed_at
        # A valid state newer than a malformed one repairs it.
        bad = window.malformed.get(incident_id)
        if bad is not None and bad[0] <= entry.changed_at:
            del window.malformed[incident_id]


def _drop_seen_malformed(window: HistoryWindow, free_until: int) -> None:
    """Forget malformed snapshots from before the cursor, because the cycle that first read them parked them."""
    for incident_id, (changed_at, _) in list(window.malformed.items()):
        if changed_at <= free_until:
            del window.malformed[incident_id]
