"""The comment sync: copies the comments that one side lacks, in both directions.

A comment the connector wrote itself (an echo) is recognised by its author,
the ledger or its marker, and is never copied back. ConnectionSync
(engine.py) creates one CommentSync and calls it from each reconciliation.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Protocol, TypeVar

from mdr_connector.adapters.mdr.models import Comment, Incident
from mdr_connector.connector import markup
from mdr_connector.connector.config import ConnectionSettings
from mdr_connector.connector.errors import ItemError, MisconfiguredError
from mdr_connector.connector.mapping import (
    parse_mdr_footer,
    render_comment_for_mdr,
    render_comment_for_ticket,
)
from mdr_connector.connector.mappingfile import Mapping
from mdr_connector.connector.store import (
    DONE,
    MDR_TO_TICKET,
    TICKET_TO_MDR,
    Store,
    SyncedItem,
)
from mdr_connector.connector.sync_common import MdrApi, SyncStats, gather_or_cancel
from mdr_connector.connector.tickets import (
    MDR_ORIGIN,
    CommentDraft,
    SyncMarker,
    TicketAccount,
    TicketAdapter,
    TicketComment,
    TicketRef,
)

log = logging.getLogger(__name__)

COMMENT = "comment"

T = TypeVar("T")


class ReadWithRetry(Protocol):
    """A read call run under the engine's read retry policy."""

    async def __call__(self, call: Callable[[], Awaitable[T]]) -> T: ...


class CommentSync:
    """Mirrors the comments of one connection's incidents and tickets in both directions."""

    def __init__(
        self,
        settings: ConnectionSettings,
        mapping: Mapping,
        store: Store,
        mdr: MdrApi,
        tickets: TicketAdapter,
        stats: SyncStats,
        read: ReadWithRetry,
    ) -> None:
        self.settings = settings
        self.name = settings.name
        self.mapping = mapping
        self.store = store
        self.mdr = mdr
        self.tickets = tickets
        self.stats = stats
        self._read = read
        # ConnectionSync.open() sets it. Comments written by this account are echoes.
        self.own_account: TicketAccount | None = None

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
            if marker is None:
                continue
            if comment.author_name != self.settings.mdr.connection_name:
                # The footer ends the comment, so the connector wrote it, under
                # another Connection Name: an old token, or a wrong setting.
                log.warning(
                    "sync.comment.footer_from_other_author",
                    extra={"connection": self.name, "incident_id": incident.incident_id, "comment_id": comment.comment_id},
                )
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
        self._check_connection_name(posted)
        return posted

    def _check_connection_name(self, posted: Comment) -> None:
        """Stop the connection when MDR names the token's own comments differently from `connection_name`.

        Echo suppression on the MDR side compares authors with that setting,
        so a mismatch would mirror the connector's own comments back.
        """
        expected = self.settings.mdr.connection_name
        if posted.author_name == expected:
            return
        raise MisconfiguredError(
            f"MDR shows comments written with this token as author {posted.author_name!r}, but "
            f"mdr.connection_name is {expected!r}; set mdr.connection_name: {posted.author_name!r}"
        )

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
