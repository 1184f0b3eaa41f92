"""The pytest plugin for CI users works exactly as docs/testing.md shows it.

The example files are read from the English doc's fenced blocks marked
`title="..."` and run in a separate pytest process, so the documented
example is the tested one.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import pytest
import yaml

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
DOCS = {"en": ROOT / "docs" / "testing.md", "ru": ROOT / "docs" / "ru" / "testing.md"}
TITLED_BLOCK = re.compile(r'^```\w+ title="([^"]+)"\n(.*?)^```$', re.MULTILINE | re.DOTALL)
EXAMPLE_FILES = ("pytest.ini", "conftest.py", "test_incidents.py")
OWN_MAPPING_BLOCK = "conftest.py (own mapping)"


def titled_blocks(path: Path) -> dict[str, str]:
    """Return the fenced blocks of a Markdown file that carry a `title`, by title."""
    return dict(TITLED_BLOCK.findall(path.read_text(encoding="utf-8")))


def write_example(pytester: pytest.Pytester) -> dict[str, str]:
    blocks = titled_blocks(DOCS["en"])
    for name in EXAMPLE_FILES:
        pytester.path.joinpath(name).write_text(blocks[name], encoding="utf-8")
    return blocks


def test_doc_example_passes(pytester: pytest.Pytester) -> None:
    """The documented pytest.ini, conftest.py and test module pass as written."""
    write_example(pytester)

    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")

    result.assert_outcomes(passed=2)


def test_doc_mapping_override_used(pytester: pytest.Pytester) -> None:
    """The documented `mdr_connector_mapping` override makes the engine use the user's mapping file."""
    blocks = write_example(pytester)
    mapping = yaml.safe_load(resources.files("mdr_connector.mappings").joinpath("jira.yaml").read_text(encoding="utf-8"))
    mapping["project"] = "SOC"
    pytester.path.joinpath("mapping.yaml").write_text(yaml.safe_dump(mapping, allow_unicode=True), encoding="utf-8")
    conftest = pytester.path / "conftest.py"
    conftest.write_text(f"{conftest.read_text(encoding='utf-8')}\n\n{blocks[OWN_MAPPING_BLOCK]}", encoding="utf-8")
    pytester.makepyfile(
        test_own_project="""
        import pytest


        @pytest.mark.asyncio
        async def test_ticket_in_own_project(mdr_simulator, memory_tickets, sync_connection):
            mdr_simulator.seed_incident(summary="Own mapping")
            await sync_connection.run_cycle()
            [ticket] = memory_tickets.tickets.values()
            assert ticket.project == "SOC"
        """
    )

    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")

    result.assert_outcomes(passed=3)


def test_doc_example_fails_on_wrong_expectation(pytester: pytest.Pytester) -> None:
    """The documented example can fail: a wrong expected priority makes it fail."""
    write_example(pytester)
    test_file = pytester.path / "test_incidents.py"
    test_file.write_text(test_file.read_text(encoding="utf-8").replace('== "High"', '== "Low"'), encoding="utf-8")

    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")

    result.assert_outcomes(passed=1, failed=1)


def test_doc_twins_show_same_code() -> None:
    """The Russian doc shows the same example files, character for character."""
    english = titled_blocks(DOCS["en"])
    russian = titled_blocks(DOCS["ru"])

    assert set(EXAMPLE_FILES) | {OWN_MAPPING_BLOCK} <= set(english)
    assert russian == english


@pytest.mark.parametrize("language", sorted(DOCS))
def test_doc_links_resolve(language: str) -> None:
    """Every relative link in the testing docs points to an existing file."""
    path = DOCS[language]
    targets = re.findall(r"\]\(([^)\s#]+)[^)\s]*\)", path.read_text(encoding="utf-8"))

    broken = [target for target in targets if not target.startswith("https://") and not (path.parent / target).exists()]

    assert targets
    assert broken == []
