"""The terminal progress display of long sync cycles: drawing, erasing, silence off a terminal."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fixtures_jira import RunningJira
from fixtures_mdr import MDR_CLIENT_ID
from fixtures_sync import SyncHarness
from test_cli import activated_config, jira, run_cli  # noqa: F401 - fixtures used by name

from mdr_connector.adapters.mdr.simulator import MdrSimulator
from mdr_connector.connector import i18n
from mdr_connector.connector.config import SyncSettings
from mdr_connector.connector.errors import RemoteUnavailableError
from mdr_connector.connector.progress import (
    ERASE_LINE,
    ERASE_TO_END,
    ProgressDisplay,
    progress_bar,
    progress_enabled,
)
from mdr_connector.connector.runner import run_forever, sync_once
from mdr_connector.connector.service import open_connection
from mdr_connector.connector.sync_common import SyncStats

# So long that the background refresh never runs during a unit test: the tests call refresh() themselves.
NEVER = 3600.0


class FakeTerminal(io.StringIO):
    """A text stream that reports itself as a terminal and lets a test wait until some text is written."""

    def __init__(self, terminal: bool = True) -> None:
        super().__init__()
        self.terminal = terminal
        self._watchers: list[tuple[str, asyncio.Event]] = []

    def isatty(self) -> bool:
        return self.terminal

    def write(self, text: str) -> int:
        written = super().write(text)
        for needle, event in self._watchers:
            if needle in text:
                event.set()
        return written

    async def written(self, needle: str) -> None:
        """Wait until `needle` is written; fails the test after a minute instead of hanging it."""
        if needle in self.getvalue():
            return
        event = asyncio.Event()
        self._watchers.append((needle, event))
        await asyncio.wait_for(event.wait(), 60)


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeStore:
    def __init__(self, cursors: dict[str, str] | None = None) -> None:
        self.cursors = cursors or {}

    async def get_cursor(self, connection: str, side: str) -> str | None:
        return self.cursors.get(side)


class CountingMdr:
    """An MDR client with only `count_incidents`, recording its filters."""

    def __init__(self, total: int | None = None, error: Exception | None = None) -> None:
        self.total = total
        self.error = error
        self.calls: list[dict[str, Any]] = []

    async def count_incidents(self, **filters: Any) -> int:
        self.calls.append(filters)
        if self.error is not None:
            raise self.error
        assert self.total is not None
        return self.total


def fake_sync(name: str = "main", *, change_source: str = "history", mdr: Any = None, store: Any = None, **sync: Any):
    """The attributes of a ConnectionSync that the display reads."""
    return SimpleNamespace(
        name=name,
        stats=SyncStats(),
        settings=SimpleNamespace(sync=SyncSettings(change_source=change_source, **sync)),
        mdr=mdr or SimpleNamespace(),
        store=store or FakeStore(),
        clock=lambda: datetime(2026, 1, 10, tzinfo=timezone.utc),
    )


def display_on(stream: FakeTerminal, clock: ManualClock | None = None, **options: Any) -> ProgressDisplay:
    values: dict[str, Any] = {
        "clock": clock or ManualClock(),
        "refresh_seconds": NEVER,
        "show_after_seconds": 2.0,
        "columns": 200,
        "environ": {"TERM": "xterm"},
    }
    values.update(options)
    return ProgressDisplay(stream, **values)


def see(sync: Any, count: int, created: int = 0) -> None:
    sync.stats.incidents_seen.update(f"incident-{index}" for index in range(len(sync.stats.incidents_seen), count))
    sync.stats.tickets_created = created


@pytest.mark.parametrize(
    ("terminal", "log_format", "term", "wanted"),
    [
        (True, "auto", "xterm", True),
        (True, "text", "xterm-256color", True),
        (True, "json", "xterm", False),
        (False, "auto", "xterm", False),
        (False, "text", "xterm", False),
        (True, "auto", "dumb", False),
    ],
    ids=["terminal", "text-logs", "json-logs", "pipe", "pipe-text-logs", "dumb-terminal"],
)
def test_progress_enabled_cases(terminal: bool, log_format: str, term: str, wanted: bool) -> None:
    """Drawn only on a terminal that takes ANSI sequences, and never beside JSON logs."""
    stream = FakeTerminal(terminal)

    assert progress_enabled(stream, log_format, environ={"TERM": term}) is wanted


def test_isatty_flag_overrides_stream() -> None:
    """The injected isatty flag wins over what the stream reports."""
    assert progress_enabled(FakeTerminal(False), "auto", isatty=True, environ={}) is True
    assert progress_enabled(FakeTerminal(True), "auto", isatty=False, environ={}) is False


def test_progress_bar_clamps() -> None:
    """The bar fills in proportion and stays within its width."""
    assert progress_bar(0.0, 10) == "[----------]"
    assert progress_bar(0.5, 10) == "[#####-----]"
    assert progress_bar(3.0, 10) == "[##########]"


async def test_counter_drawn_and_erased() -> None:
    """A long cycle shows its counter and rate on one line; its end erases the line."""
    terminal, clock = FakeTerminal(), ManualClock()
    sync = fake_sync()
    display = display_on(terminal, clock)

    async with display:
        async with display.cycle(sync):
            see(sync, 50, created=20)
            clock.now += 10
            display.refresh()
            drawn = terminal.getvalue()
        after_cycle = terminal.getvalue()

    assert drawn == "\rmain: 50 incidents, 20 tickets created (2.0/s)" + ERASE_TO_END
    assert after_cycle == drawn + ERASE_LINE
    assert terminal.getvalue() == after_cycle


async def test_counter_in_russian() -> None:
    """With Russian messages the line is in Russian."""
    terminal, clock = FakeTerminal(), ManualClock()
    sync = fake_sync()
    display = display_on(terminal, clock)
    i18n.set_language("ru")

    async with display:
        async with display.cycle(sync):
            see(sync, 12, created=6)
            clock.now += 3
            display.refresh()

    assert "\rmain: инцидентов: 12, создано задач: 6 (2.0/с)" + ERASE_TO_END in terminal.getvalue()


async def test_short_cycle_not_shown() -> None:
    """A cycle that has not run for the show delay draws nothing."""
    terminal, clock = FakeTerminal(), ManualClock()
    sync = fake_sync()
    display = display_on(terminal, clock)

    async with display:
        async with display.cycle(sync):
            see(sync, 5)
            clock.now += 1.5
            display.refresh()

    assert terminal.getvalue() == ""


async def test_counts_only_this_cycle() -> None:
    """Incidents and tickets of earlier cycles of `run` are not counted again."""
    terminal, clock = FakeTerminal(), ManualClock()
    sync = fake_sync()
    see(sync, 100, created=100)
    display = display_on(terminal, clock)

    async with display:
        async with display.cycle(sync):
            see(sync, 130, created=112)
            clock.now += 3
            display.refresh()

    assert "main: 30 incidents, 12 tickets created (4.0/s)" in terminal.getvalue()


async def test_redraws_only_on_change() -> None:
    """A refresh with nothing new writes nothing."""
    terminal, clock = FakeTerminal(), ManualClock()
    sync = fake_sync()
    display = display_on(terminal, clock)

    async with display:
        async with display.cycle(sync):
            see(sync, 4)
            clock.now += 4
            display.refresh()
            first = terminal.getvalue()
            display.refresh()
            again = terminal.getvalue()

    assert first == again


async def test_total_from_incident_count() -> None:
    """With change_source list, the total comes from one incidents/count over the cycle's window."""
    terminal, clock = FakeTerminal(), ManualClock()
    mdr = CountingMdr(total=40)
    store = FakeStore({"mdr": "1767000000000"})
    sync = fake_sync(change_source="list", mdr=mdr, store=store, filters={"statuses": ["Open"]})
    display = display_on(terminal, clock)

    async with display:
        async with display.cycle(sync) as progress:
            see(sync, 10, created=4)
            clock.now += 5
            display.refresh()
            assert progress.total_task is not None
            await progress.total_task
            display.refresh()
            display.refresh()

    assert mdr.calls == [{
        "min_update_time": 1767000000000 - 300_000,
        "min_creation_time": None,
        "statuses": ["Open"],
        "priorities": [],
        "tenants": [],
    }]
    assert "\rmain [#####---------------] 10/40 incidents, 4 tickets created (0.8/s)" + ERASE_TO_END in terminal.getvalue()


async def test_first_run_window_and_creation_floor() -> None:
    """Before the first cycle stored a cursor, the count starts where the engine will: the lookback."""
    terminal, clock = FakeTerminal(), ManualClock()
    mdr = CountingMdr(total=3)
    sync = fake_sync(change_source="list", mdr=mdr, mode="new_only", start={"lookback_days": 1})
    display = display_on(terminal, clock, show_after_seconds=0)

    async with display:
        async with display.cycle(sync) as progress:
            display.refresh()
            assert progress.total_task is not None
            await progress.total_task

    now_ms = int(datetime(2026, 1, 10, tzinfo=timezone.utc).timestamp() * 1000)
    assert mdr.calls[0]["min_update_time"] == now_ms - 86_400_000 - 300_000
    assert mdr.calls[0]["min_creation_time"] == now_ms


async def test_count_failure_keeps_counter() -> None:
    """When incidents/count fails, the display shows the counter without a total."""
    terminal, clock = FakeTerminal(), ManualClock()
    mdr = CountingMdr(error=RemoteUnavailableError("MDR incidents/count timed out"))
    sync = fake_sync(change_source="list", mdr=mdr)
    display = display_on(terminal, clock)

    async with display:
        async with display.cycle(sync) as progress:
            see(sync, 8)
            clock.now += 4
            display.refresh()
            assert progress.total_task is not None
            await progress.total_task
            see(sync, 9)
            display.refresh()

    assert progress.total is None
    assert "\rmain: 9 incidents, 0 tickets created (0.0/s)" in terminal.getvalue()
    assert "/" not in terminal.getvalue().replace("/s", "")


async def test_history_source_has_no_total() -> None:
    """With change_source history no count call is made."""
    mdr = CountingMdr(total=5)
    sync = fake_sync(change_source="history", mdr=mdr)
    display = display_on(FakeTerminal(), show_after_seconds=0)

    async with display:
        async with display.cycle(sync) as progress:
            display.refresh()

    assert progress.total_task is None
    assert mdr.calls == []


async def test_two_connections_share_line() -> None:
    """Cycles of several connections are shown side by side on the one line."""
    terminal, clock = FakeTerminal(), ManualClock()
    first, second = fake_sync("first"), fake_sync("second")
    display = display_on(terminal, clock)

    async with display:
        async with display.cycle(first), display.cycle(second):
            see(first, 6)
            see(second, 2)
            clock.now += 2
            display.refresh()

    assert "\rfirst: 6 incidents, 0 tickets created (0.0/s)  |  second: 2 incidents, 0 tickets created (0.0/s)" in terminal.getvalue()


async def test_line_fits_terminal_width() -> None:
    """The line is cut one column short of the width, so the terminal never wraps it."""
    terminal, clock = FakeTerminal(), ManualClock()
    sync = fake_sync("a-connection-with-a-long-name")
    display = display_on(terminal, clock, columns=30)

    async with display:
        async with display.cycle(sync):
            clock.now += 3
            display.refresh()
            drawn = terminal.getvalue()

    assert drawn == "\r" + "a-connection-with-a-long-name: 0 incidents"[:29] + ERASE_TO_END


async def test_log_lines_go_above() -> None:
    """A log line erases the progress line, is written whole, and the progress line is drawn again below it."""
    terminal, clock = FakeTerminal(), ManualClock()
    logger = logging.getLogger("test_progress.logs")
    logger.propagate = False
    handler = logging.StreamHandler(terminal)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    sync = fake_sync()
    display = display_on(terminal, clock, logger=logger)
    try:
        async with display:
            async with display.cycle(sync):
                see(sync, 3)
                clock.now += 3
                display.refresh()
                line = "main: 3 incidents, 0 tickets created (0.0/s)"
                before = len(terminal.getvalue())
                logger.info("sync.ticket.created")
                written = terminal.getvalue()[before:]
            logger.info("sync.cycle.finished")
        restored = handler.stream
    finally:
        logger.removeHandler(handler)

    assert written == ERASE_LINE + "sync.ticket.created\n" + line
    assert terminal.getvalue().endswith(ERASE_LINE + "sync.cycle.finished\n")
    assert restored is terminal


class HungUpTerminal(FakeTerminal):
    """A terminal whose writes fail with EIO, as after the terminal window was closed."""

    def write(self, text: str) -> int:
        raise OSError(5, "Input/output error")


async def test_closed_terminal_stops_display() -> None:
    """A failing terminal ends the display silently; the cycle itself goes on and ends normally."""
    terminal, clock = HungUpTerminal(), ManualClock()
    sync = fake_sync()
    display = display_on(terminal, clock)
    finished = False

    async with display:
        async with display.cycle(sync):
            see(sync, 3)
            clock.now += 3
            display.refresh()
            see(sync, 4)
            display.refresh()
            finished = True

    assert finished
    assert terminal.getvalue() == ""


async def test_silent_when_not_terminal() -> None:
    """Off a terminal the factory is passed through unchanged and nothing is ever written."""
    stream = FakeTerminal(terminal=False)
    display = ProgressDisplay(stream, refresh_seconds=0.001, show_after_seconds=0, environ={"TERM": "xterm"})

    @contextlib.asynccontextmanager
    async def factory(*args: Any) -> AsyncIterator[Any]:
        yield fake_sync()

    async with display:
        tracked = display.track(factory)
        async with tracked() as sync:
            see(sync, 10)
        display.refresh()

    assert display.enabled is False
    assert tracked is factory
    assert stream.getvalue() == ""


async def test_silent_with_injected_isatty_false() -> None:
    """A terminal stream with the isatty flag set to False gets nothing either."""
    stream = FakeTerminal(terminal=True)
    display = ProgressDisplay(stream, isatty=False, environ={"TERM": "xterm"})

    async with display:
        pass

    assert display.enabled is False
    assert stream.getvalue() == ""


# The real engine against the simulators


def tracked_factory(display: ProgressDisplay, terminal: FakeTerminal, needle: str, on_seen: Any = None):
    """open_connection, with the first ticket create held until the display drew `needle`."""

    @contextlib.asynccontextmanager
    async def factory(settings: Any, connection: Any, store: Any) -> AsyncIterator[Any]:
        async with open_connection(settings, connection, store) as sync:
            create = sync.tickets.create_ticket
            waited = False

            async def create_after_drawn(draft: Any) -> Any:
                nonlocal waited
                if not waited:
                    waited = True
                    await terminal.written(needle)
                    if on_seen is not None:
                        on_seen()
                return await create(draft)

            sync.tickets.create_ticket = create_after_drawn
            yield sync

    return display.track(factory)


async def test_sync_once_shows_total(harness: SyncHarness) -> None:
    """A `sync --once` cycle with change_source list shows seen of total incidents, then erases the line."""
    harness.use_sync(change_source="list")
    for _ in range(12):
        harness.seed()
    terminal = FakeTerminal()
    display = ProgressDisplay(terminal, refresh_seconds=0.01, show_after_seconds=0, columns=200, environ={"TERM": "xterm"})

    async with display:
        outcomes = await sync_once(
            harness.settings,
            [harness.connection],
            harness.store,
            tracked_factory(display, terminal, "/12 incidents"),
        )

    [outcome] = outcomes
    assert outcome.failure is None
    assert outcome.stats is not None and outcome.stats.tickets_created == 12
    assert len(harness.jira.sim.issues) == 12
    assert "main [####################] 12/12 incidents, " in terminal.getvalue()
    assert terminal.getvalue().endswith(ERASE_LINE)
    assert harness.mdr_sim.call_counts["incidents/count"] == 1


async def test_run_shows_counter(harness: SyncHarness) -> None:
    """A `run` cycle with change_source history shows a counter without a total; stopping erases it."""
    for _ in range(5):
        harness.seed()
    terminal = FakeTerminal()
    display = ProgressDisplay(terminal, refresh_seconds=0.01, show_after_seconds=0, columns=200, environ={"TERM": "xterm"})
    stop = asyncio.Event()

    async with display:
        outcomes = await run_forever(
            harness.settings,
            harness.store,
            tracked_factory(display, terminal, "main: 5 incidents", on_seen=stop.set),
            stop=stop,
        )

    [outcome] = outcomes
    assert outcome.failure is None
    assert len(harness.jira.sim.issues) == 5
    assert "\rmain: 5 incidents, 0 tickets created (" in terminal.getvalue()
    assert terminal.getvalue().endswith(ERASE_LINE)
    assert harness.mdr_sim.call_counts["incidents/count"] == 0


async def test_cli_sync_writes_no_progress_to_pipe(
    activated_config: Path, mdr_sim: MdrSimulator, jira: RunningJira
) -> None:
    """`sync --once` with stderr on a pipe writes no carriage return or ANSI sequence there."""
    for _ in range(3):
        mdr_sim.seed_incident(MDR_CLIENT_ID)

    code, out, err = await run_cli("--config", str(activated_config), "sync", "--once")

    assert code == 0, err
    assert "main: 3 incidents seen, 3 tickets created" in out
    assert "\r" not in err
    assert "\x1b[" not in err
