"""Three connector instances share ten connections through leases in PostgreSQL.

The harness is bench/cluster.py, which also runs from the command line
with other sizes. The MDR simulator (one client per connection) and the
Jira simulator (one project per connection) serve from this test's own
event loop. Each instance is `mdr-connector run` in a child process, and
all of them read one config in cluster mode. Three runs, each on a
scratch database:

- takeover: the instance that holds the most connections is killed with
  SIGKILL, and its connections must get new holders; more incidents come
  in after the kill. It runs twice: with day-long access tokens, and with
  4-second ones, so that each connection's token pair rotates several
  times across the kill;
- stall: an instance that holds leases and is writing gets SIGSTOP; once
  its leases have new holders, the others get SIGSTOP too, and the stalled
  one gets SIGCONT; it must write nothing, to the simulators or to the
  ledger, and must log the lost leases.

Each run ends with the counts on both simulators, the parked items, a
check that every write came from the lease holder of its connection at
that moment, and the MDR `session/confirm` log: each refresh token rotated
at most once, none rejected, several rotations per connection.

Without a PostgreSQL server the runs skip, and under CI=true they fail.
The reports print with `pytest -s` and are part of every failure message.
The harness finds the process behind each request through /proc, so it
needs Linux.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from fixtures_postgres import drop_postgres_database, postgres_database, postgres_unavailable

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import cluster  # noqa: E402  (bench/ is not a package, so it joins sys.path first)

SEED = int(os.environ.get("MDR_CLUSTER_SEED", "20261206"))
DAY_SECONDS = 86_400
# The takeover run keeps its first access tokens, so it tests the leases alone.
TAKEOVER = cluster.ClusterRunSettings(
    connections=10, instances=3, incidents=4, later_incidents=2, seed=SEED, interval_seconds=1.0,
    takeover_seconds=8.0, access_token_seconds=DAY_SECONDS,
)
# The same run with 4-second access tokens, so every pair rotates several times across the kill.
TOKENS = cluster.ClusterRunSettings(
    connections=10, instances=3, incidents=3, later_incidents=1, seed=SEED + 1, interval_seconds=1.0,
    takeover_seconds=8.0, access_token_seconds=4,
)
# A backlog at 20 ms a request keeps the instances writing when one is stopped; tokens rotate meanwhile.
STALL = cluster.ClusterRunSettings(
    connections=10, instances=3, incidents=12, later_incidents=1, seed=SEED + 2, latency_seconds=0.02,
    interval_seconds=0.5, takeover_seconds=10.0, access_token_seconds=6, watch_seconds=3.0,
)
# Timing is only checked against a generous bound: the measured figure goes to the report.
TAKEOVER_BOUND_SECONDS = TAKEOVER.takeover_seconds * 3
MIN_ROTATIONS = 2


def run_scenario(
    run: Callable[[cluster.ClusterRunSettings, Path, str], Awaitable[cluster.RunReport]],
    settings: cluster.ClusterRunSettings,
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
) -> cluster.RunReport:
    """Run one scenario on a scratch database; skip, or fail under CI=true, without a PostgreSQL server."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the cluster harness finds the process behind each request through /proc, which needs Linux")
    database_url = asyncio.run(postgres_database())
    if database_url is None:
        postgres_unavailable()
    try:
        report = asyncio.run(run(settings, tmp_path_factory.mktemp(name), database_url))
    finally:
        asyncio.run(drop_postgres_database(database_url))
    print("\n".join(report.lines()))
    return report


@pytest.fixture(scope="module")
def takeover(tmp_path_factory: pytest.TempPathFactory) -> cluster.RunReport:
    return run_scenario(cluster.run_takeover, TAKEOVER, tmp_path_factory, "takeover")


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> cluster.RunReport:
    return run_scenario(cluster.run_takeover, TOKENS, tmp_path_factory, "tokens")


@pytest.fixture(scope="module")
def stall(tmp_path_factory: pytest.TempPathFactory) -> cluster.RunReport:
    return run_scenario(cluster.run_stall, STALL, tmp_path_factory, "stall")


def details(report: cluster.RunReport) -> str:
    return "\n".join(report.lines())


# Takeover after SIGKILL


@pytest.mark.slow
def test_leases_spread_over_instances(takeover: cluster.RunReport) -> None:
    """Every connection has one live holder, and no instance holds more than its fair share."""
    assert "balanced after the start" in takeover.figures, details(takeover)
    assert takeover.problems["shares"] == [], details(takeover)


@pytest.mark.slow
def test_killed_instance_taken_over(takeover: cluster.RunReport) -> None:
    """The connections of the instance killed with SIGKILL get new holders."""
    assert takeover.problems["takeover"] == [], details(takeover)
    assert "takeover seconds" in takeover.figures, details(takeover)
    assert takeover.figures["takeover seconds"] <= TAKEOVER_BOUND_SECONDS, details(takeover)


@pytest.mark.slow
def test_takeover_writes_by_holder_only(takeover: cluster.RunReport) -> None:
    """Every write to a simulator came from the instance that held the connection's lease then."""
    assert takeover.problems["stray writes"] == [], details(takeover)


@pytest.mark.slow
def test_takeover_one_copy_each(takeover: cluster.RunReport) -> None:
    """One issue per incident, every comment and file once on the other side, nothing parked."""
    counts = takeover.counts
    assert counts["issues"] == counts["incidents"], details(takeover)
    assert takeover.problems["issues"] == [], details(takeover)
    assert counts["connector comments in Jira"] == counts["MDR comments"], details(takeover)
    assert counts["connector comments in MDR"] == counts["Jira comments"], details(takeover)
    assert takeover.problems["comments"] == [], details(takeover)
    assert counts["connector files in Jira"] == counts["MDR files"], details(takeover)
    assert counts["connector files in MDR"] == counts["Jira files"], details(takeover)
    assert takeover.problems["files"] == [], details(takeover)
    assert takeover.problems["parked"] == [], details(takeover)


@pytest.mark.slow
def test_takeover_instances_stop_cleanly(takeover: cluster.RunReport) -> None:
    """The instances left running exit 0 on SIGTERM."""
    assert takeover.problems["instances"] == [], details(takeover)


# The token chain across instances


@pytest.mark.slow
def test_refresh_token_spent_once(tokens: cluster.RunReport) -> None:
    """Each refresh token rotates at most once across all instances, none is rejected, and every pair rotates."""
    assert tokens.problems["tokens"] == [], details(tokens)
    rotations = tokens.figures["token rotations per connection"]
    assert len(rotations) == TOKENS.connections, details(tokens)
    assert min(rotations.values()) >= MIN_ROTATIONS, details(tokens)


@pytest.mark.slow
def test_rotating_run_settles(tokens: cluster.RunReport) -> None:
    """With rotating tokens and a kill, every item still has one copy, and only lease holders wrote."""
    counts = tokens.counts
    assert counts["issues"] == counts["incidents"], details(tokens)
    assert counts["connector comments in Jira"] == counts["MDR comments"], details(tokens)
    assert counts["connector comments in MDR"] == counts["Jira comments"], details(tokens)
    for area in ("takeover", "issues", "comments", "files", "parked", "stray writes"):
        assert tokens.problems[area] == [], f"{area}\n{details(tokens)}"


# A stalled instance


@pytest.mark.slow
def test_stalled_instance_writes_nothing(stall: cluster.RunReport) -> None:
    """After SIGCONT, the instance whose leases were taken writes to neither simulator nor the ledger."""
    figures = stall.figures["stall"]
    assert figures.held, details(stall)
    assert figures.writes_after_resume == [], details(stall)
    assert figures.ledger_changed == [], details(stall)


@pytest.mark.slow
def test_stalled_instance_logs_lease_loss(stall: cluster.RunReport) -> None:
    """The stalled instance logs that it lost its leases once it runs again."""
    events = stall.figures["stall"].lease_events
    assert any("lost" in event for event in events), details(stall)


@pytest.mark.slow
def test_stall_run_settles(stall: cluster.RunReport) -> None:
    """After the stall, both sides hold one copy of everything, nothing is parked, and no stray write or token reuse happened."""
    counts = stall.counts
    assert counts["issues"] == counts["incidents"], details(stall)
    assert counts["connector comments in Jira"] == counts["MDR comments"], details(stall)
    assert counts["connector files in Jira"] == counts["MDR files"], details(stall)
    for area in ("takeover", "stall", "issues", "comments", "files", "parked", "stray writes", "tokens"):
        assert stall.problems[area] == [], f"{area}\n{details(stall)}"


@pytest.mark.slow
def test_stalled_instance_stops_cleanly(stall: cluster.RunReport) -> None:
    """Every instance, the one that lost its leases included, exits 0 on SIGTERM."""
    assert stall.problems["instances"] == [], details(stall)


# Harness parts, without PostgreSQL


async def test_peer_process_found_through_proc() -> None:
    """A request over loopback is traced to the process that opened the connection."""
    if not sys.platform.startswith("linux"):
        pytest.skip("needs /proc")
    layout = cluster.Layout.of(2)
    peers = cluster.PeerProcesses()
    peers.pids.add(os.getpid())
    recorder = cluster.WriteRecorder(layout, peers)
    settings = cluster.ClusterRunSettings(connections=2, instances=2)
    async with cluster.running_simulators(settings, layout, recorder) as sims:
        console_token = sims.mdr.issue_console_token(layout.clients[1])
        async with sims.http.post(f"{sims.mdr_url}/{layout.clients[1]}/session/confirm", json={"refresh_token": console_token}) as reply:
            assert reply.status == 200

    assert len(recorder.writes) == 1
    assert recorder.writes[0].pid == os.getpid()
    assert recorder.writes[0].connection == "conn01"
    assert recorder.writes[0].kind == "mdr session/confirm"


def test_stray_write_found() -> None:
    """A write after another holder's term began is named; one inside the writer's own term is not."""
    watch = cluster.LeaseWatch("postgresql+asyncpg://unused/none", ["conn00"])
    watch.instances = {"host-1": 101, "host-2": 102}
    watch.epochs = {
        ("conn00", 1): cluster.Epoch("conn00", 1, "host-1", acquired_at=100.0, seen_at=100.1),
        ("conn00", 2): cluster.Epoch("conn00", 2, "host-2", acquired_at=200.0, seen_at=200.1),
    }
    writes = [
        cluster.Write(150.0, "mdr", "mdr comments/create", "conn00", 101),
        cluster.Write(250.0, "mdr", "mdr comments/create", "conn00", 102),
        cluster.Write(260.0, "jira", "jira POST /rest/api/2/issue/{issue}/comment", "conn00", 101),
        cluster.Write(50.0, "mdr", "mdr session/confirm", "conn00", 999),
    ]

    found = cluster.stray_writes(writes, watch)

    assert len(found) == 1
    assert "by host-1 at 260.000" in found[0]
    assert "held by host-2 (epoch 2)" in found[0]


def test_token_reuse_found() -> None:
    """A refresh token rotated twice and a rejected confirm are both problems; rotations leave out the activation."""
    layout = cluster.Layout.of(1)
    client = layout.clients[0]
    confirms = [
        {"client_id": client, "token_id": "console", "outcome": "rotated", "at_ms": 1},
        {"client_id": client, "token_id": "a", "outcome": "rotated", "at_ms": 2},
        {"client_id": client, "token_id": "a", "outcome": "rotated", "at_ms": 3},
        {"client_id": client, "token_id": "a", "outcome": "used", "at_ms": 4},
    ]

    rotations, problems = cluster.token_rotations(confirms, layout)

    assert rotations == {"conn00": 2}
    assert any("rejected (used)" in problem for problem in problems)
    assert any("refresh token a rotated 2 times" in problem for problem in problems)


def test_ledger_change_after_resume_judged() -> None:
    """A ledger table change counts against the stalled instance; a token save counts only without a confirm sent before SIGSTOP."""
    layout = cluster.Layout.of(4)
    recorder = cluster.WriteRecorder(layout, cluster.PeerProcesses())
    recorder.writes = [
        cluster.Write(90.0, "mdr", "mdr session/confirm", "conn00", 101, status=200),
        cluster.Write(95.0, "mdr", "mdr session/confirm", "conn01", 101, status=200),
        cluster.Write(96.0, "mdr", "mdr session/confirm", "conn01", 102, status=200),
        cluster.Write(97.0, "mdr", "mdr session/confirm", "conn03", 101, status=200),
    ]
    unchanged = {table: "same" for table in (*cluster.LEDGER_TABLES, "token_chains")}
    before = {connection: dict(unchanged) for connection in layout.connections}
    after = {connection: dict(unchanged) for connection in layout.connections}
    after["conn00"]["token_chains"] = "saved by the stalled instance"
    after["conn01"]["token_chains"] = "saved after another process's confirm"
    after["conn02"]["token_chains"] = "saved without any confirm"
    after["conn03"]["token_chains"] = "saved"
    after["conn03"]["synced_items"] = "written"
    figures = cluster.StallFigures()

    cluster.judge_ledger(figures, before, after, recorder, pid=101, stopped_at=100.0)

    assert figures.tokens_saved == ["conn00"]
    assert figures.ledger_changed == ["conn01 (token_chains)", "conn02 (token_chains)", "conn03 (synced_items, token_chains)"]


async def test_people_counted_on_both_sides() -> None:
    """Seeded incidents show up as missing issues and copies before any sync, each named once."""
    layout = cluster.Layout.of(3)
    recorder = cluster.WriteRecorder(layout, cluster.PeerProcesses())
    settings = cluster.ClusterRunSettings(connections=3, instances=2)
    async with cluster.running_simulators(settings, layout, recorder) as sims:
        people = cluster.People(sims, random.Random(1))
        await people.seed(2)
        counts, problems = await cluster.count_both_sides(sims, people)

    assert counts["incidents"] == 6
    assert counts["MDR comments"] == 9
    assert counts["MDR files"] == 3
    assert len(problems["issues"]) == 6
    assert len(problems["comments"]) == 9
    assert len(problems["files"]) == 3
    assert recorder.writes == []
