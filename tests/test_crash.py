"""The connector process killed with SIGKILL at random points while 200 incidents sync both ways.

The harness is bench/crash.py, shared with bench/crash_rounds.py, which
runs the same rounds for longer. The MDR and Jira simulators serve from
this test's own event loop, so they survive every kill. Each round changes
both sides as people would, starts `mdr-connector run` in a child process
with an SQLite ledger, and kills it. The kill comes after a random delay
from the first write, or when the Nth write of a kind arrives at a
simulator or has been applied there, before the reply. After the rounds,
`sync --once` runs until one run writes nothing and nothing is parked, and
both simulators are counted.

The seed is fixed, so the changes and the random choices repeat. The
timing does not, and with it the kinds of write that triggers aim at. Set
MDR_CRASH_SEED to try other seeds. The report with the seed is printed
(`pytest -s`) and is part of every failure message.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import crash  # noqa: E402  (bench/ is not a package, so it joins sys.path first)

ROUNDS = 50
INCIDENTS = 200
SEED = int(os.environ.get("MDR_CRASH_SEED", "20261205"))
# Kills that must land while a write is in flight, and after a write was
# applied but before its reply, so that a pass cannot come from kills that
# all hit idle moments.
MIN_MID_WRITE = 10
MIN_AFTER_APPLY = 5
SCRIPT_TIMEOUT_SECONDS = 300

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> crash.CrashReport:
    """Run every round and the final runs once for the whole module."""
    settings = crash.CrashSettings(rounds=ROUNDS, incidents=INCIDENTS, seed=SEED)
    result = asyncio.run(crash.run_crash(settings, tmp_path_factory.mktemp("crash")))
    print("\n".join(result.lines()))
    return result


def details(report: crash.CrashReport) -> str:
    return "\n".join(report.lines())


def test_every_round_killed(report: crash.CrashReport) -> None:
    assert len(report.kills) == ROUNDS, details(report)
    assert len(report.killed) == ROUNDS, details(report)
    assert report.problems["rounds"] == [], details(report)


def test_kills_land_mid_write(report: crash.CrashReport) -> None:
    assert len(report.mid_write) >= MIN_MID_WRITE, details(report)
    assert len(report.after_apply) >= MIN_AFTER_APPLY, details(report)


def test_final_runs_converge(report: crash.CrashReport) -> None:
    assert report.problems["final runs"] == [], details(report)
    last = report.final_runs[-1]
    assert last["exit_code"] == 0, details(report)
    assert last["writes"] == 0, details(report)
    assert last["parked"] == 0, details(report)


def test_one_issue_per_incident(report: crash.CrashReport) -> None:
    assert report.counts["issues"] == INCIDENTS, details(report)
    assert report.problems["issues"] == [], details(report)


def test_comments_once_each_way(report: crash.CrashReport) -> None:
    counts = report.counts
    assert counts["connector comments in Jira"] == counts["MDR comments"], details(report)
    assert counts["connector comments in MDR"] == counts["Jira comments"], details(report)
    assert report.problems["comments"] == [], details(report)


def test_files_once_each_way(report: crash.CrashReport) -> None:
    counts = report.counts
    assert counts["connector files in Jira"] == counts["MDR files"], details(report)
    assert counts["connector files in MDR"] == counts["Jira files"], details(report)
    assert report.problems["files"] == [], details(report)


def test_statuses_follow_people(report: crash.CrashReport) -> None:
    assert report.counts["incidents closed"] == report.counts["issues moved to Done"], details(report)
    assert report.problems["statuses"] == [], details(report)



def test_bench_script_runs() -> None:
    """bench/crash_rounds.py runs end to end with tiny sizes and reports a clean diff."""
    result = subprocess.run(
        [sys.executable, str(BENCH / "crash_rounds.py"), "--rounds", "1", "--incidents", "2", "--seed", "1",
         "--latency-ms", "0"],
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_SECONDS,
        env={**os.environ, "LANG": "C.UTF-8"},
        check=False,
    )
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"
    assert result.returncode == 0, output
    assert "kills: 1 of 1 rounds" in result.stdout, output
    assert "diff: none" in result.stdout, output
