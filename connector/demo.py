"""`mdr-connector demo`: the whole sync against the MDR simulator and a ticket system on loopback.

The ticket side is the Jira or ServiceNow simulator, or a Redmine server
whose URL the user gives.

The demo builds the same objects the service builds from config.yaml, so
what it shows is the production code path: the token chain is activated
with a console-issued token, SQLite keeps the ledger in a temporary folder,
and the engine runs real cycles over HTTP.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections import Counter
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Protocol

import aiohttp
import yaml

from mdr_connector.adapters.jira import simulator as jira_simulator
from mdr_connector.adapters.mdr import simulator as mdr_simulator
from mdr_connector.adapters.mdr.client import MdrClient
from mdr_connector.adapters.servicenow import simulator as servicenow_simulator
from mdr_connector.adapters.servicenow import simulator_state as servicenow_state
from mdr_connector.connector.config import (
    ConnectionSettings,
    JiraApiTokenAuth,
    JiraSettings,
    MdrSettings,
    RedmineSettings,
    ServiceNowBasicAuth,
    ServiceNowSettings,
    SecretRef,
    Settings,
    SyncSettings,
    TicketSettings,
)
from mdr_connector.connector.engine import ConnectionSync
from mdr_connector.connector.errors import ConfigError
from mdr_connector.connector.i18n import N_, _
from mdr_connector.connector.service import open_connection
from mdr_connector.connector.store import Store
from mdr_connector.connector.sync_common import SyncStats
from mdr_connector.connector.tickets import TicketRef

CLIENT_ID = "demo0client0f1f1f1f1fc144a4b9a3af"
CONNECTION_NAME = "mdr-connector demo"
ANALYST = "Ирина Волкова (Kaspersky MDR SOC)"
ANALYST_COMMENT = (
    "<p>Повторная активность на <b>WS-FIN-017</b>: тот же <code>powershell -enc</code>. "
    "Рекомендуем изолировать хост. 🔒</p><p>Repeated activity, please isolate the host.</p>"
)
ENGINEER_COMMENT = "Host *WS-FIN-017* isolated by the network team. Хост изолирован, проверяем логи ✅"


def say(message: str) -> None:
    print(message, flush=True)


class DemoTickets(Protocol):
    """The ticket side of the demo: a simulator or a server, its settings, and a person's comment."""

    title: str
    # The line that shows where the ticket system runs, untranslated.
    url_line: str

    def serve(self) -> contextlib.AbstractAsyncContextManager[str]:
        """Start the ticket system when the demo runs it, and yield its base URL."""

    def ticket_settings(self, workdir: Path, url: str) -> TicketSettings:
        """Return the connection's `ticket` settings, with secrets in files under `workdir`."""

    async def add_person_comment(self, ref: TicketRef, text: str) -> bool:
        """Comment on the ticket as a person; return False when the demo has no person's account."""

    def mapping(self, workdir: Path) -> str:
        """Return the mapping reference of the demo connection."""


class JiraDemo:
    """The Jira simulator, as Jira Cloud."""

    title = "Jira"
    url_line = N_("Jira simulator: {url}")

    def __init__(self) -> None:
        self.sim = jira_simulator.JiraSimulator(deployment="cloud")

    def serve(self) -> contextlib.AbstractAsyncContextManager[str]:
        return jira_simulator.run_simulator(self.sim)

    def ticket_settings(self, workdir: Path, url: str) -> TicketSettings:
        token = write_secret(workdir / "jira-api-token", jira_simulator.SERVICE_TOKEN)
        return JiraSettings(
            system="jira",
            url=url,
            auth=JiraApiTokenAuth(type="api_token", email=jira_simulator.SERVICE_EMAIL, token=SecretRef(file=token)),
            search_delay_seconds=0,
        )

    async def add_person_comment(self, ref: TicketRef, text: str) -> bool:
        self.sim.add_comment(ref.key, text)
        return True

    def mapping(self, workdir: Path) -> str:
        return "builtin:jira"


class ServiceNowDemo:
    """The ServiceNow simulator, reached with Basic auth."""

    title = "ServiceNow"
    url_line = N_("ServiceNow simulator: {url}")

    def __init__(self) -> None:
        self.sim = servicenow_simulator.ServiceNowSimulator()

    def serve(self) -> contextlib.AbstractAsyncContextManager[str]:
        return servicenow_simulator.run_simulator(self.sim)

    def ticket_settings(self, workdir: Path, url: str) -> TicketSettings:
        password = write_secret(workdir / "servicenow-password", servicenow_state.SERVICE_PASSWORD)
        return ServiceNowSettings(
            system="servicenow",
            url=url,
            auth=ServiceNowBasicAuth(type="basic", username=servicenow_state.SERVICE_USER, password=SecretRef(file=password)),
        )

    async def add_person_comment(self, ref: TicketRef, text: str) -> bool:
        self.sim.add_human_comment(ref.key, text)
        return True

    def mapping(self, workdir: Path) -> str:
        return "builtin:servicenow"


class RedmineDemo:
    """A Redmine server the user runs, reached with the connector's API key and, optionally, a person's."""

    title = "Redmine"
    url_line = N_("Redmine server: {url}")

    def __init__(self, *, url: str, key_file: Path, person_key_file: Path | None, project: str) -> None:
        self.url = url.rstrip("/")
        self.key_file = key_file
        self.person_key_file = person_key_file
        self.project = project

    def serve(self) -> contextlib.AbstractAsyncContextManager[str]:
        return contextlib.nullcontext(self.url)

    def ticket_settings(self, workdir: Path, url: str) -> TicketSettings:
        return RedmineSettings(system="redmine", url=url, api_key=SecretRef(file=self.key_file.resolve()))

    async def add_person_comment(self, ref: TicketRef, text: str) -> bool:
        if self.person_key_file is None:
            return False
        key = SecretRef(file=self.person_key_file.resolve()).read()
        async with aiohttp.ClientSession() as session:
            async with session.put(
                f"{self.url}/issues/{ref.id}.json",
                json={"issue": {"notes": text}},
                headers={"X-Redmine-API-Key": key},
                allow_redirects=False,
            ) as reply:
                if reply.status >= 300:
                    raise ConfigError(
                        _("Redmine refused the person's comment on {key} with HTTP {status}; check --redmine-person-key-file").format(
                            key=ref.key, status=reply.status)
                    )
        return True

    def mapping(self, workdir: Path) -> str:
        """The built-in Redmine mapping, with the project the user named."""
        raw = yaml.safe_load(resources.files("mdr_connector.mappings").joinpath("redmine.yaml").read_text(encoding="utf-8"))
        raw["project"] = self.project
        path = workdir / "mapping-redmine.yaml"
        path.write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False), encoding="utf-8")
        return str(path)


def write_secret(path: Path, value: str) -> Path:
    path.write_text(value, encoding="utf-8")
    path.chmod(0o600)
    return path


async def run_demo(*, incidents: int, keep: bool, tickets: DemoTickets | None = None) -> int:
    """Run the demo and print its summary; return the exit code."""
    workdir = Path(tempfile.mkdtemp(prefix="mdr-connector-demo-"))
    try:
        return await _run_demo(workdir, incidents, tickets or JiraDemo())
    finally:
        if keep:
            say(_("Demo files kept in {path}").format(path=workdir))
        else:
            shutil.rmtree(workdir, ignore_errors=True)


async def _run_demo(workdir: Path, incident_count: int, tickets: DemoTickets) -> int:
    mdr_sim = mdr_simulator.MdrSimulator(seed=2026)

    async with mdr_simulator.run_simulator(mdr_sim) as mdr_url, tickets.serve() as ticket_url:
        say(_("MDR simulator:  {url}").format(url=mdr_url))
        say(_(tickets.url_line).format(url=ticket_url))

        mdr_sim.create_client(CLIENT_ID, connection_name=CONNECTION_NAME)
        seeded = mdr_sim.seed_demo_incidents(CLIENT_ID, incident_count)
        say(_("Seeded {count} MDR incidents with SOC comments").format(count=len(seeded)))

        settings = demo_settings(workdir, mdr_url, tickets.ticket_settings(workdir, ticket_url), tickets.mapping(workdir))
        connection = settings.connections[0]
        write_demo_config(workdir, settings)

        async with MdrClient(connection.mdr) as mdr:
            status = await mdr.tokens.activate(mdr_sim.issue_console_token(CLIENT_ID))
        say(_("Token chain activated: {state}").format(state=_(status.state)))

        # Tickets changed from here on are this run's: a Redmine server may keep those of earlier runs.
        started = datetime.now(timezone.utc).replace(microsecond=0)
        store = await Store.open(settings.resolved_database_url())
        try:
            async with open_connection(settings, connection, store) as sync:
                await run_cycles(sync, 2)
                await add_new_comments(mdr_sim, sync, tickets, seeded[0]["incident_id"])
                await run_cycles(sync, 2)
                stats = sync.stats
                problems = await consistency_problems(mdr_sim, sync, len(seeded), started)
        finally:
            await store.close()

    print_summary(stats, problems)
    return 0 if not problems else 1


def demo_settings(workdir: Path, mdr_url: str, ticket: TicketSettings, mapping: str) -> Settings:
    token_dir = workdir / "tokens"
    token_dir.mkdir(mode=0o700)

    return Settings(
        data_dir=workdir,
        connections=[
            ConnectionSettings(
                name="demo",
                mdr=MdrSettings(
                    base_url=mdr_url,
                    client_id=CLIENT_ID,
                    connection_name=CONNECTION_NAME,
                    token_dir=token_dir,
                ),
                ticket=ticket,
                mapping=mapping,
                sync=SyncSettings(interval_seconds=1),
            )
        ],
    )


def write_demo_config(workdir: Path, settings: Settings) -> None:
    """Leave the equivalent config.yaml beside the database, as a starting point for a real one."""
    document = settings.model_dump(mode="json", exclude_none=True)
    (workdir / "config.yaml").write_text(
        yaml.safe_dump(document, allow_unicode=True, sort_keys=False), encoding="utf-8"
    )


async def run_cycles(sync: ConnectionSync, count: int) -> None:
    for _cycle in range(count):
        before = (sync.stats.tickets_created, sync.stats.comments_to_ticket, sync.stats.comments_to_mdr)
        stats = await sync.run_cycle()
        say(
            _("Cycle {cycle}: {created} tickets created, {to_ticket} comments to the ticket system, {to_mdr} comments to MDR").format(
                cycle=stats.cycles,
                created=stats.tickets_created - before[0],
                to_ticket=stats.comments_to_ticket - before[1],
                to_mdr=stats.comments_to_mdr - before[2],
            )
        )


async def add_new_comments(
    mdr_sim: mdr_simulator.MdrSimulator, sync: ConnectionSync, tickets: DemoTickets, incident_id: str
) -> None:
    """Add an analyst comment in MDR and, where the demo has a person's account, an engineer comment on the ticket."""
    mdr_sim.add_soc_comment(CLIENT_ID, incident_id, ANALYST_COMMENT, author=ANALYST)
    ref = await sync.tickets.find_ticket(incident_id)
    assert ref is not None, "the first two cycles created a ticket for every seeded incident"
    if await tickets.add_person_comment(ref, ENGINEER_COMMENT):
        say(_("Added an analyst comment in MDR and an engineer comment on {system} ticket {key}").format(
            system=tickets.title, key=ref.key))
    else:
        say(_("Added an analyst comment in MDR and none on {system} ticket {key}: no person's account was given").format(
            system=tickets.title, key=ref.key))


async def consistency_problems(
    mdr_sim: mdr_simulator.MdrSimulator, sync: ConnectionSync, incident_count: int, started: datetime
) -> list[str]:
    """Count through the ticket adapter and on the MDR simulator: one ticket per incident, no comment posted twice."""
    problems = []
    changes = await sync.tickets.changed_tickets(started)
    tickets = {change.ref.id: change.ref for change in changes}
    if len(tickets) != incident_count:
        problems.append(_("expected one ticket per incident ({expected}), found {found}").format(
            expected=incident_count, found=len(tickets)))

    for ref in tickets.values():
        comments = await sync.tickets.list_comments(ref)
        sources = Counter((comment.marker.origin, comment.marker.source_id) for comment in comments if comment.marker)
        if any(count > 1 for count in sources.values()):
            problems.append(_("duplicate comments on {key}").format(key=ref.key))

    for record in mdr_sim.incidents(CLIENT_ID):
        bodies = Counter(comment["text"] for comment in mdr_sim.comments(CLIENT_ID, record["incident_id"]))
        if any(count > 1 for count in bodies.values()):
            problems.append(_("duplicate comments on MDR incident {id}").format(id=record["incident_id"]))
    return problems


def print_summary(stats: SyncStats, problems: list[str]) -> None:
    say("")
    say(_("Summary"))
    say("  " + _("incidents seen:                 {count}").format(count=len(stats.incidents_seen)))
    say("  " + _("tickets created:                {count}").format(count=stats.tickets_created))
    say("  " + _("comments mirrored to tickets:   {count}").format(count=stats.comments_to_ticket))
    say("  " + _("comments mirrored to MDR:       {count}").format(count=stats.comments_to_mdr))
    say("  " + _("echoes suppressed:              {count}").format(count=len(stats.echoes_suppressed)))
    say("  " + _("failures:                       {count}").format(count=stats.failures))
    if problems:
        for problem in problems:
            say("  " + _("PROBLEM: {problem}").format(problem=problem))
    else:
        say("  " + _("check: one ticket per incident, no comment duplicated on either side"))
