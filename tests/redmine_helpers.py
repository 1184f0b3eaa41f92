"""Helpers for tests against the real Redmine: adapter settings, a person's actions, and a loopback relay.

The person is the `soc-analyst` account of .ci/redmine.py; set-up that
needs an administrator (relations between issues) uses the admin key.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from fixtures_redmine import RedmineServer

from mdr_connector.adapters.loopback import serve_on_loopback
from mdr_connector.connector.config import RedmineSettings

SERVICE_KEY_VARIABLE = "MDR_TEST_REDMINE_KEY"


def redmine_settings(
    server: RedmineServer, monkeypatch: pytest.MonkeyPatch, *, url: str | None = None, key: str | None = None, **values: Any
) -> RedmineSettings:
    """Settings of the connector's account; the API key goes through an environment variable, as in production."""
    monkeypatch.setenv(SERVICE_KEY_VARIABLE, key or server.service_key)
    return RedmineSettings(
        system="redmine",
        url=url or server.url,
        api_key={"env": SERVICE_KEY_VARIABLE},
        timeout_seconds=20,
        **values,
    )


def unique(prefix: str) -> str:
    return f"{prefix} {uuid.uuid4().hex[:10]}"


def human_issue(server: RedmineServer, project: str | int, *, tracker: str = "Bug", **fields: Any) -> dict[str, Any]:
    """Create an issue as the person and return it as Redmine returned it."""
    body = {"issue": {"project_id": project, "tracker_id": server.trackers[tracker], "subject": unique("human"), **fields}}
    response = server.request("POST", "/issues.json", server.human_key, json=body)
    assert response.status_code == 201, response.text
    return response.json()["issue"]


def human_update(server: RedmineServer, issue_id: int | str, **fields: Any) -> None:
    response = server.request("PUT", f"/issues/{issue_id}.json", server.human_key, json={"issue": fields})
    assert response.status_code == 204, response.text


def human_note(server: RedmineServer, issue_id: int | str, text: str, *, private: bool = False) -> int:
    """Add a note as the person and return its journal id."""
    human_update(server, issue_id, notes=text, private_notes=private)
    journals = read_issue(server, issue_id, "journals")["journals"]
    return max(journal["id"] for journal in journals if journal["user"]["id"] == server.human_user_id and journal["notes"])


def human_attach(server: RedmineServer, issue_id: int | str, filename: str, data: bytes) -> int:
    """Upload a file and attach it to the issue as the person; return the attachment id."""
    response = server.request(
        "POST",
        "/uploads.json",
        server.human_key,
        params={"filename": filename},
        data=data,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 201, response.text
    upload = response.json()["upload"]
    human_update(server, issue_id, uploads=[{"token": upload["token"], "filename": filename}])
    return upload["id"]


def read_issue(server: RedmineServer, issue_id: int | str, include: str = "") -> dict[str, Any]:
    response = server.request("GET", f"/issues/{issue_id}.json", server.admin_key, params={"include": include})
    assert response.status_code == 200, response.text
    return response.json()["issue"]


def block(server: RedmineServer, blocking_id: int | str, blocked_id: int | str) -> None:
    """Make one issue block another, which keeps the blocked one from any closed status."""
    body = {"relation": {"issue_to_id": int(blocked_id), "relation_type": "blocks"}}
    response = server.request("POST", f"/issues/{blocking_id}/relations.json", server.admin_key, json=body)
    assert response.status_code == 201, response.text


@dataclass
class Relay:
    """A loopback HTTP relay in front of Redmine that keeps the `Host` header Redmine builds its links from.

    Redmine then lists attachment links on its own origin, not on the relay's.
    `drop_after_forward` names requests ("POST /issues.json") that the relay
    forwards to Redmine, after which it closes the connection without a
    reply, like a reply lost on the way back.
    """

    target: str
    url: str = ""
    drop_after_forward: set[str] = field(default_factory=set)
    forwarded: list[str] = field(default_factory=list)


@asynccontextmanager
async def run_relay(server: RedmineServer) -> AsyncIterator[Relay]:
    relay = Relay(target=server.url)
    target_host = server.url.split("://", 1)[1]

    async def forward(request: web.Request) -> web.StreamResponse:
        headers = {name: value for name, value in request.headers.items() if name.lower() not in ("host", "content-length")}
        headers["Host"] = target_host
        body = await request.read()
        async with aiohttp.ClientSession() as session:
            async with session.request(
                request.method, f"{relay.target}{request.path_qs}", headers=headers, data=body, allow_redirects=False
            ) as upstream:
                payload = await upstream.read()
                status = upstream.status
                reply_headers = {
                    name: value
                    for name, value in upstream.headers.items()
                    if name.lower() in ("content-type", "content-disposition", "location", "retry-after")
                }
        relay.forwarded.append(f"{request.method} {request.path}")
        if f"{request.method} {request.path}" in relay.drop_after_forward:
            assert request.transport is not None
            request.transport.close()
            raise ConnectionResetError("the relay dropped the reply on purpose")
        return web.Response(status=status, body=payload, headers=reply_headers)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", forward)
    async with serve_on_loopback(app) as url:
        relay.url = url
        yield relay
