"""The event loop that the commands run on: uvloop where it is installed, else asyncio's own.

One process serves all of a connection's requests and ledger
transactions, and on uvloop it needed about 13% less CPU time per
incident in the backlog benchmark (docs/benchmarks.md, benchmark 2). The variable
MDR_CONNECTOR_EVENT_LOOP chooses: `auto` (the default) takes uvloop when
it can be imported, `asyncio` never does, and `uvloop` requires it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from mdr_connector.connector.errors import ConfigError
from mdr_connector.connector.i18n import N_

log = logging.getLogger(__name__)

LOOP_VARIABLE = "MDR_CONNECTOR_EVENT_LOOP"
CHOICES = ("auto", "asyncio", "uvloop")

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """Return the factory of the chosen event loop, or None for asyncio's default loop.

    Raises ConfigError for an unknown choice, or for `uvloop` when uvloop cannot be imported.
    """
    choice = os.environ.get(LOOP_VARIABLE, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ConfigError.from_template(
            N_("{variable}={value!r} is not a known event loop; use one of: {choices}"),
            variable=LOOP_VARIABLE,
            value=choice,
            choices=", ".join(CHOICES),
        )
    if choice == "asyncio":
        return None

    try:
        import uvloop
    except ImportError as err:
        if choice == "uvloop":
            raise ConfigError.from_template(
                N_("{variable}=uvloop, but uvloop cannot be imported ({error}); install it or unset {variable}"),
                variable=LOOP_VARIABLE,
                error=err,
            ) from err
        return None
    return uvloop.new_event_loop


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to its end on a new loop of the chosen kind, as asyncio.run does."""
    try:
        factory = loop_factory()
    except ConfigError:
        coroutine.close()
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        log.debug("event_loop.started", extra={"loop": "asyncio" if factory is None else "uvloop"})
        return runner.run(coroutine)
