"""The sync engine: one connection's cycle, and the reconciliation of one incident.

A cycle finds what changed on either side since its cursors (MDR by
`update_time`, the ticket system by `updated`), then reconciles each
changed incident. Change detection only decides *which* incidents to look
at. The reconciliation reads the full state of both sides, compares it
with the ledger, and writes only what is missing. That makes a
reconciliation safe to repeat after a crash, a lost reply or a replayed
page, which is how the engine avoids both loss and duplicates.

Every write follows one protocol: record the intent, look the marker up on
the target when an earlier attempt may have landed, write with the marker,
record the target id. The comment sync of a reconciliation is in comments.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TypeVar, cast

from mdr_connector.adapters.mdr.models import Incident
from mdr_connector.connector.assets import AssetDetails, assets_wanted
from mdr_connector.connector.attachments import AttachmentSync
from mdr_connector.connector.comments import CommentSync
from mdr_connector.connector.config import ConnectionSettings
from mdr_connector.connector.errors import (
    ConfigError,
    ConnectionFatalError,
    ConnectorError,
    InvalidPayloadError,
    ItemError,
    RejectedError,
    failure_reason,
)
from mdr_connector.connector.history import read_history_window
from mdr_connector.connector.mapping import (
    fields_hash,
    render_draft,
    render_fields,
)
from mdr_connector.connector.mappingfile import Mapping, Route
from mdr_connector.connector.responses import ResponseSync
from mdr_connector.connector.retry import RetryPolicy, parked_next_try, retry_read
from mdr_connector.connector.routing import check_destinations, destination_for, match_route
from mdr_connector.connector.store import (
    LINKED,
    PENDING,
    Link,
    Store,
)
from mdr_connector.connector.status import StatusSync
from mdr_connector.connector.sync_common import (
    CycleStep,
    IncidentPageLike,
    IncidentPart,
    MalformedLike,
    MdrApi,
    SyncContext,
    SyncStats,
    TicketWatch,
    WatchedTickets,
    gather_or_cancel,
)
from mdr_connector.connector.ticket_requests import TicketIncidentRequests, requested_ticket_id
from mdr_connector.connector.tickets import (
    TicketAccount,
    TicketAdapter,
    TicketChange,
    TicketRef,
)

log = logging.getLogger(__name__)

MDR_CURSOR = "mdr"
HISTORY_CURSOR = "mdr_history"
TICKET_CURSOR = "ticket"
INCIDENT = "incident"
# An MDR time further ahead of this machine's clock than this is taken for
# bad data: moving the cursor to it would hide every later change.
# NOTE: one day is a judgement call, far above real clock skew.
FUTURE_TOLERANCE = timedelta(days=1)

T = TypeVar("T")


def build_parts(context: SyncContext) -> list[IncidentPart]:
    """Build the parts a reconciliation runs after the fields and comments, in order."""
    parts: list[IncidentPart] = []
    parts.append(AttachmentSync(context))
    parts.append(ResponseSync(context))
    parts.append(StatusSync(context))
    return parts


def build_cycle_steps(context: SyncContext) -> list[CycleStep]:
    """Build the steps a cycle runs after the change detection of both sides."""
    # Imported here because operations.py builds engines of its own.
    from mdr_connector.connector.operations import LedgerRetention

    steps: list[CycleStep] = []
    steps.append(TicketIncidentRequests(context))
    steps.append(LedgerRetention(context))
    return steps


class ConnectionSync:
    """Syncs one MDR client with one ticket system."""

    def __init__(
        self,
        settings: ConnectionSettings,
        mapping: Mapping,
        store: Store,
        mdr: MdrApi,
        tickets: TicketAdapter,
        *,
        clock: Callable[[], datetime] | None = None,
        read_policy: RetryPolicy | None = None,
        spool_dir: Path | None = None,
    ) -> None:
        self.settings = settings
        self.name = settings.name
        self.mapping = mapping
        self.store = store
        self.mdr = mdr
        self.tickets = tickets
        self.clock = clock or (lambda: datetime.now(timezone.utc))
        self.read_policy = read_policy or RetryPolicy()
        self.stats = SyncStats()
        # Every ticket call of a reconciliation goes through the watch, which
        # records what it read and wrote (see `_own_writes_only`).
        self.watched = WatchedTickets(tickets)
        watched = cast(TicketAdapter, self.watched)
        # The bound `_read` looks up `self.read_policy` on each call, so a policy
        # set after construction applies to comment reads too.
        # NOTE: the comment sync keeps its own references to the settings,
        # mapping, store and both clients, so replacing one of these attributes
        # here after construction does not reach it.
        self.comments = CommentSync(settings, mapping, store, mdr, watched, self.stats, self._read)
        self.context = SyncContext(
            settings=settings,
            mapping=mapping,
            store=store,
            mdr=mdr,
            tickets=watched,
            stats=self.stats,
            read=self._read,
            clock=lambda: self.clock(),
            spool_dir=spool_dir or Path("data") / "spool",
        )
        self.comments.read_ticket_comments = self.context.ticket_comments
        self.parts: list[IncidentPart] = build_parts(self.context)
        self.cycle_steps: list[CycleStep] = build_cycle_steps(self.context)
        # Weak values: a lock lives only while a reconciliation holds or waits
        # for it, so the map does not grow with every incident ever seen.
        self._incident_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        # The clients bound the calls to each system (`max_concurrency`), so
        # this bounds only how many incidents are reconciled at once.
        self._concurrency = asyncio.Semaphore(settings.sync.max_incidents_in_flight)
        # The results of the current page's batch lookup (`_look_up_tickets`),
        # each used by the first `ensure_ticket` of its incident.
        self._looked_up: dict[str, TicketRef | None] = {}
        # Incidents of the current page known to have no parked entry, so a
        # successful reconciliation of one has nothing to unpark.
        self._not_parked: set[str] = set()
        # Incidents of the current page that had no link when the page was
        # read, so their `ensure_ticket` need not read it again.
        self._unlinked: set[str] = set()
        # Whether the last MDR change read stopped at its page budget with
        # changes left, so the runner starts the next cycle without waiting.
        self.backlog_remaining = False

    @property
    def own_account(self) -> TicketAccount | None:
        """The connector's own account on the ticket system, None until `open()`. CommentSync stores it."""
        return self.comments.own_account

    @own_account.setter
    def own_account(self, account: TicketAccount | None) -> None:
        self.comments.own_account = account
        self.context.own_account = account

    async def open(self) -> None:
        """Connect to the ticket system and learn the connector's own account there."""
        account = await self.tickets.open()
        await self.check_mapping()
        self.own_account = account
        log.info(
            "sync.connection.opened",
            extra={"connection": self.name, "ticket_account": account.id},
        )

    async def check_mapping(self) -> None:
        """Stop the connection when the ticket system lacks a project, issue type or priority the mapping uses.

        The top-level project and issue type and those of every route are
        checked, and all problems are reported in one error. Without this,
        every new incident would fail on its own and be parked, which looks
        like a transient fault instead of a setting to fix.
        """
        problems = await check_destinations(self.mapping, self.tickets)
        if problems:
            raise ConfigError(f"mapping {self.settings.mapping}: {'; '.join(problems)}")

    async def run_cycle(self) -> SyncStats:
        """Run one sync cycle; return the cumulative stats."""
        if self.own_account is None:
            await self.open()

        self.stats.cycles += 1
        log.info("sync.cycle.started", extra={"connection": self.name, "cycle": self.stats.cycles})
        await self.retry_parked()
        await self.sync_mdr_changes()
        await self.sync_ticket_changes()
        for step in self.cycle_steps:
            await step.run()
        log.info(
            "sync.cycle.finished",
            extra={
                "connection": self.name,
                "cycle": self.stats.cycles,
                "tickets_created": self.stats.tickets_created,
                "comments_to_ticket": self.stats.comments_to_ticket,
                "comments_to_mdr": self.stats.comments_to_mdr,
            },
        )
        return self.stats

    # Change detection: MDR

    async def sync_mdr_changes(self) -> None:
        """Reconcile every incident changed in MDR since the cursor, page by page.

        The window moves forward by `min_update_time` instead of by deep page
        numbers, because the API caps a result window at about 10,000 items.
        Page numbers are used only inside one millisecond that contains more
        than a page of incidents, with `max_update_time` pinning the window to it.
        """
        self.backlog_remaining = False
        if self.settings.sync.change_source == "history" and await self.sync_mdr_history():
            return

        # NOTE: sorting incidents/list by `update_time` is INFERRED from the
        # documented `"<field>:asc"` form; public sources show only
        # `creation_time` as a sort field.
        sync = self.settings.sync
        cursor = start_cursor = await self._mdr_cursor()
        window_start = max(cursor - int(sync.mdr_overlap_seconds * 1000), 0)
        window_end: int | None = None
        page_number = 1
        pages_left = sync.max_pages_per_cycle
        min_creation_time = await self._creation_floor()

        while pages_left > 0:
            page = await self._read(
                lambda: self.mdr.list_incidents(
                    min_update_time=window_start,
                    max_update_time=window_end,
                    min_creation_time=min_creation_time,
                    statuses=sync.filters.statuses,
                    priorities=sync.filters.priorities,
                    tenants=sync.filters.tenants,
                    page=page_number,
                    page_size=sync.page_size,
                    sort="update_time:asc",
                )
            )
            newest_plausible, newest = await self._reconcile_page(page, seen_until=start_cursor)
            if newest_plausible is not None and newest_plausible > cursor:
                cursor = newest_plausible
                await self.store.set_cursor(self.name, MDR_CURSOR, str(cursor))
            # Pages that only re-read the overlap before this cycle's starting
            # cursor are free: were they counted, an overlap holding more than
            # the page budget would be re-read every cycle and never passed.
            if newest is None or newest > start_cursor:
                pages_left -= 1

            page_full = page.raw_count >= sync.page_size
            if window_end is not None:
                if page_full:
                    page_number += 1
                else:
                    window_start, window_end, page_number = window_start + 1, None, 1
                continue
            if not page_full:
                return
            if newest is None or newest <= window_start:
                window_end, page_number = window_start, 2
            else:
                window_start, page_number = newest, 1

        self.backlog_remaining = True
        log.info(
            "sync.mdr.backlog_remaining",
            extra={"connection": self.name, "cursor": cursor, "pages": sync.max_pages_per_cycle},
        )

    async def sync_mdr_history(self) -> bool:
        """Reconcile every incident that has `incidents/history` records since the cursor.

        The filters and `new_only` decide which incidents get a ticket. An
        incident already linked keeps syncing whatever its status or tenant
        becomes, so its ticket follows it to the end.

        Returns False when a history page is malformed. One bad record fails
        its whole page, and skipping it would make its entity type look
        exhausted, so the cycle finds changes through `incidents/list`
        instead, which sets single bad records aside.
        """
        sync = self.settings.sync
        cursor = await self._history_cursor()
        try:
            window = await read_history_window(
                self.mdr,
                self._read,
                since=max(cursor - int(sync.mdr_overlap_seconds * 1000), 0),
                free_until=cursor,
                page_size=sync.page_size,
                max_pages=sync.max_pages_per_cycle,
                horizon=self._future_horizon_ms(),
            )
        except InvalidPayloadError as err:
            log.error("sync.history.unreadable", extra={"connection": self.name, "error": str(err)})
            list_cursor = await self._mdr_cursor()
            if list_cursor < cursor:
                await self.store.set_cursor(self.name, MDR_CURSOR, str(cursor))
            return False
        backoff = await self._in_backoff(
            {changed.incident_id: changed.newest_change for changed in window.changed.values()}, cursor
        )
        for incident_id, (_, error) in window.malformed.items():
            self.stats.failures += 1
            log.error("sync.incident.malformed", extra={"connection": self.name, "incident_id": incident_id, "error": error})
            await self._park(incident_id, error)

        links = await self.store.get_links(self.name, window.changed)
        creation_floor = await self._creation_floor()
        due = []
        reconciled: list[str] = []
        unlinked: list[str] = []
        for changed in window.changed.values():
            if changed.incident_id in window.malformed or changed.incident_id in backoff:
                continue
            self.stats.incidents_seen.add(changed.incident_id)
            link = links.get(changed.incident_id)
            snapshot = changed.current_snapshot()
            linked = link is not None and link.state == LINKED
            if linked and snapshot is not None and (link.mdr_update_time or -1) >= snapshot.update_time:  # type: ignore[union-attr]
                continue
            if not linked and snapshot is not None and not self._wanted(snapshot, creation_floor):
                continue
            due.append(self._reconcile_from_history(changed.incident_id, snapshot, linked, creation_floor))
            reconciled.append(changed.incident_id)
            if link is None:
                unlinked.append(changed.incident_id)
        async with self._page_prepared(reconciled, unlinked):
            await gather_or_cancel(*due)

        if window.covered_until is not None and window.covered_until > cursor:
            await self.store.set_cursor(self.name, HISTORY_CURSOR, str(window.covered_until))
        if not window.complete:
            self.backlog_remaining = True
            log.info(
                "sync.mdr.backlog_remaining",
                extra={"connection": self.name, "cursor": window.covered_until, "pages": window.pages},
            )
        return True

    async def _reconcile_from_history(
        self, incident_id: str, snapshot: Incident | None, linked: bool, creation_floor: int | None
    ) -> None:
        if snapshot is None and not linked:
            # The filters need the incident itself before a ticket is made for it.
            try:
                snapshot = await self._read(lambda: self.mdr.get_incident(incident_id))
            except ConnectionFatalError:
                raise
            except ConnectorError as err:
                await self._record_failure(incident_id, err)
                return
            if not self._wanted(snapshot, creation_floor):
                return
        await self._reconcile_guarded(incident_id, snapshot)

    def _wanted(self, incident: Incident, creation_floor: int | None) -> bool:
        """Return whether the connection's filters and `new_only` floor select this incident for a ticket."""
        filters = self.settings.sync.filters
        return (
            (not filters.statuses or incident.status in filters.statuses)
            and (not filters.priorities or incident.priority in filters.priorities)
            and (not filters.tenants or incident.tenant_name in filters.tenants)
            and (creation_floor is None or incident.creation_time >= creation_floor)
        )

    async def mdr_cursor_value(self) -> int | None:
        """Read the stored MDR change cursor of the configured change source, in epoch ms, or None before the first cycle."""
        name = HISTORY_CURSOR if self.settings.sync.change_source == "history" else MDR_CURSOR
        stored = await self.store.get_cursor(self.name, name)
        return int(stored) if stored is not None else None

    async def _history_cursor(self) -> int:
        """Return the history cursor, storing the `incidents/list` cursor as its start when there is none."""
        stored = await self.store.get_cursor(self.name, HISTORY_CURSOR)
        if stored is not None:
            return int(stored)
        start = await self._mdr_cursor()
        await self.store.set_cursor(self.name, HISTORY_CURSOR, str(start))
        return start

    async def _mdr_cursor(self) -> int:
        """Return the MDR cursor, storing the first run's start as the cursor when there is none."""
        stored = await self.store.get_cursor(self.name, MDR_CURSOR)
        if stored is not None:
            return int(stored)
        start = int(self._first_run_start().timestamp() * 1000)
        await self.store.set_cursor(self.name, MDR_CURSOR, str(start))
        return start

    async def _creation_floor(self) -> int | None:
        """In `new_only` mode, the creation time before which incidents are ignored.

        It is `start.since` when set, else the moment of the first run: the
        lookback applies to `updated` mode only, because `new_only` means
        incidents created from now on.
        """
        if self.settings.sync.mode != "new_only":
            return None
        stored = await self.store.get_cursor(self.name, "mdr_creation_floor")
        if stored is not None:
            return int(stored)
        since = self.settings.sync.start.since
        floor = int((since or self.clock()).timestamp() * 1000)
        await self.store.set_cursor(self.name, "mdr_creation_floor", str(floor))
        return floor

    def _first_run_start(self) -> datetime:
        # NOTE: the first run has no server time to start from, so it uses the
        # local clock. The default 7-day lookback dwarfs any sane clock skew.
        start = self.settings.sync.start
        if start.since is not None:
            return start.since
        return self.clock() - timedelta(days=start.lookback_days)

    async def _reconcile_page(self, page: IncidentPageLike, *, seen_until: int) -> tuple[int | None, int | None]:
        """Reconcile the changed incidents of one page.

        Return the newest `update_time` that may move the cursor, and the
        newest of all, which moves the paging window. A time beyond the future
        horizon never moves the cursor; its incident is parked by `reconcile`.
        `seen_until` is the cursor the cycle started from: see `_in_backoff`.
        """
        horizon = self._future_horizon_ms()
        times = [incident.update_time for incident in page.items]
        times += [record.update_time for record in page.malformed if record.update_time is not None]
        plausible = [moment for moment in times if moment <= horizon]

        seen_malformed = {
            record.record_id: record.update_time
            for record in page.malformed
            if record.record_id is not None and record.update_time is not None
        }
        backoff = await self._in_backoff(seen_malformed, seen_until)
        for record in page.malformed:
            if record.record_id not in backoff:
                await self._park_malformed(record)

        links = await self.store.get_links(self.name, (incident.incident_id for incident in page.items))
        backoff = await self._in_backoff({incident.incident_id: incident.update_time for incident in page.items}, seen_until)
        changed = []
        for incident in page.items:
            self.stats.incidents_seen.add(incident.incident_id)
            link = links.get(incident.incident_id)
            if link is not None and link.state == LINKED and (link.mdr_update_time or -1) >= incident.update_time:
                continue
            if incident.incident_id in backoff:
                continue
            changed.append(incident)

        reconciled = [incident.incident_id for incident in changed]
        unlinked = [incident_id for incident_id in reconciled if incident_id not in links]
        async with self._page_prepared(reconciled, unlinked):
            await gather_or_cancel(*(self._reconcile_guarded(incident.incident_id, incident) for incident in changed))
        return (max(plausible) if plausible else None), (max(times) if times else None)

    @contextlib.asynccontextmanager
    async def _page_prepared(self, reconciled: list[str], unlinked: list[str]) -> AsyncIterator[None]:
        """Read for a page of incidents, in one request each, what their reconciliations run inside would read one by one.

        These are which of the `reconciled` incidents have no parked entry,
        and the tickets of the `unlinked` ones (`_look_up_tickets`), whose
        missing links the caller read with the page. All are dropped at the
        end of the block, so no later cycle acts on them.
        """
        if len(reconciled) > 1:
            parked = await self.store.parked_item_ids(self.name, INCIDENT, reconciled, not_before=None)
            self._not_parked.update(incident_id for incident_id in reconciled if incident_id not in parked)
        self._unlinked.update(unlinked)
        try:
            await self._look_up_tickets(unlinked)
            yield
        finally:
            for incident_id in reconciled:
                self._not_parked.discard(incident_id)
            for incident_id in unlinked:
                self._unlinked.discard(incident_id)
                self._looked_up.pop(incident_id, None)

    async def _look_up_tickets(self, incident_ids: list[str]) -> None:
        """Look up the tickets of incidents without a link in one batch, for their reconciliations.

        Without it each new incident's `ensure_ticket` searches on its own
        before its create: one request per incident, the largest share of a
        backlog's ticket searches. A result is used once, by the first
        reconciliation of its incident. A failed batch is logged and each
        incident is looked up on its own as before.
        """
        if len(incident_ids) < 2 or not self.tickets.capabilities.batch_lookup:
            return

        try:
            found = await self._read(lambda: self.tickets.find_incident_tickets(incident_ids))
        except ConnectionFatalError:
            raise
        except Exception as err:  # noqa: BLE001 - each incident's own lookup keeps a bad reply to that incident
            log.info(
                "sync.ticket.lookup_batch_failed",
                extra={"connection": self.name, "incidents": len(incident_ids), "error": failure_reason(err)},
            )
            return
        self._looked_up.update({incident_id: found.get(incident_id) for incident_id in incident_ids})

    async def _in_backoff(self, changes: dict[str, int], seen_until: int) -> set[str]:
        """Return the incidents parked with a later next try whose change a cycle before this one already saw.

        The overlap re-reads such a change every cycle, and reconciling it each
        time would fail it again and again, ignoring the parked backoff. A
        change newer than the cursor is new information and is reconciled.
        The rest wait for their retry in `retry_parked`.
        """
        old_changes = [incident_id for incident_id, moment in changes.items() if moment <= seen_until]
        if not old_changes:
            return set()
        return await self.store.parked_item_ids(self.name, INCIDENT, old_changes, not_before=self.clock())

    def _future_horizon_ms(self) -> int:
        return int((self.clock() + FUTURE_TOLERANCE).timestamp() * 1000)

    async def _park_malformed(self, record: MalformedLike) -> None:
        self.stats.failures += 1
        if record.record_id is None:
            log.error("sync.incident.malformed", extra={"connection": self.name, "error": record.error})
            return
        log.error(
            "sync.incident.malformed",
            extra={"connection": self.name, "incident_id": record.record_id, "error": record.error},
        )
        await self._park(record.record_id, record.error)

    # Change detection: ticket system

    async def sync_ticket_changes(self) -> None:
        """Reconcile every linked incident whose ticket changed since the ticket cursor."""
        stored = await self.store.get_cursor(self.name, TICKET_CURSOR)
        if stored is None:
            # Before the first cycle no ticket is linked yet, so the ticket
            # side starts now. It is stored at once: a start recomputed from
            # the clock each cycle would slide past changes not yet visible.
            stored = self.clock().isoformat()
            await self.store.set_cursor(self.name, TICKET_CURSOR, stored)
        cursor = datetime.fromisoformat(stored)
        since = cursor - timedelta(seconds=self.settings.sync.ticket_overlap_seconds)

        changes = await self._read(lambda: self.tickets.changed_tickets(since))
        newest_by_ticket: dict[str, TicketChange] = {}
        for change in changes:
            known = newest_by_ticket.get(change.ref.id)
            if known is None or change.updated > known.updated:
                newest_by_ticket[change.ref.id] = change

        links = await self.store.get_links_by_ticket_ids(self.name, newest_by_ticket)
        # A parked incident is reconciled whole when its retry is due, ticket
        # changes included, so it is not tried again here before its backoff.
        waiting = await self.store.parked_item_ids(
            self.name, INCIDENT, [link.incident_id for link in links.values()], not_before=self.clock()
        )
        links = {ticket_id: link for ticket_id, link in links.items() if link.incident_id not in waiting}
        due = [
            (links[ticket_id], change)
            for ticket_id, change in newest_by_ticket.items()
            if ticket_id in links
            and links[ticket_id].state == LINKED
            and (links[ticket_id].ticket_updated is None or links[ticket_id].ticket_updated < change.updated)
        ]
        await gather_or_cancel(*(self._reconcile_ticket_change(link, change) for link, change in due))

        horizon = self.clock() + FUTURE_TOLERANCE
        newest = max([cursor, *(change.updated for change in changes if change.updated <= horizon)])
        if newest > cursor:
            await self.store.set_cursor(self.name, TICKET_CURSOR, newest.isoformat())

    async def _reconcile_ticket_change(self, link: Link, change: TicketChange) -> None:
        if await self._own_writes_only(link, change):
            self.stats.own_writes_confirmed += 1
        elif not await self._reconcile_guarded(link.incident_id, None):
            return
        if change.updated > self.clock() + FUTURE_TOLERANCE:
            # Recording a time far ahead would hide every later change of this ticket.
            log.warning(
                "sync.ticket.updated_in_future",
                extra={"connection": self.name, "ticket_key": change.ref.key, "updated": change.updated.isoformat()},
            )
            return
        await self.store.record_ticket_reconciled(self.name, link.incident_id, change.updated)

    async def _own_writes_only(self, link: Link, change: TicketChange) -> bool:
        """Tell whether a ticket change is only the writes of the incident's last reconciliation, so none is due.

        The ticket is read again after the change search. When the comments,
        and the attachments and state if that reconciliation read them, are
        exactly what it read plus what it wrote, nobody else changed them up
        to `change.updated`: a change made before the search would show in
        this read, and a later one moves `updated` past the time recorded.
        Any difference, or a read that fails, leaves the decision to a full
        reconciliation. Changes on the MDR side are not looked for here,
        because the MDR change detection finds them.
        """
        lock = self._incident_locks.get(link.incident_id)
        if lock is None:
            lock = self._incident_locks[link.incident_id] = asyncio.Lock()
        async with self._concurrency, lock:
            watch = self.watched.take_kept(link.incident_id)
            if watch is None or watch.ticket_id != change.ref.id or watch.comments is None or watch.unpredictable:
                return False
            ref = change.ref
            tickets = self.watched.inner
            try:
                comments, attachments, state = await gather_or_cancel(
                    self._read(lambda: tickets.list_comments(ref)),
                    self._read_if(watch.attachments is not None, lambda: tickets.list_attachments(ref)),
                    self._read_if(watch.state is not None, lambda: tickets.get_state(ref, watch.state_fields)),
                )
            except ConnectionFatalError:
                raise
            except ConnectorError:
                return False
            return watch.shows_only_own_writes(comments, attachments, state)

    async def _read_if(self, needed: bool, call: Callable[[], Awaitable[T]]) -> T | None:
        return await self._read(call) if needed else None

    # Parked incidents

    async def retry_parked(self) -> None:
        """Reconcile parked incidents whose next try is due."""
        due = await self.store.due_parked(self.name, INCIDENT, self.clock(), limit=self.settings.sync.page_size)
        for item in due:
            log.info(
                "sync.incident.retrying",
                extra={"connection": self.name, "incident_id": item.item_id, "attempts": item.attempts},
            )
        await gather_or_cancel(*(self._reconcile_guarded(item.item_id, None) for item in due))

    async def _park(
        self, incident_id: str, reason: str, not_before: datetime | None = None, *, error: BaseException | None = None
    ) -> None:
        """Park an incident until `not_before`, or after the parked backoff, or until a rate limit in `error` ends if that is later."""
        sync = self.settings.sync
        existing = await self.store.get_parked(self.name, INCIDENT, incident_id)
        attempts = (existing.attempts if existing else 0) + 1
        next_try = parked_next_try(self.clock(), attempts, sync.retry_base_seconds, sync.retry_max_seconds, error)
        if not_before is not None:
            next_try = not_before
        self._not_parked.discard(incident_id)
        await self.store.park(self.name, INCIDENT, incident_id, reason, next_try)

    # Reconciliation

    async def _reconcile_guarded(self, incident_id: str, incident: Incident | None) -> bool:
        """Reconcile one incident; park it on failure so the others keep syncing."""
        try:
            async with self._concurrency:
                done = await self.reconcile(incident_id, incident)
        except ConnectionFatalError:
            raise
        except ConnectorError as err:
            await self._record_failure(incident_id, err)
            return False
        except Exception as err:  # noqa: BLE001 - one broken incident must not stop the others
            log.exception("sync.incident.crashed", extra={"connection": self.name, "incident_id": incident_id})
            await self._record_failure(incident_id, err)
            return False

        if done and incident_id not in self._not_parked:
            await self.store.unpark(self.name, INCIDENT, incident_id)
        return done

    async def _record_failure(self, incident_id: str, err: BaseException) -> None:
        self.stats.failures += 1
        reason = failure_reason(err)
        log.error(
            "sync.incident.failed",
            extra={"connection": self.name, "incident_id": incident_id, "error": reason},
        )
        await self._park(incident_id, reason, error=err)

    async def reconcile(self, incident_id: str, incident: Incident | None = None) -> bool:
        """Bring one incident and its ticket in line; return False when it must wait for a later cycle."""
        lock = self._incident_locks.get(incident_id)
        if lock is None:
            lock = self._incident_locks[incident_id] = asyncio.Lock()
        async with lock:
            watch = self.watched.start_watch(incident_id)
            done = False
            try:
                done = await self._reconcile_watched(incident_id, incident, watch)
            finally:
                self.watched.end_watch(watch, keep=done)
            return done

    async def _reconcile_watched(self, incident_id: str, incident: Incident | None, watch: TicketWatch) -> bool:
        if incident is None:
            incident = await self._read(lambda: self.mdr.get_incident(incident_id))
        if incident.update_time > self._future_horizon_ms():
            raise InvalidPayloadError(
                f"MDR incident {incident_id} has update_time {incident.update_time}, more than "
                f"{FUTURE_TOLERANCE} ahead of this machine's clock; check the clock, or report the record to Kaspersky"
            )

        link = await self.ensure_ticket(incident)
        if link is None:
            return False

        ref = TicketRef(key=link.ticket_key or "", id=link.ticket_id or "", url=link.ticket_url or "")
        self.watched.bind(watch, ref.id)
        try:
            await self._sync_linked(incident, link, ref)
        finally:
            # The comment list shared by the parts belongs to this reconciliation only.
            self.context.comment_snapshots.pop(ref.id, None)
        return True

    async def _sync_linked(self, incident: Incident, link: Link, ref: TicketRef) -> None:
        """Sync the fields, comments and every part of a linked incident, then raise one ItemError naming what failed."""
        failed: list[str] = []
        # A field the ticket system rejects must not stop the comments, nor a
        # bad comment the fields. Both run, then one error parks the incident
        # so the failed part is tried again.
        try:
            await self.update_ticket_fields(incident, link, ref)
        except ItemError as err:
            failed.append(f"fields: {err}")
        try:
            await self.comments.sync_comments(incident, ref)
        except ItemError as err:
            failed.append(str(err))
        for part in self.parts:
            try:
                await part.sync(incident, link, ref)
            except ItemError as err:
                failed.append(f"{part.label}: {err}")
        if failed:
            raise ItemError("; ".join(failed))

        # The status part records the MDR status while statuses are synced.
        # Otherwise it is recorded here, so retention can find closed incidents.
        status_rules = self.mapping.status
        status_synced = bool(status_rules.to_ticket) or status_rules.close_mdr.enabled
        await self.store.record_mdr_reconciled(
            self.name,
            incident.incident_id,
            incident.update_time,
            mdr_status=None if status_synced else incident.status,
        )

    async def ensure_ticket(self, incident: Incident) -> Link | None:
        """Return the incident's link, creating the ticket if it has none.

        Returns None while an earlier create with an unknown outcome cannot yet
        be looked up, because the ticket system's search may not see it.
        """
        if incident.incident_id in self._unlinked:
            self._unlinked.discard(incident.incident_id)
            link = None
        else:
            link = await self.store.get_link(self.name, incident.incident_id)
        if link is not None and link.state == LINKED:
            return link

        if link is not None and link.state == PENDING and link.create_started_at is not None:
            visible_from = link.create_started_at + timedelta(seconds=self.tickets.search_delay_seconds())
            if self.clock() < visible_from:
                log.info(
                    "sync.ticket.lookup_deferred",
                    extra={"connection": self.name, "incident_id": incident.incident_id},
                )
                await self._park(incident.incident_id, "waiting for ticket search to see an earlier create", visible_from)
                return None

        if link is None and incident.incident_id in self._looked_up:
            found = self._looked_up.pop(incident.incident_id)
        else:
            found = await self._read(lambda: self.tickets.find_ticket(incident.incident_id))
        if found is not None:
            self.stats.tickets_linked += 1
            return await self._record_link("sync.ticket.found", incident, found, written_hash=None)

        requested = await self._link_requesting_ticket(incident)
        if requested is not None:
            return requested

        return await self._create_ticket(incident)

    async def _link_requesting_ticket(self, incident: Incident) -> Link | None:
        """Link an incident created from a ticket to that ticket, so no second ticket is made.

        The change search can meet such an incident before the request step
        linked it (a crash between the create and the link), and the request
        step may never see the ticket again (its label removed meanwhile).
        A ticket that is gone or belongs to another incident gives None, and
        the incident gets a ticket of its own.
        """
        requests = next((step for step in self.cycle_steps if isinstance(step, TicketIncidentRequests)), None)
        ticket_id = requested_ticket_id(incident, self.name)
        if requests is None or ticket_id is None or not self.mapping.create_incidents.enabled:
            return None

        ref = await self._read(lambda: self.tickets.get_ticket(ticket_id))
        if ref is None:
            log.warning(
                "sync.request.ticket_gone",
                extra={"connection": self.name, "incident_id": incident.incident_id, "ticket_id": ticket_id},
            )
            return None
        try:
            await requests.link(ref, incident)
        except RejectedError as err:
            log.warning(
                "sync.request.ticket_taken",
                extra={"connection": self.name, "incident_id": incident.incident_id, "ticket_key": ref.key, "error": str(err)},
            )
            return None
        link = await self.store.get_link(self.name, incident.incident_id)
        return link if link is not None and link.state == LINKED else None

    async def _create_ticket(self, incident: Incident) -> Link:
        destination = destination_for(self.mapping, incident)
        draft = render_draft(
            self.mapping,
            incident,
            self.settings.mdr.console_url,
            self.settings.mdr.client_id,
            destination=destination,
            assets=await self._asset_table(incident),
        )
        await self.store.start_create(self.name, incident.incident_id, incident.incident_number)
        try:
            ref = await self.watched.create_ticket(draft)
        except (ItemError, ConfigError):
            # The ticket system refused the create itself, so nothing exists
            # to look up. Any other failure (a 503 or 429 that the server may
            # have sent after applying it, a timeout) keeps the intent, so
            # the next try looks the ticket up after the search delay first.
            await self.store.drop_pending_create(self.name, incident.incident_id)
            raise

        self.stats.tickets_created += 1
        self.context.created_tickets.add(ref.id)
        written_hash = self._fields_digest(incident, destination.route)
        return await self._record_link("sync.ticket.created", incident, ref, written_hash=written_hash)

    async def _record_link(self, event: str, incident: Incident, ref: TicketRef, *, written_hash: str | None) -> Link:
        """Pair the incident with its ticket; `written_hash` is the digest of the fields just written, if any."""
        log.info(event, extra={"connection": self.name, "incident_id": incident.incident_id, "ticket_key": ref.key})
        return await self.store.record_link(
            self.name,
            incident.incident_id,
            incident.incident_number,
            ticket_key=ref.key,
            ticket_id=ref.id,
            ticket_url=ref.url,
            fields_hash=written_hash,
        )

    async def update_ticket_fields(self, incident: Incident, link: Link, ref: TicketRef) -> None:
        """Write the fields MDR owns when the incident changed them since the last write.

        Fields that `field_owner` gives to the ticket are neither written nor
        part of the digest, so an analyst's edit of them stays. A ticket that
        requested its incident also keeps its own summary and description,
        because the requester wrote them and MDR stores only a copy.
        """
        route = match_route(self.mapping, incident)
        owned_by_ticket = self.mapping.owned_by_ticket()
        if link.ticket_id is not None and requested_ticket_id(incident, self.name) == link.ticket_id:
            owned_by_ticket |= {"summary", "description"}
        digest = self._fields_digest(incident, route, owned_by_ticket)
        if digest == link.fields_hash:
            return

        fields = render_fields(
            self.mapping,
            incident,
            self.settings.mdr.console_url,
            route=route,
            assets=await self._asset_table(incident, owned_by_ticket),
        )
        await self.watched.update_ticket(ref, fields, skip=owned_by_ticket)
        await self.store.record_fields_written(self.name, incident.incident_id, digest)
        self.stats.tickets_updated += 1
        log.info(
            "sync.ticket.updated",
            extra={"connection": self.name, "incident_id": incident.incident_id, "ticket_key": ref.key},
        )

    def _fields_digest(
        self, incident: Incident, route: Route | None, owned_by_ticket: frozenset[str] | None = None
    ) -> str:
        """Return the digest of the fields MDR owns, rendered without asset details.

        Asset details are left out because they change on their own, and the
        last-seen time moves every hour. So the asset table is refreshed when
        the fields are written for a change of the incident, never by itself.
        """
        fields = render_fields(self.mapping, incident, self.settings.mdr.console_url, route=route)
        skip = self.mapping.owned_by_ticket() if owned_by_ticket is None else owned_by_ticket
        return fields_hash(fields, skip=skip)

    async def _asset_table(self, incident: Incident, skip: frozenset[str] = frozenset()) -> str | None:
        """Return the `{assets}` table, or None when asset details are off or no field outside `skip` uses them."""
        if not assets_wanted(self.mapping, skip):
            return None
        return await AssetDetails(self.context).render(incident)

    async def _read(self, call: Callable[[], Awaitable[T]]) -> T:
        return await retry_read(self.read_policy, call)
