"""Crash rounds: the connector process is killed with SIGKILL while incidents sync both ways.

The MDR and Jira simulators run in the caller's event loop, so they
survive every kill. The connector runs as `mdr-connector run` in a child
process of this Python, with a config file, a token folder and an SQLite
ledger in a work folder. Each round:

1. changes both sides as people would, through the simulators' control
   APIs: SOC comments and files in MDR, comments, files and status moves
   by the person `analyst` in Jira, and "On hold" in MDR;
2. starts the connector and kills it with SIGKILL at a point that a
   seeded random generator picks. That is a delay after the process's
   first write, or the moment the Nth write of a kind arrives at a
   simulator, or the moment that write has been applied, before its reply.

A write trigger that has not fired `fallback_seconds` after the first
write kills the process then. After the last round, `sync --once` runs
until one run makes no write and nothing is parked, and both simulators
are counted: one issue per incident, and every comment, file and close
exactly once on the other side.

The simulators' call counters cannot tell when the ledger commits, so a
kill counts as mid-write when a write request of the killed process had
reached a simulator and its reply had not been sent. A kill after the
write was applied is the case "written in the target, not yet recorded in
the ledger".

`tests/test_crash.py` and `bench/crash_rounds.py` both run `run_crash`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

CLIENT_ID = "crash-client-0123456789abcdef0123"
MDR_CONNECTION_NAME = "mdr-connector-crash"
CONNECTION = "crash"
JIRA_TOKEN_VARIABLE = "MDR_CRASH_JIRA_TOKEN"
PERSON = "analyst"
SERVICE_USER = "mdr-connector"
PROJECT = "SEC"
# The whole run waits at most this long for one connector start or one `sync --once`.
PROCESS_TIMEOUT_SECONDS = 300
FINAL_RUNS = 8
# The largest N of a trigger on any write when the previous round made none.
FIRST_TRIGGER_WRITES = 20
# Six days, within the refresh token's seven.
ACCESS_TOKEN_SECONDS = 6 * 86_400

# Writes of the connector, by simulator. session/confirm is left out,
# because a refresh whose reply is lost breaks the token chain by design
# and the connector can only report that. So no trigger aims there.
MDR_WRITES = frozenset(
    {"incidents/create", "incidents/close", "comments/create", "comments/delete", "attachments/upload",
     "response/update", "responses/update"}
)
JIRA_READ_POSTS = frozenset({"/rest/api/2/search", "/rest/api/2/search/jql"})

@dataclass
class CrashSettings:
    """The size of a run, its random seed and the connector's timing."""

    rounds: int = 50
    incidents: int = 200
    seed: int = 1
    latency_seconds: float = 0.0
    interval_seconds: float = 0.2
    # Timer kills land this many seconds after the process's first write.
    min_delay_seconds: float = 0.05
    max_delay_seconds: float = 2.0
    # A trigger that has not fired this long after the first write kills the process anyway.
    fallback_seconds: float = 2.0
    # A process that has not written this long after its first API request starts its delay then.
    idle_seconds: float = 3.0
    # Changes made as people between rounds, each on a random incident.
    mdr_comments_per_round: int = 3
    mdr_files_per_round: int = 1
    jira_comments_per_round: int = 3
    jira_files_per_round: int = 1
    transitions_per_round: int = 2
    holds_per_round: int = 1


@dataclass
class KillRecord:
    """One round: how its kill was planned, what fired it, and which writes were in flight then."""

    round: int
    plan: str
    fired_by: str = ""
    startup_seconds: float | None = None
    writes: int = 0
    in_flight: list[str] = field(default_factory=list)
    after_apply: bool = False
    exit_code: int | None = None

    @property
    def mid_write(self) -> bool:
        return bool(self.in_flight)


@dataclass
class CrashReport:
    """The kills of a run, the final convergence, the counts on both simulators and every problem found."""

    settings: CrashSettings
    work: Path
    kills: list[KillRecord] = field(default_factory=list)
    final_runs: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    # Differences by area: "rounds", "final runs", "issues", "comments", "files", "statuses".
    problems: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    seconds: float = 0.0

    @property
    def killed(self) -> list[KillRecord]:
        return [kill for kill in self.kills if kill.exit_code == -signal.SIGKILL]

    @property
    def mid_write(self) -> list[KillRecord]:
        return [kill for kill in self.killed if kill.mid_write]

    @property
    def after_apply(self) -> list[KillRecord]:
        return [kill for kill in self.killed if kill.after_apply]

    def startup_median(self) -> float | None:
        values = [kill.startup_seconds for kill in self.kills if kill.startup_seconds is not None]
        return statistics.median(values) if values else None

    def lines(self) -> list[str]:
        """Describe the run: kills by plan, kills mid-write, the final runs, the counts and the problems."""
        plans = Counter(kill.plan.split(" ", 1)[0] for kill in self.killed)
        fired = Counter(kill.fired_by for kill in self.killed)
        in_flight = Counter(name for kill in self.mid_write for name in kill.in_flight)
        startup = self.startup_median()
        lines = [
            f"seed {self.settings.seed}, {self.settings.rounds} rounds, {self.settings.incidents} incidents, "
            f"work folder {self.work}",
            f"kills: {len(self.killed)} of {len(self.kills)} rounds; by plan {dict(sorted(plans.items()))}; "
            f"fired by {dict(sorted(fired.items()))}",
            f"kills mid-write: {len(self.mid_write)}, of which after the write was applied: {len(self.after_apply)}",
            f"writes by the killed processes: {sum(kill.writes for kill in self.kills)}",
            f"writes in flight at the kills: {dict(in_flight.most_common())}",
            "connector start to first API request: "
            + (f"median {startup:.2f} s" if startup is not None else "never measured"),
            "final runs: " + "; ".join(
                f"exit {run['exit_code']}, {run['writes']} writes, {run['parked']} parked" for run in self.final_runs
            ),
            "counts: " + ", ".join(f"{name} {value}" for name, value in self.counts.items()),
            f"run time: {self.seconds:.1f} s",
        ]
        found = [f"{area}: {problem}" for area, problems in self.problems.items() for problem in problems]
        if found:
            lines.append(f"diff: {len(found)} problems")
            lines.extend(f"  {problem}" for problem in found[:50])
        else:
            lines.append("diff: none (no item missing, none duplicated)")
        return lines


# Kill switch: watches the simulators' requests and kills the connector


@dataclass
class Trigger:
    """A kill at the Nth write of `kind` ("write" for any), when it arrives or once it has been applied."""

    kind: str
    number: int
    after_apply: bool


class KillSwitch:
    """Track the API requests of the current connector process, and kill it when its trigger fires."""

    def __init__(self) -> None:
        self.process: asyncio.subprocess.Process | None = None
        self.record: KillRecord | None = None
        self.trigger: Trigger | None = None
        self.started_at = 0.0
        self.first_request = asyncio.Event()
        self.first_write = asyncio.Event()
        self.fired = asyncio.Event()
        self.writes = 0
        self.kinds: Counter[str] = Counter()
        self.in_flight: dict[int, str] = {}

    def start(self, process: asyncio.subprocess.Process, record: KillRecord | None, trigger: Trigger | None) -> None:
        self.process, self.record, self.trigger = process, record, trigger
        self.started_at = time.monotonic()
        self.first_request = asyncio.Event()
        self.first_write = asyncio.Event()
        self.fired = asyncio.Event()
        self.writes = 0
        self.kinds = Counter()
        self.in_flight = {}

    def kill(self, fired_by: str, after_apply: bool = False) -> None:
        """Send SIGKILL now, and record what was in flight at that moment."""
        process = self.process
        if process is None or process.returncode is not None or self.fired.is_set():
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        self.fired.set()
        if self.record is not None:
            self.record.fired_by = fired_by
            self.record.writes = self.writes
            self.record.in_flight = sorted(self.in_flight.values())
            self.record.after_apply = after_apply

    def middleware(self, system: str) -> Callable[..., Awaitable[web.StreamResponse]]:
        """Return an aiohttp middleware for the simulator `system` ("mdr" or "jira")."""

        @web.middleware
        async def watch(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
            if request.path.startswith("/_sim/"):
                return await handler(request)
            if not self.first_request.is_set():
                self.first_request.set()
                if self.record is not None:
                    self.record.startup_seconds = time.monotonic() - self.started_at
            kind = write_kind(system, request)
            if kind is None or self.process is None:
                return await handler(request)

            self.writes += 1
            self.kinds[kind] += 1
            self.first_write.set()
            key = id(request)
            self.in_flight[key] = kind
            try:
                self._check(kind, after_apply=False)
                response = await handler(request)
                if response.status < 400:
                    self._check(kind, after_apply=True)
                return response
            finally:
                self.in_flight.pop(key, None)

        return watch

    def _check(self, kind: str, *, after_apply: bool) -> None:
        trigger = self.trigger
        if trigger is None or trigger.after_apply != after_apply:
            return
        if trigger.kind != "write" and trigger.kind != kind:
            return
        count = self.writes if trigger.kind == "write" else self.kinds[kind]
        if count >= trigger.number:
            self.kill("applied" if after_apply else "arrived", after_apply=after_apply)


def write_kind(system: str, request: web.Request) -> str | None:
    """Name the connector write that `request` is, such as `mdr comments/create`; None for a read."""
    if system == "mdr":
        method = request.match_info.get("method", "")
        return f"mdr {method}" if method in MDR_WRITES else None
    if request.method not in ("POST", "PUT", "DELETE"):
        return None
    resource = request.match_info.route.resource
    path = resource.canonical if resource is not None else request.path
    if path in JIRA_READ_POSTS:
        return None
    return f"jira {request.method} {path}"


# The simulators


@dataclass
class Simulators:
    mdr: Any
    jira: Any
    mdr_url: str
    jira_url: str
    http: aiohttp.ClientSession

    @property
    def mdr_origin(self) -> str:
        return self.mdr_url.split("/api/", 1)[0]

    async def control(self, system: str, method: str, path: str, body: Any = None) -> Any:
        """Call one control route; raise RuntimeError on an error reply."""
        origin = self.mdr_origin if system == "mdr" else self.jira_url
        async with self.http.request(method, origin + path, json=body) as reply:
            data = await reply.json(content_type=None) if reply.status != 204 else None
            if reply.status >= 400:
                raise RuntimeError(f"{system} control {method} {path} failed with {reply.status}: {data}")
            return data


@contextlib.asynccontextmanager
async def running_simulators(settings: CrashSettings, switch: KillSwitch) -> AsyncIterator[Simulators]:
    """Serve both simulators on loopback in this event loop, each behind the kill switch's middleware."""
    from mdr_connector.adapters.jira.simulator import JiraSimulator
    from mdr_connector.adapters.jira.simulator import make_app as make_jira_app
    from mdr_connector.adapters.loopback import serve_on_loopback
    from mdr_connector.adapters.mdr.simulator.app import make_app as make_mdr_app
    from mdr_connector.adapters.mdr.simulator.protocol import API_PREFIX
    from mdr_connector.adapters.mdr.simulator.state import MdrSimulator, SimulatorSettings

    # The access token outlives any run, so no refresh happens and no kill
    # lands inside one. A refresh whose new token the killed process never
    # stored breaks the chain by design, which tests/test_token_chain.py covers.
    mdr = MdrSimulator(
        SimulatorSettings(latency_seconds=settings.latency_seconds, access_token_seconds=ACCESS_TOKEN_SECONDS),
        seed=settings.seed,
    )
    mdr.create_client(CLIENT_ID, connection_name=MDR_CONNECTION_NAME)
    jira = JiraSimulator(deployment="cloud", search_delay_seconds=0, latency_seconds=settings.latency_seconds)
    mdr_app, jira_app = make_mdr_app(mdr), make_jira_app(jira)
    # Outermost, so the switch handles each request before the simulator and each reply before the client gets it.
    mdr_app.middlewares.insert(0, switch.middleware("mdr"))
    jira_app.middlewares.insert(0, switch.middleware("jira"))
    # Each kill resets the connections of the killed process, and aiohttp logs
    # a traceback for every request whose body was cut off that way.
    server_log = logging.getLogger("aiohttp.server")
    level = server_log.level
    server_log.setLevel(logging.CRITICAL)
    try:
        async with (
            serve_on_loopback(mdr_app) as mdr_origin,
            serve_on_loopback(jira_app) as jira_url,
            aiohttp.ClientSession() as http,
        ):
            yield Simulators(mdr, jira, mdr_origin + API_PREFIX, jira_url, http)
    finally:
        server_log.setLevel(level)
        mdr.close()
        jira.close()


# What people did: the expected state


@dataclass
class Expected:
    """Everything added on each side, by unique token or file name, with the incident it belongs to."""

    incidents: list[str] = field(default_factory=list)
    mdr_comments: dict[str, str] = field(default_factory=dict)
    jira_comments: dict[str, str] = field(default_factory=dict)
    mdr_files: dict[str, tuple[str, int]] = field(default_factory=dict)
    jira_files: dict[str, tuple[str, int]] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)
    moved: set[str] = field(default_factory=set)
    on_hold: set[str] = field(default_factory=set)
    serial: int = 0

    def next_token(self, prefix: str) -> str:
        self.serial += 1
        return f"{prefix}{self.serial:05d}"


class People:
    """The SOC in MDR and the person in Jira, acting through the control APIs."""

    def __init__(self, sims: Simulators, expected: Expected, rng: random.Random) -> None:
        self.sims = sims
        self.expected = expected
        self.rng = rng

    async def seed(self, count: int) -> None:
        """Create `count` incidents, each with one or two SOC comments, and a file on every fourth."""
        for index in range(count):
            incident = await self.sims.control("mdr", "POST", f"/_sim/clients/{CLIENT_ID}/incidents", {})
            incident_id = incident["incident_id"]
            self.expected.incidents.append(incident_id)
            for _ in range(1 + index % 2):
                await self.mdr_comment(incident_id)
            if index % 4 == 0:
                await self.mdr_file(incident_id)

    async def mdr_comment(self, incident_id: str) -> None:
        token = self.expected.next_token("socmdr")
        text = f"<p>Check {token}: the host ran an encoded <b>PowerShell</b> command.</p>"
        await self.sims.control(
            "mdr", "POST", f"/_sim/clients/{CLIENT_ID}/incidents/{incident_id}/comments",
            {"text": text, "author": "SOC Analyst"},
        )
        self.expected.mdr_comments[token] = incident_id

    async def mdr_file(self, incident_id: str) -> None:
        name = f"{self.expected.next_token('mdrfile')}.txt"
        text = f"triage notes {name}\n" * self.rng.randint(1, 40)
        await self.sims.control(
            "mdr", "POST", f"/_sim/clients/{CLIENT_ID}/incidents/{incident_id}/attachments",
            {"full_name": name, "text": text, "author": "SOC Analyst"},
        )
        self.expected.mdr_files[name] = (incident_id, len(text.encode()))

    async def jira_comment(self, incident_id: str, key: str) -> None:
        token = self.expected.next_token("socjira")
        body = f"Checked {token}: the host is *isolated*."
        await self.sims.control("jira", "POST", f"/_sim/issues/{key}/comments", {"body": body, "author": PERSON})
        self.expected.jira_comments[token] = incident_id

    async def jira_file(self, incident_id: str, key: str) -> None:
        name = f"{self.expected.next_token('jirafile')}.txt"
        text = f"firewall export {name}\n" * self.rng.randint(1, 40)
        await self.sims.control(
            "jira", "POST", f"/_sim/issues/{key}/attachments",
            {"filename": name, "text": text, "author": PERSON, "mime_type": "text/plain"},
        )
        self.expected.jira_files[name] = (incident_id, len(text.encode()))

    async def issue_keys(self) -> dict[str, str]:
        """Return the key of each incident's first issue, found by the connector's label."""
        state = await self.sims.control("jira", "GET", "/_sim/state")
        keys: dict[str, str] = {}
        for issue in state["issues"]:
            for label in issue["fields"].get("labels", []):
                if label.startswith("mdr-") and label != "mdr-connector":
                    keys.setdefault(label.removeprefix("mdr-"), issue["key"])
        return keys

    async def act(self, settings: CrashSettings) -> None:
        """Make one round of changes on random incidents, on the Jira side only where an issue exists."""
        incidents = self.expected.incidents
        for _ in range(settings.mdr_comments_per_round):
            await self.mdr_comment(self.rng.choice(incidents))
        for _ in range(settings.mdr_files_per_round):
            await self.mdr_file(self.rng.choice(incidents))

        keys = await self.issue_keys()
        linked = sorted(keys)
        if not linked:
            return
        for _ in range(settings.jira_comments_per_round):
            incident_id = self.rng.choice(linked)
            await self.jira_comment(incident_id, keys[incident_id])
        for _ in range(settings.jira_files_per_round):
            incident_id = self.rng.choice(linked)
            await self.jira_file(incident_id, keys[incident_id])
        await self.move_statuses(settings, keys)

    async def move_statuses(self, settings: CrashSettings, keys: dict[str, str]) -> None:
        """Put incidents on hold in MDR, and move other issues in Jira, never both for one incident.

        Incidents at an even position in the seed order belong to MDR and
        the others to Jira, so the two sides never move one incident in
        opposite directions between two runs.
        """
        position = {incident_id: index for index, incident_id in enumerate(self.expected.incidents)}
        mdr_side = [i for i in sorted(keys) if position[i] % 2 == 0 and i not in self.expected.on_hold]
        jira_side = [i for i in sorted(keys) if position[i] % 2 == 1 and i not in self.expected.done]
        for incident_id in self.rng.sample(mdr_side, min(settings.holds_per_round, len(mdr_side))):
            await self.sims.control(
                "mdr", "PATCH", f"/_sim/clients/{CLIENT_ID}/incidents/{incident_id}", {"status": "On hold"}
            )
            self.expected.on_hold.add(incident_id)
        for incident_id in self.rng.sample(jira_side, min(settings.transitions_per_round, len(jira_side))):
            target = "Done" if incident_id in self.expected.moved or self.rng.random() < 0.3 else "In Progress"
            await self.sims.control(
                "jira", "POST", f"/_sim/issues/{keys[incident_id]}/transitions", {"status": target}
            )
            self.expected.moved.add(incident_id)
            if target == "Done":
                self.expected.done.add(incident_id)


# The connector process


def write_config(work: Path, sims: Simulators, settings: CrashSettings) -> Path:
    """Write the connector's config and a mapping with the status sync on; return the config's path."""
    from importlib import resources

    mapping = yaml.safe_load(
        resources.files("mdr_connector.mappings").joinpath("jira.yaml").read_text(encoding="utf-8")
    )
    mapping["status"] = {
        "to_ticket": {"Open": "To Do", "On hold": "On Hold", "Resolved": "Done", "Closed": "Done"},
        "close_mdr": {"enabled": True, "done_statuses": ["Done"], "default_resolution": "TRUE_POSITIVE"},
    }
    mapping_path = work / "mapping.yaml"
    mapping_path.write_text(yaml.safe_dump(mapping, allow_unicode=True), encoding="utf-8")

    token_dir = work / "tokens"
    token_dir.mkdir(mode=0o700, exist_ok=True)
    config = {
        "data_dir": str(work / "data"),
        "log": {"level": "INFO", "format": "json"},
        "connections": [
            {
                "name": CONNECTION,
                "mdr": {
                    "base_url": sims.mdr_url,
                    "client_id": CLIENT_ID,
                    "connection_name": MDR_CONNECTION_NAME,
                    "token_dir": str(token_dir),
                    "timeout_seconds": 30,
                },
                "ticket": {
                    "system": "jira",
                    "url": sims.jira_url,
                    "auth": {
                        "type": "api_token",
                        "email": "mdr-connector@example.test",
                        "token": {"env": JIRA_TOKEN_VARIABLE},
                    },
                    "search_delay_seconds": 0,
                    "timeout_seconds": 30,
                },
                "mapping": str(mapping_path),
                "sync": {
                    "interval_seconds": settings.interval_seconds,
                    # Parked items come due at once, so the final runs converge without waiting.
                    "retry_base_seconds": 0.1,
                    "retry_max_seconds": 0.5,
                },
            }
        ],
    }
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


async def activate_token(config: Path, sims: Simulators) -> None:
    """Activate the MDR token chain once, as `mdr-connector token activate` does, before the first round."""
    from mdr_connector.adapters.mdr.client import MdrClient
    from mdr_connector.connector.config import load_settings

    settings = load_settings(config)
    async with MdrClient(settings.connections[0].mdr) as client:
        await client.tokens.activate(sims.mdr.issue_console_token(CLIENT_ID))


async def start_connector(config: Path, log_path: Path, *command: str) -> asyncio.subprocess.Process:
    from mdr_connector.adapters.jira.simulator import SERVICE_TOKEN

    environment = {**os.environ, JIRA_TOKEN_VARIABLE: SERVICE_TOKEN, "LANG": "C.UTF-8"}
    environment.pop("MDR_CONNECTOR_LANG", None)
    with log_path.open("ab") as log_file:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mdr_connector.connector.cli", "--config", str(config), *command,
            stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file, env=environment,
        )


def plan_kill(
    rng: random.Random, settings: CrashSettings, previous: Counter[str]
) -> tuple[str, float | None, Trigger | None]:
    """Pick a round's kill: a delay after the first write, or a trigger on the Nth write of a kind.

    A trigger aims at a kind of write that the previous round made, and at
    most at as many of them as it made, so that most triggers fire before
    the fallback delay. `previous` counts the previous round's writes by
    kind. After a round without writes, the trigger aims at any write.
    """
    choice = rng.random()
    if choice < 0.3:
        delay = rng.uniform(settings.min_delay_seconds, settings.max_delay_seconds)
        return f"timer {delay:.2f}s", delay, None
    kind = rng.choice(["write", *sorted(previous)])
    largest = previous[kind] if kind != "write" else sum(previous.values()) or FIRST_TRIGGER_WRITES
    number = rng.randint(1, largest)
    after_apply = choice >= 0.65
    moment = "applied" if after_apply else "arrived"
    return f"{moment} #{number} {kind}", None, Trigger(kind, number, after_apply)


async def run_round(
    number: int, config: Path, log_path: Path, switch: KillSwitch, rng: random.Random, settings: CrashSettings
) -> KillRecord:
    """Start `run`, kill it as planned, and return the round's record.

    Delays count from the process's first write, or from its first API
    request plus `idle_seconds` when it writes nothing. A start-up and the
    reads before the first write can take seconds on a loaded machine, and
    a delay counted from the start would spend most kills there.
    """
    plan, delay, trigger = plan_kill(rng, settings, switch.kinds)
    record = KillRecord(number, plan)
    with log_path.open("a", encoding="utf-8") as log_file:
        log_file.write(f"\n=== round {number}: {plan}\n")
    process = await start_connector(config, log_path, "run")
    switch.start(process, record, trigger)
    try:
        await wait_event_or_exit(process, switch.first_request, PROCESS_TIMEOUT_SECONDS)
        await wait_event_or_exit(process, switch.first_write, settings.idle_seconds)
        wait = delay if delay is not None else settings.fallback_seconds
        await wait_event_or_exit(process, switch.fired, wait)
        switch.kill("timer" if delay is not None else "fallback")
        record.exit_code = await asyncio.wait_for(process.wait(), PROCESS_TIMEOUT_SECONDS)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        switch.process = None
    return record


async def wait_event_or_exit(process: asyncio.subprocess.Process, event: asyncio.Event, timeout: float) -> None:
    """Wait until `event` is set, the process exits, or `timeout` seconds pass, whichever comes first."""
    waiting = asyncio.create_task(event.wait())
    exited = asyncio.create_task(process.wait())
    try:
        await asyncio.wait({waiting, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()
        exited.cancel()


async def final_runs(config: Path, log_path: Path, switch: KillSwitch, report: CrashReport) -> bool:
    """Run `sync --once` until one run exits 0, makes no write and leaves nothing parked; return whether it did."""
    for number in range(1, FINAL_RUNS + 1):
        with log_path.open("a", encoding="utf-8") as log_file:
            log_file.write(f"\n=== final run {number}: sync --once\n")
        process = await start_connector(config, log_path, "sync", "--once")
        switch.start(process, None, None)
        try:
            exit_code = await asyncio.wait_for(process.wait(), PROCESS_TIMEOUT_SECONDS)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            switch.process = None
        parked = await parked_count(config)
        report.final_runs.append({"exit_code": exit_code, "writes": switch.writes, "parked": parked})
        if exit_code == 0 and switch.writes == 0 and parked == 0:
            return True
    return False


async def parked_reasons(config: Path) -> list[str]:
    """Return the kind, id and reason of every parked item, so the report of a failed run shows why it did not settle."""
    from mdr_connector.connector.config import load_settings
    from mdr_connector.connector.store import Store

    settings = load_settings(config)
    store = await Store.open(settings.resolved_database_url())
    try:
        return [f"{row.kind} {row.item_id} after {row.attempts} attempts: {row.reason}" for row in await store.list_parked(CONNECTION)]
    finally:
        await store.close()


async def parked_count(config: Path) -> int:
    from mdr_connector.connector.config import load_settings
    from mdr_connector.connector.store import Store

    settings = load_settings(config)
    store = await Store.open(settings.resolved_database_url())
    try:
        return await store.count_parked(CONNECTION)
    finally:
        await store.close()


# Counting both sides


async def count_both_sides(sims: Simulators, expected: Expected, report: CrashReport) -> None:
    """Count issues, comments, files and statuses on both simulators against `expected`; add each difference to the report."""
    jira_state = await sims.control("jira", "GET", "/_sim/state")
    mdr_incidents = await sims.control("mdr", "GET", f"/_sim/clients/{CLIENT_ID}/incidents")
    problems = report.problems
    issue_problems = problems["issues"]

    issues_of: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for issue in jira_state["issues"]:
        incident_id = (issue["properties"].get("mdr-connector") or {}).get("incident_id")
        issues_of[incident_id].append(issue)
    for incident_id in expected.incidents:
        found = [issue["key"] for issue in issues_of.get(incident_id, [])]
        if len(found) != 1:
            issue_problems.append(f"incident {incident_id}: {len(found)} issues {found}, expected 1")
    strays = set(issues_of) - set(expected.incidents)
    for incident_id in sorted(strays, key=str):
        issue_problems.append(f"issues {[issue['key'] for issue in issues_of[incident_id]]} name no seeded incident ({incident_id})")
    issue_incident = {issue["key"]: incident_id for incident_id, issues in issues_of.items() for issue in issues}
    by_id = {incident["incident_id"]: incident for incident in mdr_incidents}

    # MDR to Jira: every SOC comment and file once, on its incident's issue.
    jira_comments = [(issue["key"], comment) for issue in jira_state["issues"] for comment in issue["comments"]]
    copies = token_places(
        (issue_incident.get(key), comment["body"]) for key, comment in jira_comments if comment["author"] == SERVICE_USER
    )
    check_copies("MDR comment", expected.mdr_comments, copies, problems["comments"])
    jira_files = [(issue["key"], attachment) for issue in jira_state["issues"] for attachment in issue["attachments"]]
    file_copies = file_places(
        (issue_incident.get(key), attachment["filename"], attachment["size"])
        for key, attachment in jira_files if attachment["author"] == SERVICE_USER
    )
    check_files("MDR file", expected.mdr_files, file_copies, problems["files"])

    # Jira to MDR: every comment and file of the person once, on the issue's incident.
    mdr_comments = [(incident["incident_id"], comment) for incident in mdr_incidents for comment in incident["comments"]]
    copies = token_places(
        (incident_id, comment["text"]) for incident_id, comment in mdr_comments if comment["origin"] == "Client"
    )
    check_copies("Jira comment", expected.jira_comments, copies, problems["comments"])
    mdr_files = [(incident["incident_id"], attachment) for incident in mdr_incidents for attachment in incident["attachments"]]
    file_copies = file_places(
        (incident_id, attachment["full_name"], attachment["file_size"])
        for incident_id, attachment in mdr_files if attachment["origin"] == "Client"
    )
    check_files("Jira file", expected.jira_files, file_copies, problems["files"])

    # Statuses: a person's Done closed the incident (the simulator rejects a second close), and MDR's On hold moved the issue.
    statuses = {
        issue_incident[issue["key"]]: status_name(issue["fields"].get("status")) for issue in jira_state["issues"]
    }
    for incident_id in expected.incidents:
        closed = by_id[incident_id]["status"] == "Closed"
        if closed != (incident_id in expected.done):
            problems["statuses"].append(
                f"incident {incident_id}: MDR status {by_id[incident_id]['status']!r}, "
                f"but the person {'moved' if incident_id in expected.done else 'did not move'} its issue to Done"
            )
        if incident_id in expected.on_hold and statuses.get(incident_id) != "On Hold":
            problems["statuses"].append(f"incident {incident_id} is on hold in MDR, but its issue is {statuses.get(incident_id)!r}")
    connector_comments_jira = sum(1 for _, comment in jira_comments if comment["author"] == SERVICE_USER)
    connector_comments_mdr = sum(1 for _, comment in mdr_comments if comment["origin"] == "Client")
    report.counts = {
        "incidents": len(expected.incidents),
        "issues": len(jira_state["issues"]),
        "MDR comments": len(expected.mdr_comments),
        "connector comments in Jira": connector_comments_jira,
        "Jira comments": len(expected.jira_comments),
        "connector comments in MDR": connector_comments_mdr,
        "MDR files": len(expected.mdr_files),
        "connector files in Jira": sum(1 for _, attachment in jira_files if attachment["author"] == SERVICE_USER),
        "Jira files": len(expected.jira_files),
        "connector files in MDR": sum(1 for _, attachment in mdr_files if attachment["origin"] == "Client"),
        "issues moved to Done": len(expected.done),
        "incidents closed": sum(1 for incident in mdr_incidents if incident["status"] == "Closed"),
        "incidents on hold": len(expected.on_hold),
        "MDR session/confirm calls": sims.mdr.confirm_calls,
    }
    if connector_comments_jira != len(expected.mdr_comments):
        problems["comments"].append(f"the connector wrote {connector_comments_jira} Jira comments for {len(expected.mdr_comments)} MDR comments")
    if connector_comments_mdr != len(expected.jira_comments):
        problems["comments"].append(f"the connector wrote {connector_comments_mdr} MDR comments for {len(expected.jira_comments)} Jira comments")


def status_name(value: Any) -> str | None:
    """Return a Jira status name, given as a plain name or as an object with `name`."""
    return value.get("name") if isinstance(value, dict) else value


def token_places(texts: Any) -> dict[str, list[str | None]]:
    """Map each token found in the texts to the incidents whose copies carry it, once per copy."""
    import re

    places: dict[str, list[str | None]] = defaultdict(list)
    pattern = re.compile(r"\b(?:socmdr|socjira)\d{5}\b")
    for incident_id, text in texts:
        for token in set(pattern.findall(text or "")):
            places[token].append(incident_id)
    return places


def check_copies(label: str, expected: dict[str, str], places: dict[str, list[str | None]], problems: list[str]) -> None:
    for token, incident_id in expected.items():
        found = places.get(token, [])
        if found != [incident_id]:
            problems.append(f"{label} {token} of incident {incident_id}: {len(found)} copies, on {found}")
    for token in sorted(set(places) - set(expected)):
        if token.startswith(("socmdr", "socjira")) and (label.startswith("MDR") == token.startswith("socmdr")):
            problems.append(f"{label} {token} copied but never written by a person")


def file_places(files: Any) -> dict[str, list[tuple[str | None, int]]]:
    places: dict[str, list[tuple[str | None, int]]] = defaultdict(list)
    for incident_id, name, size in files:
        places[name].append((incident_id, size))
    return places


def check_files(
    label: str, expected: dict[str, tuple[str, int]], places: dict[str, list[tuple[str | None, int]]], problems: list[str]
) -> None:
    for name, (incident_id, size) in expected.items():
        found = places.get(name, [])
        if found != [(incident_id, size)]:
            problems.append(f"{label} {name} ({size} bytes) of incident {incident_id}: copies {found}")
    for name in sorted(set(places) - set(expected)):
        problems.append(f"{label} copy {name} matches no file a person added: {places[name]}")


# The whole run


async def run_crash(
    settings: CrashSettings, work: Path, progress: Callable[[KillRecord], None] | None = None
) -> CrashReport:
    """Run every round and the final convergence in `work`, count both simulators, and return the report."""
    started = time.monotonic()
    report = CrashReport(settings, work)
    rng = random.Random(settings.seed)
    switch = KillSwitch()
    log_path = work / "connector.log"
    async with running_simulators(settings, switch) as sims:
        expected = Expected()
        people = People(sims, expected, rng)
        config = write_config(work, sims, settings)
        await activate_token(config, sims)
        await people.seed(settings.incidents)

        for number in range(1, settings.rounds + 1):
            if number > 1:
                await people.act(settings)
            record = await run_round(number, config, log_path, switch, rng, settings)
            report.kills.append(record)
            if progress is not None:
                progress(record)
            if record.exit_code != -signal.SIGKILL:
                report.problems["rounds"].append(
                    f"round {number}: the connector exited by itself with {record.exit_code}; see {log_path}"
                )

        if not await final_runs(config, log_path, switch, report):
            report.problems["final runs"].append(f"no final `sync --once` ended with no write and nothing parked; see {log_path}")
            report.problems["final runs"] += [f"still parked: {reason}" for reason in await parked_reasons(config)]
        await count_both_sides(sims, expected, report)
    report.seconds = time.monotonic() - started
    return report
