"""`check`, `status` and the operator commands in cluster mode, with the MDR token pair in PostgreSQL.

Each test runs the CLI as a separate process against the MDR and Jira
simulators on loopback and a scratch PostgreSQL database. No token file
exists after `token activate` in cluster mode, or after the import of one
left from single-instance mode, so a command that still read the file
would report the chain as Pending activation.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fixtures_jira import RunningJira
from fixtures_mdr import MDR_CLIENT_ID
from fixtures_postgres import scratch_database
from sqlalchemy import select, text
from test_cli import jira, run_cli, write_config  # noqa: F401 - fixtures used by name
from test_operations import human_issue

from mdr_connector.adapters.mdr.simulator import HOUR, MdrSimulator
from mdr_connector.connector.store import Store, TokenChain

KEY_VARIABLE = "MDR_TEST_CLUSTER_TOKEN_KEY"
CLUSTER_ENV = {KEY_VARIABLE: base64.urlsafe_b64encode(bytes(range(32))).decode("ascii")}


@pytest.fixture
async def database_url() -> AsyncIterator[str]:
    async with scratch_database() as url:
        yield url


def enable_cluster(config: Path, database_url: str) -> None:
    """Switch a config written by `write_config` to cluster mode on `database_url`."""
    document = yaml.safe_load(config.read_text(encoding="utf-8"))
    document["database_url"] = database_url
    document["cluster"] = {"enabled": True, "token_key": {"env": KEY_VARIABLE}, "takeover_seconds": 30}
    config.write_text(yaml.safe_dump(document), encoding="utf-8")


@pytest.fixture
async def cluster_config(
    tmp_path: Path, mdr_sim: MdrSimulator, mdr_url: str, jira: RunningJira, database_url: str
) -> Path:
    """A cluster-mode config whose token pair `token activate` stored in the database."""
    config = write_config(tmp_path, mdr_url, jira)
    enable_cluster(config, database_url)
    token = mdr_sim.issue_console_token(MDR_CLIENT_ID)

    code, out, err = await cli(config, "token", "activate", stdin=token.encode())

    assert code == 0, err
    assert "token activated; state Active" in out
    assert token_file(tmp_path).exists() is False
    return config


async def cli(config: Path, *args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    return await run_cli("--config", str(config), *args, stdin=stdin, env=CLUSTER_ENV)


def token_file(tmp_path: Path) -> Path:
    return tmp_path / "tokens" / f"{MDR_CLIENT_ID}.json"


def section(out: str) -> list[str]:
    """The lines under the connection name, without their two-space indent."""
    return [line[2:] for line in out.splitlines()[1:] if line.startswith("  ")]


async def stored_version(database_url: str) -> int:
    store = await Store.open(database_url, upgrade=False)
    try:
        async with store.engine.connect() as database:
            version = await database.scalar(select(TokenChain.version).where(TokenChain.client_id == MDR_CLIENT_ID))
    finally:
        await store.close()
    assert version is not None
    return version


async def execute(database_url: str, *statements: str) -> None:
    store = await Store.open(database_url, upgrade=False)
    try:
        async with store.engine.begin() as database:
            for statement in statements:
                await database.execute(text(statement))
    finally:
        await store.close()


async def status_json(config: Path) -> tuple[int, dict[str, Any]]:
    code, out, err = await cli(config, "status", "--json")
    assert err == "", err
    return code, json.loads(out)


# check


async def test_check_after_import(
    tmp_path: Path, mdr_sim: MdrSimulator, mdr_url: str, jira: RunningJira, database_url: str
) -> None:
    """`check` reads the pair from the database once the token file of single-instance mode was imported and renamed."""
    config = write_config(tmp_path, mdr_url, jira)
    token = mdr_sim.issue_console_token(MDR_CLIENT_ID)
    code, _, err = await run_cli("--config", str(config), "token", "activate", stdin=token.encode())
    assert code == 0, err
    enable_cluster(config, database_url)

    code, out, err = await cli(config, "token", "status")
    assert code == 0, err
    assert "main: Active" in out
    assert token_file(tmp_path).exists() is False
    assert token_file(tmp_path).with_name(f"{MDR_CLIENT_ID}.json.moved-to-database").exists()

    code, out, err = await cli(config, "check")

    assert code == 0, out + err
    assert "  [ok] MDR token is Active" in out.splitlines()
    assert f"  [ok] MDR API at {mdr_url} answers for client {MDR_CLIENT_ID}" in out.splitlines()
    assert "FAILED" not in out


async def test_check_refreshes_through_database(
    cluster_config: Path, mdr_sim: MdrSimulator, mdr_url: str, database_url: str
) -> None:
    """`check` with an expired access token refreshes it once and stores the new pair in the database."""
    version = await stored_version(database_url)
    confirms = mdr_sim.confirm_calls
    mdr_sim.advance(2 * HOUR)

    code, out, err = await cli(cluster_config, "check")

    assert code == 0, out + err
    assert f"  [ok] MDR API at {mdr_url} answers for client {MDR_CLIENT_ID}" in out.splitlines()
    assert mdr_sim.confirm_calls == confirms + 1
    assert await stored_version(database_url) == version + 1


async def test_check_wrong_key_named(cluster_config: Path) -> None:
    """`check` with another cluster.token_key fails on the token line and names the key mismatch."""
    other_key = base64.urlsafe_b64encode(bytes(32)).decode("ascii")

    code, out, err = await run_cli("--config", str(cluster_config), "check", env={KEY_VARIABLE: other_key})

    assert code == 1, err
    [line] = [line for line in out.splitlines() if "MDR token pair in the database" in line]
    assert line.startswith(f"  [FAILED] MDR token pair in the database: the token pair of client {MDR_CLIENT_ID}")
    assert "encrypted with another key" in line


# status


async def test_status_tokens_from_database(cluster_config: Path) -> None:
    """`status` shows the database pair as Active, and a lease that no instance took yet, in text and JSON."""
    code, out, err = await cli(cluster_config, "status")
    code_json, document = await status_json(cluster_config)

    assert code == 0, out + err
    assert code_json == 0
    lines = section(out)
    assert "token chain: Active" in lines
    assert "lease: not taken by any instance yet" in lines
    assert out.splitlines()[-1] == "cluster instances: none live"

    [connection] = document["connections"]
    assert connection["healthy"] is True
    assert connection["tokens"]["storage"] == "database"
    assert connection["tokens"]["state"] == "Active"
    assert connection["lease"] == {"state": "free", "holder": None, "epoch": 0, "expires_at": None, "seconds_left": None}
    assert document["cluster"]["instances"] == []


async def test_status_shows_leases_and_instances(cluster_config: Path, database_url: str) -> None:
    """`status` names the lease holder, epoch and expiry, and lists only the live instances."""
    await execute(
        database_url,
        "INSERT INTO leases (connection, holder, epoch, expires_at, acquired_at) "
        "VALUES ('main', 'instance-a', 3, now() + interval '120 seconds', now())",
        "INSERT INTO cluster_instances (name, host, pid, started_at, expires_at) "
        "VALUES ('instance-a', 'host-a', 4321, now(), now() + interval '120 seconds')",
        "INSERT INTO cluster_instances (name, host, pid, started_at, expires_at) "
        "VALUES ('instance-dead', 'host-b', 99, now() - interval '1 hour', now() - interval '5 seconds')",
    )

    code, out, err = await cli(cluster_config, "status")
    code_json, document = await status_json(cluster_config)

    assert code == 0, out + err
    assert code_json == 0
    [lease_line] = [line for line in section(out) if line.startswith("lease: ")]
    held_match = re.fullmatch(
        r"lease: held by instance-a, epoch 3, expires in (\d+) s at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", lease_line
    )
    assert held_match is not None, lease_line
    assert 0 < int(held_match.group(1)) <= 120
    cluster_lines = out.splitlines()[-2:]
    assert cluster_lines[0] == "cluster instances: 1 live"
    assert re.fullmatch(
        r"  instance-a on host-a, pid 4321: started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC, "
        r"registration expires in \d+ s",
        cluster_lines[1],
    ), cluster_lines[1]
    assert "instance-dead" not in out

    lease = document["connections"][0]["lease"]
    assert lease["state"] == "held"
    assert lease["holder"] == "instance-a"
    assert lease["epoch"] == 3
    assert 0 < lease["seconds_left"] <= 120
    [instance] = document["cluster"]["instances"]
    assert (instance["name"], instance["host"], instance["pid"]) == ("instance-a", "host-a", 4321)
    assert 0 < instance["seconds_left"] <= 120


async def test_status_expired_then_released_lease(cluster_config: Path, database_url: str) -> None:
    """An expired lease is shown as free for another instance, and `sync --once` takes it and hands it back."""
    await execute(
        database_url,
        "INSERT INTO leases (connection, holder, epoch, expires_at, acquired_at) "
        "VALUES ('main', 'instance-a', 3, now() - interval '30 seconds', now() - interval '1 minute')",
    )

    code, out, err = await cli(cluster_config, "status")
    _, document = await status_json(cluster_config)

    assert code == 0, out + err
    [lease_line] = [line for line in section(out) if line.startswith("lease: ")]
    expired_match = re.fullmatch(
        r"lease: expired (\d+) s ago at \S+ \S+ UTC, last held by instance-a at epoch 3; "
        r"another instance can take it over",
        lease_line,
    )
    assert expired_match is not None, lease_line
    assert int(expired_match.group(1)) >= 30
    assert document["connections"][0]["lease"]["state"] == "expired"
    assert document["connections"][0]["lease"]["seconds_left"] <= -30

    code, _, err = await cli(cluster_config, "sync", "--once")
    assert code == 0, err

    code, out, err = await cli(cluster_config, "status")
    _, document = await status_json(cluster_config)

    assert code == 0, out + err
    assert "lease: free, handed back at epoch 4" in section(out)
    assert out.splitlines()[-1] == "cluster instances: none live"
    assert document["connections"][0]["lease"] == {
        "state": "free", "holder": None, "epoch": 4, "expires_at": None, "seconds_left": None,
    }


async def test_status_in_russian(cluster_config: Path, database_url: str) -> None:
    """The lease and instance lines are translated with `--lang ru`."""
    await execute(
        database_url,
        "INSERT INTO leases (connection, holder, epoch, expires_at, acquired_at) "
        "VALUES ('main', 'instance-a', 2, now() + interval '120 seconds', now())",
    )

    code, out, err = await cli(cluster_config, "--lang", "ru", "status")

    assert code == 0, out + err
    assert any(line.startswith("аренда: у instance-a, эпоха 2, истекает через ") for line in section(out))
    assert out.splitlines()[-1] == "экземпляры кластера: ни одного работающего"


# Operator commands


async def test_operations_use_database_pair(
    cluster_config: Path, mdr_sim: MdrSimulator, jira: RunningJira, database_url: str
) -> None:
    """`sync --dry-run`, `trace --live` and `link` read MDR with the pair from the database, refreshing it once."""
    incident = mdr_sim.seed_incident(MDR_CLIENT_ID, summary="Beacon to a known C2")
    incident_id = incident["incident_id"]
    version = await stored_version(database_url)
    confirms = mdr_sim.confirm_calls
    mdr_sim.advance(2 * HOUR)

    code, out, err = await cli(cluster_config, "sync", "--dry-run")

    assert code == 0, out + err
    assert out.splitlines()[-1].startswith("main: dry run: ")
    assert "1 incidents seen, 0 failures" in out.splitlines()[-1]
    assert jira.sim.issues == {}
    assert mdr_sim.confirm_calls == confirms + 1
    assert await stored_version(database_url) == version + 1

    code, out, err = await cli(cluster_config, "trace", "--live", "--json", "--", incident_id)

    assert code == 0, out + err
    assert json.loads(out)["live"]["status"] == incident["status"]

    issue = human_issue(jira)
    code, out, err = await cli(cluster_config, "link", "--", incident_id, issue.key)

    assert code == 0, out + err
    assert out.splitlines()[0].startswith(f"linked MDR incident {incident_id} ")
    assert mdr_sim.confirm_calls == confirms + 1
