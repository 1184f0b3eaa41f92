"""Several connector instances share ten connections through leases in one PostgreSQL database.

The MDR simulator (one client per connection) and the Jira simulator (one
project per connection) serve from the caller's event loop, so they
outlive every instance. Each instance is `mdr-connector run` in a child
process, all started with one config file in cluster mode. The harness
watches two things while they run:

- the `leases` and `cluster_instances` tables, read every
  POLL_SECONDS, which give each connection's holder and epoch, and each
  instance's process id;
- every write that reaches a simulator, with the connection it belongs to
  and the process that sent it. The process is found from the TCP peer
  port through /proc/net/tcp and /proc/PID/fd, so the harness runs on
  Linux only.

Two scenarios:

- takeover (`run_takeover`): three instances share the connections; the
  one that holds the most is killed with SIGKILL, and the time until each
  of its connections has a new holder is measured; more incidents come in
  after the kill.
- stall (`run_stall`): an instance that holds leases and is writing gets
  SIGSTOP; once its leases have new holders, the other instances get
  SIGSTOP too, so only the stalled one could write; it gets SIGCONT and is
  watched for a few seconds. Then everything resumes.

Both end with the same checks: one Jira issue per incident, in its
connection's project; every comment and file once on the other side;
nothing parked; no write from a process that did not hold the connection's
lease at that moment; and every MDR refresh token rotated at most once,
with no `session/confirm` rejected. Access tokens live
`access_token_seconds`, so each connection's pair rotates several times
during a run.

    .venv/bin/python bench/cluster.py [--scenario takeover|stall|both] [--connections 10] [--instances 3]
        [--incidents 5] [--takeover-seconds 8] [--interval 1] [--latency-ms 20] [--keep]

`tests/test_cluster.py` runs both scenarios with their defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))

import crash  # noqa: E402  (bench/ is not a package)

JIRA_TOKEN_VARIABLE = "MDR_CLUSTER_JIRA_TOKEN"
TOKEN_KEY_VARIABLE = "MDR_CLUSTER_TOKEN_KEY"
MDR_CONNECTION_NAME = "mdr-connector-cluster"
SERVICE_USER = crash.SERVICE_USER
PERSON = crash.PERSON
# How often the harness reads the leases and cluster_instances tables.
POLL_SECONDS = 0.1
# The longest wait for one CLI command, or for an instance to stop after SIGTERM.
COMMAND_TIMEOUT_SECONDS = 120
STOP_TIMEOUT_SECONDS = 60
# A run whose items are not all copied, and in which no instance wrote for this long, is stuck.
IDLE_GIVE_UP_SECONDS = 30
# session/confirm counts as a write: only the lease holder may call it.
MDR_WRITES = crash.MDR_WRITES | {"session/confirm"}
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


@dataclass
class ClusterRunSettings:
    """The size and timing of one scenario run."""

    connections: int = 10
    instances: int = 3
    # Incidents per connection seeded before the instances start, and added after the kill or the stall.
    incidents: int = 5
    later_incidents: int = 2
    seed: int = 1
    latency_seconds: float = 0.0
    interval_seconds: float = 1.0
    takeover_seconds: float = 8.0
    # Short access tokens, so each connection's pair rotates several times in a run.
    access_token_seconds: int = 4
    # mdr.timeout_seconds of each connection; 30 is the config's default.
    mdr_timeout_seconds: float = 30.0
    # How long everything may take to sync after the last change.
    settle_seconds: float = 150.0
    # Stall scenario: how long the stalled instance is watched after SIGCONT
    # while the others are stopped, and the pause between the incidents that
    # keep every instance writing.
    watch_seconds: float = 3.0
    feed_every_seconds: float = 0.3

    @property
    def fair_share(self) -> int:
        return math.ceil(self.connections / self.instances)


# The layout: connection names, MDR clients and Jira projects


@dataclass(frozen=True)
class Layout:
    """Connection i pairs the MDR client `clients[i]` with the Jira project `projects[i]`."""

    connections: tuple[str, ...]
    clients: tuple[str, ...]
    projects: tuple[str, ...]

    @classmethod
    def of(cls, count: int) -> Layout:
        return cls(
            tuple(f"conn{index:02d}" for index in range(count)),
            tuple(f"cluster-client-{index:02d}-{'0123456789abcdef' * 2}" for index in range(count)),
            tuple(f"CL{index:02d}" for index in range(count)),
        )

    def client_of(self, connection: str) -> str:
        return self.clients[self.connections.index(connection)]

    def project_of(self, connection: str) -> str:
        return self.projects[self.connections.index(connection)]

    def connection_of_client(self, client_id: str) -> str | None:
        return self.connections[self.clients.index(client_id)] if client_id in self.clients else None

    def connection_of_project(self, project: str) -> str | None:
        return self.connections[self.projects.index(project)] if project in self.projects else None


# Which process sent a request


class PeerProcesses:
    """Find the process, among the registered ones, that owns the client end of a loopback TCP connection.

    The simulators and the instances share this host, so the peer port of
    a request names a socket in /proc/net/tcp, and its inode appears as
    `socket:[INODE]` among the open files of exactly one process.
    """

    def __init__(self) -> None:
        self.pids: set[int] = set()
        # id(transport) -> (transport, pid); the transport is kept so its id is never reused.
        self._by_transport: dict[int, tuple[Any, int | None]] = {}

    def pid_of(self, request: web.Request) -> int | None:
        transport = request.transport
        if transport is None:
            return None
        cached = self._by_transport.get(id(transport))
        if cached is not None and cached[0] is transport:
            return cached[1]
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        pid = self.lookup(peer[1], local[1]) if peer and local else None
        self._by_transport[id(transport)] = (transport, pid)
        return pid

    def lookup(self, client_port: int, server_port: int) -> int | None:
        inode = socket_inode(client_port, server_port)
        if inode is None:
            return None
        target = f"socket:[{inode}]"
        for pid in sorted(self.pids):
            with contextlib.suppress(OSError):
                folder = Path(f"/proc/{pid}/fd")
                for entry in os.listdir(folder):
                    with contextlib.suppress(OSError):
                        if os.readlink(folder / entry) == target:
                            return pid
        return None


def socket_inode(client_port: int, server_port: int) -> int | None:
    """Return the inode of the TCP socket whose local port is `client_port` and remote port `server_port`."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table, encoding="ascii") as rows:
            next(rows, None)
            for row in rows:
                columns = row.split()
                local_port = int(columns[1].rsplit(":", 1)[1], 16)
                remote_port = int(columns[2].rsplit(":", 1)[1], 16)
                if local_port == client_port and remote_port == server_port:
                    return int(columns[9])
    return None


# Writes that reach the simulators


@dataclass
class Write:
    """One write request at a simulator: when it arrived, what it was, for which connection, from which process."""

    at: float
    system: str
    kind: str
    connection: str | None
    pid: int | None
    status: int | None = None
    replied_at: float | None = None


class WriteRecorder:
    """Record every write request that reaches either simulator; an aiohttp middleware per simulator."""

    def __init__(self, layout: Layout, peers: PeerProcesses) -> None:
        self.layout = layout
        self.peers = peers
        self.writes: list[Write] = []
        self.jira: Any = None
        # Per process: session/confirm requests without a reply yet, and when the last reply went out.
        self.confirms_in_flight: Counter[int | None] = Counter()
        self.last_confirm_reply: dict[int | None, float] = {}

    def middleware(self, system: str) -> Callable[..., Awaitable[web.StreamResponse]]:
        @web.middleware
        async def record(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
            if request.path.startswith("/_sim/"):
                return await handler(request)
            kind = write_kind(system, request)
            if kind is None:
                return await handler(request)

            write = Write(time.time(), system, kind, self.connection_of(system, request), self.peers.pid_of(request))
            self.writes.append(write)
            confirm = kind == "mdr session/confirm"
            if confirm:
                self.confirms_in_flight[write.pid] += 1
            try:
                response = await handler(request)
                write.status = response.status
                if write.connection is None and kind == "jira POST /rest/api/2/issue":
                    write.connection = self.connection_of_created(response)
                return response
            finally:
                write.replied_at = time.time()
                if confirm:
                    self.confirms_in_flight[write.pid] -= 1
                    self.last_confirm_reply[write.pid] = write.replied_at

        return record

    def connection_of(self, system: str, request: web.Request) -> str | None:
        if system == "mdr":
            return self.layout.connection_of_client(request.match_info.get("client_id", ""))
        issue = request.match_info.get("issue")
        if issue is not None:
            return self.connection_of_issue(issue)
        comment = request.match_info.get("comment")
        if comment is not None and comment.isdigit() and self.jira is not None:
            for candidate in self.jira.issues.values():
                if any(item.id == int(comment) for item in candidate.comments):
                    return self.connection_of_issue(candidate.key)
        return None

    def connection_of_issue(self, reference: str) -> str | None:
        if reference.isdigit() and self.jira is not None:
            issue = self.jira.issues.get(int(reference))
            reference = issue.key if issue is not None else reference
        return self.layout.connection_of_project(reference.rsplit("-", 1)[0])

    def connection_of_created(self, response: web.StreamResponse) -> str | None:
        body = getattr(response, "body", None)
        if response.status >= 400 or not isinstance(body, bytes):
            return None
        with contextlib.suppress(ValueError, AttributeError):
            return self.connection_of_issue(str(json.loads(body).get("key", "")))
        return None

    def idle_confirms(self, pid: int, quiet_seconds: float) -> bool:
        """Return whether `pid` has no session/confirm in flight and got no reply to one for `quiet_seconds`."""
        if self.confirms_in_flight[pid] > 0:
            return False
        return time.time() - self.last_confirm_reply.get(pid, 0.0) >= quiet_seconds

    def last_write_at(self, pid: int) -> float | None:
        for write in reversed(self.writes):
            if write.pid == pid and write.kind != "mdr session/confirm":
                return write.at
        return None


def write_kind(system: str, request: web.Request) -> str | None:
    """Name the write that `request` is, such as `mdr comments/create`; None for a read."""
    if system == "mdr":
        method = request.match_info.get("method", "")
        return f"mdr {method}" if method in MDR_WRITES else None
    return crash.write_kind(system, request)


# The simulators


@dataclass
class Simulators(crash.Simulators):
    layout: Layout = field(default_factory=lambda: Layout.of(0))


@contextlib.asynccontextmanager
async def running_simulators(
    settings: ClusterRunSettings, layout: Layout, recorder: WriteRecorder
) -> AsyncIterator[Simulators]:
    """Serve MDR with one client per connection and Jira with one project per connection, both behind the recorder."""
    from mdr_connector.adapters.jira.simulator import JiraSimulator
    from mdr_connector.adapters.jira.simulator import make_app as make_jira_app
    from mdr_connector.adapters.loopback import serve_on_loopback
    from mdr_connector.adapters.mdr.simulator.app import make_app as make_mdr_app
    from mdr_connector.adapters.mdr.simulator.protocol import API_PREFIX
    from mdr_connector.adapters.mdr.simulator.state import MdrSimulator, SimulatorSettings

    mdr = MdrSimulator(
        SimulatorSettings(latency_seconds=settings.latency_seconds, access_token_seconds=settings.access_token_seconds),
        seed=settings.seed,
    )
    for client_id in layout.clients:
        mdr.create_client(client_id, connection_name=MDR_CONNECTION_NAME)
    jira = JiraSimulator(
        deployment="cloud",
        search_delay_seconds=0,
        latency_seconds=settings.latency_seconds,
        projects={key: (f"Security incidents {key}", ("Task",)) for key in layout.projects},
    )
    recorder.jira = jira
    mdr_app, jira_app = make_mdr_app(mdr), make_jira_app(jira)
    mdr_app.middlewares.insert(0, recorder.middleware("mdr"))
    jira_app.middlewares.insert(0, recorder.middleware("jira"))
    # A killed instance resets its connections, and aiohttp logs a traceback for each request cut off that way.
    server_log = logging.getLogger("aiohttp.server")
    level = server_log.level
    server_log.setLevel(logging.CRITICAL)
    try:
        async with (
            serve_on_loopback(mdr_app) as mdr_origin,
            serve_on_loopback(jira_app) as jira_url,
            aiohttp.ClientSession() as http,
        ):
            yield Simulators(mdr, jira, mdr_origin + API_PREFIX, jira_url, http, layout)
    finally:
        server_log.setLevel(level)
        mdr.close()
        jira.close()


# What people did: the expected state


class People:
    """The SOC in MDR and the person in Jira, acting on every connection through the control APIs."""

    def __init__(self, sims: Simulators, rng: random.Random) -> None:
        self.sims = sims
        self.rng = rng
        self.expected = crash.Expected()
        self.connection_of: dict[str, str] = {}

    async def seed(self, per_connection: int) -> None:
        """Create `per_connection` incidents on each connection, with one or two SOC comments each and a file on every third."""
        for number in range(per_connection):
            for connection in self.sims.layout.connections:
                await self.incident(connection, comments=1 + number % 2, file=number % 3 == 0)

    async def incident(self, connection: str, *, comments: int = 1, file: bool = False) -> str:
        client_id = self.sims.layout.client_of(connection)
        incident = await self.sims.control("mdr", "POST", f"/_sim/clients/{client_id}/incidents", {})
        incident_id = incident["incident_id"]
        self.expected.incidents.append(incident_id)
        self.connection_of[incident_id] = connection
        for _ in range(comments):
            await self.mdr_comment(incident_id)
        if file:
            await self.mdr_file(incident_id)
        return incident_id

    async def mdr_comment(self, incident_id: str) -> None:
        client_id = self.sims.layout.client_of(self.connection_of[incident_id])
        token = self.expected.next_token("socmdr")
        text = f"<p>Check {token}: the host ran an encoded <b>PowerShell</b> command.</p>"
        await self.sims.control(
            "mdr", "POST", f"/_sim/clients/{client_id}/incidents/{incident_id}/comments",
            {"text": text, "author": "SOC Analyst"},
        )
        self.expected.mdr_comments[token] = incident_id

    async def mdr_file(self, incident_id: str) -> None:
        client_id = self.sims.layout.client_of(self.connection_of[incident_id])
        name = f"{self.expected.next_token('mdrfile')}.txt"
        text = f"triage notes {name}\n" * self.rng.randint(1, 40)
        await self.sims.control(
            "mdr", "POST", f"/_sim/clients/{client_id}/incidents/{incident_id}/attachments",
            {"full_name": name, "text": text, "author": "SOC Analyst"},
        )
        self.expected.mdr_files[name] = (incident_id, len(text.encode()))

    async def issue_keys(self) -> dict[str, str]:
        """Return the key of each incident's issue, found by the connector's issue property."""
        state = await self.sims.control("jira", "GET", "/_sim/state")
        keys: dict[str, str] = {}
        for issue in state["issues"]:
            incident_id = (issue["properties"].get("mdr-connector") or {}).get("incident_id")
            if incident_id is not None:
                keys.setdefault(incident_id, issue["key"])
        return keys

    async def act_in_jira(self, comments: int, files: int) -> int:
        """Add `comments` comments and `files` files as the person, on random issues; return how many were added."""
        keys = await self.issue_keys()
        linked = sorted(incident_id for incident_id in keys if incident_id in self.connection_of)
        if not linked:
            return 0
        for _ in range(comments):
            incident_id = self.rng.choice(linked)
            await self.jira_comment(incident_id, keys[incident_id])
        for _ in range(files):
            incident_id = self.rng.choice(linked)
            await self.jira_file(incident_id, keys[incident_id])
        return comments + files

    jira_comment = crash.People.jira_comment
    jira_file = crash.People.jira_file

    async def act_in_mdr(self, new_per_connection: int, comments: int, files: int) -> None:
        """Add new incidents on every connection, and SOC comments and files on random older incidents."""
        older = list(self.expected.incidents)
        for _ in range(new_per_connection):
            for connection in self.sims.layout.connections:
                await self.incident(connection)
        for _ in range(comments):
            await self.mdr_comment(self.rng.choice(older))
        for _ in range(files):
            await self.mdr_file(self.rng.choice(older))


# The database


def asyncpg_dsn(database_url: str) -> str:
    """Turn a SQLAlchemy `postgresql+asyncpg://` URL into the DSN that asyncpg takes."""
    return database_url.replace("postgresql+asyncpg://", "postgresql://", 1)


@dataclass
class Epoch:
    """One holder's term on a connection's lease; `acquired_at` in Unix seconds, from the database."""

    connection: str
    epoch: int
    holder: str | None
    acquired_at: float
    seen_at: float


@dataclass
class Sample:
    """The live holder of each connection at one read of the leases table."""

    at: float
    holders: dict[str, str | None]

    def shares(self) -> Counter[str]:
        return Counter(holder for holder in self.holders.values() if holder is not None)


class LeaseWatch:
    """Read `leases` and `cluster_instances` every POLL_SECONDS and keep what they showed."""

    def __init__(self, database_url: str, connections: Iterable[str]) -> None:
        self.dsn = asyncpg_dsn(database_url)
        self.connections = tuple(connections)
        self.epochs: dict[tuple[str, int], Epoch] = {}
        self.rows: dict[str, dict[str, Any]] = {}
        # instance name -> pid
        self.instances: dict[str, int] = {}
        self.samples: list[Sample] = []
        self._database: Any = None
        self._task: asyncio.Task[None] | None = None
        # One asyncpg connection runs one query at a time, and `poll` is also called between the timed polls.
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> LeaseWatch:
        import asyncpg

        self._database = await asyncpg.connect(self.dsn, timeout=5)
        self._task = asyncio.create_task(self._poll_forever())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._database.close()

    async def _poll_forever(self) -> None:
        while True:
            await self.poll()
            await asyncio.sleep(POLL_SECONDS)

    async def poll(self) -> Sample:
        """Read both tables once; record new epochs and a sample of the live holders."""
        async with self._lock:
            now = time.time()
            rows = await self._database.fetch(
                "SELECT connection, holder, epoch, expires_at, acquired_at, expires_at > now() AS live FROM leases"
            )
            instances = await self._database.fetch("SELECT name, pid FROM cluster_instances")
        for instance in instances:
            self.instances[instance["name"]] = instance["pid"]
        holders: dict[str, str | None] = dict.fromkeys(self.connections)
        for row in rows:
            self.rows[row["connection"]] = dict(row)
            key = (row["connection"], row["epoch"])
            if key not in self.epochs:
                acquired = row["acquired_at"].timestamp() if row["acquired_at"] is not None else now
                self.epochs[key] = Epoch(row["connection"], row["epoch"], row["holder"], acquired, now)
            if row["live"] and row["holder"] is not None:
                holders[row["connection"]] = row["holder"]
        sample = Sample(now, holders)
        self.samples.append(sample)
        return sample

    def name_of(self, pid: int | None) -> str | None:
        for name, known in self.instances.items():
            if known == pid:
                return name
        return None

    def held_by(self, name: str) -> dict[str, int]:
        """Return the connections that `name` holds in the latest sample, with their epochs."""
        if not self.samples:
            return {}
        return {
            connection: self.rows[connection]["epoch"]
            for connection, holder in self.samples[-1].holders.items() if holder == name
        }

    def epoch_at(self, connection: str, moment: float) -> Epoch | None:
        """Return the term in force on `connection` at `moment`: the latest one acquired at or before it."""
        terms = [term for term in self.epochs.values() if term.connection == connection and term.acquired_at <= moment]
        return max(terms, key=lambda term: term.epoch, default=None)

    async def wait_for(self, condition: Callable[[Sample], bool], timeout: float) -> Sample | None:
        """Return the first sample from now on for which `condition` holds, or None after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        seen = len(self.samples)
        while time.monotonic() < deadline:
            for sample in self.samples[seen:]:
                if condition(sample):
                    return sample
            seen = len(self.samples)
            await asyncio.sleep(POLL_SECONDS / 2)
        return None


LEDGER_TABLES = ("links", "synced_items", "cursors", "parked_items", "response_decisions", "asset_cache")


async def ledger_digest(database_url: str, layout: Layout) -> dict[str, dict[str, str]]:
    """Return a SHA-256 per connection and table over its rows in every ledger table and its client's stored token pair."""
    import asyncpg

    database = await asyncpg.connect(asyncpg_dsn(database_url), timeout=5)
    try:
        rows: dict[tuple[str, str], list[str]] = defaultdict(list)
        for table in LEDGER_TABLES:
            for row in await database.fetch(f"SELECT * FROM {table}"):
                rows[row["connection"], table].append(repr(sorted(dict(row).items())))
        for row in await database.fetch("SELECT * FROM token_chains"):
            connection = layout.connection_of_client(row["client_id"]) or row["client_id"]
            rows[connection, "token_chains"].append(repr(sorted(dict(row).items())))
    finally:
        await database.close()
    return {
        connection: {
            table: hashlib.sha256("\n".join(sorted(rows.get((connection, table), []))).encode()).hexdigest()
            for table in (*LEDGER_TABLES, "token_chains")
        }
        for connection in layout.connections
    }


async def parked_items(database_url: str) -> list[str]:
    import asyncpg

    database = await asyncpg.connect(asyncpg_dsn(database_url), timeout=5)
    try:
        found = await database.fetch("SELECT connection, kind, item_id, attempts, reason FROM parked_items ORDER BY id")
    finally:
        await database.close()
    return [f"{row['connection']} {row['kind']} {row['item_id']} after {row['attempts']} attempts: {row['reason']}" for row in found]


# The instances


@dataclass
class Instance:
    """One `mdr-connector run` child process and its log file."""

    number: int
    process: asyncio.subprocess.Process
    log_path: Path
    killed: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def send(self, signum: int) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_events(self, offset: int = 0) -> list[str]:
        """Return the `event` of each JSON log line written from byte `offset` on."""
        events = []
        with self.log_path.open("rb") as log_file:
            log_file.seek(offset)
            for line in log_file:
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if isinstance(record, dict) and "event" in record:
                        events.append(str(record["event"]))
        return events


class Cluster:
    """The config, the environment of every CLI command, and the running instances."""

    def __init__(self, work: Path, config: Path, environment: dict[str, str], peers: PeerProcesses) -> None:
        self.work = work
        self.config = config
        self.environment = environment
        self.peers = peers
        self.instances: list[Instance] = []

    async def command(self, *arguments: str, stdin: bytes | None = None) -> str:
        """Run one `mdr-connector` command to its end; return its output; raise RuntimeError on a failure."""
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mdr_connector.connector.cli", "--config", str(self.config), *arguments,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env=self.environment,
        )
        output, _ = await asyncio.wait_for(process.communicate(stdin), COMMAND_TIMEOUT_SECONDS)
        text = output.decode("utf-8", "replace")
        if process.returncode != 0:
            raise RuntimeError(f"mdr-connector {' '.join(arguments)} exited with {process.returncode}:\n{text[-3000:]}")
        return text

    async def start(self) -> Instance:
        number = len(self.instances) + 1
        log_path = self.work / f"instance-{number}.log"
        with log_path.open("ab") as log_file:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "mdr_connector.connector.cli", "--config", str(self.config), "run",
                stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file, env=self.environment,
            )
        self.peers.pids.add(process.pid)
        instance = Instance(number, process, log_path)
        self.instances.append(instance)
        return instance

    def running(self) -> list[Instance]:
        return [instance for instance in self.instances if instance.process.returncode is None]

    async def stop_all(self) -> dict[int, int | None]:
        """Send SIGCONT and SIGTERM to every running instance; return each one's exit code by number (None: killed after STOP_TIMEOUT_SECONDS)."""
        codes: dict[int, int | None] = {}
        for instance in self.running():
            instance.send(signal.SIGCONT)
            instance.send(signal.SIGTERM)
        for instance in self.instances:
            try:
                codes[instance.number] = await asyncio.wait_for(instance.process.wait(), STOP_TIMEOUT_SECONDS)
            except asyncio.TimeoutError:
                instance.send(signal.SIGKILL)
                await instance.process.wait()
                codes[instance.number] = None
        return codes


def write_config(work: Path, sims: Simulators, settings: ClusterRunSettings, database_url: str) -> Path:
    """Write one config with every connection in cluster mode, and a mapping per connection for its project."""
    from importlib import resources

    base = yaml.safe_load(resources.files("mdr_connector.mappings").joinpath("jira.yaml").read_text(encoding="utf-8"))
    token_dir = work / "tokens"
    token_dir.mkdir(mode=0o700, exist_ok=True)
    connections = []
    for connection, client_id, project in zip(sims.layout.connections, sims.layout.clients, sims.layout.projects):
        mapping_path = work / f"mapping-{connection}.yaml"
        mapping_path.write_text(yaml.safe_dump({**base, "project": project}, allow_unicode=True), encoding="utf-8")
        connections.append({
            "name": connection,
            "mdr": {
                "base_url": sims.mdr_url,
                "client_id": client_id,
                "connection_name": MDR_CONNECTION_NAME,
                "token_dir": str(token_dir),
                "timeout_seconds": settings.mdr_timeout_seconds,
            },
            "ticket": {
                "system": "jira",
                "url": sims.jira_url,
                "auth": {"type": "api_token", "email": "mdr-connector@example.test", "token": {"env": JIRA_TOKEN_VARIABLE}},
                "search_delay_seconds": 0,
                "timeout_seconds": 30,
            },
            "mapping": str(mapping_path),
            "sync": {
                "interval_seconds": settings.interval_seconds,
                # Parked items come due soon, so a run settles without long waits.
                "retry_base_seconds": 0.2,
                "retry_max_seconds": 1.0,
            },
        })
    config = {
        "data_dir": str(work / "data"),
        "database_url": database_url,
        "log": {"level": "INFO", "format": "json"},
        "cluster": {
            "enabled": True,
            "takeover_seconds": settings.takeover_seconds,
            "token_key": {"env": TOKEN_KEY_VARIABLE},
        },
        "connections": connections,
    }
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


async def new_token_key(environment: dict[str, str]) -> str:
    """Return a new key for the token pairs in the database, from `mdr-connector token new-key`."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mdr_connector.connector.cli", "token", "new-key",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=environment,
    )
    output, errors = await asyncio.wait_for(process.communicate(), COMMAND_TIMEOUT_SECONDS)
    lines = [line.strip() for line in output.decode().splitlines() if line.strip()]
    if process.returncode != 0 or not lines:
        raise RuntimeError(f"mdr-connector token new-key exited with {process.returncode}: {errors.decode()[-2000:]}")
    return lines[0]


async def prepare_cluster(work: Path, sims: Simulators, settings: ClusterRunSettings, database_url: str, peers: PeerProcesses) -> Cluster:
    """Write the config, migrate the database, and activate every connection's token chain with `token activate`."""
    from mdr_connector.adapters.jira.simulator import SERVICE_TOKEN

    environment = {**os.environ, JIRA_TOKEN_VARIABLE: SERVICE_TOKEN, "LANG": "C.UTF-8"}
    environment.pop("MDR_CONNECTOR_LANG", None)
    environment[TOKEN_KEY_VARIABLE] = await new_token_key(environment)
    config = write_config(work, sims, settings, database_url)
    cluster = Cluster(work, config, environment, peers)
    await cluster.command("db", "upgrade")

    # Two at a time: each command is a Python start-up, and the machine may have two cores.
    limit = asyncio.Semaphore(2)

    async def activate(connection: str) -> None:
        async with limit:
            console_token = sims.mdr.issue_console_token(sims.layout.client_of(connection))
            await cluster.command("token", "activate", "--connection", connection, stdin=console_token.encode())

    await asyncio.gather(*(activate(connection) for connection in sims.layout.connections))
    return cluster


# Checks


@dataclass
class RunReport:
    """The figures of one scenario run and every problem it found, by area."""

    scenario: str
    settings: ClusterRunSettings
    work: Path
    figures: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    problems: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    seconds: float = 0.0

    def lines(self) -> list[str]:
        lines = [
            f"{self.scenario}: {self.settings.connections} connections, {self.settings.instances} instances, "
            f"takeover_seconds {self.settings.takeover_seconds:g}, interval {self.settings.interval_seconds:g} s, "
            f"latency {self.settings.latency_seconds * 1000:g} ms, seed {self.settings.seed}, work folder {self.work}",
        ]
        lines += [f"{name}: {value}" for name, value in self.figures.items()]
        lines.append("counts: " + ", ".join(f"{name} {value}" for name, value in self.counts.items()))
        lines.append(f"run time: {self.seconds:.1f} s")
        found = [f"{area}: {problem}" for area, problems in self.problems.items() for problem in problems]
        if found:
            lines.append(f"problems: {len(found)}")
            lines.extend(f"  {problem}" for problem in found[:60])
        else:
            lines.append("problems: none")
        return lines


async def count_both_sides(sims: Simulators, people: People) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Count issues, comments and files on both simulators against what people added; return the counts and the differences."""
    expected = people.expected
    problems: dict[str, list[str]] = defaultdict(list)
    jira_state = await sims.control("jira", "GET", "/_sim/state")
    mdr_incidents = [incident for client_id in sims.layout.clients for incident in sims.mdr.incidents(client_id)]

    issues_of: dict[str | None, list[dict[str, Any]]] = defaultdict(list)
    for issue in jira_state["issues"]:
        issues_of[(issue["properties"].get("mdr-connector") or {}).get("incident_id")].append(issue)
    for incident_id in expected.incidents:
        keys = [issue["key"] for issue in issues_of.get(incident_id, [])]
        project = sims.layout.project_of(people.connection_of[incident_id])
        if len(keys) != 1:
            problems["issues"].append(f"incident {incident_id}: {len(keys)} issues {keys}, expected 1 in {project}")
        elif not keys[0].startswith(f"{project}-"):
            problems["issues"].append(f"incident {incident_id}: issue {keys[0]} is outside its connection's project {project}")
    for incident_id in sorted(set(issues_of) - set(expected.incidents), key=str):
        problems["issues"].append(f"issues {[issue['key'] for issue in issues_of[incident_id]]} name no seeded incident ({incident_id})")
    issue_incident = {issue["key"]: incident_id for incident_id, issues in issues_of.items() for issue in issues}

    jira_comments = [(issue["key"], comment) for issue in jira_state["issues"] for comment in issue["comments"]]
    copies = crash.token_places(
        (issue_incident.get(key), comment["body"]) for key, comment in jira_comments if comment["author"] == SERVICE_USER
    )
    crash.check_copies("MDR comment", expected.mdr_comments, copies, problems["comments"])
    jira_files = [(issue["key"], attachment) for issue in jira_state["issues"] for attachment in issue["attachments"]]
    crash.check_files("MDR file", expected.mdr_files, crash.file_places(
        (issue_incident.get(key), attachment["filename"], attachment["size"])
        for key, attachment in jira_files if attachment["author"] == SERVICE_USER
    ), problems["files"])

    mdr_comments = [(incident["incident_id"], comment) for incident in mdr_incidents for comment in incident["comments"]]
    copies = crash.token_places(
        (incident_id, comment["text"]) for incident_id, comment in mdr_comments if comment["origin"] == "Client"
    )
    crash.check_copies("Jira comment", expected.jira_comments, copies, problems["comments"])
    mdr_files = [(incident["incident_id"], attachment) for incident in mdr_incidents for attachment in incident["attachments"]]
    crash.check_files("Jira file", expected.jira_files, crash.file_places(
        (incident_id, attachment["full_name"], attachment["file_size"])
        for incident_id, attachment in mdr_files if attachment["origin"] == "Client"
    ), problems["files"])

    counts = {
        "incidents": len(expected.incidents),
        "issues": len(jira_state["issues"]),
        "MDR comments": len(expected.mdr_comments),
        "connector comments in Jira": sum(1 for _, comment in jira_comments if comment["author"] == SERVICE_USER),
        "Jira comments": len(expected.jira_comments),
        "connector comments in MDR": sum(1 for _, comment in mdr_comments if comment["origin"] == "Client"),
        "MDR files": len(expected.mdr_files),
        "connector files in Jira": sum(1 for _, attachment in jira_files if attachment["author"] == SERVICE_USER),
        "Jira files": len(expected.jira_files),
        "connector files in MDR": sum(1 for _, attachment in mdr_files if attachment["origin"] == "Client"),
    }
    return counts, {area: found for area, found in problems.items() if found}


async def wait_synced(sims: Simulators, people: People, recorder: WriteRecorder, timeout: float) -> float | None:
    """Poll both simulators until every item has exactly one copy; return the seconds it took.

    Return None at the timeout, or earlier when items are still missing and
    no instance has written anything for IDLE_GIVE_UP_SECONDS, because then
    the run is stuck, not slow.
    """
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        _, problems = await count_both_sides(sims, people)
        if not problems:
            return time.monotonic() - started
        last_write = max((write.at for write in recorder.writes), default=0.0)
        if time.time() - last_write > IDLE_GIVE_UP_SECONDS and time.monotonic() - started > IDLE_GIVE_UP_SECONDS:
            return None
        await asyncio.sleep(1.0)
    return None


def stray_writes(writes: Iterable[Write], watch: LeaseWatch) -> list[str]:
    """Name every write of an instance to a connection whose lease term in force at that moment belonged to another holder.

    The term in force is the one with the latest `acquired_at` at or before
    the write's arrival. Writes from processes that are not instances (the
    `token activate` commands) are left out.
    """
    found = []
    for write in writes:
        name = watch.name_of(write.pid)
        if name is None or write.connection is None:
            continue
        term = watch.epoch_at(write.connection, write.at)
        if term is None or term.holder != name:
            holder = f"{term.holder} (epoch {term.epoch})" if term is not None else "nobody"
            found.append(
                f"{write.kind} for {write.connection} by {name} at {write.at:.3f}, status {write.status}, "
                f"while the lease was held by {holder}"
            )
    return found


def token_rotations(confirms: list[dict[str, Any]], layout: Layout) -> tuple[dict[str, int], list[str]]:
    """Return the rotations per connection and the problems: a refresh token spent twice, or any rejected confirm."""
    problems = []
    spent: Counter[str | None] = Counter()
    rotations: Counter[str] = Counter()
    for record in confirms:
        connection = layout.connection_of_client(record["client_id"]) or record["client_id"]
        if record["outcome"] != "rotated":
            problems.append(f"{connection}: session/confirm rejected ({record['outcome']}) at {record['at_ms']} ms")
            continue
        spent[record["token_id"]] += 1
        rotations[connection] += 1
    problems += [f"refresh token {token_id} rotated {count} times" for token_id, count in spent.items() if count > 1]
    # The first rotation of each client is the activation of its console token.
    return {connection: max(0, rotations[connection] - 1) for connection in layout.connections}, problems


async def finish(report: RunReport, sims: Simulators, people: People, cluster: Cluster, watch: LeaseWatch,
                 recorder: WriteRecorder, database_url: str) -> None:
    """Wait until both sides are in sync, stop the instances with SIGTERM, and run every final check into `report`."""
    settled = await wait_synced(sims, people, recorder, report.settings.settle_seconds)
    report.figures["settled after the last change"] = f"{settled:.1f} s" if settled is not None else "never"
    exit_codes = await cluster.stop_all()
    await watch.poll()
    report.figures["exit codes after SIGTERM"] = exit_codes
    for number, code in exit_codes.items():
        instance = cluster.instances[number - 1]
        if code not in (0,) and not instance.killed:
            report.problems["instances"].append(f"instance {number} exited with {code}; see {instance.log_path}")

    report.counts, problems = await count_both_sides(sims, people)
    for area, found in problems.items():
        report.problems[area] += found
    report.problems["parked"] += await parked_items(database_url)
    report.problems["stray writes"] += stray_writes(recorder.writes, watch)

    rotations, token_problems = token_rotations(sims.mdr.confirms(), sims.layout)
    report.figures["token rotations per connection"] = dict(sorted(rotations.items()))
    report.problems["tokens"] += token_problems
    writers = Counter(watch.name_of(write.pid) or "other" for write in recorder.writes)
    report.figures["writes by instance"] = dict(sorted(writers.items()))


def check_balance(samples: Iterable[Sample], limit: int, connections: int, problems: list[str]) -> None:
    """Add a problem for each sample in which a connection has no live holder or an instance holds more than `limit`."""
    for sample in samples:
        shares = sample.shares()
        free = [connection for connection, holder in sample.holders.items() if holder is None]
        if free:
            problems.append(f"at {sample.at:.3f}: no live holder for {free}")
        over = {holder: count for holder, count in shares.items() if count > limit}
        if over:
            problems.append(f"at {sample.at:.3f}: more than {limit} of {connections} connections held by {over}")


def balanced(limit: int, instances: int) -> Callable[[Sample], bool]:
    def check(sample: Sample) -> bool:
        shares = sample.shares()
        return all(sample.holders.values()) and len(shares) == instances and max(shares.values()) <= limit

    return check


# The steps of one scenario between the seeding and the final count.
ScenarioSteps = Callable[
    ["RunReport", "Simulators", "People", "Cluster", "LeaseWatch", "WriteRecorder", str], Awaitable[None]
]


# Scenario 1: SIGKILL of the instance with the most connections


async def run_scenario(
    name: str, steps: ScenarioSteps, settings: ClusterRunSettings, work: Path, database_url: str
) -> RunReport:
    """Start the simulators and the instances, seed incidents, run `steps`, then settle and check both sides."""
    started = time.monotonic()
    report = RunReport(name, settings, work)
    layout = Layout.of(settings.connections)
    peers = PeerProcesses()
    recorder = WriteRecorder(layout, peers)
    rng = random.Random(settings.seed)
    async with running_simulators(settings, layout, recorder) as sims:
        people = People(sims, rng)
        cluster = await prepare_cluster(work, sims, settings, database_url, peers)
        report.figures["migration and token activations"] = f"{time.monotonic() - started:.1f} s"
        await people.seed(settings.incidents)
        async with LeaseWatch(database_url, layout.connections) as watch:
            try:
                await steps(report, sims, people, cluster, watch, recorder, database_url)
                await finish(report, sims, people, cluster, watch, recorder, database_url)
            finally:
                await cluster.stop_all()
    report.seconds = time.monotonic() - started
    return report


async def run_takeover(settings: ClusterRunSettings, work: Path, database_url: str) -> RunReport:
    """Start the instances, kill the busiest with SIGKILL, measure the takeover, add work, and check both sides."""

    async def steps(report: RunReport, sims: Simulators, people: People, cluster: Cluster, watch: LeaseWatch,
                    recorder: WriteRecorder, _database_url: str) -> None:
        await takeover_steps(report, sims, people, cluster, watch, recorder)

    return await run_scenario("takeover", steps, settings, work, database_url)


async def takeover_steps(report: RunReport, sims: Simulators, people: People, cluster: Cluster, watch: LeaseWatch,
                         recorder: WriteRecorder) -> None:
    settings = report.settings
    for _ in range(settings.instances):
        await cluster.start()
    start_done = time.time()

    # Balanced: every connection held, each instance holding some, none more than its fair share.
    sample = await watch.wait_for(balanced(settings.fair_share, settings.instances), settings.settle_seconds)
    if sample is None:
        report.problems["shares"].append(
            f"the leases never spread over {settings.instances} instances with at most {settings.fair_share} each; "
            f"last shares {dict(watch.samples[-1].shares())}"
        )
        return
    report.figures["balanced after the start"] = f"{sample.at - start_done:.1f} s, shares {dict(sample.shares())}"
    balanced_at = sample.at

    # Some Jira-side changes, once issues exist.
    await wait_until(lambda: any(write.kind == "jira POST /rest/api/2/issue" for write in recorder.writes), 60, step=0.2)
    await asyncio.sleep(settings.interval_seconds * 2)
    await people.act_in_jira(comments=settings.connections, files=max(1, settings.connections // 3))

    victim, held = await pick_victim(cluster, watch, recorder)
    # A kill between MDR's rotation and the database commit of the new pair breaks the
    # chain by design (the new refresh token is lost), so the kill waits for a quiet moment.
    quiet = await wait_until(lambda: recorder.idle_confirms(victim.pid, 0.25), 10)
    if not quiet:
        report.figures["kill"] = "no quiet moment in session/confirm of the victim within 10 s; killed anyway"
    await watch.poll()
    held = watch.held_by(watch.name_of(victim.pid) or "")
    victim.killed = True
    killed_at = time.time()
    victim.send(signal.SIGKILL)
    check_balance([s for s in watch.samples if balanced_at <= s.at < killed_at], settings.fair_share,
                  settings.connections, report.problems["shares"])
    report.figures["killed"] = f"instance {victim.number} ({watch.name_of(victim.pid)}), holding {sorted(held)}"

    name = watch.name_of(victim.pid)

    def taken_over(sample: Sample) -> bool:
        return all(
            sample.holders.get(connection) not in (None, name) and watch.rows[connection]["epoch"] > epoch
            for connection, epoch in held.items()
        )

    bound = settings.takeover_seconds * 3
    sample = await watch.wait_for(taken_over, bound)
    if sample is None:
        report.problems["takeover"].append(
            f"the connections {sorted(held)} of the killed instance had no new holder {bound:g} s after the kill; "
            f"holders then {watch.samples[-1].holders}"
        )
    else:
        times = {
            connection: watch.epochs[(connection, watch.rows[connection]["epoch"])].acquired_at - killed_at
            for connection in held
        }
        report.figures["takeover seconds"] = round(max(times.values()), 2)
        report.figures["takeover seconds by connection"] = {key: round(value, 2) for key, value in sorted(times.items())}
        report.figures["takeover seen by the harness after"] = f"{sample.at - killed_at:.2f} s"

    await people.act_in_mdr(settings.later_incidents, comments=settings.connections, files=max(1, settings.connections // 3))
    await people.act_in_jira(comments=settings.connections, files=max(1, settings.connections // 3))
    after = await watch.wait_for(balanced(math.ceil(settings.connections / (settings.instances - 1)), settings.instances - 1), 30)
    if after is not None:
        report.figures["shares after the kill"] = dict(after.shares())


async def pick_victim(cluster: Cluster, watch: LeaseWatch, recorder: WriteRecorder) -> tuple[Instance, dict[str, int]]:
    """Return the running instance that holds the most connections, with its connections and epochs."""
    await watch.poll()
    holdings = [(len(watch.held_by(watch.name_of(instance.pid) or "")), instance) for instance in cluster.running()]
    _, victim = max(holdings, key=lambda pair: pair[0])
    return victim, watch.held_by(watch.name_of(victim.pid) or "")


async def wait_until(condition: Callable[[], bool], timeout: float, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(step)
    return condition()


# Scenario 2: a stalled instance


@dataclass
class StallFigures:
    """The stalled instance: its leases before SIGSTOP, and its writes, ledger changes and lease events after SIGCONT."""

    instance: int = 0
    held: dict[str, int] = field(default_factory=dict)
    writes_after_resume: list[str] = field(default_factory=list)
    reacquired: dict[str, float] = field(default_factory=dict)
    ledger_changed: list[str] = field(default_factory=list)
    tokens_saved: list[str] = field(default_factory=list)
    lease_events: list[str] = field(default_factory=list)


async def run_stall(settings: ClusterRunSettings, work: Path, database_url: str) -> RunReport:
    """Stall an instance with SIGSTOP past its leases, resume it alone, and check it wrote nothing; then settle and count."""
    return await run_scenario("stall", stall_steps, settings, work, database_url)


async def stall_steps(report: RunReport, sims: Simulators, people: People, cluster: Cluster, watch: LeaseWatch,
                      recorder: WriteRecorder, database_url: str) -> None:
    settings = report.settings
    figures = StallFigures()
    report.figures["stall"] = figures
    for _ in range(settings.instances):
        await cluster.start()
    if await watch.wait_for(balanced(settings.fair_share, settings.instances), settings.settle_seconds) is None:
        report.problems["shares"].append(f"the leases never spread over the instances; last shares {dict(watch.samples[-1].shares())}")
        return

    stop_feeding = asyncio.Event()
    feeding = asyncio.create_task(feed(people, settings, stop_feeding))
    try:
        stalled = await pick_writing_instance(cluster, watch, recorder, timeout=60)
        if stalled is None:
            report.problems["stall"].append("no instance held a lease and wrote within 0.5 s of a check")
            return
        await watch.poll()
        name = watch.name_of(stalled.pid) or ""
        stalled.send(signal.SIGSTOP)
        stopped_at = time.time()
        figures.instance = stalled.number
        figures.held = watch.held_by(name)
        report.figures["stalled"] = f"instance {stalled.number} ({name}), holding {sorted(figures.held)}"

        def taken(sample: Sample) -> bool:
            return all(
                sample.holders.get(connection) not in (None, name) and watch.rows[connection]["epoch"] > epoch
                for connection, epoch in figures.held.items()
            )

        sample = await watch.wait_for(taken, settings.takeover_seconds * 3)
        if sample is None:
            report.problems["takeover"].append(f"the stalled instance's connections {sorted(figures.held)} had no new holder")
            return
        report.figures["leases of the stalled instance taken after"] = f"{sample.at - stopped_at:.2f} s"

        # Only the stalled instance may run now; whatever reaches a simulator or the ledger comes from it.
        others = [instance for instance in cluster.running() if instance is not stalled]
        for instance in others:
            instance.send(signal.SIGSTOP)
        await asyncio.sleep(0.2)
        before = await ledger_digest(database_url, sims.layout)
        offset = stalled.log_size()
        resumed_at = time.time()
        stalled.send(signal.SIGCONT)
        await asyncio.sleep(settings.watch_seconds)
        after = await ledger_digest(database_url, sims.layout)
        await watch.poll()
        watched_until = time.time()

        judge_resumed(figures, watch, recorder, name, stalled.pid, stopped_at, resumed_at, watched_until)
        judge_ledger(figures, before, after, recorder, stalled.pid, stopped_at)
        figures.lease_events = [event for event in stalled.log_events(offset) if "lease" in event]
        report.figures["after SIGCONT"] = (
            f"{len(figures.writes_after_resume)} writes, ledger changed for {figures.ledger_changed}, "
            f"token pairs of refreshes begun before SIGSTOP saved for {figures.tokens_saved}, "
            f"re-acquired {sorted(figures.reacquired)}, lease events {Counter(figures.lease_events)}"
        )
        report.problems["stall"] += [f"write after the lease was taken: {write}" for write in figures.writes_after_resume]
        report.problems["stall"] += [f"ledger rows of {changed} changed after SIGCONT" for changed in figures.ledger_changed]
        if not any("lost" in event for event in figures.lease_events):
            report.problems["stall"].append(f"the stalled instance logged no lease loss after SIGCONT; see {stalled.log_path}")

        for instance in others:
            instance.send(signal.SIGCONT)
    finally:
        # A cancel could land between a simulator's write and its record in
        # `people.expected`, which then misses a comment or an incident.
        stop_feeding.set()
        await feeding
        for instance in cluster.running():
            instance.send(signal.SIGCONT)
    await people.act_in_mdr(settings.later_incidents, comments=settings.connections, files=1)


def judge_resumed(figures: StallFigures, watch: LeaseWatch, recorder: WriteRecorder, name: str, pid: int,
                  stopped_at: float, resumed_at: float, watched_until: float) -> None:
    """Fill `figures` with the writes after SIGCONT that no lease of the stalled instance allowed.

    After SIGCONT the stalled instance may take free leases again and then
    write for those connections. So only its writes before such a new term,
    or for a connection without one, count against it.
    """
    # NOTE: a write whose request was half sent at SIGSTOP arrives after SIGCONT and counts
    # here, although no fence can stop it (connector/leases.py names that gap).
    for term in watch.epochs.values():
        if term.holder == name and term.acquired_at > stopped_at:
            figures.reacquired[term.connection] = min(term.acquired_at, figures.reacquired.get(term.connection, math.inf))
    for write in recorder.writes:
        if write.at < resumed_at or write.at > watched_until:
            continue
        allowed_from = figures.reacquired.get(write.connection or "", math.inf)
        if write.pid == pid and write.at >= allowed_from:
            continue
        writer = "the stalled instance" if write.pid == pid else f"process {write.pid} (stopped)"
        figures.writes_after_resume.append(f"{write.kind} for {write.connection} by {writer}, status {write.status}")


def judge_ledger(figures: StallFigures, before: dict[str, dict[str, str]], after: dict[str, dict[str, str]],
                 recorder: WriteRecorder, pid: int, stopped_at: float) -> None:
    """Fill `figures` with the ledger tables that changed after SIGCONT for connections the stalled instance did not take again.

    One change is allowed: a token pair whose session/confirm reached MDR
    before SIGSTOP. MDR has spent the old refresh token then, so the new pair
    is the only valid one and must be saved, lease or not. The final check of
    the confirm log fails the run if that pair was stale.
    """
    for connection, tables in after.items():
        if connection in figures.reacquired:
            continue
        changed = [table for table, digest in tables.items() if before[connection][table] != digest]
        if changed == ["token_chains"] and refresh_begun_before(recorder, pid, connection, stopped_at):
            figures.tokens_saved.append(connection)
        elif changed:
            figures.ledger_changed.append(f"{connection} ({', '.join(changed)})")


def refresh_begun_before(recorder: WriteRecorder, pid: int, connection: str, stopped_at: float) -> bool:
    """Return whether the last session/confirm for `connection` came from `pid` and reached MDR before `stopped_at`."""
    confirms = [write for write in recorder.writes if write.kind == "mdr session/confirm" and write.connection == connection]
    return bool(confirms) and confirms[-1].pid == pid and confirms[-1].at < stopped_at


async def feed(people: People, settings: ClusterRunSettings, stop: asyncio.Event) -> None:
    """Add an incident with a comment every `feed_every_seconds`, connection after connection, until `stop` is set.

    Every instance keeps writing meanwhile. An incident begun is finished
    before the feed ends, so what people added is all on record.
    """
    number = 0
    while not stop.is_set():
        await people.incident(people.sims.layout.connections[number % settings.connections])
        number += 1
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), settings.feed_every_seconds)


async def pick_writing_instance(cluster: Cluster, watch: LeaseWatch, recorder: WriteRecorder, timeout: float) -> Instance | None:
    """Wait for a running instance that holds a lease and wrote within the last 0.5 s; return it, or None at the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for instance in cluster.running():
            name = watch.name_of(instance.pid)
            last = recorder.last_write_at(instance.pid)
            if name and watch.held_by(name) and last is not None and time.time() - last < 0.5:
                return instance
        await asyncio.sleep(0.05)
    return None


# The command line


async def run_scenarios(names: list[str], settings: ClusterRunSettings, work: Path, admin_url: str) -> list[RunReport]:
    runs: dict[str, Callable[[ClusterRunSettings, Path, str], Awaitable[RunReport]]] = {
        "takeover": run_takeover,
        "stall": run_stall,
    }
    import common

    reports = []
    for name in names:
        folder = work / name
        folder.mkdir()
        async with common.scratch_database(admin_url, prefix="mdr_cluster") as database_url:
            reports.append(await runs[name](settings, folder, database_url))
    return reports


def main(argv: list[str] | None = None) -> int:
    import common

    parser = argparse.ArgumentParser(description="Share connections among several instances; kill or stall one; count both sides.")
    parser.add_argument("--scenario", choices=["takeover", "stall", "both"], default="both", help="which run (default: both)")
    parser.add_argument("--connections", type=int, default=10, help="connections, each with its MDR client and Jira project (default: 10)")
    parser.add_argument("--instances", type=int, default=3, help="`mdr-connector run` processes (default: 3)")
    parser.add_argument("--incidents", type=int, default=5, help="incidents per connection seeded before the start (default: 5)")
    parser.add_argument("--takeover-seconds", type=float, default=8.0, help="cluster.takeover_seconds (default: 8)")
    parser.add_argument("--interval", type=float, default=1.0, help="each connection's sync.interval_seconds (default: 1)")
    parser.add_argument("--access-token-seconds", type=int, default=4, help="lifetime of the MDR access tokens (default: 4)")
    parser.add_argument("--mdr-timeout", type=float, default=30.0, help="each connection's mdr.timeout_seconds (default: 30)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random choices (default: a random one)")
    parser.add_argument("--admin-url", default=os.environ.get("MDR_TEST_POSTGRES_URL", DEFAULT_ADMIN_URL),
                        help="PostgreSQL URL for creating the scratch database (default: MDR_TEST_POSTGRES_URL or the local server)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder with the configs and instance logs")
    common.add_latency_option(parser)
    args = parser.parse_args(argv)
    if args.instances < 2 or args.connections < args.instances or args.incidents < 1:
        parser.error("--instances must be at least 2, --connections at least --instances, and --incidents at least 1")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)

    settings = ClusterRunSettings(
        connections=args.connections,
        instances=args.instances,
        incidents=args.incidents,
        seed=seed,
        latency_seconds=args.latency_ms / 1000,
        interval_seconds=args.interval,
        takeover_seconds=args.takeover_seconds,
        access_token_seconds=args.access_token_seconds,
        mdr_timeout_seconds=args.mdr_timeout,
    )
    common.print_header(
        "Cluster: instances share connections through leases; one is killed or stalled",
        f"seed {seed}, {args.connections} connections, {args.instances} instances, {args.incidents} incidents each, "
        f"takeover_seconds {args.takeover_seconds:g}, interval {args.interval:g} s, latency {args.latency_ms:g} ms",
    )
    work = Path(tempfile.mkdtemp(prefix="mdr-cluster-"))
    print(f"work folder: {work}", flush=True)
    names = ["takeover", "stall"] if args.scenario == "both" else [args.scenario]
    reports = asyncio.run(run_scenarios(names, settings, work, args.admin_url))
    for report in reports:
        for line in report.lines():
            print(line)

    failed = any(problems for report in reports for problems in report.problems.values())
    if failed or args.keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    if failed:
        print(f"FAIL: see the problems above; rerun with --seed {seed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
