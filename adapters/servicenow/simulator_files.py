"""Attachment files of the simulated ServiceNow instance, kept on disk so large files never sit in memory.

The folder is a temporary directory created on first use and removed by
`close()`, or at interpreter exit when `close()` is not called.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CHUNK_BYTES = 64 * 1024
# com.glide.attachment.max_size defaults to 1024 MB on a real instance.
DEFAULT_MAX_BYTES = 1024 * 1024 * 1024


@dataclass
class SimAttachment:
    """One attachment: its sys_attachment row, and where its bytes are."""

    record: dict[str, str]
    path: Path

    @property
    def sys_id(self) -> str:
        return self.record["sys_id"]

    @property
    def size(self) -> int:
        return int(self.record["size_bytes"])

    @property
    def sha256(self) -> str:
        return self.record["hash"]


class AttachmentFiles:
    """A temporary folder for attachment bytes, one file per attachment sys_id."""

    def __init__(self) -> None:
        self._folder: tempfile.TemporaryDirectory[str] | None = None

    def path_for(self, sys_id: str) -> Path:
        """Return where the bytes of `sys_id` go, creating the folder on first use."""
        if self._folder is None:
            self._folder = tempfile.TemporaryDirectory(prefix="servicenow-sim-attachments-")
        return Path(self._folder.name) / f"{sys_id}.bin"

    @property
    def folder(self) -> Path | None:
        return Path(self._folder.name) if self._folder is not None else None

    def close(self) -> None:
        """Remove the folder and every file in it."""
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None


class SpoolWriter:
    """Write an upload to disk chunk by chunk, counting its size and hashing it, up to a byte limit.

    Bytes past the limit are counted but not written, so the caller can read
    the rest of the request and still reply with an error instead of
    dropping the connection.
    """

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.size = 0
        self._digest = hashlib.sha256()
        self._file = path.open("wb")

    @property
    def too_large(self) -> bool:
        return self.size > self.max_bytes

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.too_large:
            return
        self._file.write(chunk)
        self._digest.update(chunk)

    def close(self) -> None:
        self._file.close()

    def discard(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


def generated_chunks(size: int) -> Iterator[bytes]:
    """Yield `size` bytes of a repeating 0..255 pattern in chunks, for files made up by tests and benchmarks."""
    block = bytes(range(256)) * (CHUNK_BYTES // 256)
    remaining = size
    while remaining > 0:
        chunk = block[: min(remaining, len(block))]
        remaining -= len(chunk)
        yield chunk
