"""Count the API calls of an idle sync cycle with 10, 1,000 and 10,000 linked incidents.

    .venv/bin/python bench/idle_cost.py [--sizes 10,1000,10000] [--warmup 3] [--cycles 3]
                                        [--change-source history|list] [--spread-seconds 2592000] [--latency-ms 20]

For each size, fresh MDR and Jira simulators start in child processes, and
the incidents are seeded as a connection that has been running for a while
would leave them. Each incident is in MDR with an issue in Jira and a
linked row in the ledger, and their last changes are spread over the past
`--spread-seconds` (30 days by default), ending an hour ago. The connector then runs `--warmup` cycles, in which the
first run reads its default 7-day lookback of history, and then `--cycles`
measured cycles. Each measured cycle's calls are read from both
simulators' call counters, and its time and the CPU time of this process,
which runs the connector, are measured around it.

The target is the same small number of calls for every size, that is, no
per-incident polling. A cycle reads again every change from 300 seconds
(the default `mdr_overlap_seconds` and `ticket_overlap_seconds`) before its
cursors, and the cursors stay at the newest change. So with a short
`--spread-seconds`, as after a bulk change, the idle cycles page through
those changes until a newer one moves the cursors on. The script exits 1 when a cycle fails or the figures
cannot be read, and 0 otherwise, whether the target is met or not.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import common

# "Small" in the target: two or three calls per side and cycle.
SMALL_CALL_COUNT = 6


async def measure_size(
    size: int, warmup: int, cycles: int, change_source: str, spread_seconds: float, latency: float, work: Path
) -> tuple[list[int], list[Counter[str]], list[float], list[float]]:
    """Return the call totals of the warm-up cycles, and the calls, seconds and CPU seconds of each measured cycle."""
    with (work / "simulators.log").open("w", encoding="utf-8") as log_file, common.simulators(latency, log_file) as sims:
        settings = common.connection_settings(work, sims, change_source=change_source)
        await common.activate_token(settings, sims.mdr.details["console_token"])
        async with common.ledger(settings) as store:
            started = time.perf_counter()
            await common.seed_linked(sims, store, size, days=spread_seconds / 86_400)
            print(f"  {size} linked incidents seeded in {time.perf_counter() - started:.1f} s", flush=True)

            async with common.connection_sync(settings, store) as sync:
                warmup_totals = []
                for _ in range(warmup):
                    sims.reset_calls()
                    await sync.run_cycle()
                    warmup_totals.append(sum(sims.calls().values()))

                calls: list[Counter[str]] = []
                seconds: list[float] = []
                cpu_seconds: list[float] = []
                for _ in range(cycles):
                    sims.reset_calls()
                    started, cpu_started = time.perf_counter(), time.process_time()
                    await sync.run_cycle()
                    seconds.append(time.perf_counter() - started)
                    cpu_seconds.append(time.process_time() - cpu_started)
                    calls.append(Counter(sims.calls()))
                if sync.stats.failures:
                    raise RuntimeError(f"{sync.stats.failures} incidents failed during the cycles; see the log on stderr")
    return warmup_totals, calls, seconds, cpu_seconds


async def run(sizes: list[int], warmup: int, cycles: int, change_source: str, spread_seconds: float, latency: float) -> int:
    per_size: dict[int, list[Counter[str]]] = {}
    for size in sizes:
        with common.work_folder("mdr-bench-idle-") as work:
            warmup_totals, calls, seconds, cpu_seconds = await measure_size(size, warmup, cycles, change_source, spread_seconds, latency, work)
        per_size[size] = calls
        totals = [sum(cycle.values()) for cycle in calls]
        print(f"{size:>7} linked: calls per idle cycle {totals}, cycle seconds "
              f"{', '.join(f'{value:.2f}' for value in seconds)}, connector CPU seconds "
              f"{', '.join(f'{value:.3f}' for value in cpu_seconds)} (warm-up cycles: {warmup_totals} calls)")
        for method, count in sorted(calls[-1].items()):
            print(f"          {count:>3}  {method}")

    all_totals = {sum(cycle.values()) for calls in per_size.values() for cycle in calls}
    constant = len(all_totals) == 1
    small = max(all_totals) <= SMALL_CALL_COUNT
    print(f"calls per idle cycle, all sizes: {sorted(all_totals)}")
    print(f"target: the same small constant (at most {SMALL_CALL_COUNT}) for every size: {common.verdict(constant and small)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Count the API calls of an idle sync cycle for several numbers of linked incidents.")
    parser.add_argument("--sizes", type=common.positive_int_list, default=[10, 1000, 10000],
                        help="numbers of linked incidents, separated by commas (default: 10,1000,10000)")
    parser.add_argument("--warmup", type=int, default=3, help="cycles run before measuring (default: 3)")
    parser.add_argument("--cycles", type=int, default=3, help="idle cycles measured per size (default: 3)")
    parser.add_argument("--change-source", choices=("history", "list"), default="history",
                        help="how the connector finds MDR changes: sync.change_source (default: history)")
    parser.add_argument("--spread-seconds", type=float, default=30 * 86_400,
                        help="seconds over which the incidents' last changes are spread (default: 2592000, 30 days)")
    common.add_latency_option(parser)
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.cycles < 1:
        parser.error("--warmup and --cycles must be at least 1")
    if args.spread_seconds <= 0:
        parser.error(f"--spread-seconds {args.spread_seconds:g}: give a time above 0 seconds")

    common.configure_logging()
    common.print_header(
        "Idle cost: API calls per idle sync cycle",
        f"sizes {args.sizes}, {args.warmup} warm-up and {args.cycles} measured cycles, "
        f"change source {args.change_source}, changes spread over {args.spread_seconds:.0f} s, latency {args.latency_ms:g} ms",
    )
    try:
        return common.run(
            run(args.sizes, args.warmup, args.cycles, args.change_source, args.spread_seconds, args.latency_ms / 1000)
        )
    except RuntimeError as err:
        print(f"FAIL {err}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
