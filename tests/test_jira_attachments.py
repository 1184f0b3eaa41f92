"""Attachments in the Jira adapter and simulator: list, streamed upload and download, limits."""

from __future__ import annotations

import tracemalloc
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fixtures_jira import MakeAdapter, RunningJira, StartJira, jira_settings
from fixtures_tls import SKIP_WITHOUT_OPENSSL, ServeTls, TlsFiles
from mdr_connector.adapters.jira.adapter import JiraTicketAdapter
from mdr_connector.adapters.jira.files import MultipartFileBody, open_content, quote_filename
from mdr_connector.adapters.jira.simulator import JiraSimulator, make_app, run_simulator
from mdr_connector.connector.errors import (
    InvalidPayloadError,
    OutcomeUnknownError,
    RejectedError,
    RemoteUnavailableError,
)
from mdr_connector.connector.tickets import (
    AttachmentUpload,
    TicketAccount,
    TicketAttachment,
    TicketDraft,
    TicketFields,
    TicketRef,
)

DEPLOYMENTS = ["cloud", "datacenter"]
CYRILLIC_NAME = "Отчёт об инциденте 😀.txt"
MIB = 1024 * 1024


def draft(incident_id: str = "att-1") -> TicketDraft:
    return TicketDraft(incident_id, "SEC", "Task", TicketFields("Incident", "text", "High", ()))


def spooled(folder: Path, name: str, data: bytes, content_type: str = "application/octet-stream") -> AttachmentUpload:
    path = folder / f"spool-{len(list(folder.iterdir()))}.bin"
    path.write_bytes(data)
    return AttachmentUpload(filename=name, path=path, size=len(data), content_type=content_type)


async def ticket(adapter: JiraTicketAdapter) -> TicketRef:
    return await adapter.create_ticket(draft())


# Upload


@pytest.mark.parametrize("deployment", DEPLOYMENTS)
async def test_upload_keeps_unicode_name(
    start_jira: StartJira, make_adapter: MakeAdapter, deployment: str, tmp_path: Path
) -> None:
    """A Cyrillic and emoji file name arrives intact, authored by the connector's account."""
    running = await start_jira(deployment=deployment)
    adapter = await make_adapter(running)
    ref = await ticket(adapter)

    uploaded = await adapter.upload_attachment(ref, spooled(tmp_path, CYRILLIC_NAME, b"report", "text/plain"))
    (stored,) = running.sim.issue(ref.key).attachments

    assert stored.filename == CYRILLIC_NAME
    assert stored.mime_type == "text/plain"
    assert stored.path.read_bytes() == b"report"
    assert stored.author is running.sim.service
    assert uploaded.filename == CYRILLIC_NAME
    assert uploaded.size == 6
    assert uploaded.id == str(stored.id)
    assert uploaded.author == adapter.account
    assert running.sim.calls["POST /rest/api/2/issue/{issue}/attachments"] == 1


async def test_upload_over_limit_413(jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter, tmp_path: Path) -> None:
    """A file above Jira's limit is RejectedError 413, and Jira keeps nothing."""
    jira_cloud.sim.settings.upload_limit_bytes = 1000
    ref = await ticket(cloud_adapter)

    with pytest.raises(RejectedError) as caught:
        await cloud_adapter.upload_attachment(ref, spooled(tmp_path, "big.log", b"x" * 5000))

    assert caught.value.status == 413
    assert "too large" in str(caught.value)
    assert jira_cloud.sim.issue(ref.key).attachments == []
    folder = jira_cloud.sim.files.folder
    assert folder is None or list(folder.iterdir()) == []


async def test_upload_reply_lost(jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter, tmp_path: Path) -> None:
    """An upload whose reply is lost is OutcomeUnknownError, and the file is listed by name and size."""
    ref = await ticket(cloud_adapter)
    jira_cloud.sim.drop_reply_after_commit("POST", "/rest/api/2/issue/{issue}/attachments")

    with pytest.raises(OutcomeUnknownError):
        await cloud_adapter.upload_attachment(ref, spooled(tmp_path, "notes.txt", b"12345"))
    listed = await cloud_adapter.list_attachments(ref)

    assert [(item.filename, item.size) for item in listed] == [("notes.txt", 5)]


async def test_upload_when_disabled(jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter, tmp_path: Path) -> None:
    """With attachments off, the limit is None and an upload is rejected."""
    jira_cloud.sim.settings.attachments_enabled = False
    ref = await ticket(cloud_adapter)

    with pytest.raises(RejectedError) as caught:
        await cloud_adapter.upload_attachment(ref, spooled(tmp_path, "a.txt", b"a"))

    assert caught.value.status == 403
    assert await cloud_adapter.attachment_limit() is None


async def test_attachment_limit(jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter) -> None:
    """attachment_limit reads uploadLimit from attachment/meta."""
    jira_cloud.sim.settings.upload_limit_bytes = 123456

    assert await cloud_adapter.attachment_limit() == 123456
    assert jira_cloud.sim.calls["GET /rest/api/2/attachment/meta"] == 1


# List and download


@pytest.mark.parametrize("deployment", DEPLOYMENTS)
async def test_list_and_download(
    start_jira: StartJira, make_adapter: MakeAdapter, deployment: str, tmp_path: Path
) -> None:
    """A person's attachments are listed oldest first and download byte for byte, without temporary files."""
    running = await start_jira(deployment=deployment)
    adapter = await make_adapter(running)
    ref = await ticket(adapter)
    first = running.sim.add_attachment(ref.key, CYRILLIC_NAME, size=300_000)
    running.sim.advance(1)
    running.sim.add_attachment(ref.key, "second.pdf", b"%PDF-1.7", mime_type="application/pdf")

    listed = await adapter.list_attachments(ref)
    written = await adapter.download_attachment(listed[0], tmp_path / "first.bin")

    human = running.sim.human.account_id if deployment == "cloud" else running.sim.human.name
    assert [(item.filename, item.size, item.content_type) for item in listed] == [
        (CYRILLIC_NAME, 300_000, "application/octet-stream"),
        ("second.pdf", 8, "application/pdf"),
    ]
    assert listed[0].author.id == human
    assert listed[0].created == first.created
    assert written == 300_000
    assert (tmp_path / "first.bin").read_bytes() == first.path.read_bytes()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["first.bin"]


async def test_cloud_media_redirect_no_credentials(
    jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter, tmp_path: Path
) -> None:
    """Cloud content redirects to a media origin, which gets the file request without the connector's credentials."""
    media_origin = jira_cloud.url.replace("127.0.0.1", "localhost")
    jira_cloud.sim.settings.media_base_url = media_origin
    ref = await ticket(cloud_adapter)
    jira_cloud.sim.add_attachment(ref.key, "dump.bin", b"\x00\x01" * 1000)

    (listed,) = await cloud_adapter.list_attachments(ref)
    written = await cloud_adapter.download_attachment(listed, tmp_path / "dump.bin")

    assert written == 2000
    assert jira_cloud.sim.media_requests == [{"attachment_id": listed.id, "authorization": False}]


async def test_same_origin_media(jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter, tmp_path: Path) -> None:
    """A redirect within the Jira origin is followed with the usual session."""
    ref = await ticket(cloud_adapter)
    jira_cloud.sim.add_attachment(ref.key, "a.txt", b"abc")

    (listed,) = await cloud_adapter.list_attachments(ref)
    await cloud_adapter.download_attachment(listed, tmp_path / "a.txt")

    assert (tmp_path / "a.txt").read_bytes() == b"abc"
    assert jira_cloud.sim.media_requests == [{"attachment_id": listed.id, "authorization": True}]


@pytest.mark.parametrize("deployment", DEPLOYMENTS)
async def test_foreign_content_url_rejected(
    start_jira: StartJira, make_adapter: MakeAdapter, deployment: str, tmp_path: Path
) -> None:
    """A content URL outside the configured Jira origin is rejected before any request goes there."""
    running = await start_jira(deployment=deployment)
    adapter = await make_adapter(running)
    ref = await ticket(adapter)
    running.sim.add_attachment(ref.key, "a.txt", b"abc")
    running.sim.settings.content_base_url = running.url.replace("127.0.0.1", "localhost")

    (listed,) = await adapter.list_attachments(ref)
    with pytest.raises(InvalidPayloadError, match="not the configured Jira URL"):
        await adapter.download_attachment(listed, tmp_path / "a.txt")

    assert list(tmp_path.iterdir()) == []
    assert running.sim.calls["GET /secure/attachment/{attachment}/{filename}"] == 0
    assert running.sim.calls["GET /rest/api/2/attachment/content/{attachment}"] == 0


@pytest.mark.parametrize("deployment", DEPLOYMENTS)
async def test_download_cut_off(start_jira: StartJira, make_adapter: MakeAdapter, deployment: str, tmp_path: Path) -> None:
    """A download cut off half-way is RemoteUnavailableError, and no partial file stays."""
    running = await start_jira(deployment=deployment)
    adapter = await make_adapter(running)
    ref = await ticket(adapter)
    running.sim.add_attachment(ref.key, "big.bin", size=500_000)
    running.sim.settings.download_cut_bytes = 200_000

    (listed,) = await adapter.list_attachments(ref)
    with pytest.raises(RemoteUnavailableError):
        await adapter.download_attachment(listed, tmp_path / "big.bin")

    assert list(tmp_path.iterdir()) == []


async def test_download_longer_than_listed(jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter, tmp_path: Path) -> None:
    """A body longer than the size Jira lists is InvalidPayloadError, and no file stays."""
    ref = await ticket(cloud_adapter)
    stored = jira_cloud.sim.add_attachment(ref.key, "a.bin", b"0123456789" * 100)
    stored.size = 10

    (listed,) = await cloud_adapter.list_attachments(ref)
    with pytest.raises(InvalidPayloadError, match="more than the 10 bytes"):
        await cloud_adapter.download_attachment(listed, tmp_path / "a.bin")

    assert list(tmp_path.iterdir()) == []


async def test_download_missing_attachment(jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter, tmp_path: Path) -> None:
    """An attachment deleted after it was listed is RejectedError 404, and no file is written."""
    ref = await ticket(cloud_adapter)
    jira_cloud.sim.add_attachment(ref.key, "a.txt", b"abc")
    (listed,) = await cloud_adapter.list_attachments(ref)
    jira_cloud.sim.delete_attachment(listed.id)

    with pytest.raises(RejectedError) as caught:
        await cloud_adapter.download_attachment(listed, tmp_path / "a.txt")

    assert caught.value.status == 404
    assert list(tmp_path.iterdir()) == []


async def test_download_bad_id(cloud_adapter: JiraTicketAdapter, tmp_path: Path) -> None:
    """An attachment id that is not a number never reaches a URL."""
    attachment = TicketAttachment("../1", "x.bin", 1, TicketAccount("a", "A"), datetime.now(timezone.utc))

    with pytest.raises(InvalidPayloadError):
        await cloud_adapter.download_attachment(attachment, tmp_path / "x.bin")


async def test_transfers_bounded_memory(jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter, tmp_path: Path) -> None:
    """A 24 MiB file goes up and down without either side holding it in memory."""
    size = 24 * MIB
    jira_cloud.sim.settings.upload_limit_bytes = size
    ref = await ticket(cloud_adapter)
    source = tmp_path / "source.bin"
    with source.open("wb") as file:
        for number in range(size // MIB):
            file.write(bytes([number]) * MIB)

    tracemalloc.start()
    try:
        uploaded = await cloud_adapter.upload_attachment(ref, AttachmentUpload("big.bin", source, size))
        upload_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        written = await cloud_adapter.download_attachment(uploaded, tmp_path / "copy.bin")
        download_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert written == size
    assert (tmp_path / "copy.bin").read_bytes() == source.read_bytes()
    assert upload_peak < 8 * MIB
    assert download_peak < 8 * MIB


@SKIP_WITHOUT_OPENSSL
async def test_transfers_over_tls(
    serve_tls: ServeTls, tls_files: TlsFiles, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Upload, download and the media redirect verify the server with the configured CA bundle."""
    sim = JiraSimulator(deployment="cloud")
    url = await serve_tls(make_app(sim), tls_files.loopback)
    sim.settings.media_base_url = url.replace("127.0.0.1", "localhost")
    adapter = JiraTicketAdapter(jira_settings(RunningJira(sim, url), monkeypatch, ca_bundle=str(tls_files.ca)), "SEC")
    await adapter.open()
    try:
        ref = await ticket(adapter)
        uploaded = await adapter.upload_attachment(ref, spooled(tmp_path, "tls.txt", b"secret evidence"))
        written = await adapter.download_attachment(uploaded, tmp_path / "tls-copy.txt")
    finally:
        await adapter.close()
        sim.close()

    assert written == 15
    assert (tmp_path / "tls-copy.txt").read_bytes() == b"secret evidence"
    assert sim.media_requests == [{"attachment_id": uploaded.id, "authorization": False}]


# The simulator's attachment endpoints


async def test_sim_requires_xsrf_header(jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter) -> None:
    """An upload without `X-Atlassian-Token: no-check` is 403, like Jira's XSRF check."""
    ref = await ticket(cloud_adapter)
    form = aiohttp.FormData()
    form.add_field("file", b"abc", filename="a.txt")
    auth = aiohttp.BasicAuth("mdr-connector@example.test", "simulator-api-token")
    async with aiohttp.ClientSession(auth=auth) as session:
        refused = await session.post(f"{jira_cloud.url}/rest/api/2/issue/{ref.id}/attachments", data=form)
        form = aiohttp.FormData()
        form.add_field("file", b"abc", filename="a.txt")
        accepted = await session.post(
            f"{jira_cloud.url}/rest/api/2/issue/{ref.id}/attachments", data=form, headers={"X-Atlassian-Token": "no-check"}
        )
        body = await accepted.json()

    assert refused.status == 403
    assert accepted.status == 200
    assert body[0]["filename"] == "a.txt"
    assert body[0]["size"] == 3


async def test_sim_needs_file_part(jira_cloud: RunningJira, cloud_adapter: JiraTicketAdapter) -> None:
    """A multipart body without a `file` part is 400."""
    ref = await ticket(cloud_adapter)
    form = aiohttp.FormData()
    form.add_field("other", b"abc", filename="a.txt")
    auth = aiohttp.BasicAuth("mdr-connector@example.test", "simulator-api-token")
    async with aiohttp.ClientSession(auth=auth) as session:
        reply = await session.post(
            f"{jira_cloud.url}/rest/api/2/issue/{ref.id}/attachments", data=form, headers={"X-Atlassian-Token": "no-check"}
        )

    assert reply.status == 400
    assert jira_cloud.sim.issue(ref.key).attachments == []


async def test_sim_control_attachment(jira_cloud: RunningJira) -> None:
    """The control API attaches text or generated bytes and deletes attachments."""
    issue = jira_cloud.sim.create_issue({"project": {"key": "SEC"}, "issuetype": {"name": "Task"}, "summary": "x"})
    base = jira_cloud.url
    async with aiohttp.ClientSession() as session:
        text = await session.post(f"{base}/_sim/issues/{issue.key}/attachments", json={"filename": "a.txt", "text": "hi"})
        generated = await session.post(f"{base}/_sim/issues/{issue.key}/attachments", json={"filename": "b.bin", "size": 70000})
        invalid = await session.post(f"{base}/_sim/issues/{issue.key}/attachments", json={"filename": "c.bin"})
        generated_id = (await generated.json())["id"]
        deleted = await session.delete(f"{base}/_sim/attachments/{generated_id}")

    assert text.status == 201
    assert generated.status == 201
    assert invalid.status == 400
    assert deleted.status == 204
    assert [(item.filename, item.size) for item in issue.attachments] == [("a.txt", 2)]


async def test_sim_removes_files_on_stop() -> None:
    """Stopping the simulator removes its attachment folder."""
    sim = JiraSimulator()
    issue = sim.create_issue({"project": {"key": "SEC"}, "issuetype": {"name": "Task"}, "summary": "x"})
    async with run_simulator(sim):
        sim.add_attachment(issue.key, "a.txt", b"abc")
        folder = sim.files.folder

    assert folder is not None
    assert not folder.exists()


async def test_sim_attachment_moves_updated(jira_cloud: RunningJira) -> None:
    """Adding an attachment moves the issue's `updated`."""
    issue = jira_cloud.sim.create_issue({"project": {"key": "SEC"}, "issuetype": {"name": "Task"}, "summary": "x"})
    before = issue.updated
    jira_cloud.sim.advance(30)

    jira_cloud.sim.add_attachment(issue.key, "a.txt", b"abc")

    assert issue.updated > before


# Transfer helpers


def test_multipart_body(tmp_path: Path) -> None:
    """The streamed body is a well-formed multipart message whose length matches Content-Length."""
    path = tmp_path / "f.bin"
    path.write_bytes(b"payload" * 20000)
    body = MultipartFileBody(path, "Отчёт.txt", "text/plain")

    data = b"".join(iter(lambda: body.read(1000), b""))
    body.close()

    assert len(data) == len(body)
    assert data.startswith(f"--{body.boundary}\r\n".encode())
    assert 'name="file"; filename="Отчёт.txt"'.encode() in data
    assert b"Content-Type: text/plain\r\n\r\npayload" in data
    assert data.endswith(f"\r\n--{body.boundary}--\r\n".encode())
    assert body.content_type == f"multipart/form-data; boundary={body.boundary}"


def test_multipart_bad_content_type(tmp_path: Path) -> None:
    """A content type that could break the part header is replaced by application/octet-stream."""
    path = tmp_path / "f.bin"
    path.write_bytes(b"x")
    body = MultipartFileBody(path, "a.txt", "text/plain\r\nX-Evil: 1")

    data = body.read(-1)
    body.close()

    assert b"X-Evil" not in data
    assert b"Content-Type: application/octet-stream\r\n" in data


def test_multipart_file_shrinks(tmp_path: Path) -> None:
    """A spooled file cut short while it is sent fails instead of leaving Jira waiting for bytes."""
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 100)
    body = MultipartFileBody(path, "a.txt", "text/plain")
    path.write_bytes(b"x" * 10)

    with pytest.raises(InvalidPayloadError, match="became shorter"):
        body.read(-1)
    body.close()


@pytest.mark.parametrize(
    ("name", "quoted"),
    [("plain.txt", "plain.txt"), ('say "hi".txt', "say %22hi%22.txt"), ("a\r\nb", "a%0D%0Ab"), ("Файл 😀", "Файл 😀")],
    ids=["plain", "quotes", "line-break", "unicode"],
)
def test_quote_filename(name: str, quoted: str) -> None:
    """File names are quoted as browsers quote them in multipart headers."""
    assert quote_filename(name) == quoted


class _Response:
    def __init__(self, status: int, location: str = "") -> None:
        self.status_code = status
        self.headers = {"Location": location} if location else {}
        self.closed = False

    def close(self) -> None:
        self.closed = True


class _Getter:
    """Replies in order to GET requests, recording their URLs."""

    def __init__(self, *responses: _Response) -> None:
        self.responses = list(responses)
        self.urls: list[str] = []

    def __call__(self, url: str) -> Any:
        self.urls.append(url)
        return self.responses.pop(0)


def test_no_downgrade_to_http() -> None:
    """A redirect from https to http is refused, because the file would travel unencrypted."""
    jira = _Getter(_Response(303, "http://media.example.test/file"))
    media = _Getter()

    with pytest.raises(RemoteUnavailableError, match="unencrypted"):
        open_content("https://jira.example.test/a/1", "https://jira.example.test", jira, media)

    assert media.urls == []


def test_redirect_limit() -> None:
    """A redirect loop stops after a few hops."""
    jira = _Getter(*[_Response(302, "https://jira.example.test/a/1") for _ in range(10)])

    with pytest.raises(RemoteUnavailableError, match="more than 3 times"):
        open_content("https://jira.example.test/a/1", "https://jira.example.test:443", jira, _Getter())

    assert len(jira.urls) == 4


def test_media_error_mapped() -> None:
    """A media host's 404 is RejectedError and its 503 RemoteUnavailableError."""
    for status, error in ((404, RejectedError), (503, RemoteUnavailableError)):
        jira = _Getter(_Response(303, "https://media.example.test/f"))
        media = _Getter(_Response(status))

        with pytest.raises(error):
            open_content("https://jira.example.test/a/1", "https://jira.example.test", jira, media)
