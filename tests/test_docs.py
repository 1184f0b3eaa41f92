"""The files users copy from: config.example.yaml loads, and the READMEs match the CLI and CI."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from mdr_connector.connector.cli import build_parser
from mdr_connector.connector.config import load_mapping, load_settings

ROOT = Path(__file__).resolve().parents[1]
READMES = ("README.md", "README.ru.md")
USER_DOCS = (
    *READMES,
    *(f"docs/{name}" for name in ("configuration.md", "how-it-works.md", "jira.md", "security.md")),
    *(f"docs/ru/{name}" for name in ("configuration.md", "how-it-works.md", "jira.md", "security.md")),
)
# An `mdr-connector` call in a shell line: at the start, after a pipe, or as a path ending in /bin/.
CLI_CALL = re.compile(r"(?:^|\|\s*|/bin/)mdr-connector\s+(\S.*)$")
SHELL_SEPARATORS = ("||", "&&", "|", ";", "<", ">", "#", "2>")


def fenced_lines(path: Path) -> list[str]:
    """Return the lines inside the ``` fenced blocks of a Markdown file."""
    lines: list[str] = []
    inside = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
            continue
        if inside:
            lines.append(line.strip())
    return lines


def cli_arguments(line: str) -> list[str] | None:
    """Return the arguments of an `mdr-connector` call in a shell line, or None when there is none."""
    match = CLI_CALL.search(line.removeprefix("$ "))
    if match is None:
        return None
    arguments = match.group(1)
    for separator in SHELL_SEPARATORS:
        arguments = arguments.split(f" {separator}", 1)[0]
    return shlex.split(arguments)


def ci_test_command() -> str:
    """Return the command that .ci/run executes."""
    commands = [
        line.removeprefix("exec ").strip()
        for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
        if line.startswith("exec ")
    ]
    assert len(commands) == 1, f".ci/run should have one exec line, found {commands}"
    return commands[0]


def test_example_config_loads() -> None:
    """config.example.yaml passes validation, and its values are the documented ones."""
    settings = load_settings(ROOT / "config.example.yaml")
    connection = settings.connection(None)

    assert connection.name == "main"
    assert settings.data_dir == ROOT / "data"
    assert settings.database_url is None
    assert connection.mdr.base_url == "https://mdr.kaspersky.com/api/v1"
    assert connection.mdr.token_dir == ROOT / "tokens"
    assert connection.mdr.tls_verify is True
    assert connection.ticket.url == "https://example.atlassian.net"
    assert connection.ticket.auth.type == "api_token"
    assert connection.ticket.auth.token.env == "JIRA_API_TOKEN"
    assert connection.ticket.search_delay_seconds is None
    assert connection.mapping == "builtin:jira"
    assert connection.sync.mode == "updated"
    assert connection.sync.start.lookback_days == 7


def test_example_config_mapping_loads() -> None:
    """The mapping that config.example.yaml names loads."""
    connection = load_settings(ROOT / "config.example.yaml").connection(None)

    mapping = load_mapping(connection.mapping)

    assert mapping.project == "SEC"


@pytest.mark.parametrize("name", READMES)
def test_readme_shows_ci_test_command(name: str) -> None:
    """Each README shows, in a code block, the very command that CI runs."""
    command = ci_test_command()

    assert command == "python3 dev.py test"
    assert command in fenced_lines(ROOT / name)


@pytest.mark.parametrize("name", USER_DOCS)
def test_doc_commands_parse(name: str) -> None:
    """Every `mdr-connector` call in a code block of the user docs is accepted by the CLI parser."""
    parser = build_parser()
    calls = [arguments for line in fenced_lines(ROOT / name) if (arguments := cli_arguments(line))]
    rejected = []
    for arguments in calls:
        try:
            parser.parse_args(arguments)
        except SystemExit as stop:
            if stop.code != 0:  # 0 is a --help call
                rejected.append(shlex.join(arguments))

    assert rejected == []


def test_cli_call_pattern() -> None:
    """The pattern finds calls at the start, after a pipe and after /bin/, and cuts shell operators."""
    assert cli_arguments("mdr-connector --config c.yaml check") == ["--config", "c.yaml", "check"]
    assert cli_arguments("cat t | mdr-connector token activate") == ["token", "activate"]
    assert cli_arguments("ExecStart=/opt/x/bin/mdr-connector run") == ["run"]
    assert cli_arguments("/v/bin/mdr-connector sync --once || true") == ["sync", "--once"]
    assert cli_arguments("cd mdr-connector") is None


def heading_anchors(path: Path) -> set[str]:
    """Return the anchors that GitHub generates for the headings of a Markdown file."""
    anchors = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            text = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("name", USER_DOCS)
def test_doc_links_resolve(name: str) -> None:
    """Every relative link in the user docs points to an existing file and heading."""
    path = ROOT / name
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text(encoding="utf-8")):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.is_file() and anchor not in heading_anchors(linked):
            broken.append(target)

    assert broken == []
