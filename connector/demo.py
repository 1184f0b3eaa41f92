"""`mdr-connector demo`: the whole sync against the MDR and Jira simulators on loopback.

The demo builds the same objects the service builds from config.yaml, so
what it shows is the production code path: the token chain is activated
with a console-issued token, SQLite keeps the ledger in a temporary folder,
and the engine runs real cycles over HTTP.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from pathlib import Path

import yaml

from mdr_connector.adapters.jira import simulator as jira_simulator
from mdr_connector.adapters.mdr import simulator as mdr_simulator
from mdr_connector.adapters.mdr.client import MdrClient
from mdr_connector.connector.config import (
    ConnectionSettings,
    JiraApiTokenAuth,
    JiraSettings,
    MdrSettings,
    SecretRef,
    Settings,
    SyncSettings,
)
from mdr_connector.connector.engine import ConnectionSync
from mdr_connector.connector.i18n import _
from mdr_connector.connector.service import open_connection
from mdr_connector.connector.store import Store
from mdr_connector.connector.sync_common import SyncStats

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


async def run_demo(*, incidents: int, keep: bool) -> int:
    """Run the demo and print its summary; return the exit code."""
    workdir = Path(tempfile.mkdtemp(prefix="mdr-connector-demo-"))
    try:
        return await _run_demo(workdir, incidents)
    finally:
        if keep:
            say(_("Demo files kept in {path}").format(path=workdir))
        else:
            shutil.rmtree(workdir, ignore_errors=True)


async def _run_demo(workdir: Path, incident_count: int) -> int:
    mdr_sim = mdr_simulator.MdrSimulator(seed=2026)
    jira_sim = jira_simulator.JiraSimulator(deployment="cloud")

    async with (
        mdr_simulator.run_simulator(mdr_sim) as mdr_url,
        jira_simulator.run_simulator(jira_sim) as jira_url,
    ):
        say(_("MDR simulator:  {url}").format(url=mdr_url))
        say(_("Jira simulator: {url}").format(url=jira_url))

        mdr_sim.create_client(CLIENT_ID, connection_name=CONNECTION_NAME)
        seeded = mdr_sim.seed_demo_incidents(CLIENT_ID, incident_count)
        say(_("Seeded {count} MDR incidents with SOC comments").format(count=len(seeded)))

        settings = demo_settings(workdir, mdr_url, jira_url)
        connection = settings.connections[0]
        write_demo_config(workdir, settings)

        async with MdrClient(connection.mdr) as mdr:
            status = await mdr.tokens.activate(mdr_sim.issue_console_token(CLIENT_ID))
        say(_("Token chain activated: {state}").format(state=_(status.state)))

        store = await Store.open(settings.resolved_database_url())
        try:
            async with open_connection(settings, connection, store) as sync:
                await run_cycles(sync, 2)
                first_ticket = add_new_comments(mdr_sim, jira_sim, seeded[0]["incident_id"])
                say(_("Added an analyst comment in MDR and an engineer comment in Jira {key}").format(key=first_ticket))
                await run_cycles(sync, 2)
                stats = sync.stats
        finally:
            await store.close()

        problems = consistency_problems(mdr_sim, jira_sim, len(seeded))

    print_summary(stats, problems)
    return 0 if not problems else 1


def demo_settings(workdir: Path, mdr_url: str, jira_url: str) -> Settings:
    token_dir = workdir / "tokens"
    token_dir.mkdir(mode=0o700)
    jira_token = workdir / "jira-api-token"
    jira_token.write_text(jira_simulator.SERVICE_TOKEN, encoding="utf-8")
    jira_token.chmod(0o600)

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
                ticket=JiraSettings(
                    system="jira",
                    url=jira_url,
                    auth=JiraApiTokenAuth(
                        type="api_token",
                        email=jira_simulator.SERVICE_EMAIL,
                        token=SecretRef(file=jira_token),
                    ),
                    search_delay_seconds=0,
                ),
                mapping="builtin:jira",
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
            _("Cycle {cycle}: {created} tickets created, {to_ticket} comments to Jira, {to_mdr} comments to MDR").format(
                cycle=stats.cycles,
                created=stats.tickets_created - before[0],
                to_ticket=stats.comments_to_ticket - before[1],
                to_mdr=stats.comments_to_mdr - before[2],
            )
        )


def add_new_comments(
    mdr_sim: mdr_simulator.MdrSimulator, jira_sim: jira_simulator.JiraSimulator, incident_id: str
) -> str:
    """Add an analyst comment in MDR and an engineer comment on the incident's Jira issue."""
    mdr_sim.add_soc_comment(CLIENT_ID, incident_id, ANALYST_COMMENT, author=ANALYST)
    issue = next(
        issue for issue in jira_sim.issues.values() if f"mdr-{incident_id}" in issue.fields.get("labels", [])
    )
    jira_sim.add_comment(issue.key, ENGINEER_COMMENT)
    return issue.key


def consistency_problems(
    mdr_sim: mdr_simulator.MdrSimulator, jira_sim: jira_simulator.JiraSimulator, incident_count: int
) -> list[str]:
    """Count on both simulators: one issue per incident, no comment posted twice."""
    problems = []
    labels = Counter(
        label for issue in jira_sim.issues.values() for label in issue.fields.get("labels", []) if label.startswith("mdr-") and label != "mdr-connector"
    )
    if len(labels) != incident_count or any(count != 1 for count in labels.values()):
        problems.append(_("expected one Jira issue per incident, found {labels}").format(labels=dict(labels)))

    for issue in jira_sim.issues.values():
        sources = Counter(
            comment.properties.get("mdr-connector", {}).get("source_id") for comment in issue.comments
        )
        sources.pop(None, None)
        if any(count > 1 for count in sources.values()):
            problems.append(_("duplicate comments on {key}").format(key=issue.key))

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
    say("  " + _("comments mirrored MDR -> Jira:  {count}").format(count=stats.comments_to_ticket))
    say("  " + _("comments mirrored Jira -> MDR:  {count}").format(count=stats.comments_to_mdr))
    say("  " + _("echoes suppressed:              {count}").format(count=len(stats.echoes_suppressed)))
    say("  " + _("failures:                       {count}").format(count=stats.failures))
    if problems:
        for problem in problems:
            say("  " + _("PROBLEM: {problem}").format(problem=problem))
    else:
        say("  " + _("check: one ticket per incident, no comment duplicated on either side"))
