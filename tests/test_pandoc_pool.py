"""The pool of long-lived pandoc workers: same results as one pandoc process per step, and recovery from every way a worker fails.

The worker tests run the real pandoc of pypandoc-binary. A Python script
replaces pandoc where a test needs a worker that misbehaves.
"""

from __future__ import annotations

import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mdr_connector.connector import markup, pandoc_pool

STEP_SECONDS = 20.0

# Inputs on which the Lua reader differs from the pandoc command unless the
# pool hands them over as the command does: tabs, and a pipe table with no
# line break after its last row.
SAME_AS_COMMAND = [
    ("| a | b |\n|---|---|\n| 1 | 2 |", "gfm", "jira"),
    ("| a | b |\n|---|---|\n| 1 | 2 |", "gfm", "gfm-raw_html"),
    ("a\tb\r\n\tc\r\n", "jira", "gfm"),
    ("- x\n\n\tcode\there\n", "jira", "gfm"),
    ("ab\tc\td\n    \tq", "jira", "gfm"),
    ("\ufeffa *b* [link](https://example.test/x)", "gfm", "json"),
    ("h1. Title\n\n* one\n* two\n\n{code}x = 1{code}", "jira", "gfm-raw_html"),
    ("<p>Hello <b>world</b></p><script>alert(1)</script>", "html", "gfm-raw_html"),
    ("h2. Heading\n\n*bold* _em_ \"link\":https://example.test", "textile", "gfm-raw_html"),
    ("Привет, **мир** 👋🏽 и `код`", "commonmark", "gfm-raw_html"),
    ("", "gfm", "jira"),
]


def deadline() -> float:
    return time.monotonic() + STEP_SECONDS


@pytest.fixture
def pool() -> pandoc_pool.PandocPool:
    created = pandoc_pool.PandocPool(markup._pandoc_path(), size=2)
    yield created
    created.close()


def fake_pandoc(tmp_path: Path, body: str) -> str:
    """Write an executable Python script that is called as `<script> lua <worker script>` and runs `body`."""
    script = tmp_path / "fake-pandoc"
    script.write_text(f"#!{sys.executable}\nimport sys\n{body}\n", encoding="utf-8")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def exited(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize(("text", "reader", "writer"), SAME_AS_COMMAND)
def test_pool_matches_pandoc_command(text: str, reader: str, writer: str) -> None:
    """A conversion through the pool gives exactly what the pandoc command gives."""
    by_command = markup._run_pandoc_process(text, reader, writer, deadline())

    by_pool = markup._run_pandoc(text, reader, writer, deadline())

    assert by_pool == by_command


def test_json_input_passed_unchanged() -> None:
    """Pandoc's JSON tree goes to the pool as it is: no tab expansion, no added line break."""
    tree = markup._run_pandoc("a\tb", "jira", "json", deadline())

    assert markup._run_pandoc(tree, "json", "gfm", deadline()) == markup._run_pandoc_process(tree, "json", "gfm", deadline())


def test_tabs_expanded_to_next_stop() -> None:
    assert markup._as_command_reads("a\tb") == "\ufeffa   b\n\n"
    assert markup._as_command_reads("abcd\tx\n\t\ty\n") == "\ufeffabcd    x\n        y\n\n"
    assert markup._as_command_reads("no tab\n") == "\ufeffno tab\n\n"


def test_workers_reused_between_requests(pool: pandoc_pool.PandocPool) -> None:
    """Sequential requests share one worker, so pandoc starts once."""
    for number in range(5):
        assert pool.convert(f"*{number}*".encode(), "gfm", "jira", deadline()) == f"_{number}_\n"

    assert len(pool.pids()) == 1


def test_concurrent_requests_bounded_by_size(pool: pandoc_pool.PandocPool) -> None:
    """Eight threads converting at once get correct results from at most `size` workers."""
    results: dict[tuple[int, int], str] = {}
    errors: list[BaseException] = []

    def convert_many(thread: int) -> None:
        try:
            for number in range(25):
                results[thread, number] = pool.convert(f"**t{thread} n{number}**".encode(), "gfm", "jira", deadline())
        except BaseException as err:  # noqa: BLE001  (the assertion below reports it)
            errors.append(err)

    threads = [threading.Thread(target=convert_many, args=(thread,)) for thread in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert len(results) == 200
    assert all(text == f"*t{thread} n{number}*\n" for (thread, number), text in results.items())
    assert len(pool.pids()) <= 2


def test_pandoc_error_keeps_worker(pool: pandoc_pool.PandocPool) -> None:
    """An input pandoc rejects raises PandocConversionError, and the same worker serves the next request."""
    pool.convert(b"x", "gfm", "jira", deadline())
    [pid] = pool.pids()

    with pytest.raises(pandoc_pool.PandocConversionError, match="pandoc failed"):
        pool.convert(b"{not json", "json", "gfm", deadline())

    assert pool.convert(b"*y*", "gfm", "jira", deadline()) == "_y_\n"
    assert pool.pids() == [pid]


def test_timeout_kills_worker(pool: pandoc_pool.PandocPool) -> None:
    """A request past its deadline kills its worker, and the next request gets a new one."""
    pool.convert(b"x", "gfm", "jira", deadline())
    [pid] = pool.pids()

    # About 16,000 `{` keep pandoc's Jira reader busy for seconds.
    with pytest.raises(subprocess.TimeoutExpired):
        pool.convert(b"{" * 16_000, "jira", "json", time.monotonic() + 0.3)

    assert exited(pid)
    assert pool.convert(b"*z*", "gfm", "jira", deadline()) == "_z_\n"
    assert pool.pids() != [pid]


def test_heap_limit_bounds_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker at its `-M` heap limit stays within it until the deadline kills it, and the next request gets a new worker."""
    monkeypatch.setattr(pandoc_pool, "WORKER_RTS_OPTIONS", ("-H1m", "-M4m"))
    pool = pandoc_pool.PandocPool(markup._pandoc_path(), size=1)
    try:
        pool.convert(b"x", "gfm", "jira", deadline())
        [pid] = pool.pids()

        # Near the limit pandoc collects garbage over and over rather than exit.
        with pytest.raises(subprocess.TimeoutExpired):
            pool.convert(b"<div><p>para <b>x</b></p></div>" * 30_000, "html", "json", time.monotonic() + 2)

        assert exited(pid)
        assert pool.convert(b"*after*", "gfm", "jira", deadline()) == "_after_\n"
    finally:
        pool.close()


def test_worker_killed_while_idle_replaced(pool: pandoc_pool.PandocPool) -> None:
    """A worker that died while idle is replaced within the same request."""
    pool.convert(b"x", "gfm", "jira", deadline())
    [pid] = pool.pids()
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.1)

    assert pool.convert(b"*after*", "gfm", "jira", deadline()) == "_after_\n"
    assert pid not in pool.pids()


def test_worker_replaced_after_request_limit(pool: pandoc_pool.PandocPool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that served MAX_REQUESTS_PER_WORKER requests is closed and the next request starts a new one."""
    monkeypatch.setattr(pandoc_pool, "MAX_REQUESTS_PER_WORKER", 3)
    pool.convert(b"a", "gfm", "jira", deadline())
    [first] = pool.pids()

    pool.convert(b"b", "gfm", "jira", deadline())
    pool.convert(b"c", "gfm", "jira", deadline())

    assert pool.pids() == []
    assert exited(first)
    assert pool.convert(b"d", "gfm", "jira", deadline()) == "d\n"
    assert pool.pids() != [first]


def test_close_ends_workers(pool: pandoc_pool.PandocPool) -> None:
    pool.convert(b"a", "gfm", "jira", deadline())
    [pid] = pool.pids()

    pool.close()

    assert exited(pid)
    assert pool.pids() == []


@pytest.mark.parametrize(
    ("reply", "message"),
    [(b"garbage\n", "malformed reply header"), (b"ok 1\nab", "more than one reply")],
)
def test_broken_reply_kills_worker(tmp_path: Path, reply: bytes, message: str) -> None:
    """A reply that breaks the protocol raises RuntimeError and the worker is killed, not lent again."""
    body = f"""
for line in sys.stdin.buffer:
    size = int(line.split()[2])
    sys.stdin.buffer.read(size)
    sys.stdout.buffer.write(b"ok 0\\n" if size == 0 else {reply!r})
    sys.stdout.buffer.flush()
"""
    pool = pandoc_pool.PandocPool(fake_pandoc(tmp_path, body), size=1)
    try:
        with pytest.raises(RuntimeError, match=message):
            pool.convert(b"x", "gfm", "jira", deadline())

        assert pool.pids() == []
    finally:
        pool.close()


def test_worker_exit_mid_request(tmp_path: Path) -> None:
    """A worker that exits before it replies raises RuntimeError with its exit status."""
    body = """
line = sys.stdin.buffer.readline()
sys.stdin.buffer.read(int(line.split()[2]))
sys.stdout.buffer.write(b"ok 0\\n")
sys.stdout.buffer.flush()
sys.stdin.buffer.readline()
sys.exit(3)
"""
    pool = pandoc_pool.PandocPool(fake_pandoc(tmp_path, body), size=1)
    try:
        with pytest.raises(RuntimeError, match="exited"):
            pool.convert(b"x", "gfm", "jira", deadline())
    finally:
        pool.close()


def test_pandoc_without_lua_unavailable(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A pandoc whose `lua` command fails makes the pool unavailable, logged once."""
    pool = pandoc_pool.PandocPool(fake_pandoc(tmp_path, "sys.exit(2)"), size=1)
    caplog.set_level(logging.WARNING, logger="mdr_connector.connector.pandoc_pool")

    for _ in range(2):
        with pytest.raises(pandoc_pool.PandocUnavailableError):
            pool.convert(b"x", "gfm", "jira", deadline())

    assert pool.unavailable
    assert [record.msg for record in caplog.records] == ["markup.pandoc.worker_unavailable"]


def test_slow_start_keeps_pool_available(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker too slow to start fails this step only; the pool stays available for the next one."""
    monkeypatch.setattr(pandoc_pool, "START_TIMEOUT_SECONDS", 0.3)
    body = """
import time
time.sleep(2)
"""
    pool = pandoc_pool.PandocPool(fake_pandoc(tmp_path, body), size=1)
    try:
        with pytest.raises(pandoc_pool.PandocUnavailableError):
            pool.convert(b"x", "gfm", "jira", deadline())

        assert not pool.unavailable
        assert pool.pids() == []
    finally:
        pool.close()


def test_expired_deadline_keeps_worker(pool: pandoc_pool.PandocPool) -> None:
    """A request whose deadline passed before anything was sent leaves its worker in step and in the pool."""
    pool.convert(b"x", "gfm", "jira", deadline())
    [pid] = pool.pids()

    with pytest.raises(subprocess.TimeoutExpired):
        pool.convert(b"*late*", "gfm", "jira", time.monotonic() - 1)

    assert pool.convert(b"*next*", "gfm", "jira", deadline()) == "_next_\n"
    assert pool.pids() == [pid]


def test_markup_falls_back_to_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the pool is unavailable, each step starts its own pandoc process and the conversion still succeeds."""
    broken = pandoc_pool.PandocPool(fake_pandoc(tmp_path, "sys.exit(2)"), size=1)
    monkeypatch.setattr(pandoc_pool, "shared_pool", lambda _path: broken)
    started: list[list[str]] = []
    real_run = subprocess.run

    def recording_run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[bytes]:
        started.append(command)
        return real_run(command, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(markup.subprocess, "run", recording_run)

    assert markup._run_pandoc("*fallback*", "gfm", "jira", deadline()) == "_fallback_"
    assert broken.unavailable
    assert len(started) == 1
    assert "--sandbox" in started[0]


def test_shared_pool_per_process() -> None:
    """The shared pool lists the workers of this process and starts them lazily."""
    markup.markdown_to_jira(f"a **unique** text {time.monotonic_ns()}")

    pids = pandoc_pool.worker_pids()

    assert pids
    assert all(not exited(pid) for pid in pids)
