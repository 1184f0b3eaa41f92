"""Run one MDR client in its own process, for the token-chain tests.

    mdr_token_helper.py call ...              list incidents once and print the count
    mdr_token_helper.py crash-after-save ...  list incidents; die with exit code 17 right
                                              after the first token file write
    mdr_token_helper.py kill-mid-save ...     list incidents; write half of the first temp
                                              token file, then SIGKILL itself before the rename
    mdr_token_helper.py call --kill-at STEP   list incidents; SIGKILL itself at STEP of the refresh

With --activate FILE, the helper activates the console token in FILE
instead of listing incidents.

With --kill-at STEP, the helper SIGKILLs itself at one step of a token
refresh (see KILL_STEPS), as after a power cut or an OOM kill.

With --database-url, the pair is kept in that PostgreSQL database (cluster
mode), encrypted with the key in the environment variable MDR_TEST_TOKEN_KEY.

With --ready and --go, the helper loads its token pair, creates the --ready
file, and waits for the --go file before calling, so that tests can start
two helpers that both hold the same old pair.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import sys
from pathlib import Path

import aiohttp
from mdr_connector.adapters.mdr.client import MdrClient
from mdr_connector.adapters.mdr.token_database import DatabaseTokenStore, TokenCipher
from mdr_connector.adapters.mdr.tokens import TokenFileStore
from mdr_connector.connector.config import MdrSettings
from mdr_connector.connector.errors import ConnectorError
from mdr_connector.connector.store import Store

CRASH_EXIT_CODE = 17
# The steps of a refresh at which --kill-at stops the process, in their order.
KILL_STEPS = ("before-confirm", "reply-unread", "mid-write", "before-rename", "after-rename")


def crash_after_save() -> None:
    original_save = TokenFileStore.save

    def save_then_die(self: TokenFileStore, pair: object) -> None:
        original_save(self, pair)  # type: ignore[arg-type]
        os._exit(CRASH_EXIT_CODE)

    TokenFileStore.save = save_then_die  # type: ignore[method-assign]


def kill_mid_save() -> None:
    """Make the first write to a temp token file stop halfway, then kill this process with SIGKILL.

    SIGKILL runs no cleanup, as after a power cut or an OOM kill, so the
    partial temp file stays in the token folder.
    """
    original_open, original_write = os.open, os.write
    temp_descriptors: set[int] = set()

    def open_and_record(
        path: str | os.PathLike[str], flags: int, mode: int = 0o777, *, dir_fd: int | None = None
    ) -> int:
        descriptor = original_open(path, flags, mode, dir_fd=dir_fd)
        if os.fspath(path).endswith(".tmp"):
            temp_descriptors.add(descriptor)
        return descriptor

    def write_half_then_die(descriptor: int, data: bytes) -> int:
        if descriptor not in temp_descriptors:
            return original_write(descriptor, data)
        original_write(descriptor, bytes(data[: len(data) // 2]))
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("SIGKILL did not stop the process")

    os.open = open_and_record  # type: ignore[assignment]
    os.write = write_half_then_die  # type: ignore[assignment]


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("SIGKILL did not stop the process")


def kill_at(step: str) -> None:
    """Make this process SIGKILL itself at `step` of the first token refresh.

    before-confirm  session/confirm is about to be sent
    reply-unread    MDR replied to session/confirm (so it applied the exchange), the body is not read yet
    mid-write       half of the new pair is in the temp token file
    before-rename   the temp token file is complete and synced, the rename is next
    after-rename    the new token file is in place, the folder is not synced yet
    """
    if step == "before-confirm":
        original_confirm = MdrClient.confirm_session

        async def confirm_then_die(self: MdrClient, refresh_token: str) -> tuple[str, str]:
            die()
            return await original_confirm(self, refresh_token)

        MdrClient.confirm_session = confirm_then_die  # type: ignore[method-assign]
    elif step == "reply-unread":
        original_read = aiohttp.ClientResponse.read

        async def read_or_die(self: aiohttp.ClientResponse) -> bytes:
            if self.url.path.endswith("/session/confirm"):
                die()
            return await original_read(self)

        aiohttp.ClientResponse.read = read_or_die  # type: ignore[method-assign]
    elif step == "mid-write":
        kill_mid_save()
    elif step == "before-rename":
        original_replace = os.replace

        def die_before_rename(source: str | os.PathLike[str], target: str | os.PathLike[str], **kwargs: object) -> None:
            if os.fspath(source).endswith(".tmp"):
                die()
            original_replace(source, target, **kwargs)  # type: ignore[arg-type]

        os.replace = die_before_rename  # type: ignore[assignment]
    elif step == "after-rename":
        original_replace = os.replace

        def rename_then_die(source: str | os.PathLike[str], target: str | os.PathLike[str], **kwargs: object) -> None:
            original_replace(source, target, **kwargs)  # type: ignore[arg-type]
            if os.fspath(source).endswith(".tmp"):
                die()

        os.replace = rename_then_die  # type: ignore[assignment]


async def wait_for_go(ready: Path, go: Path) -> None:
    ready.touch()
    while not go.exists():
        await asyncio.sleep(0.01)


async def run(args: argparse.Namespace) -> int:
    settings = MdrSettings(
        base_url=args.base_url,
        client_id=args.client_id,
        connection_name=args.connection_name,
        token_dir=Path(args.token_dir),
        timeout_seconds=10,
    )
    storage = None
    if args.database_url:
        store = Store(args.database_url)
        key = base64.urlsafe_b64decode(os.environ["MDR_TEST_TOKEN_KEY"])
        storage = DatabaseTokenStore(store.engine, settings, TokenCipher(key))
    async with MdrClient(settings, token_storage=storage) as client:
        if args.activate:
            status = await client.tokens.activate(Path(args.activate).read_text(encoding="utf-8"))
            print(json.dumps({"state": status.state}))
            return 0
        await client.tokens.access_token()
        if args.ready and args.go:
            await wait_for_go(Path(args.ready), Path(args.go))
        try:
            page = await client.list_incidents()
        except ConnectorError as err:
            print(json.dumps({"error": type(err).__name__, "message": str(err)}))
            return 3
    print(json.dumps({"raw_count": page.raw_count}))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("call", "crash-after-save", "kill-mid-save"))
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--connection-name", required=True)
    parser.add_argument("--token-dir", required=True)
    parser.add_argument("--ready")
    parser.add_argument("--go")
    parser.add_argument("--activate", metavar="FILE")
    parser.add_argument("--kill-at", choices=KILL_STEPS)
    parser.add_argument("--database-url")
    args = parser.parse_args()

    if args.mode == "crash-after-save":
        crash_after_save()
    elif args.mode == "kill-mid-save":
        kill_mid_save()
    if args.kill_at:
        kill_at(args.kill_at)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
