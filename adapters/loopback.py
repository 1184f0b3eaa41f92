"""Serving the simulators: an aiohttp app on a loopback address only.

The simulators' control APIs have no authentication, so they must never
listen where another machine could reach them.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

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
