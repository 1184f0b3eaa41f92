"""The `mdr-connector` command line.

Every command has --help; every failure exits non-zero with one readable
line on stderr. Messages for people go through `i18n._` (English by
default, Russian by --lang, the config file or the locale); logs stay in
English.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import math
import os
import re
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from mdr_connector.connector import event_loop, i18n
from mdr_connector.connector.config import (
    MAX_MDR_CLIENT_ID_LENGTH,
    MDR_CLIENT_ID_PATTERN,
    Settings,
    is_loopback_host,
    load_settings,
)
from mdr_connector.connector.errors import (
    ConfigError,
    ConnectionBusyError,
    ConnectorError,
)
from mdr_connector.connector.i18n import N_, _
from mdr_connector.connector.logs import configure_logging, escape_controls, redact_text, register_secret
from mdr_connector.connector.mappingfile import load_mapping
from mdr_connector.connector.yamlfiles import read_text_file

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
# EX_TEMPFAIL from sysexits.h: "try again later", which is what a cron job
# that found the connection busy should hear.
EXIT_BUSY = 75
# 128 + SIGPIPE, as a shell reports a command killed by a closed pipe.
EXIT_BROKEN_PIPE = 141
DEFAULT_CONFIG = "config.yaml"
MAX_TOKEN_FILE_BYTES = 64 * 1024
# Permission bits that let group or others read a file.
SHARED_READ_BITS = 0o044

# The token states as the MDR console names them, marked so the
# translation scan finds them; they are shown with `_(status.state)`.
TOKEN_STATES = (N_("Pending activation"), N_("Active"), N_("Idle"), N_("Expired"))
# The states after which `token status` exits 0; any other state needs `token activate`.
USABLE_TOKEN_STATES = ("Active", "Idle")
# The response statuses that `responses confirm|decline` set, marked for the translation scan.
DECIDED_STATUSES = {"confirm": N_("Confirmed"), "decline": N_("Declined")}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    i18n.set_language(i18n.detect_language(explicit=_peek_option(argv, "--lang")))
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_option_defaults(args)
    if not getattr(args, "handler", None):
        # `token` and `db` alone show their own subcommands, not the top level.
        getattr(args, "help_parser", parser).print_help()
        return EXIT_USAGE

    try:
        return args.handler(args)
    except ConnectionBusyError as err:
        print_error(err.localized(_))
        return EXIT_BUSY
    except ConnectorError as err:
        print_error(err.localized(_))
        return EXIT_FAILED
    except SQLAlchemyError as err:
        reason = str(getattr(err, "orig", None) or err).splitlines()[0]
        print_error(_("database error: {reason}").format(reason=reason))
        return EXIT_FAILED
    except BrokenPipeError:
        # The reader of the output went away (`status | head -1`): stop quietly,
        # and keep Python from failing again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as err:
        print_error(str(err))
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # noqa: BLE001 - the promise is one readable line, never a traceback
        log.debug("cli.command.crashed", exc_info=True)
        print_error(_("unexpected {kind}: {reason} (run with --log-level DEBUG for the traceback)").format(
            kind=type(err).__name__, reason=str(err).splitlines()[0] if str(err) else ""))
        return EXIT_FAILED


def print_error(message: str) -> None:
    """Print an error on stderr, secrets redacted: Jira and MDR may echo a token in their error texts."""
    lines = [safe_text(line) for line in message.splitlines()] or [""]
    print(f"mdr-connector: {_('error')}: {lines[0]}", file=sys.stderr)
    for line in lines[1:]:
        print(f"  {line}", file=sys.stderr)


def print_warning(message: str) -> None:
    """Print a one-line warning on stderr, secrets redacted."""
    print(f"mdr-connector: {_('warning')}: {safe_text(message)}", file=sys.stderr)


def print_connection_failure(name: str, failure: ConnectorError) -> None:
    """Print why a connection failed, prefixed with its name unless the message already names it."""
    message = failure.localized(_)
    if isinstance(failure, ConnectionBusyError):
        # The busy message starts "connection NAME is being synced ...".
        print_error(message)
    else:
        print_error(f"{name}: {message}")


def safe_text(line: str) -> str:
    """Redact secrets in `line` and escape its control characters, so it can be printed on a terminal."""
    return escape_controls(redact_text(line))


def _peek_option(argv: list[str], name: str) -> str | None:
    for index, value in enumerate(argv):
        if value == name and index + 1 < len(argv):
            return argv[index + 1]
        if value.startswith(f"{name}="):
            return value.split("=", 1)[1]
    return None


# Parser


def wait_seconds(text: str) -> float:
    """argparse type of --wait: a finite number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(
            _("expected a finite number of seconds, 0 or more, got {value}").format(value=text)
        )
    return value


def mdr_client_id(text: str) -> str:
    """argparse type of --client-id: the characters and length that mdr.client_id accepts."""
    if len(text) > MAX_MDR_CLIENT_ID_LENGTH or not re.fullmatch(MDR_CLIENT_ID_PATTERN, text):
        raise argparse.ArgumentTypeError(
            _("expected at most {limit} letters, digits, - and _, got {value!r}").format(
                limit=MAX_MDR_CLIENT_ID_LENGTH, value=text
            )
        )
    return text


def non_empty_text(text: str) -> str:
    """argparse type of --connection-name: any text that is not blank."""
    if not text.strip():
        raise argparse.ArgumentTypeError(_("expected a non-empty name"))
    return text


def port_number(text: str) -> int:
    """argparse type of --port: a TCP port from 0 (any free port) to 65535."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(
            _("expected a port number from 0 to 65535, got {value}").format(value=text)
        )
    return value


def response_id_text(text: str) -> str:
    """argparse type of RESPONSE_ID: one word no longer than the ids the connector reads from MDR."""
    from mdr_connector.adapters.mdr.models import MAX_ID_LENGTH

    if not text or len(text) > MAX_ID_LENGTH or any(character.isspace() for character in text):
        raise argparse.ArgumentTypeError(
            _("expected a response id such as MDR_fc51163f-00a4-4d07-826e-bb92963bc856, got {value!r}").format(
                value=text
            )
        )
    return text


def reason_text(text: str) -> str:
    """argparse type of --reason: text that is not blank and fits in the MDR comment."""
    from mdr_connector.connector.responses import MAX_REASON_CHARACTERS

    if not text.strip():
        raise argparse.ArgumentTypeError(_("expected a reason, got an empty text"))
    if len(text) > MAX_REASON_CHARACTERS:
        raise argparse.ArgumentTypeError(
            _("expected a reason of at most {limit} characters, got {length}").format(
                limit=MAX_REASON_CHARACTERS, length=len(text)
            )
        )
    return " ".join(text.split())


def common_options() -> argparse.ArgumentParser:
    """Build the options every command takes, before or after the command name."""
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS keeps a value given before the command from being reset by the
    # subcommand's default; main() fills in the real defaults afterwards.
    common.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        help=_("path of the configuration file (default: $MDR_CONNECTOR_CONFIG or config.yaml)"),
    )
    common.add_argument(
        "--lang", choices=i18n.SUPPORTED, default=argparse.SUPPRESS, help=_("language of messages: en or ru")
    )
    common.add_argument(
        "--log-level",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        default=argparse.SUPPRESS,
        help=_("log level (default: from the config file, else INFO)"),
    )
    return common


def apply_option_defaults(args: argparse.Namespace) -> None:
    args.config = getattr(args, "config", os.environ.get("MDR_CONNECTOR_CONFIG", DEFAULT_CONFIG))
    args.lang = getattr(args, "lang", None)
    args.log_level = getattr(args, "log_level", None)


def build_parser() -> argparse.ArgumentParser:
    common = common_options()
    parser = argparse.ArgumentParser(
        prog="mdr-connector",
        description=_("Two-way sync between Kaspersky MDR incidents and a ticket system."),
        parents=[common],
    )
    commands = parser.add_subparsers(title=_("commands"), metavar="COMMAND")

    run = commands.add_parser("run", parents=[common], help=_("sync every connection until stopped (SIGTERM or Ctrl-C)"))
    run.set_defaults(handler=command_run)

    sync = commands.add_parser("sync", parents=[common], help=_("run one sync cycle and exit, for cron"))
    sync.add_argument("--once", action="store_true", help=_("run one cycle (the only mode; kept for clarity)"))
    sync.add_argument("--connection", help=_("name of the connection (default: all)"))
    sync.add_argument(
        "--wait",
        type=wait_seconds,
        default=0,
        metavar="SECONDS",
        help=_("wait up to SECONDS for another process working the connection (default: 0, exit at once)"),
    )
    sync.add_argument(
        "--dry-run",
        action="store_true",
        help=_("print the writes one cycle would make and send none: MDR and the ticket system are only read "
               "(the MDR access token may be refreshed, as for any read), attachments are not downloaded, and the "
               "cycle works on a temporary copy of the ledger, so the ledger stays as it was; takes no lock, "
               "so it can run beside `run`"),
    )
    sync.set_defaults(handler=command_sync)

    token = commands.add_parser("token", parents=[common], help=_("manage the MDR API token chain"))
    token.set_defaults(help_parser=token)
    token_commands = token.add_subparsers(title=_("commands"), metavar="COMMAND")
    activate = token_commands.add_parser(
        "activate",
        parents=[common],
        help=_("exchange the token issued in the MDR console for an access and refresh token"),
    )
    activate.add_argument("--connection", help=_("name of the connection (needed if there are several)"))
    activate.add_argument(
        "--token-file",
        type=Path,
        help=_("file holding the console-issued token (default: read it from standard input)"),
    )
    activate.set_defaults(handler=command_token_activate)
    status = token_commands.add_parser(
        "status",
        parents=[common],
        help=_("show the state and expiry of the token chain"),
        description=_("Show the state and expiry of the MDR token chain of each connection. "
                      "Exit status: 0 when every connection shown is Active or Idle, "
                      "1 when any is Pending activation or Expired."),
    )
    status.add_argument("--connection", help=_("name of the connection (default: all)"))
    status.set_defaults(handler=command_token_status)
    new_key = token_commands.add_parser(
        "new-key",
        parents=[common],
        help=_("print a new random key for cluster.token_key"),
        description=_("Print a new random key for cluster.token_key, which encrypts the MDR tokens in the "
                      "database in cluster mode. Store it in a file or an environment variable that only "
                      "the connector can read; every instance needs the same key."),
    )
    new_key.set_defaults(handler=command_token_new_key)

    check = commands.add_parser("check", parents=[common], help=_("validate the config and mappings, then test both connections"))
    check.add_argument("--connection", help=_("name of the connection (default: all)"))
    check.add_argument("--offline", action="store_true", help=_("validate the files only, contact nothing"))
    check.set_defaults(handler=command_check)

    demo = commands.add_parser(
        "demo", parents=[common], help=_("run a self-contained demo against the MDR simulator and a ticket system on loopback")
    )
    demo.add_argument("--incidents", type=int, default=5, help=_("number of incidents to seed (default: 5)"))
    demo.add_argument("--keep", action="store_true", help=_("keep the temporary folder with the database, the config and the mapping"))
    demo.add_argument(
        "--ticket-system",
        choices=("jira", "servicenow", "redmine"),
        default="jira",
        help=_("the ticket side: the Jira or ServiceNow simulator, or a Redmine server given by --redmine-url (default: jira)"),
    )
    demo.add_argument("--redmine-url", help=_("Redmine only: base URL of the Redmine server to use"))
    demo.add_argument(
        "--redmine-key-file", type=Path, help=_("Redmine only: file holding the API key of the connector's Redmine account")
    )
    demo.add_argument(
        "--redmine-person-key-file",
        type=Path,
        help=_("Redmine only: file holding the API key of a second account that comments as a person (optional)"),
    )
    demo.add_argument("--redmine-project", default="sec", help=_("Redmine only: project identifier (default: sec)"))
    demo.set_defaults(handler=command_demo)

    simulate = commands.add_parser("simulate", parents=[common], help=_("run a simulator on loopback for manual testing"))
    simulate.add_argument("system", choices=("mdr", "jira", "servicenow"), help=_("which simulator to run"))
    simulate.add_argument("--host", default="127.0.0.1", help=_("address to listen on (default: 127.0.0.1)"))
    simulate.add_argument("--port", type=port_number, default=0, help=_("port to listen on (default: a free port)"))
    simulate.add_argument(
        "--client-id",
        type=mdr_client_id,
        help=_("MDR simulator only: client id of the simulated customer (default: sim-client)"),
    )
    simulate.add_argument(
        "--connection-name",
        type=non_empty_text,
        help=_("MDR simulator only: MDR API connection name that its tokens carry (default: mdr-connector)"),
    )
    simulate.add_argument(
        "--faults", metavar="FILE", type=Path, help=_("YAML fault plan to start with (see docs/simulators.md, Faults)")
    )
    simulate.set_defaults(handler=command_simulate)

    add_responses_commands(commands, common)

    # Imported here: these modules use this one's helpers.
    from mdr_connector.connector.cli_operations import add_operation_commands
    from mdr_connector.connector.cli_parked import add_parked_commands
    from mdr_connector.connector.cli_status import add_status_command

    add_status_command(commands, common)
    add_operation_commands(commands, common)
    add_parked_commands(commands, common)

    db = commands.add_parser("db", parents=[common], help=_("manage the database schema"))
    db.set_defaults(help_parser=db)
    db_commands = db.add_subparsers(title=_("commands"), metavar="COMMAND")
    upgrade = db_commands.add_parser("upgrade", parents=[common], help=_("apply the database migrations"))
    upgrade.set_defaults(handler=command_db_upgrade)

    return parser


def add_responses_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    """Add `responses list|confirm|decline`, the terminal side of MDR response decisions."""
    responses = commands.add_parser(
        "responses", parents=[common], help=_("list, confirm or decline MDR responses (remediation actions)")
    )
    responses.set_defaults(help_parser=responses)
    response_commands = responses.add_subparsers(title=_("commands"), metavar="COMMAND")

    listing = response_commands.add_parser(
        "list",
        parents=[common],
        help=_("list the responses of one incident, or of every incident linked to a ticket"),
        description=_("List MDR responses with their id, type, status, asset and creation time (UTC)."),
    )
    listing.add_argument("--connection", help=_("name of the connection (needed if there are several)"))
    listing.add_argument(
        "--incident",
        metavar="ID",
        help=_("MDR incident id (default: every incident linked to a ticket); write --incident=ID, "
               "because MDR incident ids can start with -"),
    )
    listing.set_defaults(handler=command_responses_list)

    verbs = (
        ("confirm", _("confirm responses in MDR, so the SOC runs them")),
        ("decline", _("decline responses in MDR, so the SOC does not run them")),
    )
    for verb, summary in verbs:
        decide = response_commands.add_parser(
            verb,
            parents=[common],
            help=summary,
            description=_(
                "Send the decision to MDR for responses of one incident that are still in their initial "
                "status, record it in the audit table with the local user name, and echo it on the linked "
                "ticket. Several ids are sent in one responses/update call. A response that already has "
                "the requested status is skipped; any other status stops the command before anything is sent."
            ),
        )
        decide.add_argument(
            "response_ids", nargs="+", type=response_id_text, metavar="RESPONSE_ID", help=_("id of an MDR response")
        )
        decide.add_argument(
            "--incident",
            required=True,
            metavar="ID",
            help=_("MDR incident the responses belong to; write --incident=ID, "
                   "because MDR incident ids can start with -"),
        )
        decide.add_argument(
            "--reason",
            required=True,
            type=reason_text,
            help=_("why; sent to MDR with the decision and kept in the audit record"),
        )
        decide.add_argument("--connection", help=_("name of the connection (needed if there are several)"))
        decide.set_defaults(handler=command_responses_decide, decision=verb)


# Shared steps


def load_config(args: argparse.Namespace) -> Settings:
    """Load the config, then apply its language and log settings unless the command line overrides them."""
    path = Path(args.config)
    if not path.exists():
        raise ConfigError(
            _("configuration file {path} not found; pass --config PATH or set MDR_CONNECTOR_CONFIG").format(
                path=path.absolute()
            )
        )
    settings = load_settings(path)
    if args.lang is None and settings.language:
        i18n.set_language(settings.language)
    configure_logging(args.log_level or settings.log.level, settings.log.format)
    return settings


def selected(settings: Settings, name: str | None) -> list[Any]:
    return [settings.connection(name)] if name else list(settings.connections)


def run_async(coroutine_factory: Callable[[], Any]) -> Any:
    return event_loop.run(coroutine_factory())


def run_with_store(settings: Settings, operation: Callable[[Any], Awaitable[Any]]) -> Any:
    """Open the ledger, run `operation(store)` on it, and close the ledger again."""

    async def go() -> Any:
        from mdr_connector.connector.store import Store

        store = await Store.open(settings.resolved_database_url())
        try:
            return await operation(store)
        finally:
            await store.close()

    return run_async(go)


# Commands


def command_run(args: argparse.Namespace) -> int:
    settings = load_config(args)
    for connection in settings.connections:
        load_mapping(connection.mapping)

    async def go() -> int:
        from mdr_connector.connector.progress import ProgressDisplay
        from mdr_connector.connector.runner import run_forever
        from mdr_connector.connector.service import open_connection
        from mdr_connector.connector.store import Store

        store = await Store.open(settings.resolved_database_url())
        try:
            async with ProgressDisplay.on_stderr(settings.log.format) as progress:
                outcomes = await run_forever(settings, store, progress.track(open_connection))
        finally:
            await store.close()
        failed = [outcome for outcome in outcomes if outcome.failure is not None]
        for outcome in failed:
            print_connection_failure(outcome.name, outcome.failure)
        return EXIT_FAILED if failed else EXIT_OK

    return run_async(go)


def command_sync(args: argparse.Namespace) -> int:
    if args.dry_run:
        from mdr_connector.connector.cli_operations import command_sync_dry_run

        return command_sync_dry_run(args)
    settings = load_config(args)
    connections = selected(settings, args.connection)

    async def go() -> int:
        from mdr_connector.connector.progress import ProgressDisplay
        from mdr_connector.connector.runner import sync_once
        from mdr_connector.connector.service import open_connection
        from mdr_connector.connector.store import Store

        store = await Store.open(settings.resolved_database_url())
        try:
            async with ProgressDisplay.on_stderr(settings.log.format) as progress:
                outcomes = await sync_once(
                    settings, connections, store, progress.track(open_connection), wait_seconds=args.wait
                )
        finally:
            await store.close()

        for outcome in outcomes:
            if outcome.failure is not None:
                print_connection_failure(outcome.name, outcome.failure)
            elif outcome.stats is not None:
                print(
                    _("{name}: {seen} incidents seen, {created} tickets created, "
                      "{to_ticket} comments to the ticket system, {to_mdr} comments to MDR, "
                      "{files_to_ticket} attachments to the ticket system, {files_to_mdr} attachments to MDR, "
                      "{failed} failures").format(
                        name=outcome.name,
                        seen=len(outcome.stats.incidents_seen),
                        created=outcome.stats.tickets_created,
                        to_ticket=outcome.stats.comments_to_ticket,
                        to_mdr=outcome.stats.comments_to_mdr,
                        files_to_ticket=outcome.stats.attachments_to_ticket,
                        files_to_mdr=outcome.stats.attachments_to_mdr,
                        failed=outcome.stats.failures,
                    )
                )
        return sync_exit_code(outcomes)

    return run_async(go)


def sync_exit_code(outcomes: Sequence[Any]) -> int:
    """Return 1 if any connection failed, else 75 if any was busy, else 0.

    A failure outranks busy, because "try again later" would hide it from cron.
    """
    if any(outcome.failure is not None and not outcome.busy for outcome in outcomes):
        return EXIT_FAILED
    if any(outcome.busy for outcome in outcomes):
        return EXIT_BUSY
    return EXIT_OK


def read_console_token(token_file: Path | None) -> str:
    """Read the console-issued token from a file or standard input; never from the command line."""
    if token_file is not None:
        token = read_text_file(token_file, MAX_TOKEN_FILE_BYTES).strip()
        warn_if_readable_by_others(token_file)
    elif sys.stdin.isatty():
        token = getpass.getpass(_("Paste the token issued in the MDR console (Settings, API): ")).strip()
    else:
        token = read_standard_input(MAX_TOKEN_FILE_BYTES).strip()

    if not token:
        raise ConfigError(_("no token given; pass --token-file PATH or pipe the token to standard input"))
    register_secret(token)
    return token


def warn_if_readable_by_others(token_file: Path) -> None:
    """Warn on stderr when group or others can read the file that contains the console token."""
    try:
        mode = token_file.stat().st_mode
    except OSError:
        return
    if mode & SHARED_READ_BITS:
        print_warning(
            _("other users can read {path}; delete it as soon as the activation is done").format(path=token_file)
        )


def read_standard_input(limit: int) -> str:
    data = sys.stdin.buffer.read(limit + 1)
    if len(data) > limit:
        raise ConfigError(
            _("standard input contains more than {limit} bytes; pipe in only the token").format(limit=limit)
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(_("cannot read standard input: not UTF-8 text")) from err


def command_token_activate(args: argparse.Namespace) -> int:
    settings = load_config(args)
    connection = settings.connection(args.connection)
    token = read_console_token(args.token_file)

    async def activate(store: Any) -> Any:
        from mdr_connector.connector.service import mdr_client

        async with mdr_client(settings, connection, store) as mdr:
            return await mdr.tokens.activate(token)

    async def activate_in_file() -> Any:
        from mdr_connector.adapters.mdr.client import MdrClient

        async with MdrClient(connection.mdr) as mdr:
            return await mdr.tokens.activate(token)

    # Only cluster mode needs the database; a single instance keeps its tokens in files.
    status = run_with_store(settings, activate) if settings.cluster.enabled else run_async(activate_in_file)
    print(_("{name}: token activated; state {state}").format(name=connection.name, state=_(status.state)))
    print_token_expiry(status)
    if args.token_file is not None and settings.cluster.enabled:
        print(_("delete {path}: its token is used up, and the connector keeps its own tokens in the database").format(
            path=args.token_file))
    elif args.token_file is not None:
        print(_("delete {path}: its token is used up, and the connector keeps its own tokens in {token_dir}").format(
            path=args.token_file, token_dir=connection.mdr.token_dir))
    return EXIT_OK


def read_token_statuses(settings: Settings, connections: Sequence[Any]) -> list[Any]:
    """Read the token state of each connection, from the database in cluster mode, else from its token file."""
    now = datetime.now(timezone.utc).timestamp()
    if not settings.cluster.enabled:
        from mdr_connector.adapters.mdr.tokens import TokenFileStore

        return [
            TokenFileStore(connection.mdr.token_dir, connection.mdr.client_id).status(now)
            for connection in connections
        ]

    async def read(store: Any) -> list[Any]:
        from mdr_connector.connector.service import token_storage

        return [await token_storage(settings, connection, store).read_status(now) for connection in connections]

    return run_with_store(settings, read)


def command_token_status(args: argparse.Namespace) -> int:
    settings = load_config(args)
    exit_code = EXIT_OK
    connections = selected(settings, args.connection)
    for connection, status in zip(connections, read_token_statuses(settings, connections), strict=True):
        print(_("{name}: {state}").format(name=connection.name, state=_(status.state)))
        if status.rejected_at is not None:
            print("  " + _("MDR rejected the refresh token at {time}: issue a new token in the MDR console "
                           "(Settings, API) and run `mdr-connector token activate`").format(
                time=format_local(status.rejected_at)))
        print_token_expiry(status)
        if status.state not in USABLE_TOKEN_STATES:
            exit_code = EXIT_FAILED
    return exit_code


def command_token_new_key(args: argparse.Namespace) -> int:
    from mdr_connector.adapters.mdr.token_database import new_token_key

    print(new_token_key())
    print_warning(_("keep this key secret, give every instance the same one, and never store it in the database "
                    "or the config file itself: point cluster.token_key to a file or an environment variable"))
    return EXIT_OK


def print_token_expiry(status: Any) -> None:
    if status.access_expires_at is not None:
        print("  " + _("access token expires:  {time}").format(time=format_local(status.access_expires_at)))
    if status.refresh_expires_at is not None:
        print("  " + _("refresh token expires: {time}").format(time=format_local(status.refresh_expires_at)))


def format_local(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def command_check(args: argparse.Namespace) -> int:
    from mdr_connector.connector.checks import check_connection, secret_file_warnings

    settings = load_config(args)
    connections = selected(settings, args.connection)
    failures = 0
    # The online check finds these again, and each is shown once.
    reported: set[str] = set()
    for connection in connections:
        mapping = load_mapping(connection.mapping)
        print(_("{name}: configuration and mapping are valid").format(name=connection.name))
        for problem in unsupported_settings(connection, mapping):
            print(f"  [{_('FAILED')}] {safe_text(problem)}")
            reported.add(problem)
            failures += 1
    for warning in secret_file_warnings(settings, connections):
        print(f"  [warn] {safe_text(warning)}")
    if args.offline:
        return EXIT_OK if failures == 0 else EXIT_FAILED

    for connection in connections:
        for line, ok in run_async(lambda: check_connection(settings, connection)):
            if line in reported:
                continue
            mark = "ok" if ok else _("FAILED")
            print(f"  [{mark}] {safe_text(line)}")
            failures += 0 if ok else 1
    return EXIT_OK if failures == 0 else EXIT_FAILED


def unsupported_settings(connection: Any, mapping: Any) -> list[str]:
    """Return the mapping settings that the connection's ticket system cannot store, known without contacting it."""
    from mdr_connector.connector.routing import unsupported_by
    from mdr_connector.connector.service import ticket_adapter_class

    system = connection.ticket.system
    return unsupported_by(mapping, system, ticket_adapter_class(system).capabilities)


def command_demo(args: argparse.Namespace) -> int:
    from mdr_connector.connector.demo import run_demo

    if args.incidents < 1 or args.incidents > 500:
        raise ConfigError(_("--incidents must be between 1 and 500, got {value}").format(value=args.incidents))
    tickets = demo_tickets(args)
    configure_logging(args.log_level or "WARNING", "text" if sys.stderr.isatty() else "json")
    return run_async(lambda: run_demo(incidents=args.incidents, keep=args.keep, tickets=tickets))


def demo_tickets(args: argparse.Namespace) -> Any:
    """Build the ticket side of the demo from the options, refusing Redmine options without Redmine."""
    from mdr_connector.connector import demo

    redmine_options = [args.redmine_url, args.redmine_key_file, args.redmine_person_key_file]
    if args.ticket_system != "redmine":
        if any(option is not None for option in redmine_options):
            raise ConfigError(_("--redmine-* options apply only to `demo --ticket-system redmine`"))
        return demo.JiraDemo() if args.ticket_system == "jira" else demo.ServiceNowDemo()

    if args.redmine_url is None or args.redmine_key_file is None:
        raise ConfigError(
            _("the Redmine demo needs a running Redmine server: pass --redmine-url and --redmine-key-file "
              "(the API key of the connector's account); docs/redmine.md says how to prepare one")
        )
    return demo.RedmineDemo(
        url=args.redmine_url,
        key_file=args.redmine_key_file,
        person_key_file=args.redmine_person_key_file,
        project=args.redmine_project,
    )


def command_simulate(args: argparse.Namespace) -> int:
    if not is_loopback_host(args.host):
        raise ConfigError(
            _("the simulator serves only loopback addresses, not {host}: its control API has no "
              "authentication; pass --host 127.0.0.1 or --host ::1").format(host=args.host)
        )
    mdr_options = {
        name: value
        for name, value in (("client_id", args.client_id), ("connection_name", args.connection_name))
        if value is not None
    }
    if args.system != "mdr" and mdr_options:
        raise ConfigError(_("--client-id and --connection-name apply only to `mdr-connector simulate mdr`"))
    faults = None
    if args.faults is not None:
        from mdr_connector.adapters.faults import load_fault_file

        try:
            faults = load_fault_file(args.faults)
        except ValueError as err:
            raise ConfigError(_("the --faults file cannot be used: {error}").format(error=err)) from err
    configure_logging(args.log_level or "INFO", "auto")
    if args.system == "mdr":
        from mdr_connector.adapters.mdr.simulator import serve as serve_mdr

        run_async(lambda: serve_mdr(args.host, args.port, **mdr_options, faults=faults))
    elif args.system == "servicenow":
        from mdr_connector.adapters.servicenow.simulator import serve as serve_servicenow

        run_async(lambda: serve_servicenow(args.host, args.port, faults=faults))
    else:
        from mdr_connector.adapters.jira.simulator import serve as serve_jira

        run_async(lambda: serve_jira(args.host, args.port, faults=faults))
    return EXIT_OK


def local_user_name() -> str:
    """Return the name of the OS user running the command, for the audit record."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        # No login name and no passwd entry, as in some containers.
        return f"uid-{os.getuid()}"


def command_responses_list(args: argparse.Namespace) -> int:
    settings = load_config(args)
    connection = settings.connection(args.connection)

    async def go() -> list[Any]:
        from mdr_connector.connector.responses import list_linked_responses
        from mdr_connector.connector.service import mdr_client
        from mdr_connector.connector.store import Store

        store = await Store.open(settings.resolved_database_url())
        try:
            async with mdr_client(settings, connection, store) as mdr:
                return await list_linked_responses(mdr, store, connection.name, args.incident)
        finally:
            await store.close()

    listed = run_async(go)
    if not listed:
        print(_("no responses"))
        return EXIT_OK

    current_incident = None
    for row in listed:
        if row.incident_id != current_incident:
            current_incident = row.incident_id
            ticket = row.ticket_key or _("no linked ticket")
            print(safe_text(_("incident {incident_id} ({ticket})").format(incident_id=row.incident_id, ticket=ticket)))
        response = row.response
        asset = f"{row.host_name} ({response.asset_id})" if row.host_name else response.asset_id or "-"
        created = format_local(datetime.fromtimestamp(response.creation_time / 1000, tz=timezone.utc))
        columns = [response.response_id, response.type or "-", response.status or "-", asset, created]
        print(safe_text("  " + "  ".join(columns)))
    return EXIT_OK


def command_responses_decide(args: argparse.Namespace) -> int:
    from mdr_connector.connector.responses import SENT, TerminalActor

    settings = load_config(args)
    connection = settings.connection(args.connection)
    mapping = load_mapping(connection.mapping)
    actor = TerminalActor.from_user_name(local_user_name())

    async def go() -> Any:
        from mdr_connector.connector.responses import decide_from_terminal
        from mdr_connector.connector.service import build_ticket_adapter, mdr_client
        from mdr_connector.connector.store import LINKED, Store

        store = await Store.open(settings.resolved_database_url())
        try:
            link = await store.get_link(connection.name, args.incident)
            # The ticket system is opened first, so a decision is sent only
            # when its echo can be posted too.
            tickets = build_ticket_adapter(connection, mapping) if link is not None and link.state == LINKED else None
            try:
                if tickets is not None:
                    await tickets.open()
                async with mdr_client(settings, connection, store) as mdr:
                    return await decide_from_terminal(
                        mapping=mapping,
                        store=store,
                        mdr=mdr,
                        tickets=tickets,
                        connection=connection.name,
                        incident_id=args.incident,
                        response_ids=args.response_ids,
                        decision=args.decision,
                        reason=args.reason,
                        actor=actor,
                    )
            finally:
                if tickets is not None:
                    await tickets.close()
        finally:
            await store.close()

    report = run_async(go)
    for outcome in report.outcomes:
        if outcome.result != SENT:
            message = _("{response_id}: already {status} in MDR; nothing sent")
        elif args.decision == "confirm":
            message = _("{response_id}: confirmed in MDR")
        else:
            message = _("{response_id}: declined in MDR")
        print(safe_text(message.format(response_id=outcome.response_id, status=_(DECIDED_STATUSES[args.decision]))))

    if report.echo_error is not None:
        print_error(_("the decision reached MDR, but echoing it on the linked ticket failed: {error}").format(
            error=report.echo_error.localized(_)))
        return EXIT_FAILED
    if report.ticket_key is not None:
        print(_("decision echoed on ticket {ticket_key}").format(ticket_key=report.ticket_key))
    elif any(outcome.result == SENT for outcome in report.outcomes):
        print(_("incident {incident_id} has no linked ticket, so nothing was echoed").format(incident_id=args.incident))
    return EXIT_OK


def command_db_upgrade(args: argparse.Namespace) -> int:
    settings = load_config(args)

    async def go() -> str | None:
        from mdr_connector.connector.store import Store

        store = await Store.open(settings.resolved_database_url(), upgrade=True)
        try:
            return await store.current_revision()
        finally:
            await store.close()

    revision = run_async(go)
    print(_("database schema is at revision {revision}").format(revision=revision))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
