"""The container, systemd and cron files agree with the CLI, the config model and each other.

No Docker engine or systemd runs in CI, so these tests parse and cross-check
the files and never start a container or a unit.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from sqlalchemy.engine import make_url

from mdr_connector.connector.cli import (
    EXIT_USAGE,
    build_parser,
    command_run,
    command_simulate,
    command_sync,
    command_token_activate,
    command_token_status,
)
from mdr_connector.connector.config import SecretRef, Settings, is_loopback_host, load_settings
from mdr_connector.connector.mappingfile import load_mapping

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_FILE = ROOT / "docker-compose.yml"
UNIT_FILE = ROOT / "deploy" / "mdr-connector.service"
CRON_FILE = ROOT / "deploy" / "mdr-connector.cron"
DEPLOY_READMES = ("deploy/README.md", "deploy/README.ru.md")
CONNECTOR_IMAGE = "mdr-connector:local"
SIMULATORS = {"mdr": "mdr-simulator", "jira": "jira-simulator"}
# ${NAME}, ${NAME:-default} or ${NAME-default}, as Compose interpolates them.
COMPOSE_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")
LOOPBACK_URL = re.compile(r"http://127\.0\.0\.1:(\d+)(/[^\s'\"]*)?")


# Readers


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


def compose_default(value: str) -> str:
    """Replace each ${NAME:-default} with its default, as Compose does when NAME is unset."""

    def default(match: re.Match[str]) -> str:
        if match.group(2) is None:
            raise AssertionError(f"{match.group(0)} in docker-compose.yml has no default")
        return match.group(2)

    return COMPOSE_VARIABLE.sub(default, value)


def service(name: str) -> dict[str, Any]:
    return load_compose()["services"][name]


def config_mount(definition: dict[str, Any]) -> dict[str, Any]:
    [mount] = [
        volume for volume in definition["volumes"]
        if volume["type"] == "bind" and volume["target"].startswith("/etc/mdr-connector/")
    ]
    return mount


def compose_config_path() -> Path:
    """Return the config file that the connector service mounts when no variable overrides it."""
    return (COMPOSE_FILE.parent / compose_default(config_mount(service("connector"))["source"])).resolve()


def compose_settings() -> Settings:
    return load_settings(compose_config_path())


def dockerfile_instructions() -> list[tuple[str, str]]:
    """Return (INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """Return the instructions of each build stage, without those before the first FROM."""
    stages: list[list[tuple[str, str]]] = []
    for keyword, arguments in dockerfile_instructions():
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, arguments))
    return stages


def dockerfile_env(stage: list[tuple[str, str]]) -> dict[str, str]:
    values: dict[str, str] = {}
    for keyword, arguments in stage:
        if keyword == "ENV":
            for item in shlex.split(arguments):
                name, _, value = item.partition("=")
                values[name] = value
    return values


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """Return (negated, regex) for each line of .dockerignore, in order."""
    patterns = []
    for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        glob = line.removeprefix("!").strip("/")
        regex = ""
        for part in re.split(r"(\*\*|\*|\?)", glob):
            regex += {"**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        patterns.append((negated, re.compile(regex)))
    return patterns


def sent_to_daemon(relative: str) -> bool:
    """Tell whether the build context contains `relative`, by the rules of .dockerignore.

    As in Docker, a pattern that matches a parent folder matches everything
    in it, and the last matching line decides.
    """
    parts = relative.split("/")
    candidates = ["/".join(parts[: index + 1]) for index in range(len(parts))]
    sent = True
    for negated, pattern in dockerignore_patterns():
        if any(pattern.fullmatch(candidate) for candidate in candidates):
            sent = negated
    return sent


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Return the key=value lines of each section of a systemd unit, in which a key may repeat."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections[current] = []
            continue
        assert current is not None, f"{path.name}: {line!r} is outside a section"
        key, separator, value = line.partition("=")
        assert separator, f"{path.name}: {line!r} is not key=value"
        sections[current].append((key.strip(), value.strip()))
    return sections


def unit_values(key: str) -> list[str]:
    return [value for name, value in parse_unit(UNIT_FILE)["Service"] if name == key]


def unit_value(key: str) -> str:
    values = unit_values(key)
    assert len(values) == 1, f"{key} is set {len(values)} times in {UNIT_FILE.name}"
    return values[0]


def cron_jobs() -> list[str]:
    """Return the job lines of the cron file: no comments, blank lines or variable settings."""
    return [
        line.strip()
        for line in CRON_FILE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#") and not re.match(r"^[A-Z_]+=", line.strip())
    ]


def command_words(command: str) -> list[str]:
    """Split a shell command and drop its redirections."""
    words = []
    for word in shlex.split(command):
        if word.startswith((">", "<", "2>", "|")):
            break
        words.append(word)
    return words


def parse_cli(arguments: list[str]) -> Any:
    """Parse `arguments` with the CLI's own parser, and fail the test with the command line if it is rejected."""
    try:
        return build_parser().parse_args(arguments)
    except SystemExit as stop:
        raise AssertionError(f"the CLI rejects: mdr-connector {shlex.join(arguments)}") from stop


def fenced_lines(path: Path) -> list[str]:
    lines: list[str] = []
    inside = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
            continue
        if inside:
            lines.append(line.strip())
    return lines


def compose_calls(path: Path) -> list[tuple[str, str, list[str]]]:
    """Return (subcommand, service, arguments) for each `docker compose run|exec` line of a doc."""
    calls = []
    for line in fenced_lines(path):
        words = command_words(line)
        if words[:2] != ["docker", "compose"] or len(words) < 3 or words[2] not in ("run", "exec"):
            continue
        rest = list(words[3:])
        while rest and rest[0].startswith("-"):
            rest.pop(0)
        calls.append((words[2], rest[0], rest[1:]))
    return calls


def simulator_port(system: str) -> int:
    arguments = parse_cli(service(SIMULATORS[system])["command"])
    return arguments.port


# docker-compose.yml


def test_compose_parses_as_yaml() -> None:
    """docker-compose.yml is YAML with the database, the connector and both simulators."""
    compose = load_compose()

    assert isinstance(compose, dict)
    assert {"postgres", "connector", "mdr-simulator", "jira-simulator"} <= set(compose["services"])


def test_compose_references_exist() -> None:
    """Every service, secret, volume and network a service names is defined."""
    compose = load_compose()
    services = compose["services"]
    missing = []
    for name, definition in services.items():
        for dependency in definition.get("depends_on", {}):
            if dependency not in services:
                missing.append(f"{name}: depends_on {dependency}")
        network_mode = definition.get("network_mode", "")
        if network_mode.startswith("service:") and network_mode.removeprefix("service:") not in services:
            missing.append(f"{name}: network_mode {network_mode}")
        for secret in definition.get("secrets", []):
            if secret not in compose.get("secrets", {}):
                missing.append(f"{name}: secret {secret}")
        for volume in definition.get("volumes", []):
            if volume["type"] == "volume" and volume["source"] not in compose.get("volumes", {}):
                missing.append(f"{name}: volume {volume['source']}")
        for network in definition.get("networks", []):
            if network != "default" and network not in compose.get("networks", {}):
                missing.append(f"{name}: network {network}")

    assert missing == []


def test_compose_default_services_need_no_profile() -> None:
    """A service started without a profile depends on no service that a profile hides."""
    services = load_compose()["services"]
    wrong = []
    for name, definition in services.items():
        if definition.get("profiles"):
            continue
        needed = list(definition.get("depends_on", {}))
        if definition.get("network_mode", "").startswith("service:"):
            needed.append(definition["network_mode"].removeprefix("service:"))
        wrong += [f"{name} -> {other}" for other in needed if services[other].get("profiles")]

    assert wrong == []


def test_compose_trial_profile() -> None:
    """The simulators and the token helper start only with the profile `trial`."""
    services = load_compose()["services"]

    for name in ("mdr-simulator", "jira-simulator", "trial-token"):
        assert services[name]["profiles"] == ["trial"], name
    for name in ("postgres", "infra", "connector"):
        assert "profiles" not in services[name], name


def test_connector_builds_from_dockerfile() -> None:
    """The connector image is built from this repository's Dockerfile, and every service of it uses the same build."""
    services = load_compose()["services"]
    build = services["connector"]["build"]

    assert (COMPOSE_FILE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    assert services["connector"]["image"] == CONNECTOR_IMAGE
    for name, definition in services.items():
        if definition.get("image") == CONNECTOR_IMAGE:
            assert definition["build"] == build, name


@pytest.mark.parametrize("name", ["infra", "connector", "mdr-simulator", "jira-simulator", "trial-token"])
def test_image_services_hardened(name: str) -> None:
    """Each container of the connector image has a read-only root, a tmpfs /tmp, no capabilities and an init."""
    definition = service(name)

    assert definition["image"] == CONNECTOR_IMAGE
    assert definition["read_only"] is True
    assert [mount.split(":")[0] for mount in definition["tmpfs"]] == ["/tmp"]
    assert definition["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in definition["security_opt"]
    assert definition["init"] is True
    assert "environment" not in definition, "secrets go through /run/secrets files"


def test_connector_service_runs_cli() -> None:
    """The connector service runs `mdr-connector run` and stops within the grace period of a cycle."""
    definition = service("connector")

    assert parse_cli(definition["command"]).handler is command_run
    assert definition["restart"] == "unless-stopped"
    assert definition["stop_grace_period"] == "30s"
    assert definition["depends_on"]["postgres"]["condition"] == "service_healthy"


@pytest.mark.parametrize("system", sorted(SIMULATORS))
def test_simulator_commands_parse(system: str) -> None:
    """Each simulator service runs `mdr-connector simulate` on a fixed loopback port."""
    arguments = parse_cli(service(SIMULATORS[system])["command"])

    assert arguments.handler is command_simulate
    assert arguments.system == system
    assert is_loopback_host(arguments.host)
    assert arguments.port > 0


def test_simulators_share_connector_network() -> None:
    """The connector and the simulators share one network namespace, and postgres is reachable from it."""
    compose = load_compose()
    services = compose["services"]
    holder = services["connector"]["network_mode"].removeprefix("service:")

    for name in ("mdr-simulator", "jira-simulator", "trial-token"):
        assert services[name]["network_mode"] == services["connector"]["network_mode"], name
    assert "network_mode" not in services[holder]
    assert set(services[holder]["networks"]) & set(services["postgres"]["networks"])
    assert "ports" not in services[holder], "publishing a port would expose the simulators' control API"


def test_compose_config_validates() -> None:
    """The config that compose mounts passes the Settings model, and its mapping loads."""
    settings = compose_settings()

    assert compose_config_path() == ROOT / "deploy" / "config.compose.yaml"
    assert len(settings.connections) == 1
    for connection in settings.connections:
        load_mapping(connection.mapping)


def test_compose_config_reaches_simulators() -> None:
    """The config's MDR and Jira URLs name the loopback ports that the simulator services listen on."""
    connection = compose_settings().connection(None)
    expected = {
        connection.mdr.base_url: simulator_port("mdr"),
        connection.mdr.console_url: simulator_port("mdr"),
        connection.ticket.url: simulator_port("jira"),
    }

    for url, port in expected.items():
        parts = urlsplit(url)
        assert is_loopback_host(parts.hostname or ""), url
        assert parts.port == port, url


def test_compose_config_secrets_mounted() -> None:
    """Each secret of the config is a file under /run/secrets that compose mounts into the connector."""
    compose = load_compose()
    settings = compose_settings()
    connection = settings.connection(None)
    mounted = set(compose["services"]["connector"]["secrets"])
    references = [settings.database_url, connection.ticket.auth.token]

    for reference in references:
        assert isinstance(reference, SecretRef)
        assert reference.file is not None
        assert reference.file.parent == Path("/run/secrets")
        assert reference.file.name in mounted
        assert "file" in compose["secrets"][reference.file.name]


def test_compose_config_paths_on_volumes() -> None:
    """data_dir and token_dir are volumes of the connector, declared as volumes in the image too."""
    connection = compose_settings().connection(None)
    targets = {volume["target"] for volume in service("connector")["volumes"] if volume["type"] == "volume"}
    [volume_line] = [arguments for keyword, arguments in dockerfile_stages()[-1] if keyword == "VOLUME"]

    assert str(compose_settings().data_dir) in targets
    assert str(connection.mdr.token_dir) in targets
    assert targets == set(json.loads(volume_line))


def test_compose_config_mount_matches_image() -> None:
    """Compose mounts the config read-only where the image's MDR_CONNECTOR_CONFIG points."""
    mount = config_mount(service("connector"))

    assert mount["read_only"] is True
    assert mount["target"] == dockerfile_env(dockerfile_stages()[-1])["MDR_CONNECTOR_CONFIG"]
    assert config_mount(service("trial-token")) == mount


def test_trial_token_matches_simulator() -> None:
    """The token helper requests the config client's console token from the MDR simulator and makes valid CLI calls."""
    definition = service("trial-token")
    script = definition["command"][0]
    client_id = compose_settings().connection(None).mdr.client_id
    [url] = re.findall(r"http://127\.0\.0\.1:\d+/\S*?console-token", script)
    handlers = []
    for line in script.splitlines():
        if "mdr-connector " in line:
            call = line.split("mdr-connector ", 1)[1]
            handlers.append(parse_cli(command_words(call.split(";")[0])).handler)

    assert definition["entrypoint"] == ["/bin/sh", "-c"]
    assert urlsplit(url).port == simulator_port("mdr")
    assert urlsplit(url).path == f"/_sim/clients/{client_id}/console-token"
    assert handlers == [command_token_status, command_token_activate]
    assert definition["depends_on"]["mdr-simulator"]["condition"] == "service_healthy"


def test_mdr_simulator_healthcheck_port() -> None:
    """The MDR simulator's health check requests the port that the simulator listens on."""
    test = " ".join(service("mdr-simulator")["healthcheck"]["test"])
    [port] = [int(match.group(1)) for match in LOOPBACK_URL.finditer(test)]

    assert port == simulator_port("mdr")


def test_database_url_example_matches_postgres() -> None:
    """The database URL that the docs write into the secret names the compose database, user and port."""
    postgres = service("postgres")
    compose = load_compose()
    for name in DEPLOY_READMES:
        [line] = [line for line in fenced_lines(ROOT / name) if "postgresql+asyncpg://" in line]
        template, target = re.fullmatch(r"printf '([^']+)\\n' .* > (\S+)", line).groups()
        url = make_url(template.replace("%s", "password"))

        assert url.host == "postgres"
        assert "postgres" in compose["services"]
        assert url.port == 5432
        assert url.username == postgres["environment"]["POSTGRES_USER"]
        assert url.database == postgres["environment"]["POSTGRES_DB"]
        assert Path(target) == Path(compose["secrets"]["database_url"]["file"])


# Dockerfile and .dockerignore


def test_dockerfile_user_not_root() -> None:
    """The image runs as the fixed non-root user that it creates."""
    final = dockerfile_stages()[-1]
    [user] = [arguments for keyword, arguments in final if keyword == "USER"]
    uid = user.split(":")[0]
    creation = " ".join(arguments for keyword, arguments in final if keyword == "RUN")

    assert uid not in ("root", "0")
    assert f"--uid {uid}" in creation


def test_dockerfile_entrypoint_is_cli() -> None:
    """ENTRYPOINT is mdr-connector and the default CMD is `run`."""
    final = dockerfile_stages()[-1]
    [entrypoint] = [arguments for keyword, arguments in final if keyword == "ENTRYPOINT"]
    [command] = [arguments for keyword, arguments in final if keyword == "CMD"]

    assert json.loads(entrypoint) == ["mdr-connector"]
    assert parse_cli(json.loads(command)).handler is command_run


def test_dockerfile_installs_with_constraints() -> None:
    """Both stages use python:3.11-slim, and the build stage installs the postgres extra with constraints.txt."""
    instructions = dockerfile_instructions()
    [default_base] = [arguments.split("=", 1)[1] for keyword, arguments in instructions if keyword == "ARG"]
    stages = dockerfile_stages()
    install = " ".join(arguments for keyword, arguments in stages[0] if keyword == "RUN")

    assert default_base == "python:3.11-slim"
    assert [stage[0][1].split()[0] for stage in stages] == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]
    assert "--constraint constraints.txt" in install
    assert '".[postgres]"' in install
    assert "asyncpg==" in (ROOT / "constraints.txt").read_text(encoding="utf-8")


def test_dockerfile_runtime_has_no_build_tools() -> None:
    """The runtime stage copies only the built environment and installs no compiler or package."""
    final = dockerfile_stages()[-1]
    copies = [arguments for keyword, arguments in final if keyword == "COPY"]
    commands = " ".join(arguments for keyword, arguments in final if keyword == "RUN")

    assert copies and all(arguments.startswith("--from=build ") for arguments in copies)
    assert "apt-get install" not in commands
    assert "pip uninstall" in commands


def test_dockerignore_sends_copied_files() -> None:
    """Every file the Dockerfile copies reaches the build context, and nothing local or secret does."""
    sources = []
    for keyword, arguments in dockerfile_instructions():
        if keyword == "COPY" and not arguments.startswith("--from"):
            sources += arguments.split()[:-1]

    for source in sources:
        path = ROOT / source
        assert path.exists(), source
        files = [path] if path.is_file() else [item for item in path.rglob("*") if item.is_file()]
        for item in files:
            relative = item.relative_to(ROOT).as_posix()
            assert sent_to_daemon(relative) or "__pycache__" in relative, relative
    for private in (".venv/bin/python", ".git/config", "secrets/jira-api-token", "secrets", "data/mdr-connector.db",
                    "tokens/sim-client.json", "build/lib/connector/cli.py", "connector/__pycache__/cli.cpython-311.pyc",
                    "tests/test_cli.py", ".env"):
        assert not sent_to_daemon(private), private


# systemd unit


def test_unit_exec_start_parses() -> None:
    """ExecStart runs `mdr-connector --config ... run`, as the CLI parser accepts it."""
    words = shlex.split(unit_value("ExecStart"))
    arguments = parse_cli(words[1:])

    assert words[0].endswith("/bin/mdr-connector")
    assert arguments.handler is command_run
    assert arguments.config == "/etc/mdr-connector/config.yaml"


def test_unit_hardening_options() -> None:
    """The unit sets the hardening options and writes only to its state folder."""
    expected = {
        "User": "mdr-connector",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "UMask": "0077",
        "Restart": "on-failure",
        "RestartPreventExitStatus": str(EXIT_USAGE),
    }

    for key, value in expected.items():
        assert unit_value(key) == value, key
    assert "@system-service" in unit_values("SystemCallFilter")
    assert unit_value("ReadWritePaths") == f"/var/lib/{unit_value('StateDirectory')}"


def test_unit_passes_systemd_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit, with ExecStart pointed at this environment's command."""
    analyze = shutil.which("systemd-analyze")
    command = Path(sys.executable).parent / "mdr-connector"
    if analyze is None or not command.exists():
        pytest.skip("systemd-analyze or the mdr-connector command is not installed")
    installed = shlex.split(unit_value("ExecStart"))[0]
    unit = tmp_path / UNIT_FILE.name
    unit.write_text(UNIT_FILE.read_text(encoding="utf-8").replace(installed, str(command)), encoding="utf-8")

    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""


# cron


def test_cron_runs_sync_once() -> None:
    """The cron job runs `sync --once` as the unit's user with the unit's command and config."""
    [job] = cron_jobs()
    fields = job.split(maxsplit=6)
    words = command_words(fields[6])
    arguments = parse_cli(words[1:])
    unit_words = shlex.split(unit_value("ExecStart"))

    for field in fields[:5]:
        assert re.fullmatch(r"(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*", field), field
    assert fields[5] == unit_value("User")
    assert words[0] == unit_words[0]
    assert arguments.handler is command_sync
    assert arguments.once is True
    assert arguments.config == parse_cli(unit_words[1:]).config


# Operator notes


@pytest.mark.parametrize("name", DEPLOY_READMES)
def test_deploy_readme_commands_parse(name: str) -> None:
    """Each `docker compose run|exec` line names a compose service and passes the CLI parser."""
    services = load_compose()["services"]
    calls = compose_calls(ROOT / name)

    assert calls
    for subcommand, target, arguments in calls:
        assert target in services, target
        if target != "connector":
            continue
        if subcommand == "exec":
            assert arguments[0] == "mdr-connector"
            arguments = arguments[1:]
        parse_cli(arguments)


@pytest.mark.parametrize("name", DEPLOY_READMES)
def test_deploy_readme_simulator_ports(name: str) -> None:
    """The control API calls in the docs go to the port of the simulator they run in."""
    for line in fenced_lines(ROOT / name):
        words = command_words(line)
        if words[:3] != ["docker", "compose", "exec"] or words[3] not in SIMULATORS.values():
            continue
        system = next(key for key, value in SIMULATORS.items() if value == words[3])
        ports = {int(match.group(1)) for match in LOOPBACK_URL.finditer(line)}

        assert ports == {simulator_port(system)}, line


def test_deploy_readmes_show_same_commands() -> None:
    """The English and the Russian notes show the same command lines."""
    english, russian = (fenced_lines(ROOT / name) for name in DEPLOY_READMES)

    assert english == russian


@pytest.mark.parametrize("name", DEPLOY_READMES)
def test_deploy_readme_links_resolve(name: str) -> None:
    """Every relative link in the notes points to an existing file and heading."""
    path = ROOT / name
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text(encoding="utf-8")):
        if target.startswith(("http://", "https://")):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve()
        missing_anchor = bool(anchor) and linked.exists() and anchor not in heading_anchors(linked)
        if not linked.exists() or missing_anchor:
            broken.append(target)

    assert broken == []


def heading_anchors(path: Path) -> set[str]:
    """Return the anchors that GitHub generates for the headings of a Markdown file."""
    anchors = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            text = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return anchors
