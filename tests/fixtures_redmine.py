"""Fixtures for tests against a real Redmine on loopback, set up by .ci/redmine.py.

The setup script writes users, API keys and ids to a JSON state file
(REDMINE_STATE, default /tmp/mdr-connector-redmine/state.json). When no
Redmine accepts the service user's key, the tests that need it skip. Under
CI=true they fail instead, so CI cannot pass without them.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest
import requests

DEFAULT_STATE = "/tmp/mdr-connector-redmine/state.json"
SETUP_HINT = "run `sudo python3 .ci/redmine.py` to install and start one"
TIMEOUT_SECONDS = 30


@dataclass(frozen=True)
class RedmineServer:
    """A running Redmine and the accounts and records that .ci/redmine.py created in it.

    `admin_key` is for test set-up only (such as creating projects); the
    connector under test must use `service_key`.
    """

    url: str
    service_key: str
    service_user_id: int
    service_login: str
    human_key: str
    human_user_id: int
    human_login: str
    admin_key: str
    project: str
    project_id: int
    role_id: int
    group_id: int
    group_name: str
    custom_field_id: int
    custom_field_name: str
    trackers: dict[str, int]
    statuses: dict[str, dict[str, Any]]
    attachment_max_size_kb: int

    def request(self, method: str, path: str, key: str, **options: Any) -> requests.Response:
        """Send one REST request as the user who owns `key`; `path` starts with a slash."""
        headers = {"X-Redmine-API-Key": key, **options.pop("headers", {})}
        return requests.request(
            method,
            f"{self.url}{path}",
            headers=headers,
            timeout=TIMEOUT_SECONDS,
            allow_redirects=False,
            **options,
        )


def state_path() -> Path:
    return Path(os.environ.get("REDMINE_STATE") or DEFAULT_STATE)


def server_from_state(state: dict[str, Any]) -> RedmineServer:
    return RedmineServer(
        url=state["url"],
        service_key=state["service_user"]["api_key"],
        service_user_id=state["service_user"]["id"],
        service_login=state["service_user"]["login"],
        human_key=state["human_user"]["api_key"],
        human_user_id=state["human_user"]["id"],
        human_login=state["human_user"]["login"],
        admin_key=state["admin_user"]["api_key"],
        project=state["project"]["identifier"],
        project_id=state["project"]["id"],
        role_id=state["role"]["id"],
        group_id=state["group"]["id"],
        group_name=state["group"]["name"],
        custom_field_id=state["custom_field"]["id"],
        custom_field_name=state["custom_field"]["name"],
        trackers=state["trackers"],
        statuses=state["statuses"],
        attachment_max_size_kb=state["attachment_max_size_kb"],
    )


def unavailable(reason: str) -> NoReturn:
    """Skip the test, or fail it when CI=true, because no usable Redmine is there."""
    message = f"{reason}; {SETUP_HINT}"
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def load_server() -> RedmineServer:
    path = state_path()
    try:
        server = server_from_state(json.loads(path.read_text()))
    except FileNotFoundError:
        unavailable(f"no Redmine reachable: the state file {path} does not exist")
    except (OSError, ValueError, KeyError, TypeError) as err:
        unavailable(f"no Redmine reachable: the state file {path} is unreadable or incomplete ({err!r})")

    try:
        response = server.request("GET", "/users/current.json", server.service_key)
    except requests.RequestException as err:
        unavailable(f"no Redmine reachable at {server.url} ({type(err).__name__})")
    if response.status_code != 200:
        unavailable(
            f"no Redmine reachable at {server.url}: GET /users/current.json with the service key "
            f"returned HTTP {response.status_code}"
        )
    return server


@pytest.fixture(scope="session")
def redmine_server() -> RedmineServer:
    """The Redmine that .ci/redmine.py runs; skips, or fails under CI=true, when none responds."""
    return load_server()


def create_project(server: RedmineServer, prefix: str = "t") -> dict[str, Any]:
    """Create a private project with every tracker, the service user, the human and the group as members.

    Returns the project as GET /projects/ID.json returns it. The identifier
    is `prefix` plus a random suffix, so tests never share a project.
    """
    identifier = f"{prefix}-{uuid.uuid4().hex[:12]}"
    body = {
        "project": {
            "name": f"Test {identifier}",
            "identifier": identifier,
            "is_public": False,
            "tracker_ids": list(server.trackers.values()),
            "enabled_module_names": ["issue_tracking", "files"],
        }
    }
    response = server.request("POST", "/projects.json", server.admin_key, json=body)
    assert response.status_code == 201, response.text
    project = response.json()["project"]

    for principal_id in (server.service_user_id, server.human_user_id, server.group_id):
        membership = {"membership": {"user_id": principal_id, "role_ids": [server.role_id]}}
        path = f"/projects/{project['id']}/memberships.json"
        response = server.request("POST", path, server.admin_key, json=membership)
        assert response.status_code == 201, response.text
    return project


def delete_project(server: RedmineServer, project_id: int) -> None:
    response = server.request("DELETE", f"/projects/{project_id}.json", server.admin_key)
    assert response.status_code in (200, 204, 404), response.text


@pytest.fixture
def redmine_project(redmine_server: RedmineServer) -> Iterator[dict[str, Any]]:
    """A fresh project for one test, deleted afterwards; see create_project."""
    project = create_project(redmine_server)
    yield project
    delete_project(redmine_server, project["id"])
