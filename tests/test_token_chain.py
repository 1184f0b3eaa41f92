"""Token chain: activation, rotation, persistence, locking and secrecy, against the simulator."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import signal
import stat
import threading
from pathlib import Path

import pytest
from fixtures_mdr import MDR_CLIENT_ID, MDR_CONNECTION_NAME, run_token_helper
from mdr_connector.adapters.mdr.client import MdrClient
from mdr_connector.adapters.mdr.simulator import DAY, HOUR, MdrSimulator
from mdr_connector.adapters.mdr import tokens
from mdr_connector.adapters.mdr.tokens import TokenFileStore, TokenPair, decode_jwt_claims, jwt_expiry
from mdr_connector.connector.config import MdrSettings
from mdr_connector.connector.errors import ConfigError, RemoteUnavailableError, TokenExpiredError
from mdr_connector.connector.logs import REDACTED, redact_text

EXPIRED_MESSAGE = (
    f"the MDR refresh token for client {MDR_CLIENT_ID} is expired or was already used: "
    "issue a new token in the MDR console (Settings, API) and run `mdr-connector token activate`"
)


def stored_pair(settings: MdrSettings):
    pair = TokenFileStore(settings.token_dir, settings.client_id).load()
    assert pair is not None
    return pair


async def test_activation_stores_pair(
    mdr_client: MdrClient, mdr_sim: MdrSimulator, mdr_settings: MdrSettings
) -> None:
    """Activating a console token stores an owner-read-only pair and reports Active."""
    status = await mdr_client.tokens.activate(mdr_sim.issue_console_token(MDR_CLIENT_ID))

    path = mdr_settings.token_dir / f"{MDR_CLIENT_ID}.json"
    assert status.state == "Active"
    assert stat.S_IMODE(path.stat().st_mode) == 0o400
    assert mdr_sim.confirm_calls == 1
    pair = stored_pair(mdr_settings)
    assert pair.access_expires_at == jwt_expiry(pair.access_token)
    assert pair.refresh_expires_at == jwt_expiry(pair.refresh_token)
    assert pair.refresh_expires_at - pair.access_expires_at == 7 * DAY - HOUR
    assert not list(mdr_settings.token_dir.glob("*.tmp"))


async def test_activation_console_token_works_once(mdr_client: MdrClient, mdr_sim: MdrSimulator) -> None:
    """A console token activated once is rejected the second time."""
    console_token = mdr_sim.issue_console_token(MDR_CLIENT_ID)
    await mdr_client.tokens.activate(console_token)

    with pytest.raises(TokenExpiredError) as caught:
        await mdr_client.tokens.activate(console_token)

    assert str(caught.value) == EXPIRED_MESSAGE


async def test_activation_expired_console_token(mdr_settings: MdrSettings, mdr_sim: MdrSimulator) -> None:
    """An expired console token is rejected before any call to MDR."""
    console_token = mdr_sim.issue_console_token(MDR_CLIENT_ID)
    mdr_sim.advance(DAY + 60)

    async with MdrClient(mdr_settings, clock=mdr_sim.now) as client:
        with pytest.raises(TokenExpiredError, match="console token"):
            await client.tokens.activate(console_token)

    assert mdr_sim.confirm_calls == 0
    assert not (mdr_settings.token_dir / f"{MDR_CLIENT_ID}.json").exists()


async def test_activation_malformed_console_token(mdr_client: MdrClient, mdr_sim: MdrSimulator) -> None:
    """A string that is not a JWT is rejected without echoing it."""
    with pytest.raises(ConfigError) as caught:
        await mdr_client.tokens.activate("not-a-token-canary")

    assert "not-a-token-canary" not in str(caught.value)
    assert mdr_sim.confirm_calls == 0


async def test_activation_json_console_token(mdr_client: MdrClient, mdr_sim: MdrSimulator) -> None:
    """The simulator's JSON reply pasted as the token gets its own message, and MDR is not called."""
    console_token = mdr_sim.issue_console_token(MDR_CLIENT_ID)

    with pytest.raises(ConfigError) as caught:
        await mdr_client.tokens.activate(json.dumps({"refresh_token": console_token}) + "\n")

    assert str(caught.value) == (
        "the console token given is JSON, not the token itself: "
        "copy only the token value (the long string starting with eyJ)"
    )
    assert console_token not in str(caught.value)
    assert mdr_sim.confirm_calls == 0


@pytest.mark.parametrize(
    "token",
    ["eyJhbGciOiJIUzI1NiJ9.e30", "eyJhbGciOiJIUzI1NiJ9..c2ln", "a.b.c.d", "eyJh bGci.e30.c2ln", "eyJh.e30=.c2ln",
     "eyJh.e30.c2ln+", "\"eyJh.e30.c2ln\""],
    ids=["two-parts", "empty-part", "four-parts", "inner-space", "padding", "plus-sign", "quoted"],
)
async def test_activation_console_token_format(mdr_client: MdrClient, mdr_sim: MdrSimulator, token: str) -> None:
    """A token that is not three base64url parts is rejected before MDR is called, without echoing it."""
    with pytest.raises(ConfigError) as caught:
        await mdr_client.tokens.activate(token)

    assert str(caught.value) == (
        "the console token is not a valid MDR token: expected three parts of letters, digits, - and _ "
        "separated by dots; copy the whole token from the MDR console (Settings, API)"
    )
    assert mdr_sim.confirm_calls == 0


async def test_rejected_chain_reported_expired(
    active_mdr_client: MdrClient, mdr_sim: MdrSimulator, mdr_settings: MdrSettings
) -> None:
    """A refresh token that MDR rejects is recorded in the token file, so status reports Expired until reactivation."""
    spent = stored_pair(mdr_settings)
    mdr_sim.confirm_session(MDR_CLIENT_ID, spent.refresh_token)
    mdr_sim.advance(2 * HOUR)

    with pytest.raises(TokenExpiredError):
        await active_mdr_client.list_incidents()
    status = active_mdr_client.tokens.status()
    on_disk = json.loads((mdr_settings.token_dir / f"{MDR_CLIENT_ID}.json").read_text())

    assert status.state == "Expired"
    assert status.rejected_at is not None
    assert status.refresh_expires_at is not None and status.refresh_expires_at > status.rejected_at
    assert isinstance(on_disk["rejected_at"], int)
    assert on_disk["refresh_token"] == spent.refresh_token
    assert stat.S_IMODE((mdr_settings.token_dir / f"{MDR_CLIENT_ID}.json").stat().st_mode) == 0o400
    assert not list(mdr_settings.token_dir.glob("*.tmp"))


async def test_rejected_chain_not_retried(
    active_mdr_client: MdrClient, mdr_sim: MdrSimulator, mdr_settings: MdrSettings
) -> None:
    """Once MDR rejected the refresh token, later calls fail without sending it again."""
    mdr_sim.confirm_session(MDR_CLIENT_ID, stored_pair(mdr_settings).refresh_token)
    mdr_sim.advance(2 * HOUR)
    with pytest.raises(TokenExpiredError):
        await active_mdr_client.list_incidents()
    confirms_after_rejection = mdr_sim.confirm_calls

    async with MdrClient(mdr_settings) as other_process:
        with pytest.raises(TokenExpiredError) as caught:
            await other_process.list_incidents()

    assert str(caught.value) == EXPIRED_MESSAGE
    assert mdr_sim.confirm_calls == confirms_after_rejection


async def test_activation_clears_rejection(
    active_mdr_client: MdrClient, mdr_sim: MdrSimulator, mdr_settings: MdrSettings
) -> None:
    """A new `token activate` replaces the rejected chain, and status is Active again."""
    mdr_sim.confirm_session(MDR_CLIENT_ID, stored_pair(mdr_settings).refresh_token)
    mdr_sim.advance(2 * HOUR)
    with pytest.raises(TokenExpiredError):
        await active_mdr_client.list_incidents()

    status = await active_mdr_client.tokens.activate(mdr_sim.issue_console_token(MDR_CLIENT_ID))

    assert status.state == "Active"
    assert status.rejected_at is None
    assert stored_pair(mdr_settings).rejected_at is None


async def test_rejected_console_token_keeps_chain(
    active_mdr_client: MdrClient, mdr_sim: MdrSimulator, mdr_settings: MdrSettings
) -> None:
    """A used console token rejected during activation leaves the stored chain usable and unmarked."""
    console_token = mdr_sim.issue_console_token(MDR_CLIENT_ID)
    mdr_sim.confirm_session(MDR_CLIENT_ID, console_token)

    with pytest.raises(TokenExpiredError):
        await active_mdr_client.tokens.activate(console_token)

    assert active_mdr_client.tokens.status().state == "Active"
    assert stored_pair(mdr_settings).rejected_at is None


async def test_expired_by_time_has_no_rejection(mdr_settings: MdrSettings, mdr_sim: MdrSimulator) -> None:
    """A chain past its expiry is Expired without a rejection time, since MDR was not asked."""
    async with MdrClient(mdr_settings, clock=mdr_sim.now) as client:
        await client.tokens.activate(mdr_sim.issue_console_token(MDR_CLIENT_ID))
        mdr_sim.advance(8 * DAY)
        status = client.tokens.status()

    assert status.state == "Expired"
    assert status.rejected_at is None


async def test_token_log_fields(
    mdr_client: MdrClient, mdr_sim: MdrSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    """Token events name the MDR connection as mdr_connection_name; `connection` is the config's name."""
    caplog.set_level(logging.INFO)

    await mdr_client.tokens.activate(mdr_sim.issue_console_token(MDR_CLIENT_ID))

    records = [record for record in caplog.records if record.getMessage().startswith("mdr.token.")]
    assert [record.getMessage() for record in records] == ["mdr.token.refreshed", "mdr.token.activated"]
    for record in records:
        assert record.mdr_connection_name == MDR_CONNECTION_NAME
        assert record.client_id == MDR_CLIENT_ID
        assert not hasattr(record, "connection")


async def test_status_states(mdr_settings: MdrSettings, mdr_sim: MdrSimulator) -> None:
    """Status moves from Pending activation to Active, Idle and Expired with the clock."""
    async with MdrClient(mdr_settings, clock=mdr_sim.now) as client:
        assert client.tokens.status().state == "Pending activation"

        await client.tokens.activate(mdr_sim.issue_console_token(MDR_CLIENT_ID))
        active = client.tokens.status()
        mdr_sim.advance(2 * HOUR)
        idle = client.tokens.status()
        mdr_sim.advance(7 * DAY)
        expired = client.tokens.status()

    assert active.state == "Active"
    assert idle.state == "Idle"
    assert expired.state == "Expired"
    assert active.access_expires_at is not None and active.refresh_expires_at is not None
    assert active.refresh_expires_at > active.access_expires_at


async def test_rotation_persisted_before_use(
    active_mdr_client: MdrClient, mdr_sim: MdrSimulator, mdr_settings: MdrSettings
) -> None:
    """After a refresh, every request carries the access token already stored in the file."""
    before = stored_pair(mdr_settings)
    mismatches: list[str] = []
    seen: list[str] = []

    def check_file(method: str, request) -> None:
        if method == "session/confirm":
            return
        sent = request.headers["Authorization"].removeprefix("Bearer ")
        seen.append(sent)
        if sent != stored_pair(mdr_settings).access_token:
            mismatches.append(method)

    mdr_sim.request_hook = check_file
    mdr_sim.advance(2 * HOUR)
    await active_mdr_client.list_incidents()

    after = stored_pair(mdr_settings)
    assert after.refresh_token != before.refresh_token
    assert seen == [before.access_token, after.access_token]
    assert mismatches == []


@pytest.mark.parametrize("status", [403, 401])
async def test_expired_access_refreshes_and_retries(
    active_mdr_client: MdrClient, mdr_sim: MdrSimulator, status: int
) -> None:
    """An access token refused with 403 (or 401) is refreshed once and the call retried."""
    mdr_sim.settings.expired_access_status = status
    mdr_sim.seed_incident(MDR_CLIENT_ID)
    mdr_sim.advance(2 * HOUR)

    page = await active_mdr_client.list_incidents()

    assert page.raw_count == 1
    assert mdr_sim.call_counts["incidents/list"] == 2
    assert mdr_sim.confirm_calls == 2


async def test_proactive_refresh_within_margin(mdr_settings: MdrSettings, mdr_sim: MdrSimulator) -> None:
    """An access token within the refresh margin is refreshed before the call, with no 403."""
    async with MdrClient(mdr_settings, clock=mdr_sim.now) as client:
        await client.tokens.activate(mdr_sim.issue_console_token(MDR_CLIENT_ID))
        mdr_sim.advance(HOUR - mdr_settings.refresh_margin_seconds + 5)

        await client.list_incidents()

    assert mdr_sim.confirm_calls == 2
    assert mdr_sim.call_counts["incidents/list"] == 1


async def test_fast_local_clock_no_refresh_loop(mdr_settings: MdrSettings, mdr_sim: MdrSimulator) -> None:
    """A local clock two hours ahead of MDR does not refresh on every call."""
    async with MdrClient(mdr_settings, clock=lambda: mdr_sim.now() + 2 * HOUR) as client:
        await client.tokens.activate(mdr_sim.issue_console_token(MDR_CLIENT_ID))

        for _ in range(3):
            await client.list_incidents()

    assert mdr_sim.confirm_calls == 1
    assert mdr_sim.call_counts["incidents/list"] == 3


async def test_crash_after_confirm_keeps_new_pair(
    active_mdr_client: MdrClient, mdr_sim: MdrSimulator, mdr_settings: MdrSettings
) -> None:
    """A process killed right after writing the rotated pair leaves a pair that a new process can use."""
    before = stored_pair(mdr_settings)
    mdr_sim.advance(2 * HOUR)

    helper = await run_token_helper(mdr_settings, "crash-after-save")
    _, stderr = await helper.communicate()

    assert helper.returncode == 17, stderr.decode()
    after = stored_pair(mdr_settings)
    assert after.refresh_token != before.refresh_token
    assert mdr_sim.confirm_calls == 2

    async with MdrClient(mdr_settings) as fresh:
        await fresh.list_incidents()
    assert mdr_sim.confirm_calls == 2


async def test_kill_mid_activation_keeps_old_pair(
    active_mdr_client: MdrClient, mdr_sim: MdrSimulator, mdr_settings: MdrSettings, tmp_path: Path
) -> None:
    """A process killed halfway through writing a new token file leaves the old pair whole and working."""
    before = stored_pair(mdr_settings)
    console_token = tmp_path / "console-token"
    console_token.write_text(mdr_sim.issue_console_token(MDR_CLIENT_ID))

    helper = await run_token_helper(mdr_settings, "kill-mid-save", "--activate", str(console_token))
    stdout, stderr = await helper.communicate()

    assert helper.returncode == -signal.SIGKILL, stdout.decode() + stderr.decode()
    assert mdr_sim.confirm_calls == 2
    [stale] = mdr_settings.token_dir.glob("*.tmp")
    with pytest.raises(ValueError):
        json.loads(stale.read_bytes())
    assert stored_pair(mdr_settings) == before

    # The old access token still works, and so does its refresh token, whose
    # rotated pair is saved beside the stale temp file.
    async with MdrClient(mdr_settings) as fresh:
        await fresh.list_incidents()
    assert mdr_sim.confirm_calls == 2
    mdr_sim.advance(2 * HOUR)
    async with MdrClient(mdr_settings) as fresh:
        await fresh.list_incidents()
    assert mdr_sim.confirm_calls == 3
    assert stored_pair(mdr_settings).refresh_token != before.refresh_token


async def test_kill_mid_refresh_keeps_old_file(
    active_mdr_client: MdrClient, mdr_sim: MdrSimulator, mdr_settings: MdrSettings
) -> None:
    """A process killed halfway through saving a rotated pair leaves the old file whole for the next start."""
    before = stored_pair(mdr_settings)
    mdr_sim.advance(2 * HOUR)

    helper = await run_token_helper(mdr_settings, "kill-mid-save")
    stdout, stderr = await helper.communicate()

    assert helper.returncode == -signal.SIGKILL, stdout.decode() + stderr.decode()
    assert len(list(mdr_settings.token_dir.glob("*.tmp"))) == 1
    assert stored_pair(mdr_settings) == before

    # MDR rotated the refresh token before the crash, so the chain is lost.
    # The next start reports the spent token rather than a malformed file.
    async with MdrClient(mdr_settings) as fresh:
        with pytest.raises(TokenExpiredError) as caught:
            await fresh.list_incidents()
        status = await fresh.tokens.activate(mdr_sim.issue_console_token(MDR_CLIENT_ID))
    assert str(caught.value) == EXPIRED_MESSAGE
    assert status.state == "Active"
    assert stored_pair(mdr_settings).refresh_token != before.refresh_token


def test_save_order_and_flags(token_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`save` writes a new 0400 temp file, fsyncs it, renames it over the token file, then fsyncs the folder."""
    real_open, real_write, real_fsync, real_replace = os.open, os.write, os.fsync, os.replace
    names: dict[int, Path] = {}
    opened: dict[Path, tuple[int, int]] = {}
    events: list[tuple[str, Path | None] | tuple[str, Path, Path]] = []

    def spy_open(path: str | os.PathLike[str], flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        descriptor = real_open(path, flags, mode, dir_fd=dir_fd)
        names[descriptor] = Path(path)
        opened[Path(path)] = (flags, mode)
        events.append(("open", Path(path)))
        return descriptor

    def spy_write(descriptor: int, data: bytes) -> int:
        if not events or events[-1] != ("write", names.get(descriptor)):
            events.append(("write", names.get(descriptor)))
        return real_write(descriptor, data)

    def spy_fsync(descriptor: int) -> None:
        events.append(("fsync", names.get(descriptor)))
        real_fsync(descriptor)

    def spy_replace(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
        events.append(("replace", Path(source), Path(target)))
        real_replace(source, target)

    store = TokenFileStore(token_dir, MDR_CLIENT_ID)
    pair = TokenPair("spy-access-token", "spy-refresh-token", 1_900_000_000, 1_900_000_000, 1_800_000_000)
    monkeypatch.setattr(tokens.os, "open", spy_open)
    monkeypatch.setattr(tokens.os, "write", spy_write)
    monkeypatch.setattr(tokens.os, "fsync", spy_fsync)
    monkeypatch.setattr(tokens.os, "replace", spy_replace)
    store.save(pair)
    monkeypatch.undo()

    temp = events[0][1]
    assert temp is not None
    assert events == [
        ("open", temp),
        ("write", temp),
        ("fsync", temp),
        ("replace", temp, store.path),
        ("open", token_dir),
        ("fsync", token_dir),
    ]
    assert temp.parent == token_dir
    temp_flags, temp_mode = opened[temp]
    assert temp_flags & os.O_CREAT
    assert temp_flags & os.O_EXCL
    assert temp_flags & os.O_NOFOLLOW
    assert temp_mode == 0o400
    assert opened[token_dir][0] & os.O_DIRECTORY
    assert not temp.exists()
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o400
    assert store.load() == pair


@pytest.mark.parametrize("mode", [0o440, 0o404, 0o600 | 0o040])
async def test_readable_token_file_rejected(
    active_mdr_client: MdrClient, mdr_settings: MdrSettings, mode: int
) -> None:
    """A token file that group or others can read is refused with the chmod fix."""
    path = mdr_settings.token_dir / f"{MDR_CLIENT_ID}.json"
    os.chmod(path, mode)

    async with MdrClient(mdr_settings) as client:
        with pytest.raises(ConfigError) as caught:
            await client.list_incidents()
        with pytest.raises(ConfigError):
            client.tokens.status()

    assert f"chmod 400 {path}" in str(caught.value)


async def test_writable_token_folder_rejected(
    active_mdr_client: MdrClient, mdr_settings: MdrSettings
) -> None:
    """A token folder that group or others can write is refused with the chmod fix."""
    os.chmod(mdr_settings.token_dir, 0o770)

    with pytest.raises(ConfigError) as caught:
        TokenFileStore(mdr_settings.token_dir, MDR_CLIENT_ID).load()

    assert f"chmod 700 {mdr_settings.token_dir}" in str(caught.value)


async def test_symlinked_token_file_rejected(
    active_mdr_client: MdrClient, mdr_settings: MdrSettings, tmp_path: Path
) -> None:
    """A token file that is a symlink is refused."""
    path = mdr_settings.token_dir / f"{MDR_CLIENT_ID}.json"
    elsewhere = tmp_path / "elsewhere.json"
    os.replace(path, elsewhere)
    path.symlink_to(elsewhere)

    with pytest.raises(ConfigError, match="symlink"):
        TokenFileStore(mdr_settings.token_dir, MDR_CLIENT_ID).load()


async def test_concurrent_refresh_tasks_one_confirm(
    active_mdr_client: MdrClient, mdr_sim: MdrSimulator, mdr_settings: MdrSettings
) -> None:
    """Five tasks that all get 403 on the same expired token cause one session/confirm call."""
    mdr_sim.settings.latency_seconds = 0.05
    mdr_sim.advance(2 * HOUR)

    pages = await asyncio.gather(*(active_mdr_client.list_incidents() for _ in range(5)))

    assert len(pages) == 5
    assert mdr_sim.confirm_calls == 2


async def test_cancelled_refresh_spends_token_once(active_mdr_client: MdrClient, mdr_sim: MdrSimulator) -> None:
    """A refresh cancelled mid-flight finishes in the background, and the next caller uses its pair."""
    mdr_sim.settings.latency_seconds = 0.3
    rejected = await active_mdr_client.tokens.access_token()
    first = asyncio.create_task(active_mdr_client.tokens.refresh_after_rejection(rejected))
    await asyncio.sleep(0.05)
    first.cancel()

    fresh = await active_mdr_client.tokens.refresh_after_rejection(rejected)

    assert fresh != rejected
    assert mdr_sim.confirm_calls == 2
    assert active_mdr_client.tokens.status().state == "Active"


async def test_concurrent_refresh_clients_one_confirm(
    active_mdr_client: MdrClient, mdr_sim: MdrSimulator, mdr_settings: MdrSettings
) -> None:
    """Two clients in one process sharing a token file cause one session/confirm call."""
    mdr_sim.settings.latency_seconds = 0.05
    async with MdrClient(mdr_settings) as second:
        await second.tokens.access_token()
        mdr_sim.advance(2 * HOUR)

        await asyncio.gather(active_mdr_client.list_incidents(), second.list_incidents())

    assert mdr_sim.confirm_calls == 2


async def test_concurrent_refresh_processes_one_confirm(
    active_mdr_client: MdrClient, mdr_sim: MdrSimulator, mdr_settings: MdrSettings, tmp_path: Path
) -> None:
    """Two processes holding the same expired pair cause one session/confirm call."""
    mdr_sim.settings.latency_seconds = 0.1
    mdr_sim.advance(2 * HOUR)
    go = tmp_path / "go"
    ready = [tmp_path / "ready-1", tmp_path / "ready-2"]

    helpers = [
        await run_token_helper(mdr_settings, "call", "--ready", str(marker), "--go", str(go))
        for marker in ready
    ]
    while not all(marker.exists() for marker in ready):
        await asyncio.sleep(0.01)
    go.touch()
    outputs = [await helper.communicate() for helper in helpers]

    for helper, (stdout, stderr) in zip(helpers, outputs, strict=True):
        assert helper.returncode == 0, stdout.decode() + stderr.decode()
        assert json.loads(stdout) == {"raw_count": 0}
    assert mdr_sim.confirm_calls == 2


async def test_expired_refresh_token_message(active_mdr_client: MdrClient, mdr_sim: MdrSimulator) -> None:
    """A refresh token past its 7 days raises TokenExpiredError with the fix in the message."""
    mdr_sim.advance(8 * DAY)

    with pytest.raises(TokenExpiredError) as caught:
        await active_mdr_client.list_incidents()

    assert str(caught.value) == EXPIRED_MESSAGE


async def test_used_refresh_token_message(
    active_mdr_client: MdrClient, mdr_sim: MdrSimulator, mdr_settings: MdrSettings
) -> None:
    """A refresh token spent by someone else raises TokenExpiredError with the fix in the message."""
    mdr_sim.confirm_session(MDR_CLIENT_ID, stored_pair(mdr_settings).refresh_token)
    mdr_sim.advance(2 * HOUR)

    with pytest.raises(TokenExpiredError) as caught:
        await active_mdr_client.list_incidents()

    assert str(caught.value) == EXPIRED_MESSAGE


async def test_missing_token_file(mdr_client: MdrClient) -> None:
    """A call before activation raises ConfigError that names the activate command."""
    with pytest.raises(ConfigError, match="mdr-connector token activate"):
        await mdr_client.list_incidents()


async def test_tokens_never_logged(
    mdr_client: MdrClient, mdr_sim: MdrSimulator, mdr_settings: MdrSettings, caplog: pytest.LogCaptureFixture
) -> None:
    """No token appears in any log record or exception message, at DEBUG level."""
    caplog.set_level(logging.DEBUG)
    console_token = mdr_sim.issue_console_token(MDR_CLIENT_ID)
    tokens = [console_token]
    errors: list[str] = []

    await mdr_client.tokens.activate(console_token)
    tokens += [stored_pair(mdr_settings).access_token, stored_pair(mdr_settings).refresh_token]
    mdr_sim.advance(2 * HOUR)
    await mdr_client.list_incidents()
    tokens += [stored_pair(mdr_settings).access_token, stored_pair(mdr_settings).refresh_token]
    mdr_sim.advance(8 * DAY)
    with pytest.raises(TokenExpiredError) as caught:
        await mdr_client.list_incidents()
    errors.append(str(caught.value))
    with pytest.raises(TokenExpiredError) as caught:
        await mdr_client.tokens.activate(console_token)
    errors.append(str(caught.value))

    assert caplog.records, "the test needs log records to inspect"
    dumps = [repr(vars(record)) + record.getMessage() for record in caplog.records]
    signatures = [token.rsplit(".", 1)[1] for token in tokens]
    for signature in signatures:
        assert not [dump for dump in dumps if signature in dump]
        assert not [error for error in errors if signature in error]
    assert "refresh_token" not in repr(stored_pair(mdr_settings))


def test_jwt_decoder_reads_exp(mdr_sim: MdrSimulator) -> None:
    """The JWT decoder reads exp in seconds from a simulator token."""
    token = mdr_sim.issue_console_token(MDR_CLIENT_ID)

    claims = decode_jwt_claims(token)

    assert claims["exp"] == jwt_expiry(token)
    assert claims["exp"] - int(mdr_sim.now()) == DAY


@pytest.mark.parametrize("token", ["", "a.b", "a.!!!.c", "a.bm90IGpzb24.c", "a.WzFd.c", "a.e30.c"])
def test_jwt_decoder_rejects_malformed(token: str) -> None:
    """The JWT decoder raises ValueError for malformed tokens or a missing exp."""
    with pytest.raises(ValueError):
        jwt_expiry(token)


def jwt_with_raw_payload(payload: str) -> str:
    """A JWT-shaped string whose payload is `payload` as written, such as `{"exp": Infinity}`."""
    def encode(text: str) -> str:
        return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()

    header = encode('{"alg":"HS256","typ":"JWT"}')
    return f"{header}.{encode(payload)}.c2lnbmF0dXJl"


@pytest.mark.parametrize(
    "exp",
    ["Infinity", "-Infinity", "NaN", "1e30", "1000000000000000000000000000000", "true", '"123"', "0"],
)
async def test_activation_absurd_console_exp(mdr_client: MdrClient, mdr_sim: MdrSimulator, exp: str) -> None:
    """A console token whose exp is not a number of seconds before the year 10000 is a clear ConfigError."""
    token = jwt_with_raw_payload(f'{{"exp": {exp}}}')

    with pytest.raises(ConfigError) as caught:
        await mdr_client.tokens.activate(token)

    assert str(caught.value).startswith("the console token is not a valid MDR token: the JWT 'exp' claim")
    assert mdr_sim.confirm_calls == 0


def test_fractional_exp_is_read() -> None:
    """A JWT NumericDate may carry a fraction; it is read as whole seconds."""
    from mdr_connector.adapters.mdr.tokens import jwt_expiry

    assert jwt_expiry(jwt_with_raw_payload('{"exp": 4102444800.75}')) == 4102444800


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("access_expires_at", 10**30),
        ("refresh_expires_at", True),
        ("obtained_at", -5),
        ("access_issued_at", 253402300800),
        ("refresh_expires_at", 1.9e9),
        ("rejected_at", "yesterday"),
    ],
    ids=["huge", "boolean", "negative", "year-10000", "float", "rejected-text"],
)
def test_token_file_absurd_times_are_malformed(token_dir: Path, field: str, value: object) -> None:
    """A token file with times no clock can show is rejected as malformed, naming the fix, instead of crashing status."""
    document = {
        "access_token": "a" * 20, "refresh_token": "r" * 20, "access_expires_at": 1_900_000_000,
        "refresh_expires_at": 1_900_000_000, "obtained_at": 1_800_000_000, "access_issued_at": None, field: value,
    }
    path = token_dir / f"{MDR_CLIENT_ID}.json"
    path.write_text(json.dumps(document))
    path.chmod(0o400)

    with pytest.raises(ConfigError, match="is malformed: run `mdr-connector token activate`"):
        TokenFileStore(token_dir, MDR_CLIENT_ID).status(1_850_000_000)


async def test_token_file_fifo_rejected(token_dir: Path) -> None:
    """A FIFO in place of the token file is rejected without waiting for a writer."""
    os.mkfifo(token_dir / f"{MDR_CLIENT_ID}.json", 0o600)
    # A daemon thread, so a load that blocks fails the test instead of hanging the run.
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[BaseException | None] = loop.create_future()

    def load() -> None:
        try:
            TokenFileStore(token_dir, MDR_CLIENT_ID).load()
            error = None
        except BaseException as err:  # noqa: BLE001 - handed to the test to inspect
            error = err
        loop.call_soon_threadsafe(outcome.set_result, error)

    threading.Thread(target=load, daemon=True).start()
    error = await asyncio.wait_for(outcome, 5)

    assert isinstance(error, ConfigError)
    assert "is not a regular file" in str(error)


def test_loaded_tokens_are_redacted(token_dir: Path) -> None:
    """Tokens read from the token file are redacted from log text, even when they are not JWT-shaped."""
    path = token_dir / f"{MDR_CLIENT_ID}.json"
    path.write_text(json.dumps({
        "access_token": "opaque-loaded-access-4c1d", "refresh_token": "opaque-loaded-refresh-9e2f",
        "access_expires_at": 1_900_000_000, "refresh_expires_at": 1_900_000_000, "obtained_at": 1_800_000_000,
    }))
    path.chmod(0o400)

    TokenFileStore(token_dir, MDR_CLIENT_ID).load()

    assert redact_text("opaque-loaded-access-4c1d opaque-loaded-refresh-9e2f") == f"{REDACTED} {REDACTED}"


def test_saved_and_received_tokens_are_redacted(token_dir: Path) -> None:
    """Tokens are redacted once saved, and once received even when the reply is not a valid JWT."""
    pair = TokenPair("opaque-saved-access-77aa", "opaque-saved-refresh-88bb", 1_900_000_000, 1_900_000_000, 1_800_000_000)
    TokenFileStore(token_dir, MDR_CLIENT_ID).save(pair)
    with pytest.raises(RemoteUnavailableError):
        TokenPair.from_tokens("opaque-received-access-1a", "opaque-received-refresh-2b", 1_800_000_000)

    text = "opaque-saved-access-77aa opaque-saved-refresh-88bb opaque-received-access-1a opaque-received-refresh-2b"
    assert redact_text(text) == " ".join([REDACTED] * 4)
