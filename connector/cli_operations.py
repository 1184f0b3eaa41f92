"""The operator commands `resync`, `link`, `unlink` and `trace`, and the printing of `sync --dry-run`.

cli.py registers them and sends `sync --dry-run` here. The work itself is
done in operations.py; this module parses, prints and translates.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from mdr_connector.connector.cli import (
    EXIT_BUSY,
    EXIT_FAILED,
    EXIT_OK,
    load_config,
    print_connection_failure,
    print_error,
    run_async,
    run_with_store,
    safe_text,
    selected,
    wait_seconds,
)
from mdr_connector.connector.errors import ConnectorError
from mdr_connector.connector.i18n import N_, _

# The message of each write a dry run reports, by (side, operation); the
# placeholders are the keys of PlannedWrite.detail.
WRITE_MESSAGES = {
    ("ticket", "create_ticket"): N_(
        "would create {system} ticket {ticket_key} in {project} ({issue_type}) "
        "for MDR incident {incident_id}: {summary}"
    ),
    ("ticket", "update_ticket"): N_("would update {fields} of {ticket_key}"),
    ("ticket", "add_comment"): N_("would add a comment to {ticket_key} (marker {origin} {source_id}): {excerpt}"),
    ("ticket", "edit_comment"): N_(
        "would edit comment {comment_id} of {ticket_key} (marker {origin} {source_id}): {excerpt}"
    ),
    ("ticket", "upload_attachment"): N_("would attach {filename} ({size} bytes) to {ticket_key}"),
    ("ticket", "transition_to"): N_("would move {ticket_key} to status {status}"),
    ("ticket", "set_correlation"): N_("would mark {ticket_key} as the ticket of MDR incident {incident_id}"),
    ("mdr", "create_comment"): N_("would add a comment to MDR incident {incident_id}: {excerpt}"),
    ("mdr", "delete_comment"): N_("would delete MDR comment {comment_id}"),
    ("mdr", "upload_attachment"): N_("would attach {filename} ({size} bytes) to MDR incident {incident_id}"),
    ("mdr", "update_responses"): N_("would set MDR responses {response_ids} to {status}: {comment}"),
    ("mdr", "close_incident"): N_("would close MDR incident {incident_id} as {resolution}: {summary}"),
    ("mdr", "create_incident"): N_("would create an MDR incident with priority {priority} for hosts {hosts}: {summary}"),
}

# The line `trace` prints about the incident's last MDR change and the MDR change cursor, by CursorPosition.position.
POSITION_MESSAGES = {
    "ahead": N_("the incident's MDR change at {change} ({source}) is after the {cursor} cursor ({cursor_time}), "
                "so the next cycle reads it"),
    "overlap": N_("the incident's MDR change at {change} ({source}) is behind the {cursor} cursor ({cursor_time}) "
                  "but inside its overlap of {overlap} seconds, so the next cycle reads it again"),
    "behind": N_("the incident's MDR change at {change} ({source}) is behind the {cursor} cursor ({cursor_time}) "
                 "and its overlap: no cycle reads this change again. The incident is reconciled again when it "
                 "changes in MDR or its ticket changes, or now with `mdr-connector resync -- {incident_id}`"),
    "unknown": N_("the time of the incident's last MDR change is not known here, because nothing was reconciled; "
                  "pass --live to read it from MDR"),
    "no_cursor": N_("no cycle has run yet, so the {cursor} cursor is not set"),
}
CHANGE_SOURCES = {"reconciled": N_("as reconciled"), "live": N_("as MDR returns it now")}
INCIDENT_HELP = N_("MDR incident id; put an id that starts with - after --, as in `-- -AbC123`")

# Link states as the ledger stores them, shown in the user's language.
LINK_STATE_NAMES = {"linked": N_("linked"), "pending": N_("pending")}
# Jira keys, ServiceNow numbers and sys_ids, and Redmine issue numbers, without paths, dots or spaces.
TICKET_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")


def add_operation_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    """Register `resync`, `link`, `unlink` and `trace`."""
    resync = add_incident_command(
        commands,
        common,
        "resync",
        command_resync,
        help_text=_("reconcile one incident now, regardless of the cursors and its parked entry"),
        description=_(
            "Reconcile one MDR incident now, as a cycle would, under the connection's lock: create or find its "
            "ticket, write the fields MDR owns, and copy the comments, files, responses and statuses either side "
            "lacks. The connection filters do not apply. A parked incident is unparked once it is in line; a "
            "failure is printed and leaves the parked entry as it was. Exit status: 0 when the incident is in "
            "line, 1 when it failed, 75 when the connection is busy or the incident must wait (for example "
            "until the ticket search sees an earlier create)."
        ),
    )
    add_connection_options(resync)

    link = add_incident_command(
        commands,
        common,
        "link",
        command_link,
        help_text=_("pair an MDR incident with an existing ticket"),
        description=_(
            "Pair an MDR incident with an existing ticket under the connection's lock. The incident is read "
            "from MDR and the ticket looked up by its key. An incident or ticket that is already linked "
            "elsewhere is rejected, naming both. The ticket gets the incident's correlation marker, then the "
            "link is recorded. The incident's next reconciliation writes the fields MDR owns to the ticket and "
            "copies the comments and files either side lacks; no second ticket is created."
        ),
    )
    link.add_argument("ticket", type=ticket_key_text, metavar="TICKET", help=_("key of the ticket, such as SEC-12, INC0010001 or 123"))
    add_connection_options(link)

    unlink = add_incident_command(
        commands,
        common,
        "unlink",
        command_unlink,
        help_text=_("forget the pairing of an MDR incident and its ticket"),
        description=_(
            "Delete the link of an MDR incident and its ledger rows (synced items, parked entry) under the "
            "connection's lock, printing each row. MDR and the ticket are not changed, and response decisions "
            "stay as the audit record. The ticket keeps the incident's marker, so the incident's next "
            "reconciliation links the same ticket again: its comments are matched by their markers and not "
            "copied twice, but files carry no marker and are copied again. Run `link` after this command to "
            "pair the incident with another ticket. If the old pairing must never come back, remove the "
            "incident's marker from the old ticket by hand: the mdr-<incident id> label and mdr-connector "
            "property in Jira, correlation_id in ServiceNow, the correlation custom field in Redmine."
        ),
    )
    unlink.add_argument(
        "--force",
        action="store_true",
        help=_("also remove a pending link, whose ticket create may have landed"),
    )
    add_connection_options(unlink)

    trace = add_incident_command(
        commands,
        common,
        "trace",
        command_trace,
        help_text=_("show everything the ledger records about one incident"),
        description=_(
            "Show what the ledger records about one MDR incident: its link, every synced item with ids and "
            "times, parked entries with their reason, response decisions, and the connection's cursors, with "
            "a line saying whether the incident's last MDR change is behind the MDR change cursor. Times are "
            "UTC. Only the local database is read unless --live is given."
        ),
    )
    add_connection_options(trace, wait=False)
    trace.add_argument("--json", action="store_true", help=_("print JSON for machines"))
    trace.add_argument(
        "--live",
        action="store_true",
        help=_("also read the incident from MDR and say whether it changed since it was reconciled"),
    )


def add_incident_command(
    commands: Any,
    common: argparse.ArgumentParser,
    name: str,
    handler: Callable[[argparse.Namespace], int],
    help_text: str,
    description: str,
) -> argparse.ArgumentParser:
    """Register the command `name`, whose first argument is an MDR incident id and which `handler` runs."""
    parser = commands.add_parser(name, parents=[common], help=help_text, description=description)
    parser.add_argument("incident", type=incident_id_text, metavar="INCIDENT", help=_(INCIDENT_HELP))
    parser.set_defaults(handler=handler)
    return parser


def add_connection_options(parser: argparse.ArgumentParser, wait: bool = True) -> None:
    """Add --connection and, for commands that take the connection's lock, --wait."""
    parser.add_argument("--connection", help=_("name of the connection (needed if there are several)"))
    if not wait:
        return
    parser.add_argument(
        "--wait",
        type=wait_seconds,
        default=0,
        metavar="SECONDS",
        help=_("wait up to SECONDS for another process working the connection (default: 0, exit at once)"),
    )


def incident_id_text(text: str) -> str:
    """argparse type of INCIDENT: one word no longer than the ids the connector reads from MDR."""
    from mdr_connector.adapters.mdr.models import MAX_ID_LENGTH

    if not text or len(text) > MAX_ID_LENGTH or any(character.isspace() for character in text):
        raise argparse.ArgumentTypeError(
            _("expected an MDR incident id of at most {limit} characters without spaces, got {value!r}").format(
                limit=MAX_ID_LENGTH, value=text
            )
        )
    return text


def ticket_key_text(text: str) -> str:
    """argparse type of TICKET: a Jira key (SEC-12, returned in capitals), a ServiceNow number or a Redmine issue number (#123 or 123)."""
    from mdr_connector.connector.operations import is_issue_key

    key = text.removeprefix("#")
    if not TICKET_KEY.fullmatch(key):
        raise argparse.ArgumentTypeError(
            _("expected a ticket key such as SEC-12, INC0010001 or 123, got {value!r}").format(value=text)
        )
    return key.upper() if is_issue_key(key) else key


def format_time(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def format_epoch(milliseconds: int | None) -> str:
    if milliseconds is None:
        return "-"
    return format_time(datetime.fromtimestamp(milliseconds / 1000, tz=timezone.utc))


def say(line: str) -> None:
    """Print one line of remote or ledger data, secrets redacted and control characters escaped."""
    print(safe_text(line), flush=True)


# sync --dry-run


def describe_write(write: Any) -> str:
    return _(WRITE_MESSAGES[(write.side, write.operation)]).format(**write.detail)


def command_sync_dry_run(args: argparse.Namespace) -> int:
    settings = load_config(args)
    connections = selected(settings, args.connection)

    async def go() -> int:
        from mdr_connector.connector.operations import dry_run_cycle, open_ledger_for_reading

        ledger = await open_ledger_for_reading(settings)
        failed = False
        try:
            for connection in connections:

                def report(write: Any, name: str = connection.name) -> None:
                    say(f"{name}: {describe_write(write)}")

                try:
                    result = await dry_run_cycle(settings, connection, ledger, report)
                except ConnectorError as err:
                    print_connection_failure(connection.name, err)
                    failed = True
                    continue
                say(_("{name}: dry run: {writes} writes listed and none sent; {seen} incidents seen, "
                      "{failed} failures").format(
                    name=connection.name,
                    writes=len(result.writes),
                    seen=len(result.stats.incidents_seen),
                    failed=result.stats.failures,
                ))
        finally:
            if ledger is not None:
                await ledger.close()
        return EXIT_FAILED if failed else EXIT_OK

    return run_async(go)


# resync


def command_resync(args: argparse.Namespace) -> int:
    settings = load_config(args)
    connection = settings.connection(args.connection)

    from mdr_connector.connector.operations import resync_incident

    result = run_with_store(settings, lambda store: resync_incident(settings, connection, store, args.incident, wait_seconds=args.wait))
    before = result.parked_before
    if before is not None:
        say(_("{incident_id} was parked after {attempts} failed attempts: {reason}").format(
            incident_id=result.incident_id, attempts=before.attempts, reason=before.reason))

    if result.done:
        ticket_key = result.link.ticket_key if result.link is not None else "-"
        say(_("{incident_id} is in line with {ticket_key}: {tickets_created} tickets created, {tickets_updated} "
              "ticket updates, {comments_to_ticket} comments to the ticket system, {comments_to_mdr} comments "
              "to MDR, {attachments_to_ticket} attachments to the ticket system, {attachments_to_mdr} "
              "attachments to MDR, {statuses_to_ticket} status moves").format(
            incident_id=result.incident_id, ticket_key=ticket_key, **result.counts))
        if before is not None:
            say(_("{incident_id} is no longer parked").format(incident_id=result.incident_id))
        return EXIT_OK

    after = result.parked_after
    if after is not None:
        say(_("{incident_id} is not reconciled yet: {reason}; the next try is due at {time}").format(
            incident_id=result.incident_id, reason=after.reason, time=format_time(after.next_try_at)))
    else:
        say(_("{incident_id} is not reconciled: the ticket that requested this incident gets linked to it "
              "by the next cycle").format(incident_id=result.incident_id))
    return EXIT_BUSY


# link and unlink


def command_link(args: argparse.Namespace) -> int:
    settings = load_config(args)
    connection = settings.connection(args.connection)

    from mdr_connector.connector.operations import link_incident

    result = run_with_store(settings, lambda store: link_incident(settings, connection, store, args.incident, args.ticket, wait_seconds=args.wait))
    link = result.link
    if not result.changed:
        say(_("MDR incident {incident_id} is already linked to {ticket_key}; nothing changed").format(
            incident_id=link.incident_id, ticket_key=link.ticket_key))
        return EXIT_OK

    say(_("linked MDR incident {incident_id} (number {incident_number}) to {ticket_key} {ticket_url}").format(
        incident_id=link.incident_id, incident_number=link.incident_number, ticket_key=link.ticket_key,
        ticket_url=link.ticket_url))
    say(_("{ticket_key} now carries the correlation marker of MDR incident {incident_id}").format(
        ticket_key=link.ticket_key, incident_id=link.incident_id))
    say(_("{ticket_key} gets the fields MDR owns and the missing comments and files at the incident's next "
          "reconciliation: when the incident or the ticket changes, or now with "
          "`mdr-connector resync -- {incident_id}`").format(ticket_key=link.ticket_key, incident_id=link.incident_id))
    return EXIT_OK


def command_unlink(args: argparse.Namespace) -> int:
    settings = load_config(args)
    connection = settings.connection(args.connection)

    from mdr_connector.connector.operations import unlink_incident

    deleted = run_with_store(
        settings,
        lambda store: unlink_incident(settings, connection, store, args.incident, force=args.force, wait_seconds=args.wait),
    )
    for link in deleted.links:
        say(_("removed the link of MDR incident {incident_id} to {ticket_key} (state {state})").format(
            state=_(LINK_STATE_NAMES.get(link.state, link.state)), incident_id=link.incident_id, ticket_key=link.ticket_key or "-"))
    for item in deleted.items:
        say(_("removed synced item: {kind} {direction} {source_id} -> {target_id} ({state})").format(
            kind=item.kind, direction=item.direction, source_id=item.source_id, target_id=item.target_id or "-",
            state=item.state))
    for entry in deleted.parked:
        say(_("removed parked entry: {kind} {item_id} after {attempts} attempts: {reason}").format(
            kind=entry.kind, item_id=entry.item_id, attempts=entry.attempts, reason=entry.reason))

    ticket_key = next((link.ticket_key for link in deleted.links if link.ticket_key), None)
    if ticket_key is not None:
        say(_("MDR and {ticket_key} are unchanged. {ticket_key} still carries the marker of MDR incident "
              "{incident_id}, so the incident's next reconciliation links it again, unless you link another "
              "ticket first").format(ticket_key=ticket_key, incident_id=args.incident))
    return EXIT_OK


# trace


def command_trace(args: argparse.Namespace) -> int:
    settings = load_config(args)
    connection = settings.connection(args.connection)

    async def go() -> tuple[Any, ConnectorError | None]:
        from mdr_connector.connector.operations import (
            build_trace,
            empty_trace,
            open_ledger_for_reading,
            read_live_incident,
        )

        live, live_error = None, None
        if args.live:
            try:
                live = await read_live_incident(settings, connection, args.incident)
            except ConnectorError as err:
                live_error = err
        store = await open_ledger_for_reading(settings)
        if store is None:
            return empty_trace(connection, args.incident, live), live_error
        try:
            return await build_trace(store, connection, args.incident, live), live_error
        finally:
            await store.close()

    trace, live_error = run_async(go)
    if args.json:
        from mdr_connector.connector.operations import trace_document

        document = trace_document(trace)
        if live_error is not None:
            document["live_error"] = safe_text(str(live_error))
        print(json.dumps(document, ensure_ascii=False, indent=2))
    else:
        print_trace(trace)

    if live_error is not None:
        print_error(_("reading the incident from MDR failed: {error}").format(error=live_error.localized(_)))
        return EXIT_FAILED
    return EXIT_OK


def print_trace(trace: Any) -> None:
    say(_("MDR incident {incident_id}, connection {connection}").format(
        incident_id=trace.incident_id, connection=trace.connection))
    print_link(trace.link)
    print_items(trace.items)
    print_parked(trace.parked)
    print_decisions(trace.decisions)
    print_cursors(trace)
    if trace.live is not None:
        print_live(trace)


def print_link(link: Any) -> None:
    if link is None:
        say(_("link: none; the connector has not created or found a ticket for this incident"))
        return
    say(_("link: {state}, ticket {ticket_key} (id {ticket_id}) {ticket_url}").format(
        state=_(LINK_STATE_NAMES.get(link.state, link.state)), ticket_key=link.ticket_key or "-", ticket_id=link.ticket_id or "-",
        ticket_url=link.ticket_url or ""))
    say("  " + _("created {created}, last changed {updated}").format(
        created=format_time(link.created_at), updated=format_time(link.updated_at)))
    if link.create_started_at is not None:
        say("  " + _("ticket create started {time}").format(time=format_time(link.create_started_at)))
    say("  " + _("last MDR version reconciled: update_time {update_time} ({time})").format(
        update_time=link.mdr_update_time if link.mdr_update_time is not None else "-",
        time=format_epoch(link.mdr_update_time)))
    say("  " + _("last ticket version reconciled: {time}").format(time=format_time(link.ticket_updated)))
    say("  " + _("statuses: MDR {mdr_status}, ticket {ticket_status}").format(
        mdr_status=link.mdr_status or "-", ticket_status=link.ticket_status or "-"))


def say_heading(title: str, rows: list[Any]) -> None:
    """Print the heading of one list of the trace, and `none` under it when the list is empty."""
    say(title)
    if not rows:
        say("  " + _("none"))


def print_items(items: list[Any]) -> None:
    say_heading(_("synced items, oldest first:"), items)
    for item in items:
        say("  " + _("{started}  {kind} {direction}  {source_id} -> {target_id}  {state}, done {done}, "
                     "source version {version}").format(
            started=format_time(item.attempt_started_at), kind=item.kind, direction=item.direction,
            source_id=item.source_id, target_id=item.target_id or "-", state=item.state,
            done=format_time(item.done_at), version=item.source_version or "-"))


def print_parked(parked: list[Any]) -> None:
    say_heading(_("parked:"), parked)
    for entry in parked:
        say("  " + _("{kind} {item_id}: {attempts} failed attempts since {first}, last {last}, next try {next_try}: "
                     "{reason}").format(
            kind=entry.kind, item_id=entry.item_id, attempts=entry.attempts, first=format_time(entry.first_failed_at),
            last=format_time(entry.last_failed_at), next_try=format_time(entry.next_try_at), reason=entry.reason))


def print_decisions(decisions: list[Any]) -> None:
    say_heading(_("response decisions:"), decisions)
    for decision in decisions:
        say("  " + _("{decided}  {decision} {response_id} by {actor_name} ({actor_id}) from {source}: {outcome}, "
                     "sent {sent}; reason: {reason}").format(
            decided=format_time(decision.decided_at), decision=decision.decision, response_id=decision.response_id,
            actor_name=decision.actor_name, actor_id=decision.actor_id, source=decision.source,
            outcome=decision.outcome, sent=format_time(decision.sent_at), reason=decision.reason))
        if decision.error:
            say("    " + _("error: {error}").format(error=decision.error))


def print_cursors(trace: Any) -> None:
    say_heading(_("cursors of connection {connection}:").format(connection=trace.connection), trace.cursors)
    for cursor in trace.cursors:
        value = cursor.value
        if value.isdigit():
            value = f"{value} ({format_epoch(int(value))})"
        say("  " + _("{side}: {value}, updated {updated}").format(
            side=cursor.side, value=value, updated=format_time(cursor.updated_at)))

    position = trace.cursor_position
    say(_(POSITION_MESSAGES[position.position]).format(
        change=format_epoch(position.change_ms),
        source=_(CHANGE_SOURCES[position.change_source]),
        cursor=position.cursor_name,
        cursor_time=format_epoch(position.cursor_ms),
        overlap=position.overlap_ms // 1000,
        incident_id=trace.incident_id,
    ))


def print_live(trace: Any) -> None:
    live = trace.live
    say(_("in MDR now: status {status}, update_time {update_time} ({time})").format(
        status=live.status, update_time=live.update_time, time=format_epoch(live.update_time)))
    if live.newer_than_reconciled is True:
        say("  " + _("MDR has a newer version than the one reconciled"))
    elif live.newer_than_reconciled is False:
        say("  " + _("MDR has the version that was reconciled"))
    if live.skipped_by:
        say("  " + _("the connection's filters skip this incident ({filters}), so it gets no ticket unless it is "
                     "linked").format(filters=", ".join(live.skipped_by)))
