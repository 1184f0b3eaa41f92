"""MDR responses (remediation actions) on the ticket, and their confirm or decline.

Each MDR response is shown as one ticket comment that the connector owns
and edits when the response's status changes. People on the allow-list of
the mapping (`responses.approvers`, `responses.approver_groups`) confirm or
decline a response with a comment command such as
`/mdr confirm MDR_... the host may be isolated`. Every decision is recorded
in the audit table before it is sent to MDR, and echoed on the ticket.

The same decision path serves `mdr-connector responses confirm|decline`
(`decide_from_terminal`), with `cli:<OS user>` as the actor.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from mdr_connector.adapters.mdr.models import Incident, Response
from mdr_connector.connector.errors import ConnectorError, ItemError, RejectedError
from mdr_connector.connector import i18n
from mdr_connector.connector.i18n import N_, Message, _
from mdr_connector.connector.mapping import code_span, comment_visibility, escape_markdown, format_ms
from mdr_connector.connector.mappingfile import Mapping
from mdr_connector.connector.store import (
    DONE,
    LINKED,
    MDR_TO_TICKET,
    TICKET_TO_MDR,
    Link,
    ResponseDecision,
    Store,
    SyncedItem,
)
from mdr_connector.connector.sync_common import MdrApi, ResponsePageLike, SyncContext, gather_or_cancel
from mdr_connector.connector.tickets import (
    NOTICE_ORIGIN,
    RESPONSE_ORIGIN,
    CommentDraft,
    SyncMarker,
    TicketAccount,
    TicketAdapter,
    TicketComment,
    TicketRef,
    system_title,
)

log = logging.getLogger(__name__)

# Ledger kinds: the comment that shows a response, a ticket comment read as
# a command, and the ticket echo of a decision made at the terminal.
RESPONSE = "response"
COMMAND = "command"
NOTICE = "notice"

# Only a response in this status can be confirmed or declined.
# NOTE: the wire value is INFERRED from the MDR console, which labels the
# initial status "New".
INITIAL_STATUS = "New"
CONFIRM = "confirm"
DECLINE = "decline"
DECISION_STATUSES = {CONFIRM: "Confirmed", DECLINE: "Declined"}

# Outcomes of the audit record (store.ResponseDecision.outcome).
PENDING_OUTCOME = "pending"
SENT = "sent"
REFUSED = "refused"
FAILED = "failed"

TICKET_SOURCE = "ticket"
CLI_SOURCE = "cli"

# The reason goes into the MDR comment of the response.
# NOTE: MDR's limit on that comment is unknown, so 2000 characters is a
# guess well below any plausible one.
MAX_REASON_CHARACTERS = 2000
# The ledger's source_version column has 64 characters.
MAX_STATUS_IN_VERSION = 40
MAX_PARAMETERS_SHOWN = 30
MAX_PARAMETER_CHARACTERS = 300

TERMINAL_NOT_FOUND = N_(
    "response {response_id} is not a response of MDR incident {incident_id}; "
    "list them with `mdr-connector responses list --incident={incident_id}`"
)
TERMINAL_WRONG_STATUS = N_(
    "response {response_id} is {status}, and only a response in status {initial} can be confirmed or declined"
)
TERMINAL_MALFORMED = N_("MDR returned malformed responses for incident {incident_id}: {errors}")
TERMINAL_REJECTED = N_("MDR rejected the decision on {response_ids}: {error}")

# Texts on the ticket that differ by decision, because the decision is a
# verb or a noun there that translations inflect.
ECHO_TEMPLATES = {
    CONFIRM: N_("**mdr-connector:** response {response_id} is **confirmed** in Kaspersky MDR by {decided_by}."),
    DECLINE: N_("**mdr-connector:** response {response_id} is **declined** in Kaspersky MDR by {decided_by}."),
}
MDR_REJECTED_TEMPLATES = {
    CONFIRM: N_("Kaspersky MDR rejected the confirm of response {response_id}: {error}."),
    DECLINE: N_("Kaspersky MDR rejected the decline of response {response_id}: {error}."),
}
NOT_DECIDABLE_TEMPLATES = {
    CONFIRM: N_("Response {response_id} is {status}, so it could not be confirmed."),
    DECLINE: N_("Response {response_id} is {status}, so it could not be declined."),
}
NOT_LISTED_TEMPLATES = {
    CONFIRM: N_("Response {response_id} is no longer listed in MDR, so it could not be confirmed."),
    DECLINE: N_("Response {response_id} is no longer listed in MDR, so it could not be declined."),
}


class CommandSyntaxError(ValueError):
    """A comment that starts with the command word but is not a valid command."""


@dataclass(frozen=True)
class Command:
    """A confirm or decline command read from a ticket comment."""

    decision: str
    response_id: str
    reason: str


def looks_like_command(body: str, command: str) -> bool:
    """Tell whether a comment starts with the command word, such as `/mdr`."""
    words = body.split(maxsplit=1)
    return bool(words) and _plain_token(words[0]).lower() == command.lower()


def parse_command(body: str, command: str) -> Command:
    """Read `<command> confirm|decline <response_id> <reason...>` from a comment's Markdown body.

    Raises CommandSyntaxError naming what is missing. The reason may span
    several lines, and its whitespace is collapsed to single spaces.
    """
    words = body.split(maxsplit=3)
    if not words or _plain_token(words[0]).lower() != command.lower():
        raise CommandSyntaxError(_("the comment does not start with {command}").format(command=command))
    if len(words) < 2 or _plain_token(words[1]).lower() not in DECISION_STATUSES:
        raise CommandSyntaxError(_("{command} must be followed by confirm or decline").format(command=command))
    if len(words) < 3:
        raise CommandSyntaxError(_("the response id is missing"))
    reason = _plain_reason(words[3]) if len(words) == 4 else ""
    if not reason:
        raise CommandSyntaxError(_("the reason is missing"))
    if len(reason) > MAX_REASON_CHARACTERS:
        raise CommandSyntaxError(
            _("the reason is longer than {limit} characters").format(limit=MAX_REASON_CHARACTERS)
        )
    return Command(
        decision=_plain_token(words[1]).lower(),
        response_id=_plain_token(words[2]),
        reason=reason,
    )


def _plain_token(word: str) -> str:
    """Drop the code-span backticks and Markdown backslash escapes that a ticket's markup may add to a word."""
    return re.sub(r"\\(.)", r"\1", word.strip("`"))


def _plain_reason(text: str) -> str:
    # A Markdown hard line break is a backslash before the newline.
    lines = [line.rstrip().removesuffix("\\") for line in text.strip().strip("`").splitlines()]
    return " ".join(" ".join(lines).split())


def response_version(response: Response) -> str:
    """Return the ledger version of a response view: its status and update time."""
    return f"{response.status[:MAX_STATUS_IN_VERSION]}@{response.update_time}"


def view_marker_id(response_id: str, version: str) -> str:
    """Return the marker id of one version's view, for ticket systems whose comments cannot be edited."""
    digest = hashlib.sha256(version.encode("utf-8")).hexdigest()[:12]
    return f"{response_id}.{digest}"


def is_edited(comment: TicketComment) -> bool:
    """Tell whether a ticket comment was changed after it was created."""
    return comment.updated is not None and comment.updated > comment.created


def host_names_by_asset(incident: Incident) -> dict[str, str]:
    """Map asset ids to host names, from the incident's `HOSTNAME:asset_id` entries."""
    names: dict[str, str] = {}
    for entry in incident.affected_hosts:
        host, _separator, asset_id = entry.partition(":")
        if asset_id:
            names.setdefault(asset_id, host)
    return names


# Rendering: every value from MDR or the ticket is untrusted and escaped.


def describe_asset(response: Response, host_names: dict[str, str]) -> str:
    if not response.asset_id:
        return _("none")
    host = host_names.get(response.asset_id)
    if host:
        return _("{host} (asset {asset_id})").format(host=code_span(host), asset_id=code_span(response.asset_id))
    return _("asset {asset_id}").format(asset_id=code_span(response.asset_id))


def describe_parameters(parameters: dict[str, Any] | None) -> str:
    if not parameters:
        return " " + _("none")
    lines = []
    for name, value in list(parameters.items())[:MAX_PARAMETERS_SHOWN]:
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        if len(text) > MAX_PARAMETER_CHARACTERS:
            text = text[:MAX_PARAMETER_CHARACTERS] + "…"
        lines.append(f"\n  - {code_span(str(name))}: {code_span(text)}")
    if len(parameters) > MAX_PARAMETERS_SHOWN:
        more = _("… {count} more in the MDR console").format(count=len(parameters) - MAX_PARAMETERS_SHOWN)
        lines.append(f"\n  - {more}")
    return "".join(lines)


def render_response(response: Response, host_names: dict[str, str], command: str) -> str:
    """Render the Markdown of the ticket comment that shows one MDR response."""
    kind = code_span(response.type) if response.type else _("unknown type")
    status = escape_markdown(response.status) if response.status else _("unknown")
    lines = [
        _("**Kaspersky MDR response** {kind}: status **{status}**").format(kind=kind, status=status),
        "",
        _("- Response id: {response_id}").format(response_id=code_span(response.response_id)),
        _("- Asset: {asset}").format(asset=describe_asset(response, host_names)),
        _("- Parameters:{parameters}").format(parameters=describe_parameters(response.parameters)),
        _("- Analyst's description: {description}").format(
            description=escape_markdown(response.description) or _("none")
        ),
    ]
    if response.comment:
        lines.append(_("- MDR comment: {comment}").format(comment=escape_markdown(response.comment)))
    if response.creation_time:
        lines.append(_("- Proposed: {time}").format(time=format_ms(response.creation_time)))
    if response.update_time and response.update_time != response.creation_time:
        lines.append(_("- Last change: {time}").format(time=format_ms(response.update_time)))
    lines.append("")
    if response.status == INITIAL_STATUS:
        # The command lines stay English, because the connector parses them.
        lines += [
            _("To confirm or decline it, add a new comment with one of these lines, followed by your reason:"),
            "",
            f"- {code_span(f'{command} confirm {response.response_id} REASON')}",
            f"- {code_span(f'{command} decline {response.response_id} REASON')}",
            "",
            _("Only the accounts and groups on the connector's allow-list may decide."),
        ]
    else:
        lines.append(_("This response is {status} and can no longer be decided.").format(status=status))
    return "\n".join(lines)


def render_echo(decision: ResponseDecision, *, quote_reason: bool = True) -> str:
    """Render the ticket comment that reports a decision sent to MDR.

    The reason of a command written in a restricted comment is not quoted,
    because the echo may be readable by more people than the command.
    """
    actor = escape_markdown(decision.actor_name)
    actor_id = code_span(decision.actor_id)
    if decision.source == TICKET_SOURCE:
        decided_by = f"{actor} ({actor_id})"
    else:
        decided_by = _("{actor} ({actor_id}) with the mdr-connector command line").format(
            actor=actor, actor_id=actor_id
        )
    reason = (
        escape_markdown(decision.reason)
        if quote_reason
        else _("not quoted here, because the command was written in a restricted comment.")
    )
    headline = _(ECHO_TEMPLATES[decision.decision]).format(
        response_id=code_span(decision.response_id), decided_by=decided_by
    )
    return f"{headline}\n\n" + _("Reason: {reason}").format(reason=reason)


def carries_comment(response: Response, sent: str) -> bool:
    """Tell whether a response's MDR comment is the one a decision sends, so the decision is what changed its status.

    A response in the decided status whose comment differs was decided by
    someone else, such as MDR's automatic decline on timeout.
    NOTE: that MDR keeps the comment as sent is INFERRED; the check allows
    HTML escaping and changed whitespace.
    """
    def plain(text: str) -> str:
        return " ".join(html.unescape(text).split())

    return plain(sent) in plain(response.comment or "")


def render_refusal(message: str | Message) -> str:
    """Render the ticket reply to a command that the connector did not carry out."""
    return _("**mdr-connector:** {message} Nothing was sent to Kaspersky MDR.").format(message=message)


def mdr_comment(decision: ResponseDecision, system: str, ticket_key: str, *, restricted: bool = False) -> str:
    """Return the comment sent to MDR with a decision: the reason and who decided where.

    The reason of a command written in a restricted ticket comment stays on
    the ticket: MDR shows the comment in the response, and the response's
    view on the ticket may be readable by more people than the command.
    """
    if decision.source == CLI_SOURCE:
        return _("{reason} (by {actor_id} with the mdr-connector command line)").format(
            reason=decision.reason, actor_id=decision.actor_id
        )
    where = _("{actor} {actor_id} in {system} {ticket_key}").format(
        actor=decision.actor_name, actor_id=decision.actor_id, system=system_title(system), ticket_key=ticket_key
    )
    if restricted:
        return _("Decided by {decided_by}; the reason is in a restricted comment there.").format(decided_by=where)
    return _("{reason} (by {decided_by})").format(reason=decision.reason, decided_by=where)


def carries_decision(
    response: Response, decision: ResponseDecision, system: str, ticket_key: str, *, restricted: bool = False
) -> bool:
    """Tell whether a response carries the MDR comment of a decision, in any language the connector writes.

    A decision sent before the connector's language was switched carries
    the comment in the earlier language.
    """
    sent = i18n.in_each_language(lambda: mdr_comment(decision, system, ticket_key, restricted=restricted))
    return any(carries_comment(response, text) for text in sent)


def usage(command: str) -> str:
    confirm = code_span(f"{command} confirm RESPONSE_ID REASON")
    decline = code_span(f"{command} decline RESPONSE_ID REASON")
    return _("{confirm} or {decline}").format(confirm=confirm, decline=decline)


class ResponseSync:
    """The part of a reconciliation that shows MDR responses on the ticket and carries out the commands there.

    Commands are handled before the views are written, so a decision made
    in this reconciliation shows in the view at once.
    """

    label = "responses"

    def __init__(self, context: SyncContext) -> None:
        self.context = context
        self.name = context.name
        self.rules = context.mapping.responses
        self.visibility = comment_visibility(context.mapping)

    async def sync(self, incident: Incident, link: Link, ref: TicketRef) -> None:
        """Carry out new commands, then post or edit the view of every response whose status changed.

        A response or command that fails for a reason of its own does not stop
        the others; one ItemError at the end names every failure.
        """
        if not self.rules.enabled:
            return

        context = self.context
        page, ticket_comments = await gather_or_cancel(
            context.read(lambda: context.mdr.list_responses(incident.incident_id)),
            context.ticket_comments(ref),
        )
        if not page.items and not page.malformed and all(self._written_by_connector(comment) for comment in ticket_comments):
            # No response to show and no comment that could be a command, so the ledger need not be read.
            return
        failed = [f"response {record.record_id or '<without id>'}: {record.error}" for record in page.malformed]
        responses = {response.response_id: response for response in page.items}

        unreadable = {record.record_id for record in page.malformed}
        sent, command_failures = await self._run_commands(incident, ref, responses, unreadable, ticket_comments)
        failed += command_failures
        if sent:
            page = await context.read(lambda: context.mdr.list_responses(incident.incident_id))

        failed += await self._show_responses(incident, ref, page.items, ticket_comments)
        if failed:
            raise ItemError(
                f"{len(failed)} response item(s) of incident {incident.incident_id} failed: {'; '.join(failed)}"
            )

    # The views

    async def _show_responses(
        self,
        incident: Incident,
        ref: TicketRef,
        responses: list[Response],
        ticket_comments: list[TicketComment],
    ) -> list[str]:
        """Post a view for each new response and edit the view of each changed one. Returns the failures."""
        items = {item.source_id: item for item in await self._items(incident, RESPONSE)}
        landed = self._own_marked(ref, ticket_comments, RESPONSE_ORIGIN)
        present = {comment.id for comment in ticket_comments}
        host_names = host_names_by_asset(incident)
        failed: list[str] = []

        editable = self.context.tickets.capabilities.edit_comments
        for response in sorted(responses, key=lambda r: (r.creation_time, r.response_id)):
            version = response_version(response)
            item = items.get(response.response_id)
            if item is not None and item.state == DONE and item.source_version == version:
                continue

            # A ticket system without comment edits gets one view per version,
            # each with its own marker, so a view posted before a crash is found again.
            view_id = response.response_id if editable else view_marker_id(response.response_id, version)
            landed_view = landed.get(view_id)
            target = self._view_comment_id(item, landed_view, present) if editable else None
            draft = CommentDraft(
                body=render_response(response, host_names, self.rules.command),
                marker=SyncMarker(origin=RESPONSE_ORIGIN, source_id=view_id),
                visibility=self.visibility,
            )
            try:
                if not editable and landed_view is not None:
                    await self._record_landed_view(incident, response, version, landed_view)
                    continue
                await self._write_view(incident, ref, response, version, target, draft)
            except ItemError as err:
                failed.append(f"response {response.response_id}: {err}")
        return failed

    async def _record_landed_view(self, incident: Incident, response: Response, version: str, view: TicketComment) -> None:
        """Record a view of this version that landed before a crash, without posting it again."""
        await self.context.store.finish_item(
            self.name,
            incident.incident_id,
            RESPONSE,
            MDR_TO_TICKET,
            response.response_id,
            view.id,
            source_version=version,
        )

    @staticmethod
    def _view_comment_id(item: SyncedItem | None, landed: TicketComment | None, present: set[str]) -> str | None:
        """Return the ticket comment that shows a response, or None when a new one must be posted.

        A view found by its marker without a finished ledger row landed before
        a crash, so it is edited to the current state instead of posted again.
        A view that a person deleted is posted again.
        """
        if item is not None and item.target_id and item.target_id in present:
            return item.target_id
        return landed.id if landed is not None else None

    async def _write_view(
        self,
        incident: Incident,
        ref: TicketRef,
        response: Response,
        version: str,
        target: str | None,
        draft: CommentDraft,
    ) -> None:
        context = self.context
        await context.store.start_item(self.name, incident.incident_id, RESPONSE, MDR_TO_TICKET, response.response_id)
        if target is None:
            written = await context.tickets.add_comment(ref, draft)
            event = "sync.response.shown"
        else:
            written = await context.tickets.edit_comment(ref, target, draft)
            event = "sync.response.view_updated"
        await context.store.finish_item(
            self.name,
            incident.incident_id,
            RESPONSE,
            MDR_TO_TICKET,
            response.response_id,
            written.id,
            source_version=version,
        )

        # Counts every write of a view: the first post and each edit.
        context.stats.responses_shown += 1
        log.info(
            event,
            extra={
                "connection": self.name,
                "incident_id": incident.incident_id,
                "ticket_key": ref.key,
                "response_id": response.response_id,
                "status": response.status,
                "comment_id": written.id,
            },
        )

    # The commands

    async def _run_commands(
        self,
        incident: Incident,
        ref: TicketRef,
        responses: dict[str, Response],
        unreadable: set[str | None],
        ticket_comments: list[TicketComment],
    ) -> tuple[int, list[str]]:
        """Handle each command comment not handled yet. Returns the number of decisions sent, and the failures.

        `unreadable` contains the ids of the malformed records of the response
        list (None for one without an id). A command for a response that may
        be one of them waits, instead of being refused as unknown.
        """
        items = {item.source_id: item for item in await self._items(incident, COMMAND)}
        decisions = {
            decision.source_id: decision
            for decision in await self.context.store.list_decisions(self.name, incident_id=incident.incident_id)
            if decision.source == TICKET_SOURCE and decision.source_id is not None
        }
        notices = self._own_marked(ref, ticket_comments, NOTICE_ORIGIN)
        sent = 0
        failed: list[str] = []

        for comment in sorted(ticket_comments, key=lambda c: c.created):
            item = items.get(comment.id)
            if item is not None and item.state == DONE:
                continue
            if self._written_by_connector(comment):
                continue
            # A pending row is a command whose handling was cut short: it is
            # finished even when a later edit made it look like no command.
            if item is None and not looks_like_command(comment.body, self.rules.command):
                continue
            earlier = decisions.get(comment.id)
            target = earlier.response_id if earlier is not None else self._target_of(comment)
            if unreadable and target is not None and target not in responses and (
                target in unreadable or None in unreadable
            ):
                failed.append(
                    f"{self.context.tickets.system} comment {comment.id}: response {target} is among the "
                    "malformed records MDR returned, so the command waits for a readable list"
                )
                continue

            try:
                outcome = await self._run_command(incident, ref, comment, responses, earlier, notices)
            except ItemError as err:
                failed.append(f"{self.context.tickets.system} comment {comment.id}: {err}")
                continue
            sent += outcome == SENT
        return sent, failed

    def _target_of(self, comment: TicketComment) -> str | None:
        """Return the response id a command names, or None when the comment is no well-formed command."""
        try:
            return parse_command(comment.body, self.rules.command).response_id
        except CommandSyntaxError:
            return None

    def _written_by_connector(self, comment: TicketComment) -> bool:
        own = self.context.own_account
        assert own is not None, "ConnectionSync.open() sets own_account before any reconciliation"
        return comment.author.id == own.id or comment.marker is not None

    async def _run_command(
        self,
        incident: Incident,
        ref: TicketRef,
        comment: TicketComment,
        responses: dict[str, Response],
        earlier: ResponseDecision | None,
        notices: dict[str, TicketComment],
    ) -> str:
        """Carry out or refuse one command, reply on the ticket, and mark the comment handled. Returns the outcome."""
        store = self.context.store
        await store.start_item(self.name, incident.incident_id, COMMAND, TICKET_TO_MDR, comment.id)

        if earlier is None:
            outcome, reply = await self._judge(incident, ref, comment, responses)
        else:
            outcome, reply = await self._resume(incident, ref, earlier, responses, restricted=comment.restricted)

        notice = await self._post_notice(ref, f"command:{comment.id}", reply, notices)
        await store.finish_item(
            self.name, incident.incident_id, COMMAND, TICKET_TO_MDR, comment.id, notice.id, source_version=outcome
        )
        if outcome != SENT:
            self.context.stats.commands_refused += 1
        return outcome

    async def _judge(
        self, incident: Incident, ref: TicketRef, comment: TicketComment, responses: dict[str, Response]
    ) -> tuple[str, str]:
        """Check a command seen for the first time, then send it. Returns the outcome and the reply to post."""
        if is_edited(comment):
            self._log_refused(incident, ref, comment, "edited")
            return REFUSED, render_refusal(
                _(
                    "The comment of {author} was edited before the connector read it, so the command as first "
                    "written cannot be known. Write the command in a new comment: {usage}."
                ).format(author=escape_markdown(comment.author.display_name), usage=usage(self.rules.command))
            )
        try:
            command = parse_command(comment.body, self.rules.command)
        except CommandSyntaxError as err:
            self._log_refused(incident, ref, comment, "malformed")
            return REFUSED, render_refusal(
                _(
                    "The command of {author} was not understood: {error}. Write it in a new comment as {usage}; "
                    "the reason is required."
                ).format(
                    author=escape_markdown(comment.author.display_name), error=err, usage=usage(self.rules.command)
                )
            )

        problem = await self._problem(incident, comment.author, command, responses)
        if problem is not None:
            await self._record(incident, comment, command, outcome=REFUSED, error=problem.english())
            self._log_refused(incident, ref, comment, "not_allowed", response_id=command.response_id)
            return REFUSED, render_refusal(problem)

        decision = await self._record(incident, comment, command, outcome=PENDING_OUTCOME)
        return await self._send(incident, ref, decision, responses, restricted=comment.restricted)

    async def _problem(
        self, incident: Incident, author: TicketAccount, command: Command, responses: dict[str, Response]
    ) -> Message | None:
        """Return why a well-formed command must not be sent, or None when it may."""
        if not await self._is_approver(author):
            return Message(
                N_(
                    "{author} (account {account_id}) may not confirm or decline MDR responses: the account is "
                    "neither in `responses.approvers` nor in a group of `responses.approver_groups` in the "
                    "connector's mapping."
                ),
                author=escape_markdown(author.display_name),
                account_id=code_span(author.id),
            )
        response = responses.get(command.response_id)
        if response is None:
            return Message(
                N_(
                    "{response_id} is not a response of MDR incident {incident_id}; copy the id from the "
                    "response's comment on this ticket."
                ),
                response_id=code_span(command.response_id),
                incident_id=code_span(incident.incident_id),
            )
        if response.status != INITIAL_STATUS:
            return Message(
                N_(
                    "Response {response_id} is already {status}, and only a response in status {initial} can be "
                    "confirmed or declined."
                ),
                response_id=code_span(command.response_id),
                status=escape_markdown(response.status),
                initial=INITIAL_STATUS,
            )
        return None

    async def _is_approver(self, account: TicketAccount) -> bool:
        """Tell whether the allow-list names the account by its stable id, or one of its groups.

        Display names never count: anyone can choose theirs.
        """
        if not account.id:
            return False
        if account.id in self.rules.approvers:
            return True
        if not self.rules.approver_groups:
            return False
        tickets = self.context.tickets
        try:
            groups = await self.context.read(lambda: tickets.account_groups(account.id))
        except ItemError as err:
            # An account the ticket system cannot describe, such as a deleted
            # one, is refused instead of blocking the incident on every retry.
            log.warning(
                "sync.response.groups_unavailable",
                extra={"connection": self.name, "account_id": account.id, "error": f"{type(err).__name__}: {err}"},
            )
            return False
        # NOTE: Jira treats group names as case-insensitive, so they are compared casefolded.
        allowed = {group.casefold() for group in self.rules.approver_groups}
        return any(group.casefold() in allowed for group in groups)

    async def _record(
        self,
        incident: Incident,
        comment: TicketComment,
        command: Command,
        *,
        outcome: str,
        error: str | None = None,
    ) -> ResponseDecision:
        return await self.context.store.record_decision(
            self.name,
            incident.incident_id,
            command.response_id,
            command.decision,
            actor_id=comment.author.id,
            actor_name=comment.author.display_name,
            source=TICKET_SOURCE,
            source_id=comment.id,
            reason=command.reason,
            outcome=outcome,
            error=error,
        )

    async def _send(
        self,
        incident: Incident,
        ref: TicketRef,
        decision: ResponseDecision,
        responses: dict[str, Response],
        *,
        restricted: bool,
    ) -> tuple[str, str]:
        """Send a recorded decision to MDR and record MDR's reply. Returns the outcome and the reply to post.

        A retriable error or an unknown outcome goes up with the audit record
        still pending; the retry re-reads the response before sending again.
        """
        context = self.context
        status = DECISION_STATUSES[decision.decision]
        text = mdr_comment(decision, context.tickets.system, ref.key, restricted=restricted)
        try:
            await context.mdr.update_response(decision.response_id, status, text)
        except ItemError as err:
            await context.store.finish_decision(decision.id, FAILED, str(err))
            self._log_decision("sync.response.decision_failed", incident, ref, decision, error=str(err))
            return FAILED, render_refusal(
                _(MDR_REJECTED_TEMPLATES[decision.decision]).format(
                    response_id=code_span(decision.response_id), error=escape_markdown(str(err))
                )
            )

        await context.store.finish_decision(decision.id, SENT)
        current = responses.get(decision.response_id)
        if current is not None:
            responses[decision.response_id] = current.model_copy(update={"status": status})
        context.stats.response_decisions += 1
        self._log_decision("sync.response.decided", incident, ref, decision)
        return SENT, render_echo(decision, quote_reason=not restricted)

    async def _resume(
        self,
        incident: Incident,
        ref: TicketRef,
        decision: ResponseDecision,
        responses: dict[str, Response],
        *,
        restricted: bool,
    ) -> tuple[str, str]:
        """Finish a command whose handling was cut short, from its audit record. Returns the outcome and the reply."""
        if decision.outcome == SENT:
            return SENT, render_echo(decision, quote_reason=not restricted)
        if decision.outcome in (REFUSED, FAILED):
            # NOTE: the audit record keeps the reason in English, so this
            # reply, posted only when the first one was lost, is English.
            return decision.outcome, render_refusal(decision.error or _("The command was refused."))

        # The decision may have reached MDR before the reply was lost. The
        # response's status and comment, read in this reconciliation, show whether it did.
        target = DECISION_STATUSES[decision.decision]
        response = responses.get(decision.response_id)
        current = response.status if response is not None else None
        system = self.context.tickets.system
        if response is not None and current == target and carries_decision(
            response, decision, system, ref.key, restricted=restricted
        ):
            await self.context.store.finish_decision(decision.id, SENT)
            self.context.stats.response_decisions += 1
            self._log_decision("sync.response.decided", incident, ref, decision, resumed=True)
            return SENT, render_echo(decision, quote_reason=not restricted)
        if current == INITIAL_STATUS:
            return await self._send(incident, ref, decision, responses, restricted=restricted)

        response_id = code_span(decision.response_id)
        if current == target:
            problem = Message(
                N_(
                    "Response {response_id} was {status} in Kaspersky MDR before this decision reached it, so the "
                    "decision was not sent."
                ),
                response_id=response_id,
                status=escape_markdown(current),
            )
        elif current:
            problem = Message(
                NOT_DECIDABLE_TEMPLATES[decision.decision], response_id=response_id, status=escape_markdown(current)
            )
        else:
            problem = Message(NOT_LISTED_TEMPLATES[decision.decision], response_id=response_id)
        await self.context.store.finish_decision(decision.id, FAILED, problem.english())
        self._log_decision("sync.response.decision_failed", incident, ref, decision, error=problem.english())
        return FAILED, render_refusal(problem)

    # Shared steps

    async def _post_notice(
        self, ref: TicketRef, source_id: str, body: str, notices: dict[str, TicketComment]
    ) -> TicketComment:
        """Post a reply or echo once, because one that landed before a crash is found by its marker."""
        landed = notices.get(source_id)
        if landed is not None:
            return landed
        draft = CommentDraft(
            body=body, marker=SyncMarker(origin=NOTICE_ORIGIN, source_id=source_id), visibility=self.visibility
        )
        posted = await self.context.tickets.add_comment(ref, draft)
        notices[source_id] = posted
        return posted

    def _own_marked(self, ref: TicketRef, comments: list[TicketComment], origin: str) -> dict[str, TicketComment]:
        """Map marker source ids to the connector's own comments of one origin.

        A comment with the marker but another author is skipped and logged:
        the connector could not edit it, and it may be forged.
        """
        own = self.context.own_account
        assert own is not None, "ConnectionSync.open() sets own_account before any reconciliation"
        found: dict[str, TicketComment] = {}
        for comment in comments:
            if comment.marker is None or comment.marker.origin != origin:
                continue
            if comment.author.id != own.id:
                log.warning(
                    "sync.response.marker_from_other_account",
                    extra={"connection": self.name, "ticket_key": ref.key, "comment_id": comment.id},
                )
                continue
            found.setdefault(comment.marker.source_id, comment)
        return found

    async def _items(self, incident: Incident, kind: str) -> list[SyncedItem]:
        return await self.context.store.get_items(self.name, incident.incident_id, kind)

    def _log_refused(
        self, incident: Incident, ref: TicketRef, comment: TicketComment, reason: str, response_id: str | None = None
    ) -> None:
        log.info(
            "sync.command.refused",
            extra={
                "connection": self.name,
                "incident_id": incident.incident_id,
                "ticket_key": ref.key,
                "comment_id": comment.id,
                "account_id": comment.author.id,
                "reason": reason,
                "response_id": response_id,
            },
        )

    def _log_decision(
        self, event: str, incident: Incident, ref: TicketRef, decision: ResponseDecision, **fields: object
    ) -> None:
        log.info(
            event,
            extra={
                "connection": self.name,
                "incident_id": incident.incident_id,
                "ticket_key": ref.key,
                "response_id": decision.response_id,
                "decision": decision.decision,
                "account_id": decision.actor_id,
                "decision_id": decision.id,
                **fields,
            },
        )


# The command line: `mdr-connector responses list|confirm|decline`.


@dataclass(frozen=True)
class ListedResponse:
    """A response as `responses list` prints it, with its incident and linked ticket."""

    incident_id: str
    ticket_key: str | None
    response: Response
    host_name: str


@dataclass(frozen=True)
class TerminalOutcome:
    """The result of `responses confirm|decline` for one response id."""

    response_id: str
    # `sent`, or `already` when the response had the requested status before.
    result: str
    decision_id: int | None = None


@dataclass(frozen=True)
class TerminalReport:
    """The results of `responses confirm|decline`, per response and on the linked ticket."""

    outcomes: list[TerminalOutcome]
    # The ticket the decisions were echoed on, or None when the incident has no linked ticket.
    ticket_key: str | None = None
    # Why the echo failed after the decisions had reached MDR.
    echo_error: ConnectorError | None = None


@dataclass(frozen=True)
class TerminalActor:
    """The person at the terminal: `cli:<OS user name>`."""

    id: str
    name: str

    @classmethod
    def from_user_name(cls, user_name: str) -> TerminalActor:
        return cls(id=f"cli:{user_name}", name=user_name)


async def read_responses(mdr: MdrApi, incident_id: str) -> list[Response]:
    """Read an incident's responses, raising ItemError on a partial list, because a decision must not rest on one."""
    page: ResponsePageLike = await mdr.list_responses(incident_id)
    if page.malformed:
        errors = "; ".join(f"{record.record_id or '<without id>'}: {record.error}" for record in page.malformed)
        raise ItemError.from_template(TERMINAL_MALFORMED, incident_id=incident_id, errors=errors)
    return list(page.items)


async def list_linked_responses(
    mdr: MdrApi, store: Store, connection: str, incident_id: str | None
) -> list[ListedResponse]:
    """Return the responses of one incident, or of every incident linked to a ticket, oldest first."""
    if incident_id is not None:
        link = await store.get_link(connection, incident_id)
        targets = [(incident_id, link.ticket_key if link is not None and link.state == LINKED else None)]
    else:
        links = await store.list_links(connection)
        targets = [(link.incident_id, link.ticket_key) for link in links if link.state == LINKED]

    listed: list[ListedResponse] = []
    # NOTE: two MDR calls per incident, one incident after the other, so a
    # connection with thousands of links takes minutes to list.
    for target_id, ticket_key in targets:
        incident, responses = await gather_or_cancel(mdr.get_incident(target_id), read_responses(mdr, target_id))
        host_names = host_names_by_asset(incident)
        listed += [
            ListedResponse(target_id, ticket_key, response, host_names.get(response.asset_id, ""))
            for response in sorted(responses, key=lambda r: (r.creation_time, r.response_id))
        ]
    return listed


async def decide_from_terminal(
    *,
    mapping: Mapping,
    store: Store,
    mdr: MdrApi,
    tickets: TicketAdapter | None,
    connection: str,
    incident_id: str,
    response_ids: Iterable[str],
    decision: str,
    reason: str,
    actor: TerminalActor,
) -> TerminalReport:
    """Confirm or decline responses of one incident for a person at a terminal.

    Every id must belong to the incident and be in the initial status, or
    already have the requested status, and then nothing is sent for it.
    Any other id stops the command before anything is sent. Each decision
    is recorded before the call, which is `response/update` for one id and
    `responses/update` for several. The decisions are echoed on the linked
    ticket when `tickets` is given. A failed echo is reported, not raised,
    because the decisions stand.
    """
    requested_ids = list(dict.fromkeys(response_ids))
    target = DECISION_STATUSES[decision]
    responses = {response.response_id: response for response in await read_responses(mdr, incident_id)}

    already: list[TerminalOutcome] = []
    to_send: list[str] = []
    for response_id in requested_ids:
        response = responses.get(response_id)
        if response is None:
            raise RejectedError.from_template(TERMINAL_NOT_FOUND, response_id=response_id, incident_id=incident_id)
        if response.status == target:
            already.append(TerminalOutcome(response_id, "already"))
        elif response.status == INITIAL_STATUS:
            to_send.append(response_id)
        else:
            raise RejectedError.from_template(
                TERMINAL_WRONG_STATUS, response_id=response_id, status=response.status, initial=INITIAL_STATUS
            )
    await settle_pending_decisions(store, connection, responses, requested_ids)

    decisions = [
        await store.record_decision(
            connection,
            incident_id,
            response_id,
            decision,
            actor_id=actor.id,
            actor_name=actor.name,
            source=CLI_SOURCE,
            source_id=None,
            reason=reason,
            outcome=PENDING_OUTCOME,
        )
        for response_id in to_send
    ]
    if decisions:
        await send_terminal_decisions(store, mdr, decisions, target)

    report = TerminalReport([*already, *(TerminalOutcome(row.response_id, SENT, row.id) for row in decisions)])
    if not decisions or tickets is None:
        return report
    try:
        ticket_key = await echo_terminal_decisions(mapping, store, tickets, connection, incident_id, decisions)
    except ConnectorError as err:
        log.error(
            "cli.response.echo_failed",
            extra={"connection": connection, "incident_id": incident_id, "error": f"{type(err).__name__}: {err}"},
        )
        return TerminalReport(report.outcomes, echo_error=err)
    return TerminalReport(report.outcomes, ticket_key=ticket_key)


async def settle_pending_decisions(
    store: Store, connection: str, responses: dict[str, Response], response_ids: list[str]
) -> None:
    """Close the pending audit records of earlier, interrupted runs, from the responses' current statuses."""
    for response_id in response_ids:
        for earlier in await store.list_decisions(connection, response_id=response_id):
            if earlier.source != CLI_SOURCE or earlier.outcome != PENDING_OUTCOME:
                continue
            response = responses[response_id]
            applied = response.status == DECISION_STATUSES[earlier.decision] and carries_decision(
                response, earlier, "", ""
            )
            if applied:
                await store.finish_decision(earlier.id, SENT)
            else:
                await store.finish_decision(
                    earlier.id, FAILED, f"not applied in MDR; the response is {response.status}"
                )


async def send_terminal_decisions(store: Store, mdr: MdrApi, decisions: list[ResponseDecision], target: str) -> None:
    """Send recorded decisions in one call and record the outcome of each.

    When MDR rejects the call, the responses are read again, because MDR
    may have applied a call for several ids to some of them before the
    rejection. Each decision is then recorded as it turned out.
    """
    first = decisions[0]
    text = mdr_comment(first, "", "")
    try:
        if len(decisions) == 1:
            await mdr.update_response(first.response_id, target, text)
        else:
            await mdr.update_responses([row.response_id for row in decisions], target, text)
    except ItemError as err:
        applied = await applied_response_ids(mdr, first, target, text)
        rejected = [row for row in decisions if row.response_id not in applied]
        for row in decisions:
            if row.response_id in applied:
                await _record_terminal_sent(store, row)
            else:
                await store.finish_decision(row.id, FAILED, str(err))
        if not rejected:
            return
        raise RejectedError.from_template(
            TERMINAL_REJECTED, response_ids=", ".join(row.response_id for row in rejected), error=str(err)
        ) from err

    for row in decisions:
        await _record_terminal_sent(store, row)


async def applied_response_ids(mdr: MdrApi, decision: ResponseDecision, target: str, text: str) -> set[str]:
    """Return the responses of a decision's incident that carry it after MDR rejected its call.

    Returns an empty set when the responses cannot be read.
    """
    try:
        page = await mdr.list_responses(decision.incident_id)
    except ConnectorError as err:
        log.warning(
            "cli.response.recheck_failed",
            extra={
                "connection": decision.connection,
                "incident_id": decision.incident_id,
                "error": f"{type(err).__name__}: {err}",
            },
        )
        return set()
    return {
        response.response_id
        for response in page.items
        if response.status == target and carries_comment(response, text)
    }


async def _record_terminal_sent(store: Store, row: ResponseDecision) -> None:
    await store.finish_decision(row.id, SENT)
    log.info(
        "cli.response.decided",
        extra={
            "connection": row.connection,
            "incident_id": row.incident_id,
            "response_id": row.response_id,
            "decision": row.decision,
            "account_id": row.actor_id,
            "decision_id": row.id,
        },
    )


async def echo_terminal_decisions(
    mapping: Mapping,
    store: Store,
    tickets: TicketAdapter,
    connection: str,
    incident_id: str,
    decisions: list[ResponseDecision],
) -> str | None:
    """Post one echo per decision on the incident's linked ticket.

    Returns the ticket's key, or None when the incident has no linked ticket.
    """
    link = await store.get_link(connection, incident_id)
    if link is None or link.state != LINKED or not link.ticket_id:
        return None
    ref = TicketRef(key=link.ticket_key or "", id=link.ticket_id, url=link.ticket_url or "")
    visibility = comment_visibility(mapping)

    for row in decisions:
        source_id = f"decision:{row.id}"
        await store.start_item(connection, incident_id, NOTICE, MDR_TO_TICKET, source_id)
        draft = CommentDraft(
            body=render_echo(row), marker=SyncMarker(origin=NOTICE_ORIGIN, source_id=source_id), visibility=visibility
        )
        posted = await tickets.add_comment(ref, draft)
        await store.finish_item(connection, incident_id, NOTICE, MDR_TO_TICKET, source_id, posted.id)
    return ref.key
