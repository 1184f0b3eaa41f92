"""A one-line progress display on a terminal while a sync cycle goes through many incidents.

It is for a person who watches `sync --once` or `run`, for example during
the first sync of a large backlog. It is drawn on stderr only when stderr
is a terminal and the logs there are text, so it never reaches a log
file, a pipe or a JSON log stream. A log line written while the display
is shown erases it first, and the display is drawn again below that line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType
from typing import Any, TextIO

from sqlalchemy.exc import SQLAlchemyError

from mdr_connector.connector.errors import ConnectorError
from mdr_connector.connector.i18n import _

log = logging.getLogger(__name__)

# Carriage return, then the ANSI "erase in line" sequence (CSI K): clears
# from the cursor to the end of the line.
CARRIAGE_RETURN = "\r"
ERASE_TO_END = "\x1b[K"
ERASE_LINE = CARRIAGE_RETURN + ERASE_TO_END
REFRESH_SECONDS = 0.25
# A cycle that ends sooner is never shown, so the idle cycles of `run` stay quiet.
SHOW_AFTER_SECONDS = 2.0
BAR_WIDTH = 20
DEFAULT_COLUMNS = 80
# The cursor names that engine.py stores. It has no constant for `mdr_creation_floor`.
MDR_LIST_CURSOR = "mdr"
CREATION_FLOOR_CURSOR = "mdr_creation_floor"

CountFunction = Callable[[], Awaitable[int]]
ConnectionFactory = Callable[..., AbstractAsyncContextManager[Any]]


def progress_enabled(
    stream: TextIO, log_format: str, *, isatty: bool | None = None, environ: Mapping[str, str] | None = None
) -> bool:
    """Tell whether the display may draw on `stream`.

    It needs a terminal that understands ANSI erase sequences (not
    TERM=dumb) and text logs. With `log.format: json` the stream is read by
    a program even on a terminal, so nothing else is written into it.
    """
    environ = os.environ if environ is None else environ
    terminal = stream_is_terminal(stream) if isatty is None else isatty
    if not terminal or log_format == "json":
        return False
    return environ.get("TERM", "") != "dumb"


def stream_is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        # A closed or detached stream is no terminal.
        return False


def terminal_columns(stream: TextIO) -> int:
    """Return the width of the terminal behind `stream`, or 80 when it cannot be read."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return DEFAULT_COLUMNS
    return columns or DEFAULT_COLUMNS


@dataclass
class CycleProgress:
    """One connection's running cycle as the display follows it, with counters read from the engine's stats."""

    name: str
    stats: Any
    started_at: float
    seen_at_start: int
    created_at_start: int
    # Counts the incidents of the cycle's change window, or None when no cheap count exists.
    count_total: CountFunction | None = None
    total: int | None = None
    total_task: asyncio.Task[None] | None = field(default=None, repr=False)

    def seen(self) -> int:
        return len(self.stats.incidents_seen) - self.seen_at_start

    def created(self) -> int:
        return int(self.stats.tickets_created) - self.created_at_start


async def window_counter(sync: Any) -> CountFunction | None:
    """Return a call that counts the incidents the cycle of `sync` is about to list, or None.

    Only `change_source: list` has such a count: one `incidents/count` call
    with the window and filters that the cycle's `incidents/list` calls use.
    The `incidents/history` source has no count call.
    """
    sync_settings = sync.settings.sync
    count_incidents = getattr(sync.mdr, "count_incidents", None)
    if sync_settings.change_source != "list" or count_incidents is None:
        return None

    stored = await sync.store.get_cursor(sync.name, MDR_LIST_CURSOR)
    if stored is not None:
        cursor = int(stored)
    else:
        # The same start as ConnectionSync._first_run_start, which stores it
        # only once the cycle reads its first page.
        start = sync_settings.start
        moment = start.since or sync.clock() - timedelta(days=start.lookback_days)
        cursor = int(moment.timestamp() * 1000)
    window_start = max(cursor - int(sync_settings.mdr_overlap_seconds * 1000), 0)

    min_creation_time = None
    if sync_settings.mode == "new_only":
        floor = await sync.store.get_cursor(sync.name, CREATION_FLOOR_CURSOR)
        moment = sync_settings.start.since or sync.clock()
        min_creation_time = int(floor) if floor is not None else int(moment.timestamp() * 1000)

    filters = sync_settings.filters

    async def count() -> int:
        return int(
            await count_incidents(
                min_update_time=window_start,
                min_creation_time=min_creation_time,
                statuses=filters.statuses,
                priorities=filters.priorities,
                tenants=filters.tenants,
            )
        )

    return count


def progress_bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """Render `[#####-----]` for a fraction from 0 to 1, clamping values outside that range."""
    filled = round(min(max(fraction, 0.0), 1.0) * width)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def format_rate(per_second: float) -> str:
    return f"{per_second:.1f}" if per_second < 10 else f"{per_second:.0f}"


def describe(progress: CycleProgress, now: float) -> str:
    """Render one connection's part of the line."""
    seen, created = progress.seen(), progress.created()
    elapsed = max(now - progress.started_at, 1e-6)
    # The rate follows tickets created: the engine counts an incident as seen
    # when its page is read, so seen moves in whole pages, and in a first
    # sync each incident gets a ticket.
    values = {"name": progress.name, "seen": seen, "created": created, "rate": format_rate(created / elapsed)}
    if progress.total:
        return _("{name} {bar} {seen}/{total} incidents, {created} tickets created ({rate}/s)").format(
            bar=progress_bar(seen / progress.total), total=progress.total, **values
        )
    return _("{name}: {seen} incidents, {created} tickets created ({rate}/s)").format(**values)


class LogStreamBelowProgress:
    """The stream of a log handler while the display is shown: log lines go above the progress line."""

    def __init__(self, display: ProgressDisplay, stream: TextIO) -> None:
        self._display = display
        self._stream = stream

    def write(self, text: str) -> int:
        return self._display.write_above(text)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class TrackedSync:
    """A ConnectionSync whose cycles the display follows; every other attribute is the engine's own."""

    def __init__(self, sync: Any, display: ProgressDisplay) -> None:
        self._sync = sync
        self._display = display

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sync, name)

    async def run_cycle(self) -> Any:
        async with self._display.cycle(self._sync):
            return await self._sync.run_cycle()


class ProgressDisplay:
    """Draw one line with the progress of every running cycle, refreshed by a background task.

    Use it as an async context manager around the cycles, and pass the
    connection factory through `track`. When the stream is no terminal the
    display does nothing at all: `track` returns the factory unchanged.
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        isatty: bool | None = None,
        log_format: str = "auto",
        columns: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        refresh_seconds: float = REFRESH_SECONDS,
        show_after_seconds: float = SHOW_AFTER_SECONDS,
        logger: logging.Logger | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.stream = stream
        self.enabled = progress_enabled(stream, log_format, isatty=isatty, environ=environ)
        self._columns = columns
        self._clock = clock
        self._refresh_seconds = refresh_seconds
        self._show_after_seconds = show_after_seconds
        self._logger = logger or logging.getLogger()
        self._cycles: dict[str, CycleProgress] = {}
        # The text now on the terminal's last line, or "" when nothing is drawn.
        self._line = ""
        # Log records may come from worker threads as well as the event loop.
        self._lock = threading.RLock()
        self._task: asyncio.Task[None] | None = None
        # Set when writing to the stream failed; the display then stays silent.
        self._failed = False
        self._wrapped: list[tuple[logging.StreamHandler[Any], TextIO]] = []

    @classmethod
    def on_stderr(cls, log_format: str) -> ProgressDisplay:
        """Build the CLI's display: on stderr, shown only when stderr is a terminal."""
        return cls(sys.stderr, log_format=log_format)

    # Lifecycle

    async def __aenter__(self) -> ProgressDisplay:
        if self.enabled:
            self._wrap_log_handlers()
            self._task = asyncio.create_task(self._refresh_forever(), name="progress-display")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.erase()
        self._unwrap_log_handlers()

    def track(self, factory: ConnectionFactory) -> ConnectionFactory:
        """Wrap a connection factory so each cycle of the connections it opens is shown."""
        if not self.enabled:
            return factory

        @contextlib.asynccontextmanager
        async def tracked(*args: Any) -> AsyncIterator[TrackedSync]:
            async with factory(*args) as sync:
                yield TrackedSync(sync, self)

        return tracked

    @contextlib.asynccontextmanager
    async def cycle(self, sync: Any) -> AsyncIterator[CycleProgress]:
        """Follow one cycle of `sync` while the block runs, then take it off the line."""
        stats = sync.stats
        progress = CycleProgress(
            name=sync.name,
            stats=stats,
            started_at=self._clock(),
            seen_at_start=len(stats.incidents_seen),
            created_at_start=int(stats.tickets_created),
            count_total=await self._counter(sync),
        )
        self._cycles[sync.name] = progress
        try:
            yield progress
        finally:
            self._cycles.pop(sync.name, None)
            if progress.total_task is not None:
                # The count uses the connection's MDR client, which closes after the cycle.
                progress.total_task.cancel()
            # Connections still in a cycle come back at the next refresh.
            self.erase()

    async def _counter(self, sync: Any) -> CountFunction | None:
        try:
            return await window_counter(sync)
        except (ConnectorError, SQLAlchemyError, ValueError) as err:
            # The cycle reads the same cursors and reports such an error itself.
            log.debug("progress.total_unavailable", extra={"connection": sync.name, "error": str(err)})
            return None

    # Drawing

    def refresh(self) -> None:
        """Draw every cycle that has run long enough, and start the total count of each such cycle once."""
        now = self._clock()
        visible = [
            progress for progress in self._cycles.values() if now - progress.started_at >= self._show_after_seconds
        ]
        for progress in visible:
            self._start_total(progress)
        self._draw("  |  ".join(describe(progress, now) for progress in visible))

    def erase(self) -> None:
        """Remove the progress line from the terminal, if one is drawn."""
        with self._lock:
            if not self._line:
                return
            self._line = ""
            self._write(ERASE_LINE)

    def write_above(self, text: str) -> int:
        """Write log output: erase the progress line, write `text`, then draw the line again below it.

        An error writing `text` itself goes to the caller, the log handler,
        as it would without the display.
        """
        with self._lock:
            if self._line:
                self._write(ERASE_LINE)
            written = self.stream.write(text)
            if self._line:
                if text.endswith("\n"):
                    self._write(self._line)
                else:
                    # A partial line stays as written; the next refresh draws the display again.
                    self._line = ""
            return written

    def _draw(self, text: str) -> None:
        if not text:
            self.erase()
            return
        columns = self._columns or terminal_columns(self.stream)
        # One column short of the width, so the terminal never wraps the line.
        text = text[: max(columns - 1, 1)]
        with self._lock:
            if text == self._line:
                return
            self._line = text
            self._write(CARRIAGE_RETURN + text + ERASE_TO_END)

    def _write(self, text: str) -> None:
        """Write display output; after the first failure the display writes nothing more."""
        if self._failed:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError) as err:
            # A closed or hung-up terminal must not fail the cycle, so only the display stops.
            self._failed = True
            self._line = ""
            log.debug("progress.stopped", extra={"error": str(err)})

    def _start_total(self, progress: CycleProgress) -> None:
        if progress.count_total is None or progress.total_task is not None:
            return
        progress.total_task = asyncio.create_task(self._read_total(progress), name=f"progress-total-{progress.name}")

    async def _read_total(self, progress: CycleProgress) -> None:
        assert progress.count_total is not None
        try:
            progress.total = await progress.count_total()
        except Exception as err:  # noqa: BLE001 - the display must never fail the sync it shows
            # Without a total the display shows the counter and the rate only.
            log.debug("progress.total_unavailable", extra={"connection": progress.name, "error": str(err)})

    async def _refresh_forever(self) -> None:
        while not self._failed:
            await asyncio.sleep(self._refresh_seconds)
            self.refresh()

    # Log handlers

    def _wrap_log_handlers(self) -> None:
        for handler in self._logger.handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is self.stream:
                previous = handler.setStream(LogStreamBelowProgress(self, self.stream))  # type: ignore[arg-type]
                if previous is not None:
                    self._wrapped.append((handler, previous))

    def _unwrap_log_handlers(self) -> None:
        for handler, previous in self._wrapped:
            handler.setStream(previous)
        self._wrapped.clear()
