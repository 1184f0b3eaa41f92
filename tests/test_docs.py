"""The files users copy from: config.example.yaml loads, and the READMEs and docs match the CLI, CI and code."""

from __future__ import annotations

import ast
import inspect
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args, get_type_hints

import pytest
import yaml
from aiohttp import web
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from mdr_connector.adapters.jira import simulator as jira_simulator
from mdr_connector.adapters.jira.adapter import MAX_TEXT_LENGTH
from mdr_connector.adapters.mdr import simulator as mdr_simulator
from mdr_connector.adapters.servicenow import simulator as servicenow_simulator
from mdr_connector.connector.cli import EXIT_BROKEN_PIPE, EXIT_BUSY, EXIT_FAILED, EXIT_OK, EXIT_USAGE, build_parser
from mdr_connector.connector.cli_status import REFRESH_EXPIRING, TOKEN_EXPIRED, TOKEN_PENDING, TOKEN_UNREADABLE
from mdr_connector.connector.config import (
    MAX_SECRET_BYTES,
    ConnectionSettings,
    JiraSettings,
    RedmineSettings,
    ServiceNowSettings,
    MdrSettings,
    SecretRef,
    Settings,
    SyncSettings,
    load_settings,
)
from mdr_connector.connector.mappingfile import (
    MAX_FIELDS_CHARACTERS,
    TEMPLATE_FIELDS,
    AttachmentRules,
    CommentFormat,
    IncidentCreation,
    Mapping,
    ResponseRules,
    Route,
    StatusRules,
    load_mapping,
)
from mdr_connector.connector.errors import ConfigError, MisconfiguredError, RateLimitedError, RejectedError
from mdr_connector.connector.markup import MAX_PANDOC_INPUT_BYTES, PANDOC_TIMEOUT_SECONDS
from mdr_connector.connector.observability import METRICS, SYNCED_COUNTERS, error_class
from mdr_connector.connector.yamlfiles import MAX_DOCUMENT_BYTES, MAX_DOCUMENT_NODES

ROOT = Path(__file__).resolve().parents[1]
READMES = ("README.md", "README.ru.md")
USER_DOCS = (
    *READMES,
    *(f"docs/{name}" for name in ("benchmarks.md", "configuration.md", "how-it-works.md", "jira.md", "operations.md", "redmine.md", "security.md", "servicenow.md", "simulators.md", "testing.md")),
    *(f"docs/ru/{name}" for name in ("benchmarks.md", "configuration.md", "how-it-works.md", "jira.md", "operations.md", "redmine.md", "security.md", "servicenow.md", "simulators.md", "testing.md")),
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
    *((f"docs/{name}", f"docs/ru/{name}") for name in ("benchmarks.md", "configuration.md", "how-it-works.md", "jira.md", "operations.md", "redmine.md", "security.md", "servicenow.md", "simulators.md", "testing.md")),
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

    assert [int(code) for code in rows] == [EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BUSY, 130, EXIT_BROKEN_PIPE]


def test_mapping_shows_mirror_restricted() -> None:
    """mappings/jira.yaml shows `mirror_restricted` commented out, with the value that applies when it is unset."""
    text = (ROOT / "mappings" / "jira.yaml").read_text(encoding="utf-8")
    commented = "  # mirror_restricted: false\n"
    assert commented in text

    uncommented = Mapping.model_validate(yaml.safe_load(text.replace(commented, "  mirror_restricted: false\n")))

    assert uncommented.comments.mirror_restricted is False
    assert load_mapping("builtin:jira").comments.mirror_restricted is False


# The simulator page and the simulators it documents.
SIMULATOR_DOCS = ("docs/simulators.md", "docs/ru/simulators.md")
HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
# A control route in a Markdown table row: | `METHOD` | `/_sim/...` |
ROUTE_ROW = re.compile(r"^\| `(" + "|".join(HTTP_METHODS) + r")` \| `(/_sim/[^`]*)` \|")
CURL_URL = re.compile(r"http://127\.0\.0\.1:(\d+)(/_sim/[^\s'\"]*)")
# A curl command at the start of a shell line or inside `NAME=$(...)`, up to the first pipe.
CURL_COMMAND = re.compile(r"(?:^|\$\()(curl [^|]*)")
SIM_PATH = re.compile(r"/_sim/[A-Za-z0-9_{}$/.-]*[A-Za-z0-9_}$]")


def control_routes(app: web.Application) -> set[tuple[str, str]]:
    """Return the (method, path pattern) pairs of an app's `/_sim/` routes, without aiohttp's implicit HEAD."""
    routes = set()
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if path.startswith("/_sim/") and route.method != "HEAD":
            routes.add((route.method, path))
    return routes


SIMULATOR_ROUTES = {
    "mdr": control_routes(mdr_simulator.make_app(mdr_simulator.MdrSimulator())),
    "jira": control_routes(jira_simulator.make_app(jira_simulator.JiraSimulator())),
    "servicenow": control_routes(servicenow_simulator.make_app(servicenow_simulator.ServiceNowSimulator())),
}


def route_pattern(path: str) -> re.Pattern[str]:
    """Turn a route path such as `/_sim/issues/{issue}` into a regex that matches concrete paths."""
    return re.compile(re.sub(r"\\{[a-z_]+\\}", "[^/]+", re.escape(path)) + "$")


def matching_route(path: str, routes: set[tuple[str, str]]) -> set[str]:
    """Return the methods of the routes whose pattern matches a concrete or templated path."""
    concrete = re.sub(r"\$\{?[A-Za-z_]+\}?", "value", path)
    return {method for method, pattern in routes if route_pattern(pattern).match(concrete)}


def table_routes(text: str) -> dict[str, set[tuple[str, str]]]:
    """Return the control routes listed in the tables of each `## ... MDR ...`, `## ... Jira ...` and `## ... ServiceNow ...` section."""
    listed: dict[str, set[tuple[str, str]]] = {name: set() for name in SIMULATOR_ROUTES}
    section = None
    for line in text.splitlines():
        if line.startswith("## "):
            names = [name for name in SIMULATOR_ROUTES if name in line.lower()]
            section = names[0] if len(names) == 1 else None
        row = ROUTE_ROW.match(line)
        if row:
            assert section is not None, f"route row outside an MDR, Jira or ServiceNow section: {line}"
            listed[section].add((row.group(1), row.group(2)))
    return listed


def simulator_ports(path: Path) -> dict[str, str]:
    """Map each port in a doc's `mdr-connector simulate SYSTEM --port N` lines to its simulator."""
    ports = {}
    for line in fenced_lines(path):
        arguments = cli_arguments(line)
        if arguments and arguments[:1] == ["simulate"] and "--port" in arguments:
            ports[arguments[arguments.index("--port") + 1]] = arguments[1]
    return ports


def curl_requests(path: Path) -> list[tuple[str, str, str]]:
    """Return (port, method, path) of every curl call to a `/_sim/` URL in the code blocks of a doc."""
    requests = []
    for line in fenced_lines(path):
        command = CURL_COMMAND.search(line)
        url = CURL_URL.search(command.group(1)) if command else None
        if command is None or url is None:
            continue
        words = shlex.split(command.group(1).rstrip(") "))  # `)` closes a `$(curl ...)` without a pipe
        if "-X" in words:
            method = words[words.index("-X") + 1]
        else:
            method = "POST" if "-d" in words else "GET"
        requests.append((url.group(1), method, url.group(2)))
    return requests


def yaml_blocks(path: Path) -> list[str]:
    """Return the text of the ```yaml blocks of a Markdown file, in order."""
    return re.findall(r"^```yaml\n(.*?)^```", path.read_text(encoding="utf-8"), re.MULTILINE | re.DOTALL)


@pytest.mark.parametrize("name", SIMULATOR_DOCS)
def test_simulator_doc_tables_match_routers(name: str) -> None:
    """The control route tables list exactly the `/_sim/` routes that each simulator app serves."""
    listed = table_routes((ROOT / name).read_text(encoding="utf-8"))

    assert listed["mdr"] == SIMULATOR_ROUTES["mdr"]
    assert listed["jira"] == SIMULATOR_ROUTES["jira"]
    assert listed["servicenow"] == SIMULATOR_ROUTES["servicenow"]


@pytest.mark.parametrize("name", SIMULATOR_DOCS)
def test_simulator_doc_curls_hit_routes(name: str) -> None:
    """Every curl example calls a `/_sim/` route that the simulator on that port serves with that method."""
    path = ROOT / name
    ports = simulator_ports(path)
    requests = curl_requests(path)
    assert sorted(ports.values()) == ["jira", "mdr", "servicenow"]
    assert len(requests) > 20, "the curl scan found too few examples"

    unknown = [
        f"{method} {url_path} (port {port})"
        for port, method, url_path in requests
        if method not in matching_route(url_path, SIMULATOR_ROUTES[ports[port]])
    ]

    assert unknown == []


@pytest.mark.parametrize("name", SIMULATOR_DOCS)
def test_simulator_doc_paths_exist(name: str) -> None:
    """Every `/_sim/` path named anywhere in the page, prose included, is a route of one of the simulators."""
    every_route = set().union(*SIMULATOR_ROUTES.values())
    paths = set(SIM_PATH.findall((ROOT / name).read_text(encoding="utf-8")))
    assert len(paths) > 10, "the path scan found too few paths"

    unknown = sorted(path for path in paths if not matching_route(path, every_route))

    assert unknown == []


@pytest.mark.parametrize("name", SIMULATOR_DOCS)
def test_simulator_doc_config_loads(name: str, tmp_path: Path) -> None:
    """The page's config loads, and its values are the simulators' defaults and credentials."""
    blocks = yaml_blocks(ROOT / name)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(blocks[0], encoding="utf-8")

    connection = load_settings(config_path).connection(None)

    serve_defaults = inspect.signature(mdr_simulator.serve).parameters
    assert connection.mdr.base_url == "http://127.0.0.1:8480" + mdr_simulator.API_PREFIX
    assert connection.mdr.client_id == serve_defaults["client_id"].default
    assert connection.mdr.connection_name == serve_defaults["connection_name"].default
    assert connection.mdr.token_dir == tmp_path / "tokens"
    assert connection.ticket.url == "http://127.0.0.1:8089"
    assert connection.ticket.auth.type == "api_token"
    assert connection.ticket.auth.email == jira_simulator.SERVICE_EMAIL
    assert connection.ticket.auth.token.file == tmp_path / "jira-api-token"
    assert load_mapping(connection.mapping).project in jira_simulator.JiraSimulator().projects


@pytest.mark.parametrize("name", SIMULATOR_DOCS)
def test_simulator_doc_datacenter_auth_loads(name: str, tmp_path: Path) -> None:
    """The page's Data Center `auth` block, put in place of the Cloud one, loads as a personal access token."""
    blocks = yaml_blocks(ROOT / name)
    config, datacenter_auth = blocks[0], blocks[1]
    cloud_auth = re.search(r"^      auth:\n(?:        .*\n)+", config, re.MULTILINE)
    assert cloud_auth is not None
    config_path = tmp_path / "config.yaml"
    config_path.write_text(config.replace(cloud_auth.group(0), datacenter_auth), encoding="utf-8")

    connection = load_settings(config_path).connection(None)

    assert connection.ticket.auth.type == "pat"
    assert connection.ticket.auth.token.file == tmp_path / "jira-pat"


@pytest.mark.parametrize("name", SIMULATOR_DOCS)
def test_simulator_doc_names_credentials(name: str) -> None:
    """The page names the credentials that the simulators accept."""
    text = (ROOT / name).read_text(encoding="utf-8")

    for credential in (
        jira_simulator.SERVICE_EMAIL,
        jira_simulator.SERVICE_TOKEN,
        jira_simulator.SERVICE_PAT,
        jira_simulator.SERVICE_PASSWORD,
        jira_simulator.SERVICE_NAME,
        jira_simulator.HUMAN_NAME,
        inspect.signature(mdr_simulator.serve).parameters["client_id"].default,
        servicenow_simulator.SERVICE_USER,
        servicenow_simulator.SERVICE_PASSWORD,
        servicenow_simulator.OAUTH_CLIENT_ID,
        servicenow_simulator.OAUTH_CLIENT_SECRET,
        servicenow_simulator.HUMAN_USER,
    ):
        assert f"`{credential}`" in text, credential


# The word for the JSON type of an MDR setting, per simulator page.
MDR_SETTING_TYPE_WORDS = {
    "docs/simulators.md": {int: "integer", float: "number", bool: "boolean", str: "string"},
    "docs/ru/simulators.md": {int: "целое", float: "число", bool: "логическое", str: "строка"},
}
# The heading of each settings section: (MDR, Jira, ServiceNow) per page.
SETTINGS_HEADINGS = {
    "docs/simulators.md": ("### MDR settings", "### Jira settings", "### ServiceNow settings"),
    "docs/ru/simulators.md": ("### Настройки MDR", "### Настройки Jira", "### Настройки ServiceNow"),
}


def section_rows(text: str, heading: str) -> dict[str, list[str]]:
    """Return the table rows under `heading`, up to the next heading, keyed by the `name` in their first cell."""
    section = text.split(heading + "\n", 1)[1]
    section = re.split(r"^#{2,3} ", section, maxsplit=1, flags=re.MULTILINE)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        name = re.fullmatch(r"`([a-z_]+)`", cells[0])
        if line.startswith("| `") and name:
            rows[name.group(1)] = cells[1:]
    return rows


@pytest.mark.parametrize("name", SIMULATOR_DOCS)
def test_simulator_doc_mdr_setting_types(name: str) -> None:
    """The MDR settings table lists every setting with the JSON type that `PATCH /_sim/settings` accepts."""
    rows = section_rows((ROOT / name).read_text(encoding="utf-8"), SETTINGS_HEADINGS[name][0])
    words = MDR_SETTING_TYPE_WORDS[name]

    documented = {setting: cells[0] for setting, cells in rows.items()}
    expected = {setting: words[kind] for setting, kind in get_type_hints(mdr_simulator.SimulatorSettings).items()}

    assert documented == expected


@pytest.mark.parametrize("name", SIMULATOR_DOCS)
def test_simulator_doc_jira_settings_listed(name: str) -> None:
    """The Jira settings table lists exactly the settings that `PUT /_sim/settings` accepts."""
    rows = section_rows((ROOT / name).read_text(encoding="utf-8"), SETTINGS_HEADINGS[name][1])

    assert set(rows) == set(vars(jira_simulator.JiraSimulator().settings))


@pytest.mark.parametrize("name", SIMULATOR_DOCS)
def test_simulator_doc_servicenow_settings_listed(name: str) -> None:
    """The ServiceNow settings table lists exactly the settings that `PUT /_sim/settings` accepts."""
    rows = section_rows((ROOT / name).read_text(encoding="utf-8"), SETTINGS_HEADINGS[name][2])

    assert set(rows) == set(vars(servicenow_simulator.ServiceNowSimulator().settings))


@pytest.mark.parametrize("name", SIMULATOR_DOCS)
def test_simulator_doc_servicenow_config_loads(name: str, tmp_path: Path) -> None:
    """The page's ServiceNow `ticket` section, and its OAuth `auth` block, load with the simulator's credentials."""
    blocks = yaml_blocks(ROOT / name)
    config, ticket, oauth = blocks[0], blocks[2], blocks[3]
    jira_ticket = re.search(r"^    ticket:\n(?:      .*\n)+", config, re.MULTILINE)
    basic_auth = re.search(r"^      auth:\n(?:        .*\n)+", ticket, re.MULTILINE)
    assert jira_ticket is not None
    assert basic_auth is not None
    basic_path = tmp_path / "basic.yaml"
    basic_path.write_text(config.replace(jira_ticket.group(0), ticket), encoding="utf-8")
    oauth_path = tmp_path / "oauth.yaml"
    oauth_path.write_text(config.replace(jira_ticket.group(0), ticket.replace(basic_auth.group(0), oauth)), encoding="utf-8")

    basic = load_settings(basic_path).connection(None).ticket
    client = load_settings(oauth_path).connection(None).ticket

    assert basic.system == "servicenow"
    assert basic.url == "http://127.0.0.1:8090"
    assert basic.auth.username == servicenow_simulator.SERVICE_USER
    assert basic.auth.password.file == tmp_path / "servicenow-password"
    assert client.auth.type == "oauth_client_credentials"
    assert client.auth.client_id == servicenow_simulator.OAUTH_CLIENT_ID
    assert client.auth.username == servicenow_simulator.SERVICE_USER


# The configuration reference: every key of the config and mapping models, in
# the section of docs/configuration.md that documents its model.
#
# A model listed here has a section of its own: the field that contains it is a
# row of the parent's table, and its own keys are rows of its section, written
# with the prefix given. Every other nested model is documented in its
# parent's section, with its keys as dotted paths such as `log.level`.
DOCUMENTED_MODELS: dict[type[BaseModel], tuple[str, str, str]] = {
    Settings: ("## Top-level keys", "## Ключи верхнего уровня", ""),
    SecretRef: ("## Secrets", "## Секреты", ""),
    ConnectionSettings: ("## Connection keys", "## Ключи подключения", ""),
    MdrSettings: ("### `mdr`", "### `mdr`", ""),
    JiraSettings: ("### `ticket`", "### `ticket`", ""),
    ServiceNowSettings: ("### `ticket` for ServiceNow", "### `ticket` для ServiceNow", ""),
    RedmineSettings: ("### `ticket` for Redmine", "### `ticket` для Redmine", ""),
    SyncSettings: ("### `sync`", "### `sync`", ""),
    Mapping: ("## The mapping file", "## Файл маппинга", ""),
    Route: ("### Tenant routing", "### Маршрутизация по тенантам", ""),
    CommentFormat: ("### Comments", "### Комментарии", ""),
    AttachmentRules: ("### Attachments and responses", "### Вложения и действия по реагированию", "attachments."),
    ResponseRules: ("### Attachments and responses", "### Вложения и действия по реагированию", "responses."),
    StatusRules: ("### Status", "### Статус", "status."),
    IncidentCreation: ("### Incidents from tickets", "### Инциденты из тикетов", "create_incidents."),
}
CONFIG_DOCS = {"docs/configuration.md": 0, "docs/ru/configuration.md": 1}
# How each language writes a default of None and a required key, and the header of the key and default columns.
CONFIG_DOC_WORDS = {
    "docs/configuration.md": {"unset": {"unset"}, "required": {"required"}, "key": "Key", "default": "Default"},
    "docs/ru/configuration.md": {
        "unset": {"не задан", "не задано", "не задана"},
        "required": {"обязателен", "обязательно", "обязательна"},
        "key": "Ключ",
        "default": "По умолчанию",
    },
}


@dataclass(frozen=True)
class DocumentedKey:
    """A key the configuration reference documents: its section heading, its spelling there and its field."""

    heading: str
    key: str
    field: FieldInfo
    # False for a key whose nested model is documented key by key, such as `log`: its own row may be left out.
    needs_row: bool = True


def nested_models(annotation: Any) -> list[type[BaseModel]]:
    """Return the pydantic models inside a field type: itself, the members of a union, the items of a list."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    models: list[type[BaseModel]] = []
    for argument in get_args(annotation):
        for model in nested_models(argument):
            if model not in models:
                models.append(model)
    return models


def documented_keys(model: type[BaseModel], language: int, heading: str = "", prefix: str = "") -> list[DocumentedKey]:
    """Walk `model` and the models below it, and return every key with the section it belongs in."""
    if model in DOCUMENTED_MODELS:
        heading, prefix = DOCUMENTED_MODELS[model][language], DOCUMENTED_MODELS[model][2]
    keys = []
    for name, field in model.model_fields.items():
        key = prefix + name
        models = nested_models(field.annotation)
        own_section = [nested for nested in models if nested in DOCUMENTED_MODELS]
        inline = [nested for nested in models if nested not in DOCUMENTED_MODELS]
        keys.append(DocumentedKey(heading, key, field, needs_row=not inline or bool(own_section)))
        for nested in own_section:
            keys += documented_keys(nested, language)
        for nested in inline:
            keys += documented_keys(nested, language, heading, key + ".")
    return keys


def model_keys(language: int) -> dict[tuple[str, str], DocumentedKey]:
    """Return the keys of the config and the mapping models by (section heading, key). Union members share keys."""
    keys: dict[tuple[str, str], DocumentedKey] = {}
    for root in (Settings, Mapping):
        for documented in documented_keys(root, language):
            known = keys.get((documented.heading, documented.key))
            if known is None or documented.needs_row:
                keys[(documented.heading, documented.key)] = documented
    return keys


def section_text(text: str, heading: str) -> str:
    """Return the lines under `heading` up to the next heading of any level."""
    lines = text.splitlines()
    assert heading in lines, f"heading {heading!r} is missing"
    section = []
    for line in lines[lines.index(heading) + 1:]:
        if line.startswith("#"):
            break
        section.append(line)
    return "\n".join(section)


def table_cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def key_rows(section: str, words: dict[str, Any]) -> dict[str, str]:
    """Return the default cell of each row of the key tables in a section, by the key in the first cell."""
    rows: dict[str, str] = {}
    default_column = None
    for line in section.splitlines():
        if not line.startswith("|"):
            default_column = None
            continue
        cells = table_cells(line)
        if cells[0] == words["key"]:
            default_column = cells.index(words["default"])
            continue
        if default_column is None or set(cells[0]) <= {"-", ":"}:
            continue
        key = re.fullmatch(r"`([a-z_][a-z0-9_.]*)`", cells[0])
        assert key is not None, f"a key row must name one key in backticks: {line}"
        assert key.group(1) not in rows, f"{key.group(1)} has two rows"
        rows[key.group(1)] = cells[default_column]
    return rows


def documented_default(cell: str, default: Any, words: dict[str, Any]) -> bool:
    """Tell whether a default cell states `default`, for the kinds of default that a cell can state exactly.

    A default built by a factory into a model (a whole section of defaults) is
    not checked. Every other default must be stated exactly.
    """
    tokens = re.findall(r"`([^`]*)`", cell)
    if default is None:
        return cell in words["unset"]
    if isinstance(default, BaseModel):
        return True
    if isinstance(default, list) and default:
        return tokens == [str(item) for item in default]
    if not cell.startswith("`"):
        return False
    if isinstance(default, bool):
        return tokens[0] == str(default).lower()
    if isinstance(default, int | float):
        return float(tokens[0]) == float(default)
    if isinstance(default, str | Path):
        return tokens[0] == (str(default) if str(default) else '""')
    if isinstance(default, list | dict):
        return tokens[0] == ("[]" if isinstance(default, list) else "{}")
    raise AssertionError(f"no rule to document a default of type {type(default).__name__}: {default!r}")


def model_default(field: FieldInfo) -> Any:
    if field.default_factory is not None:
        return field.default_factory()  # type: ignore[call-arg]
    return field.default


@pytest.mark.parametrize("name", list(CONFIG_DOCS))
def test_config_doc_lists_every_key(name: str) -> None:
    """Each key of the config and mapping models has a row in its section of the configuration reference."""
    text = (ROOT / name).read_text(encoding="utf-8")
    words = CONFIG_DOC_WORDS[name]
    keys = model_keys(CONFIG_DOCS[name])
    headings = {heading for heading, _ in keys}
    rows = {heading: key_rows(section_text(text, heading), words) for heading in headings}

    missing = sorted(f"{heading}: {key}" for (heading, key), documented in keys.items()
                     if documented.needs_row and key not in rows[heading])

    assert missing == [], "keys without a row: " + ", ".join(missing)


@pytest.mark.parametrize("name", list(CONFIG_DOCS))
def test_config_doc_rows_are_keys(name: str) -> None:
    """Each key row of a section of the configuration reference names a key of the model it documents."""
    text = (ROOT / name).read_text(encoding="utf-8")
    keys = model_keys(CONFIG_DOCS[name])
    headings = {heading for heading, _ in keys}

    unknown = sorted(
        f"{heading}: {key}"
        for heading in headings
        for key in key_rows(section_text(text, heading), CONFIG_DOC_WORDS[name])
        if (heading, key) not in keys
    )

    assert unknown == [], "rows that name no key of the model: " + ", ".join(unknown)


@pytest.mark.parametrize("name", list(CONFIG_DOCS))
def test_config_doc_defaults_match_models(name: str) -> None:
    """The default cell of each key states the model's default: the value, unset for None, or required."""
    text = (ROOT / name).read_text(encoding="utf-8")
    words = CONFIG_DOC_WORDS[name]
    keys = model_keys(CONFIG_DOCS[name])
    rows = {heading: key_rows(section_text(text, heading), words) for heading, _ in keys}

    wrong = []
    for (heading, key), documented in sorted(keys.items()):
        cell = rows[heading].get(key)
        if cell is None:
            continue  # test_config_doc_lists_every_key reports it
        if documented.field.is_required():
            stated = cell in words["required"]
        else:
            stated = documented_default(cell, model_default(documented.field), words)
        if not stated:
            wrong.append(f"{key}: documented {cell!r}, model default {model_default(documented.field)!r}")

    assert wrong == [], "; ".join(wrong)


def test_config_doc_walk_finds_nested_keys() -> None:
    """The model walk reaches the keys of unions, lists of models and models nested in other sections."""
    keys = model_keys(0)

    assert ("## Top-level keys", "log.level") in keys
    assert ("### `ticket`", "auth.email") in keys
    assert ("### `ticket`", "auth.password") in keys
    assert ("### `ticket`", "auth.token") in keys
    assert ("## Secrets", "env") in keys
    assert ("### Tenant routing", "tenant") in keys
    assert ("### `sync`", "filters.statuses") in keys
    assert ("### Attachments and responses", "attachments.to_mdr.deny_extensions") in keys
    assert ("### Status", "status.close_mdr.resolutions") in keys
    assert ("### Comments", "visibility.type") in keys
    assert not keys[("## Top-level keys", "log")].needs_row
    assert keys[("## The mapping file", "routes")].needs_row


# The operations page: its metric and log event tables against the code.
OPERATIONS_DOCS = ("docs/operations.md", "docs/ru/operations.md")
# One error of each recovery class that the errors metric labels.
ERROR_EXAMPLES = (
    MisconfiguredError("mapping does not fit"),
    ConfigError("secret missing"),
    RateLimitedError("429", retry_after=None),
    RejectedError("rejected", status=400),
    RuntimeError("a bug"),
)
# Modules whose log events the operations page lists: the service, not the simulators or the test fake.
LOGGING_SOURCES = ("connector", "adapters/mdr", "adapters/jira", "adapters/servicenow", "adapters/redmine")
NOT_SERVICE_MODULES = ("simulator", "jql.py")
LOG_METHODS = frozenset({"debug", "info", "warning", "error", "exception", "critical"})
# An event name stored in a variable, as in `event = "sync.ticket.found"`: dotted lowercase words.
EVENT_NAME = re.compile(r"^[a-z_]+(?:\.[a-z_]+){1,3}$")
# The level that each logging method writes: `log.exception` writes ERROR.
LOG_LEVELS = {"debug": "DEBUG", "info": "INFO", "warning": "WARNING", "error": "ERROR", "exception": "ERROR", "critical": "CRITICAL"}


def service_modules() -> list[Path]:
    paths = []
    for source in LOGGING_SOURCES:
        for path in sorted((ROOT / source).rglob("*.py")):
            if not any(part in str(path.relative_to(ROOT)) for part in NOT_SERVICE_MODULES):
                paths.append(path)
    return paths


def logged_events() -> dict[str, set[str]]:
    """Return each event name the service logs, with the levels it is logged at.

    A log call names its event as a string or through a variable. For a
    variable, every dotted string constant of the enclosing function counts,
    together with the strings that calls of that function pass, so the event
    names that callers hand to a helper such as `_record_link` are found.
    """
    events: dict[str, set[str]] = {}
    for path in service_modules():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        helpers: dict[str, str] = {}
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for call in ast.walk(function):
                if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)):
                    continue
                if call.func.attr not in LOG_METHODS or not isinstance(call.func.value, ast.Name):
                    continue
                if call.func.value.id != "log" or not call.args:
                    continue
                level = LOG_LEVELS[call.func.attr]
                first = call.args[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    events.setdefault(first.value, set()).add(level)
                elif isinstance(first, ast.Name):
                    helpers[function.name] = level
                    for constant in ast.walk(function):
                        if isinstance(constant, ast.Constant) and isinstance(constant.value, str) and EVENT_NAME.match(constant.value):
                            events.setdefault(constant.value, set()).add(level)
        for call in ast.walk(tree):
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr in helpers:
                for argument in call.args:
                    if isinstance(argument, ast.Constant) and isinstance(argument.value, str) and EVENT_NAME.match(argument.value):
                        events.setdefault(argument.value, set()).add(helpers[call.func.attr])
    return events


def event_rows(text: str) -> dict[str, str]:
    """Return the level of each row of the event tables: | `event` | LEVEL | meaning |."""
    rows = {}
    for match in re.finditer(r"^\| `([a-z_]+(?:\.[a-z_]+)+)` \| (DEBUG|INFO|WARNING|ERROR|CRITICAL) \|", text, re.MULTILINE):
        assert match.group(1) not in rows, f"{match.group(1)} has two rows"
        rows[match.group(1)] = match.group(2)
    return rows


def test_logged_events_found() -> None:
    """The event scan finds events logged directly, through a variable and through a helper's argument."""
    events = logged_events()

    assert events["sync.cycle.failing"] == {"ERROR"}
    assert events["sync.incident.crashed"] == {"ERROR"}
    assert events["sync.ticket.found"] == {"INFO"}
    assert events["sync.ticket.created"] == {"INFO"}
    assert events["sync.comment.unmarked_kept_internal"] == {"INFO"}
    assert events["sync.request.create_found"] == {"INFO"}
    assert events["mdr.token.refreshed"] == {"INFO"}
    assert not any(name.startswith(("mdr_sim.", "jira_sim.", "memory.")) for name in events)


@pytest.mark.parametrize("name", OPERATIONS_DOCS)
def test_operations_doc_lists_log_events(name: str) -> None:
    """The event tables list exactly the events the service logs, each with its level."""
    events = logged_events()
    rows = event_rows((ROOT / name).read_text(encoding="utf-8"))

    missing = sorted(set(events) - set(rows))
    unknown = sorted(set(rows) - set(events))
    wrong_level = sorted(event for event in set(events) & set(rows) if rows[event] not in events[event])

    assert missing == [], "events without a row: " + ", ".join(missing)
    assert unknown == [], "rows for events the code does not log: " + ", ".join(unknown)
    assert wrong_level == [], "rows with another level than the code's: " + ", ".join(wrong_level)


@pytest.mark.parametrize("name", OPERATIONS_DOCS)
def test_operations_doc_lists_metrics(name: str) -> None:
    """The metrics table lists every metric with its type, and its labels include `connection`."""
    text = (ROOT / name).read_text(encoding="utf-8")
    rows = {
        match.group(1): (match.group(2), match.group(3))
        for match in re.finditer(r"^\| `(mdr_connector_[a-z_]+)` \| (\w+) \| ([^|]+) \|", text, re.MULTILINE)
    }

    assert set(rows) == set(METRICS)
    for metric, (kind, _help) in METRICS.items():
        assert rows[metric][0] == kind, metric
        assert "`connection`" in rows[metric][1], metric


@pytest.mark.parametrize("name", OPERATIONS_DOCS)
def test_operations_doc_lists_label_values(name: str) -> None:
    """The kind and direction table and the error class table list the label values the code sets."""
    text = (ROOT / name).read_text(encoding="utf-8")
    pairs = set(re.findall(r"^\| `([a-z_]+)` \| `(mdr_to_ticket|ticket_to_mdr)` \|", text, re.MULTILINE))
    class_table = re.search(r"^\| `class` \|.*\n\|[-|]+\|\n((?:\|.*\n)+)", text, re.MULTILINE)
    assert class_table is not None, "the table of error classes is missing"
    classes = set(re.findall(r"^\| `([a-z_]+)` \|", class_table.group(1), re.MULTILINE))

    assert pairs == set(SYNCED_COUNTERS.values())
    assert classes == {error_class(error) for error in ERROR_EXAMPLES}


@pytest.mark.parametrize("name", OPERATIONS_DOCS)
def test_operations_doc_lists_status_problems(name: str) -> None:
    """The problem table of `status` lists every problem code that makes a connection unhealthy."""
    text = (ROOT / name).read_text(encoding="utf-8")

    for problem in (TOKEN_PENDING, TOKEN_EXPIRED, REFRESH_EXPIRING, TOKEN_UNREADABLE):
        assert f"| `{problem}` |" in text, problem
