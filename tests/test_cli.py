"""The `mdr-connector` command line, run as a separate process against the simulators on loopback."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml
from aiohttp import web
from fixtures_jira import RunningJira, StartJira
from fixtures_mdr import MDR_CLIENT_ID, MDR_CONNECTION_NAME
from fixtures_redmine import RedmineServer

from mdr_connector.adapters.jira.simulator import SERVICE_EMAIL, SERVICE_PAT, SERVICE_TOKEN
from mdr_connector.adapters.mdr.simulator import MdrSimulator
from mdr_connector.adapters.mdr.tokens import TokenFileStore
from mdr_connector.connector.cli import main, read_console_token
from mdr_connector.connector.config import load_settings
from mdr_connector.connector.errors import ConfigError
from mdr_connector.connector.locks import ConnectionLock
from mdr_connector.connector.runner import SHUTDOWN_GRACE_SECONDS

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


def test_missing_config_names_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A relative --config that does not exist is reported with its absolute path."""
    monkeypatch.chdir(tmp_path)

    code = main(["--config", "absent.yaml", "check", "--offline"])

    assert code == 1
    assert capsys.readouterr().err.startswith(
        f"mdr-connector: error: configuration file {tmp_path / 'absent.yaml'} not found; "
    )


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
    """Before activation the state is Pending activation, and the exit status is 1."""
    config = write_config(tmp_path, mdr_url, jira)

    code, out, _ = await run_cli("--config", str(config), "token", "status")

    assert code == 1
    assert "main: Pending activation" in out


async def test_token_status_after_rejection(activated_config: Path, mdr_sim: MdrSimulator, tmp_path: Path) -> None:
    """After MDR rejected the refresh token, status reports Expired with the reason and exits 1."""
    pair = TokenFileStore(tmp_path / "tokens", MDR_CLIENT_ID).load()
    assert pair is not None
    mdr_sim.confirm_session(MDR_CLIENT_ID, pair.refresh_token)
    mdr_sim.advance(2 * 3600)

    code, _, err = await run_cli("--config", str(activated_config), "sync", "--once")
    assert code == 1
    assert "is expired or was already used" in err

    code, out, err = await run_cli("--config", str(activated_config), "token", "status")

    assert code == 1, err
    lines = out.splitlines()
    assert lines[0] == "main: Expired"
    assert lines[1].startswith("  MDR rejected the refresh token at ")
    assert lines[1].endswith(
        ": issue a new token in the MDR console (Settings, API) and run `mdr-connector token activate`"
    )


def test_token_status_help_names_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    """`token status --help` documents which states exit 0 and which exit 1."""
    with pytest.raises(SystemExit):
        main(["token", "status", "--help"])

    help_text = " ".join(capsys.readouterr().out.split())
    assert "Exit status: 0 when every connection shown is Active or Idle, 1 when any is Pending activation or Expired." in help_text


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
    assert "mdr-connector: error: connection main is being synced by another mdr-connector process (pid " in err
    assert "main: connection main" not in err


async def test_run_stops_on_sigterm(activated_config: Path, mdr_sim: MdrSimulator, jira: RunningJira) -> None:
    """`run` keeps the connection locked while it syncs, so `sync --once` exits busy; SIGTERM then ends it with 0."""
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

        code, _, err = await run_cli("--config", str(activated_config), "sync", "--once")
        assert code == 75, err
        assert "being synced by another mdr-connector process" in err

        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()

    assert process.returncode == 0, stderr.decode()
    assert b"sync.connection.stopped" in stderr


def correlation_labels(jira: RunningJira) -> list[str]:
    """Return the sorted `mdr-<incident id>` labels of every Jira issue, so a duplicate issue shows twice."""
    labels = [label for issue in jira.sim.issues.values() for label in issue.fields["labels"]]
    return sorted(label for label in labels if label.startswith("mdr-") and label != "mdr-connector")


async def test_sigterm_mid_cycle_then_resume(
    activated_config: Path, mdr_sim: MdrSimulator, jira: RunningJira, tmp_path: Path
) -> None:
    """SIGTERM during a cycle exits 0, and `sync --once` then syncs the rest with no duplicate issue or comment."""
    document = yaml.safe_load(activated_config.read_text())
    # Two pages of four incidents per cycle leave work for the restart. With
    # no overlap, the restart continues where the stopped cycle ended. The
    # list change source makes one page one incident per item, so the
    # restart's count is exact.
    document["connections"][0]["sync"].update(
        {"page_size": 4, "max_pages_per_cycle": 2, "mdr_overlap_seconds": 0, "change_source": "list"}
    )
    activated_config.write_text(yaml.safe_dump(document))
    incidents = []
    for number in range(10):
        incident = mdr_sim.seed_incident(MDR_CLIENT_ID)
        mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident["incident_id"], f"<p>SOC note {number}</p>")
        incidents.append(incident["incident_id"])
        mdr_sim.advance(1)
    mdr_sim.settings.latency_seconds = 0.05
    jira.sim.settings.latency_seconds = 0.05

    log_path = tmp_path / "run.log"
    with log_path.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mdr_connector.connector.cli", "--config", str(activated_config), "run",
            stdout=asyncio.subprocess.DEVNULL, stderr=log_file,
            env={**os.environ, JIRA_TOKEN_VARIABLE: SERVICE_TOKEN},
        )
    try:
        for _ in range(3000):
            if jira.sim.issues or process.returncode is not None:
                break
            await asyncio.sleep(0.01)
        created_at_signal = len(jira.sim.issues)
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), SHUTDOWN_GRACE_SECONDS + 10)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    log = log_path.read_text(encoding="utf-8")
    created_at_stop = len(jira.sim.issues)

    assert process.returncode == 0, log
    assert 0 < created_at_signal < len(incidents)
    assert '"sync.cycle.finishing"' in log
    assert '"sync.connection.stopped"' in log
    assert created_at_stop < len(incidents), "the page budget left no incident for the restart"

    code, out, err = await run_cli("--config", str(activated_config), "sync", "--once")

    assert code == 0, out + err
    assert f"{len(incidents) - created_at_stop} tickets created" in out
    assert correlation_labels(jira) == sorted(f"mdr-{incident_id}" for incident_id in incidents)
    for issue in jira.sim.issues.values():
        sources = [comment.properties.get("mdr-connector", {}).get("source_id") for comment in issue.comments]
        assert len(sources) == 1, issue.key
        assert None not in sources, issue.key
    for incident_id in incidents:
        assert len(mdr_sim.comments(MDR_CLIENT_ID, incident_id)) == 1, incident_id


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
    assert "database schema is at revision 0003" in out


@pytest.mark.parametrize("system", ["jira", "servicenow"])
async def test_demo_runs(system: str) -> None:
    """The demo syncs both ways against the MDR simulator and a ticket simulator, and exits 0."""
    code, out, err = await run_cli("demo", "--incidents", "3", "--ticket-system", system, timeout=120)

    assert code == 0, out + err
    assert "tickets created:                3" in out
    assert "comments mirrored to MDR:       1" in out
    assert "check: one ticket per incident, no comment duplicated on either side" in out


async def test_demo_runs_against_real_redmine(redmine_server: RedmineServer, tmp_path: Path) -> None:
    """With a Redmine URL and keys the demo syncs against the real server; a second run adds no ticket or comment."""
    key_file = tmp_path / "redmine-key"
    key_file.write_text(redmine_server.service_key)
    person_key_file = tmp_path / "person-key"
    person_key_file.write_text(redmine_server.human_key)
    options = [
        "demo", "--incidents", "3", "--ticket-system", "redmine", "--redmine-url", redmine_server.url,
        "--redmine-key-file", str(key_file), "--redmine-person-key-file", str(person_key_file),
        "--redmine-project", redmine_server.project,
    ]

    code, out, err = await run_cli(*options, timeout=180)

    assert code == 0, out + err
    assert "comments mirrored to MDR:       1" in out
    assert "check: one ticket per incident, no comment duplicated on either side" in out


def test_demo_redmine_needs_a_server(capsys: pytest.CaptureFixture[str]) -> None:
    """The Redmine demo without a URL stops with a message naming the options to pass."""
    assert main(["demo", "--ticket-system", "redmine"]) == 1
    assert "pass --redmine-url and --redmine-key-file" in capsys.readouterr().err


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
    assert "main: подключение main" not in err


@pytest.mark.parametrize(("mode", "warned"), [(0o644, True), (0o640, True), (0o600, False)])
async def test_activate_token_file_reminders(
    tmp_path: Path, mdr_sim: MdrSimulator, mdr_url: str, jira: RunningJira, mode: int, warned: bool
) -> None:
    """A token file others can read gets a warning first; every activation from a file ends with a reminder."""
    config = write_config(tmp_path, mdr_url, jira)
    token_file = tmp_path / "console-token"
    token_file.write_text(mdr_sim.issue_console_token(MDR_CLIENT_ID))
    token_file.chmod(mode)

    code, out, err = await run_cli("--config", str(config), "token", "activate", "--token-file", str(token_file))

    assert code == 0, err
    warning = f"mdr-connector: warning: other users can read {token_file}; delete it as soon as the activation is done"
    assert (warning in err.splitlines()) is warned
    assert out.splitlines()[-1] == (
        f"delete {token_file}: its token is used up, and the connector keeps its own tokens in {tmp_path / 'tokens'}"
    )


async def test_activate_from_stdin_no_reminder(
    tmp_path: Path, mdr_sim: MdrSimulator, mdr_url: str, jira: RunningJira
) -> None:
    """A token piped to standard input leaves no file, so no reminder to delete one."""
    config = write_config(tmp_path, mdr_url, jira)

    code, out, err = await run_cli(
        "--config", str(config), "token", "activate", stdin=mdr_sim.issue_console_token(MDR_CLIENT_ID).encode()
    )

    assert code == 0, err
    assert "delete" not in out
    assert "warning" not in err


async def test_activate_json_token_file(tmp_path: Path, mdr_sim: MdrSimulator, mdr_url: str, jira: RunningJira) -> None:
    """The JSON reply of the simulator's console-token route, saved as is, fails with the fix and no token."""
    config = write_config(tmp_path, mdr_url, jira)
    token = mdr_sim.issue_console_token(MDR_CLIENT_ID)
    token_file = tmp_path / "console-token"
    token_file.write_text(json.dumps({"refresh_token": token}))
    token_file.chmod(0o600)

    code, out, err = await run_cli("--config", str(config), "token", "activate", "--token-file", str(token_file))

    assert code == 1
    assert err.strip().splitlines()[-1] == (
        "mdr-connector: error: the console token given is JSON, not the token itself: "
        "copy only the token value (the long string starting with eyJ)"
    )
    assert token not in out + err
    assert mdr_sim.confirm_calls == 0


@pytest.mark.parametrize(("mode", "warned"), [(0o644, True), (0o620, True), (0o600, False), (0o400, False)])
async def test_check_warns_on_shared_secret_file(
    tmp_path: Path, mdr_url: str, jira: RunningJira, mode: int, warned: bool
) -> None:
    """`check` shows a secret file that group or others can read or write as a [warn] line with the chmod fix."""
    secret = tmp_path / "jira-token"
    secret.write_text(SERVICE_TOKEN)
    secret.chmod(mode)
    config = write_config(tmp_path, mdr_url, jira)
    document = yaml.safe_load(config.read_text())
    document["connections"][0]["ticket"]["auth"]["token"] = {"file": str(secret)}
    config.write_text(yaml.safe_dump(document))

    code, out, err = await run_cli("--config", str(config), "check", "--offline")

    assert code == 0, err
    warning = (
        f"  [warn] main: ticket.auth.token: secret file {secret} can be read or written by group or others: "
        f"run `chmod 600 {secret}`"
    )
    assert (warning in out.splitlines()) is warned
    assert ("[warn]" in out) is warned


# Hostile input: secrets echoed by the remote side, bad arguments, files that are not files.

MDR_ECHO_PREFIX = "the access token is not valid for this client: "


def error_within(seconds: float, function, *args) -> BaseException | None:
    """Run `function(*args)` in a daemon thread and return what it raised; a read that blocks fails the test."""
    raised: list[BaseException | None] = []

    def target() -> None:
        try:
            function(*args)
            raised.append(None)
        except BaseException as err:  # noqa: BLE001 - handed to the test to inspect
            raised.append(err)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert raised, f"{function.__name__} still blocked after {seconds} s"
    return raised[0]


def edit_config(config: Path, *, jira_url: str | None = None, log_format: str | None = None) -> None:
    document = yaml.safe_load(config.read_text())
    if jira_url is not None:
        document["connections"][0]["ticket"]["url"] = jira_url
    if log_format is not None:
        document["log"]["format"] = log_format
    config.write_text(yaml.safe_dump(document))


@pytest.fixture
async def echoing_jira() -> AsyncIterator[str]:
    """A fake Jira on loopback that rejects every call and quotes the caller's API token in its error."""

    async def reject(request: web.Request) -> web.Response:
        header = request.headers.get("Authorization", "")
        credentials = base64.b64decode(header.removeprefix("Basic ")).decode() if header.startswith("Basic ") else ""
        token = credentials.partition(":")[2]
        return web.json_response({"errorMessages": [f"API token {token} is not valid"]}, status=401)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", reject)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def echo_access_token(calls: list[str]):
    """An MDR request hook that rejects every API call, quoting the access token as a careless server might."""

    def hook(method: str, request: web.Request) -> None:
        if method == "session/confirm":
            return
        calls.append(method)
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        raise web.HTTPBadRequest(
            text=json.dumps({"code": 400, "message": MDR_ECHO_PREFIX + token}), content_type="application/json"
        )

    return hook


@pytest.mark.parametrize("command", [["sync", "--once"], ["check"]], ids=["sync", "check"])
async def test_jira_echoed_token_never_printed(
    command: list[str], tmp_path: Path, mdr_sim: MdrSimulator, mdr_url: str, echoing_jira: str, jira: RunningJira
) -> None:
    """A Jira API token that Jira quotes in its error reaches no output, text or JSON logs included."""
    canary = f"jira-canary-{secrets.token_hex(8)}"
    config = write_config(tmp_path, mdr_url, jira)
    edit_config(config, jira_url=echoing_jira)
    token_file = tmp_path / "console-token"
    token_file.write_text(mdr_sim.issue_console_token(MDR_CLIENT_ID))
    code, _, err = await run_cli("--config", str(config), "token", "activate", "--token-file", str(token_file))
    assert code == 0, err

    outputs = []
    for log_format in ("json", "text"):
        edit_config(config, log_format=log_format)
        code, out, err = await run_cli(
            "--config", str(config), "--log-level", "DEBUG", *command, env={JIRA_TOKEN_VARIABLE: canary}
        )
        assert code == 1, out + err
        outputs.append(out + err)

    assert canary not in "".join(outputs)
    assert "API token [REDACTED] is not valid" in "".join(outputs)


@pytest.mark.parametrize("command", [["sync", "--once"], ["check"]], ids=["sync", "check"])
async def test_mdr_echoed_token_never_printed(
    command: list[str], activated_config: Path, mdr_sim: MdrSimulator, tmp_path: Path
) -> None:
    """An MDR access token quoted in an error, whole or cut at 200 characters, reaches no output."""
    calls: list[str] = []
    mdr_sim.request_hook = echo_access_token(calls)
    access_token = TokenFileStore(tmp_path / "tokens", MDR_CLIENT_ID).load().access_token
    # The client keeps 200 characters of an error message: the token must be cut inside it.
    assert len(MDR_ECHO_PREFIX) + len(access_token) > 200

    outputs = []
    for log_format in ("json", "text"):
        edit_config(activated_config, log_format=log_format)
        code, out, err = await run_cli("--config", str(activated_config), "--log-level", "DEBUG", *command)
        assert code != 0, out + err
        outputs.append(out + err)

    assert calls, "the hook never ran, so nothing was echoed"
    output = "".join(outputs)
    _, payload, _ = access_token.split(".")
    assert payload[:16] not in output
    assert "eyJ" not in output
    assert MDR_ECHO_PREFIX + "[REDACTED]" in output


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "soon"])
def test_wait_must_be_finite_and_not_negative(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`sync --wait` takes a finite number of seconds, 0 or more, or fails as a usage error."""
    with pytest.raises(SystemExit) as caught:
        main(["sync", "--once", f"--wait={value}"])

    assert caught.value.code == 2
    assert f"argument --wait: expected a finite number of seconds, 0 or more, got {value}" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["99999", "-1", "65536", "http"])
def test_simulate_port_range(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`simulate --port` takes 0 to 65535, or fails as a usage error."""
    with pytest.raises(SystemExit) as caught:
        main(["simulate", "mdr", f"--port={value}"])

    assert caught.value.code == 2
    assert f"argument --port: expected a port number from 0 to 65535, got {value}" in capsys.readouterr().err


@pytest.mark.parametrize("system", ["mdr", "jira"])
def test_simulate_rejects_non_loopback_host(system: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Neither simulator listens beyond loopback; 192.0.2.1 is a documentation address, so nothing leaves."""
    code = main(["simulate", system, "--host", "192.0.2.1"])

    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert lines == [
        "mdr-connector: error: the simulator serves only loopback addresses, not 192.0.2.1: its control API has no "
        "authentication; pass --host 127.0.0.1 or --host ::1"
    ]


async def simulator_banner(*args: str) -> list[str]:
    """Start `mdr-connector simulate ARGS` on a free loopback port and return what it prints before serving."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mdr_connector.connector.cli", "simulate", *args, "--port", "0",
        "--log-level", "WARNING",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "LANG": "C.UTF-8"},
    )
    assert process.stdout is not None
    lines: list[str] = []
    try:
        while not lines or lines[-1] != "Stop with Ctrl-C.":
            line = await asyncio.wait_for(process.stdout.readline(), 30)
            assert line, f"the simulator exited before serving; printed {lines}"
            lines.append(line.decode().rstrip("\n"))
    finally:
        process.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()
    return lines


async def test_simulate_mdr_prints_settings() -> None:
    """`simulate mdr` takes --client-id and --connection-name and prints the settings and the token command."""
    lines = await simulator_banner("mdr", "--client-id", "cli-client", "--connection-name", "SOC test sync")

    base_url = lines[0].removeprefix("MDR simulator running at ")
    origin = base_url.removesuffix("/api/v1")
    assert base_url.startswith("http://127.0.0.1:")
    assert base_url.endswith("/api/v1")
    assert f"  base_url: {base_url}" in lines
    assert "  client_id: cli-client" in lines
    assert "  connection_name: SOC test sync" in lines
    curl = [line for line in lines if line.startswith("  curl ")]
    assert len(curl) == 1
    assert f"-X POST {origin}/_sim/clients/cli-client/console-token | python3 -c " in curl[0]
    assert '["refresh_token"]' in curl[0]
    assert "  mdr-connector token activate --token-file console-token.txt && rm console-token.txt" in lines
    assert any("docs/simulators.md" in line for line in lines)


async def test_simulate_jira_prints_settings() -> None:
    """`simulate jira` prints the URL, the service account's credentials, the project and the human user."""
    lines = await simulator_banner("jira")

    url = lines[0].removeprefix("Jira simulator (Cloud) running at ")
    assert url.startswith("http://127.0.0.1:")
    assert f"  url: {url}" in lines
    assert f"  auth: {{type: api_token, email: {SERVICE_EMAIL}, token: {{env: JIRA_API_TOKEN}}}}" in lines
    assert f"  and set JIRA_API_TOKEN={SERVICE_TOKEN}" in lines
    assert f"  auth: {{type: pat, token: {{env: JIRA_PAT}}}} and set JIRA_PAT={SERVICE_PAT}" in lines
    assert any(line.startswith("Project key SEC ") for line in lines)
    assert any("human user analyst" in line for line in lines)
    assert any("docs/simulators.md" in line for line in lines)


def test_simulate_jira_rejects_mdr_options(capsys: pytest.CaptureFixture[str]) -> None:
    """--client-id belongs to the MDR simulator; with `simulate jira` it is an error, not ignored."""
    code = main(["simulate", "jira", "--client-id", "abc"])

    assert code == 1
    assert capsys.readouterr().err.strip() == (
        "mdr-connector: error: --client-id and --connection-name apply only to `mdr-connector simulate mdr`"
    )


@pytest.mark.parametrize("value", ["with space", "a/b", "x" * 201])
def test_simulate_client_id_checked(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--client-id takes what mdr.client_id accepts, so the printed settings load."""
    with pytest.raises(SystemExit) as caught:
        main(["simulate", "mdr", "--client-id", value])

    assert caught.value.code == 2
    assert "argument --client-id: expected at most 200 letters, digits, - and _" in capsys.readouterr().err


@pytest.mark.parametrize(("command", "subcommands"), [("token", ["activate", "status"]), ("db", ["upgrade"])])
def test_group_without_subcommand_shows_its_help(
    command: str, subcommands: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """`token` or `db` alone prints that command's help, not the top-level one, and exits 2."""
    code = main([command])

    out = capsys.readouterr().out
    assert code == 2
    assert out.startswith(f"usage: mdr-connector {command} ")
    assert all(name in out for name in subcommands)
    assert "simulate" not in out


@pytest.mark.parametrize("kind", ["fifo", "device", "directory", "large", "binary"])
def test_token_file_must_be_small_regular_text(tmp_path: Path, kind: str) -> None:
    """--token-file rejects a FIFO, a device, a folder, a file over 64 KB and binary data, each in one line."""
    path = tmp_path / "console-token"
    expected = f"cannot read {path}: not a regular file"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path.symlink_to("/dev/null")
    elif kind == "directory":
        path.mkdir()
    elif kind == "large":
        path.write_bytes(b"e" * (64 * 1024 + 1))
        expected = f"cannot read {path}: larger than 65536 bytes; is it the right file?"
    else:
        path.write_bytes(b"\xff\xfe\x00token")
        expected = f"cannot read {path}: not UTF-8 text"

    error = error_within(5, read_console_token, path)

    assert isinstance(error, ConfigError)
    assert str(error) == expected


async def test_token_file_fifo_from_cli(tmp_path: Path, mdr_url: str, jira: RunningJira) -> None:
    """`token activate --token-file FIFO` exits 1 at once with one line, instead of waiting for a writer."""
    config = write_config(tmp_path, mdr_url, jira)
    fifo = tmp_path / "console-token"
    os.mkfifo(fifo)

    code, _, err = await run_cli("--config", str(config), "token", "activate", "--token-file", str(fifo), timeout=20)

    assert code == 1
    assert err.strip().splitlines() == [f"mdr-connector: error: cannot read {fifo}: not a regular file"]


@pytest.mark.parametrize(
    ("stdin", "expected"),
    [
        (b"\xff\xfe token", "cannot read standard input: not UTF-8 text"),
        (b"e" * (64 * 1024 + 1), "standard input contains more than 65536 bytes; pipe in only the token"),
    ],
    ids=["binary", "large"],
)
async def test_token_from_stdin_limits(
    stdin: bytes, expected: str, tmp_path: Path, mdr_url: str, jira: RunningJira
) -> None:
    """A token piped to standard input must be UTF-8 text of at most 64 KB."""
    config = write_config(tmp_path, mdr_url, jira)

    code, _, err = await run_cli("--config", str(config), "token", "activate", stdin=stdin)

    assert code == 1
    assert err.strip().splitlines() == [f"mdr-connector: error: {expected}"]


async def test_token_status_with_absurd_times(tmp_path: Path, mdr_url: str, jira: RunningJira) -> None:
    """`token status` on a token file with times past the year 10000 names the fix instead of crashing."""
    config = write_config(tmp_path, mdr_url, jira)
    path = tmp_path / "tokens" / f"{MDR_CLIENT_ID}.json"
    path.write_text(json.dumps({
        "access_token": "a" * 20, "refresh_token": "r" * 20, "access_expires_at": 10**30,
        "refresh_expires_at": 10**30, "obtained_at": 1_800_000_000,
    }))
    path.chmod(0o400)

    code, _, err = await run_cli("--config", str(config), "token", "status")

    assert code == 1
    assert err.strip().splitlines() == [
        f"mdr-connector: error: the token file {path} is malformed: run `mdr-connector token activate` "
        "with a new token from the MDR console"
    ]


async def test_yaml_error_is_one_line(tmp_path: Path) -> None:
    """A YAML syntax error in the config is one line naming the file, line and column."""
    config = tmp_path / "config.yaml"
    config.write_text("connections:\n  - name: [main\n    mdr: {}\n", encoding="utf-8")

    code, _, err = await run_cli("--config", str(config), "check", "--offline")

    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"mdr-connector: error: {config}: not valid YAML at line 3, column 8: ")


def test_symlinked_lock_file_rejected(tmp_path: Path) -> None:
    """A lock file replaced by a symlink is rejected, and the file it points to is not truncated."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "locks").mkdir(mode=0o700)
    (tmp_path / "locks" / "main.lock").symlink_to(victim)

    with pytest.raises(ConfigError, match="is not a regular file: remove it"):
        ConnectionLock(tmp_path, "main").try_acquire()

    assert victim.read_text() == "keep me"


@pytest.mark.parametrize("seconds", [math.nan, math.inf, -1.0])
async def test_lock_wait_must_be_finite(tmp_path: Path, seconds: float) -> None:
    """A NaN or infinite wait would never end; the lock rejects it."""
    with pytest.raises(ValueError, match="wait_seconds must be a finite number of seconds"):
        await ConnectionLock(tmp_path, "main").acquire(seconds)


@pytest.mark.parametrize("command", [["db", "upgrade"], ["sync", "--once"], ["check"]], ids=["db", "sync", "check"])
async def test_commands_print_no_alembic_lines(command: list[str], activated_config: Path) -> None:
    """Starting a command prints nothing from alembic, at INFO or at DEBUG."""
    for level in ("INFO", "DEBUG"):
        code, out, err = await run_cli("--config", str(activated_config), "--log-level", level, *command)

        assert code == 0, out + err
        assert "alembic" not in (out + err).replace("alembic_version", "")


# Plain http:// for MDR, checked by config validation alone. No test here resolves a host name.


@pytest.fixture
def no_name_lookups(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything tries to resolve a host name."""

    def reject(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"config validation resolved the host name {args[0]!r}")

    for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex"):
        monkeypatch.setattr(socket, name, reject)


def write_mdr_config(tmp_path: Path, base_url: str) -> Path:
    """Write a config file whose only connection reaches MDR at `base_url`."""
    document = {
        "connections": [
            {
                "name": "main",
                "mdr": {
                    "base_url": base_url,
                    "client_id": MDR_CLIENT_ID,
                    "connection_name": MDR_CONNECTION_NAME,
                    "token_dir": "tokens",
                },
                "ticket": {
                    "system": "jira",
                    "url": "https://jira.example.test",
                    "auth": {"type": "api_token", "email": SERVICE_EMAIL, "token": {"env": JIRA_TOKEN_VARIABLE}},
                },
            }
        ],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "base_url",
    [
        "http://mdr.kaspersky.com/api/v1",
        "http://127.0.0.1.nip.io:8480/api/v1",
        "http://localhost.example.test/api/v1",
        "http://localhost@mdr.example.test/api/v1",
    ],
    ids=["remote", "nip-io", "localhost-subdomain", "localhost-userinfo"],
)
def test_mdr_plain_http_rejected(base_url: str, tmp_path: Path, no_name_lookups: None) -> None:
    """Plain http:// for MDR is rejected for any host that is not a loopback address or name, however local it looks."""
    config = write_mdr_config(tmp_path, base_url)

    with pytest.raises(ConfigError) as caught:
        load_settings(config)

    message = str(caught.value)
    assert message.startswith(f"{config}: connections[0].mdr.base_url: ")
    assert f"{base_url!r} must be an https:// URL" in message
    assert "plain http:// is accepted only for loopback addresses" in message


@pytest.mark.parametrize(
    "base_url",
    [
        "http://127.0.0.1:8480/api/v1",
        "http://localhost:8480/api/v1",
        "http://[::1]:8480/api/v1",
        "https://127.0.0.1.nip.io/api/v1",
    ],
    ids=["ipv4-loopback", "localhost", "ipv6-loopback", "https-any-host"],
)
def test_mdr_url_accepted(base_url: str, tmp_path: Path, no_name_lookups: None) -> None:
    """Plain http:// is accepted for loopback hosts, and https:// for any host."""
    settings = load_settings(write_mdr_config(tmp_path, base_url))

    assert settings.connections[0].mdr.base_url == base_url


async def test_options_after_token_word(tmp_path: Path, mdr_url: str, jira: RunningJira) -> None:
    """Global options also work between `token` and its subcommand."""
    config = write_config(tmp_path, mdr_url, jira)

    code, out, err = await run_cli("token", "--config", str(config), "status")

    assert code == 1, err
    assert "main: Pending activation" in out


def test_offline_check_reports_settings_the_system_lacks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`check --offline` reads the ticket system from the config, so it reports labels and a Jira visibility for Redmine."""
    mapping = yaml.safe_load((Path(__file__).resolve().parent.parent / "mappings" / "redmine.yaml").read_text(encoding="utf-8"))
    mapping["labels"] = ["mdr"]
    mapping["comments"]["visibility"] = {"type": "role", "value": "Developers"}
    mapping_path = tmp_path / "mapping.yaml"
    mapping_path.write_text(yaml.safe_dump(mapping), encoding="utf-8")
    token_dir = tmp_path / "tokens"
    token_dir.mkdir(mode=0o700)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"connections": [{
        "name": "main",
        "mdr": {"client_id": MDR_CLIENT_ID, "connection_name": MDR_CONNECTION_NAME, "token_dir": str(token_dir)},
        "ticket": {"system": "redmine", "url": "https://redmine.example.internal", "api_key": {"env": "UNUSED_REDMINE_KEY"}},
        "mapping": str(mapping_path),
    }]}), encoding="utf-8")

    code = main(["--config", str(config), "check", "--offline"])

    out = capsys.readouterr().out
    assert code == 1
    assert "  [FAILED] Redmine tickets have no labels; remove `labels` from the mapping and its routes" in out
    assert "Redmine does not support comment visibility type 'role'; use one of: internal" in out


def test_closed_pipe_stops_quietly(tmp_path: Path) -> None:
    """A reader that closes the pipe early gets no error line on stderr, and the exit code is 141."""
    script = (
        "import sys\n"
        "from mdr_connector.connector import cli\n"
        "def flood(args):\n"
        "    for number in range(200000):\n"
        "        print('line', number)\n"
        "    return 0\n"
        "cli.command_demo = flood\n"
        "sys.exit(cli.main(['demo']))\n"
    )
    reader = subprocess.Popen(["head", "-n", "1"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    writer = subprocess.run([sys.executable, "-c", script], stdout=reader.stdin, stderr=subprocess.PIPE, timeout=60)
    reader.stdin.close()
    reader.wait(timeout=10)

    assert writer.returncode == 141
    assert b"Broken pipe" not in writer.stderr
    assert writer.stderr == b""
