"""The `parked list|retry|drop` commands: the items whose sync failed and that wait for their next try.

cli.py registers them. They read and write the ledger only and take no
connection lock, so they work while `mdr-connector run` is running.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from datetime import datetime, timezone
from typing import Any

from mdr_connector.connector.cli import (
    EXIT_FAILED,
    EXIT_OK,
    format_local,
    load_config,
    local_user_name,
    print_error,
    run_async,
    run_with_store,
    safe_text,
    selected,
)
from mdr_connector.connector.i18n import N_, _
from mdr_connector.connector.logs import redact_text

log = logging.getLogger(__name__)

# The kinds of parked items as engine.py (INCIDENT) and ticket_requests.py
# (PARKED_REQUEST) store them. They are copied so that building the parser
# does not import the engine, and tests/test_cli_parked.py compares them.
INCIDENT_KIND = "incident"
REQUEST_KIND = "incident_request"
PARKED_KINDS = (INCIDENT_KIND, REQUEST_KIND)
# The length of the item_id column of parked_items.
MAX_ITEM_ID_LENGTH = 200
# Answers to the drop prompt that confirm it, besides their translations.
YES_ANSWERS = ("y", "yes")

ITEM_HELP = N_(
    "id of a parked item, as `parked list` shows it: an MDR incident id, or the ticket id of an incident "
    "request; put an id that starts with - after --, as in `-- -AbC123`"
)
KIND_HELP = N_("only items of this kind: incident (an MDR incident) or incident_request (a ticket that requests one)")
TABLE_HEADERS = (N_("CONNECTION"), N_("KIND"), N_("ITEM"), N_("ATTEMPTS"), N_("NEXT TRY"), N_("REASON"))


def add_parked_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    """Register `parked list`, `parked retry` and `parked drop`."""
    parked = commands.add_parser(
        "parked", parents=[common], help=_("list, retry or drop the items whose sync failed")
    )
    parked.set_defaults(help_parser=parked)
    parked_commands = parked.add_subparsers(title=_("commands"), metavar="COMMAND")

    listing = parked_commands.add_parser(
        "list",
        parents=[common],
        help=_("show the parked items with their attempts, next try and reason"),
        description=_(
            "Show the items whose sync failed and that wait for their next try: connection, kind, item id, "
            "failed attempts, the time of the next try (UTC) and how long until it, and the error of the "
            "last attempt. Reads the database only, so it can run beside `run`."
        ),
    )
    add_filter_options(listing)
    listing.add_argument("--json", action="store_true", help=_("print one JSON document instead of text"))
    listing.set_defaults(handler=command_parked_list)

    retry = parked_commands.add_parser(
        "retry",
        parents=[common],
        help=_("make parked items due now, so the next cycle retries them"),
        description=_(
            "Set the next try of parked items to now. Nothing is sent by this command: the next sync cycle "
            "retries the items, which is the running service's next cycle or the next "
            "`mdr-connector sync --once`. Incidents are retried at the start of the cycle, and incident "
            "requests in its request step. The failed attempts are kept, so an item that fails again waits "
            "longer than before. To retry one incident at once and see the outcome, run "
            "`mdr-connector resync -- INCIDENT` instead. A cycle retries at most sync.page_size parked "
            "incidents, so more of them take several cycles. Exit status: 0 when every id was found, "
            "1 when an id is not parked."
        ),
    )
    retry.add_argument("items", nargs="*", type=item_id_text, metavar="ITEM", help=_(ITEM_HELP))
    retry.add_argument("--all", action="store_true", help=_("make every parked item due now (with --connection and --kind, only those)"))
    add_filter_options(retry)
    retry.set_defaults(handler=command_parked_retry, usage_parser=retry)

    drop = parked_commands.add_parser(
        "drop",
        parents=[common],
        help=_("delete parked entries, so their items are not retried any more"),
        description=_(
            "Delete the parked entries of items, after a confirmation prompt unless --yes is given. A dropped "
            "item is not retried on a schedule any more and stays unsynced until a cycle reads a change of it "
            "from MDR or from its ticket. That is a new change, or the last one while it is still inside the "
            "overlap of a change cursor (sync.mdr_overlap_seconds, sync.ticket_overlap_seconds), and the item "
            "may be parked again then; `mdr-connector trace` shows where the incident's last MDR change is. "
            "`mdr-connector resync -- INCIDENT` syncs a dropped incident at any time. A ticket that requests "
            "an incident is searched again while it carries the request label, so remove the label to stop "
            "that request. Every dropped entry is logged as operations.parked.dropped. Exit status: 0 when "
            "every id was found and dropped, 1 when an id is not parked or the prompt was declined."
        ),
    )
    drop.add_argument("items", nargs="+", type=item_id_text, metavar="ITEM", help=_(ITEM_HELP))
    drop.add_argument("--yes", action="store_true", help=_("drop without asking, which is required when standard input is not a terminal"))
    add_filter_options(drop)
    drop.set_defaults(handler=command_parked_drop)


def add_filter_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--connection", help=_("name of the connection (default: all)"))
    parser.add_argument("--kind", choices=PARKED_KINDS, help=_(KIND_HELP))


def item_id_text(text: str) -> str:
    """argparse type of ITEM: one word of valid UTF-8, no longer than the ledger stores."""
    # Bytes that are not UTF-8 reach Python as lone surrogates, which no ledger row contains.
    valid_utf8 = text.encode("utf-8", "surrogatepass") == text.encode("utf-8", "ignore") if text else False
    if not valid_utf8 or len(text) > MAX_ITEM_ID_LENGTH or any(character.isspace() for character in text):
        raise argparse.ArgumentTypeError(
            _("expected an item id of at most {limit} characters without spaces, got {value!r}").format(
                limit=MAX_ITEM_ID_LENGTH, value=text.encode("utf-8", "backslashreplace").decode("ascii", "replace")
            )
        )
    return text


def require_ledger(settings: Any) -> None:
    """Raise ConfigError when the SQLite ledger does not exist yet, so that retry and drop do not create an empty one."""
    from mdr_connector.connector.cli_status import read_only_url

    read_only_url(settings.resolved_database_url())


def connection_names(settings: Any, name: str | None) -> list[str]:
    """Return the names of the selected connections. An unknown --connection raises ConfigError."""
    return [connection.name for connection in selected(settings, name)]


# list


def command_parked_list(args: argparse.Namespace) -> int:
    from mdr_connector.connector.cli_status import read_only_url

    settings = load_config(args)
    names = connection_names(settings, args.connection)
    url = read_only_url(settings.resolved_database_url())

    async def go() -> list[Any]:
        from mdr_connector.connector.store import Store

        # A listing only reads, so it does not upgrade the schema as Store.open would.
        store = Store(url)
        try:
            await store.check_schema(upgrade=False)
            return await store.find_parked(names, kind=args.kind)
        finally:
            await store.close()

    rows = run_async(go)
    now = datetime.now(timezone.utc)
    if args.json:
        print(json.dumps(parked_document(rows, now), ensure_ascii=False, indent=2))
        return EXIT_OK
    if not rows:
        print(_("no parked items"))
        return EXIT_OK
    for line in table_lines(rows, now):
        print(line)
    return EXIT_OK


def table_lines(rows: list[Any], now: datetime) -> list[str]:
    """Lay the rows out as aligned columns under a header. The last column, the reason, is not padded."""
    cells = [[_(header) for header in TABLE_HEADERS]]
    for row in rows:
        next_try = f"{format_local(row.next_try_at)} ({time_until(row.next_try_at, now)})"
        cells.append([safe_text(str(value)) for value in (row.connection, row.kind, row.item_id, row.attempts, next_try, row.reason)])
    widths = [max(len(line[column]) for line in cells) for column in range(len(TABLE_HEADERS) - 1)]
    return ["  ".join([*(cell.ljust(width) for cell, width in zip(line, widths)), line[-1]]).rstrip() for line in cells]


def time_until(moment: datetime, now: datetime) -> str:
    """Format the time left until `moment` in whole minutes, rounded up, or as `due` once it has passed."""
    seconds = (moment - now).total_seconds()
    if seconds <= 0:
        return _("due")
    minutes = math.ceil(seconds / 60)
    if minutes < 60:
        return _("in {minutes} min").format(minutes=minutes)
    if minutes < 48 * 60:
        return _("in {hours} h {minutes} min").format(hours=minutes // 60, minutes=minutes % 60)
    return _("in {days} d").format(days=minutes // (24 * 60))


def parked_document(rows: list[Any], now: datetime) -> dict[str, Any]:
    """Build the `--json` document: English keys, times in ISO 8601 UTC, reasons with secrets redacted."""
    return {
        "checked_at": now.isoformat(),
        "parked": [
            {
                "connection": row.connection,
                "kind": row.kind,
                "item_id": row.item_id,
                "attempts": row.attempts,
                "reason": redact_text(row.reason),
                "first_failed_at": row.first_failed_at.isoformat(),
                "last_failed_at": row.last_failed_at.isoformat(),
                "next_try_at": row.next_try_at.isoformat(),
                "due": row.next_try_at <= now,
            }
            for row in rows
        ],
    }


# retry


def command_parked_retry(args: argparse.Namespace) -> int:
    if args.all == bool(args.items):
        args.usage_parser.error(_("give the ids of parked items or --all, not both"))
    settings = load_config(args)
    names = connection_names(settings, args.connection)
    require_ledger(settings)
    item_ids = None if args.all else args.items
    user = local_user_name()

    async def make_due(store: Any) -> list[Any]:
        found = await store.find_parked(names, kind=args.kind, item_ids=item_ids)
        return await store.make_parked_due([row.id for row in found], datetime.now(timezone.utc))

    due = run_with_store(settings, make_due)
    for row in due:
        log.info(
            "operations.parked.retry_requested",
            extra={"connection": row.connection, "kind": row.kind, "item_id": row.item_id, "attempts": row.attempts, "user": user},
        )
        print(safe_text(_("{connection}: {kind} {item_id} is due now, after {attempts} failed attempts").format(
            connection=row.connection, kind=row.kind, item_id=row.item_id, attempts=row.attempts)))

    unknown = report_unknown(args.items, due)
    if args.all and not due:
        print(_("no parked items"))
    if due:
        print(_("parked items due now: {count}. The next sync cycle retries them: the next cycle of the "
                "running service, or `mdr-connector sync --once`").format(count=len(due)))
    return EXIT_FAILED if unknown else EXIT_OK


def report_unknown(item_ids: list[str], rows: list[Any]) -> list[str]:
    """Print an error for each requested id that no row has, and return those ids."""
    found = {row.item_id for row in rows}
    unknown = [item_id for item_id in dict.fromkeys(item_ids) if item_id not in found]
    for item_id in unknown:
        print_error(_("{item_id} is not parked in the selected connections; `mdr-connector parked list` shows "
                      "the parked items").format(item_id=item_id))
    return unknown


# drop


def command_parked_drop(args: argparse.Namespace) -> int:
    settings = load_config(args)
    names = connection_names(settings, args.connection)
    require_ledger(settings)

    found = run_with_store(settings, lambda store: store.find_parked(names, kind=args.kind, item_ids=args.items))
    unknown = report_unknown(args.items, found)
    if not found:
        return EXIT_FAILED
    for row in found:
        print(safe_text(_("{connection}: {kind} {item_id}, {attempts} failed attempts: {reason}").format(
            connection=row.connection, kind=row.kind, item_id=row.item_id, attempts=row.attempts, reason=row.reason)))
    if not args.yes and not confirm_drop(len(found)):
        return EXIT_FAILED

    # NOTE: no connection lock is taken, so a cycle that is retrying one of
    # these items right now parks it again if that retry fails.
    dropped = run_with_store(settings, lambda store: store.drop_parked([row.id for row in found]))
    report_dropped(found, dropped)
    return EXIT_FAILED if unknown else EXIT_OK


def confirm_drop(count: int) -> bool:
    """Ask on the terminal whether to drop `count` entries. Return False without asking when standard input is not a terminal."""
    if not sys.stdin.isatty():
        print_error(_("dropping parked items needs a confirmation: pass --yes, or run the command in a terminal"))
        return False
    try:
        answer = input(_("Drop these parked entries ({count})? [y/N] ").format(count=count)).strip().lower()
    except EOFError:
        # Ctrl-D at the prompt declines, as an empty answer does.
        answer = ""
    if answer in YES_ANSWERS or answer in (_("y"), _("yes")):
        return True
    print(_("nothing dropped"))
    return False


def report_dropped(found: list[Any], dropped: list[Any]) -> None:
    """Log and print each dropped entry, and name the entries a cycle synced before they could be dropped."""
    user = local_user_name()
    dropped_ids = {row.id for row in dropped}
    for row in dropped:
        log.info(
            "operations.parked.dropped",
            extra={"connection": row.connection, "kind": row.kind, "item_id": row.item_id, "attempts": row.attempts, "user": user},
        )
        print(safe_text(_("dropped: {connection}: {kind} {item_id}").format(
            connection=row.connection, kind=row.kind, item_id=row.item_id)))
    for row in found:
        if row.id not in dropped_ids:
            print(safe_text(_("{connection}: {kind} {item_id} is no longer parked, so there was nothing to drop").format(
                connection=row.connection, kind=row.kind, item_id=row.item_id)))

    if any(row.kind == INCIDENT_KIND for row in dropped):
        print(_("A dropped incident stays unsynced until MDR or its ticket changes again, or until "
                "`mdr-connector resync -- INCIDENT`. While its last change is inside the overlap of a change "
                "cursor, the next cycles read that change again and may park the incident again; "
                "`mdr-connector trace -- INCIDENT` shows where the change is"))
    if any(row.kind == REQUEST_KIND for row in dropped):
        print(_("A ticket that requests an incident is searched again while it carries the request label: "
                "remove the label from the ticket to stop the request"))
