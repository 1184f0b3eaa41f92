"""A Kaspersky MDR API server for tests, the demo and `mdr-connector simulate mdr`.

It keeps its state in memory, except attachment contents, which are files
in a temporary folder that `MdrSimulator.close()` removes.

It speaks the wire protocol of the real API, quirks included:

- every method is `POST /api/v1/{client_id}/{path}` with a JSON body, which
  is parsed whatever its Content-Type header;
- lists are bare JSON arrays, counts are `{"count": n}`, and times are Unix
  epoch milliseconds;
- paging is 1-based, and `incidents/history` pages each entity type separately;
- an expired access token gets HTTP 403.

Behaviour that no public source confirms is a field of `SimulatorSettings`,
so a test can switch it.

All state lives in `MdrSimulator`, whose methods form the control API that
tests call in-process. The same control API is served as JSON under
`/_sim/` for the demo and for manual use. The simulator clock is real time
plus an offset that `advance()` moves forward; token expiry and every
timestamp come from it.

Modules: `protocol` (wire constants, JWTs, request parameters), `state`
(`MdrSimulator`), `blobs` (attachment files), `handlers` (one function per
API method), `app` (the HTTP app, control routes and `serve`) and `demo_data`.
"""

from mdr_connector.adapters.mdr.simulator.app import SIM_KEY, main, make_app, run_simulator, serve
from mdr_connector.adapters.mdr.simulator.protocol import (
    API_PREFIX,
    CONTROL_PREFIX,
    DAY,
    HOUR,
    SimError,
    encode_jwt,
    markdown_to_html,
    verify_jwt,
)
from mdr_connector.adapters.mdr.simulator.state import MdrSimulator, SimConnection, SimulatorSettings

__all__ = [
    "API_PREFIX",
    "CONTROL_PREFIX",
    "DAY",
    "HOUR",
    "SIM_KEY",
    "MdrSimulator",
    "SimConnection",
    "SimError",
    "SimulatorSettings",
    "encode_jwt",
    "main",
    "make_app",
    "markdown_to_html",
    "run_simulator",
    "serve",
    "verify_jwt",
]
