"""Measure how long a new comment takes to reach the other side while the connector runs as a service.

    .venv/bin/python bench/propagation_latency.py [--samples 20] [--interval 5] [--incidents 10] [--latency-ms 20]

MDR and Jira simulators start in child processes, MDR with `--incidents`
incidents. The connector runs in this process with `run` semantics, that
is the service's runner (`run_forever`) cycling every `--interval` seconds,
and first creates an issue for each incident. Then two streams of changes
run side by side until each has `--samples` measurements:

- MDR to Jira: a SOC comment on an incident, until its copy is on the issue;
- Jira to MDR: a comment by a person on an issue, until its copy is in MDR.

Each stream waits a random time of up to one interval before each change,
so changes fall at every point of the cycle. The latency of a change is the
creation time of the copy minus that of the original, both as the
simulators record them, so it does not depend on how often this script
looks. The figures are the p50, p95 and maximum (nearest rank) per
direction and for both together. The target is a p95 of at most the
interval plus 1 second.

The script exits 1 when a copy does not arrive within three intervals plus
10 seconds or the connector stops, and 0 otherwise, whether the target is
met or not.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import common

POLL_SECONDS = 0.1
SETUP_TIMEOUT_SECONDS = 120
# Beyond this, the copy is taken for lost, not late.
LATE_INTERVALS = 3
LATE_EXTRA_SECONDS = 10


@dataclass
class Stream:
    """One direction's measurements and the changes that never arrived."""

    name: str
    latencies: list[float] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


class CopyMissing(Exception):
    """A change whose copy did not arrive in time."""


async def wait_for(check: Any, deadline: float, description: str) -> Any:
    """Call the async `check` every POLL_SECONDS until it returns a value other than None, or raise CopyMissing."""
    while time.monotonic() < deadline:
        found = await check()
        if found is not None:
            return found
        await asyncio.sleep(POLL_SECONDS)
    raise CopyMissing(description)


async def mdr_to_jira(sims: common.Simulators, incident: dict[str, Any], timeout: float) -> float:
    """Add a SOC comment and return the seconds until its copy was created on the issue."""
    token = secrets.token_hex(4)
    comment = await sims.mdr.acall(
        "add_comment", incident_id=incident["incident_id"], text=f"<p>SOC note {token}: isolate the host.</p>"
    )

    async def copy_time() -> int | None:
        comments = await sims.jira.acall("issue_comments", key=incident["key"])
        return next((item["created_ms"] for item in comments if item["source_id"] == comment["comment_id"]), None)

    landed = await wait_for(copy_time, time.monotonic() + timeout, f"MDR comment {comment['comment_id']} on {incident['key']}")
    return (landed - comment["creation_time"]) / 1000


async def jira_to_mdr(sims: common.Simulators, incident: dict[str, Any], timeout: float) -> float:
    """Add a person's comment on the issue and return the seconds until its copy was created in MDR."""
    token = secrets.token_hex(4)
    comment = await sims.jira.acall("add_comment", key=incident["key"], body=f"Engineer note {token}: host reimaged.")

    async def copy_time() -> int | None:
        comments = await sims.mdr.acall("comments", incident_id=incident["incident_id"])
        return next(
            (
                item["creation_time"]
                for item in comments
                if item["author_name"] == common.MDR_CONNECTION_NAME and token in item["text"]
            ),
            None,
        )

    landed = await wait_for(copy_time, time.monotonic() + timeout, f"Jira comment {comment['id']} on {incident['key']}")
    return (landed - comment["created_ms"]) / 1000


async def run_stream(stream: Stream, change: Any, sims: common.Simulators, incidents: list[dict[str, Any]],
                     samples: int, interval: float) -> None:
    timeout = LATE_INTERVALS * interval + LATE_EXTRA_SECONDS
    rng = random.Random()
    for number in range(samples):
        await asyncio.sleep(rng.uniform(0, interval))
        incident = incidents[number % len(incidents)]
        try:
            stream.latencies.append(await change(sims, incident, timeout))
        except CopyMissing as err:
            stream.missing.append(str(err))


async def linked_incidents(sims: common.Simulators, seeded: list[dict[str, Any]], service: asyncio.Task[Any]) -> list[dict[str, Any]]:
    """Wait until the service has created an issue for every seeded incident; return the incidents with their issue keys."""
    deadline = time.monotonic() + SETUP_TIMEOUT_SECONDS
    expected = {incident["incident_id"] for incident in seeded}
    while time.monotonic() < deadline and not service.done():
        keys = {issue["incident_id"]: issue["key"] for issue in await sims.jira.acall("issues")}
        if expected <= keys.keys():
            return [{**incident, "key": keys[incident["incident_id"]]} for incident in seeded]
        await asyncio.sleep(POLL_SECONDS)
    raise RuntimeError(f"the connector did not create an issue for each of the {len(expected)} incidents in {SETUP_TIMEOUT_SECONDS} s")


def summary(name: str, latencies: list[float]) -> str:
    if not latencies:
        return f"{name:<14} no measurements"
    return (
        f"{name:<14} n={len(latencies):<3} p50 {common.percentile(latencies, 0.5):.2f} s, "
        f"p95 {common.percentile(latencies, 0.95):.2f} s, max {max(latencies):.2f} s, min {min(latencies):.2f} s"
    )


async def measure(args: argparse.Namespace, work: Path) -> list[Stream]:
    from mdr_connector.connector.runner import run_forever
    from mdr_connector.connector.service import open_connection

    with (work / "simulators.log").open("w", encoding="utf-8") as log_file, common.simulators(args.latency, log_file) as sims:
        seeded = await sims.mdr.acall("seed", count=args.incidents)
        settings = common.connection_settings(work, sims, interval_seconds=args.interval)
        await common.activate_token(settings, sims.mdr.details["console_token"])

        async with common.ledger(settings) as store:
            stop = asyncio.Event()
            service = asyncio.create_task(run_forever(settings, store, open_connection, stop))
            try:
                incidents = await linked_incidents(sims, seeded, service)
                streams = [Stream("MDR to Jira"), Stream("Jira to MDR")]
                await asyncio.gather(
                    run_stream(streams[0], mdr_to_jira, sims, incidents[0::2], args.samples, args.interval),
                    run_stream(streams[1], jira_to_mdr, sims, incidents[1::2], args.samples, args.interval),
                )
            finally:
                stop.set()
                outcomes = await service
    failures = [outcome for outcome in outcomes if outcome.failure is not None]
    if failures:
        raise RuntimeError(f"the connection stopped: {failures[0].error}")
    return streams


async def run(args: argparse.Namespace) -> int:
    with common.work_folder("mdr-bench-latency-") as work:
        streams = await measure(args, work)

    both = [value for stream in streams for value in stream.latencies]
    for stream in streams:
        print(summary(stream.name, stream.latencies))
    print(summary("both", both))
    limit = args.interval + 1
    if both:
        p95 = common.percentile(both, 0.95)
        print(f"target: p95 at most the interval plus 1 s ({limit:g} s): {common.verdict(p95 <= limit)}")

    missing = [item for stream in streams for item in stream.missing]
    for item in missing:
        print(f"FAIL no copy of {item} within {LATE_INTERVALS * args.interval + LATE_EXTRA_SECONDS:g} s")
    return 1 if missing or not both else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure the time from a change on one side to its copy on the other.")
    parser.add_argument("--samples", type=int, default=20, help="changes measured per direction (default: 20)")
    parser.add_argument("--interval", type=float, default=5.0, help="the connection's sync.interval_seconds (default: 5)")
    parser.add_argument("--incidents", type=int, default=10, help="incidents the changes are spread over (default: 10)")
    common.add_latency_option(parser)
    args = parser.parse_args(argv)
    if args.samples < 1 or args.incidents < 2 or args.interval <= 0:
        parser.error("--samples must be at least 1, --incidents at least 2, and --interval above 0")
    args.latency = args.latency_ms / 1000

    common.configure_logging()
    common.print_header(
        "Propagation latency: a new comment on one side until its copy on the other",
        f"{args.samples} changes per direction over {args.incidents} incidents, interval {args.interval:g} s, "
        f"latency {args.latency_ms:g} ms",
    )
    try:
        return common.run(run(args))
    except RuntimeError as err:
        print(f"FAIL {err}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
