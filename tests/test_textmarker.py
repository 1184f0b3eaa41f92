"""Markers on the last line of comment text, for ServiceNow journal entries and Redmine notes."""

from __future__ import annotations

import pytest

from mdr_connector.adapters.textmarker import split_marker, with_marker
from mdr_connector.connector.tickets import SyncMarker


@pytest.mark.parametrize(
    "marker",
    [
        SyncMarker(origin="mdr", source_id="4711"),
        SyncMarker(origin="mdr-notice", source_id="attachment:981"),
        SyncMarker(origin="mdr-notice", source_id="c0ffee-12:deleted"),
        SyncMarker(origin="mdr-response", source_id="r-1.0a1b2c3d4e5f"),
    ],
)
def test_marker_round_trip(marker: SyncMarker) -> None:
    """The body and the marker come back as written, whatever the line endings the system adds."""
    body = with_marker("Isolated the host.\n\nПодробности 🙂\n", marker)

    assert split_marker(body) == ("Isolated the host.\n\nПодробности 🙂", marker)
    assert split_marker(body.replace("\n", "\r\n") + "\r\n") == ("Isolated the host.\r\n\r\nПодробности 🙂", marker)


@pytest.mark.parametrize(
    "text",
    [
        "no marker here",
        "quoted [mdr-connector mdr:1] in the middle of a line",
        "[mdr-connector mdr:1]\n\nthen more text",
        "[mdr-connector MDR:1]",
        "[mdr-connector mdr:1 2]",
        "[mdr-connector mdr:]",
    ],
)
def test_text_without_a_final_marker_line_has_none(text: str) -> None:
    """Only a well-formed marker on the last line counts."""
    assert split_marker(text) == (text, None)


@pytest.mark.parametrize("source_id", ["a]b", "with space", "x" * 201, "new\nline"])
def test_marker_refuses_ids_it_cannot_carry(source_id: str) -> None:
    """An id that would break the marker line is refused instead of written half-readable."""
    with pytest.raises(ValueError, match="cannot carry"):
        with_marker("body", SyncMarker(origin="mdr", source_id=source_id))
