"""Markers written into comment text, for ticket systems whose comments carry no properties.

ServiceNow journal entries and Redmine notes have no place for hidden
data, so the connector ends each comment it writes with one line such as
`[mdr-connector mdr:4711]`. The line is trusted only on comments written
by the connector's own account: anyone can type it, but only the
connector's account signs its own writes.

    body = with_marker("Isolated the host.", SyncMarker(origin="mdr", source_id="4711"))
    text, marker = split_marker(body)   # ("Isolated the host.", SyncMarker("mdr", "4711"))
"""

from __future__ import annotations

import re

from mdr_connector.connector.tickets import SyncMarker

MARKER_PREFIX = "[mdr-connector "
# Origins are short words. Source ids are MDR or ticket ids with the
# connector's own suffixes (`:deleted`, `attachment:`, response versions).
_ORIGIN = r"[a-z][a-z-]{0,31}"
_SOURCE_ID = r"[A-Za-z0-9._:@-]{1,200}"
_MARKER_LINE = re.compile(r"(?:\r?\n)*\[mdr-connector (" + _ORIGIN + r"):(" + _SOURCE_ID + r")\][ \t]*(?:\r?\n)*\Z")


def with_marker(body: str, marker: SyncMarker) -> str:
    """Return `body` followed by a blank line and the marker line."""
    if not re.fullmatch(_ORIGIN, marker.origin) or not re.fullmatch(_SOURCE_ID, marker.source_id):
        raise ValueError(f"marker {marker.origin}:{marker.source_id} has characters a text marker cannot carry")
    return f"{body.rstrip()}\n\n{MARKER_PREFIX}{marker.origin}:{marker.source_id}]"


def split_marker(text: str) -> tuple[str, SyncMarker | None]:
    """Split a comment's text into its body and the marker on its last line, if it ends with one."""
    match = _MARKER_LINE.search(text)
    if match is None:
        return text, None
    return text[: match.start()].rstrip(), SyncMarker(origin=match.group(1), source_id=match.group(2))
