"""A token refresh killed with SIGKILL at each of its steps, and a session/confirm reply lost on the wire.

Each kill runs tests/mdr_token_helper.py in its own process against the MDR
simulator. Afterwards the token file must be whole (never partial, never
empty, still owner-read-only), and the next process must either work or
raise TokenExpiredError whose message requests a new console token.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from fixtures_mdr import MDR_CLIENT_ID, MDR_CONNECTION_NAME, make_jwt, run_token_helper
from mdr_token_helper import KILL_STEPS

from mdr_connector.adapters.loopback import serve_on_loopback
from mdr_connector.adapters.mdr.client import MdrClient
from mdr_connector.adapters.mdr.simulator import API_PREFIX, HOUR, MdrSimulator
from mdr_connector.adapters.mdr.simulator import make_app as make_mdr_app
from mdr_connector.adapters.mdr.tokens import TokenFileStore, TokenPair
from mdr_connector.connector.config import MdrSettings
from mdr_connector.connector.errors import ConnectionFatalError, TokenExpiredError

ISSUE_NEW_TOKEN = "issue a new token in the MDR console (Settings, API) and run `mdr-connector token activate`"

# Whether MDR spent the stored refresh token before the process died, and
# whether the new pair reached the token file.
SPENT_BEFORE_KILL = {
    "before-confirm": False,
    "reply-unread": True,
    "mid-write": True,
    "before-rename": True,
    "after-rename": True,
}
NEW_PAIR_SAVED = {
    "before-confirm": False,
    "reply-unread": False,
    "mid-write": False,
    "before-rename": False,
    "after-rename": True,
}
# Whether the new pair is on disk in any file, so the next start can use it:
# a complete temp file left before the rename is adopted.
NEW_PAIR_ON_DISK = {**NEW_PAIR_SAVED, "before-rename": True}


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class ConfirmDrops:
    """Settings of a client of the dropping server, and how many session/confirm replies it still drops."""

    settings: MdrSettings = field(init=False)
    remaining: int = 0


def stored_pair(settings: MdrSettings) -> TokenPair:
    pair = TokenFileStore(settings.token_dir, settings.client_id).load()
    assert pair is not None
    return pair


def assert_token_file_whole(settings: MdrSettings) -> None:
    """The token file is a complete JSON pair that only its owner can read."""
    path = settings.token_dir / f"{MDR_CLIENT_ID}.json"
    data = path.read_bytes()
    assert data, "the token file is empty"
    stored = json.loads(data)
    assert stored["access_token"] and stored["refresh_token"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o400


@pytest.mark.parametrize("step", KILL_STEPS)
async def test_kill_at_refresh_step(
    step: str, active_mdr_client: MdrClient, mdr_sim: MdrSimulator, mdr_settings: MdrSettings
) -> None:
    """A refresh killed at `step` leaves a whole token file, and the next start works or names the fix."""
    assert set(KILL_STEPS) == set(SPENT_BEFORE_KILL)
    before = stored_pair(mdr_settings)
    mdr_sim.advance(2 * HOUR)

    helper = await run_token_helper(mdr_settings, "call", "--kill-at", step)
    stdout, stderr = await helper.communicate()

    assert helper.returncode == -signal.SIGKILL, stdout.decode() + stderr.decode()
    assert mdr_sim.confirm_calls == (2 if SPENT_BEFORE_KILL[step] else 1)
    assert_token_file_whole(mdr_settings)
    after_kill = stored_pair(mdr_settings)
    assert (after_kill.refresh_token != before.refresh_token) == NEW_PAIR_SAVED[step]

    async with MdrClient(mdr_settings) as fresh:
        if SPENT_BEFORE_KILL[step] and not NEW_PAIR_ON_DISK[step]:
            with pytest.raises(TokenExpiredError) as caught:
                await fresh.list_incidents()
            assert ISSUE_NEW_TOKEN in str(caught.value)
            assert fresh.tokens.status().state == "Expired"
        else:
            page = await fresh.list_incidents()
            assert page.raw_count == 0
            assert fresh.tokens.status().state == "Active"
    assert_token_file_whole(mdr_settings)
    if NEW_PAIR_ON_DISK[step]:
        # The pair MDR issued before the kill is used, and no new pair is
        # issued. Before the rename, the stored refresh token is sent once
        # more, and its rejection makes the client adopt the temp file.
        rejected_once = 0 if NEW_PAIR_SAVED[step] else 1
        assert mdr_sim.confirm_calls == 2 + rejected_once
    # A temp file with half a pair, or one adopted, is gone too.
    assert list(mdr_settings.token_dir.glob("*.tmp")) == []


@pytest.fixture
async def confirm_drops(mdr_sim: MdrSimulator, token_dir: Path) -> AsyncIterator[ConfirmDrops]:
    """The MDR simulator behind a middleware that can drop the reply of session/confirm after MDR applied it.

    The simulator's own fault plan never drops that reply, so that fault
    storms keep the chain whole, so this test adds the fault itself.
    """
    drops = ConfirmDrops()

    @web.middleware
    async def drop_confirm_reply(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        applied = response.status == 200 and request.transport is not None
        if applied and request.path.endswith("/session/confirm") and drops.remaining > 0:
            drops.remaining -= 1
            assert request.transport is not None
            request.transport.close()
        return response

    app = make_mdr_app(mdr_sim)
    app.middlewares.insert(0, drop_confirm_reply)
    async with serve_on_loopback(app, "127.0.0.1", 0) as url:
        drops.settings = MdrSettings(
            base_url=url + API_PREFIX,
            client_id=MDR_CLIENT_ID,
            connection_name=MDR_CONNECTION_NAME,
            token_dir=token_dir,
            timeout_seconds=10,
        )
        yield drops


async def test_lost_confirm_reply_stops_connection(confirm_drops: ConfirmDrops, mdr_sim: MdrSimulator) -> None:
    """MDR applies session/confirm and the reply is lost: the client says the refresh token was spent and stops."""
    settings = confirm_drops.settings
    async with MdrClient(settings) as client:
        await client.tokens.activate(mdr_sim.issue_console_token(MDR_CLIENT_ID))
        before = stored_pair(settings)
        mdr_sim.advance(2 * HOUR)
        confirm_drops.remaining = 1

        with pytest.raises(TokenExpiredError) as caught:
            await client.list_incidents()

        assert client.tokens.status().state == "Expired"

    message = str(caught.value)
    assert isinstance(caught.value, ConnectionFatalError)
    assert "got no reply" in message
    assert "spent it" in message
    assert ISSUE_NEW_TOKEN in message
    assert mdr_sim.confirm_calls == 3
    assert_token_file_whole(settings)
    assert stored_pair(settings).refresh_token == before.refresh_token
    assert mdr_sim.call_counts["incidents/list"] == 1


async def test_lost_reply_of_unapplied_confirm_recovers(confirm_drops: ConfirmDrops, mdr_sim: MdrSimulator) -> None:
    """A session/confirm reply lost before MDR spent the token is sent once more, and the chain goes on."""
    settings = confirm_drops.settings
    async with MdrClient(settings) as client:
        await client.tokens.activate(mdr_sim.issue_console_token(MDR_CLIENT_ID))
        before = stored_pair(settings)
        mdr_sim.advance(2 * HOUR)
        # With reusable refresh tokens, the first request spends nothing, as if it never reached MDR.
        mdr_sim.settings.single_use_refresh_tokens = False
        confirm_drops.remaining = 1

        page = await client.list_incidents()

        assert client.tokens.status().state == "Active"
    assert page.raw_count == 0
    assert mdr_sim.confirm_calls == 3
    assert stored_pair(settings).refresh_token != before.refresh_token


async def test_confirm_not_sent_keeps_chain(
    active_mdr_client: MdrClient, mdr_sim: MdrSimulator, mdr_settings: MdrSettings
) -> None:
    """A session/confirm that never reached MDR leaves the chain usable: the next call refreshes once and works."""
    mdr_sim.advance(2 * HOUR)
    calls_before = mdr_sim.confirm_calls

    async with MdrClient(mdr_settings.model_copy(update={"base_url": "http://127.0.0.1:9/api/v1"})) as unreachable:
        with pytest.raises(Exception) as caught:
            await unreachable.list_incidents()
    assert not isinstance(caught.value, ConnectionFatalError)

    page = await active_mdr_client.list_incidents()

    assert page.raw_count == 0
    assert mdr_sim.confirm_calls == calls_before + 1
    assert active_mdr_client.tokens.status().state == "Active"


@pytest.mark.parametrize(("age_seconds", "adopted"), [(-60, True), (60, False)])
def test_temp_file_adopted_only_if_newer(token_dir: Path, tmp_path: Path, age_seconds: int, adopted: bool) -> None:
    """A whole temp token file is adopted only when its pair is newer than the token file's; any other is deleted."""
    store = TokenFileStore(token_dir, MDR_CLIENT_ID)
    now = int(time.time())
    current = TokenPair.from_tokens(make_jwt(3600, "access"), make_jwt(86400, "refresh"), now)
    store.save(current)
    other = TokenFileStore(tmp_path / "elsewhere", MDR_CLIENT_ID)
    candidate = TokenPair.from_tokens(make_jwt(3600, "access"), make_jwt(86400, "refresh"), now - age_seconds)
    other.save(candidate)
    os.replace(other.path, token_dir / f".{MDR_CLIENT_ID}.0123456789abcdef.tmp")

    recovered = store.recover_unrenamed(current)

    assert recovered == (candidate if adopted else None)
    assert store.load() == (candidate if adopted else current)
    assert list(token_dir.glob("*.tmp")) == []
