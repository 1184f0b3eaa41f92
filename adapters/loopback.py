"""Serving the simulators: an aiohttp app on a loopback address only.

The simulators' control APIs have no authentication, so they must never
listen where another machine could reach them.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from aiohttp import web

from mdr_connector.connector.config import is_loopback_host


@contextlib.asynccontextmanager
async def serve_on_loopback(app: web.Application, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Serve `app` on a loopback host:port (0 picks a free port) and yield its root URL, such as `http://127.0.0.1:8089`."""
    if not is_loopback_host(host):
        raise ValueError(
            f"the simulator serves only loopback addresses, not {host!r}: its control API has no authentication"
        )
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
        yield f"http://{url_host}:{bound_port}"
    finally:
        await runner.cleanup()


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


async def run_until_signal(body: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run `body` with an event that SIGINT or SIGTERM sets, for `mdr-connector simulate`; restore the handlers after."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    try:
        await body(stop)
    finally:
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)


async def write_file_body(
    request: web.Request, response: web.StreamResponse, path: Path, cut_bytes: int, chunk_bytes: int
) -> bool:
    """Write a prepared response's body from `path`; with `cut_bytes` set, stop there and drop the connection.

    Returns True when the body was cut, so the caller can log the fault.
    """
    sent = 0
    with path.open("rb") as file:
        while chunk := file.read(chunk_bytes):
            if cut_bytes and sent + len(chunk) >= cut_bytes:
                await response.write(chunk[: cut_bytes - sent])
                if request.transport is not None:
                    request.transport.close()
                return True
            await response.write(chunk)
            sent += len(chunk)
    await response.write_eof()
    return False
