"""Attacks on the Redmine adapter with what a SOC meets: hostile text, moved issues, a locked account.

The tests run against the real Redmine from .ci/redmine.py. Rendering is
checked on the HTML page of an issue in a public project, which Redmine
shows to anonymous visitors, so the assertions read the same HTML as a
person's browser.
"""

from __future__ import annotations

import html
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import requests

pytest.register_assert_rewrite("redmine_helpers")

from fixtures_mdr import MDR_CLIENT_ID  # noqa: E402
from fixtures_redmine import RedmineServer, create_project, delete_project  # noqa: E402
from redmine_helpers import human_issue, human_note, human_update, read_issue, redmine_settings, unique  # noqa: E402
from test_redmine_sync import RedmineHarness, redmine_harness  # noqa: E402, F401

from mdr_connector.adapters.redmine import formatting  # noqa: E402
from mdr_connector.adapters.redmine.adapter import RedmineTicketAdapter  # noqa: E402
from mdr_connector.connector.errors import CredentialsRejectedError, RejectedError  # noqa: E402
from mdr_connector.connector.tickets import (  # noqa: E402
    MDR_ORIGIN,
    CommentDraft,
    SyncMarker,
    TicketDraft,
    TicketFields,
    TicketRef,
)

MakeAdapter = Callable[..., Awaitable[RedmineTicketAdapter]]
# A login right after a non-word character is a mention in Redmine 5.0, which emails that user.
MENTION = re.compile(r"(?:^|\W)@[A-Za-z0-9_]")
PRE_BLOCK = re.compile(r"<pre>.*?</pre>", re.DOTALL)


@dataclass
class PublicProject:
    """A public project with a wiki page, whose issues Redmine renders for anonymous visitors."""

    identifier: str
    id: int
    seed_issue: int


@pytest.fixture
def public_project(redmine_server: RedmineServer) -> Iterator[PublicProject]:
    project = create_project(redmine_server, "t-public")
    try:
        make_public(redmine_server, project["id"])
        page = {"wiki_page": {"text": "Only for members."}}
        response = redmine_server.request(
            "PUT", f"/projects/{project['id']}/wiki/Secret_page.json", redmine_server.admin_key, json=page
        )
        assert response.status_code == 201, response.text
        seed = human_issue(redmine_server, project["identifier"])
        yield PublicProject(project["identifier"], project["id"], seed["id"])
    finally:
        delete_project(redmine_server, project["id"])


def make_public(server: RedmineServer, project_id: int) -> None:
    body = {"project": {"is_public": True, "enabled_module_names": ["issue_tracking", "files", "wiki"]}}
    response = server.request("PUT", f"/projects/{project_id}.json", server.admin_key, json=body)
    assert response.status_code == 204, response.text


@pytest.fixture
async def make_adapter(
    redmine_server: RedmineServer, public_project: PublicProject, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[MakeAdapter]:
    adapters: list[RedmineTicketAdapter] = []

    async def make(*, key: str | None = None, **settings: Any) -> RedmineTicketAdapter:
        adapter = RedmineTicketAdapter(
            redmine_settings(redmine_server, monkeypatch, key=key, **settings), project=public_project.identifier
        )
        adapters.append(adapter)
        await adapter.open()
        return adapter

    yield make
    for adapter in adapters:
        await adapter.close()


@pytest.fixture
async def adapter(make_adapter: MakeAdapter) -> RedmineTicketAdapter:
    return await make_adapter()


def draft(project: str, **fields: Any) -> TicketDraft:
    values: dict[str, Any] = {"summary": "Suspicious PowerShell", "description": "Host ws01.", "priority": "High", "labels": ()}
    values.update(fields)
    return TicketDraft(
        incident_id=unique("inc").replace(" ", "-"), project=project, issue_type="Bug", fields=TicketFields(**values)
    )


def note(body: str, source_id: str = "c-1") -> CommentDraft:
    return CommentDraft(body=body, marker=SyncMarker(origin=MDR_ORIGIN, source_id=source_id))


# --- rendered issue pages -----------------------------------------------------------


@dataclass
class RenderedIssue:
    description: str
    notes: list[str]


def rendered_issue(server: RedmineServer, issue_id: int | str) -> RenderedIssue:
    """Read the issue's page as an anonymous visitor and return the HTML of its description and notes."""
    response = requests.get(f"{server.url}/issues/{issue_id}", timeout=30, allow_redirects=False)
    assert response.status_code == 200, (
        f"Redmine did not show issue {issue_id} to an anonymous visitor (HTTP {response.status_code}); "
        "these tests need Administration → Settings → Authentication → Authentication required off"
    )
    page = response.text
    description = re.search(r'<div class="description">.*?<div class="wiki">(.*?)</div>\s*</div>', page, re.DOTALL)
    notes = re.findall(r'<div id="journal-\d+-notes" class="wiki">(.*?)</div>\s*</div>', page, re.DOTALL)
    return RenderedIssue(description.group(1) if description else "", notes)


def visible_text(fragment: str) -> str:
    """The words a browser shows for an HTML fragment, with runs of white space as one space.

    Zero-width spaces are left out, because they are invisible; the
    connector puts one into a `</pre>` inside code.
    """
    text = re.sub(r"<(?:br|/?(?:p|li|ul|ol|h\d|pre|blockquote|table|tr|td|th|div))\b[^>]*>", " ", fragment)
    text = re.sub(r"<[^>]+>", "", text)
    return " ".join(html.unescape(text).replace("\u200b", "").split())


def own_note_html(server: RedmineServer, issue_id: str) -> str:
    """The rendered HTML of the issue's only note, without the connector's marker line."""
    [rendered] = rendered_issue(server, issue_id).notes
    return re.sub(r"\[mdr-connector [^\]]*\]", "", rendered)


def stored_notes(server: RedmineServer, issue_id: str) -> list[str]:
    return [journal["notes"] for journal in read_issue(server, issue_id, "journals")["journals"] if journal["notes"]]


# --- Textile from MDR text -----------------------------------------------------------


@dataclass(frozen=True)
class TextCase:
    body: str
    visible: str
    forbidden: tuple[str, ...] = ()


TEXTILE_CASES = {
    "include-macro": TextCase("Read {{include(Secret page)}}", "Read {{include(Secret page)}}", ("Only for members.",)),
    "textile-image": TextCase("See !http://127.0.0.1:9/pixel.png! here", "See !http://127.0.0.1:9/pixel.png! here", ("<img",)),
    "markdown-image": TextCase("![pixel](http://127.0.0.1:9/pixel.png)", "pixel", ("<img",)),
    "linked-image": TextCase("[![logo](http://127.0.0.1:9/l.png)](http://127.0.0.1:9/)", "logo", ("<img",)),
    "mention": TextCase("ping @admin please", "ping @admin please", ("user-mention",)),
    "wiki-link": TextCase("read [[Secret page]]", "read [[Secret page]]", ("wiki-page",)),
    "textile-link": TextCase('"click":http://127.0.0.1:9/', '"click":http://127.0.0.1:9/', ('>click</a>',)),
    "script-link": TextCase("[click](javascript:alert(1))", "click (javascript:alert(1))", ("javascript:alert(1)\"",)),
    "abbreviation": TextCase("CPU(high) and p. 5", "CPU(high) and p. 5", ("<abbr",)),
    "textile-markup": TextCase(
        "C:\\Temp\\\\*.exe -x- +y+ ^z^ %{color:red}q% ==raw== |a|b|",
        "C:\\Temp\\*.exe -x- +y+ ^z^ %{color:red}q% ==raw== |a|b|",
        ("<del>", "<ins>", "<sup>", "<sub>", "<span", "<table"),
    ),
    "html": TextCase("<b>bold</b> <notextile>x</notextile>", "<b>bold</b> <notextile>x</notextile>", ("<b>",)),
    "code-block": TextCase(
        "```\n*bold* @admin {{hello_world}} !x.png! #1\n```",
        "*bold* @admin {{hello_world}} !x.png! #1",
        ("Hello world!", "user-mention", "<strong>", "<img"),
    ),
    "code-block-lines": TextCase(
        "```\nif (a < b && c) {\n\n  exit </pre> 1\n}\n```",
        "if (a < b && c) { exit </pre> 1 }",
        ("&amp;lt;",),
    ),
    "inline-code-at": TextCase("mail `soc@example.test` now", "mail soc@example.test now", ("&lt;tt",)),
    "loose-list": TextCase("1. isolate\n\n   the host\n2. reset", "isolate the host reset", ("&lt;li",)),
    "quote": TextCase("> one\n>\n> two", "one two", ("&lt;blockquote",)),
}


@pytest.mark.parametrize("case", TEXTILE_CASES.values(), ids=TEXTILE_CASES.keys())
async def test_textile_note_shows_text(
    adapter: RedmineTicketAdapter, public_project: PublicProject, redmine_server: RedmineServer, case: TextCase
) -> None:
    """A note from MDR text renders as that text, with no macro, image, mention, link or stray tag made of it."""
    ref = await adapter.create_ticket(draft(public_project.identifier))

    await adapter.add_comment(ref, note(case.body))

    rendered = own_note_html(redmine_server, ref.id)
    assert visible_text(rendered) == case.visible
    for fragment in case.forbidden:
        assert fragment not in rendered


async def test_textile_issue_number_not_linked(
    adapter: RedmineTicketAdapter, public_project: PublicProject, redmine_server: RedmineServer
) -> None:
    """`#<number>` and `r<number>` in MDR text stay text, not links to Redmine issues or changesets."""
    ref = await adapter.create_ticket(draft(public_project.identifier))
    text = f"step #{public_project.seed_issue}, (#{public_project.seed_issue}) and r{public_project.seed_issue}"

    await adapter.add_comment(ref, note(text))

    rendered = own_note_html(redmine_server, ref.id)
    assert visible_text(rendered) == text
    assert "<a" not in rendered


async def test_textile_description_shows_text(
    adapter: RedmineTicketAdapter, public_project: PublicProject, redmine_server: RedmineServer
) -> None:
    """An incident description with a macro, an image and a code block renders as written."""
    description = "Seen {{hello_world}} and ![x](http://127.0.0.1:9/p.png)\n\n```\nGet-Process *x*\n```"

    ref = await adapter.create_ticket(draft(public_project.identifier, description=description))

    rendered = rendered_issue(redmine_server, ref.id).description
    assert "Hello world!" not in rendered
    assert "<img" not in rendered
    assert "<pre>\nGet-Process *x*\n</pre>" in rendered


async def test_textile_keeps_formatting(
    adapter: RedmineTicketAdapter, public_project: PublicProject, redmine_server: RedmineServer
) -> None:
    """Emphasis, code, links, lists, quotes, headings and tables still render as such."""
    body = (
        "## Steps\n\nRun **now**: `whoami`, see [docs](https://example.test/a_b).\n\n"
        "- one\n  - nested\n- two\n\n1. first\n2. second\n\n> quoted\n\n| host | ip |\n|---|---|\n| ws-01 | 10.0.0.5 |"
    )
    ref = await adapter.create_ticket(draft(public_project.identifier))

    await adapter.add_comment(ref, note(body))

    rendered = own_note_html(redmine_server, ref.id)
    assert "<h2" in rendered
    assert "<strong>now</strong>" in rendered
    assert "<code>" in rendered
    assert '<a href="https://example.test/a_b" class="external">docs</a>' in rendered
    assert rendered.count("<ul>") == 2
    assert "<ol>" in rendered
    assert "<blockquote>" in rendered
    assert "<th>host</th>" in rendered
    assert visible_text(rendered) == (
        "Steps¶ Run now: whoami, see docs. one nested two first second quoted host ip ws-01 10.0.0.5"
    )


async def test_textile_has_no_mention(
    adapter: RedmineTicketAdapter, public_project: PublicProject, redmine_server: RedmineServer
) -> None:
    """Redmine finds no `@login` in the stored note outside <pre>, so MDR text notifies no user."""
    ref = await adapter.create_ticket(draft(public_project.identifier))

    await adapter.add_comment(ref, note("user `admin` and @admin, `@admin` and\n\n```\n@admin\n```"))

    [stored] = stored_notes(redmine_server, ref.id)
    assert MENTION.search(PRE_BLOCK.sub("", stored)) is None


async def test_person_code_block_read_as_code(
    adapter: RedmineTicketAdapter, public_project: PublicProject, redmine_server: RedmineServer
) -> None:
    """A person's code block with a language (Redmine's code button) reaches MDR as the code alone."""
    ref = await adapter.create_ticket(draft(public_project.identifier))
    human_note(redmine_server, ref.id, '<pre><code class="powershell">\nGet-Process | Stop-Process\n</code></pre>')

    [comment] = await adapter.list_comments(ref)

    assert comment.body == "    Get-Process | Stop-Process"


async def test_own_textile_read_back(adapter: RedmineTicketAdapter, public_project: PublicProject) -> None:
    """The connector's own escaped Textile reads back as the Markdown it came from."""
    body = "Host **ws-01**: run `admin-tool` {{x}} #1 @admin.\n\n```\na < b\n```"
    ref = await adapter.create_ticket(draft(public_project.identifier))

    await adapter.add_comment(ref, note(body))
    [comment] = await adapter.list_comments(ref)

    assert comment.body == "Host **ws-01**: run `admin-tool` {{x}} \\#1 @admin.\n\n    a < b"


# --- CommonMark ----------------------------------------------------------------------


async def test_commonmark_note_is_inert(
    make_adapter: MakeAdapter, public_project: PublicProject, redmine_server: RedmineServer
) -> None:
    """With CommonMark, images become links, raw HTML text, and no macro or mention is stored."""
    adapter = await make_adapter(text_formatting="common_mark")
    ref = await adapter.create_ticket(draft(public_project.identifier, description="![d](http://127.0.0.1:9/d.png) {{hello_world}}"))
    body = 'Seen ![p](http://127.0.0.1:9/p.png) <img src="http://127.0.0.1:9/q.png"> {{hello_world}} ping @admin'

    await adapter.add_comment(ref, note(body))

    [stored] = stored_notes(redmine_server, ref.id)
    description = read_issue(redmine_server, ref.id)["description"]
    for text in (stored, description):
        assert "![" not in text
        assert re.search(r"(?<!\\)<img", text) is None
        assert "{{" not in text
        assert MENTION.search(text) is None
    assert "[p](http://127.0.0.1:9/p.png)" in stored
    [comment] = await adapter.list_comments(ref)
    assert comment.body.startswith("Seen [p](http://127.0.0.1:9/p.png) \\<img")


# --- formatting fallback ---------------------------------------------------------------


def test_textile_fallback_is_literal(monkeypatch: pytest.MonkeyPatch) -> None:
    """When pandoc fails, the Markdown goes into one <pre> block whose end tags cannot close it early."""

    def failing(*_args: Any, **_kwargs: Any) -> str:
        raise formatting.PandocFailed("ExitStatus64")

    monkeypatch.setattr(formatting, "_run_pandoc", failing)

    assert formatting.markdown_to_textile("a < b </pre> {{x}}") == f"<pre>\na < b <{formatting.ZERO_WIDTH_SPACE}/pre> {{{{x}}}}\n</pre>"
    assert formatting.markdown_to_commonmark("``` {{x}}") == "````\n``` {{x}}\n````"


def test_deep_nesting_falls_back() -> None:
    """A document nested deeper than Python's recursion limit is sent as literal text instead of failing."""
    source = ">" * 900 + " deep"

    assert formatting.markdown_to_textile(source) == f"<pre>\n{source}\n</pre>"
    assert formatting.markdown_to_commonmark(source) == f"```\n{source}\n```"


# --- issues people move ------------------------------------------------------------------


async def test_moved_issue_still_changed(
    adapter: RedmineTicketAdapter, public_project: PublicProject, redmine_server: RedmineServer
) -> None:
    """An issue a person moved to another project of the account is still found by the change search."""
    other = create_project(redmine_server, "t-moved")
    try:
        ref = await adapter.create_ticket(draft(public_project.identifier))
        since = datetime.now(timezone.utc) - timedelta(seconds=2)
        human_update(redmine_server, ref.id, project_id=other["id"])
        human_note(redmine_server, ref.id, "Moved to the IT project.")

        changes = await adapter.changed_tickets(since)

        assert ref.key in [change.ref.key for change in changes]
    finally:
        delete_project(redmine_server, other["id"])


async def test_sync_follows_moved_issue(redmine_harness: RedmineHarness) -> None:
    """A note on an issue that a person moved to another project reaches MDR once."""
    harness = redmine_harness
    incident_id = harness.seed()["incident_id"]
    sync = await harness.cycles(1)
    issue = harness.issue_for(incident_id)
    other = create_project(harness.server, "t-moved")
    try:
        human_update(harness.server, issue["id"], project_id=other["id"])
        await harness.next_second()
        human_note(harness.server, issue["id"], "Handed over to IT operations.")
        await harness.next_second()
        await harness.cycles(2, sync)

        assert sum("Handed over to IT operations." in text for text in harness.mdr_texts(incident_id)) == 1
    finally:
        delete_project(harness.server, other["id"])


async def test_sync_mdr_comment_renders(redmine_harness: RedmineHarness) -> None:
    """An MDR comment with code, a list and a mention renders in Redmine as written, with nothing active."""
    harness = redmine_harness
    make_public(harness.server, harness.project["id"])
    incident_id = harness.seed()["incident_id"]
    comment = (
        "<p>Ask @admin, then run:</p><pre><code>Get-Process *svc* | Stop-Process {{hello_world}}</code></pre>"
        "<ul><li><p>isolate</p><p>the host</p></li><li><p>reset</p></li></ul>"
    )
    harness.mdr_sim.add_soc_comment(MDR_CLIENT_ID, incident_id, comment, author="Ivan Petrov")

    await harness.cycles(2)

    issue = harness.issue_for(incident_id)
    [rendered] = rendered_issue(harness.server, issue["id"]).notes
    assert "<pre>\nGet-Process *svc* | Stop-Process {{hello_world}}\n</pre>" in rendered
    assert "user-mention" not in rendered
    assert "Hello world!" not in rendered
    assert "&lt;li" not in rendered
    assert "Ask @admin, then run:" in visible_text(rendered)


# --- the account -----------------------------------------------------------------------


@pytest.fixture
def throwaway_account(redmine_server: RedmineServer, public_project: PublicProject) -> Iterator[dict[str, Any]]:
    """A user of its own with the connector's role in the public project, deleted afterwards."""
    login = f"attack-{uuid.uuid4().hex[:10]}"
    body = {
        "user": {
            "login": login,
            "firstname": "Attack",
            "lastname": "Test",
            "mail": f"{login}@example.invalid",
            "generate_password": True,
            "mail_notification": "none",
        }
    }
    response = redmine_server.request("POST", "/users.json", redmine_server.admin_key, json=body)
    assert response.status_code == 201, response.text
    user_id = response.json()["user"]["id"]
    try:
        membership = {"membership": {"user_id": user_id, "role_ids": [redmine_server.role_id]}}
        path = f"/projects/{public_project.id}/memberships.json"
        response = redmine_server.request("POST", path, redmine_server.admin_key, json=membership)
        assert response.status_code == 201, response.text
        user = redmine_server.request("GET", f"/users/{user_id}.json", redmine_server.admin_key).json()["user"]
        yield user
    finally:
        redmine_server.request("DELETE", f"/users/{user_id}.json", redmine_server.admin_key)


async def test_locked_account_named(
    make_adapter: MakeAdapter, redmine_server: RedmineServer, public_project: PublicProject, throwaway_account: dict[str, Any]
) -> None:
    """When an administrator locks the connector's account, the error names the lock as a possible cause."""
    adapter = await make_adapter(key=throwaway_account["api_key"])
    ref = TicketRef(key=str(public_project.seed_issue), id=str(public_project.seed_issue), url="")
    response = redmine_server.request(
        "PUT", f"/users/{throwaway_account['id']}.json", redmine_server.admin_key, json={"user": {"status": 3}}
    )
    assert response.status_code == 204, response.text

    with pytest.raises(CredentialsRejectedError) as caught:
        await adapter.add_comment(ref, note("After the lock."))

    assert "locked" in str(caught.value)
    assert throwaway_account["api_key"] not in str(caught.value)


# --- creating issues -------------------------------------------------------------------


async def test_create_with_disabled_tracker_rejected(
    adapter: RedmineTicketAdapter, public_project: PublicProject, redmine_server: RedmineServer
) -> None:
    """A tracker switched off in the project is refused by name, instead of Redmine using the project's first tracker."""
    trackers = {"project": {"tracker_ids": [redmine_server.trackers["Bug"], redmine_server.trackers["Feature"]]}}
    response = redmine_server.request("PUT", f"/projects/{public_project.id}.json", redmine_server.admin_key, json=trackers)
    assert response.status_code == 204, response.text
    ticket = draft(public_project.identifier)
    ticket = TicketDraft(ticket.incident_id, ticket.project, "Support", ticket.fields)

    with pytest.raises(RejectedError) as caught:
        await adapter.create_ticket(ticket)

    assert "tracker 'Support' is not enabled" in str(caught.value)
    assert "Bug, Feature" in str(caught.value)
    assert await adapter.find_ticket(ticket.incident_id) is None


async def test_long_note_round_trips(adapter: RedmineTicketAdapter, public_project: PublicProject) -> None:
    """A 70,000-character MDR comment full of markup characters is stored whole and reads back the same."""
    line = "Процесс C:\\Temp\\x_y.exe -k #12 @svc {{x}} [a] *b* 50% ~1~ |c|.\n\n"
    body = (line * (70_000 // len(line) + 1))[:70_000].rstrip()
    ref = await adapter.create_ticket(draft(public_project.identifier))

    await adapter.add_comment(ref, note(body))
    [comment] = await adapter.list_comments(ref)

    assert len(body) >= 69_990
    assert comment.body.replace("\\", "") == body.replace("\\", "")
