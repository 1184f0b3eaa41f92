"""Attachment files of the simulated Jira site, kept on disk so large files never sit in memory.

The folder is a temporary directory created on first use and removed by
`close()`, or at interpreter exit when `close()` is not called.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mdr_connector.adapters.jira.simulator_state import SimUser

CHUNK_BYTES = 64 * 1024
# Jira Data Center's default attachment size limit. Cloud allows up to 1 GB per file by default.
DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024


@dataclass
class SimAttachment:
    """One file attached to an issue, with its bytes in `path`."""

    id: int
    issue_id: int
    filename: str
    size: int
    mime_type: str
    author: SimUser
    created: datetime
    path: Path


class AttachmentFiles:
    """A temporary folder for attachment bytes, one file per attachment id."""

    def __init__(self) -> None:
        self._folder: tempfile.TemporaryDirectory[str] | None = None

    def path_for(self, attachment_id: int) -> Path:
        """Return where the bytes of `attachment_id` go, creating the folder on first use."""
        if self._folder is None:
            self._folder = tempfile.TemporaryDirectory(prefix="jira-sim-attachments-")
        return Path(self._folder.name) / f"{attachment_id}.bin"

    @property
    def folder(self) -> Path | None:
        return Path(self._folder.name) if self._folder is not None else None

    def close(self) -> None:
        """Remove the folder and every file in it."""
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None


def generated_chunks(size: int) -> Iterator[bytes]:
    """Yield `size` bytes of a repeating 0..255 pattern in chunks, for files made up by tests and benchmarks."""
    block = bytes(range(256)) * (CHUNK_BYTES // 256)
    remaining = size
    while remaining > 0:
        chunk = block[: min(remaining, len(block))]
        remaining -= len(chunk)
        yield chunk
