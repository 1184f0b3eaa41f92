"""`mdr-connector parked list|retry|drop` on a ledger parked by real syncs against the simulators."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
from datetime import datetime, timedelta, timezone
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from fixtures_jira import RunningJira
from fixtures_mdr import MDR_CLIENT_ID
from test_cli import JIRA_TOKEN_VARIABLE, activated_config, jira, run_cli  # noqa: F401 - fixtures used by name
from fixtures_postgres import scratch_database
from test_store import store  # noqa: F401 - fixture used by name

from mdr_connector.adapters.jira.simulator import SERVICE_TOKEN
from mdr_connector.adapters.mdr.simulator import MdrSimulator
from mdr_connector.connector import cli_parked
from mdr_connector.connector.cli import main
from mdr_connector.connector.cli_parked import time_until
from mdr_connector.connector.config import load_settings
from mdr_connector.connector.engine import INCIDENT
from mdr_connector.connector.store import Store
from mdr_connector.connector.ticket_requests import PARKED_REQUEST

HOUR_MS = 3600 * 1000
DETAILS = "incidents/details"
# A JWT-shaped text that the CLI redacts wherever it prints it.
CANARY_JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJwYXJrZWQifQ.c2lnbmF0dXJlLXBhcmtlZA"


@pytest.fixture
async def postgres_config(parking_config: Path) -> AsyncIterator[Path]:
    """The parking config with its ledger in a scratch PostgreSQL database (skipped without a server, failed under CI=true)."""
    async with scratch_database() as url:
        document = yaml.safe_load(parking_config.read_text())
        document["database_url"] = url
        parking_config.write_text(yaml.safe_dump(document))
        yield parking_config


@pytest.fixture
def parking_config(activated_config: Path) -> Path:
    """The activated config with a parked backoff of at least 30 minutes, so no item falls due by itself during a test."""
    document = yaml.safe_load(activated_config.read_text())
    document["connections"][0]["sync"]["retry_base_seconds"] = 3600
    activated_config.write_text(yaml.safe_dump(document))
    return activated_config


def seed_broken(mdr_sim: MdrSimulator) -> str:
    """Seed an incident whose number is not a number, dated an hour ago, and a healthy one dated now.

    The healthy incident moves the MDR change cursor to now, so the broken
    incident's change lies behind the cursor's overlap and only its parked
    entry brings it back.
    """
    an_hour_ago = mdr_sim.now_ms() - HOUR_MS
    broken = mdr_sim.seed_incident(
        MDR_CLIENT_ID, incident_number="seven", creation_time=an_hour_ago, update_time=an_hour_ago
    )["incident_id"]
    mdr_sim.seed_incident(MDR_CLIENT_ID)
    return broken


def repair_in_place(mdr_sim: MdrSimulator, incident_id: str) -> None:
    """Fix the incident's number in the simulator without a history record, so no change reader sees it."""
    mdr_sim._incidents[incident_id].record["incident_number"] = 7


async def cli(config: Path, *args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    """Run the CLI and return (exit code, stdout, stderr).

    With `stdin` it runs as a separate process, whose standard input is a
    pipe and not a terminal. Otherwise it runs in this process, because a
    Python start-up per call made this file take minutes.
    """
    argv = ["--config", str(config), *args]
    if stdin is not None:
        return await run_cli(*argv, stdin=stdin)

    stdout, stderr = io.StringIO(), io.StringIO()
    environment = {JIRA_TOKEN_VARIABLE: SERVICE_TOKEN, "LANG": "C.UTF-8"}
    with mock.patch.dict(os.environ, environment), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        os.environ.pop("MDR_CONNECTOR_LANG", None)
        try:
            code = await run_in_thread(argv)
        except SystemExit as exit_request:
            # argparse exits on a usage error, which a separate process reports as its exit status.
            code = exit_request.code if isinstance(exit_request.code, int) else 1
    return code, stdout.getvalue(), stderr.getvalue()


async def sync_once(config: Path) -> None:
    code, _, err = await cli(config, "sync", "--once")
    assert code == 0, err


async def parked_rows(config: Path) -> list[dict[str, Any]]:
    code, out, err = await cli(config, "parked", "list", "--json")
    assert code == 0, err
    return json.loads(out)["parked"]


async def park_directly(config: Path, kind: str, item_id: str, reason: str, next_try_in: timedelta) -> None:
    store = await Store.open(load_settings(config).resolved_database_url())
    try:
        await store.park("main", kind, item_id, reason, datetime.now(timezone.utc) + next_try_in)
    finally:
        await store.close()


def issues_of(jira: RunningJira, incident_id: str) -> list[Any]:
    """Return the Jira issues that carry the incident's correlation label."""
    return [issue for issue in jira.sim.issues.values() if f"mdr-{incident_id}" in issue.fields["labels"]]


def log_events(stderr: str) -> list[dict[str, Any]]:
    """Return the JSON log lines of a CLI run (the test config logs JSON)."""
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def test_kinds_match_the_engine() -> None:
    """The --kind choices are the kinds that the engine and the incident requests park."""
    assert set(cli_parked.PARKED_KINDS) == {INCIDENT, PARKED_REQUEST}


@pytest.mark.parametrize("command", ["list", "retry", "drop"])
def test_parked_commands_have_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Each `parked` command prints its help and exits 0."""
    with pytest.raises(SystemExit) as caught:
        main(["parked", command, "--help"])

    help_text = " ".join(capsys.readouterr().out.split())
    assert caught.value.code == 0
    assert "--connection" in help_text
    assert "--kind" in help_text


def test_drop_help_explains_dropping(capsys: pytest.CaptureFixture[str]) -> None:
    """`parked drop --help` explains what dropping leaves undone and how to sync the item later."""
    with pytest.raises(SystemExit):
        main(["parked", "drop", "--help"])

    help_text = " ".join(capsys.readouterr().out.split())
    assert "is not retried on a schedule any more and stays unsynced until a cycle reads a change of it" in help_text
    assert "`mdr-connector resync -- INCIDENT` syncs a dropped incident at any time" in help_text
    assert "operations.parked.dropped" in help_text


def test_retry_needs_ids_or_all(capsys: pytest.CaptureFixture[str]) -> None:
    """`parked retry` without ids and without --all, or with both, is a usage error."""
    for argv in (["parked", "retry"], ["parked", "retry", "--all", "some-id"]):
        with pytest.raises(SystemExit) as caught:
            main(argv)

        assert caught.value.code == 2
        assert "give the ids of parked items or --all, not both" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(-5, "due"), (0, "due"), (1, "in 1 min"), (299, "in 5 min"), (3600, "in 1 h 0 min"), (3 * 3600 + 61, "in 3 h 2 min"),
     (3 * 24 * 3600, "in 3 d")],
    ids=["past", "now", "one-second", "five-minutes", "one-hour", "hours-and-minutes", "days"],
)
def test_time_until(seconds: int, expected: str) -> None:
    """The next try reads as `due` once it has passed, else as the time left, rounded up to a minute."""
    now = datetime(2026, 12, 5, 4, 0, tzinfo=timezone.utc)

    assert time_until(now + timedelta(seconds=seconds), now) == expected


async def test_list_empty(parking_config: Path, mdr_sim: MdrSimulator, jira: RunningJira) -> None:
    """With nothing parked, `parked list` and `parked retry --all` print that and exit 0; --json gives an empty list."""
    mdr_sim.seed_incident(MDR_CLIENT_ID)
    await sync_once(parking_config)

    code, out, err = await cli(parking_config, "parked", "list")
    code_retry, out_retry, err_retry = await cli(parking_config, "parked", "retry", "--all")

    assert code == 0, err
    assert out == "no parked items\n"
    assert await parked_rows(parking_config) == []
    assert code_retry == 0, err_retry
    assert out_retry == "no parked items\n"


async def test_list_missing_database(parking_config: Path) -> None:
    """Without a ledger `parked list` exits 1 and names the fix, without creating the database."""
    code, out, err = await cli(parking_config, "parked", "list")

    assert code == 1
    assert out == ""
    assert "run `mdr-connector db upgrade`" in err
    assert not (load_settings(parking_config).data_dir / "mdr-connector.db").exists()


async def test_list_after_sync(parking_config: Path, mdr_sim: MdrSimulator, jira: RunningJira) -> None:
    """An incident that a real sync parked is listed with its kind, attempts, next try and reason."""
    broken = seed_broken(mdr_sim)
    await sync_once(parking_config)

    code, out, err = await cli(parking_config, "parked", "list")
    [row] = await parked_rows(parking_config)

    assert code == 0, err
    header, line = out.splitlines()
    assert header.split() == ["CONNECTION", "KIND", "ITEM", "ATTEMPTS", "NEXT", "TRY", "REASON"]
    assert line.split()[:4] == ["main", "incident", broken, "1"]
    next_try = datetime.fromisoformat(row["next_try_at"])
    assert f"{next_try.strftime('%Y-%m-%d %H:%M UTC')} (in " in line
    assert "incident_number" in line
    assert row["kind"] == "incident"
    assert row["item_id"] == broken
    assert row["attempts"] == 1
    assert row["due"] is False
    assert "incident_number" in row["reason"]
    assert next_try - datetime.fromisoformat(row["last_failed_at"]) >= timedelta(minutes=30)


async def test_kind_and_connection_filters(parking_config: Path, mdr_sim: MdrSimulator, jira: RunningJira) -> None:
    """--kind narrows `list` and `retry --all` to one kind, and an unknown --connection is an error naming it."""
    broken = seed_broken(mdr_sim)
    await sync_once(parking_config)
    await park_directly(parking_config, PARKED_REQUEST, "10001", "ticket SEC-1: RejectedError: no hosts", timedelta(hours=1))

    code_incidents, incidents, _ = await cli(parking_config, "parked", "list", "--kind", "incident", "--json")
    code_requests, requests, _ = await cli(parking_config, "parked", "list", "--kind", "incident_request", "--json")
    code_unknown, out_unknown, err_unknown = await cli(parking_config, "parked", "list", "--connection", "other")
    code_retry, out_retry, err_retry = await cli(parking_config, "parked", "retry", "--all", "--kind", "incident_request")
    rows = {row["kind"]: row for row in await parked_rows(parking_config)}

    assert code_incidents == 0
    assert [row["item_id"] for row in json.loads(incidents)["parked"]] == [broken]
    assert code_requests == 0
    assert [row["item_id"] for row in json.loads(requests)["parked"]] == ["10001"]
    assert code_unknown == 1
    assert out_unknown == ""
    assert "other" in err_unknown
    assert code_retry == 0, err_retry
    assert out_retry.splitlines()[0] == "main: incident_request 10001 is due now, after 1 failed attempts"
    assert len(out_retry.splitlines()) == 2
    assert rows["incident_request"]["due"] is True
    assert rows["incident"]["due"] is False


async def test_list_escapes_and_redacts_reason(parking_config: Path, mdr_sim: MdrSimulator, jira: RunningJira) -> None:
    """A reason with a line break, an escape sequence and a JWT prints on one line, escaped and redacted."""
    mdr_sim.seed_incident(MDR_CLIENT_ID)
    await sync_once(parking_config)
    await park_directly(
        parking_config, INCIDENT, "Hostile1", f"first line\nsecond \x1b[31mred\x1b[0m token {CANARY_JWT}", timedelta(hours=1)
    )

    code, out, err = await cli(parking_config, "parked", "list")
    [row] = await parked_rows(parking_config)

    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2
    assert lines[1].endswith("first line\\nsecond \\x1b[31mred\\x1b[0m token [REDACTED]")
    assert CANARY_JWT not in out
    assert CANARY_JWT not in row["reason"]
    assert row["reason"].endswith("token [REDACTED]")


async def test_retry_makes_item_due(parking_config: Path, mdr_sim: MdrSimulator, jira: RunningJira) -> None:
    """Without `parked retry` the next cycle leaves the item alone; after it, the next cycle retries and syncs it."""
    broken = seed_broken(mdr_sim)
    await sync_once(parking_config)
    repair_in_place(mdr_sim, broken)
    reads_before = mdr_sim.call_counts[DETAILS]

    await sync_once(parking_config)
    [waiting] = await parked_rows(parking_config)
    assert waiting["attempts"] == 1
    assert mdr_sim.call_counts[DETAILS] == reads_before
    assert issues_of(jira, broken) == []

    code, out, err = await cli(parking_config, "parked", "retry", "--", broken)
    [due] = await parked_rows(parking_config)

    assert code == 0, err
    assert out.splitlines()[0] == f"main: incident {broken} is due now, after 1 failed attempts"
    assert "parked items due now: 1." in out
    assert due["due"] is True
    assert due["attempts"] == 1
    [event] = [line for line in log_events(err) if line["event"] == "operations.parked.retry_requested"]
    assert event["item_id"] == broken
    assert event["kind"] == "incident"

    await sync_once(parking_config)

    assert await parked_rows(parking_config) == []
    assert mdr_sim.call_counts[DETAILS] > reads_before
    assert len(issues_of(jira, broken)) == 1


async def test_retry_failing_again_counts(parking_config: Path, mdr_sim: MdrSimulator, jira: RunningJira) -> None:
    """A retried item that fails again stays parked with one more attempt and a later next try."""
    broken = seed_broken(mdr_sim)
    await sync_once(parking_config)

    code, _, err = await cli(parking_config, "parked", "retry", "--all")
    assert code == 0, err
    await sync_once(parking_config)

    [row] = await parked_rows(parking_config)
    assert row["item_id"] == broken
    assert row["attempts"] == 2
    assert row["due"] is False


async def test_retry_unknown_id(parking_config: Path, mdr_sim: MdrSimulator, jira: RunningJira) -> None:
    """An id that is not parked, or not of the --kind given, is an error naming it.

    The known ids are still made due, and the exit code is 1.
    """
    broken = seed_broken(mdr_sim)
    await sync_once(parking_config)

    code_unknown, out_unknown, err_unknown = await cli(parking_config, "parked", "retry", "NoSuchItem")
    [still_waiting] = await parked_rows(parking_config)
    code_kind, _, err_kind = await cli(parking_config, "parked", "retry", "--kind", "incident_request", "--", broken)
    [other_kind] = await parked_rows(parking_config)
    code_mixed, out_mixed, err_mixed = await cli(parking_config, "parked", "retry", "NoSuchItem", "--", broken)
    [due] = await parked_rows(parking_config)

    assert code_unknown == 1
    assert out_unknown == ""
    assert "mdr-connector: error: NoSuchItem is not parked in the selected connections" in err_unknown
    assert still_waiting["due"] is False
    assert code_kind == 1
    assert f"{broken} is not parked" in err_kind
    assert other_kind["due"] is False
    assert code_mixed == 1
    assert f"main: incident {broken} is due now" in out_mixed
    assert "NoSuchItem is not parked" in err_mixed
    assert due["due"] is True


async def test_drop_stops_retries(parking_config: Path, mdr_sim: MdrSimulator, jira: RunningJira) -> None:
    """A dropped incident is gone from the list, logged, and not retried by the next cycle even once it is due."""
    broken = seed_broken(mdr_sim)
    await sync_once(parking_config)
    code, _, err = await cli(parking_config, "parked", "retry", "--", broken)
    assert code == 0, err

    code, out, err = await cli(parking_config, "parked", "drop", "--yes", "--", broken)

    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"main: incident {broken}, 1 failed attempts: ")
    assert lines[1] == f"dropped: main: incident {broken}"
    assert "A dropped incident stays unsynced until MDR or its ticket changes again" in lines[2]
    [event] = [line for line in log_events(err) if line["event"] == "operations.parked.dropped"]
    assert (event["connection"], event["kind"], event["item_id"], event["attempts"]) == ("main", "incident", broken, 1)
    assert event["user"]
    assert await parked_rows(parking_config) == []

    reads_before = mdr_sim.call_counts[DETAILS]
    await sync_once(parking_config)

    assert await parked_rows(parking_config) == []
    assert mdr_sim.call_counts[DETAILS] == reads_before
    assert issues_of(jira, broken) == []


async def test_dropped_incident_syncs_on_change(parking_config: Path, mdr_sim: MdrSimulator, jira: RunningJira) -> None:
    """After a drop, a new MDR change of the incident brings it back into the sync."""
    broken = seed_broken(mdr_sim)
    await sync_once(parking_config)
    code, _, err = await cli(parking_config, "parked", "drop", "--yes", "--", broken)
    assert code == 0, err

    mdr_sim.update_incident(MDR_CLIENT_ID, broken, incident_number=7)
    await sync_once(parking_config)

    assert await parked_rows(parking_config) == []
    assert len(issues_of(jira, broken)) == 1


async def test_drop_request_hint(parking_config: Path, mdr_sim: MdrSimulator, jira: RunningJira) -> None:
    """Dropping an incident request prints that the request label must go to stop the request."""
    mdr_sim.seed_incident(MDR_CLIENT_ID)
    await sync_once(parking_config)
    await park_directly(parking_config, PARKED_REQUEST, "10001", "ticket SEC-1: RejectedError: no hosts", timedelta(hours=1))

    code, out, err = await cli(parking_config, "parked", "drop", "--yes", "--kind", "incident_request", "10001")

    assert code == 0, err
    assert "dropped: main: incident_request 10001" in out
    assert "remove the label from the ticket to stop the request" in out
    assert "A dropped incident" not in out
    assert await parked_rows(parking_config) == []


async def test_drop_refusals_keep_entry(parking_config: Path, mdr_sim: MdrSimulator, jira: RunningJira) -> None:
    """Drop keeps the entry and exits 1 without a terminal and --yes, for an unknown id, and for an unknown connection."""
    broken = seed_broken(mdr_sim)
    await sync_once(parking_config)

    code_pipe, out_pipe, err_pipe = await cli(parking_config, "parked", "drop", "--", broken, stdin=b"y\n")
    code, out, err = await cli(parking_config, "parked", "drop", "--yes", "NoSuchItem")
    code_other, _, err_other = await cli(parking_config, "parked", "drop", "--yes", "--connection", "other", "--", broken)

    assert code_pipe == 1
    assert out_pipe.startswith(f"main: incident {broken}, 1 failed attempts: ")
    assert "needs a confirmation: pass --yes, or run the command in a terminal" in err_pipe
    assert code == 1
    assert out == ""
    assert "NoSuchItem is not parked in the selected connections" in err
    assert code_other == 1
    assert "other" in err_other
    assert [row["item_id"] for row in await parked_rows(parking_config)] == [broken]


class FakeTerminal(io.StringIO):
    """Standard input that claims to be a terminal and contains the typed answer."""

    def isatty(self) -> bool:
        return True


async def test_drop_prompt(parking_config: Path, mdr_sim: MdrSimulator, jira: RunningJira, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    """On a terminal, drop prompts first: `n` or end of input keeps the entry and exits 1, `y` drops it."""
    broken = seed_broken(mdr_sim)
    await sync_once(parking_config)
    argv = ["--config", str(parking_config), "parked", "drop", "--", broken]

    monkeypatch.setattr("sys.stdin", FakeTerminal("n\n"))
    declined = await run_in_thread(argv)
    declined_out = capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", FakeTerminal(""))
    closed = await run_in_thread(argv)
    closed_out = capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", FakeTerminal("y\n"))
    confirmed = await run_in_thread(argv)
    confirmed_out = capsys.readouterr().out

    assert declined == 1
    assert "Drop these parked entries (1)? [y/N] nothing dropped" in declined_out
    assert closed == 1
    assert "nothing dropped" in closed_out
    assert confirmed == 0
    assert f"dropped: main: incident {broken}" in confirmed_out
    assert await parked_rows(parking_config) == []


async def run_in_thread(argv: list[str]) -> int:
    """Run `main(argv)` in a worker thread, because the CLI runs an event loop of its own.

    The CLI replaces the root log handlers with one on the captured stderr,
    so pytest's handlers are put back afterwards.
    """
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        return await asyncio.to_thread(main, argv)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


async def test_russian_output(parking_config: Path, mdr_sim: MdrSimulator, jira: RunningJira) -> None:
    """--lang ru prints the table header, the relative time and the retry summary in Russian."""
    broken = seed_broken(mdr_sim)
    await sync_once(parking_config)

    code_list, listed, err_list = await cli(parking_config, "--lang", "ru", "parked", "list")
    code_retry, retried, err_retry = await cli(parking_config, "--lang", "ru", "parked", "retry", "--", broken)
    code_unknown, _, err_unknown = await cli(parking_config, "--lang", "ru", "parked", "retry", "NoSuchItem")

    assert code_list == 0, err_list
    assert listed.splitlines()[0].split()[:2] == ["ПОДКЛЮЧЕНИЕ", "ВИД"]
    assert "(через " in listed.splitlines()[1]
    assert code_retry == 0, err_retry
    assert f"main: incident {broken} назначен на сейчас, неудачных попыток: 1" in retried
    assert "отложенных элементов назначено на сейчас: 1." in retried
    assert code_unknown == 1
    assert "NoSuchItem не отложен в выбранных подключениях" in err_unknown


async def test_parked_on_postgresql(postgres_config: Path, mdr_sim: MdrSimulator, jira: RunningJira) -> None:
    """List, retry and drop work the same on a PostgreSQL ledger."""
    broken = seed_broken(mdr_sim)
    await sync_once(postgres_config)
    await park_directly(postgres_config, INCIDENT, "Other1", "RejectedError: boom", timedelta(hours=1))
    repair_in_place(mdr_sim, broken)

    listed = await parked_rows(postgres_config)
    code_retry, _, err_retry = await cli(postgres_config, "parked", "retry", "--", broken)
    await sync_once(postgres_config)
    after_retry = await parked_rows(postgres_config)
    code_drop, _, err_drop = await cli(postgres_config, "parked", "drop", "--yes", "Other1")

    assert sorted(row["item_id"] for row in listed) == sorted([broken, "Other1"])
    assert code_retry == 0, err_retry
    assert [row["item_id"] for row in after_retry] == ["Other1"]
    assert len(issues_of(jira, broken)) == 1
    assert code_drop == 0, err_drop
    assert await parked_rows(postgres_config) == []


async def test_store_find_due_drop(store: Store) -> None:  # noqa: F811 - the fixture imported from test_store
    """The store finds parked rows by connection, kind and id, makes them due and drops them, on each backend."""
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    await store.park("main", INCIDENT, "A1", "boom", later)
    await store.park("main", PARKED_REQUEST, "A1", "ticket SEC-1: boom", later)
    await store.park("main", INCIDENT, "B2", "boom", later)
    await store.park("other", INCIDENT, "A1", "boom", later)

    by_id = await store.find_parked(["main"], item_ids=["A1", "missing"])
    incidents = await store.find_parked(["main", "other"], kind=INCIDENT, item_ids=["A1"])
    everything = await store.find_parked(["main", "other"])
    now = datetime.now(timezone.utc)
    made_due = await store.make_parked_due([row.id for row in incidents], now)
    dropped = await store.drop_parked([row.id for row in by_id])
    dropped_again = await store.drop_parked([row.id for row in by_id])

    assert sorted((row.kind, row.item_id) for row in by_id) == [(INCIDENT, "A1"), (PARKED_REQUEST, "A1")]
    assert [(row.connection, row.item_id) for row in incidents] == [("main", "A1"), ("other", "A1")]
    assert len(everything) == 4
    assert [row.next_try_at for row in made_due] == [now, now]
    assert (await store.get_parked("other", INCIDENT, "A1")).next_try_at == now
    assert (await store.get_parked("main", INCIDENT, "B2")).next_try_at == later
    assert sorted((row.kind, row.item_id) for row in dropped) == [(INCIDENT, "A1"), (PARKED_REQUEST, "A1")]
    assert dropped_again == []
    assert await store.get_parked("main", INCIDENT, "A1") is None
    assert await store.get_parked("main", PARKED_REQUEST, "A1") is None
    assert await store.get_parked("other", INCIDENT, "A1") is not None
