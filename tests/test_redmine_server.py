"""The Redmine from .ci/redmine.py is set up the way the Redmine adapter tests need it.

Everything here runs against a real Redmine on loopback, except the first
tests, which check how the fixture reacts when no Redmine is there.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
from fixtures_redmine import RedmineServer, create_project, delete_project, load_server

ROOT = Path(__file__).resolve().parents[1]

ROLE_PERMISSIONS = {
    "view_issues",
    "add_issues",
    "edit_issues",
    "add_issue_notes",
    "edit_own_issue_notes",
    "view_private_notes",
    "set_notes_private",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_unreachable_state(path: Path) -> None:
    """Write a complete state file that points at a loopback port where nothing listens."""
    user = {"id": 1, "login": "nobody", "api_key": "0" * 40}
    state = {
        "url": f"http://127.0.0.1:{free_port()}",
        "service_user": user,
        "human_user": user,
        "admin_user": user,
        "project": {"id": 1, "identifier": "sec"},
        "role": {"id": 1},
        "group": {"id": 1, "name": "SOC Leads"},
        "custom_field": {"id": 1, "name": "MDR incident id"},
        "trackers": {},
        "statuses": {},
        "attachment_max_size_kb": 5120,
    }
    path.write_text(json.dumps(state))


def create_issue(server: RedmineServer, key: str, project: str | int, **fields: Any) -> dict[str, Any]:
    body = {"issue": {"project_id": project, "subject": f"test {uuid.uuid4().hex[:8]}", **fields}}
    response = server.request("POST", "/issues.json", key, json=body)
    assert response.status_code == 201, response.text
    return response.json()["issue"]


def get_issue(server: RedmineServer, key: str, issue_id: int, include: str = "") -> dict[str, Any]:
    response = server.request("GET", f"/issues/{issue_id}.json", key, params={"include": include})
    assert response.status_code == 200, response.text
    return response.json()["issue"]


def update_issue(server: RedmineServer, key: str, issue_id: int, **fields: Any) -> None:
    response = server.request("PUT", f"/issues/{issue_id}.json", key, json={"issue": fields})
    assert response.status_code == 204, response.text


def status_id(server: RedmineServer, name: str) -> int:
    return server.statuses[name]["id"]


# --- fixture behaviour without a Redmine ----------------------------------------


def test_missing_state_skips_outside_ci(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a state file and without CI=true, the fixture skips and names the setup command."""
    monkeypatch.setenv("REDMINE_STATE", str(tmp_path / "missing.json"))
    monkeypatch.delenv("CI", raising=False)

    with pytest.raises(pytest.skip.Exception) as raised:
        load_server()

    assert "does not exist" in str(raised.value)
    assert ".ci/redmine.py" in str(raised.value)


def test_missing_state_fails_in_ci(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under CI=true a missing Redmine fails the test instead of skipping it."""
    monkeypatch.setenv("REDMINE_STATE", str(tmp_path / "missing.json"))
    monkeypatch.setenv("CI", "true")

    with pytest.raises(pytest.fail.Exception) as raised:
        load_server()

    assert ".ci/redmine.py" in str(raised.value)


@pytest.mark.parametrize("ci", ["", "true"], ids=["local", "ci"])
def test_unreachable_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ci: str) -> None:
    """A state file whose server does not respond skips locally and fails under CI=true."""
    path = tmp_path / "state.json"
    write_unreachable_state(path)
    monkeypatch.setenv("REDMINE_STATE", str(path))
    monkeypatch.setenv("CI", ci)
    expected = pytest.fail.Exception if ci else pytest.skip.Exception

    with pytest.raises(expected) as raised:
        load_server()

    assert "no Redmine reachable at http://127.0.0.1:" in str(raised.value)


def test_incomplete_state_skips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A state file without the expected keys is reported, not raised as KeyError."""
    path = tmp_path / "state.json"
    path.write_text('{"url": "http://127.0.0.1:1"}')
    monkeypatch.setenv("REDMINE_STATE", str(path))
    monkeypatch.delenv("CI", raising=False)

    with pytest.raises(pytest.skip.Exception) as raised:
        load_server()

    assert "unreadable or incomplete" in str(raised.value)


# --- .ci/run -------------------------------------------------------------------


def run_ci_script(tmp_path: Path, setup_exit_code: int, ci: str | None) -> tuple[subprocess.CompletedProcess[str], bool]:
    """Run a copy of .ci/run with stubs for .ci/redmine.py and dev.py; return its result and whether dev.py ran.

    PATH holds only python3 and dirname, so the PostgreSQL step finds no
    pg_ctlcluster and starts nothing.
    """
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    (tmp_path / ".ci" / "redmine.py").write_text(f"raise SystemExit({setup_exit_code})\n")
    marker = tmp_path / "dev-ran"
    (tmp_path / "dev.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "python3").symlink_to(sys.executable)
    (tools / "dirname").symlink_to(shutil.which("dirname"))

    environment = {**{name: value for name, value in os.environ.items() if name != "CI"}, "PATH": str(tools)}
    if ci is not None:
        environment["CI"] = ci
    result = subprocess.run(
        [shutil.which("bash"), str(tmp_path / ".ci" / "run")],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result, marker.exists()


@pytest.mark.parametrize(
    ("setup_exit_code", "ci", "run_exit_code", "tests_ran"),
    [(0, "true", 0, True), (1, "true", 1, False), (1, None, 1, False), (0, "false", 0, True), (1, "false", 0, True)],
    ids=["ci-ok", "ci-setup-failed", "ci-unset-setup-failed", "local-ok", "local-setup-failed"],
)
def test_ci_run_redmine_step(
    tmp_path: Path, setup_exit_code: int, ci: str | None, run_exit_code: int, tests_ran: bool
) -> None:
    """.ci/run stops when the Redmine setup fails, unless CI=false says it runs outside CI, where it only warns."""
    result, dev_ran = run_ci_script(tmp_path, setup_exit_code, ci)

    assert result.returncode == run_exit_code, result.stderr
    assert dev_ran is tests_ran
    assert ("setting up Redmine failed" in result.stderr) is (setup_exit_code != 0)


# --- accounts and settings ----------------------------------------------------


def test_server_is_on_loopback(redmine_server: RedmineServer) -> None:
    """The fixture only ever points at a Redmine on 127.0.0.1."""
    assert redmine_server.url.startswith("http://127.0.0.1:")


def test_rest_api_rejects_bad_key(redmine_server: RedmineServer) -> None:
    """The REST API is on: a valid key authenticates and an unknown key gets 401."""
    good = redmine_server.request("GET", "/users/current.json", redmine_server.service_key)
    bad = redmine_server.request("GET", "/users/current.json", "f" * 40)

    assert good.status_code == 200
    assert bad.status_code == 401


@pytest.mark.parametrize(
    ("key_name", "login_name", "admin"),
    [("service_key", "service_login", False), ("human_key", "human_login", False), ("admin_key", None, True)],
    ids=["service", "human", "admin"],
)
def test_user_keys(redmine_server: RedmineServer, key_name: str, login_name: str | None, admin: bool) -> None:
    """Each key belongs to its own user, and only the test admin key has admin rights."""
    response = redmine_server.request("GET", "/users/current.json", getattr(redmine_server, key_name))
    user = response.json()["user"]

    assert response.status_code == 200
    if login_name:
        assert user["login"] == getattr(redmine_server, login_name)
    assert user["admin"] is admin


def test_role_permissions(redmine_server: RedmineServer) -> None:
    """The members' role allows everything the connector does with issues, notes and attachments."""
    response = redmine_server.request("GET", f"/roles/{redmine_server.role_id}.json", redmine_server.admin_key)

    assert response.status_code == 200
    assert ROLE_PERMISSIONS <= set(response.json()["role"]["permissions"])


def test_project_members(redmine_server: RedmineServer) -> None:
    """The service user, the human and the group are members of the project."""
    response = redmine_server.request(
        "GET", f"/projects/{redmine_server.project}/memberships.json", redmine_server.admin_key, params={"limit": 100}
    )
    members = {
        (membership.get("user") or membership.get("group"))["id"] for membership in response.json()["memberships"]
    }

    assert response.status_code == 200
    assert redmine_server.service_user_id in members
    assert redmine_server.human_user_id in members
    assert redmine_server.group_id in members


def test_group_contains_human(redmine_server: RedmineServer) -> None:
    """The group "SOC Leads" contains the human user."""
    response = redmine_server.request(
        "GET", f"/groups/{redmine_server.group_id}.json", redmine_server.admin_key, params={"include": "users"}
    )
    group = response.json()["group"]

    assert response.status_code == 200
    assert group["name"] == redmine_server.group_name
    assert redmine_server.human_user_id in {user["id"] for user in group["users"]}


def test_custom_field_definition(redmine_server: RedmineServer) -> None:
    """The correlation field is a filterable, searchable string field for all trackers."""
    response = redmine_server.request("GET", "/custom_fields.json", redmine_server.admin_key)
    fields = {field["id"]: field for field in response.json()["custom_fields"]}
    field = fields[redmine_server.custom_field_id]

    assert response.status_code == 200
    assert field["name"] == redmine_server.custom_field_name
    assert field["customized_type"] == "issue"
    assert field["field_format"] == "string"
    assert field["is_filter"] is True
    assert field["searchable"] is True
    assert {tracker["id"] for tracker in field["trackers"]} == set(redmine_server.trackers.values())


def test_statuses_match_state(redmine_server: RedmineServer) -> None:
    """The status ids in the state file are Redmine's, with at least one closed status."""
    response = redmine_server.request("GET", "/issue_statuses.json", redmine_server.service_key)
    statuses = {status["name"]: status["id"] for status in response.json()["issue_statuses"]}

    assert response.status_code == 200
    assert statuses == {name: status["id"] for name, status in redmine_server.statuses.items()}
    assert any(status["is_closed"] for status in redmine_server.statuses.values())


# --- what the service user can do -------------------------------------------------


def test_issue_with_custom_field(redmine_server: RedmineServer) -> None:
    """The service user creates an issue with the incident id and finds it again through cf_N."""
    incident_id = f"inc-{uuid.uuid4().hex}"
    field_id = redmine_server.custom_field_id
    field = {"id": field_id, "value": incident_id}
    issue = create_issue(redmine_server, redmine_server.service_key, redmine_server.project, custom_fields=[field])

    query = {"project_id": redmine_server.project, "status_id": "*", f"cf_{field_id}": incident_id}
    response = redmine_server.request("GET", "/issues.json", redmine_server.service_key, params=query)
    found = response.json()["issues"]

    assert response.status_code == 200
    assert [item["id"] for item in found] == [issue["id"]]
    assert found[0]["custom_fields"] == [{"id": field_id, "name": redmine_server.custom_field_name, "value": incident_id}]
    assert found[0]["author"]["id"] == redmine_server.service_user_id


def test_private_note_by_service(redmine_server: RedmineServer) -> None:
    """The service user adds a private note, and the human can read it."""
    issue = create_issue(redmine_server, redmine_server.service_key, redmine_server.project)

    update_issue(redmine_server, redmine_server.service_key, issue["id"], notes="internal analysis", private_notes=True)
    journals = get_issue(redmine_server, redmine_server.human_key, issue["id"], include="journals")["journals"]

    assert len(journals) == 1
    assert journals[0]["notes"] == "internal analysis"
    assert journals[0]["private_notes"] is True
    assert journals[0]["user"]["id"] == redmine_server.service_user_id


def test_human_note_has_human_author(redmine_server: RedmineServer) -> None:
    """A note written with the human's key has the human as its author, not the service user."""
    issue = create_issue(redmine_server, redmine_server.service_key, redmine_server.project)

    update_issue(redmine_server, redmine_server.human_key, issue["id"], notes="analyst reply")
    journals = get_issue(redmine_server, redmine_server.service_key, issue["id"], include="journals")["journals"]

    assert [journal["user"]["id"] for journal in journals] == [redmine_server.human_user_id]
    assert journals[0]["private_notes"] is False


def test_upload_and_attach(redmine_server: RedmineServer) -> None:
    """The service user uploads a file, attaches it to an issue and downloads the same bytes."""
    content = b"evidence \x00\x01\x02 " + uuid.uuid4().bytes
    issue = create_issue(redmine_server, redmine_server.service_key, redmine_server.project)

    upload = redmine_server.request(
        "POST",
        "/uploads.json",
        redmine_server.service_key,
        params={"filename": "evidence.bin"},
        data=content,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert upload.status_code == 201, upload.text
    token = upload.json()["upload"]["token"]
    attachment = {"token": token, "filename": "evidence.bin", "content_type": "application/octet-stream"}
    update_issue(redmine_server, redmine_server.service_key, issue["id"], uploads=[attachment])
    attachments = get_issue(redmine_server, redmine_server.service_key, issue["id"], include="attachments")["attachments"]
    download_path = attachments[0]["content_url"].removeprefix(redmine_server.url)
    download = redmine_server.request("GET", download_path, redmine_server.human_key)

    assert [item["filename"] for item in attachments] == ["evidence.bin"]
    assert attachments[0]["filesize"] == len(content)
    assert attachments[0]["author"]["id"] == redmine_server.service_user_id
    assert download.status_code == 200
    assert download.content == content


def test_upload_over_size_limit(redmine_server: RedmineServer) -> None:
    """An upload one KB over attachment_max_size_kb is rejected with 422."""
    too_large = b"x" * ((redmine_server.attachment_max_size_kb + 1) * 1024)

    response = redmine_server.request(
        "POST",
        "/uploads.json",
        redmine_server.service_key,
        params={"filename": "large.bin"},
        data=too_large,
        headers={"Content-Type": "application/octet-stream"},
    )

    assert response.status_code == 422


@pytest.mark.parametrize("target", ["In Progress", "Resolved", "Closed", "New"])
def test_status_change(redmine_server: RedmineServer, target: str) -> None:
    """The service user can move an issue to any status, closed ones included, and reopen it."""
    key = redmine_server.service_key
    issue = create_issue(redmine_server, key, redmine_server.project)
    if target == "New":
        update_issue(redmine_server, key, issue["id"], status_id=status_id(redmine_server, "Closed"))

    update_issue(redmine_server, key, issue["id"], status_id=status_id(redmine_server, target))
    status = get_issue(redmine_server, key, issue["id"])["status"]

    assert status["id"] == status_id(redmine_server, target)


def test_assign_to_group(redmine_server: RedmineServer) -> None:
    """Issues can be assigned to the group, because group assignment is on and the group is a member."""
    issue = create_issue(redmine_server, redmine_server.service_key, redmine_server.project)

    update_issue(redmine_server, redmine_server.service_key, issue["id"], assigned_to_id=redmine_server.group_id)
    assignee = get_issue(redmine_server, redmine_server.service_key, issue["id"])["assigned_to"]

    assert assignee == {"id": redmine_server.group_id, "name": redmine_server.group_name}


# --- fresh projects ----------------------------------------------------------------


def test_fresh_project_fixture(redmine_server: RedmineServer, redmine_project: dict[str, Any]) -> None:
    """A fresh project accepts issues with the incident id from the service user and is private."""
    field = {"id": redmine_server.custom_field_id, "value": "inc-fresh"}

    issue = create_issue(redmine_server, redmine_server.service_key, redmine_project["id"], custom_fields=[field])
    anonymous = requests.get(f"{redmine_server.url}/projects/{redmine_project['id']}.json", timeout=30)

    assert issue["project"]["id"] == redmine_project["id"]
    assert issue["custom_fields"][0]["value"] == "inc-fresh"
    assert anonymous.status_code in (401, 403, 404)


def test_delete_project(redmine_server: RedmineServer) -> None:
    """delete_project removes a project made by create_project."""
    project = create_project(redmine_server, prefix="del")

    delete_project(redmine_server, project["id"])
    response = redmine_server.request("GET", f"/projects/{project['id']}.json", redmine_server.admin_key)

    assert response.status_code == 404
