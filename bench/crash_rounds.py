"""Kill the connector process with SIGKILL for many rounds while incidents sync both ways, then count both sides.

    .venv/bin/python bench/crash_rounds.py [--rounds 500] [--incidents 200] [--seed S] [--latency-ms 20]
        [--interval 0.2] [--keep]

The harness is bench/crash.py, which tests/test_crash.py runs with 50
rounds. Each round changes both sides as people would, starts
`mdr-connector run` in a child process and kills it. The kill comes after
a random delay from the first write, or when the Nth write of a kind
arrives at a simulator or has been applied there. After the rounds,
`sync --once` runs until one run writes nothing and nothing is parked.

The script prints the seed first, then a line every 10 rounds, then the
kills by plan, the kills that landed mid-write, the final runs, the counts
on both simulators and the diff. It exits 1 when an item is missing or
duplicated, or when the final runs do not converge, and keeps the work
folder with the connector's log in that case.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
from pathlib import Path

import common
import crash

PROGRESS_EVERY = 10


class Progress:
    """Print the kills so far every PROGRESS_EVERY rounds."""

    def __init__(self) -> None:
        self.kills: list[crash.KillRecord] = []

    def __call__(self, record: crash.KillRecord) -> None:
        self.kills.append(record)
        if record.round % PROGRESS_EVERY:
            return
        mid_write = sum(1 for kill in self.kills if kill.mid_write)
        print(f"round {record.round}: {len(self.kills)} kills, {mid_write} mid-write", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Kill the connector with SIGKILL for many rounds, then count both sides.")
    parser.add_argument("--rounds", type=int, default=500, help="rounds, each ending in one kill (default: 500)")
    parser.add_argument("--incidents", type=int, default=200, help="MDR incidents seeded before the first round (default: 200)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random kill plans and changes (default: a random one)")
    parser.add_argument("--interval", type=float, default=0.2, help="the connection's sync.interval_seconds (default: 0.2)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder with the config, ledger and log")
    common.add_latency_option(parser)
    args = parser.parse_args(argv)
    if min(args.rounds, args.incidents) < 1 or args.interval <= 0:
        parser.error("--rounds and --incidents must be at least 1, and --interval above 0")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)

    common.print_header(
        "Crash rounds: SIGKILL of the connector process while incidents sync both ways",
        f"seed {seed}, {args.rounds} rounds, {args.incidents} incidents, interval {args.interval:g} s, "
        f"latency {args.latency_ms:g} ms",
    )
    settings = crash.CrashSettings(
        rounds=args.rounds,
        incidents=args.incidents,
        seed=seed,
        latency_seconds=args.latency_ms / 1000,
        interval_seconds=args.interval,
    )
    work = Path(tempfile.mkdtemp(prefix="mdr-crash-"))
    print(f"work folder: {work}", flush=True)
    report = asyncio.run(crash.run_crash(settings, work, progress=Progress()))
    for line in report.lines():
        print(line)

    failed = any(report.problems.values())
    if failed or args.keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    if failed:
        print(f"FAIL: items differ; rerun with --seed {seed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
