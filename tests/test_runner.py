"""The service loop: retries while a side is unreachable, stops one connection on a fatal error, logs streaks once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from mdr_connector.connector.config import Settings
from mdr_connector.connector.errors import RemoteUnavailableError, TokenExpiredError
from mdr_connector.connector.runner import (
    BACKLOG_PAUSE_SECONDS,
    FailureStreak,
    run_cycle_until_stopped,
    run_forever,
    sync_once,
)
from mdr_connector.connector.locks import ConnectionLock
from mdr_connector.connector.sync_common import SyncStats


def settings_for(tmp_path: Path, *names: str) -> Settings:
    connection = {
        "mdr": {"client_id": "c1", "connection_name": "n", "token_dir": str(tmp_path / "tokens")},
        "ticket": {
            "system": "jira",
            "url": "https://jira.example.com",
            "auth": {"type": "pat", "token": {"env": "UNUSED"}},
        },
        "sync": {"interval_seconds": 0.01},
    }
    return Settings.model_validate(
        {"data_dir": str(tmp_path), "connections": [{"name": name, **connection} for name in names]}
    )


class FakeSync:
    """A stand-in for ConnectionSync that runs scripted cycle outcomes, then sets the runner's stop event."""

    def __init__(self, settings: Any, outcomes: list[BaseException | None], stop: asyncio.Event) -> None:
        self.settings = settings
        self.name = settings.name
        self.stats = SyncStats()
        self.backlog_remaining = False
        self.outcomes = outcomes
        self.stop = stop

    async def run_cycle(self) -> SyncStats:
        self.stats.cycles += 1
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if not self.outcomes:
            self.stop.set()
        if outcome is not None:
            raise outcome
        return self.stats


def scripted_factory(open_failures: dict[str, list[BaseException]], cycles: dict[str, list], stop: asyncio.Event):
    """A connection factory whose opening fails as scripted per connection, then yields a FakeSync."""

    @contextlib.asynccontextmanager
    async def factory(settings, connection, store):
        failures = open_failures.get(connection.name, [])
        if failures:
            raise failures.pop(0)
        yield FakeSync(connection, cycles.get(connection.name, [None]), stop)

    return factory


async def test_opening_retried_until_reachable(tmp_path: Path) -> None:
    """A ticket system unreachable at start is retried; the connection then syncs."""
    stop = asyncio.Event()
    failures = {"main": [RemoteUnavailableError("connection refused"), RemoteUnavailableError("connection refused")]}

    [outcome] = await asyncio.wait_for(
        run_forever(settings_for(tmp_path, "main"), None, scripted_factory(failures, {}, stop), stop), 10
    )

    assert outcome.error is None
    assert outcome.stats is not None and outcome.stats.cycles == 1
    assert failures["main"] == []


async def test_fatal_error_stops_one_connection(tmp_path: Path) -> None:
    """An expired refresh token stops its connection; the other connection keeps syncing."""
    stop = asyncio.Event()
    failures = {"broken": [TokenExpiredError("issue a new token")]}

    outcomes = await asyncio.wait_for(
        run_forever(settings_for(tmp_path, "broken", "healthy"), None, scripted_factory(failures, {}, stop), stop), 10
    )

    by_name = {outcome.name: outcome for outcome in outcomes}
    assert by_name["broken"].error == "issue a new token"
    assert by_name["healthy"].error is None
    assert by_name["healthy"].stats.cycles == 1


async def test_failure_streak_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Three failing cycles log one error when the streak starts and one line when it ends."""
    stop = asyncio.Event()
    down = RemoteUnavailableError("MDR answered 503")
    cycles = {"main": [down, down, down, None]}

    with caplog.at_level(logging.INFO, logger="mdr_connector.connector.runner"):
        await asyncio.wait_for(
            run_forever(settings_for(tmp_path, "main"), None, scripted_factory({}, cycles, stop), stop), 10
        )

    events = [record.getMessage() for record in caplog.records]
    assert events.count("sync.cycle.failing") == 1
    assert events.count("sync.cycle.recovered") == 1


def test_failure_streak_hides_statement(caplog: pytest.LogCaptureFixture) -> None:
    """A database error starts its streak with the driver's error, not the statement and its incident data."""
    error = OperationalError(
        "UPDATE links SET mdr_status=? WHERE incident_id=?",
        ("host-finance-17", "inc-1"),
        sqlite3.OperationalError("database is locked"),
    )

    with caplog.at_level(logging.INFO, logger="mdr_connector.connector.runner"):
        FailureStreak("main").failed(error)

    [record] = [record for record in caplog.records if record.getMessage() == "sync.cycle.failing"]
    assert record.error == "OperationalError: database is locked"


async def test_sync_once_reports_busy(tmp_path: Path) -> None:
    """A held lock is reported as busy, not as a failure, so cron can tell the two apart."""
    settings = settings_for(tmp_path, "main")
    lock = ConnectionLock(settings.data_dir, "main")
    assert lock.try_acquire()
    try:
        [outcome] = await sync_once(settings, settings.connections, None, scripted_factory({}, {}, asyncio.Event()))
    finally:
        lock.release()

    assert outcome.busy
    assert "another mdr-connector process" in outcome.error


async def test_config_error_stops_connection(tmp_path: Path) -> None:
    """A config problem found while opening (a missing secret) stops that connection instead of retrying forever."""
    from mdr_connector.connector.errors import ConfigError

    stop = asyncio.Event()
    failures = {"broken": [ConfigError("environment variable JIRA_API_TOKEN is not set or empty")]}

    outcomes = await asyncio.wait_for(
        run_forever(settings_for(tmp_path, "broken", "healthy"), None, scripted_factory(failures, {}, stop), stop), 10
    )

    by_name = {outcome.name: outcome for outcome in outcomes}
    assert "JIRA_API_TOKEN" in by_name["broken"].error
    assert by_name["healthy"].stats.cycles == 1


def test_failure_outranks_busy() -> None:
    """With one connection busy and one failed, cron hears failure, not 'try later'."""
    from mdr_connector.connector.cli import sync_exit_code
    from mdr_connector.connector.errors import ConnectionBusyError, RemoteUnavailableError
    from mdr_connector.connector.runner import ConnectionOutcome

    busy = ConnectionOutcome("a", None, ConnectionBusyError("busy"))
    failed = ConnectionOutcome("b", None, RemoteUnavailableError("down"))
    fine = ConnectionOutcome("c", SyncStats())

    assert sync_exit_code([busy, failed]) == 1
    assert sync_exit_code([failed, busy]) == 1
    assert sync_exit_code([busy, fine]) == 75
    assert sync_exit_code([fine]) == 0


@pytest.mark.parametrize(("backlog", "expected"), [(True, BACKLOG_PAUSE_SECONDS), (False, 60.0)])
async def test_backlog_shortens_pause(tmp_path: Path, backlog: bool, expected: float) -> None:
    """After a cycle that left MDR changes unread the next one follows after a short pause, else after the interval."""
    connection = settings_for(tmp_path, "main").connections[0]
    settings = connection.model_copy(update={"sync": connection.sync.model_copy(update={"interval_seconds": 60.0})})
    sync = FakeSync(settings, [None, None], asyncio.Event())
    sync.backlog_remaining = backlog

    delay = await run_cycle_until_stopped(sync, asyncio.Event(), FailureStreak("main"))

    assert delay == expected
