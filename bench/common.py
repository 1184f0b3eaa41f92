"""Helpers shared by the benchmarks in this folder.

The MDR and Jira simulators run in child processes of their own on
loopback, each adding a fixed latency to every API request. A child takes
commands on stdin, one JSON object a line such as `{"op": "calls"}`, and
writes one JSON line on stdout for each: `{"result": ...}` or
`{"error": "..."}`. Commands seed data, make changes as a person would,
and report state and the per-method call counters.

The connector runs in the benchmark's own process, built the way the
service builds it (`open_connection`), with an SQLite ledger in a
temporary folder.

    python bench/common.py --serve mdr --latency-ms 20    # one child, used by the benchmarks
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

CLIENT_ID = "bench-client"
MDR_CONNECTION_NAME = "mdr-connector-bench"
CONNECTION = "bench"
JIRA_TOKEN_VARIABLE = "MDR_BENCH_JIRA_TOKEN"
DEFAULT_LATENCY_MS = 20.0
PROJECT = "SEC"
DAY_MS = 86_400_000
STOP_TIMEOUT_SECONDS = 30


# Simulator children: the serving side


class MdrCommands:
    """The commands a child running the MDR simulator accepts."""

    def __init__(self, sim: Any) -> None:
        self.sim = sim

    def details(self) -> dict[str, Any]:
        return {"console_token": self.sim.issue_console_token(CLIENT_ID)}

    def seed(
        self, count: int, comments: int = 0, start_ms: int | None = None, step_ms: int = 0, comment_step_ms: int = 0
    ) -> list[dict[str, Any]]:
        """Seed `count` incidents with `comments` SOC comments each, every text unique.

        With `start_ms`, incident i is created at `start_ms + i * step_ms`,
        and its comment k at `comment_step_ms * k` after that, so their
        history records lie in the past.
        """
        seeded = []
        for index in range(count):
            fields: dict[str, Any] = {}
            if start_ms is not None:
                moment = start_ms + index * step_ms
                fields = {"creation_time": moment, "update_time": moment}
            incident = self.sim.seed_incident(CLIENT_ID, **fields)
            incident_id = incident["incident_id"]
            for number in range(1, comments + 1):
                text = (
                    f"<p>Note {number} on incident {incident['incident_number']}: check <b>{incident_id}</b> "
                    f"for scheduled tasks and autorun entries.</p>"
                )
                at_ms = None if start_ms is None else start_ms + index * step_ms + number * comment_step_ms
                self.sim.add_soc_comment(CLIENT_ID, incident_id, text, author="SOC Analyst", at_ms=at_ms)
            current = self.sim.incident(CLIENT_ID, incident_id)
            seeded.append(
                {
                    "incident_id": incident_id,
                    "incident_number": current["incident_number"],
                    "update_time": current["update_time"],
                }
            )
        return seeded

    def add_comment(self, incident_id: str, text: str) -> dict[str, Any]:
        comment = self.sim.add_soc_comment(CLIENT_ID, incident_id, text, author="SOC Analyst")
        return {"comment_id": comment["comment_id"], "creation_time": comment["creation_time"]}

    def comments(self, incident_id: str) -> list[dict[str, Any]]:
        return [
            {
                "comment_id": comment["comment_id"],
                "author_name": comment["author_name"],
                "creation_time": comment["creation_time"],
                "text": comment["text"],
            }
            for comment in self.sim.comments(CLIENT_ID, incident_id)
        ]

    def calls(self) -> dict[str, int]:
        return dict(self.sim.call_counts)

    def reset_calls(self) -> None:
        self.sim.reset_counts()


class JiraCommands:
    """The commands a child running the Jira simulator accepts."""

    def __init__(self, sim: Any) -> None:
        self.sim = sim

    def details(self) -> dict[str, Any]:
        return {}

    def create_linked(self, incidents: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Create an issue for each incident as the connector would have, dated at the incident's `update_time`.

        Each issue carries the connector's labels and issue property, and
        its search index entry is dated the same, so a change search for a
        later time does not return it.
        """
        created = []
        for incident in incidents:
            incident_id = incident["incident_id"]
            issue = self.sim.create_issue(
                {
                    "project": {"key": PROJECT},
                    "issuetype": {"name": "Task"},
                    "summary": f"[MDR-{incident['incident_number']}] Benchmark incident",
                    "labels": ["mdr-connector", f"mdr-{incident_id}", "kaspersky-mdr"],
                },
                properties=[{"key": "mdr-connector", "value": {"incident_id": incident_id}}],
            )
            moment = datetime.fromtimestamp(incident["update_time"] / 1000, tz=timezone.utc)
            issue.created = issue.updated = moment
            issue.index = [(moment, issue.view())]
            created.append({"key": issue.key, "id": str(issue.id), "updated": moment.isoformat()})
        return created

    def issues(self) -> list[dict[str, Any]]:
        """Return every issue with its incident id and its comments' authors, times and marker source ids."""
        return [
            {
                "key": issue.key,
                "id": str(issue.id),
                "incident_id": (issue.properties.get("mdr-connector") or {}).get("incident_id"),
                "comments": [self._comment(comment) for comment in issue.comments],
            }
            for issue in self.sim.issues.values()
        ]

    def issue_comments(self, key: str) -> list[dict[str, Any]]:
        return [self._comment(comment) for comment in self.sim.issue(key).comments]

    def add_comment(self, key: str, body: str) -> dict[str, Any]:
        comment = self.sim.add_comment(key, body)
        return {"id": str(comment.id), "created_ms": epoch_ms(comment.created)}

    def calls(self) -> dict[str, int]:
        return dict(self.sim.calls)

    def reset_calls(self) -> None:
        self.sim.calls.clear()

    @staticmethod
    def _comment(comment: Any) -> dict[str, Any]:
        marker = comment.properties.get("mdr-connector") or {}
        return {
            "id": str(comment.id),
            "author": comment.author.name,
            "created_ms": epoch_ms(comment.created),
            "source_id": marker.get("source_id"),
            "body": comment.body,
        }


def epoch_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def serve(kind: str, latency: float) -> None:
    """Run one simulator in this process, and run each command from stdin until stdin closes."""
    asyncio.run(_serve(kind, latency))


async def _serve(kind: str, latency: float) -> None:
    commands: MdrCommands | JiraCommands
    if kind == "mdr":
        from mdr_connector.adapters.mdr.simulator import run_simulator
        from mdr_connector.adapters.mdr.simulator.state import MdrSimulator, SimulatorSettings

        mdr = MdrSimulator(SimulatorSettings(latency_seconds=latency))
        mdr.create_client(CLIENT_ID, connection_name=MDR_CONNECTION_NAME)
        commands, server, close = MdrCommands(mdr), run_simulator(mdr), mdr.close
    else:
        from mdr_connector.adapters.jira.simulator import JiraSimulator
        from mdr_connector.adapters.jira.simulator import run_simulator as run_jira

        jira = JiraSimulator(deployment="cloud", search_delay_seconds=0, latency_seconds=latency)
        commands, server, close = JiraCommands(jira), run_jira(jira), jira.close

    try:
        async with server as url:
            print(json.dumps({"url": url, **commands.details()}), flush=True)
            while line := await asyncio.to_thread(sys.stdin.readline):
                print(json.dumps(run_command(commands, line)), flush=True)
    finally:
        close()


def run_command(commands: MdrCommands | JiraCommands, line: str) -> dict[str, Any]:
    """Run one command line and return the reply; a bad command gets an error reply instead of ending the child."""
    try:
        request = json.loads(line)
        method = getattr(commands, request["op"], None)
        if method is None or request["op"].startswith("_") or request["op"] == "details":
            raise ValueError(f"unknown command {request['op']!r}")
        return {"result": method(**request.get("args", {}))}
    except (KeyError, ValueError, TypeError) as err:
        return {"error": f"{type(err).__name__}: {err}"}


# Simulator children: the benchmark's side


@dataclass
class SimulatorProcess:
    """A simulator child process, the details it printed when ready, and a lock that keeps each command and reply together."""

    kind: str
    process: subprocess.Popen[str]
    details: dict[str, Any]
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return self.details["url"]

    def call(self, op: str, **args: Any) -> Any:
        """Send one command and return its result; raise RuntimeError when the child reports an error or has exited."""
        assert self.process.stdin is not None and self.process.stdout is not None
        with self.lock:
            self.process.stdin.write(json.dumps({"op": op, "args": args}) + "\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.kind} simulator exited during {op!r} with status {self.process.poll()}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"the {self.kind} simulator failed {op!r}: {reply['error']}")
        return reply["result"]

    async def acall(self, op: str, **args: Any) -> Any:
        """Run `call` in a worker thread, so the connector in this process keeps running meanwhile."""
        return await asyncio.to_thread(self.call, op, **args)

    def stop(self) -> None:
        if self.process.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.process.stdin.close()
        try:
            self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_simulator(kind: str, latency: float, log_file: IO[str]) -> SimulatorProcess:
    command = [sys.executable, str(Path(__file__).resolve()), "--serve", kind, "--latency-ms", str(latency * 1000)]
    process = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file, text=True, encoding="utf-8"
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        process.wait()
        raise SystemExit(f"the {kind} simulator exited with status {process.returncode}; see {log_file.name}")
    return SimulatorProcess(kind, process, json.loads(line))


@dataclass
class Simulators:
    """One MDR and one Jira simulator child."""

    mdr: SimulatorProcess
    jira: SimulatorProcess

    def calls(self) -> dict[str, int]:
        """Return the call counters of both children, MDR methods prefixed `mdr ` and Jira ones `jira `."""
        counts = {f"mdr {name}": count for name, count in self.mdr.call("calls").items()}
        counts.update({f"jira {name}": count for name, count in self.jira.call("calls").items()})
        return counts

    def reset_calls(self) -> None:
        self.mdr.call("reset_calls")
        self.jira.call("reset_calls")


@contextlib.contextmanager
def simulators(latency: float, log_file: IO[str]) -> Iterator[Simulators]:
    """Start both simulator children, and stop them when the block ends."""
    mdr = start_simulator("mdr", latency, log_file)
    try:
        jira = start_simulator("jira", latency, log_file)
        try:
            yield Simulators(mdr, jira)
        finally:
            jira.stop()
    finally:
        mdr.stop()


# CPU time


def process_cpu_seconds(pid: int) -> float:
    """Return the user and system CPU seconds of a running process, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime field 14 and stime field 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class CpuMeter:
    """CPU seconds spent since `start()`: by this process, its pandoc workers, the children it waited for, and the simulators."""

    sims: Simulators
    marks: dict[str, float] = field(default_factory=dict)
    worker_marks: dict[int, float] = field(default_factory=dict)

    def read(self) -> dict[str, float]:
        own = resource.getrusage(resource.RUSAGE_SELF)
        waited = resource.getrusage(resource.RUSAGE_CHILDREN)
        return {
            "connector process": own.ru_utime + own.ru_stime,
            "pandoc workers": 0.0,
            "pandoc and other finished children": waited.ru_utime + waited.ru_stime,
            "MDR simulator": process_cpu_seconds(self.sims.mdr.process.pid),
            "Jira simulator": process_cpu_seconds(self.sims.jira.process.pid),
        }

    def start(self) -> None:
        self.marks = self.read()
        self.worker_marks = self.read_workers()

    def spent(self) -> dict[str, float]:
        spent = {name: value - self.marks[name] for name, value in self.read().items()}
        # A worker that ends is waited for, so its time moves to the finished children.
        spent["pandoc workers"] = sum(
            seconds - self.worker_marks.get(pid, 0.0) for pid, seconds in self.read_workers().items()
        )
        return spent

    @staticmethod
    def read_workers() -> dict[int, float]:
        from mdr_connector.connector import pandoc_pool

        found = {}
        for pid in pandoc_pool.worker_pids():
            with contextlib.suppress(OSError, IndexError, ValueError):
                found[pid] = process_cpu_seconds(pid)
        return found


@dataclass
class PandocCounter:
    """A count of the pandoc steps (worker requests or processes) that `connector/markup.py` runs in this process while `active`."""

    runs: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @contextlib.contextmanager
    def active(self) -> Iterator[PandocCounter]:
        """Count every pandoc run inside the block; conversions run in worker threads, hence the lock."""
        from mdr_connector.connector import markup

        original = markup._run_pandoc

        def counted(*args: Any, **kwargs: Any) -> str:
            with self.lock:
                self.runs += 1
            return original(*args, **kwargs)

        markup._run_pandoc = counted
        try:
            yield self
        finally:
            markup._run_pandoc = original


def cpu_line(spent: dict[str, float], seconds: float) -> str:
    """Describe the CPU seconds per process, their sum and the wall time they were spent in."""
    parts = ", ".join(f"{name} {value:.1f}" for name, value in spent.items())
    return f"CPU seconds: {parts}; {sum(spent.values()):.1f} in all over {seconds:.1f} s"


# The connector


def connection_settings(
    work: Path,
    sims: Simulators,
    *,
    mdr_concurrency: int = 4,
    ticket_concurrency: int = 4,
    mapping: str = "builtin:jira",
    database_url: str | None = None,
    **sync: Any,
) -> Any:
    """Return settings of one connection to `sims`, with `sync` overrides.

    The tokens go to `work`, and so does the ledger, an SQLite file, unless
    `database_url` names another database.
    """
    from mdr_connector.adapters.jira.simulator import SERVICE_EMAIL, SERVICE_TOKEN
    from mdr_connector.connector.config import Settings

    os.environ[JIRA_TOKEN_VARIABLE] = SERVICE_TOKEN
    token_dir = work / "tokens"
    token_dir.mkdir(mode=0o700, exist_ok=True)
    return Settings.model_validate(
        {
            "data_dir": work,
            "database_url": database_url,
            "connections": [
                {
                    "name": CONNECTION,
                    "mdr": {
                        "base_url": sims.mdr.url,
                        "client_id": CLIENT_ID,
                        "connection_name": MDR_CONNECTION_NAME,
                        "token_dir": token_dir,
                        "max_concurrency": mdr_concurrency,
                    },
                    "ticket": {
                        "system": "jira",
                        "url": sims.jira.url,
                        "auth": {"type": "api_token", "email": SERVICE_EMAIL, "token": {"env": JIRA_TOKEN_VARIABLE}},
                        "search_delay_seconds": 0,
                        "max_concurrency": ticket_concurrency,
                    },
                    "mapping": mapping,
                    "sync": sync,
                }
            ],
        }
    )


async def activate_token(settings: Any, console_token: str) -> None:
    """Activate the MDR token chain of the settings' only connection, as `mdr-connector token activate` does."""
    from mdr_connector.adapters.mdr.client import MdrClient

    async with MdrClient(settings.connections[0].mdr) as client:
        await client.tokens.activate(console_token)


@contextlib.asynccontextmanager
async def ledger(settings: Any) -> AsyncIterator[Any]:
    """Open the ledger of `settings`, migrated to the newest schema, and close it afterwards."""
    from mdr_connector.connector.store import Store

    store = await Store.open(settings.resolved_database_url())
    try:
        yield store
    finally:
        await store.close()


def link_rows(incidents: list[dict[str, Any]], issues: list[dict[str, Any]], jira_url: str) -> list[dict[str, Any]]:
    """Return `links` rows pairing each incident with its issue, as a cycle that linked them would leave them."""
    now = datetime.now(timezone.utc)
    return [
        {
            "connection": CONNECTION,
            "incident_id": incident["incident_id"],
            "incident_number": incident["incident_number"],
            "state": "linked",
            "ticket_key": issue["key"],
            "ticket_id": issue["id"],
            "ticket_url": f"{jira_url}/browse/{issue['key']}",
            "create_started_at": None,
            "mdr_update_time": incident["update_time"],
            "ticket_updated": datetime.fromisoformat(issue["updated"]),
            "fields_hash": None,
            "ticket_status": None,
            "mdr_status": None,
            "created_at": now,
            "updated_at": now,
        }
        for incident, issue in zip(incidents, issues, strict=True)
    ]


async def insert_links(store: Any, rows: list[dict[str, Any]], chunk: int = 20_000) -> None:
    """Insert `links` rows in bulk with SQLAlchemy core, one transaction per chunk."""
    from sqlalchemy import insert

    from mdr_connector.connector.store import Link

    statement = insert(Link.__table__)
    for start in range(0, len(rows), chunk):
        async with store.engine.begin() as connection:
            await connection.execute(statement, rows[start : start + chunk])


async def seed_linked(sims: Simulators, store: Any, count: int, *, days: float = 30, quiet_hours: float = 1) -> list[dict[str, Any]]:
    """Seed `count` incidents that a connector linked to issues long ago, on both sides and in the ledger.

    Their last changes are spread evenly over `days`, ending `quiet_hours`
    ago, so a cycle now finds nothing new, as in a connection that has
    been running for a while. Returns each incident with its issue's key and id.
    """
    now_ms = int(datetime.now(timezone.utc).timestamp() * 1000)
    end_ms = now_ms - int(quiet_hours * 3_600_000)
    start_ms = end_ms - int(days * DAY_MS)
    step_ms = max((end_ms - start_ms) // max(count, 1), 1)
    incidents = await sims.mdr.acall("seed", count=count, start_ms=start_ms, step_ms=step_ms)
    issues = await sims.jira.acall("create_linked", incidents=incidents)
    await insert_links(store, link_rows(incidents, issues, sims.jira.url))
    return [{**incident, "key": issue["key"], "id": issue["id"]} for incident, issue in zip(incidents, issues, strict=True)]


@contextlib.asynccontextmanager
async def connection_sync(settings: Any, store: Any) -> AsyncIterator[Any]:
    """Open the connection's engine as the service does; close its clients afterwards."""
    from mdr_connector.connector.service import open_connection

    async with open_connection(settings, settings.connections[0], store) as sync:
        yield sync


# Output and the machine


def configure_logging() -> None:
    """Send the connector's warnings and errors to stderr as text; the figures go to stdout."""
    from mdr_connector.connector.logs import configure_logging as configure

    configure("WARNING", "text", sys.stderr)


def machine_lines() -> list[str]:
    """Describe the machine a run is on: CPU model and count, load, Python, the date."""
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return [
        f"machine:  {os.cpu_count()} CPUs, {model}, load average {load}",
        f"python:   {platform.python_version()} on {platform.system()} {platform.release()}, event loop {loop_name()}",
        f"date:     {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
    ]


def run(coroutine: Any) -> Any:
    """Run a benchmark's coroutine on the event loop the service's commands use (connector/event_loop.py)."""
    from mdr_connector.connector import event_loop

    return event_loop.run(coroutine)


def loop_name() -> str:
    from mdr_connector.connector import event_loop

    return "asyncio" if event_loop.loop_factory() is None else "uvloop"


def print_header(title: str, settings_line: str) -> None:
    print(title)
    for line in machine_lines():
        print(line)
    print(f"settings: {settings_line}", flush=True)


def percentile(values: list[float], share: float) -> float:
    """Return the nearest-rank percentile: the smallest value with at least `share` of all values at or below it."""
    if not values:
        raise ValueError("percentile of no values: measure at least one")
    ordered = sorted(values)
    rank = max(1, math.ceil(len(ordered) * share))
    return ordered[rank - 1]


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


@contextlib.contextmanager
def work_folder(prefix: str, keep: bool = False) -> Iterator[Path]:
    """Create a temporary folder for a run's ledger, tokens and logs; remove it afterwards unless `keep`."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield work
    finally:
        if keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def positive_int_list(text: str) -> list[int]:
    """Parse a comma-separated list of positive integers such as `10,1000,10000` (argparse type)."""
    try:
        values = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers separated by commas") from err
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers separated by commas")
    return values


def add_latency_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=DEFAULT_LATENCY_MS,
        help=f"latency each simulator adds to every API request, in ms (default: {DEFAULT_LATENCY_MS:g})",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve one simulator for a benchmark, taking commands on stdin.")
    parser.add_argument("--serve", choices=("mdr", "jira"), required=True, help="the simulator to run")
    add_latency_option(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    serve(args.serve, args.latency_ms / 1000)
    return 0


if __name__ == "__main__":
    sys.exit(main())


@contextlib.asynccontextmanager
async def scratch_database(admin_url: str, prefix: str = "mdr_bench") -> AsyncIterator[str]:
    """Create an empty PostgreSQL database through `admin_url`, yield its asyncpg URL, and drop it afterwards."""
    import asyncpg

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(admin_url, timeout=10)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield admin_url.replace("postgresql://", "postgresql+asyncpg://", 1).rsplit("/", 1)[0] + f"/{name}"
    finally:
        admin = await asyncpg.connect(admin_url, timeout=10)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
