"""The attachment sync: copies the files one side lacks, in both directions, through a spool file.

Each file is downloaded into the connection's spool folder and uploaded
from there, so memory stays bounded whatever the file's size. The spool
file is removed whether the copy worked or not. A file the mapping's
filter keeps back is not skipped silently: the other side gets one notice
naming it. A file the connector uploaded itself (an echo) is recognised by
its author or the ledger and is never copied back.

Every upload follows the ledger protocol of the comment sync: record the
intent, look the file up on the target (by cleaned name and size) when an
earlier attempt may have landed, upload, record the target id.
"""

from __future__ import annotations

import contextlib
import logging
import mimetypes
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TypeVar

from mdr_connector.adapters.mdr.models import Attachment, Incident
from mdr_connector.connector.errors import (
    ItemError,
    OutcomeUnknownError,
    RejectedError,
    RemoteUnavailableError,
)
from mdr_connector.connector.filenames import file_extension, safe_filename, visible_name
from mdr_connector.connector.i18n import N_, Message, _
from mdr_connector.connector.mapping import (
    code_span,
    comment_visibility,
    console_link,
    escape_markdown,
    format_time,
    mdr_footer,
    parse_mdr_footer,
)
from mdr_connector.connector.mappingfile import FileFilter
from mdr_connector.connector.store import DONE, MDR_TO_TICKET, PENDING, TICKET_TO_MDR, Link, SyncedItem
from mdr_connector.connector.sync_common import SyncContext, gather_or_cancel
from mdr_connector.connector.tickets import (
    NOTICE_ORIGIN,
    AttachmentUpload,
    CommentDraft,
    SyncMarker,
    TicketAttachment,
    TicketRef,
    system_title,
)

log = logging.getLogger(__name__)

ATTACHMENT = "attachment"
# Notices get their own ledger kind: their target ids are comment ids, which
# Jira numbers from the same kind of sequence as attachment ids.
ATTACHMENT_NOTICE = "attachment_notice"
SPOOL_PREFIX = "attachment-"
# How long the ticket system's attachment limit is reused before it is read again.
LIMIT_CACHE_TIME = timedelta(minutes=10)
# Failures of one file's transfer that must not stop the other files.
TRANSFER_ERRORS = (ItemError, RemoteUnavailableError, OutcomeUnknownError)
HTTP_CONTENT_TOO_LARGE = 413

T = TypeVar("T")


class AttachmentSync:
    """Mirrors the attachments of one connection's incidents and tickets in both directions."""

    label = "attachments"

    def __init__(self, context: SyncContext) -> None:
        self.context = context
        self.name = context.name
        self._ticket_limit: int | None = None
        self._ticket_limit_read_at: datetime | None = None
        self._spool_ready = False

    async def sync(self, incident: Incident, link: Link, ref: TicketRef) -> None:
        """Copy the attachments missing on either side, and post a notice for each filtered one.

        A file with a notice stays kept back, even when the mapping later lets
        it through, so the other side never gets both a notice and the file.
        A file that fails (too large for the target, cut short, a lost
        reply) does not stop the others: the rest are copied first, then one
        ItemError parks the incident so the failed ones are tried again.
        """
        if not self.context.mapping.attachments.enabled:
            return

        mdr_page, ticket_files = await gather_or_cancel(
            self.context.read(lambda: self.context.mdr.list_attachments(incident.incident_id)),
            self.context.read(lambda: self.context.tickets.list_attachments(ref)),
        )
        # A list that names a file twice would otherwise get it copied twice,
        # because the ledger sets below are read once per reconciliation.
        mdr_files = _first_of_each(mdr_page.items, lambda attachment: attachment.attachment_id)
        ticket_files = _first_of_each(ticket_files, lambda attachment: attachment.id)
        if not mdr_files and not ticket_files and not mdr_page.malformed:
            # Both directions only go through the files, so the ledger need not be read.
            return
        rows = await self.context.store.get_items_of_kinds(self.name, incident.incident_id, (ATTACHMENT, ATTACHMENT_NOTICE))
        items, notices = rows[ATTACHMENT], rows[ATTACHMENT_NOTICE]
        failed = [f"attachment {record.record_id or '<without id>'}: {record.error}" for record in mdr_page.malformed]

        failed += await self.sync_mdr_to_ticket(incident, ref, mdr_files, ticket_files, items, notices)
        failed += await self.sync_ticket_to_mdr(incident, ref, mdr_files, ticket_files, items, notices)
        if failed:
            raise ItemError(
                f"{len(failed)} attachment(s) of incident {incident.incident_id} failed: {'; '.join(failed)}"
            )

    # MDR to ticket

    async def sync_mdr_to_ticket(
        self,
        incident: Incident,
        ref: TicketRef,
        mdr_files: list[Attachment],
        ticket_files: list[TicketAttachment],
        items: list[SyncedItem],
        notices: list[SyncedItem],
    ) -> list[str]:
        """Copy the MDR attachments missing on the ticket and return the failures of single files."""
        ledger = _DirectionLedger.build(items, notices, MDR_TO_TICKET)
        failed: list[str] = []

        for attachment in sorted(mdr_files, key=lambda a: a.creation_time):
            source_id = attachment.attachment_id
            if source_id in ledger.done or source_id in ledger.noticed:
                continue
            if self._is_mdr_echo(attachment, ledger.written_by_us):
                continue

            filename = safe_filename(attachment.full_name)
            try:
                # A notice that may have landed is looked up first, because a
                # notice on the ticket keeps its file back even when the filter
                # now lets the file through.
                if source_id in ledger.notice_pending and await self._found_ticket_notice(incident, ref, source_id):
                    continue
                if source_id in ledger.pending:
                    landed = self._find_on_ticket(filename, attachment.file_size, ticket_files, ledger.claimed)
                    if landed is not None:
                        ledger.claimed.add(landed.id)
                        await self._record_found(incident, ref, MDR_TO_TICKET, source_id, landed.id)
                        continue

                limit = await self._read_ticket_limit()
                reason = self._reason_kept_from_ticket(filename, attachment.file_size, limit)
                if reason is None:
                    max_bytes = self.context.mapping.attachments.to_ticket.max_bytes
                    if limit is not None:
                        max_bytes = min(max_bytes, limit)
                    reason = await self._copy_to_ticket(incident, ref, attachment, filename, max_bytes)
                if reason is not None:
                    await self._notify_ticket(incident, ref, attachment, filename, reason)
            except TRANSFER_ERRORS as err:
                failed.append(f"MDR attachment {source_id}: {err}")
        return failed

    def _is_mdr_echo(self, attachment: Attachment, written_by_us: set[str]) -> bool:
        """Tell whether an MDR attachment was uploaded by this connector."""
        if attachment.author_name == self.context.settings.mdr.connection_name:
            reason = "author"
        elif attachment.attachment_id in written_by_us:
            reason = "ledger"
        else:
            return False
        self._count_echo(f"mdr-attachment:{attachment.attachment_id}", reason)
        return True

    def _reason_kept_from_ticket(self, filename: str, size: int, limit: int | None) -> Message | None:
        """Return why a file may not go to the ticket, or None when it may. `limit` is the ticket system's limit."""
        reason = filter_reason(filename, size, self.context.mapping.attachments.to_ticket, "to_ticket")
        if reason is not None:
            return reason

        system = system_title(self.context.tickets.system)
        if limit is None:
            return Message(N_("attachments are turned off in {system}"), system=system)
        if size > limit:
            return Message(
                N_("it is larger than the attachment limit of {system}, which is {limit}"),
                system=system,
                limit=format_size(limit),
            )
        return None

    async def _read_ticket_limit(self) -> int | None:
        """Return the ticket system's attachment limit, read again after LIMIT_CACHE_TIME."""
        now = self.context.clock()
        if self._ticket_limit_read_at is not None and now - self._ticket_limit_read_at < LIMIT_CACHE_TIME:
            return self._ticket_limit

        self._ticket_limit = await self.context.read(lambda: self.context.tickets.attachment_limit())
        self._ticket_limit_read_at = now
        return self._ticket_limit

    def _find_on_ticket(
        self, filename: str, size: int, ticket_files: list[TicketAttachment], claimed: set[str]
    ) -> TicketAttachment | None:
        """Find the copy an earlier upload with a lost reply left: same name and size, by the connector's account."""
        own_account = self.context.own_account
        assert own_account is not None
        for candidate in ticket_files:
            if candidate.id in claimed or candidate.author.id != own_account.id:
                continue
            if safe_filename(candidate.filename) == filename and candidate.size == size:
                return candidate
        return None

    async def _copy_to_ticket(
        self, incident: Incident, ref: TicketRef, attachment: Attachment, filename: str, max_bytes: int
    ) -> Message | None:
        """Copy one MDR file to the ticket; return why not when the ticket system rejects it as too large."""
        async with self._spool_file(attachment.file_size) as path:
            size = await self.context.read(
                lambda: self.context.mdr.download_attachment(attachment, path, max_bytes=max_bytes)
            )
            if size != attachment.file_size:
                raise RemoteUnavailableError(
                    f"MDR sent {size} bytes for attachment {attachment.attachment_id}, which lists "
                    f"{attachment.file_size}; it is downloaded again on the next try"
                )

            upload = AttachmentUpload(filename=filename, path=path, size=size, content_type=_content_type(filename))
            await self.context.store.start_item(self.name, incident.incident_id, ATTACHMENT, MDR_TO_TICKET, attachment.attachment_id)
            try:
                landed = await self.context.tickets.upload_attachment(ref, upload)
            except RejectedError as err:
                if err.status != HTTP_CONTENT_TOO_LARGE:
                    raise
                return Message(
                    N_("{system} rejected it as too large (HTTP 413)"), system=system_title(self.context.tickets.system)
                )

        await self._finish(incident, ATTACHMENT, MDR_TO_TICKET, attachment.attachment_id, landed.id)
        self.context.stats.attachments_to_ticket += 1
        self._log_mirrored(MDR_TO_TICKET, incident, ref, attachment.attachment_id, landed.id, size, attachment.full_name, filename)
        return None

    async def _found_ticket_notice(self, incident: Incident, ref: TicketRef, source_id: str) -> bool:
        """Record the ticket notice an earlier post left without a reply; tell whether there was one.

        Only a comment of the connector's own account counts, because anyone
        who may edit a comment can also give it the connector's marker.
        """
        own_account = self.context.own_account
        assert own_account is not None
        marker = SyncMarker(origin=NOTICE_ORIGIN, source_id=f"attachment:{source_id}")
        comments = await self.context.read(lambda: self.context.tickets.list_comments(ref))
        landed = next(
            (comment for comment in comments if comment.marker == marker and comment.author.id == own_account.id), None
        )
        if landed is None:
            return False
        await self._finish(incident, ATTACHMENT_NOTICE, MDR_TO_TICKET, source_id, landed.id)
        return True

    async def _notify_ticket(
        self, incident: Incident, ref: TicketRef, attachment: Attachment, filename: str, reason: Message
    ) -> None:
        """Post the one ticket comment that names an MDR attachment the filter keeps back."""
        marker = SyncMarker(origin=NOTICE_ORIGIN, source_id=f"attachment:{attachment.attachment_id}")
        link = console_link(self.context.settings.mdr.console_url, incident.incident_id)
        created = datetime.fromtimestamp(attachment.creation_time / 1000, tz=timezone.utc)
        author = escape_markdown(attachment.author_name) if attachment.author_name else _("an unknown author")
        body = _(
            "Attachment {file_name}, {size}, added by {author} in Kaspersky MDR on {created}, "
            "was not copied here: {reason}. Open it in the MDR console: {link}"
        ).format(
            file_name=code_span(filename),
            size=format_size(attachment.file_size),
            author=author,
            created=format_time(created),
            reason=reason,
            link=link,
        )
        draft = CommentDraft(body=body, marker=marker, visibility=comment_visibility(self.context.mapping))
        await self.context.store.start_item(
            self.name, incident.incident_id, ATTACHMENT_NOTICE, MDR_TO_TICKET, attachment.attachment_id
        )
        posted = await self.context.tickets.add_comment(ref, draft)
        await self._finish(incident, ATTACHMENT_NOTICE, MDR_TO_TICKET, attachment.attachment_id, posted.id)
        self.context.stats.attachments_filtered += 1
        self._log_filtered(MDR_TO_TICKET, incident, ref, attachment.attachment_id, attachment.file_size, reason, posted.id)


    # Ticket to MDR

    async def sync_ticket_to_mdr(
        self,
        incident: Incident,
        ref: TicketRef,
        mdr_files: list[Attachment],
        ticket_files: list[TicketAttachment],
        items: list[SyncedItem],
        notices: list[SyncedItem],
    ) -> list[str]:
        """Copy the ticket attachments missing in MDR and return the failures of single files."""
        ledger = _DirectionLedger.build(items, notices, TICKET_TO_MDR)
        failed: list[str] = []

        for attachment in sorted(ticket_files, key=lambda a: a.created):
            if attachment.id in ledger.done or attachment.id in ledger.noticed:
                continue
            if self._is_ticket_echo(attachment, ledger.written_by_us):
                continue

            filename = safe_filename(attachment.filename)
            try:
                if attachment.id in ledger.notice_pending and await self._found_mdr_notice(incident, attachment.id):
                    continue
                if attachment.id in ledger.pending:
                    landed = self._find_in_mdr(filename, attachment.size, mdr_files, ledger.claimed)
                    if landed is not None:
                        ledger.claimed.add(landed.attachment_id)
                        await self._record_found(incident, ref, TICKET_TO_MDR, attachment.id, landed.attachment_id)
                        continue

                reason = filter_reason(filename, attachment.size, self.context.mapping.attachments.to_mdr, "to_mdr")
                if reason is None:
                    reason = await self._copy_to_mdr(incident, ref, attachment, filename)
                if reason is not None:
                    await self._notify_mdr(incident, ref, attachment, filename, reason)
            except TRANSFER_ERRORS as err:
                failed.append(f"{self.context.tickets.system} attachment {attachment.id}: {err}")
        return failed

    def _is_ticket_echo(self, attachment: TicketAttachment, written_by_us: set[str]) -> bool:
        """Tell whether a ticket attachment was uploaded by this connector."""
        own_account = self.context.own_account
        assert own_account is not None
        if attachment.author.id == own_account.id:
            reason = "author"
        elif attachment.id in written_by_us:
            reason = "ledger"
        else:
            return False
        self._count_echo(f"ticket-attachment:{attachment.id}", reason)
        return True

    def _find_in_mdr(
        self, filename: str, size: int, mdr_files: list[Attachment], claimed: set[str]
    ) -> Attachment | None:
        """Find the copy an earlier upload with a lost reply left: same name and size, by the connector's token."""
        connection_name = self.context.settings.mdr.connection_name
        for candidate in mdr_files:
            if candidate.attachment_id in claimed or candidate.author_name != connection_name:
                continue
            if safe_filename(candidate.full_name) == filename and candidate.file_size == size:
                return candidate
        return None

    async def _copy_to_mdr(
        self, incident: Incident, ref: TicketRef, attachment: TicketAttachment, filename: str
    ) -> Message | None:
        """Copy one ticket file to MDR; return why not when MDR rejects it as too large."""
        system = self.context.tickets.system
        async with self._spool_file(attachment.size) as path:
            size = await self.context.read(lambda: self.context.tickets.download_attachment(attachment, path))
            if size != attachment.size:
                raise RemoteUnavailableError(
                    f"{system} sent {size} bytes for attachment {attachment.id}, which lists {attachment.size}; "
                    "it is downloaded again on the next try"
                )

            caption = f"{attachment.author.display_name} ({system_title(system)} {ref.key})"
            if filename != attachment.filename:
                caption = _("{author} ({system} {ticket_key}), original name: {original_name}").format(
                    author=attachment.author.display_name,
                    system=system_title(system),
                    ticket_key=ref.key,
                    original_name=visible_name(attachment.filename),
                )
            await self.context.store.start_item(self.name, incident.incident_id, ATTACHMENT, TICKET_TO_MDR, attachment.id)
            try:
                landed = await self.context.mdr.upload_attachment(incident.incident_id, path, filename, caption)
            except RejectedError as err:
                # NOTE: MDR documents no upload limit, so the 413 reply is the only sign of one.
                if err.status != HTTP_CONTENT_TOO_LARGE:
                    raise
                return Message(N_("MDR rejected it as too large (HTTP 413)"))

        await self._finish(incident, ATTACHMENT, TICKET_TO_MDR, attachment.id, landed.attachment_id)
        self.context.stats.attachments_to_mdr += 1
        self._log_mirrored(TICKET_TO_MDR, incident, ref, attachment.id, landed.attachment_id, size, attachment.filename, filename)
        return None

    async def _found_mdr_notice(self, incident: Incident, source_id: str) -> bool:
        """Record the MDR notice an earlier post left without a reply; tell whether there was one.

        Only a comment written with the connector's token counts, so a SOC
        comment that quotes the footer is not taken for the notice.
        """
        connection_name = self.context.settings.mdr.connection_name
        page = await self.context.read(lambda: self.context.mdr.list_comments(incident.incident_id))
        landed = next(
            (
                comment
                for comment in page.items
                if comment.author_name == connection_name and _footer_source(comment.text) == f"attachment:{source_id}"
            ),
            None,
        )
        if landed is None:
            return False
        await self._finish(incident, ATTACHMENT_NOTICE, TICKET_TO_MDR, source_id, landed.comment_id)
        return True

    async def _notify_mdr(
        self, incident: Incident, ref: TicketRef, attachment: TicketAttachment, filename: str, reason: Message
    ) -> None:
        """Post the one MDR comment that names a ticket attachment the filter keeps back.

        The comment ends in the connector's footer and is written with the
        connector's token, so the comment sync takes it for an echo and
        never copies it to the ticket.
        """
        source_id = f"attachment:{attachment.id}"
        system = self.context.tickets.system
        notice = _(
            "Attachment {file_name}, {size}, added by {author} in {system} {ticket_key} on {created}, "
            "was not copied to MDR: {reason}. Open it on the ticket: {url}"
        ).format(
            file_name=code_span(filename),
            size=format_size(attachment.size),
            author=escape_markdown(attachment.author.display_name),
            system=system_title(system),
            ticket_key=ref.key,
            created=format_time(attachment.created),
            reason=reason,
            url=ref.url,
        )
        text = f"{notice}\n\n{mdr_footer(system, source_id)}"
        await self.context.store.start_item(self.name, incident.incident_id, ATTACHMENT_NOTICE, TICKET_TO_MDR, attachment.id)
        posted = await self.context.mdr.create_comment(incident.incident_id, text, markdown_to_html=True)
        await self._finish(incident, ATTACHMENT_NOTICE, TICKET_TO_MDR, attachment.id, posted.comment_id)
        self.context.stats.attachments_filtered += 1
        self._log_filtered(TICKET_TO_MDR, incident, ref, attachment.id, attachment.size, reason, posted.comment_id)

    # Spool

    @contextlib.asynccontextmanager
    async def _spool_file(self, expected_size: int) -> AsyncIterator[Path]:
        """Yield a fresh path in the spool folder and remove the file there afterwards, whatever happened."""
        spool = self._prepare_spool()
        try:
            free = shutil.disk_usage(spool).free
        except OSError as err:
            raise ItemError(f"cannot read the free space of the spool folder {spool}: {err.strerror or err}") from err
        if expected_size > free:
            raise ItemError(
                f"the spool folder {spool} has {format_size(free).english()} free, too little for a file of "
                f"{format_size(expected_size).english()}; free disk space there or lower attachments max_bytes "
                "in the mapping"
            )

        path = spool / f"{SPOOL_PREFIX}{uuid.uuid4().hex}"
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)

    def _prepare_spool(self) -> Path:
        """Create the spool folder (owner only) on first use and remove the files an earlier process left there.

        The folder belongs to one connection, which one process works at a
        time, so on first use every file in it is a leftover of a crash: a
        spool file or a client's partial download. A folder removed or
        replaced while the process runs is prepared again on the next use.
        """
        spool = self.context.spool_dir
        if self._spool_ready and spool.is_dir() and not spool.is_symlink():
            return spool

        try:
            spool.mkdir(mode=0o700, parents=True, exist_ok=True)
            if spool.is_symlink() or not spool.is_dir():
                raise ItemError(f"the spool path {spool} is not a folder; remove it or set another data_dir")
            os.chmod(spool, 0o700)
            for leftover in spool.iterdir():
                if leftover.is_symlink() or leftover.is_file():
                    leftover.unlink(missing_ok=True)
                    log.info("sync.attachment.spool_leftover_removed", extra={"connection": self.name, "path": str(leftover)})
        except OSError as err:
            raise ItemError(
                f"cannot prepare the spool folder {spool}: {err.strerror or err}; "
                "check that the connector's user owns data_dir and can write to it"
            ) from err
        self._spool_ready = True
        return spool

    # Ledger and logs

    async def _record_found(self, incident: Incident, ref: TicketRef, direction: str, source_id: str, target_id: str) -> None:
        await self._finish(incident, ATTACHMENT, direction, source_id, target_id)
        log.info(
            "sync.attachment.found",
            extra={**self._log_fields(direction, incident, ref, source_id), "target_attachment_id": target_id},
        )

    async def _finish(self, incident: Incident, kind: str, direction: str, source_id: str, target_id: str) -> None:
        await self.context.store.finish_item(self.name, incident.incident_id, kind, direction, source_id, target_id)

    def _count_echo(self, key: str, reason: str) -> None:
        if key in self.context.stats.echoes_suppressed:
            return
        self.context.stats.echoes_suppressed.add(key)
        log.debug("sync.echo.suppressed", extra={"connection": self.name, "item": key, "reason": reason})

    def _log_fields(self, direction: str, incident: Incident, ref: TicketRef, source_id: str) -> dict[str, object]:
        return {
            "connection": self.name,
            "direction": direction,
            "incident_id": incident.incident_id,
            "ticket_key": ref.key,
            "attachment_id": source_id,
        }

    def _log_mirrored(
        self,
        direction: str,
        incident: Incident,
        ref: TicketRef,
        source_id: str,
        target_id: str,
        size: int,
        original_name: str,
        filename: str,
    ) -> None:
        fields: dict[str, object] = {
            **self._log_fields(direction, incident, ref, source_id),
            "target_attachment_id": target_id,
            "bytes": size,
            "file_name": filename,
        }
        if original_name != filename:
            fields["original_file_name"] = visible_name(original_name)
        log.info("sync.attachment.mirrored", extra=fields)

    def _log_filtered(
        self,
        direction: str,
        incident: Incident,
        ref: TicketRef,
        source_id: str,
        size: int,
        reason: Message,
        notice_id: str,
    ) -> None:
        log.info(
            "sync.attachment.filtered",
            extra={
                **self._log_fields(direction, incident, ref, source_id),
                "bytes": size,
                "reason": reason.english(),
                "notice_comment_id": notice_id,
            },
        )


def filter_reason(filename: str, size: int, rules: FileFilter, direction_key: str) -> Message | None:
    """Return why the mapping's filter for one direction keeps a file back, or None when it may go.

    `direction_key` is `to_ticket` or `to_mdr`, for naming the setting in the reason.
    """
    extension = file_extension(filename)
    setting = f"attachments.{direction_key}"
    if extension in rules.deny_extensions:
        return Message(
            N_("files with the extension .{extension} are not copied ({setting}.deny_extensions)"),
            extension=extension,
            setting=setting,
        )
    if rules.allow_extensions and extension not in rules.allow_extensions:
        allowed = ", ".join(f".{name}" for name in rules.allow_extensions)
        if not extension:
            return Message(
                N_("it has no extension, and only {allowed} files are copied ({setting}.allow_extensions)"),
                allowed=allowed,
                setting=setting,
            )
        return Message(
            N_("it has the extension .{extension}, and only {allowed} files are copied ({setting}.allow_extensions)"),
            extension=extension,
            allowed=allowed,
            setting=setting,
        )
    if size > rules.max_bytes:
        return Message(
            N_("it is larger than the limit of {limit} ({setting}.max_bytes)"),
            limit=format_size(rules.max_bytes),
            setting=setting,
        )
    return None


SIZE_UNITS = (N_("KiB"), N_("MiB"), N_("GiB"), N_("TiB"))


def format_size(size: int) -> Message:
    """Render a byte count for people, in the language it is shown in: `512 bytes`, `1.5 MiB (1572864 bytes)`."""
    if size < 1024:
        return Message(N_("{count} bytes"), count=size)
    value = size / 1024
    unit = SIZE_UNITS[0]
    for larger in SIZE_UNITS[1:]:
        if value < 1024:
            break
        value /= 1024
        unit = larger
    return Message(N_("{value} {unit} ({count} bytes)"), value=f"{value:.1f}", unit=Message(unit), count=size)


def _content_type(filename: str) -> str:
    guessed, _encoding = mimetypes.guess_type(filename, strict=False)
    return guessed or "application/octet-stream"


def _footer_source(text: str) -> str | None:
    marker = parse_mdr_footer(text)
    return marker.source_id if marker is not None else None


def _first_of_each(records: Iterable[T], key: Callable[[T], str]) -> list[T]:
    """Return `records` in order without the later ones whose key was seen before."""
    first: dict[str, T] = {}
    for record in records:
        first.setdefault(key(record), record)
    return list(first.values())


@dataclass
class _DirectionLedger:
    """The ledger rows of one direction of one incident's attachments, as sets of ids."""

    done: set[str]
    pending: set[str]
    # Targets of the other direction: the connector's own uploads on this direction's source side.
    written_by_us: set[str]
    # Targets already recorded for a source, so one file on the target is never taken for two.
    claimed: set[str]
    noticed: set[str]
    notice_pending: set[str]

    @classmethod
    def build(cls, items: list[SyncedItem], notices: list[SyncedItem], direction: str) -> _DirectionLedger:
        other = TICKET_TO_MDR if direction == MDR_TO_TICKET else MDR_TO_TICKET
        return cls(
            done=_sources(items, direction, DONE),
            pending=_sources(items, direction, PENDING),
            written_by_us=_targets(items, other),
            claimed=_targets(items, direction),
            noticed=_sources(notices, direction, DONE),
            notice_pending=_sources(notices, direction, PENDING),
        )


def _sources(items: Iterable[SyncedItem], direction: str, state: str) -> set[str]:
    return {item.source_id for item in items if item.direction == direction and item.state == state}


def _targets(items: Iterable[SyncedItem], direction: str) -> set[str]:
    return {item.target_id for item in items if item.direction == direction and item.target_id}
