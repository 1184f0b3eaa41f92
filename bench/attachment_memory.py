"""Measure the connector's memory while it moves one large attachment each way.

    .venv/bin/python bench/attachment_memory.py [--size-mb 1024] [--latency-ms 20]

The MDR and Jira simulators run in processes of their own on loopback, with
their upload limits raised above the file size and a fixed latency on every
request. MDR gets an incident with a file of `--size-mb` MiB, and Jira an
issue already linked to that incident with a file of the same size. Then
`mdr-connector sync --once` runs as a child process, which copies each file
to the other side. While it runs, this script samples the child's VmRSS from
/proc every few milliseconds and watches the spool folder:

- idle RSS: the highest VmRSS before the first file appears in the spool
  folder, that is, with the process started, connected and reconciling, but
  before any transfer;
- peak RSS: the child's high-water mark (VmHWM, and the ru_maxrss that
  wait4 returns, whichever is higher).

The script then checks that both copies arrived with the right size and
SHA-256. It needs Linux (/proc) and about five times the file size of free
disk space in the temporary folder. It is a benchmark, not a test: it
exits 1 when a copy is missing or wrong, and prints the figures otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import IO, Any

import yaml

MIB = 1024 * 1024
CLIENT_ID = "bench-client"
CONNECTION_NAME = "mdr-connector-bench"
CONNECTION = "bench"
MDR_FILE_NAME = "memory-image.bin"
JIRA_FILE_NAME = "packet-capture.pcap"
JIRA_TOKEN_VARIABLE = "MDR_BENCH_JIRA_TOKEN"
SAMPLE_SECONDS = 0.005
# Sources, copies, the spool file and the simulators' upload files, with room to spare.
DISK_FACTOR = 5
HASH_CHUNK_BYTES = 4 * MIB


# Simulator processes


def serve_simulator(kind: str, size: int, latency: float, incident_id: str) -> None:
    """Run one simulator in this process: seed it, print its details as one JSON line, serve until stdin closes.

    Each line read from stdin requests a report of the seeded incident or
    issue: every attachment with its name, size, author and SHA-256.
    """
    if kind == "mdr":
        asyncio.run(_serve_mdr(size, latency))
    else:
        asyncio.run(_serve_jira(size, latency, incident_id))


async def _serve_mdr(size: int, latency: float) -> None:
    from mdr_connector.adapters.mdr.simulator import run_simulator
    from mdr_connector.adapters.mdr.simulator.state import MdrSimulator, SimulatorSettings

    sim = MdrSimulator(SimulatorSettings(max_upload_bytes=size + MIB, latency_seconds=latency))
    try:
        sim.create_client(CLIENT_ID, connection_name=CONNECTION_NAME)
        incident = sim.seed_incident(CLIENT_ID, summary="Attachment memory benchmark")
        incident_id = incident["incident_id"]
        sim.add_attachment(CLIENT_ID, incident_id, MDR_FILE_NAME, size=size, author="Kaspersky MDR SOC")
        async with run_simulator(sim) as url:
            details = {"url": url, "incident_id": incident_id, "console_token": sim.issue_console_token(CLIENT_ID)}

            def report() -> list[dict[str, Any]]:
                return [
                    {
                        "name": record["full_name"],
                        "size": record["file_size"],
                        "author": record["author_name"],
                        "sha256": file_sha256(sim.blobs.path(record["attachment_id"])),
                    }
                    for record in sim.attachments(CLIENT_ID, incident_id)
                ]

            await _answer_reports(details, report)
    finally:
        sim.close()


async def _serve_jira(size: int, latency: float, incident_id: str) -> None:
    from mdr_connector.adapters.jira.simulator import JiraSimulator, run_simulator

    sim = JiraSimulator(deployment="cloud", search_delay_seconds=0, latency_seconds=latency)
    sim.settings.upload_limit_bytes = size + MIB
    try:
        # The issue carries the connector's labels and property, as if an
        # earlier cycle had created it, so one cycle moves both files.
        issue = sim.create_issue(
            {
                "project": {"key": "SEC"},
                "issuetype": {"name": "Task"},
                "summary": "Attachment memory benchmark",
                "labels": ["mdr-connector", f"mdr-{incident_id}"],
            },
            properties=[{"key": "mdr-connector", "value": {"incident_id": incident_id}}],
        )
        sim.add_attachment(issue.key, JIRA_FILE_NAME, size=size)
        async with run_simulator(sim) as url:
            details = {"url": url, "ticket_key": issue.key}

            def report() -> list[dict[str, Any]]:
                return [
                    {
                        "name": attachment.filename,
                        "size": attachment.size,
                        "author": attachment.author.name,
                        "sha256": file_sha256(attachment.path),
                    }
                    for attachment in issue.attachments
                ]

            await _answer_reports(details, report)
    finally:
        sim.close()


async def _answer_reports(details: dict[str, Any], report: Any) -> None:
    print(json.dumps(details), flush=True)
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line:
            return
        print(json.dumps(await asyncio.to_thread(report)), flush=True)


@dataclass
class Simulator:
    """A simulator child process and the details it printed when ready."""

    process: subprocess.Popen[str]
    details: dict[str, Any]

    def report(self) -> list[dict[str, Any]]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("report\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def stop(self) -> None:
        if self.process.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_simulator(kind: str, size: int, latency: float, log_file: IO[str], incident_id: str = "") -> Simulator:
    command = [
        sys.executable, str(Path(__file__).resolve()), "--serve", kind,
        "--size-bytes", str(size), "--latency-ms", str(latency * 1000),
        # MDR ids may start with a dash, so the value is joined to its option.
        f"--incident-id={incident_id}",
    ]
    process = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file, text=True, encoding="utf-8"
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        process.wait()
        raise SystemExit(f"the {kind} simulator exited with status {process.returncode}; see {log_file.name}")
    return Simulator(process, json.loads(line))


# The connector


def write_config(work: Path, mdr: Simulator, jira: Simulator, size: int) -> Path:
    """Write a config and a mapping that let files of `size` bytes through in both directions."""
    mapping = yaml.safe_load(resources.files("mdr_connector.mappings").joinpath("jira.yaml").read_text(encoding="utf-8"))
    mapping["attachments"] = {"to_ticket": {"max_bytes": size}, "to_mdr": {"max_bytes": size}}
    mapping_path = work / "mapping.yaml"
    mapping_path.write_text(yaml.safe_dump(mapping, allow_unicode=True), encoding="utf-8")

    token_dir = work / "tokens"
    token_dir.mkdir(mode=0o700)
    from mdr_connector.adapters.jira.simulator import SERVICE_EMAIL

    config = {
        "data_dir": str(work / "data"),
        "log": {"level": "INFO", "format": "json"},
        "connections": [
            {
                "name": CONNECTION,
                "mdr": {
                    "base_url": mdr.details["url"],
                    "client_id": CLIENT_ID,
                    "connection_name": CONNECTION_NAME,
                    "token_dir": str(token_dir),
                },
                "ticket": {
                    "system": "jira",
                    "url": jira.details["url"],
                    "auth": {"type": "api_token", "email": SERVICE_EMAIL, "token": {"env": JIRA_TOKEN_VARIABLE}},
                    "search_delay_seconds": 0,
                },
                "mapping": str(mapping_path),
            }
        ],
    }
    config_path = work / "config.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return config_path


def connector_command() -> list[str]:
    """Return the command of the `mdr-connector` console script beside this Python, or of the module without it."""
    script = Path(sys.executable).parent / "mdr-connector"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "mdr_connector.connector.cli"]


def connector_environment() -> dict[str, str]:
    from mdr_connector.adapters.jira.simulator import SERVICE_TOKEN

    return {**os.environ, JIRA_TOKEN_VARIABLE: SERVICE_TOKEN, "LANG": "C.UTF-8"}


def activate_token(config: Path, token: str, work: Path) -> None:
    token_file = work / "console-token"
    token_file.write_text(token, encoding="utf-8")
    result = subprocess.run(
        [*connector_command(), "--config", str(config), "token", "activate", "--token-file", str(token_file)],
        env=connector_environment(), capture_output=True, text=True, check=False,
    )
    token_file.unlink(missing_ok=True)
    if result.returncode != 0:
        raise SystemExit(f"token activation failed with status {result.returncode}: {result.stderr.strip()}")


@dataclass
class Measurement:
    """Figures the sampler recorded for the sync process."""

    idle_kib: int = 0
    peak_kib: int = 0
    samples: int = 0
    transfer_started: float | None = None
    spool_files_seen: set[str] = field(default_factory=set)


def read_status_kib(pid: int) -> dict[str, int]:
    """Return the kB fields of /proc/<pid>/status that matter here, or {} once the process is gone."""
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values[key] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return values


def sample(pid: int, spool: Path, measurement: Measurement, stop: threading.Event) -> None:
    """Record VmRSS until the transfer starts (idle) and VmHWM throughout (peak), until `stop` is set."""
    while not stop.is_set():
        values = read_status_kib(pid)
        if values:
            measurement.samples += 1
            measurement.peak_kib = max(measurement.peak_kib, values.get("VmHWM", 0), values.get("VmRSS", 0))
        files = set(os.listdir(spool)) if spool.is_dir() else set()
        if files and measurement.transfer_started is None:
            measurement.transfer_started = time.monotonic()
        if measurement.transfer_started is None and values:
            measurement.idle_kib = max(measurement.idle_kib, values.get("VmRSS", 0))
        measurement.spool_files_seen |= files
        time.sleep(SAMPLE_SECONDS)


def run_sync(config: Path, spool: Path, log_file: IO[str]) -> tuple[int, str, Measurement, float, float]:
    """Run `mdr-connector sync --once`, sample it, and return its status, output, figures and timings."""
    started = time.monotonic()
    process = subprocess.Popen(
        [*connector_command(), "--config", str(config), "sync", "--once"],
        env=connector_environment(), stdout=subprocess.PIPE, stderr=log_file, text=True,
    )
    measurement = Measurement()
    stop = threading.Event()
    sampler = threading.Thread(target=sample, args=(process.pid, spool, measurement, stop), daemon=True)
    sampler.start()
    assert process.stdout is not None
    output = process.stdout.read()

    # wait4 reaps the child and returns its own resource usage, ru_maxrss in KiB on Linux.
    _pid, status, usage = os.wait4(process.pid, 0)
    finished = time.monotonic()
    process.returncode = os.waitstatus_to_exitcode(status)
    stop.set()
    sampler.join()
    measurement.peak_kib = max(measurement.peak_kib, usage.ru_maxrss)
    transfer_seconds = finished - (measurement.transfer_started or finished)
    return process.returncode, output, measurement, finished - started, transfer_seconds


# Checks and output


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def check_copy(
    target: str, target_files: list[dict[str, Any]], source_files: list[dict[str, Any]], source_name: str, copier: str
) -> tuple[bool, str]:
    """Check that the target contains exactly one copy by `copier`, with the size and SHA-256 of the source file."""
    sources = [record for record in source_files if record["name"] == source_name]
    copies = [record for record in target_files if record["author"] == copier]
    if len(sources) != 1 or len(copies) != 1:
        return False, f"{target}: expected one copy of {source_name!r} by {copier!r}, found {len(copies)}"

    [source], [copy] = sources, copies
    line = f"{target}: {copy['name']!r}, {copy['size']} bytes, sha256 {copy['sha256'][:16]}…"
    if (copy["name"], copy["size"], copy["sha256"]) != (source["name"], source["size"], source["sha256"]):
        return False, f"{line}, but the source has {source['size']} bytes, sha256 {source['sha256'][:16]}…"
    return True, line


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


@contextlib.contextmanager
def work_folder(keep: bool) -> Iterator[Path]:
    work = Path(tempfile.mkdtemp(prefix="mdr-bench-"))
    try:
        yield work
    finally:
        if keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def run_benchmark(size: int, latency: float, keep: bool) -> int:
    free = shutil.disk_usage(tempfile.gettempdir()).free
    if free < DISK_FACTOR * size:
        raise SystemExit(
            f"{tempfile.gettempdir()} has {free // MIB} MiB free; a file of {size // MIB} MiB needs about "
            f"{DISK_FACTOR * size // MIB} MiB; pass a smaller --size-mb or set TMPDIR to a larger disk"
        )

    with work_folder(keep) as work, (work / "simulators.log").open("w", encoding="utf-8") as sim_log:
        print(f"seeding two files of {size // MIB} MiB, latency {latency * 1000:.0f} ms per request", flush=True)
        mdr = start_simulator("mdr", size, latency, sim_log)
        jira = None
        try:
            jira = start_simulator("jira", size, latency, sim_log, mdr.details["incident_id"])
            config = write_config(work, mdr, jira, size)
            activate_token(config, mdr.details["console_token"], work)

            spool = work / "data" / "spool" / CONNECTION
            with (work / "connector.log").open("w", encoding="utf-8") as connector_log:
                code, output, measurement, total_seconds, transfer_seconds = run_sync(config, spool, connector_log)
            print(output.strip())
            if code != 0:
                print(f"mdr-connector sync --once exited with status {code}; see {work / 'connector.log'}")
                keep = True

            from mdr_connector.adapters.jira.simulator import SERVICE_NAME

            jira_files, mdr_files = jira.report(), mdr.report()
            ok_jira, jira_line = check_copy("Jira", jira_files, mdr_files, MDR_FILE_NAME, SERVICE_NAME)
            ok_mdr, mdr_line = check_copy("MDR", mdr_files, jira_files, JIRA_FILE_NAME, CONNECTION_NAME)
        finally:
            if jira is not None:
                jira.stop()
            mdr.stop()

        moved = 2 * size
        spool_left = sorted(os.listdir(spool)) if spool.is_dir() else []
        print(f"idle RSS:        {mib(measurement.idle_kib)}")
        print(f"peak RSS:        {mib(measurement.peak_kib)}")
        print(f"peak - idle:     {mib(measurement.peak_kib - measurement.idle_kib)}")
        print(f"bytes moved:     {moved} ({moved // MIB} MiB, one file each way)")
        print(f"seconds:         {total_seconds:.1f} in all, {transfer_seconds:.1f} from the first spool file")
        print(f"throughput:      {moved / MIB / max(transfer_seconds, 1e-9):.0f} MiB/s while transferring")
        print(f"RSS samples:     {measurement.samples}, spool files seen: {len(measurement.spool_files_seen)}, "
              f"left: {len(spool_left)}")
        print(f"{'ok  ' if ok_jira else 'FAIL'} {jira_line}")
        print(f"{'ok  ' if ok_mdr else 'FAIL'} {mdr_line}")
        if keep:
            print(f"logs: {work / 'connector.log'}, {work / 'simulators.log'}")
        return 0 if code == 0 and ok_jira and ok_mdr and not spool_left else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure the connector's memory while it moves a large file each way.")
    parser.add_argument("--size-mb", type=int, default=1024, help="size of each file in MiB (default: 1024)")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="latency of every simulator request in ms (default: 20)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder with the config, ledger and logs")
    parser.add_argument("--serve", choices=("mdr", "jira"), help=argparse.SUPPRESS)
    parser.add_argument("--size-bytes", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--incident-id", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve_simulator(args.serve, args.size_bytes, args.latency_ms / 1000, args.incident_id)
        return 0
    if args.size_mb < 1:
        parser.error(f"--size-mb {args.size_mb}: give a size of at least 1 MiB")
    if not Path("/proc/self/status").exists():
        parser.error("this benchmark reads /proc/<pid>/status, so it runs on Linux only")
    return run_benchmark(args.size_mb * MIB, args.latency_ms / 1000, args.keep)


if __name__ == "__main__":
    sys.exit(main())
