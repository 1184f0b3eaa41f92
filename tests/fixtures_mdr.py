"""Fixtures that run the MDR simulator on loopback."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from mdr_connector.adapters.mdr.client import MdrClient
from mdr_connector.adapters.mdr.simulator import MdrSimulator, encode_jwt, run_simulator
from mdr_connector.adapters.mdr.tokens import TokenFileStore, TokenPair
from mdr_connector.connector.config import MdrSettings
from mdr_connector.connector.retry import RateGate

MDR_CLIENT_ID = "f00dfeed0c144a4b9a3af6a6a6a6a6a6a6"
MDR_CONNECTION_NAME = "SOC Jira sync"
TOKEN_HELPER = Path(__file__).with_name("mdr_token_helper.py")
# Nothing listens here: aioresponses returns the reply to every request in the mocked tests.
MOCK_BASE = "http://127.0.0.1:9/api/v1"
MOCK_PREFIX = f"{MOCK_BASE}/{MDR_CLIENT_ID}"
SIGNING_KEY = b"k" * 32


def make_jwt(lifetime: int, kind: str) -> str:
    now = int(time.time())
    return encode_jwt(
        {"typ": kind, "iat": now, "exp": now + lifetime, "nonce": time.perf_counter_ns()}, SIGNING_KEY
    )


@pytest.fixture
def mdr_sim() -> Iterator[MdrSimulator]:
    """A simulator with one client whose API connection is MDR_CONNECTION_NAME; its attachment files go at the end."""
    sim = MdrSimulator(seed=7)
    sim.create_client(MDR_CLIENT_ID, connection_name=MDR_CONNECTION_NAME)
    yield sim
    sim.close()


@pytest.fixture
async def mdr_url(mdr_sim: MdrSimulator) -> AsyncIterator[str]:
    """The API base URL of `mdr_sim`, served on a free loopback port."""
    async with run_simulator(mdr_sim) as url:
        yield url


@pytest.fixture
async def mocked_client(tmp_path: Path) -> AsyncIterator[MdrClient]:
    """A client of MOCK_BASE with a valid stored token pair, for aioresponses tests."""
    token_dir = tmp_path / "tokens"
    settings = MdrSettings(
        base_url=MOCK_BASE, client_id=MDR_CLIENT_ID, connection_name=MDR_CONNECTION_NAME, token_dir=token_dir
    )
    pair = TokenPair.from_tokens(make_jwt(3600, "access"), make_jwt(7 * 86400, "refresh"), time.time())
    TokenFileStore(token_dir, MDR_CLIENT_ID).save(pair)
    # One send per request, so a mocked 429 reaches the test instead of being sent again.
    async with MdrClient(settings, rate_gate=RateGate("mdr", attempts=1)) as client:
        yield client


@pytest.fixture
def token_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "tokens"
    folder.mkdir(mode=0o700)
    return folder


@pytest.fixture
def mdr_settings(mdr_url: str, token_dir: Path) -> MdrSettings:
    return MdrSettings(
        base_url=mdr_url,
        client_id=MDR_CLIENT_ID,
        connection_name=MDR_CONNECTION_NAME,
        token_dir=token_dir,
        timeout_seconds=10,
    )


@pytest.fixture
async def mdr_client(mdr_settings: MdrSettings) -> AsyncIterator[MdrClient]:
    """An open client whose token is not activated yet; it uses the real local clock."""
    async with MdrClient(mdr_settings) as client:
        yield client


@pytest.fixture
async def active_mdr_client(mdr_client: MdrClient, mdr_sim: MdrSimulator) -> MdrClient:
    """An open client with an activated token chain (one session/confirm call made)."""
    await mdr_client.tokens.activate(mdr_sim.issue_console_token(MDR_CLIENT_ID))
    return mdr_client


@pytest.fixture
async def wire_token(mdr_sim: MdrSimulator, mdr_url: str) -> dict[str, str]:
    """An access and refresh token pair obtained with a raw session/confirm call."""
    async with aiohttp.ClientSession() as session:
        reply = await session.post(
            f"{mdr_url}/{MDR_CLIENT_ID}/session/confirm",
            json={"refresh_token": mdr_sim.issue_console_token(MDR_CLIENT_ID)},
        )
        assert reply.status == 200
        return await reply.json()


async def wire_call(
    url: str, path: str, body: Any, access_token: str | None, **kwargs: Any
) -> tuple[int, Any]:
    """POST `body` to one simulator API method and return the status and the decoded JSON reply."""
    headers = {"Authorization": f"Bearer {access_token}"} if access_token else {}
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{url}/{MDR_CLIENT_ID}/{path}", json=body, headers=headers, **kwargs
        ) as reply:
            return reply.status, await reply.json(content_type=None)


async def run_token_helper(settings: MdrSettings, mode: str, *extra: str) -> asyncio.subprocess.Process:
    """Start tests/mdr_token_helper.py in a new Python process with the given settings."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(TOKEN_HELPER),
        mode,
        "--base-url",
        settings.base_url,
        "--client-id",
        settings.client_id,
        "--connection-name",
        settings.connection_name,
        "--token-dir",
        str(settings.token_dir),
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environment,
    )
