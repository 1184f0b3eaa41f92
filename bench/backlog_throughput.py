"""Measure how fast the connector syncs a backlog from empty, against a one-call-at-a-time baseline script.

    .venv/bin/python bench/backlog_throughput.py [--incidents 2000] [--comments 3] [--baseline-incidents 500]
        [--mdr-concurrency 4] [--ticket-concurrency 4] [--in-flight 16] [--latency-ms 20] [--skip-baseline]
        [--backlog-hours 24]

Each run starts fresh MDR and Jira simulators in child processes and seeds
MDR with the incidents, each with `--comments` SOC comments of unique text.
The incidents were created one after another over `--backlog-hours`,
ending an hour before the run, and each comment 10 minutes after the one
before, as in a backlog that grew before the connector started. With
`--backlog-hours 0` every record is from the moment of the run. Then all
of them lie inside the connector's `mdr_overlap_seconds`, and each cycle
reads the whole history again to catch records that arrive late.

- Connector: the engine, built as the service builds it, runs cycles back
  to back from an empty ledger until every incident has its issue and
  every comment its copy. The time runs from opening the connection to the
  end of that cycle. One more cycle then runs and is reported on its own:
  it reconciles the issues that the connector's own writes changed.
- Baseline: a sequential script makes the fewest calls that produce the
  same issues, through the same client libraries, MdrClient (aiohttp) and
  the `jira` package. It reads `incidents/list` pages, where the comments
  come embedded, and `assets/details` for the asset table of the
  description. It creates each issue with the correlation labels and
  property in one call, and each comment with its marker property in one
  call. It renders the fields and converts the text with the connector's
  own mapping and markup functions, so both do the same conversion work.

Both results are checked on the Jira simulator: one issue per incident
with one copy of each comment. The figures are incidents per second for
each and their ratio. The target is at least 3 times the baseline.
Calls, CPU seconds, pandoc runs and, for the connector, ledger
transactions are also given per incident, because on a shared machine
they vary far less than the rates do.
The baseline runs one call at a time, so its rate does not depend on the
backlog size, and `--baseline-incidents` can be smaller than `--incidents`
to keep the run short.

The script exits 1 when an incident or comment is missing or duplicated,
and 0 otherwise, whether the target is met or not.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import common

TARGET_RATIO = 3.0
PAGE_SIZE = 100
# The time between an incident's creation and each of its comments in a spread backlog.
COMMENT_STEP_MS = 10 * 60 * 1000


@dataclass
class RunResult:
    """The figures of one run: incidents, seconds, calls, CPU time, and the problems found on the Jira simulator."""

    name: str
    incidents: int
    seconds: float
    calls: Counter[str]
    problems: list[str]
    cpu: dict[str, float]
    pandoc_runs: int = 0
    ledger_transactions: int = 0
    cycles: int = 0
    follow_up_seconds: float = 0.0
    follow_up_calls: int = 0

    @property
    def rate(self) -> float:
        return self.incidents / self.seconds


def check_issues(issues: list[dict[str, Any]], backlog: list[dict[str, Any]], comments: int) -> list[str]:
    """Return a problem for each incident without exactly one issue holding one copy of each of its comments."""
    by_incident: dict[str, list[dict[str, Any]]] = {}
    for issue in issues:
        by_incident.setdefault(issue["incident_id"], []).append(issue)

    problems = []
    for incident in backlog:
        found = by_incident.get(incident["incident_id"], [])
        if len(found) != 1:
            problems.append(f"incident {incident['incident_id']} has {len(found)} issues, expected 1")
            continue
        sources = Counter(comment["source_id"] for comment in found[0]["comments"] if comment["source_id"])
        if len(sources) != comments or any(count != 1 for count in sources.values()):
            problems.append(
                f"issue {found[0]['key']} has copies of {len(sources)} comments ({sum(sources.values())} in all), expected {comments}"
            )
    return problems


# The connector


async def run_connector(args: argparse.Namespace, work: Path) -> RunResult:
    with (work / "simulators.log").open("w", encoding="utf-8") as log_file, common.simulators(args.latency, log_file) as sims:
        backlog = await seed_backlog(sims, args, args.incidents)
        settings = common.connection_settings(
            work,
            sims,
            mdr_concurrency=args.mdr_concurrency,
            ticket_concurrency=args.ticket_concurrency,
            max_incidents_in_flight=args.in_flight,
        )
        await common.activate_token(settings, sims.mdr.details["console_token"])
        expected_comments = args.incidents * args.comments

        async with common.ledger(settings) as store:
            transactions = TransactionCounter(store)
            sims.reset_calls()
            meter = common.CpuMeter(sims)
            meter.start()
            started = time.perf_counter()
            pandoc = common.PandocCounter()
            async with common.connection_sync(settings, store) as sync:
                stats = sync.stats
                while stats.tickets_created < args.incidents or stats.comments_to_ticket < expected_comments:
                    before = (stats.tickets_created, stats.comments_to_ticket)
                    with pandoc.active():
                        await sync.run_cycle()
                    if (stats.tickets_created, stats.comments_to_ticket) == before:
                        break
                seconds = time.perf_counter() - started
                cpu = meter.spent()
                calls = Counter(sims.calls())
                cycles = stats.cycles
                ledger_transactions = transactions.count

                sims.reset_calls()
                started = time.perf_counter()
                await sync.run_cycle()
                follow_up_seconds = time.perf_counter() - started
                follow_up_calls = sum(sims.calls().values())
                failures = stats.failures

        problems = check_issues(await sims.jira.acall("issues"), backlog, args.comments)
        if failures:
            problems.append(f"{failures} incidents failed during the cycles; see the log on stderr")
    return RunResult(
        "connector",
        args.incidents,
        seconds,
        calls,
        problems,
        cpu,
        pandoc.runs,
        ledger_transactions,
        cycles,
        follow_up_seconds,
        follow_up_calls,
    )


async def seed_backlog(sims: Any, args: argparse.Namespace, count: int) -> list[dict[str, Any]]:
    """Seed the backlog: spread over the `--backlog-hours` before the last hour, or all now when that is 0."""
    if args.backlog_hours <= 0:
        return await sims.mdr.acall("seed", count=count, comments=args.comments)
    span_ms = int(args.backlog_hours * 3600 * 1000)
    start_ms = common.epoch_ms(datetime.now(timezone.utc)) - span_ms - COMMENT_STEP_MS * (args.comments + 1) - 3600 * 1000
    return await sims.mdr.acall(
        "seed", count=count, comments=args.comments, start_ms=start_ms, step_ms=span_ms // count, comment_step_ms=COMMENT_STEP_MS
    )


class TransactionCounter:
    """A count of the transactions begun on a store's database from the counter's creation on, reads included."""

    def __init__(self, store: Any) -> None:
        from sqlalchemy import event

        self.count = 0
        event.listen(store.engine.sync_engine, "begin", self._begun)

    def _begun(self, _connection: Any) -> None:
        self.count += 1


# The baseline


async def run_baseline(args: argparse.Namespace, work: Path) -> RunResult:
    with (work / "simulators.log").open("w", encoding="utf-8") as log_file, common.simulators(args.latency, log_file) as sims:
        backlog = await seed_backlog(sims, args, args.baseline_incidents)
        settings = common.connection_settings(work, sims)
        await common.activate_token(settings, sims.mdr.details["console_token"])

        sims.reset_calls()
        meter = common.CpuMeter(sims)
        meter.start()
        started = time.perf_counter()
        with common.PandocCounter().active() as pandoc:
            await copy_backlog(settings.connections[0], sims.jira.url)
        seconds = time.perf_counter() - started
        cpu = meter.spent()
        calls = Counter(sims.calls())
        problems = check_issues(await sims.jira.acall("issues"), backlog, args.comments)
    return RunResult("baseline", args.baseline_incidents, seconds, calls, problems, cpu, pandoc.runs)


async def copy_backlog(connection: Any, jira_url: str) -> None:
    """Copy every incident and its embedded comments to Jira, one call at a time."""
    from jira import JIRA

    from mdr_connector.adapters.jira.simulator import SERVICE_EMAIL, SERVICE_TOKEN
    from mdr_connector.adapters.mdr.client import MdrClient
    from mdr_connector.connector.mappingfile import load_mapping

    mapping = load_mapping(connection.mapping)
    jira = JIRA(server=jira_url, basic_auth=(SERVICE_EMAIL, SERVICE_TOKEN), max_retries=0)
    try:
        async with MdrClient(connection.mdr) as mdr:
            page_number = 1
            while True:
                page = await mdr.list_incidents(page=page_number, page_size=PAGE_SIZE, sort="creation_time:asc")
                for incident in page.items:
                    await copy_incident(mdr, jira, mapping, connection, incident)
                if page.raw_count < PAGE_SIZE:
                    return
                page_number += 1
    finally:
        jira.close()


async def copy_incident(mdr: Any, jira: Any, mapping: Any, connection: Any, incident: Any) -> None:
    """Create the incident's issue and add its comments, as the connector would write them."""
    from mdr_connector.adapters.mdr.models import parse_comment
    from mdr_connector.connector import markup
    from mdr_connector.connector.assets import AssetRow, affected_hosts, render_table
    from mdr_connector.connector.mapping import render_comment_for_ticket, render_draft

    hosts = affected_hosts(incident)
    limit = mapping.assets.max_assets
    rows = [AssetRow(host, await mdr.get_asset(host.asset_id)) for host in hosts[:limit]]
    draft = render_draft(
        mapping, incident, connection.mdr.console_url, connection.mdr.client_id, assets=render_table(rows, hosts[limit:], limit)
    )
    fields = {
        "project": {"key": draft.project},
        "issuetype": {"name": draft.issue_type},
        "summary": draft.fields.summary[:255],
        "description": markup.markdown_to_jira(draft.fields.description),
        "priority": {"name": draft.fields.priority},
        "labels": ["mdr-connector", f"mdr-{incident.incident_id}", *draft.fields.labels],
    }
    properties = [{"key": "mdr-connector", "value": {**draft.metadata, "incident_id": incident.incident_id}}]
    issue = post(jira, "issue", {"fields": fields, "properties": properties})

    for raw in incident.comments:
        comment = parse_comment(raw, incident.incident_id)
        created = datetime.fromtimestamp(comment.creation_time / 1000, tz=timezone.utc)
        text = render_comment_for_ticket(mapping, comment.author_name, created, markup.html_to_markdown(comment.text))
        marker = {"origin": "mdr", "source_id": comment.comment_id}
        post(jira, f"issue/{issue['id']}/comment", {"body": markup.markdown_to_jira(text), "properties": [{"key": "mdr-connector", "value": marker}]})


def post(jira: Any, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST one REST v2 request through the `jira` client's session; its session raises JIRAError on an error status."""
    response = jira._session.post(jira._get_url(path), data=json.dumps(body))
    return response.json()


# Output


def print_result(result: RunResult) -> None:
    total = sum(result.calls.values())
    print(
        f"{result.name:<10} {result.incidents} incidents in {result.seconds:.1f} s: {result.rate:.2f} incidents/s, "
        f"{total} API calls ({total / result.incidents:.1f} per incident)"
    )
    for method, count in sorted(result.calls.items(), key=lambda item: -item[1]):
        print(f"           {count:>6}  {method}")
    print(f"           {common.cpu_line(result.cpu, result.seconds)}")
    per_incident = (
        f"           per incident: {sum(result.cpu.values()) / result.incidents * 1000:.0f} ms CPU in all, "
        f"{result.cpu['connector process'] / result.incidents * 1000:.0f} ms in the connector's process, "
        f"{result.pandoc_runs / result.incidents:.1f} pandoc runs"
    )
    if result.name == "connector":
        per_incident += f", {result.ledger_transactions / result.incidents:.1f} ledger transactions"
    print(per_incident)
    if result.cycles:
        print(
            f"           {result.cycles} cycles; the cycle after them took {result.follow_up_seconds:.1f} s "
            f"and {result.follow_up_calls} calls"
        )


async def run(args: argparse.Namespace) -> int:
    with common.work_folder("mdr-bench-backlog-") as work:
        connector = await run_connector(args, work)
    print_result(connector)

    problems = list(connector.problems)
    if not args.skip_baseline:
        with common.work_folder("mdr-bench-baseline-") as work:
            baseline = await run_baseline(args, work)
        print_result(baseline)
        problems += baseline.problems
        ratio = connector.rate / baseline.rate
        print(f"ratio connector / baseline: {ratio:.2f}")
        print(f"target: at least {TARGET_RATIO:g} times the baseline: {common.verdict(ratio >= TARGET_RATIO)}")

    for problem in problems[:20]:
        print(f"FAIL {problem}")
    if len(problems) > 20:
        print(f"FAIL ... and {len(problems) - 20} more problems")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure backlog sync throughput against a one-call-at-a-time baseline.")
    parser.add_argument("--incidents", type=int, default=2000, help="incidents in the connector's backlog (default: 2000)")
    parser.add_argument("--comments", type=int, default=3, help="SOC comments per incident (default: 3)")
    parser.add_argument("--baseline-incidents", type=int, default=500,
                        help="incidents in the baseline's backlog (default: 500)")
    parser.add_argument("--mdr-concurrency", type=int, default=4, help="the connection's mdr.max_concurrency (default: 4)")
    parser.add_argument("--ticket-concurrency", type=int, default=4,
                        help="the connection's ticket.max_concurrency (default: 4)")
    parser.add_argument("--in-flight", type=int, default=16,
                        help="the connection's sync.max_incidents_in_flight (default: 16)")
    parser.add_argument("--skip-baseline", action="store_true", help="run the connector only")
    parser.add_argument(
        "--backlog-hours",
        type=float,
        default=24,
        help="hours over which the incidents were created, ending an hour before the run; 0 creates all of them now (default: 24)",
    )
    common.add_latency_option(parser)
    args = parser.parse_args(argv)
    if min(args.incidents, args.baseline_incidents, args.in_flight) < 1 or args.comments < 0:
        parser.error("--incidents, --baseline-incidents and --in-flight must be at least 1, and --comments at least 0")
    args.latency = args.latency_ms / 1000

    common.configure_logging()
    common.print_header(
        "Backlog throughput: first sync of a backlog, connector against a sequential baseline",
        f"{args.incidents} incidents (baseline {args.baseline_incidents}) with {args.comments} comments each, "
        f"mdr.max_concurrency {args.mdr_concurrency}, ticket.max_concurrency {args.ticket_concurrency}, "
        f"sync.max_incidents_in_flight {args.in_flight}, latency {args.latency_ms:g} ms, "
        f"backlog over {args.backlog_hours:g} hours",
    )
    try:
        return common.run(run(args))
    except RuntimeError as err:
        print(f"FAIL {err}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
