"""The status sync: MDR status changes move the ticket, and a done ticket may close its MDR incident.

The MDR API can change an incident's status only by closing it, so the
ticket-to-MDR direction is narrow and off by default. A ticket that a
person moves into one of `status.close_mdr.done_statuses` closes the
incident (`incidents/close`). A ticket reopened while its incident is
closed adds one comment to the incident.

The link row stores the status each side was last seen in or moved to by
the connector (`ticket_status`, `mdr_status`). Comparing with it separates
the connector's own changes from a person's, so the connector does not
send its own change back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from mdr_connector.adapters.mdr.models import STATUSES, Incident
from mdr_connector.connector.errors import ConfigError, ItemError, RejectedError
from mdr_connector.connector.i18n import _
from mdr_connector.connector.mapping import escape_markdown, mdr_footer, parse_mdr_footer
from mdr_connector.connector.store import DONE, PENDING, TICKET_TO_MDR, Link
from mdr_connector.connector.sync_common import SyncContext
from mdr_connector.connector.tickets import TicketRef, TicketState, system_title

log = logging.getLogger(__name__)

CLOSED = "Closed"
# The status seen of a ticket that the connector created and never read. It
# names no status, so it is neither done nor equal to a real one.
AS_CREATED = ""
# Ledger kinds: the close of an incident, and the comment about a reopened ticket.
CLOSE = "close"
REOPEN_NOTE = "reopen_note"


@dataclass
class SeenStatuses:
    """The statuses the link row records, kept current while one sync runs."""

    ticket: str | None
    mdr: str | None


def first_sync_interrupted(link: Link) -> bool:
    """Tell whether the connector created the link's ticket but no reconciliation finished and no MDR status was recorded.

    That is a crash or a failure between the create and the move of the
    ticket to the mapped status. The ticket status may be recorded already,
    because the ticket side goes first. A link that was reconciled before
    (`mdr_update_time`) or paired by a person keeps the rule that the first
    status seen is a starting point.
    """
    return link.mdr_status is None and link.mdr_update_time is None and link.create_started_at is not None


def same_status(left: str | None, right: str | None) -> bool:
    """Compare two status names the way Jira does, ignoring case."""
    if left is None or right is None:
        return left is right
    return left.casefold() == right.casefold()


def field_text(value: Any) -> str:
    """Return the text of a ticket field value: a plain string, or the name of an option such as a resolution."""
    if value is None:
        return ""
    if isinstance(value, dict):
        value = value.get("name") or value.get("value") or ""
    return str(value).strip()


class StatusSync:
    """Syncs the status of one linked incident and its ticket, following `mapping.status`."""

    label = "status"

    def __init__(self, context: SyncContext) -> None:
        self.context = context
        self.name = context.name
        self.rules = context.mapping.status
        self.close_rules = self.rules.close_mdr
        if self.close_rules.enabled and not self.close_rules.done_statuses:
            raise ConfigError(
                f"mapping {context.settings.mapping}: status.close_mdr.enabled is true but "
                "status.close_mdr.done_statuses is empty; list the ticket statuses that close "
                "the MDR incident, for example [Done]"
            )
        self._done_statuses = {status.casefold() for status in self.close_rules.done_statuses}

    async def sync(self, incident: Incident, link: Link, ref: TicketRef) -> None:
        """Bring the statuses of both sides in line, the ticket side first."""
        created_now = ref.id in self.context.created_tickets
        self.context.created_tickets.discard(ref.id)
        seen = SeenStatuses(ticket=link.ticket_status, mdr=link.mdr_status)
        interrupted = not created_now and first_sync_interrupted(link)
        if interrupted and link.ticket_status is None:
            # A new ticket starts in its workflow's first status, taken to be
            # no done status. So a done status now is a person's close, unless
            # `_is_own_move` finds it is the connector's own first move.
            seen.ticket = AS_CREATED
        mdr_move_due = bool(self.rules.to_ticket) and incident.status != seen.mdr
        if not mdr_move_due and not self.close_rules.enabled:
            return

        field_ids = [self.close_rules.resolution_field] if self.close_rules.enabled else []
        state = await self.context.read(lambda: self.context.tickets.get_state(ref, field_ids))

        # The ticket side goes first: when a person closed the ticket while
        # MDR changed the incident, the person's close wins over the mapping.
        # For the same reason a failed close (an unmapped resolution) keeps
        # the ticket where the person put it until the close succeeds.
        mdr_status = incident.status
        if self.close_rules.enabled:
            mdr_status = await self.sync_ticket_to_mdr(incident, ref, state, seen)
        after_crash = interrupted and seen.mdr is None
        await self.sync_mdr_to_ticket(incident.incident_id, mdr_status, ref, state, seen, after_crash=after_crash)

    async def skip_first_move(
        self, incident_id: str, mdr_status: str, ref: TicketRef, state: TicketState, seen: SeenStatuses
    ) -> None:
        """Record both statuses as they are, without the first move that an interrupted reconciliation never made."""
        await self._record(incident_id, seen, ticket=state.status, mdr=mdr_status)
        log.info(
            "sync.status.first_move_skipped",
            extra={
                "connection": self.name,
                "incident_id": incident_id,
                "ticket_key": ref.key,
                "ticket_status": state.status,
                "mdr_status": mdr_status,
            },
        )

    # MDR to ticket

    async def sync_mdr_to_ticket(
        self,
        incident_id: str,
        mdr_status: str,
        ref: TicketRef,
        state: TicketState,
        seen: SeenStatuses,
        *,
        after_crash: bool = False,
    ) -> None:
        """Move the ticket to the status mapped from a new MDR status; a move the connector made is not repeated.

        `after_crash` is the first move of a ticket whose creating
        reconciliation was interrupted, when a person may have moved the
        ticket already. That move leaves a done status alone, because it
        would reopen the person's close. Where no transition leads to the
        mapped status it is skipped, because parking would never end.
        """
        if not self.rules.to_ticket or mdr_status == seen.mdr:
            return

        target = self._mapped_status(incident_id, mdr_status)
        if same_status(state.status, target):
            await self._record(incident_id, seen, ticket=state.status, mdr=mdr_status)
            return
        if after_crash and self._is_done(state.status):
            await self.skip_first_move(incident_id, mdr_status, ref, state, seen)
            return

        try:
            await self.context.tickets.transition_to(ref, target)
        except RejectedError as err:
            if after_crash:
                await self.skip_first_move(incident_id, mdr_status, ref, state, seen)
                return
            # The adapter's message names the reachable statuses and the fix.
            raise ItemError(
                f"MDR status {mdr_status!r} of incident {incident_id} maps to ticket status {target!r} "
                f"in status.to_ticket: {err}"
            ) from err

        await self._record(incident_id, seen, ticket=target, mdr=mdr_status)
        self.context.stats.statuses_to_ticket += 1
        log.info(
            "sync.status.ticket_moved",
            extra={
                "connection": self.name,
                "incident_id": incident_id,
                "ticket_key": ref.key,
                "mdr_status": mdr_status,
                "ticket_status": target,
            },
        )

    def _mapped_status(self, incident_id: str, mdr_status: str) -> str:
        """Return the ticket status that status.to_ticket gives an MDR status; raise ItemError when it gives none."""
        target = self.rules.to_ticket.get(mdr_status)  # type: ignore[call-overload]
        if target is None and mdr_status not in STATUSES:
            raise ItemError(
                f"MDR incident {incident_id} has status {mdr_status!r}, which is none of the statuses "
                f"status.to_ticket can map ({', '.join(STATUSES)}); report the value to the mdr-connector maintainers"
            )
        if target is None:
            mapped = ", ".join(sorted(self.rules.to_ticket))
            raise ItemError(
                f"MDR status {mdr_status!r} of incident {incident_id} has no ticket status in "
                f"status.to_ticket (mapped: {mapped}); add {mdr_status!r} to status.to_ticket in "
                f"mapping {self.context.settings.mapping}"
            )
        return target

    # Ticket to MDR

    async def sync_ticket_to_mdr(
        self, incident: Incident, ref: TicketRef, state: TicketState, seen: SeenStatuses
    ) -> str:
        """Close the incident when a person moved the ticket to a done status, or note a reopen.

        Returns the incident's MDR status after this step.
        """
        current = state.status
        if seen.ticket is None:
            # NOTE: the first status seen is a starting point, not a request.
            # A ticket already done when the connector first reads it (a link
            # made before this setting existed) closes nothing until it
            # leaves that status and comes back.
            await self._record(incident.incident_id, seen, ticket=current)
            return incident.status

        await self._resume_reopen_note(incident, ref, state, seen)
        # A close whose reply was lost shows in MDR as Closed. That status is
        # the connector's own change, so it must not move the ticket back to
        # done when a person reopened the ticket meanwhile.
        closed_by_connector = incident.status == CLOSED and await self._finish_pending_close(incident.incident_id, ref)
        if closed_by_connector:
            await self._record(incident.incident_id, seen, mdr=CLOSED)

        if self._is_done(current):
            if incident.status == CLOSED:
                if not same_status(current, seen.ticket):
                    # Both sides closed: the person's done status stays,
                    # instead of being moved to the one mapped from Closed.
                    await self._record(incident.incident_id, seen, ticket=current, mdr=CLOSED)
                return CLOSED
            # NOTE: a status is compared, not a history, so a ticket that a
            # person reopens and closes again between two reads of it looks
            # unchanged and does not close the incident.
            if same_status(current, seen.ticket):
                return incident.status
            if self._is_own_move(incident, current, seen):
                await self._record(incident.incident_id, seen, ticket=current, mdr=incident.status)
                log.info(
                    "sync.status.own_move_found",
                    extra={
                        "connection": self.name,
                        "incident_id": incident.incident_id,
                        "ticket_key": ref.key,
                        "ticket_status": current,
                        "mdr_status": incident.status,
                    },
                )
                return incident.status
            await self.close_incident(incident, ref, state)
            await self._record(incident.incident_id, seen, ticket=current, mdr=CLOSED)
            return CLOSED

        if (closed_by_connector or self._is_done(seen.ticket)) and incident.status == CLOSED:
            await self.note_reopen(incident, ref, state, seen)
        if not same_status(current, seen.ticket):
            await self._record(incident.incident_id, seen, ticket=current)
        return incident.status

    def _is_own_move(self, incident: Incident, current: str, seen: SeenStatuses) -> bool:
        """Tell whether a done status is the connector's own move for an MDR status it has not recorded yet.

        That is a transition whose reply was lost, or a crash between the
        transition and its record. Taken for a person's close, it would
        close the incident that MDR only resolved.
        NOTE: a person who moves the ticket to that same status before the
        connector records MDR's change is taken for the connector. The
        incident then stays open, because a close is never guessed.
        """
        if incident.status == seen.mdr:
            return False
        target = self.rules.to_ticket.get(incident.status)  # type: ignore[call-overload]
        return target is not None and same_status(current, target)

    async def close_incident(self, incident: Incident, ref: TicketRef, state: TicketState) -> None:
        """Close the MDR incident once, with the resolution mapped from the ticket and the summary template.

        A close whose outcome is unknown leaves a pending ledger row. The
        next try reads the incident first, and when MDR already shows it
        closed, it only records the close.
        """
        incident_id = incident.incident_id
        pending = await self._pending_item(incident_id, CLOSE, ref.id)
        if pending:
            fresh = await self.context.read(lambda: self.context.mdr.get_incident(incident_id))
            if fresh.status == CLOSED:
                await self._finish_close(incident_id, ref, state.status, "sync.status.close_found")
                return

        resolution = self.resolution_for(state, ref)
        summary = self.close_rules.summary.format_map(
            {"system": system_title(self.context.tickets.system), "ticket_key": ref.key, "status": state.status}
        )
        await self.context.store.start_item(self.name, incident_id, CLOSE, TICKET_TO_MDR, ref.id)
        await self.context.mdr.close_incident(incident_id, resolution, summary)
        self.context.stats.incidents_closed += 1
        await self._finish_close(incident_id, ref, state.status, "sync.status.incident_closed", resolution)

    def resolution_for(self, state: TicketState, ref: TicketRef) -> str:
        """Return TRUE_POSITIVE or FALSE_POSITIVE for the ticket's resolution field, through `resolutions`."""
        rules = self.close_rules
        value = field_text(state.values.get(rules.resolution_field))
        mapped = rules.resolutions.get(value)
        if mapped is None:
            folded = {name.casefold(): resolution for name, resolution in rules.resolutions.items()}
            mapped = folded.get(value.casefold())
        if mapped is not None:
            return mapped
        if rules.default_resolution is not None:
            return rules.default_resolution

        mapping = self.context.settings.mapping
        if not value:
            raise ItemError(
                f"ticket {ref.key} is in done status {state.status!r} but its field {rules.resolution_field!r} "
                f"is empty, so the MDR resolution is unknown; set the field on the ticket, or set "
                f"status.close_mdr.default_resolution in mapping {mapping}"
            )
        raise ItemError(
            f"ticket {ref.key} has {rules.resolution_field} {value!r}, which status.close_mdr.resolutions "
            f"does not map; add {value!r}: TRUE_POSITIVE or FALSE_POSITIVE to it in mapping {mapping}, "
            "or set status.close_mdr.default_resolution"
        )

    async def _finish_pending_close(self, incident_id: str, ref: TicketRef) -> bool:
        """Record a close whose reply was lost once MDR shows the incident closed; return whether there was one."""
        if not await self._pending_item(incident_id, CLOSE, ref.id):
            return False
        await self._finish_close(incident_id, ref, None, "sync.status.close_found")
        return True

    async def _finish_close(
        self, incident_id: str, ref: TicketRef, ticket_status: str | None, event: str, resolution: str | None = None
    ) -> None:
        await self.context.store.finish_item(
            self.name, incident_id, CLOSE, TICKET_TO_MDR, ref.id, incident_id, source_version=ticket_status
        )
        log.info(
            event,
            extra={
                "connection": self.name,
                "incident_id": incident_id,
                "ticket_key": ref.key,
                "ticket_status": ticket_status,
                "resolution": resolution,
            },
        )

    async def note_reopen(self, incident: Incident, ref: TicketRef, state: TicketState, seen: SeenStatuses) -> None:
        """Add one comment to the closed incident saying that its ticket was reopened.

        Each reopen is a ledger row numbered in order. The row stays pending
        until both the comment and the ticket's new status are recorded, so
        `_resume_reopen_note` finishes an interrupted note instead of
        taking the same reopen for a new one.
        """
        incident_id = incident.incident_id
        items = await self.context.store.get_items(self.name, incident_id, REOPEN_NOTE)
        done = sum(1 for item in items if item.state == DONE)
        source_id = f"reopen:{ref.id}:{done + 1}"
        await self.context.store.start_item(self.name, incident_id, REOPEN_NOTE, TICKET_TO_MDR, source_id)
        await self._send_reopen_note(incident, ref, state, seen, source_id)

    async def _resume_reopen_note(
        self, incident: Incident, ref: TicketRef, state: TicketState, seen: SeenStatuses
    ) -> None:
        """Finish a reopen note left pending by a lost reply or a crash, looking its footer up before sending it again."""
        items = await self.context.store.get_items(self.name, incident.incident_id, REOPEN_NOTE)
        pending = next((item for item in items if item.state == PENDING), None)
        if pending is None:
            return
        landed = await self._find_mdr_comment(incident.incident_id, pending.source_id)
        if landed is None:
            await self._send_reopen_note(incident, ref, state, seen, pending.source_id)
            return
        await self._record_reopened(incident.incident_id, state, seen)
        await self._finish_reopen(incident.incident_id, ref, pending.source_id, landed)

    async def _send_reopen_note(
        self, incident: Incident, ref: TicketRef, state: TicketState, seen: SeenStatuses, source_id: str
    ) -> None:
        system = self.context.tickets.system
        note = _(
            "{system} ticket {ticket_key} was reopened (status {status}). This MDR incident stays closed, because "
            "the MDR API cannot reopen an incident; reopen it in the MDR console if the SOC should look at it again."
        ).format(system=system_title(system), ticket_key=escape_markdown(ref.key), status=escape_markdown(state.status))
        text = f"{note}\n\n{mdr_footer(system, source_id)}"
        posted = await self.context.mdr.create_comment(incident.incident_id, text, markdown_to_html=True)
        await self._record_reopened(incident.incident_id, state, seen)
        await self._finish_reopen(incident.incident_id, ref, source_id, posted.comment_id)

    async def _record_reopened(self, incident_id: str, state: TicketState, seen: SeenStatuses) -> None:
        """Record the status a noted reopen left the ticket in; a ticket done again keeps the done status seen before."""
        if not self._is_done(state.status):
            await self._record(incident_id, seen, ticket=state.status)

    async def _find_mdr_comment(self, incident_id: str, source_id: str) -> str | None:
        page = await self.context.read(lambda: self.context.mdr.list_comments(incident_id))
        for comment in page.items:
            marker = parse_mdr_footer(comment.text)
            if marker is not None and marker.source_id == source_id:
                return comment.comment_id
        return None

    async def _finish_reopen(self, incident_id: str, ref: TicketRef, source_id: str, comment_id: str) -> None:
        await self.context.store.finish_item(self.name, incident_id, REOPEN_NOTE, TICKET_TO_MDR, source_id, comment_id)
        log.info(
            "sync.status.reopen_noted",
            extra={
                "connection": self.name,
                "incident_id": incident_id,
                "ticket_key": ref.key,
                "comment_id": comment_id,
            },
        )

    # Helpers

    def _is_done(self, status: str | None) -> bool:
        return status is not None and status.casefold() in self._done_statuses

    async def _pending_item(self, incident_id: str, kind: str, source_id: str) -> bool:
        items = await self.context.store.get_items(self.name, incident_id, kind)
        return any(item.source_id == source_id and item.state == PENDING for item in items)

    async def _record(
        self, incident_id: str, seen: SeenStatuses, *, ticket: str | None = None, mdr: str | None = None
    ) -> None:
        await self.context.store.record_statuses(self.name, incident_id, ticket_status=ticket, mdr_status=mdr)
        if ticket is not None:
            seen.ticket = ticket
        if mdr is not None:
            seen.mdr = mdr
