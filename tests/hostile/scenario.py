"""Helpers that run one group of the hostile corpus through the engine and check its copies."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from fixtures_sync import SyncHarness

from hostile.corpus import Case
from mdr_connector.connector.engine import INCIDENT, ConnectionSync

# Fresh engines per cycle, as after restarts, and enough clock between them
# for the Jira simulator's 30-second search delay and the parked backoff.
CYCLES = 3
SECONDS_BETWEEN_CYCLES = 31
PROPERTY_KEY = "mdr-connector"
JIRA_MAX_TEXT = 32_767
JIRA_MAX_SUMMARY = 255
MAX_NAME_BYTES = 255


async def run_cycles(harness: SyncHarness, patch: Callable[[ConnectionSync], None] | None = None) -> list[ConnectionSync]:
    """Run CYCLES cycles, each on a fresh engine that `patch` may change first; every cycle must complete."""
    engines = []
    for _cycle in range(CYCLES):
        engine = await harness.engine()
        if patch is not None:
            patch(engine)
        stats = await engine.run_cycle()
        assert stats.cycles == 1
        engines.append(engine)
        harness.advance(SECONDS_BETWEEN_CYCLES)
    return engines


async def parked_reason(harness: SyncHarness, incident_id: str) -> str | None:
    parked = await harness.store.get_parked(harness.connection.name, INCIDENT, incident_id)
    return parked.reason if parked is not None else None


def utf16_length(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def live_wiki(wiki: str) -> str:
    """Return the part of Jira wiki markup that Jira renders: none of it when the whole text is one `{noformat}` block."""
    stripped = wiki.strip()
    if stripped.startswith("{noformat}") and stripped.endswith("{noformat}"):
        return ""
    return wiki


def marker_of(comment: Any) -> dict[str, Any]:
    return comment.properties.get(PROPERTY_KEY, {})


def check_copy(case: Case, copy: str, live: str | None = None) -> None:
    """Assert the case's `copy_has` substrings are in `copy` and its `copy_lacks` patterns are not in `live`."""
    for expected in case.copy_has:
        assert expected in copy, f"{case.name}: {expected!r} missing from the copy {copy[:300]!r}"
    rendered = copy if live is None else live
    for pattern in case.copy_lacks:
        found = re.search(pattern, rendered)
        assert found is None, f"{case.name}: active {found.group(0)!r} reached the other side in {rendered[:300]!r}"


def check_reason(case: Case, reason: str | None, *names: str) -> None:
    """Assert a parked reason exists, names every one of `names` (ids) and contains the case's `reason_has`."""
    assert reason is not None, f"{case.name}: the incident is not parked"
    for name in names:
        assert name in reason, f"{case.name}: the reason does not name {name!r}: {reason[:500]!r}"
    for expected in case.reason_has:
        assert expected in reason, f"{case.name}: {expected!r} missing from the reason {reason[:500]!r}"
