"""The files users copy from: config.example.yaml loads, and the READMEs and docs match the CLI, CI and code."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from mdr_connector.adapters.jira.adapter import MAX_TEXT_LENGTH
from mdr_connector.connector.cli import EXIT_BUSY, EXIT_FAILED, EXIT_OK, EXIT_USAGE, build_parser
from mdr_connector.connector.config import MAX_SECRET_BYTES, load_settings
from mdr_connector.connector.mappingfile import MAX_FIELDS_CHARACTERS, TEMPLATE_FIELDS, Mapping, load_mapping
from mdr_connector.connector.markup import MAX_PANDOC_INPUT_BYTES, PANDOC_TIMEOUT_SECONDS
from mdr_connector.connector.yamlfiles import MAX_DOCUMENT_BYTES, MAX_DOCUMENT_NODES

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


# Each English user doc with its Russian twin.
DOC_TWINS = [
    ("README.md", "README.ru.md"),
    *((f"docs/{name}", f"docs/ru/{name}") for name in ("configuration.md", "how-it-works.md", "jira.md", "security.md")),
]


@pytest.mark.parametrize(("english", "russian"), DOC_TWINS)
def test_doc_twins_show_same_commands(english: str, russian: str) -> None:
    """An English doc and its Russian twin show the same `mdr-connector` command lines."""
    def calls(name: str) -> list[list[str]]:
        return [arguments for line in fenced_lines(ROOT / name) if (arguments := cli_arguments(line))]

    assert calls(english) == calls(russian)


@pytest.mark.parametrize("name", ["docs/configuration.md", "docs/ru/configuration.md"])
def test_placeholder_table_matches_code(name: str) -> None:
    """The placeholder table of the configuration docs lists exactly the names that templates accept."""
    documented = set(re.findall(r"^\| `\{([a-z_]+)\}` \| [^|]+\|$", (ROOT / name).read_text(encoding="utf-8"), re.MULTILINE))

    assert documented == set(TEMPLATE_FIELDS)


# Each limit stated in the docs, with the value the code enforces and its
# spelling in the English and the Russian docs.
DOCUMENTED_LIMITS = [
    (MAX_DOCUMENT_NODES, 10_000, "10,000", "10 000", ("configuration.md", "security.md")),
    (MAX_DOCUMENT_BYTES, 1024 * 1024, "1,048,576", "1 048 576", ("configuration.md",)),
    (MAX_SECRET_BYTES, 64 * 1024, "64 KiB", "64 КиБ", ("configuration.md", "security.md")),
    (MAX_FIELDS_CHARACTERS, 65_536, "65,536", "65 536", ("configuration.md", "security.md")),
    (MAX_TEXT_LENGTH, 32_767, "32,767", "32 767", ("configuration.md", "jira.md", "security.md")),
    (MAX_PANDOC_INPUT_BYTES, 256 * 1024, "256 KiB", "256 КиБ", ("security.md",)),
    (PANDOC_TIMEOUT_SECONDS, 5, "get 5 s", "получают 5 с", ("security.md",)),
]


@pytest.mark.parametrize(("actual", "expected", "english", "russian", "names"), DOCUMENTED_LIMITS)
def test_documented_limit_matches_code(
    actual: float, expected: float, english: str, russian: str, names: tuple[str, ...]
) -> None:
    """A limit the docs state is the one the code enforces, and both languages state it."""
    assert actual == expected
    for name in names:
        assert english in (ROOT / "docs" / name).read_text(encoding="utf-8"), f"docs/{name}"
        assert russian in (ROOT / "docs" / "ru" / name).read_text(encoding="utf-8"), f"docs/ru/{name}"


@pytest.mark.parametrize("name", READMES)
def test_readme_exit_codes_match_cli(name: str) -> None:
    """The exit code table of each README lists the codes the CLI returns."""
    rows = re.findall(r"^\| (\d+) \|", (ROOT / name).read_text(encoding="utf-8"), re.MULTILINE)

    assert [int(code) for code in rows] == [EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BUSY, 130]


def test_mapping_shows_mirror_restricted() -> None:
    """mappings/jira.yaml shows `mirror_restricted` commented out, with the value that applies when it is unset."""
    text = (ROOT / "mappings" / "jira.yaml").read_text(encoding="utf-8")
    commented = "  # mirror_restricted: false\n"
    assert commented in text

    uncommented = Mapping.model_validate(yaml.safe_load(text.replace(commented, "  mirror_restricted: false\n")))

    assert uncommented.comments.mirror_restricted is False
    assert load_mapping("builtin:jira").comments.mirror_restricted is False
