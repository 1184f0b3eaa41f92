"""Attachment contents of the MDR simulator, kept as files so a large file never sits in memory."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path

CHUNK_BYTES = 256 * 1024


class BlobStore:
    """Files in a temporary folder of one simulator, one per attachment id.

    The folder is made on first use and removed by `close`, or when the
    store is garbage-collected or the interpreter exits without a `close`.
    """

    def __init__(self) -> None:
        self._folder: Path | None = None
        self._cleanup: weakref.finalize | None = None

    def folder(self) -> Path:
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="mdr-sim-attachments-"))
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._folder, ignore_errors=True)
        return self._folder

    def path(self, blob_id: str) -> Path:
        """Return the file of a blob; the id is made by the simulator and is safe as a file name."""
        return self.folder() / f"{blob_id}.bin"

    def size(self, blob_id: str) -> int:
        return self.path(blob_id).stat().st_size

    def write_bytes(self, blob_id: str, content: bytes) -> int:
        self.path(blob_id).write_bytes(content)
        return len(content)

    def write_generated(self, blob_id: str, size: int) -> int:
        """Write `size` bytes of filler, in chunks, so memory use does not grow with the size."""
        return write_filler(self.path(blob_id), size)

    def adopt(self, blob_id: str, source: Path) -> int:
        """Move a file written elsewhere in this store, such as an upload, under a blob id."""
        target = self.path(blob_id)
        os.replace(source, target)
        return target.stat().st_size

    def new_temporary(self) -> Path:
        """Create an empty file in the store's folder for a blob still being written."""
        descriptor, name = tempfile.mkstemp(dir=self.folder(), prefix="incoming-", suffix=".part")
        os.close(descriptor)
        return Path(name)

    def read_chunks(self, blob_id: str, limit: int | None = None) -> Iterator[bytes]:
        """Yield the blob in chunks, stopping after `limit` bytes when one is given."""
        remaining = self.size(blob_id) if limit is None else limit
        with self.path(blob_id).open("rb") as handle:
            while remaining > 0:
                chunk = handle.read(min(CHUNK_BYTES, remaining))
                if not chunk:
                    return
                remaining -= len(chunk)
                yield chunk

    def close(self) -> None:
        """Remove the folder and every blob in it."""
        if self._cleanup is not None:
            self._cleanup()
        self._folder = None
        self._cleanup = None


def write_filler(path: Path, size: int) -> int:
    """Write `size` bytes of `generated_chunks` filler to `path`, one chunk at a time."""
    if size < 0:
        raise ValueError(f"size must be 0 or more bytes, got {size}")
    with path.open("wb") as handle:
        for chunk in generated_chunks(size):
            handle.write(chunk)
    return size


def generated_chunks(size: int) -> Iterator[bytes]:
    """Yield `size` bytes of repeatable filler: a random block, repeated; the same size gives the same bytes."""
    block = random.Random(size).randbytes(CHUNK_BYTES)
    full, rest = divmod(size, CHUNK_BYTES)
    for _ in range(full):
        yield block
    if rest:
        yield block[:rest]
