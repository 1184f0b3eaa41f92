"""Run a fault storm for minutes and check that nothing is lost or duplicated.

    .venv/bin/python bench/fault_storm.py [--incidents 200] [--minutes 2] [--seed 1] [--latency-ms 20]

The MDR and Jira simulators run in this process, so the script can read
their fault counts and move their clocks. Both get the storm on every API
endpoint: 20% 5xx, 5% of replies dropped after the change was applied, and
10% 429 with `Retry-After: 0`. The scenario is the one of
tests/test_fault_storm.py at a larger size:

1. `--incidents` MDR incidents, each with a SOC comment and an attachment;
   cycles run until every incident has its issue and nothing is parked;
2. a person comments on each issue and attaches a file, every third issue
   is moved to Done, MDR adds a second comment to each incident and resolves
   every third one; cycles run until nothing is parked;
3. cycles go on under the storm until `--minutes` of wall time have passed;
4. the faults end, and cycles run until nothing is parked.

Each cycle moves the connector's and the simulators' clocks forward by 31 s,
so parked items come due and Jira's search delay has passed.

The figures are the faults fired per kind on each simulator, the cycles each
stage took, the most items parked at once, the errors that ended cycles
early, and the final difference from the expected end state: one issue per
incident, each comment and file once on both sides, the mapped statuses.
The script exits 1 when that difference is not empty or a stage does not
settle within its cycle limit, and 0 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import common

STORM = (
    {"kind": "server_error", "probability": 0.20},
    {"kind": "drop_after_commit", "probability": 0.05},
    {"kind": "rate_limit", "probability": 0.10, "retry_after_seconds": 0},
)
CYCLE_SECONDS = 31
SETTLED_CYCLES = 2
MAX_STAGE_CYCLES = 80
MARKER = re.compile(r"\b(?:mdr|ticket) note \d+[ab]?\b")
STATUS_RULES = {
    "to_ticket": {"Open": "To Do", "On hold": "On Hold", "Resolved": "Done", "Closed": "Done"},
    "close_mdr": {"enabled": True, "done_statuses": ["Done"], "resolutions": {"Done": "TRUE_POSITIVE"}},
}


@dataclass
class Run:
    """Figures of one run: cycles per stage, the parked peak, the errors that ended cycles, the storm's wall time."""

    stage_cycles: dict[str, int] = field(default_factory=dict)
    parked_peak: int = 0
    cycle_errors: Counter[str] = field(default_factory=Counter)
    storm_seconds: float = 0.0


class Clock:
    """The connector's clock, kept level with both simulators' clocks as they move forward together."""

    def __init__(self, mdr_sim: Any, jira_sim: Any) -> None:
        self.offset = timedelta()
        self.sims = (mdr_sim, jira_sim)

    def now(self) -> datetime:
        return datetime.now(timezone.utc) + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)
        for sim in self.sims:
            sim.advance(seconds)


async def settle(sync: Any, store: Any, clock: Clock, run: Run, stage: str, *, min_seconds: float = 0.0) -> bool:
    """Run cycles until nothing has been parked for SETTLED_CYCLES cycles and `min_seconds` have passed.

    Return False when the stage does not settle within MAX_STAGE_CYCLES
    cycles after `min_seconds` have passed.
    """
    from mdr_connector.connector.errors import ConnectionFatalError, ConnectorError

    started = time.monotonic()
    quiet = 0
    cycle = 0
    cycles_after_minimum = 0
    while cycles_after_minimum < MAX_STAGE_CYCLES:
        cycle += 1
        if time.monotonic() - started >= min_seconds:
            cycles_after_minimum += 1
        clock.advance(CYCLE_SECONDS)
        try:
            await sync.run_cycle()
        except ConnectionFatalError:
            raise
        except ConnectorError as err:
            run.cycle_errors[type(err).__name__] += 1
            quiet = 0
            continue
        parked = await store.count_parked(common.CONNECTION)
        run.parked_peak = max(run.parked_peak, parked)
        quiet = quiet + 1 if parked == 0 else 0
        if quiet >= SETTLED_CYCLES and time.monotonic() - started >= min_seconds:
            run.stage_cycles[stage] = cycle
            return True
    run.stage_cycles[stage] = cycle
    return False


def seed(mdr_sim: Any, count: int) -> list[str]:
    incident_ids = []
    for number in range(count):
        incident_id = mdr_sim.seed_incident(common.CLIENT_ID, summary=f"Storm incident {number}")["incident_id"]
        mdr_sim.add_soc_comment(common.CLIENT_ID, incident_id, f"<p>mdr note {number}a</p>", author="SOC Analyst")
        mdr_sim.add_attachment(common.CLIENT_ID, incident_id, f"mdr-{number}.txt", f"evidence {number}".encode())
        incident_ids.append(incident_id)
    return incident_ids


def issues_of(jira_sim: Any, incident_id: str) -> list[Any]:
    return [issue for issue in jira_sim.issues.values() if f"mdr-{incident_id}" in issue.fields.get("labels", [])]


def change_both_sides(mdr_sim: Any, jira_sim: Any, incident_ids: list[str]) -> None:
    for number, incident_id in enumerate(incident_ids):
        [issue] = issues_of(jira_sim, incident_id)
        jira_sim.add_comment(issue.key, f"ticket note {number}")
        jira_sim.add_attachment(issue.key, f"jira-{number}.txt", f"log {number}".encode())
        if number % 3 == 1:
            jira_sim.transition_as_human(issue.key, "Done", resolution="Done")
        mdr_sim.add_soc_comment(common.CLIENT_ID, incident_id, f"<p>mdr note {number}b</p>", author="SOC Analyst")
        if number % 3 == 0:
            mdr_sim.update_incident(common.CLIENT_ID, incident_id, status="Resolved")


def differences(mdr_sim: Any, jira_sim: Any, incident_ids: list[str]) -> list[str]:
    """Return one line per incident whose end state is not the expected one."""
    problems = []
    for number, incident_id in enumerate(incident_ids):
        notes = Counter({f"mdr note {number}a": 1, f"mdr note {number}b": 1, f"ticket note {number}": 1})
        files = sorted([f"mdr-{number}.txt", f"jira-{number}.txt"])
        status = "Done" if number % 3 in (0, 1) else "To Do"
        issues = issues_of(jira_sim, incident_id)
        if len(issues) != 1:
            problems.append(f"incident {number}: {len(issues)} issues, expected 1")
            continue
        issue = issues[0]
        found = {
            "MDR comments": Counter(MARKER.findall(" ".join(c["text"] for c in mdr_sim.comments(common.CLIENT_ID, incident_id)))),
            "MDR files": sorted(a["full_name"] for a in mdr_sim.attachments(common.CLIENT_ID, incident_id)),
            "Jira comments": Counter(MARKER.findall(" ".join(comment.body for comment in issue.comments))),
            "Jira files": sorted(attachment.filename for attachment in issue.attachments),
            "Jira status": issue.fields["status"],
        }
        expected = {"MDR comments": notes, "MDR files": files, "Jira comments": notes, "Jira files": files, "Jira status": status}
        problems.extend(
            f"incident {number} ({issue.key}): {name} {found[name]!r}, expected {expected[name]!r}"
            for name in expected
            if found[name] != expected[name]
        )
    return problems


async def run_storm(args: argparse.Namespace, work: Path) -> int:
    from mdr_connector.adapters.jira.simulator import JiraSimulator
    from mdr_connector.adapters.jira.simulator import run_simulator as run_jira
    from mdr_connector.adapters.mdr.simulator import MdrSimulator
    from mdr_connector.adapters.mdr.simulator import run_simulator as run_mdr
    from mdr_connector.connector import retry

    if not args.real_pauses:
        # The clients wait at least 1 s after a 429 even with `Retry-After: 0`;
        # at 10% of calls that alone would take most of the run.
        retry.MIN_PAUSE_SECONDS = 0.0
    mdr_sim = MdrSimulator(seed=args.seed)
    mdr_sim.create_client(common.CLIENT_ID, connection_name=common.MDR_CONNECTION_NAME)
    mdr_sim.settings.latency_seconds = args.latency_ms / 1000
    jira_sim = JiraSimulator(deployment="cloud", latency_seconds=args.latency_ms / 1000)
    clock = Clock(mdr_sim, jira_sim)
    run = Run()
    try:
        async with run_mdr(mdr_sim) as mdr_url, run_jira(jira_sim) as jira_url:
            sims = SimpleNamespace(mdr=SimpleNamespace(url=mdr_url), jira=SimpleNamespace(url=jira_url))
            mapping = work / "mapping.yaml"
            write_mapping(mapping)
            settings = common.connection_settings(work, sims, mapping=str(mapping), retry_base_seconds=1, retry_max_seconds=2)
            await common.activate_token(settings, mdr_sim.issue_console_token(common.CLIENT_ID))
            incident_ids = seed(mdr_sim, args.incidents)

            async with common.ledger(settings) as store, common.connection_sync(settings, store) as sync:
                sync.clock = clock.now
                mdr_sim.faults.configure({"seed": args.seed, "rules": list(STORM)})
                jira_sim.faults.configure({"seed": args.seed + 1, "rules": list(STORM)})
                started = time.monotonic()
                settled = await settle(sync, store, clock, run, "first sync")
                if settled:
                    change_both_sides(mdr_sim, jira_sim, incident_ids)
                    settled = await settle(sync, store, clock, run, "changes")
                if settled:
                    left = args.minutes * 60 - (time.monotonic() - started)
                    settled = await settle(sync, store, clock, run, "storm on", min_seconds=max(0.0, left))
                run.storm_seconds = time.monotonic() - started
                fired = {"MDR": Counter(mdr_sim.faults.fired), "Jira": Counter(jira_sim.faults.fired)}
                mdr_sim.faults.clear()
                jira_sim.faults.clear()
                settled = await settle(sync, store, clock, run, "faults off") and settled
            problems = differences(mdr_sim, jira_sim, incident_ids)
    finally:
        mdr_sim.close()

    print_figures(run, fired, problems)
    return 0 if settled and not problems else 1


def write_mapping(path: Path) -> None:
    """Write the built-in Jira mapping with the scenario's status rules."""
    from importlib import resources

    import yaml

    raw = yaml.safe_load(resources.files("mdr_connector.mappings").joinpath("jira.yaml").read_text(encoding="utf-8"))
    raw["status"] = STATUS_RULES
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")


def print_figures(run: Run, fired: dict[str, Counter[str]], problems: list[str]) -> None:
    for system, counts in fired.items():
        kinds = ", ".join(f"{kind} {counts[kind]}" for kind in ("server_error", "drop_after_commit", "rate_limit"))
        print(f"faults fired, {system:<4}  {kinds}")
    stages = ", ".join(f"{stage} {cycles}" for stage, cycles in run.stage_cycles.items())
    print(f"cycles to settle:    {stages}")
    print(f"storm wall time:     {run.storm_seconds:.0f} s")
    print(f"parked peak:         {run.parked_peak}")
    errors = ", ".join(f"{name} {count}" for name, count in sorted(run.cycle_errors.items())) or "none"
    print(f"cycles ended early:  {errors}")
    print(f"final diff:          {len(problems)}")
    for line in problems[:20]:
        print(f"FAIL {line}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Sync a scenario under a fault storm and compare the end state with the expected one.")
    parser.add_argument("--incidents", type=int, default=200, help="MDR incidents in the scenario (default: 200)")
    parser.add_argument("--minutes", type=float, default=2.0, help="wall minutes the storm lasts at least (default: 2)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the simulators and their fault plans (default: 1)")
    parser.add_argument("--real-pauses", action="store_true", help="keep the clients' 1-second minimum pause after a 429")
    parser.add_argument("--keep", action="store_true", help="keep the work folder with the ledger")
    common.add_latency_option(parser)
    args = parser.parse_args(argv)
    if args.incidents < 1 or args.minutes < 0:
        parser.error("--incidents must be 1 or more and --minutes 0 or more")

    common.print_header(
        "Fault storm: 20% 5xx, 5% dropped after commit, 10% 429 on every endpoint of MDR and Jira",
        f"{args.incidents} incidents, at least {args.minutes:g} min of storm, seed {args.seed}, latency {args.latency_ms:g} ms",
    )
    with common.work_folder("mdr-fault-storm-", keep=args.keep) as work:
        # The storm makes thousands of warnings; they go to a file in the work folder, not the terminal.
        with (work / "connector.log").open("w", encoding="utf-8") as log_file:
            from mdr_connector.connector.logs import configure_logging

            configure_logging("WARNING", "text", log_file)
            return asyncio.run(run_storm(args, work))


if __name__ == "__main__":
    sys.exit(main())
