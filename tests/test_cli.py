"""The `mdr-connector` command line, run as a separate process against the simulators on loopback."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import sys
from pathlib import Path

import pytest
import yaml
from fixtures_jira import RunningJira, StartJira
from fixtures_mdr import MDR_CLIENT_ID, MDR_CONNECTION_NAME

from mdr_connector.adapters.jira.simulator import SERVICE_EMAIL, SERVICE_TOKEN
from mdr_connector.adapters.mdr.simulator import MdrSimulator
from mdr_connector.connector.cli import main
from mdr_connector.connector.locks import ConnectionLock

JIRA_TOKEN_VARIABLE = "MDR_CLI_TEST_JIRA_TOKEN"


async def run_cli(*args: str, stdin: bytes | None = None, env: dict[str, str] | None = None, timeout: float = 60):
    """Run `python -m mdr_connector.connector.cli ARGS` and return (exit code, stdout, stderr)."""
    environment = {**os.environ, JIRA_TOKEN_VARIABLE: SERVICE_TOKEN, "LANG": "C.UTF-8", **(env or {})}
    environment.pop("MDR_CONNECTOR_LANG", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mdr_connector.connector.cli", *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=environment,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(stdin), timeout)
    return process.returncode, stdout.decode(), stderr.decode()


def write_config(tmp_path: Path, mdr_url: str, jira: RunningJira, **extra) -> Path:
    token_dir = tmp_path / "tokens"
    token_dir.mkdir(mode=0o700, exist_ok=True)
    document = {
        "data_dir": str(tmp_path / "data"),
        "log": {"level": "INFO", "format": "json"},
        "connections": [
            {
                "name": "main",
                "mdr": {
                    "base_url": mdr_url,
                    "client_id": MDR_CLIENT_ID,
                    "connection_name": MDR_CONNECTION_NAME,
                    "token_dir": str(token_dir),
                },
                "ticket": {
                    "system": "jira",
                    "url": jira.url,
                    "auth": {"type": "api_token", "email": SERVICE_EMAIL, "token": {"env": JIRA_TOKEN_VARIABLE}},
                    "search_delay_seconds": 0,
                },
                "sync": {"interval_seconds": 1},
            }
        ],
        **extra,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


@pytest.fixture
async def jira(start_jira: StartJira) -> RunningJira:
    return await start_jira(deployment="cloud")


@pytest.fixture
async def activated_config(tmp_path: Path, mdr_sim: MdrSimulator, mdr_url: str, jira: RunningJira) -> Path:
    """A config whose token chain is activated through the CLI, reading the token from a file."""
    config = write_config(tmp_path, mdr_url, jira)
    token_file = tmp_path / "console-token"
    token_file.write_text(mdr_sim.issue_console_token(MDR_CLIENT_ID))

    code, out, err = await run_cli("--config", str(config), "token", "activate", "--token-file", str(token_file))

    assert code == 0, err
    assert "token activated; state Active" in out
    return config


@pytest.mark.parametrize(
    "argv",
    [[], ["run"], ["sync"], ["token"], ["token", "activate"], ["token", "status"], ["check"], ["demo"],
     ["simulate"], ["db"], ["db", "upgrade"]],
    ids=lambda argv: " ".join(argv) or "top",
)
def test_every_command_has_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Each command prints its help and exits 0."""
    with pytest.raises(SystemExit) as caught:
        main([*argv, "--help"])

    assert caught.value.code == 0
    assert "usage: mdr-connector" in capsys.readouterr().out


def test_missing_config_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing config file exits 1 with one readable line naming the file and the fix."""
    code = main(["--config", str(tmp_path / "absent.yaml"), "sync", "--once"])

    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert lines == [f"mdr-connector: error: configuration file {tmp_path / 'absent.yaml'} not found; "
                     "pass --config PATH or set MDR_CONNECTOR_CONFIG"]


def test_russian_messages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With --lang ru the error line is in Russian."""
    code = main(["--lang", "ru", "--config", str(tmp_path / "absent.yaml"), "sync"])

    assert code == 1
    assert "ошибка: файл конфигурации" in capsys.readouterr().err


async def test_activate_from_stdin_then_status(tmp_path: Path, mdr_sim: MdrSimulator, mdr_url: str, jira: RunningJira) -> None:
    """`token activate` reads the token from standard input; the file is owner read-only; status shows Active."""
    config = write_config(tmp_path, mdr_url, jira)
    token = mdr_sim.issue_console_token(MDR_CLIENT_ID)

    code, out, err = await run_cli("--config", str(config), "token", "activate", stdin=token.encode())
    assert code == 0, err
    token_file = tmp_path / "tokens" / f"{MDR_CLIENT_ID}.json"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o400
    assert token not in out + err

    code, out, _ = await run_cli("--config", str(config), "token", "status")
    assert code == 0
    assert "main: Active" in out
    assert "refresh token expires:" in out


async def test_token_status_before_activation(tmp_path: Path, mdr_url: str, jira: RunningJira) -> None:
    """Before activation the state is Pending activation."""
    config = write_config(tmp_path, mdr_url, jira)

    code, out, _ = await run_cli("--config", str(config), "token", "status")

    assert code == 0
    assert "main: Pending activation" in out


async def test_sync_once_syncs(activated_config: Path, mdr_sim: MdrSimulator, jira: RunningJira) -> None:
    """`sync --once` runs one cycle and reports what it did."""
    for _ in range(3):
        mdr_sim.seed_incident(MDR_CLIENT_ID)

    code, out, err = await run_cli("--config", str(activated_config), "sync", "--once")

    assert code == 0, err
    assert "main: 3 incidents seen, 3 tickets created" in out
    assert len(jira.sim.issues) == 3


async def test_sync_once_exits_when_busy(activated_config: Path, tmp_path: Path) -> None:
    """`sync --once` exits 75 with a clear message while another process works the connection."""
    lock = ConnectionLock(tmp_path / "data", "main")
    assert lock.try_acquire()
    try:
        code, _, err = await run_cli("--config", str(activated_config), "sync", "--once")
    finally:
        lock.release()

    assert code == 75
    assert "being synced by another mdr-connector process" in err


async def test_run_stops_on_sigterm(activated_config: Path, mdr_sim: MdrSimulator, jira: RunningJira) -> None:
    """`run` syncs until SIGTERM, then exits 0."""
    mdr_sim.seed_incident(MDR_CLIENT_ID)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mdr_connector.connector.cli", "--config", str(activated_config), "run",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, JIRA_TOKEN_VARIABLE: SERVICE_TOKEN},
    )
    try:
        for _ in range(300):
            if jira.sim.issues:
                break
            await asyncio.sleep(0.1)
        assert jira.sim.issues, "run created no issue"
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()

    assert process.returncode == 0, stderr.decode()
    assert b"sync.connection.stopped" in stderr


async def test_check_reports_both_sides(activated_config: Path) -> None:
    """`check` validates the files and reaches MDR and Jira without writing."""
    code, out, err = await run_cli("--config", str(activated_config), "check")

    assert code == 0, out + err
    assert "configuration and mapping are valid" in out
    assert "[ok] MDR token is Active" in out
    assert "[ok] Jira at" in out


async def test_check_names_wrong_priority(tmp_path: Path, mdr_url: str, jira: RunningJira) -> None:
    """`check` fails when the mapping names a priority Jira does not have."""
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text(
        "project: SEC\nissue_type: Task\ndescription: '{description}'\n"
        "priority: {HIGH: Critical, NORMAL: Medium, LOW: Low}\n",
        encoding="utf-8",
    )
    config = write_config(tmp_path, mdr_url, jira)
    document = yaml.safe_load(config.read_text())
    document["connections"][0]["mapping"] = str(mapping)
    config.write_text(yaml.safe_dump(document))

    code, out, _ = await run_cli("--config", str(config), "check")

    assert code == 1
    assert "priority 'Critical' does not exist" in out


async def test_db_upgrade(tmp_path: Path, mdr_url: str, jira: RunningJira) -> None:
    """`db upgrade` creates the schema and names the revision."""
    config = write_config(tmp_path, mdr_url, jira)

    code, out, err = await run_cli("--config", str(config), "db", "upgrade")

    assert code == 0, err
    assert "database schema is at revision 0001" in out


async def test_demo_runs() -> None:
    """The demo syncs both ways against the simulators and exits 0."""
    code, out, err = await run_cli("demo", "--incidents", "3", timeout=120)

    assert code == 0, out + err
    assert "tickets created:                3" in out
    assert "comments mirrored Jira -> MDR:  1" in out
    assert "check: one ticket per incident, no comment duplicated on either side" in out


async def test_busy_message_in_russian(activated_config: Path, tmp_path: Path) -> None:
    """The busy message follows --lang ru, placed after the command."""
    lock = ConnectionLock(tmp_path / "data", "main")
    assert lock.try_acquire()
    try:
        code, _, err = await run_cli("--config", str(activated_config), "sync", "--once", "--lang", "ru")
    finally:
        lock.release()

    assert code == 75
    assert "уже синхронизирует другой процесс mdr-connector" in err
