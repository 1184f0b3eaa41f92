"""The event loop the commands run on (connector/event_loop.py): uvloop by default, asyncio's own on request."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import warnings

import pytest

from mdr_connector.connector import event_loop
from mdr_connector.connector.errors import ConfigError
from mdr_connector.connector.i18n import _

uvloop = pytest.importorskip("uvloop")


async def loop_module() -> str:
    await asyncio.sleep(0)
    return type(asyncio.get_running_loop()).__module__


def test_uvloop_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(event_loop.LOOP_VARIABLE, raising=False)

    assert event_loop.run(loop_module()).startswith("uvloop")


@pytest.mark.parametrize("value", ["asyncio", " AsyncIO "])
def test_asyncio_on_request(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(event_loop.LOOP_VARIABLE, value)

    assert event_loop.loop_factory() is None
    assert event_loop.run(loop_module()) == "asyncio.unix_events"


def test_unknown_choice_names_value_and_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(event_loop.LOOP_VARIABLE, "trio")
    coroutine = loop_module()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ConfigError) as caught:
            event_loop.run(coroutine)

    assert str(caught.value) == "MDR_CONNECTOR_EVENT_LOOP='trio' is not a known event loop; use one of: auto, asyncio, uvloop"
    assert coroutine.cr_frame is None, "the coroutine must be closed, not left unawaited"


def test_missing_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)

    monkeypatch.setenv(event_loop.LOOP_VARIABLE, "auto")
    assert event_loop.loop_factory() is None

    monkeypatch.setenv(event_loop.LOOP_VARIABLE, "uvloop")
    with pytest.raises(ConfigError, match="MDR_CONNECTOR_EVENT_LOOP=uvloop, but uvloop cannot be imported"):
        event_loop.loop_factory()


def test_russian_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(event_loop.LOOP_VARIABLE, "trio")
    with pytest.raises(ConfigError) as caught:
        event_loop.loop_factory()

    from mdr_connector.connector import i18n

    i18n.set_language("ru")
    try:
        text = caught.value.localized(_)
    finally:
        i18n.set_language("en")
    assert text.startswith("MDR_CONNECTOR_EVENT_LOOP='trio': такой цикл событий неизвестен")


def test_command_refuses_unknown_loop() -> None:
    """A command exits 1 with one line naming the variable, before it does any work."""
    completed = subprocess.run(
        [sys.executable, "-m", "mdr_connector.connector.cli", "simulate", "mdr", "--port", "0"],
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", event_loop.LOOP_VARIABLE: "nope"},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert completed.returncode == 1, completed.stderr
    assert "MDR_CONNECTOR_EVENT_LOOP='nope' is not a known event loop" in completed.stderr
    assert "Traceback" not in completed.stderr
