"""Time sync cycles with 1,000 and with 1,000,000 rows in the ledger's links table.

    .venv/bin/python bench/store_scale.py [--rows 1000,1000000] [--changed 10] [--rounds 5] [--latency-ms 20]
                                          [--postgres-url postgresql://postgres@127.0.0.1:5432/postgres]

For each row count, a pair of simulators starts in child processes and a
ledger is created. It is an SQLite file in a temporary folder, or, with
`--postgres-url`, a scratch database on that PostgreSQL server, created
through the database the URL names and dropped at the end. `--changed` incidents are
seeded as linked long ago, on both sides and in the ledger, and the rest of
the rows are filler links of incidents that exist only in the ledger,
inserted in bulk through SQLAlchemy core. Three warm-up cycles and one
untimed round, which writes the issue fields and fills the asset cache,
come first. Then each round times, for every row count in turn:

- an idle cycle, with nothing changed;
- a cycle after one new SOC comment on each of the `--changed` incidents,
  which copies those comments to Jira.

An untimed cycle follows, which reconciles the issues that the copies
changed, so the next idle cycle is idle again. Then the round times
`Store.counts`, which the service's runner calls after every successful
cycle to set the metrics gauges. The figures are the medians
over the rounds, and the ratio of the largest row count's median to the
smallest one's. The target, a ratio under 1.2, applies to the two cycles. Only the links table is
filled: synced_items and the other tables stay small. The ledger folder
and the scratch databases are removed at the end.

The script exits 1 when a comment is not copied or a cycle fails, and 0
otherwise, whether the target is met or not.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import text

import common

TARGET_RATIO = 1.2
WARMUP_CYCLES = 3
FILLER_CHUNK = 20_000


@dataclass
class Setup:
    """One row count with its simulators, ledger, engine and timings."""

    rows: int
    sims: common.Simulators
    store: Any
    sync: Any
    work: Path
    linked: list[dict[str, Any]]
    idle_seconds: list[float] = field(default_factory=list)
    changed_seconds: list[float] = field(default_factory=list)
    counts_seconds: list[float] = field(default_factory=list)
    idle_calls: Counter[str] = field(default_factory=Counter)
    changed_calls: Counter[str] = field(default_factory=Counter)


def filler_rows(start: int, count: int, now: datetime) -> Iterator[dict[str, Any]]:
    """Yield links of incidents closed long ago, whose ids and ticket ids clash with nothing the simulators make."""
    for number in range(start, start + count):
        changed = now - timedelta(days=40, seconds=number)
        yield {
            "connection": common.CONNECTION,
            "incident_id": f"F{number:019d}",
            "incident_number": 1_000_000 + number,
            "state": "linked",
            "ticket_key": f"OLD-{number}",
            "ticket_id": str(100_000_000 + number),
            "ticket_url": f"https://jira.invalid/browse/OLD-{number}",
            "create_started_at": None,
            "mdr_update_time": int(changed.timestamp() * 1000),
            "ticket_updated": changed,
            "fields_hash": None,
            "ticket_status": None,
            "mdr_status": None,
            "created_at": changed,
            "updated_at": changed,
        }


async def fill(store: Any, count: int) -> None:
    now = datetime.now(timezone.utc)
    for start in range(0, count, FILLER_CHUNK):
        rows = list(filler_rows(start, min(FILLER_CHUNK, count - start), now))
        await common.insert_links(store, rows, chunk=FILLER_CHUNK)


async def ledger_size_mb(store: Any, work: Path) -> float:
    if store.engine.dialect.name == "postgresql":
        async with store.engine.connect() as connection:
            size = await connection.scalar(text("SELECT pg_database_size(current_database())"))
        return size / 1024 / 1024
    return sum(path.stat().st_size for path in work.glob("mdr-connector.db*")) / 1024 / 1024


async def open_setup(stack: contextlib.AsyncExitStack, rows: int, changed: int, latency: float, postgres_url: str | None) -> Setup:
    """Start the simulators, fill the ledger to `rows` links, open the engine and run the warm-up cycles."""
    work = stack.enter_context(common.work_folder(f"mdr-bench-store-{rows}-"))
    log_file = stack.enter_context((work / "simulators.log").open("w", encoding="utf-8"))
    sims = stack.enter_context(common.simulators(latency, log_file))
    database_url = await stack.enter_async_context(common.scratch_database(postgres_url)) if postgres_url else None
    settings = common.connection_settings(work, sims, database_url=database_url)
    await common.activate_token(settings, sims.mdr.details["console_token"])
    store = await stack.enter_async_context(common.ledger(settings))

    started = time.perf_counter()
    linked = await common.seed_linked(sims, store, changed)
    await fill(store, rows - changed)
    size_mb = await ledger_size_mb(store, work)
    print(f"  {rows} links in the ledger ({size_mb:.0f} MB) after {time.perf_counter() - started:.1f} s", flush=True)

    sync = await stack.enter_async_context(common.connection_sync(settings, store))
    for _ in range(WARMUP_CYCLES):
        await sync.run_cycle()
    setup = Setup(rows, sims, store, sync, work, linked)
    await run_round(setup, 0)
    setup.idle_seconds.clear()
    setup.changed_seconds.clear()
    setup.counts_seconds.clear()
    return setup


async def timed_cycle(setup: Setup) -> tuple[float, Counter[str]]:
    setup.sims.reset_calls()
    started = time.perf_counter()
    await setup.sync.run_cycle()
    return time.perf_counter() - started, Counter(setup.sims.calls())


async def run_round(setup: Setup, round_number: int) -> None:
    seconds, calls = await timed_cycle(setup)
    setup.idle_seconds.append(seconds)
    setup.idle_calls = calls

    for incident in setup.linked:
        await setup.sims.mdr.acall(
            "add_comment", incident_id=incident["incident_id"], text=f"<p>Round {round_number}: host checked.</p>"
        )
    seconds, calls = await timed_cycle(setup)
    setup.changed_seconds.append(seconds)
    setup.changed_calls = calls
    await setup.sync.run_cycle()

    started = time.perf_counter()
    await setup.store.counts(common.CONNECTION)
    setup.counts_seconds.append(time.perf_counter() - started)


async def check_copies(setup: Setup, rounds: int) -> list[str]:
    """Return a problem for each changed incident whose issue lacks one copy of the comment of each of `rounds` rounds."""
    problems = []
    for incident in setup.linked:
        comments = await setup.sims.jira.acall("issue_comments", key=incident["key"])
        copies = [comment for comment in comments if comment["source_id"]]
        if len(copies) != rounds or len({comment["source_id"] for comment in copies}) != rounds:
            problems.append(f"{setup.rows} rows: {incident['key']} has {len(copies)} copied comments, expected {rounds}")
    if setup.sync.stats.failures:
        problems.append(f"{setup.rows} rows: {setup.sync.stats.failures} incidents failed; see the log on stderr")
    return problems


def print_figures(setups: list[Setup]) -> bool:
    """Print the medians and ratios; return whether the target is met."""
    for setup in setups:
        print(
            f"{setup.rows:>9} links: idle cycle median {common.median(setup.idle_seconds):.3f} s "
            f"({', '.join(f'{value:.3f}' for value in setup.idle_seconds)}), {sum(setup.idle_calls.values())} calls; "
            f"changed cycle median {common.median(setup.changed_seconds):.3f} s "
            f"({', '.join(f'{value:.3f}' for value in setup.changed_seconds)}), {sum(setup.changed_calls.values())} calls"
        )
    smallest, largest = setups[0], setups[-1]
    print(f"calls of the last changed cycle with {smallest.rows} links:")
    for method, count in sorted(smallest.changed_calls.items(), key=lambda item: -item[1]):
        print(f"          {count:>4}  {method}")
    idle_ratio = common.median(largest.idle_seconds) / common.median(smallest.idle_seconds)
    changed_ratio = common.median(largest.changed_seconds) / common.median(smallest.changed_seconds)
    print(f"ratio {largest.rows} / {smallest.rows} links: idle cycle {idle_ratio:.2f}, changed cycle {changed_ratio:.2f}")
    for setup in setups:
        print(f"{setup.rows:>9} links: Store.counts after a cycle, median {common.median(setup.counts_seconds):.3f} s")
    met = idle_ratio < TARGET_RATIO and changed_ratio < TARGET_RATIO
    print(f"target: ratio under {TARGET_RATIO} for both cycles: {common.verdict(met)}")
    return met


async def run(row_counts: list[int], changed: int, rounds: int, latency: float, postgres_url: str | None) -> int:
    async with contextlib.AsyncExitStack() as stack:
        setups = [await open_setup(stack, rows, changed, latency, postgres_url) for rows in sorted(row_counts)]
        for round_number in range(1, rounds + 1):
            # Alternating the order spreads the load of other processes on the machine over both sizes.
            ordered = setups if round_number % 2 else list(reversed(setups))
            for setup in ordered:
                await run_round(setup, round_number)

        # The untimed round before the timed ones copied a comment too.
        problems = [problem for setup in setups for problem in await check_copies(setup, rounds + 1)]
        print_figures(setups)
    for problem in problems:
        print(f"FAIL {problem}")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time sync cycles with a small and a large links table.")
    parser.add_argument("--rows", type=common.positive_int_list, default=[1000, 1_000_000],
                        help="links table sizes, separated by commas (default: 1000,1000000)")
    parser.add_argument("--changed", type=int, default=10, help="incidents changed before each timed changed cycle (default: 10)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per size (default: 5)")
    parser.add_argument("--postgres-url", help="keep the ledgers in scratch databases of this PostgreSQL server, "
                        "given as the URL of a database to connect to for CREATE DATABASE (default: SQLite files)")
    common.add_latency_option(parser)
    args = parser.parse_args(argv)
    if len(args.rows) < 2:
        parser.error("--rows needs at least two sizes to compare")
    if args.changed < 1 or args.rounds < 1:
        parser.error("--changed and --rounds must be at least 1")
    if min(args.rows) < args.changed:
        parser.error(f"--rows {min(args.rows)} is smaller than --changed {args.changed}; every changed incident needs a row")

    common.configure_logging()
    common.print_header(
        "Store scale: cycle time against the size of the links table",
        f"rows {args.rows}, {args.changed} changed incidents, {args.rounds} rounds, latency {args.latency_ms:g} ms, "
        f"ledger {'PostgreSQL' if args.postgres_url else 'SQLite'}",
    )
    try:
        return common.run(run(args.rows, args.changed, args.rounds, args.latency_ms / 1000, args.postgres_url))
    except RuntimeError as err:
        print(f"FAIL {err}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
