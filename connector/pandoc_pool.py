"""A pool of long-lived pandoc processes, so a conversion does not pay for starting pandoc.

Starting pandoc took about 4 ms of CPU time on the benchmark machine, most
of a short conversion, and a new incident needs about 14 conversion steps. Each worker runs
`pandoc lua pandoc_worker.lua` and converts one text at a time over its
stdin and stdout (the protocol is described in the Lua file). The pool
starts at most `size` workers, one per CPU by default, and lends each to
one thread at a time.

A request that runs past its deadline kills its worker, and a new one
starts at the next request, so a pathological input costs no more than it
did with one process per step. A worker is replaced after
MAX_REQUESTS_PER_WORKER conversions to bound the growth of its heap.

When no worker can start (a pandoc without the `lua` command, say), the
pool reports itself unavailable once and callers start one pandoc process
per step as before.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import queue
import selectors
import subprocess
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

WORKER_SCRIPT = Path(__file__).with_name("pandoc_worker.lua")
MAX_REQUESTS_PER_WORKER = 2000
START_TIMEOUT_SECONDS = 10.0
READ_CHUNK_BYTES = 256 * 1024
# The pandoc of pypandoc-binary is built with `-H64m`, a 64 MB allocation
# area that a long-lived worker keeps: about 80 MB resident each. With 8 MB
# it kept about 20 MB and was no slower on 3,000 conversions (measured on the
# benchmark machine). `-M1g` keeps a worker's heap under 1 GiB: near that
# limit pandoc collects garbage over and over, until the deadline kills it.
WORKER_RTS_OPTIONS = ("-H8m", "-M1g")


class PandocUnavailableError(RuntimeError):
    """No pandoc worker could start; the caller runs pandoc once per step instead."""


class PandocConversionError(RuntimeError):
    """Pandoc reported an error for one input; the worker stays usable."""


class _Worker:
    """One `pandoc lua` process and the exchange of one request with it."""

    def __init__(self, pandoc_path: str) -> None:
        self.process = subprocess.Popen(
            [pandoc_path, "+RTS", *WORKER_RTS_OPTIONS, "-RTS", "lua", str(WORKER_SCRIPT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.served = 0
        # True from the first byte of a request to the end of its reply.
        self.in_step = False
        assert self.process.stdin is not None and self.process.stdout is not None
        self._stdin = self.process.stdin.fileno()
        self._stdout = self.process.stdout.fileno()
        os.set_blocking(self._stdin, False)
        os.set_blocking(self._stdout, False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def convert(self, text: bytes, reader: str, writer: str, deadline: float) -> str:
        """Send one request and return the converted text.

        Raises PandocConversionError when pandoc rejects the input,
        subprocess.TimeoutExpired at the deadline, and RuntimeError when the
        worker breaks off. After the last two, the caller kills the worker
        unless `in_step` is False: then no byte of the request was sent.
        """
        if deadline <= time.monotonic():
            raise subprocess.TimeoutExpired(self.process.args, timeout=0)
        request = f"{reader} {writer} {len(text)}\n".encode("ascii") + text
        self.in_step = True
        status, body = self._exchange(request, deadline)
        self.in_step = False
        self.served += 1

        if status == b"error":
            raise PandocConversionError(f"pandoc failed: {body[:200].decode('utf-8', 'replace')}")
        return body.decode("utf-8")

    def _exchange(self, request: bytes, deadline: float) -> tuple[bytes, bytes]:
        # Writing and reading share one loop, so a worker that replies early
        # (a malformed request) cannot leave both sides waiting on full pipes.
        pending = memoryview(request)
        received = bytearray()
        with selectors.DefaultSelector() as selector:
            selector.register(self._stdout, selectors.EVENT_READ)
            if pending:
                selector.register(self._stdin, selectors.EVENT_WRITE)
            while True:
                reply = _complete_reply(received)
                if reply is not None:
                    return reply

                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    raise subprocess.TimeoutExpired(self.process.args, timeout=0)
                for key, _ in selector.select(timeout):
                    if key.fd == self._stdin:
                        try:
                            written = os.write(self._stdin, pending[:READ_CHUNK_BYTES])
                        except BrokenPipeError as err:
                            raise RuntimeError("the pandoc worker closed its input") from err
                        pending = pending[written:]
                        if not pending:
                            selector.unregister(self._stdin)
                        continue

                    chunk = os.read(self._stdout, READ_CHUNK_BYTES)
                    if not chunk:
                        raise RuntimeError(f"the pandoc worker exited with status {self.process.poll()}")
                    received += chunk

    def close(self) -> None:
        """End the worker: close its input, which ends its loop, and kill it if it does not exit at once."""
        with contextlib.suppress(OSError):
            self.process.stdin.close()  # type: ignore[union-attr]
        try:
            self.process.wait(timeout=1)
        except subprocess.TimeoutExpired:
            self.kill()
        with contextlib.suppress(OSError):
            self.process.stdout.close()  # type: ignore[union-attr]

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.process.kill()
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        for stream in (self.process.stdin, self.process.stdout):
            with contextlib.suppress(OSError):
                stream.close()  # type: ignore[union-attr]


def _complete_reply(received: bytearray) -> tuple[bytes, bytes] | None:
    """Return the status and body once `received` contains a whole reply, else None."""
    end_of_header = received.find(b"\n")
    if end_of_header < 0:
        return None
    status, _, size = bytes(received[:end_of_header]).partition(b" ")
    if status not in (b"ok", b"error") or not size.isdigit():
        raise RuntimeError(f"the pandoc worker sent a malformed reply header: {bytes(received[:80])!r}")
    body_start = end_of_header + 1
    body_end = body_start + int(size)
    if len(received) < body_end:
        return None
    if len(received) > body_end:
        raise RuntimeError("the pandoc worker sent more than one reply")
    return status, bytes(received[body_start:body_end])


class PandocPool:
    """Lend pandoc workers to threads, one request at a time each."""

    def __init__(self, pandoc_path: str, size: int) -> None:
        self._pandoc_path = pandoc_path
        self._idle: queue.LifoQueue[_Worker] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._workers: set[_Worker] = set()
        self._owner_pid = os.getpid()
        self.unavailable = False

    def convert(self, text: bytes, reader: str, writer: str, deadline: float) -> str:
        """Convert `text` with an idle or new worker before `deadline`.

        Raises PandocUnavailableError when no worker can start, and otherwise
        what `_Worker.convert` raises.
        """
        if not self._slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise subprocess.TimeoutExpired(["pandoc", "lua"], timeout=0)
        try:
            worker, reused = self._take()
            try:
                result = self._convert_with(worker, text, reader, writer, deadline)
            except RuntimeError as err:
                if isinstance(err, PandocConversionError) or not reused:
                    raise
                # A worker can die while idle (killed from outside, say): one more try with a new one.
                worker, _ = self._take(new=True)
                result = self._convert_with(worker, text, reader, writer, deadline)
            self._give_back(worker)
            return result
        finally:
            self._slots.release()

    def _convert_with(self, worker: _Worker, text: bytes, reader: str, writer: str, deadline: float) -> str:
        """Convert with `worker`; kill it after a failure in the middle of a step, otherwise lend it again."""
        try:
            return worker.convert(text, reader, writer, deadline)
        except PandocConversionError:
            self._give_back(worker)
            raise
        except BaseException:
            if worker.in_step:
                self._discard(worker, kill=True)
            else:
                self._give_back(worker)
            raise

    def pids(self) -> list[int]:
        """Return the process ids of the live workers, for measurements."""
        with self._lock:
            return [worker.pid for worker in self._workers]

    def close(self) -> None:
        """End every worker. A later request starts a new one.

        The idle queue is emptied too, because a closed worker's file
        descriptors may already belong to another file, which a request
        would then write to.
        NOTE: a request in flight on another thread during close still uses
        the descriptors that close closes.
        """
        with self._lock:
            workers = list(self._workers)
            self._workers.clear()
            while True:
                try:
                    self._idle.get_nowait()
                except queue.Empty:
                    break
        for worker in workers:
            worker.close()

    def _take(self, *, new: bool = False) -> tuple[_Worker, bool]:
        """Return an idle worker or a new one, and whether it served before."""
        if not new:
            with contextlib.suppress(queue.Empty):
                return self._idle.get_nowait(), True
        return self._start(), False

    def _start(self) -> _Worker:
        if self.unavailable:
            raise PandocUnavailableError("no pandoc worker could start")
        try:
            worker = _Worker(self._pandoc_path)
        except OSError as err:
            self._mark_unavailable(err)
            raise PandocUnavailableError(str(err)) from err

        # An empty conversion proves that this pandoc has the `lua` command and reads the script.
        try:
            worker.convert(b"", "gfm", "json", time.monotonic() + START_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired as err:
            # A start this slow means a busy machine, not a pandoc without `lua`:
            # this step runs in a pandoc process of its own, and the next one tries a worker again.
            worker.kill()
            log.info("markup.pandoc.worker_slow_start", extra={"seconds": START_TIMEOUT_SECONDS})
            raise PandocUnavailableError(str(err)) from err
        except (RuntimeError, OSError) as err:
            worker.kill()
            self._mark_unavailable(err)
            raise PandocUnavailableError(str(err)) from err
        worker.served = 0

        with self._lock:
            self._workers.add(worker)
        log.debug("markup.pandoc.worker_started", extra={"pid": worker.pid})
        return worker

    def _give_back(self, worker: _Worker) -> None:
        if worker.served >= MAX_REQUESTS_PER_WORKER:
            self._discard(worker, kill=False)
            return
        self._idle.put(worker)

    def _discard(self, worker: _Worker, *, kill: bool) -> None:
        with self._lock:
            self._workers.discard(worker)
        if kill:
            worker.kill()
        else:
            worker.close()

    def _mark_unavailable(self, err: BaseException) -> None:
        if not self.unavailable:
            log.warning("markup.pandoc.worker_unavailable", extra={"error_type": type(err).__name__, "error": str(err)[:200]})
        self.unavailable = True


_pool: PandocPool | None = None
_pool_lock = threading.Lock()


def shared_pool(pandoc_path: str) -> PandocPool:
    """Return this process's pool, made at the first call; a forked child makes its own."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool._owner_pid != os.getpid():
            _pool = PandocPool(pandoc_path, size=max(1, min(os.cpu_count() or 1, 8)))
        return _pool


def worker_pids() -> list[int]:
    """Return the process ids of this process's live pandoc workers."""
    pool = _pool
    if pool is None or pool._owner_pid != os.getpid():
        return []
    return pool.pids()


@atexit.register
def _close_shared_pool() -> None:
    pool = _pool
    if pool is not None and pool._owner_pid == os.getpid():
        pool.close()
