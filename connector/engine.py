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
record the target id.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Protocol, TypeVar

from mdr_connector.adapters.mdr.models import Comment, Incident
from mdr_connector.connector import markup
from mdr_connector.connector.config import ConnectionSettings, Mapping
from mdr_connector.connector.errors import (
    ConnectionFatalError,
    ConnectorError,
    InvalidPayloadError,
    ItemError,
    OutcomeUnknownError,
)
from mdr_connector.connector.mapping import (
    fields_hash,
    parse_mdr_footer,
    render_comment_for_mdr,
    render_comment_for_ticket,
    render_draft,
    render_fields,
)
from mdr_connector.connector.retry import RetryPolicy, parked_backoff_seconds, retry_read
from mdr_connector.connector.store import (
    DONE,
    LINKED,
    MDR_TO_TICKET,
    PENDING,
    TICKET_TO_MDR,
    Link,
    Store,
    SyncedItem,
)
from mdr_connector.connector.tickets import (
    MDR_ORIGIN,
    CommentDraft,
    SyncMarker,
    TicketAccount,
    TicketAdapter,
    TicketChange,
    TicketComment,
    TicketRef,
)

log = logging.getLogger(__name__)

MDR_CURSOR = "mdr"
TICKET_CURSOR = "ticket"
INCIDENT = "incident"
COMMENT = "comment"
# An MDR time further ahead of this machine's clock than this is taken for
# bad data: moving the cursor to it would hide every later change.
# NOTE: one day is a judgement call, far above real clock skew.
FUTURE_TOLERANCE = timedelta(days=1)


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
        self.own_account: TicketAccount | None = None
        self._incident_locks: dict[str, asyncio.Lock] = {}
        self._concurrency = asyncio.Semaphore(
            min(settings.mdr.max_concurrency, settings.ticket.max_concurrency)
        )

    async def open(self) -> None:
        """Connect to the ticket system and learn the connector's own account there."""
        self.own_account = await self.tickets.open()
        log.info(
            "sync.connection.opened",
            extra={"connection": self.name, "ticket_account": self.own_account.id},
        )

    async def run_cycle(self) -> SyncStats:
        """Run one sync cycle; return the cumulative stats."""
        if self.own_account is None:
            await self.open()

        self.stats.cycles += 1
        log.info("sync.cycle.started", extra={"connection": self.name, "cycle": self.stats.cycles})
        await self.retry_parked()
        await self.sync_mdr_changes()
        await self.sync_ticket_changes()
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
            newest_plausible, newest = await self._reconcile_page(page)
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

        log.info(
            "sync.mdr.backlog_remaining",
            extra={"connection": self.name, "cursor": cursor, "pages": sync.max_pages_per_cycle},
        )

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

    async def _reconcile_page(self, page: IncidentPageLike) -> tuple[int | None, int | None]:
        """Reconcile the changed incidents of one page.

        Return the newest `update_time` that may move the cursor, and the
        newest of all, which moves the paging window. A time beyond the future
        horizon never moves the cursor; its incident is parked by `reconcile`.
        """
        horizon = self._future_horizon_ms()
        times = [incident.update_time for incident in page.items]
        times += [record.update_time for record in page.malformed if record.update_time is not None]
        plausible = [moment for moment in times if moment <= horizon]

        for record in page.malformed:
            await self._park_malformed(record)

        links = await self.store.get_links(self.name, (incident.incident_id for incident in page.items))
        changed = []
        for incident in page.items:
            self.stats.incidents_seen.add(incident.incident_id)
            link = links.get(incident.incident_id)
            if link is not None and link.state == LINKED and (link.mdr_update_time or -1) >= incident.update_time:
                continue
            changed.append(incident)

        await gather_or_cancel(*(self._reconcile_guarded(incident.incident_id, incident) for incident in changed))
        return (max(plausible) if plausible else None), (max(times) if times else None)

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
        if await self._reconcile_guarded(link.incident_id, None):
            await self.store.record_ticket_reconciled(self.name, link.incident_id, change.updated)

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

    async def _park(self, incident_id: str, reason: str, not_before: datetime | None = None) -> None:
        sync = self.settings.sync
        existing = await self.store.get_parked(self.name, INCIDENT, incident_id)
        attempts = (existing.attempts if existing else 0) + 1
        next_try = self.clock() + timedelta(
            seconds=parked_backoff_seconds(attempts, sync.retry_base_seconds, sync.retry_max_seconds)
        )
        if not_before is not None:
            next_try = not_before
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

        if done:
            await self.store.unpark(self.name, INCIDENT, incident_id)
        return done

    async def _record_failure(self, incident_id: str, err: BaseException) -> None:
        self.stats.failures += 1
        reason = f"{type(err).__name__}: {err}"
        log.error(
            "sync.incident.failed",
            extra={"connection": self.name, "incident_id": incident_id, "error": reason},
        )
        await self._park(incident_id, reason)

    async def reconcile(self, incident_id: str, incident: Incident | None = None) -> bool:
        """Bring one incident and its ticket in line; return False when it must wait for a later cycle."""
        lock = self._incident_locks.setdefault(incident_id, asyncio.Lock())
        async with lock:
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
            await self.update_ticket_fields(incident, link, ref)
            await self.sync_comments(incident, ref)
            await self.store.record_mdr_reconciled(self.name, incident.incident_id, incident.update_time)
            return True

    async def ensure_ticket(self, incident: Incident) -> Link | None:
        """Return the incident's link, creating the ticket if it has none.

        Returns None while an earlier create with an unknown outcome cannot yet
        be looked up, because the ticket system's search may not see it.
        """
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

        found = await self._read(lambda: self.tickets.find_ticket(incident.incident_id))
        if found is not None:
            self.stats.tickets_linked += 1
            return await self._record_link("sync.ticket.found", incident, found, written_hash=None)

        return await self._create_ticket(incident)

    async def _create_ticket(self, incident: Incident) -> Link:
        draft = render_draft(self.mapping, incident, self.settings.mdr.console_url, self.settings.mdr.client_id)
        await self.store.start_create(self.name, incident.incident_id, incident.incident_number)
        try:
            ref = await self.tickets.create_ticket(draft)
        except OutcomeUnknownError:
            raise
        except ConnectorError:
            # The create was refused or never sent, so nothing exists to look up.
            await self.store.drop_pending_create(self.name, incident.incident_id)
            raise

        self.stats.tickets_created += 1
        return await self._record_link("sync.ticket.created", incident, ref, written_hash=fields_hash(draft.fields))

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
        """Write the mapped fields when the incident changed them since the last write."""
        fields = render_fields(self.mapping, incident, self.settings.mdr.console_url)
        digest = fields_hash(fields)
        if digest == link.fields_hash:
            return

        await self.tickets.update_ticket(ref, fields)
        await self.store.record_fields_written(self.name, incident.incident_id, digest)
        self.stats.tickets_updated += 1
        log.info(
            "sync.ticket.updated",
            extra={"connection": self.name, "incident_id": incident.incident_id, "ticket_key": ref.key},
        )

    # Comments

    async def sync_comments(self, incident: Incident, ref: TicketRef) -> None:
        """Copy the comments missing on either side, in both directions.

        A comment that fails for a reason of its own (malformed, rejected by
        the target) does not stop the others: the rest are copied first, then
        one ItemError parks the incident so the failed ones are tried again.
        """
        mdr_page, ticket_comments = await gather_or_cancel(
            self._read(lambda: self.mdr.list_comments(incident.incident_id)),
            self._read(lambda: self.tickets.list_comments(ref)),
        )
        items = await self.store.get_items(self.name, incident.incident_id, COMMENT)
        failed = [f"comment {record.record_id or '<without id>'}: {record.error}" for record in mdr_page.malformed]

        failed += await self.sync_comments_mdr_to_ticket(incident, ref, mdr_page.items, ticket_comments, items)
        failed += await self.sync_comments_ticket_to_mdr(incident, ref, mdr_page.items, ticket_comments, items)
        if failed:
            raise ItemError(f"{len(failed)} comment(s) of incident {incident.incident_id} failed: {'; '.join(failed)}")

    async def sync_comments_mdr_to_ticket(
        self,
        incident: Incident,
        ref: TicketRef,
        mdr_comments: list[Comment],
        ticket_comments: list[TicketComment],
        items: list[SyncedItem],
    ) -> list[str]:
        """Copy MDR comments missing on the ticket; return the failures of single comments."""
        done = {item.source_id for item in items if item.direction == MDR_TO_TICKET and item.state == DONE}
        written_by_us = {item.target_id for item in items if item.direction == TICKET_TO_MDR and item.target_id}
        on_ticket = self._landed_on_ticket(ref, ticket_comments)
        failed: list[str] = []

        for comment in sorted(mdr_comments, key=lambda c: c.creation_time):
            if comment.comment_id in done:
                continue
            if self._is_mdr_echo(comment, written_by_us):
                continue

            landed = on_ticket.get(comment.comment_id)
            if landed is not None:
                await self._finish_item(incident, MDR_TO_TICKET, comment.comment_id, landed.id)
                continue

            try:
                await self._post_to_ticket(incident, ref, comment)
            except ItemError as err:
                failed.append(f"comment {comment.comment_id}: {err}")
        return failed

    def _landed_on_ticket(self, ref: TicketRef, ticket_comments: list[TicketComment]) -> dict[str, TicketComment]:
        """Map MDR comment ids to the ticket comments that carry their marker."""
        assert self.own_account is not None
        landed: dict[str, TicketComment] = {}
        for comment in ticket_comments:
            if comment.marker is None or comment.marker.origin != MDR_ORIGIN:
                continue
            if comment.author.id != self.own_account.id:
                # The marker is the connector's, but someone else wrote the
                # comment: either an earlier service account, or a forgery.
                log.warning(
                    "sync.comment.marker_from_other_account",
                    extra={"connection": self.name, "ticket_key": ref.key, "comment_id": comment.id},
                )
            landed.setdefault(comment.marker.source_id, comment)
        return landed

    async def _post_to_ticket(self, incident: Incident, ref: TicketRef, comment: Comment) -> TicketComment:
        body = await asyncio.to_thread(markup.html_to_markdown, comment.text)
        created = datetime.fromtimestamp(comment.creation_time / 1000, tz=timezone.utc)
        draft = CommentDraft(
            body=render_comment_for_ticket(self.mapping, comment.author_name, created, body),
            marker=SyncMarker(origin=MDR_ORIGIN, source_id=comment.comment_id),
        )
        await self.store.start_item(self.name, incident.incident_id, COMMENT, MDR_TO_TICKET, comment.comment_id)
        posted = await self.tickets.add_comment(ref, draft)
        await self._finish_item(incident, MDR_TO_TICKET, comment.comment_id, posted.id)
        self.stats.comments_to_ticket += 1
        self._log_mirrored(MDR_TO_TICKET, incident, ref, comment.comment_id, posted.id)
        return posted

    def _is_mdr_echo(self, comment: Comment, written_by_us: set[str]) -> bool:
        """Tell whether an MDR comment was written by this connector."""
        if comment.author_name == self.settings.mdr.connection_name:
            reason = "author"
        elif comment.comment_id in written_by_us:
            reason = "ledger"
        elif parse_mdr_footer(comment.text) is not None:
            reason = "marker"
        else:
            return False
        self._count_echo(f"mdr:{comment.comment_id}", reason)
        return True

    async def sync_comments_ticket_to_mdr(
        self,
        incident: Incident,
        ref: TicketRef,
        mdr_comments: list[Comment],
        ticket_comments: list[TicketComment],
        items: list[SyncedItem],
    ) -> list[str]:
        """Copy ticket comments missing in MDR; return the failures of single comments."""
        done = {item.source_id for item in items if item.direction == TICKET_TO_MDR and item.state == DONE}
        written_by_us = {item.target_id for item in items if item.direction == MDR_TO_TICKET and item.target_id}
        in_mdr: dict[str, Comment] = {}
        for comment in mdr_comments:
            marker = parse_mdr_footer(comment.text)
            if marker is not None and comment.author_name == self.settings.mdr.connection_name:
                in_mdr.setdefault(marker.source_id, comment)

        failed: list[str] = []

        for comment in sorted(ticket_comments, key=lambda c: c.created):
            if comment.id in done:
                continue
            if self._is_ticket_echo(comment, written_by_us):
                continue
            if comment.restricted and not self.mapping.comments.mirror_restricted:
                self._note_restricted(ref, comment)
                continue

            landed = in_mdr.get(comment.id)
            if landed is not None:
                await self._finish_item(incident, TICKET_TO_MDR, comment.id, landed.comment_id)
                continue

            try:
                await self._post_to_mdr(incident, ref, comment)
            except ItemError as err:
                failed.append(f"{self.tickets.system} comment {comment.id}: {err}")
        return failed

    async def _post_to_mdr(self, incident: Incident, ref: TicketRef, comment: TicketComment) -> Comment:
        text = render_comment_for_mdr(
            self.mapping,
            author=comment.author.display_name,
            created=comment.created,
            body=comment.body,
            system=self.tickets.system,
            ticket_key=ref.key,
            comment_id=comment.id,
        )
        await self.store.start_item(self.name, incident.incident_id, COMMENT, TICKET_TO_MDR, comment.id)
        posted = await self.mdr.create_comment(incident.incident_id, text, markdown_to_html=True)
        await self._finish_item(incident, TICKET_TO_MDR, comment.id, posted.comment_id)
        self.stats.comments_to_mdr += 1
        self._log_mirrored(TICKET_TO_MDR, incident, ref, comment.id, posted.comment_id)
        return posted

    def _log_mirrored(self, direction: str, incident: Incident, ref: TicketRef, source_id: str, target_id: str) -> None:
        log.info(
            "sync.comment.mirrored",
            extra={
                "connection": self.name,
                "direction": direction,
                "incident_id": incident.incident_id,
                "ticket_key": ref.key,
                "comment_id": source_id,
                "target_comment_id": target_id,
            },
        )

    def _note_restricted(self, ref: TicketRef, comment: TicketComment) -> None:
        key = f"restricted:{comment.id}"
        if key in self.stats.restricted_skipped:
            return
        self.stats.restricted_skipped.add(key)
        log.info(
            "sync.comment.restricted_kept_internal",
            extra={"connection": self.name, "ticket_key": ref.key, "comment_id": comment.id},
        )

    def _is_ticket_echo(self, comment: TicketComment, written_by_us: set[str]) -> bool:
        """Tell whether a ticket comment was written by this connector."""
        assert self.own_account is not None
        if comment.author.id == self.own_account.id:
            reason = "author"
        elif comment.id in written_by_us:
            reason = "ledger"
        elif comment.marker is not None:
            reason = "marker"
        else:
            return False
        self._count_echo(f"ticket:{comment.id}", reason)
        return True

    def _count_echo(self, key: str, reason: str) -> None:
        if key in self.stats.echoes_suppressed:
            return
        self.stats.echoes_suppressed.add(key)
        log.debug("sync.echo.suppressed", extra={"connection": self.name, "item": key, "reason": reason})

    async def _finish_item(self, incident: Incident, direction: str, source_id: str, target_id: str) -> None:
        await self.store.finish_item(self.name, incident.incident_id, COMMENT, direction, source_id, target_id)

    async def _read(self, call: Callable[[], Awaitable[T]]) -> T:
        return await retry_read(self.read_policy, call)
