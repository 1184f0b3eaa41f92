"""The hostile corpus itself: enough cases, each named, documented and checkable."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from hostile.corpus import CASES, GROUPS, LOGGED, OUTCOMES, PARKED, Case, cases

MIN_CASES = 40
SOURCES = {
    "MDR incident field",
    "MDR incidents/list page",
    "MDR comment",
    "MDR comments/list reply",
    "MDR attachment name",
    "MDR attachment content",
    "MDR attachment record",
    "MDR response record",
    "Jira comment",
    "Jira attachment name",
    "Jira attachment content",
    "Jira issue field",
    "MDR API reply",
    "Jira API reply",
}


def test_corpus_size() -> None:
    """The corpus has at least 40 cases with unique names, and every group has cases."""
    names = Counter(case.name for case in CASES)
    assert len(CASES) >= MIN_CASES
    assert [name for name, count in names.items() if count > 1] == []
    for group in GROUPS:
        assert cases(group), f"group {group} has no cases"


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_case_documented(case: Case) -> None:
    """Each case names its group, source and outcome, states what is hostile and what must happen, and can be checked."""
    assert re.fullmatch(r"[a-z0-9_]+", case.name)
    assert case.group in GROUPS
    assert case.source in SOURCES
    assert case.outcome in OUTCOMES
    assert case.hostile.strip()
    assert case.expected.strip()
    assert case.payload
    if case.outcome in (PARKED, LOGGED):
        assert case.reason_has, "a parked or logged case must say what its error names"
    for pattern in case.copy_lacks:
        re.compile(pattern)
