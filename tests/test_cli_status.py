"""`mdr-connector status`, run as a separate process on a ledger written by real syncs against the simulators."""

from __future__ import annotations

import json
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.exc import OperationalError
from fixtures_jira import RunningJira
from fixtures_mdr import MDR_CLIENT_ID
from test_cli import activated_config, jira, run_cli, write_config  # noqa: F401 - fixtures used by name

from mdr_connector.adapters.mdr.simulator import MdrSimulator
from mdr_connector.adapters.mdr.tokens import TokenFileStore, TokenPair
from mdr_connector.connector.cli import main
from mdr_connector.connector.cli_status import read_only_url
from mdr_connector.connector.config import load_settings
from mdr_connector.connector.store import Store

HOUR = 3600
DAY = 24 * HOUR
TIME_FORMAT = "%Y-%m-%d %H:%M UTC"


async def create_database(config: Path) -> None:
    store = await Store.open(load_settings(config).resolved_database_url())
    await store.close()


def database_path(config: Path) -> Path:
    return load_settings(config).data_dir / "mdr-connector.db"


def write_token_file(config: Path, *, access_in: int, refresh_in: int, rejected: bool = False) -> None:
    """Store a token pair whose tokens expire `access_in` and `refresh_in` seconds from now."""
    connection = load_settings(config).connections[0]
    now = int(time.time())
    pair = TokenPair(
        access_token="access-token-for-status-tests",
        refresh_token="refresh-token-for-status-tests",
        access_expires_at=now + access_in,
        refresh_expires_at=now + refresh_in,
        obtained_at=now - HOUR,
        rejected_at=now - 60 if rejected else None,
    )
    TokenFileStore(connection.mdr.token_dir, connection.mdr.client_id).save(pair)


def section(out: str) -> list[str]:
    """The indented lines under the connection name, without their indent."""
    return [line[2:] for line in out.splitlines()[1:]]


async def status(config: Path, *options: str) -> tuple[int, str, str]:
    return await run_cli("--config", str(config), "status", *options)


async def status_json(config: Path, *options: str) -> tuple[int, dict[str, Any]]:
    code, out, err = await status(config, "--json", *options)
    assert err == "", err
    return code, json.loads(out)


def test_status_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    """`status --help` names the options and the exit status."""
    with pytest.raises(SystemExit) as caught:
        main(["status", "--help"])

    help_text = " ".join(capsys.readouterr().out.split())
    assert caught.value.code == 0
    assert "--json" in help_text
    assert "--connection" in help_text
    assert "Exit status: 0 when every connection shown is healthy, 1 when a token chain is Pending activation or Expired" in help_text


async def test_status_fresh_database(activated_config: Path) -> None:
    """On an empty ledger the cursors are unset, every count is 0 and there is no last error."""
    await create_database(activated_config)

    code, out, err = await status(activated_config)

    assert code == 0, err
    assert out.splitlines()[0] == "main"
    lines = section(out)
    assert lines[:5] == [
        "MDR change cursor (mdr_history): not set, no sync cycle has run yet",
        "ticket cursor: not set, no sync cycle has run yet",
        "linked incidents: 0, pending links: 0",
        "parked items: 0",
        "last error: none",
    ]
    assert lines[5] == "token chain: Active"
    assert lines[6].startswith("access token expires:  ")
    assert lines[7].startswith("refresh token expires: ")
    assert len(lines) == 8


async def test_status_after_sync(activated_config: Path, mdr_sim: MdrSimulator, jira: RunningJira) -> None:
    """After a sync the cursors show as UTC times with their lag, and the linked incidents are counted."""
    for _ in range(3):
        mdr_sim.seed_incident(MDR_CLIENT_ID)
    code, _, err = await run_cli("--config", str(activated_config), "sync", "--once")
    assert code == 0, err

    code, out, err = await status(activated_config)
    code_json, document = await status_json(activated_config)

    assert code == 0, err
    assert code_json == 0
    [connection] = document["connections"]
    lines = section(out)
    assert lines[2] == "linked incidents: 3, pending links: 0"
    assert lines[3] == "parked items: 0"
    assert lines[4] == "last error: none"
    assert connection["linked_incidents"] == 3
    assert connection["mdr_cursor"]["name"] == "mdr_history"

    store = await Store.open(load_settings(activated_config).resolved_database_url(), upgrade=False)
    try:
        stored_mdr = await store.get_cursor("main", "mdr_history")
        stored_ticket = await store.get_cursor("main", "ticket")
    finally:
        await store.close()
    assert stored_mdr is not None and stored_ticket is not None
    mdr_time = datetime.fromtimestamp(int(stored_mdr) / 1000, tz=timezone.utc)
    ticket_time = datetime.fromisoformat(stored_ticket)
    assert connection["mdr_cursor"]["stored"] == stored_mdr
    assert datetime.fromisoformat(connection["mdr_cursor"]["time"]) == mdr_time
    assert datetime.fromisoformat(connection["ticket_cursor"]["time"]) == ticket_time

    checked_at = datetime.fromisoformat(document["checked_at"])
    assert connection["mdr_cursor"]["lag_seconds"] == max(int((checked_at - mdr_time).total_seconds()), 0)
    assert lines[0].startswith(f"MDR change cursor (mdr_history): {mdr_time.strftime(TIME_FORMAT)}, lag ")
    assert lines[0].endswith(" s")
    assert lines[1].startswith(f"ticket cursor: {ticket_time.astimezone(timezone.utc).strftime(TIME_FORMAT)}, lag ")


async def test_status_list_source_cursor(tmp_path: Path, mdr_sim: MdrSimulator, mdr_url: str, jira: RunningJira) -> None:
    """With change_source list the `mdr` cursor is the one shown."""
    config = write_config(tmp_path, mdr_url, jira)
    document = yaml.safe_load(config.read_text())
    document["connections"][0]["sync"]["change_source"] = "list"
    config.write_text(yaml.safe_dump(document))
    token_file = tmp_path / "console-token"
    token_file.write_text(mdr_sim.issue_console_token(MDR_CLIENT_ID))
    code, _, err = await run_cli("--config", str(config), "token", "activate", "--token-file", str(token_file))
    assert code == 0, err
    mdr_sim.seed_incident(MDR_CLIENT_ID)
    code, _, err = await run_cli("--config", str(config), "sync", "--once")
    assert code == 0, err

    code, out, err = await status(config)

    assert code == 0, err
    assert section(out)[0].startswith("MDR change cursor (mdr): ")
    assert ", lag " in section(out)[0]


async def test_status_parked_incident(activated_config: Path, mdr_sim: MdrSimulator) -> None:
    """A parked incident is counted, and its reason is the last error; parked items alone keep exit 0."""
    mdr_sim.seed_incident(MDR_CLIENT_ID)
    bad = mdr_sim.seed_incident(MDR_CLIENT_ID, priority=None, incident_number="seven")["incident_id"]
    code, _, err = await run_cli("--config", str(activated_config), "sync", "--once")
    assert code == 0, err

    code, out, err = await status(activated_config)
    _, document = await status_json(activated_config)

    assert code == 0, err
    lines = section(out)
    assert lines[2] == "linked incidents: 1, pending links: 0"
    assert lines[3] == "parked items: 1"
    assert lines[4].startswith("last error: ")
    assert f", incident {bad} (attempt 1, next try " in lines[4]
    assert "incident_number" in lines[4]
    [connection] = document["connections"]
    assert connection["parked_items"] == 1
    assert connection["last_error"]["kind"] == "incident"
    assert connection["last_error"]["item_id"] == bad
    assert connection["last_error"]["attempts"] == 1
    assert "incident_number" in connection["last_error"]["reason"]
    assert connection["healthy"] is True


async def test_status_refresh_token_expiring(activated_config: Path) -> None:
    """A refresh token with less than 2 days left adds a warning line and exits 1."""
    await create_database(activated_config)
    write_token_file(activated_config, access_in=-HOUR, refresh_in=DAY)

    code, out, err = await status(activated_config)
    code_json, document = await status_json(activated_config)

    assert code == 1, err
    assert code_json == 1
    lines = section(out)
    assert lines[5] == "token chain: Idle"
    warnings = [line for line in lines if line.startswith("warning: ")]
    assert len(warnings) == 1
    assert warnings[0].startswith("warning: the MDR refresh token expires in ")
    assert "run `mdr-connector sync --once`" in warnings[0]
    [connection] = document["connections"]
    assert connection["problems"] == ["refresh_token_expiring"]
    assert DAY - 120 <= connection["tokens"]["refresh_seconds_left"] <= DAY
    assert document["healthy"] is False


async def test_status_refresh_token_not_yet_expiring(activated_config: Path) -> None:
    """Just over 2 days left is still healthy, with no warning."""
    await create_database(activated_config)
    write_token_file(activated_config, access_in=-HOUR, refresh_in=2 * DAY + HOUR)

    code, out, err = await status(activated_config)

    assert code == 0, err
    assert "warning" not in out


async def test_status_refresh_token_expired(activated_config: Path) -> None:
    """An expired refresh token shows Expired with the fix, and exits 1."""
    await create_database(activated_config)
    write_token_file(activated_config, access_in=-2 * DAY, refresh_in=-HOUR)

    code, out, err = await status(activated_config)
    _, document = await status_json(activated_config)

    assert code == 1, err
    lines = section(out)
    assert lines[5] == "token chain: Expired"
    assert lines[6] == (
        f"the MDR refresh token for client {MDR_CLIENT_ID} is expired or was already used: "
        "issue a new token in the MDR console (Settings, API) and run `mdr-connector token activate`"
    )
    assert not any(line.startswith("warning: ") for line in lines)
    assert document["connections"][0]["problems"] == ["token_expired"]
    assert document["connections"][0]["tokens"]["state"] == "Expired"


async def test_status_rejected_refresh_token(activated_config: Path) -> None:
    """A refresh token that MDR rejected shows when, even though it has not expired by time."""
    await create_database(activated_config)
    write_token_file(activated_config, access_in=HOUR, refresh_in=5 * DAY, rejected=True)

    code, out, err = await status(activated_config)

    assert code == 1, err
    lines = section(out)
    assert lines[5] == "token chain: Expired"
    assert lines[6].startswith("MDR rejected the refresh token at ")


async def test_status_before_activation(tmp_path: Path, mdr_url: str, jira: RunningJira) -> None:
    """Without a token file the chain is Pending activation, with the fix, and the exit status is 1."""
    config = write_config(tmp_path, mdr_url, jira)
    await create_database(config)

    code, out, err = await status(config)
    _, document = await status_json(config)

    assert code == 1, err
    lines = section(out)
    assert lines[5] == "token chain: Pending activation"
    assert lines[6].startswith(f"no MDR token for client {MDR_CLIENT_ID} in ")
    assert len(lines) == 7
    assert document["connections"][0]["problems"] == ["token_pending_activation"]
    assert document["connections"][0]["tokens"]["refresh_expires_at"] is None


async def test_status_unreadable_token_file(activated_config: Path, tmp_path: Path) -> None:
    """A token file others can read is reported on its connection instead of stopping the command."""
    await create_database(activated_config)
    token_file = tmp_path / "tokens" / f"{MDR_CLIENT_ID}.json"
    token_file.chmod(0o644)

    code, out, err = await status(activated_config)
    _, document = await status_json(activated_config)

    assert code == 1, err
    lines = section(out)
    assert lines[5].startswith(f"token chain: unreadable: the token file {token_file} can be read or written by group or others")
    assert lines[:5][4] == "last error: none"
    assert document["connections"][0]["problems"] == ["token_file_unreadable"]
    assert "chmod 400" in document["connections"][0]["tokens"]["error"]


async def test_status_json_document(activated_config: Path) -> None:
    """`--json` prints one document with English keys and ISO times, and nothing else."""
    await create_database(activated_config)

    code, document = await status_json(activated_config)

    assert code == 0
    assert document["healthy"] is True
    assert set(document) == {"checked_at", "healthy", "connections", "cluster"}
    assert document["cluster"] is None
    [connection] = document["connections"]
    assert set(connection) == {
        "name", "healthy", "problems", "change_source", "mdr_cursor", "ticket_cursor",
        "linked_incidents", "pending_links", "parked_items", "last_error", "tokens", "lease",
    }
    assert connection["lease"] is None
    assert connection["name"] == "main"
    assert connection["problems"] == []
    assert connection["mdr_cursor"] == {"name": "mdr_history", "stored": None, "time": None, "lag_seconds": None}
    assert connection["last_error"] is None
    tokens = connection["tokens"]
    assert tokens["storage"] == "file"
    assert tokens["state"] == "Active"
    assert tokens["error"] is None
    assert datetime.fromisoformat(tokens["refresh_expires_at"]).tzinfo is not None
    assert tokens["refresh_seconds_left"] > 6 * DAY


async def test_status_connection_option(activated_config: Path, tmp_path: Path) -> None:
    """Without --connection every connection is shown; one unhealthy connection makes the exit status 1."""
    document = yaml.safe_load(activated_config.read_text())
    other = json.loads(json.dumps(document["connections"][0]))
    other["name"] = "other"
    other["mdr"]["client_id"] = "other-client"
    document["connections"].append(other)
    activated_config.write_text(yaml.safe_dump(document))
    await create_database(activated_config)

    code_all, out_all, _ = await status(activated_config)
    code_main, out_main, _ = await status(activated_config, "--connection", "main")
    code_unknown, _, err_unknown = await status(activated_config, "--connection", "absent")

    assert code_all == 1
    assert [line for line in out_all.splitlines() if not line.startswith("  ")] == ["main", "other"]
    assert "token chain: Pending activation" in out_all
    assert code_main == 0
    assert out_main.splitlines()[0] == "main"
    assert "other" not in out_main
    assert code_unknown == 1
    assert "no connection named 'absent'" in err_unknown


async def test_status_russian(activated_config: Path) -> None:
    """With --lang ru the labels, the state and the warning are in Russian."""
    await create_database(activated_config)
    write_token_file(activated_config, access_in=-HOUR, refresh_in=DAY)

    code, out, err = await run_cli("--lang", "ru", "--config", str(activated_config), "status")

    assert code == 1, err
    lines = section(out)
    assert lines[0] == "курсор изменений MDR (mdr_history): не задан, цикл синхронизации ещё не запускался"
    assert lines[2] == "связанных инцидентов: 0, ожидающих связи: 0"
    assert lines[3] == "отложенных элементов: 0"
    assert lines[4] == "последняя ошибка: нет"
    assert lines[5] == "цепочка токенов: Неактивен"
    assert any(line.startswith("предупреждение: refresh-токен MDR истекает через ") for line in lines)


async def test_status_writes_nothing(activated_config: Path, mdr_sim: MdrSimulator) -> None:
    """The database file is byte for byte the same after `status`, no token file changes, and MDR gets no call."""
    mdr_sim.seed_incident(MDR_CLIENT_ID)
    code, _, err = await run_cli("--config", str(activated_config), "sync", "--once")
    assert code == 0, err
    database = database_path(activated_config)
    token_file = load_settings(activated_config).connections[0].mdr.token_dir / f"{MDR_CLIENT_ID}.json"
    before = database.read_bytes(), token_file.read_bytes(), token_file.stat().st_mtime_ns
    calls = dict(mdr_sim.call_counts)

    code, _, err = await status(activated_config)

    assert code == 0, err
    assert (database.read_bytes(), token_file.read_bytes(), token_file.stat().st_mtime_ns) == before
    assert dict(mdr_sim.call_counts) == calls


async def test_status_missing_database(activated_config: Path) -> None:
    """Before any database exists, status names the fix and does not create the file."""
    database = database_path(activated_config)

    code, out, err = await status(activated_config)

    assert code == 1
    assert out == ""
    assert err.strip() == (
        f"mdr-connector: error: the database {database} is missing or empty; run `mdr-connector db upgrade` "
        "or a first `mdr-connector sync --once`"
    )
    assert not database.exists()


async def test_status_empty_database_file(activated_config: Path) -> None:
    """An empty database file is reported like a missing one and left empty."""
    database = database_path(activated_config)
    database.parent.mkdir(parents=True, exist_ok=True)
    database.touch()

    code, _, err = await status(activated_config)

    assert code == 1
    assert "is missing or empty; run `mdr-connector db upgrade`" in err
    assert database.read_bytes() == b""


async def test_status_schema_not_upgraded(activated_config: Path) -> None:
    """A database at an older schema is reported with the fix and not upgraded."""
    database = database_path(activated_config)
    database.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(database)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
    connection.execute("INSERT INTO alembic_version VALUES ('0001')")
    connection.commit()
    connection.close()
    before = database.read_bytes()

    code, _, err = await status(activated_config)

    assert code == 1
    assert "the database schema is at revision 0001, expected " in err
    assert "run `mdr-connector db upgrade`" in err
    assert database.read_bytes() == before


async def test_read_only_url_rejects_writes(tmp_path: Path) -> None:
    """The store that `status` opens on SQLite cannot write, even by mistake."""
    database = tmp_path / "data with space%" / "ledger.db"
    url = f"sqlite+aiosqlite:///{database}"
    writable = await Store.open(url)
    await writable.set_cursor("main", "ticket", "2026-01-01T00:00:00+00:00")
    await writable.close()

    store = Store(read_only_url(url))
    try:
        await store.check_schema(upgrade=False)
        assert await store.get_cursor("main", "ticket") == "2026-01-01T00:00:00+00:00"
        with pytest.raises(OperationalError, match="readonly database"):
            await store.set_cursor("main", "ticket", "2026-02-01T00:00:00+00:00")
    finally:
        await store.close()


def test_read_only_url_keeps_other_databases() -> None:
    """A PostgreSQL URL is used as configured."""
    url = "postgresql+asyncpg://connector@127.0.0.1:5432/ledger"

    assert read_only_url(url) == url
