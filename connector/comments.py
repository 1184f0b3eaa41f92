"""The comment sync: copies the comments that one side lacks, and handles edits and deletions of copies.

A comment the connector wrote itself (an echo) is recognised by its author,
the ledger or its marker, and is never copied back. ConnectionSync
(engine.py) creates one CommentSync and calls it from each reconciliation.

The `comments:` section of the mapping sets the policies:

- `to_mdr` picks the ticket comments that go to MDR. `public` (the default)
  sends the comments that are neither restricted to a role or group nor
  internal in Jira Service Management. `all` sends every comment. `marked`
  sends only comments that start with `marker` and removes the marker from
  the copy. In that mode the marker alone decides, so an internal comment
  that starts with it goes too. The rule is checked against the comment as
  it is now, at every reconciliation, and the ledger records nothing for a
  skipped comment. A comment edited into scope later (marker added,
  restriction lifted) is therefore copied then, with its text at that time.
- `visibility` limits who may read every comment the connector posts on the ticket.
- `on_ticket_edit`: MDR has no comment edit, so a ticket comment edited
  after it was copied is sent as a note with the new text (`note`), or not
  at all. The note goes only while the comment is still in scope.
- `on_ticket_delete`: the connector deletes its MDR copy of a ticket comment
  deleted on the ticket (`mirror`), adds a note to MDR (`note`), or does nothing.
- `on_mdr_delete`: the connector replaces the text of its ticket copy of an
  MDR comment deleted in MDR (`mirror`), adds a note to the ticket
  (`note`), or does nothing.

Each edit and deletion is handled once. The ledger row of a copy keeps the
version of the ticket comment that was last sent, and every note, deleted
copy and edited copy has a ledger row of kind `comment_change`, whose
source id (`<comment id>:edited:<version>` or `<comment id>:deleted`) is
also the marker of a note, so a note whose reply was lost is found again
instead of being posted twice. A deletion is noticed when the source of a
copy is missing from the full comment list of its side, and only after a
second read of that list confirms it. Nothing is decided from a list that
holds malformed MDR records.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from mdr_connector.adapters.mdr.models import Comment, Incident
from mdr_connector.connector import markup
from mdr_connector.connector.comment_parts import SplitError, part_mark, split_markdown
from mdr_connector.connector.config import ConnectionSettings
from mdr_connector.connector.errors import ItemError, MisconfiguredError, RejectedError
from mdr_connector.connector.mapping import (
    comment_visibility,
    parse_mdr_footer,
    render_comment_for_mdr,
    render_comment_for_ticket,
    render_deleted_copy_for_ticket,
    render_deletion_note_for_mdr,
    render_deletion_note_for_ticket,
    render_edit_note_for_mdr,
    strip_comment_marker,
)
from mdr_connector.connector.mappingfile import Mapping
from mdr_connector.connector.store import (
    DONE,
    MDR_TO_TICKET,
    TICKET_TO_MDR,
    Store,
    SyncedItem,
)
from mdr_connector.connector.sync_common import MalformedLike, MdrApi, ReadWithRetry, SyncStats, gather_or_cancel
from mdr_connector.connector.tickets import (
    MDR_ORIGIN,
    NOTICE_ORIGIN,
    CommentDraft,
    SyncMarker,
    TicketAccount,
    TicketAdapter,
    TicketComment,
    TicketRef,
)

log = logging.getLogger(__name__)

COMMENT = "comment"
# A handled edit or deletion of a copied comment: the note about it, or the
# copy that was deleted or edited to match.
COMMENT_CHANGE = "comment_change"

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
# A comment version is `<edit time> #<text digest>`, 50 characters, within
# the 64 of the ledger's source_version column.
DIGEST_SEPARATOR = " #"
TEXT_DIGEST_LENGTH = 16
# Part k > 1 of an MDR comment split to fit the ticket system is `<comment id>/k`.
PART_SEPARATOR = "/"
# More parts than this park the comment, because the ticket would fill with them.
MAX_COMMENT_PARTS = 99
# The length of the ledger's source_id column, which contains the part keys.
MAX_SOURCE_ID_LENGTH = 200


def comment_version(comment: TicketComment) -> str:
    """Return the version of a ticket comment as the ledger stores it.

    That is the last edit time (else the creation time) in UTC, then a
    digest of the text. The digest separates an edit that changed only who
    may read the comment from one that changed its text.
    """
    moment = comment.updated or comment.created
    digest = hashlib.sha256(comment.body.encode("utf-8")).hexdigest()[:TEXT_DIGEST_LENGTH]
    return f"{moment.astimezone(timezone.utc).isoformat(timespec='microseconds')}{DIGEST_SEPARATOR}{digest}"


def same_edit(stored: str | None, current: str) -> bool:
    """Tell whether two versions have the same edit time; a version stored before digests were added has only the time."""
    return stored is not None and stored.partition(DIGEST_SEPARATOR)[0] == current.partition(DIGEST_SEPARATOR)[0]


def same_text(stored: str | None, current: str) -> bool:
    """Tell whether two versions carry the same text; a version stored without a digest matches none."""
    if stored is None or DIGEST_SEPARATOR not in stored:
        return False
    return stored.rpartition(DIGEST_SEPARATOR)[2] == current.rpartition(DIGEST_SEPARATOR)[2]


def edit_key(comment: TicketComment) -> str:
    """Return the ledger source id and note marker of one version of an edited ticket comment."""
    moment = comment.updated or comment.created
    microseconds = (moment - EPOCH) // timedelta(microseconds=1)
    return f"{comment.id}:edited:{microseconds}"


def deletion_key(source_id: str) -> str:
    """Return the ledger source id and note marker of a deleted comment."""
    return f"{source_id}:deleted"


def part_key(comment_id: str, part: int) -> str:
    """Return the ledger source id and marker of one part of a split MDR comment: the comment id for part 1."""
    return comment_id if part == 1 else f"{comment_id}{PART_SEPARATOR}{part}"


def comment_of_part(source_id: str) -> tuple[str, int]:
    """Return the MDR comment id and the part number that a ledger source id of kind `comment` names."""
    head, separator, number = source_id.rpartition(PART_SEPARATOR)
    if separator and head and number.isdigit() and int(number) >= 2:
        return head, int(number)
    return source_id, 1


@dataclass
class CommentView:
    """The comments of both sides of one incident as read at the start of a reconciliation, with their ledger rows."""

    mdr_comments: list[Comment]
    mdr_malformed: list[MalformedLike]
    ticket_comments: list[TicketComment]
    # Ledger rows of kind `comment` (copies) and `comment_change`, the latter by (direction, source id).
    copies: list[SyncedItem]
    changes: dict[tuple[str, str], SyncedItem]
    # MDR comments that end in the connector's footer, by the source id the footer names.
    in_mdr: dict[str, Comment]
    # Ticket comments that carry the connector's marker, by (origin, source id).
    on_ticket: dict[tuple[str, str], TicketComment]

    def written_by_us(self, direction: str) -> set[str]:
        """Return the ids of the comments the connector wrote in `direction`: copies, notes and edited copies."""
        rows = [*self.copies, *self.changes.values()]
        return {row.target_id for row in rows if row.direction == direction and row.target_id}

    def change_done(self, direction: str, key: str) -> bool:
        row = self.changes.get((direction, key))
        return row is not None and row.state == DONE

    def copies_of_missing(self, direction: str, present: set[str]) -> dict[str, str]:
        """Map the source ids missing from `present` to the ids of their copies in `direction`.

        Copies whose deletion is already handled are left out.
        """
        copy_ids: dict[str, str] = {}
        for item in self.copies:
            if item.direction != direction or item.source_id in present:
                continue
            if direction == MDR_TO_TICKET and comment_of_part(item.source_id)[0] in present:
                continue
            if self.change_done(direction, deletion_key(item.source_id)):
                continue
            copy_id = self.copy_id(item)
            if copy_id is not None:
                copy_ids[item.source_id] = copy_id
        return copy_ids

    def copy_id(self, item: SyncedItem) -> str | None:
        """Return the id of the copy a ledger row names, also when the copy's reply was lost."""
        if item.state == DONE:
            return item.target_id
        if item.direction == TICKET_TO_MDR:
            in_mdr = self.in_mdr.get(item.source_id)
            return in_mdr.comment_id if in_mdr is not None else None
        on_ticket = self.on_ticket.get((MDR_ORIGIN, item.source_id))
        return on_ticket.id if on_ticket is not None else None


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
        # ConnectionSync sets it to share the ticket's comment list with the
        # other parts of a reconciliation.
        self.read_ticket_comments: Callable[[TicketRef], Awaitable[list[TicketComment]]] | None = None

    async def sync_comments(self, incident: Incident, ref: TicketRef) -> None:
        """Copy the comments missing on either side, then handle edits and deletions of earlier copies.

        A comment that fails for a reason of its own (malformed, rejected by
        the target) does not stop the others: the rest are handled first,
        then one ItemError parks the incident so the failed ones are tried again.
        """
        view = await self._read_comments(incident, ref)
        failed = [f"comment {record.record_id or '<without id>'}: {record.error}" for record in view.mdr_malformed]

        failed += await self.sync_comments_mdr_to_ticket(incident, ref, view)
        failed += await self.sync_comments_ticket_to_mdr(incident, ref, view)
        if not view.mdr_malformed:
            # A malformed record can be the note or copy a change looks for, so changes wait for a clean list.
            failed += await self.sync_ticket_edits(incident, ref, view)
            failed += await self.sync_ticket_deletions(incident, ref, view)
            failed += await self.sync_mdr_deletions(incident, ref, view)
        if failed:
            raise ItemError(f"{len(failed)} comment(s) of incident {incident.incident_id} failed: {'; '.join(failed)}")

    async def _ticket_comments(self, ref: TicketRef) -> list[TicketComment]:
        if self.read_ticket_comments is not None:
            return await self.read_ticket_comments(ref)
        return await self._read(lambda: self.tickets.list_comments(ref))

    async def _read_comments(self, incident: Incident, ref: TicketRef) -> CommentView:
        mdr_page, ticket_comments = await gather_or_cancel(
            self._read(lambda: self.mdr.list_comments(incident.incident_id)),
            self._ticket_comments(ref),
        )
        rows = await self.store.get_items_of_kinds(self.name, incident.incident_id, (COMMENT, COMMENT_CHANGE))
        # A list that names a comment twice would otherwise get it copied
        # twice, because the ledger rows are read once per reconciliation.
        first_of_each: dict[str, Comment] = {}
        for comment in mdr_page.items:
            first_of_each.setdefault(comment.comment_id, comment)
        return CommentView(
            mdr_comments=list(first_of_each.values()),
            mdr_malformed=list(mdr_page.malformed),
            ticket_comments=ticket_comments,
            copies=rows[COMMENT],
            changes={(row.direction, row.source_id): row for row in rows[COMMENT_CHANGE]},
            in_mdr=self._footers_in_mdr(incident, mdr_page.items),
            on_ticket=self._markers_on_ticket(ref, ticket_comments),
        )

    def _footers_in_mdr(self, incident: Incident, mdr_comments: list[Comment]) -> dict[str, Comment]:
        """Map the source ids that footers name to the MDR comments that end in them."""
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
        return in_mdr

    def _markers_on_ticket(
        self, ref: TicketRef, ticket_comments: list[TicketComment]
    ) -> dict[tuple[str, str], TicketComment]:
        """Map (origin, source id) of the connector's markers to the ticket comments that carry them."""
        assert self.own_account is not None
        found: dict[tuple[str, str], TicketComment] = {}
        for comment in ticket_comments:
            if comment.marker is None:
                continue
            if comment.author.id != self.own_account.id:
                # The marker is the connector's, but someone else wrote the
                # comment: either an earlier service account, or a forgery.
                log.warning(
                    "sync.comment.marker_from_other_account",
                    extra={"connection": self.name, "ticket_key": ref.key, "comment_id": comment.id},
                )
            found.setdefault((comment.marker.origin, comment.marker.source_id), comment)
        return found

    # Copies

    async def sync_comments_mdr_to_ticket(self, incident: Incident, ref: TicketRef, view: CommentView) -> list[str]:
        """Copy MDR comments missing on the ticket; return the failures of single comments."""
        done = {item.source_id for item in view.copies if item.direction == MDR_TO_TICKET and item.state == DONE}
        written_by_us = view.written_by_us(TICKET_TO_MDR)
        missing = [
            comment
            for comment in sorted(view.mdr_comments, key=lambda c: c.creation_time)
            if comment.comment_id not in done and not self._is_mdr_echo(comment, written_by_us)
        ]

        failed: list[str] = []
        drafted: list[tuple[Comment, list[CommentDraft] | None]] = []
        for comment in missing:
            if (MDR_ORIGIN, comment.comment_id) in view.on_ticket and self.tickets.capabilities.max_comment_chars is None:
                # A lost reply landed the copy already; only its ledger row is missing.
                drafted.append((comment, None))
                continue
            try:
                drafted.append((comment, await self._ticket_drafts(comment)))
            except ItemError as err:
                failed.append(f"comment {comment.comment_id}: {err}")

        # One transaction records the intents of all single-part copies about
        # to be posted. A copy whose post then fails keeps a pending row, which
        # costs only a look for its marker on the next reconciliation, as after a crash.
        recorded = [
            comment.comment_id
            for comment, drafts in drafted
            if drafts is not None and len(drafts) == 1 and (MDR_ORIGIN, comment.comment_id) not in view.on_ticket
        ]
        if len(recorded) > 1:
            await self.store.start_items(self.name, incident.incident_id, COMMENT, MDR_TO_TICKET, recorded)
        else:
            recorded = []

        # Their copies are recorded as done together too, after the last post
        # or the first error. A crash before that leaves pending rows, whose
        # copies the next reconciliation finds by their markers.
        finished: dict[str, str] = {}
        try:
            for comment, drafts in drafted:
                try:
                    await self._copy_to_ticket(
                        incident, ref, view, comment, drafts, finished=finished if comment.comment_id in recorded else None
                    )
                except ItemError as err:
                    failed.append(f"comment {comment.comment_id}: {err}")
        finally:
            if finished:
                await self.store.finish_items(self.name, incident.incident_id, COMMENT, MDR_TO_TICKET, finished)
        return failed

    async def _copy_to_ticket(
        self,
        incident: Incident,
        ref: TicketRef,
        view: CommentView,
        comment: Comment,
        drafts: list[CommentDraft] | None,
        *,
        finished: dict[str, str] | None,
    ) -> None:
        """Post the copy of an MDR comment from its `drafts`, or its missing parts, unless a lost reply already landed it.

        `drafts` is None only for a copy that landed already on a system without a comment length limit.
        `finished` is given when the caller recorded the copy's intent with
        others: the copy id goes there (by source id) for the caller to record as done.
        """
        landed = view.on_ticket.get((MDR_ORIGIN, comment.comment_id))
        if drafts is None:
            assert landed is not None
            await self._finish_copy(incident, MDR_TO_TICKET, comment.comment_id, landed.id)
            return

        if len(drafts) > 1:
            await self._post_parts(incident, ref, view, comment.comment_id, drafts)
            return
        if landed is not None:
            await self._finish_copy(incident, MDR_TO_TICKET, comment.comment_id, landed.id)
            return
        if finished is None:
            await self.store.start_item(self.name, incident.incident_id, COMMENT, MDR_TO_TICKET, comment.comment_id)
        posted = await self.tickets.add_comment(ref, drafts[0])
        if finished is None:
            await self._finish_copy(incident, MDR_TO_TICKET, comment.comment_id, posted.id)
        else:
            finished[comment.comment_id] = posted.id
        self.stats.comments_to_ticket += 1
        self._log_mirrored(MDR_TO_TICKET, incident, ref, comment.comment_id, posted.id)

    async def _ticket_drafts(self, comment: Comment) -> list[CommentDraft]:
        """Render the ticket copy of an MDR comment: one draft, or one per part when it exceeds `max_comment_chars`.

        Part 1 has the comment id as its marker and ledger source id, and part
        k > 1 has `<comment id>/k`. The split depends only on the text, the
        header and the limit, so a run after a crash finds the same parts.
        NOTE: a change of the language, the header template or pandoc between
        a crash and the next run can move the cuts, so the parts still missing
        then may repeat or skip a few lines of the parts already posted.
        """
        body = await asyncio.to_thread(markup.html_to_markdown, comment.text)
        created = datetime.fromtimestamp(comment.creation_time / 1000, tz=timezone.utc)
        visibility = comment_visibility(self.mapping)
        whole = render_comment_for_ticket(self.mapping, comment.author_name, created, body)
        limit = self.tickets.capabilities.max_comment_chars
        if limit is None:
            return [CommentDraft(body=whole, marker=SyncMarker(MDR_ORIGIN, comment.comment_id), visibility=visibility)]
        length = await self.tickets.comment_length(whole)
        if length <= limit:
            return [CommentDraft(body=whole, marker=SyncMarker(MDR_ORIGIN, comment.comment_id), visibility=visibility)]
        if length > limit * MAX_COMMENT_PARTS:
            raise ItemError(
                f"the comment has {length} characters, more than {MAX_COMMENT_PARTS} ticket comments "
                f"of at most {limit} characters can carry"
            )

        def render_part(part: int, parts: int, text: str) -> str:
            return render_comment_for_ticket(
                self.mapping, comment.author_name, created, f"{part_mark(part, parts)}\n\n{text}"
            )

        # Room for the header and the part line, measured with the widest part numbers.
        header_room = await self.tickets.comment_length(render_part(MAX_COMMENT_PARTS, MAX_COMMENT_PARTS, "x"))
        try:
            pieces = await split_markdown(body, limit - header_room, self.tickets.comment_length)
        except SplitError as err:
            raise ItemError(f"the comment is longer than {limit} characters and cannot be split: {err}") from err
        if len(pieces) > MAX_COMMENT_PARTS:
            raise ItemError(f"the comment would need {len(pieces)} comments of at most {limit} characters")
        if len(part_key(comment.comment_id, len(pieces))) > MAX_SOURCE_ID_LENGTH:
            raise ItemError(f"the comment id is too long to name its parts within {MAX_SOURCE_ID_LENGTH} characters")

        drafts = []
        for part, piece in enumerate(pieces, start=1):
            text = render_part(part, len(pieces), piece)
            if await self.tickets.comment_length(text) > limit:
                raise ItemError(f"part {part} of the split comment is still longer than {limit} characters")
            marker = SyncMarker(MDR_ORIGIN, part_key(comment.comment_id, part))
            drafts.append(CommentDraft(body=text, marker=marker, visibility=visibility))
        return drafts

    async def _post_parts(
        self, incident: Incident, ref: TicketRef, view: CommentView, comment_id: str, drafts: list[CommentDraft]
    ) -> None:
        """Post the parts of a split MDR comment in order, each with its own marker and ledger row.

        A part already recorded as done, or found on the ticket by its marker,
        is not posted again. Part 1 is recorded as done last, so the done row
        of the comment id means that every part is on the ticket.
        """
        done = {
            item.source_id: item.target_id
            for item in view.copies
            if item.direction == MDR_TO_TICKET and item.state == DONE
        }
        fields = {"connection": self.name, "incident_id": incident.incident_id, "ticket_key": ref.key}
        log.info("sync.comment.split", extra={**fields, "comment_id": comment_id, "parts": len(drafts)})
        first_copy_id = ""
        posted_any = False
        for draft in drafts:
            key = draft.marker.source_id
            copy_id = done.get(key)
            landed = view.on_ticket.get((MDR_ORIGIN, key))
            if copy_id is None and landed is not None:
                copy_id = landed.id
            if copy_id is None:
                await self.store.start_item(self.name, incident.incident_id, COMMENT, MDR_TO_TICKET, key)
                posted = await self.tickets.add_comment(ref, draft)
                copy_id = posted.id
                posted_any = True
                self._log_mirrored(MDR_TO_TICKET, incident, ref, key, copy_id)
            if key == comment_id:
                first_copy_id = copy_id
            elif key not in done:
                await self._finish_copy(incident, MDR_TO_TICKET, key, copy_id)
        await self._finish_copy(incident, MDR_TO_TICKET, comment_id, first_copy_id)
        if posted_any:
            self.stats.comments_to_ticket += 1

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

    async def sync_comments_ticket_to_mdr(self, incident: Incident, ref: TicketRef, view: CommentView) -> list[str]:
        """Copy the ticket comments that `to_mdr` selects and MDR lacks; return the failures of single comments."""
        done = {item.source_id for item in view.copies if item.direction == TICKET_TO_MDR and item.state == DONE}
        written_by_us = view.written_by_us(MDR_TO_TICKET)
        failed: list[str] = []

        for comment in sorted(view.ticket_comments, key=lambda c: c.created):
            if comment.id in done:
                continue
            if self._is_ticket_echo(comment, written_by_us):
                continue

            # A copy found by its footer is recorded even when the rule now
            # skips the comment, because the copy is already in MDR.
            landed = view.in_mdr.get(comment.id)
            if landed is not None:
                await self._finish_copy(incident, TICKET_TO_MDR, comment.id, landed.comment_id, comment_version(comment))
                continue

            body = self._body_for_mdr(ref, comment)
            if body is None:
                continue

            try:
                await self._post_to_mdr(incident, ref, comment, body)
            except ItemError as err:
                failed.append(f"{self.tickets.system} comment {comment.id}: {err}")
        return failed

    def _body_for_mdr(self, ref: TicketRef, comment: TicketComment) -> str | None:
        """Return the body to send to MDR under the `to_mdr` rule, or None when the comment stays on the ticket."""
        rule = self.mapping.comments.mirrors_to_mdr()
        if rule == "public" and comment.restricted:
            self._note_skipped(ref, comment, "restricted")
            return None
        if rule == "marked":
            body = strip_comment_marker(comment.body, self.mapping.comments.marker)
            if body is None:
                self._note_skipped(ref, comment, "unmarked")
            return body
        return comment.body

    async def _post_to_mdr(self, incident: Incident, ref: TicketRef, comment: TicketComment, body: str) -> Comment:
        text = render_comment_for_mdr(
            self.mapping,
            author=comment.author.display_name,
            created=comment.created,
            body=body,
            system=self.tickets.system,
            ticket_key=ref.key,
            comment_id=comment.id,
        )
        # NOTE: the MDR API documents no comment length limit, so a long ticket
        # comment goes as one MDR comment. If MDR has a limit, it rejects the
        # comment with a 4xx, and the incident is parked with that reason.
        await self.store.start_item(self.name, incident.incident_id, COMMENT, TICKET_TO_MDR, comment.id)
        posted = await self.mdr.create_comment(incident.incident_id, text, markdown_to_html=True)
        await self._finish_copy(incident, TICKET_TO_MDR, comment.id, posted.comment_id, comment_version(comment))
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
        log.info("sync.comment.mirrored", extra=self._log_fields(direction, incident, ref, source_id, target_id))

    def _note_skipped(self, ref: TicketRef, comment: TicketComment, reason: str) -> None:
        """Log once per comment and process that the `to_mdr` rule keeps a comment on the ticket."""
        key = f"{reason}:{comment.id}"
        if key in self.stats.restricted_skipped:
            return
        self.stats.restricted_skipped.add(key)
        event = "sync.comment.restricted_kept_internal" if reason == "restricted" else "sync.comment.unmarked_kept_internal"
        log.info(event, extra={"connection": self.name, "ticket_key": ref.key, "comment_id": comment.id})

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

    # Edits of ticket comments

    async def sync_ticket_edits(self, incident: Incident, ref: TicketRef, view: CommentView) -> list[str]:
        """Send one note to MDR per noticed version of a copied ticket comment edited since it was last sent.

        Only the version seen at a reconciliation is sent, so two edits
        between reconciliations give one note with the newer text.
        """
        if self.mapping.comments.on_ticket_edit == "ignore":
            return []
        copies = {item.source_id: item for item in view.copies if item.direction == TICKET_TO_MDR and item.state == DONE}
        failed: list[str] = []

        for comment in view.ticket_comments:
            copy = copies.get(comment.id)
            version = comment_version(comment)
            if copy is None or copy.target_id is None or same_edit(copy.source_version, version):
                continue
            if copy.source_version is None:
                # Copied before versions were recorded, so the copied version
                # is unknown and this one becomes the baseline.
                # NOTE: an edit made before that upgrade is never noted.
                await self._finish_copy(incident, TICKET_TO_MDR, comment.id, copy.target_id, version)
                continue

            body = self._body_for_mdr(ref, comment)
            if body is None:
                continue
            if same_text(copy.source_version, version):
                # Only who may read the comment changed, such as a restriction
                # set and lifted again, so the text MDR has is still current.
                await self._finish_copy(incident, TICKET_TO_MDR, comment.id, copy.target_id, version)
                continue
            try:
                await self._note_edit_in_mdr(incident, ref, view, comment, body)
            except ItemError as err:
                failed.append(f"{self.tickets.system} comment {comment.id} (edit): {err}")
                continue
            await self._finish_copy(incident, TICKET_TO_MDR, comment.id, copy.target_id, version)
        return failed

    async def _note_edit_in_mdr(
        self, incident: Incident, ref: TicketRef, view: CommentView, comment: TicketComment, body: str
    ) -> None:
        key = edit_key(comment)
        if view.change_done(TICKET_TO_MDR, key):
            return
        landed = view.in_mdr.get(key)
        if landed is not None:
            await self._finish_change(incident, TICKET_TO_MDR, key, landed.comment_id)
            return

        text = render_edit_note_for_mdr(
            self.mapping,
            author=comment.author.display_name,
            edited=comment.updated or comment.created,
            body=body,
            system=self.tickets.system,
            ticket_key=ref.key,
            note_id=key,
        )
        posted = await self._post_note_to_mdr(incident, key, text)
        log.info(
            "sync.comment.edit_noted",
            extra=self._log_fields(TICKET_TO_MDR, incident, ref, comment.id, posted.comment_id),
        )

    async def _post_note_to_mdr(self, incident: Incident, key: str, text: str) -> Comment:
        await self.store.start_item(self.name, incident.incident_id, COMMENT_CHANGE, TICKET_TO_MDR, key)
        posted = await self.mdr.create_comment(incident.incident_id, text, markdown_to_html=True)
        await self._finish_change(incident, TICKET_TO_MDR, key, posted.comment_id)
        self.stats.comment_notes += 1
        self._check_connection_name(posted)
        return posted

    # Deletions of ticket comments

    async def sync_ticket_deletions(self, incident: Incident, ref: TicketRef, view: CommentView) -> list[str]:
        """Handle copied ticket comments that were deleted on the ticket, by the `on_ticket_delete` rule."""
        rule = self.mapping.comments.on_ticket_delete
        if rule == "ignore":
            return []
        present = {comment.id for comment in view.ticket_comments}
        copy_ids = view.copies_of_missing(TICKET_TO_MDR, present)
        if not copy_ids:
            return []

        # A comment deleted while the adapter pages through the list can
        # hide another one, so a deletion counts only when a second read agrees.
        again = await self._read(lambda: self.tickets.list_comments(ref))
        deleted = sorted(set(copy_ids) - {comment.id for comment in again})
        failed: list[str] = []
        for source_id in deleted:
            try:
                await self._handle_ticket_deletion(incident, ref, view, source_id, copy_ids[source_id], rule)
            except ItemError as err:
                failed.append(f"{self.tickets.system} comment {source_id} (deleted): {err}")
        return failed

    async def _handle_ticket_deletion(
        self, incident: Incident, ref: TicketRef, view: CommentView, source_id: str, copy_id: str, rule: str
    ) -> None:
        key = deletion_key(source_id)
        if rule == "mirror":
            mdr_copy = next((comment for comment in view.mdr_comments if comment.comment_id == copy_id), None)
            if mdr_copy is None:
                # Already gone: an earlier delete whose reply was lost, or a person in MDR.
                await self._finish_change(incident, TICKET_TO_MDR, key, copy_id)
                return
            if mdr_copy.author_name == self.settings.mdr.connection_name:
                await self._delete_in_mdr(incident, ref, source_id, key, copy_id)
                return
            # MDR lets only a comment's author delete it, and this copy was
            # written under another Connection Name, so a note has to do.
            log.warning(
                "sync.comment.copy_not_deletable",
                extra=self._log_fields(TICKET_TO_MDR, incident, ref, source_id, copy_id),
            )

        landed = view.in_mdr.get(key)
        if landed is not None:
            await self._finish_change(incident, TICKET_TO_MDR, key, landed.comment_id)
            return
        text = render_deletion_note_for_mdr(
            system=self.tickets.system, ticket_key=ref.key, comment_id=source_id, note_id=key
        )
        posted = await self._post_note_to_mdr(incident, key, text)
        log.info(
            "sync.comment.deletion_noted",
            extra=self._log_fields(TICKET_TO_MDR, incident, ref, source_id, posted.comment_id),
        )

    async def _delete_in_mdr(self, incident: Incident, ref: TicketRef, source_id: str, key: str, copy_id: str) -> None:
        # A 404 means the copy was deleted meanwhile. The list read just
        # before showed the copy, so a wrong client id or URL is ruled out.
        await self._mirror_deletion(
            incident, ref, TICKET_TO_MDR, source_id, key, copy_id, lambda: self.mdr.delete_comment(copy_id)
        )

    # Deletions of MDR comments

    async def sync_mdr_deletions(self, incident: Incident, ref: TicketRef, view: CommentView) -> list[str]:
        """Handle copied MDR comments that were deleted in MDR, by the `on_mdr_delete` rule."""
        rule = self.mapping.comments.on_mdr_delete
        if rule == "ignore":
            return []
        present = {comment.comment_id for comment in view.mdr_comments}
        copy_ids = view.copies_of_missing(MDR_TO_TICKET, present)
        if not copy_ids:
            return []

        # The same check as for the ticket: a second read must agree.
        again = await self._read(lambda: self.mdr.list_comments(incident.incident_id))
        if again.malformed:
            return []
        still_there = {comment.comment_id for comment in again.items}
        # Every part of a split comment is a copy of its own, named `<comment id>/k` after part 1.
        deleted = sorted(
            key for key in copy_ids if key not in still_there and comment_of_part(key)[0] not in still_there
        )
        failed: list[str] = []
        for source_id in deleted:
            try:
                await self._handle_mdr_deletion(incident, ref, view, source_id, copy_ids[source_id], rule)
            except ItemError as err:
                failed.append(f"comment {source_id} (deleted in MDR): {err}")
        return failed

    async def _handle_mdr_deletion(
        self, incident: Incident, ref: TicketRef, view: CommentView, source_id: str, copy_id: str, rule: str
    ) -> None:
        assert self.own_account is not None
        key = deletion_key(source_id)
        ticket_copy = next((comment for comment in view.ticket_comments if comment.id == copy_id), None)
        # Where comments cannot be edited (ServiceNow journal entries), `mirror` falls back to a note.
        if rule == "mirror" and self.tickets.capabilities.edit_comments:
            # A copy missing from the list is still edited, because a list
            # read during another deletion can skip it. The adapter raises
            # a 404 when the copy is really gone.
            if ticket_copy is None or ticket_copy.author.id == self.own_account.id:
                await self._blank_ticket_copy(incident, ref, source_id, key, copy_id)
                return
            # An earlier service account wrote the copy, and only the author may edit it.
            log.warning(
                "sync.comment.copy_not_editable",
                extra=self._log_fields(MDR_TO_TICKET, incident, ref, source_id, copy_id),
            )

        if comment_of_part(source_id)[1] > 1:
            # One note covers a split comment, and part 1 carries it.
            await self._finish_change(incident, MDR_TO_TICKET, key, copy_id)
            return
        landed = view.on_ticket.get((NOTICE_ORIGIN, key))
        if landed is not None:
            await self._finish_change(incident, MDR_TO_TICKET, key, landed.id)
            return
        draft = CommentDraft(
            body=render_deletion_note_for_ticket(ticket_copy.created if ticket_copy else None),
            marker=SyncMarker(origin=NOTICE_ORIGIN, source_id=key),
            visibility=comment_visibility(self.mapping),
        )
        await self.store.start_item(self.name, incident.incident_id, COMMENT_CHANGE, MDR_TO_TICKET, key)
        posted = await self.tickets.add_comment(ref, draft)
        await self._finish_change(incident, MDR_TO_TICKET, key, posted.id)
        self.stats.comment_notes += 1
        log.info(
            "sync.comment.deletion_noted",
            extra=self._log_fields(MDR_TO_TICKET, incident, ref, source_id, posted.id),
        )

    async def _blank_ticket_copy(self, incident: Incident, ref: TicketRef, source_id: str, key: str, copy_id: str) -> None:
        """Replace the text of the ticket copy of a deleted MDR comment; an edit repeated after a crash does no harm."""
        draft = CommentDraft(
            body=render_deleted_copy_for_ticket(),
            marker=SyncMarker(origin=MDR_ORIGIN, source_id=source_id),
            visibility=comment_visibility(self.mapping),
        )
        # A 404 means a person deleted the copy on the ticket, so no text is left to remove.
        await self._mirror_deletion(
            incident, ref, MDR_TO_TICKET, source_id, key, copy_id, lambda: self.tickets.edit_comment(ref, copy_id, draft)
        )

    async def _mirror_deletion(
        self,
        incident: Incident,
        ref: TicketRef,
        direction: str,
        source_id: str,
        key: str,
        copy_id: str,
        write: Callable[[], Awaitable[object]],
    ) -> None:
        """Record the intent, run `write` on the copy, then record the change. A 404 from `write` counts as done."""
        await self.store.start_item(self.name, incident.incident_id, COMMENT_CHANGE, direction, key)
        try:
            await write()
        except RejectedError as err:
            if err.status != 404:
                raise
        await self._finish_change(incident, direction, key, copy_id)
        log.info("sync.comment.deletion_mirrored", extra=self._log_fields(direction, incident, ref, source_id, copy_id))

    # Ledger

    async def _finish_copy(
        self, incident: Incident, direction: str, source_id: str, target_id: str, source_version: str | None = None
    ) -> None:
        await self.store.finish_item(
            self.name, incident.incident_id, COMMENT, direction, source_id, target_id, source_version=source_version
        )

    async def _finish_change(self, incident: Incident, direction: str, key: str, target_id: str) -> None:
        await self.store.finish_item(self.name, incident.incident_id, COMMENT_CHANGE, direction, key, target_id)

    def _log_fields(
        self, direction: str, incident: Incident, ref: TicketRef, source_id: str, target_id: str
    ) -> dict[str, str]:
        return {
            "connection": self.name,
            "direction": direction,
            "incident_id": incident.incident_id,
            "ticket_key": ref.key,
            "comment_id": source_id,
            "target_comment_id": target_id,
        }
